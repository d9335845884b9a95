// Fragment of shaders/poly_pass2.wgsl, a range before the last, written at depth 0: thread column
// 0 alone folds row A's normaliser (times FACTOR) into diag (FOLD).
if (tc == 0u) {
    var x = d_{{A}}{{FACTOR}};
{{FOLD}}
}
