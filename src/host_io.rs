//! The third memory level: words moved between host memory and device memory (storage buffers)
//! by a plan, in closed form, as the host loops move them (`exact::run`, `poly::run`,
//! `poly::causal`, `poly::prepass` through `transfer::Uploads`). Counted: the input slices
//! uploaded and the output slices (with the split-KV statistics of exact) read back; left out:
//! the O(units x (E + Ev)) words of parameters, pre-pass results and key means.

use crate::api::Problem;
use crate::chunking::Chunking;
use crate::error::Error;
use crate::io::{floor_sum, words, Words};

/// Words host -> device and device -> host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostDeviceWords {
    pub to_device: u64,
    pub to_host: u64,
}

fn checked(p: &Problem, up: Words, down: Words) -> Result<HostDeviceWords, Error> {
    let fits = |w: Words| w.0.and_then(|x| u64::try_from(x).ok());
    match (fits(up), fits(down)) {
        (Some(to_device), Some(to_host)) => Ok(HostDeviceWords { to_device, to_host }),
        _ => Err(Error::Overflow(format!(
            "the host <-> device words for {p:?} exceed 2^64 - 1"
        ))),
    }
}

/// Exact attention over the dispatches of `c`: each dispatch uploads its query rows and its key
/// and value rows and reads back its output rows (and, split over keys, two statistics per row).
/// Q crosses once per key chunk it meets, K and V once per query chunk, except where a dispatch's
/// key chunk is the previous dispatch's (it stays in place: one key chunk, or causal query chunks
/// that meet only the first).
///
/// In closed form as `exact::io` counts the kernels' words: `Nf = L / Q` query chunks of Q rows
/// and one of `L % Q`; chunk i meets min(n_s, ceil((i + 1) Q / K)) key chunks under the causal
/// mask (n_s from i0 = floor((n_s - 1) K / Q) on), holding K times that many keys below S.
pub fn exact_host_io(p: &Problem, c: &Chunking) -> Result<HostDeviceWords, Error> {
    let (up, down) = exact_words(p, c).map_or((Words(None), Words(None)), |(u, d)| {
        (Words(Some(u)), Words(Some(d)))
    });
    checked(p, up, down)
}

fn exact_words(p: &Problem, c: &Chunking) -> Option<(u128, u128)> {
    let w = |x: usize| x as u128;
    let (l, s, e, ev) = (w(p.l), w(p.s), w(p.e), w(p.ev));
    let (q, kr) = (w(c.q_rows.max(1)), w(c.kv_rows.max(1)));
    let split = 2 * u128::from(c.kv_rows < p.s);
    let n_s = s.div_ceil(kr);
    let (nf, rem) = (l / q, l % q);
    // Sums over the query chunks of (rows x key chunks met) and of the keys met.
    let (rows_x_chunks, keys) = if p.causal {
        let i0 = ((n_s - 1).checked_mul(kr)? / q).min(nf);
        let below = floor_sum(i0, kr, q, q.checked_add(kr - 1)?)?;
        let mut rows = q.checked_mul(below.checked_add((nf - i0).checked_mul(n_s)?)?)?;
        let mut keys = kr
            .checked_mul(below)?
            .checked_add((nf - i0).checked_mul(s)?)?;
        if rem > 0 {
            let met = n_s.min(l.div_ceil(kr));
            rows = rows.checked_add(rem.checked_mul(met)?)?;
            keys = keys.checked_add(s.min(kr.checked_mul(met)?))?;
        }
        (rows, keys)
    } else {
        (l.checked_mul(n_s)?, s.checked_mul(l.div_ceil(q))?)
    };
    // A query chunk whose first key chunk is the previous one's last finds it in place: with
    // one key chunk every chunk after the first, causal the chunks i >= 1 whose predecessor
    // met only key chunk 0 (i Q <= K).
    let n_l = l.div_ceil(q);
    let kept = if n_s == 1 {
        n_l.saturating_sub(1)
    } else if p.causal {
        n_l.saturating_sub(1).min(kr / q)
    } else {
        0
    };
    let keys = keys.checked_sub(kept.checked_mul(kr.min(s))?)?;
    let units = w(p.units);
    let heads = units.checked_mul(w(p.group))?;
    let up = heads
        .checked_mul(e)?
        .checked_mul(rows_x_chunks)?
        .checked_add(units.checked_mul(e.checked_add(ev)?)?.checked_mul(keys)?)?;
    let down = heads
        .checked_mul(ev.checked_add(split)?)?
        .checked_mul(rows_x_chunks)?;
    Some((up, down))
}

