//! Every `APPROX_ATTN_*` environment variable the crate reads, read here and nowhere else, into
//! one typed [`Config`]. A call reads a fresh snapshot ([`Config::from_env`]): tests and sweeps
//! change variables between calls. A malformed value is an error where it is used, not where it
//! is read, so that a variable a call does not need cannot fail it.
//!
//! | variable | effect |
//! |---|---|
//! | `APPROX_ATTN_BACKEND` | vulkan, metal, dx12 or gl: only adapters of that API |
//! | `APPROX_ATTN_ADAPTER` | only adapters whose name contains this (case-insensitive) |
//! | `APPROX_ATTN_NO_COOP` | 1: never use cooperative matrices (tensor cores) |
//! | `APPROX_ATTN_NO_F16_STORAGE` | 1: float16 inputs are converted to float32 on the host |
//! | `APPROX_ATTN_FAST_MEMORY_BYTES` | lowers (never raises) the workgroup memory the planner uses |
//! | `APPROX_ATTN_MAX_BINDING_BYTES` | lowers the storage binding size the planner uses |
//! | `APPROX_ATTN_MAX_DEVICE_BYTES` | device memory a call may use; beyond it inputs stream in slices |
//! | `APPROX_ATTN_MAX_LOOP_ITERATIONS` | loop iterations one invocation may run (llvmpipe: 60,000) |
//! | `APPROX_ATTN_AUTOTUNE` | 1 or 0: tune tiles and rates (default: on GPUs, off on CPU drivers) |
//! | `APPROX_ATTN_TUNE_LOG` | 1: print every candidate's time while tuning |
//! | `APPROX_ATTN_EXACT_TILES` | "bq bk tq tk split_v": forced exact tiles |
//! | `APPROX_ATTN_POLY_TILES` | "bk tf rc1 b tr rc2 prefetch": forced f32 poly tiles |
//! | `APPROX_ATTN_COOP_EXACT_TILES` | "subgroups rt bk": forced tensor-core exact tiles |
//! | `APPROX_ATTN_NO_OVERLAP` | 1: wait after every dispatch (no overlap; the same results) |
//! | `APPROX_ATTN_COOP_EXACT_UNMASKED` | 1: tensor-core exact skips the mask on key tiles seen whole |
//! | `APPROX_ATTN_COOP_EXACT_Q_PARTS` | tensor-core exact stages the Q block in this many parts |
//! | `APPROX_ATTN_CAUSAL_CHUNK` | rows per chunk of causal poly (rounded up to what the tiles need) |
//! | `APPROX_ATTN_CAUSAL_WINDOW` | chunks per window of causal poly (at most the planned one) |
//! | `APPROX_ATTN_RATES` | "exact_flops_per_s poly_flops_per_s": `auto`'s rates, not measured |
//! | `APPROX_ATTN_CACHE_DIR` | the tuning cache (default `$XDG_CACHE_HOME/approx_attn`, then `~/.cache/approx_attn`) |
//!
//! Two more are read by the Python package (`python/approx_attn/__init__.py`) and reach the crate
//! as [`crate::RunOptions`]: `APPROX_ATTN_COUNT_IO` (count words in the shaders) and
//! `APPROX_ATTN_TRUSTED_SHADERS` (compile without wgpu's runtime checks).

use std::path::PathBuf;

use crate::error::Error;

