//! Pure I/O accounting: the words (4 bytes) a plan moves between storage buffers (slow memory) and
//! workgroup memory (fast memory, M = `fast_memory_words`), counted exactly as the kernels do.
//! Each method counts its own plans (`exact::io`, `poly::io`); this module holds the tally and the
//! closed-form bounds of the model.

/// Words read from and written to storage buffers by all workgroups of a plan, per pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoCount {
    pub passes: Vec<PassIo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassIo {
    pub name: &'static str,
    pub reads: u64,
    pub writes: u64,
}

impl IoCount {
    pub fn reads(&self) -> u64 {
        self.passes.iter().map(|p| p.reads).sum()
    }
    pub fn writes(&self) -> u64 {
        self.passes.iter().map(|p| p.writes).sum()
    }
    pub fn total(&self) -> u64 {
        self.reads() + self.writes()
    }
}

/// A word count in u128 whose every step is checked: `None` from the first overflow on. The
/// closed-form counts (`exact::io`, `poly::io`, `poly::causal`) are written with it, so a sum
/// reads as the formula it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Words(pub Option<u128>);

impl Words {
    pub const ZERO: Words = Words(Some(0));
}

/// A size or count as [`Words`].
pub(crate) fn words(x: usize) -> Words {
    Words(Some(x as u128))
}

impl From<u128> for Words {
    fn from(x: u128) -> Words {
        Words(Some(x))
    }
}

impl From<Option<u128>> for Words {
    fn from(x: Option<u128>) -> Words {
        Words(x)
    }
}

impl std::ops::Add for Words {
    type Output = Words;
    fn add(self, o: Words) -> Words {
        Words(self.0.zip(o.0).and_then(|(a, b)| a.checked_add(b)))
    }
}

impl std::ops::Mul for Words {
    type Output = Words;
    fn mul(self, o: Words) -> Words {
        Words(self.0.zip(o.0).and_then(|(a, b)| a.checked_mul(b)))
    }
}

impl std::ops::AddAssign for Words {
    fn add_assign(&mut self, o: Words) {
        *self = *self + o;
    }
}

impl std::iter::Sum for Words {
    fn sum<I: Iterator<Item = Words>>(it: I) -> Words {
        it.fold(Words::ZERO, |a, b| a + b)
    }
}

