// Fragment of shaders/poly_coop_pass1.wgsl, filled once per accumulator acc_A_C (row tile A of
// subgroup sg, value columns COL..COL + 15): the accumulator goes through the subgroup's staging
// tile into this split's partial S' rows, guarded to the rows and columns that exist.
    coopStoreT(acc_{{A}}_{{C}}, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + {{A}}u) * 16u + i / 16u;
        let col = {{COL}}u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
