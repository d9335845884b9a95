//! approx_attn: I/O-aware exact and polynomial attention on any GPU wgpu reaches.
//!
//! Data flows one way: host arrays -> [`plan`] picks a plan for this adapter -> [`kernels`]
//! dispatch it -> host arrays. [`plan`], [`io`] and [`poly`] never touch the GPU.

pub mod device;
pub mod error;
pub mod io;
pub mod kernels;
pub mod plan;

#[cfg(feature = "python")]
mod python;

use std::time::Instant;

pub use error::Error;
pub use kernels::{RunOptions, RunStats};
pub use plan::{Budget, Problem};

use device::DeviceInfo;

fn env_u64(name: &str) -> Result<Option<u64>, Error> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| Error::InvalidInput(format!("{name}={s:?} is not a whole number of bytes"))),
    }
}

/// The planner's budget for this adapter. `APPROX_ATTN_FAST_MEMORY_BYTES` and
/// `APPROX_ATTN_MAX_BINDING_BYTES` may lower (never raise) the workgroup memory and the storage
/// binding size, e.g. to prove in tests that the kernels run within the WebGPU default 16 KiB.
pub fn budget(info: &DeviceInfo) -> Result<Budget, Error> {
    let mut b = Budget {
        fast_memory_words: info.fast_memory_words,
        max_binding_bytes: info.max_storage_buffer_binding_size.min(info.max_buffer_size),
        max_workgroups_per_dimension: info.max_compute_workgroups_per_dimension,
        max_invocations_per_workgroup: info
            .max_compute_invocations_per_workgroup
            .min(info.max_compute_workgroup_size_x),
    };
    if let Some(bytes) = env_u64("APPROX_ATTN_FAST_MEMORY_BYTES")? {
        b.fast_memory_words = b.fast_memory_words.min(bytes / 4);
    }
    if let Some(bytes) = env_u64("APPROX_ATTN_MAX_BINDING_BYTES")? {
        b.max_binding_bytes = b.max_binding_bytes.min(bytes);
    }
    Ok(b)
}

/// What ran and what it cost.
#[derive(Clone, Debug)]
pub struct Report {
    pub method: &'static str,
    pub adapter: String,
    pub backend: String,
    pub fast_memory_words: u64,
    /// Words the plan that ran moves between storage buffers and workgroup memory.
    pub io_words: u64,
    pub io_reads: u64,
    pub io_writes: u64,
    pub stats: RunStats,
    pub elapsed_s: f64,
    pub plan: String,
}

/// Exact attention on the process's GPU. Arrays are contiguous, laid out as in [`Problem`].
pub fn exact_attention(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
) -> Result<(Vec<f32>, Report), Error> {
    check_lengths(p, q, k, v)?;
    let gpu = device::gpu()?;
    let _guard = gpu.exclusive();
    let start = Instant::now();
    let budget = budget(&gpu.info)?;
    let plan = plan::plan_exact(p, &budget)?;
    let (out, stats) = if p.l == 0 || p.units == 0 {
        (Vec::new(), RunStats::default())
    } else {
        kernels::exact::run(&gpu, p, &plan, q, k, v, opts)?
    };
    let io = io::exact_io(p, &plan);
    Ok((
        out,
        Report {
            method: "exact",
            adapter: gpu.info.adapter.clone(),
            backend: gpu.info.backend.clone(),
            fast_memory_words: budget.fast_memory_words,
            io_words: io.total(),
            io_reads: io.reads(),
            io_writes: io.writes(),
            stats,
            elapsed_s: start.elapsed().as_secs_f64(),
            plan: format!("{plan:?}"),
        },
    ))
}

fn check_lengths(p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> Result<(), Error> {
    if p.s == 0 {
        return Err(Error::InvalidInput("key/value sequence length S must be at least 1".into()));
    }
    if p.e == 0 || p.ev == 0 || p.group == 0 {
        return Err(Error::InvalidInput("head dimensions must be at least 1".into()));
    }
    let want = [
        ("query", q.len(), p.units * p.group * p.l * p.e),
        ("key", k.len(), p.units * p.s * p.e),
        ("value", v.len(), p.units * p.s * p.ev),
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
