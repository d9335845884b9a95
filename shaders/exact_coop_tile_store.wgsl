// Fragment of shaders/exact_coop.wgsl (slot TILE_STORE), filled once per prefetch register:
// element lid + O of the K or V tile (BK rows of WIDTH storage elements) into the buffer at TILE,
// rows STRIDE halves apart (STORES: one line per component).
        if (lid + {{O}}u < BK * {{WIDTH}}) {
            let i = lid + {{O}}u;
            let at = {{TILE}} + (i / {{WIDTH}}) * {{STRIDE}} + (i % {{WIDTH}}) * LANES;
{{STORES}}
        }
