//! The certificate of the poly method: the degree from `eps` (derived here only), the f16 rounding
//! bound of the tensor-core passes, and the plan that runs it.

use super::causal::CausalPlan;
use super::causal_coop::diag_f16_factor;
use super::features::{num_features, try_feature_table, FeatureTable};
use super::fit::{choose_degree, horner, monomial_condition, Poly};
use super::plan::{plan_poly, plan_poly_coop, PolyPlan};
use super::prepass::Prepass;
use super::rounding::rounding_bound_per_column;
use crate::api::{Certificate, PolyOptions, Problem};
use crate::budget::Budget;
use crate::error::Error;

/// Highest degree the planner tries when choosing one from `eps`.
pub const MAX_DEGREE: usize = 20;

/// Unit roundoff of f16 (2^-11) and half its subnormal spacing (2^-25): an f16 rounding of x
/// errs by at most `F16_U * |x| + F16_TINY`.
pub const F16_U: f64 = 1.0 / 2048.0;

pub const F16_TINY: f64 = 1.0 / 33_554_432.0;

/// Largest finite f16.
pub const F16_MAX: f64 = 65504.0;

/// Sum of the absolute query features of the tensor-core passes, `sum_f |w_f phi_f(q')|`, bounded
/// by `Pabs(sqrt(E) * beta_scaled)` (the 1-norm of q' is at most sqrt(E) times its 2-norm), where
/// `beta_scaled = scale * max|q| * max|k - mu|` over all units of a dispatch.
pub fn query_feature_sum(poly: &Poly, e: usize, beta_scaled: f64) -> f64 {
    let abs_c: Vec<f64> = poly.coeffs.iter().map(|v| v.abs()).collect();
    horner(&abs_c, (e as f64).sqrt() * beta_scaled)
}

/// Bound on the extra output error of the tensor-core passes, in units of each value column's
/// range. Their f16 operands are phi(k') and v' (both in [-1, 1]), S'' = S'/keys (in [-1, 1]) and
/// w phi(q'); each rounding errs by at most `F16_U` relative plus `F16_TINY` absolute, and the
/// products accumulate in f32 (its rounding is left to the f32 check, as on the f32 path).
/// - Relative parts: `((1 + u)^4 - 1) * sum_j sum_f |w_f phi_f(q) phi_f(k_j)|`, at most
///   `((1 + u)^4 - 1) * keys * Pabs(beta)`, against the normaliser D >= keys * e^-beta * (1 - eps_P):
///   `((1 + u)^4 - 1) * monomial_condition`.
/// - Absolute parts: `F16_TINY * keys * (r + 3 * query_feature_sum)` against the same D.
///
/// The normaliser D itself is summed in f32 from unrounded features.
pub fn f16_rounding_factor(poly: &Poly, e: usize, r: usize, beta_scaled: f64) -> f64 {
    if poly.certified_eps.is_nan() || poly.certified_eps >= 1.0 {
        return f64::INFINITY;
    }
    let relative = ((1.0 + F16_U).powi(4) - 1.0) * monomial_condition(poly);
    let absolute =
        F16_TINY * (r as f64 + 3.0 * query_feature_sum(poly, e, beta_scaled)) * poly.beta.exp()
            / (1.0 - poly.certified_eps);
    relative + absolute
}

/// The one derivation of the degree from `eps`: the polynomial of least degree (at most
/// [`MAX_DEGREE`]) whose output bound eps_P / (1 - eps_P), plus `f16` (the tensor cores' rounding,
/// relative to the value range), is at most `eps`, i.e. which certifies
/// eps_P <= (eps - f16) / (1 + eps - f16) on [-beta, beta]. None where no degree does.
pub fn poly_for_eps(beta: f64, eps: f64, f16: f64) -> Option<Poly> {
    let room = eps - f16;
    if room <= 0.0 {
        return None;
    }
    choose_degree(beta, room / (1.0 + room), MAX_DEGREE)
}

/// `beta` must be finite for any polynomial to certify anything.
fn check_beta(beta: f64) -> Result<(), Error> {
    if beta.is_finite() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "the polynomial method needs finite scores, but beta = scale * max|q| * max|k - mean k| \
         is {beta} (non-finite or overflowing inputs)"
    )))
}

