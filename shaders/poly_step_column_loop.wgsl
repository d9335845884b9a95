// Fragment of shaders/poly_step.wgsl, its COLUMN on CPU adapters: a loop over the rows, the query
// heads after the first reading back what the first stored.
        for (var h = 0u; h < GROUP; h++) {
            var acc = 0.0;
            for (var f = 0u; f < rows; f++) {
                let at = col0 + f * EV1;
                var x: f32;
                if (h == 0u) {
                    x = src[at] * decay + phik[f] * vc;
                    dst[at] = x;
                } else {
                    x = dst[at];
                }
                acc += phiq[h * BR + f] * x;
            }
            partial[((unit * GROUP + h) * BLOCKS + block) * EV1 + c] = acc;
        }
