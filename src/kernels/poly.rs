//! The polynomial (Alman-Song) method on the GPU: pre-pass statistics, pass 1 (S' per key split
//! and feature chunk), the reduction of the splits, and pass 2 (O = D^-1 Phi_q(Q) S').

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;

use super::{
    constant_loop, fill_template, io_counter_slots, read_f32, read_mapped, readback_buffer,
    storage_buffer, uniform_buffer, wgsl_element, RunOptions, RunStats, Timer,
};
use crate::device::Gpu;
use crate::error::Error;
use crate::plan::{
    align4, index_words, prepass_rows_per_block, prepass_tile_rows, Budget, CoopTiles, Pass1Tiles,
    Pass2Tiles, PolyPlan, Problem,
};
use crate::poly::{FeatureTable, Poly};

pub(crate) const PREPASS: &str = include_str!("../../shaders/prepass.wgsl");
pub(crate) const PASS1: &str = include_str!("../../shaders/poly_pass1.wgsl");
pub(crate) const REDUCE: &str = include_str!("../../shaders/poly_reduce.wgsl");
pub(crate) const PASS2: &str = include_str!("../../shaders/poly_pass2.wgsl");
pub(crate) const COOP_PASS1: &str = include_str!("../../shaders/poly_coop_pass1.wgsl");
pub(crate) const COOP_PASS2: &str = include_str!("../../shaders/poly_coop_pass2.wgsl");
pub(crate) const COOP_PACK: &str = include_str!("../../shaders/poly_coop_pack.wgsl");

/// Threads of the pre-pass and reduction kernels.
pub const AUX_THREADS: usize = 128;

pub fn prepass_source(width: usize, tile_rows: usize, count_io: bool) -> String {
    let [decl, add] = io_counter_slots(count_io, 4);
    fill_template(
        PREPASS,
        &[
            ("W", width.to_string()),
            ("TR", tile_rows.to_string()),
            ("WG", AUX_THREADS.to_string()),
            ("TILE", (tile_rows * (width + 1)).to_string()),
            decl,
            add,
        ],
    )
}

/// Named registers of one thread's micro-tile: `acc_a_u` (4 value columns each) for each of its
/// `rows` rows and `groups` column groups.
fn accumulator_decls(rows: usize, groups: usize, indent: &str) -> String {
    let mut s = String::new();
    for a in 0..rows {
        for u in 0..groups {
            let _ = writeln!(s, "{indent}var acc_{a}_{u} = vec4<f32>();");
        }
    }
    s.trim_end().to_string()
}

/// Stores row `a` of a micro-tile: component k of `acc_a_u` is value column 4*(tc + TC*u) + k,
/// stored as `value(register)` at `dest(column)` where the column is < EV.
fn store_row(
    s: &mut String,
    indent: &str,
    (a, groups, tc): (usize, usize, usize),
    dest: impl Fn(&str) -> String,
    value: impl Fn(&str) -> String,
) {
    for u in 0..groups {
        let _ = writeln!(s, "{indent}let c_{u} = 4u * (tc + {}u);", u * tc);
        for (k, comp) in wgsl_element(4).1.iter().enumerate() {
            let _ = writeln!(
                s,
                "{indent}if (c_{u} + {k}u < EV) {{\n{indent}    {} = {};\n{indent}    words_written += 1u;\n{indent}}}",
                dest(&format!("c_{u} + {k}u")),
                value(&format!("acc_{a}_{u}{comp}"))
            );
        }
    }
}

/// Causal pass 2's [`store_row`]: each output adds the chunk's masked block from `diag`
/// (row `drow`) to the prefix state's sum before dividing by the normaliser `d_a`.
fn causal_store_row(s: &mut String, indent: &str, (a, groups, tc): (usize, usize, usize)) {
    for u in 0..groups {
        let _ = writeln!(s, "{indent}let c_{u} = 4u * (tc + {}u);", u * tc);
        for (k, comp) in wgsl_element(4).1.iter().enumerate() {
            let _ = writeln!(
                s,
                "{indent}if (c_{u} + {k}u < EV) {{\n{indent}    o[row + c_{u} + {k}u] = \
                 (acc_{a}_{u}{comp} + diag[drow + c_{u} + {k}u]) / d_{a};\n{indent}    \
                 words_read += 1u;\n{indent}    words_written += 1u;\n{indent}}}"
            );
        }
    }
}

