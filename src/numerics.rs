//! The float32 range of the kernels: where scores or value sums could leave it, and the exact
//! rescalings that keep them inside.
//!
//! Scores. The exact kernel forms `s = (q * scale * log2 e) . k` in float32 and treats anything at
//! or below `NEG = -3e38` as masked. By Cauchy–Schwarz every partial sum of that product is at most
//! `c |q| |k|` with `c = |scale| log2 e`, so with `B = |scale| max|q_i| max|k_j|` (largest row
//! norms) nothing overflows, and no score reaches NEG, while `c B (1 + gamma) < 3e38`: the call is
//! refused (a `ValueError` naming B) where `c B >= 2^127`, a margin of 1.76 for every rounding. Below
//! that, the scale and the magnitudes of Q and K are rebalanced by powers of two where they are
//! far apart ([`ScoreFold`]): `q' = 2^a q`, `k' = 2^b k`, `scale' = scale 2^-(a+b)` in [1, 2).
//! Multiplying by a power of two is exact in float32 (away from its subnormals), so the kernel's
//! scores are those of the original inputs with every rounding unchanged; only their exponents
//! move away from float32's ends. `beta` of the poly certificate, `scale |q| |k - mu|`, is the same
//! number for both (the poly method runs on the original inputs: it scales keys itself).
//!
//! Values. Normalised attention is affine-equivariant per value column: with `V' = (V - shift) /
//! scale` (per KV unit and column; shift the midpoint of the column, scale the power of two at or
//! above its half-range) the output is `O = O' scale + shift`. The kernels sum `S` weighted values
//! in float32, which overflows where `S max|V|` nears float32's maximum although the output, a
//! convex combination of the values, is finite. [`ValueMap`] runs such calls on `V'` in [-1, 1]
//! and maps back in float64. It is used only where a run's output was not finite (then the call
//! runs again): mapping costs a pass over V and one over the output, on the host, on every call,
//! and changes nothing where the sums stay finite. The poly certificate's per-column bound,
//! `eps/(1-eps) range(V)`, scales with the range: the same bound for the mapped run.

use std::fmt;

use crate::api::Problem;
use crate::error::Error;
use crate::parallel::map_chunks;

/// Scores (in log2 units, `c B`) at or above this are refused: float32's largest value is
/// 2^128 (1 - 2^-24) and the exact kernel's mask value -3e38 ~ -2^127.8.
pub const SCORE_LIMIT_LOG2: f64 = 1.7014118346046923e38; // 2^127

/// Rebalance Q and K where an operand of the score product (q * c or k) exceeds this in norm:
/// below it, float32 flushing a subnormal product to zero changes a score by at most
/// E 2^-126 2^90 = E 2^-36, far below float32's own rounding of the scores.
const OPERAND_LIMIT: f64 = 1.2379400392853803e27; // 2^90

/// Largest Euclidean row norm and largest |element| of `rows` rows of width `w` (f64 sums of
/// squares; NaN or Inf where an element is), on several threads for large inputs.
pub fn row_norm_and_max(x: &[f32], w: usize) -> (f64, f64) {
    let fold = |part: &[f32]| {
        part.chunks(w.max(1)).fold((0f64, 0f64), |(n, a), row| {
            let (ss, mx) = row.iter().fold((0f64, 0f64), |(ss, mx), &y| {
                let y = f64::from(y);
                // f64::max ignores NaN: carry it explicitly.
                (
                    ss + y * y,
                    if y.abs() > mx || y.is_nan() {
                        y.abs()
                    } else {
                        mx
                    },
                )
            });
            let nn = ss.sqrt();
            (
                if nn > n || nn.is_nan() { nn } else { n },
                if mx > a || mx.is_nan() { mx } else { a },
            )
        })
    };
    let merge = |(n, a): (f64, f64), (n2, a2): (f64, f64)| {
        (
            if n2 > n || n2.is_nan() { n2 } else { n },
            if a2 > a || a2.is_nan() { a2 } else { a },
        )
    };
    map_chunks(x, w, fold)
        .into_iter()
        .map(|r| r.unwrap_or((f64::NAN, f64::NAN)))
        .fold((0f64, 0f64), merge)
}

