// Fragment of the poly pass 2 kernels (slot of the feature table's stores), once per prefetch
// register U: the three 10-bit feature indices packed in tix_U unpacked into idx_t.
if (lid + {{O}}u < RC * IW) {
    let i = lid + {{O}}u;
    for (var t = 3u * (i % IW); t < min(G, 3u * (i % IW) + 3u); t++) {
        idx_t[(i / IW) * G + t] = (tix_{{U}} >> (10u * (t % 3u))) & 1023u;
    }
}
