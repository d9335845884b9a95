//! Polynomial replacement of `exp` for the "poly" attention method (Alman & Song 2023).
//!
//! A [`Poly`] `P(x) = sum_k c_k x^k` approximates `e^x` on `[-beta, beta]` with a *certified*
//! relative error `max_{|x|<=beta} |P(x) e^{-x} - 1| <= certified_eps` (see [`certify`]).
//! With `x = scale * <q, k>` and the multinomial expansion, `P` becomes an inner product of
//! feature vectors: the asymmetric map `phi_q(q)_a = w_a q^a`, `phi_k(k)_a = k^a` over all
//! monomials `a` of degree `<= g` ([`feature_table`], [`query_weights`]).
//!
//! Three fits are tried ([`FitKind`]): Taylor truncation, Chebyshev interpolation of `exp`, and a
//! Remez minimax fit of the *relative* error. [`Poly::fit`] keeps the one with the smallest
//! certificate; [`choose_degree`] finds the smallest degree meeting a target.
//!
//! Measured here (test `measured_degree_table`; `cargo test -- --nocapture` prints it): smallest
//! degree whose *certified* relative error meets eps, per fit, Taylor / Chebyshev / Minimax.
//! [`choose_degree`] returns the minimax degree in every case.
//!
//! | beta | eps = 1e-2  | eps = 1e-3  |
//! |------|-------------|-------------|
//! | 0.25 | 2 / 2 / 2   | 3 / 2 / 2   |
//! | 0.5  | 3 / 2 / 2   | 4 / 3 / 3   |
//! | 1    | 5 / 4 / 3   | 6 / 5 / 4   |
//! | 2    | 8 / 6 / 5   | 10 / 7 / 6  |
//! | 4    | 15 / 10 / 7 | 17 / 11 / 9 |
//!
//! The Taylor and Chebyshev columns reproduce the dense-grid table of docs/io-model.md (Degree needed for a given β and ε) exactly. The minimax
//! fit wins by balancing the relative error: Chebyshev interpolation levels the *absolute* error,
//! which is relatively large near `x = -beta` where `e^x` is small.

use std::f64::consts::PI;

/// Unit roundoff of f64 (2^-53).
const U: f64 = f64::EPSILON / 2.0;

/// Below this certified error a fit is at the f64 floor: higher degrees cannot improve it.
const FLOOR_EPS: f64 = 1e-14;

/// Cap on grid points per [`certify`] call (a few ms in release builds).
const MAX_GRID_POINTS: usize = 1 << 17;

/// A polynomial `P(x) = sum_k coeffs[k] x^k` approximating exp(x) on [-beta, beta]
/// with a *certified* bound on the relative error  max_{|x|<=beta} |P(x) e^{-x} - 1| <= certified_eps.
///
/// `coeffs.len() == degree + 1` always. Trailing coefficients may be zero when a lower-degree fit
/// certified at least as well (that keeps `certified_eps` non-increasing in the degree).
#[derive(Clone, Debug, PartialEq)]
pub struct Poly {
    pub degree: usize,
    pub beta: f64,
    pub coeffs: Vec<f64>,
    pub certified_eps: f64,
    pub kind: FitKind,
}

/// Which fit produced a [`Poly`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitKind {
    /// Truncated Taylor series `sum_{k<=g} x^k / k!`.
    Taylor,
    /// Interpolant of `exp` at the `g+1` Chebyshev points of the first kind on `[-beta, beta]`.
    Chebyshev,
    /// Remez minimax fit of the relative error `P(x) e^{-x} - 1`.
    Minimax,
    /// A model's own kernel (the polynomial primitive), not a fit of exp.
    Given,
}

impl Poly {
    /// Degree of the features the kernels need: trailing zero coefficients (a lower-degree fit
    /// padded) need none.
    pub fn feature_degree(&self) -> usize {
        self.coeffs.iter().rposition(|&c| c != 0.0).unwrap_or(0)
    }

    /// Best fit of the given degree on [-beta, beta]: among Taylor, Chebyshev, minimax (and the best
    /// fit of degree `degree - 1`, zero-padded) the one with the smallest certified error.
    /// `beta == 0` gives `P = 1` with `certified_eps == 0`. Once a lower degree certifies below
    /// 1e-14 (the f64 floor) that fit is reused, zero-padded. Fits every degree up to `degree`
    /// (~140 ms for degree 20 in a debug build); cache the result.
    ///
    /// Panics unless `beta` is finite and `>= 0`.
    pub fn fit(beta: f64, degree: usize) -> Poly {
        let mut seq = FitSequence::new(beta);
        loop {
            let p = seq.next_fit();
            if p.degree == degree {
                return p;
            }
        }
    }

    /// Evaluate P at x (f64, Horner).
    pub fn eval(&self, x: f64) -> f64 {
        horner(&self.coeffs, x)
    }
}

