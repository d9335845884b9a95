//! Exact attention on cooperative matrices (tensor cores): its tiles ([`CoopExactTiles`]), the
//! WGSL generated from `shaders/exact_coop.wgsl` and its fragments `shaders/exact_coop_*.wgsl`,
//! the host loop (the f32 kernel's chunking and split-KV merge) and the f16 rounding bound that
//! the `Report` gives ([`F16Bound`]).
//!
//! # Rescaling schedule
//! Online softmax rescales each output row by exp2(m_old - m_new) when the row's running maximum
//! grows. A cooperative accumulator has no per-row access in registers, so a rescale costs a trip
//! through workgroup memory (store, scale rows, reload) for every accumulator of the subgroup.
//! The kernel rescales lazily: m moves only when some row's tile maximum exceeds m by more than
//! TAU = 4 (log2 units). Between rescales P = exp2(s - m + OFF) <= 2^(TAU + OFF) = 2^15, within
//! f16's range, and OFF = 11 keeps the probabilities that matter out of f16's subnormals. On
//! ordinary inputs the maximum settles within the first tiles, so almost every tile rescales
//! nothing (the branch is uniform over the subgroup: `subgroupAny`). The alternative, a first
//! pass over K for the row maxima, costs 1.5x the FLOPs on every tile.
//!
//! Synchronisation: one workgroup barrier per K/V tile (two buffers: the next tile is stored while
//! no one reads it); the scores and probabilities of a subgroup live in its own slices, so their
//! hand-over between the cooperative stores and the lanes needs only `subgroupBarrier`.

use super::run::{run_kernel, ExactKernel};
use super::storage::{F16Inputs, Storage};
use crate::api::Problem;
use crate::budget::Budget;
use crate::chunking::{chunking, Chunking};
use crate::device::Gpu;
use crate::error::Error;
use crate::launch::{RunOptions, RunStats};
use crate::numerics::{row_norm_and_max, value_columns};
use crate::wgsl::{fill_fragment, fill_template, indent, io_counter_slots, wgsl_element, Emitter};

pub(crate) const TEMPLATE: &str = include_str!("../../shaders/exact_coop.wgsl");
/// Fragments of the template (their first lines say where they go and what they are filled with).
const Q_WHOLE: &str = include_str!("../../shaders/exact_coop_q_whole.wgsl");
const Q_PARTS: &str = include_str!("../../shaders/exact_coop_q_parts.wgsl");
const Q_LOAD: &str = include_str!("../../shaders/exact_coop_q_load.wgsl");
const JFULL: &str = include_str!("../../shaders/exact_coop_jfull.wgsl");
const LOAD: &str = include_str!("../../shaders/exact_coop_load.wgsl");
const TILE_STORE: &str = include_str!("../../shaders/exact_coop_tile_store.wgsl");
const READ_UNMASKED: &str = include_str!("../../shaders/exact_coop_read_unmasked.wgsl");
const RESCALE: &str = include_str!("../../shaders/exact_coop_rescale.wgsl");
const STORE: &str = include_str!("../../shaders/exact_coop_store.wgsl");
const STORE_ELEMENT: &str = include_str!("../../shaders/exact_coop_store_element.wgsl");

/// Side of the cooperative matrices.
const COOP: usize = 16;
/// Lazy-rescale threshold and probability offset (log2 units); see the module docs.
pub const TAU: f32 = 4.0;
pub const OFF: f32 = 11.0;
/// Most 16 x 16 f32 output accumulators a subgroup keeps (8 registers each at 32 lanes).
const MAX_OUT_ACCUMULATORS: usize = 16;
/// Most threads per workgroup.
const MAX_THREADS: usize = 256;

/// Tiles of the exact kernel on cooperative matrices. A workgroup is `subgroups` subgroups of `sg`
/// lanes; subgroup s owns `rt` 16-row tiles of the query block (bq = 16 * rt * subgroups rows) and
/// all its 16-column output tiles; keys stream in tiles of `bk`. The Q block goes through
/// workgroup memory (into the subgroups' registers) in `q_parts` parts of bq / q_parts rows, in
/// the K/V buffers' memory: more parts, less memory where the Q block is larger than the
/// buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopExactTiles {
    pub e: usize,
    pub ev: usize,
    pub sg: usize,
    pub subgroups: usize,
    pub rt: usize,
    pub bk: usize,
    pub q_parts: usize,
}

impl CoopExactTiles {
    pub fn threads(&self) -> usize {
        self.sg * self.subgroups
    }
    /// Query rows per workgroup.
    pub fn bq(&self) -> usize {
        COOP * self.rt * self.subgroups
    }
    /// Head dimensions padded to whole 16-column tiles (zeros in workgroup memory).
    pub fn padded_e(&self) -> usize {
        COOP * self.e.div_ceil(COOP)
    }
    pub fn padded_ev(&self) -> usize {
        COOP * self.ev.div_ceil(COOP)
    }
    /// Lanes of a subgroup per query row in the softmax.
    pub fn lanes_per_row(&self) -> usize {
        self.sg / (COOP * self.rt)
    }
    /// Floats per storage element: 4 (vec4 loads) when both widths are multiples of 4, else 1.
    pub fn lanes(&self) -> usize {
        if self.e % 4 == 0 && self.ev % 4 == 0 {
            4
        } else {
            1
        }
    }
    /// Row strides (halves) of the Q/K and V tiles: padded width plus 8.
    pub fn k_stride(&self) -> usize {
        self.padded_e() + 8
    }
    pub fn v_stride(&self) -> usize {
        self.padded_ev() + 8
    }
    /// Halves of the K/V array: two [K | V] buffers, or a part of the Q block where that is
    /// larger.
    pub fn kv_halves(&self) -> usize {
        (2 * self.bk * (self.k_stride() + self.v_stride()))
            .max(self.q_part_rows() * self.k_stride())
    }
    /// Rows of a part of the Q block.
    pub fn q_part_rows(&self) -> usize {
        self.bq() / self.q_parts.max(1)
    }
    pub fn score_words(&self) -> usize {
        self.bq() * (self.bk + 4)
    }
    pub fn prob_halves(&self) -> usize {
        self.bq() * (self.bk + 8)
    }
    /// Words of workgroup memory the kernel declares: the K/V buffers (f16), the scores (f32) and
    /// the probabilities (f16). Each is a whole number of 16-byte units.
    pub fn fast_memory_words(&self) -> u64 {
        (self.kv_halves() / 2 + self.score_words() + self.prob_halves() / 2) as u64
    }
    /// Output accumulators per subgroup.
    pub fn out_accumulators(&self) -> usize {
        self.rt * self.padded_ev() / COOP
    }
}

