//! Runs the exact kernel on whatever adapter is present (lavapipe in CI) against a float64 loop.

mod common;

use approx_attn::{exact_attention, Problem, RunOptions};
use common::{inputs, max_abs_diff, reference, softmax_weights};

fn check(p: Problem, count_io: bool) {
    let (q, k, v) = inputs(&p, 7);
    let (out, report) = exact_attention(
        &p,
        &q,
        &k,
        &v,
        &RunOptions {
            trusted: false,
            count_io,
        },
    )
    .unwrap();
    let want = reference(&p, (&q, &k, &v), false, softmax_weights);
    let err = max_abs_diff(&out, &want);
    // Values lie in [-1, 1]: f32 accumulation over S terms stays within a few 1e-6.
    assert!(err < 5e-6, "{p:?}: max error {err}, plan {}", report.plan);
    if count_io {
        let (r, w) = report.stats.io_words_counted.unwrap();
        assert_eq!(
            (r, w),
            (report.io_reads, report.io_writes),
            "{p:?} {}",
            report.plan
        );
    }
}

#[test]
fn exact_matches_reference() {
    for (l, s, e, ev, causal, group) in [
        (1, 1, 1, 1, false, 1),
        (7, 64, 3, 5, false, 1),
        (64, 7, 16, 16, true, 2),
        (100, 300, 64, 32, true, 1),
        (33, 50, 256, 256, false, 1),
    ] {
        check(
            Problem {
                units: 2,
                group,
                l,
                s,
                e,
                ev,
                causal,
                scale: 1.0 / (e as f32).sqrt(),
            },
            true,
        );
    }
}

/// Every tile shape the autotune may pick (V in K's tile or in its own double-buffered one)
/// computes the same attention and moves the words the I/O model counts.
#[test]
fn every_autotune_candidate_matches_reference() {
    let gpu = approx_attn::device::gpu().unwrap();
    let budget = approx_attn::budget(&gpu.info).unwrap();
    let p = Problem {
        units: 2,
        group: 1,
        l: 70,
        s: 90,
        e: 24,
        ev: 40,
        causal: true,
        scale: 0.2,
    };
    let (q, k, v) = inputs(&p, 5);
    let want = reference(&p, (&q, &k, &v), false, softmax_weights);
    let candidates = approx_attn::exact::plan::exact_candidates(&p, &budget);
    assert!(candidates.len() > 4, "{candidates:?}");
    assert!(candidates.iter().any(|t| t.split_v) && candidates.iter().any(|t| !t.split_v));
    let counting = RunOptions {
        trusted: false,
        count_io: true,
    };
    for t in candidates {
        let plan = approx_attn::exact::plan::plan_exact_with(&p, &budget, t).unwrap();
        let (out, st) =
            approx_attn::exact::run::run(&gpu, &p, &plan, &q, &k, &v, &counting).unwrap();
        let err = max_abs_diff(&out, &want);
        // Same float32 tolerance as above: values in [-1, 1], a few 1e-6.
        assert!(err < 5e-6, "{t:?}: max error {err}");
        let io = approx_attn::exact::io::exact_io(&p, &plan);
        assert_eq!(
            st.io_words_counted,
            Some((io.reads(), io.writes())),
            "{t:?}"
        );
    }
}
