//! Runs the poly kernels on whatever adapter is present against a float64 loop that uses the
//! same polynomial and the same key centring, and checks the shaders' own I/O count.

mod common;

use approx_attn::{attention, poly, Method, PolyOptions, Problem, RunOptions};
use common::{inputs, max_abs_diff, reference};

/// Values in [-1, 1]; f32 features and sums over r terms: a few 1e-6 of the range of 2.
const TWIN_TOLERANCE: f64 = 2e-5;

/// The float64 twin: the same polynomial (fitted at the kernels' beta) and the same key centring.
fn twin(p: &Problem, qkv: (&[f32], &[f32], &[f32]), beta: f64, degree: usize) -> Vec<f64> {
    let fit = poly::fit::Poly::fit(beta, degree);
    let polynomial = |s: &[f64]| -> Vec<f64> {
        s.iter()
            .map(|x| fit.coeffs.iter().rev().fold(0.0, |acc, c| acc * x + c))
            .collect()
    };
    reference(p, qkv, true, polynomial)
}

const BASE: Problem = Problem {
    units: 2,
    group: 2,
    l: 70,
    s: 90,
    e: 8,
    ev: 5,
    causal: false,
    scale: 0.35,
};

fn check(p: Problem, degree: usize, want_schedule: &str) {
    let (q, k, v) = inputs(&p, 11);
    let popts = PolyOptions {
        eps: 1e-2,
        degree: Some(degree),
        check_finite: true,
        tensor_cores: Some(false),
    };
    let (out, rep) = attention(
        &p,
        &q,
        &k,
        &v,
        Method::Poly,
        &popts,
        &RunOptions {
            trusted: false,
            count_io: true,
        },
    )
    .unwrap();
    let cert = rep.certificate.clone().unwrap();
    assert_eq!(
        format!("{:?}", cert.schedule),
        want_schedule,
        "{}",
        rep.plan
    );
    let err = max_abs_diff(&out, &twin(&p, (&q, &k, &v), cert.beta, degree));
    assert!(
        err < TWIN_TOLERANCE,
        "{p:?} degree {degree}: error {err} vs twin; plan {}",
        rep.plan
    );
    let (r, w) = rep.stats.io_words_counted.unwrap();
    assert_eq!((r, w), (rep.io_reads, rep.io_writes), "{}", rep.plan);
}

#[test]
fn poly_matches_twin_in_both_schedules() {
    let p = BASE;
    check(p, 2, "A");
    check(Problem { e: 3, ev: 3, ..p }, 4, "A");
    check(Problem { e: 32, ev: 16, ..p }, 2, "B");
    std::env::set_var("APPROX_ATTN_FAST_MEMORY_BYTES", "1024");
    check(p, 2, "B");
    std::env::remove_var("APPROX_ATTN_FAST_MEMORY_BYTES");
}

/// Every f32 pass-tile pair the autotune may pick computes the same polynomial attention and
/// moves the words the I/O model counts, in schedule A (S' resident in pass 2) and B (streamed).
#[test]
fn every_f32_autotune_candidate_matches_twin() {
    let gpu = approx_attn::device::gpu().unwrap();
    let budget = approx_attn::budget(&gpu.info).unwrap();
    let wide = Problem {
        e: 32,
        ev: 16,
        ..BASE
    };
    for (p, want_schedule) in [(BASE, "A"), (wide, "B")] {
        let degree = 2;
        let (q, k, v) = inputs(&p, 13);
        let planned = approx_attn::poly::plan::plan_poly(&p, degree, &budget).unwrap();
        assert_eq!(format!("{:?}", planned.schedule), want_schedule);
        let (cands1, cands2) = approx_attn::poly::plan::poly_candidates(&planned, &budget);
        assert!(
            cands1.len() > 3 && cands2.len() > 3,
            "{cands1:?} {cands2:?}"
        );
        // 4-key tiles are tried, only with the register prefetch.
        assert!(cands1.iter().any(|t| t.bk == 4));
        assert!(cands1.iter().all(|t| t.bk != 4 || t.prefetch));
        let pairs = cands1
            .iter()
            .map(|&t1| (t1, planned.pass2))
            .chain(cands2.iter().map(|&t2| (planned.pass1, t2)));
        for (t1, t2) in pairs {
            let counting = RunOptions {
                trusted: false,
                count_io: true,
            };
            let run =
                approx_attn::poly_attention_with_tiles(&p, &q, &k, &v, degree, t1, t2, &counting)
                    .unwrap();
            let err = max_abs_diff(&run.out, &twin(&p, (&q, &k, &v), run.beta, degree));
            assert!(err < TWIN_TOLERANCE, "{t1:?} {t2:?}: error {err} vs twin");
            assert_eq!(
                run.words_counted,
                Some(run.words_planned),
                "{t1:?} {t2:?}: words counted vs planned"
            );
        }
    }
}