/// Smallest degree g <= max_degree whose best fit certifies `eps` on [-beta, beta]; None if none does.
/// The returned poly always has `certified_eps <= eps` and `certified_eps < 1` (so `P > 0` on the
/// interval). Panics unless `beta` is finite and `>= 0`.
pub fn choose_degree(beta: f64, eps: f64, max_degree: usize) -> Option<Poly> {
    let mut seq = FitSequence::new(beta);
    for _ in 0..=max_degree {
        let p = seq.next_fit();
        if p.certified_eps <= eps && p.certified_eps < 1.0 {
            return Some(p);
        }
    }
    None
}

/// Rigorous upper bound of max_{|x|<=beta} |P(x) e^{-x} - 1| for arbitrary coefficients.
///
/// Method, with `h(x) = P(x) e^{-x} - 1`:
/// 1. Split `[-beta, beta]` into `8(n+2)` blocks at Chebyshev-spaced points (`n` = degree after
///    dropping trailing zeros). On each block `[A, B]`,
///    `|h''(x)| = |Q(x)| e^{-x} <= e^{-A} sup|Q|` with `Q = P'' - 2P' + P`, and `sup|Q|` is bounded
///    by `sum_k |b_k| R^k` where `b` are the Taylor coefficients of `Q` about the block midpoint
///    and `R` its half-width (plus a rounding term for computing `Q` and `b`, and a 0.1% inflation).
/// 2. Each block gets a uniform sub-grid. On a grid cell `[a, b]` the linear interpolant of `h`
///    is bounded by `max(|h(a)|, |h(b)|)` and the interpolation error by `(b-a)^2/8 sup|h''|`, so
///    `max_{[a,b]} |h| <= max(|h(a)|, |h(b)|) + (b-a)^2/8 * M2_block`.
/// 3. The sub-grids are sized so that the curvature term is `<= 1%` of a coarse-sample estimate
///    of `max|h|` (block edges and midpoints; a lower bound of the true maximum), or `<= 2^-53`
///    absolute, with at most 2^17 points in all (beyond that the bound stays valid, only looser).
///    So the result is within ~1% (plus the margin below) of the true maximum. About 1 ms for
///    degree 20 in a debug build.
///
/// Rounding margin, added at every grid point: `1.01 * (gamma_{2n+8} * Pabs(|x|) e^{-x} + 2u|h|)`
/// with `u = 2^-53`, `gamma_k = ku/(1-ku)`, `Pabs(y) = sum_k |c_k| y^k`. It covers the Horner
/// error bound `gamma_{2n} Pabs(|x|)` (Higham, Thm 5.3), `exp` within 2 ulp (libm's are < 1 ulp),
/// the product and the subtraction of 1. The final sum is inflated by `1 + 2^-40`.
///
/// Returns `f64::INFINITY` for non-finite coefficients, `beta` not finite or negative, or overflow.
/// `beta == 0` gives exactly `|c_0 - 1|` (rounded up).
pub fn certify(coeffs: &[f64], beta: f64) -> f64 {
    if !(beta.is_finite() && beta >= 0.0) || coeffs.iter().any(|c| !c.is_finite()) {
        return f64::INFINITY;
    }
    let c = trim(coeffs);
    if beta == 0.0 {
        // Horner and exp are exact at x = 0: h(0) = c_0 - 1, one rounding.
        let c0 = c.first().copied().unwrap_or(0.0);
        return (c0 - 1.0).abs() * (1.0 + 2.0 * U);
    }
    let n = c.len().saturating_sub(1);
    let g_eval = gamma(2 * n + 8);
    let abs_c: Vec<f64> = c.iter().map(|v| v.abs()).collect();

    // |h| at a grid point, rounded evaluation, and its rounding margin.
    let point = |x: f64| -> (f64, f64) {
        let e = (-x).exp();
        let h = (horner(c, x) * e - 1.0).abs();
        let margin = 1.01 * (g_eval * horner(&abs_c, x.abs()) * e + 2.0 * U * h);
        (h, margin)
    };

    // Q = P'' - 2P' + P (so h'' = Q e^{-x}) and a majorant of |Q|'s coefficients.
    let coef = |j: usize| c.get(j).copied().unwrap_or(0.0);
    let (q, q_abs): (Vec<f64>, Vec<f64>) = (0..c.len())
        .map(|j| {
            let (a, b, d) = (coef(j), coef(j + 1), coef(j + 2));
            let (j1, j2) = ((j + 1) as f64, ((j + 1) * (j + 2)) as f64);
            (
                a - 2.0 * j1 * b + j2 * d,
                a.abs() + 2.0 * j1 * b.abs() + j2 * d.abs(),
            )
        })
        .unzip();
    let g_shift = gamma(2 * n + 8);

    let nb = 8 * (n + 2);
    let mut edges: Vec<f64> = (0..=nb)
        .map(|j| -beta * (PI * j as f64 / nb as f64).cos())
        .collect();
    edges[0] = -beta;
    edges[nb] = beta;
    for j in 1..=nb {
        edges[j] = edges[j].max(edges[j - 1]).min(beta);
    }

    // Curvature bound per block.
    let mut m2 = Vec::with_capacity(nb);
    for w in edges.windows(2) {
        let (a, b) = (w[0], w[1]);
        let mid = 0.5 * (a + b);
        let r = (b - mid).max(mid - a) * (1.0 + 4.0 * U);
        let shifted = taylor_shift(&q, mid);
        let abs_shifted: Vec<f64> = shifted.iter().map(|v| v.abs()).collect();
        let sup_q = horner(&abs_shifted, r) * (1.0 + gamma(n + 2))
            + g_shift * horner(&q_abs, mid.abs() + r);
        let bound = (-a).exp() * sup_q * 1.001;
        if !bound.is_finite() {
            return f64::INFINITY;
        }
        m2.push(bound);
    }

    // Coarse estimate of max|h| (block edges and midpoints) sets the curvature target.
    let mut est = 0.0f64;
    for w in edges.windows(2) {
        est = est.max(point(w[0]).0).max(point(0.5 * (w[0] + w[1])).0);
    }
    est = est.max(point(beta).0);
    let target = (0.01 * est).max(U);
    let mut counts: Vec<f64> = edges
        .windows(2)
        .zip(&m2)
        .map(|(w, &m)| {
            ((w[1] - w[0]) * (m / (8.0 * target)).sqrt())
                .ceil()
                .max(1.0)
        })
        .collect();
    let total: f64 = counts.iter().sum();
    if !total.is_finite() || total > MAX_GRID_POINTS as f64 {
        let f = MAX_GRID_POINTS as f64 / total;
        for k in counts.iter_mut() {
            *k = if f.is_finite() {
                (*k * f).floor().max(1.0)
            } else {
                1.0
            };
        }
    }

    let mut bound = 0.0f64;
    let (h0, m0) = point(-beta);
    let mut prev = (-beta, h0 + m0);
    for ((w, &m), &k) in edges.windows(2).zip(&m2).zip(&counts) {
        let (a, b) = (w[0], w[1]);
        let k = k as usize;
        for i in 1..=k {
            let x = if i == k {
                b
            } else {
                (a + (b - a) * (i as f64 / k as f64)).min(b)
            };
            let (h, mg) = point(x);
            let cur = h + mg;
            let width = (x - prev.0) * (1.0 + 4.0 * U);
            bound = bound.max(prev.1.max(cur) + width * width * 0.125 * m);
            prev = (x, cur);
        }
    }
    let out = bound * (1.0 + 2f64.powi(-40));
    if out.is_nan() {
        f64::INFINITY
    } else {
        out
    }
}