/// What a generated kernel does besides its tiles: the format of Q, K and V in storage, and
/// whether key tiles that every row of a subgroup sees whole skip the mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CoopExactVariant {
    pub storage: Storage,
    pub unmasked_tiles: bool,
}

impl CoopExactVariant {
    /// Halves per storage element: f32 storage as [`CoopExactTiles::lanes`]; f16 storage in
    /// vec4<f16> where both widths are multiples of 4, else vec2<f16> (one u32 word: rows of odd
    /// width carry the zero half that `pack_f16_rows` pads them with).
    pub fn lanes(&self, t: &CoopExactTiles) -> usize {
        match self.storage {
            Storage::F32 => t.lanes(),
            Storage::F16 if t.lanes() == 4 => 4,
            Storage::F16 => 2,
        }
    }
    /// Storage elements per row of `width` values.
    fn row_elems(&self, t: &CoopExactTiles, width: usize) -> usize {
        width.div_ceil(self.lanes(t))
    }
}

/// The storage element type and its components, for `lanes` values per element.
fn element(storage: Storage, lanes: usize) -> (&'static str, &'static [&'static str]) {
    match (storage, lanes) {
        (Storage::F32, _) => wgsl_element(lanes),
        (Storage::F16, 4) => ("vec4<f16>", &[".x", ".y", ".z", ".w"]),
        (Storage::F16, _) => ("vec2<f16>", &[".x", ".y"]),
    }
}

/// Whether these tiles are well formed for their subgroup size and fit the budget.
pub fn tiles_fit(t: &CoopExactTiles, budget: &Budget) -> bool {
    let max_threads = MAX_THREADS.min(budget.max_invocations_per_workgroup as usize);
    t.sg >= COOP
        && t.sg.is_power_of_two()
        && t.subgroups > 0
        && t.rt > 0
        && t.q_parts > 0
        && t.subgroups % t.q_parts == 0
        && COOP * t.rt <= t.sg
        && t.bk >= COOP
        && t.bk % COOP == 0
        && t.bk % t.lanes_per_row() == 0
        && t.threads() <= max_threads
        && t.out_accumulators() <= MAX_OUT_ACCUMULATORS
        && t.fast_memory_words() <= budget.fast_memory_words
}

/// Shapes in order of preference, (subgroups, rt, bk). Measured on the H200 (n = 16,384, 8 heads,
/// E = 64, non-causal; ms): (8,1,32) 5.3, (4,2,32) 5.6, (4,1,16) 6.5, (8,1,16) 6.7, (4,1,32)
/// 8.5, (2,2,32) 14.3, (2,1,32) 24.5: more warps per workgroup (the K/V tile is shared by more
/// rows) beats everything else; at E = 128 only (4,1,32) 15.1, (4,1,16) 15.9, (2,1,32) 32.6 and
/// (2,2,32) 45.5 fit 48 KiB.
const PREFERENCE: [(usize, usize, usize); 10] = [
    (8, 1, 32),
    (4, 2, 32),
    (4, 1, 32),
    (4, 1, 16),
    (8, 1, 16),
    (2, 2, 32),
    (2, 1, 32),
    (2, 1, 16),
    (1, 2, 16),
    (1, 1, 16),
];

/// The first tiles of [`PREFERENCE`] that fit, for subgroups of `sg` lanes; None where none does.
pub fn plan_tiles(p: &Problem, budget: &Budget, sg: usize) -> Option<CoopExactTiles> {
    candidates(p, budget, sg).into_iter().next()
}

/// Every shape of [`PREFERENCE`] that fits, best first (what a sweep or an autotune times).
pub fn candidates(p: &Problem, budget: &Budget, sg: usize) -> Vec<CoopExactTiles> {
    PREFERENCE
        .iter()
        .map(|&(subgroups, rt, bk)| CoopExactTiles {
            e: p.e,
            ev: p.ev,
            sg,
            subgroups,
            rt,
            bk,
            q_parts: 1,
        })
        .filter(|t| tiles_fit(t, budget))
        .collect()
}

/// The plan: tiles and the f32 kernel's cuts of the problem into dispatches (bindings, grid).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CoopExactPlan {
    pub tiles: CoopExactTiles,
    pub chunking: Chunking,
}

pub fn plan_with(
    p: &Problem,
    budget: &Budget,
    tiles: CoopExactTiles,
) -> Result<CoopExactPlan, Error> {
    Ok(CoopExactPlan {
        tiles,
        chunking: chunking(p, tiles.bq(), budget)?,
    })
}