/// Largest |element| of `x` (+Inf where one is not finite), on several threads for large inputs:
/// the sign bit cleared, the bits compared as integers (NaN and Inf are above every finite
/// float), which vectorises.
pub fn abs_max(x: &[f32]) -> f64 {
    let fold = |part: &[f32]| {
        part.iter()
            .fold(0u32, |m, y| m.max(y.to_bits() & 0x7fff_ffff))
    };
    let bits = map_chunks(x, 1, fold)
        .into_iter()
        .map(|r| r.unwrap_or(u32::MAX))
        .fold(0, u32::max);
    let a = f32::from_bits(bits.min(0x7f80_0000));
    f64::from(a)
}

/// Whether every element of `x` is finite, on several threads for large outputs.
pub fn all_finite(x: &[f32]) -> bool {
    let check = |part: &[f32]| part.iter().all(|y| y.is_finite());
    map_chunks(x, 1, check)
        .into_iter()
        .all(|r| r.unwrap_or(false))
}

/// Per KV unit and value column, `(units, ev)` each: min, max and max |v|, and the number of
/// non-finite values.
pub struct ValueColumns {
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    pub abs_max: Vec<f64>,
    pub nonfinite: u64,
}

pub fn value_columns(p: &Problem, v: &[f32]) -> ValueColumns {
    let n = p.units * p.ev;
    let mut c = ValueColumns {
        min: vec![f64::INFINITY; n],
        max: vec![f64::NEG_INFINITY; n],
        abs_max: vec![0f64; n],
        nonfinite: 0,
    };
    for u in 0..p.units {
        let unit = &v[u * p.s * p.ev..(u + 1) * p.s * p.ev];
        for row in unit.chunks(p.ev) {
            for (j, &y) in row.iter().enumerate() {
                if !y.is_finite() {
                    c.nonfinite += 1;
                    continue;
                }
                let (i, y) = (u * p.ev + j, f64::from(y));
                c.min[i] = c.min[i].min(y);
                c.max[i] = c.max[i].max(y);
                c.abs_max[i] = c.abs_max[i].max(y.abs());
            }
        }
    }
    c
}

/// Upper bounds on the largest row norms of Q and K (over all units): NaN or Inf where an input
/// is not finite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Magnitudes {
    pub q_norm: f64,
    pub k_norm: f64,
}

impl Magnitudes {
    /// From the inputs' largest elements (|x| <= sqrt(E) max|x_l|): one pass over Q and K at
    /// memory speed, which settles most calls (see [`score_fold_for`]).
    pub fn quick(p: &Problem, q: &[f32], k: &[f32]) -> Magnitudes {
        let root_e = (p.e as f64).sqrt();
        Magnitudes {
            q_norm: root_e * abs_max(q),
            k_norm: root_e * abs_max(k),
        }
    }

    /// From the inputs themselves, on the host (one pass over Q and K).
    pub fn of(p: &Problem, q: &[f32], k: &[f32]) -> Magnitudes {
        Magnitudes {
            q_norm: row_norm_and_max(q, p.e).0,
            k_norm: row_norm_and_max(k, p.e).0,
        }
    }

