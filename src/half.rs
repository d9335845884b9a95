//! float16 <-> float32 conversions of whole arrays on the host, on several threads, bit for bit
//! as NumPy converts (its software routines: round to nearest even, NaN payloads kept and never
//! turned into Inf), so that routing a conversion through here changes no result.

use std::sync::OnceLock;

/// Elements from which a conversion is split over threads (below, a thread costs more than it
/// saves).
const PARALLEL_ELEMENTS: usize = 1 << 20;

/// The float32 bits of a float16 (exact: every float16 is a float32); NaN payloads shift into
/// the top of the float32 significand, as NumPy's `npy_halfbits_to_floatbits`.
pub fn f16_bits_to_f32_bits(h: u16) -> u32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let exp = h & 0x7c00;
    let sig = h & 0x03ff;
    match exp {
        0 if sig == 0 => sign,
        0 => {
            // Subnormal: sig * 2^-24, normalised so that its leading bit becomes implicit.
            let shift = sig.leading_zeros() - 21; // brings the leading bit to 0x400
            let e = 113 - shift; // 2^-14 has biased float32 exponent 113
            sign | (e << 23) | (((sig << shift) & 0x03ff) << 13)
        }
        0x7c00 => sign | 0x7f80_0000 | (sig << 13),
        _ => sign | (((h & 0x7fff) + 0x1_c000) << 13),
    }
}

/// The float16 bits nearest a float32 (ties to even; beyond float16's range Inf; NaN keeps the
/// top of its payload and stays NaN), as NumPy's `npy_floatbits_to_halfbits`.
pub fn f32_bits_to_f16_bits(f: u32) -> u16 {
    let sign = (f & 0x8000_0000) >> 16;
    let f_exp = f & 0x7f80_0000;
    let h = if f_exp >= 0x4780_0000 {
        let f_sig = f & 0x007f_ffff;
        if f_exp == 0x7f80_0000 && f_sig != 0 {
            let nan = 0x7c00 + (f_sig >> 13);
            nan + u32::from(nan == 0x7c00)
        } else {
            0x7c00 // Inf, or beyond float16's range
        }
    } else if f_exp <= 0x3800_0000 {
        if f_exp < 0x3300_0000 {
            0 // below half the smallest subnormal: signed zero
        } else {
            let e = f_exp >> 23;
            let f_sig = (0x0080_0000 + (f & 0x007f_ffff)) >> (113 - e);
            // The shift may have dropped bits: a tie only where they were all zero.
            let tie = (f_sig & 0x3fff) == 0x1000 && (f & 0x7ff) == 0;
            (f_sig + if tie { 0 } else { 0x1000 }) >> 13
        }
    } else {
        let h_exp = (f_exp - 0x3800_0000) >> 13;
        let f_sig = f & 0x007f_ffff;
        let tie = (f_sig & 0x3fff) == 0x1000;
        // A carry out of the significand moves into the exponent (up to Inf): still correct.
        h_exp + ((f_sig + if tie { 0 } else { 0x1000 }) >> 13)
    };
    (sign + h) as u16
}

/// float32 values of all 65,536 float16 bit patterns.
fn f16_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|h| f32::from_bits(f16_bits_to_f32_bits(h)))
            .collect()
    })
}

