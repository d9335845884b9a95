//! The float32 rounding part of the poly method's error bound: what the kernels' own arithmetic,
//! the pre-pass's float32 norms and the host's value centring add to the polynomial's
//! approximation error (`Certificate::approximation_bound_per_column`). Worst case, no
//! probabilistic rounding: with `u = 2^-24` and `gamma_n = n u / (1 - n u)`, a sum of n terms,
//! in any order, errs by at most `gamma_(n-1)` times the sum of the absolute terms, and a product
//! of n roundings by `gamma_n` relatively.
//!
//! The values. The passes run on `V' = (V - shift) / sigma` per KV unit and column (shift the
//! column's midpoint, sigma a power of two in (h, 2h], h the half-range; `numerics::ValueMap`):
//! normalised attention gives `O = O' sigma + shift` exactly, so the kernels' rounding scales
//! with the range h and not with |V|. Mapping back runs in float64 and clamps to the column's
//! range; the result is rounded once to float32.
//!
//! The kernels. Every output is `N / D` with `N = sum_j W_j v'_j`, `D = sum_j W_j`, where
//! `W_j = P(x_j) = sum_f b_f(q) a_f(k_j - mu)` (`b_f = w_f q^alpha`, `a_f = (k - mu)^alpha`) is
//! positive. Each term `b_f a_f(j) v'_j` reaches N through at most `m` roundings (see
//! [`path_roundings`]), so `|N~ - N| <= gamma_m sum_j A_j |v'_j|` and `|D~ - D| <= gamma_m sum_j
//! A_j` with `A_j = sum_f |b_f a_f(j)| = Pabs(scale sum_l |q_l| |k_jl - mu_l|) <= Pabs(beta)`
//! (the multinomial expansion with absolute values, Cauchy-Schwarz). Since `D >= n e^-beta
//! (1 - eps_P)` over the n keys, `sum_j A_j / D <= kappa = Pabs(beta) e^beta / (1 - eps_P)` and,
//! with |v'_j| <= H and |N / D| <= H (a convex combination),
//!     |N~ / D~ - N / D| <= (|N~ - N| + H |D~ - D|) / D~ <= H 2 gamma_m kappa / (1 - gamma_m kappa).
//! The causal path's diagonal block evaluates P by Horner at a float32 score: its weights err by
//! at most `gamma_(2g+1) Pabs(beta) + Pabs'(beta) gamma_(E+3) beta`, i.e. by that over Pabs(beta)
//! relative to A_j, which adds to gamma_m.
//!
//! Beta. The pre-pass's norms are float32 sums of squares: the true scores may exceed its beta
//! by the relative `omega` of [`widened_beta`]. Beyond the certified interval `P e^-x` moves by at
//! most `(Pabs'(b) + Pabs(b)) e^b` per unit of x (b the widened beta), so each weight is within
//! `eps' = eps_P + that * (b - beta)` of `e^x`, and the approximation part grows to
//! `eps' / (1 - eps')` of the range.
//!
//! Assumed: no float32 underflow inside the features (a factor product that flushes to zero
//! loses at most 2^-126 times the rest of its product), and that the float32 inputs are what the
//! bound is about (float64 inputs are rounded by the caller, who adds that rounding; the Python
//! package does).

use super::causal::CausalPlan;
use super::fit::{horner, Poly};
use super::plan::PolyPlan;
use super::prepass::Prepass;
use crate::api::Problem;

/// float32 unit roundoff (round to nearest).
pub const U32: f64 = 1.0 / 16_777_216.0;

/// Smallest normal float32: what a flush to zero can lose.
const TINY: f64 = 1.175_494_350_822_287_5e-38;

/// Threads of a poly pass at most: bounds the partial sums of the normalisers (one per builder
/// thread or key group).
const MAX_PARTIALS: usize = 256;

/// `gamma_n = n u / (1 - n u)`; infinite where `n u >= 1`.
pub fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U32;
    if nu < 1.0 {
        nu / (1.0 - nu)
    } else {
        f64::INFINITY
    }
}

/// `sum_k |c_k| x^k` and its derivative at `x >= 0`.
fn pabs(poly: &Poly, x: f64) -> (f64, f64) {
    let abs_c: Vec<f64> = poly.coeffs.iter().map(|c| c.abs()).collect();
    let deriv: Vec<f64> = abs_c
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, c)| k as f64 * c)
        .collect();
    (horner(&abs_c, x), horner(&deriv, x))
}

/// An upper bound on every score `scale q . (k - mu)` from the pre-pass's float32 norms: each
/// squared norm is a float32 sum of E rounded squares (of `k - mu` rounded once), off by at most
/// `gamma_(E+2)` relatively plus `E 2^-126` flushed, and its square root adds a rounding.
pub fn widened_beta(p: &Problem, pre: &Prepass) -> f64 {
    let e = p.e as f64;
    let widen = |n: f64| (n * n * (1.0 + gamma(p.e + 2)) + e * TINY).sqrt() * (1.0 + 2.0 * U32);
    pre.q_max_norm
        .iter()
        .zip(&pre.k_max_norm)
        .map(|(&q, &k)| f64::from(p.scale.abs()) * widen(q) * widen(k))
        .fold(0.0, f64::max)
}