/// The words of each pass (name, reads, writes) as an [`IoCount`], or [`Error::Overflow`] where
/// a count overflowed or all of them together exceed u64 (`what` names the plan).
pub(crate) fn checked_io(
    passes: Vec<(&'static str, Words, Words)>,
    what: impl FnOnce() -> String,
) -> Result<IoCount, crate::error::Error> {
    let total = passes.iter().map(|(_, r, w)| *r + *w).sum::<Words>();
    match total.0 {
        Some(t) if t <= u128::from(u64::MAX) => Ok(IoCount {
            passes: passes
                .into_iter()
                .map(|(name, r, w)| PassIo {
                    name,
                    // Each fits: their sum does.
                    reads: r.0.unwrap_or(0) as u64,
                    writes: w.0.unwrap_or(0) as u64,
                })
                .collect(),
        }),
        _ => Err(crate::error::Error::Overflow(format!(
            "{} moves more than 2^64 - 1 words: beyond u64",
            what()
        ))),
    }
}

/// `sum_{i < n} floor((a i + b) / m)` for m > 0, in O(log m) steps (the Euclid-like reduction
/// of the classic floor sum); None where it overflows u128.
pub(crate) fn floor_sum(mut n: u128, mut m: u128, mut a: u128, mut b: u128) -> Option<u128> {
    let mut ans = 0u128;
    loop {
        if n == 0 {
            return Some(ans);
        }
        if a >= m {
            let tri = if n % 2 == 0 {
                (n / 2).checked_mul(n - 1)?
            } else {
                n.checked_mul((n - 1) / 2)?
            };
            ans = ans.checked_add(tri.checked_mul(a / m)?)?;
            a %= m;
        }
        if b >= m {
            ans = ans.checked_add(n.checked_mul(b / m)?)?;
            b %= m;
        }
        let y_max = a.checked_mul(n)?.checked_add(b)?;
        if y_max < m {
            return Some(ans);
        }
        n = y_max / m;
        b = y_max % m;
        std::mem::swap(&mut m, &mut a);
    }
}

/// `sum_{i < n} i = n (n - 1) / 2`; None where it overflows u128.
pub(crate) fn triangle(n: u128) -> Option<u128> {
    if n % 2 == 0 {
        (n / 2).checked_mul(n.saturating_sub(1))
    } else {
        n.checked_mul((n - 1) / 2)
    }
}

/// Closed-form costs and the lower bound, in words. These bounds are reconstructed from the
/// literature (Saha & Ye 2024, arXiv 2402.07443, for exact attention; the polynomial bounds follow
/// the same Hong-Kung segment counting, see docs/io-model.md) and are not the seed paper's own constants.
/// `n_*` are sequence lengths, `d` = E (= Ev for the closed forms), `r` the rank, `m` words of fast
/// memory.
pub mod closed_form {
    /// Tiled exact attention (FlashAttention): Q read once, K and V once per query tile of
    /// b = M / (4d) rows, O written once: L·d + ⌈L/b⌉·S·2d + L·d ≈ 8·L·S·d²/M for large L.
    pub fn exact_tiled(l: f64, s: f64, d: f64, m: f64) -> f64 {
        let b = (m / (4.0 * d)).max(1.0);
        2.0 * l * d + (l / b).ceil() * s * 2.0 * d
    }

    /// Schedule A (S' fits): read Q, K, V once and write O: L·d + 2·S·d + L·d (≈ 4·n·d).
    pub fn poly_a(l: f64, s: f64, d: f64) -> f64 {
        2.0 * l * d + 2.0 * s * d
    }

    /// Schedule B: pass 1 re-reads K, V once per chunk of M/(d+1) feature rows, pass 2 streams S'
    /// once per block of M/(3d) queries: 2·S·d·r(d+1)/M + 2·L·d + L·r(d+1)·3d/M = O(n·d + n·r·d²/M).
    pub fn poly_b(l: f64, s: f64, d: f64, r: f64, m: f64) -> f64 {
        let rc = (m / (d + 1.0)).max(1.0);
        let b = (m / (3.0 * d)).max(1.0);
        2.0 * s * d * (r / rc).ceil() + 2.0 * l * d + (l / b).ceil() * r * (d + 1.0)
    }

    /// Features materialized (M < d²): Φ(Q), Φ(K) written out and multiplied with √M-blocked
    /// products: n·d + 2·n·r + 2·n·r·d/√M (schedule C of docs/io-model.md; not implemented as a kernel).
    pub fn poly_materialized(n: f64, d: f64, r: f64, m: f64) -> f64 {
        n * d + 2.0 * n * r + 2.0 * n * r * d / m.sqrt()
    }

    /// Reconstructed lower bound Ω(n·d + min(n·r·d²/M, n·r·d/√M)) with the constants of the
    /// segment argument: every segment of M I/Os touches <= 2M/d key rows and <= 2M accumulators,
    /// i.e. <= 4M²/d of the n·r·(d+1) products, so I/O >= n·r·d(d+1)/(4M) - M; the other branch
    /// n·r·d/(4√M); plus reading the inputs and writing the output (the trivial bound).
    pub fn poly_lower_bound(l: f64, s: f64, d: f64, r: f64, m: f64) -> f64 {
        let n = l.max(s);
        let trivial = 2.0 * l * d + 2.0 * s * d;
        let products = (n * r * d * (d + 1.0) / (4.0 * m) - m).max(0.0);
        let materialized = n * r * d / (4.0 * m.sqrt());
        trivial.max(products.min(materialized))
    }

    /// Lower bound of exact attention (Saha & Ye): Ω(min(n²d²/M, n²d/√M)) plus the trivial
    /// bound, with constant 1/4 as above.
    pub fn exact_lower_bound(l: f64, s: f64, d: f64, m: f64) -> f64 {
        let trivial = 2.0 * l * d + 2.0 * s * d;
        trivial.max((l * s * d * d / (4.0 * m)).min(l * s * d / (4.0 * m.sqrt())))
    }
}
