//! Pure I/O accounting: the words (4 bytes) a plan moves between storage buffers (slow memory) and
//! workgroup memory (fast memory, M = `fast_memory_words`), counted exactly as the kernels do.

use crate::plan::{
    chunks, index_words, prepass_rows_per_block, prepass_tile_rows, Chunking, ExactPlan, PolyPlan,
    Problem,
};

/// Words read from and written to storage buffers by all workgroups of a plan, per pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoCount {
    pub passes: Vec<PassIo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassIo {
    pub name: &'static str,
    pub reads: u64,
    pub writes: u64,
}

impl IoCount {
    pub fn reads(&self) -> u64 {
        self.passes.iter().map(|p| p.reads).sum()
    }
    pub fn writes(&self) -> u64 {
        self.passes.iter().map(|p| p.writes).sum()
    }
    pub fn total(&self) -> u64 {
        self.reads() + self.writes()
    }
}

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

/// Words of one pre-pass call over a `(units, rows, width)` array (see `shaders/prepass.wgsl`):
/// every element once, mu once per workgroup when centring, 3*width+2 statistics per workgroup.
fn row_stats_io(
    units: usize,
    rows: usize,
    width: usize,
    upd: usize,
    rpd: usize,
    use_mu: bool,
    m: u64,
) -> (u64, u64) {
    let tile_rows = prepass_tile_rows(width, m);
    let (mut r, mut w) = (0u64, 0u64);
    for u0 in (0..units).step_by(upd) {
        let nu = upd.min(units - u0);
        for r0 in (0..rows).step_by(rpd) {
            let nr = rpd.min(rows - r0);
            let blocks = nr.div_ceil(prepass_rows_per_block(nr, nu, tile_rows));
            r += (nu * nr * width + if use_mu { nu * blocks * width } else { 0 }) as u64;
            w += (nu * blocks * (3 * width + 2)) as u64;
        }
    }
    (r, w)
}

/// The poly pre-pass: K twice (mean, then norms around it), V and Q once.
pub fn prepass_io(p: &Problem, c: &Chunking, m: u64) -> IoCount {
    let k1 = row_stats_io(p.units, p.s, p.e, c.units, c.kv_rows, false, m);
    let k2 = row_stats_io(p.units, p.s, p.e, c.units, c.kv_rows, true, m);
    let v1 = row_stats_io(p.units, p.s, p.ev, c.units, c.kv_rows, false, m);
    let q1 = if p.l > 0 {
        row_stats_io(
            p.query_heads(),
            p.l,
            p.e,
            c.units * p.group,
            c.q_rows,
            false,
            m,
        )
    } else {
        (0, 0)
    };
    IoCount {
        passes: vec![PassIo {
            name: "prepass",
            reads: k1.0 + k2.0 + v1.0 + q1.0,
            writes: k1.1 + k2.1 + v1.1 + q1.1,
        }],
    }
}

/// Exactly the words the poly kernels move for this plan: the pre-pass, pass 1 (per workgroup:
/// mu, its feature rows' index words, its keys' K and V rows, its partial S' rows), the
/// reduction of the key splits, and pass 2 (per workgroup: its query rows, S' with index words
/// and weights once (schedule A) or once per query block (B), its output rows).
pub fn poly_io(p: &Problem, plan: &PolyPlan, prepass_chunking: &Chunking, m: u64) -> IoCount {
    let c = &plan.chunking;
    let (r, ev1, iw) = (
        plan.r as u64,
        (p.ev + 1) as u64,
        index_words(plan.degree) as u64,
    );
    let chunks = plan.pass1.chunks() as u64;
    let (mut p1r, mut p1w, mut rdr, mut rdw, mut p2r, mut p2w) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for u0 in (0..p.units).step_by(c.units) {
        let nu = c.units.min(p.units - u0) as u64;
        for (ci, s0) in (0..p.s).step_by(c.kv_rows).enumerate() {
            let sc = c.kv_rows.min(p.s - s0);
            let splits = sc.div_ceil(plan.keys_per_split.min(sc)) as u64;
            p1r += nu
                * (splits * chunks * p.e as u64
                    + splits * r * iw
                    + chunks * sc as u64 * (p.e + p.ev) as u64);
            p1w += nu * splits * r * ev1;
            rdr += nu * r * ev1 * (splits + u64::from(ci > 0));
            rdw += nu * r * ev1;
        }
        for l0 in (0..p.l).step_by(c.q_rows) {
            let lc = c.q_rows.min(p.l - l0);
            let heads = nu * p.group as u64;
            let blocks = lc.div_ceil(plan.pass2.b);
            let loads = if plan.pass2.resident() {
                plan.pass2_workgroups.min(blocks)
            } else {
                blocks
            } as u64;
            p2r += heads * (lc as u64 * p.e as u64 + loads * r * (ev1 + iw + 1));
            p2w += heads * (lc * p.ev) as u64;
        }
    }
    let mut io = prepass_io(p, prepass_chunking, m);
    io.passes.extend([
        PassIo {
            name: "pass1",
            reads: p1r,
            writes: p1w,
        },
        PassIo {
            name: "reduce",
            reads: rdr,
            writes: rdw,
        },
        PassIo {
            name: "pass2",
            reads: p2r,
            writes: p2w,
        },
    ]);
    io
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan_exact, Budget};

    fn budget() -> Budget {
        Budget {
            fast_memory_words: 8192,
            max_binding_bytes: 128 << 20,
            max_workgroups_per_dimension: 65535,
            max_invocations_per_workgroup: 256,
        }
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
