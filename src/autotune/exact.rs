//! Tiles of the exact kernel measured on this adapter per shape class.

use std::fmt;
use std::time::Instant;

use super::{bench_inputs, sizes_and_flags, TileRecord, Tuner, TUNE_WARMUP_RUNS};
use crate::api::{Method, PolyOptions, Problem};
use crate::error::Error;
use crate::exact::coop::{self, CoopExactPlan, CoopExactTiles};
use crate::exact::kernel::shader_source;
use crate::exact::plan::{
    exact_candidates, exact_tiles_fit, plan_exact, plan_exact_with, ExactPlan, ExactTiles,
};
use crate::exact::run::run as exact_run;
use crate::progress::Progress;

/// The shape class whose exact tiles are tuned together.
struct ExactClass {
    e: usize,
    ev: usize,
    causal: bool,
    fast_memory_words: u64,
}

impl fmt::Display for ExactClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = u8::from(self.causal);
        write!(f, "{} {} {c} {}", self.e, self.ev, self.fast_memory_words)
    }
}

/// Tuned exact tiles (the head sizes come from the problem).
#[derive(Clone, Copy, Debug)]
struct ExactRecord {
    bq: usize,
    bk: usize,
    tq: usize,
    tk: usize,
    split_v: bool,
}

impl TileRecord for ExactRecord {
    const KIND: &'static str = "exact-tiles";
    const NAMES: &'static str = "bq bk tq tk split_v";
    fn values(&self) -> Vec<usize> {
        vec![
            self.bq,
            self.bk,
            self.tq,
            self.tk,
            usize::from(self.split_v),
        ]
    }
    fn from_values(v: &[usize]) -> Option<Self> {
        sizes_and_flags(v, 5, 1).then(|| ExactRecord {
            bq: v[0],
            bk: v[1],
            tq: v[2],
            tk: v[3],
            split_v: v[4] != 0,
        })
    }
}

impl ExactRecord {
    fn of(t: &ExactTiles) -> Self {
        ExactRecord {
            bq: t.bq,
            bk: t.bk,
            tq: t.tq,
            tk: t.tk,
            split_v: t.split_v,
        }
    }

    fn tiles(&self, p: &Problem) -> ExactTiles {
        ExactTiles {
            e: p.e,
            ev: p.ev,
            bq: self.bq,
            bk: self.bk,
            tq: self.tq,
            tk: self.tk,
            split_v: self.split_v,
        }
    }
}

/// The problem of `p`'s class on which candidates are timed: many waves of workgroups on a GPU
/// (at 2048^2, under one wave of 64-row query tiles on an H100, the ranking favoured small
/// tiles).
fn bench_problem(tuner: &Tuner, p: &Problem) -> Problem {
    let n = tuner.bench_side(16384);
    Problem {
        units: 8,
        group: 1,
        l: n,
        s: n,
        ..*p
    }
}

/// The exact plan, with tiles measured on this adapter for the shape class (E, Ev, causal, fast
/// memory) when a tuned entry is cached or the autotune times the candidates now (the tests turn
/// it off); otherwise the planner's default.
pub(crate) fn exact_plan_for(tuner: &Tuner, p: &Problem) -> Result<ExactPlan, Error> {
    let budget = tuner.budget;
    let default = plan_exact(p, budget)?;
    // Tiny problems get tiles capped by L and S; the fast memory may be capped for tests.
    if p.l < 64 || p.s < 64 {
        return Ok(default);
    }
    let class = ExactClass {
        e: p.e,
        ev: p.ev,
        causal: p.causal,
        fast_memory_words: budget.fast_memory_words,
    };
    let bench = bench_problem(tuner, p);
    let kernels = || {
        let cands = exact_candidates(&bench, budget);
        cands.iter().map(|t| shader_source(t, false)).collect()
    };
    let (tuned, forced) = tuner.forced_or_tuned(
        ("APPROX_ATTN_EXACT_TILES", tuner.cfg.exact_tiles.as_deref()),
        &class,
        kernels,
        |r: &ExactRecord| exact_tiles_fit(&r.tiles(p), budget),
        || Ok(ExactRecord::of(&autotune_exact(tuner, &bench)?)),
    )?;
    let Some(tuned) = tuned else {
        return Ok(default);
    };
    let t = tuned.tiles(p);
    if !exact_tiles_fit(&t, budget) {
        return if forced {
            Err(Error::InvalidInput(format!(
                "APPROX_ATTN_EXACT_TILES gives tiles that do not fit this problem and adapter: {t:?}"
            )))
        } else {
            Ok(default)
        };
    }
    plan_exact_with(p, budget, t)
}

