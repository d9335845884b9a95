//! Plans of the poly passes (schedules A and B, f32 and tensor-core tiles) and their autotune
//! candidates. Pure: nothing here touches the GPU.

use super::features::{index_words, num_features, MAX_FEATURES};
use crate::api::{Problem, Schedule};
use crate::budget::{cdiv, largest_fitting, Budget, MAX_OUT_ACCUMULATORS, MAX_THREAD_SIDE};
use crate::chunking::{chunking, Chunking};
use crate::error::Error;
use std::cmp::Reverse;

/// Threads of the pre-pass and reduction kernels.
pub const AUX_THREADS: usize = 128;

/// Row stride of a pass-2 query tile (f32 and coop): at least E + 1, and 32 / HB modulo 32, where
/// HB query rows times 32 / HB consecutive feature indices make one 32-wide subgroup's read.
fn query_tile_stride(e: usize, hb: usize) -> usize {
    let hb = hb.clamp(1, 32);
    let want = (32 / hb) % 32;
    let min = e + 1;
    min + (want + 32 - min % 32) % 32
}

/// Thread columns and vec4 column groups per thread that cover `ev` value columns: at most
/// `MAX_THREAD_SIDE` thread columns (more only for very wide values), as few padded columns as
/// possible. Both poly passes tile their (rows x value columns) products this way.
fn value_columns(ev: usize) -> (usize, usize) {
    let groups = ev.div_ceil(4).max(1);
    let per_thread = groups
        .div_ceil(MAX_THREAD_SIDE)
        .min(MAX_OUT_ACCUMULATORS / 4);
    (groups.div_ceil(per_thread), per_thread)
}

/// vec4 groups of the Ev value columns each of `tc` thread columns owns (both poly passes).
fn vec4_groups_per_thread(ev: usize, tc: usize) -> usize {
    ev.div_ceil(4).div_ceil(tc)
}

/// Pass 1: workgroup (split, chunk, unit) accumulates rows `chunk*rc..` of S' over its keys.
/// Thread (a, b) of the `tf x tc` grid keeps rows a, a+tf, ... and value column groups b,
/// b+tc, ... of the chunk in registers (see `value_columns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pass1Tiles {
    pub e: usize,
    pub ev: usize,
    pub g: usize,
    pub r: usize,
    /// Feature rows of S' per workgroup (a multiple of `tf`; rows past r are zero).
    pub rc: usize,
    /// Key rows per streamed tile.
    pub bk: usize,
    pub tf: usize,
    pub tc: usize,
    /// Load the next key/value tile into registers while this one is multiplied (an autotune
    /// option; otherwise each tile goes from storage straight to workgroup memory).
    pub prefetch: bool,
}

impl Pass1Tiles {
    pub fn chunks(&self) -> usize {
        self.r.div_ceil(self.rc)
    }
    pub fn threads(&self) -> usize {
        self.tf * self.tc
    }
    pub fn rows_per_thread(&self) -> usize {
        self.rc / self.tf
    }
    /// vec4 value column groups per thread.
    pub fn groups_per_thread(&self) -> usize {
        vec4_groups_per_thread(self.ev, self.tc)
    }
    /// Value columns of the V tile, padded to whole groups of every thread column.
    pub fn padded_ev(&self) -> usize {
        4 * self.tc * self.groups_per_thread()
    }
    /// Whether a thread's rows come in fours (rows 4 tf + 0..3, 4 (tf + TF) + 0..3, ...), so the
    /// product reads their features as one vec4.
    pub fn vec4_rows(&self) -> bool {
        self.rows_per_thread() % 4 == 0
    }
    /// Feature build: thread `lid` builds features lid % rc + threads * c (this many c) of keys
    /// lid / rc + key_groups() * m; its row sums of phi are the normaliser partials.
    pub fn features_per_builder(&self) -> usize {
        self.rc.div_ceil(self.threads())
    }
    /// Key groups of the feature build (at most the key tile: their partials fit the features).
    pub fn key_groups(&self) -> usize {
        (self.threads() / self.rc).clamp(1, self.bk)
    }
    /// Workgroup memory words the kernel declares (K tile, padded V tile, features, index words,
    /// mu); the S' chunk itself lives in registers.
    pub fn fast_memory_words(&self) -> u64 {
        (self.bk * (self.e + 1)
            + self.bk * self.padded_ev()
            + self.rc * self.bk
            + self.rc * index_words(self.g)
            + self.e) as u64
    }
}

impl Pass1Tiles {
    /// Loop iterations of one pass-1 invocation over `keys` keys (see poly_pass1.wgsl; the
    /// micro-tile is unrolled, so only the key loop of the product counts).
    pub fn loop_iterations(&self, keys: usize) -> u64 {
        let (wg, e1) = (self.threads(), self.e + 1);
        let init = cdiv(self.e, wg)
            + cdiv(self.rc * index_words(self.g), wg)
            + cdiv(self.bk * self.padded_ev() / 4, wg);
        let per_tile = 1
            + cdiv(self.bk * e1, wg)
            + cdiv(self.bk * self.ev, wg)
            + cdiv(self.bk, self.key_groups())
            + self.bk as u64;
        init + cdiv(keys, self.bk) * per_tile + cdiv(self.rc, wg) * self.key_groups() as u64
    }
}

/// Pass 2: workgroup holds `b` query rows and streams S' through in chunks of `rc` feature rows.
/// Thread (a, b) of the `tr x tc` grid keeps output rows a, a+tr, ... and value column groups b,
/// b+tc, ... (and its rows' normalisers) in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pass2Tiles {
    pub e: usize,
    pub ev: usize,
    pub g: usize,
    pub r: usize,
    /// Query rows per block (a multiple of `tr`).
    pub b: usize,
    pub rc: usize,
    pub tr: usize,
    pub tc: usize,
}

impl Pass2Tiles {
    pub fn chunks(&self) -> usize {
        self.r.div_ceil(self.rc)
    }
    /// S' stays in fast memory for the workgroup's whole life (schedule A).
    pub fn resident(&self) -> bool {
        self.chunks() == 1
    }
    pub fn threads(&self) -> usize {
        self.tr * self.tc
    }
    pub fn rows_per_thread(&self) -> usize {
        self.b / self.tr
    }
    pub fn groups_per_thread(&self) -> usize {
        vec4_groups_per_thread(self.ev, self.tc)
    }
    /// Value columns of the S' chunk, padded to whole groups of every thread column.
    pub fn padded_ev(&self) -> usize {
        4 * self.tc * self.groups_per_thread()
    }
    /// Whether a thread's rows come in fours (rows 4 tr + 0..3, then 4 (tr + TR) + 0..3, ...), so
    /// the product reads their features as one vec4.
    pub fn vec4_rows(&self) -> bool {
        self.rows_per_thread() % 4 == 0
    }
    /// Query rows per feature-building thread (rows rb, rb + HB, ... with HB = b / this): the
    /// most of 8, 4, 2 whose build fits (see [`Pass2Tiles::builds_fit`]) with at least 4 rows per
    /// group where the rows allow, else 1.
    pub fn build_rows(&self) -> usize {
        [8usize, 4, 2]
            .into_iter()
            .find(|&rpt| self.build_fits(rpt) && (self.b / rpt >= 4 || self.b < 4))
            .unwrap_or(1)
    }
    /// Feature-building threads per query row group (TPR = threads / HB).
    pub fn builders_per_row(&self) -> usize {
        self.threads() / (self.b / self.build_rows())
    }
    /// Whether the feature build covers the block (checked where `build_rows` fell back to 1).
    pub fn builds_fit(&self) -> bool {
        self.build_fits(self.build_rows())
    }
    /// Whether `rpt` rows per builder give whole row groups (HB = b / rpt rows) for the threads,
    /// at least one builder per group, and no more builders per group than chunk rows (their
    /// normaliser partials go into the feature tile).
    fn build_fits(&self, rpt: usize) -> bool {
        let hb = self.b / rpt;
        self.b % rpt == 0
            && hb > 0
            && self.threads() % hb == 0
            && (1..=self.rc).contains(&(self.threads() / hb))
    }
    /// Row stride of the feature tile (phi[f * FS + row]): HB modulo 32 so the 32 / HB features
    /// one subgroup builds at once land in different banks, a multiple of 4 for the vec4 reads.
    pub fn feature_stride(&self) -> usize {
        let hb = self.b / self.build_rows();
        let pad = if hb < 32 { hb } else { 0 };
        align4(self.b + pad)
    }
    /// Row stride of the query tile (see [`query_tile_stride`]).
    pub fn q_stride(&self) -> usize {
        query_tile_stride(self.e, self.b / self.build_rows())
    }
    /// Workgroup memory words the kernel declares (Q tile, padded S' chunk, the chunk's weights
    /// and normaliser column, features, unpacked indices); the outputs live in registers.
    pub fn fast_memory_words(&self) -> u64 {
        (self.b * self.q_stride()
            + self.rc * self.padded_ev()
            + 2 * self.rc
            + self.rc * self.feature_stride()
            + align4(self.rc * self.g.max(1))) as u64
    }
}

