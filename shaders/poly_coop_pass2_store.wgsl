// Fragment of shaders/poly_coop_pass2.wgsl, filled once per accumulator acc_A_C (row tile A of
// subgroup sg, value columns COL..COL + 15): the accumulator goes through the subgroup's staging
// slice of the query tile into the output, divided by the normaliser and mapped back from the
// normalised values, guarded to the rows and columns that exist.
        coopStoreT(acc_{{A}}_{{C}}, &q_t[STAGE0 + sg * 256u], 16u);
        workgroupBarrier();
        for (var i = lane; i < 256u; i += SG) {
            let row = (sg * RT + {{A}}u) * 16u + i / 16u;
            let col = {{COL}}u + i % 16u;
            if (row < rows && col < EV) {
                o[(head * params.l + q0 + row) * EV + col] =
                    vn_t[col] + vn_t[EV + col] * (q_t[STAGE0 + sg * 256u + i] * q_t[DT0 + DS + row]);
                words_written += 1u;
            }
        }
        workgroupBarrier();
