// Fragment of shaders/exact_coop.wgsl (slot Q_BLOCK), the Q block in one part: each thread reads
// elements of Q (Q_LOAD) and stores them as f16 into the K/V buffers' memory (Q_STORE); then each
// subgroup loads its fragments qf_A_D.
    for (var idx = lid; idx < BQ * EW; idx += WG) {
        let row = idx / EW;
        let c = (idx % EW) * LANES;
{{Q_LOAD}}
{{Q_STORE}}
    }
    workgroupBarrier();
{{Q_FRAGMENTS}}
    workgroupBarrier();
