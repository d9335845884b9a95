// Fragment of shaders/exact_coop.wgsl (slot Q_BLOCK), the Q block in PARTS parts of PART_ROWS rows:
// as shaders/exact_coop_q_whole.wgsl one part at a time, each subgroup taking its fragments qf_A_D
// (declared by Q_DECL) from the part that holds its rows.
    // The Q block in {{PARTS}} parts of {{PART_ROWS}} rows, in the K/V buffers' memory: subgroup s takes
    // its fragments from part s / {{SPP}}, in a loop that runs at most once (naga's uniformity
    // analysis rejects cooperative operations under an `if` on the subgroup id).
{{Q_DECL}}
    for (var qp = 0u; qp < {{PARTS}}u; qp += 1u) {
        for (var pidx = lid; pidx < {{PART_ROWS}}u * EW; pidx += WG) {
            let idx = qp * {{PART_ROWS}}u * EW + pidx;
            let row = idx / EW;
            let c = (idx % EW) * LANES;
{{Q_LOAD}}
{{Q_STORE}}
        }
        workgroupBarrier();
        for (var once = sg / {{SPP}}u == qp; once; once = false) {
{{Q_FRAGMENTS}}
        }
        workgroupBarrier();
    }
