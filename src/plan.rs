//! Pure planning: (shapes, budget) -> tiles, thread grid and how the problem is cut into dispatches.
//!
//! Nothing here touches the GPU, so every choice is unit-tested in plain Rust.

use crate::error::Error;

/// One attention problem, already flattened: `units` = batch x KV heads; each unit has `group`
/// query heads (`enable_gqa`), so Q is `(units*group, l, e)`, K `(units, s, e)`, V `(units, s, ev)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Problem {
    pub units: usize,
    pub group: usize,
    pub l: usize,
    pub s: usize,
    pub e: usize,
    pub ev: usize,
    pub causal: bool,
    pub scale: f32,
}

impl Problem {
    pub fn query_heads(&self) -> usize {
        self.units * self.group
    }
}

/// What the device allows; the planner never assumes a vendor's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Words of workgroup memory per workgroup (M).
    pub fast_memory_words: u64,
    /// Largest storage binding, in bytes.
    pub max_binding_bytes: u64,
    pub max_workgroups_per_dimension: u32,
    pub max_invocations_per_workgroup: u32,
}

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
    pub fn out_cols_per_thread(&self) -> usize {
        self.ev.div_ceil(self.tk)
    }
    /// Width of the shared K/V tile row; V reuses K's memory after the scores are formed.
    pub fn kv_width(&self) -> usize {
        self.e.max(self.ev)
    }
    /// Workgroup memory words the kernel declares (Q tile, K/V tile + padding, P tile, 3 row stats).
    pub fn fast_memory_words(&self) -> u64 {
        (self.bq * self.e + self.bk * self.kv_width() + self.tk + self.bq * self.bk + 3 * self.bq)
            as u64
    }
}

/// How the problem is cut into dispatches so that no binding exceeds the device's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    /// KV units per dispatch (all of a unit's `group` query heads go with it).
    pub units: usize,
    /// Query rows per dispatch.
    pub q_rows: usize,
    /// Key rows per dispatch; when < s, partial results are merged with their softmax statistics.
    pub kv_rows: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExactPlan {
    pub tiles: ExactTiles,
    pub chunking: Chunking,
}

/// Upper limit of per-thread accumulators in the generated kernels (registers, not fast memory).
const MAX_OUT_ACCUMULATORS: usize = 64;
const MAX_SCORE_ACCUMULATORS: usize = 32;
const MAX_THREAD_SIDE: usize = 8;

/// Picks the exact kernel's tiles: the largest query tile (I/O falls as 1/bq) that fits the fast
/// memory and the register limits, then the largest key tile.
pub fn exact_tiles(p: &Problem, budget: &Budget) -> Result<ExactTiles, Error> {
    let bq_cap = p.l.max(1).next_power_of_two().min(64);
    let bk_cap = p.s.max(1).next_power_of_two().min(64);
    let mut best: Option<ExactTiles> = None;
    for bq in [64usize, 32, 16, 8, 4, 2, 1].into_iter().filter(|&b| b <= bq_cap) {
        for bk in [64usize, 32, 16, 8, 4, 2, 1].into_iter().filter(|&b| b <= bk_cap) {
            let tq = bq.min(MAX_THREAD_SIDE);
            let tk = bk.min(MAX_THREAD_SIDE);
            let t = ExactTiles { e: p.e, ev: p.ev, bq, bk, tq, tk };
            if t.fast_memory_words() > budget.fast_memory_words
                || t.threads() > budget.max_invocations_per_workgroup as usize
                || t.rows_per_thread() * t.out_cols_per_thread() > MAX_OUT_ACCUMULATORS
                || t.rows_per_thread() * t.keys_per_thread() > MAX_SCORE_ACCUMULATORS
            {
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
            ExactTiles { e: p.e, ev: p.ev, bq: 1, bk: 1, tq: 1, tk: 1 }.fast_memory_words(),
            budget.fast_memory_words
        ))
    })
}