impl Pass2Tiles {
    /// Feature ranges pass 2 is split into (one dispatch each, S' chunks balanced over them):
    /// one where every chunk fits the loop budget `max_loop_iterations` in one dispatch, else the
    /// fewest whose chunks do; None where not even one chunk per dispatch fits (or S' is resident:
    /// a resident S' is one chunk).
    pub fn feature_ranges(&self, max_loop_iterations: u64) -> Option<usize> {
        let chunks = self.chunks();
        if self.loop_iterations(1) <= max_loop_iterations {
            return Some(1);
        }
        let per_range = largest_fitting(chunks, |c| {
            self.range_loop_iterations(1, c) <= max_loop_iterations
        });
        (per_range > 0 && !self.resident()).then(|| chunks.div_ceil(per_range))
    }

    /// S' chunks per feature range of a pass 2 split into `ranges` (balanced; the last range
    /// takes the rest).
    pub fn chunks_per_range(&self, ranges: usize) -> usize {
        self.chunks().div_ceil(ranges.max(1))
    }

    /// Loop iterations of one pass-2 invocation over `blocks` query blocks (see poly_pass2.wgsl;
    /// the streamed chunks are loaded by unrolled code, a resident S' by loops).
    pub fn loop_iterations(&self, blocks: usize) -> u64 {
        self.range_loop_iterations(blocks, self.chunks())
    }

    /// [`Pass2Tiles::loop_iterations`] of a dispatch that streams `chunks` of the S' chunks (one
    /// feature range of a split pass 2; its store has no further loops).
    pub fn range_loop_iterations(&self, blocks: usize, chunks: usize) -> u64 {
        let (wg, e1, ev1) = (self.threads(), self.e + 1, self.ev + 1);
        let load = cdiv(self.rc * ev1, wg)
            + cdiv(self.rc * index_words(self.g), wg) * (1 + self.g as u64)
            + cdiv(self.rc, wg);
        let per_chunk =
            1 + cdiv(self.rc, self.builders_per_row()) * (1 + self.g as u64) + self.rc as u64;
        let per_block = 1
            + cdiv(self.b * e1, wg)
            + chunks as u64 * per_chunk
            + (self.rows_per_thread() * self.builders_per_row()) as u64;
        cdiv(self.rc * self.padded_ev() / 4, wg)
            + (if self.resident() { load } else { 0 })
            + blocks as u64 * per_block
    }
}

/// Side of the cooperative (tensor-core) matrices: 16 x 16 x 16 products, f16 operands, f32
/// accumulators.
pub const COOP: usize = 16;

/// Most 16 x 16 accumulators a subgroup keeps (8 registers each at 32 lanes).
const MAX_COOP_ACCUMULATORS: usize = 16;

/// Query rows per feature-building thread in coop pass 2: the feature's indices and weight are
/// read once for all of them. Measured on the H100 (pass 2, n = 65,536, E = 64): 1 row 5.8 ms,
/// 2 rows 4.4-5.0 ms, 4 rows 4.7 ms, 8 rows 4.6 ms (n = 32,768, E = 128: 19.2 ms with 4, 18.7 with
/// 8).
pub const COOP_PASS2_ROWS_PER_THREAD: usize = 8;

/// Both poly passes on cooperative matrices. A workgroup is `subgroups` subgroups of `sg` lanes;
/// subgroup s owns `rt` consecutive 16-row tiles of the output (pass 1: feature rows of S', pass 2:
/// query rows) across all 16-column tiles of the values. f16 operands live in workgroup memory
/// (rows padded by 8 halves), the accumulators in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopTiles {
    pub e: usize,
    pub ev: usize,
    pub g: usize,
    pub r: usize,
    pub sg: usize,
    /// Subgroups per workgroup in pass 1 and pass 2.
    pub subgroups: usize,
    pub subgroups2: usize,
    /// Row tiles per subgroup in pass 1 and pass 2.
    pub rt1: usize,
    pub rt2: usize,
    /// Keys per pass-1 tile (a multiple of 16).
    pub bk: usize,
    /// Feature rows per pass-2 chunk of S' (a multiple of 16).
    pub rc2: usize,
}

impl CoopTiles {
    pub fn threads(&self) -> usize {
        self.sg * self.subgroups
    }
    pub fn threads2(&self) -> usize {
        self.sg * self.subgroups2
    }
    pub fn col_tiles(&self) -> usize {
        self.ev.div_ceil(COOP)
    }
    pub fn padded_ev(&self) -> usize {
        COOP * self.col_tiles()
    }
    /// Feature rows of S' per pass-1 workgroup.
    pub fn rc1(&self) -> usize {
        self.subgroups * self.rt1 * COOP
    }
    /// Query rows per pass-2 block.
    pub fn b2(&self) -> usize {
        self.subgroups2 * self.rt2 * COOP
    }
    pub fn chunks1(&self) -> usize {
        self.r.div_ceil(self.rc1())
    }
    pub fn chunks2(&self) -> usize {
        self.r.div_ceil(self.rc2)
    }
    /// Feature rows of the packed S'' per unit: whole pass-2 chunks.
    pub fn rp(&self) -> usize {
        self.chunks2() * self.rc2
    }
    /// Words of workgroup memory pass 1 declares: centred keys transposed (f32, E+1 rows of bk+1),
    /// the value tile and the features (f16), index words, mu, the value normalisation, the
    /// row-sum partials and one 16 x 16 f32 staging tile per subgroup.
    pub fn pass1_words(&self) -> u64 {
        (align4((self.e + 1) * (self.bk + 1))
            + self.bk * (self.padded_ev() + 8) / 2
            + self.bk * (self.rc1() + 8) / 2
            + align4(self.rc1() * index_words(self.g))
            + align4(self.e)
            + align4(2 * self.ev)
            + self.threads()
            + (self.subgroups + 1) * COOP * COOP) as u64
    }
    /// Row stride of pass 2's query tile: at least E + 1, and 32 / HB modulo 32, where HB query
    /// rows times 32 / HB features (consecutive indices) make one 32-wide subgroup's read.
    pub fn q_stride2(&self) -> usize {
        query_tile_stride(self.e, self.b2() / COOP_PASS2_ROWS_PER_THREAD)
    }
    /// Words of workgroup memory pass 2 declares: the query block (f32; later the staging tiles
    /// and normaliser partials), its features and the S'' chunk (f16), the chunk's normaliser
    /// column and weights, its unpacked indices, the value normalisation and the zero tile.
    pub fn pass2_words(&self) -> u64 {
        (self.pass2_query_tile_words()
            + self.rc2 * (self.b2() + 8) / 2
            + self.rc2 * (self.padded_ev() + 8) / 2
            + 2 * self.rc2
            + align4(self.rc2 * self.g.max(1))
            + align4(2 * self.ev)
            + COOP * COOP) as u64
    }
    /// Words pass 2 needs only after its last chunk: the output staging tiles (one per subgroup)
    /// and the normaliser partials and row sums.
    pub fn pass2_tail_words(&self) -> usize {
        self.subgroups2 * COOP * COOP + COOP_PASS2_ROWS_PER_THREAD * self.threads2() + self.b2()
    }
    /// Words of pass 2's query tile. The tail lives in it once the last chunk's features are
    /// built, so it is at least the tail (frees workgroup memory for more workgroups per core).
    pub fn pass2_query_tile_words(&self) -> usize {
        (self.b2() * self.q_stride2()).max(self.pass2_tail_words())
    }
}

