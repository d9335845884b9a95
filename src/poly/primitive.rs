//! Polynomial attention as a model primitive (Based, power retention, PolySketchFormer): the
//! weight of key j for query i is `w_ij = P(scale·q_i·k_j)·exp(G_i − G_j)` with
//! `P(x) = Σ_m c_m x^m` the model's own kernel and `G` the cumulative sum of per-token log gates;
//! the output row is `Σ_j w_ij v_j / Σ_j w_ij` (normalised) or `Σ_j w_ij v_j`. No key centring
//! and no certificate: the kernel is computed exactly up to float32 rounding, on the same passes
//! as the certified method (f32 path, `mu = 0`), with features only for the degrees whose
//! coefficient is not zero.
//!
//! # Gates
//!
//! Every gate factor is formed in float64 on the host relative to a chunk boundary, so none spans
//! more than one chunk's decay (the peers do the same): causal pass 1 weighs key j by
//! `exp(G_last(c) − G_j)` (to its chunk's last key), the scan decays each chunk state by its
//! chunk's `exp(G_last(c) − G_before(c))`, pass 2 scales row i's prefix sums by
//! `exp(G_i − G_before(c))`, and the diagonal blocks weigh `exp(g_i − g_j)` with g the gate sums
//! relative to the chunk. Non-causal calls weigh keys by `exp(G_last − G_j)` and rows by
//! `exp(G_i − G_last)` (on the host, where the output is not normalised; it cancels otherwise).
//! A total decay far beyond float32's range is then harmless: a factor underflows to 0 only
//! where the weight it carries is below float32's range relative to the chunk.
//!
//! # State
//!
//! The recurrent state per KV head is `Σ_j exp(G_last − G_j) φ_k(k_j) [v_j | 1]`
//! (r × (Ev + 1) words, r the features of the kernel's degrees), relative to the gate sum at the
//! last key; a call with `initial_state` continues it (its G starts from 0 at the state).

use super::causal::{causal_passes_io, plan_causal, run_with as causal_run, Extras};
use super::features::{try_feature_table_for, FeatureTable};
use super::fit::{FitKind, Poly};
use super::io::poly_passes_io;
use super::kernel_common::Variant;
use super::plan::plan_poly_rank;
use super::prepass::Prepass;
use super::run::run_with as poly_run;
use crate::api::Problem;
use crate::budget::Budget;
use crate::config::Config;
use crate::device;
use crate::error::Error;
use crate::io::IoCount;
use crate::launch::{RunOptions, RunStats};
use crate::report::Report;
use crate::transfer::Uploads;

/// Workgroup memory the gated kernels declare beyond their tiles' count: pass 1 a weight per key
/// of its tile (BK <= 64), the diagonal kernel a gate-sum pair per query row and per key of its
/// tiles (2 (BQ + BK) <= 256). Gated calls plan with this much less fast memory.
pub const GATE_FAST_MEMORY_WORDS: u64 = 256;

/// The model's kernel and what a call adds to it.
#[derive(Clone, Copy, Debug)]
pub struct PolyKernel<'a> {
    /// c_0, c_1, ...: P(x) = sum_m c_m x^m (trailing zeros allowed).
    pub coeffs: &'a [f64],
    pub normalize: bool,
    /// Per-token log gates per KV unit (units x S); L = S where given.
    pub log_gates: Option<&'a [f32]>,
    /// A state to continue (units x rank x (Ev + 1)).
    pub initial_state: Option<&'a [f32]>,
    pub return_state: bool,
}

/// What [`poly_kernel_attention`] returns.
#[derive(Debug)]
pub struct PolyKernelRun {
    pub out: Vec<f32>,
    /// The state after the last key (units x rank x (Ev + 1)), where asked.
    pub state: Option<Vec<f32>>,
    pub degree: usize,
    pub rank: usize,
    pub io: IoCount,
    pub stats: RunStats,
    pub plan: String,
    pub adapter: String,
    pub backend: String,
    pub fast_memory_words: u64,
}

impl PolyKernelRun {
    /// The [`Report`] of this run (`elapsed_s`: the call's time, as the caller measured it) and
    /// the state where asked; the output stays with the caller.
    pub fn into_report(self, elapsed_s: f64) -> (Report, Option<Vec<f32>>) {
        let report = Report {
            method: "poly_kernel",
            adapter: self.adapter,
            backend: self.backend,
            fast_memory_words: self.fast_memory_words,
            io_words: self.io.total(),
            io_reads: self.io.reads(),
            io_writes: self.io.writes(),
            stats: self.stats,
            elapsed_s,
            plan: self.plan,
            certificate: None,
            predicted_exact_s: None,
            predicted_poly_s: None,
            reason: "the model's polynomial kernel, computed exactly (no certificate)".into(),
            tensor_cores: false,
            exact_f16: None,
            storage: Default::default(),
            input_rounding: None,
        };
        (report, self.state)
    }
}

