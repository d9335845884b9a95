//! Every generated shader parses and validates with naga and translates to SPIR-V (Vulkan), MSL
//! (Metal), HLSL (DX12) and GLSL (GL), so the paths we cannot run here are at least compiled.

use approx_attn::api::Problem;
use approx_attn::budget::Budget;
use approx_attn::exact::coop as coop_exact;
use approx_attn::exact::kernel as exact;
use approx_attn::exact::plan::{exact_candidates, exact_tiles_fit, plan_exact, ExactTiles};
use approx_attn::exact::storage::Storage;
use approx_attn::poly::plan::{plan_poly, Pass1Tiles};

/// The WGSL generators of the poly method, by their short names.
mod poly {
    pub use approx_attn::poly::kernel_common::{reduce_source, reduce_source_with};
    pub use approx_attn::poly::kernel_coop::{
        coop_pack_source, coop_pass1_source, coop_pass2_source,
    };
    pub use approx_attn::poly::kernel_f32::{
        pass1_source, pass1_source_with, pass2_source, pass2_source_causal, pass2_source_variant,
    };
    pub use approx_attn::poly::prepass::prepass_source;
}
use approx_attn::poly::causal as poly_causal;
use approx_attn::poly::kernel_common::Variant;

/// Words of workgroup memory the shader declares (what the planner must have budgeted).
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

/// Parses `src` and checks that it declares exactly the planned workgroup memory.
fn parse_planned(name: &str, src: &str, planned_words: u64) -> naga::Module {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(src)));
    assert_eq!(
        workgroup_words(&module),
        planned_words,
        "{name}: workgroup memory differs from the plan"
    );
    module
}

fn check(name: &str, src: &str, planned_words: u64) {
    check_with(name, src, planned_words, naga::valid::Capabilities::empty());
}

/// [`check`] with these capabilities.
fn check_with(name: &str, src: &str, planned_words: u64, caps: naga::valid::Capabilities) {
    let module = parse_planned(name, src, planned_words);
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: validation error: {e:?}"));

    naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
        .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
    naga::back::msl::write_string(
        &module,
        &info,
        &naga::back::msl::Options::default(),
        &naga::back::msl::PipelineOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: MSL: {e}"));
    let mut hlsl = String::new();
    naga::back::hlsl::Writer::new(
        &mut hlsl,
        &naga::back::hlsl::Options::default(),
        &naga::back::hlsl::PipelineOptions::default(),
    )
    .write(&module, &info, None)
    .unwrap_or_else(|e| panic!("{name}: HLSL: {e}"));
    let mut glsl = String::new();
    let glsl_options = naga::back::glsl::Options {
        version: naga::back::glsl::Version::Desktop(430),
        ..Default::default()
    };
    let pipeline = naga::back::glsl::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".into(),
        multiview: None,
    };
    naga::back::glsl::Writer::new(
        &mut glsl,
        &module,
        &info,
        &glsl_options,
        &pipeline,
        naga::proc::BoundsCheckPolicies::default(),
    )
    .and_then(|mut w| w.write())
    .unwrap_or_else(|e| panic!("{name}: GLSL: {e}"));
}

/// One head, L = 300, S = 500: lengths that are not multiples of any tile.
fn problem(e: usize, ev: usize) -> Problem {
    Problem {
        units: 1,
        group: 1,
        l: 300,
        s: 500,
        e,
        ev,
        causal: false,
        scale: 0.1,
    }
}

fn budget(words: u64) -> Budget {
    Budget::with_binding(words, 128 << 20)
}

