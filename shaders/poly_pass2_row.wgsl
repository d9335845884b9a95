// Fragment of shaders/poly_pass2.wgsl, filled once per micro-tile row A of a thread (ROW: its row
// in the block), written at depth 0: for a row that exists, its normaliser d_A (the sum of the
// TPR partials in the feature tile), then the row's store (BODY).
{
    let r = {{ROW}};
    if (r < rows) {
        var d_{{A}} = 0.0;
        for (var h = 0u; h < TPR; h++) {
            d_{{A}} += phi_get(h * B + r);
        }
{{BODY}}
    }
}