/// No degree up to [`MAX_DEGREE`] certifies `eps` at `beta`.
fn cannot_certify(eps: f64, beta: f64) -> Error {
    Error::TooLarge(format!(
        "the polynomial method cannot certify eps={eps} at beta={beta:.4} with degree <= \
         {MAX_DEGREE} (beta = scale * max|q| * max|k - mean k|); use method='exact'"
    ))
}

/// A (forced) degree whose relative error bound is 1 or more certifies nothing.
fn check_certifies(poly: &Poly, beta: f64) -> Result<(), Error> {
    if poly.certified_eps < 1.0 {
        return Ok(());
    }
    Err(Error::TooLarge(format!(
        "degree {} certifies nothing at beta={beta:.4} (relative error bound {:.3} >= 1); \
         use a higher degree or method='exact'",
        poly.degree, poly.certified_eps
    )))
}

/// The kernels sum the monomials in float32: cancellation grows like e^(2 beta). Refuse when
/// the rounding (~2g u32 times the monomial condition) could rival the certified error; `g`
/// and `rank` are the features' degree and count (named in the message).
fn check_cancellation(poly: &Poly, eps: f64, (g, rank): (usize, u64)) -> Result<(), Error> {
    let f32_rel_error =
        2.0 * poly.degree.max(1) as f64 * f64::from(f32::EPSILON / 2.0) * monomial_condition(poly);
    if f32_rel_error <= 0.1 * eps.max(poly.certified_eps) {
        return Ok(());
    }
    Err(Error::TooLarge(format!(
        "the polynomial method cannot certify its result in float32 at beta={:.4}: the \
         degree-{g} polynomial (rank {rank}) cancels, relative rounding up to \
         {f32_rel_error:.1e}; use method='exact'",
        poly.beta
    )))
}

/// The polynomial the float32 kernels run for head dimension `e` at `beta`: `degree` where
/// forced, else the least degree certifying `eps` ([`poly_for_eps`]), refused with the same
/// errors as an attention call (for callers that compute beta themselves, e.g. the sharded
/// method).
pub fn certified_f32_poly(
    beta: f64,
    e: usize,
    eps: f64,
    degree: Option<usize>,
) -> Result<Poly, Error> {
    check_beta(beta)?;
    let poly = match degree {
        Some(g) => {
            crate::api::check_forced_degree(g)?;
            Poly::fit(beta, g)
        }
        None => poly_for_eps(beta, eps, 0.0).ok_or_else(|| cannot_certify(eps, beta))?,
    };
    check_certifies(&poly, beta)?;
    let g = poly.feature_degree();
    check_cancellation(&poly, eps, (g, num_features(e, g)))?;
    Ok(poly)
}

pub(crate) struct PolyCandidate {
    pub(crate) plan: PolyPlan,
    pub(crate) poly: Poly,
    pub(crate) table: FeatureTable,
    pub(crate) cert: Certificate,
}

/// Degree, plan and certificate of the poly method for the pre-pass's beta; `coop_sg` is the
/// subgroup size where the adapter runs the tensor-core passes.
pub(crate) fn poly_candidate(
    p: &Problem,
    pre: &Prepass,
    popts: &PolyOptions,
    budget: &Budget,
    coop_sg: Option<usize>,
) -> Result<PolyCandidate, Error> {
    let fit = fit(p, pre, popts, coop_sg)?;
    let (poly, beta) = (&fit.poly, fit.beta);
    let g = poly.feature_degree();
    let plan_at = |g: usize| {
        plan_for(
            p,
            (g, num_features(p.e, g)),
            budget,
            popts,
            (fit.coop, beta),
        )
    };
    // beta = 0 fits P = 1 (degree 0). Where its one-feature plan does not fit (wide values), it
    // runs on degree-1 features with zero weights: the same P.
    let (g_plan, (plan, coop)) = match plan_at(g) {
        Err(_) if g == 0 => (1, plan_at(1)?),
        planned => (g, planned?),
    };
    let rank = num_features(p.e, g_plan);
    check_cancellation(poly, popts.eps, (g, rank))?;
    let table = try_feature_table(p.e, g_plan).map_err(Error::TooLarge)?;
    let f16_rounding = coop.map(|_| f16_bound(p, poly, fit.beta_scaled));
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
    let approximation_bound_per_column: Vec<f64> = (0..p.ev)
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
        error_bound_per_column: approximation_bound_per_column.clone(),
        approximation_bound_per_column,
        rounding_bound_per_column: Vec::new(),
        f16_rounding,
        schedule: plan.schedule,
    };
    Ok(PolyCandidate {
        plan,
        poly: fit.poly,
        table,
        cert,
    })
}

