//! Tiles of the poly passes (f32 and tensor cores) measured on this adapter per shape class, and
//! the f32 poly method at a degree with given or tuned tiles.

use std::time::Instant;

use super::{fastest_candidate, forced_or_tuned, tuned_values, TUNE_WARMUP_RUNS};
use crate::api::{PolyOptions, Problem};
use crate::budget::Budget;
use crate::chunking::Chunking;
use crate::device::Gpu;
use crate::error::Error;
use crate::exact::plan::plan_exact;
use crate::launch::{RunOptions, RunStats};
use crate::poly::certificate::{poly_candidate, PolyCandidate};
use crate::poly::plan::{
    coop_candidates, coop_tiles_fit, plan_poly, plan_poly_coop_with, plan_poly_with,
    poly_candidates, poly_tiles_fit, CoopTiles, Pass1Tiles, Pass2Tiles, PolyPlan,
};
use crate::poly::prepass::{prepass, Prepass};
use crate::poly::run::run as poly_run;
use crate::transfer::Uploads;

/// The coop poly plan with tiles measured on this adapter for the shape class (E, Ev, degree,
/// fast memory, subgroup size) when a tuned entry is cached or the autotune times the candidates
/// now (see [`autotune_on`]); the planner's tiles otherwise.
pub(crate) fn tune_coop_plan(
    gpu: &Gpu,
    p: &Problem,
    c: &mut PolyCandidate,
    budget: &Budget,
    opts: RunOptions,
) -> Result<(), Error> {
    let Some(t0) = c.plan.coop else {
        return Ok(());
    };
    let class = format!(
        "{} {} {} {} {}",
        p.e, p.ev, c.cert.degree, budget.fast_memory_words, t0.sg
    );
    let Some(tuned) = tuned_values(gpu, "coop-tiles", (&class, opts.trusted), 6, || {
        let t = autotune_coop(gpu, p, c, budget, opts)?;
        Ok(vec![t.subgroups, t.rt1, t.bk, t.subgroups2, t.rt2, t.rc2])
    })?
    else {
        return Ok(());
    };
    let t = CoopTiles {
        subgroups: tuned[0],
        rt1: tuned[1],
        bk: tuned[2],
        subgroups2: tuned[3],
        rt2: tuned[4],
        rc2: tuned[5],
        ..t0
    };
    if coop_tiles_fit(&t, budget) {
        c.plan = plan_poly_coop_with(p, c.cert.degree, budget, t)?;
    }
    Ok(())
}

/// A poly problem of one shape class on which the autotune times pass candidates: 8 heads of
/// n x n (inputs in [-0.05, 0.05]), its pre-pass run once.
struct PolyTuneProblem {
    class: Problem,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    pre: Prepass,
    uploads: Uploads,
    /// The caller's shader mode (runtime checks or trusted), without I/O counting.
    opts: RunOptions,
}

