//! One error type for the crate; `python.rs` maps each variant to a Python exception.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// No usable adapter (raised as `approx_attn.NoDeviceError`).
    NoDevice(String),
    /// Bad arguments (raised as `ValueError`).
    InvalidInput(String),
    /// The problem does not fit this device or a budget (raised as `ValueError`).
    TooLarge(String),
    /// Not supported yet (raised as `NotImplementedError`).
    Unsupported(String),
    /// A count beyond the integers it is kept in (raised as `OverflowError`).
    Overflow(String),
    /// GPU out of memory (raised as `MemoryError`).
    OutOfMemory(String),
    /// Device lost (raised as `approx_attn.DeviceError`; the next call makes a new device).
    DeviceLost(String),
    /// Any other wgpu failure (raised as `approx_attn.DeviceError`).
    Gpu(String),
    /// A signal (Ctrl-C) arrived while the call waited for the GPU (raised as
    /// `KeyboardInterrupt`); the work already submitted finishes in the background.
    Interrupted(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDevice(m)
            | Error::InvalidInput(m)
            | Error::TooLarge(m)
            | Error::Unsupported(m)
            | Error::Overflow(m)
            | Error::OutOfMemory(m)
            | Error::DeviceLost(m)
            | Error::Gpu(m)
            | Error::Interrupted(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}
