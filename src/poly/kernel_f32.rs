//! WGSL of the f32 poly passes, generated from `shaders/poly_pass{1,2}.wgsl` and their tiles.

use super::features::index_words;
use super::kernel_common::{
    element_registers, feature_product, pass1_prefetch, pass2_feature_build, table_prefetch_from,
    Prefetch, Variant,
};
use super::plan::{align4, Pass1Tiles, Pass2Tiles};
use crate::wgsl::{
    constant_loop, fill_fragment, fill_template, io_counter_slots, wgsl_element, Emitter,
};

pub(crate) const PASS1: &str = include_str!("../../shaders/poly_pass1.wgsl");

pub(crate) const PASS2: &str = include_str!("../../shaders/poly_pass2.wgsl");

const PASS1_LOAD: &str = include_str!("../../shaders/poly_pass1_load.wgsl");

const PASS1_GATE_LOAD: &str = include_str!("../../shaders/poly_pass1_gate_load.wgsl");

const PASS2_CHUNK_STORE: &str = include_str!("../../shaders/poly_pass2_chunk_store.wgsl");

const PASS2_RANGES_STORE: &str = include_str!("../../shaders/poly_pass2_ranges_store.wgsl");

const PASS2_ROW: &str = include_str!("../../shaders/poly_pass2_row.wgsl");

const PASS2_FOLD_NORM: &str = include_str!("../../shaders/poly_pass2_fold_norm.wgsl");

const PASS2_FOLD_READ: &str = include_str!("../../shaders/poly_pass2_fold_read.wgsl");

/// Named registers of one thread's micro-tile: `acc_a_u` (4 value columns each) for each of its
/// `rows` rows and `groups` column groups.
fn accumulator_decls(rows: usize, groups: usize, depth: usize) -> String {
    let mut e = Emitter::new(depth);
    for a in 0..rows {
        for u in 0..groups {
            e.line(format!("var acc_{a}_{u} = vec4<f32>();"));
        }
    }
    e.finish()
}

/// Stores row `a` of a micro-tile: component k of `acc_a_u` is value column 4*(tc + TC*u) + k,
/// stored as `value(register)` at `dest(column)` where the column is < EV.
fn store_row(
    e: &mut Emitter,
    (a, groups, tc): (usize, usize, usize),
    dest: impl Fn(&str) -> String,
    value: impl Fn(&str) -> String,
) {
    for u in 0..groups {
        e.line(format!("let c_{u} = 4u * (tc + {}u);", u * tc));
        for (k, comp) in wgsl_element(4).1.iter().enumerate() {
            e.block(format!("if (c_{u} + {k}u < EV)"), |e| {
                let (d, v) = (
                    dest(&format!("c_{u} + {k}u")),
                    value(&format!("acc_{a}_{u}{comp}")),
                );
                e.line(format!("{d} = {v};"));
                e.line("words_written += 1u;");
            });
        }
    }
}

/// Causal pass 2's [`store_row`]: each output adds the chunk's masked block from `diag`
/// (row `drow`) to the prefix state's sum (times the row's gate factor `qf_a`, gated) before
/// dividing by the normaliser `d_a` (unless unnormalized).
fn causal_store_row(e: &mut Emitter, (a, groups, tc): (usize, usize, usize), v: Variant) {
    let prefix = if v.gated {
        format!(" * qf_{a}")
    } else {
        String::new()
    };
    let divide = if v.unnormalized {
        String::new()
    } else {
        format!(" / d_{a}")
    };
    for u in 0..groups {
        e.line(format!("let c_{u} = 4u * (tc + {}u);", u * tc));
        for (k, comp) in wgsl_element(4).1.iter().enumerate() {
            e.block(format!("if (c_{u} + {k}u < EV)"), |e| {
                e.line(format!(
                    "o[row + c_{u} + {k}u] = (acc_{a}_{u}{comp}{prefix} + diag[drow + c_{u} + {k}u]){divide};"
                ));
                e.line("words_read += 1u;");
                e.line("words_written += 1u;");
            });
        }
    }
}

