//! approx_attn: I/O-aware exact and polynomial attention on any GPU wgpu reaches.
//!
//! Data flows one way: host arrays -> [`attention`] validates them and picks a method ->
//! `<method>::plan` picks tiles for this adapter (tuned by [`autotune`] where the cache has them)
//! -> `<method>::kernel` generates WGSL -> [`launch`] dispatches it, [`transfer`] moves the slices
//! -> host arrays and a [`Report`]. Planning, fitting, certification and I/O counting never touch
//! the GPU.

pub mod api;
pub mod autotune;
pub mod budget;
pub mod chunking;
pub mod device;
pub mod error;
pub mod exact;
pub mod io;
pub mod launch;
pub mod poly;
pub mod transfer;
pub mod wgsl;

#[cfg(feature = "python")]
mod python;
use crate::exact::cost::exact_flops;
use crate::exact::io::exact_io;
use crate::exact::plan::plan_exact;
use crate::exact::run::run as exact_run;
use crate::poly::cost::poly_flops;
use crate::poly::fit::choose_degree;
use crate::poly::io::poly_io;
use crate::poly::io::prepass_io;
use crate::poly::prepass::prepass;
use crate::poly::run::run as poly_run;

use std::time::Instant;

pub use api::{
    Certificate, IoEstimate, Method, PolyOptions, Problem, Report, Schedule, TiledPolyRun,
};
pub use budget::{budget, Budget};
pub use error::Error;
pub use launch::{RunOptions, RunStats};
pub use poly::certificate::MAX_DEGREE;

use autotune::exact::{coop_exact_plan, exact_plan_for};
use autotune::poly::{f32_poly, tune_coop_plan, tune_f32_poly_plan, F32Tiles};
use autotune::rates::rates;
use poly::certificate::poly_candidate;
use poly::plan::{plan_poly, Pass1Tiles, Pass2Tiles};
use transfer::Uploads;

/// Attention on the process's GPU. Arrays are contiguous, laid out as in [`Problem`].
pub fn attention(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    method: Method,
    popts: &PolyOptions,
    opts: &RunOptions,
) -> Result<(Vec<f32>, Report), Error> {
    attention_with_inputs(p, q, k, v, method, popts, opts, false)
}