/// Bound on the cancellation of the monomial basis:
/// `max_{|x|<=beta} (sum_k |c_k| |x|^k) / P(x)`.
///
/// Evaluating P in a float format with unit roundoff `u_f` (Horner, `g` = degree) has error at most
/// `gamma_{2g}(u_f) * sum_k |c_k| |x|^k`, i.e. relative error at most
/// `~2g * u_f * monomial_condition` (float32: `u_f = 2^-24`).
///
/// Computed as `Pabs(beta) e^beta / (1 - certified_eps)`: `Pabs(|x|) e^{-x}` is maximal at
/// `x = -beta` and `P(x) >= e^x (1 - certified_eps)`. About `e^{2 beta}` for good fits
/// (beta = 4: ~3e3; beta = 8: ~9e6). `f64::INFINITY` if `certified_eps >= 1`.
pub fn monomial_condition(poly: &Poly) -> f64 {
    if poly.certified_eps.is_nan() || poly.certified_eps >= 1.0 {
        return f64::INFINITY;
    }
    let abs_c: Vec<f64> = poly.coeffs.iter().map(|v| v.abs()).collect();
    let num = horner(&abs_c, poly.beta) * poly.beta.exp();
    num / (1.0 - poly.certified_eps) * (1.0 + 1e-12)
}

// ---------------------------------------------------------------------------------------------
// Fits

/// Best fits of degree 0, 1, 2, ... in turn; each one at least as good as the previous (padded).
struct FitSequence {
    beta: f64,
    prev: Option<Poly>,
}

impl FitSequence {
    fn new(beta: f64) -> Self {
        assert!(
            beta.is_finite() && beta >= 0.0,
            "poly fit: beta must be finite and >= 0, got {beta}"
        );
        FitSequence { beta, prev: None }
    }

    fn next_fit(&mut self) -> Poly {
        let degree = self.prev.as_ref().map_or(0, |p| p.degree + 1);
        let mut best = self.prev.take().map(|mut p| {
            p.degree = degree;
            p.coeffs.push(0.0);
            p
        });
        let at_floor = best.as_ref().is_some_and(|p| p.certified_eps <= FLOOR_EPS);
        if !at_floor {
            for kind in [FitKind::Minimax, FitKind::Chebyshev, FitKind::Taylor] {
                if let Some(p) = fit_kind(self.beta, degree, kind) {
                    if best
                        .as_ref()
                        .is_none_or(|b| p.certified_eps < b.certified_eps)
                    {
                        best = Some(p);
                    }
                }
            }
        }
        let best = best.expect("Taylor fit always exists");
        self.prev = Some(best.clone());
        best
    }
}