/// Cuts the problem so each binding (Q, K, V, O chunk) stays within `max_binding_bytes` and each
/// grid dimension within the device's limit.
pub fn chunking(p: &Problem, rows_per_workgroup: usize, budget: &Budget) -> Result<Chunking, Error> {
    let word = 4u64;
    let width = p.e.max(p.ev) as u64 + 2; // +2: the softmax statistics of split-KV chunks
    let max_words = budget.max_binding_bytes / word;
    let max_grid = budget.max_workgroups_per_dimension as u64;
    let max_rows = max_words / width;
    if max_rows == 0 {
        return Err(Error::TooLarge(format!(
            "one row of {} floats does not fit a storage binding of {} bytes",
            width, budget.max_binding_bytes
        )));
    }
    let kv_rows = (p.s as u64).min(max_rows) as usize;
    let grid_rows = max_grid * rows_per_workgroup as u64;
    let q_rows = (p.l.max(1) as u64).min(max_rows / p.group as u64).min(grid_rows).max(1) as usize;
    if (p.group as u64) > max_rows {
        return Err(Error::TooLarge(format!(
            "{} query heads per KV head do not fit one storage binding of {} bytes",
            p.group, budget.max_binding_bytes
        )));
    }
    let units = if kv_rows < p.s || q_rows < p.l {
        1
    } else {
        let by_kv = max_rows / p.s.max(1) as u64;
        let by_q = max_rows / (p.group * p.l.max(1)) as u64;
        let by_grid = max_grid / p.group as u64;
        (p.units as u64).min(by_kv).min(by_q).min(by_grid).max(1) as usize
    };
    Ok(Chunking { units, q_rows, kv_rows })
}

/// One dispatch's slice of the problem: KV units `unit0..unit0+units` (with their query heads),
/// query rows `l0..l0+lc`, key rows `s0..s0+sc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub unit0: usize,
    pub units: usize,
    pub l0: usize,
    pub lc: usize,
    pub s0: usize,
    pub sc: usize,
}

/// The dispatches of a chunking, skipping key blocks a causal mask hides entirely.
pub fn chunks(p: &Problem, c: &Chunking) -> Vec<Chunk> {
    let mut out = Vec::new();
    for unit0 in (0..p.units).step_by(c.units) {
        for l0 in (0..p.l).step_by(c.q_rows) {
            for s0 in (0..p.s).step_by(c.kv_rows) {
                let lc = c.q_rows.min(p.l - l0);
                if p.causal && s0 > l0 + lc - 1 {
                    continue;
                }
                out.push(Chunk {
                    unit0,
                    units: c.units.min(p.units - unit0),
                    l0,
                    lc,
                    s0,
                    sc: c.kv_rows.min(p.s - s0),
                });
            }
        }
    }
    out
}

pub fn plan_exact(p: &Problem, budget: &Budget) -> Result<ExactPlan, Error> {
    let tiles = exact_tiles(p, budget)?;
    let chunking = chunking(p, tiles.bq, budget)?;
    Ok(ExactPlan { tiles, chunking })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(words: u64) -> Budget {
        Budget {
            fast_memory_words: words,
            max_binding_bytes: 128 << 20,
            max_workgroups_per_dimension: 65535,
            max_invocations_per_workgroup: 256,
        }
    }

    fn problem(l: usize, s: usize, e: usize, ev: usize) -> Problem {
        Problem { units: 2, group: 1, l, s, e, ev, causal: false, scale: 1.0 }
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
        let p = Problem { units: 8, group: 2, l: 1000, s: 3000, e: 64, ev: 64, causal: false, scale: 1.0 };
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
        let p = Problem { units: 4, group: 2, l: 100, s: 200, e: 16, ev: 16, causal: true, scale: 1.0 };
        let c = chunking(&p, 16, &budget(4096)).unwrap();
        assert_eq!(c, Chunking { units: 4, q_rows: 100, kv_rows: 200 });
    }
}
