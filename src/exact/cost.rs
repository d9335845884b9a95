//! FLOPs of exact attention, for `auto`'s prediction.

use crate::api::Problem;

/// Query-key pairs the exact kernel evaluates (the causal mask hides j > i).
pub fn visible_pairs(p: &Problem) -> f64 {
    let (l, s) = (p.l as f64, p.s as f64);
    if !p.causal {
        return l * s;
    }
    // sum_{i<L} min(i+1, S)
    let full = l.min(s);
    full * (full + 1.0) / 2.0 + (l - full).max(0.0) * s
}

/// Floating-point operations of exact attention (two products of E and Ev per pair).
pub fn exact_flops(p: &Problem) -> f64 {
    p.units as f64 * p.group as f64 * visible_pairs(p) * 2.0 * (p.e as f64 + p.ev as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_pairs() {
        let p = Problem {
            units: 1,
            group: 1,
            l: 4,
            s: 3,
            e: 1,
            ev: 1,
            causal: true,
            scale: 1.0,
        };
        // rows see 1, 2, 3, 3 keys
        assert_eq!(visible_pairs(&p), 9.0);
        assert_eq!(visible_pairs(&Problem { causal: false, ..p }), 12.0);
        assert_eq!(exact_flops(&p), 9.0 * 4.0);
    }
}
