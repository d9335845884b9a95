// Fragment of shaders/poly_pass1.wgsl and poly_coop_pass1.wgsl (slot PREFETCH_LOAD_FIRST): the
// register prefetch of the split's first key tile (LOAD), where the split has keys.
    if (j_begin < j_end) {
{{LOAD}}
    }
