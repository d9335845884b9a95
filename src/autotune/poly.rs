//! Tiles of the poly passes (f32 and tensor cores) measured on this adapter per shape class, and
//! the f32 poly method at a degree with given or tuned tiles.

use std::fmt;
use std::time::Instant;

use super::{bench_inputs, sizes_and_flags, TileRecord, Tuner, TUNE_WARMUP_RUNS};
use crate::api::{PolyOptions, Problem};
use crate::chunking::Chunking;
use crate::error::Error;
use crate::exact::plan::plan_exact;
use crate::launch::RunStats;
use crate::poly::causal::{plan_causal, run as causal_run};
use crate::poly::certificate::{poly_candidate, PolyCandidate};
use crate::poly::kernel_coop::{coop_pack_source, coop_pass1_source, coop_pass2_source};
use crate::poly::kernel_f32::{pass1_source, pass2_source};
use crate::poly::plan::{
    coop_candidates, coop_tiles_fit, plan_poly, plan_poly_coop_with, plan_poly_with,
    poly_candidates, poly_tiles_fit, CoopTiles, Pass1Tiles, Pass2Tiles, PolyPlan,
};
use crate::poly::prepass::{prepass, Prepass};
use crate::poly::run::run as poly_run;
use crate::transfer::Uploads;

/// The shape class whose poly tiles are tuned together; coop classes add the subgroup size.
struct PolyClass {
    e: usize,
    ev: usize,
    degree: usize,
    fast_memory_words: u64,
    subgroup_size: Option<usize>,
}

impl fmt::Display for PolyClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (e, ev, g, m) = (self.e, self.ev, self.degree, self.fast_memory_words);
        write!(f, "{e} {ev} {g} {m}")?;
        match self.subgroup_size {
            Some(sg) => write!(f, " {sg}"),
            None => Ok(()),
        }
    }
}

impl PolyClass {
    fn of(p: &Problem, degree: usize, tuner: &Tuner, subgroup_size: Option<usize>) -> Self {
        PolyClass {
            e: p.e,
            ev: p.ev,
            degree,
            fast_memory_words: tuner.budget.fast_memory_words,
            subgroup_size,
        }
    }
}

/// Tuned tiles of the two f32 passes (the rest comes from the planner).
#[derive(Clone, Copy, Debug)]
struct F32Record {
    bk: usize,
    tf: usize,
    rc1: usize,
    b: usize,
    tr: usize,
    rc2: usize,
    prefetch: bool,
}

impl TileRecord for F32Record {
    const KIND: &'static str = "poly-tiles";
    const NAMES: &'static str = "bk tf rc1 b tr rc2 prefetch";
    fn values(&self) -> Vec<usize> {
        let prefetch = usize::from(self.prefetch);
        vec![
            self.bk, self.tf, self.rc1, self.b, self.tr, self.rc2, prefetch,
        ]
    }
    fn from_values(v: &[usize]) -> Option<Self> {
        sizes_and_flags(v, 7, 1).then(|| F32Record {
            bk: v[0],
            tf: v[1],
            rc1: v[2],
            b: v[3],
            tr: v[4],
            rc2: v[5],
            prefetch: v[6] != 0,
        })
    }
}

impl F32Record {
    fn of(t1: &Pass1Tiles, t2: &Pass2Tiles) -> Self {
        F32Record {
            bk: t1.bk,
            tf: t1.tf,
            rc1: t1.rc,
            b: t2.b,
            tr: t2.tr,
            rc2: t2.rc,
            prefetch: t1.prefetch,
        }
    }

    /// These tiles over the planner's `plan`.
    fn tiles(&self, plan: &PolyPlan) -> (Pass1Tiles, Pass2Tiles) {
        let t1 = Pass1Tiles {
            bk: self.bk,
            tf: self.tf,
            rc: self.rc1,
            prefetch: self.prefetch,
            ..plan.pass1
        };
        let t2 = Pass2Tiles {
            b: self.b,
            tr: self.tr,
            rc: self.rc2,
            ..plan.pass2
        };
        (t1, t2)
    }
}