#[test]
fn every_kernel_translates_to_every_backend() {
    let mut split_checked = 0;
    // The WebGPU default (16 KiB), Apple/lavapipe (32 KiB) and NVIDIA (48 KiB) budgets.
    for words in [4096u64, 8192, 12288] {
        for (e, ev) in [(1usize, 1usize), (3, 7), (64, 64), (256, 256)] {
            let p = problem(e, ev);
            for count_io in [false, true] {
                let planned = plan_exact(&p, &budget(words)).unwrap().tiles;
                assert!(planned.fast_memory_words() <= words);
                // The planned tiles, and the autotune's layout with V in its own buffers.
                let split = ExactTiles {
                    split_v: true,
                    ..planned
                };
                for t in [planned, split] {
                    if exact_tiles_fit(&t, &budget(words)) {
                        split_checked += usize::from(t.split_v);
                        check(
                            &format!("exact {t:?}"),
                            &exact::shader_source(&t, count_io),
                            t.fast_memory_words(),
                        );
                        // f16 storage: unpack2x16float only (f16 values in f32), no shader f16.
                        check_with(
                            &format!("exact f16 storage {t:?}"),
                            &exact::shader_source_for(&t, count_io, Storage::F16),
                            t.fast_memory_words(),
                            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
                        );
                    }
                }
                // Every autotune candidate (thread columns of 4, 8 and 16: vec4 row partials).
                if (e, words, count_io) == (64, 12288, false) {
                    for t in exact_candidates(&p, &budget(words)) {
                        check(
                            &format!("exact candidate {t:?}"),
                            &exact::shader_source(&t, count_io),
                            t.fast_memory_words(),
                        );
                    }
                }
                for g in [1usize, 2] {
                    if let Ok(plan) = plan_poly(&p, g, &budget(words)) {
                        let (t1, t2) = (plan.pass1, plan.pass2);
                        assert!(t1.fast_memory_words() <= words);
                        assert!(t2.fast_memory_words() <= words);
                        // The planned tiles, and the autotune's register-prefetch variant.
                        for t1 in [
                            t1,
                            Pass1Tiles {
                                prefetch: true,
                                ..t1
                            },
                        ] {
                            let name1 = format!("pass1 {t1:?}");
                            check(
                                &name1,
                                &poly::pass1_source(&t1, count_io),
                                t1.fast_memory_words(),
                            );
                        }
                        let name2 = format!("pass2 {t2:?}");
                        check(
                            &name2,
                            &poly::pass2_source(&t2, count_io),
                            t2.fast_memory_words(),
                        );
                        // --- causal poly: its pass 2, diagonal and scan kernels ---
                        let pc = Problem { causal: true, ..p };
                        let cp = poly_causal::plan_causal(&pc, &plan, &budget(words)).unwrap();
                        assert!(cp.fast_memory_words() <= words);
                        check(
                            &format!("causal pass2 {t2:?}"),
                            &poly::pass2_source_causal(&t2, count_io),
                            t2.fast_memory_words(),
                        );
                        check(
                            &format!("causal diag {:?}", cp.diag),
                            &poly_causal::diag_source(&cp.diag, count_io),
                            cp.diag.fast_memory_words(),
                        );
                        // --- end causal poly ---
                        // The polynomial primitive's variants: gates and no normalisation.
                        // Gates add a weight per key of pass 1's tile and a gate sum per row
                        // and key of the diagonal kernel's tiles (within GATE_FAST_MEMORY_WORDS).
                        let reserve = approx_attn::poly::primitive::GATE_FAST_MEMORY_WORDS;
                        let (gate1, gate_diag) =
                            (t1.bk as u64, 2 * (cp.diag.bq + cp.diag.bk) as u64);
                        assert!(gate1 <= reserve && gate_diag <= reserve);
                        for (gated, unnormalized) in [(true, false), (false, true), (true, true)] {
                            let var = Variant {
                                gated,
                                unnormalized,
                                feature_range: false,
                            };
                            check(
                                &format!("gated pass1 {t1:?}"),
                                &poly::pass1_source_with(&t1, count_io, gated),
                                t1.fast_memory_words() + u64::from(gated) * gate1,
                            );
                            // A split pass 2 (feature ranges) streams S', never resident.
                            let ranges: &[bool] = if t2.resident() {
                                &[false]
                            } else {
                                &[false, true]
                            };
                            for causal in [false, true] {
                                for &feature_range in ranges {
                                    let v = Variant {
                                        gated: gated && causal,
                                        feature_range,
                                        ..var
                                    };
                                    check(
                                        &format!("pass2 {t2:?} {v:?} causal {causal}"),
                                        &poly::pass2_source_variant(&t2, count_io, causal, v),
                                        t2.fast_memory_words(),
                                    );
                                }
                            }
                            check(
                                &format!("gated diag {:?}", cp.diag),
                                &poly_causal::diag_source_with(&cp.diag, count_io, gated),
                                cp.diag.fast_memory_words() + u64::from(gated) * gate_diag,
                            );
                            check(
                                "gated scan",
                                &poly_causal::scan_source_with(count_io, gated),
                                0,
                            );
                        }
                    }
                }
                let rows = approx_attn::poly::prepass::prepass_tile_rows(e, words);
                let pre_words = approx_attn::poly::prepass::prepass_fast_memory_words(e, rows);
                assert!(
                    pre_words <= words,
                    "pre-pass needs {pre_words} words of {words}"
                );
                check(
                    "prepass",
                    &poly::prepass_source(e, rows, count_io),
                    pre_words,
                );
                check("reduce", &poly::reduce_source(count_io), 0);
                check("causal scan", &poly_causal::scan_source(count_io), 0);
                // Sliced over dispatches (S' beyond one grid dimension of workgroups).
                check(
                    "sliced reduce",
                    &poly::reduce_source_with(count_io, true),
                    0,
                );
                for gated in [false, true] {
                    check(
                        "sliced scan",
                        &poly_causal::scan_source_sliced(count_io, gated, true),
                        0,
                    );
                }
            }
        }
    }
    assert!(split_checked > 0, "no split-V exact layout fit any budget");
}

