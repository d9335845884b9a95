//! approx_attn: I/O-aware exact and polynomial attention on any GPU wgpu reaches.
//!
//! Data flows one way: host arrays -> [`attention`] validates them and picks a method ->
//! `<method>::plan` picks tiles for this adapter (tuned by [`autotune`] where the cache has them)
//! -> `<method>::kernel*` generates WGSL -> [`launch`] dispatches it, [`transfer`] moves the
//! slices -> host arrays and a [`Report`]. Planning, fitting, certification and I/O counting
//! never touch the GPU.

pub mod api;
pub mod autotune;
pub mod budget;
pub mod chunking;
pub mod config;
pub mod device;
pub mod error;
pub mod exact;
pub mod half;
pub mod host_io;
pub mod interrupt;
pub mod io;
pub mod launch;
pub mod numerics;
mod parallel;
pub mod poly;
mod progress;
pub mod report;
pub mod traffic;
pub mod transfer;
pub mod wgsl;

#[cfg(feature = "python")]
mod python;

use std::time::Instant;

pub use api::{Certificate, Method, PolyOptions, Problem, Schedule, TiledPolyRun};
pub use budget::{budget, Budget};
pub use error::Error;
pub use launch::{RunOptions, RunStats};
pub use poly::certificate::MAX_DEGREE;
pub use report::{IoEstimate, Report};

use autotune::exact::{coop_exact_plan, exact_plan_for};
use autotune::poly::{f32_poly, tune_coop_plan, tune_f32_poly_plan, F32Tiles};
use autotune::rates::rates;
use autotune::Tuner;
use config::Config;
use exact::coop::{CoopExactPlan, F16Bound};
use exact::cost::exact_flops;
use exact::io::{exact_io, exact_io_checked, exact_io_for};
use exact::plan::{plan_exact, ExactPlan};
use exact::run::run_into as exact_run_into;
use exact::storage::{f16_input_rounding, F16Inputs, Storage};
use io::IoCount;
use numerics::{
    all_finite, score_fold_for, times_pow2, value_columns, Magnitudes, ScoreFold, ValueMap,
};
use poly::causal::{causal_io, causal_poly_flops, plan_causal, plan_causal_with, CausalPlan};
use poly::certificate::{causal_poly_candidate, poly_candidate, poly_for_eps, PolyCandidate};
use poly::cost::poly_flops;
use poly::io::{poly_io, prepass_io};
use poly::plan::{plan_poly, Pass1Tiles, Pass2Tiles};
use poly::prepass::{prepass, Prepass};
use poly::run::run_into as poly_run_into;
use transfer::{assign_slice, timed, HostStage, Uploads};

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
    attention_with_inputs(p, q, k, v, method, popts, opts, false, None)
}

/// [`attention`] for inputs that were float16 (`f16_inputs`): as in PyTorch, precision follows
/// the dtype, so exact attention runs on cooperative matrices there (where the adapter has them)
/// unless `popts.tensor_cores` says otherwise; float32 inputs keep the f32 kernel unless it says
/// `Some(true)`. With `f16_storage` (the inputs as f16, packed) the exact kernel (f32 or on
/// tensor cores) reads them from f16 storage instead (half the words), where its operands are
/// those values: not after a rebalancing of extreme scores or a mapping of the values (then it
/// reads `q`, `k`, `v`).
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
    f16_storage: Option<&F16Inputs>,
) -> Result<(Vec<f32>, Report), Error> {
    let mut out = vec![0f32; p.query_heads() * p.l * p.ev];
    let report = attention_into(
        p,
        (q, k, v),
        method,
        popts,
        opts,
        f16_inputs,
        f16_storage,
        &mut out,
    )?;
    Ok((out, report))
}