/// The plan for subgroups of `sg` lanes, or an error where no tile fits the fast memory.
pub fn plan(p: &Problem, budget: &Budget, sg: usize) -> Result<CoopExactPlan, Error> {
    let t = plan_tiles(p, budget, sg).ok_or_else(|| {
        Error::TooLarge(format!(
            "no cooperative-matrix tile of the exact kernel fits E={}, Ev={} in {} words of fast \
             memory with subgroups of {sg}",
            p.e, p.ev, budget.fast_memory_words
        ))
    })?;
    plan_with(p, budget, t)
}

/// The storage element (STORAGE_NOTE, ELEM, LANES) and the row widths in elements (EW, EVW).
fn storage_slots(t: &CoopExactTiles, var: &CoopExactVariant) -> [(&'static str, String); 5] {
    let lanes = var.lanes(t);
    let (note, ew, evw) = match var.storage {
        Storage::F32 => (
            "// Storage elements (vec4 where E and Ev are multiples of 4) and row widths in them.",
            "E / LANES".to_string(),
            "EV / LANES".to_string(),
        ),
        Storage::F16 => (
            "// Q, K and V are f16 in storage: vec4<f16> where E and Ev are multiples of 4, else\n\
             // vec2<f16> (rows of odd width end in a zero half); row widths in elements.",
            format!("{}u", var.row_elems(t, t.e)),
            format!("{}u", var.row_elems(t, t.ev)),
        ),
    };
    [
        ("STORAGE_NOTE", note.to_string()),
        ("ELEM", element(var.storage, lanes).0.to_string()),
        ("LANES", lanes.to_string()),
        ("EW", ew),
        ("EVW", evw),
    ]
}

/// Slots that carry the next K/V tile from storage to workgroup memory in registers (as f16):
/// their declarations (PREFETCH_DECL), their loads of the tile at key 0 and at j0 + BK
/// (LOAD_FIRST, LOAD_NEXT) and their stores into the buffer at kb/vb (TILE_STORE).
fn prefetch_slots(t: &CoopExactTiles, var: &CoopExactVariant) -> [(&'static str, String); 4] {
    let lanes = var.lanes(t);
    let wg = t.threads();
    let (ew, evw) = (var.row_elems(t, t.e), var.row_elems(t, t.ev));
    let (nk, nv) = ((t.bk * ew).div_ceil(wg), (t.bk * evw).div_ceil(wg));
    let half = match lanes {
        4 => "vec4<f16>",
        2 => "vec2<f16>",
        _ => "f16",
    };
    let comps = element(var.storage, lanes).1;
    let mut decl = Emitter::new(1);
    let (mut first, mut next, mut store) = (String::new(), String::new(), String::new());
    for (name, n, width, buf, base, tile, stride) in [
        ("kx", nk, "EW", "k", "k_base", "kb", "KS"),
        ("vx", nv, "EVW", "v", "v_base", "vb", "VS"),
    ] {
        for u in 0..n {
            let x = format!("{name}_{u}");
            decl.line(format!("var {x} = {half}();"));
            let load = |j0: &str| {
                let slots = [
                    ("X", x.clone()),
                    ("HALF", half.to_string()),
                    ("O", (wg * u).to_string()),
                    ("WIDTH", width.to_string()),
                    ("BUF", buf.to_string()),
                    ("BASE", base.to_string()),
                    ("J0", j0.to_string()),
                    ("WORDS", elem_words(var.storage).to_string()),
                ];
                fill_fragment(LOAD, &slots)
            };
            first.push_str(&load("0u"));
            next.push_str(&load("j0 + BK"));
            let mut stores = Emitter::new(3);
            for (l, c) in comps.iter().enumerate() {
                stores.line(format!("kv_t[at + {l}u] = {x}{c};"));
            }
            let slots = [
                ("O", (wg * u).to_string()),
                ("WIDTH", width.to_string()),
                ("TILE", tile.to_string()),
                ("STRIDE", stride.to_string()),
                ("STORES", stores.finish()),
            ];
            store.push_str(&fill_fragment(TILE_STORE, &slots));
        }
    }
    [
        ("PREFETCH_DECL", decl.finish()),
        ("LOAD_FIRST", first.trim_end().to_string()),
        ("LOAD_NEXT", indent(1, &next)),
        ("TILE_STORE", store.trim_end().to_string()),
    ]
}

/// Words the I/O counter adds per storage element read (f16: a vec2<f16> is one word).
fn elem_words(storage: Storage) -> &'static str {
    match storage {
        Storage::F32 => "LANES",
        Storage::F16 => "(LANES / 2u)",
    }
}

/// The tensor-core exact kernel for these tiles on f32 storage, every tile masked: straight-line
/// WGSL for every slot of `shaders/exact_coop.wgsl` (the schedule and its barriers are in the
/// template and its `shaders/exact_coop_*.wgsl` fragments).
pub fn shader_source(t: &CoopExactTiles, count_io: bool) -> String {
    shader_source_for(t, count_io, &CoopExactVariant::default())
}

/// [`shader_source`] for this variant: Q, K and V read from f16 storage (the values as they are,
/// not rounded again; Q is scaled in f32 and rounded to f16 as with f32 storage), and/or the
/// unmasked softmax on key tiles every row of the subgroup sees whole.
pub fn shader_source_for(t: &CoopExactTiles, count_io: bool, var: &CoopExactVariant) -> String {
    // The template has `}{{JFULL}}`: nothing, or the block on lines of its own.
    let jfull = if var.unmasked_tiles {
        format!("\n{}", fill_fragment(JFULL, &[]).trim_end())
    } else {
        String::new()
    };
    let mut slots = vec![
        ("E", t.e.to_string()),
        ("EV", t.ev.to_string()),
        ("BQ", t.bq().to_string()),
        ("BK", t.bk.to_string()),
        ("WG", t.threads().to_string()),
        ("SG", t.sg.to_string()),
        ("RT", t.rt.to_string()),
        ("KS", t.k_stride().to_string()),
        ("VS", t.v_stride().to_string()),
        ("TAU", format!("{TAU:?}")),
        ("OFF", format!("{OFF:?}")),
        ("KV_T", t.kv_halves().to_string()),
        ("S_T", t.score_words().to_string()),
        ("P_T", t.prob_halves().to_string()),
        ("JFULL", jfull),
        ("O_DECL", out_decl(t)),
        ("SCORES", scores_slot(t)),
        ("PV", pv_slot(t)),
    ];
    slots.extend(storage_slots(t, var));
    slots.extend(query_slots(t, var));
    slots.extend(prefetch_slots(t, var));
    slots.extend(softmax_slots(t, var.unmasked_tiles));
    slots.extend(store_slots(t));
    slots.extend(io_counter_slots(count_io, 6));
    fill_template(TEMPLATE, &slots)
}

/// Tile counts of the generated code: (depth tiles of Q K^T, key tiles, output column tiles,
/// lanes per row, scores per lane, staging elements per lane).
fn tile_counts(t: &CoopExactTiles) -> (usize, usize, usize, usize, usize, usize) {
    let np = t.lanes_per_row();
    (
        t.padded_e() / COOP,
        t.bk / COOP,
        t.padded_ev() / COOP,
        np,
        t.bk / np,
        256 * t.rt / t.sg,
    )
}

/// The Q block's trip through workgroup memory into the subgroups' fragments, whole or in parts
/// (Q_BLOCK), and the halves it occupies there (Q_HALVES).
fn query_slots(t: &CoopExactTiles, var: &CoopExactVariant) -> [(&'static str, String); 2] {
    let (parts, pr) = (t.q_parts.max(1), t.q_part_rows());
    let (x_type, q_elem) = match var.storage {
        Storage::F32 => ("T".to_string(), "q[q_base + idx]".to_string()),
        // Scaled in f32 (as the f32 storage path does), then rounded to f16 by the store.
        Storage::F16 => {
            let x = format!("vec{}<f32>", var.lanes(t));
            (x.clone(), format!("{x}(q[q_base + idx])"))
        }
    };
    let q_load = fill_fragment(
        Q_LOAD,
        &[
            ("X_TYPE", x_type),
            ("Q_ELEM", q_elem),
            ("WORDS", elem_words(var.storage).to_string()),
        ],
    );
    let mut slots = vec![("Q_LOAD", indent(if parts == 1 { 2 } else { 3 }, &q_load))];
    let (block, q_halves) = if parts == 1 {
        slots.push(("Q_STORE", q_store(t, var, "row", 2)));
        slots.push(("Q_FRAGMENTS", q_fragments(t, "let ", "row0", 1)));
        (fill_fragment(Q_WHOLE, &slots), "BQ * KS".to_string())
    } else {
        let mut decl = Emitter::new(1);
        for (a, d) in q_tiles(t) {
            decl.line(format!("var qf_{a}_{d}: coop_mat16x16<f16, A>;"));
        }
        let row0 = format!("row0 - qp * {pr}u");
        slots.extend([
            ("PARTS", parts.to_string()),
            ("PART_ROWS", pr.to_string()),
            ("SPP", (t.subgroups / parts).to_string()),
            ("Q_DECL", decl.finish()),
            (
                "Q_STORE",
                q_store(t, var, &format!("(row - qp * {pr}u)"), 3),
            ),
            ("Q_FRAGMENTS", q_fragments(t, "", &row0, 3)),
        ]);
        (fill_fragment(Q_PARTS, &slots), format!("{pr}u * KS"))
    };
    [
        ("Q_BLOCK", block.trim_end().to_string()),
        ("Q_HALVES", q_halves),
    ]
}

/// The (row tile, depth tile) pairs of a subgroup's Q fragments, in their order in the code.
fn q_tiles(t: &CoopExactTiles) -> impl Iterator<Item = (usize, usize)> {
    let (rt, dt) = (t.rt, tile_counts(t).0);
    (0..rt).flat_map(move |a| (0..dt).map(move |d| (a, d)))
}

/// The store of the Q element x into the staged row `row` (an expression) as f16.
fn q_store(t: &CoopExactTiles, var: &CoopExactVariant, row: &str, depth: usize) -> String {
    let mut e = Emitter::new(depth);
    for (l, c) in element(var.storage, var.lanes(t)).1.iter().enumerate() {
        e.line(format!("kv_t[{row} * KS + c + {l}u] = f16(x{c});"));
    }
    e.finish()
}

/// The loads of the subgroup's Q fragments (`head`: "let " where they are declared) from the
/// staged rows, its first row at `row0` (an expression).
fn q_fragments(t: &CoopExactTiles, head: &str, row0: &str, depth: usize) -> String {
    let mut e = Emitter::new(depth);
    for (a, d) in q_tiles(t) {
        e.line(format!(
            "{head}qf_{a}_{d} = coopLoadT<coop_mat16x16<f16, A>>(&kv_t[({row0} + {}u) * KS + {}u], KS);",
            16 * a,
            16 * d
        ));
    }
    e.finish()
}

/// The output accumulators o_A_C, zero (O_DECL).
fn out_decl(t: &CoopExactTiles) -> String {
    let mut e = Emitter::new(1);
    for a in 0..t.rt {
        for c in 0..tile_counts(t).2 {
            e.line(format!("var o_{a}_{c} = zero_acc;"));
        }
    }
    e.finish()
}

/// S = Q K^T one 16-key column tile at a time (RT accumulators live), staged row-major.
fn scores_slot(t: &CoopExactTiles) -> String {
    let (dt, kt, _, _, _, _) = tile_counts(t);
    let mut e = Emitter::new(2);
    for b in 0..kt {
        e.scope(|e| {
            for a in 0..t.rt {
                e.line(format!("var s_{a} = zero_acc;"));
            }
            for d in 0..dt {
                e.line(format!(
                    "let kf_{d} = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + {}u * KS + {}u], KS);",
                    16 * b,
                    16 * d
                ));
                for a in 0..t.rt {
                    e.line(format!(
                        "s_{a} = coopMultiplyAdd(qf_{a}_{d}, kf_{d}, s_{a});"
                    ));
                }
            }
            for a in 0..t.rt {
                e.line(format!(
                    "coopStoreT(s_{a}, &s_t[sb + {}u * SS + {}u], SS);",
                    16 * a,
                    16 * b
                ));
            }
        });
    }
    e.finish()
}

/// The online softmax of one key tile: this lane's scores (READ_SCORES), the tile's row maximum
/// (ROW_MAX), the lazy rescale of the output accumulators (ALPHA_ROWS, RESCALE) and the
/// probabilities (PROBS).
fn softmax_slots(t: &CoopExactTiles, unmasked_tiles: bool) -> [(&'static str, String); 5] {
    let (_, _, ct, _, per_lane, stage_elems) = tile_counts(t);
    let mut row_max = Emitter::new(2);
    let mx = (1..per_lane).fold("x_0".to_string(), |acc, i| format!("max({acc}, x_{i})"));
    row_max.line(format!("var mt = {mx};"));
    for o in row_lane_offsets(t) {
        row_max.line(format!("mt = max(mt, subgroupShuffleXor(mt, {o}u));"));
    }
    // Every accumulator through the staging slice, its rows scaled by alpha of their lane (row
    // rr's alpha lives in lane rr).
    let mut scale = Emitter::new(3);
    for u in 0..stage_elems {
        scale.line(format!("s_t[sb + lane + {}u] *= ar_{u};", t.sg * u));
    }
    let scale = scale.finish();
    let mut rescale = String::new();
    for c in 0..ct {
        let reload = accumulators(t, 3, |a| {
            format!(
                "o_{a}_{c} = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb + {}u], 16u);",
                256 * a
            )
        });
        let slots = [
            ("STAGE", stage_accumulators(t, c, 3)),
            ("SCALE", scale.clone()),
            ("RELOAD", reload),
        ];
        rescale.push_str(&fill_fragment(RESCALE, &slots));
    }
    let mut alpha = Emitter::new(3);
    row_values(&mut alpha, t, "ar", "alpha");
    let mut probs = Emitter::new(2);
    for i in 0..per_lane {
        probs
            .line(format!("let p_{i} = f16(exp2(x_{i} - mo));"))
            .line(format!("p_t[pb + r * PS + c_{i}] = p_{i};"))
            .line(format!("lsum += f32(p_{i});"));
    }
    [
        ("READ_SCORES", read_scores(t, unmasked_tiles)),
        ("ROW_MAX", row_max.finish()),
        ("ALPHA_ROWS", alpha.finish()),
        ("RESCALE", rescale.trim_end().to_string()),
        ("PROBS", probs.finish()),
    ]
}

/// This lane's scores x_i of the tile: lane (r, part) takes columns NP * (i + r) + part (mod BK),
/// a rotation that puts the lanes of one read into different banks; scores of masked keys
/// become NEG.
fn read_scores(t: &CoopExactTiles, unmasked_tiles: bool) -> String {
    let per_lane = tile_counts(t).4;
    let column = |i: usize| format!("let c_{i} = (NP * ({i}u + r) + part) % BK;");
    let masked = |i: usize| format!("select(NEG, s_t[sb + r * SS + c_{i}], c_{i} < lim)");
    if !unmasked_tiles {
        let mut e = Emitter::new(2);
        for i in 0..per_lane {
            e.line(column(i))
                .line(format!("let x_{i} = {};", masked(i)));
        }
        return e.finish();
    }
    let (mut columns, mut whole, mut partial) = (Emitter::new(2), Emitter::new(3), Emitter::new(3));
    for i in 0..per_lane {
        columns.line(column(i)).line(format!("var x_{i} = NEG;"));
        whole.line(format!("x_{i} = s_t[sb + r * SS + c_{i}];"));
        partial.line(format!("x_{i} = {};", masked(i)));
    }
    let slots = [
        ("COLUMNS", columns.finish()),
        ("WHOLE", whole.finish()),
        ("MASKED", partial.finish()),
    ];
    fill_fragment(READ_UNMASKED, &slots).trim_end().to_string()
}

/// Lane offsets of the shuffles that combine the NP lanes of a row.
fn row_lane_offsets(t: &CoopExactTiles) -> impl Iterator<Item = usize> {
    let sg = t.sg;
    std::iter::successors(Some(COOP * t.rt), |o| Some(o * 2)).take_while(move |&o| o < sg)
}

/// `name_u`: the `value` of the row of each staged element u of this lane (row rr's value lives
/// in lane rr).
fn row_values(e: &mut Emitter, t: &CoopExactTiles, name: &str, value: &str) {
    for u in 0..tile_counts(t).5 {
        e.line(format!(
            "let {name}_{u} = subgroupShuffle({value}, (lane + {}u) / 16u);",
            t.sg * u
        ));
    }
}

/// One line per accumulator row tile a.
fn accumulators(t: &CoopExactTiles, depth: usize, line: impl Fn(usize) -> String) -> String {
    let mut e = Emitter::new(depth);
    for a in 0..t.rt {
        e.line(line(a));
    }
    e.finish()
}

/// The accumulators of output column tile c into the subgroup's staging slice.
fn stage_accumulators(t: &CoopExactTiles, c: usize, depth: usize) -> String {
    accumulators(t, depth, |a| {
        format!("coopStoreT(o_{a}_{c}, &s_t[sb + {}u], 16u);", 256 * a)
    })
}

/// O += P V, 16 keys at a time.
fn pv_slot(t: &CoopExactTiles) -> String {
    let (_, kt, ct, _, _, _) = tile_counts(t);
    let mut e = Emitter::new(2);
    for kk in 0..kt {
        e.scope(|e| {
            for a in 0..t.rt {
                e.line(format!(
                    "let pf_{a} = coopLoadT<coop_mat16x16<f16, A>>(&p_t[pb + {}u * PS + {}u], PS);",
                    16 * a,
                    16 * kk
                ));
            }
            for c in 0..ct {
                e.line(format!(
                    "let vf_{c} = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + {}u * VS + {}u], VS);",
                    16 * kk,
                    16 * c
                ));
                for a in 0..t.rt {
                    e.line(format!("o_{a}_{c} = coopMultiplyAdd(pf_{a}, vf_{c}, o_{a}_{c});"));
                }
            }
        });
    }
    e.finish()
}

/// The output rows: the row sums over the NP lanes of a row and their inverses per staged element
/// (ROW_INV), then each accumulator through the staging slice, divided by its row's sum
/// (STORE_TILES).
fn store_slots(t: &CoopExactTiles) -> [(&'static str, String); 2] {
    let (_, _, ct, _, _, stage_elems) = tile_counts(t);
    let mut inv = Emitter::new(1);
    for o in row_lane_offsets(t) {
        inv.line(format!("lsum += subgroupShuffleXor(lsum, {o}u);"));
    }
    inv.line("let inv = select(0.0, 1.0 / lsum, lsum > 0.0);");
    row_values(&mut inv, t, "inv", "inv");
    let mut tiles = String::new();
    for c in 0..ct {
        let mut writes = String::new();
        for u in 0..stage_elems {
            let slots = [
                ("O", (t.sg * u).to_string()),
                ("COL", (16 * c).to_string()),
                ("U", u.to_string()),
            ];
            writes.push_str(&fill_fragment(STORE_ELEMENT, &slots));
        }
        let slots = [
            ("STAGE", stage_accumulators(t, c, 1)),
            ("WRITES", writes.trim_end().to_string()),
        ];
        tiles.push_str(&fill_fragment(STORE, &slots));
    }
    [
        ("ROW_INV", inv.finish()),
        ("STORE_TILES", tiles.trim_end().to_string()),
    ]
}

/// Whether this adapter runs the kernel: 16 x 16 f16 cooperative matrices with one subgroup size
/// (`coop_f16`) and subgroup barriers. Returns the subgroup size.
pub fn available(gpu: &Gpu) -> Option<usize> {
    let barrier = gpu
        .device
        .features()
        .contains(wgpu::Features::SUBGROUP_BARRIER);
    (gpu.info.coop_f16 && barrier).then_some(gpu.info.subgroup_size as usize)
}

/// Runs exact attention on cooperative matrices. `q`, `k`, `v` are contiguous
/// `(units*group, l, e)`, `(units, s, e)`, `(units, s, ev)`; the result is `(units*group, l, ev)`.
/// With `f16` (the same inputs packed as f16) the kernel reads those instead: half the words.
/// `unmasked_tiles`: the kernel variant whose key tiles seen whole skip the mask.
/// Dispatches, their cuts and the merge of split-KV partial results are the f32 kernel's.
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    p: &Problem,
    plan: &CoopExactPlan,
    (q, k, v): (&[f32], &[f32], &[f32]),
    f16: Option<&F16Inputs>,
    unmasked_tiles: bool,
    opts: &RunOptions,
) -> Result<(Vec<f32>, RunStats), Error> {
    let t = &plan.tiles;
    let var = CoopExactVariant {
        storage: f16.map_or(Storage::F32, |_| Storage::F16),
        unmasked_tiles,
    };
    let key = format!(
        "exact_coop:{t:?}:{var:?}:{}:{}",
        opts.count_io, opts.trusted
    );
    let source = shader_source_for(t, opts.count_io, &var);
    let pipeline = gpu.pipeline(&key, &source, opts.trusted)?;
    let kernel = ExactKernel {
        pass: "exact_coop",
        pipeline: &pipeline,
        bq: t.bq(),
    };
    let c = &plan.chunking;
    match f16 {
        None => run_kernel(gpu, p, c, &kernel, (q, k, v), (p.e, p.ev), opts),
        Some(xs) => {
            fn words(x: &[u32]) -> &[f32] {
                bytemuck::cast_slice(x)
            }
            let widths = (Storage::F16.row_words(p.e), Storage::F16.row_words(p.ev));
            let xs = (words(&xs.q), words(&xs.k), words(&xs.v));
            run_kernel(gpu, p, c, &kernel, xs, widths, opts)
        }
    }
}

/// Unit roundoff of f16 (round to nearest), and half the spacing of its subnormals: the largest
/// absolute rounding error of a value below f16's smallest normal 2^-14.
pub const F16_U: f64 = 1.0 / 2048.0;
pub const F16_ETA: f64 = 1.0 / 33_554_432.0; // 2^-25
const F32_U: f64 = 1.0 / 16_777_216.0; // 2^-24
/// Largest finite f16.
pub const F16_MAX: f64 = 65504.0;

/// The derived bound on what f16 rounding does to the result of the kernel.
///
/// Rounding: q' = fl16(fl32(q * c)) with c = |scale| log2(e), k' = fl16(k), v' = fl16(v); each
/// element is off by at most u|x| + eta (u = 2^-11, eta = 2^-25 for f16 subnormals). The products
/// of f16 are exact in f32; the tensor cores add E of them in f32, where truncating adders lose at
/// most 2 u32 (u32 = 2^-24) of the running sum each. For one query q and key k, by
/// Cauchy-Schwarz (sum |q_i||k_i| <= |q||k|, sum |x_i| <= sqrt(E)|x|), the score in log2 units is
/// off by at most
///   d2 = c|q||k| ((1+u)^2 (1+u32) (1 + 2E u32) - 1) + eta sqrt(E) (1+u) (c|q| (1+u32) + |k|)
///        + E eta^2,
/// so by `score_rounding` = ln(2) d2 in natural units, at the largest |q| and |k| of the call.
/// Each unnormalised weight P_j = exp2(s_j - m + 11) is then off by a factor within
/// e^(+-score_rounding), times (1 +- e_exp) for exp2 (Vulkan allows 3 + 2|x| ulp; |x| <= 40
/// where the result is not rounded to zero anyway: e_exp = 83 * 2^-23), times (1 +- u) for its
/// rounding to f16: `weight_factor` = e^score_rounding (1 + e_exp)(1 + u) - 1 =: eps. Weights
/// below f16's normal range (P < 2^-14, i.e. below 2^-25 of the row's largest, which is at least
/// 2^11) are off by at most eta each in absolute terms: together at most S eta / 2^11 of the row
/// sum. With every weight off by a factor in [1 - eps, 1 + eps] the output moves by at most
/// eps/(1 - eps) times the value range (DESIGN.md, the poly certificate's argument), and the
/// rounding of V adds u |v| + eta. Per output column c:
///   |O_c - O*_c| <= (eps + S eta 2^-11) / (1 - eps) * range_c + u max|v_c| + eta
///                   + (2 gamma_2S + u32) max|v_c|,
/// the last term the f32 sums over the S keys (P V and the row sum, at most 2S roundings each
/// with the online softmax's rescales, gamma_n = n u32 / (1 - n u32)) and the division.
///
/// f16 storage of float32 inputs (`rounded_to_f16`): K and V are rounded to f16 once, as above;
/// Q twice, q' = fl16(fl32(c fl16(q))). Per element that is q' = c q (1 + tq)(1 + t32) + hq
/// with |tq| <= uq = (1+u)^2 - 1 (two f16 roundings) and |hq| <= etaq = eta (1 + c (1+u)(1+u32))
/// (a subnormal rounding before and after the scaling). In general
///   d2 = c|q||k| ((1+uq)(1+u)(1+u32)(1 + 2E u32) - 1)
///        + sqrt(E) (eta c|q| (1+uq)(1+u32) + etaq (1+u)|k|) + E eta etaq,
/// the formula above where uq = u and etaq = eta. The bound is against the float32 inputs as
/// given: it includes what storing them as f16 adds.
#[derive(Clone, Debug, PartialEq)]
pub struct F16Bound {
    /// Largest change of a score (natural log units) by the rounding of Q and K.
    pub score_rounding: f64,
    /// eps: bound on the relative change of each unnormalised weight.
    pub weight_factor: f64,
    /// The bound on |O - O*| per output column (max over KV units), as derived above.
    pub error_bound_per_column: Vec<f64>,
}

/// The f16 bound of this call ([`F16Bound`]), or an error where an input would overflow f16.
/// `rounded_to_f16`: the kernel reads these float32 inputs from f16 storage (rounded there).
pub fn f16_bound(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rounded_to_f16: bool,
) -> Result<F16Bound, Error> {
    let c = f64::from(p.scale.abs()) * std::f64::consts::LOG2_E;
    let (qn, qa) = row_norm_and_max(q, p.e);
    let (kn, ka) = row_norm_and_max(k, p.e);
    let cols = value_columns(p, v);
    // Of the finite values: with check_finite=False, NaN and Inf run as they are.
    let va = cols.abs_max.iter().copied().fold(0f64, f64::max);
    // f16 storage rounds q before it is scaled: by at most a factor 1 + u more.
    let q_grow = if rounded_to_f16 { 1.0 + F16_U } else { 1.0 };
    let overflow = [
        ("query * scale * log2(e)", qa * c * q_grow),
        ("key", ka),
        ("value", va),
    ]
    .into_iter()
    .find(|(_, x)| *x >= F16_MAX);
    if let Some((name, x)) = overflow {
        return Err(Error::TooLarge(format!(
            "tensor cores need f16 operands: |{name}| reaches {x:.4e}, beyond f16's largest \
             finite value {F16_MAX} (or not finite); use tensor_cores=False"
        )));
    }
    let (u, eta, e) = (F16_U, F16_ETA, p.e as f64);
    let (uq, etaq) = if rounded_to_f16 {
        (
            (1.0 + u).powi(2) - 1.0,
            eta * (1.0 + c * (1.0 + u) * (1.0 + F32_U)),
        )
    } else {
        (u, eta)
    };
    let d2 = c * qn * kn * ((1.0 + uq) * (1.0 + u) * (1.0 + F32_U) * (1.0 + 2.0 * e * F32_U) - 1.0)
        + e.sqrt() * (eta * c * qn * (1.0 + uq) * (1.0 + F32_U) + etaq * (1.0 + u) * kn)
        + e * eta * etaq;
    let score_rounding = std::f64::consts::LN_2 * d2;
    let e_exp = 83.0 * 2f64.powi(-23);
    let eps = score_rounding.exp() * (1.0 + e_exp) * (1.0 + u) - 1.0;
    let sub = p.s as f64 * eta / 2f64.powf(f64::from(OFF));
    // The f32 sums over the S keys (P V and the row sum, with the rescales of the online
    // softmax: at most 2S roundings each, relative to sums of positive weights) and the division.
    let n32 = 2.0 * p.s as f64 * F32_U;
    let sums = if n32 < 1.0 {
        2.0 * n32 / (1.0 - n32) + F32_U
    } else {
        f64::INFINITY
    };
    let error_bound_per_column = (0..p.ev)
        .map(|col| {
            (0..p.units)
                .map(|unit| {
                    let i = unit * p.ev + col;
                    let (lo, hi, a) = (cols.min[i], cols.max[i], cols.abs_max[i]);
                    (eps + sub) / (1.0 - eps) * (hi - lo) + u * a + eta + sums * a
                })
                .fold(0f64, f64::max)
        })
        .collect();
    Ok(F16Bound {
        score_rounding,
        weight_factor: eps,
        error_bound_per_column,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(e: usize, ev: usize) -> Problem {
        Problem {
            units: 2,
            group: 1,
            l: 1000,
            s: 1000,
            e,
            ev,
            causal: false,
            scale: 1.0,
        }
    }

    #[test]
    fn nvidia_budget_takes_the_preferred_tiles_within_48_kib() {
        let b = Budget::with_binding(12288, 1 << 30);
        for (e, want) in [(64, (8, 1, 32)), (128, (4, 1, 32))] {
            let t = plan_tiles(&problem(e, e), &b, 32).unwrap();
            assert_eq!((t.subgroups, t.rt, t.bk), want, "E={e}");
            assert!(t.fast_memory_words() <= 12288);
        }
    }

    #[test]
    fn every_head_dim_gets_tiles_or_none_below_the_smallest() {
        for words in [4096u64, 8192, 12288, 16384] {
            for e in [1usize, 7, 16, 33, 64, 100, 128, 200, 256] {
                let b = Budget::with_binding(words, 1 << 30);
                match plan_tiles(&problem(e, e), &b, 32) {
                    Some(t) => assert!(tiles_fit(&t, &b), "{t:?}"),
                    // Only where not even the smallest shape fits.
                    None => {
                        let smallest = CoopExactTiles {
                            e,
                            ev: e,
                            sg: 32,
                            subgroups: 1,
                            rt: 1,
                            bk: COOP,
                            q_parts: 1,
                        };
                        assert!(!tiles_fit(&smallest, &b), "E={e} words={words}");
                        assert!(smallest.fast_memory_words() > words, "E={e}");
                    }
                }
            }
        }
    }

    #[test]
    fn bound_grows_with_the_score_scale_and_rejects_f16_overflow() {
        let p = Problem {
            units: 1,
            l: 4,
            s: 4,
            e: 4,
            ev: 2,
            scale: 0.5,
            ..problem(4, 2)
        };
        let q = vec![1.0f32; 16];
        let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let small = f16_bound(&p, &q, &q, &v, false).unwrap();
        let q4: Vec<f32> = q.iter().map(|x| x * 4.0).collect();
        let large = f16_bound(&p, &q4, &q4, &v, false).unwrap();
        // |q||k| = 4 and 64 at c = 0.5 log2(e): about 2u c |q||k| ln 2 = 4u and 64u.
        assert!(
            (small.score_rounding / (4.0 * F16_U) - 1.0).abs() < 0.01,
            "{small:?}"
        );
        assert!(large.score_rounding > 15.0 * small.score_rounding);
        // Range 6 per column, |v| up to 7.
        assert!(small.error_bound_per_column[1] > small.weight_factor * 6.0 + F16_U * 7.0);
        // f16 storage of these float32 inputs: Q rounded once more, about u c |q||k| ln 2 = 2u
        // more score rounding; the bound covers what storing them as f16 adds
        // (`storage::f16_input_rounding`, the f32 kernel's bound for it).
        let stored = f16_bound(&p, &q, &q, &v, true).unwrap();
        let more = stored.score_rounding - small.score_rounding;
        assert!((more / (2.0 * F16_U) - 1.0).abs() < 0.01, "{more}");
        let input = crate::exact::storage::f16_input_rounding(&p, &q, &q, &v);
        for (c, b) in stored.error_bound_per_column.iter().enumerate() {
            assert!(*b > small.error_bound_per_column[c], "{stored:?}");
            assert!(*b > input[c], "{b} {input:?}");
        }
        let huge = vec![70000.0f32; 8];
        assert!(matches!(
            f16_bound(&p, &q, &q, &huge, false),
            Err(Error::TooLarge(_))
        ));
    }
}
