//! Tiles of the exact kernel for this adapter, and its candidates for the autotune. Pure: nothing
//! here touches the GPU.

use crate::api::Problem;
use crate::budget::{
    cdiv, largest_fitting, Budget, MAX_OUT_ACCUMULATORS, MAX_SCORE_ACCUMULATORS, MAX_THREAD_SIDE,
};
use crate::chunking::{chunking, Chunking};
use crate::error::Error;

/// Tiles of the exact (FlashAttention-2 style) kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExactTiles {
    pub e: usize,
    pub ev: usize,
    /// Query rows per workgroup (resident in fast memory).
    pub bq: usize,
    /// Key/value rows per streamed tile.
    pub bk: usize,
    /// Thread grid: `tq x tk` threads; thread (a, b) owns rows a, a+tq, ... and key/value columns
    /// b, b+tk, ...
    pub tq: usize,
    pub tk: usize,
    /// V gets its own double-buffered tile beside K's (more fast memory, one barrier fewer per
    /// key tile: 3 instead of 4); otherwise V reuses K's tile once the scores are formed.
    pub split_v: bool,
}

impl ExactTiles {
    pub fn threads(&self) -> usize {
        self.tq * self.tk
    }
    pub fn rows_per_thread(&self) -> usize {
        self.bq / self.tq
    }
    pub fn keys_per_thread(&self) -> usize {
        self.bk / self.tk
    }
    /// Floats per tile element: 4 (vec4 loads) when both widths are multiples of 4, else 1.
    pub fn lanes(&self) -> usize {
        if self.e % 4 == 0 && self.ev % 4 == 0 {
            4
        } else {
            1
        }
    }
    /// Output columns of one thread (whole tile elements).
    pub fn out_cols_per_thread(&self) -> usize {
        self.lanes() * (self.ev / self.lanes()).div_ceil(self.tk)
    }
    /// Row stride of the Q and K tiles in tile elements: one element longer than a row, so the
    /// rows that the threads of a warp read start in different memory banks.
    pub fn row_stride(&self) -> usize {
        (self.e / self.lanes()).saturating_add(1)
    }
    /// Width of the shared K/V tile row in tile elements; V reuses K's memory after the scores are
    /// formed.
    pub fn kv_width(&self) -> usize {
        self.row_stride().max(self.ev / self.lanes())
    }
    /// Tile elements of one V buffer (with `split_v`): BK rows of Ev, plus one element per thread
    /// column of tail padding (threads read past Ev where it is not a multiple of tk).
    pub fn v_buffer_elements(&self) -> usize {
        // Saturating (here and below): sizes from Python may be huge; such tiles never fit.
        self.bk
            .saturating_mul(self.ev / self.lanes())
            .saturating_add(self.tk)
    }
    /// Tile elements of the K/V array: the shared tile, or K's tile followed by two V buffers.
    pub fn kv_elements(&self) -> usize {
        if self.split_v {
            self.bk
                .saturating_mul(self.row_stride())
                .saturating_add(self.v_buffer_elements().saturating_mul(2))
        } else {
            self.bk
                .saturating_mul(self.kv_width())
                .saturating_add(self.tk)
        }
    }
    /// Floats per element of the P tile: vec4 (four keys per load in the P V product) where the
    /// tiles are vec4 and the key tile is a multiple of 4.
    pub fn p_lanes(&self) -> usize {
        if self.lanes() == 4 && self.bk % 4 == 0 {
            4
        } else {
            1
        }
    }
    /// Row stride of the P tile in its elements, one element longer than a row.
    pub fn p_row_stride(&self) -> usize {
        self.bk / self.p_lanes() + 1
    }
    /// Workgroup memory words the kernel declares: Q and K/V tiles (rows padded against bank
    /// conflicts, K/V tail padding of one element per thread column), the P tile (rows padded by
    /// one element) and one partial row statistic per row and thread column.
    pub fn fast_memory_words(&self) -> u64 {
        let tiles = self
            .bq
            .saturating_mul(self.row_stride())
            .saturating_add(self.kv_elements());
        (self.lanes().saturating_mul(tiles))
            .saturating_add(self.p_lanes() * self.bq * self.p_row_stride())
            .saturating_add(self.bq * self.tk) as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExactPlan {
    pub tiles: ExactTiles,
    pub chunking: Chunking,
}

/// Picks the exact kernel's tiles: the largest query tile (I/O falls as 1/bq) that fits the fast
/// memory and the register limits, then the largest key tile.
pub fn exact_tiles(p: &Problem, budget: &Budget) -> Result<ExactTiles, Error> {
    let bq_cap = p.l.clamp(1, 64).next_power_of_two();
    // Key tiles of at least 8 keep tk = 8 so wide values (Ev up to 256) stay within the register
    // cap; padded keys are masked.
    let bk_cap = p.s.clamp(8, 64).next_power_of_two();
    let mut best: Option<ExactTiles> = None;
    for bq in [64usize, 32, 16, 8, 4, 2, 1]
        .into_iter()
        .filter(|&b| b <= bq_cap)
    {
        for bk in [64usize, 32, 16, 8, 4, 2, 1]
            .into_iter()
            .filter(|&b| b <= bk_cap)
        {
            let tq = bq.min(MAX_THREAD_SIDE);
            let tk = bk.min(MAX_THREAD_SIDE);
            let t = ExactTiles {
                e: p.e,
                ev: p.ev,
                bq,
                bk,
                tq,
                tk,
                split_v: false,
            };
            if !exact_tiles_fit(&t, budget) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => (t.bq, t.bk) > (b.bq, b.bk),
            };
            if better {
                best = Some(t);
            }
        }
    }
    best.ok_or_else(|| {
        Error::TooLarge(format!(
            "exact attention with E={} and Ev={} needs at least {} words of workgroup memory; \
             this device offers {}",
            p.e,
            p.ev,
            ExactTiles {
                e: p.e,
                ev: p.ev,
                bq: 1,
                bk: 1,
                tq: 1,
                tk: 1,
                split_v: false,
            }
            .fast_memory_words(),
            budget.fast_memory_words
        ))
    })
}

/// Loop iterations one invocation of the exact kernel runs for `keys` keys (see exact.wgsl).
pub fn exact_loop_iterations(t: &ExactTiles, keys: usize) -> u64 {
    let wg = t.threads();
    let row_reductions = (t.rows_per_thread() * t.tk) as u64;
    let per_tile = 1 + t.e as u64 + row_reductions + t.bk as u64;
    cdiv(t.bq * t.e, wg) + cdiv(keys, t.bk) * per_tile + row_reductions
}

/// Whether these tiles fit the fast memory, the workgroup size and the register caps.
pub fn exact_tiles_fit(t: &ExactTiles, budget: &Budget) -> bool {
    t.bq % t.tq == 0
        && t.bk % t.tk == 0
        && t.fast_memory_words() <= budget.fast_memory_words
        && t.threads() <= budget.max_invocations_per_workgroup as usize
        && t.rows_per_thread() * t.out_cols_per_thread() <= MAX_OUT_ACCUMULATORS
        && t.rows_per_thread() * t.keys_per_thread() <= MAX_SCORE_ACCUMULATORS
}

/// The candidates an autotune times: the default choice plus other tile and thread-grid shapes
/// (4, 8 or 16 threads per side, at least 64 threads), each with V in K's tile or in its own
/// double-buffered one, that fit.
pub fn exact_candidates(p: &Problem, budget: &Budget) -> Vec<ExactTiles> {
    let mut out = Vec::new();
    if let Ok(t) = exact_tiles(p, budget) {
        out.push(t);
    }
    for bq in [64usize, 32, 16] {
        for bk in [64usize, 32, 16] {
            for side_q in [4usize, 8, 16] {
                for side_k in [4usize, 8, 16] {
                    let (tq, tk) = (bq.min(side_q), bk.min(side_k));
                    if tq * tk < 64 {
                        continue;
                    }
                    for split_v in [false, true] {
                        let t = ExactTiles {
                            e: p.e,
                            ev: p.ev,
                            bq,
                            bk,
                            tq,
                            tk,
                            split_v,
                        };
                        if exact_tiles_fit(&t, budget) && !out.contains(&t) {
                            out.push(t);
                        }
                    }
                }
            }
        }
    }
    out
}

pub fn plan_exact(p: &Problem, budget: &Budget) -> Result<ExactPlan, Error> {
    plan_exact_with(p, budget, exact_tiles(p, budget)?)
}

/// The exact plan for given tiles (e.g. from an autotune): dispatch cuts for bindings, grid and
/// the driver's loop budget.
pub fn plan_exact_with(
    p: &Problem,
    budget: &Budget,
    tiles: ExactTiles,
) -> Result<ExactPlan, Error> {
    let mut chunking = chunking(p, tiles.bq, budget)?;
    // Drivers with a loop budget get fewer keys per dispatch (merged like any split-KV chunk).
    let fits = |keys| exact_loop_iterations(&tiles, keys) <= budget.max_loop_iterations;
    if !fits(chunking.kv_rows) {
        let keys = largest_fitting(chunking.kv_rows, fits);
        if keys < tiles.bk {
            return Err(Error::TooLarge(format!(
                "exact attention with E={} and Ev={} needs more loop iterations per shader \
                 invocation than this driver runs ({})",
                p.e, p.ev, budget.max_loop_iterations
            )));
        }
        chunking.kv_rows = keys / tiles.bk * tiles.bk;
        chunking.units = 1;
    }
    Ok(ExactPlan { tiles, chunking })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(words: u64) -> Budget {
        Budget::with_binding(words, 128 << 20)
    }

    fn problem(l: usize, s: usize, e: usize, ev: usize) -> Problem {
        Problem {
            units: 2,
            group: 1,
            l,
            s,
            e,
            ev,
            causal: false,
            scale: 1.0,
        }
    }

    #[test]
    fn tiles_fit_every_budget_and_head_dim() {
        for words in [4096u64, 8192, 12288, 16384] {
            for e in [1usize, 3, 16, 64, 128, 256] {
                for ev in [1usize, 5, 64, 256] {
                    let t = exact_tiles(&problem(5000, 5000, e, ev), &budget(words)).unwrap();
                    assert!(t.fast_memory_words() <= words, "{t:?}");
                    assert_eq!(t.bq % t.tq, 0);
                    assert_eq!(t.bk % t.tk, 0);
                    assert!(t.rows_per_thread() * t.out_cols_per_thread() <= MAX_OUT_ACCUMULATORS);
                }
            }
        }
    }

    #[test]
    fn larger_fast_memory_gives_larger_query_tiles() {
        let p = problem(4096, 4096, 128, 128);
        let small = exact_tiles(&p, &budget(4096)).unwrap();
        let large = exact_tiles(&p, &budget(16384)).unwrap();
        assert!(large.bq > small.bq, "{small:?} {large:?}");
    }

    #[test]
    fn tiny_problems_get_tiny_tiles() {
        let t = exact_tiles(&problem(1, 7, 16, 16), &budget(4096)).unwrap();
        assert_eq!((t.bq, t.bk), (1, 8));
    }

    #[test]
    fn too_small_fast_memory_is_an_error() {
        let err = exact_tiles(&problem(8, 8, 256, 256), &budget(256)).unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)));
    }

    #[test]
    fn chunking_respects_binding_limit() {
        let mut b = budget(4096);
        b.max_binding_bytes = 1 << 20; // 262,144 words
        let p = Problem {
            units: 8,
            group: 2,
            l: 1000,
            s: 3000,
            e: 64,
            ev: 64,
            causal: false,
            scale: 1.0,
        };
        let c = chunking(&p, 32, &b).unwrap();
        let words = b.max_binding_bytes / 4;
        let w = 66u64;
        assert!((c.units * p.group * c.q_rows) as u64 * w <= words);
        assert!((c.units * c.kv_rows) as u64 * w <= words);
        assert_eq!(c.kv_rows, 3000);
        // A single KV head larger than a binding is split along the keys.
        let long = Problem { s: 10_000, ..p };
        let c = chunking(&long, 32, &b).unwrap();
        assert_eq!(c.units, 1);
        assert!(c.kv_rows < 10_000 && c.kv_rows as u64 * w <= words);
    }

    #[test]
    fn whole_problem_in_one_dispatch_when_it_fits() {
        let p = Problem {
            units: 4,
            group: 2,
            l: 100,
            s: 200,
            e: 16,
            ev: 16,
            causal: true,
            scale: 1.0,
        };
        let c = chunking(&p, 16, &budget(4096)).unwrap();
        assert_eq!(
            c,
            Chunking {
                units: 4,
                q_rows: 100,
                kv_rows: 200
            }
        );
    }
}