/// Pass 1 for these tiles, the (rc x Ev) micro-tiles unrolled into named registers.
pub fn pass1_source(t: &Pass1Tiles, count_io: bool) -> String {
    let iw = index_words(t.g);
    debug_assert_eq!(t.rc % t.tf, 0, "{t:?}: rows are whole micro-tiles");
    let (rf, cu) = (t.rows_per_thread(), t.groups_per_thread());
    let vec4_rows = t.vec4_rows();
    let mut product = String::new();
    product_step(
        &mut product,
        "                ",
        (rf, cu, ("tf", t.tf)),
        vec4_rows,
        "j * RC",
        |u| format!("v_tile[j * CW + tc + {}u]", u * t.tc),
    );
    let product = tile_loop("        ", ("j", "kr", ("BK", t.bk)), &product);
    let mut store = String::new();
    for a in 0..rf {
        let _ = writeln!(
            store,
            "    {{\n        let f = {};\n        if (f < rows_f) {{",
            micro_tile_row(a, ("tf", t.tf), vec4_rows)
        );
        store_row(
            &mut store,
            "            ",
            (a, cu, t.tc),
            |c| format!("partial[o + f * EV1 + {c}]"),
            str::to_string,
        );
        store.push_str("        }\n    }\n");
    }
    // The feature build: features fb + WG * c (the last may be past RC where WG does not divide
    // it), their index decoding hoisted out of the key loop.
    let (nf, wg) = (t.features_per_builder(), t.threads());
    let ragged = t.rc % wg != 0 && t.rc > wg;
    let (mut build_decl, mut build, mut d_store) = (String::new(), String::new(), String::new());
    let _ = writeln!(build, "                let kb = j * E1;");
    for c in 0..nf {
        let guard = if ragged && c + 1 == nf {
            format!("f_{c} < RC")
        } else {
            "true".to_string()
        };
        let _ = writeln!(
            build_decl,
            "    let f_{c} = fb + {}u;\n    var dk_{c} = 0.0;",
            wg * c
        );
        for i in 0..t.g {
            let _ = writeln!(
                build_decl,
                "    let fo_{c}_{i} = feature_index(min(f_{c}, RC - 1u), {i}u);"
            );
        }
        let _ = writeln!(
            build,
            "                if ({guard}) {{\n                    let p_{c} = {};\n                    \
             phi_set(j * RC + f_{c}, p_{c});\n                    dk_{c} += p_{c};\n                }}",
            feature_product(t.g, |i| format!("k_tile[kb + fo_{c}_{i}]"), "1.0")
        );
        let _ = writeln!(
            d_store,
            "    if (builds && {guard}) {{\n        phi_set(jg * RC + f_{c}, dk_{c});\n    }}"
        );
    }
    let tiles = pass1_tile_loads(t);
    let [decl, add] = io_counter_slots(count_io, 6);
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
        ("BUILD_DECL", build_decl.trim_end().to_string()),
        ("BUILD", build.trim_end().to_string()),
        ("D_STORE", d_store.trim_end().to_string()),
        ("ACC_DECL", accumulator_decls(rf, cu, "    ")),
        ("PREFETCH_DECL", tiles.decl),
        ("PREFETCH_LOAD_FIRST", tiles.first),
        ("PREFETCH_STORE", tiles.store),
        ("PREFETCH_LOAD_NEXT", tiles.next),
        ("PRODUCT", product),
        ("STORE", store.trim_end().to_string()),
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

/// A product loop over `i` < `count` rows of a tile of `full` rows: full tiles (all but the
/// last, mostly) are written out by [`constant_loop`], the last tile loops.
fn tile_loop(indent: &str, (i, count, full): (&str, &str, (&str, usize)), body: &str) -> String {
    let body = body.trim_end();
    let full_tile = constant_loop(&format!("{indent}    "), i, full, body);
    let full_name = full.0;
    format!(
        "{indent}if ({count} == {full_name}) {{\n{full_tile}\n{indent}}} else {{\n\
         {indent}    for (var {i} = 0u; {i} < {count}; {i}++) {{\n{body}\n{indent}    }}\n{indent}}}"
    )
}

/// The unrolled body of a micro-tile product step of both passes over a feature tile `phi` whose
/// rows for this step start at `row0` (features of consecutive rows adjacent): the features of
/// the thread's rows (one vec4 per four rows with `vec4_rows`, else one float per row), one vec4
/// of `tile_at(u)` per column group, and the FMAs.
fn product_step(
    s: &mut String,
    indent: &str,
    (rows, groups, thread_row): (usize, usize, (&str, usize)),
    vec4_rows: bool,
    row0: &str,
    tile_at: impl Fn(usize) -> String,
) {
    let (trow, side) = thread_row;
    let comps = wgsl_element(4).1;
    if vec4_rows {
        for a4 in 0..rows / 4 {
            let _ = writeln!(
                s,
                "{indent}let ph_{a4} = phi[{row0} / 4u + {trow} + {}u];",
                a4 * side
            );
        }
    }
    for a in 0..rows {
        let p = if vec4_rows {
            format!("ph_{}{}", a / 4, comps[a % 4])
        } else {
            format!("phi[{row0} + {}]", micro_tile_row(a, thread_row, false))
        };
        let _ = writeln!(s, "{indent}let p_{a} = {p};");
    }
    for u in 0..groups {
        let _ = writeln!(s, "{indent}let x_{u} = {};", tile_at(u));
    }
    for a in 0..rows {
        for u in 0..groups {
            let _ = writeln!(
                s,
                "{indent}acc_{a}_{u} = fma(vec4<f32>(p_{a}), x_{u}, acc_{a}_{u});"
            );
        }
    }
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
        let direct = "        for (var i = lid; i < BK * E1; i += WG) {
            let r = i / E1;
            let c = i % E1;
            var x = 1.0;
            if (c < E) {
                x = 0.0;
                if (r < kr) {
                    x = k[(unit * params.s + j0 + r) * E + c] - mu_t[c];
                    words_read += 1u;
                }
            }
            k_tile[i] = x;
        }
        for (var i = lid; i < BK * EV; i += WG) {
            let r = i / EV;
            let c = i % EV;
            var x = 0.0;
            if (r < kr) {
                x = v[(unit * params.s + j0 + r) * EV + c];
                words_read += 1u;
            }
            v_tile[r * CW + c / 4u][c % 4u] = x;
        }";
        return Prefetch {
            decl: String::new(),
            first: String::new(),
            next: String::new(),
            store: direct.to_string(),
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
    let load = |j0: &str, ind: &str| {
        let mut s = format!("{ind}{{\n{ind}    let kn = min(BK, j_end - ({j0}));\n");
        for u in 0..nk {
            let _ = writeln!(
                s,
                "{ind}    kx_{u} = select(0.0, 1.0, kcol_{u} == E);\n\
                 {ind}    if (ki_{u} < BK * E1 && kcol_{u} < E && krow_{u} < kn) {{\n\
                 {ind}        kx_{u} = k[(unit * params.s + {j0} + krow_{u}) * E + kcol_{u}] - mu_t[kcol_{u}];\n\
                 {ind}        words_read += 1u;\n{ind}    }}"
            );
        }
        for u in 0..nv {
            let _ = writeln!(
                s,
                "{ind}    vx_{u} = 0.0;\n\
                 {ind}    if (vi_{u} < BK * EV && vrow_{u} < kn) {{\n\
                 {ind}        vx_{u} = v[(unit * params.s + {j0} + vrow_{u}) * EV + vcol_{u}];\n\
                 {ind}        words_read += 1u;\n{ind}    }}"
            );
        }
        s.push_str(&format!("{ind}}}"));
        s
    };
    let mut store = String::new();
    for u in 0..nk {
        let _ = writeln!(
            store,
            "        if (ki_{u} < BK * E1) {{\n            k_tile[ki_{u}] = kx_{u};\n        }}"
        );
    }
    for u in 0..nv {
        let _ = writeln!(
            store,
            "        if (vi_{u} < BK * EV) {{\n            v_tile[vrow_{u} * CW + vcol_{u} / 4u][vcol_{u} % 4u] = vx_{u};\n        }}"
        );
    }
    pass1_prefetch(&decl, load, &store)
}

pub fn reduce_source(count_io: bool) -> String {
    let [decl, add] = io_counter_slots(count_io, 3);
    fill_template(REDUCE, &[("WG", AUX_THREADS.to_string()), decl, add])
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
/// (`diag`, Ev + 1 words per row) before dividing (see src/kernels/poly_causal.rs).
pub(crate) fn pass2_source_with(t: &Pass2Tiles, count_io: bool, causal: bool) -> String {
    let iw = index_words(t.g);
    debug_assert_eq!(t.b % t.tr, 0, "{t:?}: rows are whole micro-tiles");
    let (rb, cu) = (t.rows_per_thread(), t.groups_per_thread());
    let (rpt, tpr) = (t.build_rows(), t.builders_per_row());
    debug_assert!(
        tpr <= t.rc,
        "{t:?}: the normaliser partials fit the feature tile"
    );
    let vec4_rows = t.vec4_rows();
    let mut product = String::new();
    product_step(
        &mut product,
        "                    ",
        (rb, cu, ("tr", t.tr)),
        vec4_rows,
        "f * FS",
        |u| format!("s_tile[f * CW + tc + {}u]", u * t.tc),
    );
    let product = tile_loop("            ", ("f", "rows_f", ("RC", t.rc)), &product);
    let build = pass2_feature_build(
        (rpt, t.g),
        ("q_tile", "dq"),
        |row, p| format!("phi_set(f * FS + {row}, {p})"),
        |row, d| format!("phi_set(fb * B + {row}, {d})"),
    );
    let mut store = String::new();
    for a in 0..rb {
        let _ = writeln!(
            store,
            "        {{\n            let r = {};\n            if (r < rows) {{\n                \
             var d_{a} = 0.0;\n                for (var h = 0u; h < TPR; h++) {{\n                    \
             d_{a} += phi_get(h * B + r);\n                }}\n                \
             let row = (head * params.l + q0 + r) * EV;",
            micro_tile_row(a, ("tr", t.tr), vec4_rows)
        );
        if causal {
            // The chunk's masked block: its normaliser, then each value column beside the store.
            let _ = writeln!(
                store,
                "                let drow = (head * params.l + q0 + r) * EV1;\n                \
                 d_{a} += diag[drow + EV];\n                words_read += 1u;"
            );
            causal_store_row(&mut store, "                ", (a, cu, t.tc));
        } else {
            store_row(
                &mut store,
                "                ",
                (a, cu, t.tc),
                |c| format!("o[row + {c}]"),
                |x| format!("{x} / d_{a}"),
            );
        }
        store.push_str("            }\n        }\n");
    }
    let state = if causal { "st" } else { "unit" };
    let chunk = (!t.resident()).then(|| pass2_chunk_prefetch(t, state));
    let table = (!t.resident()).then(|| table_prefetch(t.threads(), t.rc, t.g, false));
    let slot = |f: &dyn Fn(&Prefetch) -> String| {
        chunk
            .iter()
            .chain(table.iter())
            .map(f)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let load_first = slot(&|p| p.first.clone());
    // A resident S' has nothing to load per chunk; streamed chunks load the next one, and store
    // this one once the previous chunk's products are done.
    let (load_next, chunk_store) = if t.resident() {
        (String::new(), String::new())
    } else {
        (
            format!(
                "            if (ch + 1u < params.chunks) {{\n{}\n            }}",
                slot(&|p| p.next.clone())
            ),
            format!(
                "            workgroupBarrier();\n{}",
                slot(&|p| p.store.clone())
            ),
        )
    };
    let [decl, add] = io_counter_slots(count_io, if causal { 7 } else { 6 });
    let diag_decl = if causal {
        "@group(0) @binding(6) var<storage, read> diag: array<f32>;"
    } else {
        ""
    };
    let mut slots = vec![
        ("E", t.e.to_string()),
        ("QS", t.q_stride().to_string()),
        ("EV", t.ev.to_string()),
        ("R", t.r.to_string()),
        ("RC", t.rc.to_string()),
        ("RESIDENT", t.resident().to_string()),
        ("CAUSAL", causal.to_string()),
        ("DIAG_DECL", diag_decl.to_string()),
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
        ("ACC_DECL", accumulator_decls(rb, cu, "        ")),
        ("D_DECL", build.d_decl),
        ("LOAD_FIRST", load_first),
        ("LOAD_NEXT", load_next),
        ("CHUNK_STORE", chunk_store),
        ("FEATURE_INDEX", build.index),
        ("FEATURE", build.feature),
        ("PRODUCT", product),
        ("D_STORE", build.d_store),
        ("STORE", store.trim_end().to_string()),
        decl,
        add,
    ];
    slots.extend(feature_tile_slots(t.rc * t.feature_stride(), vec4_rows));
    fill_template(PASS2, &slots)
}

/// Declarations of a thread's `count` registers of a tile streamed through registers: element
/// u is tile word `lid + wg * u` (names[0]), at row names[1] and column names[2] of rows `width`
/// wide, held in names[3].
fn element_registers(s: &mut String, names: [&str; 4], (count, wg): (usize, usize), width: &str) {
    let [i, row, col, x] = names;
    for u in 0..count {
        let _ = writeln!(
            s,
            "    let {i}_{u} = lid + {o}u;\n    let {row}_{u} = {i}_{u} / {width};\n    \
             let {col}_{u} = {i}_{u} % {width};\n    var {x}_{u} = 0.0;",
            o = wg * u
        );
    }
}

/// Pass 2's feature build (f32 and coop), for the template's loop over the chunk rows f of this
/// thread: the feature's indices, then for each of its `rpt` query rows (rb + h * HB, read from
/// the query tile `q_tile` with row stride QS) the feature p = weight * product of the indexed
/// query entries, stored by `store(row, p)` and summed against the normaliser column into the
/// register `{d}_h`, whose partials `d_store(row, {d}_h)` writes after the chunk loop.
struct FeatureBuild {
    index: String,
    d_decl: String,
    feature: String,
    d_store: String,
}

fn pass2_feature_build(
    (rpt, g): (usize, usize),
    (q_tile, d): (&str, &str),
    store: impl Fn(&str, &str) -> String,
    d_store: impl Fn(&str, &str) -> String,
) -> FeatureBuild {
    let mut b = FeatureBuild {
        index: (0..g)
            .map(|i| format!("                let fi_{i} = feature_index(f, {i}u);"))
            .collect::<Vec<_>>()
            .join("\n"),
        d_decl: String::new(),
        feature: String::new(),
        d_store: String::new(),
    };
    for h in 0..rpt {
        let row = format!("(rb + {h}u * HB)");
        let p = format!(
            "wz.x * {}",
            feature_product(g, |i| format!("{q_tile}[{row} * QS + fi_{i}]"), "1.0")
        );
        let _ = writeln!(b.d_decl, "        var {d}_{h} = 0.0;");
        let _ = writeln!(
            b.feature,
            "                let p_{h} = {p};\n                {d}_{h} = fma(p_{h}, wz.y, {d}_{h});\n                {};",
            store(&row, &format!("p_{h}"))
        );
        let _ = writeln!(b.d_store, "        {};", d_store(&row, &format!("{d}_{h}")));
    }
    for text in [&mut b.d_decl, &mut b.feature, &mut b.d_store] {
        text.truncate(text.trim_end().len());
    }
    b
}

/// Pass 2's next S' chunk in registers: element u of a thread is chunk word lid + WG * u (row
/// and column fixed for the whole dispatch), stored into the S' tile or, for the last column,
/// the normaliser column beside the weights.
fn pass2_chunk_prefetch(t: &Pass2Tiles, state: &str) -> Prefetch {
    let wg = t.threads();
    let n = (t.rc * (t.ev + 1)).div_ceil(wg);
    let mut decl = String::new();
    element_registers(&mut decl, ["si", "sf", "sc", "sx"], (n, wg), "EV1");
    let load = |f0: &str, ind: &str| {
        let mut s = format!("{ind}{{\n{ind}    let rows_n = min(RC, R - ({f0}));\n");
        for u in 0..n {
            let _ = writeln!(
                s,
                "{ind}    sx_{u} = 0.0;\n{ind}    if (si_{u} < RC * EV1 && sf_{u} < rows_n) {{\n\
                 {ind}        sx_{u} = s_prime[({state} * R + {f0}) * EV1 + si_{u}];\n{ind}        words_read += 1u;\n{ind}    }}"
            );
        }
        s.push_str(&format!("{ind}}}"));
        s
    };
    let mut store = String::new();
    for u in 0..n {
        let _ = writeln!(
            store,
            "            if (si_{u} < RC * EV1) {{\n                if (sc_{u} < EV) {{\n                    \
             s_tile[sf_{u} * CW + sc_{u} / 4u][sc_{u} % 4u] = sx_{u};\n                }} else {{\n                    \
             wz_t[sf_{u}].y = sx_{u};\n                }}\n            }}"
        );
    }
    Prefetch {
        decl: decl.trim_end().to_string(),
        first: load("0u", "        "),
        next: load("f0 + RC", "                "),
        store: store.trim_end().to_string(),
    }
}

/// Zeroed 16 x 16 accumulators `acc_a_c` of a subgroup's `rows` row tiles and `cols` column tiles,
/// loaded from a zeroed workgroup tile: naga writes `coop_mat16x16<f32, C>()` as OpConstantNull,
/// which gave garbage on the H100's driver.
fn coop_accumulators(rows: usize, cols: usize, indent: &str) -> String {
    let mut s = String::new();
    for a in 0..rows {
        for c in 0..cols {
            let _ = writeln!(
                s,
                "{indent}var acc_{a}_{c} = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);"
            );
        }
    }
    s.trim_end().to_string()
}

/// One 16-deep step of the subgroup's products: its row tiles of `a_tile` (workgroup memory,
/// stride `a_stride`) times every column tile `b_at(c)` (stride `b_stride`) at depth kk.
fn coop_mma(
    (rows, cols): (usize, usize),
    (a_tile, a_stride): (&str, &str),
    (b_at, b_stride): (impl Fn(usize) -> String, &str),
    indent: &str,
) -> String {
    let mut s = String::new();
    // The A tiles are stored depth-major (column-major): element (row, kk) at kk * stride + row.
    for a in 0..rows {
        let _ = writeln!(
            s,
            "{indent}let a_{a} = coopLoad<coop_mat16x16<f16, A>>(&{a_tile}[kk * {a_stride} + (sg * RT + {a}u) * 16u], {a_stride});"
        );
    }
    for c in 0..cols {
        let _ = writeln!(
            s,
            "{indent}let b_{c} = coopLoadT<coop_mat16x16<f16, B>>(&{}, {b_stride});",
            b_at(c)
        );
        for a in 0..rows {
            let _ = writeln!(
                s,
                "{indent}acc_{a}_{c} = coopMultiplyAdd(a_{a}, b_{c}, acc_{a}_{c});"
            );
        }
    }
    s.trim_end().to_string()
}

/// Writes each accumulator through the subgroup's staging tile, which starts at `stage_at`
/// (an array and index prefix, e.g. "stage["): `store(indent)` is the guarded write of one element
/// (row: the tile row, col: the value column).
fn coop_store(
    (rows, cols): (usize, usize),
    stage_at: &str,
    indent: &str,
    store: impl Fn(&str) -> String,
) -> String {
    let mut s = String::new();
    for a in 0..rows {
        for c in 0..cols {
            let _ = write!(
                s,
                "{indent}coopStoreT(acc_{a}_{c}, &{stage_at}sg * 256u], 16u);\n\
                 {indent}workgroupBarrier();\n\
                 {indent}for (var i = lane; i < 256u; i += SG) {{\n\
                 {indent}    let row = (sg * RT + {a}u) * 16u + i / 16u;\n\
                 {indent}    let col = {}u + i % 16u;\n\
                 {}\
                 {indent}}}\n\
                 {indent}workgroupBarrier();\n",
                16 * c,
                store(&format!("{indent}    ")),
            );
        }
    }
    s.trim_end().to_string()
}

/// The product of a feature's `g` factors, `factor(t)` naming factor t; `one` when g = 0.
fn feature_product(g: usize, factor: impl Fn(usize) -> String, one: &str) -> String {
    if g == 0 {
        return one.to_string();
    }
    (0..g).map(factor).collect::<Vec<_>>().join(" * ")
}

/// Generated code that carries the next tile of a coop pass from storage to workgroup memory in
/// registers: their declarations, the loads of the first and of the next tile, and the stores.
struct Prefetch {
    decl: String,
    first: String,
    next: String,
    store: String,
}

/// Pass 1's prefetch (f32 and coop) from its declarations, its tile load (code for the tile at
/// key `j0`) and its stores.
fn pass1_prefetch(decl: &str, load: impl Fn(&str, &str) -> String, store: &str) -> Prefetch {
    Prefetch {
        decl: decl.trim_end().to_string(),
        first: format!(
            "    if (j_begin < j_end) {{\n{}\n    }}",
            load("j_begin", "        ")
        ),
        next: load("j0 + BK", "            "),
        store: store.trim_end().to_string(),
    }
}

/// Whether pass 1 reads keys and values as vec4 (both widths multiples of 4).
fn coop_vec4(t: &CoopTiles) -> bool {
    t.e % 4 == 0 && t.ev % 4 == 0
}

/// Pass 1's key tile: element u of each thread is tile element `lid + WG * u` (of BK x (E+1)
/// keys, BK x Ev values).
fn coop_prefetch(t: &CoopTiles) -> Prefetch {
    if coop_vec4(t) {
        return coop_prefetch_vec4(t);
    }
    let wg = t.threads();
    let (nk, nv) = ((t.bk * (t.e + 1)).div_ceil(wg), (t.bk * t.ev).div_ceil(wg));
    let mut decl = String::new();
    element_registers(&mut decl, ["ki", "krow", "kcol", "kx"], (nk, wg), "E1");
    element_registers(&mut decl, ["vi", "vrow", "vcol", "vx"], (nv, wg), "EV");
    let load = |j0: &str, ind: &str| {
        let mut s = format!("{ind}{{\n{ind}    let kr = min(BK, j_end - ({j0}));\n");
        for u in 0..nk {
            let _ = write!(
                s,
                "{ind}    kx_{u} = 0.0;\n\
                 {ind}    if (ki_{u} < BK * E1 && krow_{u} < kr) {{\n\
                 {ind}        kx_{u} = 1.0;\n\
                 {ind}        if (kcol_{u} < E) {{\n\
                 {ind}            kx_{u} = (k[(unit * params.s + {j0} + krow_{u}) * E + kcol_{u}] - mu_t[kcol_{u}]) * params.k_inv_scale;\n\
                 {ind}            words_read += 1u;\n\
                 {ind}        }}\n\
                 {ind}    }}\n"
            );
        }
        for u in 0..nv {
            let _ = write!(
                s,
                "{ind}    vx_{u} = 0.0;\n\
                 {ind}    if (vi_{u} < BK * EV && vrow_{u} < kr) {{\n\
                 {ind}        vx_{u} = (v[(unit * params.s + {j0} + vrow_{u}) * EV + vcol_{u}] - vn_t[vcol_{u}]) * vn_t[EV + vcol_{u}];\n\
                 {ind}        words_read += 1u;\n\
                 {ind}    }}\n"
            );
        }
        s.push_str(&format!("{ind}}}"));
        s
    };
    let mut store = String::new();
    for u in 0..nk {
        let _ = writeln!(
            store,
            "        if (ki_{u} < BK * E1) {{\n            k_t[kcol_{u} * KS + krow_{u}] = kx_{u};\n        }}"
        );
    }
    for u in 0..nv {
        let _ = writeln!(
            store,
            "        if (vi_{u} < BK * EV) {{\n            v_t[vrow_{u} * VS + vcol_{u}] = f16(vx_{u});\n        }}"
        );
    }
    pass1_prefetch(&decl, load, &store)
}

/// Pass 1's key tile read as vec4: element u of each thread is vec4 `lid + WG * u` of the BK x E
/// keys and of the BK x Ev values. A thread's columns are the same in every tile, so their mean
/// and value normalisation stay in registers; the constant-1 row is written per tile.
fn coop_prefetch_vec4(t: &CoopTiles) -> Prefetch {
    let wg = t.threads();
    let (e4, ev4) = (t.e / 4, t.ev / 4);
    let (nk, nv) = ((t.bk * e4).div_ceil(wg), (t.bk * ev4).div_ceil(wg));
    let lanes = |name: &str, base: &str, at: &str| {
        format!(
            "vec4<f32>({name}[{base}4u * {at}], {name}[{base}4u * {at} + 1u], {name}[{base}4u * {at} + 2u], {name}[{base}4u * {at} + 3u])"
        )
    };
    let mut decl = String::from("    var kr_t = 0u; // keys of the tile held in registers\n");
    for u in 0..nk {
        let _ = writeln!(
            decl,
            "    let ki_{u} = lid + {o}u;\n    let krow_{u} = ki_{u} / {e4}u;\n    let kc_{u} = ki_{u} % {e4}u;\n    \
             let kmu_{u} = {mu};\n    var kx_{u} = vec4<f32>();",
            o = wg * u,
            mu = lanes("mu_t", "", &format!("kc_{u}"))
        );
    }
    for u in 0..nv {
        let _ = writeln!(
            decl,
            "    let vi_{u} = lid + {o}u;\n    let vrow_{u} = vi_{u} / {ev4}u;\n    let vc_{u} = vi_{u} % {ev4}u;\n    \
             let vmin_{u} = {lo};\n    let vinv_{u} = {inv};\n    var vx_{u} = vec4<f32>();",
            o = wg * u,
            lo = lanes("vn_t", "", &format!("vc_{u}")),
            inv = lanes("vn_t", "EV + ", &format!("vc_{u}"))
        );
    }
    let load = |j0: &str, ind: &str| {
        let mut s = format!("{ind}{{\n{ind}    kr_t = min(BK, j_end - ({j0}));\n");
        for u in 0..nk {
            let _ = write!(
                s,
                "{ind}    kx_{u} = vec4<f32>();\n\
                 {ind}    if (ki_{u} < BK * {e4}u && krow_{u} < kr_t) {{\n\
                 {ind}        kx_{u} = (k[(unit * params.s + {j0} + krow_{u}) * {e4}u + kc_{u}] - kmu_{u}) * params.k_inv_scale;\n\
                 {ind}        words_read += 4u;\n\
                 {ind}    }}\n"
            );
        }
        for u in 0..nv {
            let _ = write!(
                s,
                "{ind}    vx_{u} = vec4<f32>();\n\
                 {ind}    if (vi_{u} < BK * {ev4}u && vrow_{u} < kr_t) {{\n\
                 {ind}        vx_{u} = (v[(unit * params.s + {j0} + vrow_{u}) * {ev4}u + vc_{u}] - vmin_{u}) * vinv_{u};\n\
                 {ind}        words_read += 4u;\n\
                 {ind}    }}\n"
            );
        }
        s.push_str(&format!("{ind}}}"));
        s
    };
    let mut store = String::from(
        "        for (var j = lid; j < BK; j += WG) {\n            k_t[E * KS + j] = select(0.0, 1.0, j < kr_t);\n        }\n",
    );
    for u in 0..nk {
        let _ = write!(
            store,
            "        if (ki_{u} < BK * {e4}u) {{\n            let c = 4u * kc_{u};\n"
        );
        for (l, x) in wgsl_element(4).1.iter().enumerate() {
            let _ = writeln!(
                store,
                "            k_t[(c + {l}u) * KS + krow_{u}] = kx_{u}{x};"
            );
        }
        store.push_str("        }\n");
    }
    for u in 0..nv {
        let _ = write!(
            store,
            "        if (vi_{u} < BK * {ev4}u) {{\n            let c = vrow_{u} * VS + 4u * vc_{u};\n"
        );
        for (l, x) in wgsl_element(4).1.iter().enumerate() {
            let _ = writeln!(store, "            v_t[c + {l}u] = f16(vx_{u}{x});");
        }
        store.push_str("        }\n");
    }
    pass1_prefetch(&decl, load, &store)
}

/// Template slots both coop passes share; `(threads, rt)` are the pass's own.
fn coop_common_slots(t: &CoopTiles, (threads, rt): (usize, usize)) -> Vec<(&'static str, String)> {
    vec![
        ("E", t.e.to_string()),
        ("EV", t.ev.to_string()),
        ("EVP", t.padded_ev().to_string()),
        ("R", t.r.to_string()),
        ("G", t.g.to_string()),
        ("IW", index_words(t.g).to_string()),
        ("WG", threads.to_string()),
        ("SG", t.sg.to_string()),
        ("RT", rt.to_string()),
        ("VN", align4(2 * t.ev).to_string()),
    ]
}

/// Pass 1 on cooperative matrices for these tiles.
pub fn coop_pass1_source(t: &CoopTiles, count_io: bool) -> String {
    let iw = index_words(t.g);
    let (rt, ct) = (t.rt1, t.col_tiles());
    let index_decl: String = (0..t.g)
        .map(|i| format!("    let i_{i} = feature_index(fb, {i}u);\n"))
        .collect();
    let store = coop_store((rt, ct), "stage[", "    ", |ind| {
        format!(
            "{ind}if (row < rows_f && col < EV) {{\n\
             {ind}    partial[o + row * EV1 + col] = stage[sg * 256u + i];\n\
             {ind}    words_written += 1u;\n\
             {ind}}}\n"
        )
    });
    let pre = coop_prefetch(t);
    let [decl, add] = io_counter_slots(count_io, 7);
    let mut slots = coop_common_slots(t, (t.threads(), rt));
    slots.extend([
        ("STAGE", (t.subgroups * 256).to_string()),
        ("RC", t.rc1().to_string()),
        ("BK", t.bk.to_string()),
        (
            "KV_TYPE",
            wgsl_element(if coop_vec4(t) { 4 } else { 1 }).0.to_string(),
        ),
        ("K_TILE", align4((t.e + 1) * (t.bk + 1)).to_string()),
        ("V_TILE", (t.bk * (t.padded_ev() + 8)).to_string()),
        ("PHI", (t.bk * (t.rc1() + 8)).to_string()),
        ("IDX", align4(t.rc1() * iw).to_string()),
        ("MU", align4(t.e).to_string()),
        ("INDEX_DECL", index_decl.trim_end().to_string()),
        ("PREFETCH_DECL", pre.decl),
        ("PREFETCH_LOAD_FIRST", pre.first),
        ("PREFETCH_LOAD_NEXT", pre.next),
        ("PREFETCH_STORE", pre.store),
        (
            "FEATURE",
            feature_product(t.g, |i| format!("k_t[i_{i} * KS + j]"), "k_t[E * KS + j]"),
        ),
        ("ACC_DECL", coop_accumulators(rt, ct, "    ")),
        (
            "MMA",
            coop_mma(
                (rt, ct),
                ("phi", "FS"),
                (|c| format!("v_t[kk * VS + {}u]", 16 * c), "VS"),
                "            ",
            ),
        ),
        ("STORE", store),
        decl,
        add,
    ]);
    fill_template(COOP_PASS1, &slots)
}

/// Pass 2's S'' chunk (vec4 of halves; element u of a thread is vec4 `lid + WG * u` of the
/// chunk's RC x EVP halves) and its stores into `s_t`.
fn coop_chunk_prefetch(t: &CoopTiles) -> Prefetch {
    let wg = t.threads2();
    let n4 = (t.rc2 * t.padded_ev() / 4).div_ceil(wg);
    let mut decl = String::new();
    for u in 0..n4 {
        let _ = writeln!(
            decl,
            "        let si_{u} = lid + {}u;\n        var sx_{u} = vec4<f16>();",
            wg * u
        );
    }
    let load = |f0: &str, ind: &str| {
        let mut s = String::new();
        for u in 0..n4 {
            let _ = writeln!(
                s,
                "{ind}if (si_{u} < RC * EVP / 4u) {{\n{ind}    sx_{u} = s16[(unit * RP + {f0}) * EVP / 4u + si_{u}];\n{ind}    words_read += 2u;\n{ind}}}"
            );
        }
        s.trim_end().to_string()
    };
    let mut store = String::new();
    for u in 0..n4 {
        let _ = writeln!(
            store,
            "            if (si_{u} < RC * EVP / 4u) {{\n                let so = (si_{u} * 4u) / EVP * SS + (si_{u} * 4u) % EVP;\n                \
             s_t[so] = sx_{u}.x;\n                s_t[so + 1u] = sx_{u}.y;\n                \
             s_t[so + 2u] = sx_{u}.z;\n                s_t[so + 3u] = sx_{u}.w;\n            }}"
        );
    }
    Prefetch {
        decl: decl.trim_end().to_string(),
        first: load("0u", "        "),
        next: load("f0 + RC", "                "),
        store: store.trim_end().to_string(),
    }
}

/// Pass 2's feature table for the next chunk of `rc` rows (index words, weights and, with `z`,
/// coop's normaliser column) in registers, and its stores into `idx_t` (unpacked: the feature
/// build reads them for every row) and `wz_t` (the f32 pass takes the normaliser column from its
/// S' rows and stores only the weights).
fn table_prefetch(wg: usize, rc: usize, g: usize, z: bool) -> Prefetch {
    let ni = (rc * index_words(g)).div_ceil(wg);
    let nw = rc.div_ceil(wg);
    let mut decl = String::new();
    for u in 0..ni {
        let _ = writeln!(decl, "        var tix_{u} = 0u;");
    }
    for u in 0..nw {
        let _ = writeln!(decl, "        var twz_{u} = vec2<f32>();");
    }
    let load = |f0: &str, ind: &str| {
        let mut s = format!("{ind}{{\n{ind}    let rows_f = min(RC, R - ({f0}));\n");
        for u in 0..ni {
            let _ = writeln!(
                s,
                "{ind}    tix_{u} = 0u;\n{ind}    if (lid + {o}u < RC * IW && (lid + {o}u) / IW < rows_f) {{\n\
                 {ind}        tix_{u} = feat_idx[({f0}) * IW + lid + {o}u];\n{ind}        words_read += 1u;\n{ind}    }}",
                o = wg * u
            );
        }
        for u in 0..nw {
            let z_load = if z {
                format!(
                    "{ind}        twz_{u}.y = z[unit * RP + ({f0}) + lid + {o}u];\n{ind}        words_read += 1u;\n",
                    o = wg * u
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{ind}    if (lid + {o}u < RC) {{\n\
                 {ind}        twz_{u} = vec2<f32>();\n{z_load}\
                 {ind}        if (lid + {o}u < rows_f) {{\n\
                 {ind}            twz_{u}.x = feat_w[({f0}) + lid + {o}u];\n\
                 {ind}            words_read += 1u;\n\
                 {ind}        }}\n{ind}    }}",
                o = wg * u
            );
        }
        s.push_str(&format!("{ind}}}"));
        s
    };
    let mut store = String::new();
    for u in 0..ni {
        let _ = writeln!(
            store,
            "            if (lid + {o}u < RC * IW) {{\n                let i = lid + {o}u;\n                \
             for (var t = 3u * (i % IW); t < min(G, 3u * (i % IW) + 3u); t++) {{\n                    \
             idx_t[(i / IW) * G + t] = (tix_{u} >> (10u * (t % 3u))) & 1023u;\n                }}\n            }}",
            o = wg * u
        );
    }
    let target = if z { "" } else { ".x" };
    for u in 0..nw {
        let _ = writeln!(
            store,
            "            if (lid + {o}u < RC) {{\n                wz_t[lid + {o}u]{target} = twz_{u}{target};\n            }}",
            o = wg * u
        );
    }
    Prefetch {
        decl: decl.trim_end().to_string(),
        first: load("0u", "        "),
        next: load("f0 + RC", "                "),
        store: store.trim_end().to_string(),
    }
}

/// Query rows per feature-building thread in coop pass 2: the feature's indices and weight are
/// read once for all of them. Measured on the H100 (pass 2, n = 65,536, E = 64): 1 row 5.8 ms,
/// 2 rows 4.4-5.0 ms, 4 rows 4.7 ms, 8 rows 4.6 ms (n = 32,768, E = 128: 19.2 ms with 4, 18.7 with
/// 8).
pub const COOP_PASS2_ROWS_PER_THREAD: usize = 8;

/// Pass 2 on cooperative matrices for these tiles.
pub fn coop_pass2_source(t: &CoopTiles, count_io: bool) -> String {
    let (rt, ct) = (t.rt2, t.col_tiles());
    let store = coop_store((rt, ct), "q_t[STAGE0 + ", "        ", |ind| {
        format!(
            "{ind}if (row < rows && col < EV) {{\n\
             {ind}    o[(head * params.l + q0 + row) * EV + col] =\n\
             {ind}        vn_t[col] + vn_t[EV + col] * (q_t[STAGE0 + sg * 256u + i] * q_t[DT0 + DS + row]);\n\
             {ind}    words_written += 1u;\n\
             {ind}}}\n"
        )
    });
    let rpt = COOP_PASS2_ROWS_PER_THREAD;
    let mut build = pass2_feature_build(
        (rpt, t.g),
        ("q_t", "d"),
        |row, p| format!("phi[f * FS + {row}] = f16({p})"),
        |row, d| format!("q_t[DT0 + fb * BQ + {row}] = {d}"),
    );
    // The partials go into the query tile: every thread must be past the feature build.
    build.d_store.insert_str(0, "        workgroupBarrier();\n");
    let pre = coop_chunk_prefetch(t);
    let table = table_prefetch(t.threads2(), t.rc2, t.g, true);
    let [decl, add] = io_counter_slots(count_io, 8);
    let mut slots = coop_common_slots(t, (t.threads2(), rt));
    slots.extend([
        ("RC", t.rc2.to_string()),
        ("BQ", t.b2().to_string()),
        ("QS", t.q_stride2().to_string()),
        ("Q_TILE", t.pass2_query_tile_words().to_string()),
        ("DT0", (t.subgroups2 * 256).to_string()),
        ("PHI", (t.rc2 * (t.b2() + 8)).to_string()),
        ("RP", t.rp().to_string()),
        ("S_TILE", (t.rc2 * (t.padded_ev() + 8)).to_string()),
        ("S_LOAD_FIRST", format!("{}\n{}", pre.decl, pre.first)),
        ("S_LOAD_NEXT", pre.next),
        ("S_STORE", pre.store),
        (
            "TABLE_LOAD_FIRST",
            format!("{}\n{}", table.decl, table.first),
        ),
        ("TABLE_LOAD_NEXT", table.next),
        ("TABLE_STORE", table.store),
        ("IDX", align4(t.rc2 * t.g.max(1)).to_string()),
        ("FEATURE_INDEX", build.index),
        ("RPT", rpt.to_string()),
        ("D_DECL", build.d_decl),
        ("FEATURE", build.feature),
        ("D_STORE", build.d_store),
        ("ACC_DECL", coop_accumulators(rt, ct, "        ")),
        (
            "MMA",
            coop_mma(
                (rt, ct),
                ("phi", "FS"),
                (|c| format!("s_t[kk * SS + {}u]", 16 * c), "SS"),
                "                ",
            ),
        ),
        ("STORE", store),
        decl,
        add,
    ]);
    fill_template(COOP_PASS2, &slots)
}

/// Packs S' into the f16 S'' (and its f32 normaliser column) that coop pass 2 reads.
pub fn coop_pack_source(t: &CoopTiles, count_io: bool) -> String {
    let [decl, add] = io_counter_slots(count_io, 4);
    fill_template(
        COOP_PACK,
        &[
            ("R", t.r.to_string()),
            ("RP", t.rp().to_string()),
            ("EV", t.ev.to_string()),
            ("EVP", t.padded_ev().to_string()),
            ("WG", AUX_THREADS.to_string()),
            decl,
            add,
        ],
    )
}

/// Packs a feature table's indices three to a u32 (10 bits each), `index_words(g)` words per row.
pub fn pack_indices(table: &FeatureTable) -> Vec<u32> {
    let iw = index_words(table.g);
    let mut out = vec![0u32; table.r * iw];
    for f in 0..table.r {
        for t in 0..table.g {
            out[f * iw + t / 3] |= table.indices[f * table.g + t] << (10 * (t % 3));
        }
    }
    out
}

/// The caller's input arrays uploaded once per attention call: the pre-pass and both passes bind
/// the same storage buffer wherever they take the same rows of an input (a borrowed slice of it;
/// the inputs live and stay unchanged for the whole call). Copies gathered for a chunk are
/// uploaded on their own.
#[derive(Default)]
pub struct Uploads {
    buffers: RefCell<HashMap<(usize, usize), Rc<wgpu::Buffer>>>,
}

impl Uploads {
    /// Frees the uploaded inputs (before a kernel that uploads its own).
    pub fn clear(&self) {
        self.buffers.borrow_mut().clear();
    }

    pub(crate) fn buffer(&self, gpu: &Gpu, data: Cow<'_, [f32]>, label: &str) -> Rc<wgpu::Buffer> {
        let upload = || {
            let buf = storage_buffer(gpu, data.len(), label);
            super::upload(gpu, &buf, bytemuck::cast_slice(&data));
            Rc::new(buf)
        };
        match &data {
            Cow::Borrowed(rows) => self
                .buffers
                .borrow_mut()
                .entry((rows.as_ptr() as usize, rows.len()))
                .or_insert_with(upload)
                .clone(),
            Cow::Owned(_) => upload(),
        }
    }
}

/// Statistics of a `(units, rows, width)` array, reduced over all rows of each unit.
#[derive(Clone, Debug, PartialEq)]
pub struct RowStats {
    pub col_sum: Vec<f64>,
    pub col_min: Vec<f64>,
    pub col_max: Vec<f64>,
    pub max_norm2: f64,
    pub nonfinite: u64,
}

impl RowStats {
    fn new(width: usize) -> RowStats {
        RowStats {
            col_sum: vec![0.0; width],
            col_min: vec![f64::INFINITY; width],
            col_max: vec![f64::NEG_INFINITY; width],
            max_norm2: 0.0,
            nonfinite: 0,
        }
    }

    fn absorb(&mut self, block: &[f32], width: usize) {
        for c in 0..width {
            self.col_sum[c] += f64::from(block[c]);
            self.col_min[c] = self.col_min[c].min(f64::from(block[width + c]));
            self.col_max[c] = self.col_max[c].max(f64::from(block[2 * width + c]));
        }
        let n2 = f64::from(block[3 * width]);
        self.max_norm2 = if n2.is_nan() {
            f64::INFINITY
        } else {
            self.max_norm2.max(n2)
        };
        self.nonfinite += block[3 * width + 1] as u64;
    }
}

#[derive(Clone, Copy)]
pub(crate) struct PrepassShape {
    pub units: usize,
    pub rows: usize,
    pub width: usize,
    pub units_per_dispatch: usize,
    pub rows_per_dispatch: usize,
}

/// Runs the pre-pass over `x` (optionally centred on `mu`, `(units, width)`), one RowStats per unit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_stats(
    gpu: &Gpu,
    x: &[f32],
    mu: Option<&[f32]>,
    sh: PrepassShape,
    budget: &Budget,
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Vec<RowStats>, Error> {
    let w = sh.width;
    let tile_rows = prepass_tile_rows(w, budget.fast_memory_words);
    let key = format!("prepass:{w}:{tile_rows}:{}:{}", opts.count_io, opts.trusted);
    let pipeline = gpu.pipeline(
        &key,
        &prepass_source(w, tile_rows, opts.count_io),
        opts.trusted,
    )?;
    let layout = pipeline.get_bind_group_layout(0);
    let mut result = vec![RowStats::new(w); sh.units];
    for u0 in (0..sh.units).step_by(sh.units_per_dispatch) {
        let nu = sh.units_per_dispatch.min(sh.units - u0);
        for r0 in (0..sh.rows).step_by(sh.rows_per_dispatch) {
            let nr = sh.rows_per_dispatch.min(sh.rows - r0);
            let rows_per_block = prepass_rows_per_block(nr, nu, w, budget);
            let blocks = nr.div_ceil(rows_per_block);
            let xc = super::exact::gather(x, u0, nu, sh.rows, r0, nr, w);
            let mu_c: Vec<f32> = match mu {
                Some(m) => m[u0 * w..(u0 + nu) * w].to_vec(),
                None => vec![0.0; nu * w],
            };
            let out_words = nu * blocks * (3 * w + 2);
            let params: [u32; 4] = [
                nr as u32,
                rows_per_block as u32,
                blocks as u32,
                u32::from(mu.is_some()),
            ];
            let (blocks_out, (counted, kernel_s)) = gpu.checked(|| {
                let x_buf = uploads.buffer(gpu, xc, "prepass x");
                let mu_buf = storage_buffer(gpu, mu_c.len(), "prepass mu");
                let out_buf = storage_buffer(gpu, out_words, "prepass out");
                gpu.queue
                    .write_buffer(&mu_buf, 0, bytemuck::cast_slice(&mu_c));
                let params_buf = uniform_buffer(gpu, bytemuck::cast_slice(&params));
                let bufs = [&params_buf, &*x_buf, &mu_buf, &out_buf];
                dispatch_one(
                    gpu,
                    &pipeline,
                    &layout,
                    &bufs,
                    opts,
                    (blocks as u32, nu as u32, 1),
                    &out_buf,
                    out_words,
                )
            })?;
            stats.absorb(&RunStats::dispatch(gpu, "prepass", counted, kernel_s));
            for u in 0..nu {
                for b in 0..blocks {
                    let o = (u * blocks + b) * (3 * w + 2);
                    result[u0 + u].absorb(&blocks_out[o..o + 3 * w + 2], w);
                }
            }
        }
    }
    Ok(result)
}

/// Words counted by the shaders (when counting) and GPU seconds (where timestamps exist).
type Measured = (Option<(u64, u64)>, Option<f64>);

/// Binds `bufs` in order (plus the I/O counter when on), dispatches once, and reads `out` back.
#[allow(clippy::too_many_arguments)]
fn dispatch_one(
    gpu: &Gpu,
    pipeline: &wgpu::ComputePipeline,
    layout: &wgpu::BindGroupLayout,
    bufs: &[&wgpu::Buffer],
    opts: &RunOptions,
    grid: (u32, u32, u32),
    out: &wgpu::Buffer,
    out_words: usize,
) -> Result<(Vec<f32>, Measured), Error> {
    let (counted, kernel_s) = dispatch_no_read(gpu, pipeline, layout, bufs, opts, grid)?;
    Ok((read_f32(gpu, out, out_words)?, (counted, kernel_s)))
}

/// Binds `bufs` in order (plus the I/O counter when on), dispatches once and waits; returns the
/// counted words and the GPU time.
pub(crate) fn dispatch_no_read(
    gpu: &Gpu,
    pipeline: &wgpu::ComputePipeline,
    layout: &wgpu::BindGroupLayout,
    bufs: &[&wgpu::Buffer],
    opts: &RunOptions,
    grid: (u32, u32, u32),
) -> Result<Measured, Error> {
    let counter = opts.count_io.then(|| storage_buffer(gpu, 2, "io_words"));
    let mut entries: Vec<wgpu::BindGroupEntry> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    if let Some(cb) = &counter {
        gpu.queue.write_buffer(cb, 0, &[0u8; 8]);
        entries.push(wgpu::BindGroupEntry {
            binding: bufs.len() as u32,
            resource: cb.as_entire_binding(),
        });
    }
    let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout,
        entries: &entries,
    });
    let timer = Timer::new(gpu);
    let counter_read = counter.as_ref().map(|_| readback_buffer(gpu, 8));
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&timer.as_ref().map(Timer::pass).unwrap_or_default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(grid.0, grid.1, grid.2);
    }
    if let Some(tm) = &timer {
        tm.stop(&mut enc);
    }
    if let (Some(cb), Some(cr)) = (&counter, &counter_read) {
        enc.copy_buffer_to_buffer(cb, 0, cr, 0, 8);
    }
    gpu.queue.submit([enc.finish()]);
    gpu.wait()?;
    let counted = match &counter_read {
        Some(cr) => Some(read_mapped(gpu, cr, 8, |b| {
            let w: &[u32] = bytemuck::cast_slice(b);
            (u64::from(w[0]), u64::from(w[1]))
        })?),
        None => None,
    };
    let kernel_s = match &timer {
        Some(tm) => Some(tm.seconds(gpu)?),
        None => None,
    };
    Ok((counted, kernel_s))
}

/// What the pre-pass found, per KV unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepass {
    /// Key mean per unit, `(units, e)`.
    pub mu: Vec<f32>,
    /// max_i ||q_i|| over the unit's query heads.
    pub q_max_norm: Vec<f64>,
    /// max_j ||k_j - mu||.
    pub k_max_norm: Vec<f64>,
    /// Value column min and max, `(units, ev)`.
    pub v_min: Vec<f64>,
    pub v_max: Vec<f64>,
    /// Non-finite entries in query, key, value.
    pub nonfinite: [u64; 3],
}

