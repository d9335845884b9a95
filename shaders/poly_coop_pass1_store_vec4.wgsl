// Fragment of shaders/poly_coop_pass1.wgsl (slot PREFETCH_STORE, vec4 loads): the K tile's
// constant-1 row (zero past the tile's keys), then each prefetch register's store (STORES).
        for (var j = lid; j < BK; j += WG) {
            k_t[E * KS + j] = select(0.0, 1.0, j < kr_t);
        }
{{STORES}}
