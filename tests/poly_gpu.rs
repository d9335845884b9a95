//! Runs the poly kernels on whatever adapter is present against a float64 loop that uses the
//! same polynomial and the same key centring, and checks the shaders' own I/O count.

use approx_attn::{attention, poly, Method, PolyOptions, Problem, RunOptions};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// O = sum_j P(scale q.(k_j - mu)) v_j / sum_j P(...), in f64.
fn reference(p: &Problem, coeffs: &[f64], q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let mut out = vec![0f64; p.units * p.group * p.l * p.ev];
    for h in 0..p.units * p.group {
        let u = h / p.group;
        let mu: Vec<f64> = (0..p.e)
            .map(|c| {
                (0..p.s)
                    .map(|j| f64::from(k[(u * p.s + j) * p.e + c]))
                    .sum::<f64>()
                    / p.s as f64
            })
            .collect();
        for i in 0..p.l {
            let w: Vec<f64> = (0..p.s)
                .map(|j| {
                    let x: f64 = (0..p.e)
                        .map(|c| {
                            f64::from(q[(h * p.l + i) * p.e + c])
                                * (f64::from(k[(u * p.s + j) * p.e + c]) - mu[c])
                        })
                        .sum::<f64>()
                        * f64::from(p.scale);
                    coeffs.iter().rev().fold(0.0, |acc, c| acc * x + c)
                })
                .collect();
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

fn check(p: Problem, degree: usize, want_schedule: &str) {
    let mut seed = 11u64;
    let q: Vec<f32> = (0..p.units * p.group * p.l * p.e)
        .map(|_| lcg(&mut seed))
        .collect();
    let k: Vec<f32> = (0..p.units * p.s * p.e).map(|_| lcg(&mut seed)).collect();
    let v: Vec<f32> = (0..p.units * p.s * p.ev).map(|_| lcg(&mut seed)).collect();
    let popts = PolyOptions {
        eps: 1e-2,
        degree: Some(degree),
        check_finite: true,
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
    let want = reference(&p, &fit.coeffs, &q, &k, &v);
    let err = out
        .iter()
        .zip(&want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
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
