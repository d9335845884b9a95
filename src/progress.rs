//! Progress of steps a user waits on (autotuning, rate calibration) on stderr: a bar redrawn in
//! place where stderr is a terminal; elsewhere (logs, CI) only the one line each step prints at
//! its start and its end.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// A bar over `total` units of work.
pub(crate) struct Progress {
    what: String,
    total: usize,
    done: usize,
    start: Instant,
    live: bool,
}

impl Progress {
    pub fn new(what: &str, total: usize) -> Progress {
        Progress {
            what: what.to_string(),
            total,
            done: 0,
            start: Instant::now(),
            live: total > 0 && std::io::stderr().is_terminal(),
        }
    }

    /// One more unit done: redraws the bar on a terminal.
    pub fn tick(&mut self) {
        self.done += 1;
        if self.live {
            let line = bar(
                &self.what,
                self.done,
                self.total,
                self.start.elapsed().as_secs_f64(),
            );
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    /// Clears the bar: the step's own end line follows.
    fn drop(&mut self) {
        if self.live {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// `approx_attn: <what> [#####     ] 12/40, about 30 s left`: the time left extrapolated from
/// the mean time per unit so far.
pub(crate) fn bar(what: &str, done: usize, total: usize, elapsed_s: f64) -> String {
    const WIDTH: usize = 24;
    let filled = (WIDTH * done)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let left = if done == 0 {
        String::new()
    } else {
        let s = elapsed_s / done as f64 * total.saturating_sub(done) as f64;
        format!(", about {s:.0} s left")
    };
    format!(
        "approx_attn: {what} [{}{}] {done}/{total}{left}",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::bar;

    #[test]
    fn bar_counts_fills_and_extrapolates() {
        assert_eq!(
            bar("tuning x", 0, 4, 0.0),
            format!("approx_attn: tuning x [{}] 0/4", " ".repeat(24))
        );
        // 3 of 12 done in 6 s: 2 s each, 9 left.
        assert_eq!(
            bar("t", 3, 12, 6.0),
            format!(
                "approx_attn: t [{}{}] 3/12, about 18 s left",
                "#".repeat(6),
                " ".repeat(18)
            )
        );
        assert_eq!(
            bar("t", 5, 5, 1.0),
            format!("approx_attn: t [{}] 5/5, about 0 s left", "#".repeat(24))
        );
        // No work: a full bar, no division by zero.
        assert!(bar("t", 0, 0, 0.0).contains("0/0"));
    }
}