/// One fit of one kind, certified; `None` if that fit failed (only Remez can).
fn fit_kind(beta: f64, degree: usize, kind: FitKind) -> Option<Poly> {
    let coeffs = if beta == 0.0 {
        let mut c = vec![0.0; degree + 1];
        c[0] = 1.0;
        c
    } else {
        match kind {
            FitKind::Taylor => taylor_coeffs(degree),
            FitKind::Chebyshev => cheb_to_monomial(&cheb_interp_exp(beta, degree), beta),
            FitKind::Minimax => cheb_to_monomial(&remez_relative(beta, degree)?, beta),
            FitKind::Given => return None,
        }
    };
    if coeffs.iter().any(|c| !c.is_finite()) {
        return None;
    }
    let certified_eps = certify(&coeffs, beta);
    Some(Poly {
        degree,
        beta,
        coeffs,
        certified_eps,
        kind,
    })
}

fn taylor_coeffs(degree: usize) -> Vec<f64> {
    let mut c = vec![1.0; degree + 1];
    for k in 1..=degree {
        c[k] = c[k - 1] / k as f64;
    }
    c
}

/// Chebyshev coefficients (in t = x/beta) of the interpolant of exp(beta t) at the g+1
/// Chebyshev points of the first kind.
fn cheb_interp_exp(beta: f64, g: usize) -> Vec<f64> {
    let n = g + 1;
    let theta: Vec<f64> = (0..n).map(|j| PI * (j as f64 + 0.5) / n as f64).collect();
    let f: Vec<f64> = theta.iter().map(|&th| (beta * th.cos()).exp()).collect();
    (0..n)
        .map(|k| {
            let s: f64 = theta
                .iter()
                .zip(&f)
                .map(|(&th, &fj)| fj * (k as f64 * th).cos())
                .sum();
            let a = 2.0 * s / n as f64;
            if k == 0 {
                a / 2.0
            } else {
                a
            }
        })
        .collect()
}

/// Monomial coefficients in x of sum_k a_k T_k(x / beta).
fn cheb_to_monomial(a: &[f64], beta: f64) -> Vec<f64> {
    let n = a.len();
    let mut out = vec![0.0; n];
    let mut t_prev = vec![0.0; n]; // T_{k-1}
    let mut t_cur = vec![0.0; n]; // T_k
    t_cur[0] = 1.0;
    for (k, &ak) in a.iter().enumerate() {
        if k == 1 {
            t_prev = std::mem::replace(&mut t_cur, vec![0.0; n]);
            t_cur[1] = 1.0;
        } else if k > 1 {
            // T_k = 2 t T_{k-1} - T_{k-2}
            let mut next = vec![0.0; n];
            for i in 0..n {
                let up = if i > 0 { 2.0 * t_cur[i - 1] } else { 0.0 };
                next[i] = up - t_prev[i];
            }
            t_prev = std::mem::replace(&mut t_cur, next);
        }
        for (o, &t) in out.iter_mut().zip(&t_cur) {
            *o += ak * t;
        }
    }
    // Scale t^k -> x^k / beta^k one factor at a time (no overflow of beta^k).
    let mut s = 1.0;
    for o in out.iter_mut() {
        *o *= s;
        s /= beta;
    }
    out
}

/// Clenshaw evaluation of sum_k a_k T_k(t).
fn clenshaw(a: &[f64], t: f64) -> f64 {
    let (mut b1, mut b2) = (0.0, 0.0);
    for &ak in a.iter().skip(1).rev() {
        let b0 = 2.0 * t * b1 - b2 + ak;
        b2 = b1;
        b1 = b0;
    }
    t * b1 - b2 + a.first().copied().unwrap_or(0.0)
}

