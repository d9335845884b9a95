//! Words the exact kernel moves for a plan.

use super::plan::ExactPlan;
use super::storage::Storage;
use crate::api::Problem;
use crate::error::Error;
use crate::io::{floor_sum, IoCount, PassIo};

/// Exactly the words the exact kernel loads and stores for this plan (see `shaders/exact.wgsl`):
/// each workgroup reads its query rows once and every visible key row's K and V once, and writes
/// its output rows (plus two statistics per row when the keys are split over dispatches). Counts
/// beyond u64 saturate (no problem that runs comes near; [`exact_io_checked`] says so instead).
pub fn exact_io(p: &Problem, plan: &ExactPlan) -> IoCount {
    exact_io_for(p, plan, Storage::F32)
}

/// [`exact_io`] for inputs stored in `storage`: an f16 row of E halves is ceil(E / 2) words (odd
/// widths are padded to whole words, and the kernel reads the pad); the output and the split-KV
/// statistics are f32 either way.
pub fn exact_io_for(p: &Problem, plan: &ExactPlan, storage: Storage) -> IoCount {
    let (reads, writes) = exact_words(p, plan, storage).map_or((u64::MAX, u64::MAX), |(r, w)| {
        (
            u64::try_from(r).unwrap_or(u64::MAX),
            u64::try_from(w).unwrap_or(u64::MAX),
        )
    });
    io_count(reads, writes)
}

/// [`exact_io`], or an error where a count (or the total) does not fit u64.
pub fn exact_io_checked(p: &Problem, plan: &ExactPlan, storage: Storage) -> Result<IoCount, Error> {
    let words = exact_words(p, plan, storage)
        .filter(|(r, w)| r.checked_add(*w).is_some_and(|t| t <= u128::from(u64::MAX)));
    match words {
        Some((r, w)) => Ok(io_count(r as u64, w as u64)),
        None => Err(Error::Overflow(format!(
            "the exact plan for {p:?} moves more than 2^64 - 1 words: beyond u64"
        ))),
    }
}

fn io_count(reads: u64, writes: u64) -> IoCount {
    IoCount {
        passes: vec![PassIo {
            name: "exact",
            reads,
            writes,
        }],
    }
}

/// The words of [`exact_io`] in closed form over the dispatches and query tiles (any size
/// answers at once), in u128: None where even that overflows.
///
/// Dispatches: `Nf = L / Q` chunks of Q = `q_rows` query rows and one of `L % Q`, times
/// `n_s = ceil(S / K)` chunks of K = `kv_rows` keys; causal masks skip those whose first key
/// comes after their last query. A chunk of lc rows reads lc E query words and writes lc (Ev + 2
/// split) words; each query tile reads (E + Ev) words per visible key. Summed over a tile's key
/// chunks, its visible keys are `min(end, S)` (end: one past its last row; causal) or S. Reads
/// count a row of E inputs as `storage.row_words(E)` words.
fn exact_words(p: &Problem, plan: &ExactPlan, storage: Storage) -> Option<(u128, u128)> {
    let w = |x: usize| x as u128;
    let (l, s, ev) = (w(p.l), w(p.s), w(p.ev));
    let (e_in, ev_in) = (w(storage.row_words(p.e)), w(storage.row_words(p.ev)));
    let (bq, q, kr) = (
        w(plan.tiles.bq.max(1)),
        w(plan.chunking.q_rows.max(1)),
        w(plan.chunking.kv_rows.max(1)),
    );
    let heads = w(p.units).checked_mul(w(p.group))?;
    let split = u128::from(plan.chunking.kv_rows < p.s);
    let n_s = s.div_ceil(kr);
    let (nf, rem) = (l / q, l % q);
    // Sum over chunks of lc times the key chunks each dispatches with.
    let rows_x_chunks = if p.causal {
        // Chunk i (l0 = i Q) dispatches min(n_s, ceil((i + 1) Q / K)) key chunks: n_s from
        // i0 = floor((n_s - 1) K / Q) on.
        let i0 = ((n_s - 1).checked_mul(kr)? / q).min(nf);
        let below = floor_sum(i0, kr, q, q.checked_add(kr - 1)?)?;
        let full = q.checked_mul(below.checked_add((nf - i0).checked_mul(n_s)?)?)?;
        full.checked_add(rem.checked_mul(n_s.min(l.div_ceil(kr)))?)?
    } else {
        l.checked_mul(n_s)?
    };
    let key_rows = if p.causal {
        causal_tile_keys(nf, q, rem, bq, s)?
    } else {
        let tiles = nf
            .checked_mul(q.div_ceil(bq))?
            .checked_add(rem.div_ceil(bq))?;
        tiles.checked_mul(s)?
    };
    let reads = rows_x_chunks
        .checked_mul(e_in)?
        .checked_add(key_rows.checked_mul(e_in.checked_add(ev_in)?)?)?;
    let writes = rows_x_chunks.checked_mul(ev.checked_add(2 * split)?)?;
    Some((heads.checked_mul(reads)?, heads.checked_mul(writes)?))
}