/// The most roundings a term `b_f a_f(j) v_j` (or `b_f a_f(j)`) meets on its way into N (or D)
/// in the passes of `plan`: the key feature (g subtractions `k - mu`, g - 1 products), the
/// product with v and the sums over a key split (`keys_per_split`; a product rounded apart from
/// its sum counts once more), the sums of the splits over all key chunks, the normaliser's
/// partials, the query feature (its float32 weight and g products) and the sum over the r
/// features. The tensor-core passes also scale keys and queries (one rounding per factor) and
/// store S' / keys: their f16 roundings are in the f16 term.
pub fn path_roundings(p: &Problem, plan: &PolyPlan) -> usize {
    let g = plan.degree;
    let kv_rows = plan.chunking.kv_rows.max(1);
    let kps = plan.keys_per_split.max(1);
    let chunks = p.s.div_ceil(kv_rows);
    let splits = p.s.div_ceil(kps.min(kv_rows)) + chunks;
    let r = match &plan.coop {
        Some(t) => t.rp(),
        None => plan.r,
    };
    let key_feature = 2 * g;
    let query_feature = g + 1;
    // The normalisers' partial sums: per key group in pass 1, per builder thread in pass 2.
    let (partials, coop) = match &plan.coop {
        Some(_) => (2 * MAX_PARTIALS, 2 * g + 4),
        None => (plan.pass1.key_groups() + plan.pass2.builders_per_row(), 0),
    };
    key_feature + (kps + 1) + (splits + 1) + (r + 1) + query_feature + partials + coop
}

/// Relative error of the causal diagonal block's weights against `Pabs(beta)` (Horner at a
/// float32 score, see the module docs), and the extra roundings of its sums: the prefix of the
/// chunk states and the masked block's keys.
fn causal_extra(p: &Problem, cp: &CausalPlan, poly: &Poly, beta: f64) -> (f64, usize) {
    let g = poly.coeffs.len().saturating_sub(1);
    let (pa, dpa) = pabs(poly, beta);
    let horner_err = gamma(2 * g + 1)
        + if pa > 0.0 {
            dpa * gamma(p.e + 3) * beta / pa
        } else {
            0.0
        };
    let chunk = cp.chunk.max(1);
    let chunks = p.l.max(p.s).div_ceil(chunk) + 2;
    (horner_err, chunks + chunk + 4)
}

/// The float32 rounding part of a poly run's error bound, per value column (max over KV units),
/// in the units of V. `causal` where the chunked causal schedule runs.
pub fn rounding_bound_per_column(
    p: &Problem,
    pre: &Prepass,
    poly: &Poly,
    plan: &PolyPlan,
    causal: Option<&CausalPlan>,
) -> Vec<f64> {
    let beta = pre.beta(p.scale);
    let b = widened_beta(p, pre).max(beta);
    let eps_p = poly.certified_eps;
    let (pa, dpa) = pabs(poly, b);
    // Scores beyond the certified interval (see `widened_beta`).
    let eps_wide = eps_p + (dpa + pa) * b.exp() * (b - beta);
    let widening = if eps_wide < 1.0 {
        eps_wide / (1.0 - eps_wide) - eps_p / (1.0 - eps_p)
    } else {
        f64::INFINITY
    };
    let kappa = if eps_wide < 1.0 {
        pa * b.exp() / (1.0 - eps_wide)
    } else {
        f64::INFINITY
    };
    let mut m = path_roundings(p, plan);
    let mut alpha = 0.0;
    if let Some(cp) = causal {
        let (horner_err, extra) = causal_extra(p, cp, poly, b);
        alpha += horner_err;
        m += extra;
    }
    let alpha = (alpha + gamma(m)) * (1.0 + 1e-12);
    let kernel = if alpha * kappa < 1.0 {
        2.0 * alpha * kappa / (1.0 - alpha * kappa)
    } else {
        f64::INFINITY
    };
    (0..p.ev)
        .map(|c| {
            (0..p.units)
                .map(|unit| {
                    let i = unit * p.ev + c;
                    let (lo, hi) = (pre.v_min[i], pre.v_max[i]);
                    let (h, amax) = ((hi - lo) / 2.0, lo.abs().max(hi.abs()));
                    // The mapped values' largest magnitude, in the units of V: rounded once to
                    // float32, flushed below 2^-126 (sigma <= 2h, or 1 for a constant column),
                    // the float64 shift's rounding.
                    let sigma = if h > 0.0 { 2.0 * h } else { 1.0 };
                    let big_h = h * (1.0 + U32) + sigma * TINY + amax * f64::EPSILON;
                    let kernel = kernel * big_h;
                    let division = U32 * (big_h + kernel);
                    let map_in = U32 * big_h + sigma * TINY;
                    let restore = (U32 + f64::EPSILON) * amax + 2f64.powi(-149);
                    let sum = kernel + division + map_in + restore + widening * 2.0 * h;
                    // Output and truth both lie in the column's range (the output is clamped).
                    sum.min(2.0 * h + restore)
                })
                .fold(0.0, f64::max)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_grows_and_saturates() {
        assert_eq!(gamma(0), 0.0);
        assert!((gamma(1) / U32 - 1.0).abs() < 1e-6);
        assert!(gamma(1 << 23) > 0.99);
        assert_eq!(gamma(1 << 24), f64::INFINITY);
    }

    #[test]
    fn pabs_is_the_absolute_polynomial_and_its_slope() {
        let poly = Poly {
            degree: 2,
            beta: 1.0,
            coeffs: vec![1.0, -2.0, 0.5],
            certified_eps: 0.1,
            kind: super::super::fit::FitKind::Taylor,
        };
        assert_eq!(pabs(&poly, 2.0), (1.0 + 4.0 + 2.0, 2.0 + 2.0));
    }
}
