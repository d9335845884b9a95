//! The autotune: candidate tiles timed in rounds, tiles forced by the environment, and tuned
//! values cached per adapter, driver and shape class, keyed by the WGSL of the class's kernels.

pub mod cache;
pub mod exact;
pub mod poly;
pub mod rates;

use std::collections::HashMap;
use std::fmt::{Debug, Display};
use std::sync::Mutex;

use cache::CacheFile;

use crate::api::Problem;
use crate::budget::Budget;
use crate::config::Config;
use crate::device::Gpu;
use crate::error::Error;
use crate::launch::RunOptions;
use crate::progress::Progress;
use crate::wgsl::fingerprint;

/// Autotune: runs of the first candidate before any is timed (the clock may still be ramping up),
/// and timed runs per candidate, the fastest of which counts. Warm-up does not lift an idle clock
/// the driver holds: on the H100 a process without a CUDA context tuned at 345 MHz, and its
/// pass-1 pick ran 13% slower at full clock than the one tuned there (docs/tuning.md).
const TUNE_WARMUP_RUNS: usize = 3;
const TUNE_RUNS: usize = 3;

/// What the autotune works with: the device, the call's environment and budget, and the caller's
/// shader mode.
#[derive(Clone, Copy)]
pub(crate) struct Tuner<'a> {
    pub gpu: &'a Gpu,
    pub cfg: &'a Config,
    pub budget: &'a Budget,
    pub opts: RunOptions,
}

/// Tuned tiles as the cache stores them and a variable forces them: whole numbers in a fixed
/// order.
pub(crate) trait TileRecord: Copy + Debug {
    /// The cache file's kind ("exact-tiles").
    const KIND: &'static str;
    /// The values' names, in order (the format of the forcing variable).
    const NAMES: &'static str;
    fn values(&self) -> Vec<usize>;
    /// None unless `v` has one value per name, every size positive and every flag 0 or 1.
    fn from_values(v: &[usize]) -> Option<Self>;
}

/// Fingerprints of the kernels of a class, computed once per process.
static FINGERPRINTS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

impl Tuner<'_> {
    /// The cache files' key: adapter, driver and backend (the kernels are in each entry's
    /// fingerprint).
    fn adapter_key(&self) -> String {
        let i = &self.gpu.info;
        format!("{} {} {}", i.adapter, i.driver, i.backend)
    }

    fn cache(&self, kind: &str) -> CacheFile {
        CacheFile::new(self.cfg.cache_dir.as_deref(), kind, &self.adapter_key())
    }

    /// A cache class for one shader mode: shaders with wgpu's runtime checks off (`trusted`) run
    /// at other speeds, so their tiles and rates are measured and cached apart.
    fn mode_class(&self, class: &dyn Display) -> String {
        if self.opts.trusted {
            format!("{class} trusted")
        } else {
            class.to_string()
        }
    }

    /// `APPROX_ATTN_AUTOTUNE=1|0` forces it; by default GPUs tune (seconds per shape class) and
    /// CPU drivers do not (each candidate compiles for seconds there: 37 s per class on lavapipe).
    fn autotune_on(&self) -> bool {
        self.cfg
            .autotune
            .unwrap_or(self.gpu.info.device_type != "Cpu")
    }

    /// The fingerprint of the WGSL `kernels` generates for `class` of `kind`, memoised.
    fn fingerprint(&self, kind: &str, class: &str, kernels: impl FnOnce() -> Vec<String>) -> u64 {
        let key = format!("{kind} {class} {:?}", self.budget);
        let mut memo = FINGERPRINTS.lock().unwrap_or_else(|e| e.into_inner());
        *memo
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_insert_with(|| fingerprint(&kernels()))
    }

    /// The tuned record of `class`: the cached one where its kernels (`kernels`, their WGSL) are
    /// unchanged and it is `valid` here, else measured now by `tune` and cached where the autotune
    /// is on, else None (the planner's tiles).
    fn tuned<R: TileRecord>(
        &self,
        class: &dyn Display,
        kernels: impl FnOnce() -> Vec<String>,
        valid: impl Fn(&R) -> bool,
        tune: impl FnOnce() -> Result<R, Error>,
    ) -> Result<Option<R>, Error> {
        let class = self.mode_class(class);
        let fp = self.fingerprint(R::KIND, &class, kernels);
        let file = self.cache(R::KIND);
        let parse = |v: &[&str]| -> Option<R> {
            let v: Vec<usize> = v.iter().map(|t| t.parse().ok()).collect::<Option<_>>()?;
            R::from_values(&v).filter(&valid)
        };
        if let Some(r) = file.load(&class, fp, parse) {
            return Ok(Some(r));
        }
        if !self.autotune_on() {
            return Ok(None);
        }
        // Tuning a class compiles and times tens of candidates (about a minute for the f32
        // poly passes on the H100): say so, once per class, since it is cached.
        let what = R::KIND;
        eprintln!(
            "approx_attn: tuning {what} for class ({class}) on {} once; cached in {} \
             (APPROX_ATTN_AUTOTUNE=0 skips, APPROX_ATTN_TUNE_LOG=1 lists the candidates)",
            self.gpu.info.adapter,
            file.path()
                .map_or("no cache".into(), |f| f.display().to_string())
        );
        let start = std::time::Instant::now();
        let r = tune()?;
        let values = r.values();
        eprintln!(
            "approx_attn: tuned {what} ({class}) in {:.1} s: {values:?}",
            start.elapsed().as_secs_f64()
        );
        let line: Vec<String> = values.iter().map(usize::to_string).collect();
        file.store(&class, fp, &[line.join(" ")]);
        Ok(Some(r))
    }

    /// The tiles forced by `forced` (the value of the variable `var`), else the tuned ones of
    /// [`Tuner::tuned`]; and whether they were forced.
    fn forced_or_tuned<R: TileRecord>(
        &self,
        (var, forced): (&str, Option<&str>),
        class: &dyn Display,
        kernels: impl FnOnce() -> Vec<String>,
        valid: impl Fn(&R) -> bool,
        tune: impl FnOnce() -> Result<R, Error>,
    ) -> Result<(Option<R>, bool), Error> {
        match forced {
            Some(s) => Ok((Some(forced_tiles(s, var)?), true)),
            None => Ok((self.tuned(class, kernels, valid, tune)?, false)),
        }
    }

    /// The fastest of `cands` (the first is the planner's), each timed once per round for
    /// TUNE_RUNS rounds and counted at its fastest round: a clock change during the tuning does
    /// not favour the candidates timed last.
    fn fastest<T: Copy + Debug>(
        &self,
        cands: &[T],
        what: &str,
        mut time: impl FnMut(T) -> Result<f64, Error>,
    ) -> Result<T, Error> {
        let mut secs = vec![f64::INFINITY; cands.len()];
        let mut progress = Progress::new(&format!("timing {what}"), TUNE_RUNS * cands.len());
        for _ in 0..TUNE_RUNS {
            for (s, &t) in secs.iter_mut().zip(cands) {
                *s = s.min(time(t)?);
                progress.tick();
            }
        }
        drop(progress);
        if self.cfg.tune_log {
            for (t, s) in cands.iter().zip(&secs) {
                eprintln!("approx_attn autotune {what}: {t:?}: {:.3} ms", s * 1e3);
            }
        }
        let best = (0..cands.len()).min_by(|&a, &b| secs[a].total_cmp(&secs[b]));
        best.map(|i| cands[i])
            .ok_or_else(|| Error::TooLarge(format!("no {what} candidate fits this device")))
    }

    /// The caller's shader mode without I/O counting: how candidates are timed.
    fn timing_opts(&self) -> RunOptions {
        RunOptions {
            count_io: false,
            ..self.opts
        }
    }

    /// Side of the square problems the autotune times on: `gpu_n` on GPUs, 512 on CPU drivers
    /// (each candidate also compiles slowly there).
    fn bench_side(&self, gpu_n: usize) -> usize {
        if self.gpu.info.device_type == "Cpu" {
            512
        } else {
            gpu_n
        }
    }
}

