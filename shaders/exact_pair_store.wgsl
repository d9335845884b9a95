// Fragment of shaders/exact.wgsl (slot K_STORE; V_STORE one level deeper), with f16 storage of
// scalar elements, filled once per prefetch register REG (storage element idx, COL of them per
// row): its two halves into kv_tile at AT, the second only inside the row (WIDTH floats; at an odd
// width's end it is the pad half).
            let h = unpack2x16float({{REG}});
            let c = 2u * (idx % {{COL}});
            kv_tile[{{AT}}] = h.x;
            if (c + 1u < {{WIDTH}}) {
                kv_tile[{{AT}} + 1u] = h.y;
            }