/// Tuned tiles of the two tensor-core passes.
#[derive(Clone, Copy, Debug)]
struct CoopRecord {
    subgroups: usize,
    rt1: usize,
    bk: usize,
    subgroups2: usize,
    rt2: usize,
    rc2: usize,
}

impl TileRecord for CoopRecord {
    const KIND: &'static str = "coop-tiles";
    const NAMES: &'static str = "subgroups rt1 bk subgroups2 rt2 rc2";
    fn values(&self) -> Vec<usize> {
        let t = self;
        vec![t.subgroups, t.rt1, t.bk, t.subgroups2, t.rt2, t.rc2]
    }
    fn from_values(v: &[usize]) -> Option<Self> {
        sizes_and_flags(v, 6, 0).then(|| CoopRecord {
            subgroups: v[0],
            rt1: v[1],
            bk: v[2],
            subgroups2: v[3],
            rt2: v[4],
            rc2: v[5],
        })
    }
}

impl CoopRecord {
    fn of(t: &CoopTiles) -> Self {
        CoopRecord {
            subgroups: t.subgroups,
            rt1: t.rt1,
            bk: t.bk,
            subgroups2: t.subgroups2,
            rt2: t.rt2,
            rc2: t.rc2,
        }
    }

    fn tiles(&self, t0: &CoopTiles) -> CoopTiles {
        CoopTiles {
            subgroups: self.subgroups,
            rt1: self.rt1,
            bk: self.bk,
            subgroups2: self.subgroups2,
            rt2: self.rt2,
            rc2: self.rc2,
            ..*t0
        }
    }
}

/// The coop poly plan with tiles measured on this adapter for the shape class (E, Ev, degree,
/// fast memory, subgroup size) when a tuned entry is cached or the autotune times the candidates
/// now; the planner's tiles otherwise.
pub(crate) fn tune_coop_plan(
    tuner: &Tuner,
    p: &Problem,
    c: &mut PolyCandidate,
) -> Result<(), Error> {
    let Some(t0) = c.plan.coop else {
        return Ok(());
    };
    let (budget, degree) = (tuner.budget, c.cert.degree);
    let class = PolyClass::of(p, degree, tuner, Some(t0.sg));
    let kernels = || {
        let (cands1, cands2) = coop_candidates(&t0, budget);
        let pass1 = cands1.iter().map(|t| coop_pass1_source(t, false));
        let pass2 = cands2.iter().map(|t| coop_pass2_source(t, false));
        let pack = std::iter::once(coop_pack_source(&t0, false));
        pass1.chain(pass2).chain(pack).collect()
    };
    let fits = |r: &CoopRecord| coop_tiles_fit(&r.tiles(&t0), budget);
    let tune = || Ok(CoopRecord::of(&autotune_coop(tuner, p, c)?));
    if let Some(r) = tuner.tuned(&class, kernels, fits, tune)? {
        c.plan = plan_poly_coop_with(p, degree, budget, r.tiles(&t0))?;
    }
    Ok(())
}

/// The problem of `p`'s class on which pass candidates are timed: 8 heads of n x n.
fn bench_problem(p: &Problem, n: usize) -> Problem {
    Problem {
        units: 8,
        group: 1,
        l: n,
        s: n,
        causal: false,
        ..*p
    }
}

/// A poly problem of one shape class on which the autotune times pass candidates (inputs in
/// [-0.05, 0.05]), its pre-pass run once.
struct PolyTuneProblem {
    class: Problem,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    pre: Prepass,
    uploads: Uploads,
}

impl PolyTuneProblem {
    fn new(tuner: &Tuner, class: Problem) -> Result<Self, Error> {
        let (q, k, v) = bench_inputs(&class, 0.1);
        let chunking = plan_exact(&class, tuner.budget)?.chunking;
        let uploads = Uploads::default();
        let pre = prepass(
            tuner.gpu,
            &class,
            &chunking,
            (&q, &k, &v),
            tuner.budget,
            &tuner.timing_opts(),
            &uploads,
            &mut RunStats::default(),
        )?;
        Ok(PolyTuneProblem {
            class,
            q,
            k,
            v,
            pre,
            uploads,
        })
    }

