//! The exact kernel on cooperative matrices: every generated shader parses, declares exactly the
//! planned workgroup memory, validates with naga (cooperative matrices, f16, subgroups and their
//! barriers) and translates to SPIR-V, over head dimensions 1..256 (multiples of 16 and not),
//! causal and not (a runtime parameter: one shader serves both), subgroup sizes and budgets.
//! The CPU driver has no cooperative matrices: running it is `tests/test_exact_coop.py`'s job.

use approx_attn::exact::coop::{candidates, plan_tiles, shader_source, CoopExactTiles};
use approx_attn::{Budget, Problem};

fn workgroup_words(module: &naga::Module) -> u64 {
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).unwrap();
    module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| u64::from(layouter[g.ty].size) / 4)
        .sum()
}

fn check(t: &CoopExactTiles, count_io: bool) {
    let name = format!("{t:?} count_io={count_io}");
    let src = shader_source(t, count_io);
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(&src)));
    assert_eq!(
        workgroup_words(&module),
        t.fast_memory_words(),
        "{name}: workgroup memory differs from the plan"
    );
    use naga::valid::Capabilities as C;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        C::COOPERATIVE_MATRIX | C::SHADER_FLOAT16 | C::SUBGROUP | C::SUBGROUP_BARRIER,
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: validation error: {e:?}"));
    let unchecked = naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Unchecked,
        buffer: naga::proc::BoundsCheckPolicy::Unchecked,
        image_load: naga::proc::BoundsCheckPolicy::Unchecked,
        binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
    };
    for policies in [naga::proc::BoundsCheckPolicies::default(), unchecked] {
        let options = naga::back::spv::Options {
            lang_version: (1, 3),
            bounds_check_policies: policies,
            ..Default::default()
        };
        naga::back::spv::write_vec(&module, &info, &options, None)
            .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
    }
}

fn problem(e: usize, ev: usize, causal: bool) -> Problem {
    Problem {
        units: 2,
        group: 2,
        l: 300,
        s: 301,
        e,
        ev,
        causal,
        scale: 0.125,
    }
}

#[test]
fn planned_shaders_validate_and_translate_over_head_dims_and_budgets() {
    let mut checked = 0;
    for words in [8192u64, 12288, 16384] {
        let budget = Budget::with_binding(words, 1 << 30);
        for sg in [32usize, 64] {
            for (e, ev) in [
                (1, 1),
                (7, 9),
                (16, 16),
                (33, 20),
                (64, 64),
                (100, 128),
                (128, 128),
                (200, 40),
                (256, 256),
            ] {
                for causal in [false, true] {
                    let Some(t) = plan_tiles(&problem(e, ev, causal), &budget, sg) else {
                        // Only E = Ev = 256 may miss the smallest budget.
                        assert!(
                            e == 256 && words == 8192,
                            "no tiles for E={e} Ev={ev} M={words}"
                        );
                        continue;
                    };
                    assert!(t.fast_memory_words() <= words);
                    check(&t, causal); // the I/O counter variant on one of the two
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 90, "only {checked} plans");
}

#[test]
fn every_candidate_of_the_nvidia_budget_validates() {
    // 48 KiB and 32-lane subgroups (the H200): the shapes a sweep or an autotune times.
    let budget = Budget::with_binding(12288, 1 << 30);
    let mut n = 0;
    for e in [1usize, 16, 64, 80, 128, 256] {
        for t in candidates(&problem(e, e, false), &budget, 32) {
            check(&t, false);
            n += 1;
        }
    }
    assert!(n >= 20, "only {n} candidates");
}