/// `words` rounded up to a whole number of 16-byte units (the coop kernels' workgroup variables).
pub fn align4(words: usize) -> usize {
    words.next_multiple_of(4)
}

/// Cooperative-matrix tiles for subgroups of `sg` lanes, or None where they do not fit: the
/// largest pass-1 feature chunk (fewest re-reads of K and V) and pass-2 query block that the fast
/// memory and registers allow, with at most one output row per lane of a subgroup (the feature
/// build gives each thread fixed rows).
pub fn plan_coop(p: &Problem, degree: usize, budget: &Budget, sg: usize) -> Option<CoopTiles> {
    let r64 = num_features(p.e, degree);
    if sg < COOP || !sg.is_power_of_two() || r64 > MAX_FEATURES || p.e > 1022 {
        return None;
    }
    let m = budget.fast_memory_words;
    let max_threads = MAX_POLY_THREADS.min(budget.max_invocations_per_workgroup as usize);
    let base = CoopTiles {
        e: p.e,
        ev: p.ev,
        g: degree,
        r: r64 as usize,
        sg,
        subgroups: 1,
        subgroups2: 1,
        rt1: 1,
        rt2: 1,
        bk: COOP,
        rc2: COOP,
    };
    let ct = base.col_tiles();
    let mut best: Option<CoopTiles> = None;
    for subgroups in [1usize, 2, 4, 8] {
        for rt in [1usize, 2, 4] {
            if subgroups * sg > max_threads || rt * COOP > sg || rt * ct > MAX_COOP_ACCUMULATORS {
                continue;
            }
            for bk in [64usize, 32, 16] {
                let t1 = CoopTiles {
                    subgroups,
                    rt1: rt,
                    bk,
                    ..base
                };
                if t1.pass1_words() > m {
                    continue;
                }
                // Fewest chunks, then the larger key tile, then fewer threads (more workgroups).
                let key = |t: &CoopTiles| (t.chunks1(), Reverse(t.bk), t.threads());
                if best.is_none_or(|b| key(&t1) < key(&b)) {
                    best = Some(t1);
                }
            }
        }
    }
    let mut tiles = best?;
    // Pass 2: chunks of at most 64 feature rows (on the H100, 64 beat 128 and 176 by 2-4x:
    // smaller tiles, more workgroups per SM), then the most threads, then the largest block.
    let chunk_cap = 64.min(COOP * tiles.r.div_ceil(COOP));
    let mut fitted = Vec::new();
    for subgroups2 in [8usize, 4, 2, 1] {
        for rt2 in [4usize, 2, 1] {
            if subgroups2 * sg > max_threads || rt2 * COOP > sg || rt2 * ct > MAX_COOP_ACCUMULATORS
            {
                continue;
            }
            let t = CoopTiles {
                subgroups2,
                rt2,
                ..tiles
            };
            let rc2 = COOP
                * largest_fitting(chunk_cap / COOP, |c| {
                    CoopTiles { rc2: COOP * c, ..t }.pass2_words() <= m
                });
            if rc2 > 0 {
                fitted.push(CoopTiles { rc2, ..t });
            }
        }
    }
    let pass2 = fitted
        .iter()
        .max_by_key(|t| (t.rc2 == chunk_cap, t.threads2(), t.b2()))
        .copied()?;
    tiles = pass2;
    Some(tiles)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolyPlan {
    pub degree: usize,
    pub r: usize,
    pub schedule: Schedule,
    pub pass1: Pass1Tiles,
    /// Workgroups that split each unit's keys in pass 1 (their partial S' are summed afterwards).
    pub splits: usize,
    pub keys_per_split: usize,
    pub pass2: Pass2Tiles,
    /// Query blocks per head handled by distinct workgroups (< blocks: persistent workgroups).
    pub pass2_workgroups: usize,
    /// Dispatches of pass 2 per query chunk, each over one range of S' chunks (1: one dispatch;
    /// more where the driver's loop budget cannot stream all of S' in one, see
    /// [`Pass2Tiles::feature_ranges`]).
    pub pass2_ranges: usize,
    pub chunking: Chunking,
    /// Run both passes on cooperative matrices with these tiles (f16 operands) instead of the
    /// f32 tiles above.
    pub coop: Option<CoopTiles>,
}

/// Threads per workgroup of the pre-pass, and the count the poly passes prefer.
pub const POLY_THREADS: usize = 128;

/// Most threads per workgroup of the poly passes (every adapter's invocation minimum).
const MAX_POLY_THREADS: usize = 256;

/// Aim for at least this many workgroups per pass: an H100 (132 SMs) ran pass 1 latency-bound
/// with 512 (E = 128: one key split, 528 workgroups each streaming 262,144 keys).
pub(crate) const TARGET_WORKGROUPS: usize = 4096;

/// The error of a poly plan that does not fit this device, saying what does not.
fn poly_too_large(p: &Problem, degree: usize, r: u64, budget: &Budget, what: &str) -> Error {
    Error::TooLarge(format!(
        "poly with E={}, Ev={}, degree {degree} (rank r={r}) does not fit this device: {what} \
         (fast memory {} words)",
        p.e, p.ev, budget.fast_memory_words
    ))
}

/// Picks the poly plan: feature chunk sizes from the fast memory, schedule A when S' fits.
pub fn plan_poly(p: &Problem, degree: usize, budget: &Budget) -> Result<PolyPlan, Error> {
    plan_poly_rank(p, degree, num_features(p.e, degree), budget)
}

/// [`plan_poly`] for a feature table of `r64` rows of degree <= `degree` (the polynomial
/// primitive drops the degrees its kernel does not use).
pub fn plan_poly_rank(
    p: &Problem,
    degree: usize,
    r64: u64,
    budget: &Budget,
) -> Result<PolyPlan, Error> {
    let too_large = |what: &str| poly_too_large(p, degree, r64, budget, what);
    if r64 > MAX_FEATURES || p.e > 1022 {
        return Err(too_large("the rank exceeds the feature budget"));
    }
    let grid = ThreadGrid::new(p, degree, r64 as usize, budget);
    let pass1 = grid
        .pass1()
        .ok_or_else(|| too_large("no pass-1 tile fits"))?;
    let pass2 = grid.pass2(pass1.chunks() == 1).ok_or_else(|| {
        too_large("no pass-2 tile fits the fast memory and the driver's loop budget")
    })?;
    plan_poly_with(p, degree, budget, pass1, pass2)
}

/// Ties go to POLY_THREADS threads, then to the nearer larger count.
fn thread_rank(threads: usize) -> (usize, Reverse<usize>) {
    (
        threads.max(POLY_THREADS) / threads.min(POLY_THREADS),
        Reverse(threads),
    )
}

/// Fewer than two warps of 32 threads only where nothing larger fits.
fn enough_threads(threads: usize) -> Reverse<usize> {
    Reverse(threads.min(64))
}

/// What both f32 passes' tiles are chosen from: both tile (rows x value columns) products over a
/// grid of `rows x tc` threads; the registers of a thread bound the rows it owns.
struct ThreadGrid<'a> {
    p: &'a Problem,
    budget: &'a Budget,
    degree: usize,
    r: usize,
    tc: usize,
    max_rows_per_thread: usize,
    /// Thread rows that fit a workgroup with `tc` thread columns.
    thread_rows: Vec<usize>,
}

