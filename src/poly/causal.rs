//! Causal polynomial attention: `softmax(scale·QKᵀ + causal mask) V` by the polynomial method,
//! upper-left aligned (query i sees keys j <= i; rows i >= S see every key), with the certificate
//! of the non-causal path.
//!
//! # The causal schedule
//!
//! Keys are centred on one mean over all keys (the pre-pass computes it and β, as for non-causal
//! calls): a shift common to every key leaves the softmax over any subset of keys unchanged, and
//! β = scale·max‖q‖·max‖k − μ‖ bounds every score, the visible ones included, so each weight is
//! within a factor [1 − ε, 1 + ε] of exp and the per-column bound ε/(1 − ε)·range(V) holds for
//! every row.
//!
//! The sequence is cut into chunks of C rows. Query row i of chunk c gets
//! `φ_q(q_i)·S'_{<c}` (the prefix state: every key of the chunks before c) plus the masked block
//! `Σ_{j in chunk c, j <= i} P(scale·q_i·(k_j − μ)) [v_j | 1]` computed directly, and
//! `O_i = (num_i + num_d,i) / (D_i + D_d,i)`. Per window of T chunks (W = T·C rows):
//!
//! 1. pass 1 (`shaders/poly_pass1.wgsl`, unchanged) with `keys_per_split = C`: one partial S'
//!    per key chunk, ΔS'_c = Σ_{j in chunk c} φ_k(k_j − μ)[v_j | 1];
//! 2. the scan (`shaders/poly_scan.wgsl`) turns them into exclusive prefix states, starting from
//!    the carry of earlier windows; every key so far becomes the next carry (and fills the slot
//!    after the window's last key chunk, which rows past the keys read);
//! 3. the diagonal kernel (`shaders/poly_causal_diag.wgsl`) writes each row's masked block
//!    [num | D] (Ev + 1 words);
//! 4. pass 2 (`shaders/poly_pass2.wgsl` with `CAUSAL = true`): block qb streams the prefix state
//!    of its chunk (C is a multiple of the block B, so a block never straddles chunks; a resident
//!    S' is per chunk, so it is loaded per block) and adds the diagonal block before dividing.
//!
//! Keys j >= L are visible to no query and are never read (S_eff = min(S, L)).
//!
//! # Choice of C
//!
//! Per query row, the state traffic is about `(r·(3(Ev+1) + iw)) / C` words (pass 1 writes a
//! state per chunk and re-reads the feature table, the scan reads and writes it), which shrinks
//! with C; the diagonal block re-reads on average C/2 keys of E + Ev words per block of BQ
//! rows, `C·(E + Ev) / (2·BQ)` words per row, which grows with C. Their sum is least at
//! `C* = sqrt(2·BQ·r·(3(Ev+1) + iw) / (E + Ev))`, rounded to a multiple of lcm(B, BQ) (B the
//! pass-2 block). E = 64, degree 2 (r = 2,145): with 32 to 64 KiB of fast memory BQ = 64,
//! C* ≈ 648 → C = 640, where the two terms are about equal (657 and 640 words per row); with
//! 16 KiB BQ = 32, C* ≈ 458 → C = 448. The pass-2 state traffic `r·(Ev + 3)/B` per row does not
//! depend on C. `APPROX_ATTN_CAUSAL_CHUNK` (rows, rounded up to a multiple of lcm(B, BQ); it also
//! caps BQ) and `APPROX_ATTN_CAUSAL_WINDOW` (chunks per window, at most the planned one) force
//! smaller values for tests.
//!
//! # Memory
//!
//! The GPU holds one window: Q, K, V, O and the diagonal blocks of W rows, the T states of
//! r·(Ev + 1) words and the carry, per unit. T is the largest count whose states fit
//! [`STATE_BUDGET_WORDS`] (and one storage binding), never n·r. E = 64, degree 2, n = 2^20, one
//! head: r·(Ev + 1) = 139,425 words, T = 120 states = 16.7 M words (66.9 MB) and the carry
//! (0.56 MB), plus the window's W·(E + E + Ev + Ev + Ev + 1) = 76,800 · 321 words (98.6 MB at
//! C = 640): about 166 MB, against 9 GB for Φ(K) alone (n·r words).
//!
//! # I/O (closed form beside the non-causal one, n = L = S, d = E = Ev, one head)
//!
//! `prepass + 2·n·d·⌈r/rc⌉ + (n/C)·r·(3(d+1) + iw) + n·d·(C + BQ)/BQ + (n/B)·r·(d + 3)
//! + n·(4d + 1 + TC)`, up to terms in the number of windows and blocks: pass 1 reads K, V once
//! per feature chunk of rc rows and writes a state per chunk, the scan reads and writes it, the
//! diagonal blocks re-read (C + BQ)/2 keys of 2d words on average per block of BQ rows, pass 2
//! streams a state per block of B rows and reads each row's diagonal block (d + TC words: the
//! normaliser once per thread column), and Q (twice), O and the diagonal blocks move once. The
//! non-causal schedule B moves `2·n·d·⌈r/rc⌉ + 2·n·d + (n/B)·r·(d + 3)`; causal adds two terms
//! that balance at C*, each about `n·sqrt(r·d·(3(d+1) + iw)/BQ)`, so it stays O(n·d + n·r·d²/M)
//! (at fixed M: linear in n). [`causal_io`] counts it exactly as the shaders do.

use std::rc::Rc;
use std::sync::Arc;

use super::causal_coop::{self, diag_coop_source, CoopDiagTiles};
use super::features::{index_words, pack_indices, query_weights, FeatureTable};
use super::fit::Poly;
use super::io::prepass_words;
use super::kernel_common::{word_slices, word_slots, Pass1Params, Variant};
use super::kernel_f32::{pass1_source_with, pass2_source_variant};
use super::plan::{PolyPlan, AUX_THREADS};
use super::prepass::Prepass;
use crate::api::Problem;
use crate::budget::Budget;
use crate::chunking::Chunking;
use crate::config::Config;
use crate::device::Gpu;
use crate::error::Error;
use crate::io::{checked_io, floor_sum, triangle, words, IoCount, PassIo, Words};
use crate::launch::{Launch, RunOptions, RunStats};
use crate::transfer::{gather, read_f32, storage_buffer, storage_buffer_with, Uploads};
use crate::wgsl::{fill_fragment, fill_template, io_counter_slots, Emitter};

pub(crate) const SCAN: &str = include_str!("../../shaders/poly_scan.wgsl");
pub(crate) const DIAG: &str = include_str!("../../shaders/poly_causal_diag.wgsl");
const DIAG_GATE_Q_LOAD: &str = include_str!("../../shaders/poly_causal_diag_gate_q_load.wgsl");
const DIAG_GATE_K_LOAD: &str = include_str!("../../shaders/poly_causal_diag_gate_k_load.wgsl");

/// Threads of the diagonal kernel.
const DIAG_THREADS: usize = 128;
/// Most vec4 output accumulators a diagonal-kernel thread keeps in registers.
const MAX_DIAG_ACCUMULATORS: usize = 16;
/// Words of chunk states (all units of a dispatch) the GPU holds at once: 64 MiB.
pub const STATE_BUDGET_WORDS: u64 = 1 << 24;

/// Tiles of the diagonal kernel: BQ query rows and BK keys per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DiagTiles {
    pub e: usize,
    pub ev: usize,
    pub g: usize,
    pub bq: usize,
    pub bk: usize,
    pub threads: usize,
}

