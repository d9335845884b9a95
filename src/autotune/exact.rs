//! Tiles of the exact kernel measured on this adapter per shape class.

use std::time::Instant;

use super::{fastest_candidate, forced_or_tuned, TUNE_WARMUP_RUNS};
use crate::api::Problem;
use crate::budget::Budget;
use crate::device::Gpu;
use crate::error::Error;
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