    /// From the poly pre-pass: its float32 squared norms (of Q, and of K around the key mean mu),
    /// widened for their rounding: a sum of E squares in float32 errs by at most gamma_(E+1)
    /// relatively, plus E 2^-126 for squares flushed to zero; |k| <= |k - mu| + |mu|. None where
    /// they overflowed float32 (or an input is not finite): then only the host knows.
    pub fn from_prepass(
        p: &Problem,
        q_max_norm: &[f64],
        k_max_norm: &[f64],
        mu: &[f32],
    ) -> Option<Magnitudes> {
        let e = p.e as f64;
        let u = f64::from(f32::EPSILON) / 2.0;
        let widen = |n: f64| (n * n * (1.0 + 2.0 * (e + 1.0) * u) + e * 2f64.powi(-126)).sqrt();
        let q_norm = q_max_norm.iter().map(|&n| widen(n)).fold(0.0, f64::max);
        let k_norm = k_max_norm
            .iter()
            .enumerate()
            .map(|(unit, &n)| {
                let m = &mu[unit * p.e..(unit + 1) * p.e];
                let mu_norm = m.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
                (widen(n) + mu_norm) * (1.0 + 4.0 * u)
            })
            .fold(0.0, f64::max);
        let finite = |x: f64| x.is_finite() && x < f64::from(f32::MAX);
        (finite(q_norm) && finite(k_norm)).then_some(Magnitudes { q_norm, k_norm })
    }

    /// Whether both inputs are finite (their norms are).
    pub fn finite(&self) -> bool {
        self.q_norm.is_finite() && self.k_norm.is_finite()
    }
}

/// Powers of two moved between the scale and the inputs of the score product: the kernel runs
/// on `2^q_exp Q`, `2^k_exp K` with `scale` (the caller's scale times `2^-(q_exp + k_exp)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreFold {
    pub q_exp: i32,
    pub k_exp: i32,
    pub scale: f32,
}

impl fmt::Display for ScoreFold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query x 2^{}, key x 2^{}, scale {:e}",
            self.q_exp, self.k_exp, self.scale
        )
    }
}

/// `x = m 2^e` with m in [1, 2), for finite x != 0 (f64, exact).
fn exponent(x: f64) -> i32 {
    let mut e = x.abs().log2().floor() as i32;
    // log2 may round across a power of two: settle the exponent exactly.
    while 2f64.powi(e) > x.abs() {
        e -= 1;
    }
    while 2f64.powi(e + 1) <= x.abs() {
        e += 1;
    }
    e
}

/// The error for scores that can leave float32's range.
fn score_overflow(scale: f64, m: &Magnitudes) -> Error {
    let b = scale.abs() * m.q_norm * m.k_norm;
    let limit = SCORE_LIMIT_LOG2 / std::f64::consts::LOG2_E;
    Error::InvalidInput(format!(
        "the scores scale * q.k can overflow float32: scale * max|q_i| * max|k_j| = {b:.4e} (the \
         Cauchy-Schwarz bound on every score; |scale| = {:.4e}, largest row norms {:.4e} and \
         {:.4e}) is beyond the {limit:.4e} that the float32 kernel holds (float32's range, with \
         scores in log2 units); scale the query or key down",
        scale.abs(),
        m.q_norm,
        m.k_norm
    ))
}

/// Whether the exact kernel needs its score operands rebalanced, and how: `Ok(None)` where it runs
/// the inputs as they are; an error where the scores can overflow float32 (see the module docs).
/// Inputs that are not finite run as they are (the caller skipped the finiteness check).
pub fn score_fold(scale: f32, m: &Magnitudes) -> Result<Option<ScoreFold>, Error> {
    let s = f64::from(scale);
    if !m.finite() || s == 0.0 || m.q_norm == 0.0 || m.k_norm == 0.0 {
        return Ok(None);
    }
    let c = s.abs() * std::f64::consts::LOG2_E;
    if c * m.q_norm * m.k_norm >= SCORE_LIMIT_LOG2 {
        return Err(score_overflow(s, m));
    }
    let subnormal_scale = s.abs() < f64::from(f32::MIN_POSITIVE);
    if !subnormal_scale && c * m.q_norm <= OPERAND_LIMIT && m.k_norm <= OPERAND_LIMIT {
        return Ok(None);
    }
    // scale = ms 2^es, ms in [1, 2); balance |q'| c' and |k'| (log2 of each about half of
    // log2(c B)), with a + b = es.
    let es = exponent(s);
    let ms = s * 2f64.powi(-es);
    let lq = (ms.abs() * std::f64::consts::LOG2_E * m.q_norm).log2();
    let lk = m.k_norm.log2();
    let a = ((f64::from(es) + lk - lq) / 2.0).round() as i32;
    Ok(Some(ScoreFold {
        q_exp: a,
        k_exp: es - a,
        scale: ms as f32,
    }))
}