impl DiagTiles {
    /// vec4 per query or key row (E padded with zeros).
    pub fn e4(&self) -> usize {
        self.e.div_ceil(4)
    }
    /// vec4 per value row with its ones column.
    pub fn ev4(&self) -> usize {
        (self.ev + 1).div_ceil(4)
    }
    /// vec4 outputs (of BQ x EV4) each thread accumulates.
    pub fn accumulators(&self) -> usize {
        (self.bq * self.ev4()).div_ceil(self.threads)
    }
    /// Workgroup memory words: query block, key tile, value tile with its ones column (all in
    /// whole vec4), weight tile, mu, coefficients.
    pub fn fast_memory_words(&self) -> u64 {
        (4 * (self.bq + self.bk) * self.e4()
            + 4 * self.bk * self.ev4()
            + self.bq * self.bk
            + self.e
            + self.g
            + 1) as u64
    }
    /// Loop iterations of one invocation over a chunk of `chunk` keys (llvmpipe's budget).
    pub fn loop_iterations(&self, chunk: usize) -> u64 {
        let wg = self.threads;
        let c = |a: usize| a.div_ceil(wg) as u64;
        let init = c(self.e) + c(self.g + 1) + c(4 * self.bq * self.e4());
        let per_tile = 1
            + c(4 * self.bk * self.e4())
            + c(4 * self.bk * self.ev4())
            + c(self.bq * self.bk) * (1 + self.e4() as u64)
            + self.bk as u64;
        init + chunk.div_ceil(self.bk) as u64 * per_tile
    }
}

/// The causal plan: the poly pass tiles, the diagonal kernel's tiles, the chunk C, the window
/// of T chunks and the KV units per dispatch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CausalPlan {
    pub poly: PolyPlan,
    pub diag: DiagTiles,
    /// Rows per chunk (a multiple of the pass-2 block and of the diagonal block).
    pub chunk: usize,
    /// Chunks per window: each window's states are on the GPU at once.
    pub window_chunks: usize,
    /// KV units per dispatch.
    pub units: usize,
    /// The diagonal blocks on tensor cores (`causal_coop.rs`) instead of the f32 kernel.
    pub diag_coop: Option<CoopDiagTiles>,
}