/// [`attention`] for inputs that were float16 (`f16_inputs`): as in PyTorch, precision follows
/// the dtype, so exact attention runs on cooperative matrices there (where the adapter has them)
/// unless `popts.tensor_cores` says otherwise; float32 inputs keep the f32 kernel unless it says
/// `Some(true)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_with_inputs(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    method: Method,
    popts: &PolyOptions,
    opts: &RunOptions,
    f16_inputs: bool,
) -> Result<(Vec<f32>, Report), Error> {
    check_lengths(p, q, k, v)?;
    if method != Method::Exact && p.causal && popts.tensor_cores == Some(true) {
        return Err(Error::Unsupported(
            "tensor_cores=True is not implemented for causal poly yet; use tensor_cores=None or \
             False (the f32 path)"
                .into(),
        ));
    }
    if !(popts.eps > 0.0 && popts.eps < 1.0) {
        return Err(Error::InvalidInput(format!(
            "eps must lie in (0, 1), got {}",
            popts.eps
        )));
    }
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let start = Instant::now();
    let budget = budget(&gpu.info)?;
    let coop_exact = coop_exact_plan(&gpu, p, &budget, method, popts, opts, f16_inputs)?;
    // method='poly' uses the exact plan only for the pre-pass chunking: the planner's tiles do,
    // without timing the exact kernel's candidates (nor does exact on tensor cores).
    let exact_plan = if method == Method::Poly || coop_exact.is_some() {
        plan_exact(p, &budget)?
    } else {
        exact_plan_for(&gpu, p, &budget, *opts)?
    };
    let mut stats = RunStats::default();
    let mut predicted_exact_s = None;
    let mut predicted_poly_s = None;
    let mut reason = String::new();

    // K, V and Q go to the GPU once for the pre-pass and both poly passes.
    let uploads = Uploads::default();
    let mut candidate = None;
    let mut causal_plan = None; // causal poly: the chunked schedule over the candidate's tiles
    let mut pre = None;
    if method != Method::Exact && p.l > 0 {
        let pp = prepass(
            gpu.as_ref(),
            p,
            &exact_plan.chunking,
            q,
            k,
            v,
            &budget,
            opts,
            &uploads,
            &mut stats,
        )?;
        if popts.check_finite {
            for (name, bad) in ["query", "key", "value"].iter().zip(pp.nonfinite) {
                if bad > 0 {
                    return Err(Error::InvalidInput(format!(
                        "{name} contains {bad} NaN or Inf value(s) (after conversion to \
                         float32); pass check_finite=False to skip this check"
                    )));
                }
            }
        }
        let coop_sg = (gpu.info.coop_f16 && !p.causal).then_some(gpu.info.subgroup_size as usize);
        match poly_candidate(p, &pp, popts, &budget, coop_sg) {
            Ok(mut c) => {
                tune_coop_plan(gpu.as_ref(), p, &mut c, &budget, *opts)?;
                tune_f32_poly_plan(gpu.as_ref(), p, &mut c, &budget, *opts)?;
                if p.causal {
                    match poly::causal::plan_causal(p, &c.plan, &budget) {
                        Ok(cp) => {
                            causal_plan = Some(cp);
                            candidate = Some(c);
                        }
                        Err(e) if method == Method::Poly => return Err(e),
                        Err(e) => reason = format!("exact: poly is not applicable ({e})"),
                    }
                } else {
                    candidate = Some(c);
                }
            }
            Err(e) if method == Method::Poly => return Err(e),
            Err(e) => reason = format!("exact: poly is not applicable ({e})"),
        }
        pre = Some(pp);
    } else if method == Method::Auto {
        reason = "exact: empty query".into();
    }
    if let Some(c) = &candidate {
        if method == Method::Auto {
            let r = rates(gpu.as_ref(), &budget, p, c.cert.degree, *opts)?;
            let te = exact_flops(p) / r.exact_flops_per_s;
            let flops = match &causal_plan {
                Some(cp) => poly::causal::causal_poly_flops(p, cp),
                None => poly_flops(p, &c.plan),
            };
            let tp = flops / r.poly_flops_per_s;
            predicted_exact_s = Some(te);
            predicted_poly_s = Some(tp);
            reason = if tp < te {
                format!("poly: certifies eps at degree {} and is predicted faster ({tp:.3e} s vs {te:.3e} s)", c.cert.degree)
            } else {
                format!(
                    "exact: predicted faster ({te:.3e} s vs poly {tp:.3e} s at degree {})",
                    c.cert.degree
                )
            };
        } else {
            reason = "poly: requested".into();
        }
    }
    let use_poly = match (&candidate, method) {
        (Some(_), Method::Poly) => true,
        (Some(_), Method::Auto) => predicted_poly_s < predicted_exact_s,
        _ => false,
    };
    if method == Method::Exact {
        reason = "exact: requested".into();
    }

    let mut exact_f16 = None;
    let (out, io, plan_text, certificate, name) = if p.l == 0 || p.units == 0 {
        (
            Vec::new(),
            io::IoCount::default(),
            "empty".to_string(),
            None,
            "exact",
        )
    } else if use_poly {
        let c = candidate.expect("checked above");
        let pre = pre.expect("pre-pass ran");
        if let Some(cp) = &causal_plan {
            let out = poly::causal::run(
                gpu.as_ref(),
                p,
                cp,
                &c.table,
                &c.poly,
                &pre,
                (q, k, v),
                opts,
                &uploads,
                &mut stats,
            )?;
            let io = poly::causal::causal_io(p, cp, &exact_plan.chunking, &budget);
            (out, io, format!("{cp:?}"), Some(c.cert), "poly")
        } else {
            let out = poly_run(
                gpu.as_ref(),
                p,
                &c.plan,
                &c.table,
                &c.poly,
                &pre,
                q,
                k,
                v,
                opts,
                &uploads,
                &mut stats,
            )?;
            let io = poly_io(p, &c.plan, &exact_plan.chunking, &budget);
            (out, io, format!("{:?}", c.plan), Some(c.cert), "poly")
        }
    } else if let Some(cplan) = &coop_exact {
        uploads.clear();
        exact_f16 = Some(exact::coop::f16_bound(p, q, k, v)?);
        let (out, st) = exact::coop::run(&gpu, p, cplan, q, k, v, opts)?;
        stats.absorb(&st);
        // The f32 kernel's words: the same storage reads (f32) per query block of bq rows.
        let as_f32 = exact::plan::ExactPlan {
            tiles: exact::plan::ExactTiles {
                bq: cplan.tiles.bq(),
                ..exact_plan.tiles
            },
            chunking: cplan.chunking,
        };
        let mut io = exact_io(p, &as_f32);
        if let Some(pre_cost) = pre
            .as_ref()
            .map(|_| prepass_io(p, &exact_plan.chunking, &budget))
        {
            io.passes.splice(0..0, pre_cost.passes);
        }
        (out, io, format!("{cplan:?}"), None, "exact")
    } else {
        uploads.clear();
        let (out, st) = exact_run(&gpu, p, &exact_plan, q, k, v, opts)?;
        stats.absorb(&st);
        let mut io = exact_io(p, &exact_plan);
        if let Some(pre_cost) = pre
            .as_ref()
            .map(|_| prepass_io(p, &exact_plan.chunking, &budget))
        {
            // auto paid for the pre-pass before choosing exact.
            io.passes.splice(0..0, pre_cost.passes);
        }
        (out, io, format!("{exact_plan:?}"), None, "exact")
    };
    let tensor_cores = match name {
        "poly" => certificate
            .as_ref()
            .is_some_and(|c| c.f16_rounding.is_some()),
        _ => exact_f16.is_some(),
    };
    Ok((
        out,
        Report {
            tensor_cores,
            exact_f16,
            method: name,
            adapter: gpu.info.adapter.clone(),
            backend: gpu.info.backend.clone(),
            fast_memory_words: budget.fast_memory_words,
            io_words: io.total(),
            io_reads: io.reads(),
            io_writes: io.writes(),
            stats,
            elapsed_s: start.elapsed().as_secs_f64(),
            plan: plan_text,
            certificate,
            predicted_exact_s,
            predicted_poly_s,
            reason,
        },
    ))
}