/// One reader of an input: whether its slices are whole rows (then, kept on the device, a later
/// reader with the same slices finds them there) and its units per slice.
struct Reader {
    whole_rows: bool,
    units_per_slice: usize,
    words: Words,
}

/// Words uploaded of an input of `units` units (query heads for Q) and `all` words read by
/// `readers`: where the inputs stay on the device (`!streams`), readers of whole rows with the
/// same units per slice share one upload; every other read uploads its slices.
fn input_words(units: usize, all: Words, readers: &[Reader], streams: bool) -> Words {
    let mut kept: Vec<usize> = Vec::new();
    let mut up = Words::ZERO;
    for r in readers {
        if !streams && r.whole_rows {
            let step = r.units_per_slice.min(units);
            if !kept.contains(&step) {
                kept.push(step);
                up += all;
            }
        } else {
            up += r.words;
        }
    }
    up
}

/// The poly method: the pre-pass (over `pre`'s dispatches: K twice, V and Q once) and the passes
/// (K and V once in pass 1, Q once in pass 2, over `rows` rows per key/query slice and `units`
/// KV units per slice; causal: windows of `rows` rows over min(S, L) keys). The output crosses
/// once. Streaming (`streams`), or where the pre-pass's slices are not whole rows, the pre-pass
/// runs on the host, so every input crosses once, for the passes; otherwise Q and K once where their slices are whole rows of the same units, and V
/// twice (as it is, for the pre-pass's value range, then mapped per column for the passes).
pub fn poly_host_io(
    p: &Problem,
    pre: &Chunking,
    (units, kv_rows, q_rows): (usize, usize, usize),
    streams: bool,
) -> Result<HostDeviceWords, Error> {
    let (u, g) = (words(p.units), words(p.group));
    let q_all = u * g * words(p.l) * words(p.e);
    let k_all = u * words(p.s) * words(p.e);
    let v_all = u * words(p.s) * words(p.ev);
    // Causal passes read keys 0..min(S, L) in windows of the query rows.
    let keys = if p.causal { p.s.min(p.l) } else { p.s };
    let (k_pass, v_pass) = (u * words(keys) * words(p.e), u * words(keys) * words(p.ev));
    let kv_whole = pre.kv_rows >= p.s;
    let prepass = |w| Reader {
        whole_rows: kv_whole,
        units_per_slice: pre.units,
        words: w,
    };
    let pass = |w| Reader {
        whole_rows: keys == p.s && kv_rows >= p.s,
        units_per_slice: units,
        words: w,
    };
    if streams || pre.kv_rows < p.s || pre.q_rows < p.l {
        // The pre-pass runs on the host (`poly::prepass`): each input crosses once, for the
        // passes.
        let down = u * g * words(p.l) * words(p.ev);
        return checked(p, k_pass + v_pass + q_all, down);
    }
    let k_up = input_words(
        p.units,
        k_all,
        &[prepass(k_all), prepass(k_all), pass(k_pass)],
        streams,
    );
    // The passes read V centred and scaled per column (`numerics::ValueMap`, mapped on its way
    // to the device): it never shares the pre-pass's upload.
    let v_up = input_words(p.units, v_all, &[prepass(v_all)], streams)
        + input_words(p.units, v_all, &[pass(v_pass)], streams);
    let q_readers = [
        Reader {
            whole_rows: pre.q_rows >= p.l,
            units_per_slice: pre.units * p.group,
            words: q_all,
        },
        Reader {
            whole_rows: q_rows >= p.l,
            units_per_slice: units * p.group,
            words: q_all,
        },
    ];
    let q_up = input_words(p.query_heads(), q_all, &q_readers, streams);
    let down = u * g * words(p.l) * words(p.ev);
    checked(p, k_up + v_up + q_up, down)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunking::chunks;

    /// The loop the closed form replaces: every dispatch's slices, K and V where they differ
    /// from the previous dispatch's.
    fn exact_by_dispatch(p: &Problem, c: &Chunking) -> (u64, u64) {
        let split = if c.kv_rows < p.s { 2 } else { 0 };
        let mut last = None;
        chunks(p, c).iter().fold((0, 0), |(up, down), ch| {
            let qh = (ch.units * p.group) as u64;
            let (lc, sc) = (ch.lc as u64, ch.sc as u64);
            let slice = Some((ch.unit0, ch.s0));
            let kv = if slice == last {
                0
            } else {
                ch.units as u64 * sc * (p.e + p.ev) as u64
            };
            last = slice;
            (
                up + qh * lc * p.e as u64 + kv,
                down + qh * lc * (p.ev as u64 + split),
            )
        })
    }

    #[test]
    fn exact_closed_form_equals_the_dispatch_loop() {
        for causal in [false, true] {
            for (l, s) in [(1, 1), (7, 300), (300, 7), (1000, 1000), (999, 1001)] {
                for (q_rows, kv_rows) in [(1000, 1000), (64, 1000), (1000, 96), (37, 53), (1, 1)] {
                    for units in [1, 3] {
                        let p = Problem {
                            units: 3,
                            group: 2,
                            l,
                            s,
                            e: 5,
                            ev: 3,
                            causal,
                            scale: 1.0,
                        };
                        let c = Chunking {
                            units,
                            q_rows: q_rows.min(l),
                            kv_rows: kv_rows.min(s),
                        };
                        let want = exact_by_dispatch(&p, &c);
                        let got = exact_host_io(&p, &c).unwrap();
                        assert_eq!((got.to_device, got.to_host), want, "{p:?} {c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn poly_inputs_cross_once_on_the_device_v_twice_and_once_streaming() {
        let p = Problem {
            units: 4,
            group: 2,
            l: 100,
            s: 80,
            e: 8,
            ev: 6,
            causal: false,
            scale: 1.0,
        };
        let whole = Chunking {
            units: 4,
            q_rows: 100,
            kv_rows: 80,
        };
        let (q, k, v) = (4 * 2 * 100 * 8, 4 * 80 * 8, 4 * 80 * 6);
        let o = 4 * 2 * 100 * 6;
        let kept = poly_host_io(&p, &whole, (4, 80, 100), false).unwrap();
        assert_eq!((kept.to_device, kept.to_host), (q + k + 2 * v, o));
        let streamed = poly_host_io(&p, &whole, (4, 80, 100), true).unwrap();
        assert_eq!((streamed.to_device, streamed.to_host), (q + k + v, o));
        // Causal, streaming: the passes read keys 0..min(S, L).
        let causal = Problem {
            causal: true,
            l: 50,
            ..p
        };
        let streamed = poly_host_io(&causal, &whole, (4, 80, 50), true).unwrap();
        assert_eq!(streamed.to_device, q / 2 + 4 * 50 * (8 + 6));
        // Pre-pass slices of part of the rows are not kept: it runs on the host.
        let cut = Chunking {
            kv_rows: 40,
            ..whole
        };
        let host = poly_host_io(&p, &cut, (4, 80, 100), false).unwrap();
        assert_eq!(host.to_device, q + k + v);
        // Other units per slice in the passes: the pre-pass's uploads are not theirs.
        let other = poly_host_io(&p, &whole, (1, 80, 100), false).unwrap();
        assert_eq!(other.to_device, 2 * (q + k + v));
        assert!(exact_host_io(
            &Problem {
                units: usize::MAX,
                ..p
            },
            &whole
        )
        .is_err());
    }
}
