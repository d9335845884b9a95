//! float16 <-> float32 conversions of whole arrays on the host, on several threads (with the
//! CPU's F16C instructions where it has them), bit for bit as NumPy converts (its software
//! routines: round to nearest even, NaN payloads kept, signalling ones too, and never turned
//! into Inf), so that routing a conversion through here changes no result.

use std::sync::OnceLock;

use crate::parallel::{map_chunks, threads_for, PARALLEL_ELEMENTS};

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
    let threads = threads_for(src.len(), PARALLEL_ELEMENTS);
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
    par_zip(src, dst, |s, d| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C (checked just above).
            return unsafe { f16_to_f32_f16c(s, d) };
        }
        f16_to_f32_table(s, d)
    })
}

fn f16_to_f32_table(src: &[u16], dst: &mut [f32]) -> usize {
    let table = f16_table();
    let mut nonfinite = 0;
    for (x, y) in src.iter().zip(dst.iter_mut()) {
        *y = table[usize::from(*x)];
        nonfinite += usize::from(*x & 0x7c00 == 0x7c00);
    }
    nonfinite
}

/// [`f16_to_f32_table`] eight at a time with the CPU's conversion (exact, as the table), except
/// for blocks holding a NaN or Inf: the CPU would quiet a signalling NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[u16], dst: &mut [f32]) -> usize {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_and_si128, _mm_cmpeq_epi16,
        _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi16,
    };
    let mut nonfinite = 0;
    let mut blocks = src.chunks_exact(8).zip(dst.chunks_exact_mut(8));
    for (s, d) in blocks.by_ref() {
        // SAFETY: `s` holds 8 halves and `d` 8 floats; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
            let exp = _mm_set1_epi16(0x7c00);
            let special = _mm_cmpeq_epi16(_mm_and_si128(h, exp), exp);
            if _mm_movemask_epi8(special) != 0 {
                nonfinite += f16_to_f32_table(s, d);
                continue;
            }
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    let rest = src.len() / 8 * 8;
    nonfinite + f16_to_f32_table(&src[rest..], &mut dst[rest..])
}

/// How many of the float16 bits `src` are NaN or Inf.
pub fn f16_nonfinite(src: &[u16]) -> usize {
    map_chunks(src, 1, |s| {
        s.iter().filter(|&&x| x & 0x7c00 == 0x7c00).count()
    })
    .into_iter()
    .map(|r| r.expect("a float16 check thread panicked"))
    .sum()
}

/// Writes the float16 bits nearest the float32 values `src` into `dst`.
pub fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
    par_zip(src, dst, |s, d| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C (checked just above).
            unsafe { f32_to_f16_f16c(s, d) };
            return 0;
        }
        f32_to_f16_scalar(s, d);
        0
    });
}

fn f32_to_f16_scalar(src: &[f32], dst: &mut [u16]) {
    for (x, y) in src.iter().zip(dst.iter_mut()) {
        *y = f32_bits_to_f16_bits(x.to_bits());
    }
}

/// [`f32_to_f16_scalar`] eight at a time with the CPU's conversion (round to nearest even, as
/// the scalar routine), except for blocks holding a NaN: the CPU would quiet a signalling one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::{
        __m128i, _mm256_cmp_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_movemask_ps,
        _mm_storeu_si128, _CMP_UNORD_Q, _MM_FROUND_TO_NEAREST_INT,
    };
    let mut blocks = src.chunks_exact(8).zip(dst.chunks_exact_mut(8));
    for (s, d) in blocks.by_ref() {
        // SAFETY: `s` holds 8 floats and `d` 8 halves; unaligned loads and stores.
        unsafe {
            let x = _mm256_loadu_ps(s.as_ptr());
            if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x)) != 0 {
                f32_to_f16_scalar(s, d);
                continue;
            }
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), h);
        }
    }
    let rest = src.len() / 8 * 8;
    f32_to_f16_scalar(&src[rest..], &mut dst[rest..]);
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
    fn array_conversion_matches_the_scalar_one_on_ties_nans_and_extremes() {
        // Blocks of 8 with and without NaN, ties at both ends of the range, a tail.
        let mut bits: Vec<u32> = (0..200_003u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        bits.extend([
            0x7f80_0001,
            0x7fa0_0000,
            0xff80_0001,
            0x3f80_1000,
            0x3f80_3000,
        ]);
        bits.extend([
            0x477f_f000,
            0x477f_efff,
            0x3300_0000,
            0x3380_0000,
            0x0000_0001,
        ]);
        let src: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut got = vec![0u16; src.len()];
        f32_to_f16(&src, &mut got);
        let want: Vec<u16> = bits.iter().map(|&b| f32_bits_to_f16_bits(b)).collect();
        assert_eq!(got, want);
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
