//! WGSL pieces both poly paths (f32 and tensor cores) generate alike: prefetch registers, the
//! feature build of pass 2, the feature table's loads; and the reduction kernel of pass 1's splits.

use std::fmt::Write as _;

use super::features::index_words;
use super::plan::AUX_THREADS;
use crate::wgsl::{fill_fragment, fill_template, io_counter_slots, Emitter};

pub(crate) const REDUCE: &str = include_str!("../../shaders/poly_reduce.wgsl");
const LOAD_FIRST: &str = include_str!("../../shaders/poly_pass1_load_first.wgsl");
const TABLE_STORE: &str = include_str!("../../shaders/poly_table_store.wgsl");

pub fn reduce_source(count_io: bool) -> String {
    reduce_source_with(count_io, false)
}

/// The reduction; `sliced`: each dispatch covers the words from `first_word` on (see
/// [`word_slices`]).
pub fn reduce_source_with(count_io: bool, sliced: bool) -> String {
    let [decl, add] = io_counter_slots(count_io, 3);
    let mut slots = vec![("WG", AUX_THREADS.to_string()), decl, add];
    slots.extend(word_slots(sliced));
    fill_template(REDUCE, &slots)
}

/// The reduction's and the scan's word index and last parameter: `first_word` where sliced.
pub(crate) fn word_slots(sliced: bool) -> [(&'static str, String); 2] {
    let (param, word) = if sliced {
        ("first_word", "params.first_word + gid.x")
    } else {
        ("_pad", "gid.x")
    };
    [("LAST_PARAM", param.into()), ("WORD", word.into())]
}

/// The dispatches of an elementwise pass over `words` words per unit (the reduction, the scan):
/// (first word, workgroups) each, at most `max_workgroups` workgroups of AUX_THREADS apiece.
/// One dispatch unless S' has more words than one grid dimension covers.
pub(crate) fn word_slices(words: usize, max_workgroups: u32) -> Vec<(usize, usize)> {
    let groups = words.div_ceil(AUX_THREADS);
    let per = (max_workgroups as usize).max(1);
    (0..groups.max(1))
        .step_by(per)
        .map(|g0| (g0 * AUX_THREADS, per.min(groups - g0)))
        .collect()
}

/// Declarations of a thread's `count` registers of a tile streamed through registers: element
/// u is tile word `lid + wg * u` (names[0]), at row names[1] and column names[2] of rows `width`
/// wide, held in names[3].
pub(crate) fn element_registers(
    s: &mut String,
    names: [&str; 4],
    (count, wg): (usize, usize),
    width: &str,
) {
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
pub(crate) struct FeatureBuild {
    pub(crate) index: String,
    pub(crate) d_decl: String,
    pub(crate) feature: String,
    pub(crate) d_store: String,
}

pub(crate) fn pass2_feature_build(
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

/// The product of a feature's `g` factors, `factor(t)` naming factor t; `one` when g = 0.
pub(crate) fn feature_product(g: usize, factor: impl Fn(usize) -> String, one: &str) -> String {
    if g == 0 {
        return one.to_string();
    }
    (0..g).map(factor).collect::<Vec<_>>().join(" * ")
}

/// Generated code that carries the next tile of a coop pass from storage to workgroup memory in
/// registers: their declarations, the loads of the first and of the next tile, and the stores.
pub(crate) struct Prefetch {
    pub(crate) decl: String,
    pub(crate) first: String,
    pub(crate) next: String,
    pub(crate) store: String,
}

/// Pass 1's prefetch (f32 and coop) from its declarations, its tile load (code for the tile at
/// key `j0`) and its stores.
pub(crate) fn pass1_prefetch(
    decl: &str,
    load: impl Fn(&str, usize) -> String,
    store: &str,
) -> Prefetch {
    Prefetch {
        decl: decl.trim_end().to_string(),
        first: fill_fragment(LOAD_FIRST, &[("LOAD", load("j_begin", 2))])
            .trim_end()
            .to_string(),
        next: load("j0 + BK", 3),
        store: store.trim_end().to_string(),
    }
}

/// Pass 2's feature table for the next chunk of `rc` rows (index words, weights and, with `z`,
/// coop's normaliser column) in registers, and its stores into `idx_t` (unpacked: the feature
/// build reads them for every row) and `wz_t` (the f32 pass takes the normaliser column from its
/// S' rows and stores only the weights).
pub(crate) fn table_prefetch(wg: usize, rc: usize, g: usize, z: bool) -> Prefetch {
    table_prefetch_from(wg, rc, g, z, "0u")
}

/// [`table_prefetch`] whose first chunk starts at feature row `first_row` (a split pass 2's
/// range).
pub(crate) fn table_prefetch_from(
    wg: usize,
    rc: usize,
    g: usize,
    z: bool,
    first_row: &str,
) -> Prefetch {
    let ni = (rc * index_words(g)).div_ceil(wg);
    let nw = rc.div_ceil(wg);
    let mut decl = String::new();
    for u in 0..ni {
        let _ = writeln!(decl, "        var tix_{u} = 0u;");
    }
    for u in 0..nw {
        let _ = writeln!(decl, "        var twz_{u} = vec2<f32>();");
    }
    let load = |f0: &str, depth: usize| {
        let mut e = Emitter::new(depth);
        e.scope(|e| {
            e.line(format!("let rows_f = min(RC, R - ({f0}));"));
            for u in 0..ni {
                let o = wg * u;
                e.line(format!("tix_{u} = 0u;"));
                let head = format!("if (lid + {o}u < RC * IW && (lid + {o}u) / IW < rows_f)");
                e.block(head, |e| {
                    e.line(format!("tix_{u} = feat_idx[({f0}) * IW + lid + {o}u];"));
                    e.line("words_read += 1u;");
                });
            }
            for u in 0..nw {
                let o = wg * u;
                e.block(format!("if (lid + {o}u < RC)"), |e| {
                    e.line(format!("twz_{u} = vec2<f32>();"));
                    if z {
                        e.line(format!("twz_{u}.y = z[unit * RP + ({f0}) + lid + {o}u];"));
                        e.line("words_read += 1u;");
                    }
                    e.block(format!("if (lid + {o}u < rows_f)"), |e| {
                        e.line(format!("twz_{u}.x = feat_w[({f0}) + lid + {o}u];"));
                        e.line("words_read += 1u;");
                    });
                });
            }
        });
        e.finish()
    };
    let mut store = Emitter::new(3);
    for u in 0..ni {
        let o = (wg * u).to_string();
        store.lines(&fill_fragment(
            TABLE_STORE,
            &[("O", o), ("U", u.to_string())],
        ));
    }
    let target = if z { "" } else { ".x" };
    for u in 0..nw {
        store.block(format!("if (lid + {o}u < RC)", o = wg * u), |e| {
            e.line(format!(
                "wz_t[lid + {o}u]{target} = twz_{u}{target};",
                o = wg * u
            ));
        });
    }
    let store = store.finish();
    Prefetch {
        decl: decl.trim_end().to_string(),
        first: load(first_row, 2),
        next: load("f0 + RC", 4),
        store: store.trim_end().to_string(),
    }
}

/// The polynomial primitive's additions to the f32 poly kernels; all off (the default) is the
/// softmax path, whose sources they leave byte for byte unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Variant {
    /// Gates: pass 1 weighs each key (`key_w`), the scan decays each chunk state (`decay`), the
    /// diagonal blocks weigh exp(g_i - g_j) (`gate`) and causal pass 2 scales each row's prefix
    /// sums (`q_factor`); see src/poly/primitive.rs.
    pub gated: bool,
    /// Pass 2 writes the weighted sums without dividing by their normaliser.
    pub unnormalized: bool,
    /// Pass 2 streams one range of S' chunks per dispatch (`chunk0` up to `chunks`): the ranges
    /// before the last add their sums [num | D] into `diag` (Ev + 1 words per row; causal: the
    /// masked blocks already there), the last adds `diag` to its own before dividing.
    pub feature_range: bool,
}

/// Parameters of pass 1 (f32 and coop; `shaders/poly_pass1.wgsl`, `poly_coop_pass1.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Pass1Params {
    /// Key rows per unit in this dispatch.
    pub s: u32,
    pub keys_per_split: u32,
    pub splits: u32,
    /// 1 / the key scale of the coop pass (the f32 pass does not scale keys).
    pub k_inv_scale: f32,
}

/// Parameters of the reduction of pass 1's key splits (`shaders/poly_reduce.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ReduceParams {
    pub splits: u32,
    /// 1: add to S' of an earlier key chunk instead of overwriting it.
    pub accumulate: u32,
    /// R * (Ev + 1) per unit.
    pub words: u32,
    /// The first word of this dispatch (sliced; see [`word_slices`]).
    pub first_word: u32,
}

/// Parameters of pass 2 (f32 and coop; the f32 shader reads the first four).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Pass2Params {
    /// Query rows per head in this dispatch.
    pub l: u32,
    /// Query blocks per head.
    pub blocks: u32,
    /// Query heads per KV head.
    pub group: u32,
    /// S' chunks (split: the end of this dispatch's range).
    pub chunks: u32,
    /// The coop pass's key scale (queries are scaled by it).
    pub k_scale: f32,
    /// Key rows per unit (S'' = S' / keys).
    pub keys: f32,
    pub _pad: u32,
    /// Split: the first S' chunk of this dispatch's range (`chunk0` in the f32 shader).
    pub chunk0: u32,
}