/// [`score_fold`] from a cheap bound (`quick`: the elements' or the pre-pass's) where it settles
/// the call (nothing to rebalance), else from the largest row norms computed on the host. Returns
/// the magnitudes it decided on.
pub fn score_fold_for(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    quick: Option<Magnitudes>,
) -> Result<(Option<ScoreFold>, Magnitudes), Error> {
    if let Some(m) = quick {
        if let Ok(None) = score_fold(p.scale, &m) {
            return Ok((None, m));
        }
    }
    let m = Magnitudes::of(p, q, k);
    Ok((score_fold(p.scale, &m)?, m))
}

/// `2^e x`, elementwise (exact where the result is a normal float32).
pub fn times_pow2(x: &[f32], e: i32) -> Vec<f32> {
    let f = 2f64.powi(e);
    x.iter().map(|&y| (f64::from(y) * f) as f32).collect()
}

/// The per-column affine map of the values (see the module docs), per KV unit and column.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueMap {
    ev: usize,
    group: usize,
    shift: Vec<f64>,
    scale: Vec<f64>,
    lo: Vec<f64>,
    hi: Vec<f64>,
}

/// Runs `f(first_row, part)` over `data` cut into whole rows of `ev` values, on several threads
/// for large data as the host copies are: a value map is a float64 pass over every element of V
/// and of the output, on the host path of every poly call.
fn for_rows<T: Send>(data: &mut [T], ev: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = data.len() / ev;
    let threads = crate::transfer::copy_threads(std::mem::size_of_val(data));
    if threads <= 1 || rows < 2 {
        f(0, data);
        return;
    }
    let per = rows.div_ceil(threads) * ev;
    std::thread::scope(|scope| {
        for (t, part) in data.chunks_mut(per).enumerate() {
            let f = &f;
            scope.spawn(move || f(t * per / ev, part));
        }
    });
}

impl ValueMap {
    /// From the columns' extremes, `(units, ev)` each (finite).
    pub fn new(p: &Problem, lo: &[f64], hi: &[f64]) -> ValueMap {
        let (shift, scale) = lo
            .iter()
            .zip(hi)
            .map(|(&a, &b)| {
                let half = (b - a) / 2.0;
                let scale = if half > 0.0 {
                    2f64.powi(exponent(half) + 1)
                } else {
                    1.0
                };
                (a + half, scale)
            })
            .unzip();
        ValueMap {
            ev: p.ev,
            group: p.group,
            shift,
            scale,
            lo: lo.to_vec(),
            hi: hi.to_vec(),
        }
    }

    /// `V' = (V - shift) / scale`, in [-1, 1] (computed in float64, rounded once).
    pub fn apply(&self, v: &[f32]) -> Vec<f32> {
        let ev = self.ev.max(1);
        let per_unit = v.len() / (self.shift.len() / ev).max(1);
        // Zeroed pages from the allocator, first touched by the threads that write them: a copy
        // into fresh memory on one thread spends most of its time in page faults (measured on
        // an H100 host: about 1.2 s for a 537 MB V, more than the kernels of the call).
        let mut out = vec![0f32; v.len()];
        for_rows(&mut out, ev, |row0, part| {
            let src = &v[row0 * ev..row0 * ev + part.len()];
            for (r, (row, x)) in part.chunks_mut(ev).zip(src.chunks(ev)).enumerate() {
                // Rows of one unit are consecutive: per_unit is a multiple of ev.
                self.map_unit_rows((row0 + r) * ev / per_unit, x, row);
            }
        });
        out
    }

