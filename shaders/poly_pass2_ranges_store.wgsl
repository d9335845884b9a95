// Fragment of shaders/poly_pass2.wgsl, its STORE with feature ranges: a range before the last
// (chunks < CHUNKS) folds its sums into diag (FOLD), the last one stores the output (LAST).
        if (params.chunks < {{CHUNKS}}u) {
{{FOLD}}
        } else {
{{LAST}}
        }
