//! Causal poly's diagonal blocks on cooperative matrices (tensor cores): the tiles
//! ([`CoopDiagTiles`]), the WGSL generated from `shaders/poly_causal_diag_coop.wgsl`, the operand
//! scales the host passes, and the f16 rounding bound the certificate adds
//! ([`diag_f16_factor`]). The chunk passes (pass 1, the scan, pass 2) stay the f32 kernels of
//! `causal.rs`: only the masked block inside each chunk, most of causal poly's time, runs here.
//!
//! Scores: X = Q' K'^T with Q' = q scale P2 and K' = (k - mu) / P2, P2 the power of two at or
//! above the largest centred key norm (a power of two, so that the scaling itself rounds nothing
//! and the float64 twin reproduces Q' exactly). Values: V' = (v - vmin) / vrange in [0, 1], so
//! their f16 rounding is relative to each column's range, as the certificate needs.

use std::fmt::Write as _;

use super::fit::{certify, Poly};
use super::plan::align4;
use super::prepass::Prepass;
use crate::api::Problem;
use crate::budget::Budget;
use crate::device::Gpu;
use crate::wgsl::{fill_fragment, fill_template, io_counter_slots};

pub(crate) const DIAG_COOP: &str = include_str!("../../shaders/poly_causal_diag_coop.wgsl");

const DIAG_COOP_STORE: &str = include_str!("../../shaders/poly_causal_diag_coop_store.wgsl");

/// Side of the cooperative matrices.
const COOP: usize = 16;
/// Most threads per workgroup.
const MAX_THREADS: usize = 256;
/// Most 16 x 16 f32 output accumulators (and f16 query fragments) a subgroup keeps.
const MAX_FRAGMENTS: usize = 16;

/// Tiles of the tensor-core diagonal kernel: `subgroups` subgroups of `sg` lanes, each owning 16
/// query rows (bq = 16 subgroups), keys in tiles of `bk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopDiagTiles {
    pub e: usize,
    pub ev: usize,
    pub g: usize,
    pub sg: usize,
    pub subgroups: usize,
    pub bk: usize,
}

impl CoopDiagTiles {
    pub fn threads(&self) -> usize {
        self.sg * self.subgroups
    }
    /// Query rows per workgroup.
    pub fn bq(&self) -> usize {
        COOP * self.subgroups
    }
    /// E, and Ev with its ones column, padded to whole 16-column tiles.
    pub fn padded_e(&self) -> usize {
        COOP * self.e.div_ceil(COOP)
    }
    pub fn padded_ev1(&self) -> usize {
        COOP * (self.ev + 1).div_ceil(COOP)
    }
    /// Row strides (halves) of the Q/K and V tiles: padded width plus 8.
    fn k_stride(&self) -> usize {
        self.padded_e() + 8
    }
    fn v_stride(&self) -> usize {
        self.padded_ev1() + 8
    }
    /// Halves of the Q block, later of the [K tile | V tile].
    pub fn kv_halves(&self) -> usize {
        (self.bq() * self.k_stride()).max(self.bk * (self.k_stride() + self.v_stride()))
    }
    pub fn score_words(&self) -> usize {
        self.bq() * (self.bk + 4)
    }
    pub fn weight_halves(&self) -> usize {
        self.bq() * (self.bk + 8)
    }
    /// Words of workgroup memory the kernel declares: the Q/K/V tiles (f16), the scores (f32),
    /// the weights (f16), each row's D, mu, the coefficients and the value normalisation.
    pub fn fast_memory_words(&self) -> u64 {
        (self.kv_halves() / 2
            + self.score_words()
            + self.weight_halves() / 2
            + self.bq()
            + align4(self.e)
            + align4(self.g + 1)
            + align4(3 * self.ev)) as u64
    }
    /// Output accumulators and query fragments per subgroup.
    pub fn out_accumulators(&self) -> usize {
        self.padded_ev1() / COOP
    }
    pub fn query_fragments(&self) -> usize {
        self.padded_e() / COOP
    }
}

