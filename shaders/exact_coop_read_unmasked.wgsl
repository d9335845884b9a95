// Fragment of shaders/exact_coop.wgsl (slot READ_SCORES), with unmasked key tiles: tiles that every
// row of the subgroup sees whole (all but the causal diagonal and the ragged last tile) read their
// scores without the mask (WHOLE), the others with it (MASKED): a branch uniform over the
// subgroup, with no subgroup or cooperative operation inside.
{{COLUMNS}}
        if (j0 + BK <= jfull) {
{{WHOLE}}
        } else {
{{MASKED}}
        }