impl<'a> ThreadGrid<'a> {
    fn new(p: &'a Problem, degree: usize, r: usize, budget: &'a Budget) -> Self {
        let max_threads = MAX_POLY_THREADS.min(budget.max_invocations_per_workgroup as usize);
        let (tc, groups) = value_columns(p.ev);
        ThreadGrid {
            p,
            budget,
            degree,
            r,
            tc,
            max_rows_per_thread: MAX_OUT_ACCUMULATORS / (4 * groups),
            thread_rows: (0..=8)
                .map(|i| 1usize << i)
                .filter(|&t| t * tc <= max_threads)
                .collect(),
        }
    }

    fn t1(&self, bk: usize, tf: usize, rc: usize) -> Pass1Tiles {
        Pass1Tiles {
            e: self.p.e,
            ev: self.p.ev,
            g: self.degree,
            r: self.r,
            rc,
            bk,
            tf,
            tc: self.tc,
            prefetch: false,
        }
    }

    fn t2(&self, b: usize, tr: usize, rc: usize) -> Pass2Tiles {
        Pass2Tiles {
            e: self.p.e,
            ev: self.p.ev,
            g: self.degree,
            r: self.r,
            b,
            rc,
            tr,
            tc: self.tc,
        }
    }

    /// Pass 1 re-reads K and V once per chunk of rc feature rows: for each key tile and thread
    /// grid, the fewest chunks the registers and fast memory allow, rows balanced over them. The
    /// fewest chunks win (a larger key tile within 10% of the best wins: fewer barriers), then
    /// enough threads, then the fewest padded rows.
    fn pass1(&self) -> Option<Pass1Tiles> {
        let (r, m) = (self.r, self.budget.fast_memory_words);
        let mut candidates = Vec::new();
        for bk in [32usize, 16, 8, 4, 2, 1] {
            for &tf in &self.thread_rows {
                let rows = largest_fitting(self.max_rows_per_thread, |a| {
                    self.t1(bk, tf, tf * a).fast_memory_words() <= m
                });
                if rows > 0 {
                    let chunks = r.div_ceil(tf * rows);
                    candidates.push(self.t1(bk, tf, tf * r.div_ceil(chunks).div_ceil(tf)));
                }
            }
        }
        let best = candidates.iter().map(Pass1Tiles::chunks).min()?;
        candidates
            .iter()
            .filter(|t| t.chunks() * 10 <= best * 11)
            .min_by_key(|t| {
                (
                    Reverse(t.bk),
                    t.chunks(),
                    enough_threads(t.threads()),
                    t.chunks() * t.rc,
                    thread_rank(t.threads()),
                )
            })
            .copied()
    }

    /// Pass 2: schedule A keeps all of S' resident (where pass 1 has one chunk, `one_chunk`);
    /// otherwise the largest query block b (pass-2 I/O ~ L*r*(Ev+3)/b) whose S' chunk still has
    /// at least min(r, 16) feature rows. Blocks are whole micro-tiles, b = tr * (rows per
    /// thread) at most 64, of enough threads where one fits. Where no streamed S' fits the loop
    /// budget in one dispatch, the same choice with one chunk per dispatch (the feature ranges of
    /// [`Pass2Tiles::feature_ranges`]).
    fn pass2(&self, one_chunk: bool) -> Option<Pass2Tiles> {
        self.pass2_within(one_chunk, false)
            .or_else(|| self.pass2_within(false, true))
    }

    /// [`ThreadGrid::pass2`] in one dispatch, or (`split`) in feature ranges.
    fn pass2_within(&self, one_chunk: bool, split: bool) -> Option<Pass2Tiles> {
        let (r, m, tc) = (self.r, self.budget.fast_memory_words, self.tc);
        let max_loops = self.budget.max_loop_iterations;
        let iters_ok = |t: Pass2Tiles| {
            t.builds_fit()
                && if split {
                    t.rc < r && t.range_loop_iterations(1, 1) <= max_loops
                } else {
                    t.loop_iterations(1) <= max_loops
                }
        };
        let blocks: Vec<(usize, usize)> = self
            .thread_rows
            .iter()
            .flat_map(|&tr| (1..=self.max_rows_per_thread).map(move |a| (tr * a, tr)))
            .filter(|&(b, _)| b <= 64)
            .collect();
        let fits = |t: Pass2Tiles| t.fast_memory_words() <= m && iters_ok(t);
        let largest_block = |rc: usize| {
            blocks
                .iter()
                .filter(|&&(b, tr)| fits(self.t2(b, tr, rc)))
                .min_by_key(|&&(b, tr)| (enough_threads(tr * tc), Reverse(b), thread_rank(tr * tc)))
                .copied()
        };
        let resident = if one_chunk { largest_block(r) } else { None };
        if let Some((b, tr)) = resident {
            return Some(self.t2(b, tr, r));
        }
        let (b, tr) = largest_block(r.min(16)).unwrap_or((1, 1));
        let rc = if split {
            // Within one chunk per dispatch, and at least two chunks.
            largest_fitting(r - 1, |rc| {
                let t = self.t2(b, tr, rc);
                t.fast_memory_words() <= m && t.range_loop_iterations(1, 1) <= max_loops
            })
        } else {
            largest_fitting(r, |rc| self.t2(b, tr, rc).fast_memory_words() <= m)
        };
        (rc > 0 && iters_ok(self.t2(b, tr, rc))).then(|| self.t2(b, tr, rc))
    }
}

