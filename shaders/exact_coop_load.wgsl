// Fragment of shaders/exact_coop.wgsl (slot LOAD_FIRST; LOAD_NEXT one level deeper), filled once
// per prefetch register X: element lid + O of the K or V tile at key J0 (kr rows of WIDTH storage
// elements), read from BUF at BASE as HALF, zero beyond the tile.
        {{X}} = {{HALF}}();
        if (lid + {{O}}u < kr * {{WIDTH}}) {
            {{X}} = {{HALF}}({{BUF}}[{{BASE}} + ({{J0}}) * {{WIDTH}} + lid + {{O}}u]);
            words_read += {{WORDS}};
        }
