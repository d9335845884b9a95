// Fragment of shaders/poly_step.wgsl, its COLUMN on GPUs: every row's update loaded (LOADS, one
// `let` per row, rows past the block's last repeating it) before the stores (STORES), then per
// query head the dot product with phi_q (DOTS) on the updated values in registers.
        let last = rows - 1u;
{{LOADS}}
{{STORES}}
        for (var h = 0u; h < GROUP; h++) {
            let p = h * BR;
            var acc = 0.0;
{{DOTS}}
            partial[((unit * GROUP + h) * BLOCKS + block) * EV1 + c] = acc;
        }
