//! Tiles of the exact kernel measured on this adapter per shape class.

use std::time::Instant;

use super::{fastest_candidate, forced_or_tuned, TUNE_WARMUP_RUNS};
use crate::api::{Method, PolyOptions, Problem};
use crate::budget::Budget;
use crate::device::Gpu;
use crate::error::Error;
use crate::exact::coop::{self, CoopExactPlan, CoopExactTiles};
use crate::exact::plan::{
    exact_candidates, exact_tiles_fit, plan_exact, plan_exact_with, ExactPlan, ExactTiles,
};
use crate::exact::run::run as exact_run;
use crate::launch::RunOptions;

/// The exact plan, with tiles measured on this adapter for the shape class (E, Ev, causal, fast
/// memory) when a tuned entry is cached or the autotune times the candidates now (see
/// [`autotune_on`]; the tests turn it off); otherwise the planner's default.
pub(crate) fn exact_plan_for(
    gpu: &Gpu,
    p: &Problem,
    budget: &Budget,
    opts: RunOptions,
) -> Result<ExactPlan, Error> {
    let default = plan_exact(p, budget)?;
    // Tiny problems get tiles capped by L and S; the fast memory may be capped for tests.
    if p.l < 64 || p.s < 64 {
        return Ok(default);
    }
    let class = format!(
        "{} {} {} {}",
        p.e,
        p.ev,
        u8::from(p.causal),
        budget.fast_memory_words
    );
    let forced = ("APPROX_ATTN_EXACT_TILES", "bq bk tq tk split_v");
    let (tuned, forced) = forced_or_tuned(
        gpu,
        forced,
        "exact-tiles",
        (&class, opts.trusted),
        5,
        || {
            let t = autotune_exact(gpu, p, budget, opts)?;
            Ok(vec![t.bq, t.bk, t.tq, t.tk, usize::from(t.split_v)])
        },
    )?;
    let Some(tuned) = tuned else {
        return Ok(default);
    };
    let t = ExactTiles {
        e: p.e,
        ev: p.ev,
        bq: tuned[0],
        bk: tuned[1],
        tq: tuned[2],
        tk: tuned[3],
        split_v: tuned[4] != 0,
    };
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

/// Times every candidate tile shape on a problem of this shape class and returns the fastest.
fn autotune_exact(
    gpu: &Gpu,
    p: &Problem,
    budget: &Budget,
    opts: RunOptions,
) -> Result<ExactTiles, Error> {
    // Many waves of workgroups on a GPU: at 2048^2 (under one wave of 64-row query tiles on an
    // H100) the ranking favoured small tiles. Small on CPU drivers, where each candidate also
    // compiles slowly.
    let n = if gpu.info.device_type == "Cpu" {
        512
    } else {
        16384
    };
    let class = Problem {
        units: 8,
        group: 1,
        l: n,
        s: n,
        ..*p
    };
    let x = |w: usize| -> Vec<f32> {
        (0..class.units * n * w)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
            .collect()
    };
    let (q, k, v) = (x(p.e), x(p.e), x(p.ev));
    let opts = RunOptions {
        count_io: false,
        ..opts
    };
    let candidates = exact_candidates(&class, budget);
    let time = |t: ExactTiles| -> Result<f64, Error> {
        let plan = plan_exact_with(&class, budget, t)?;
        let start = Instant::now();
        let (_, st) = exact_run(gpu, &class, &plan, &q, &k, &v, &opts)?;
        Ok(st.kernel_s.unwrap_or_else(|| start.elapsed().as_secs_f64()))
    };
    // The GPU raises its clocks under load: a few runs first, so that the first candidates are
    // not timed at idle clocks; then every candidate once to compile it.
    if let Some(&t) = candidates.first() {
        for _ in 0..TUNE_WARMUP_RUNS {
            time(t)?;
        }
    }
    for &t in &candidates {
        time(t)?;
    }
    let what = format!("exact E={} Ev={} causal={}", p.e, p.ev, p.causal);
    fastest_candidate(&candidates, &what, time)
}

/// The plan of exact attention on cooperative matrices where this call runs it: `tensor_cores`
/// `Some(true)`, or `None` with float16 inputs, and an exact run (method exact, or auto, which
/// falls back to exact). Errors where `Some(true)` asks for what the adapter lacks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn coop_exact_plan(
    gpu: &Gpu,
    p: &Problem,
    budget: &Budget,
    method: Method,
    popts: &PolyOptions,
    opts: &RunOptions,
    f16_inputs: bool,
) -> Result<Option<CoopExactPlan>, Error> {
    let wanted = popts.tensor_cores.unwrap_or(f16_inputs);
    let sg = coop::available(gpu);
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
    let planned = match coop::plan(p, budget, sg) {
        Ok(plan) => plan,
        Err(e) if popts.tensor_cores == Some(true) => return Err(e),
        Err(_) => return Ok(None), // float16 inputs run the f32 kernel where no tile fits
    };
    if p.l < 64 || p.s < 64 {
        return Ok(Some(planned));
    }
    let class = format!(
        "{} {} {} {} {sg}",
        p.e,
        p.ev,
        u8::from(p.causal),
        budget.fast_memory_words
    );
    let forced = ("APPROX_ATTN_COOP_EXACT_TILES", "subgroups rt bk");
    let (tuned, forced) = forced_or_tuned(
        gpu,
        forced,
        "coop-exact-tiles",
        (&class, opts.trusted),
        3,
        || {
            let t = autotune_coop_exact(gpu, p, budget, sg, *opts)?;
            Ok(vec![t.subgroups, t.rt, t.bk])
        },
    )?;
    let Some(tuned) = tuned else {
        return Ok(Some(planned));
    };
    let t = CoopExactTiles {
        subgroups: tuned[0],
        rt: tuned[1],
        bk: tuned[2],
        ..planned.tiles
    };
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

/// Times the coop exact candidates on an 8-head 16384^2 problem of this shape class (as
/// [`autotune_exact`] does for the f32 kernel) and returns the fastest.
fn autotune_coop_exact(
    gpu: &Gpu,
    p: &Problem,
    budget: &Budget,
    sg: usize,
    opts: RunOptions,
) -> Result<CoopExactTiles, Error> {
    let n = 16384;
    let class = Problem {
        units: 8,
        group: 1,
        l: n,
        s: n,
        ..*p
    };
    let x = |w: usize| -> Vec<f32> {
        (0..class.units * n * w)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
            .collect()
    };
    let (q, k, v) = (x(p.e), x(p.e), x(p.ev));
    let opts = RunOptions {
        count_io: false,
        ..opts
    };
    let candidates = coop::candidates(&class, budget, sg);
    let time = |t: CoopExactTiles| -> Result<f64, Error> {
        let plan = coop::plan_with(&class, budget, t)?;
        let start = Instant::now();
        let (_, st) = coop::run(gpu, &class, &plan, &q, &k, &v, &opts)?;
        Ok(st.kernel_s.unwrap_or_else(|| start.elapsed().as_secs_f64()))
    };
    if let Some(&t) = candidates.first() {
        for _ in 0..TUNE_WARMUP_RUNS {
            time(t)?;
        }
    }
    let what = format!("coop exact E={} Ev={} causal={}", p.e, p.ev, p.causal);
    fastest_candidate(&candidates, &what, time)
}