/// The poly plan for given f32 pass tiles (the planner's, or the autotune's): schedule, dispatch
/// cuts, key splits and pass-2 workgroups.
pub fn plan_poly_with(
    p: &Problem,
    degree: usize,
    budget: &Budget,
    pass1: Pass1Tiles,
    pass2: Pass2Tiles,
) -> Result<PolyPlan, Error> {
    let r = pass1.r;
    let too_large = |what: &str| poly_too_large(p, degree, r as u64, budget, what);
    let schedule = if pass1.chunks() == 1 && pass2.resident() {
        Schedule::A
    } else {
        Schedule::B
    };

    let mut chunking = chunking(p, pass2.b, budget)?;
    // S' (r x (Ev+1) per unit) and its partial sums must fit a binding too.
    let max_words = (budget.max_binding_bytes / 4) as usize;
    let s_prime_words = r * (p.ev + 1);
    if s_prime_words > max_words {
        return Err(too_large(
            "S' (r x (Ev+1) words) exceeds one storage binding",
        ));
    }
    chunking.units = chunking.units.min(max_words / s_prime_words).max(1);
    let units = chunking.units;
    // A large S' leaves room for few partial states (key splits) in one binding; where those
    // cannot take a key chunk's keys within the loop budget, shorter key chunks (one pass-1
    // dispatch each, summed by the reduction) can.
    let keys_fit = largest_fitting(chunking.kv_rows, |k| {
        pass1.loop_iterations(k) <= budget.max_loop_iterations
    });
    let splits_fit = max_words / (units * s_prime_words);
    chunking.kv_rows = chunking
        .kv_rows
        .min(keys_fit.saturating_mul(splits_fit).max(1));
    let (splits, keys_per_split) = key_splits(
        p,
        &chunking,
        (r, pass1.chunks(), pass1.bk),
        |k| pass1.loop_iterations(k),
        budget,
    )
    .map_err(|e| too_large(&e))?;
    let pass2_ranges = pass2
        .feature_ranges(budget.max_loop_iterations)
        .ok_or_else(|| too_large("no pass-2 tile fits the driver's loop budget"))?;
    let pass2_ranges = pass2
        .chunks()
        .div_ceil(pass2.chunks_per_range(pass2_ranges));
    let blocks = chunking.q_rows.div_ceil(pass2.b);
    let pass2_workgroups = if pass2.resident() {
        // Persistent workgroups loop over query blocks: as many as the loop budget needs.
        let per_workgroup = largest_fitting(blocks, |n| {
            pass2.loop_iterations(n) <= budget.max_loop_iterations
        });
        // Each one reloads S' (with its index words and weights): keep that below an eighth of
        // the query traffic so schedule A stays near 4 n d words.
        let reload_words = r * (p.ev + 1 + index_words(degree) + 1);
        let by_traffic = (chunking.q_rows * p.e / (8 * reload_words)).max(1);
        blocks
            .min(TARGET_WORKGROUPS.div_ceil(units * p.group))
            .min(by_traffic)
            .max(blocks.div_ceil(per_workgroup.max(1)))
            .max(1)
    } else {
        blocks
    };
    Ok(PolyPlan {
        degree,
        r,
        schedule,
        pass1,
        splits,
        keys_per_split,
        pass2,
        pass2_workgroups,
        pass2_ranges,
        chunking,
        coop: None,
    })
}

/// Key splits of pass 1 and the keys of each: enough workgroups to fill the GPU, but the partial
/// S' traffic (2 * splits * r * (Ev+1)) must stay below an eighth of the key traffic it
/// parallelizes; `loop_iterations(keys)` is one invocation's count (llvmpipe's budget).
fn key_splits(
    p: &Problem,
    chunking: &Chunking,
    (r, chunks, bk): (usize, usize, usize),
    loop_iterations: impl Fn(usize) -> u64,
    budget: &Budget,
) -> Result<(usize, usize), String> {
    let max_words = (budget.max_binding_bytes / 4) as usize;
    let s_prime_words = r * (p.ev + 1);
    let units = chunking.units;
    let key_words = chunking.kv_rows * (p.e + p.ev + 1) * chunks;
    let by_traffic = (key_words / (16 * r * (p.ev + 1))).max(1);
    let by_parallelism = TARGET_WORKGROUPS.div_ceil(units * chunks);
    let max_splits = chunking.kv_rows.div_ceil(bk).max(1);
    let by_binding = (max_words / (units * s_prime_words)).max(1);
    // Drivers with a loop budget (llvmpipe) need enough splits for each one's keys to fit it.
    let keys_fit = largest_fitting(chunking.kv_rows, |k| {
        loop_iterations(k) <= budget.max_loop_iterations
    });
    let by_loops = chunking.kv_rows.div_ceil(keys_fit.max(1));
    let splits = by_parallelism
        .min(by_traffic)
        .min(by_binding)
        .max(by_loops)
        .clamp(1, max_splits);
    let keys_per_split = chunking.kv_rows.div_ceil(splits);
    let splits = chunking.kv_rows.div_ceil(keys_per_split).max(1);
    if loop_iterations(keys_per_split) > budget.max_loop_iterations
        || units * splits * s_prime_words > max_words
    {
        return Err(
            "pass 1 needs more key splits than the driver's loop budget and the bindings allow"
                .into(),
        );
    }
    Ok((splits, keys_per_split))
}

/// [`plan_poly`] on cooperative matrices (subgroups of `sg` lanes): the same chunking, with the
/// key splits and query blocks of the coop tiles. Errors where the coop tiles do not fit.
pub fn plan_poly_coop(
    p: &Problem,
    degree: usize,
    budget: &Budget,
    sg: usize,
) -> Result<PolyPlan, Error> {
    let t = plan_coop(p, degree, budget, sg).ok_or_else(|| {
        Error::TooLarge(format!(
            "no cooperative-matrix tile fits E={}, Ev={}, degree {degree} in {} words of fast \
             memory with subgroups of {sg}",
            p.e, p.ev, budget.fast_memory_words
        ))
    })?;
    plan_poly_coop_with(p, degree, budget, t)
}

/// Whether coop tiles are well formed for their subgroup size and fit the budget.
pub fn coop_tiles_fit(t: &CoopTiles, budget: &Budget) -> bool {
    let max_threads = MAX_POLY_THREADS.min(budget.max_invocations_per_workgroup as usize);
    let m = budget.fast_memory_words;
    let lanes = t.rt1 * COOP <= t.sg && t.rt2 * COOP <= t.sg;
    let registers = (t.rt1.max(t.rt2)) * t.col_tiles() <= MAX_COOP_ACCUMULATORS;
    let sizes = t.bk % COOP == 0 && t.rc2 % COOP == 0 && t.bk > 0 && t.rc2 > 0;
    let shape = t.subgroups > 0 && t.subgroups2 > 0 && t.rt1 > 0 && t.rt2 > 0;
    shape
        && lanes
        && registers
        && sizes
        && t.threads().max(t.threads2()) <= max_threads
        && t.pass1_words() <= m
        && t.pass2_words() <= m
}

/// Whether f32 pass tiles (e.g. read back from the autotune's cache) fit this device: fast
/// memory, threads, registers, whole micro-tiles and the driver's loop budget.
pub fn poly_tiles_fit(t1: &Pass1Tiles, t2: &Pass2Tiles, budget: &Budget) -> bool {
    let max_threads = MAX_POLY_THREADS.min(budget.max_invocations_per_workgroup as usize);
    let m = budget.fast_memory_words;
    let registers = |rows: usize, groups: usize| rows * 4 * groups <= MAX_OUT_ACCUMULATORS;
    t1.tf > 0
        && t1.rc % t1.tf == 0
        && t1.rc > 0
        && t1.bk > 0
        && t1.threads() <= max_threads
        && registers(t1.rows_per_thread(), t1.groups_per_thread())
        && t1.fast_memory_words() <= m
        && t2.tr > 0
        && t2.b % t2.tr == 0
        && t2.b > 0
        && t2.rc > 0
        && t2.threads() <= max_threads
        && registers(t2.rows_per_thread(), t2.groups_per_thread())
        && t2.fast_memory_words() <= m
        && t2.builds_fit()
        && t2.feature_ranges(budget.max_loop_iterations).is_some()
}

