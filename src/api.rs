//! The vocabulary of the crate: the problem, the method and its options, and what a call
//! reports. Defined once, filled in Rust, exposed to Python by `python.rs`.

use crate::error::Error;

/// One attention problem, already flattened: `units` = batch x KV heads; each unit has `group`
/// query heads (`enable_gqa`), so Q is `(units*group, l, e)`, K `(units, s, e)`, V `(units, s, ev)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Problem {
    pub units: usize,
    pub group: usize,
    pub l: usize,
    pub s: usize,
    pub e: usize,
    pub ev: usize,
    pub causal: bool,
    pub scale: f32,
}

impl Problem {
    pub fn query_heads(&self) -> usize {
        self.units * self.group
    }

    /// Bytes of the inputs and the output (float32), saturating.
    pub fn host_bytes(&self) -> u64 {
        let (h, kv) = (self.query_heads() as u64, self.units as u64);
        let words = h
            .saturating_mul(self.l as u64)
            .saturating_mul((self.e + self.ev) as u64)
            .saturating_add(
                kv.saturating_mul(self.s as u64)
                    .saturating_mul((self.e + self.ev) as u64),
            );
        words.saturating_mul(4)
    }

    /// `out` has the output's length, `(units*group, l, ev)`.
    pub fn check_output(&self, out: &[f32]) -> Result<(), Error> {
        let want = self.query_heads() * self.l * self.ev;
        if out.len() != want {
            return Err(Error::InvalidInput(format!(
                "the output has {} elements, the problem {self:?} needs {want}",
                out.len()
            )));
        }
        Ok(())
    }

    /// Elements of Q, K, V (and of the output, Q's rows times Ev), or an `Overflow` error where
    /// one is beyond `usize`: sizes come from Python and may be anything up to 2^64 - 1.
    pub fn input_lengths(&self) -> Result<[usize; 3], Error> {
        let p = self;
        let product = |xs: &[usize]| {
            xs.iter()
                .try_fold(1usize, |a, &x| a.checked_mul(x))
                .ok_or_else(|| {
                    Error::Overflow(format!(
                        "the problem {p:?} has more elements than a usize counts"
                    ))
                })
        };
        product(&[p.units, p.group, p.l, p.ev.max(p.e)])?;
        Ok([
            product(&[p.units, p.group, p.l, p.e])?,
            product(&[p.units, p.s, p.e])?,
            product(&[p.units, p.s, p.ev])?,
        ])
    }

    /// The problem's sizes are usable and the inputs have the lengths it needs.
    /// S, the head dimensions and the group are at least 1.
    pub fn check_sizes(&self) -> Result<(), Error> {
        if self.s == 0 {
            return Err(Error::InvalidInput(
                "key/value sequence length S must be at least 1".into(),
            ));
        }
        if self.e == 0 || self.ev == 0 || self.group == 0 {
            return Err(Error::InvalidInput(
                "head dimensions must be at least 1".into(),
            ));
        }
        // Row counts the planners multiply by head dimensions and tile sizes (in checked or
        // wider arithmetic); the counts themselves must fit a usize.
        let rows = [
            ("query heads", self.units.checked_mul(self.group)),
            (
                "query rows",
                self.units
                    .checked_mul(self.group)
                    .and_then(|h| h.checked_mul(self.l)),
            ),
            ("key rows", self.units.checked_mul(self.s)),
        ];
        for (what, n) in rows {
            if n.is_none() {
                return Err(Error::Overflow(format!(
                    "the problem {self:?} has more {what} than a usize counts"
                )));
            }
        }
        Ok(())
    }

    pub fn check_inputs(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(), Error> {
        let p = self;
        p.check_sizes()?;
        let [nq, nk, nv] = p.input_lengths()?;
        let want = [
            ("query", q.len(), nq),
            ("key", k.len(), nk),
            ("value", v.len(), nv),
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

/// Highest degree that may be forced: fitting degree g takes the fits of every degree below it
/// (about 1.7 s for 100 and 29 s for 200 on one core), and far below 64 the fit's top
/// coefficients vanish below float precision for any beta the float32 kernels can certify.
pub const MAX_FORCED_DEGREE: usize = 64;

/// A forced degree above [`MAX_FORCED_DEGREE`] is refused before anything is fitted.
pub fn check_forced_degree(degree: usize) -> Result<(), Error> {
    if degree > MAX_FORCED_DEGREE {
        return Err(Error::InvalidInput(format!(
            "degree={degree} is above the largest degree that can be forced \
             ({MAX_FORCED_DEGREE})"
        )));
    }
    Ok(())
}

impl PolyOptions {
    /// `eps` lies in (0, 1).
    pub fn check(&self) -> Result<(), Error> {
        if !(self.eps > 0.0 && self.eps < 1.0) {
            return Err(Error::InvalidInput(format!(
                "eps must be a number in (0, 1), got {}",
                self.eps
            )));
        }
        if let Some(g) = self.degree {
            check_forced_degree(g)?;
        }
        Ok(())
    }
}

/// Schedules of the polynomial method (docs/io-model.md): A when S' = Phi_k(K)^T [V | 1] fits the fast
/// memory (each pass keeps it resident), B when it is streamed in feature chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Schedule {
    A,
    B,
}

/// What the polynomial method certified.
#[derive(Clone, Debug, PartialEq)]
pub struct Certificate {
    pub degree: usize,
    pub rank: usize,
    pub beta: f64,
    /// Certified max |P(x) e^-x - 1| on [-beta, beta].
    pub poly_eps: f64,
    /// Bound on |O - O*| per output column (max over units): the approximation part plus the
    /// float32 rounding part.
    pub error_bound_per_column: Vec<f64>,
    /// The approximation part, `(eps_P/(1-eps_P) + f16_rounding) * range` per column: what `eps`
    /// bounds and what `auto` decides on.
    pub approximation_bound_per_column: Vec<f64>,
    /// The float32 rounding part (kernels, pre-pass norms, value centring; `poly::rounding`);
    /// empty until the plan that runs is final.
    pub rounding_bound_per_column: Vec<f64>,
    /// Bound on the f16 rounding of the tensor-core passes, relative to each value column's
    /// range; None on the f32 path.
    pub f16_rounding: Option<f64>,
    pub schedule: Schedule,
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