/// Remez exchange for the minimax relative error of exp on [-beta, beta], in t = x/beta and the
/// Chebyshev basis (well conditioned). Returns Chebyshev coefficients, or None if it broke down.
fn remez_relative(beta: f64, g: usize) -> Option<Vec<f64>> {
    let n = g + 2;
    let err = |a: &[f64], t: f64| clenshaw(a, t) * (-beta * t).exp() - 1.0;
    // Start at the Chebyshev extrema (includes both ends).
    let mut reference: Vec<f64> = (0..n)
        .map(|i| -(PI * i as f64 / (n - 1) as f64).cos())
        .collect();
    let mut best: Option<(f64, Vec<f64>)> = None;
    let samples = 40 * n + 1;
    let grid: Vec<f64> = (0..samples)
        .map(|j| -(PI * j as f64 / (samples - 1) as f64).cos())
        .collect();
    for _ in 0..20 {
        // Solve sum_k a_k T_k(t_i) e^{-beta t_i} - (-1)^i E = 1.
        let mut m = vec![vec![0.0; n]; n];
        for (i, &t) in reference.iter().enumerate() {
            let w = (-beta * t).exp();
            // T_{-1} = T_1 = t makes the recurrence start at T_0 = 1.
            let (mut t_prev, mut t_k) = (t, 1.0);
            for slot in m[i].iter_mut().take(g + 1) {
                *slot = t_k * w;
                let next = 2.0 * t * t_k - t_prev;
                t_prev = t_k;
                t_k = next;
            }
            m[i][g + 1] = if i % 2 == 0 { -1.0 } else { 1.0 };
        }
        let sol = solve(m, vec![1.0; n])?;
        let a = sol[..=g].to_vec();

        // Alternating extrema: the max of |err| in each run of constant sign, refined.
        let vals: Vec<f64> = grid.iter().map(|&t| err(&a, t)).collect();
        let mut ext: Vec<(f64, f64)> = Vec::new();
        let mut j = 0;
        while j < samples {
            let pos = vals[j] >= 0.0;
            let mut arg = j;
            let mut k = j;
            while k < samples && (vals[k] >= 0.0) == pos {
                if vals[k].abs() > vals[arg].abs() {
                    arg = k;
                }
                k += 1;
            }
            let lo = grid[arg.saturating_sub(1)];
            let hi = grid[(arg + 1).min(samples - 1)];
            let t = golden_max(|t| err(&a, t).abs(), lo, hi);
            let e = err(&a, t);
            ext.push(if e.abs() > vals[arg].abs() && (e >= 0.0) == pos {
                (t, e)
            } else {
                (grid[arg], vals[arg])
            });
            j = k;
        }
        let max_err = ext.iter().fold(0.0f64, |m, &(_, e)| m.max(e.abs()));
        if !max_err.is_finite() {
            return best.map(|b| b.1);
        }
        if best.as_ref().is_none_or(|b| max_err < b.0) {
            best = Some((max_err, a));
        }
        if ext.len() < n {
            break;
        }
        // Drop extrema, keeping the signs alternating, until n remain.
        while ext.len() > n {
            let i_min = (0..ext.len())
                .min_by(|&x, &y| ext[x].1.abs().total_cmp(&ext[y].1.abs()))
                .unwrap_or(0);
            if i_min == 0 || i_min == ext.len() - 1 || ext.len() == n + 1 {
                // Only an end may go alone; with one too many, the smaller end goes.
                let last = ext.len() - 1;
                let drop = if i_min == 0 || i_min == last {
                    i_min
                } else if ext[0].1.abs() <= ext[last].1.abs() {
                    0
                } else {
                    last
                };
                ext.remove(drop);
            } else {
                // An interior point goes with its smaller neighbour (alternation is kept).
                let other = if ext[i_min - 1].1.abs() <= ext[i_min + 1].1.abs() {
                    i_min - 1
                } else {
                    i_min + 1
                };
                ext.remove(i_min.max(other));
                ext.remove(i_min.min(other));
            }
        }
        let min_err = ext.iter().fold(f64::INFINITY, |m, &(_, e)| m.min(e.abs()));
        reference = ext.iter().map(|&(t, _)| t).collect();
        // Levelled to 1e-4: within 0.01% of the optimum (de la Vallee Poussin).
        if max_err - min_err <= 1e-4 * max_err {
            break;
        }
    }
    best.map(|b| b.1)
}

/// Argmax of f on [lo, hi] by golden-section search (f assumed unimodal there).
fn golden_max(f: impl Fn(f64) -> f64, mut lo: f64, mut hi: f64) -> f64 {
    let r = 0.5 * (5f64.sqrt() - 1.0);
    let mut x1 = hi - r * (hi - lo);
    let mut x2 = lo + r * (hi - lo);
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..50 {
        if f1 < f2 {
            lo = x1;
            x1 = x2;
            f1 = f2;
            x2 = lo + r * (hi - lo);
            f2 = f(x2);
        } else {
            hi = x2;
            x2 = x1;
            f2 = f1;
            x1 = hi - r * (hi - lo);
            f1 = f(x1);
        }
    }
    if f1 >= f2 {
        x1
    } else {
        x2
    }
}