/// Degree, plan and certificate of causal poly. Its chunk passes run the f32 kernels; its
/// diagonal blocks run on tensor cores where `diag_sg` (the subgroup size) is given and
/// `tensor_cores` asks for them (`Some(true)`), or allows them (`None`) and their f16 bound
/// ([`diag_f16_factor`], relative to the value range) is at most half of eps, as for the
/// non-causal passes. The certificate then adds that bound, and the polynomial certifies eps less
/// it (estimated from the f32 fit, then checked). Returns the candidate and whether the diagonal
/// blocks run on tensor cores.
pub(crate) fn causal_poly_candidate(
    p: &Problem,
    pre: &Prepass,
    popts: &PolyOptions,
    budget: &Budget,
    diag_sg: Option<usize>,
) -> Result<(PolyCandidate, bool), Error> {
    let required = popts.tensor_cores == Some(true);
    match (popts.tensor_cores, diag_sg) {
        (Some(false), _) | (None, None) => {
            return Ok((poly_candidate(p, pre, popts, budget, None)?, false))
        }
        (Some(true), None) => {
            return Err(Error::Unsupported(
                "tensor_cores=True needs 16x16 f16 cooperative matrices, f16 shaders and one \
                 subgroup size, and a tile of causal poly's diagonal blocks that fits E and Ev; \
                 this adapter or shape lacks them (see device_info())"
                    .into(),
            ))
        }
        _ => {}
    }
    let f32_opts = PolyOptions {
        tensor_cores: Some(false),
        ..*popts
    };
    let base = poly_candidate(p, pre, &f32_opts, budget, None)?;
    let beta = base.cert.beta;
    let f16_est = diag_f16_factor(p, &base.poly, pre);
    let refuse = |why: String| {
        Error::TooLarge(format!(
            "tensor_cores=True cannot certify causal poly at beta={beta:.4}: {why}; use \
             tensor_cores=None or False"
        ))
    };
    if !f16_est.is_finite() {
        return match required {
            true => Err(refuse(
                "the diagonal blocks' f16 operands or weights would overflow f16".into(),
            )),
            false => Ok((base, false)),
        };
    }
    if !required && f16_est > 0.5 * popts.eps {
        return Ok((base, false));
    }
    let mut c = match popts.degree {
        Some(_) => base,
        None => {
            let room = popts.eps - f16_est;
            let tighter = PolyOptions {
                eps: room,
                ..f32_opts
            };
            let refit = (room > 0.0)
                .then(|| poly_candidate(p, pre, &tighter, budget, None).ok())
                .flatten();
            match refit {
                Some(c) => c,
                None if required => {
                    return Err(refuse(format!(
                        "f16 rounding up to {f16_est:.2e} of the value range leaves no \
                         polynomial that certifies eps={}",
                        popts.eps
                    )))
                }
                None => return Ok((base, false)),
            }
        }
    };
    let f16 = diag_f16_factor(p, &c.poly, pre);
    let factor = c.cert.poly_eps / (1.0 - c.cert.poly_eps) + f16;
    if !f16.is_finite() || (popts.degree.is_none() && factor > popts.eps) {
        if required {
            return Err(refuse(format!(
                "f16 rounding up to {f16:.2e} of the value range, eps={}",
                popts.eps
            )));
        }
        return Ok((poly_candidate(p, pre, &f32_opts, budget, None)?, false));
    }
    c.cert.f16_rounding = Some(f16);
    // The approximation part (the f16 term included); the float32 rounding part is added
    // once the plan is final (`add_rounding`).
    c.cert.approximation_bound_per_column = (0..p.ev)
        .map(|col| {
            (0..p.units)
                .map(|u| factor * (pre.v_max[u * p.ev + col] - pre.v_min[u * p.ev + col]))
                .fold(0.0, f64::max)
        })
        .collect();
    c.cert.error_bound_per_column = c.cert.approximation_bound_per_column.clone();
    Ok((c, true))
}

impl PolyCandidate {
    /// Adds the float32 rounding part of the bound (`poly::rounding`) for the plan that runs
    /// (after tuning; `causal` where the chunked causal schedule runs).
    pub(crate) fn add_rounding(&mut self, p: &Problem, pre: &Prepass, causal: Option<&CausalPlan>) {
        let plan = causal.map_or(&self.plan, |cp| &cp.poly);
        let rounding = rounding_bound_per_column(p, pre, &self.poly, plan, causal);
        self.cert.error_bound_per_column = self
            .cert
            .approximation_bound_per_column
            .iter()
            .zip(&rounding)
            .map(|(a, r)| a + r)
            .collect();
        self.cert.rounding_bound_per_column = rounding;
    }
}