/// Times every candidate tile shape on `class` (a problem of the shape class) and returns the
/// fastest.
fn autotune_exact(tuner: &Tuner, class: &Problem) -> Result<ExactTiles, Error> {
    let (gpu, budget) = (tuner.gpu, tuner.budget);
    let (q, k, v) = bench_inputs(class, 1.0);
    let opts = tuner.timing_opts();
    let candidates = exact_candidates(class, budget);
    let time = |t: ExactTiles| -> Result<f64, Error> {
        let plan = plan_exact_with(class, budget, t)?;
        let start = Instant::now();
        let (_, st) = exact_run(gpu, class, &plan, &q, &k, &v, &opts)?;
        Ok(st.kernel_s.unwrap_or_else(|| start.elapsed().as_secs_f64()))
    };
    // The GPU raises its clocks under load: a few runs first, so that the first candidates are
    // not timed at idle clocks; then every candidate once to compile it.
    if let Some(&t) = candidates.first() {
        for _ in 0..TUNE_WARMUP_RUNS {
            time(t)?;
        }
    }
    let mut progress = Progress::new("compiling exact candidates", candidates.len());
    for &t in &candidates {
        time(t)?;
        progress.tick();
    }
    drop(progress);
    let what = format!(
        "exact E={} Ev={} causal={}",
        class.e, class.ev, class.causal
    );
    tuner.fastest(&candidates, &what, time)
}

/// The shape class whose tensor-core exact tiles are tuned together.
struct CoopExactClass {
    e: usize,
    ev: usize,
    causal: bool,
    fast_memory_words: u64,
    sg: usize,
}

impl fmt::Display for CoopExactClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = u8::from(self.causal);
        let (e, ev, m, sg) = (self.e, self.ev, self.fast_memory_words, self.sg);
        write!(f, "{e} {ev} {c} {m} {sg}")
    }
}

/// Tuned tensor-core exact tiles (the head sizes and subgroup size come from the problem).
#[derive(Clone, Copy, Debug)]
struct CoopExactRecord {
    subgroups: usize,
    rt: usize,
    bk: usize,
}

impl TileRecord for CoopExactRecord {
    const KIND: &'static str = "coop-exact-tiles";
    const NAMES: &'static str = "subgroups rt bk";
    fn values(&self) -> Vec<usize> {
        vec![self.subgroups, self.rt, self.bk]
    }
    fn from_values(v: &[usize]) -> Option<Self> {
        sizes_and_flags(v, 3, 0).then(|| CoopExactRecord {
            subgroups: v[0],
            rt: v[1],
            bk: v[2],
        })
    }
}

impl CoopExactRecord {
    fn tiles(&self, planned: &CoopExactTiles) -> CoopExactTiles {
        CoopExactTiles {
            subgroups: self.subgroups,
            rt: self.rt,
            bk: self.bk,
            ..*planned
        }
    }
}

