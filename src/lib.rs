//! approx_attn: I/O-aware exact and polynomial attention on any GPU wgpu reaches.
//!
//! Data flows one way: host arrays -> [`plan`] picks a plan for this adapter -> [`kernels`]
//! dispatch it -> host arrays. [`plan`], [`io`] and [`poly`] never touch the GPU.

pub mod cost;
pub mod device;
pub mod error;
pub mod io;
pub mod kernels;
pub mod plan;
pub mod poly;

#[cfg(feature = "python")]
mod python;

use std::time::Instant;

pub use error::Error;
pub use kernels::{RunOptions, RunStats};
pub use plan::{Budget, Problem};

use device::DeviceInfo;

fn env_u64(name: &str) -> Result<Option<u64>, Error> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => s.trim().parse::<u64>().map(Some).map_err(|_| {
            Error::InvalidInput(format!("{name}={s:?} is not a whole number of bytes"))
        }),
    }
}

/// The planner's budget for this adapter. `APPROX_ATTN_FAST_MEMORY_BYTES` and
/// `APPROX_ATTN_MAX_BINDING_BYTES` may lower (never raise) the workgroup memory and the storage
/// binding size, e.g. to prove in tests that the kernels run within the WebGPU default 16 KiB.
pub fn budget(info: &DeviceInfo) -> Result<Budget, Error> {
    let mut b = Budget {
        fast_memory_words: info.fast_memory_words,
        max_binding_bytes: info
            .max_storage_buffer_binding_size
            .min(info.max_buffer_size),
        max_workgroups_per_dimension: info.max_compute_workgroups_per_dimension,
        max_invocations_per_workgroup: info
            .max_compute_invocations_per_workgroup
            .min(info.max_compute_workgroup_size_x),
        // Mesa's llvmpipe stops loops after 65,535 iterations per invocation; keep a margin.
        max_loop_iterations: if info.adapter.contains("llvmpipe") {
            60_000
        } else {
            u64::MAX
        },
    };
    if let Some(n) = env_u64("APPROX_ATTN_MAX_LOOP_ITERATIONS")? {
        b.max_loop_iterations = n;
    }
    if let Some(bytes) = env_u64("APPROX_ATTN_FAST_MEMORY_BYTES")? {
        b.fast_memory_words = b.fast_memory_words.min(bytes / 4);
    }
    if let Some(bytes) = env_u64("APPROX_ATTN_MAX_BINDING_BYTES")? {
        b.max_binding_bytes = b.max_binding_bytes.min(bytes);
    }
    Ok(b)
}

/// Which method `attention` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Exact,
    Poly,
    /// Poly where it certifies `eps` and is predicted to be cheaper, exact otherwise.
    Auto,
}

/// Options of the polynomial method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolyOptions {
    /// Bound on max |O - O*| per output column, relative to that value column's range.
    pub eps: f64,
    /// Force this degree (the certificate is then whatever it certifies).
    pub degree: Option<usize>,
    pub check_finite: bool,
    /// Tensor cores (cooperative matrices, f16 operands, f32 accumulators) for the two poly
    /// passes: `Some(true)` requires them, `Some(false)` keeps the f32 path, `None` uses them
    /// where the adapter has them and their f16 rounding bound is at most half of eps. With them
    /// the certificate adds that bound and the degree is chosen for what is left of eps.
    pub tensor_cores: Option<bool>,
}

/// Highest degree the planner tries when choosing one from `eps`.
pub const MAX_DEGREE: usize = 20;

/// What the polynomial method certified.
#[derive(Clone, Debug, PartialEq)]
pub struct Certificate {
    pub degree: usize,
    pub rank: usize,
    pub beta: f64,
    /// Certified max |P(x) e^-x - 1| on [-beta, beta].
    pub poly_eps: f64,
    /// Certified absolute bound on |O - O*| per output column (max over units), the f16
    /// rounding bound included.
    pub error_bound_per_column: Vec<f64>,
    /// Bound on the f16 rounding of the tensor-core passes, relative to each value column's
    /// range; None on the f32 path.
    pub f16_rounding: Option<f64>,
    pub schedule: plan::Schedule,
}

