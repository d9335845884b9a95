// Fragment of shaders/poly_pass2.wgsl, its CHUNK_STORE, filled once per prefetch register U: the
// register's S' word into the S' tile or, from the normaliser column, beside the feature weight.
            if (si_{{U}} < RC * EV1) {
                if (sc_{{U}} < EV) {
                    s_tile[sf_{{U}} * CW + sc_{{U}} / 4u][sc_{{U}} % 4u] = sx_{{U}};
                } else {
                    wz_t[sf_{{U}}].y = sx_{{U}};
                }
            }
