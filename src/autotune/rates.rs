//! The calibration behind `auto`: throughputs of the exact and the f32 poly kernels per class.

use super::exact::exact_plan_for;
use super::poly::{f32_poly, F32Tiles};
use super::{adapter_key, mode_class};
use crate::api::Problem;
use crate::autotune::cache::load_rates;
use crate::autotune::cache::store_rates;
use crate::budget::Budget;
use crate::device::Gpu;
use crate::error::Error;
use crate::exact::cost::exact_flops;
use crate::exact::run::run as exact_run;
use crate::launch::{RunOptions, RunStats};
use crate::poly::cost::poly_flops;

/// Effective throughputs (FLOP/s) of the two kernel families on one adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub exact_flops_per_s: f64,
    pub poly_flops_per_s: f64,
}

/// Throughputs of the exact and the f32 poly kernels on this adapter for the caller's head
/// sizes, poly degree and shader mode, measured once per such class (an exact and a poly run of
/// that class, with the tiles the caller's calls use) and cached on disk;
/// `APPROX_ATTN_RATES="exact_flops_per_s poly_flops_per_s"` overrides them. A fixed class
/// (E = 64, degree 2, checks on) made a first `auto` call tune two classes it did not use.
pub(crate) fn rates(
    gpu: &Gpu,
    budget: &Budget,
    caller: &Problem,
    degree: usize,
    opts: RunOptions,
) -> Result<Rates, Error> {
    if let Ok(s) = std::env::var("APPROX_ATTN_RATES") {
        let v: Vec<f64> = s
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if v.len() == 2 && v[0] > 0.0 && v[1] > 0.0 {
            return Ok(Rates {
                exact_flops_per_s: v[0],
                poly_flops_per_s: v[1],
            });
        }
        return Err(Error::InvalidInput(format!(
            "APPROX_ATTN_RATES={s:?} is not two positive numbers"
        )));
    }
    let key = adapter_key(gpu);
    let class = mode_class(
        &format!("{} {} {degree}", caller.e, caller.ev),
        opts.trusted,
    );
    if let Some(r) = load_rates(&key, &class) {
        return Ok(r);
    }
    // GPUs get a problem that fills them: on the H100 the 1024^2 single-head problem used 32
    // workgroups and gave rates 20x below the kernels' real ones. CPU drivers keep it small
    // (every kernel runs for seconds there).
    let (units, n) = if gpu.info.device_type == "Cpu" {
        (1, 1024)
    } else {
        (8, 2048)
    };
    let p = Problem {
        units,
        group: 1,
        l: n,
        s: n,
        e: caller.e,
        ev: caller.ev,
        causal: false,
        scale: 0.05,
    };
    let x = |w: usize| -> Vec<f32> {
        (0..units * n * w)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
            .collect()
    };
    let (qk, v) = (x(p.e), x(p.ev));
    let opts = RunOptions {
        count_io: false,
        ..opts
    };
    let timed = |f: &mut dyn FnMut() -> Result<RunStats, Error>| -> Result<f64, Error> {
        f()?; // warm-up: compiles the pipelines
        let t = std::time::Instant::now();
        let st = f()?;
        Ok(st
            .kernel_s
            .unwrap_or_else(|| t.elapsed().as_secs_f64())
            .max(1e-9))
    };
    let eplan = exact_plan_for(gpu, &p, budget, opts)?;
    let te = timed(&mut || exact_run(gpu, &p, &eplan, &qk, &qk, &v, &opts).map(|r| r.1))?;
    // The f32 poly path with the tiles `attention` would run (tuned where the autotune is on,
    // as for exact above), and the plan whose FLOPs `poly_flops` counts.
    let mut pplan = None;
    let tp = timed(&mut || {
        let mut st = RunStats::default();
        let xs = (&qk[..], &qk[..], &v[..]);
        let (_, c) = f32_poly(
            gpu,
            &p,
            &eplan.chunking,
            xs,
            degree,
            budget,
            &opts,
            F32Tiles::Tuned,
            &mut st,
        )?;
        pplan = Some(c.plan);
        Ok(st)
    })?;
    let pplan = pplan.expect("the timed poly run sets its plan");
    let r = Rates {
        exact_flops_per_s: exact_flops(&p) / te,
        poly_flops_per_s: poly_flops(&p, &pplan) / tp,
    };
    store_rates(&key, &class, &r);
    Ok(r)
}
