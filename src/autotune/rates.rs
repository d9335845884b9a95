//! The calibration behind `auto`: throughputs of the exact and the f32 poly kernels per class.

use std::fmt;

use super::bench_inputs;
use super::exact::exact_plan_for;
use super::poly::{f32_poly, F32Tiles};
use super::Tuner;
use crate::api::Problem;
use crate::error::Error;
use crate::exact::cost::exact_flops;
use crate::exact::kernel::shader_source;
use crate::exact::plan::plan_exact;
use crate::exact::run::run as exact_run;
use crate::launch::RunStats;
use crate::poly::causal::{causal_poly_flops, diag_source, plan_causal, scan_source};
use crate::poly::cost::poly_flops;
use crate::poly::kernel_f32::{pass1_source, pass2_source, pass2_source_causal};
use crate::poly::plan::plan_poly;

/// Effective throughputs (FLOP/s) of the two kernel families on one adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub exact_flops_per_s: f64,
    pub poly_flops_per_s: f64,
}

/// The class whose rates are measured together: the caller's head sizes and poly degree.
struct RatesClass {
    e: usize,
    ev: usize,
    degree: usize,
    /// Causal calls get a class of their own (causal poly adds the diagonal blocks and the scan).
    causal: bool,
}

impl fmt::Display for RatesClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let causal = if self.causal { " causal" } else { "" };
        write!(f, "{} {} {}{causal}", self.e, self.ev, self.degree)
    }
}

/// Throughputs of the exact and the f32 poly kernels on this adapter for the caller's head
/// sizes, poly degree and shader mode, measured once per such class (an exact and a poly run of
/// that class, with the tiles the caller's calls use) and cached on disk;
/// `APPROX_ATTN_RATES="exact_flops_per_s poly_flops_per_s"` overrides them. A fixed class
/// (E = 64, degree 2, checks on) made a first `auto` call tune two classes it did not use.
pub(crate) fn rates(tuner: &Tuner, caller: &Problem, degree: usize) -> Result<Rates, Error> {
    if let Some((exact, poly)) = tuner.cfg.rates.clone()? {
        return Ok(Rates {
            exact_flops_per_s: exact,
            poly_flops_per_s: poly,
        });
    }
    let p = rates_problem(tuner, caller);
    let class = tuner.mode_class(&RatesClass {
        e: caller.e,
        ev: caller.ev,
        degree,
        causal: caller.causal,
    });
    let kernels = || {
        let mut k = vec![];
        if let Ok(plan) = plan_exact(&p, tuner.budget) {
            k.push(shader_source(&plan.tiles, false));
        }
        if let Ok(plan) = plan_poly(&p, degree, tuner.budget) {
            k.push(pass1_source(&plan.pass1, false));
            k.push(pass2_source(&plan.pass2, false));
            // Causal classes are timed on the causal schedule: its own kernels count too.
            let causal_plan = plan_causal(&p, &plan, tuner.budget)
                .ok()
                .filter(|_| p.causal);
            if let Some(cp) = causal_plan {
                k.push(pass2_source_causal(&plan.pass2, false));
                k.push(diag_source(&cp.diag, false));
                k.push(scan_source(false));
            }
        }
        k
    };
    let fp = tuner.fingerprint("rates", &class, kernels);
    let file = tuner.cache("rates");
    let parse = |v: &[&str]| match v {
        [a, b] => {
            let (a, b) = (a.parse::<f64>().ok()?, b.parse::<f64>().ok()?);
            (a > 0.0 && b > 0.0).then_some(Rates {
                exact_flops_per_s: a,
                poly_flops_per_s: b,
            })
        }
        _ => None,
    };
    if let Some(r) = file.load(&class, fp, parse) {
        return Ok(r);
    }
    // Two timed runs of each kernel: seconds on a GPU, longer on CPU drivers; say so once.
    eprintln!(
        "approx_attn: measuring the exact and poly rates for class ({class}) on {} once; cached in \
         {} (APPROX_ATTN_RATES sets them)",
        tuner.gpu.info.adapter,
        file.path()
            .map_or("no cache".into(), |f| f.display().to_string())
    );
    let start = std::time::Instant::now();
    let r = measure(tuner, &p, degree)?;
    eprintln!(
        "approx_attn: measured rates ({class}) in {:.1} s: exact {:.3e} FLOP/s, poly {:.3e} FLOP/s",
        start.elapsed().as_secs_f64(),
        r.exact_flops_per_s,
        r.poly_flops_per_s
    );
    let values = [r.exact_flops_per_s, r.poly_flops_per_s].map(|x| x.to_string());
    file.store(&class, fp, &[values.join(" ")]);
    Ok(r)
}

/// The problem the rates are measured on. GPUs get one that fills them: on the H100 the 1024^2
/// single-head problem used 32 workgroups and gave rates 20x below the kernels' real ones. CPU
/// drivers keep it small (every kernel runs for seconds there).
fn rates_problem(tuner: &Tuner, caller: &Problem) -> Problem {
    let (units, n) = if tuner.gpu.info.device_type == "Cpu" {
        (1, 1024)
    } else {
        (8, 2048)
    };
    Problem {
        units,
        group: 1,
        l: n,
        s: n,
        e: caller.e,
        ev: caller.ev,
        causal: caller.causal,
        scale: 0.05,
    }
}

/// Times an exact and an f32 poly run of `p` (each after a warm-up run) with the tiles the
/// caller's calls use.
fn measure(tuner: &Tuner, p: &Problem, degree: usize) -> Result<Rates, Error> {
    let tuner = &Tuner {
        opts: tuner.timing_opts(),
        ..*tuner
    };
    let (q, k, v) = bench_inputs(p, 1.0);
    let timed = |f: &mut dyn FnMut() -> Result<RunStats, Error>| -> Result<f64, Error> {
        f()?; // warm-up: compiles the pipelines
        let t = std::time::Instant::now();
        let st = f()?;
        Ok(st
            .kernel_s
            .unwrap_or_else(|| t.elapsed().as_secs_f64())
            .max(1e-9))
    };
    let eplan = exact_plan_for(tuner, p)?;
    let te = timed(&mut || exact_run(tuner.gpu, p, &eplan, &q, &k, &v, &tuner.opts).map(|r| r.1))?;
    // The f32 poly path with the tiles `attention` would run (tuned where the autotune is on,
    // as for exact above), and the plan whose FLOPs `poly_flops` counts.
    let mut pplan = None;
    let tp = timed(&mut || {
        let mut st = RunStats::default();
        let xs = (&q[..], &k[..], &v[..]);
        let (_, c) = f32_poly(
            tuner,
            (p, &eplan.chunking),
            xs,
            degree,
            F32Tiles::Tuned,
            &mut st,
        )?;
        pplan = Some(c.plan);
        Ok(st)
    })?;
    let pplan = pplan.expect("the timed poly run sets its plan");
    let poly_flops = if p.causal {
        causal_poly_flops(p, &plan_causal(p, &pplan, tuner.budget)?)
    } else {
        poly_flops(p, &pplan)
    };
    Ok(Rates {
        exact_flops_per_s: exact_flops(p) / te,
        poly_flops_per_s: poly_flops / tp,
    })
}
