//! How a problem is cut into dispatches so that no binding exceeds the device's limit (both
//! methods).

use crate::api::Problem;
use crate::budget::Budget;
use crate::error::Error;

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

/// Cuts the problem so each binding (Q, K, V, O chunk) stays within `max_binding_bytes` and each
/// grid dimension within the device's limit.
pub fn chunking(
    p: &Problem,
    rows_per_workgroup: usize,
    budget: &Budget,
) -> Result<Chunking, Error> {
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
    let q_rows = (p.l.max(1) as u64)
        .min(max_rows / p.group as u64)
        .min(grid_rows)
        .max(1) as usize;
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
        let by_q = max_rows / (p.group as u64).saturating_mul(p.l.max(1) as u64);
        let by_grid = max_grid / p.group as u64;
        (p.units as u64).min(by_kv).min(by_q).min(by_grid).max(1) as usize
    };
    Ok(Chunking {
        units,
        q_rows,
        kv_rows,
    })
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
