//! Runs the poly kernels on whatever adapter is present against a float64 loop that uses the
//! same polynomial and the same key centring, and checks the shaders' own I/O count.

mod common;

use approx_attn::{attention, poly, Method, PolyOptions, Problem, RunOptions};
use common::{inputs, max_abs_diff, reference};

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
    let fit = poly::Poly::fit(cert.beta, degree);
    // The same polynomial and the same key centring as the kernels.
    let polynomial = |s: &[f64]| -> Vec<f64> {
        s.iter()
            .map(|x| fit.coeffs.iter().rev().fold(0.0, |acc, c| acc * x + c))
            .collect()
    };
    let want = reference(&p, (&q, &k, &v), true, polynomial);
    let err = max_abs_diff(&out, &want);
    // Values in [-1, 1]; f32 features and sums over r terms: a few 1e-6 of the range of 2.
    assert!(
        err < 2e-5,
        "{p:?} degree {degree}: error {err} vs twin; plan {}",
        rep.plan
    );
    let (r, w) = rep.stats.io_words_counted.unwrap();
    assert_eq!((r, w), (rep.io_reads, rep.io_writes), "{}", rep.plan);
}

#[test]
fn poly_matches_twin_in_both_schedules() {
    let p = Problem {
        units: 2,
        group: 2,
        l: 70,
        s: 90,
        e: 8,
        ev: 5,
        causal: false,
        scale: 0.35,
    };
    check(p, 2, "A");
    check(Problem { e: 3, ev: 3, ..p }, 4, "A");
    check(Problem { e: 32, ev: 16, ..p }, 2, "B");
    std::env::set_var("APPROX_ATTN_FAST_MEMORY_BYTES", "1024");
    check(p, 2, "B");
    std::env::remove_var("APPROX_ATTN_FAST_MEMORY_BYTES");
}
