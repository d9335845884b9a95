//! What the device allows the planner: fast memory, binding size, grid and loop limits, and the
//! register caps of the generated kernels.

use crate::config::Config;
use crate::device::DeviceInfo;
use crate::error::Error;

/// What the device allows; the planner never assumes a vendor's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Words of workgroup memory per workgroup (M).
    pub fast_memory_words: u64,
    /// Largest storage binding, in bytes.
    pub max_binding_bytes: u64,
    pub max_workgroups_per_dimension: u32,
    pub max_invocations_per_workgroup: u32,
    /// Loop iterations one shader invocation may run in total. Unlimited on GPUs; Mesa's llvmpipe
    /// (lavapipe) silently stops every loop of an invocation after 65,535 iterations in total
    /// (LP_MAX_TGSI_LOOP_ITERATIONS), so plans there are cut to stay below it.
    pub max_loop_iterations: u64,
    /// Device memory one call may use, in bytes. A problem whose inputs and output exceed it
    /// streams them in slices ([`Budget::for_problem`]).
    pub max_device_bytes: u64,
}

/// Storage bindings of one streamed dispatch's slices, with room for the next slice's upload:
/// each gets at most this fraction of the device memory a streaming call may use.
pub const STREAM_BINDINGS: u64 = 8;

impl Budget {
    /// The I/O model's budget: only the fast memory is limited (one dispatch, any grid), with the
    /// WebGPU minimum of 256 invocations per workgroup. For `io_cost` studies and tests.
    pub fn model(fast_memory_words: u64) -> Budget {
        Budget {
            fast_memory_words,
            max_binding_bytes: u64::MAX / 8,
            max_workgroups_per_dimension: u32::MAX,
            max_invocations_per_workgroup: 256,
            max_loop_iterations: u64::MAX,
            max_device_bytes: u64::MAX,
        }
    }

    /// Whether `p`'s inputs and output together exceed the device memory a call may use: then
    /// they stream from host memory in slices, none kept on the device for the whole call.
    pub fn streams(&self, p: &crate::api::Problem) -> bool {
        p.host_bytes() > self.max_device_bytes
    }

    /// This budget for problem `p`: where it streams, every binding gets at most
    /// 1/[`STREAM_BINDINGS`] of the device memory, so that the dispatches' slices fit it
    /// together; where one row's slice cannot, an error that names the limit.
    pub fn for_problem(mut self, p: &crate::api::Problem) -> Result<Budget, Error> {
        if !self.streams(p) {
            return Ok(self);
        }
        let per_binding = self.max_device_bytes / STREAM_BINDINGS;
        let row = 4 * (p.e.max(p.ev) as u64 + 2) * p.group as u64;
        if per_binding < row {
            return Err(Error::TooLarge(format!(
                "the device memory limit of {} bytes (APPROX_ATTN_MAX_DEVICE_BYTES, or what the \
                 adapter has) is too small to stream this problem: each of its {STREAM_BINDINGS} \
                 slices must hold at least {row} bytes",
                self.max_device_bytes
            )));
        }
        self.max_binding_bytes = self.max_binding_bytes.min(per_binding);
        Ok(self)
    }

    /// [`Budget::model`] with a storage binding limit and the WebGPU grid limit.
    pub fn with_binding(fast_memory_words: u64, max_binding_bytes: u64) -> Budget {
        Budget {
            max_binding_bytes,
            max_workgroups_per_dimension: 65535,
            ..Budget::model(fast_memory_words)
        }
    }
}

/// Upper limit of per-thread accumulators in the generated kernels (registers, not fast memory).
pub(crate) const MAX_OUT_ACCUMULATORS: usize = 64;

pub(crate) const MAX_SCORE_ACCUMULATORS: usize = 32;

pub(crate) const MAX_THREAD_SIDE: usize = 8;

/// The planner's budget for this adapter under the current environment; see
/// [`Budget::for_device`].
pub fn budget(info: &DeviceInfo) -> Result<Budget, Error> {
    Budget::for_device(info, &Config::from_env())
}

impl Budget {
    /// The planner's budget for this adapter. `APPROX_ATTN_FAST_MEMORY_BYTES` and
    /// `APPROX_ATTN_MAX_BINDING_BYTES` may lower (never raise) the workgroup memory and the
    /// storage binding size, e.g. to prove in tests that the kernels run within the WebGPU
    /// default 16 KiB.
    pub fn for_device(info: &DeviceInfo, cfg: &Config) -> Result<Budget, Error> {
        let mut b = Budget {
            fast_memory_words: info.fast_memory_words,
            max_binding_bytes: info
                .max_storage_buffer_binding_size
                .min(info.max_buffer_size),
            max_workgroups_per_dimension: info.max_compute_workgroups_per_dimension,
            max_invocations_per_workgroup: info
                .max_compute_invocations_per_workgroup
                .min(info.max_compute_workgroup_size_x),
            // Mesa's llvmpipe stops loops after 65,535 iterations per invocation; keep a margin.
            max_loop_iterations: if info.adapter.contains("llvmpipe") {
                60_000
            } else {
                u64::MAX
            },
            max_device_bytes: default_device_bytes(info),
        };
        if let Some(bytes) = cfg.max_device_bytes.clone()? {
            b.max_device_bytes = b.max_device_bytes.min(bytes);
        }
        if let Some(n) = cfg.max_loop_iterations.clone()? {
            b.max_loop_iterations = n;
        }
        if let Some(bytes) = cfg.fast_memory_bytes.clone()? {
            b.fast_memory_words = b.fast_memory_words.min(bytes / 4);
        }
        if let Some(bytes) = cfg.max_binding_bytes.clone()? {
            b.max_binding_bytes = b.max_binding_bytes.min(bytes);
        }
        Ok(b)
    }
}

/// The device memory a call may use where `APPROX_ATTN_MAX_DEVICE_BYTES` does not say: wgpu
/// reports no size of device memory, so no limit on GPUs; a CPU adapter's device memory is the
/// host's, of which it may use half of what is available now.
fn default_device_bytes(info: &DeviceInfo) -> u64 {
    if info.device_type != "Cpu" {
        return u64::MAX;
    }
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    available.map_or(u64::MAX, |kb| kb.saturating_mul(1024) / 2)
}

pub(crate) fn cdiv(a: usize, b: usize) -> u64 {
    a.div_ceil(b.max(1)) as u64
}

pub(crate) fn largest_fitting(limit: usize, fits: impl Fn(usize) -> bool) -> usize {
    // Largest x in 1..=limit with fits(x) (fits is monotone decreasing); 0 when none.
    let (mut lo, mut hi) = (0usize, limit);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}
