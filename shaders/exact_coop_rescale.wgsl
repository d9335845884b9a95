// Fragment of shaders/exact_coop.wgsl (slot RESCALE), filled once per output column tile: its
// accumulators through the subgroup's staging slice (STAGE), each row scaled by the alpha of its
// lane (SCALE), and back (RELOAD).
{{STAGE}}
            subgroupBarrier();
{{SCALE}}
            subgroupBarrier();
{{RELOAD}}
            subgroupBarrier();
