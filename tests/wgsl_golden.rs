//! Every generated WGSL source over a grid of budgets, shapes, degrees and paths (exact, f32 poly
//! with its autotune candidates, tensor-core poly, causal poly, the polynomial primitive's gated,
//! unnormalised and feature-range variants, the decode step, pre-pass, reduction) hashes to the value
//! recorded in `tests/golden/wgsl.hashes`, and a few whole shaders match the files beside it.
//! A change to any kernel's text shows here and in review. After an intended change, rewrite the
//! records with `UPDATE_GOLDEN=1 cargo test --release --test wgsl_golden` and review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use approx_attn::api::Problem;
use approx_attn::budget::Budget;
use approx_attn::exact::kernel as exact;
use approx_attn::exact::plan::{exact_candidates, plan_exact, ExactTiles};
use approx_attn::exact::storage::Storage;
use approx_attn::poly::plan::{coop_candidates, plan_coop, plan_poly, poly_candidates, Pass1Tiles};
use approx_attn::poly::prepass::prepass_tile_rows;

/// The WGSL generators of the poly method, by their short names.
mod poly {
    pub use approx_attn::poly::kernel_common::reduce_source;
    pub use approx_attn::poly::kernel_coop::{
        coop_pack_source, coop_pass1_source, coop_pass2_source,
    };
    pub use approx_attn::poly::kernel_f32::{
        pass1_source, pass1_source_with, pass2_source, pass2_source_causal, pass2_source_variant,
    };
    pub use approx_attn::poly::prepass::prepass_source;
}
use approx_attn::poly::causal as poly_causal;
use approx_attn::poly::causal_coop as poly_causal_coop;
use approx_attn::poly::decode::{step_reduce_source, step_source, StepShape};
use approx_attn::poly::features::num_features;
use approx_attn::poly::kernel_common::Variant;

/// FNV-1a, 64 bits: stable across Rust versions and platforms (std's hasher is not).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

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