impl CausalPlan {
    pub fn window_rows(&self) -> usize {
        self.chunk * self.window_chunks
    }
    /// State slots per unit: one per chunk of the window (where the window has fewer key chunks
    /// than query chunks, the slot after its last key chunk holds the window's total).
    pub fn states(&self) -> usize {
        self.window_chunks
    }
    /// The most workgroup memory any of its kernels declares.
    pub fn fast_memory_words(&self) -> u64 {
        let diag = match &self.diag_coop {
            Some(t) => t.fast_memory_words(),
            None => self.diag.fast_memory_words(),
        };
        self.poly
            .pass1
            .fast_memory_words()
            .max(self.poly.pass2.fast_memory_words())
            .max(diag)
    }
    /// Query rows per block of the diagonal kernel that runs.
    pub fn diag_rows(&self) -> usize {
        self.diag_coop.map_or(self.diag.bq, |t| t.bq())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The diagonal kernel's tiles: the largest query block up to `max_bq` (its key re-reads fall
/// as 1/BQ), then the largest key tile, that fit the fast memory and the register cap.
pub fn diag_tiles(
    p: &Problem,
    degree: usize,
    budget: &Budget,
    max_bq: usize,
) -> Result<DiagTiles, Error> {
    let threads = DIAG_THREADS.min(budget.max_invocations_per_workgroup as usize);
    let sizes = [64usize, 32, 16, 8, 4, 2, 1];
    for bq in sizes.into_iter().filter(|&b| b <= max_bq.max(1)) {
        for bk in sizes {
            let t = DiagTiles {
                e: p.e,
                ev: p.ev,
                g: degree,
                bq,
                bk,
                threads,
            };
            if t.fast_memory_words() <= budget.fast_memory_words
                && t.accumulators() <= MAX_DIAG_ACCUMULATORS
            {
                return Ok(t);
            }
        }
    }
    Err(Error::TooLarge(format!(
        "causal poly with E={} and Ev={}: no diagonal-block tile fits {} words of fast memory",
        p.e, p.ev, budget.fast_memory_words
    )))
}

/// The causal plan over the poly pass tiles of `poly` (see the module docs for C and T).
pub fn plan_causal(p: &Problem, poly: &PolyPlan, budget: &Budget) -> Result<CausalPlan, Error> {
    plan_causal_with(p, poly, budget, None)
}

/// [`plan_causal`] with the diagonal blocks on tensor cores where `diag_coop_sg` (the subgroup
/// size) is given and their tiles fit (the f32 diagonal kernel otherwise: `diag_coop` says which).
pub fn plan_causal_with(
    p: &Problem,
    poly: &PolyPlan,
    budget: &Budget,
    diag_coop_sg: Option<usize>,
) -> Result<CausalPlan, Error> {
    let too_large = |what: String| {
        Error::TooLarge(format!(
            "causal poly with E={}, Ev={}, degree {} (rank r={}) does not fit this device: {what}",
            p.e, p.ev, poly.degree, poly.r
        ))
    };
    // A forced chunk (tests) also caps the diagonal block, so that small chunks are possible.
    let cfg = Config::from_env();
    let forced = cfg.causal_chunk?;
    let max_bq = forced.map_or(usize::MAX, |c| 1 << c.ilog2());
    let diag = diag_tiles(p, poly.degree, budget, max_bq)?;
    let diag_coop =
        diag_coop_sg.and_then(|sg| causal_coop::plan_tiles(p, poly.degree, budget, sg, max_bq));
    let bq = diag_coop.map_or(diag.bq, |t| t.bq());
    let b = poly.pass2.b;
    let step = b / gcd(b, bq) * bq; // lcm(B, BQ)
    let (r, ev1, iw) = (poly.r, p.ev.saturating_add(1), index_words(poly.degree));
    let c_star = (2.0 * bq as f64 * r as f64 * (3 * ev1 + iw) as f64 / (p.e + p.ev) as f64).sqrt();
    let mut chunk = match forced {
        Some(c) => c.div_ceil(step) * step,
        None => ((c_star / step as f64).round() as usize).max(1) * step,
    };
    // No longer than the sequence (one chunk then holds every row).
    chunk = chunk.min(p.l.max(1).div_ceil(step).saturating_mul(step));
    let max_words = (budget.max_binding_bytes / 4) as usize;
    let width = p.e.max(ev1);
    // Saturating: sizes from Python may be huge (then nothing fits).
    let rows_cap = max_words / p.group.saturating_mul(width);
    if rows_cap < chunk {
        chunk = rows_cap / step * step;
    }
    let iters = |c: usize| {
        diag.loop_iterations(c)
            .max(poly.pass1.loop_iterations(c.min(p.s)))
    };
    while chunk > step && iters(chunk) > budget.max_loop_iterations {
        chunk -= step;
    }
    if chunk == 0 || iters(chunk) > budget.max_loop_iterations {
        return Err(too_large(format!(
            "no chunk (a multiple of {step} rows) fits one storage binding and the driver's loop \
             budget"
        )));
    }
    let state_words = r.saturating_mul(ev1);
    let state_cap = (max_words as u64).min(STATE_BUDGET_WORDS) as usize / state_words;
    if state_cap < 1 {
        return Err(too_large(format!(
            "a chunk state of r x (Ev+1) = {state_words} words exceeds the state budget"
        )));
    }
    let grid = budget.max_workgroups_per_dimension as usize;
    let mut window_chunks =
        p.l.max(1)
            .div_ceil(chunk)
            .min(state_cap)
            .min(rows_cap / chunk)
            .min(grid * b / chunk)
            .min(grid * bq / chunk)
            .max(1);
    if let Some(t) = cfg.causal_window? {
        window_chunks = window_chunks.min(t);
    }
    let w = chunk * window_chunks;
    let units = p
        .units
        .min(max_words / p.group.saturating_mul(w).saturating_mul(width))
        .min(state_cap / window_chunks)
        .min(grid / p.group)
        .max(1);
    Ok(CausalPlan {
        poly: *poly,
        diag,
        chunk,
        window_chunks,
        units,
        diag_coop,
    })
}

/// Floating-point operations of causal poly (for `auto`): pre-pass, pass 1 over the visible keys,
/// the scan, pass 2 and the diagonal blocks (about C/2 keys per row, a dot product of E, the
/// polynomial and Ev + 1 products each).
pub fn causal_poly_flops(p: &Problem, plan: &CausalPlan) -> f64 {
    let (r, g, ev1) = (
        plan.poly.r as f64,
        plan.poly.degree as f64,
        (p.ev + 1) as f64,
    );
    let heads = p.query_heads() as f64;
    let units = p.units as f64;
    let (l, s) = (p.l as f64, p.s as f64);
    let s_eff = s.min(l);
    let prepass = 2.0 * (heads * l * p.e as f64 + units * s * (2 * p.e + p.ev) as f64);
    let pass1 = units * s_eff * r * (g + 2.0 * ev1);
    let scan = units * (l / plan.chunk as f64).ceil() * r * ev1;
    let pass2 = heads * l * r * (g + 2.0 * ev1);
    let diag = heads * l * (plan.chunk as f64 / 2.0) * (2.0 * p.e as f64 + 2.0 * g + 2.0 * ev1);
    prepass + pass1 + scan + pass2 + diag
}

/// Windows of the plan: (first row, query rows, visible keys) of each.
fn windows(p: &Problem, plan: &CausalPlan) -> Vec<(usize, usize, usize)> {
    let s_eff = p.s.min(p.l);
    let w = plan.window_rows();
    (0..p.l)
        .step_by(w)
        .map(|w0| (w0, w.min(p.l - w0), w.min(s_eff.saturating_sub(w0))))
        .collect()
}

/// Exactly the words the causal kernels move (see each shader's counters): the pre-pass, then
/// per window pass 1 (as for non-causal, `keys_per_split = C`), the scan (the carry and each
/// chunk state read, each prefix state, the total and the carry written), the diagonal kernel
/// (per block: mu, the coefficients, on tensor cores the value normalisation (vmin, 1/vrange,
/// vrange), its query rows, the visible keys' K and V rows; its [num | D] rows written) and pass 2 (per head: its query rows, each block's state with index words and
/// weights, each row's diagonal block (Ev columns, and D once per thread column), its output).
/// In closed form ([`causal_passes_io`]); [`Error::Overflow`] where the total exceeds u64.
pub fn causal_io(
    p: &Problem,
    plan: &CausalPlan,
    prepass_chunking: &Chunking,
    budget: &Budget,
) -> Result<IoCount, Error> {
    let (r, w) = prepass_words(p, prepass_chunking, budget);
    let mut passes = vec![("prepass", r, w)];
    passes.extend(causal_passes_words(p, plan, false));
    checked_io(passes, || format!("the causal poly plan for {p:?}"))
}

/// The words of the causal passes alone (the polynomial primitive has no pre-pass); `gated`
/// adds the gate factors: a weight per key per feature chunk (pass 1), a decay per chunk state
/// element (scan), a gate pair per query row and per visible key of each block (diagonal), and a
/// factor per row per thread column (pass 2). [`Error::Overflow`] where the total exceeds u64.
pub fn causal_passes_io(p: &Problem, plan: &CausalPlan, gated: bool) -> Result<Vec<PassIo>, Error> {
    let passes = causal_passes_words(p, plan, gated);
    Ok(checked_io(passes, || format!("the causal poly plan for {p:?}"))?.passes)
}

/// The windows of [`windows`] as (query rows, visible keys, how many), without a loop: the first
/// `S_eff / W` see W keys each, the next one the rest of them, the later ones none; all have W
/// rows but the last (`L % W`).
fn window_kinds(p: &Problem, plan: &CausalPlan) -> Vec<(usize, usize, usize)> {
    let s_eff = p.s.min(p.l);
    let w = plan.window_rows().max(1);
    let (nf, rem) = (p.l / w, p.l % w);
    let nw = nf + usize::from(rem > 0);
    let a = s_eff / w;
    let mut kinds = vec![(w, w, a)];
    if a < nw {
        kinds.push((if a < nf { w } else { rem }, s_eff % w, 1));
    }
    if nf > a + 1 {
        kinds.push((w, 0, nf - a - 1));
    }
    if rem > 0 && nf > a {
        kinds.push((rem, 0, 1));
    }
    kinds.retain(|&(_, _, n)| n > 0);
    kinds
}

/// Keys the diagonal kernel reads in a window of `lw` query rows and `kw` visible keys: block j
/// (rows j·bq up to end_j = min((j + 1)·bq, lw)) reads the keys of its chunk (from
/// c0_j = c·floor(j·bq / c)) up to min(end_j, kw). The blocks that end within the keys
/// (j < J) read end_j − c0_j, the later ones whose chunk starts within them (j < J2)
/// kw − c0_j, the rest none; the sum of the c0_j is a floor sum.
fn diag_keys(lw: usize, kw: usize, bq: usize, c: usize) -> Option<u128> {
    let (lw, kw, bq, c) = (lw as u128, kw as u128, bq.max(1) as u128, c.max(1) as u128);
    let (blocks, full) = (lw.div_ceil(bq), lw / bq);
    let j_full = (kw / bq).min(full);
    let last_within = lw % bq != 0 && lw <= kw;
    let j = j_full + u128::from(last_within);
    let ends = bq
        .checked_mul(triangle(j_full.checked_add(1)?)?)?
        .checked_add(if last_within { lw } else { 0 })?;
    let j2 = blocks.min((kw / c + 1).checked_mul(c)?.div_ceil(bq)).max(j);
    ends.checked_add((j2 - j).checked_mul(kw)?)?
        .checked_sub(c.checked_mul(floor_sum(j2, c, bq, 0)?)?)
}

/// [`causal_passes_io`]'s words per pass, in closed form over the kinds of window
/// ([`window_kinds`]): per unit for pass 1 and the scan, per query head for the diagonal
/// kernel and pass 2 (a dispatch of units moves words in proportion to its units, so the
/// dispatches sum to all of them).
fn causal_passes_words(
    p: &Problem,
    plan: &CausalPlan,
    gated: bool,
) -> Vec<(&'static str, Words, Words)> {
    let g = words(usize::from(gated));
    let pp = &plan.poly;
    let one = words(1);
    let (r, ev1, iw) = (
        words(pp.r),
        words(p.ev) + one,
        words(index_words(pp.degree)),
    );
    let (e, ev) = (words(p.e), words(p.ev));
    let chunks1 = words(pp.pass1.chunks());
    let (bq, b, c) = (plan.diag_rows(), pp.pass2.b.max(1), plan.chunk.max(1));
    // Per block: mu and the coefficients, and on tensor cores the value normalisation.
    let per_block = words(p.e) + words(pp.degree) + one + words(3 * p.ev) * coop_diag_words(plan);
    let tc = words(pp.pass2.tc);
    let folds = words(pp.pass2_ranges.max(1) - 1);
    let units = words(p.units);
    let heads = units * words(p.group);
    let mut t = [Words::ZERO; 8]; // (reads, writes) of pass 1, scan, diag, pass 2
    for (lw, kw, n) in window_kinds(p, plan) {
        let (un, hn) = (units * words(n), heads * words(n));
        let (lw_, kw_) = (words(lw), words(kw));
        let splits = words(kw.div_ceil(c));
        t[0] += un * (splits * chunks1 * e + splits * r * iw + chunks1 * kw_ * (e + ev + g));
        t[1] += un * splits * r * ev1;
        t[2] += un * r * ev1 * (one + splits + g * splits);
        let total = words(usize::from(kw.div_ceil(c) < plan.window_chunks));
        t[3] += un * r * ev1 * (splits + one + total);
        let keys = Words(diag_keys(lw, kw, bq, c));
        let dr = words(lw.div_ceil(bq.max(1))) * per_block;
        let two_g = words(2) * g;
        t[4] += hn * (dr + lw_ * (e + two_g) + keys * (e + ev + two_g));
        t[5] += hn * lw_ * ev1;
        let blocks = words(lw.div_ceil(b));
        t[6] += hn * (lw_ * (e + ev + tc + g * tc) + blocks * r * (ev1 + iw + one));
        t[7] += hn * lw_ * ev;
        // A split pass 2: each range before the last reads Q, adds its rows into the diagonal
        // blocks (read and written, Ev + 1 words) with the gate factor once per thread column.
        t[6] += hn * folds * lw_ * (e + ev1 + g * tc);
        t[7] += hn * folds * lw_ * ev1;
    }
    ["pass1", "scan", "diag", "pass2"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| (name, t[2 * i], t[2 * i + 1]))
        .collect()
}

/// 1 where the diagonal blocks run on tensor cores (they also read 3 Ev words of value
/// normalisation per block), else 0.
fn coop_diag_words(plan: &CausalPlan) -> Words {
    words(usize::from(plan.diag_coop.is_some()))
}

pub fn scan_source(count_io: bool) -> String {
    scan_source_with(count_io, false)
}

/// The scan; `gated`: each chunk state is decayed by `decay` (its chunk's gate product) as the
/// running prefix passes it.
pub fn scan_source_with(count_io: bool, gated: bool) -> String {
    scan_source_sliced(count_io, gated, false)
}

/// The scan; `sliced`: each dispatch covers the words from `first_word` on (see
/// [`word_slices`]).
pub fn scan_source_sliced(count_io: bool, gated: bool, sliced: bool) -> String {
    let [decl, add] = io_counter_slots(count_io, 3 + u32::from(gated));
    let mut step = Emitter::new(3);
    let decay_decl = if gated {
        step.line("running = fma(running, decay[unit * params.states + sp], x);");
        step.line("words_read += 1u;");
        "\n@group(0) @binding(3) var<storage, read> decay: array<f32>;"
    } else {
        step.line("running += x;");
        ""
    };
    let mut slots = vec![
        ("WG", AUX_THREADS.to_string()),
        ("DECAY_DECL", decay_decl.to_string()),
        ("SCAN_STEP", step.finish()),
        decl,
        add,
    ];
    slots.extend(word_slots(sliced));
    fill_template(SCAN, &slots)
}

/// The diagonal kernel for these tiles, its accumulators unrolled into named registers.
pub fn diag_source(t: &DiagTiles, count_io: bool) -> String {
    diag_source_with(t, count_io, false)
}

/// The diagonal kernel; `gated`: weight P(x_ij) exp(g_i - g_j) with g the gate sums relative to
/// the chunk (`gate`, a float32 pair hi + lo per row, so that the difference of two nearby sums
/// keeps float32's relative precision however large they are; gated calls have L = S, so rows
/// and keys share it).
pub fn diag_source_with(t: &DiagTiles, count_io: bool, gated: bool) -> String {
    let (n, wg) = (t.accumulators(), t.threads);
    let (mut acc, mut accumulate, mut store) = (Emitter::new(1), Emitter::new(3), Emitter::new(1));
    for a in 0..n {
        acc.line(format!("let o_{a} = lid + {}u;", wg * a));
        acc.line(format!("let row_{a} = min(o_{a} / EV4, BQ - 1u);"));
        acc.line(format!("let col_{a} = o_{a} % EV4;"));
        acc.line(format!("var acc_{a} = vec4<f32>();"));
        accumulate.line(format!(
            "acc_{a} = fma(vec4<f32>(p_t[row_{a} * BK + j]), v_t[j * EV4 + col_{a}], acc_{a});"
        ));
        store.block(format!("if (o_{a} < BQ * EV4 && row_{a} < rows)"), |e| {
            e.line(format!(
                "let at_{a} = (head * params.l + q0 + row_{a}) * EV1 + 4u * col_{a};"
            ));
            for (k, comp) in ["x", "y", "z", "w"].iter().enumerate() {
                e.block(format!("if (4u * col_{a} + {k}u < EV1)"), |e| {
                    e.line(format!("diag[at_{a} + {k}u] = acc_{a}.{comp};"));
                    e.line("words_written += 1u;");
                });
            }
        });
    }
    let mut horner = Emitter::new(3);
    horner.line("var p = c_t[G];");
    for m in (0..t.g).rev() {
        horner.line(format!("p = fma(p, x, c_t[{m}u]);"));
    }
    if gated {
        horner.line("p = p * exp((gq_t[r].x - gk_t[j].x) + (gq_t[r].y - gk_t[j].y));");
    }
    // The gate's declarations and loads follow code on the template's lines.
    let (gate_decl, gate_tiles, gate_q_load, gate_k_load) = if gated {
        let mut tiles = Emitter::new(0);
        tiles.line("");
        tiles.line("var<workgroup> gq_t: array<vec2<f32>, BQ>;");
        tiles.line("var<workgroup> gk_t: array<vec2<f32>, BK>;");
        (
            "\n@group(0) @binding(7) var<storage, read> gate: array<f32>;".to_string(),
            tiles.finish(),
            fill_fragment(DIAG_GATE_Q_LOAD, &[]),
            format!("\n{}", fill_fragment(DIAG_GATE_K_LOAD, &[]).trim_end()),
        )
    } else {
        Default::default()
    };
    let [decl, add] = io_counter_slots(count_io, 7 + u32::from(gated));
    fill_template(
        DIAG,
        &[
            ("E", t.e.to_string()),
            ("EV", t.ev.to_string()),
            ("BQ", t.bq.to_string()),
            ("BK", t.bk.to_string()),
            ("G", t.g.to_string()),
            ("WG", wg.to_string()),
            ("E4", t.e4().to_string()),
            ("EV4", t.ev4().to_string()),
            ("Q_TILE", (t.bq * t.e4()).to_string()),
            ("K_TILE", (t.bk * t.e4()).to_string()),
            ("V_TILE", (t.bk * t.ev4()).to_string()),
            ("P_TILE", (t.bq * t.bk).to_string()),
            ("C_TILE", (t.g + 1).to_string()),
            ("ACC_DECL", acc.finish()),
            ("ACCUMULATE", accumulate.finish()),
            ("HORNER", horner.finish()),
            ("STORE", store.finish()),
            ("GATE_DECL", gate_decl),
            ("GATE_TILES", gate_tiles),
            ("GATE_Q_LOAD", gate_q_load),
            ("GATE_K_LOAD", gate_k_load),
            decl,
            add,
        ],
    )
}

/// What the polynomial primitive adds to a poly run (none: the softmax path).
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras<'a> {
    pub variant: Variant,
    /// Cumulative log gates G per unit row (units x S, float64), where `variant.gated`.
    pub gates: Option<&'a [f64]>,
    /// The state before the first key per unit (units x r x (Ev + 1)); zero without.
    pub initial_state: Option<&'a [f32]>,
    /// Read the state after the last key back (units x r x (Ev + 1)).
    pub return_state: bool,
}

/// Runs causal poly attention with this plan; see the module docs.
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    p: &Problem,
    plan: &CausalPlan,
    table: &FeatureTable,
    poly: &Poly,
    pre: &Prepass,
    xs: (&[f32], &[f32], &[f32]),
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Vec<f32>, Error> {
    let call = (table, poly, pre, Extras::default());
    Ok(run_with(gpu, p, plan, call, xs, opts, uploads, stats)?.0)
}

/// [`run`] with the primitive's [`Extras`]; returns the output and, where asked, the state after
/// the last key (relative to its gate sum: sum_j exp(G_last - G_j) phi(k_j) [v_j | 1]).
#[allow(clippy::too_many_arguments)]
pub fn run_with(
    gpu: &Gpu,
    p: &Problem,
    plan: &CausalPlan,
    (table, poly, pre, extras): (&FeatureTable, &Poly, &Prepass, Extras<'_>),
    xs: (&[f32], &[f32], &[f32]),
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<(Vec<f32>, Option<Vec<f32>>), Error> {
    let pipelines = CausalPipelines::new(gpu, plan, opts, extras.variant)?;
    let mut out = vec![0f32; p.query_heads() * p.l * p.ev];
    let mut state = extras.return_state.then(Vec::new);
    gpu.checked(|| {
        let run = CausalRun::new(gpu, p, plan, (table, poly, pre), &pipelines, opts, uploads);
        for u0 in (0..p.units).step_by(plan.units) {
            let nu = plan.units.min(p.units - u0);
            let mu = &pre.mu[u0 * p.e..(u0 + nu) * p.e];
            let mu_buf = storage_buffer_with(gpu, bytemuck::cast_slice(mu), "mu");
            // Zeroed by wgpu without an initial state: the state before the first window.
            let carry = match extras.initial_state {
                Some(s0) => storage_buffer_with(
                    gpu,
                    bytemuck::cast_slice(&s0[u0 * run.words..(u0 + nu) * run.words]),
                    "carry",
                ),
                None => storage_buffer(gpu, nu * run.words, "carry"),
            };
            for window in windows(p, plan) {
                let gates = extras
                    .gates
                    .map(|g| WindowGates::new(g, p, plan, (u0, nu), window).upload(gpu));
                let units = (u0, nu, &mu_buf, &carry);
                let kv = run.states(xs, units, window, gates.as_ref(), stats)?;
                run.rows(
                    xs,
                    units,
                    window,
                    (kv.as_ref(), gates.as_ref()),
                    &mut out,
                    stats,
                )?;
            }
            if let Some(st) = &mut state {
                st.extend(read_f32(gpu, &carry, nu * run.words)?);
            }
        }
        Ok(())
    })?;
    Ok((out, state))
}

/// A window's gate factors (see src/poly/primitive.rs), from G in float64 so that no factor
/// spans more than one chunk's decay: per key, exp(G_last(c) - G_j) to the chunk's last key
/// (pass 1); per chunk, exp(G_last(c) - G_before(c)) (the scan); per row, exp(G_i -
/// G_before(c)) (pass 2) and G_i - G_before(c) as a float32 pair hi + lo (the diagonal blocks).
/// Gated calls have L = S.
struct WindowGates {
    key_w: Vec<f32>,
    decay: Vec<f32>,
    q_factor: Vec<f32>,
    local: Vec<f32>,
}

impl WindowGates {
    fn new(g: &[f64], p: &Problem, plan: &CausalPlan, (u0, nu): (usize, usize), w: Window) -> Self {
        let (w0, _, kw) = w;
        let (c, states) = (plan.chunk, plan.states());
        let mut wg = WindowGates {
            key_w: Vec::with_capacity(nu * kw),
            decay: vec![1.0; nu * states],
            q_factor: Vec::with_capacity(nu * kw),
            local: Vec::with_capacity(2 * nu * kw),
        };
        for u in u0..u0 + nu {
            let gu = &g[u * p.s..(u + 1) * p.s];
            for (ci, c0) in (w0..w0 + kw).step_by(c).enumerate() {
                let c1 = (c0 + c).min(w0 + kw);
                let before = if c0 == 0 { 0.0 } else { gu[c0 - 1] };
                let last = gu[c1 - 1];
                wg.decay[(u - u0) * states + ci] = (last - before).exp() as f32;
                for &gj in &gu[c0..c1] {
                    wg.key_w.push((last - gj).exp() as f32);
                    wg.q_factor.push((gj - before).exp() as f32);
                    let local = gj - before;
                    let hi = local as f32;
                    wg.local.extend([hi, (local - f64::from(hi)) as f32]);
                }
            }
        }
        wg
    }

    fn upload(&self, gpu: &Gpu) -> [wgpu::Buffer; 4] {
        [&self.key_w, &self.decay, &self.q_factor, &self.local]
            .map(|x| storage_buffer_with(gpu, bytemuck::cast_slice(x), "gates"))
    }
}

/// The compiled kernels of the causal schedule.
struct CausalPipelines {
    pass1: Arc<wgpu::ComputePipeline>,
    scan: Arc<wgpu::ComputePipeline>,
    diag: Arc<wgpu::ComputePipeline>,
    pass2: Arc<wgpu::ComputePipeline>,
}

impl CausalPipelines {
    fn new(gpu: &Gpu, plan: &CausalPlan, opts: &RunOptions, v: Variant) -> Result<Self, Error> {
        let pp = &plan.poly;
        let words = pp.r * (pp.pass1.ev + 1);
        let sliced = word_slices(words, gpu.info.max_compute_workgroups_per_dimension).len() > 1;
        let compile = |name: String, src: String| {
            let key = format!("{name}:{}:{}:{v:?}", opts.count_io, opts.trusted);
            gpu.pipeline(&key, &src, opts.trusted)
        };
        Ok(CausalPipelines {
            pass1: compile(
                format!("pass1:{:?}", pp.pass1),
                pass1_source_with(&pp.pass1, opts.count_io, v.gated),
            )?,
            scan: compile(
                format!("causal_scan:{sliced}"),
                scan_source_sliced(opts.count_io, v.gated, sliced),
            )?,
            // Gated calls (the primitive) plan the f32 diagonal kernel only.
            diag: match plan.diag_coop.as_ref().filter(|_| !v.gated) {
                Some(t) => compile(
                    format!("causal_diag_coop:{t:?}"),
                    diag_coop_source(t, opts.count_io),
                )?,
                None => compile(
                    format!("causal_diag:{:?}", plan.diag),
                    diag_source_with(&plan.diag, opts.count_io, v.gated),
                )?,
            },
            pass2: compile(
                format!("causal_pass2:{:?}:ranges{}", pp.pass2, pp.pass2_ranges > 1),
                pass2_source_variant(
                    &pp.pass2,
                    opts.count_io,
                    true,
                    Variant {
                        feature_range: pp.pass2_ranges > 1,
                        ..v
                    },
                ),
            )?,
        })
    }
}

/// A dispatch group's units: first unit, count, key means, the state carried across windows.
type Units<'b> = (usize, usize, &'b wgpu::Buffer, &'b wgpu::Buffer);
/// A window: first row, query rows, key rows.
type Window = (usize, usize, usize);
/// The window's uploaded keys and values.
type KeyValues = (Rc<wgpu::Buffer>, Rc<wgpu::Buffer>);
/// A window's gate factors on the GPU: key weights, chunk decays, row factors, local sums.
type GateBuffers = [wgpu::Buffer; 4];

/// What every window of a call shares: the kernels, the feature table, weights and
/// coefficients on the GPU, and the chunk states.
struct CausalRun<'a> {
    gpu: &'a Gpu,
    p: &'a Problem,
    plan: &'a CausalPlan,
    pipelines: &'a CausalPipelines,
    opts: &'a RunOptions,
    uploads: &'a Uploads,
    idx_buf: wgpu::Buffer,
    w_buf: wgpu::Buffer,
    c_buf: wgpu::Buffer,
    empty: wgpu::Buffer,
    partial: wgpu::Buffer,
    states: usize,
    words: usize,
    /// Tensor-core diagonal blocks: scale P2, 1 / P2 and the value normalisation of every unit
    /// (`causal_coop::operand_scales`).
    coop: Option<(f32, f32, Vec<f32>)>,
}

impl<'a> CausalRun<'a> {
    fn new(
        gpu: &'a Gpu,
        p: &'a Problem,
        plan: &'a CausalPlan,
        (table, poly, pre): (&FeatureTable, &Poly, &Prepass),
        pipelines: &'a CausalPipelines,
        opts: &'a RunOptions,
        uploads: &'a Uploads,
    ) -> Self {
        let pp = &plan.poly;
        let words = pp.r * (p.ev + 1);
        let states = plan.states();
        let weights: Vec<f32> = query_weights(table, poly, f64::from(p.scale))
            .into_iter()
            .map(|w| w as f32)
            .collect();
        let coeffs: Vec<f32> = (0..=pp.degree)
            .map(|m| poly.coeffs.get(m).copied().unwrap_or(0.0) as f32)
            .collect();
        let upload = |data: &[u8], label| storage_buffer_with(gpu, data, label);
        CausalRun {
            gpu,
            p,
            plan,
            pipelines,
            opts,
            uploads,
            idx_buf: upload(
                bytemuck::cast_slice(&pack_indices(table)),
                "feature indices",
            ),
            w_buf: upload(bytemuck::cast_slice(&weights), "feature weights"),
            c_buf: upload(bytemuck::cast_slice(&coeffs), "coefficients"),
            empty: storage_buffer(gpu, 1, "no keys"),
            partial: storage_buffer(gpu, plan.units * states * words, "chunk states"),
            states,
            words,
            coop: plan.diag_coop.map(|_| causal_coop::operand_scales(p, pre)),
        }
    }

    /// Pass 1 over the window's keys (one split per chunk) and the scan into prefix states.
    fn states(
        &self,
        (_, k, v): (&[f32], &[f32], &[f32]),
        (u0, nu, mu_buf, carry): Units<'_>,
        (w0, _, kw): Window,
        gates: Option<&GateBuffers>,
        stats: &mut RunStats,
    ) -> Result<Option<KeyValues>, Error> {
        let (gpu, p, plan, opts) = (self.gpu, self.p, self.plan, self.opts);
        let splits = kw.div_ceil(plan.chunk);
        let kv = (kw > 0).then(|| {
            let kc = gather(k, u0, nu, p.s, w0, kw, p.e);
            let vc = gather(v, u0, nu, p.s, w0, kw, p.ev);
            (
                self.uploads.buffer(gpu, kc, "k"),
                self.uploads.buffer(gpu, vc, "v"),
            )
        });
        if let Some((k_buf, v_buf)) = &kv {
            // One split per sequence chunk; `splits` is the per-unit stride of the states.
            let params = Pass1Params {
                s: kw as u32,
                keys_per_split: plan.chunk as u32,
                splits: self.states as u32,
                k_inv_scale: 0.0,
            };
            let mut buffers = vec![&**k_buf, &**v_buf, mu_buf, &self.idx_buf, &self.partial];
            buffers.extend(gates.map(|g| &g[0]));
            let (_, st) = Launch {
                pass: "pass1",
                pipeline: &self.pipelines.pass1,
                params: &params,
                buffers: &buffers,
                grid: (splits as u32, plan.poly.pass1.chunks() as u32, nu as u32),
            }
            .run(gpu, opts, &[])?;
            stats.absorb(&st);
        }
        let mut buffers = vec![&self.partial, carry];
        buffers.extend(gates.map(|g| &g[1]));
        let max_groups = gpu.info.max_compute_workgroups_per_dimension;
        for (first_word, groups) in word_slices(self.words, max_groups) {
            let params = ScanParams {
                splits: splits as u32,
                states: self.states as u32,
                words: self.words as u32,
                first_word: first_word as u32,
            };
            let (_, st) = Launch {
                pass: "scan",
                pipeline: &self.pipelines.scan,
                params: &params,
                buffers: &buffers,
                grid: (groups as u32, nu as u32, 1),
            }
            .run(gpu, opts, &[])?;
            stats.absorb(&st);
        }
        Ok(kv)
    }

    /// The window's rows: the masked diagonal blocks, then pass 2 over the prefix states,
    /// copied into `out`.
    fn rows(
        &self,
        (q, _, _): (&[f32], &[f32], &[f32]),
        (u0, nu, mu_buf, _): Units<'_>,
        (w0, lw, kw): Window,
        (kv, gates): (Option<&KeyValues>, Option<&GateBuffers>),
        out: &mut [f32],
        stats: &mut RunStats,
    ) -> Result<(), Error> {
        let (gpu, p) = (self.gpu, self.p);
        let heads = nu * p.group;
        let qc = gather(q, u0 * p.group, heads, p.l, w0, lw, p.e);
        let q_buf = self.uploads.buffer(gpu, qc, "q");
        let d_buf = self.diagonal_blocks(&q_buf, (u0, nu, mu_buf), (lw, kw), (kv, gates), stats)?;
        let oc = self.pass2_rows(&q_buf, &d_buf, heads, (lw, kw), gates, stats)?;
        for h in 0..heads {
            for row in 0..lw {
                let dst = ((u0 * p.group + h) * p.l + w0 + row) * p.ev;
                out[dst..dst + p.ev]
                    .copy_from_slice(&oc[(h * lw + row) * p.ev..(h * lw + row + 1) * p.ev]);
            }
        }
        Ok(())
    }

    /// The window's masked diagonal blocks, `[num | D]` (Ev + 1 words per row), on the GPU: on
    /// tensor cores where planned (and not gated), else in f32.
    fn diagonal_blocks(
        &self,
        q_buf: &wgpu::Buffer,
        (u0, nu, mu_buf): (usize, usize, &wgpu::Buffer),
        (lw, kw): (usize, usize),
        (kv, gates): (Option<&KeyValues>, Option<&GateBuffers>),
        stats: &mut RunStats,
    ) -> Result<wgpu::Buffer, Error> {
        let (gpu, p, plan, opts) = (self.gpu, self.p, self.plan, self.opts);
        let heads = nu * p.group;
        let d_buf = storage_buffer(gpu, heads * lw * (p.ev + 1), "diagonal blocks");
        let (k_buf, v_buf) = match kv {
            Some((kb, vb)) => (kb.as_ref(), vb.as_ref()),
            None => (&self.empty, &self.empty),
        };
        let grid = (lw.div_ceil(plan.diag_rows()) as u32, heads as u32, 1);
        let st = match (&self.coop, gates) {
            (Some((q_scale, k_inv_scale, vn)), None) => {
                let params = CoopDiagParams {
                    l: lw as u32,
                    s: kw as u32,
                    group: p.group as u32,
                    chunk: plan.chunk as u32,
                    q_scale: *q_scale,
                    k_inv_scale: *k_inv_scale,
                    _pad: [0; 2],
                };
                let vn = &vn[u0 * 3 * p.ev..(u0 + nu) * 3 * p.ev];
                let vn_buf = storage_buffer_with(gpu, bytemuck::cast_slice(vn), "value norm");
                let buffers = [q_buf, k_buf, v_buf, mu_buf, &self.c_buf, &d_buf, &vn_buf];
                Launch {
                    pass: "diag",
                    pipeline: &self.pipelines.diag,
                    params: &params,
                    buffers: &buffers,
                    grid,
                }
                .run(gpu, opts, &[])?
                .1
            }
            _ => {
                let params = DiagParams {
                    l: lw as u32,
                    s: kw as u32,
                    group: p.group as u32,
                    chunk: plan.chunk as u32,
                    scale: p.scale,
                    _pad: [0; 3],
                };
                let mut buffers = vec![q_buf, k_buf, v_buf, mu_buf, &self.c_buf, &d_buf];
                buffers.extend(gates.map(|g| &g[3]));
                Launch {
                    pass: "diag",
                    pipeline: &self.pipelines.diag,
                    params: &params,
                    buffers: &buffers,
                    grid,
                }
                .run(gpu, opts, &[])?
                .1
            }
        };
        stats.absorb(&st);
        Ok(d_buf)
    }

    /// Pass 2 over the window's prefix states and diagonal blocks (split over feature ranges
    /// where planned): the window's output rows, read back.
    fn pass2_rows(
        &self,
        q_buf: &wgpu::Buffer,
        d_buf: &wgpu::Buffer,
        heads: usize,
        (lw, kw): (usize, usize),
        gates: Option<&GateBuffers>,
        stats: &mut RunStats,
    ) -> Result<Vec<f32>, Error> {
        let (gpu, p, plan, opts) = (self.gpu, self.p, self.plan, self.opts);
        let pass2 = &plan.poly.pass2;
        let blocks = lw.div_ceil(pass2.b);
        let o_words = heads * lw * p.ev;
        let o_buf = storage_buffer(gpu, o_words, "o");
        // A split pass 2 adds the ranges before its last into the diagonal blocks.
        let chunks = pass2.chunks();
        let per_range = pass2.chunks_per_range(plan.poly.pass2_ranges);
        let mut oc = Vec::new();
        for chunk0 in (0..chunks).step_by(per_range) {
            let end = (chunk0 + per_range).min(chunks);
            let params = CausalPass2Params {
                l: lw as u32,
                blocks: blocks as u32,
                group: p.group as u32,
                chunks: end as u32,
                seq_chunk: plan.chunk as u32,
                splits: kw.div_ceil(plan.chunk) as u32,
                states: self.states as u32,
                chunk0: chunk0 as u32,
            };
            let mut buffers = vec![
                q_buf,
                &self.partial,
                &self.idx_buf,
                &self.w_buf,
                &o_buf,
                d_buf,
            ];
            buffers.extend(gates.map(|g| &g[2]));
            let read_back: &[(&wgpu::Buffer, usize)] = if end == chunks {
                &[(&o_buf, o_words)]
            } else {
                &[]
            };
            let (o_read, st) = Launch {
                pass: "pass2",
                pipeline: &self.pipelines.pass2,
                params: &params,
                buffers: &buffers,
                grid: (blocks as u32, heads as u32, 1),
            }
            .run(gpu, opts, read_back)?;
            stats.absorb(&st);
            oc = o_read;
        }
        Ok(oc)
    }
}

/// Parameters of the prefix scan of chunk states (`shaders/poly_scan.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ScanParams {
    /// Key chunks of this window.
    splits: u32,
    /// State slots per unit.
    states: u32,
    /// R * (Ev + 1) per state.
    words: u32,
    /// The first word of this dispatch (sliced; see [`word_slices`]).
    first_word: u32,
}

/// Parameters of the masked diagonal blocks (`shaders/poly_causal_diag.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DiagParams {
    /// Query rows and key rows of this window.
    l: u32,
    s: u32,
    group: u32,
    /// Rows per sequence chunk.
    chunk: u32,
    scale: f32,
    _pad: [u32; 3],
}

