//! The autotune: candidates timed in rounds, forced tiles, and the tuned values cached per adapter,
//! kernels and shape class.

pub mod cache;
pub mod exact;
pub mod poly;
pub mod rates;

use crate::autotune::cache::cache_path;
use crate::autotune::cache::load_tuned;
use crate::autotune::cache::store_tuned;
use crate::device::Gpu;
use crate::error::Error;
use crate::wgsl::shader_fingerprint;

/// Key of cached measurements: these kernels on this adapter (a change of any shader re-measures).
fn adapter_key(gpu: &Gpu) -> String {
    format!(
        "{} {} {} {:016x}",
        gpu.info.adapter,
        gpu.info.driver,
        gpu.info.backend,
        shader_fingerprint()
    )
}

/// The tuned values of `class` in the cache file `what`: cached ones (of length `len`), else
/// measured now by `tune` and cached where the autotune is on, else None (planner's tiles).
fn tuned_values(
    gpu: &Gpu,
    what: &str,
    (class, trusted): (&str, bool),
    len: usize,
    tune: impl FnOnce() -> Result<Vec<usize>, Error>,
) -> Result<Option<Vec<usize>>, Error> {
    // Tiles are timed the way they will run: with wgpu's runtime checks, or without them
    // (`trusted`, a class of its own), whose costs differ by tile shape.
    let class = &mode_class(class, trusted);
    let key = adapter_key(gpu);
    match load_tuned(what, &key, class) {
        Some(v) if v.len() == len => Ok(Some(v)),
        _ if autotune_on(gpu) => {
            // Tuning a class compiles and times tens of candidates (about a minute for the f32
            // poly passes on the H100): say so, once per class, since it is cached.
            let file = cache_path(what, &key);
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
            store_tuned(what, &key, class, &v);
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
fn autotune_on(gpu: &Gpu) -> bool {
    match std::env::var("APPROX_ATTN_AUTOTUNE") {
        Ok(v) => !v.is_empty() && v != "0",
        Err(_) => gpu.info.device_type != "Cpu",
    }
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

/// The tiles forced by the environment variable `var` (values named `names`, see
/// [`forced_tiles`]), else the tuned ones of [`tuned_values`]; and whether they were forced.
fn forced_or_tuned(
    gpu: &Gpu,
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
