// Fragment of shaders/poly_causal_diag_coop.wgsl, filled once per output accumulator o_C (value
// columns COL..COL + 15, the ones column among them): through the subgroup's staging slice into
// [num | D], num = vmin D + vrange num', guarded to the rows and columns that exist.
    coopStoreT(o_{{C}}, &s_t[sb], 16u);
    subgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = row0 + i / 16u;
        let col = {{COL}}u + i % 16u;
        if (row < rows && col < EV1) {
            var x = s_t[sb + i];
            if (col < EV) {
                x = vn_t[col] * d_t[row] + vn_t[2u * EV + col] * x;
            }
            diag[(head * params.l + q0 + row) * EV1 + col] = x;
            words_written += 1u;
        }
    }
    subgroupBarrier();