/// [`attention_with_inputs`] writing the output `(units*group, l, ev)` into `out` (a caller's
/// array): no host copy of the inputs or the output beyond the slices in flight.
#[allow(clippy::too_many_arguments)]
pub fn attention_into(
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    method: Method,
    popts: &PolyOptions,
    opts: &RunOptions,
    f16_inputs: bool,
    f16_storage: Option<&F16Inputs>,
    out: &mut [f32],
) -> Result<Report, Error> {
    p.check_inputs(q, k, v)?;
    p.check_output(out)?;
    popts.check()?;
    let cfg = Config::from_env();
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let start = Instant::now();
    let traffic = gpu.traffic.now();
    let budget = Budget::for_device(&gpu.info, &cfg)?.for_problem(p)?;
    let tuner = Tuner {
        gpu: &gpu,
        cfg: &cfg,
        budget: &budget,
        opts: *opts,
    };
    let coop_exact = coop_exact_plan(&tuner, p, method, popts, f16_inputs)?;
    // f16 storage needs unpack2x16float; elsewhere the float32 copies (converted on the host) run.
    let f16_storage_off = match f16_storage {
        Some(_) if cfg.no_f16_storage => Some("APPROX_ATTN_NO_F16_STORAGE is set"),
        Some(_) if !gpu.info.f16_storage => Some("this adapter lacks unpack2x16float"),
        _ => None,
    };
    let f16_storage = f16_storage.filter(|_| f16_storage_off.is_none());
    // method='poly' uses the exact plan only for the pre-pass chunking: the planner's tiles do,
    // without timing the exact kernel's candidates (nor does exact on tensor cores).
    let exact_plan = if method == Method::Poly || coop_exact.is_some() {
        plan_exact(p, &budget)?
    } else {
        exact_plan_for(&tuner, p)?
    };
    let mut stats = RunStats::default();
    // K, V and Q go to the GPU once for the pre-pass and both poly passes, unless they stream.
    let uploads = Uploads::new(budget.streams(p));
    let xs = (q, k, v);
    let choice = choose(
        &tuner,
        p,
        xs,
        method,
        popts,
        &exact_plan,
        &uploads,
        &mut stats,
    )?;
    let plans = (&exact_plan, coop_exact.as_ref());
    let (ran, note) = run_in_range(
        &tuner,
        p,
        xs,
        plans,
        &choice,
        f16_storage,
        &uploads,
        &mut stats,
        out,
    )?;
    let mut reason = match note {
        Some(n) => format!("{}; {n}", choice.reason),
        None => choice.reason,
    };
    if let Some(why) = f16_storage_off.filter(|_| ran.method == "exact") {
        reason.push_str(&format!(
            "; float32 storage ({why}): float16 inputs converted to float32 on the host"
        ));
    }
    drop(uploads);
    // Timestamps of dispatches no readback waited for.
    stats.absorb(&launch::settle_pending(&gpu, true)?);
    stats.traffic = traffic.until(gpu.traffic.now());
    Ok(Report {
        method: ran.method,
        adapter: gpu.info.adapter.clone(),
        backend: gpu.info.backend.clone(),
        fast_memory_words: budget.fast_memory_words,
        io_words: ran.io.total(),
        io_reads: ran.io.reads(),
        io_writes: ran.io.writes(),
        stats,
        elapsed_s: start.elapsed().as_secs_f64(),
        plan: ran.plan,
        certificate: ran.certificate,
        predicted_exact_s: choice.predicted.map(|p| p.0),
        predicted_poly_s: choice.predicted.map(|p| p.1),
        reason,
        tensor_cores: ran.tensor_cores,
        exact_f16: ran.exact_f16,
        storage: ran.storage,
        input_rounding: ran.input_rounding,
    })
}

/// What `attention` decided to run, and why.
struct Choice {
    /// The pre-pass, where it ran.
    pre: Option<Prepass>,
    /// The poly method's certificate and plan where it applies.
    candidate: Option<PolyCandidate>,
    /// Causal calls: the chunked schedule over the candidate's tiles.
    causal_plan: Option<CausalPlan>,
    use_poly: bool,
    /// Predicted seconds of (exact, poly) where `auto` compared them.
    predicted: Option<(f64, f64)>,
    reason: String,
}

