// Fragment of shaders/exact.wgsl (slot STORE), filled once per register row A (query row ROW of
// the tile): the row's sum from the TK partial sums, the thread's output columns divided by it
// (COLUMNS: one guarded store per output register) and, for split keys, the row's statistics.
    {
        let i = {{ROW}};
        var li = 0.0;
        for (var t = 0u; t < TK; t++) {
            li += part[i * TK + t];
        }
{{COLUMNS}}
        if (params.write_stats != 0u && tk == 0u && i < q_rows) {
            let srow = (head * params.l + q0 + i) * 2u;
            stats[srow] = m_{{A}};
            stats[srow + 1u] = li;
            words_written += 2u;
        }
    }