/// Autotune candidates around the planner's f32 pass tiles: pass-1 variants (key tile, thread
/// rows, feature rows per thread, register prefetch or not; pass 2 as planned) and pass-2
/// variants (query block, thread rows, S' chunk; pass 1 as planned), each list starting with the
/// planner's choice. Pass 2 keeps the planned schedule (S' resident or streamed).
pub fn poly_candidates(plan: &PolyPlan, budget: &Budget) -> (Vec<Pass1Tiles>, Vec<Pass2Tiles>) {
    let (t1, t2) = (plan.pass1, plan.pass2);
    let r = t1.r;
    let mut pass1 = vec![t1];
    // 4-key tiles only with the prefetch: on the H100 (E = 64, n = 262,144) 4 keys and 16 thread
    // rows with it took pass 1 20.8 ms against 21.5 for the tuned 8 keys.
    for bk in [4usize, 8, 16, 32] {
        for tf in [8usize, 16, 32, 64] {
            for rows in [1usize, 2, 4, 8] {
                let prefetch_options: &[bool] = if bk == 4 { &[true] } else { &[false, true] };
                for &prefetch in prefetch_options {
                    // Rows balanced over the chunks, as the planner does.
                    let chunks = r.div_ceil(tf * rows);
                    let c = Pass1Tiles {
                        bk,
                        tf,
                        rc: tf * r.div_ceil(chunks).div_ceil(tf),
                        prefetch,
                        ..t1
                    };
                    if poly_tiles_fit(&c, &t2, budget) && !pass1.contains(&c) {
                        pass1.push(c);
                    }
                }
            }
        }
    }
    let mut pass2 = vec![t2];
    let chunk_rows: Vec<usize> = if t2.resident() {
        vec![r]
    } else {
        [16usize, 32, 64, 128].iter().map(|&c| c.min(r)).collect()
    };
    for tr in [8usize, 16, 32] {
        for rows in [1usize, 2, 4, 8] {
            for &rc in &chunk_rows {
                let c = Pass2Tiles {
                    b: tr * rows,
                    tr,
                    rc,
                    ..t2
                };
                // Split plans stay split, one dispatch stays one.
                let split = c.feature_ranges(budget.max_loop_iterations) != Some(1);
                if c.b <= 128
                    && poly_tiles_fit(&t1, &c, budget)
                    && split == (plan.pass2_ranges > 1)
                    && !pass2.contains(&c)
                {
                    pass2.push(c);
                }
            }
        }
    }
    (pass1, pass2)
}

/// Autotune candidates around the planner's coop tiles: pass-1 variants (pass 2 as planned) and
/// pass-2 variants (pass 1 as planned), each list starting with the planner's choice. The passes
/// are independent kernels, so each is tuned on its own time.
pub fn coop_candidates(t: &CoopTiles, budget: &Budget) -> (Vec<CoopTiles>, Vec<CoopTiles>) {
    let mut pass1 = vec![*t];
    for subgroups in [2usize, 4, 8] {
        for rt1 in [1usize, 2, 4] {
            for bk in [16usize, 32, 64] {
                let c = CoopTiles {
                    subgroups,
                    rt1,
                    bk,
                    ..*t
                };
                if coop_tiles_fit(&c, budget) && !pass1.contains(&c) {
                    pass1.push(c);
                }
            }
        }
    }
    let mut pass2 = vec![*t];
    for subgroups2 in [2usize, 4, 8] {
        for rt2 in [1usize, 2, 4] {
            for rc2 in [32usize, 48, 64, 96] {
                let c = CoopTiles {
                    subgroups2,
                    rt2,
                    rc2: rc2.min(COOP * t.r.div_ceil(COOP)),
                    ..*t
                };
                if coop_tiles_fit(&c, budget) && !pass2.contains(&c) {
                    pass2.push(c);
                }
            }
        }
    }
    (pass1, pass2)
}

/// [`plan_poly_coop`] with these coop tiles.
pub fn plan_poly_coop_with(
    p: &Problem,
    degree: usize,
    budget: &Budget,
    t: CoopTiles,
) -> Result<PolyPlan, Error> {
    let mut plan = plan_poly(p, degree, budget)?;
    let (splits, keys_per_split) = key_splits(
        p,
        &plan.chunking,
        (plan.r, t.chunks1(), t.bk),
        |_| 0,
        budget,
    )
    .map_err(Error::TooLarge)?;
    plan.splits = splits;
    plan.keys_per_split = keys_per_split;
    plan.pass2_workgroups = plan
        .chunking
        .q_rows
        .div_ceil(t.b2())
        .min(budget.max_workgroups_per_dimension as usize);
    plan.schedule = Schedule::B;
    plan.pass2_ranges = 1;
    plan.coop = Some(t);
    Ok(plan)
}

#[cfg(test)]
mod poly_plan_tests {
    use super::*;

    fn budget(words: u64) -> Budget {
        Budget::with_binding(words, 128 << 20)
    }

    #[test]
    fn small_rank_is_schedule_a_large_rank_is_b() {
        let p = Problem {
            units: 2,
            group: 1,
            l: 4096,
            s: 4096,
            e: 16,
            ev: 16,
            causal: false,
            scale: 0.25,
        };
        let a = plan_poly(&p, 2, &budget(8192)).unwrap();
        assert_eq!(a.schedule, Schedule::A, "{a:?}");
        let p64 = Problem { e: 64, ev: 64, ..p };
        let b = plan_poly(&p64, 2, &budget(8192)).unwrap();
        assert_eq!(b.schedule, Schedule::B, "{b:?}");
        assert!(b.pass1.chunks() > 1 && !b.pass2.resident());
    }

    #[test]
    fn tiles_fit_fast_memory() {
        for words in [4096u64, 8192, 12288] {
            for (e, g) in [
                (16usize, 1usize),
                (16, 4),
                (32, 2),
                (64, 2),
                (128, 2),
                (256, 1),
                (8, 6),
            ] {
                let p = Problem {
                    units: 1,
                    group: 1,
                    l: 1000,
                    s: 1000,
                    e,
                    ev: e,
                    causal: false,
                    scale: 1.0,
                };
                let plan = plan_poly(&p, g, &budget(words)).unwrap();
                assert!(plan.pass1.fast_memory_words() <= words, "{plan:?}");
                assert!(plan.pass2.fast_memory_words() <= words, "{plan:?}");
                assert_eq!(plan.r as u64, num_features(e, g));
                assert!(plan.splits * plan.keys_per_split >= 1000);
            }
        }
    }

    #[test]
    fn smaller_fast_memory_forces_schedule_b() {
        let p = Problem {
            units: 1,
            group: 1,
            l: 512,
            s: 512,
            e: 16,
            ev: 16,
            causal: false,
            scale: 0.25,
        };
        assert_eq!(
            plan_poly(&p, 2, &budget(8192)).unwrap().schedule,
            Schedule::A
        );
        assert_eq!(
            plan_poly(&p, 2, &budget(1024)).unwrap().schedule,
            Schedule::B
        );
    }