/// What ran and what it cost.
#[derive(Clone, Debug)]
pub struct Report {
    pub method: &'static str,
    pub adapter: String,
    pub backend: String,
    pub fast_memory_words: u64,
    /// Words the plan that ran moves between storage buffers and workgroup memory.
    pub io_words: u64,
    pub io_reads: u64,
    pub io_writes: u64,
    pub stats: RunStats,
    pub elapsed_s: f64,
    pub plan: String,
    pub certificate: Option<Certificate>,
    /// Predicted seconds of (exact, poly) where computed.
    pub predicted_exact_s: Option<f64>,
    pub predicted_poly_s: Option<f64>,
    /// Why `auto` chose what it chose.
    pub reason: String,
}

struct PolyCandidate {
    plan: plan::PolyPlan,
    poly: poly::Poly,
    table: poly::FeatureTable,
    cert: Certificate,
}

/// Degree, plan and certificate of the poly method for the pre-pass's beta; `coop_sg` is the
/// subgroup size where the adapter runs the tensor-core passes.
fn poly_candidate(
    p: &Problem,
    pre: &kernels::poly::Prepass,
    popts: &PolyOptions,
    budget: &Budget,
    coop_sg: Option<usize>,
) -> Result<PolyCandidate, Error> {
    let beta = pre.beta(p.scale);
    if !beta.is_finite() {
        return Err(Error::InvalidInput(format!(
            "the polynomial method needs finite scores, but beta = scale * max|q| * max|k - mean k| \
             is {beta} (non-finite or overflowing inputs)"
        )));
    }
    let coop_sg = match (popts.tensor_cores, coop_sg) {
        (Some(false), _) => None,
        (Some(true), None) => {
            return Err(Error::Unsupported(
                "tensor_cores=True needs 16x16 f16 cooperative matrices, f16 shaders and one \
                 subgroup size; this adapter lacks them (see device_info())"
                    .into(),
            ))
        }
        (_, sg) => sg,
    };
    // The coop passes scale keys by the largest key norm of all units and queries by its inverse.
    let fold_max = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
    let beta_scaled =
        f64::from(p.scale.abs()) * fold_max(&pre.q_max_norm) * fold_max(&pre.k_max_norm);
    // eps bounds (eps_P/(1-eps_P) + f16 rounding) * range: the polynomial must certify
    // (eps - f16)/(1 + eps - f16), f16 estimated from a first fit (it barely depends on the degree).
    let choose = |f16: f64| {
        let room = popts.eps - f16;
        let target = room / (1.0 + room);
        match popts.degree {
            Some(g) => Some(poly::Poly::fit(beta, g)),
            None if room > 0.0 => poly::choose_degree(beta, target, MAX_DEGREE),
            None => None,
        }
    };
    let cannot = || {
        Error::TooLarge(format!(
            "the polynomial method cannot certify eps={} at beta={beta:.4} with degree <= \
             {MAX_DEGREE} (beta = scale * max|q| * max|k - mean k|); use method='exact'",
            popts.eps
        ))
    };
    let f32_poly = choose(0.0).ok_or_else(cannot)?;
    let f16_of = |poly: &poly::Poly| {
        let r = poly::num_features(p.e, poly.feature_degree()) as usize;
        poly::f16_rounding_factor(poly, p.e, r, beta_scaled)
    };
    let f16_est = f16_of(&f32_poly);
    let mut coop = coop_sg.and_then(|sg| {
        let q_sum = poly::query_feature_sum(&f32_poly, p.e, beta_scaled);
        let fits = q_sum < poly::F16_MAX && f16_est.is_finite();
        let wanted = popts.tensor_cores == Some(true) || f16_est <= 0.5 * popts.eps;
        (fits && wanted).then_some(sg)
    });
    if popts.tensor_cores == Some(true) && coop.is_none() && coop_sg.is_some() {
        return Err(Error::TooLarge(format!(
            "tensor_cores=True: the query features would overflow f16 at beta={beta:.4}; use \
             tensor_cores=None or False"
        )));
    }
    let poly = match coop {
        Some(_) => match choose(f16_est) {
            Some(poly) => poly,
            None if popts.tensor_cores == Some(true) => return Err(cannot()),
            None => {
                coop = None;
                f32_poly
            }
        },
        None => f32_poly,
    };
    if poly.certified_eps >= 1.0 {
        return Err(Error::TooLarge(format!(
            "degree {} certifies nothing at beta={beta:.4} (relative error bound {:.3} >= 1); \
             use a higher degree or method='exact'",
            poly.degree, poly.certified_eps
        )));
    }
    let g = poly.feature_degree();
    let rank = poly::num_features(p.e, g);
    let planned = match coop {
        Some(sg) => plan::plan_poly_coop(p, g, budget, sg).or_else(|e| {
            if popts.tensor_cores == Some(true) {
                Err(e)
            } else {
                coop = None;
                plan::plan_poly(p, g, budget)
            }
        }),
        None => plan::plan_poly(p, g, budget),
    };
    let plan = planned.map_err(|e| {
        let why = match popts.degree {
            Some(_) => "as requested".to_string(),
            None => format!("to certify eps={}", popts.eps),
        };
        Error::TooLarge(format!(
            "poly needs degree {g} (rank r = C(E+g, g) = {rank} for E={}) at beta={beta:.4} {why}; \
             that does not fit: {e}",
            p.e
        ))
    })?;
    // The kernels sum the monomials in float32: cancellation grows like e^(2 beta). Refuse when
    // the rounding (~2g u32 times the monomial condition) could rival the certified error.
    let f32_rel_error = 2.0
        * poly.degree.max(1) as f64
        * f64::from(f32::EPSILON / 2.0)
        * poly::monomial_condition(&poly);
    if f32_rel_error > 0.1 * popts.eps.max(poly.certified_eps) {
        return Err(Error::TooLarge(format!(
            "the polynomial method cannot certify its result in float32 at beta={beta:.4}: the \
             degree-{g} polynomial (rank {rank}) cancels, relative rounding up to \
             {f32_rel_error:.1e}; use method='exact'"
        )));
    }
    let table = poly::try_feature_table(p.e, g).map_err(Error::TooLarge)?;
    let f16_rounding = coop.map(|_| f16_of(&poly));
    let factor = poly.certified_eps / (1.0 - poly.certified_eps) + f16_rounding.unwrap_or(0.0);
    if popts.degree.is_none() && factor > popts.eps {
        if popts.tensor_cores.is_none() {
            // The f16 bound grew with the refit: the f32 path certifies eps on its own.
            let f32_only = PolyOptions {
                tensor_cores: Some(false),
                ..*popts
            };
            return poly_candidate(p, pre, &f32_only, budget, None);
        }
        return Err(Error::TooLarge(format!(
            "tensor_cores=True cannot certify eps={} at beta={beta:.4}: f16 rounding up to {:.2e} \
             of the value range; use tensor_cores=False",
            popts.eps,
            f16_rounding.unwrap_or(0.0)
        )));
    }
    let error_bound_per_column = (0..p.ev)
        .map(|c| {
            (0..p.units)
                .map(|u| factor * (pre.v_max[u * p.ev + c] - pre.v_min[u * p.ev + c]))
                .fold(0.0, f64::max)
        })
        .collect();
    let cert = Certificate {
        degree: g,
        rank: plan.r,
        beta,
        poly_eps: poly.certified_eps,
        error_bound_per_column,
        f16_rounding,
        schedule: plan.schedule,
    };
    Ok(PolyCandidate {
        plan,
        poly,
        table,
        cert,
    })
}