/// Runs the pre-pass and certifies the poly method where `method` may use it, and picks the
/// method: as requested, or for `auto` the one predicted faster by the measured rates.
#[allow(clippy::too_many_arguments)]
fn choose(
    tuner: &Tuner,
    p: &Problem,
    xs: (&[f32], &[f32], &[f32]),
    method: Method,
    popts: &PolyOptions,
    exact_plan: &ExactPlan,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Choice, Error> {
    let mut choice = Choice {
        pre: None,
        candidate: None,
        causal_plan: None,
        use_poly: false,
        predicted: None,
        reason: String::new(),
    };
    if method == Method::Exact {
        choice.reason = "exact: requested".into();
        return Ok(choice);
    }
    if p.l == 0 {
        if method == Method::Auto {
            choice.reason = "exact: empty query".into();
        }
        return Ok(choice);
    }
    let chunking = &exact_plan.chunking;
    let pre = prepass(
        tuner.gpu,
        p,
        chunking,
        xs,
        tuner.budget,
        &tuner.opts,
        uploads,
        stats,
    )?;
    if popts.check_finite {
        check_prepass_finite(&pre)?;
    }
    let diag_sg = causal_diag_subgroup(tuner, p);
    let candidate = certified_candidate(tuner, p, &pre, popts, diag_sg);
    choice.pre = Some(pre);
    let (mut c, diag_tc) = match candidate {
        Ok(c) => c,
        Err(e) if method == Method::Poly => return Err(e),
        Err(e) => {
            choice.reason = format!("exact: poly is not applicable ({e})");
            return Ok(choice);
        }
    };
    tune_coop_plan(tuner, p, &mut c)?;
    tune_f32_poly_plan(tuner, p, &mut c)?;
    if p.causal {
        match plan_causal_with(p, &c.plan, tuner.budget, diag_sg.filter(|_| diag_tc)) {
            Ok(cp) => choice.causal_plan = Some(cp),
            Err(e) if method == Method::Poly => return Err(e),
            Err(e) => {
                choice.reason = format!("exact: poly is not applicable ({e})");
                return Ok(choice);
            }
        }
    }
    if let Some(pre) = &choice.pre {
        c.add_rounding(p, pre, choice.causal_plan.as_ref());
    }
    if method == Method::Poly {
        choice.reason = "poly: requested".into();
        choice.use_poly = true;
    } else {
        predict_auto(tuner, p, &c, &mut choice)?;
    }
    choice.candidate = Some(c);
    Ok(choice)
}

/// `check_finite`: the pre-pass's count of NaN or Inf per input, as an error naming the input.
fn check_prepass_finite(pre: &Prepass) -> Result<(), Error> {
    for (name, bad) in ["query", "key", "value"].iter().zip(pre.nonfinite) {
        if bad > 0 {
            return Err(Error::InvalidInput(format!(
                "{name} contains {bad} NaN or Inf value(s) (after conversion to \
                 float32); pass check_finite=False to skip this check"
            )));
        }
    }
    Ok(())
}

/// Causal poly runs its chunk passes in f32, its diagonal blocks on tensor cores where their
/// tiles fit (at the highest degree: the coefficients are the only part that grows with it):
/// the subgroup size there.
fn causal_diag_subgroup(tuner: &Tuner, p: &Problem) -> Option<usize> {
    poly::causal_coop::available(tuner.gpu).filter(|&sg| {
        p.causal && poly::causal_coop::plan_tiles(p, MAX_DEGREE, tuner.budget, sg, 16).is_some()
    })
}

/// The poly method's certificate and plan at the pre-pass's beta, and whether causal diagonal
/// blocks run on tensor cores (`diag_sg`: their subgroup size where they fit).
fn certified_candidate(
    tuner: &Tuner,
    p: &Problem,
    pre: &Prepass,
    popts: &PolyOptions,
    diag_sg: Option<usize>,
) -> Result<(PolyCandidate, bool), Error> {
    let info = &tuner.gpu.info;
    let coop_sg = (info.coop_f16 && !p.causal).then_some(info.subgroup_size as usize);
    let candidate = if p.causal {
        causal_poly_candidate(p, pre, popts, tuner.budget, diag_sg)
    } else {
        poly_candidate(p, pre, popts, tuner.budget, coop_sg).map(|c| (c, false))
    };
    candidate.and_then(|(c, diag_tc)| {
        match popts.degree.filter(|&g| c.cert.degree < g) {
            // The fit's top coefficients vanish: running it would run a lower degree under g.
            Some(g) => Err(Error::InvalidInput(format!(
                "degree={g} cannot run at beta={:.4}: the degree-{g} fit's coefficients above \
                 degree {} vanish below float precision (it certifies {:.1e} already); use \
                 degree <= {}",
                c.cert.beta, c.cert.degree, c.cert.poly_eps, c.cert.degree
            ))),
            None => Ok((c, diag_tc)),
        }
    })
}

/// `auto`: poly where its FLOPs at the measured rates take less time than exact's.
fn predict_auto(
    tuner: &Tuner,
    p: &Problem,
    c: &PolyCandidate,
    choice: &mut Choice,
) -> Result<(), Error> {
    let g = c.cert.degree;
    let r = rates(tuner, p, g)?;
    let te = exact_flops(p) / r.exact_flops_per_s;
    let flops = match &choice.causal_plan {
        Some(cp) => causal_poly_flops(p, cp),
        None => poly_flops(p, &c.plan),
    };
    let tp = flops / r.poly_flops_per_s;
    choice.predicted = Some((te, tp));
    choice.use_poly = tp < te;
    choice.reason = if tp < te {
        format!(
            "poly: certifies eps at degree {g} and is predicted faster ({tp:.3e} s vs {te:.3e} s)"
        )
    } else {
        format!("exact: predicted faster ({te:.3e} s vs poly {tp:.3e} s at degree {g})")
    };
    Ok(())
}

/// What ran (its output is in the caller's array): the words its plan moves, the plan, the
/// certificate and the method.
struct Ran {
    io: IoCount,
    plan: String,
    certificate: Option<Certificate>,
    method: &'static str,
    /// Whether the kernels used cooperative matrices, and the exact kernel's f16 bound there.
    tensor_cores: bool,
    exact_f16: Option<F16Bound>,
    /// The inputs' format in storage, and the bound on what rounding them to it added.
    storage: Storage,
    input_rounding: Option<f64>,
}

/// Runs the chosen method within float32's range ([`numerics`]): exact on score operands
/// rebalanced by powers of two where their magnitudes call for it, or an error where its scores
/// can overflow; where the output is not finite although the inputs are (value sums beyond
/// float32), once more on values mapped per column into [-1, 1]. A non-finite output from finite
/// inputs is an error, never a result. Returns what ran and a note for the report's reason where
/// the inputs were rescaled. `f16_storage` is used only on the operands it holds: not once the
/// scores are rebalanced or the values mapped.
#[allow(clippy::too_many_arguments)]
fn run_in_range(
    tuner: &Tuner,
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    plans: (&ExactPlan, Option<&CoopExactPlan>),
    choice: &Choice,
    f16_storage: Option<&F16Inputs>,
    uploads: &Uploads,
    stats: &mut RunStats,
    out: &mut [f32],
) -> Result<(Ran, Option<String>), Error> {
    let mut notes = Vec::new();
    let (fold, mags) = exact_score_fold(p, q, k, choice)?;
    let folded;
    let mut f16_storage = f16_storage;
    let (q, k, p) = match fold {
        Some(f) => {
            folded = (times_pow2(q, f.q_exp), times_pow2(k, f.k_exp));
            notes.push(format!("score operands rebalanced ({f})"));
            if f16_storage.take().is_some() {
                notes.push("float32 storage: the rebalanced operands are not float16".into());
            }
            let p = Problem {
                scale: f.scale,
                ..*p
            };
            (&folded.0[..], &folded.1[..], p)
        }
        None => (q, k, *p),
    };
    let p = &p;
    let before = stats.clone();
    let ran = run_choice(
        tuner,
        p,
        (q, k, v),
        plans,
        choice,
        choice.pre.as_ref(),
        f16_storage,
        uploads,
        stats,
        out,
    )?;
    if all_finite(out) {
        return Ok((ran, (!notes.is_empty()).then(|| notes.join("; "))));
    }
    // Not finite: NaN or Inf in (check_finite=False) runs as it is, as in PyTorch; from finite
    // inputs, the value sums overflowed (the scores cannot: see above).
    let Some((lo, hi)) = value_range_of_finite_inputs(p, (q, k, v), choice, mags) else {
        return Ok((ran, (!notes.is_empty()).then(|| notes.join("; "))));
    };
    let map = ValueMap::new(p, &lo, &hi);
    let mapped_v = map.apply(v);
    let mapped_pre = choice.pre.as_ref().map(|pre| {
        let (v_min, v_max) = map.mapped_range();
        Prepass {
            v_min,
            v_max,
            ..pre.clone()
        }
    });
    // The report describes the run that gave the result (after the pre-pass, if any).
    *stats = before;
    let mut ran = run_choice(
        tuner,
        p,
        (q, k, &mapped_v),
        plans,
        choice,
        mapped_pre.as_ref(),
        None,
        uploads,
        stats,
        out,
    )?;
    if !all_finite(out) {
        let bad = out.iter().filter(|x| !x.is_finite()).count();
        return Err(Error::InvalidInput(format!(
            "the {} kernel gave {bad} non-finite output value(s) of {} from finite inputs, even \
             with the values mapped into [-1, 1] per column: an intermediate of this call \
             leaves float32's range",
            ran.method,
            out.len()
        )));
    }
    map.restore(out);
    if let Some(b) = &mut ran.exact_f16 {
        for (x, s) in b.error_bound_per_column.iter_mut().zip(map.column_scale()) {
            *x *= s;
        }
    }
    notes.push("values mapped into [-1, 1] per column (their float32 sums overflowed)".into());
    Ok((ran, Some(notes.join("; "))))
}

/// The exact kernel's score operands rebalanced by powers of two where their magnitudes call for
/// it (the poly passes scale the keys by their largest norm: nothing to do there), and the
/// magnitudes that decided it. A cheap bound first (the pre-pass's where it ran, else the largest
/// elements'), the host's row norms where it does not settle the call.
fn exact_score_fold(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    choice: &Choice,
) -> Result<(Option<ScoreFold>, Option<Magnitudes>), Error> {
    let exact_runs = !choice.use_poly && p.l > 0 && p.units > 0;
    if !exact_runs {
        return Ok((None, None));
    }
    let quick = match &choice.pre {
        Some(pre) => Magnitudes::from_prepass(p, &pre.q_max_norm, &pre.k_max_norm, &pre.mu),
        None => Some(Magnitudes::quick(p, q, k)),
    };
    let (fold, m) = score_fold_for(p, q, k, quick)?;
    Ok((fold, Some(m)))
}

/// Each value column's (min, max) where every input is finite (from the pre-pass where it ran,
/// else from the host; `mags`: the score magnitudes already computed), else `None`.
fn value_range_of_finite_inputs(
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    choice: &Choice,
    mags: Option<Magnitudes>,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let (lo, hi, finite_inputs) = match &choice.pre {
        Some(pre) => (
            pre.v_min.clone(),
            pre.v_max.clone(),
            pre.nonfinite == [0; 3],
        ),
        None => {
            let cols = value_columns(p, v);
            let m = mags.unwrap_or_else(|| Magnitudes::of(p, q, k));
            (cols.min, cols.max, cols.nonfinite == 0 && m.finite())
        }
    };
    finite_inputs.then_some((lo, hi))
}

/// Runs the chosen method on these inputs (`pre`: the pre-pass, for the values given; the
/// exact kernels read `f16_storage` where given, the same values stored as f16).
#[allow(clippy::too_many_arguments)]
fn run_choice(
    tuner: &Tuner,
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (exact_plan, coop_exact): (&ExactPlan, Option<&CoopExactPlan>),
    choice: &Choice,
    pre: Option<&Prepass>,
    f16_storage: Option<&F16Inputs>,
    uploads: &Uploads,
    stats: &mut RunStats,
    out: &mut [f32],
) -> Result<Ran, Error> {
    if p.l == 0 || p.units == 0 {
        return Ok(Ran {
            io: IoCount::default(),
            plan: "empty".to_string(),
            certificate: None,
            method: "exact",
            tensor_cores: false,
            exact_f16: None,
            storage: Storage::F32,
            input_rounding: None,
        });
    }
    match (&choice.candidate, pre) {
        (Some(c), Some(pre)) if choice.use_poly => run_poly(
            tuner,
            p,
            (q, k, v),
            exact_plan,
            c,
            choice.causal_plan.as_ref(),
            pre,
            uploads,
            stats,
            out,
        ),
        _ => run_exact(
            tuner,
            p,
            (q, k, v),
            (exact_plan, coop_exact),
            pre.is_some(),
            f16_storage,
            uploads,
            stats,
            out,
        ),
    }
}

/// Runs the poly method (causal where `causal_plan` is given) on these inputs.
#[allow(clippy::too_many_arguments)]
fn run_poly(
    tuner: &Tuner,
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    exact_plan: &ExactPlan,
    c: &PolyCandidate,
    causal_plan: Option<&CausalPlan>,
    pre: &Prepass,
    uploads: &Uploads,
    stats: &mut RunStats,
    out: &mut [f32],
) -> Result<Ran, Error> {
    let (gpu, budget, opts) = (tuner.gpu, tuner.budget, &tuner.opts);
    let (plan, table, poly) = (&c.plan, &c.table, &c.poly);
    // The passes run on values centred and scaled per column (`poly::rounding`): their
    // rounding then scales with each column's range, not its magnitude.
    // Non-finite values (check_finite=False) run as they are.
    let finite = |x: &[f64]| x.iter().all(|y| y.is_finite());
    let map = (finite(&pre.v_min) && finite(&pre.v_max))
        .then(|| std::sync::Arc::new(ValueMap::new(p, &pre.v_min, &pre.v_max)));
    // V is mapped slice by slice as it is uploaded: no mapped host copy.
    let mapped = map.as_ref().map(|map| {
        uploads.map_input(v, map.clone());
        let (v_min, v_max) = map.mapped_range();
        Prepass {
            v_min,
            v_max,
            ..pre.clone()
        }
    });
    let pre = mapped.as_ref().unwrap_or(pre);
    let xs = (q, k, v);
    let (io, plan) = match causal_plan {
        Some(cp) => {
            let o = poly::causal::run(gpu, p, cp, table, poly, pre, xs, opts, uploads, stats)?;
            assign_slice(out, &o);
            (
                causal_io(p, cp, &exact_plan.chunking, budget)?,
                format!("{cp:?}"),
            )
        }
        None => {
            let call = (table, poly, pre);
            poly_run_into(gpu, p, plan, call, xs, opts, uploads, stats, out)?;
            (
                poly_io(p, &c.plan, &exact_plan.chunking, budget)?,
                format!("{:?}", c.plan),
            )
        }
    };
    if let (Some(map), true) = (&map, all_finite(out)) {
        timed(gpu, HostStage::Compute, || map.restore(out));
    }
    Ok(Ran {
        io,
        plan,
        certificate: Some(c.cert.clone()),
        method: "poly",
        tensor_cores: c.cert.f16_rounding.is_some(),
        exact_f16: None,
        storage: Storage::F32,
        input_rounding: None,
    })
}

/// Runs the exact method on these inputs: on tensor cores where `coop_exact` is planned, else
/// the f32 kernel (either reading `f16_storage` where given). `after_prepass`: `auto` paid for the
/// pre-pass before choosing exact, and the words count it.
#[allow(clippy::too_many_arguments)]
fn run_exact(
    tuner: &Tuner,
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (exact_plan, coop_exact): (&ExactPlan, Option<&CoopExactPlan>),
    after_prepass: bool,
    f16_storage: Option<&F16Inputs>,
    uploads: &Uploads,
    stats: &mut RunStats,
    out: &mut [f32],
) -> Result<Ran, Error> {
    let (gpu, budget, opts) = (tuner.gpu, tuner.budget, &tuner.opts);
    uploads.clear();
    let (st, mut io, plan, exact_f16) = match coop_exact {
        Some(cplan) => {
            let rounded = f16_storage.is_some_and(|xs| xs.rounded);
            let bound = exact::coop::f16_bound(p, q, k, v, rounded)?;
            let unmasked = tuner.cfg.coop_exact_unmasked;
            let xs = (q, k, v);
            let (o, st) = exact::coop::run(gpu, p, cplan, xs, f16_storage, unmasked, opts)?;
            assign_slice(out, &o);
            // The f32 kernel's words: the same storage reads per block of bq rows.
            let tiles = exact::plan::ExactTiles {
                bq: cplan.tiles.bq(),
                ..exact_plan.tiles
            };
            let as_f32 = ExactPlan {
                tiles,
                chunking: cplan.chunking,
            };
            let io = exact_io_for(p, &as_f32, storage_of(f16_storage));
            (st, io, format!("{cplan:?}"), Some(bound))
        }
        None => {
            let st = match f16_storage {
                Some(xs) => exact::run::run_f16(gpu, p, exact_plan, xs, opts, out)?,
                None => exact_run_into(gpu, p, exact_plan, q, k, v, opts, out)?,
            };
            let io = exact_io_for(p, exact_plan, storage_of(f16_storage));
            (st, io, format!("{exact_plan:?}"), None)
        }
    };
    // On tensor cores the f16 bound already includes the input rounding.
    let input_rounding = f16_storage.map(|xs| {
        if xs.rounded {
            f16_input_rounding(p, q, k, v)
                .into_iter()
                .fold(0f64, f64::max)
        } else {
            0.0
        }
    });
    stats.absorb(&st);
    if after_prepass {
        // auto paid for the pre-pass before choosing exact.
        let pre_cost = prepass_io(p, &exact_plan.chunking, budget)?;
        io.passes.splice(0..0, pre_cost.passes);
    }
    Ok(Ran {
        io,
        plan,
        certificate: None,
        method: "exact",
        tensor_cores: exact_f16.is_some(),
        exact_f16,
        storage: storage_of(f16_storage),
        input_rounding,
    })
}

fn storage_of(f16_storage: Option<&F16Inputs>) -> Storage {
    f16_storage.map_or(Storage::F32, |_| Storage::F16)
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

/// Exact attention on the f32 kernel that also returns each output row's log-sum-exp
/// `ln sum_j exp(scale q_i.k_j)` (`(units*group, l)`), for merging partial outputs over key
/// shards (ring attention). No score rebalancing or value mapping: scores and value sums must
/// stay within float32's range (the caller checks the output).
pub fn exact_attention_lse(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
) -> Result<(Vec<f32>, Vec<f32>, Report), Error> {
    p.check_inputs(q, k, v)?;
    let cfg = Config::from_env();
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let start = Instant::now();
    let budget = Budget::for_device(&gpu.info, &cfg)?.for_problem(p)?;
    let tuner = Tuner {
        gpu: &gpu,
        cfg: &cfg,
        budget: &budget,
        opts: *opts,
    };
    let plan = exact_plan_for(&tuner, p)?;
    let traffic = gpu.traffic.now();
    let (out, lse, mut stats) = if p.l == 0 || p.units == 0 {
        (Vec::new(), Vec::new(), RunStats::default())
    } else {
        exact::run::run_with_lse(&gpu, p, &plan, q, k, v, opts)?
    };
    stats.traffic = traffic.until(gpu.traffic.now());
    let io = exact_io(p, &plan);
    Ok((
        out,
        lse,
        Report {
            method: "exact",
            adapter: gpu.info.adapter.clone(),
            backend: gpu.info.backend.clone(),
            fast_memory_words: budget.fast_memory_words,
            io_words: io.total(),
            io_reads: io.reads(),
            io_writes: io.writes(),
            stats,
            elapsed_s: start.elapsed().as_secs_f64(),
            plan: format!("{plan:?}"),
            certificate: None,
            predicted_exact_s: None,
            predicted_poly_s: None,
            reason: "exact with row log-sum-exp".into(),
            tensor_cores: false,
            exact_f16: None,
            storage: Storage::F32,
            input_rounding: None,
        },
    ))
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
    p.check_inputs(q, k, v)?;
    let cfg = Config::from_env();
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let budget = Budget::for_device(&gpu.info, &cfg)?;
    let tuner = Tuner {
        gpu: &gpu,
        cfg: &cfg,
        budget: &budget,
        opts: *opts,
    };
    // The pre-pass chunking `attention` uses for method="poly", which the I/O model assumes.
    let chunking = plan_exact(p, &budget)?.chunking;
    let mut st = RunStats::default();
    let tiles = F32Tiles::Given(pass1, pass2);
    let (out, c) = f32_poly(&tuner, (p, &chunking), (q, k, v), degree, tiles, &mut st)?;
    let io = poly_io(p, &c.plan, &chunking, &budget)?;
    Ok(TiledPolyRun {
        out,
        beta: c.cert.beta,
        words_counted: st.io_words_counted,
        words_planned: (io.reads(), io.writes()),
    })
}

/// The reconstructed I/O lower bound in words (`io::closed_form`, docs/io-model.md): for
/// `Method::Exact` Saha & Ye's, for `Method::Poly` the segment bound at rank C(E + degree,
/// degree). Checks its arguments as [`io_cost`] does: S, E and the fast memory at least 1, a
/// degree for poly only (and required there), no `Auto`.
pub fn io_lower_bound(
    l: usize,
    s: usize,
    e: usize,
    method: Method,
    degree: Option<usize>,
    fast_memory_words: u64,
) -> Result<f64, Error> {
    let bad = |m: String| Err(Error::InvalidInput(m));
    if s == 0 {
        return bad("key/value sequence length S must be at least 1".into());
    }
    if e == 0 {
        return bad("head dimension E must be at least 1".into());
    }
    if fast_memory_words == 0 {
        return bad("fast_memory_words must be at least 1".into());
    }
    let (l, s, d, m) = (l as f64, s as f64, e as f64, fast_memory_words as f64);
    match (method, degree) {
        (Method::Exact, None) => Ok(io::closed_form::exact_lower_bound(l, s, d, m)),
        (Method::Poly, Some(g)) => {
            let r = match poly::features::num_features(e, g) {
                u64::MAX => {
                    return Err(Error::Overflow(format!(
                        "the rank C(E+degree, degree) for E={e}, degree={g} is beyond 2^64 - 1"
                    )))
                }
                r => r as f64,
            };
            Ok(io::closed_form::poly_lower_bound(l, s, d, r, m))
        }
        (Method::Exact, Some(_)) => bad("degree= applies to method='poly' only".into()),
        (Method::Poly, None) => bad("the poly lower bound needs a degree".into()),
        (Method::Auto, _) => {
            bad("the lower bound is for method 'exact' or 'poly', not 'auto'".into())
        }
    }
}

/// The plan that would run and the words it moves, without touching the GPU when
/// `fast_memory_words` is given (then the model has no binding limit: one dispatch). `storage`:
/// the format of the exact kernel's inputs (the poly kernels read f32 only).
pub fn io_cost(
    p: &Problem,
    method: Method,
    degree: Option<usize>,
    eps: Option<f64>,
    beta: Option<f64>,
    fast_memory_words: Option<u64>,
    storage: Storage,
) -> Result<IoEstimate, Error> {
    p.check_sizes()?;
    if method != Method::Exact && storage != Storage::F32 {
        return Err(Error::InvalidInput(format!(
            "storage='{}' applies to method='exact' only: the poly kernels read float32",
            storage.name()
        )));
    }
    let budget = match fast_memory_words {
        Some(m) => Budget::model(m),
        None => budget(&device::gpu()?.info)?.for_problem(p)?,
    };
    let exact_plan = plan_exact(p, &budget)?;
    if method == Method::Exact {
        return Ok(IoEstimate {
            method: "exact",
            schedule: None,
            degree: None,
            rank: None,
            fast_memory_words: budget.fast_memory_words,
            io: exact_io_checked(p, &exact_plan, storage)?,
            host_device: host_io::exact_host_io(p, &exact_plan.chunking)?,
        });
    }
    let g = match (degree, eps, beta) {
        (Some(g), _, _) => g,
        (None, Some(eps), Some(beta)) => {
            if !(eps > 0.0 && eps < 1.0 && beta >= 0.0 && beta.is_finite()) {
                return Err(Error::InvalidInput(format!(
                    "need 0 < eps < 1 and finite beta >= 0, got eps={eps}, beta={beta}"
                )));
            }
            let poly = poly_for_eps(beta, eps, 0.0).ok_or_else(|| {
                Error::TooLarge(format!(
                    "no degree <= {MAX_DEGREE} certifies eps={eps} at beta={beta}"
                ))
            })?;
            poly.feature_degree()
        }
        _ => {
            return Err(Error::InvalidInput(
                "method='poly' needs degree=, or eps= and beta= to choose the degree".into(),
            ))
        }
    };
    let plan = plan_poly(p, g, &budget)?;
    let pre = &exact_plan.chunking;
    let streams = budget.streams(p);
    let (io, host_device) = if p.causal {
        let cp = plan_causal(p, &plan, &budget)?;
        let w = cp.window_rows();
        (
            causal_io(p, &cp, pre, &budget)?,
            host_io::poly_host_io(p, pre, (cp.units, w, w), streams)?,
        )
    } else {
        let c = &plan.chunking;
        (
            poly_io(p, &plan, pre, &budget)?,
            host_io::poly_host_io(p, pre, (c.units, c.kv_rows, c.q_rows), streams)?,
        )
    };
    Ok(IoEstimate {
        method: "poly",
        schedule: Some(plan.schedule),
        degree: Some(g),
        rank: Some(plan.r),
        fast_memory_words: budget.fast_memory_words,
        io,
        host_device,
    })
}
