//! Interrupting a call that waits for the GPU: the Python binding installs a check (Python's
//! signal handlers, where Ctrl-C raises KeyboardInterrupt) that every wait for the GPU runs at
//! least every [`CHECK_EVERY`]; without one (Rust callers) nothing is checked.

use std::sync::OnceLock;
use std::time::Duration;

use crate::error::Error;

/// How often a wait for the GPU checks for an interrupt.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

static CHECK: OnceLock<fn() -> bool> = OnceLock::new();

/// Installs the interrupt check (once per process; later calls are ignored).
pub fn set_check(check: fn() -> bool) {
    let _ = CHECK.set(check);
}

/// [`Error::Interrupted`] where the installed check says so.
pub(crate) fn check() -> Result<(), Error> {
    match CHECK.get() {
        Some(raised) if raised() => Err(Error::Interrupted(
            "interrupted while waiting for the GPU; the work already submitted finishes in the \
             background"
                .into(),
        )),
        _ => Ok(()),
    }
}