/// Key of cached measurements: these kernels on this adapter (a change of any shader re-measures).
fn adapter_key(gpu: &device::Gpu) -> String {
    format!(
        "{} {} {} {:016x}",
        gpu.info.adapter,
        gpu.info.driver,
        gpu.info.backend,
        kernels::shader_fingerprint()
    )
}

/// The tuned values of `class` in the cache file `what`: cached ones (of length `len`), else
/// measured now by `tune` and cached where the autotune is on, else None (planner's tiles).
fn tuned_values(
    gpu: &device::Gpu,
    what: &str,
    (class, trusted): (&str, bool),
    len: usize,
    tune: impl FnOnce() -> Result<Vec<usize>, Error>,
) -> Result<Option<Vec<usize>>, Error> {
    // Tiles are timed the way they will run: with wgpu's runtime checks, or without them
    // (`trusted`, a class of its own), whose costs differ by tile shape.
    let class = &mode_class(class, trusted);
    let key = adapter_key(gpu);
    match cost::load_tuned(what, &key, class) {
        Some(v) if v.len() == len => Ok(Some(v)),
        _ if autotune_on(gpu) => {
            // Tuning a class compiles and times tens of candidates (about a minute for the f32
            // poly passes on the H100): say so, once per class, since it is cached.
            let file = cost::cache_path(what, &key);
            eprintln!(
                "approx_attn: tuning {what} for class ({class}) on {} once; cached in {} \
                 (APPROX_ATTN_AUTOTUNE=0 skips, APPROX_ATTN_TUNE_LOG=1 lists the candidates)",
                gpu.info.adapter,
                file.as_ref()
                    .map_or("no cache".into(), |f| f.display().to_string())
            );
            let start = std::time::Instant::now();
            let v = tune()?;
            eprintln!(
                "approx_attn: tuned {what} ({class}) in {:.1} s: {v:?}",
                start.elapsed().as_secs_f64()
            );
            cost::store_tuned(what, &key, class, &v);
            Ok(Some(v))
        }
        _ => Ok(None),
    }
}