/// Parameters of the diagonal blocks on tensor cores (`shaders/poly_causal_diag_coop.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CoopDiagParams {
    l: u32,
    s: u32,
    group: u32,
    chunk: u32,
    /// scale * P2 and 1 / P2 (`causal_coop::key_power_of_two`).
    q_scale: f32,
    k_inv_scale: f32,
    _pad: [u32; 2],
}

/// Parameters of causal pass 2 (`shaders/poly_pass2.wgsl` with CAUSAL).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CausalPass2Params {
    l: u32,
    blocks: u32,
    group: u32,
    chunks: u32,
    /// Query rows per sequence chunk, key chunks of this window, state slots per unit.
    seq_chunk: u32,
    splits: u32,
    states: u32,
    /// Split: the first S' chunk of this dispatch's range (`chunks` is its end).
    chunk0: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::plan::plan_exact;
    use crate::poly::plan::plan_poly;

    fn problem(l: usize, s: usize, e: usize) -> Problem {
        Problem {
            units: 1,
            group: 1,
            l,
            s,
            e,
            ev: e,
            causal: true,
            scale: 0.1,
        }
    }

    fn plan(p: &Problem, g: usize, b: &Budget) -> CausalPlan {
        plan_causal(p, &plan_poly(p, g, b).unwrap(), b).unwrap()
    }

    /// The old count, window by window and block by block as the kernels run (u64): the
    /// reference for the closed form.
    fn causal_passes_io_by_window(
        p: &Problem,
        plan: &CausalPlan,
        gated: bool,
    ) -> Vec<(&'static str, u64, u64)> {
        let gated = u64::from(gated);
        let pp = &plan.poly;
        let (r, ev1, iw) = (
            pp.r as u64,
            (p.ev + 1) as u64,
            index_words(pp.degree) as u64,
        );
        let (e, ev) = (p.e as u64, p.ev as u64);
        let chunks1 = pp.pass1.chunks() as u64;
        let (bq, b, c) = (plan.diag_rows(), pp.pass2.b, plan.chunk);
        let coeffs = (pp.degree + 1) as u64 + 3 * ev * u64::from(plan.diag_coop.is_some());
        let tc = pp.pass2.tc as u64;
        let mut t = [0u64; 8];
        for u0 in (0..p.units).step_by(plan.units) {
            let nu = plan.units.min(p.units - u0) as u64;
            let heads = nu * p.group as u64;
            for (_, lw, kw) in windows(p, plan) {
                let splits = kw.div_ceil(c) as u64;
                t[0] += nu
                    * (splits * chunks1 * e
                        + splits * r * iw
                        + chunks1 * kw as u64 * (e + ev + gated));
                t[1] += nu * splits * r * ev1;
                t[2] += nu * r * ev1 * (1 + splits + gated * splits);
                let total = u64::from(splits < plan.window_chunks as u64);
                t[3] += nu * r * ev1 * (splits + 1 + total);
                let (mut dr, mut keys) = (0u64, 0u64);
                for q0 in (0..lw).step_by(bq) {
                    let rows = bq.min(lw - q0);
                    let c0 = q0 / c * c;
                    keys += (q0 + rows).min(kw).saturating_sub(c0) as u64;
                    dr += e + coeffs;
                }
                t[4] += heads * (dr + lw as u64 * (e + 2 * gated) + keys * (e + ev + 2 * gated));
                t[5] += heads * lw as u64 * ev1;
                let blocks = lw.div_ceil(b) as u64;
                t[6] +=
                    heads * (lw as u64 * (e + ev + tc + gated * tc) + blocks * r * (ev1 + iw + 1));
                t[7] += heads * lw as u64 * ev;
                // Each range of a split pass 2 before the last: Q, the gate factor per thread
                // column, and its rows added into the diagonal blocks.
                let per_range = pp.pass2.chunks_per_range(pp.pass2_ranges);
                for chunk0 in (0..pp.pass2.chunks()).step_by(per_range) {
                    if chunk0 + per_range < pp.pass2.chunks() {
                        t[6] += heads * lw as u64 * (e + gated * tc + ev1);
                        t[7] += heads * lw as u64 * ev1;
                    }
                }
            }
        }
        ["pass1", "scan", "diag", "pass2"]
            .into_iter()
            .enumerate()
            .map(|(i, name)| (name, t[2 * i], t[2 * i + 1]))
            .collect()
    }

    #[test]
    fn diag_keys_match_the_block_loop() {
        for lw in 1usize..60 {
            for kw in 0..=lw {
                for bq in 1usize..9 {
                    for c in 1usize..20 {
                        let want: usize = (0..lw)
                            .step_by(bq)
                            .map(|q0| (q0 + bq.min(lw - q0)).min(kw).saturating_sub(q0 / c * c))
                            .sum();
                        assert_eq!(
                            diag_keys(lw, kw, bq, c),
                            Some(want as u128),
                            "{lw} {kw} {bq} {c}"
                        );
                    }
                }
            }
        }
    }

    /// Plans of plan_causal and perturbed ones (chunks, windows, units per dispatch, blocks):
    /// the closed form must count any plan as the loops do, gated or not, with the pre-pass.
    /// A causal problem of random sizes (`case` picks how L and S are drawn: edge sizes, S = L,
    /// or any).
    fn random_problem(rng: &mut crate::poly::io::Rng, case: usize) -> Problem {
        let edge = [
            1usize, 2, 3, 7, 16, 31, 63, 64, 65, 129, 255, 513, 700, 1000,
        ];
        let l = if case % 3 == 0 {
            rng.pick(&edge)
        } else {
            rng.range(1, 3000)
        };
        let s = match case % 4 {
            0 => rng.pick(&edge),
            1 => l,
            _ => rng.range(1, 3000),
        };
        let e = rng.pick(&[1usize, 3, 4, 8, 16, 17, 32, 64]);
        let ev = if rng.range(0, 1) == 0 {
            e
        } else {
            rng.pick(&[1usize, 5, 8, 16, 33])
        };
        let units = rng.range(1, 6);
        let group = rng.pick(&[1usize, 1, 2, 3, 4]);
        Problem {
            units,
            group,
            l,
            s,
            e,
            ev,
            causal: true,
            scale: 0.1,
        }
    }

    /// Random sizes for a planned causal schedule (`units`, `e`, `ev`, `g` of its problem):
    /// valid block multiples, or any sizes; tensor-core diagonal blocks; a split pass 2.
    fn random_plan_sizes(
        rng: &mut crate::poly::io::Rng,
        plan: &mut CausalPlan,
        (units, e, ev, g): (usize, usize, usize, usize),
    ) {
        match rng.range(0, 2) {
            0 => {}
            1 => {
                // Valid shapes: a chunk a multiple of both blocks, few chunks per window.
                let (b, bq) = (plan.poly.pass2.b, plan.diag.bq);
                let step = b / gcd(b, bq) * bq;
                plan.chunk = step * rng.range(1, 4);
                plan.window_chunks = rng.range(1, 5);
                plan.units = rng.range(1, units);
            }
            _ => {
                // Any sizes (the closed form does not need C to be a multiple of BQ).
                plan.chunk = rng.range(1, 200);
                plan.window_chunks = rng.range(1, 6);
                plan.diag.bq = rng.range(1, 70);
                plan.poly.pass2.b = rng.range(1, 70);
                plan.units = rng.range(1, units);
            }
        }
        // The diagonal blocks on tensor cores (their own block rows, value normalisation).
        if rng.range(0, 2) == 0 {
            plan.diag_coop = Some(CoopDiagTiles {
                e,
                ev,
                g,
                sg: 32,
                subgroups: rng.pick(&[1usize, 2, 4]),
                bk: 32,
            });
        }
        if !plan.poly.pass2.resident() && rng.range(0, 1) == 1 {
            // A split pass 2 of any number of feature ranges.
            let chunks = plan.poly.pass2.chunks();
            let per_range = plan.poly.pass2.chunks_per_range(rng.range(1, chunks));
            plan.poly.pass2_ranges = chunks.div_ceil(per_range);
        }
    }

    #[test]
    fn closed_form_equals_the_count_by_window() {
        use crate::poly::io::{by_dispatch, Rng};
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let (mut checked, mut several_windows, mut s_over_l, mut s_under_l) = (0, 0, 0, 0);
        for case in 0..1500 {
            let p = random_problem(&mut rng, case);
            let (units, l, s, e, ev) = (p.units, p.l, p.s, p.e, p.ev);
            let m = rng.pick(&[4096u64, 8192, 12288, 16384]);
            let budget = match rng.range(0, 2) {
                0 => Budget::model(m),
                1 => Budget::with_binding(m, rng.pick(&[1u64 << 16, 1 << 18, 1 << 20])),
                _ => Budget::with_binding(m, 128 << 20),
            };
            let g = rng.pick(&[1usize, 2, 2, 3]);
            let Ok(poly) = plan_poly(&p, g, &budget) else {
                continue;
            };
            let Ok(mut plan) = plan_causal(&p, &poly, &budget) else {
                continue;
            };
            let Ok(exact) = plan_exact(&p, &budget) else {
                continue;
            };
            random_plan_sizes(&mut rng, &mut plan, (units, e, ev, g));
            let gated = rng.range(0, 1) == 1;
            let got: Vec<_> = causal_passes_io(&p, &plan, gated)
                .unwrap()
                .into_iter()
                .map(|x| (x.name, x.reads, x.writes))
                .collect();
            assert_eq!(
                got,
                causal_passes_io_by_window(&p, &plan, gated),
                "{p:?} {plan:?} gated={gated}"
            );
            let io = causal_io(&p, &plan, &exact.chunking, &budget).unwrap();
            let (pr, pw) = by_dispatch::prepass_io(&p, &exact.chunking, &budget);
            assert_eq!((io.passes[0].reads, io.passes[0].writes), (pr, pw));
            assert_eq!(
                io.passes[1..]
                    .iter()
                    .map(|x| (x.name, x.reads, x.writes))
                    .collect::<Vec<_>>(),
                causal_passes_io_by_window(&p, &plan, false)
            );
            checked += 1;
            several_windows += usize::from(windows(&p, &plan).len() > 2);
            s_over_l += usize::from(s > l);
            s_under_l += usize::from(s < l);
        }
        assert!(
            checked > 1000 && several_windows > 300 && s_over_l > 200 && s_under_l > 200,
            "{checked} {several_windows} {s_over_l} {s_under_l}"
        );
    }

    #[test]
    fn any_size_answers_at_once_or_overflows_clearly() {
        let p = problem(1 << 62, 1 << 62, 64);
        for budget in [Budget::model(12288), Budget::with_binding(12288, 128 << 20)] {
            let at = |n: usize| {
                let p = Problem { l: n, s: n, ..p };
                let plan = plan(&p, 2, &budget);
                let pre = plan_exact(&p, &budget).unwrap().chunking;
                causal_io(&p, &plan, &pre, &budget).map(|io| io.total())
            };
            let err = at(1 << 62).unwrap_err();
            assert!(matches!(err, Error::Overflow(_)), "{err:?}");
            let ratio = at(1 << 40).unwrap() as f64 / at(1 << 39).unwrap() as f64;
            assert!((1.99..2.01).contains(&ratio), "{ratio} {budget:?}");
        }
    }

    #[test]
    fn chunk_is_a_multiple_of_both_blocks_and_near_the_optimum() {
        for m in [4096u64, 8192, 12288, 16384] {
            let b = Budget::model(m);
            let p = problem(1 << 16, 1 << 16, 64);
            let c = plan(&p, 2, &b);
            assert_eq!(c.chunk % c.poly.pass2.b, 0, "{c:?}");
            assert_eq!(c.chunk % c.diag.bq, 0, "{c:?}");
            assert!(c.fast_memory_words() <= m);
            // Within a step of C* = sqrt(2 BQ r (3 (Ev+1) + iw) / (E + Ev)).
            let cs = (2.0 * c.diag.bq as f64 * 2145.0 * (3.0 * 65.0 + 1.0) / 128.0).sqrt();
            let step = c.poly.pass2.b.max(c.diag.bq) as f64;
            assert!((c.chunk as f64 - cs).abs() <= step, "C={} C*={cs}", c.chunk);
        }
    }

    #[test]
    fn tensor_core_diagonal_blocks_set_the_block_and_the_chunk_step() {
        // 48 KiB, 32-lane subgroups: blocks of 64 rows, a chunk a multiple of them and of B.
        let b = Budget::with_binding(12288, 1 << 30);
        for (l, e) in [(1usize << 16, 64usize), (1000, 20), (100, 128)] {
            let p = problem(l, l, e);
            let poly = plan_poly(&p, 2, &b).unwrap();
            let c = plan_causal_with(&p, &poly, &b, Some(32)).unwrap();
            let t = c.diag_coop.expect("tensor-core tiles");
            assert_eq!((c.diag_rows(), t.bq()), (64, 64), "{c:?}");
            assert_eq!(c.chunk % 64, 0);
            assert_eq!(c.chunk % c.poly.pass2.b, 0);
            assert!(c.fast_memory_words() <= 12288);
            // Without a subgroup size: the f32 plan, unchanged.
            let f = plan_causal_with(&p, &poly, &b, None).unwrap();
            assert_eq!(f, plan_causal(&p, &poly, &b).unwrap());
            assert!(f.diag_coop.is_none() && f.diag_rows() == f.diag.bq);
        }
    }

    #[test]
    fn diag_tiles_fit_16_kib_at_every_head_size() {
        for e in [1usize, 8, 64, 128, 200, 256] {
            for g in [1usize, 2, 4] {
                let b = Budget::model(4096);
                let p = problem(1000, 1000, e);
                let t = diag_tiles(&p, g, &b, usize::MAX).unwrap();
                assert!(t.fast_memory_words() <= 4096, "{t:?}");
                assert!(t.accumulators() <= MAX_DIAG_ACCUMULATORS);
            }
        }
    }

    #[test]
    fn states_stay_within_the_budget_never_n_by_r() {
        let b = Budget::with_binding(8192, 1 << 30);
        let p = problem(1 << 20, 1 << 20, 64);
        let c = plan(&p, 2, &b);
        let words = (c.units * c.states() * c.poly.r * 65) as u64;
        assert!(words <= STATE_BUDGET_WORDS, "{c:?}");
        assert!(c.window_rows() < p.l);
        // 120 states of 2,145 x 65 words.
        assert_eq!(c.states(), 120);
        // E = 256, degree 2: one state of 33,153 x 257 words fits, a window of one chunk.
        let p = Problem {
            ev: 256,
            ..problem(4096, 4096, 256)
        };
        let c = plan(&p, 2, &Budget::with_binding(4096, 128 << 20));
        assert_eq!(c.window_chunks, 1, "{c:?}");
    }

    fn words(n: usize, m: u64) -> f64 {
        let b = Budget::model(m);
        let p = problem(n, n, 64);
        let c = plan(&p, 2, &b);
        let pre = plan_exact(&p, &b).unwrap().chunking;
        causal_io(&p, &c, &pre, &b).unwrap().total() as f64
    }

    #[test]
    fn causal_poly_io_is_near_linear() {
        for m in [4096u64, 8192, 12288, 16384] {
            for n0 in [1usize << 14, 1 << 16, 1 << 18] {
                let slope = (words(4 * n0, m) / words(n0, m)).log2() / 2.0;
                assert!(slope <= 1.05, "slope {slope} at n={n0}, M={m}");
            }
        }
    }

    #[test]
    fn sources_have_no_unfilled_slots() {
        let b = Budget::model(8192);
        let p = problem(300, 200, 16);
        let c = plan(&p, 2, &b);
        for s in [
            diag_source(&c.diag, true),
            diag_source(&c.diag, false),
            scan_source(true),
            pass2_source_variant(&c.poly.pass2, true, true, Variant::default()),
        ] {
            assert!(!s.contains("{{"));
        }
    }
}
