// Fragment of shaders/exact_coop.wgsl (slot STORE_TILES), filled once per output column tile: its
// accumulators through the subgroup's staging slice (STAGE), then each lane's staged elements
// into O (WRITES: shaders/exact_coop_store_element.wgsl once per element).
{{STAGE}}
    subgroupBarrier();
{{WRITES}}
    subgroupBarrier();
