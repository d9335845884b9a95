//! Runs the exact kernel on whatever adapter is present (lavapipe in CI) against a float64 loop.

use approx_attn::{exact_attention, Problem, RunOptions};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn reference(p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let mut out = vec![0f64; p.units * p.group * p.l * p.ev];
    for h in 0..p.units * p.group {
        let u = h / p.group;
        for i in 0..p.l {
            let s: Vec<f64> = (0..p.s)
                .map(|j| {
                    if p.causal && j > i {
                        f64::NEG_INFINITY
                    } else {
                        (0..p.e)
                            .map(|c| {
                                f64::from(q[(h * p.l + i) * p.e + c])
                                    * f64::from(k[(u * p.s + j) * p.e + c])
                            })
                            .sum::<f64>()
                            * f64::from(p.scale)
                    }
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for c in 0..p.ev {
                out[(h * p.l + i) * p.ev + c] = (0..p.s)
                    .map(|j| w[j] * f64::from(v[(u * p.s + j) * p.ev + c]))
                    .sum::<f64>()
                    / z;
            }
        }
    }
    out
}

fn check(p: Problem, count_io: bool) {
    let mut seed = 7u64;
    let q: Vec<f32> = (0..p.units * p.group * p.l * p.e)
        .map(|_| lcg(&mut seed))
        .collect();
    let k: Vec<f32> = (0..p.units * p.s * p.e).map(|_| lcg(&mut seed)).collect();
    let v: Vec<f32> = (0..p.units * p.s * p.ev).map(|_| lcg(&mut seed)).collect();
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
    let want = reference(&p, &q, &k, &v);
    let err = out
        .iter()
        .zip(&want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
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

/// Every tile shape the autotune may pick computes the same attention.
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
    let mut seed = 5u64;
    let q: Vec<f32> = (0..p.units * p.l * p.e).map(|_| lcg(&mut seed)).collect();
    let k: Vec<f32> = (0..p.units * p.s * p.e).map(|_| lcg(&mut seed)).collect();
    let v: Vec<f32> = (0..p.units * p.s * p.ev).map(|_| lcg(&mut seed)).collect();
    let want = reference(&p, &q, &k, &v);
    let candidates = approx_attn::plan::exact_candidates(&p, &budget);
    assert!(candidates.len() > 4, "{candidates:?}");
    for t in candidates {
        let plan = approx_attn::plan::plan_exact_with(&p, &budget, t).unwrap();
        let (out, _) =
            approx_attn::kernels::exact::run(&gpu, &p, &plan, &q, &k, &v, &RunOptions::default())
                .unwrap();
        let err = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        // Same float32 tolerance as above: values in [-1, 1], a few 1e-6.
        assert!(err < 5e-6, "{t:?}: max error {err}");
    }
}