    /// [`ValueMap::apply`] of `v`'s rows of `unit` into `dst`, element for element the same.
    fn map_unit_rows(&self, unit: usize, v: &[f32], dst: &mut [f32]) {
        let ev = self.ev.max(1);
        let (shift, scale) = (
            &self.shift[unit * ev..(unit + 1) * ev],
            &self.scale[unit * ev..(unit + 1) * ev],
        );
        for (src, out) in v.chunks(ev).zip(dst.chunks_mut(ev)) {
            for (c, (x, y)) in src.iter().zip(out).enumerate() {
                *y = ((f64::from(*x) - shift[c]) / scale[c]) as f32;
            }
        }
    }

    /// The extremes of the mapped columns, `(units, ev)` each.
    pub fn mapped_range(&self) -> (Vec<f64>, Vec<f64>) {
        let map = |x: &[f64]| -> Vec<f64> {
            x.iter()
                .zip(self.shift.iter().zip(&self.scale))
                .map(|(&y, (&sh, &sc))| f64::from(((y - sh) / sc) as f32))
                .collect()
        };
        (map(&self.lo), map(&self.hi))
    }

    /// `O = O' scale + shift` in float64, then rounded once to float32. O lies in the column's
    /// range (a convex combination of its values): the result is clamped to it, which can only
    /// move it closer and keeps it finite.
    pub fn restore(&self, out: &mut [f32]) {
        let ev = self.ev.max(1);
        let units = self.shift.len() / ev;
        let per_head = out.len() / (units * self.group).max(1);
        for_rows(out, ev, |row0, part| {
            for (r, row) in part.chunks_mut(ev).enumerate() {
                let j0 = (row0 + r) * ev / per_head / self.group * ev;
                for (c, o) in row.iter_mut().enumerate() {
                    let j = j0 + c;
                    let y = f64::from(*o) * self.scale[j] + self.shift[j];
                    *o = y.clamp(self.lo[j], self.hi[j]) as f32;
                }
            }
        });
    }

    /// The largest column scale over the units, per column: a bound computed for the mapped run
    /// times this is the bound for the call.
    pub fn column_scale(&self) -> Vec<f64> {
        (0..self.ev)
            .map(|c| {
                self.scale
                    .iter()
                    .skip(c)
                    .step_by(self.ev)
                    .copied()
                    .fold(0.0, f64::max)
            })
            .collect()
    }
}

impl crate::transfer::RowMap for ValueMap {
    fn width(&self) -> usize {
        self.ev
    }

    fn map_rows(&self, unit: usize, src: &[f32], dst: &mut [f32]) {
        self.map_unit_rows(unit, src, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(units: usize, group: usize, s: usize, ev: usize) -> Problem {
        Problem {
            units,
            group,
            l: 3,
            s,
            e: 4,
            ev,
            causal: false,
            scale: 0.5,
        }
    }

    /// The row-parallel map equals the per-element formula, on one thread and on several (V of
    /// 3 units x 700,003 rows x 5 columns is 42 MB, above the threads' threshold).
    #[test]
    fn value_map_rows_in_parallel_equal_the_formula() {
        for s in [7, 700_003] {
            let (units, group, ev) = (3, 2, 5);
            let p = Problem {
                l: s,
                ..problem(units, group, s, ev)
            };
            let n = units * s * ev;
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1009) as f32 - 500.0).collect();
            let lo: Vec<f64> = (0..units * ev).map(|j| -500.0 - j as f64).collect();
            let hi: Vec<f64> = (0..units * ev).map(|j| 508.0 + 3.0 * j as f64).collect();
            let map = ValueMap::new(&p, &lo, &hi);
            let got = map.apply(&v);
            for (i, (&y, &g)) in v.iter().zip(&got).enumerate() {
                let j = (i / (s * ev)) * ev + i % ev;
                let want = ((f64::from(y) - map.shift[j]) / map.scale[j]) as f32;
                assert_eq!(g.to_bits(), want.to_bits(), "apply {i}");
            }
            let mut out: Vec<f32> = (0..units * group * s * ev)
                .map(|i| ((i % 97) as f32 - 48.0) / 49.0)
                .collect();
            let before = out.clone();
            map.restore(&mut out);
            for (i, (&o, &r)) in before.iter().zip(&out).enumerate() {
                let j = (i / (s * ev) / group) * ev + i % ev;
                let y = f64::from(o) * map.scale[j] + map.shift[j];
                assert_eq!(
                    r.to_bits(),
                    (y.clamp(lo[j], hi[j]) as f32).to_bits(),
                    "restore {i}"
                );
            }
        }
    }