/// Every shader of the grid, by a label made of the grid's coordinates (not of type names, which
/// may change while the text stays the same).
fn sources() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut add = |label: String, src: String| {
        assert!(out.insert(label.clone(), src).is_none(), "{label} twice");
    };
    let shapes = [
        (1usize, 1usize),
        (3, 7),
        (16, 16),
        (64, 64),
        (128, 128),
        (32, 200),
        (256, 256),
    ];
    for words in [4096u64, 8192, 12288, 16384] {
        for (e, ev) in shapes {
            let p = problem(e, ev);
            let b = budget(words);
            for io in [false, true] {
                let at = format!("w{words} e{e} ev{ev} io{}", u8::from(io));
                if let Ok(plan) = plan_exact(&p, &b) {
                    let t = plan.tiles;
                    add(format!("exact planned {at}"), exact::shader_source(&t, io));
                    let split = ExactTiles {
                        split_v: !t.split_v,
                        ..t
                    };
                    add(
                        format!("exact flipped-v {at}"),
                        exact::shader_source(&split, io),
                    );
                    for (name, t) in [("planned", t), ("flipped-v", split)] {
                        let src = exact::shader_source_for(&t, io, Storage::F16);
                        add(format!("exact f16-storage {name} {at}"), src);
                    }
                }
                // The autotune's candidates on one budget, for a few shapes.
                let candidates = words == 12288 && matches!(e, 3 | 16 | 64);
                let exact_candidates = if candidates {
                    exact_candidates(&p, &b)
                } else {
                    vec![]
                };
                for (i, t) in exact_candidates.into_iter().enumerate() {
                    add(
                        format!("exact candidate{i} {at}"),
                        exact::shader_source(&t, io),
                    );
                }
                for g in [0usize, 1, 2, 3] {
                    if let Ok(plan) = plan_poly(&p, g, &b) {
                        let (t1, t2) = (plan.pass1, plan.pass2);
                        add(
                            format!("pass1 planned g{g} {at}"),
                            poly::pass1_source(&t1, io),
                        );
                        let t1p = Pass1Tiles {
                            prefetch: !t1.prefetch,
                            ..t1
                        };
                        add(
                            format!("pass1 flipped-prefetch g{g} {at}"),
                            poly::pass1_source(&t1p, io),
                        );
                        add(
                            format!("pass2 planned g{g} {at}"),
                            poly::pass2_source(&t2, io),
                        );
                        // The polynomial primitive's variants of the f32 passes.
                        add(
                            format!("pass1 gated g{g} {at}"),
                            poly::pass1_source_with(&t1, io, true),
                        );
                        for causal in [false, true] {
                            for bits in 1u8..8 {
                                let v = Variant {
                                    gated: bits & 1 != 0,
                                    unnormalized: bits & 2 != 0,
                                    feature_range: bits & 4 != 0,
                                };
                                if (v.gated && !causal) || (v.feature_range && t2.resident()) {
                                    continue; // gates are causal only; ranges stream S'
                                }
                                add(
                                    format!(
                                        "pass2 variant{bits} causal{} g{g} {at}",
                                        u8::from(causal)
                                    ),
                                    poly::pass2_source_variant(&t2, io, causal, v),
                                );
                            }
                        }
                        // --- causal poly: its pass 2 and diagonal kernel ---
                        let pc = Problem { causal: true, ..p };
                        if let Ok(cp) = poly_causal::plan_causal(&pc, &plan, &b) {
                            add(
                                format!("causal pass2 g{g} {at}"),
                                poly::pass2_source_causal(&t2, io),
                            );
                            add(
                                format!("causal diag g{g} {at}"),
                                poly_causal::diag_source(&cp.diag, io),
                            );
                            add(
                                format!("causal diag gated g{g} {at}"),
                                poly_causal::diag_source_with(&cp.diag, io, true),
                            );
                        }
                        // --- end causal poly ---
                        let (c1, c2) = if candidates {
                            poly_candidates(&plan, &b)
                        } else {
                            Default::default()
                        };
                        for (i, t) in c1.iter().enumerate() {
                            add(
                                format!("pass1 candidate{i} g{g} {at}"),
                                poly::pass1_source(t, io),
                            );
                        }
                        for (i, t) in c2.iter().enumerate() {
                            add(
                                format!("pass2 candidate{i} g{g} {at}"),
                                poly::pass2_source(t, io),
                            );
                        }
                    }
                    // Causal poly's diagonal blocks on tensor cores: the tallest block that
                    // fits and the 16-row one, where they differ.
                    for sg in [16usize, 32, 64] {
                        let pc = Problem { causal: true, ..p };
                        let tall = poly_causal_coop::plan_tiles(&pc, g, &b, sg, usize::MAX);
                        let short = poly_causal_coop::plan_tiles(&pc, g, &b, sg, 16)
                            .filter(|t| tall.as_ref().is_none_or(|u| u.bq() != t.bq()));
                        for t in tall.iter().chain(short.iter()) {
                            add(
                                format!("causal diag coop g{g} sg{sg} bq{} {at}", t.bq()),
                                poly_causal_coop::diag_coop_source(t, io),
                            );
                        }
                    }
                    for sg in [16usize, 32, 64] {
                        let Some(t) = plan_coop(&p, g, &b, sg) else {
                            continue;
                        };
                        let c = format!("g{g} sg{sg} {at}");
                        add(format!("coop pass1 {c}"), poly::coop_pass1_source(&t, io));
                        add(format!("coop pass2 {c}"), poly::coop_pass2_source(&t, io));
                        add(format!("coop pack {c}"), poly::coop_pack_source(&t, io));
                        let (c1, c2) = if candidates {
                            coop_candidates(&t, &b)
                        } else {
                            Default::default()
                        };
                        for (i, t) in c1.iter().enumerate() {
                            add(
                                format!("coop pass1 candidate{i} {c}"),
                                poly::coop_pass1_source(t, io),
                            );
                        }
                        for (i, t) in c2.iter().enumerate() {
                            add(
                                format!("coop pass2 candidate{i} {c}"),
                                poly::coop_pass2_source(t, io),
                            );
                        }
                    }
                }
                // Exact on tensor cores: the planned tiles per subgroup size, and every
                // candidate where the other candidates are recorded.
                for sg in [16usize, 32, 64] {
                    let cands = approx_attn::exact::coop::candidates(&p, &b, sg);
                    let n = if candidates { cands.len() } else { 1 };
                    for (i, t) in cands.iter().take(n).enumerate() {
                        let src = approx_attn::exact::coop::shader_source(t, io);
                        add(format!("exact coop candidate{i} sg{sg} {at}"), src);
                    }
                    // The Q block staged in two parts, for the planned tiles where that fits.
                    for t in cands.iter().take(1) {
                        let t2 = approx_attn::exact::coop::CoopExactTiles { q_parts: 2, ..*t };
                        if approx_attn::exact::coop::tiles_fit(&t2, &b) {
                            let src = approx_attn::exact::coop::shader_source(&t2, io);
                            add(format!("exact coop q_parts2 sg{sg} {at}"), src);
                        }
                    }
                    // The variants (f16 storage, unmasked key tiles) of the planned tiles.
                    for (storage, unmasked_tiles) in [
                        (Storage::F16, false),
                        (Storage::F32, true),
                        (Storage::F16, true),
                    ] {
                        let var = approx_attn::exact::coop::CoopExactVariant {
                            storage,
                            unmasked_tiles,
                        };
                        for t in cands.iter().take(1) {
                            let src = approx_attn::exact::coop::shader_source_for(t, io, &var);
                            let name = format!(
                                "exact coop {} unmasked{} sg{sg} {at}",
                                storage.name(),
                                u8::from(unmasked_tiles)
                            );
                            add(name, src);
                        }
                    }
                }
                let rows = prepass_tile_rows(e, words);
                add(format!("prepass {at}"), poly::prepass_source(e, rows, io));
            }
        }
    }
    for io in [false, true] {
        add(
            format!("reduce io{}", u8::from(io)),
            poly::reduce_source(io),
        );
        add(
            format!("causal scan io{}", u8::from(io)),
            poly_causal::scan_source(io),
        );
        for (gated, sliced) in [(true, false), (false, true), (true, true)] {
            add(
                format!(
                    "causal scan gated{} sliced{} io{}",
                    u8::from(gated),
                    u8::from(sliced),
                    u8::from(io)
                ),
                poly_causal::scan_source_sliced(io, gated, sliced),
            );
        }
    }
    // The decode step of the recurrent state and its reduction (no I/O counter).
    for (e, ev, g) in [
        (1usize, 1usize, 2usize),
        (3, 7, 1),
        (16, 16, 2),
        (64, 64, 2),
        (16, 100, 3),
    ] {
        for group in [1usize, 3] {
            let s = StepShape {
                units: 2,
                group,
                e,
                ev,
                r: num_features(e, g) as usize,
                g,
            };
            for (br, wg) in [(1usize, 32usize), (8, 64), (64, 64)] {
                for (gated, unrolled) in
                    [(false, false), (false, true), (true, false), (true, true)]
                {
                    add(
                        format!(
                            "decode step e{e} ev{ev} g{g} group{group} br{br} wg{wg} gated{} unrolled{}",
                            u8::from(gated),
                            u8::from(unrolled)
                        ),
                        step_source(&s, br, wg, gated, unrolled),
                    );
                }
            }
        }
        for (blocks, wg) in [(1usize, 1usize), (7, 8), (100, 64)] {
            for normalize in [false, true] {
                add(
                    format!(
                        "decode reduce ev{ev} blocks{blocks} wg{wg} normalize{}",
                        u8::from(normalize)
                    ),
                    step_reduce_source(ev, blocks, wg, normalize),
                );
            }
        }
    }
    out
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Whole shaders kept as files: one per kernel at E = Ev = 64 on a 48 KiB budget.
const GOLDEN_FILES: [(&str, &str); 8] = [
    ("exact.wgsl", "exact planned w12288 e64 ev64 io0"),
    ("poly_pass1.wgsl", "pass1 planned g2 w12288 e64 ev64 io0"),
    ("poly_pass2.wgsl", "pass2 planned g2 w12288 e64 ev64 io0"),
    (
        "poly_coop_pass1.wgsl",
        "coop pass1 g2 sg32 w12288 e64 ev64 io0",
    ),
    (
        "poly_coop_pass2.wgsl",
        "coop pass2 g2 sg32 w12288 e64 ev64 io0",
    ),
    (
        "poly_coop_pack.wgsl",
        "coop pack g2 sg32 w12288 e64 ev64 io0",
    ),
    ("prepass.wgsl", "prepass w12288 e64 ev64 io0"),
    (
        "exact_coop.wgsl",
        "exact coop candidate0 sg32 w12288 e64 ev64 io0",
    ),
];