/// The kernel's degree: its last nonzero coefficient.
fn degree(coeffs: &[f64]) -> Result<usize, Error> {
    if coeffs.iter().any(|c| !c.is_finite()) {
        return Err(Error::InvalidInput(
            "coeffs must be finite numbers".to_string(),
        ));
    }
    coeffs.iter().rposition(|&c| c != 0.0).ok_or_else(|| {
        Error::InvalidInput("coeffs are all zero: the kernel weighs every key 0".to_string())
    })
}

/// The feature table of the kernel: the monomials of its nonzero degrees only.
pub fn kernel_features(e: usize, coeffs: &[f64]) -> Result<FeatureTable, Error> {
    let g = degree(coeffs)?;
    try_feature_table_for(e, g, |m| coeffs[m] != 0.0).map_err(Error::TooLarge)
}

/// Features (the state's rows) of the kernel with these coefficients at head dimension `e`.
pub fn kernel_rank(e: usize, coeffs: &[f64]) -> Result<usize, Error> {
    Ok(kernel_features(e, coeffs)?.r)
}

/// The gates and the state a call continues must match the problem's sizes (`r`: the kernel's
/// features).
fn check_gates_and_state(p: &Problem, kernel: &PolyKernel<'_>, r: usize) -> Result<(), Error> {
    let words = r * (p.ev + 1);
    if kernel.log_gates.is_some() && p.l != p.s {
        return Err(Error::InvalidInput(format!(
            "log_gates need as many queries as keys (L = {}, S = {}): a gate sum is per position",
            p.l, p.s
        )));
    }
    if let Some(gates) = kernel.log_gates {
        if gates.len() != p.units * p.s {
            return Err(Error::InvalidInput(format!(
                "log_gates hold {} values, expected {} (one per key of each KV head)",
                gates.len(),
                p.units * p.s
            )));
        }
    }
    if let Some(s0) = kernel.initial_state {
        if s0.len() != p.units * words {
            return Err(Error::InvalidInput(format!(
                "initial_state holds {} values, expected {} ({} KV heads x {r} features x {})",
                s0.len(),
                p.units * words,
                p.units,
                p.ev + 1
            )));
        }
    }
    Ok(())
}

/// G, the cumulative sums of the log gates, in float64 per KV unit.
fn gate_sums(p: &Problem, log_gates: &[f32]) -> Vec<f64> {
    log_gates
        .chunks(p.s.max(1))
        .flat_map(|row| {
            row.iter().scan(0.0f64, |acc, &x| {
                *acc += f64::from(x);
                Some(*acc)
            })
        })
        .collect()
}

/// The pre-pass the passes read, for a kernel that is not centred: keys shifted by 0, norms and
/// value ranges 0 (the primitive has no certificate to scale).
fn uncentred(p: &Problem) -> Prepass {
    Prepass {
        mu: vec![0.0; p.units * p.e],
        q_max_norm: vec![0.0; p.units],
        k_max_norm: vec![0.0; p.units],
        v_min: vec![0.0; p.units * p.ev],
        v_max: vec![0.0; p.units * p.ev],
        nonfinite: [0; 3],
    }
}