/// Pass 1 for these tiles, the (rc x Ev) micro-tiles unrolled into named registers.
pub fn pass1_source(t: &Pass1Tiles, count_io: bool) -> String {
    pass1_source_with(t, count_io, false)
}

/// Pass 1's store of each thread's micro-tile rows of the split's partial S'.
fn pass1_store(t: &Pass1Tiles, (rf, cu): (usize, usize), vec4_rows: bool) -> String {
    let mut e = Emitter::new(1);
    for a in 0..rf {
        e.scope(|e| {
            e.line(format!(
                "let f = {};",
                micro_tile_row(a, ("tf", t.tf), vec4_rows)
            ));
            e.block("if (f < rows_f)", |e| {
                store_row(
                    e,
                    (a, cu, t.tc),
                    |c| format!("partial[o + f * EV1 + {c}]"),
                    str::to_string,
                );
            });
        });
    }
    e.finish()
}

/// Pass 1's feature build (declarations, the build per key, the normaliser store): features
/// fb + WG * c (the last may be past RC where WG does not divide it), their index decoding
/// hoisted out of the key loop; `gated` weighs each key by its gate.
fn pass1_feature_build(t: &Pass1Tiles, gated: bool) -> (String, String, String) {
    let (nf, wg) = (t.features_per_builder(), t.threads());
    let ragged = t.rc % wg != 0 && t.rc > wg;
    let key_weight = if gated { " * kw_t[j]" } else { "" };
    let (mut build_decl, mut build, mut d_store) =
        (Emitter::new(1), Emitter::new(4), Emitter::new(1));
    build.line("let kb = j * E1;");
    for c in 0..nf {
        let guard = if ragged && c + 1 == nf {
            format!("f_{c} < RC")
        } else {
            "true".to_string()
        };
        build_decl.line(format!("let f_{c} = fb + {}u;", wg * c));
        build_decl.line(format!("var dk_{c} = 0.0;"));
        for i in 0..t.g {
            build_decl.line(format!(
                "let fo_{c}_{i} = feature_index(min(f_{c}, RC - 1u), {i}u);"
            ));
        }
        build.block(format!("if ({guard})"), |e| {
            let p = feature_product(t.g, |i| format!("k_tile[kb + fo_{c}_{i}]"), "1.0");
            e.line(format!("let p_{c} = {p}{key_weight};"));
            e.line(format!("phi_set(j * RC + f_{c}, p_{c});"));
            e.line(format!("dk_{c} += p_{c};"));
        });
        d_store.block(format!("if (builds && {guard})"), |e| {
            e.line(format!("phi_set(jg * RC + f_{c}, dk_{c});"));
        });
    }
    (build_decl.finish(), build.finish(), d_store.finish())
}