#[test]
fn generated_wgsl_matches_the_golden_records() {
    let sources = sources();
    let listing: String = sources
        .iter()
        .map(|(label, src)| format!("{:016x} {label}\n", fnv1a(src)))
        .collect();
    let dir = golden_dir();
    let hashes = dir.join("wgsl.hashes");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&hashes, &listing).unwrap();
        for (file, label) in GOLDEN_FILES {
            std::fs::write(dir.join(file), &sources[label]).unwrap();
        }
        return;
    }
    assert!(
        sources.len() > 1000,
        "only {} shaders in the grid",
        sources.len()
    );
    let recorded = std::fs::read_to_string(&hashes).expect("tests/golden/wgsl.hashes");
    let recorded: BTreeMap<&str, &str> = recorded
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(h, label)| (label, h)))
        .collect();
    let mut differ = Vec::new();
    for (label, src) in &sources {
        let now = format!("{:016x}", fnv1a(src));
        match recorded.get(label.as_str()) {
            Some(&h) if h == now => {}
            Some(_) => differ.push(format!("changed: {label}")),
            None => differ.push(format!("new: {label}")),
        }
    }
    for label in recorded.keys() {
        if !sources.contains_key(*label) {
            differ.push(format!("gone: {label}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {} shaders differ from tests/golden/wgsl.hashes:\n{}",
        differ.len(),
        sources.len(),
        differ.join("\n")
    );
    for (file, label) in GOLDEN_FILES {
        let golden = std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(
            golden, sources[label],
            "tests/golden/{file} differs from {label}"
        );
    }
}