    /// GPU seconds of `pass` (timestamps; wall time of the call without them) under `plan`.
    fn time(
        &self,
        tuner: &Tuner,
        c: &PolyCandidate,
        plan: &PolyPlan,
        pass: &str,
    ) -> Result<f64, Error> {
        let mut st = RunStats::default();
        let start = Instant::now();
        poly_run(
            tuner.gpu,
            &self.class,
            plan,
            &c.table,
            &c.poly,
            &self.pre,
            (&self.q, &self.k, &self.v),
            &tuner.timing_opts(),
            &self.uploads,
            &mut st,
        )?;
        Ok(st
            .pass_s
            .iter()
            .find(|(name, _)| *name == pass)
            .map_or_else(|| start.elapsed().as_secs_f64(), |(_, s)| *s))
    }
}

/// Times the pass-1 and pass-2 candidates of [`coop_candidates`] on an 8-head 16384²
/// problem of this shape class, each pass on its own timestamps, and returns the fastest of each.
fn autotune_coop(tuner: &Tuner, p: &Problem, c: &PolyCandidate) -> Result<CoopTiles, Error> {
    let t0 = c.plan.coop.expect("a coop plan");
    let bench = PolyTuneProblem::new(tuner, bench_problem(p, 16384))?;
    let time = |t: CoopTiles, pass: &str| -> Result<f64, Error> {
        let plan = plan_poly_coop_with(&bench.class, c.cert.degree, tuner.budget, t)?;
        bench.time(tuner, c, &plan, pass)
    };
    for _ in 0..TUNE_WARMUP_RUNS {
        time(t0, "pass1")?; // clocks up before the first candidate is timed
    }
    let (cands1, cands2) = coop_candidates(&t0, tuner.budget);
    let t1 = tuner.fastest(&cands1, "coop pass1", |t| time(t, "pass1"))?;
    let t2 = tuner.fastest(&cands2, "coop pass2", |t| time(t, "pass2"))?;
    Ok(CoopTiles {
        subgroups2: t2.subgroups2,
        rt2: t2.rt2,
        rc2: t2.rc2,
        ..t1
    })
}

/// The f32 poly plan with pass tiles measured on this adapter for the shape class (E, Ev,
/// degree, fast memory) when a tuned entry is cached or the autotune times the candidates now;
/// the planner's tiles otherwise.
pub(crate) fn tune_f32_poly_plan(
    tuner: &Tuner,
    p: &Problem,
    c: &mut PolyCandidate,
) -> Result<(), Error> {
    // Tiny problems get the planner's tiles (as for exact); tensor-core plans are tuned apart.
    if c.plan.coop.is_some() || p.l < 64 || p.s < 64 {
        return Ok(());
    }
    let (budget, degree) = (tuner.budget, c.cert.degree);
    let class = PolyClass::of(p, degree, tuner, None);
    let bench = bench_problem(p, tuner.bench_side(32768));
    let kernels = || {
        let Ok(planned) = plan_poly(&bench, degree, budget) else {
            return vec![];
        };
        let (cands1, cands2) = poly_candidates(&planned, budget);
        let pass1 = cands1.iter().map(|t| pass1_source(t, false));
        pass1
            .chain(cands2.iter().map(|t| pass2_source(t, false)))
            .collect()
    };
    // Tuned tiles over this plan: they fit, and keep S' resident where the plan does.
    let tuned_plan = |r: &F32Record| {
        let (t1, t2) = r.tiles(&c.plan);
        let fits = poly_tiles_fit(&t1, &t2, budget) && t2.resident() == c.plan.pass2.resident();
        fits.then(|| plan_poly_with(p, degree, budget, t1, t2).ok())
            .flatten()
    };
    let (tuned, forced) = tuner.forced_or_tuned(
        ("APPROX_ATTN_POLY_TILES", tuner.cfg.poly_tiles.as_deref()),
        &class,
        kernels,
        |r| tuned_plan(r).is_some(),
        || {
            let (t1, t2) = autotune_f32_poly(tuner, bench, c)?;
            Ok(F32Record::of(&t1, &t2))
        },
    )?;
    let Some(tuned) = tuned else {
        return Ok(());
    };
    match tuned_plan(&tuned) {
        Some(plan) => c.plan = plan,
        None if forced => {
            let (t1, t2) = tuned.tiles(&c.plan);
            return Err(Error::InvalidInput(format!(
                "APPROX_ATTN_POLY_TILES gives tiles that do not fit this problem and adapter: \
                 {t1:?} {t2:?}"
            )));
        }
        None => {}
    }
    Ok(())
}