    #[test]
    fn exponent_is_exact_at_powers_of_two() {
        for e in [-1022, -149, -126, -1, 0, 1, 52, 127, 1023] {
            let x = 2f64.powi(e);
            assert_eq!(exponent(x), e, "2^{e}");
            assert_eq!(exponent(x * 1.999_999), e);
            assert_eq!(exponent(-x * 1.5), e);
        }
    }

    #[test]
    fn ordinary_inputs_run_as_they_are() {
        let m = Magnitudes {
            q_norm: 10.0,
            k_norm: 12.0,
        };
        assert_eq!(score_fold(0.125, &m), Ok(None));
        assert_eq!(score_fold(0.0, &m), Ok(None));
        let nan = Magnitudes {
            q_norm: f64::NAN,
            k_norm: 1e300,
        };
        assert_eq!(score_fold(3e38, &nan), Ok(None));
    }

    #[test]
    fn overflowing_scores_are_refused_with_the_bound() {
        let m = Magnitudes {
            q_norm: 2.0,
            k_norm: 2.0,
        };
        let err = score_fold(3e38, &m).unwrap_err().to_string();
        assert!(
            err.contains("1.2000e39") && err.contains("float32"),
            "{err}"
        );
        // Just below the limit: runs (rebalanced).
        let s = (SCORE_LIMIT_LOG2 / std::f64::consts::LOG2_E / 4.0 * 0.999) as f32;
        assert!(score_fold(s, &m).unwrap().is_some());
    }

    #[test]
    fn folds_keep_the_product_and_balance_the_operands() {
        for (scale, qn, kn) in [
            (1e-40f32, 1e20, 1e20),
            (0.5, 1e30, 1e-31),
            (1e30, 1e-2, 1e-25),
            (2e-30, 1e-5, 1e34),
        ] {
            let m = Magnitudes {
                q_norm: qn,
                k_norm: kn,
            };
            let f = score_fold(scale, &m).unwrap().expect("a fold");
            let before = f64::from(scale) * qn * kn;
            let after = f64::from(f.scale) * (qn * 2f64.powi(f.q_exp)) * (kn * 2f64.powi(f.k_exp));
            assert!(
                (after / before - 1.0).abs() < 1e-6,
                "{f}: {after} vs {before}"
            );
            assert!((1.0..2.0).contains(&f.scale.abs()), "{f}");
            let (q2, k2) = (
                f64::from(f.scale) * std::f64::consts::LOG2_E * qn * 2f64.powi(f.q_exp),
                kn * 2f64.powi(f.k_exp),
            );
            assert!((q2 / k2).log2().abs() <= 1.5, "{f}: {q2} vs {k2}");
        }
    }

    #[test]
    fn powers_of_two_are_exact() {
        let x = [1.5f32, -3.25e-20, 7.0e20, 0.0];
        let y = times_pow2(&x, 40);
        assert_eq!(times_pow2(&y, -40), x);
    }