/// Exact attention; see [`attention`].
pub fn exact_attention(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
) -> Result<(Vec<f32>, Report), Error> {
    let popts = PolyOptions {
        eps: 1e-3,
        degree: None,
        check_finite: false,
        tensor_cores: Some(false),
    };
    attention(p, q, k, v, Method::Exact, &popts, opts)
}

/// The f32 poly method at `degree` with these pass tiles (the autotune's candidates). For tests;
/// `attention` picks tiles itself.
#[allow(clippy::too_many_arguments)]
pub fn poly_attention_with_tiles(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    degree: usize,
    pass1: Pass1Tiles,
    pass2: Pass2Tiles,
    opts: &RunOptions,
) -> Result<TiledPolyRun, Error> {
    check_lengths(p, q, k, v)?;
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let budget = budget(&gpu.info)?;
    // The pre-pass chunking `attention` uses for method="poly", which the I/O model assumes.
    let chunking = plan_exact(p, &budget)?.chunking;
    let mut st = RunStats::default();
    let tiles = F32Tiles::Given(pass1, pass2);
    let (out, c) = f32_poly(
        &gpu,
        p,
        &chunking,
        (q, k, v),
        degree,
        &budget,
        opts,
        tiles,
        &mut st,
    )?;
    let io = poly_io(p, &c.plan, &chunking, &budget);
    Ok(TiledPolyRun {
        out,
        beta: c.cert.beta,
        words_counted: st.io_words_counted,
        words_planned: (io.reads(), io.writes()),
    })
}

fn check_lengths(p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> Result<(), Error> {
    if p.s == 0 {
        return Err(Error::InvalidInput(
            "key/value sequence length S must be at least 1".into(),
        ));
    }
    if p.e == 0 || p.ev == 0 || p.group == 0 {
        return Err(Error::InvalidInput(
            "head dimensions must be at least 1".into(),
        ));
    }
    let want = [
        ("query", q.len(), p.units * p.group * p.l * p.e),
        ("key", k.len(), p.units * p.s * p.e),
        ("value", v.len(), p.units * p.s * p.ev),
    ];
    for (name, got, expect) in want {
        if got != expect {
            return Err(Error::InvalidInput(format!(
                "{name} has {got} elements, the problem {p:?} needs {expect}"
            )));
        }
    }
    Ok(())
}

pub fn io_cost(
    p: &Problem,
    method: Method,
    degree: Option<usize>,
    eps: Option<f64>,
    beta: Option<f64>,
    fast_memory_words: Option<u64>,
) -> Result<IoEstimate, Error> {
    let budget = match fast_memory_words {
        Some(m) => Budget::model(m),
        None => budget(&device::gpu()?.info)?,
    };
    let exact_plan = plan_exact(p, &budget)?;
    match method {
        Method::Exact => Ok(IoEstimate {
            method: "exact",
            schedule: None,
            degree: None,
            rank: None,
            fast_memory_words: budget.fast_memory_words,
            io: exact_io(p, &exact_plan),
        }),
        Method::Poly | Method::Auto => {
            let g = match (degree, eps, beta) {
                (Some(g), _, _) => g,
                (None, Some(eps), Some(beta)) => {
                    if !(eps > 0.0 && eps < 1.0 && beta >= 0.0 && beta.is_finite()) {
                        return Err(Error::InvalidInput(format!(
                            "need 0 < eps < 1 and finite beta >= 0, got eps={eps}, beta={beta}"
                        )));
                    }
                    let poly =
                        choose_degree(beta, eps / (1.0 + eps), MAX_DEGREE).ok_or_else(|| {
                            Error::TooLarge(format!(
                                "no degree <= {MAX_DEGREE} certifies eps={eps} at beta={beta}"
                            ))
                        })?;
                    poly.feature_degree()
                }
                _ => {
                    return Err(Error::InvalidInput(
                        "method='poly' needs degree=, or eps= and beta= to choose the degree"
                            .into(),
                    ))
                }
            };
            let plan = plan_poly(p, g, &budget)?;
            if p.causal {
                let cp = poly::causal::plan_causal(p, &plan, &budget)?;
                return Ok(IoEstimate {
                    method: "poly",
                    schedule: Some(plan.schedule),
                    degree: Some(g),
                    rank: Some(plan.r),
                    fast_memory_words: budget.fast_memory_words,
                    io: poly::causal::causal_io(p, &cp, &exact_plan.chunking, &budget),
                });
            }
            Ok(IoEstimate {
                method: "poly",
                schedule: Some(plan.schedule),
                degree: Some(g),
                rank: Some(plan.r),
                fast_memory_words: budget.fast_memory_words,
                io: poly_io(p, &plan, &exact_plan.chunking, &budget),
            })
        }
    }
}
