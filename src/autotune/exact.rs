//! Tiles of the exact kernel measured on this adapter per shape class.

use std::fmt;
use std::time::Instant;

use super::{sizes_and_flags, TileRecord, Tuner, TUNE_WARMUP_RUNS};
use crate::api::Problem;
use crate::error::Error;
use crate::exact::kernel::shader_source;
use crate::exact::plan::{
    exact_candidates, exact_tiles_fit, plan_exact, plan_exact_with, ExactPlan, ExactTiles,
};
use crate::exact::run::run as exact_run;

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
    let n = class.l;
    let x = |w: usize| -> Vec<f32> {
        (0..class.units * n * w)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
            .collect()
    };
    let (q, k, v) = (x(class.e), x(class.e), x(class.ev));
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
    for &t in &candidates {
        time(t)?;
    }
    let what = format!(
        "exact E={} Ev={} causal={}",
        class.e, class.ev, class.causal
    );
    tuner.fastest(&candidates, &what, time)
}
