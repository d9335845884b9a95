//! Host <-> device accounting of a device: bytes moved, input slices uploaded, and the host's
//! wall-clock time per stage (`Report.host_s`). A leaf: the device holds it, transfers fill it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Host <-> device traffic counters of a device: bytes written to and read from it, and the
/// slices of the inputs uploaded (each a block of rows of Q, K or V for one dispatch).
#[derive(Default, Debug)]
pub(crate) struct Traffic {
    pub(crate) to_device_bytes: AtomicU64,
    pub(crate) to_host_bytes: AtomicU64,
    pub(crate) input_slices: AtomicU64,
    /// Host wall-clock nanoseconds per [`HostStage`].
    pub(crate) host_ns: [AtomicU64; HostStage::ALL.len()],
}

/// Where the host spends a call's wall-clock time outside the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostStage {
    /// Copying input slices into staging memory and submitting their copies.
    Upload,
    /// Blocked until the device finished work a result needs.
    Wait,
    /// Handing command buffers to the driver.
    Submit,
    /// Copying results out of mapped readback memory into place.
    Readback,
    /// Host arithmetic on whole arrays: the value map and its inverse, merges.
    Compute,
}

impl HostStage {
    pub const ALL: [HostStage; 5] = [
        HostStage::Upload,
        HostStage::Wait,
        HostStage::Submit,
        HostStage::Readback,
        HostStage::Compute,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HostStage::Upload => "upload",
            HostStage::Wait => "wait",
            HostStage::Submit => "submit",
            HostStage::Readback => "readback",
            HostStage::Compute => "compute",
        }
    }
}

/// What moved between host and device over a part of a call: a difference of [`Traffic`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCount {
    pub to_device_bytes: u64,
    pub to_host_bytes: u64,
    pub input_slices: u64,
    /// Host nanoseconds per [`HostStage`] (in `HostStage::ALL`'s order).
    pub host_ns: [u64; HostStage::ALL.len()],
}

impl Traffic {
    /// Runs `work`, adding its wall-clock time to `stage`.
    pub(crate) fn timed<T>(&self, stage: HostStage, work: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = work();
        self.host_ns[stage as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    pub(crate) fn count_to_host(&self, bytes: u64) {
        self.to_host_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn now(&self) -> TrafficCount {
        TrafficCount {
            to_device_bytes: self.to_device_bytes.load(Ordering::Relaxed),
            to_host_bytes: self.to_host_bytes.load(Ordering::Relaxed),
            input_slices: self.input_slices.load(Ordering::Relaxed),
            host_ns: std::array::from_fn(|i| self.host_ns[i].load(Ordering::Relaxed)),
        }
    }
}

impl TrafficCount {
    /// The traffic between `self` (taken earlier) and `later`.
    pub fn until(self, later: TrafficCount) -> TrafficCount {
        TrafficCount {
            to_device_bytes: later.to_device_bytes.wrapping_sub(self.to_device_bytes),
            to_host_bytes: later.to_host_bytes.wrapping_sub(self.to_host_bytes),
            input_slices: later.input_slices.wrapping_sub(self.input_slices),
            host_ns: std::array::from_fn(|i| later.host_ns[i].wrapping_sub(self.host_ns[i])),
        }
    }

    /// Host seconds per stage, named.
    pub fn host_s(&self) -> Vec<(&'static str, f64)> {
        HostStage::ALL
            .iter()
            .map(|&s| (s.name(), self.host_ns[s as usize] as f64 * 1e-9))
            .collect()
    }
}