    #[test]
    fn value_map_round_trips_and_stays_in_range() {
        // Two units, group 2 (four query heads), two columns: a constant one and a wide one.
        let p = problem(2, 2, 3, 2);
        let v = [
            3e38f32, -3e38, 3e38, 3e38, 3e38, 1e38, // unit 0
            -1.0, 5.0, -1.0, 6.0, -1.0, 7.0, // unit 1
        ];
        let cols = value_columns(&p, &v);
        assert_eq!(cols.nonfinite, 0);
        let map = ValueMap::new(&p, &cols.min, &cols.max);
        let vm = map.apply(&v);
        assert!(vm.iter().all(|x| (-1.0..=1.0).contains(x)), "{vm:?}");
        let (lo, hi) = map.mapped_range();
        assert!(lo.iter().chain(&hi).all(|x| (-1.0..=1.0).contains(x)));
        // Outputs equal to the values' rows come back as those values (exactly here).
        let mut out: Vec<f32> = [&vm[0..2], &vm[2..4], &vm[6..8], &vm[8..10]]
            .iter()
            .flat_map(|r| r.iter().copied())
            .collect();
        // heads 0, 1 belong to unit 0; heads 2, 3 to unit 1; l = 1 row each here.
        map.restore(&mut out);
        assert_eq!(out, vec![3e38, -3e38, 3e38, 3e38, -1.0, 5.0, -1.0, 6.0]);
        assert_eq!(map.column_scale()[0], 1.0);
    }

    #[test]
    fn value_columns_count_non_finite() {
        let p = problem(1, 1, 2, 2);
        let cols = value_columns(&p, &[1.0, f32::NAN, f32::INFINITY, 2.0]);
        assert_eq!(cols.nonfinite, 2);
        assert_eq!((cols.min[1], cols.max[1]), (2.0, 2.0));
    }

    #[test]
    fn abs_max_sees_every_element() {
        assert_eq!(abs_max(&[]), 0.0);
        assert_eq!(abs_max(&[1.0, -3.5, 2.0]), 3.5);
        assert_eq!(abs_max(&[1.0, f32::NAN]), f64::INFINITY);
        assert_eq!(abs_max(&[f32::NEG_INFINITY, 1.0]), f64::INFINITY);
        let big: Vec<f32> = (0..(3 << 20)).map(|i| (i % 1000) as f32).collect();
        let mut with_max = big.clone();
        with_max[(3 << 20) - 1] = -1e30;
        assert_eq!(
            (abs_max(&big), abs_max(&with_max)),
            (999.0, f64::from(-1e30f32).abs())
        );
    }

    #[test]
    fn the_quick_bound_settles_ordinary_calls_and_defers_the_rest() {
        let p = problem(1, 1, 2, 2);
        let (q, k) = ([1.0f32, 2.0, 3.0, 4.0], [0.5f32, 0.0, 0.0, 0.5]);
        let (fold, m) = score_fold_for(&p, &q, &k, Some(Magnitudes::quick(&p, &q, &k))).unwrap();
        assert_eq!((fold, m.q_norm), (None, 8.0)); // sqrt(4) * 4
                                                   // The quick bound is beyond the limit, the row norms are not: runs, rebalanced.
        let p = Problem {
            scale: 1e20,
            e: 2,
            ..p
        };
        let (q, k) = ([1e9f32, 0.0, 0.0, 1e9], [0.0f32, 1e9, 1e9, 0.0]);
        let (fold, m) = score_fold_for(&p, &q, &k, Some(Magnitudes::quick(&p, &q, &k))).unwrap();
        assert!(fold.is_some() && m.q_norm == 1e9, "{fold:?} {m:?}");
    }

    #[test]
    fn norms_carry_nan() {
        let (n, a) = row_norm_and_max(&[1.0, f32::NAN, 3.0, 4.0], 2);
        assert!(n.is_nan() && a.is_nan());
        assert_eq!(row_norm_and_max(&[3.0, 4.0, 0.0, -1.0], 2), (5.0, 4.0));
        assert!(all_finite(&[1.0, 2.0]) && !all_finite(&[1.0, f32::INFINITY]));
    }
}