/// Polynomial attention with the model's own kernel on the process's GPU; see the module docs.
/// Arrays are contiguous, laid out as in [`Problem`] (its `scale` multiplies q.k inside P).
pub fn poly_kernel_attention(
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    kernel: &PolyKernel<'_>,
    opts: &RunOptions,
) -> Result<PolyKernelRun, Error> {
    p.check_inputs(q, k, v)?;
    let table = kernel_features(p.e, kernel.coeffs)?;
    let (g, r) = (table.g, table.r);
    check_gates_and_state(p, kernel, r)?;
    let poly = Poly {
        degree: g,
        beta: 0.0,
        coeffs: kernel.coeffs[..=g].to_vec(),
        certified_eps: 0.0,
        kind: FitKind::Given,
    };
    let gates = kernel.log_gates.map(|lg| gate_sums(p, lg));
    let variant = Variant {
        gated: gates.is_some(),
        unnormalized: !kernel.normalize,
        feature_range: false,
    };
    let extras = Extras {
        variant,
        gates: gates.as_deref(),
        initial_state: kernel.initial_state,
        return_state: kernel.return_state,
    };
    let cfg = Config::from_env();
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let traffic = gpu.traffic.now();
    let mut budget = Budget::for_device(&gpu.info, &cfg)?.for_problem(p)?;
    if variant.gated {
        budget.fast_memory_words = budget
            .fast_memory_words
            .saturating_sub(GATE_FAST_MEMORY_WORDS);
    }
    let pre = uncentred(p);
    let plan = plan_poly_rank(p, g, r as u64, &budget)?;
    let mut stats = RunStats::default();
    let uploads = Uploads::new(budget.streams(p));
    let xs = (q, k, v);
    let call = (&table, &poly, &pre, extras);
    debug_assert!(plan.pass1.bk as u64 <= GATE_FAST_MEMORY_WORDS);
    let (out, state, io, plan) = if p.l == 0 || p.units == 0 {
        (Vec::new(), None, IoCount::default(), "empty".to_string())
    } else if p.causal {
        let cp = plan_causal(p, &plan, &budget)?;
        debug_assert!(2 * (cp.diag.bq + cp.diag.bk) as u64 <= GATE_FAST_MEMORY_WORDS);
        let (out, state) = causal_run(&gpu, p, &cp, call, xs, opts, &uploads, &mut stats)?;
        let io = IoCount {
            passes: causal_passes_io(p, &cp, variant.gated)?,
        };
        (out, state, io, format!("{cp:?}"))
    } else {
        let (out, state) = poly_run(&gpu, p, &plan, call, xs, opts, &uploads, &mut stats)?;
        let started = kernel.initial_state.is_some();
        let io = poly_passes_io(p, &plan, variant.gated, started)?;
        (out, state, io, format!("{plan:?}"))
    };
    drop(uploads);
    // Timestamps of dispatches no readback waited for.
    stats.absorb(&crate::launch::settle_pending(&gpu, true)?);
    stats.traffic = traffic.until(gpu.traffic.now());
    Ok(PolyKernelRun {
        out,
        state,
        degree: g,
        rank: r,
        io,
        stats,
        plan,
        adapter: gpu.info.adapter.clone(),
        backend: gpu.info.backend.clone(),
        fast_memory_words: budget.fast_memory_words,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poly::features::query_weights;

    fn binom(n: usize, k: usize) -> usize {
        (1..=k).fold(1, |c, i| c * (n + 1 - i) / i)
    }

    #[test]
    fn rank_counts_only_the_kernels_degrees() {
        for e in [1usize, 4, 64, 256] {
            assert_eq!(kernel_rank(e, &[0.0, 0.0, 1.0]).unwrap(), binom(e + 1, 2));
            assert_eq!(kernel_rank(e, &[1.0, 1.0, 0.5]).unwrap(), binom(e + 2, 2));
            let odd = kernel_rank(e, &[0.0, 1.0, 0.0, 1.0]).unwrap();
            assert_eq!(odd, e + binom(e + 2, 3));
        }
        assert!(kernel_rank(4, &[0.0, 0.0]).is_err());
        assert!(kernel_rank(4, &[1.0, f64::NAN]).is_err());
    }

    #[test]
    fn head_dimension_256_at_degree_2_plans_on_the_webgpu_minimum() {
        // 16 KiB of workgroup memory (WebGPU's minimum), 128 MiB bindings and WebGPU's grid
        // limit, gates' reserve taken, no loop budget (GPU drivers) or lavapipe's (pass 2 split
        // over feature ranges where needed): every degree-2 kernel plans, causal and not, at
        // every head dimension to 256.
        let mut budget =
            crate::budget::Budget::with_binding(4096 - GATE_FAST_MEMORY_WORDS, 128 << 20);
        for (e, loops) in [1usize, 16, 64, 128, 255, 256]
            .into_iter()
            .flat_map(|e| [(e, u64::MAX), (e, 60_000)])
        {
            budget.max_loop_iterations = loops;
            for coeffs in [&[0.0, 0.0, 1.0][..], &[1.0, 1.0, 0.5]] {
                let r = kernel_rank(e, coeffs).unwrap();
                for causal in [false, true] {
                    let p = Problem {
                        units: 8,
                        group: 1,
                        l: 1 << 16,
                        s: 1 << 16,
                        e,
                        ev: e,
                        causal,
                        scale: 0.1,
                    };
                    let plan = plan_poly_rank(&p, 2, r as u64, &budget)
                        .unwrap_or_else(|err| panic!("E={e} r={r}: {err}"));
                    if causal {
                        plan_causal(&p, &plan, &budget)
                            .unwrap_or_else(|err| panic!("causal E={e} r={r}: {err}"));
                    }
                }
            }
        }
    }

    #[test]
    fn sparse_features_reproduce_the_kernel() {
        // sum_f w_f phi_q(q)_f phi_k(k)_f == P(scale q.k) with only the nonzero degrees' rows.
        let (e, scale) = (5usize, 0.7f64);
        let coeffs = [0.3, 0.0, -1.5, 0.0, 0.25];
        let t = kernel_features(e, &coeffs).unwrap();
        assert!(t.degree.iter().all(|&m| coeffs[m as usize] != 0.0));
        let poly = Poly {
            degree: 4,
            beta: 0.0,
            coeffs: coeffs.to_vec(),
            certified_eps: 0.0,
            kind: FitKind::Given,
        };
        let w = query_weights(&t, &poly, scale);
        let q = [0.3, -1.2, 0.5, 0.9, -0.1];
        let k = [1.1, 0.4, -0.7, 0.2, 0.6];
        let monomial = |x: &[f64], f: usize| -> f64 {
            t.indices[f * t.g..(f + 1) * t.g]
                .iter()
                .map(|&i| if (i as usize) < e { x[i as usize] } else { 1.0 })
                .product()
        };
        let got: f64 = (0..t.r)
            .map(|f| w[f] * monomial(&q, f) * monomial(&k, f))
            .sum();
        let x = scale * q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>();
        let want: f64 = coeffs
            .iter()
            .enumerate()
            .map(|(m, c)| c * x.powi(m as i32))
            .sum();
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
}