impl PolyTuneProblem {
    fn new(
        gpu: &Gpu,
        p: &Problem,
        n: usize,
        budget: &Budget,
        opts: RunOptions,
    ) -> Result<Self, Error> {
        let opts = RunOptions {
            count_io: false,
            ..opts
        };
        let class = Problem {
            units: 8,
            group: 1,
            l: n,
            s: n,
            causal: false,
            ..*p
        };
        let x = |w: usize| -> Vec<f32> {
            (0..class.units * n * w)
                .map(|i| (((i * 7919 % 1000) as f32 / 1000.0) - 0.5) * 0.1)
                .collect()
        };
        let (q, k, v) = (x(p.e), x(p.e), x(p.ev));
        let chunking = plan_exact(&class, budget)?.chunking;
        let uploads = Uploads::default();
        let pre = prepass(
            gpu,
            &class,
            &chunking,
            &q,
            &k,
            &v,
            budget,
            &opts,
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
            opts,
        })
    }

    /// GPU seconds of `pass` (timestamps; wall time of the call without them) under `plan`.
    fn time(
        &self,
        gpu: &Gpu,
        c: &PolyCandidate,
        plan: &PolyPlan,
        pass: &str,
    ) -> Result<f64, Error> {
        let mut st = RunStats::default();
        let start = Instant::now();
        poly_run(
            gpu,
            &self.class,
            plan,
            &c.table,
            &c.poly,
            &self.pre,
            &self.q,
            &self.k,
            &self.v,
            &self.opts,
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
fn autotune_coop(
    gpu: &Gpu,
    p: &Problem,
    c: &PolyCandidate,
    budget: &Budget,
    opts: RunOptions,
) -> Result<CoopTiles, Error> {
    let t0 = c.plan.coop.expect("a coop plan");
    let bench = PolyTuneProblem::new(gpu, p, 16384, budget, opts)?;
    let time = |t: CoopTiles, pass: &str| -> Result<f64, Error> {
        let plan = plan_poly_coop_with(&bench.class, c.cert.degree, budget, t)?;
        bench.time(gpu, c, &plan, pass)
    };
    for _ in 0..TUNE_WARMUP_RUNS {
        time(t0, "pass1")?; // clocks up before the first candidate is timed
    }
    let (cands1, cands2) = coop_candidates(&t0, budget);
    let t1 = fastest_candidate(&cands1, "coop pass1", |t| time(t, "pass1"))?;
    let t2 = fastest_candidate(&cands2, "coop pass2", |t| time(t, "pass2"))?;
    Ok(CoopTiles {
        subgroups2: t2.subgroups2,
        rt2: t2.rt2,
        rc2: t2.rc2,
        ..t1
    })
}

/// The f32 poly plan with pass tiles measured on this adapter for the shape class (E, Ev,
/// degree, fast memory) when a tuned entry is cached or the autotune times the candidates now
/// (see [`autotune_on`]); the planner's tiles otherwise.
pub(crate) fn tune_f32_poly_plan(
    gpu: &Gpu,
    p: &Problem,
    c: &mut PolyCandidate,
    budget: &Budget,
    opts: RunOptions,
) -> Result<(), Error> {
    // Tiny problems get the planner's tiles (as for exact); tensor-core plans are tuned apart.
    if c.plan.coop.is_some() || p.l < 64 || p.s < 64 {
        return Ok(());
    }
    let class = format!(
        "{} {} {} {}",
        p.e, p.ev, c.cert.degree, budget.fast_memory_words
    );
    let forced = ("APPROX_ATTN_POLY_TILES", "bk tf rc1 b tr rc2 prefetch");
    let (tuned, forced) =
        forced_or_tuned(gpu, forced, "poly-tiles", (&class, opts.trusted), 7, || {
            let (t1, t2) = autotune_f32_poly(gpu, p, c, budget, opts)?;
            Ok(vec![
                t1.bk,
                t1.tf,
                t1.rc,
                t2.b,
                t2.tr,
                t2.rc,
                usize::from(t1.prefetch),
            ])
        })?;
    let Some(tuned) = tuned else {
        return Ok(());
    };
    let t1 = Pass1Tiles {
        bk: tuned[0],
        tf: tuned[1],
        rc: tuned[2],
        prefetch: tuned[6] != 0,
        ..c.plan.pass1
    };
    let t2 = Pass2Tiles {
        b: tuned[3],
        tr: tuned[4],
        rc: tuned[5],
        ..c.plan.pass2
    };
    let fits = poly_tiles_fit(&t1, &t2, budget) && t2.resident() == c.plan.pass2.resident();
    let tuned_plan = fits
        .then(|| plan_poly_with(p, c.cert.degree, budget, t1, t2).ok())
        .flatten();
    match tuned_plan {
        Some(tuned_plan) => c.plan = tuned_plan,
        None if forced => {
            return Err(Error::InvalidInput(format!(
                "APPROX_ATTN_POLY_TILES gives tiles that do not fit this problem and adapter: \
                 {t1:?} {t2:?}"
            )))
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
    gpu: &Gpu,
    p: &Problem,
    c: &PolyCandidate,
    budget: &Budget,
    opts: RunOptions,
) -> Result<(Pass1Tiles, Pass2Tiles), Error> {
    let n = if gpu.info.device_type == "Cpu" {
        512
    } else {
        32768
    };
    let bench = PolyTuneProblem::new(gpu, p, n, budget, opts)?;
    let planned = plan_poly(&bench.class, c.cert.degree, budget)?;
    let time = |t1, t2, pass: &str| -> Result<f64, Error> {
        let plan = plan_poly_with(&bench.class, c.cert.degree, budget, t1, t2)?;
        bench.time(gpu, c, &plan, pass)
    };
    let (t1, t2) = (planned.pass1, planned.pass2);
    for _ in 0..TUNE_WARMUP_RUNS {
        time(t1, t2, "pass1")?; // clocks up before the first candidate is timed
    }
    let (cands1, cands2) = poly_candidates(&planned, budget);
    let best1 = fastest_candidate(&cands1, "f32 poly pass1", |t| time(t, t2, "pass1"))?;
    let best2 = fastest_candidate(&cands2, "f32 poly pass2", |t| time(t1, t, "pass2"))?;
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
#[allow(clippy::too_many_arguments)]
pub(crate) fn f32_poly(
    gpu: &Gpu,
    p: &Problem,
    chunking: &Chunking,
    (q, k, v): (&[f32], &[f32], &[f32]),
    degree: usize,
    budget: &Budget,
    opts: &RunOptions,
    tiles: F32Tiles,
    st: &mut RunStats,
) -> Result<(Vec<f32>, PolyCandidate), Error> {
    let uploads = Uploads::default();
    let pre = prepass(gpu, p, chunking, q, k, v, budget, opts, &uploads, st)?;
    let popts = PolyOptions {
        eps: 1e-2,
        degree: Some(degree),
        check_finite: false,
        tensor_cores: Some(false),
    };
    let mut c = poly_candidate(p, &pre, &popts, budget, None)?;
    match tiles {
        F32Tiles::Tuned => tune_f32_poly_plan(gpu, p, &mut c, budget, *opts)?,
        F32Tiles::Given(pass1, pass2) => {
            c.plan = plan_poly_with(p, degree, budget, pass1, pass2)?;
        }
    }
    let out = poly_run(
        gpu, p, &c.plan, &c.table, &c.poly, &pre, q, k, v, opts, &uploads, st,
    )?;
    Ok((out, c))
}