/// The crate's environment, parsed.
#[derive(Clone, Debug)]
pub struct Config {
    /// `APPROX_ATTN_BACKEND`: the APIs whose adapters are considered.
    pub backends: Result<wgpu::Backends, Error>,
    /// `APPROX_ATTN_ADAPTER`.
    pub adapter: Option<String>,
    /// `APPROX_ATTN_NO_COOP`.
    pub no_coop: bool,
    /// `APPROX_ATTN_NO_F16_STORAGE`.
    pub no_f16_storage: bool,
    /// `APPROX_ATTN_FAST_MEMORY_BYTES`.
    pub fast_memory_bytes: Result<Option<u64>, Error>,
    /// `APPROX_ATTN_MAX_BINDING_BYTES`.
    pub max_binding_bytes: Result<Option<u64>, Error>,
    /// `APPROX_ATTN_MAX_DEVICE_BYTES`.
    pub max_device_bytes: Result<Option<u64>, Error>,
    /// `APPROX_ATTN_MAX_LOOP_ITERATIONS`.
    pub max_loop_iterations: Result<Option<u64>, Error>,
    /// `APPROX_ATTN_AUTOTUNE`: Some(on) where set.
    pub autotune: Option<bool>,
    /// `APPROX_ATTN_TUNE_LOG`.
    pub tune_log: bool,
    /// `APPROX_ATTN_EXACT_TILES`, unparsed (the autotune's tile records parse it).
    pub exact_tiles: Option<String>,
    /// `APPROX_ATTN_POLY_TILES`, unparsed.
    pub poly_tiles: Option<String>,
    /// `APPROX_ATTN_COOP_EXACT_TILES`, unparsed.
    pub coop_exact_tiles: Option<String>,
    /// `APPROX_ATTN_COOP_EXACT_UNMASKED` (off until measured on a GPU).
    pub coop_exact_unmasked: bool,
    /// `APPROX_ATTN_COOP_EXACT_Q_PARTS` (1 where unset: the whole block at once).
    pub coop_exact_q_parts: Result<Option<usize>, Error>,
    /// `APPROX_ATTN_CAUSAL_CHUNK` and `APPROX_ATTN_CAUSAL_WINDOW`.
    pub causal_chunk: Result<Option<usize>, Error>,
    pub causal_window: Result<Option<usize>, Error>,
    /// `APPROX_ATTN_RATES`: (exact, poly) FLOP/s where set.
    pub rates: Result<Option<(f64, f64)>, Error>,
    /// `APPROX_ATTN_CACHE_DIR`, else the XDG cache or `~/.cache`; None without any of them.
    pub cache_dir: Option<PathBuf>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A flag: set, non-empty and not "0".
/// `APPROX_ATTN_NO_OVERLAP`, read at each dispatch (the launch layer has no call's config).
pub(crate) fn no_overlap() -> bool {
    flag("APPROX_ATTN_NO_OVERLAP")
}

fn flag(name: &str) -> bool {
    var(name).is_some_and(|v| !v.is_empty() && v != "0")
}

fn bytes(name: &str) -> Result<Option<u64>, Error> {
    match var(name) {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => s.trim().parse::<u64>().map(Some).map_err(|_| {
            Error::InvalidInput(format!("{name}={s:?} is not a whole number of bytes"))
        }),
    }
}

fn backends() -> Result<wgpu::Backends, Error> {
    match var("APPROX_ATTN_BACKEND") {
        None => Ok(wgpu::Backends::all()),
        Some(s) => match s.to_ascii_lowercase().as_str() {
            "" => Ok(wgpu::Backends::all()),
            "vulkan" => Ok(wgpu::Backends::VULKAN),
            "metal" => Ok(wgpu::Backends::METAL),
            "dx12" => Ok(wgpu::Backends::DX12),
            "gl" => Ok(wgpu::Backends::GL),
            other => Err(Error::InvalidInput(format!(
                "APPROX_ATTN_BACKEND={other:?} is not one of vulkan, metal, dx12, gl"
            ))),
        },
    }
}

fn rates() -> Result<Option<(f64, f64)>, Error> {
    let Some(s) = var("APPROX_ATTN_RATES") else {
        return Ok(None);
    };
    let v: Vec<f64> = s
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    if v.len() == 2 && v[0] > 0.0 && v[1] > 0.0 {
        return Ok(Some((v[0], v[1])));
    }
    Err(Error::InvalidInput(format!(
        "APPROX_ATTN_RATES={s:?} is not two positive numbers"
    )))
}

fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("APPROX_ATTN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("approx_attn"))
        })
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/approx_attn")))
}

/// A positive whole number, where set.
fn count(name: &str) -> Result<Option<usize>, Error> {
    match var(name) {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::InvalidInput(format!(
                "{name}={s:?} is not a positive whole number"
            ))),
        },
    }
}

impl Config {
    /// The variables as they are now.
    pub fn from_env() -> Config {
        Config {
            backends: backends(),
            adapter: var("APPROX_ATTN_ADAPTER"),
            no_coop: flag("APPROX_ATTN_NO_COOP"),
            no_f16_storage: flag("APPROX_ATTN_NO_F16_STORAGE"),
            fast_memory_bytes: bytes("APPROX_ATTN_FAST_MEMORY_BYTES"),
            max_binding_bytes: bytes("APPROX_ATTN_MAX_BINDING_BYTES"),
            max_device_bytes: bytes("APPROX_ATTN_MAX_DEVICE_BYTES"),
            max_loop_iterations: bytes("APPROX_ATTN_MAX_LOOP_ITERATIONS"),
            autotune: var("APPROX_ATTN_AUTOTUNE").map(|v| !v.is_empty() && v != "0"),
            tune_log: flag("APPROX_ATTN_TUNE_LOG"),
            exact_tiles: var("APPROX_ATTN_EXACT_TILES"),
            poly_tiles: var("APPROX_ATTN_POLY_TILES"),
            coop_exact_tiles: var("APPROX_ATTN_COOP_EXACT_TILES"),
            coop_exact_unmasked: flag("APPROX_ATTN_COOP_EXACT_UNMASKED"),
            coop_exact_q_parts: count("APPROX_ATTN_COOP_EXACT_Q_PARTS"),
            causal_chunk: count("APPROX_ATTN_CAUSAL_CHUNK"),
            causal_window: count("APPROX_ATTN_CAUSAL_WINDOW"),
            rates: rates(),
            cache_dir: cache_dir(),
        }
    }
}
