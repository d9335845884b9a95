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
}

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
        }
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
        };
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
