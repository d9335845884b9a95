// Fragment of shaders/exact_coop_q_whole.wgsl and exact_coop_q_parts.wgsl (slot Q_LOAD): one
// element of Q (Q_ELEM) scaled to log2 units, zero past Q's last row, and the words it read.
var x = {{X_TYPE}}();
if (row < q_rows) {
    x = {{Q_ELEM}} * params.scale_log2;
    words_read += {{WORDS}};
}
