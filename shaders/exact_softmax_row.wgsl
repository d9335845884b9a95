// Fragment of shaders/exact.wgsl (slot SOFTMAX), filled once per register row A (query row ROW of
// the tile): the row's maximum from the TK posted partials and the factor alpha that rescales the
// old maximum's terms; the probabilities of the thread's keys into P (PROBS), whose sum (SUM)
// updates the running sum; the row's output accumulators rescaled (RESCALE).
        {
            var mx = m_{{A}};
            for (var t = 0u; t < TK; t++) {
                mx = max(mx, part[{{ROW}} * TK + t]);
            }
            let alpha = exp2(m_{{A}} - mx);
            m_{{A}} = mx;
{{PROBS}}
            l_{{A}} = l_{{A}} * alpha + ({{SUM}});
{{RESCALE}}
        }