/// The plan of exact attention on cooperative matrices where this call runs it: `tensor_cores`
/// `Some(true)`, or `None` with float16 inputs, and an exact run (method exact, or auto, which
/// falls back to exact). Errors where `Some(true)` asks for what the adapter lacks.
pub(crate) fn coop_exact_plan(
    tuner: &Tuner,
    p: &Problem,
    method: Method,
    popts: &PolyOptions,
    f16_inputs: bool,
) -> Result<Option<CoopExactPlan>, Error> {
    let budget = tuner.budget;
    let wanted = popts.tensor_cores.unwrap_or(f16_inputs);
    let sg = coop::available(tuner.gpu);
    if popts.tensor_cores == Some(true) && sg.is_none() && method != Method::Poly {
        return Err(Error::Unsupported(
            "tensor_cores=True needs 16x16 f16 cooperative matrices, f16 shaders, one subgroup \
             size and subgroup barriers; this adapter lacks them (see device_info())"
                .into(),
        ));
    }
    let Some(sg) = sg.filter(|_| wanted && method != Method::Poly && p.l > 0 && p.units > 0) else {
        return Ok(None);
    };
    let mut planned = match coop::plan(p, budget, sg) {
        Ok(plan) => plan,
        Err(e) if popts.tensor_cores == Some(true) => return Err(e),
        Err(_) => return Ok(None), // float16 inputs run the f32 kernel where no tile fits
    };
    // Q staged in parts: for every tile this call runs (tuned or forced), as asked.
    if let Some(parts) = tuner.cfg.coop_exact_q_parts.clone()? {
        planned.tiles.q_parts = parts;
        if !coop::tiles_fit(&planned.tiles, budget) {
            return Err(Error::InvalidInput(format!(
                "APPROX_ATTN_COOP_EXACT_Q_PARTS={parts} must divide the subgroups of the planned \
                 tiles {:?}",
                planned.tiles
            )));
        }
    }
    if p.l < 64 || p.s < 64 {
        return Ok(Some(planned));
    }
    let class = CoopExactClass {
        e: p.e,
        ev: p.ev,
        causal: p.causal,
        fast_memory_words: budget.fast_memory_words,
        sg,
    };
    let bench = bench_problem(tuner, p);
    let kernels = || {
        let cands = coop::candidates(&bench, budget, sg);
        cands
            .iter()
            .map(|t| coop::shader_source(t, false))
            .collect()
    };
    let (tuned, forced) = tuner.forced_or_tuned(
        (
            "APPROX_ATTN_COOP_EXACT_TILES",
            tuner.cfg.coop_exact_tiles.as_deref(),
        ),
        &class,
        kernels,
        |r: &CoopExactRecord| coop::tiles_fit(&r.tiles(&planned.tiles), budget),
        || {
            let t = autotune_coop_exact(tuner, &bench, sg)?;
            Ok(CoopExactRecord {
                subgroups: t.subgroups,
                rt: t.rt,
                bk: t.bk,
            })
        },
    )?;
    let Some(tuned) = tuned else {
        return Ok(Some(planned));
    };
    let t = tuned.tiles(&planned.tiles);
    if !coop::tiles_fit(&t, budget) {
        return if forced {
            Err(Error::InvalidInput(format!(
                "APPROX_ATTN_COOP_EXACT_TILES gives tiles that do not fit this problem and \
                 adapter: {t:?}"
            )))
        } else {
            Ok(Some(planned))
        };
    }
    coop::plan_with(p, budget, t).map(Some)
}

/// Times every tensor-core exact candidate on `class` (a problem of the shape class) and returns
/// the fastest.
fn autotune_coop_exact(tuner: &Tuner, class: &Problem, sg: usize) -> Result<CoopExactTiles, Error> {
    let (gpu, budget) = (tuner.gpu, tuner.budget);
    let (q, k, v) = bench_inputs(class, 1.0);
    let opts = tuner.timing_opts();
    let candidates = coop::candidates(class, budget, sg);
    let time = |t: CoopExactTiles| -> Result<f64, Error> {
        let plan = coop::plan_with(class, budget, t)?;
        let start = Instant::now();
        // The default variant (f32 storage, every tile masked): the tiles serve every variant.
        let (_, st) = coop::run(gpu, class, &plan, (&q, &k, &v), None, false, &opts)?;
        Ok(st.kernel_s.unwrap_or_else(|| start.elapsed().as_secs_f64()))
    };
    if let Some(&t) = candidates.first() {
        for _ in 0..TUNE_WARMUP_RUNS {
            time(t)?;
        }
    }
    let what = format!(
        "coop exact E={} Ev={} causal={}",
        class.e, class.ev, class.causal
    );
    tuner.fastest(&candidates, &what, time)
}