/// Sum over the query tiles of all chunks (`nf` of q rows, one of `rem`) of min(end, S).
fn causal_tile_keys(nf: u128, q: u128, rem: u128, bq: u128, s: u128) -> Option<u128> {
    // One chunk at l0 with lc rows: its full tiles end at l0 + t bq (t = 1..lc/bq), a partial
    // one at l0 + lc.
    let chunk = |l0: u128, lc: u128| -> Option<u128> {
        let n = lc / bq;
        let c = if s >= l0 { ((s - l0) / bq).min(n) } else { 0 };
        let below = c
            .checked_mul(l0)?
            .checked_add(bq.checked_mul(c.checked_mul(c + 1)? / 2)?)?;
        let mut sum = below.checked_add((n - c).checked_mul(s)?)?;
        if lc % bq != 0 {
            sum = sum.checked_add(l0.checked_add(lc)?.min(s))?;
        }
        Some(sum)
    };
    // Full chunks: every tile ends at or below S while (i + 1) Q <= S (i < a: the chunk's sum
    // is nt i Q + chunk(0, Q)), every tile at or above S from i Q >= S on (nt S each), one chunk
    // at most in between.
    let nt = q.div_ceil(bq);
    let a = (s / q).min(nf);
    let b = s.div_ceil(q).min(nf);
    let tri = a.checked_mul(a.saturating_sub(1))? / 2;
    let mut sum = nt
        .checked_mul(q)?
        .checked_mul(tri)?
        .checked_add(a.checked_mul(chunk(0, q)?)?)?;
    for i in a..b {
        sum = sum.checked_add(chunk(i.checked_mul(q)?, q)?)?;
    }
    sum = sum.checked_add((nf - b).checked_mul(nt.checked_mul(s)?)?)?;
    if rem > 0 {
        sum = sum.checked_add(chunk(nf.checked_mul(q)?, rem)?)?;
    }
    Some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::chunking::chunks;
    use crate::exact::plan::{plan_exact, ExactTiles};

    /// Keys a query tile streams: all `sc` keys, or under the causal mask only those up to its last row.
    fn exact_keys_visible(p: &Problem, q_end_global: usize, s0: usize, sc: usize) -> usize {
        if p.causal {
            q_end_global.saturating_sub(s0).min(sc)
        } else {
            sc
        }
    }

    /// The count dispatch by dispatch and tile by tile, as the kernel runs: the reference for the
    /// closed form.
    fn exact_io_by_chunks(p: &Problem, plan: &ExactPlan, storage: Storage) -> (u64, u64) {
        let (e_in, ev_in) = (storage.row_words(p.e), storage.row_words(p.ev));
        let t = &plan.tiles;
        let split_kv = plan.chunking.kv_rows < p.s;
        let (mut reads, mut writes) = (0u64, 0u64);
        for ch in chunks(p, &plan.chunking) {
            let heads = (ch.units * p.group) as u64;
            let (mut r, mut w) = (0u64, 0u64);
            for q0 in (0..ch.lc).step_by(t.bq) {
                let rows = t.bq.min(ch.lc - q0);
                let keys = exact_keys_visible(p, ch.l0 + q0 + rows, ch.s0, ch.sc);
                r += (rows * e_in + keys * (e_in + ev_in)) as u64;
                w += (rows * p.ev + if split_kv { 2 * rows } else { 0 }) as u64;
            }
            reads += heads * r;
            writes += heads * w;
        }
        (reads, writes)
    }

    #[test]
    fn floor_sum_matches_the_loop() {
        for n in 0u128..40 {
            for m in 1u128..12 {
                for a in 0u128..15 {
                    for b in [0u128, 1, 5, 13, 40] {
                        let want: u128 = (0..n).map(|i| (a * i + b) / m).sum();
                        assert_eq!(floor_sum(n, m, a, b), Some(want), "{n} {m} {a} {b}");
                    }
                }
            }
        }
        assert_eq!(floor_sum(1 << 70, 3, u128::MAX / 2, 0), None);
    }

    #[test]
    fn closed_form_equals_the_count_by_dispatch() {
        // Small bindings force split queries and keys (several chunks in each dimension, partial
        // last chunks, causal skips); tiles of 1..64 rows.
        let mut checked = 0;
        for (l, s) in [
            (1usize, 1usize),
            (7, 300),
            (300, 7),
            (129, 129),
            (1000, 777),
            (513, 2049),
        ] {
            for (e, ev) in [(4usize, 4usize), (3, 5), (16, 8)] {
                for causal in [false, true] {
                    for binding in [64u64 << 10, 9000, 1 << 20, 128 << 20] {
                        for (units, group) in [(1usize, 1usize), (3, 2)] {
                            let p = Problem {
                                units,
                                group,
                                l,
                                s,
                                e,
                                ev,
                                causal,
                                scale: 1.0,
                            };
                            let Ok(plan) = plan_exact(&p, &Budget::with_binding(8192, binding))
                            else {
                                continue;
                            };
                            for bq in [1usize, 3, plan.tiles.bq] {
                                let plan = ExactPlan {
                                    tiles: ExactTiles { bq, ..plan.tiles },
                                    ..plan
                                };
                                for storage in [Storage::F32, Storage::F16] {
                                    let io = exact_io_for(&p, &plan, storage);
                                    assert_eq!(
                                        (io.reads(), io.writes()),
                                        exact_io_by_chunks(&p, &plan, storage),
                                        "{p:?} {plan:?} {storage:?}"
                                    );
                                }
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 400, "{checked}");
    }

    #[test]
    fn any_size_answers_at_once_or_overflows_clearly() {
        let p = Problem {
            units: 1,
            group: 1,
            l: 1 << 62,
            s: 1 << 62,
            e: 64,
            ev: 64,
            causal: false,
            scale: 1.0,
        };
        for budget in [Budget::model(12288), Budget::with_binding(12288, 128 << 20)] {
            let plan = plan_exact(&p, &budget).unwrap();
            let t = std::time::Instant::now();
            let err = exact_io_checked(&p, &plan, Storage::F32).unwrap_err();
            assert!(matches!(err, Error::Overflow(_)), "{err:?}");
            let causal = Problem { causal: true, ..p };
            assert!(exact_io_checked(&causal, &plan, Storage::F32).is_err());
            assert!(t.elapsed().as_secs_f64() < 1.0);
            // Quadratic up to u64 (2^30: about 2^61 words), then an error instead of a wrapped
            // total (2^32 once gave less than 2^30).
            let at = |n: usize| {
                let p = Problem { l: n, s: n, ..p };
                let plan = plan_exact(&p, &budget).unwrap();
                exact_io_checked(&p, &plan, Storage::F32).map(|io| io.total() as f64)
            };
            let ratio = at(1 << 30).unwrap() / at(1 << 28).unwrap();
            assert!((15.9..16.1).contains(&ratio), "{ratio} {budget:?}");
            assert!(at(1 << 32).is_err());
        }
    }

    fn budget() -> Budget {
        Budget::with_binding(8192, 128 << 20)
    }

    #[test]
    fn exact_io_closed_form_non_causal() {
        let p = Problem {
            units: 3,
            group: 2,
            l: 100,
            s: 70,
            e: 16,
            ev: 8,
            causal: false,
            scale: 1.0,
        };
        let plan = plan_exact(&p, &budget()).unwrap();
        let io = exact_io(&p, &plan);
        let heads = 6u64;
        let tiles = p.l.div_ceil(plan.tiles.bq) as u64;
        assert_eq!(io.reads(), heads * (100 * 16 + tiles * 70 * 24));
        assert_eq!(io.writes(), heads * 100 * 8);
    }

    #[test]
    fn f16_storage_reads_half_the_input_words_and_writes_the_same() {
        // Even widths: exactly half of every input read; odd widths: rows of ceil(E / 2) words
        // (the pad half is read too).
        for (e, ev, causal) in [(64usize, 64usize, false), (24, 80, true), (3, 5, false)] {
            let p = Problem {
                units: 2,
                group: 3,
                l: 77,
                s: 131,
                e,
                ev,
                causal,
                scale: 1.0,
            };
            let plan = plan_exact(&p, &budget()).unwrap();
            let f32_io = exact_io_for(&p, &plan, Storage::F32);
            let f16_io = exact_io_for(&p, &plan, Storage::F16);
            assert_eq!(f16_io.writes(), f32_io.writes());
            let heads = 6u64;
            let tiles = p.l.div_ceil(plan.tiles.bq) as u64;
            let keys = if causal {
                (0..tiles)
                    .map(|t| ((t + 1) * plan.tiles.bq as u64).min(p.l as u64).min(131))
                    .sum::<u64>()
            } else {
                tiles * 131
            };
            let (we, wev) = (e.div_ceil(2) as u64, ev.div_ceil(2) as u64);
            assert_eq!(f16_io.reads(), heads * (77 * we + keys * (we + wev)));
            if e % 2 == 0 && ev % 2 == 0 {
                assert_eq!(2 * f16_io.reads(), f32_io.reads());
            }
        }
    }

    #[test]
    fn causal_reads_about_half_the_keys() {
        let p = Problem {
            units: 1,
            group: 1,
            l: 4096,
            s: 4096,
            e: 64,
            ev: 64,
            causal: false,
            scale: 1.0,
        };
        let plan = plan_exact(&p, &budget()).unwrap();
        let full = exact_io(&p, &plan).reads() as f64;
        let causal = exact_io(&Problem { causal: true, ..p }, &plan).reads() as f64;
        let ratio = causal / full;
        assert!((0.5..0.53).contains(&ratio), "{ratio}");
    }
}