/// The cooperative-matrix passes: naga validates them with the capabilities they need, they
/// declare the workgroup memory the planner budgeted, and they translate to SPIR-V with wgpu's
/// bounds checks on and off (naga 30 panics on some cooperative loads it cannot index).
fn check_coop(name: &str, src: &str, planned_words: u64) {
    let module = parse_planned(name, src, planned_words);
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

#[test]
fn coop_kernels_validate_and_translate_to_spirv() {
    let mut planned = 0;
    for words in [8192u64, 12288, 16384] {
        for sg in [16usize, 32, 64] {
            for (e, ev) in [(1usize, 1usize), (16, 16), (64, 64), (128, 128), (32, 200)] {
                let p = problem(e, ev);
                for g in [0usize, 1, 2, 3] {
                    let Some(t) = approx_attn::poly::plan::plan_coop(&p, g, &budget(words), sg)
                    else {
                        continue;
                    };
                    planned += 1;
                    assert!(
                        t.pass1_words() <= words && t.pass2_words() <= words,
                        "{t:?}"
                    );
                    for count_io in [false, true] {
                        check_coop(
                            &format!("coop pass1 {t:?}"),
                            &poly::coop_pass1_source(&t, count_io),
                            t.pass1_words(),
                        );
                        check_coop(
                            &format!("coop pass2 {t:?}"),
                            &poly::coop_pass2_source(&t, count_io),
                            t.pass2_words(),
                        );
                        check_coop(
                            &format!("coop pack {t:?}"),
                            &poly::coop_pack_source(&t, count_io),
                            0,
                        );
                    }
                }
            }
        }
    }
    assert!(planned > 100, "only {planned} coop plans");
}

/// The exact kernel on cooperative matrices (also subgroup barriers): one shader serves causal
/// and non-causal calls (a runtime parameter). The CPU driver has no cooperative matrices:
/// running it is `tests/test_exact_coop.py`'s job.
fn check_coop_exact(t: &coop_exact::CoopExactTiles, count_io: bool) {
    let name = format!("coop exact {t:?} count_io={count_io}");
    let src = coop_exact::shader_source(t, count_io);
    check_coop(&name, &src, t.fast_memory_words());
}

/// [`check_coop_exact`] for every variant: f32 and f16 storage, key tiles seen whole masked or
/// not. The default variant is the one `shader_source` gives.
fn check_coop_exact_variants(t: &coop_exact::CoopExactTiles, count_io: bool) {
    use approx_attn::exact::storage::Storage;
    for storage in [Storage::F32, Storage::F16] {
        for unmasked_tiles in [false, true] {
            let var = coop_exact::CoopExactVariant {
                storage,
                unmasked_tiles,
            };
            let name = format!("coop exact {t:?} {var:?} count_io={count_io}");
            let src = coop_exact::shader_source_for(t, count_io, &var);
            if var == coop_exact::CoopExactVariant::default() {
                assert_eq!(src, coop_exact::shader_source(t, count_io), "{name}");
            } else {
                assert_ne!(src, coop_exact::shader_source(t, count_io), "{name}");
            }
            check_coop(&name, &src, t.fast_memory_words());
        }
    }
}

/// The tensor-core exact kernel's problems: GQA groups, L != S, causal or not.
fn coop_exact_problem(e: usize, ev: usize, causal: bool) -> Problem {
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
fn coop_exact_shaders_validate_and_translate_over_head_dims_and_budgets() {
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
                    let Some(t) =
                        coop_exact::plan_tiles(&coop_exact_problem(e, ev, causal), &budget, sg)
                    else {
                        // Only E = Ev = 256 may miss the smallest budget.
                        assert!(
                            e == 256 && words == 8192,
                            "no tiles for E={e} Ev={ev} M={words}"
                        );
                        continue;
                    };
                    assert!(t.fast_memory_words() <= words);
                    // The I/O counter variant on one of the two.
                    check_coop_exact_variants(&t, causal);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 90, "only {checked} plans");
}

#[test]
fn coop_exact_q_staged_in_parts_validates_and_fits_eight_subgroups_at_e128() {
    // 48 KiB: at E = 128 the whole Q block of 8 subgroups (128 rows) does not fit beside the
    // scores and probabilities; in two parts it does.
    let budget = Budget::with_binding(12288, 1 << 30);
    let mut n = 0;
    for (e, ev) in [
        (1usize, 1usize),
        (33, 20),
        (64, 64),
        (128, 128),
        (200, 40),
        (256, 256),
    ] {
        for (subgroups, rt, bk) in [
            (8usize, 1usize, 16usize),
            (8, 1, 32),
            (4, 2, 32),
            (2, 1, 16),
        ] {
            for q_parts in [1usize, 2, 4, 8] {
                let t = coop_exact::CoopExactTiles {
                    e,
                    ev,
                    sg: 32,
                    subgroups,
                    rt,
                    bk,
                    q_parts,
                };
                if !coop_exact::tiles_fit(&t, &budget) {
                    continue;
                }
                check_coop_exact_variants(&t, n % 2 == 0);
                n += 1;
            }
        }
    }
    assert!(n >= 30, "only {n} shapes");
    let whole = coop_exact::CoopExactTiles {
        e: 128,
        ev: 128,
        sg: 32,
        subgroups: 8,
        rt: 1,
        bk: 16,
        q_parts: 1,
    };
    assert!(!coop_exact::tiles_fit(&whole, &budget));
    let halves = coop_exact::CoopExactTiles {
        q_parts: 2,
        ..whole
    };
    assert!(coop_exact::tiles_fit(&halves, &budget));
    // Parts must divide the subgroups.
    assert!(!coop_exact::tiles_fit(
        &coop_exact::CoopExactTiles {
            q_parts: 3,
            ..whole
        },
        &budget
    ));
}

#[test]
fn every_coop_exact_candidate_of_the_nvidia_budget_validates() {
    // 48 KiB and 32-lane subgroups (the H200): the shapes a sweep or an autotune times.
    let budget = Budget::with_binding(12288, 1 << 30);
    let mut n = 0;
    for e in [1usize, 16, 64, 80, 128, 256] {
        for t in coop_exact::candidates(&coop_exact_problem(e, e, false), &budget, 32) {
            check_coop_exact(&t, false);
            n += 1;
        }
    }
    assert!(n >= 20, "only {n} candidates");
}

/// Causal poly's diagonal blocks on cooperative matrices: every planned shape (subgroup sizes,
/// budgets, head dims not multiples of 16, degrees, blocks capped by a forced chunk) validates
/// with the capabilities it needs, declares the planned workgroup memory and translates to SPIR-V.
/// The CPU driver has no cooperative matrices: running it is `tests/test_causal_poly_coop.py`'s
/// job.
#[test]
fn causal_diag_coop_shaders_validate_and_translate() {
    use approx_attn::poly::causal_coop;
    let mut checked = 0;
    for words in [4096u64, 8192, 12288, 16384] {
        let budget = Budget::with_binding(words, 1 << 30);
        for sg in [16usize, 32, 64] {
            for (e, ev) in [
                (1, 1),
                (7, 9),
                (16, 15),
                (16, 16),
                (33, 20),
                (64, 64),
                (100, 128),
                (128, 128),
                (200, 40),
            ] {
                let p = Problem {
                    causal: true,
                    ..problem(e, ev)
                };
                for g in [0usize, 1, 2, 3] {
                    for max_bq in [usize::MAX, 32, 16] {
                        let Some(t) = causal_coop::plan_tiles(&p, g, &budget, sg, max_bq) else {
                            continue;
                        };
                        assert!(t.fast_memory_words() <= words && t.bq() <= max_bq.max(16));
                        for count_io in [false, true] {
                            check_coop(
                                &format!("causal diag coop {t:?} count_io={count_io}"),
                                &causal_coop::diag_coop_source(&t, count_io),
                                t.fast_memory_words(),
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 300, "only {checked} plans");
}