/// A cache class for one shader mode: shaders with wgpu's runtime checks off (`trusted`) run at
/// other speeds, so their tiles and rates are measured and cached apart.
fn mode_class(class: &str, trusted: bool) -> String {
    if trusted {
        format!("{class} trusted")
    } else {
        class.to_string()
    }
}

/// `APPROX_ATTN_AUTOTUNE=1|0` forces it; by default GPUs tune (seconds per shape class) and CPU
/// drivers do not (each candidate compiles for seconds there: 37 s per class on lavapipe).
fn autotune_on(gpu: &device::Gpu) -> bool {
    match std::env::var("APPROX_ATTN_AUTOTUNE") {
        Ok(v) => !v.is_empty() && v != "0",
        Err(_) => gpu.info.device_type != "Cpu",
    }
}

/// The exact plan, with tiles measured on this adapter for the shape class (E, Ev, causal, fast
/// memory) when a tuned entry is cached or the autotune times the candidates now (see
/// [`autotune_on`]; the tests turn it off); otherwise the planner's default.
fn exact_plan_for(
    gpu: &device::Gpu,
    p: &Problem,
    budget: &Budget,
    opts: RunOptions,
) -> Result<plan::ExactPlan, Error> {
    let default = plan::plan_exact(p, budget)?;
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
    let t = plan::ExactTiles {
        e: p.e,
        ev: p.ev,
        bq: tuned[0],
        bk: tuned[1],
        tq: tuned[2],
        tk: tuned[3],
        split_v: tuned[4] != 0,
    };
    if !plan::exact_tiles_fit(&t, budget) {
        return if forced {
            Err(Error::InvalidInput(format!(
                "APPROX_ATTN_EXACT_TILES gives tiles that do not fit this problem and adapter: {t:?}"
            )))
        } else {
            Ok(default)
        };
    }
    plan::plan_exact_with(p, budget, t)
}

/// Autotune: runs of the first candidate before any is timed (the clock may still be ramping up),
/// and timed runs per candidate, the fastest of which counts. Warm-up does not lift an idle clock
/// the driver holds: on the H100 a process without a CUDA context tuned at 345 MHz, and its
/// pass-1 pick ran 13% slower at full clock than the one tuned there (README, Clocks).
const TUNE_WARMUP_RUNS: usize = 3;
const TUNE_RUNS: usize = 3;