/// Deterministic inputs (q, k, v) of a timing problem with one query head per KV head: values in
/// [-amplitude/2, amplitude/2) from a fixed pattern, the same on every run.
fn bench_inputs(p: &Problem, amplitude: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = |w: usize| -> Vec<f32> {
        (0..p.units * p.l * w)
            .map(|i| (((i * 7919 % 1000) as f32 / 1000.0) - 0.5) * amplitude)
            .collect()
    };
    (x(p.e), x(p.e), x(p.ev))
}

/// Tiles forced by `var` in place of the tuned ones, for sweeps at full size: whole numbers in
/// the order of `R::NAMES`. `APPROX_ATTN_POLY_TILES="bk tf rc1 b tr rc2 prefetch"` (f32 poly),
/// `APPROX_ATTN_EXACT_TILES="bq bk tq tk split_v"`.
fn forced_tiles<R: TileRecord>(s: &str, var: &str) -> Result<R, Error> {
    let v: Option<Vec<usize>> = s.split_whitespace().map(|t| t.parse().ok()).collect();
    v.and_then(|v| R::from_values(&v)).ok_or_else(|| {
        let len = R::NAMES.split_whitespace().count();
        Error::InvalidInput(format!(
            "{var}={s:?} is not {len} whole numbers ({})",
            R::NAMES
        ))
    })
}

/// Sizes (positive) followed by `flags` flags (0 or 1), as `from_values` accepts them.
fn sizes_and_flags(v: &[usize], len: usize, flags: usize) -> bool {
    v.len() == len && !v[..len - flags].contains(&0) && v[len - flags..].iter().all(|&f| f <= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Two(usize, bool);

    impl TileRecord for Two {
        const KIND: &'static str = "two";
        const NAMES: &'static str = "size flag";
        fn values(&self) -> Vec<usize> {
            vec![self.0, usize::from(self.1)]
        }
        fn from_values(v: &[usize]) -> Option<Self> {
            sizes_and_flags(v, 2, 1).then(|| Two(v[0], v[1] != 0))
        }
    }

    #[test]
    fn tile_records_refuse_zero_sizes_bad_flags_and_wrong_counts() {
        assert_eq!(Two::from_values(&[8, 1]), Some(Two(8, true)));
        assert_eq!(Two::from_values(&[0, 1]), None);
        assert_eq!(Two::from_values(&[8, 2]), None);
        assert_eq!(Two::from_values(&[8]), None);
        assert_eq!(Two::from_values(&[8, 1, 1]), None);
        assert_eq!(forced_tiles::<Two>("16 0", "V").unwrap(), Two(16, false));
        let err = forced_tiles::<Two>("16 x", "V").unwrap_err().to_string();
        assert_eq!(err, "V=\"16 x\" is not 2 whole numbers (size flag)");
    }
}
