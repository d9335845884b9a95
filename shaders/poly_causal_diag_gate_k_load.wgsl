// Fragment of shaders/poly_causal_diag.wgsl, its GATE_K_LOAD where gated (inside the key tile's
// load): the tile's key gate sums (hi, lo), by the threads of column 0.
            if (c == 0u && j < kr) {
                let at = 2u * (unit * params.s + j0 + j);
                gk_t[j] = vec2<f32>(gate[at], gate[at + 1u]);
                words_read += 2u;
            }
