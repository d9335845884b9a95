// Fragment of shaders/poly_pass1.wgsl, its PREFETCH_STORE without the register prefetch: the key
// and value tiles go from storage straight into workgroup memory, keys centred, the constant-1
// column 1 in every row, rows past kr zero.
        for (var i = lid; i < BK * E1; i += WG) {
            let r = i / E1;
            let c = i % E1;
            var x = 1.0;
            if (c < E) {
                x = 0.0;
                if (r < kr) {
                    x = k[(unit * params.s + j0 + r) * E + c] - mu_t[c];
                    words_read += 1u;
                }
            }
            k_tile[i] = x;
        }
        for (var i = lid; i < BK * EV; i += WG) {
            let r = i / EV;
            let c = i % EV;
            var x = 0.0;
            if (r < kr) {
                x = v[(unit * params.s + j0 + r) * EV + c];
                words_read += 1u;
            }
            v_tile[r * CW + c / 4u][c % 4u] = x;
        }
