// Fragment of shaders/poly_causal_diag.wgsl, its GATE_Q_LOAD where gated: the block's query gate
// sums (hi, lo), zero past its rows.
    for (var i = lid; i < BQ; i += WG) {
        var x = vec2<f32>();
        if (i < rows) {
            let at = 2u * (unit * params.s + q0 + i);
            x = vec2<f32>(gate[at], gate[at + 1u]);
            words_read += 2u;
        }
        gq_t[i] = x;
    }
