// Fragment of shaders/poly_pass1.wgsl, its GATE_LOAD where gated: the tile's key weights (each
// key's gate decay to the end of its chunk).
        for (var i = lid; i < kr; i += WG) {
            kw_t[i] = key_w[unit * params.s + j0 + i];
            words_read += 1u;
        }