/// The polynomial of [`fit`], and whether the tensor-core passes run it.
struct Fit {
    poly: Poly,
    /// The subgroup size of the tensor-core passes where they run.
    coop: Option<usize>,
    beta: f64,
    /// scale * max|q| * max|k - mu| over all units: the coop passes scale keys by the largest key
    /// norm of all units and queries by its inverse.
    beta_scaled: f64,
}

/// The f16 rounding bound of the tensor-core passes for `poly`, relative to the value range.
fn f16_bound(p: &Problem, poly: &Poly, beta_scaled: f64) -> f64 {
    let r = num_features(p.e, poly.feature_degree()) as usize;
    f16_rounding_factor(poly, p.e, r, beta_scaled)
}

/// The polynomial for the pre-pass's beta (the requested degree, or the least that certifies
/// eps) and whether the tensor cores run it: where the adapter has them, their f16 rounding
/// bound is at most half of eps (or they are required) and the query features fit f16.
fn fit(
    p: &Problem,
    pre: &Prepass,
    popts: &PolyOptions,
    coop_sg: Option<usize>,
) -> Result<Fit, Error> {
    let beta = pre.beta(p.scale);
    check_beta(beta)?;
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
    let fold_max = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
    let beta_scaled =
        f64::from(p.scale.abs()) * fold_max(&pre.q_max_norm) * fold_max(&pre.k_max_norm);
    // eps bounds (eps_P/(1-eps_P) + f16 rounding) * range: the polynomial must certify
    // (eps - f16)/(1 + eps - f16), f16 estimated from a first fit (it barely depends on the degree).
    let choose = |f16: f64| match popts.degree {
        Some(g) => Some(Poly::fit(beta, g)),
        None => poly_for_eps(beta, popts.eps, f16),
    };
    let cannot = || cannot_certify(popts.eps, beta);
    let f32_poly = choose(0.0).ok_or_else(cannot)?;
    let f16_est = f16_bound(p, &f32_poly, beta_scaled);
    let mut coop = coop_sg.and_then(|sg| {
        let q_sum = query_feature_sum(&f32_poly, p.e, beta_scaled);
        let fits = q_sum < F16_MAX && f16_est.is_finite();
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
    check_certifies(&poly, beta)?;
    Ok(Fit {
        poly,
        coop,
        beta,
        beta_scaled,
    })
}

/// The plan of degree `g` (rank `rank`): on the tensor cores where `coop` asks for them and they
/// fit (or are required), else f32. Returns the plan and whether it runs on the tensor cores.
fn plan_for(
    p: &Problem,
    (g, rank): (usize, u64),
    budget: &Budget,
    popts: &PolyOptions,
    (mut coop, beta): (Option<usize>, f64),
) -> Result<(PolyPlan, Option<usize>), Error> {
    let planned = match coop {
        Some(sg) => plan_poly_coop(p, g, budget, sg).or_else(|e| {
            if popts.tensor_cores == Some(true) {
                Err(e)
            } else {
                coop = None;
                plan_poly(p, g, budget)
            }
        }),
        None => plan_poly(p, g, budget),
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
    Ok((plan, coop))
}

#[cfg(test)]
mod f16_tests {
    use super::*;

    #[test]
    fn f16_factor_is_four_roundings_of_the_condition_plus_subnormals() {
        let poly = Poly::fit(0.5, 2);
        let kappa = monomial_condition(&poly);
        let f = f16_rounding_factor(&poly, 64, 2145, 0.5);
        let relative = ((1.0 + F16_U).powi(4) - 1.0) * kappa;
        assert!(f > relative && f < relative * 1.05, "{f} vs {relative}");
        // More features, larger queries: a larger subnormal term.
        assert!(f16_rounding_factor(&poly, 64, 100_000, 0.5) > f);
        assert!(f16_rounding_factor(&poly, 64, 2145, 2.0) > f);
        // Nothing certified, nothing bounded.
        let bad = Poly::fit(50.0, 1);
        assert!(bad.certified_eps >= 1.0);
        assert_eq!(f16_rounding_factor(&bad, 64, 10, 50.0), f64::INFINITY);
    }
}