/// Pass 1; `gated`: each key's features are weighed by `key_w` (its gate decay to the end of its
/// chunk; see src/poly/primitive.rs).
pub fn pass1_source_with(t: &Pass1Tiles, count_io: bool, gated: bool) -> String {
    let iw = index_words(t.g);
    debug_assert_eq!(t.rc % t.tf, 0, "{t:?}: rows are whole micro-tiles");
    let (rf, cu) = (t.rows_per_thread(), t.groups_per_thread());
    let vec4_rows = t.vec4_rows();
    let product = product_step(4, (rf, cu, ("tf", t.tf)), vec4_rows, "j * RC", |u| {
        format!("v_tile[j * CW + tc + {}u]", u * t.tc)
    });
    let store = pass1_store(t, (rf, cu), vec4_rows);
    let (build_decl, build, d_store) = pass1_feature_build(t, gated);
    let tiles = pass1_tile_loads(t);
    let [decl, add] = io_counter_slots(count_io, if gated { 7 } else { 6 });
    // Both follow code on the template's line.
    let (gate_decl, gate_load) = if gated {
        let mut e = Emitter::new(0);
        e.line("");
        e.line("@group(0) @binding(6) var<storage, read> key_w: array<f32>;");
        e.line("var<workgroup> kw_t: array<f32, BK>;");
        let load = fill_fragment(PASS1_GATE_LOAD, &[]);
        (e.finish(), format!("\n{}", load.trim_end()))
    } else {
        (String::new(), String::new())
    };
    let mut slots = vec![
        ("E", t.e.to_string()),
        ("EV", t.ev.to_string()),
        ("R", t.r.to_string()),
        ("RC", t.rc.to_string()),
        ("BK", t.bk.to_string()),
        ("G", t.g.to_string()),
        ("IW", iw.to_string()),
        ("TF", t.tf.to_string()),
        ("TC", t.tc.to_string()),
        ("KG", t.key_groups().to_string()),
        ("CW", (t.padded_ev() / 4).to_string()),
        ("WG", t.threads().to_string()),
        ("K_TILE", (t.bk * (t.e + 1)).to_string()),
        ("V_TILE", (t.bk * t.padded_ev() / 4).to_string()),
        ("IDX", (t.rc * iw).to_string()),
        ("BUILD_DECL", build_decl),
        ("BUILD", build),
        ("D_STORE", d_store),
        ("ACC_DECL", accumulator_decls(rf, cu, 1)),
        ("PREFETCH_DECL", tiles.decl),
        ("PREFETCH_LOAD_FIRST", tiles.first),
        ("PREFETCH_STORE", tiles.store),
        ("PREFETCH_LOAD_NEXT", tiles.next),
        // A full key tile's product written out; the template loops over a partial one.
        (
            "PRODUCT_FULL",
            constant_loop(3, "j", ("BK", t.bk), &product),
        ),
        ("PRODUCT", product),
        ("STORE", store),
        ("GATE_DECL", gate_decl),
        ("GATE_LOAD", gate_load),
        decl,
        add,
    ];
    slots.extend(feature_tile_slots(t.rc * t.bk, vec4_rows));
    fill_template(PASS1, &slots)
}

/// Row of a pass's micro-tile held in register row `a` by thread row `trow` of `side` thread
/// rows: rows 4 trow + 0..3, 4 (trow + side) + 0..3, ... with `vec4_rows`, else trow,
/// trow + side, ...
fn micro_tile_row(a: usize, (trow, side): (&str, usize), vec4_rows: bool) -> String {
    if vec4_rows {
        format!("(4u * ({trow} + {}u) + {}u)", (a / 4) * side, a % 4)
    } else {
        format!("({trow} + {}u)", a * side)
    }
}

/// The unrolled body of a micro-tile product step of both passes over a feature tile `phi` whose
/// rows for this step start at `row0` (features of consecutive rows adjacent): the features of
/// the thread's rows (one vec4 per four rows with `vec4_rows`, else one float per row), one vec4
/// of `tile_at(u)` per column group, and the FMAs.
fn product_step(
    depth: usize,
    (rows, groups, thread_row): (usize, usize, (&str, usize)),
    vec4_rows: bool,
    row0: &str,
    tile_at: impl Fn(usize) -> String,
) -> String {
    let (trow, side) = thread_row;
    let comps = wgsl_element(4).1;
    let mut e = Emitter::new(depth);
    if vec4_rows {
        for a4 in 0..rows / 4 {
            let o = a4 * side;
            e.line(format!("let ph_{a4} = phi[{row0} / 4u + {trow} + {o}u];"));
        }
    }
    for a in 0..rows {
        let p = if vec4_rows {
            format!("ph_{}{}", a / 4, comps[a % 4])
        } else {
            format!("phi[{row0} + {}]", micro_tile_row(a, thread_row, false))
        };
        e.line(format!("let p_{a} = {p};"));
    }
    for u in 0..groups {
        e.line(format!("let x_{u} = {};", tile_at(u)));
    }
    for a in 0..rows {
        for u in 0..groups {
            e.line(format!(
                "acc_{a}_{u} = fma(vec4<f32>(p_{a}), x_{u}, acc_{a}_{u});"
            ));
        }
    }
    e.finish()
}