/// Runs `work` over matching chunks of `src` and `dst` (the same length), on several threads
/// for large arrays; returns the sum of what the chunks return.
fn par_zip<S: Sync, D: Send>(
    src: &[S],
    dst: &mut [D],
    work: impl Fn(&[S], &mut [D]) -> usize + Sync,
) -> usize {
    assert_eq!(src.len(), dst.len(), "conversion lengths differ");
    let threads = if src.len() < PARALLEL_ELEMENTS {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    if threads == 1 {
        return work(src, dst);
    }
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = src
            .chunks(chunk)
            .zip(dst.chunks_mut(chunk))
            .map(|(s, d)| scope.spawn(|| work(s, d)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Writes the float32 values of the float16 bits `src` into `dst`; returns how many are NaN or
/// Inf.
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) -> usize {
    let table = f16_table();
    par_zip(src, dst, |s, d| {
        let mut nonfinite = 0;
        for (x, y) in s.iter().zip(d.iter_mut()) {
            *y = table[usize::from(*x)];
            nonfinite += usize::from(*x & 0x7c00 == 0x7c00);
        }
        nonfinite
    })
}

/// How many of the float16 bits `src` are NaN or Inf.
pub fn f16_nonfinite(src: &[u16]) -> usize {
    let threads = if src.len() < PARALLEL_ELEMENTS {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    let count = |s: &[u16]| s.iter().filter(|&&x| x & 0x7c00 == 0x7c00).count();
    if threads == 1 {
        return count(src);
    }
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = src
            .chunks(chunk)
            .map(|s| scope.spawn(move || count(s)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Writes the float16 bits nearest the float32 values `src` into `dst`.
pub fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
    par_zip(src, dst, |s, d| {
        for (x, y) in s.iter().zip(d.iter_mut()) {
            *y = f32_bits_to_f16_bits(x.to_bits());
        }
        0
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_f16_round_trips_and_converts_to_its_value() {
        for h in 0..=u16::MAX {
            let f = f32::from_bits(f16_bits_to_f32_bits(h));
            let (exp, sig) = ((h >> 10) & 0x1f, f64::from(h & 0x3ff));
            let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
            match exp {
                0 => assert_eq!(f64::from(f), sign * sig * 2f64.powi(-24), "{h:#06x}"),
                31 => assert!(if sig == 0.0 {
                    f.is_infinite()
                } else {
                    f.is_nan()
                }),
                _ => {
                    let want = sign * (1.0 + sig / 1024.0) * 2f64.powi(i32::from(exp) - 15);
                    assert_eq!(f64::from(f), want, "{h:#06x}");
                }
            }
            assert_eq!(f32_bits_to_f16_bits(f.to_bits()), h, "{h:#06x}");
        }
    }

    #[test]
    fn f32_to_f16_rounds_to_nearest_even() {
        let h = |x: f32| f32_bits_to_f16_bits(x.to_bits());
        let ulp1 = 2f32.powi(-10);
        assert_eq!(h(1.0 + ulp1 / 2.0), 0x3c00); // tie: down to even
        assert_eq!(h(1.0 + 1.5 * ulp1), 0x3c02); // tie: up to even
        assert_eq!(h(1.0 + ulp1 / 2.0 + 2f32.powi(-23)), 0x3c01);
        assert_eq!(h(65504.0), 0x7bff);
        assert_eq!(h(65519.996), 0x7bff);
        assert_eq!(h(65520.0), 0x7c00); // the tie above the largest finite goes to Inf
        assert_eq!(h(-1e10), 0xfc00);
        assert_eq!(h(2f32.powi(-25)), 0); // tie with zero: even
        assert_eq!(h(1.5 * 2f32.powi(-25)), 1);
        assert_eq!(h(2f32.powi(-25) * (1.0 + 2f32.powi(-20))), 1);
        assert_eq!(h(-0.0), 0x8000);
        assert_eq!(h(f32::from_bits(0x7f80_0001)), 0x7c01); // NaN stays NaN
        assert_eq!(h(f32::from_bits(0x7fc0_0000)), 0x7e00);
    }

    #[test]
    fn array_conversions_count_nonfinite_and_match_the_scalar_ones() {
        let n = PARALLEL_ELEMENTS + 12_345; // several threads
        let src: Vec<u16> = (0..n).map(|i| (i * 40_503 % 65_536) as u16).collect();
        let mut f = vec![0f32; n];
        let bad = f16_to_f32(&src, &mut f);
        let want = src.iter().filter(|&&x| x & 0x7c00 == 0x7c00).count();
        assert_eq!(bad, want);
        assert_eq!(f16_nonfinite(&src), want);
        let mut back = vec![0u16; n];
        f32_to_f16(&f, &mut back);
        assert_eq!(back, src);
        assert!(f
            .iter()
            .zip(&src)
            .all(|(x, h)| x.to_bits() == f16_bits_to_f32_bits(*h)));
    }
}