/// Whether these tiles are well formed for their subgroup size and fit the budget.
pub fn tiles_fit(t: &CoopDiagTiles, budget: &Budget) -> bool {
    let max_threads = MAX_THREADS.min(budget.max_invocations_per_workgroup as usize);
    t.sg >= COOP
        && t.sg.is_power_of_two()
        && t.subgroups > 0
        && t.bk >= COOP
        && t.bk % COOP == 0
        && t.threads() <= max_threads
        && t.out_accumulators() <= MAX_FRAGMENTS
        && t.query_fragments() <= MAX_FRAGMENTS
        && t.fast_memory_words() <= budget.fast_memory_words
}

/// Shapes in order of preference, (subgroups, bk): more subgroups share each K/V tile (its
/// re-reads fall as 1/BQ, as in the f32 kernel); the largest first. Not measured yet.
const PREFERENCE: [(usize, usize); 6] = [(4, 32), (4, 16), (2, 32), (2, 16), (1, 32), (1, 16)];

/// The first tiles of [`PREFERENCE`] with at most `max_bq` rows (16 at least) that fit, for
/// subgroups of `sg` lanes; None where none does.
pub fn plan_tiles(
    p: &Problem,
    degree: usize,
    budget: &Budget,
    sg: usize,
    max_bq: usize,
) -> Option<CoopDiagTiles> {
    PREFERENCE
        .iter()
        .map(|&(subgroups, bk)| CoopDiagTiles {
            e: p.e,
            ev: p.ev,
            g: degree,
            sg,
            subgroups,
            bk,
        })
        .filter(|t| t.bq() <= max_bq.max(COOP))
        .find(|t| tiles_fit(t, budget))
}

/// Whether this adapter runs the kernel (16 x 16 f16 cooperative matrices, one subgroup size,
/// subgroup barriers); returns the subgroup size.
pub fn available(gpu: &Gpu) -> Option<usize> {
    let barrier = gpu
        .device
        .features()
        .contains(wgpu::Features::SUBGROUP_BARRIER);
    (gpu.info.coop_f16 && barrier)
        .then_some(gpu.info.subgroup_size as usize)
        .filter(|&sg| sg >= COOP)
}

/// The kernel for these tiles: straight-line WGSL for every slot of the template.
pub fn diag_coop_source(t: &CoopDiagTiles, count_io: bool) -> String {
    let (dt, kt, ct) = (t.query_fragments(), t.bk / COOP, t.out_accumulators());
    let mut q_frags = String::new();
    for d in 0..dt {
        let _ = writeln!(
            q_frags,
            "    let qf_{d} = coopLoadT<coop_mat16x16<f16, A>>(&kv_t[row0 * KS + {}u], KS);",
            COOP * d
        );
    }
    let mut acc = String::new();
    for c in 0..ct {
        let _ = writeln!(acc, "    var o_{c} = zero_acc;");
    }
    // X = Q' K'^T one 16-key column tile at a time; K' rows are the columns of B (column-major).
    let mut scores = String::new();
    for b in 0..kt {
        scores.push_str("        {\n            var x_acc = zero_acc;\n");
        for d in 0..dt {
            let _ = writeln!(
                scores,
                "            x_acc = coopMultiplyAdd(qf_{d}, coopLoad<coop_mat16x16<f16, B>>(&kv_t[{}u * KS + {}u], KS), x_acc);",
                COOP * b,
                COOP * d
            );
        }
        let _ = writeln!(
            scores,
            "            coopStoreT(x_acc, &s_t[sb + {}u], SS);\n        }}",
            COOP * b
        );
    }
    // O' += P [V' | 1], 16 keys at a time.
    let mut pv = String::new();
    for kk in 0..kt {
        let _ = writeln!(
            pv,
            "        {{\n            let pf = coopLoadT<coop_mat16x16<f16, A>>(&p_t[pb + {}u], PS);",
            COOP * kk
        );
        for c in 0..ct {
            let _ = writeln!(
                pv,
                "            o_{c} = coopMultiplyAdd(pf, coopLoadT<coop_mat16x16<f16, B>>(&kv_t[V0 + {}u * VS + {}u], VS), o_{c});",
                COOP * kk,
                COOP * c
            );
        }
        pv.push_str("        }\n");
    }
    let mut horner = String::from("            var p = c_t[G];\n");
    for m in (0..t.g).rev() {
        let _ = writeln!(horner, "            p = fma(p, x, c_t[{m}u]);");
    }
    // The store (the template): D (column EV) of each row first, from accumulator D_TILE at
    // column D_COL, then every column through the staging slice, num = vmin D + vrange num'.
    let store: String = (0..ct)
        .map(|c| {
            let slots = [("C", c.to_string()), ("COL", (COOP * c).to_string())];
            fill_fragment(DIAG_COOP_STORE, &slots)
        })
        .collect();
    let [decl, add] = io_counter_slots(count_io, 8);
    fill_template(
        DIAG_COOP,
        &[
            ("E", t.e.to_string()),
            ("EV", t.ev.to_string()),
            ("EP", t.padded_e().to_string()),
            ("EVP", t.padded_ev1().to_string()),
            ("BQ", t.bq().to_string()),
            ("BK", t.bk.to_string()),
            ("G", t.g.to_string()),
            ("WG", t.threads().to_string()),
            ("SG", t.sg.to_string()),
            ("KV_T", t.kv_halves().to_string()),
            ("S_T", t.score_words().to_string()),
            ("P_T", t.weight_halves().to_string()),
            ("MU_T", align4(t.e).to_string()),
            ("C_T", align4(t.g + 1).to_string()),
            ("VN_T", align4(3 * t.ev).to_string()),
            ("Q_FRAGS", q_frags.trim_end().to_string()),
            ("ACC_DECL", acc.trim_end().to_string()),
            ("SCORES", scores.trim_end().to_string()),
            ("HORNER", horner.trim_end().to_string()),
            ("PV", pv.trim_end().to_string()),
            ("D_TILE", (t.ev / COOP).to_string()),
            ("D_COL", (t.ev % COOP).to_string()),
            ("STORE", store.trim_end().to_string()),
            decl,
            add,
        ],
    )
}

