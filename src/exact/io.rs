//! Words the exact kernel moves for a plan.

use super::plan::ExactPlan;
use crate::api::Problem;
use crate::chunking::chunks;
use crate::io::{IoCount, PassIo};

/// Keys a query tile streams: all `sc` keys, or under the causal mask only those up to its last row.
fn exact_keys_visible(p: &Problem, q_end_global: usize, s0: usize, sc: usize) -> usize {
    if p.causal {
        q_end_global.saturating_sub(s0).min(sc)
    } else {
        sc
    }
}

/// Exactly the words the exact kernel loads and stores for this plan (see `shaders/exact.wgsl`):
/// each workgroup reads its query rows once and every visible key row's K and V once, and writes
/// its output rows (plus two statistics per row when the keys are split over dispatches).
pub fn exact_io(p: &Problem, plan: &ExactPlan) -> IoCount {
    let t = &plan.tiles;
    let split_kv = plan.chunking.kv_rows < p.s;
    let (mut reads, mut writes) = (0u64, 0u64);
    for ch in chunks(p, &plan.chunking) {
        let heads = (ch.units * p.group) as u64;
        let (mut r, mut w) = (0u64, 0u64);
        for q0 in (0..ch.lc).step_by(t.bq) {
            let rows = t.bq.min(ch.lc - q0);
            let keys = exact_keys_visible(p, ch.l0 + q0 + rows, ch.s0, ch.sc);
            r += (rows * p.e + keys * (p.e + p.ev)) as u64;
            w += (rows * p.ev + if split_kv { 2 * rows } else { 0 }) as u64;
        }
        reads += heads * r;
        writes += heads * w;
    }
    IoCount {
        passes: vec![PassIo {
            name: "exact",
            reads,
            writes,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::exact::plan::plan_exact;

    fn budget() -> Budget {
        Budget::with_binding(8192, 128 << 20)
    }

    #[test]
    fn exact_io_closed_form_non_causal() {
        let p = Problem {
            units: 3,
            group: 2,
            l: 100,
            s: 70,
            e: 16,
            ev: 8,
            causal: false,
            scale: 1.0,
        };
        let plan = plan_exact(&p, &budget()).unwrap();
        let io = exact_io(&p, &plan);
        let heads = 6u64;
        let tiles = p.l.div_ceil(plan.tiles.bq) as u64;
        assert_eq!(io.reads(), heads * (100 * 16 + tiles * 70 * 24));
        assert_eq!(io.writes(), heads * 100 * 8);
    }

    #[test]
    fn causal_reads_about_half_the_keys() {
        let p = Problem {
            units: 1,
            group: 1,
            l: 4096,
            s: 4096,
            e: 64,
            ev: 64,
            causal: false,
            scale: 1.0,
        };
        let plan = plan_exact(&p, &budget()).unwrap();
        let full = exact_io(&p, &plan).reads() as f64;
        let causal = exact_io(&Problem { causal: true, ..p }, &plan).reads() as f64;
        let ratio = causal / full;
        assert!((0.5..0.53).contains(&ratio), "{ratio}");
    }
}
