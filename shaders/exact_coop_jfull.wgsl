// Fragment of shaders/exact_coop.wgsl (slot JFULL, after jmax), with unmasked key tiles only:
// jfull, the keys that every row of the subgroup sees.
    // Keys every row of this subgroup sees (its first row sees the fewest).
    var jfull = kv_end;
    if (params.causal != 0u) {
        let g0 = params.q_offset + q0 + row0;
        jfull = min(kv_end, max(g0 + 1u, params.kv_offset) - params.kv_offset);
    }
