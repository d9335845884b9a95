//! What a call reports: the [`Report`] of an attention call and the [`IoEstimate`] of `io_cost`
//! (they name the types of the methods' results, so they sit above the methods, not in `api`).

use crate::api::{Certificate, Schedule};
use crate::io::IoCount;
use crate::launch::RunStats;

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
    pub certificate: Option<Certificate>,
    /// Predicted seconds of (exact, poly) where computed.
    pub predicted_exact_s: Option<f64>,
    pub predicted_poly_s: Option<f64>,
    /// Why `auto` chose what it chose.
    pub reason: String,
    /// Whether the kernels that ran used cooperative matrices (tensor cores, f16 operands).
    pub tensor_cores: bool,
    /// The exact kernel's f16 rounding bound, where it ran on cooperative matrices.
    pub exact_f16: Option<crate::exact::coop::F16Bound>,
    /// The format of the inputs in the storage buffers the kernels read.
    pub storage: crate::exact::storage::Storage,
    /// With f16 storage: bound on max |O - O*| that rounding the inputs to f16 adds (0 where
    /// they were float16 already; `exact::storage::f16_input_rounding`).
    pub input_rounding: Option<f64>,
}

/// The plan that would run and the words it moves, without touching the GPU when
/// `fast_memory_words` is given (then the model has no binding limit: one dispatch).
#[derive(Clone, Debug)]
pub struct IoEstimate {
    pub method: &'static str,
    pub schedule: Option<Schedule>,
    pub degree: Option<usize>,
    pub rank: Option<usize>,
    pub fast_memory_words: u64,
    pub io: IoCount,
    /// Words between host and device memory (the third level; see `host_io`).
    pub host_device: crate::host_io::HostDeviceWords,
}