/// Times the pass-1 and pass-2 candidates of [`poly_candidates`] on an 8-head 32768²
/// problem of this shape class (512² on CPU drivers), each pass on its own timestamps, and
/// returns the fastest of each. At 8192² (a few waves of workgroups on an H100) the ranking
/// differed from the one at full size: a pass-2 variant 16% faster there was 1.4% slower at
/// n = 262,144.
fn autotune_f32_poly(
    tuner: &Tuner,
    class: Problem,
    c: &PolyCandidate,
) -> Result<(Pass1Tiles, Pass2Tiles), Error> {
    let (budget, degree) = (tuner.budget, c.cert.degree);
    let bench = PolyTuneProblem::new(tuner, class)?;
    let planned = plan_poly(&bench.class, degree, budget)?;
    let time = |t1, t2, pass: &str| -> Result<f64, Error> {
        let plan = plan_poly_with(&bench.class, degree, budget, t1, t2)?;
        bench.time(tuner, c, &plan, pass)
    };
    let (t1, t2) = (planned.pass1, planned.pass2);
    for _ in 0..TUNE_WARMUP_RUNS {
        time(t1, t2, "pass1")?; // clocks up before the first candidate is timed
    }
    let (cands1, cands2) = poly_candidates(&planned, budget);
    let best1 = tuner.fastest(&cands1, "f32 poly pass1", |t| time(t, t2, "pass1"))?;
    let best2 = tuner.fastest(&cands2, "f32 poly pass2", |t| time(t1, t, "pass2"))?;
    Ok((best1, best2))
}

/// Pass tiles of [`f32_poly`].
pub(crate) enum F32Tiles {
    /// What `attention` runs: the tuned tiles where the autotune has them, else the planner's.
    Tuned,
    /// These (the autotune's candidates).
    Given(Pass1Tiles, Pass2Tiles),
}

/// The f32 poly method at `degree`: pre-pass over `chunking`, certificate (eps = 1e-2), and both
/// passes with `tiles`; `st` gathers every dispatch's stats.
pub(crate) fn f32_poly(
    tuner: &Tuner,
    (p, chunking): (&Problem, &Chunking),
    (q, k, v): (&[f32], &[f32], &[f32]),
    degree: usize,
    tiles: F32Tiles,
    st: &mut RunStats,
) -> Result<(Vec<f32>, PolyCandidate), Error> {
    let (gpu, budget, opts) = (tuner.gpu, tuner.budget, &tuner.opts);
    let uploads = Uploads::default();
    let pre = prepass(gpu, p, chunking, (q, k, v), budget, opts, &uploads, st)?;
    let popts = PolyOptions {
        eps: 1e-2,
        degree: Some(degree),
        check_finite: false,
        tensor_cores: Some(false),
    };
    let mut c = poly_candidate(p, &pre, &popts, budget, None)?;
    match tiles {
        F32Tiles::Tuned => tune_f32_poly_plan(tuner, p, &mut c)?,
        F32Tiles::Given(pass1, pass2) => {
            c.plan = plan_poly_with(p, degree, budget, pass1, pass2)?;
        }
    }
    if p.causal {
        // The rate calibration of causal calls times the causal schedule.
        let cp = plan_causal(p, &c.plan, budget)?;
        let (table, poly) = (&c.table, &c.poly);
        let xs = (q, k, v);
        let out = causal_run(gpu, p, &cp, table, poly, &pre, xs, opts, &uploads, st)?;
        return Ok((out, c));
    }
    let out = poly_run(
        gpu,
        p,
        &c.plan,
        &c.table,
        &c.poly,
        &pre,
        (q, k, v),
        opts,
        &uploads,
        st,
    )?;
    Ok((out, c))
}