/// Gaussian elimination with partial pivoting; None if singular or non-finite.
fn solve(mut m: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[piv][col] == 0.0 || !m[piv][col].is_finite() {
            return None;
        }
        m.swap(col, piv);
        b.swap(col, piv);
        let (top, below) = m.split_at_mut(col + 1);
        let (b_top, b_below) = b.split_at_mut(col + 1);
        let (p_row, p_b) = (&top[col], b_top[col]);
        for (row, rb) in below.iter_mut().zip(b_below.iter_mut()) {
            let f = row[col] / p_row[col];
            if f != 0.0 {
                for (v, &p) in row[col..].iter_mut().zip(&p_row[col..]) {
                    *v -= f * p;
                }
                *rb -= f * p_b;
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / m[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

// ---------------------------------------------------------------------------------------------
// Small numeric helpers

fn gamma(k: usize) -> f64 {
    let ku = k as f64 * U;
    ku / (1.0 - ku)
}

pub(crate) fn horner(c: &[f64], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &ck| acc * x + ck)
}

/// Coefficients without trailing zeros (so padding never changes a certificate).
pub(crate) fn trim(c: &[f64]) -> &[f64] {
    let n = c.iter().rposition(|&v| v != 0.0).map_or(0, |i| i + 1);
    &c[..n]
}

/// Taylor coefficients of p about m: p(m + t) = sum_k b_k t^k.
fn taylor_shift(p: &[f64], m: f64) -> Vec<f64> {
    let mut b = p.to_vec();
    let n = b.len();
    for k in 0..n.saturating_sub(1) {
        for j in (k..n - 1).rev() {
            b[j] += m * b[j + 1];
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poly::features::{
        feature_table, num_features, query_weights, try_feature_table, MAX_FEATURES,
    };
    use std::collections::HashSet;

    /// Tiny deterministic LCG, uniform in [-1, 1).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    /// max |P(x) e^{-x} - 1| on a uniform grid of `n` points.
    fn dense_max(c: &[f64], beta: f64, n: usize) -> f64 {
        (0..n)
            .map(|i| {
                let x = -beta + 2.0 * beta * i as f64 / (n - 1) as f64;
                (horner(c, x) * (-x).exp() - 1.0).abs()
            })
            .fold(0.0, f64::max)
    }

    fn choose_kind(beta: f64, eps: f64, kind: FitKind) -> usize {
        (0..=30)
            .find(|&g| fit_kind(beta, g, kind).unwrap().certified_eps <= eps)
            .unwrap()
    }

    #[test]
    fn num_features_table() {
        let table: [(usize, [u64; 4]); 4] = [
            (16, [17, 153, 969, 4_845]),
            (32, [33, 561, 6_545, 58_905]),
            (64, [65, 2_145, 47_905, 814_385]),
            (128, [129, 8_385, 366_145, 12_082_785]),
        ];
        for (d, row) in table {
            for (g, &want) in (1..=4).zip(&row) {
                assert_eq!(num_features(d, g), want, "d={d} g={g}");
            }
        }
        assert_eq!(num_features(0, 5), 1);
        assert_eq!(num_features(5, 0), 1);
        assert_eq!(num_features(1 << 40, 1 << 40), u64::MAX);
        assert_eq!(num_features(usize::MAX, 3), u64::MAX);
    }

    #[test]
    fn feature_table_enumerates_each_monomial_once() {
        for (e, g) in [
            (0, 3),
            (1, 1),
            (3, 0),
            (3, 2),
            (5, 3),
            (16, 2),
            (4, 4),
            (7, 8),
        ] {
            let t = feature_table(e, g);
            assert_eq!(t.r as u64, num_features(e, g));
            assert_eq!((t.degree.len(), t.multinomial.len()), (t.r, t.r));
            assert_eq!(t.indices.len(), t.r * g);
            let mut seen = HashSet::new();
            let mut mult_sum = vec![0.0; g + 1];
            for f in 0..t.r {
                let row = &t.indices[f * g..(f + 1) * g];
                assert!(row.windows(2).all(|w| w[0] <= w[1]), "row sorted");
                assert!(row.iter().all(|&i| i as usize <= e));
                let deg = row.iter().filter(|&&i| i as usize != e).count();
                assert_eq!(deg as u32, t.degree[f]);
                assert!(seen.insert(row.to_vec()), "duplicate monomial {row:?}");
                mult_sum[deg] += t.multinomial[f];
            }
            assert!(t.degree.windows(2).all(|w| w[0] <= w[1]), "graded order");
            // sum over |a| = k of (k choose a) = e^k
            for (k, &s) in mult_sum.iter().enumerate() {
                let want = if e == 0 && k > 0 {
                    0.0
                } else {
                    (e as f64).powi(k as i32)
                };
                assert_eq!(s, want, "e={e} g={g} k={k}");
            }
        }
        let t = feature_table(3, 2);
        let rows: Vec<&[u32]> = t.indices.chunks(2).collect();
        let want: [[u32; 2]; 10] = [
            [3, 3],
            [0, 3],
            [1, 3],
            [2, 3],
            [0, 0],
            [0, 1],
            [0, 2],
            [1, 1],
            [1, 2],
            [2, 2],
        ];
        assert_eq!(rows, want.iter().map(|r| &r[..]).collect::<Vec<_>>());
        assert_eq!(
            t.multinomial,
            vec![1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 2.0, 1.0]
        );
        let t = feature_table(4, 0);
        assert_eq!((t.r, t.indices.len(), t.degree.clone()), (1, 0, vec![0]));
    }

    #[test]
    fn feature_table_refuses_huge() {
        assert!(try_feature_table(128, 5).is_err());
        assert!(try_feature_table(1, 100_000_000).is_err());
        assert!(try_feature_table(128, 4).is_ok() || num_features(128, 4) <= MAX_FEATURES);
    }

    #[test]
    #[should_panic(expected = "more than 50000000")]
    fn feature_table_panics_when_huge() {
        feature_table(128, 5);
    }

    #[test]
    fn query_weights_reproduce_polynomial() {
        let mut rng = Lcg(12345);
        for (e, g) in [(1, 1), (3, 2), (5, 3), (16, 2), (4, 4)] {
            let t = feature_table(e, g);
            let scale = 1.0 / (e as f64).sqrt();
            let poly = Poly::fit((e as f64).sqrt(), g);
            let w = query_weights(&t, &poly, scale);
            for _ in 0..20 {
                let q: Vec<f64> = (0..e).map(|_| rng.next()).collect();
                let k: Vec<f64> = (0..e).map(|_| rng.next()).collect();
                let mut qx = q.clone();
                qx.push(1.0);
                let mut kx = k.clone();
                kx.push(1.0);
                let mut s = 0.0;
                for (f, wf) in w.iter().enumerate() {
                    let row = &t.indices[f * g..(f + 1) * g];
                    let qa: f64 = row.iter().map(|&i| qx[i as usize]).product();
                    let ka: f64 = row.iter().map(|&i| kx[i as usize]).product();
                    s += wf * qa * ka;
                }
                let dot: f64 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
                let want = poly.eval(scale * dot);
                assert!(
                    ((s - want) / want).abs() < 1e-12,
                    "e={e} g={g}: {s} vs {want}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "exceeds the feature table degree")]
    fn query_weights_rejects_low_degree_table() {
        query_weights(&feature_table(2, 2), &Poly::fit(1.0, 4), 1.0);
    }

    #[test]
    fn certify_is_tight_upper_bound() {
        let mut rng = Lcg(7);
        let mut cases: Vec<(Vec<f64>, f64)> = Vec::new();
        for &beta in &[0.25, 0.5, 1.0, 2.0, 4.0, 8.0] {
            for g in [1, 2, 3, 5, 8, 12, 20] {
                for kind in [FitKind::Taylor, FitKind::Chebyshev, FitKind::Minimax] {
                    if let Some(p) = fit_kind(beta, g, kind) {
                        cases.push((p.coeffs, beta));
                    }
                }
            }
        }
        // Arbitrary (perturbed) coefficients too.
        for _ in 0..10 {
            let mut c = taylor_coeffs(6);
            for v in c.iter_mut() {
                *v *= 1.0 + 0.05 * rng.next();
            }
            cases.push((c, 1.5));
        }
        cases.push((vec![], 1.0));
        cases.push((vec![1.0], 1.0));
        for (c, beta) in cases {
            let cert = certify(&c, beta);
            let meas = dense_max(&c, beta, 100_000);
            assert!(
                cert >= meas,
                "not an upper bound: {cert} < {meas} ({c:?}, {beta})"
            );
            // Slack: 1% curvature term, dense-grid miss, rounding margin.
            let margin =
                1e-12 * horner(&c.iter().map(|v| v.abs()).collect::<Vec<_>>(), beta) * beta.exp();
            assert!(
                cert <= meas * 1.012 + margin + 1e-15,
                "loose: {cert} vs {meas} ({c:?}, {beta})"
            );
        }
    }

    #[test]
    fn certify_taylor_matches_remainder() {
        for &beta in &[0.25, 0.5, 1.0, 2.0, 4.0] {
            for g in 0..=12usize {
                let c = taylor_coeffs(g);
                // h' = -x^g e^{-x} / g!, so max|h| is at an end: e^{-+b} |sum_{k>g} (+-b)^k / k!|.
                let tail = |x: f64| {
                    let (mut term, mut s) = (1.0, 0.0);
                    for k in 1..=200 {
                        term *= x / k as f64;
                        if k > g {
                            s += term;
                        }
                    }
                    s.abs()
                };
                let exact = (tail(beta) * (-beta).exp()).max(tail(-beta) * beta.exp());
                let lagrange =
                    beta.powi(g as i32 + 1) * beta.exp() / taylor_coeffs(g + 1)[g + 1].recip();
                let cert = certify(&c, beta);
                assert!(cert >= exact, "beta={beta} g={g}: {cert} < {exact}");
                assert!(
                    cert <= exact * 1.01 + 1e-14,
                    "beta={beta} g={g}: {cert} vs {exact}"
                );
                assert!(cert <= lagrange * 1.01 + 1e-14);
            }
        }
    }

    #[test]
    fn expected_degrees() {
        // docs/io-model.md table (Chebyshev / Taylor), certified here.
        let table = [
            (0.25, [(2, 2), (2, 3)]),
            (0.5, [(2, 3), (3, 4)]),
            (1.0, [(4, 5), (5, 6)]),
            (2.0, [(6, 8), (7, 10)]),
            (4.0, [(10, 15), (11, 17)]),
        ];
        for (beta, row) in table {
            for (eps, (cheb, taylor)) in [1e-2, 1e-3].into_iter().zip(row) {
                assert_eq!(
                    choose_kind(beta, eps, FitKind::Chebyshev),
                    cheb,
                    "cheb {beta} {eps}"
                );
                assert_eq!(
                    choose_kind(beta, eps, FitKind::Taylor),
                    taylor,
                    "taylor {beta} {eps}"
                );
                let best = choose_degree(beta, eps, 30).unwrap();
                assert!(best.degree <= cheb);
                assert!(best.certified_eps <= eps && best.certified_eps < 1.0);
                let minimax = choose_kind(beta, eps, FitKind::Minimax);
                assert_eq!(best.degree, minimax.min(cheb));
            }
        }
        // Measured minimax degrees (see the module doc).
        let best = [[2, 2], [2, 3], [3, 4], [5, 6], [7, 9]];
        for ((beta, _), want) in table.iter().zip(best) {
            for (eps, w) in [1e-2, 1e-3].into_iter().zip(want) {
                assert_eq!(
                    choose_degree(*beta, eps, 20).unwrap().degree,
                    w,
                    "{beta} {eps}"
                );
            }
        }
        assert_eq!(choose_degree(0.5, 1e-2, 20).unwrap().degree, 2);
        assert!(choose_degree(4.0, 1e-2, 20).unwrap().degree <= 10);
        assert_eq!(
            choose_degree(1.0, 1e-3, 20).unwrap().degree,
            5.min(choose_kind(1.0, 1e-3, FitKind::Minimax))
        );
        assert!(choose_degree(4.0, 1e-2, 5).is_none());
        assert!(choose_degree(20.0, 0.5, 3).is_none());
    }

    #[test]
    fn measured_degree_table() {
        for &beta in &[0.25, 0.5, 1.0, 2.0, 4.0] {
            let mut line = format!("beta={beta}:");
            for eps in [1e-2, 1e-3] {
                let t = choose_kind(beta, eps, FitKind::Taylor);
                let c = choose_kind(beta, eps, FitKind::Chebyshev);
                let m = choose_kind(beta, eps, FitKind::Minimax);
                let b = choose_degree(beta, eps, 30).unwrap();
                line += &format!(
                    "  eps={eps}: T {t} / C {c} / M {m} / best {} ({:?}, {:.3e})",
                    b.degree, b.kind, b.certified_eps
                );
            }
            println!("{line}");
        }
    }

    #[test]
    fn beta_zero_is_exact() {
        for g in [0, 1, 5] {
            let p = Poly::fit(0.0, g);
            assert_eq!(p.certified_eps, 0.0);
            assert_eq!(p.coeffs.len(), g + 1);
            assert_eq!(p.eval(0.0), 1.0);
        }
        assert_eq!(choose_degree(0.0, 0.0, 3).unwrap().degree, 0);
        assert_eq!(certify(&[1.0, 5.0], 0.0), 0.0);
        assert_eq!(monomial_condition(&Poly::fit(0.0, 2)), 1.0 + 1e-12);
    }

    #[test]
    fn positive_on_interval_and_condition_bound() {
        for &beta in &[0.25, 1.0, 4.0, 8.0] {
            for eps in [1e-1, 1e-2, 1e-3, 1e-6] {
                let p = choose_degree(beta, eps, 20).unwrap();
                assert!(p.certified_eps < 1.0 && p.certified_eps <= eps);
                assert_eq!(p.coeffs.len(), p.degree + 1);
                let cond = monomial_condition(&p);
                let abs_c: Vec<f64> = p.coeffs.iter().map(|v| v.abs()).collect();
                for i in 0..=10_000 {
                    let x = -beta + 2.0 * beta * i as f64 / 10_000.0;
                    let v = p.eval(x);
                    assert!(v > 0.0, "P({x}) = {v}");
                    assert!(horner(&abs_c, x.abs()) / v <= cond);
                }
            }
        }
        // beta = 4 keeps float32 Horner at ~1e-3 relative; beta = 8 does not.
        assert!(monomial_condition(&choose_degree(4.0, 1e-3, 20).unwrap()) < 1e4);
        assert!(monomial_condition(&choose_degree(8.0, 1e-3, 30).unwrap()) > 1e6);
    }

    #[test]
    fn best_fit_monotone_in_degree() {
        for &beta in &[0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0] {
            let mut prev = f64::INFINITY;
            for g in 0..=12 {
                let p = Poly::fit(beta, g);
                assert_eq!((p.degree, p.coeffs.len()), (g, g + 1));
                assert!(p.certified_eps <= prev, "beta={beta} g={g}");
                assert_eq!(p.certified_eps, certify(&p.coeffs, beta));
                prev = p.certified_eps;
            }
        }
    }

    #[test]
    fn high_degree_works() {
        for &beta in &[1.0, 4.0, 8.0, 16.0] {
            let p = Poly::fit(beta, 20);
            assert!(
                p.certified_eps.is_finite() && p.certified_eps < 1.0,
                "{beta}: {p:?}"
            );
            assert!(p.certified_eps >= dense_max(&p.coeffs, beta, 20_001));
        }
        let p = Poly::fit(8.0, 24);
        assert!(p.certified_eps < 1e-5, "{}", p.certified_eps);
    }

    #[test]
    fn minimax_beats_chebyshev() {
        for &beta in &[1.0, 4.0] {
            for g in [2, 5, 9] {
                let m = fit_kind(beta, g, FitKind::Minimax).unwrap().certified_eps;
                let c = fit_kind(beta, g, FitKind::Chebyshev).unwrap().certified_eps;
                assert!(m < c, "beta={beta} g={g}: minimax {m} vs cheb {c}");
            }
        }
    }

    #[test]
    fn bad_inputs() {
        assert_eq!(certify(&[f64::NAN], 1.0), f64::INFINITY);
        assert_eq!(certify(&[1.0], -1.0), f64::INFINITY);
        assert_eq!(certify(&[1.0], f64::INFINITY), f64::INFINITY);
        assert_eq!(certify(&taylor_coeffs(3), 800.0), f64::INFINITY);
    }
}
