//! Helpers shared by the GPU integration tests: deterministic inputs and a float64 twin.

// Each test crate compiles this module and uses a part of it.
#![allow(dead_code)]

use approx_attn::Problem;

/// Uniform in [-1, 1) from a 64-bit LCG (no dependency, same values everywhere).
pub fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Q, K, V of the problem's flattened shapes, values in [-1, 1).
pub fn inputs(p: &Problem, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut seed = seed;
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| lcg(&mut seed)).collect() };
    let q = draw(p.units * p.group * p.l * p.e);
    let k = draw(p.units * p.s * p.e);
    let v = draw(p.units * p.s * p.ev);
    (q, k, v)
}

/// Attention in f64 with any weighting: per query row the scores s_j = scale q.(k_j - c) (c the
/// key mean when `centre`, else 0; -inf for keys a causal mask hides) become `weights(&s)`, and
/// the output row is the weighted average of V.
pub fn reference(
    p: &Problem,
    (q, k, v): (&[f32], &[f32], &[f32]),
    centre: bool,
    weights: impl Fn(&[f64]) -> Vec<f64>,
) -> Vec<f64> {
    let mut out = vec![0f64; p.units * p.group * p.l * p.ev];
    for h in 0..p.units * p.group {
        let u = h / p.group;
        let key = |j: usize, c: usize| f64::from(k[(u * p.s + j) * p.e + c]);
        let mu: Vec<f64> = (0..p.e)
            .map(|c| {
                if centre {
                    (0..p.s).map(|j| key(j, c)).sum::<f64>() / p.s as f64
                } else {
                    0.0
                }
            })
            .collect();
        for i in 0..p.l {
            let s: Vec<f64> = (0..p.s)
                .map(|j| {
                    if p.causal && j > i {
                        return f64::NEG_INFINITY;
                    }
                    let dot: f64 = (0..p.e)
                        .map(|c| f64::from(q[(h * p.l + i) * p.e + c]) * (key(j, c) - mu[c]))
                        .sum();
                    dot * f64::from(p.scale)
                })
                .collect();
            let w = weights(&s);
            let z: f64 = w.iter().sum();
            for c in 0..p.ev {
                let num: f64 = (0..p.s)
                    .map(|j| w[j] * f64::from(v[(u * p.s + j) * p.ev + c]))
                    .sum();
                out[(h * p.l + i) * p.ev + c] = num / z;
            }
        }
    }
    out
}

/// Softmax weights (shifted by the row maximum).
pub fn softmax_weights(s: &[f64]) -> Vec<f64> {
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    s.iter().map(|x| (x - m).exp()).collect()
}

pub fn max_abs_diff(out: &[f32], want: &[f64]) -> f64 {
    out.iter()
        .zip(want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max)
}