    #[test]
    fn thread_grids_tile_both_passes_within_the_limits() {
        let mut planned = 0;
        for max_threads in [64u32, 256] {
            for words in [1024u64, 4096, 8192, 12288] {
                for (e, ev, g) in [
                    (8usize, 5usize, 2usize),
                    (3, 7, 4),
                    (16, 16, 2),
                    (64, 64, 2),
                    (128, 32, 2),
                    (64, 100, 1),
                    (256, 256, 1),
                    (16, 1000, 1),
                ] {
                    let mut b = budget(words);
                    b.max_invocations_per_workgroup = max_threads;
                    let p = Problem {
                        units: 1,
                        group: 1,
                        l: 1000,
                        s: 1000,
                        e,
                        ev,
                        causal: false,
                        scale: 1.0,
                    };
                    let Ok(plan) = plan_poly(&p, g, &b) else {
                        continue;
                    };
                    planned += 1;
                    let (t1, t2) = (plan.pass1, plan.pass2);
                    assert!(t1.threads() <= max_threads as usize, "{t1:?}");
                    assert!(t2.threads() <= max_threads as usize, "{t2:?}");
                    assert_eq!(t1.rc % t1.tf, 0, "{t1:?}");
                    assert_eq!(t2.b % t2.tr, 0, "{t2:?}");
                    assert!(t1.padded_ev() >= ev && t2.padded_ev() >= ev);
                    // Value columns wasted on padding: less than one column group per thread.
                    assert!(t1.padded_ev() < ev.next_multiple_of(4) + 4 * t1.groups_per_thread());
                    let acc1 = t1.rows_per_thread() * 4 * t1.groups_per_thread();
                    let acc2 = t2.rows_per_thread() * 4 * t2.groups_per_thread();
                    assert!(acc1 <= MAX_OUT_ACCUMULATORS && acc2 <= MAX_OUT_ACCUMULATORS);
                    assert!(t1.fast_memory_words() <= words && t2.fast_memory_words() <= words);
                }
            }
        }
        assert!(planned >= 40, "{planned}");
    }

    #[test]
    fn f32_feature_builds_cover_their_tiles() {
        // The planner's tiles and every autotune candidate: each feature of a pass-1 chunk has a
        // builder and the key groups' normaliser partials fit the feature tile; each pass-2 row
        // group has whole builder groups whose partials fit too; vec4 reads stay aligned.
        let mut checked = 0;
        for words in [4096u64, 8192, 12288] {
            for (e, ev, g) in [
                (8usize, 5usize, 2usize),
                (16, 16, 2),
                (32, 16, 2),
                (64, 64, 2),
                (128, 128, 2),
                (16, 1000, 1),
                (3, 7, 4),
            ] {
                let p = Problem {
                    units: 8,
                    group: 1,
                    l: 8192,
                    s: 8192,
                    e,
                    ev,
                    causal: false,
                    scale: 1.0,
                };
                let Ok(plan) = plan_poly(&p, g, &budget(words)) else {
                    continue;
                };
                let (c1, c2) = poly_candidates(&plan, &budget(words));
                for t in c1 {
                    checked += 1;
                    assert!(t.features_per_builder() * t.threads() >= t.rc, "{t:?}");
                    assert!((1..=t.bk).contains(&t.key_groups()), "{t:?}");
                    assert!(
                        t.key_groups() * t.rc.min(t.threads()) <= t.threads(),
                        "{t:?}"
                    );
                    assert!(!t.vec4_rows() || t.rc % 4 == 0, "{t:?}");
                }
                for t in c2 {
                    checked += 1;
                    let (rpt, tpr) = (t.build_rows(), t.builders_per_row());
                    assert!(t.builds_fit(), "{t:?}");
                    assert_eq!((t.b / rpt) * tpr, t.threads(), "{t:?}");
                    assert!(tpr * t.b <= t.rc * t.feature_stride(), "{t:?}");
                    assert!(
                        t.feature_stride() >= t.b && t.feature_stride() % 4 == 0,
                        "{t:?}"
                    );
                    assert!(t.q_stride() > t.e && t.q_stride() <= t.e + 32, "{t:?}");
                }
            }
        }
        assert!(checked > 200, "{checked}");
    }

    #[test]
    fn long_sequences_stay_within_the_loop_budget() {
        // Many query heads (persistent pass-2 workgroups loop over many blocks) and long keys
        // over few splits: both exceed llvmpipe's budget unless the planner adds workgroups.
        for (e, units, group, l, s) in [
            (16usize, 8usize, 64usize, 1 << 18, 1 << 10),
            (64, 8, 1, 1024, 1 << 21),
        ] {
            let p = Problem {
                units,
                group,
                l,
                s,
                e,
                ev: e,
                causal: false,
                scale: 0.1,
            };
            let iterations = |limit| {
                let mut b = budget(8192);
                b.max_binding_bytes = 1 << 40;
                b.max_loop_iterations = limit;
                let plan = plan_poly(&p, 2, &b).unwrap();
                let blocks = plan.chunking.q_rows.div_ceil(plan.pass2.b);
                let per_workgroup = blocks.div_ceil(plan.pass2_workgroups);
                (
                    plan.pass1.loop_iterations(plan.keys_per_split),
                    plan.pass2.loop_iterations(per_workgroup),
                )
            };
            let (it1, it2) = iterations(60_000);
            assert!(it1 <= 60_000 && it2 <= 60_000, "{it1} {it2}");
            let (it1, it2) = iterations(u64::MAX);
            assert!(it1.max(it2) > 60_000, "{it1} {it2}");
        }
    }
}

#[cfg(test)]
mod feature_range_tests {
    use super::*;

    /// lavapipe's planner budget: 32 KiB of workgroup memory (or the `fast` words given), its
    /// loop budget with the planner's margin.
    fn lavapipe(fast_memory_words: u64) -> Budget {
        let mut b = Budget::with_binding(fast_memory_words, 128 << 20);
        b.max_loop_iterations = 60_000;
        b
    }

    fn problem(e: usize, causal: bool) -> Problem {
        Problem {
            units: 2,
            group: 2,
            l: 300,
            s: 200,
            e,
            ev: e,
            causal,
            scale: 0.1,
        }
    }

    #[test]
    fn ranks_beyond_the_loop_budget_split_pass2_over_feature_ranges() {
        // (E, Ev, degree, rank, fast memory words, split): degree 3 at E = 64 and degree 4 at
        // E = 32 in lavapipe's 32 KiB; the primitive's degree 2 at E = 256, Ev = 8 in WebGPU's
        // minimum 16 KiB, whose query block the split search picks at one chunk per dispatch and
        // whose tile then streams all of S' in one dispatch after all.
        for (e, ev, g, r, words, split) in [
            (64usize, 64usize, 3usize, 47_905u64, 8192u64, true),
            (32, 32, 4, 58_905, 8192, true),
            (256, 8, 2, 33_153, 4096, false),
        ] {
            assert_eq!(num_features(e, g), r);
            let p = Problem {
                ev,
                ..problem(e, false)
            };
            let budget = lavapipe(words);
            let grid = ThreadGrid::new(&p, g, r as usize, &budget);
            // What refused them: no pass-2 tile of the one-dispatch search streams all of S'
            // within the loop budget (pass 1 fits).
            assert!(grid.pass1().is_some());
            assert!(grid.pass2_within(false, false).is_none(), "E={e} g={g}");
            let plan = plan_poly(&p, g, &budget).unwrap();
            let t = plan.pass2;
            assert_eq!(plan.pass2_ranges > 1, split, "{plan:?}");
            let per_range = t.chunks_per_range(plan.pass2_ranges);
            assert_eq!(t.chunks().div_ceil(per_range), plan.pass2_ranges);
            assert!(t.range_loop_iterations(1, per_range) <= budget.max_loop_iterations);
            if split {
                // The fewest ranges: one range fewer exceeds the budget.
                let fewer = t.chunks_per_range(plan.pass2_ranges - 1);
                assert!(t.range_loop_iterations(1, fewer) > budget.max_loop_iterations);
            }
            assert!(t.fast_memory_words() <= words && plan.pass1.fast_memory_words() <= words);
            // Without a loop budget the same rank runs in one dispatch.
            let gpu = Budget::with_binding(words, 128 << 20);
            assert_eq!(plan_poly(&p, g, &gpu).unwrap().pass2_ranges, 1);
        }
    }