/// `APPROX_ATTN_TUNE_LOG=1` prints every candidate's time to stderr while the autotune runs.
fn tune_log() -> bool {
    std::env::var("APPROX_ATTN_TUNE_LOG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Times every candidate tile shape on a problem of this shape class and returns the fastest.
fn autotune_exact(
    gpu: &device::Gpu,
    p: &Problem,
    budget: &Budget,
    opts: RunOptions,
) -> Result<plan::ExactTiles, Error> {
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
    let candidates = plan::exact_candidates(&class, budget);
    let time = |t: plan::ExactTiles| -> Result<f64, Error> {
        let plan = plan::plan_exact_with(&class, budget, t)?;
        let start = Instant::now();
        let (_, st) = kernels::exact::run(gpu, &class, &plan, &q, &k, &v, &opts)?;
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

/// The coop poly plan with tiles measured on this adapter for the shape class (E, Ev, degree,
/// fast memory, subgroup size) when a tuned entry is cached or the autotune times the candidates
/// now (see [`autotune_on`]); the planner's tiles otherwise.
fn tune_coop_plan(
    gpu: &device::Gpu,
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
    let t = plan::CoopTiles {
        subgroups: tuned[0],
        rt1: tuned[1],
        bk: tuned[2],
        subgroups2: tuned[3],
        rt2: tuned[4],
        rc2: tuned[5],
        ..t0
    };
    if plan::coop_tiles_fit(&t, budget) {
        c.plan = plan::plan_poly_coop_with(p, c.cert.degree, budget, t)?;
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
    pre: kernels::poly::Prepass,
    uploads: kernels::poly::Uploads,
    /// The caller's shader mode (runtime checks or trusted), without I/O counting.
    opts: RunOptions,
}

impl PolyTuneProblem {
    fn new(
        gpu: &device::Gpu,
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
        let chunking = plan::plan_exact(&class, budget)?.chunking;
        let uploads = kernels::poly::Uploads::default();
        let pre = kernels::poly::prepass(
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
        gpu: &device::Gpu,
        c: &PolyCandidate,
        plan: &plan::PolyPlan,
        pass: &str,
    ) -> Result<f64, Error> {
        let mut st = RunStats::default();
        let start = Instant::now();
        kernels::poly::run(
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

/// The fastest of `cands` (the first is the planner's), each timed once per round for
/// TUNE_RUNS rounds and counted at its fastest round: a clock change during the tuning does not
/// favour the candidates timed last.
fn fastest_candidate<T: Copy + std::fmt::Debug>(
    cands: &[T],
    what: &str,
    mut time: impl FnMut(T) -> Result<f64, Error>,
) -> Result<T, Error> {
    let mut secs = vec![f64::INFINITY; cands.len()];
    for _ in 0..TUNE_RUNS {
        for (s, &t) in secs.iter_mut().zip(cands) {
            *s = s.min(time(t)?);
        }
    }
    if tune_log() {
        for (t, s) in cands.iter().zip(&secs) {
            eprintln!("approx_attn autotune {what}: {t:?}: {:.3} ms", s * 1e3);
        }
    }
    let best = (0..cands.len()).min_by(|&a, &b| secs[a].total_cmp(&secs[b]));
    best.map(|i| cands[i])
        .ok_or_else(|| Error::TooLarge(format!("no {what} candidate fits this device")))
}

/// Times the pass-1 and pass-2 candidates of [`plan::coop_candidates`] on an 8-head 16384²
/// problem of this shape class, each pass on its own timestamps, and returns the fastest of each.
fn autotune_coop(
    gpu: &device::Gpu,
    p: &Problem,
    c: &PolyCandidate,
    budget: &Budget,
    opts: RunOptions,
) -> Result<plan::CoopTiles, Error> {
    let t0 = c.plan.coop.expect("a coop plan");
    let bench = PolyTuneProblem::new(gpu, p, 16384, budget, opts)?;
    let time = |t: plan::CoopTiles, pass: &str| -> Result<f64, Error> {
        let plan = plan::plan_poly_coop_with(&bench.class, c.cert.degree, budget, t)?;
        bench.time(gpu, c, &plan, pass)
    };
    for _ in 0..TUNE_WARMUP_RUNS {
        time(t0, "pass1")?; // clocks up before the first candidate is timed
    }
    let (cands1, cands2) = plan::coop_candidates(&t0, budget);
    let t1 = fastest_candidate(&cands1, "coop pass1", |t| time(t, "pass1"))?;
    let t2 = fastest_candidate(&cands2, "coop pass2", |t| time(t, "pass2"))?;
    Ok(plan::CoopTiles {
        subgroups2: t2.subgroups2,
        rt2: t2.rt2,
        rc2: t2.rc2,
        ..t1
    })
}

/// The f32 poly plan with pass tiles measured on this adapter for the shape class (E, Ev,
/// degree, fast memory) when a tuned entry is cached or the autotune times the candidates now
/// (see [`autotune_on`]); the planner's tiles otherwise.
fn tune_f32_poly_plan(
    gpu: &device::Gpu,
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
    let t1 = plan::Pass1Tiles {
        bk: tuned[0],
        tf: tuned[1],
        rc: tuned[2],
        prefetch: tuned[6] != 0,
        ..c.plan.pass1
    };
    let t2 = plan::Pass2Tiles {
        b: tuned[3],
        tr: tuned[4],
        rc: tuned[5],
        ..c.plan.pass2
    };
    let fits = plan::poly_tiles_fit(&t1, &t2, budget) && t2.resident() == c.plan.pass2.resident();
    let tuned_plan = fits
        .then(|| plan::plan_poly_with(p, c.cert.degree, budget, t1, t2).ok())
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

/// The tiles forced by the environment variable `var` (values named `names`, see
/// [`forced_tiles`]), else the tuned ones of [`tuned_values`]; and whether they were forced.
fn forced_or_tuned(
    gpu: &device::Gpu,
    (var, names): (&str, &str),
    what: &str,
    class: (&str, bool),
    len: usize,
    tune: impl FnOnce() -> Result<Vec<usize>, Error>,
) -> Result<(Option<Vec<usize>>, bool), Error> {
    match std::env::var(var) {
        Ok(s) => Ok((Some(forced_tiles(&s, var, names, len)?), true)),
        Err(_) => Ok((tuned_values(gpu, what, class, len, tune)?, false)),
    }
}

/// Tiles forced by `var` in place of the tuned ones, for sweeps at full size: `len` whole numbers
/// in the order of the cache lines (`names`). `APPROX_ATTN_POLY_TILES="bk tf rc1 b tr rc2
/// prefetch"` (f32 poly), `APPROX_ATTN_EXACT_TILES="bq bk tq tk split_v"`.
fn forced_tiles(s: &str, var: &str, names: &str, len: usize) -> Result<Vec<usize>, Error> {
    match s
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<usize>, _>>()
    {
        // The last number is a flag (0 or 1), the others sizes (positive).
        Ok(v) if v.len() == len && !v[..len - 1].contains(&0) && v[len - 1] <= 1 => Ok(v),
        _ => Err(Error::InvalidInput(format!(
            "{var}={s:?} is not {len} whole numbers ({names})"
        ))),
    }
}

/// Times the pass-1 and pass-2 candidates of [`plan::poly_candidates`] on an 8-head 32768²
/// problem of this shape class (512² on CPU drivers), each pass on its own timestamps, and
/// returns the fastest of each. At 8192² (a few waves of workgroups on an H100) the ranking
/// differed from the one at full size: a pass-2 variant 16% faster there was 1.4% slower at
/// n = 262,144.
fn autotune_f32_poly(
    gpu: &device::Gpu,
    p: &Problem,
    c: &PolyCandidate,
    budget: &Budget,
    opts: RunOptions,
) -> Result<(plan::Pass1Tiles, plan::Pass2Tiles), Error> {
    let n = if gpu.info.device_type == "Cpu" {
        512
    } else {
        32768
    };
    let bench = PolyTuneProblem::new(gpu, p, n, budget, opts)?;
    let planned = plan::plan_poly(&bench.class, c.cert.degree, budget)?;
    let time = |t1, t2, pass: &str| -> Result<f64, Error> {
        let plan = plan::plan_poly_with(&bench.class, c.cert.degree, budget, t1, t2)?;
        bench.time(gpu, c, &plan, pass)
    };
    let (t1, t2) = (planned.pass1, planned.pass2);
    for _ in 0..TUNE_WARMUP_RUNS {
        time(t1, t2, "pass1")?; // clocks up before the first candidate is timed
    }
    let (cands1, cands2) = plan::poly_candidates(&planned, budget);
    let best1 = fastest_candidate(&cands1, "f32 poly pass1", |t| time(t, t2, "pass1"))?;
    let best2 = fastest_candidate(&cands2, "f32 poly pass2", |t| time(t1, t, "pass2"))?;
    Ok((best1, best2))
}

/// Throughputs of the exact and the f32 poly kernels on this adapter for the caller's head
/// sizes, poly degree and shader mode, measured once per such class (an exact and a poly run of
/// that class, with the tiles the caller's calls use) and cached on disk;
/// `APPROX_ATTN_RATES="exact_flops_per_s poly_flops_per_s"` overrides them. A fixed class
/// (E = 64, degree 2, checks on) made a first `auto` call tune two classes it did not use.
fn rates(
    gpu: &device::Gpu,
    budget: &Budget,
    caller: &Problem,
    degree: usize,
    opts: RunOptions,
) -> Result<cost::Rates, Error> {
    if let Ok(s) = std::env::var("APPROX_ATTN_RATES") {
        let v: Vec<f64> = s
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if v.len() == 2 && v[0] > 0.0 && v[1] > 0.0 {
            return Ok(cost::Rates {
                exact_flops_per_s: v[0],
                poly_flops_per_s: v[1],
            });
        }
        return Err(Error::InvalidInput(format!(
            "APPROX_ATTN_RATES={s:?} is not two positive numbers"
        )));
    }
    let key = adapter_key(gpu);
    // Causal calls get a class of their own (causal poly adds the diagonal blocks and the scan).
    let causal = if caller.causal { " causal" } else { "" };
    let class = mode_class(
        &format!("{} {} {degree}{causal}", caller.e, caller.ev),
        opts.trusted,
    );
    if let Some(r) = cost::load_rates(&key, &class) {
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
        causal: caller.causal,
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
    let te = timed(&mut || kernels::exact::run(gpu, &p, &eplan, &qk, &qk, &v, &opts).map(|r| r.1))?;
    // The f32 poly path with the tiles `attention` would run (tuned where the autotune is on,
    // as for exact above), and the plan whose FLOPs `cost::poly_flops` counts.
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
    let poly_flops = if p.causal {
        let cp = kernels::poly_causal::plan_causal(&p, &pplan, budget)?;
        kernels::poly_causal::causal_poly_flops(&p, &cp)
    } else {
        cost::poly_flops(&p, &pplan)
    };
    let r = cost::Rates {
        exact_flops_per_s: cost::exact_flops(&p) / te,
        poly_flops_per_s: poly_flops / tp,
    };
    cost::store_rates(&key, &class, &r);
    Ok(r)
}

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
    check_lengths(p, q, k, v)?;
    // --- causal poly (src/kernels/poly_causal.rs): f32 path only ---
    if method != Method::Exact && p.causal && popts.tensor_cores == Some(true) {
        return Err(Error::Unsupported(
            "tensor_cores=True is not implemented for causal poly yet; use tensor_cores=None or \
             False (the f32 path)"
                .into(),
        ));
    }
    // --- end causal poly ---
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
    // method='poly' uses the exact plan only for the pre-pass chunking: the planner's tiles do,
    // without timing the exact kernel's candidates.
    let exact_plan = if method == Method::Poly {
        plan::plan_exact(p, &budget)?
    } else {
        exact_plan_for(&gpu, p, &budget, *opts)?
    };
    let mut stats = RunStats::default();
    let mut predicted_exact_s = None;
    let mut predicted_poly_s = None;
    let mut reason = String::new();

    // K, V and Q go to the GPU once for the pre-pass and both poly passes.
    let uploads = kernels::poly::Uploads::default();
    let mut candidate = None;
    let mut causal_plan = None; // causal poly: the chunked schedule over the candidate's tiles
    let mut pre = None;
    if method != Method::Exact && p.l > 0 {
        let pp = kernels::poly::prepass(
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
                    match kernels::poly_causal::plan_causal(p, &c.plan, &budget) {
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
            let te = cost::exact_flops(p) / r.exact_flops_per_s;
            let flops = match &causal_plan {
                Some(cp) => kernels::poly_causal::causal_poly_flops(p, cp),
                None => cost::poly_flops(p, &c.plan),
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
            let out = kernels::poly_causal::run(
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
            let io = kernels::poly_causal::causal_io(p, cp, &exact_plan.chunking, &budget);
            (out, io, format!("{cp:?}"), Some(c.cert), "poly")
        } else {
            let out = kernels::poly::run(
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
            let io = io::poly_io(p, &c.plan, &exact_plan.chunking, &budget);
            (out, io, format!("{:?}", c.plan), Some(c.cert), "poly")
        }
    } else {
        uploads.clear();
        let (out, st) = kernels::exact::run(&gpu, p, &exact_plan, q, k, v, opts)?;
        stats.absorb(&st);
        let mut io = io::exact_io(p, &exact_plan);
        if let Some(pre_cost) = pre
            .as_ref()
            .map(|_| io::prepass_io(p, &exact_plan.chunking, &budget))
        {
            // auto paid for the pre-pass before choosing exact.
            io.passes.splice(0..0, pre_cost.passes);
        }
        (out, io, format!("{exact_plan:?}"), None, "exact")
    };
    Ok((
        out,
        Report {
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

/// Pass tiles of [`f32_poly`].
enum F32Tiles {
    /// What `attention` runs: the tuned tiles where the autotune has them, else the planner's.
    Tuned,
    /// These (the autotune's candidates).
    Given(plan::Pass1Tiles, plan::Pass2Tiles),
}

/// The f32 poly method at `degree`: pre-pass over `chunking`, certificate (eps = 1e-2), and both
/// passes with `tiles`; `st` gathers every dispatch's stats.
#[allow(clippy::too_many_arguments)]
fn f32_poly(
    gpu: &device::Gpu,
    p: &Problem,
    chunking: &plan::Chunking,
    (q, k, v): (&[f32], &[f32], &[f32]),
    degree: usize,
    budget: &Budget,
    opts: &RunOptions,
    tiles: F32Tiles,
    st: &mut RunStats,
) -> Result<(Vec<f32>, PolyCandidate), Error> {
    let uploads = kernels::poly::Uploads::default();
    let pre = kernels::poly::prepass(gpu, p, chunking, q, k, v, budget, opts, &uploads, st)?;
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
            c.plan = plan::plan_poly_with(p, degree, budget, pass1, pass2)?;
        }
    }
    if p.causal {
        // The rate calibration of causal calls times the causal schedule.
        let cp = kernels::poly_causal::plan_causal(p, &c.plan, budget)?;
        let out = kernels::poly_causal::run(
            gpu,
            p,
            &cp,
            &c.table,
            &c.poly,
            &pre,
            (q, k, v),
            opts,
            &uploads,
            st,
        )?;
        return Ok((out, c));
    }
    let out = kernels::poly::run(
        gpu, p, &c.plan, &c.table, &c.poly, &pre, q, k, v, opts, &uploads, st,
    )?;
    Ok((out, c))
}

/// What [`poly_attention_with_tiles`] returns.
pub struct TiledPolyRun {
    pub out: Vec<f32>,
    /// The pre-pass's beta (the polynomial was fitted on [-beta, beta]).
    pub beta: f64,
    /// (reads, writes) of the pre-pass, both passes and the reduction, counted by the shaders
    /// (with `count_io`), and as the I/O model plans them.
    pub words_counted: Option<(u64, u64)>,
    pub words_planned: (u64, u64),
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
    pass1: plan::Pass1Tiles,
    pass2: plan::Pass2Tiles,
    opts: &RunOptions,
) -> Result<TiledPolyRun, Error> {
    check_lengths(p, q, k, v)?;
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let budget = budget(&gpu.info)?;
    // The pre-pass chunking `attention` uses for method="poly", which the I/O model assumes.
    let chunking = plan::plan_exact(p, &budget)?.chunking;
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
    let io = io::poly_io(p, &c.plan, &chunking, &budget);
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

/// The plan that would run and the words it moves, without touching the GPU when
/// `fast_memory_words` is given (then the model has no binding limit: one dispatch).
#[derive(Clone, Debug)]
pub struct IoEstimate {
    pub method: &'static str,
    pub schedule: Option<plan::Schedule>,
    pub degree: Option<usize>,
    pub rank: Option<usize>,
    pub fast_memory_words: u64,
    pub io: io::IoCount,
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
    let exact_plan = plan::plan_exact(p, &budget)?;
    match method {
        Method::Exact => Ok(IoEstimate {
            method: "exact",
            schedule: None,
            degree: None,
            rank: None,
            fast_memory_words: budget.fast_memory_words,
            io: io::exact_io(p, &exact_plan),
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
                    let poly = poly::choose_degree(beta, eps / (1.0 + eps), MAX_DEGREE)
                        .ok_or_else(|| {
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
            let plan = plan::plan_poly(p, g, &budget)?;
            if p.causal {
                let cp = kernels::poly_causal::plan_causal(p, &plan, &budget)?;
                return Ok(IoEstimate {
                    method: "poly",
                    schedule: Some(plan.schedule),
                    degree: Some(g),
                    rank: Some(plan.r),
                    fast_memory_words: budget.fast_memory_words,
                    io: kernels::poly_causal::causal_io(p, &cp, &exact_plan.chunking, &budget),
                });
            }
            Ok(IoEstimate {
                method: "poly",
                schedule: Some(plan.schedule),
                degree: Some(g),
                rank: Some(plan.r),
                fast_memory_words: budget.fast_memory_words,
                io: io::poly_io(p, &plan, &exact_plan.chunking, &budget),
            })
        }
    }
}
