// Fragment of shaders/poly_pass2.wgsl, a non-causal range before the last, written at depth 0: x
// adds what the earlier ranges folded into diag at AT (the first range finds nothing there).
if (params.chunk0 > 0u) {
    x += diag[{{AT}}];
    words_read += 1u;
}