    #[test]
    fn one_dispatch_where_it_fits() {
        for (e, g) in [(16usize, 2usize), (64, 2), (128, 2), (8, 6), (32, 3)] {
            for words in [4096u64, 8192] {
                let plan = plan_poly(&problem(e, false), g, &lavapipe(words)).unwrap();
                if plan.pass2.loop_iterations(1) <= 60_000 {
                    assert_eq!(plan.pass2_ranges, 1, "{plan:?}");
                }
            }
        }
        // The autotune's pass-2 candidates of a one-dispatch plan all run in one dispatch.
        let budget = lavapipe(8192);
        let plan = plan_poly(&problem(64, false), 2, &budget).unwrap();
        assert_eq!(plan.pass2_ranges, 1);
        for c in poly_candidates(&plan, &budget).1 {
            assert_eq!(
                c.feature_ranges(budget.max_loop_iterations),
                Some(1),
                "{c:?}"
            );
        }
    }

    #[test]
    fn word_slices_cover_every_word_within_the_grid() {
        use crate::poly::kernel_common::word_slices;
        for (words, max) in [(33_153 * 257, 65_535u32), (1000, 65_535), (128 * 7 + 1, 3)] {
            let slices = word_slices(words, max);
            let mut next = 0;
            for &(first, groups) in &slices {
                assert_eq!(first, next);
                assert!((1..=max as usize).contains(&groups));
                next = first + groups * AUX_THREADS;
            }
            assert!(next >= words && next - words < AUX_THREADS, "{slices:?}");
        }
        assert_eq!(word_slices(33_153 * 257, 65_535).len(), 2);
        assert_eq!(word_slices(47_905 * 65, 65_535).len(), 1);
    }

    #[test]
    fn smaller_loop_budgets_give_more_ranges() {
        let p = problem(16, false);
        let mut last = 0;
        for limit in [u64::MAX, 4000, 1500, 600] {
            let mut b = lavapipe(4096);
            b.max_loop_iterations = limit;
            let plan = plan_poly(&p, 3, &b).unwrap();
            assert!(plan.pass2_ranges >= last, "{limit}: {plan:?}");
            let per_range = plan.pass2.chunks_per_range(plan.pass2_ranges);
            assert!(plan.pass2.range_loop_iterations(1, per_range) <= limit);
            last = plan.pass2_ranges;
        }
        assert!(last > 2, "{last}");
    }
}

#[cfg(test)]
mod coop_tests {
    use super::*;

    fn problem(e: usize, ev: usize) -> Problem {
        Problem {
            units: 8,
            group: 1,
            l: 262_144,
            s: 262_144,
            e,
            ev,
            causal: false,
            scale: 0.125,
        }
    }

    #[test]
    fn coop_tiles_fit_fast_memory_registers_and_lanes() {
        for words in [8192u64, 12288, 16384] {
            for sg in [16usize, 32, 64] {
                for (e, ev) in [(16, 16), (64, 64), (128, 128), (7, 33)] {
                    for g in 1..=3 {
                        let Some(t) = plan_coop(&problem(e, ev), g, &Budget::model(words), sg)
                        else {
                            continue;
                        };
                        assert!(
                            t.pass1_words() <= words && t.pass2_words() <= words,
                            "{t:?}"
                        );
                        // Each lane builds whole feature rows (pass 1) and query rows (pass 2).
                        assert!(
                            t.rc1() <= t.threads() && t.threads() % t.rc1() == 0,
                            "{t:?}"
                        );
                        assert!(
                            t.b2() <= t.threads2() && t.threads2() % t.b2() == 0,
                            "{t:?}"
                        );
                        assert!(t.rt1 * t.col_tiles() <= MAX_COOP_ACCUMULATORS);
                        assert!(t.rt2 * t.col_tiles() <= MAX_COOP_ACCUMULATORS);
                        assert!(t.bk % COOP == 0 && t.rc2 % COOP == 0 && t.rc2 > 0);
                        assert!(t.threads().max(t.threads2()) <= MAX_POLY_THREADS);
                    }
                }
            }
        }
    }

    #[test]
    fn pass2_query_stride_spreads_one_subgroup_read_over_32_banks() {
        let budget = Budget::model(12288);
        let rpt = COOP_PASS2_ROWS_PER_THREAD;
        for (e, ev) in [(16, 16), (64, 64), (128, 128), (7, 33), (32, 24)] {
            let t = plan_coop(&problem(e, ev), 2, &budget, 32).unwrap();
            for c in coop_candidates(&t, &budget).1 {
                let qs = c.q_stride2();
                assert!(qs > c.e && qs < c.e + 1 + 32, "{c:?}");
                // One 32-wide read: HB rows times 32 / HB consecutive feature indices.
                let hb = c.b2() / rpt;
                assert!((1..=32).contains(&hb) && 32 % hb == 0, "{c:?}");
                let mut banks: Vec<usize> = (0..hb)
                    .flat_map(|r| (0..32 / hb).map(move |k| (r * qs + k) % 32))
                    .collect();
                banks.sort_unstable();
                banks.dedup();
                assert_eq!(banks.len(), 32, "{c:?}");
            }
        }
    }

    #[test]
    fn coop_autotune_candidates_fit_and_start_with_the_planners_choice() {
        let budget = Budget::model(12288);
        for (e, ev) in [(64, 64), (128, 128), (7, 33)] {
            let t = plan_coop(&problem(e, ev), 2, &budget, 32).unwrap();
            assert!(coop_tiles_fit(&t, &budget));
            let (c1, c2) = coop_candidates(&t, &budget);
            assert_eq!((c1[0], c2[0]), (t, t));
            assert!(c1.len() > 1 && c2.len() > 1, "{} {}", c1.len(), c2.len());
            for c in c1.iter().chain(&c2) {
                assert!(coop_tiles_fit(c, &budget), "{c:?}");
            }
            // Pass-1 candidates keep pass 2 as planned and the other way round.
            assert!(c1
                .iter()
                .all(|c| (c.subgroups2, c.rt2, c.rc2) == (t.subgroups2, t.rt2, t.rc2)));
            assert!(c2
                .iter()
                .all(|c| (c.subgroups, c.rt1, c.bk) == (t.subgroups, t.rt1, t.bk)));
        }
    }

    #[test]
    fn coop_needs_subgroups_of_at_least_16_and_h100_plan_is_one_chunk_of_256_rows() {
        let p = problem(64, 64);
        assert!(plan_coop(&p, 2, &Budget::model(12288), 8).is_none());
        let t = plan_coop(&p, 2, &Budget::model(12288), 32).unwrap();
        // 48 KiB, warps of 32: 8 subgroups of two 16-row tiles, 9 chunks of r = 2145.
        assert_eq!((t.rc1(), t.chunks1(), t.bk), (256, 9, 32));
        let plan = plan_poly_coop(&p, 2, &Budget::model(12288), 32).unwrap();
        assert_eq!(plan.coop, Some(t));
        assert_eq!(plan.pass2_workgroups, p.l.div_ceil(t.b2()));
    }
}