/// P2: the least power of two at or above the largest centred key norm of all units (1 where
/// that norm is zero or not finite). The twin in python/approx_attn/reference.py computes the
/// same from its own norms.
pub fn key_power_of_two(pre: &Prepass) -> f64 {
    let k = pre.k_max_norm.iter().copied().fold(0.0, f64::max);
    if !(k > 0.0 && k.is_finite()) {
        return 1.0;
    }
    let mut p2 = 2f64.powi(k.log2().ceil().clamp(-120.0, 120.0) as i32);
    while p2 < k && p2 < 2f64.powi(120) {
        p2 *= 2.0;
    }
    while p2 / 2.0 >= k && p2 > 2f64.powi(-120) {
        p2 /= 2.0;
    }
    p2
}

/// The kernel's operand scales (scale P2, 1 / P2) and, per unit, the value normalisation
/// (vmin, 1 / vrange, vrange; vrange 1 for a constant column) that it reads.
pub fn operand_scales(p: &Problem, pre: &Prepass) -> (f32, f32, Vec<f32>) {
    let p2 = key_power_of_two(pre);
    let mut vn = Vec::with_capacity(p.units * 3 * p.ev);
    for u in 0..p.units {
        let (lo, hi) = (
            &pre.v_min[u * p.ev..(u + 1) * p.ev],
            &pre.v_max[u * p.ev..(u + 1) * p.ev],
        );
        let range: Vec<f32> = lo
            .iter()
            .zip(hi)
            .map(|(&a, &b)| if b > a { (b - a) as f32 } else { 1.0 })
            .collect();
        vn.extend(lo.iter().map(|&x| x as f32));
        vn.extend(range.iter().map(|&r| 1.0 / r));
        vn.extend(range);
    }
    ((f64::from(p.scale) * p2) as f32, (1.0 / p2) as f32, vn)
}

/// Unit roundoff of f16 and half its subnormal spacing; of f32.
const F16_U: f64 = 1.0 / 2048.0;
const F16_ETA: f64 = 1.0 / 33_554_432.0;
const F32_U: f64 = 1.0 / 16_777_216.0;
/// Largest finite f16.
const F16_MAX: f64 = 65504.0;