/// The feature tile's slots: its element type and length for `words` floats, and its scalar
/// accessors.
fn feature_tile_slots(words: usize, vec4_rows: bool) -> [(&'static str, String); 4] {
    let (elem, len, set, get) = if vec4_rows {
        (
            "vec4<f32>",
            words / 4,
            "    phi[i / 4u][i % 4u] = x;",
            "    return phi[i / 4u][i % 4u];",
        )
    } else {
        ("f32", words, "    phi[i] = x;", "    return phi[i];")
    };
    [
        ("PHI_ELEM", elem.to_string()),
        ("PHI", len.to_string()),
        ("PHI_SET", set.to_string()),
        ("PHI_GET", get.to_string()),
    ]
}

/// Pass 1's key and value tiles. Without `prefetch` each tile is loaded from storage straight
/// into workgroup memory (the `store` slot, at the top of each tile); with it, the next tile is
/// loaded into registers (element u of a thread: tile element lid + WG * u) while this one is
/// multiplied, and stored at the top of the next iteration.
fn pass1_tile_loads(t: &Pass1Tiles) -> Prefetch {
    if !t.prefetch {
        return Prefetch {
            decl: String::new(),
            first: String::new(),
            next: String::new(),
            store: fill_fragment(PASS1_LOAD, &[]).trim_end().to_string(),
        };
    }
    let wg = t.threads();
    let (nk, nv) = ((t.bk * (t.e + 1)).div_ceil(wg), (t.bk * t.ev).div_ceil(wg));
    let mut decl = String::from(
        "    // The next key tile is loaded into registers while this one is multiplied.\n",
    );
    element_registers(&mut decl, ["ki", "krow", "kcol", "kx"], (nk, wg), "E1");
    element_registers(&mut decl, ["vi", "vrow", "vcol", "vx"], (nv, wg), "EV");
    // Keys past the split's end are zero rows; the constant-1 column is 1 in every row.
    let load = |j0: &str, depth: usize| {
        let mut e = Emitter::new(depth);
        e.scope(|e| {
            e.line(format!("let kn = min(BK, j_end - ({j0}));"));
            for u in 0..nk {
                e.line(format!("kx_{u} = select(0.0, 1.0, kcol_{u} == E);"));
                e.block(format!("if (ki_{u} < BK * E1 && kcol_{u} < E && krow_{u} < kn)"), |e| {
                    e.line(format!(
                        "kx_{u} = k[(unit * params.s + {j0} + krow_{u}) * E + kcol_{u}] - mu_t[kcol_{u}];"
                    ));
                    e.line("words_read += 1u;");
                });
            }
            for u in 0..nv {
                e.line(format!("vx_{u} = 0.0;"));
                e.block(format!("if (vi_{u} < BK * EV && vrow_{u} < kn)"), |e| {
                    e.line(format!(
                        "vx_{u} = v[(unit * params.s + {j0} + vrow_{u}) * EV + vcol_{u}];"
                    ));
                    e.line("words_read += 1u;");
                });
            }
        });
        e.finish()
    };
    let mut store = Emitter::new(2);
    for u in 0..nk {
        store.block(format!("if (ki_{u} < BK * E1)"), |e| {
            e.line(format!("k_tile[ki_{u}] = kx_{u};"));
        });
    }
    for u in 0..nv {
        store.block(format!("if (vi_{u} < BK * EV)"), |e| {
            e.line(format!(
                "v_tile[vrow_{u} * CW + vcol_{u} / 4u][vcol_{u} % 4u] = vx_{u};"
            ));
        });
    }
    pass1_prefetch(&decl, load, &store.finish())
}

/// Pass 2 for these tiles, the (b x Ev+1) output micro-tiles unrolled into named registers.
pub fn pass2_source(t: &Pass2Tiles, count_io: bool) -> String {
    pass2_source_with(t, count_io, false)
}

/// Causal pass 2 (see [`pass2_source_with`]).
pub fn pass2_source_causal(t: &Pass2Tiles, count_io: bool) -> String {
    pass2_source_with(t, count_io, true)
}

/// Pass 2; `causal`: each block reads its chunk's prefix state and adds the chunk's masked block
/// (`diag`, Ev + 1 words per row) before dividing (see src/poly/causal.rs).
pub(crate) fn pass2_source_with(t: &Pass2Tiles, count_io: bool, causal: bool) -> String {
    pass2_source_variant(t, count_io, causal, Variant::default())
}

/// Pass 2's output store: the output rows, or with feature ranges (`v.feature_range`) the sums of
/// ranges before the last folded into `diag` and the last one storing the output from its sums
/// and `diag`, as causal pass 2 does.
fn pass2_output_store(
    t: &Pass2Tiles,
    (rb, cu): (usize, usize),
    vec4_rows: bool,
    causal: bool,
    v: Variant,
) -> String {
    if v.feature_range {
        let filled = fill_fragment(
            PASS2_RANGES_STORE,
            &[
                ("CHUNKS", t.chunks().to_string()),
                ("FOLD", pass2_fold_store(t, (rb, cu), vec4_rows, causal, v)),
                ("LAST", pass2_store(t, (rb, cu), vec4_rows, true, v)),
            ],
        );
        filled.trim_end().to_string()
    } else {
        pass2_store(t, (rb, cu), vec4_rows, causal, v)
    }
}

/// Pass 2's bindings beyond the common ones: `diag` (causal: the chunk's masked block; feature
/// ranges: the running sums, written too) and, gated, each row's `q_factor`.
fn pass2_diag_bindings(causal: bool, ranged: bool, gated: bool) -> String {
    let diag_access = if ranged { "read_write" } else { "read" };
    let mut e = Emitter::new(0);
    if causal || ranged {
        e.line(format!(
            "@group(0) @binding(6) var<storage, {diag_access}> diag: array<f32>;"
        ));
        if gated {
            e.line("@group(0) @binding(7) var<storage, read> q_factor: array<f32>;");
        }
    }
    e.finish()
}

/// Pass 2 with the primitive's [`Variant`]: gated (causal only), each row's prefix sums are
/// scaled by its `q_factor`; unnormalized, the sums are written undivided.
pub fn pass2_source_variant(t: &Pass2Tiles, count_io: bool, causal: bool, v: Variant) -> String {
    debug_assert!(
        causal || !v.gated,
        "non-causal gates are applied on the host"
    );
    let iw = index_words(t.g);
    debug_assert_eq!(t.b % t.tr, 0, "{t:?}: rows are whole micro-tiles");
    let (rb, cu) = (t.rows_per_thread(), t.groups_per_thread());
    let (rpt, tpr) = (t.build_rows(), t.builders_per_row());
    debug_assert!(
        tpr <= t.rc,
        "{t:?}: the normaliser partials fit the feature tile"
    );
    let vec4_rows = t.vec4_rows();
    let product = product_step(5, (rb, cu, ("tr", t.tr)), vec4_rows, "f * FS", |u| {
        format!("s_tile[f * CW + tc + {}u]", u * t.tc)
    });
    let build = pass2_feature_build(
        (rpt, t.g),
        ("q_tile", "dq"),
        |row, p| format!("phi_set(f * FS + {row}, {p})"),
        |row, d| format!("phi_set(fb * B + {row}, {d})"),
    );
    let ranged = v.feature_range;
    debug_assert!(!ranged || !t.resident(), "{t:?}: a split S' is streamed");
    let store = pass2_output_store(t, (rb, cu), vec4_rows, causal, v);
    let state = if causal { "st" } else { "unit" };
    let first_row = if ranged { "params.chunk0 * RC" } else { "0u" };
    let chunk = (!t.resident()).then(|| pass2_chunk_prefetch(t, state, first_row));
    let table =
        (!t.resident()).then(|| table_prefetch_from(t.threads(), t.rc, t.g, false, first_row));
    let slot = |f: &dyn Fn(&Prefetch) -> String| {
        chunk
            .iter()
            .chain(table.iter())
            .map(f)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let load_first = slot(&|p| p.first.clone());
    // A resident S' has nothing to load per chunk (the template's RESIDENT switch); streamed
    // chunks load the next one and store this one.
    let (load_next, chunk_store) = (slot(&|p| p.next.clone()), slot(&|p| p.store.clone()));
    let gated = causal && v.gated;
    let [decl, add] =
        io_counter_slots(count_io, 6 + u32::from(causal || ranged) + u32::from(gated));
    let diag_decl = pass2_diag_bindings(causal, ranged, gated);
    let mut slots = vec![
        ("E", t.e.to_string()),
        ("QS", t.q_stride().to_string()),
        ("EV", t.ev.to_string()),
        ("R", t.r.to_string()),
        ("RC", t.rc.to_string()),
        ("RESIDENT", t.resident().to_string()),
        ("CAUSAL", causal.to_string()),
        ("DIAG_DECL", diag_decl),
        (
            "LAST_PARAM",
            (if ranged { "chunk0" } else { "_pad" }).to_string(),
        ),
        (
            "FIRST_CHUNK",
            (if ranged { "params.chunk0" } else { "0u" }).to_string(),
        ),
        ("B", t.b.to_string()),
        ("G", t.g.to_string()),
        ("IW", iw.to_string()),
        ("TR", t.tr.to_string()),
        ("TC", t.tc.to_string()),
        ("CW", (t.padded_ev() / 4).to_string()),
        ("RPT", rpt.to_string()),
        ("FS", t.feature_stride().to_string()),
        ("WG", t.threads().to_string()),
        ("Q_TILE", (t.b * t.q_stride()).to_string()),
        ("S_TILE", (t.rc * t.padded_ev() / 4).to_string()),
        ("IDX", align4(t.rc * t.g.max(1)).to_string()),
        ("PREFETCH_DECL", slot(&|p| p.decl.clone())),
        ("ACC_DECL", accumulator_decls(rb, cu, 2)),
        ("D_DECL", build.d_decl),
        ("LOAD_FIRST", load_first),
        ("LOAD_NEXT", load_next),
        ("CHUNK_STORE", chunk_store),
        ("FEATURE_INDEX", build.index),
        ("FEATURE", build.feature),
        // A full chunk's product written out; the template loops over a partial one.
        (
            "PRODUCT_FULL",
            constant_loop(4, "f", ("RC", t.rc), &product),
        ),
        ("PRODUCT", product),
        ("D_STORE", build.d_store),
        ("STORE", store),
        decl,
        add,
    ];
    slots.extend(feature_tile_slots(t.rc * t.feature_stride(), vec4_rows));
    fill_template(PASS2, &slots)
}

/// Pass 2's next S' chunk in registers: element u of a thread is chunk word lid + WG * u (row
/// and column fixed for the whole dispatch), stored into the S' tile or, for the last column,
/// the normaliser column beside the weights.
fn pass2_chunk_prefetch(t: &Pass2Tiles, state: &str, first_row: &str) -> Prefetch {
    let wg = t.threads();
    let n = (t.rc * (t.ev + 1)).div_ceil(wg);
    let mut decl = String::new();
    element_registers(&mut decl, ["si", "sf", "sc", "sx"], (n, wg), "EV1");
    let load = |f0: &str, depth: usize| {
        let mut e = Emitter::new(depth);
        e.scope(|e| {
            e.line(format!("let rows_n = min(RC, R - ({f0}));"));
            for u in 0..n {
                e.line(format!("sx_{u} = 0.0;"));
                e.block(format!("if (si_{u} < RC * EV1 && sf_{u} < rows_n)"), |e| {
                    e.line(format!(
                        "sx_{u} = s_prime[({state} * R + {f0}) * EV1 + si_{u}];"
                    ));
                    e.line("words_read += 1u;");
                });
            }
        });
        e.finish()
    };
    let store: String = (0..n)
        .map(|u| fill_fragment(PASS2_CHUNK_STORE, &[("U", u.to_string())]))
        .collect();
    Prefetch {
        decl: decl.trim_end().to_string(),
        first: load(first_row, 2),
        next: load("f0 + RC", 4),
        store: store.trim_end().to_string(),
    }
}

/// A split pass 2's store before its last range: each of the thread's rows adds its sums (times
/// the row's gate factor, gated) to `diag` (read first where an earlier range or the causal
/// masked block wrote it), the normaliser by thread column 0 alone.
fn pass2_fold_store(
    t: &Pass2Tiles,
    (rb, cu): (usize, usize),
    vec4_rows: bool,
    causal: bool,
    v: Variant,
) -> String {
    let gated = causal && v.gated;
    let add = |e: &mut Emitter, at: &str| {
        if causal {
            e.line(format!("x += diag[{at}];"));
            e.line("words_read += 1u;");
        } else {
            e.lines(&fill_fragment(PASS2_FOLD_READ, &[("AT", at.to_string())]));
        }
        e.line(format!("diag[{at}] = x;"));
        e.line("words_written += 1u;");
    };
    let mut e = Emitter::new(3);
    for a in 0..rb {
        let mut body = Emitter::new(2);
        body.line("let drow = (head * params.l + q0 + r) * EV1;");
        let factor = if gated {
            body.line(format!("let qf_{a} = q_factor[unit * params.l + q0 + r];"));
            body.line("words_read += 1u;");
            format!(" * qf_{a}")
        } else {
            String::new()
        };
        let mut fold = Emitter::new(1);
        add(&mut fold, "drow + EV");
        body.lines(&fill_fragment(
            PASS2_FOLD_NORM,
            &[
                ("A", a.to_string()),
                ("FACTOR", factor.clone()),
                ("FOLD", fold.finish()),
            ],
        ));
        for u in 0..cu {
            body.line(format!("let c_{u} = 4u * (tc + {}u);", u * t.tc));
            for (k, comp) in wgsl_element(4).1.iter().enumerate() {
                body.block(format!("if (c_{u} + {k}u < EV)"), |e| {
                    e.line(format!("var x = acc_{a}_{u}{comp}{factor};"));
                    add(e, &format!("drow + c_{u} + {k}u"));
                });
            }
        }
        e.lines(&pass2_row(t, a, vec4_rows, body.finish()));
    }
    e.finish()
}

/// Row `a` of a thread's micro-tile in pass 2 (see `shaders/poly_pass2_row.wgsl`), its store
/// `body` written at depth 2.
fn pass2_row(t: &Pass2Tiles, a: usize, vec4_rows: bool, body: String) -> String {
    let row = micro_tile_row(a, ("tr", t.tr), vec4_rows);
    fill_fragment(
        PASS2_ROW,
        &[("ROW", row), ("A", a.to_string()), ("BODY", body)],
    )
}

/// Pass 2's output: each of the thread's rows, divided by its normaliser (the sum of the TPR
/// partials in the feature tile).
fn pass2_store(
    t: &Pass2Tiles,
    (rb, cu): (usize, usize),
    vec4_rows: bool,
    causal: bool,
    v: Variant,
) -> String {
    let mut e = Emitter::new(2);
    for a in 0..rb {
        let mut body = Emitter::new(2);
        body.line("let row = (head * params.l + q0 + r) * EV;");
        if causal && v.gated {
            // The row's gate factor scales the prefix sums, not the masked block.
            body.line(format!("let qf_{a} = q_factor[unit * params.l + q0 + r];"));
            body.line("words_read += 1u;");
            body.line(format!("d_{a} = d_{a} * qf_{a};"));
        }
        if causal {
            // The chunk's masked block: its normaliser, then each value column beside the store.
            body.line("let drow = (head * params.l + q0 + r) * EV1;");
            body.line(format!("d_{a} += diag[drow + EV];"));
            body.line("words_read += 1u;");
            causal_store_row(&mut body, (a, cu, t.tc), v);
        } else {
            store_row(
                &mut body,
                (a, cu, t.tc),
                |c| format!("o[row + {c}]"),
                |x| {
                    if v.unnormalized {
                        x.to_string()
                    } else {
                        format!("{x} / d_{a}")
                    }
                },
            );
        }
        e.lines(&pass2_row(t, a, vec4_rows, body.finish()));
    }
    e.finish()
}
