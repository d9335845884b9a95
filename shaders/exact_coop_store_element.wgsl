// Fragment of shaders/exact_coop_store.wgsl, filled once per staged element U of a lane (lane + O
// of the 16 x 16 tile of value columns COL..COL + 15): divided by its row's sum, guarded to the
// rows and columns that exist.
    {
        let i = lane + {{O}}u;
        let row = row0 + i / 16u;
        let col = {{COL}}u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_{{U}};
            words_written += 1u;
        }
    }