impl Prepass {
    /// beta = scale * max||q|| * max||k - mu||, the largest over all units.
    pub fn beta(&self, scale: f32) -> f64 {
        self.q_max_norm
            .iter()
            .zip(&self.k_max_norm)
            .map(|(q, k)| f64::from(scale.abs()) * q * k)
            .fold(0.0, f64::max)
    }
}

/// The pre-pass: Q and V once, K twice (its mean first, then the norms around it).
#[allow(clippy::too_many_arguments)]
pub fn prepass(
    gpu: &Gpu,
    p: &Problem,
    plan_chunk: &crate::plan::Chunking,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    budget: &Budget,
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Prepass, Error> {
    let kv_shape = |width| PrepassShape {
        units: p.units,
        rows: p.s,
        width,
        units_per_dispatch: plan_chunk.units,
        rows_per_dispatch: plan_chunk.kv_rows,
    };
    let q_shape = PrepassShape {
        units: p.units * p.group,
        rows: p.l,
        width: p.e,
        units_per_dispatch: plan_chunk.units * p.group,
        rows_per_dispatch: plan_chunk.q_rows,
    };
    let ks = row_stats(gpu, k, None, kv_shape(p.e), budget, opts, uploads, stats)?;
    let mu: Vec<f32> = ks
        .iter()
        .flat_map(|s| s.col_sum.iter().map(|x| (x / p.s as f64) as f32))
        .collect();
    let kc = row_stats(
        gpu,
        k,
        Some(&mu),
        kv_shape(p.e),
        budget,
        opts,
        uploads,
        stats,
    )?;
    let vs = row_stats(gpu, v, None, kv_shape(p.ev), budget, opts, uploads, stats)?;
    let qs = if p.l > 0 {
        row_stats(gpu, q, None, q_shape, budget, opts, uploads, stats)?
    } else {
        vec![RowStats::new(p.e); p.units * p.group]
    };
    let q_max_norm = (0..p.units)
        .map(|u| {
            qs[u * p.group..(u + 1) * p.group]
                .iter()
                .map(|s| s.max_norm2.sqrt())
                .fold(0.0, f64::max)
        })
        .collect();
    Ok(Prepass {
        mu,
        q_max_norm,
        k_max_norm: kc.iter().map(|s| s.max_norm2.sqrt()).collect(),
        v_min: vs.iter().flat_map(|s| s.col_min.clone()).collect(),
        v_max: vs.iter().flat_map(|s| s.col_max.clone()).collect(),
        nonfinite: [
            qs.iter().map(|s| s.nonfinite).sum(),
            ks.iter().map(|s| s.nonfinite).sum(),
            vs.iter().map(|s| s.nonfinite).sum(),
        ],
    })
}

/// Passes 1 and 2 for a planned degree. `weights` are the per-feature query weights (f64 -> f32).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    p: &Problem,
    plan: &PolyPlan,
    table: &FeatureTable,
    poly: &Poly,
    pre: &Prepass,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Vec<f32>, Error> {
    let c = &plan.chunking;
    let ev1 = p.ev + 1;
    let r = plan.r;
    let idx = pack_indices(table);
    let weights: Vec<f32> = crate::poly::query_weights(table, poly, f64::from(p.scale))
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let coop = plan.coop;
    let (src1, src2, key1, key2) = match &coop {
        Some(t) => (
            coop_pass1_source(t, opts.count_io),
            coop_pass2_source(t, opts.count_io),
            format!("coop1:{t:?}"),
            format!("coop2:{t:?}"),
        ),
        None => (
            pass1_source(&plan.pass1, opts.count_io),
            pass2_source(&plan.pass2, opts.count_io),
            format!("pass1:{:?}", plan.pass1),
            format!("pass2:{:?}", plan.pass2),
        ),
    };
    let p1 = gpu.pipeline(
        &format!("{key1}:{}:{}", opts.count_io, opts.trusted),
        &src1,
        opts.trusted,
    )?;
    let red = gpu.pipeline(
        &format!("reduce:{}:{}", opts.count_io, opts.trusted),
        &reduce_source(opts.count_io),
        opts.trusted,
    )?;
    let pack = match &coop {
        Some(t) => Some(gpu.pipeline(
            &format!("coop_pack:{t:?}:{}:{}", opts.count_io, opts.trusted),
            &coop_pack_source(t, opts.count_io),
            opts.trusted,
        )?),
        None => None,
    };
    let p2 = gpu.pipeline(
        &format!("{key2}:{}:{}", opts.count_io, opts.trusted),
        &src2,
        opts.trusted,
    )?;
    // The coop passes scale keys into [-1, 1] (queries by the inverse) and values into [0, 1].
    let k_scale = pre.k_max_norm.iter().copied().fold(0.0, f64::max);
    let k_scale = if k_scale > 0.0 && k_scale.is_finite() {
        k_scale as f32
    } else {
        1.0
    };
    // Per unit: vmin, then 1/range (pass 1) or range (pass 2) of each value column.
    let value_norm = |u0: usize, nu: usize, invert: bool| -> wgpu::Buffer {
        let mut out = Vec::with_capacity(nu * 2 * p.ev);
        for u in u0..u0 + nu {
            let (lo, hi) = (
                &pre.v_min[u * p.ev..(u + 1) * p.ev],
                &pre.v_max[u * p.ev..(u + 1) * p.ev],
            );
            out.extend(lo.iter().map(|&x| x as f32));
            out.extend(lo.iter().zip(hi).map(|(&a, &b)| {
                let range = if b > a { (b - a) as f32 } else { 1.0 };
                if invert {
                    1.0 / range
                } else {
                    range
                }
            }));
        }
        let buf = storage_buffer(gpu, out.len(), "value normalisation");
        gpu.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&out));
        buf
    };
    let (l1, lr, l2) = (
        p1.get_bind_group_layout(0),
        red.get_bind_group_layout(0),
        p2.get_bind_group_layout(0),
    );

    let heads = p.query_heads();
    let mut out = vec![0f32; heads * p.l * p.ev];
    gpu.checked(|| {
        let idx_buf = storage_buffer(gpu, idx.len(), "feature indices");
        let w_buf = storage_buffer(gpu, weights.len(), "feature weights");
        gpu.queue
            .write_buffer(&idx_buf, 0, bytemuck::cast_slice(&idx));
        gpu.queue
            .write_buffer(&w_buf, 0, bytemuck::cast_slice(&weights));
        let sp_buf = storage_buffer(gpu, c.units * r * ev1, "S'");
        let partial_buf = storage_buffer(gpu, c.units * plan.splits * r * ev1, "partial S'");
        for u0 in (0..p.units).step_by(c.units) {
            let nu = c.units.min(p.units - u0);
            let mu_buf = storage_buffer(gpu, nu * p.e, "mu");
            let vn_bufs = coop.map(|_| (value_norm(u0, nu, true), value_norm(u0, nu, false)));
            gpu.queue.write_buffer(
                &mu_buf,
                0,
                bytemuck::cast_slice(&pre.mu[u0 * p.e..(u0 + nu) * p.e]),
            );
            // Pass 1 and the reduction, one key chunk at a time (S' is a sum over keys).
            for (ci, s0) in (0..p.s).step_by(c.kv_rows).enumerate() {
                let sc = c.kv_rows.min(p.s - s0);
                let kc = super::exact::gather(k, u0, nu, p.s, s0, sc, p.e);
                let vc = super::exact::gather(v, u0, nu, p.s, s0, sc, p.ev);
                let k_buf = uploads.buffer(gpu, kc, "k");
                let v_buf = uploads.buffer(gpu, vc, "v");
                let keys_per_split = plan.keys_per_split.min(sc);
                let splits = sc.div_ceil(keys_per_split);
                let prm = uniform_buffer(
                    gpu,
                    bytemuck::cast_slice(&[
                        sc as u32,
                        keys_per_split as u32,
                        splits as u32,
                        (1.0 / k_scale).to_bits(),
                    ]),
                );
                let (bufs, chunks1) = match (&coop, &vn_bufs) {
                    (Some(t), Some((vn1, _))) => (
                        vec![&prm, &k_buf, &v_buf, &mu_buf, &idx_buf, vn1, &partial_buf],
                        t.chunks1(),
                    ),
                    _ => (
                        vec![&prm, &k_buf, &v_buf, &mu_buf, &idx_buf, &partial_buf],
                        plan.pass1.chunks(),
                    ),
                };
                let (counted, t) = dispatch_no_read(
                    gpu,
                    &p1,
                    &l1,
                    &bufs,
                    opts,
                    (splits as u32, chunks1 as u32, nu as u32),
                )?;
                stats.absorb(&RunStats::dispatch(gpu, "pass1", counted, t));
                let words = r * ev1;
                let prm = uniform_buffer(
                    gpu,
                    bytemuck::cast_slice(&[splits as u32, u32::from(ci > 0), words as u32, 0]),
                );
                let (counted, t) = dispatch_no_read(
                    gpu,
                    &red,
                    &lr,
                    &[&prm, &partial_buf, &sp_buf],
                    opts,
                    (words.div_ceil(AUX_THREADS) as u32, nu as u32, 1),
                )?;
                stats.absorb(&RunStats::dispatch(gpu, "reduce", counted, t));
            }
            // Coop pass 2 reads S'' = S' / keys in f16 and the normaliser column z.
            let (s16_buf, z_buf) = match (&coop, &pack) {
                (Some(t), Some(pack)) => {
                    let s16 = storage_buffer(gpu, (nu * t.rp() * t.padded_ev()).div_ceil(2), "S''");
                    let z = storage_buffer(gpu, nu * t.rp(), "z");
                    let inv_keys = 1.0 / p.s as f32;
                    let prm = uniform_buffer(gpu, bytemuck::cast_slice(&[inv_keys, 0.0, 0.0, 0.0]));
                    let (counted, t_s) = dispatch_no_read(
                        gpu,
                        pack,
                        &pack.get_bind_group_layout(0),
                        &[&prm, &sp_buf, &s16, &z],
                        opts,
                        (
                            (t.rp() * t.padded_ev()).div_ceil(AUX_THREADS) as u32,
                            nu as u32,
                            1,
                        ),
                    )?;
                    stats.absorb(&RunStats::dispatch(gpu, "pack", counted, t_s));
                    (Some(s16), Some(z))
                }
                _ => (None, None),
            };
            // Pass 2, one query chunk at a time.
            for l0 in (0..p.l).step_by(c.q_rows) {
                let lc = c.q_rows.min(p.l - l0);
                let qh = nu * p.group;
                let qc = super::exact::gather(q, u0 * p.group, qh, p.l, l0, lc, p.e);
                let q_buf = uploads.buffer(gpu, qc, "q");
                let o_words = qh * lc * p.ev;
                let o_buf = storage_buffer(gpu, o_words, "o");
                let (b, chunks2) = match &coop {
                    Some(t) => (t.b2(), t.chunks2()),
                    None => (plan.pass2.b, plan.pass2.chunks()),
                };
                let blocks = lc.div_ceil(b);
                let wgs = plan.pass2_workgroups.min(blocks);
                let prm = uniform_buffer(
                    gpu,
                    bytemuck::cast_slice(&[
                        lc as u32,
                        blocks as u32,
                        p.group as u32,
                        chunks2 as u32,
                        k_scale.to_bits(),
                        (p.s as f32).to_bits(),
                        0,
                        0,
                    ]),
                );
                let bufs = match (&s16_buf, &z_buf, &vn_bufs) {
                    (Some(s16), Some(z), Some((_, vn2))) => {
                        vec![&prm, &q_buf, s16, z, &idx_buf, &w_buf, vn2, &o_buf]
                    }
                    _ => vec![&prm, &q_buf, &sp_buf, &idx_buf, &w_buf, &o_buf],
                };
                let (oc, (counted, t)) = dispatch_one(
                    gpu,
                    &p2,
                    &l2,
                    &bufs,
                    opts,
                    (wgs as u32, qh as u32, 1),
                    &o_buf,
                    o_words,
                )?;
                stats.absorb(&RunStats::dispatch(gpu, "pass2", counted, t));
                if oc.len() == out.len() {
                    // One dispatch for the whole output: it is already in place.
                    out = oc;
                    continue;
                }
                for h in 0..qh {
                    for row in 0..lc {
                        let dst = ((u0 * p.group + h) * p.l + l0 + row) * p.ev;
                        out[dst..dst + p.ev]
                            .copy_from_slice(&oc[(h * lc + row) * p.ev..(h * lc + row + 1) * p.ev]);
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}