/// The bound on what the diagonal kernel's f16 rounding adds to the output, relative to each
/// value column's range (on top of the polynomial's eps_P / (1 - eps_P)); infinite where an
/// operand or a weight could leave f16's range.
///
/// With Q' (|q'| <= qn' = |scale| max|q| P2) and K' (|k'| <= kn' = max|k - mu| / P2 <= 1), each
/// f16 operand errs by at most u|x| + eta (u = 2^-11, eta = 2^-25); the tensor cores add the E
/// exact f16 products in f32 (at most 2 u32 of the running sum each, truncating adders: the
/// exact kernel's model, src/exact/coop.rs). With y = sum_l |q'_l| |k'_l| <= beta_s (= scale
/// max|q| max|k - mu|, Cauchy-Schwarz) a score x (|x| <= beta) becomes x' = x + dx with
///   |dx| <= d = rho beta_s + eta_a,  rho = (1+u)^2 (1+u32) (1 + 2E u32) - 1,
///   eta_a = eta sqrt(E) (1+u) (qn' (1+u32) + kn') + E eta^2.
/// The same coefficients certify |P(x') e^-x' - 1| <= eps_d on [-(beta + d), beta + d]
/// ([`certify`]: rigorous for any coefficients), so P(x') = e^x e^dx (1 +- eps_d): pointwise,
/// not the cancellation-prone Pabs bound. Rounding P(x') to f16 errs by u P(x') + eta, relative
/// rho_16 = u + eta e^(beta + d) / (1 - eps_d). Each weight of the block lies within
/// [(1 - eps_d) e^-d (1 - rho_16), (1 + eps_d) e^d (1 + rho_16)] times e^x, a factor 1 +- eps_w,
/// so the output moves by at most eps_w / (1 - eps_w) of the range (DESIGN.md, the certificate's
/// argument), and V' = (v - vmin)/vrange in [0, 1] rounded to f16 adds (u + eta) of it. The
/// factor returned is eps_w / (1 - eps_w) + u + eta - eps_P / (1 - eps_P). Not included, as for
/// the f32 path: float32 rounding (of k - mu and the scalings, Horner, the sums over keys).
pub fn diag_f16_factor(p: &Problem, poly: &Poly, pre: &Prepass) -> f64 {
    let eps_p = poly.certified_eps;
    if eps_p.is_nan() || eps_p >= 1.0 {
        return f64::INFINITY;
    }
    let p2 = key_power_of_two(pre);
    let fold_max = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
    let qn = f64::from(p.scale.abs()) * fold_max(&pre.q_max_norm) * p2;
    let kn = fold_max(&pre.k_max_norm) / p2;
    let beta_s = qn * kn;
    let (u, eta, e) = (F16_U, F16_ETA, p.e as f64);
    let rho = (1.0 + u).powi(2) * (1.0 + F32_U) * (1.0 + 2.0 * e * F32_U) - 1.0;
    let eta_a = eta * e.sqrt() * (1.0 + u) * (qn * (1.0 + F32_U) + kn) + e * eta * eta;
    let d = rho * beta_s + eta_a;
    let reach = poly.beta + d;
    let eps_d = certify(&poly.coeffs, reach);
    // f16 operands: Q' entries up to qn', weights up to (1 + eps_d) e^(beta + d), K' and V'
    // within [-1, 1].
    let top = (1.0 + eps_d) * reach.exp();
    if !(qn < F16_MAX && top < F16_MAX && eps_d < 1.0) {
        return f64::INFINITY;
    }
    let rho_16 = u + eta * reach.exp() / (1.0 - eps_d);
    let hi = (1.0 + eps_d) * d.exp() * (1.0 + rho_16) - 1.0;
    let lo = 1.0 - (1.0 - eps_d) * (-d).exp() * (1.0 - rho_16);
    let eps_w = hi.max(lo);
    if eps_w >= 1.0 {
        return f64::INFINITY;
    }
    eps_w / (1.0 - eps_w) + u + eta - eps_p / (1.0 - eps_p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(e: usize, ev: usize) -> Problem {
        Problem {
            units: 2,
            group: 1,
            l: 1000,
            s: 1000,
            e,
            ev,
            causal: true,
            scale: 0.125,
        }
    }

    fn prepass(units: usize, ev: usize, qn: f64, kn: f64) -> Prepass {
        Prepass {
            mu: vec![0.0; units * 64],
            q_max_norm: vec![qn; units],
            k_max_norm: vec![kn; units],
            v_min: vec![-1.0; units * ev],
            v_max: vec![2.0; units * ev],
            nonfinite: [0; 3],
        }
    }

    #[test]
    fn tiles_fit_the_nvidia_budget_up_to_e_128_and_cap_the_block() {
        let b = Budget::with_binding(12288, 1 << 30);
        for e in [1usize, 16, 33, 64, 100, 128] {
            let t = plan_tiles(&problem(e, e), 2, &b, 32, usize::MAX).unwrap();
            assert_eq!((t.subgroups, t.bk), (4, 32), "E={e}");
            assert!(tiles_fit(&t, &b) && t.fast_memory_words() <= 12288);
        }
        // A forced chunk caps the block (16 rows at least).
        let t = plan_tiles(&problem(64, 64), 2, &b, 32, 16).unwrap();
        assert_eq!(t.bq(), 16);
        let t = plan_tiles(&problem(64, 64), 2, &b, 32, 1).unwrap();
        assert_eq!(t.bq(), 16);
        // Ev + 1 = 257 columns take 17 accumulators: no tiles.
        assert!(plan_tiles(&problem(256, 256), 2, &b, 32, usize::MAX).is_none());
    }

    #[test]
    fn key_scale_is_the_power_of_two_at_or_above_the_key_norm() {
        for (kn, want) in [(3.0, 4.0), (4.0, 4.0), (4.1, 8.0), (0.3, 0.5), (0.0, 1.0)] {
            let pre = prepass(2, 4, 1.0, kn);
            assert_eq!(key_power_of_two(&pre), want, "{kn}");
        }
        let p = problem(64, 4);
        let (qs, ks, vn) = operand_scales(&p, &prepass(2, 4, 1.0, 3.0));
        assert_eq!((qs, ks), (0.5, 0.25));
        assert_eq!(
            &vn[..12],
            &[
                -1.0,
                -1.0,
                -1.0,
                -1.0,
                1.0 / 3.0,
                1.0 / 3.0,
                1.0 / 3.0,
                1.0 / 3.0,
                3.0,
                3.0,
                3.0,
                3.0
            ]
        );
    }

    #[test]
    fn f16_factor_is_the_score_rounding_plus_two_roundings() {
        let p = problem(64, 64);
        // beta = 0.125 * 8 * 1 = 1: scores move by about 2u, weights and values round by u each,
        // and the fit's certificate widens from [-1, 1] to [-1 - 2u, 1 + 2u].
        let pre = prepass(2, 64, 8.0, 1.0);
        for g in [2usize, 4, 8] {
            let poly = Poly::fit(1.0, g);
            let f = diag_f16_factor(&p, &poly, &pre);
            let eps_d = certify(&poly.coeffs, 1.0 + 2.0 * F16_U);
            let w = (1.0 + eps_d) * (2.0 * F16_U).exp() * (1.0 + F16_U) - 1.0;
            let e = poly.certified_eps;
            let approx = w / (1.0 - w) - e / (1.0 - e) + F16_U;
            assert!(f > approx && f < approx * 1.02, "g={g}: {f} vs {approx}");
            // Far below the cancellation-prone bound through Pabs and e^(2 beta).
            assert!(f < 6.0 * F16_U, "g={g}: {f}");
        }
        let poly = Poly::fit(1.0, 4);
        let f = diag_f16_factor(&p, &poly, &pre);
        // Larger scores, larger bound; overflowing weights, none.
        assert!(diag_f16_factor(&p, &poly, &prepass(2, 64, 16.0, 1.0)) > f);
        let big = Poly::fit(12.0, 20);
        assert_eq!(
            diag_f16_factor(&p, &big, &prepass(2, 64, 96.0, 1.0)),
            f64::INFINITY
        );
    }
}
