//! The format in which the exact kernel's inputs sit in storage buffers: f32, or f16 packed two
//! to a u32 word and unpacked with `unpack2x16float` (core WGSL; no `shader-f16` feature, only
//! wgpu's downlevel SHADER_F16_IN_F32, which GL has and Mesa's Vulkan drivers lack without shader
//! f16: `DeviceInfo::f16_storage`). Accumulation and the softmax stay f32 either way; f16 storage
//! halves the words uploaded and read. Here: the packing, the words a row takes, and the bound on
//! what rounding f32 inputs to f16 does to the output.

use std::borrow::Cow;

use crate::api::Problem;
use crate::error::Error;
use crate::numerics::{row_norm_and_max, value_columns};
use crate::transfer::copy_threads;

/// Unit roundoff of f16 (2^-11) and half the spacing of its subnormals (2^-25): the largest
/// absolute rounding error of a value below f16's smallest normal.
const F16_U: f64 = 1.0 / 2048.0;
const F16_ETA: f64 = 1.0 / 33_554_432.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Storage {
    #[default]
    F32,
    /// f16, two per u32 word, the lower half first; each row padded to whole words.
    F16,
}

impl Storage {
    /// The NumPy dtype name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "float32",
            Storage::F16 => "float16",
        }
    }

    /// Unit roundoff u of the format: rounding to it moves x by at most u |x| (normal range).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Storage::F32 => 1.0 / 16_777_216.0,
            Storage::F16 => F16_U,
        }
    }

    /// Words (4 bytes) a row of `width` elements takes in storage.
    pub fn row_words(self, width: usize) -> usize {
        match self {
            Storage::F32 => width,
            Storage::F16 => width.div_ceil(2),
        }
    }
}

/// Q, K and V as the f16 kernel reads them: rows packed by [`pack_f16_rows`], borrowed from the
/// caller's bits where those already are the packed words.
pub struct F16Inputs<'a> {
    pub q: Cow<'a, [u32]>,
    pub k: Cow<'a, [u32]>,
    pub v: Cow<'a, [u32]>,
    /// Whether these are float32 inputs rounded to f16 (then the report bounds what that
    /// rounding does); false where the inputs were float16.
    pub rounded: bool,
}

impl<'a> F16Inputs<'a> {
    /// Packs the f16 bits of Q, K and V (laid out as in [`Problem`]), checking their lengths.
    pub fn pack(
        p: &Problem,
        (q, k, v): (&'a [u16], &'a [u16], &'a [u16]),
        rounded: bool,
    ) -> Result<F16Inputs<'a>, Error> {
        let want = [
            ("query", q.len(), p.units * p.group * p.l * p.e),
            ("key", k.len(), p.units * p.s * p.e),
            ("value", v.len(), p.units * p.s * p.ev),
        ];
        for (name, got, expect) in want {
            if got != expect {
                return Err(Error::InvalidInput(format!(
                    "float16 {name} has {got} elements, the problem {p:?} needs {expect}"
                )));
            }
        }
        Ok(F16Inputs {
            q: packed_rows(q, p.e),
            k: packed_rows(k, p.e),
            v: packed_rows(v, p.ev),
            rounded,
        })
    }
}

/// [`pack_f16_rows`] without the copy where it would change no bit: rows of even width on a
/// little-endian host are their own packing (the lower half first), if 4-byte aligned.
fn packed_rows(halves: &[u16], width: usize) -> Cow<'_, [u32]> {
    if cfg!(target_endian = "little") && width % 2 == 0 {
        if let Ok(words) = bytemuck::try_cast_slice::<u16, u32>(halves) {
            return Cow::Borrowed(words);
        }
    }
    Cow::Owned(pack_f16_rows(halves, width))
}

/// Rows of `width` f16 values (their bits) packed two to a u32 word, the lower half first, each
/// row padded with a zero half to whole words where `width` is odd; large inputs on several
/// threads, whole rows each.
pub fn pack_f16_rows(halves: &[u16], width: usize) -> Vec<u32> {
    let width = width.max(1);
    let words = Storage::F16.row_words(width);
    let rows = halves.len() / width;
    let mut out = vec![0u32; rows * words];
    let threads = copy_threads(halves.len() * 2);
    let rows_per = rows.div_ceil(threads).max(1);
    let pack = |src: &[u16], dst: &mut [u32]| {
        for (row, dst) in src.chunks(width).zip(dst.chunks_mut(words)) {
            let mut pairs = row.chunks_exact(2);
            for (d, p) in dst.iter_mut().zip(pairs.by_ref()) {
                *d = u32::from(p[0]) | (u32::from(p[1]) << 16);
            }
            if let [last] = pairs.remainder() {
                dst[words - 1] = u32::from(*last);
            }
        }
    };
    if threads == 1 {
        pack(halves, &mut out);
        return out;
    }
    std::thread::scope(|scope| {
        for (src, dst) in halves
            .chunks(rows_per * width)
            .zip(out.chunks_mut(rows_per * words))
        {
            scope.spawn(move || pack(src, dst));
        }
    });
    out
}

/// Bound on max |O - O*| over the output (per column, the largest over the KV units) that
/// rounding these f32 inputs to f16 adds, for exact attention in exact arithmetic.
///
/// Each element moves by at most u|x| + eta (u = 2^-11, eta = 2^-25 below f16's normal range).
/// For a query q and key k, with dq, dk those moves, |q'.k' - q.k| <= |dq.k| + |q.dk| + |dq.dk|
/// and, by Cauchy-Schwarz (sum |x_i| <= sqrt(E) |x|), the score scale q.k moves by at most
///   delta = |scale| ((2u + u^2) |q||k| + eta sqrt(E) (1 + u) (|q| + |k|) + E eta^2)
/// at the largest row norms |q|, |k| of the call. Each unnormalised weight exp(s_j) is then off
/// by a factor within e^(+-delta), i.e. within [1 - eps, 1 + eps] for eps = e^delta - 1, which
/// moves the output by at most eps/(1 - eps) times the value column's range (DESIGN.md, the
/// poly certificate's argument); the rounding of V adds u max|v_c| + eta. Per column c:
///   |O_c - O*_c| <= eps/(1 - eps) range_c + u max|v_c| + eta.
pub fn f16_input_rounding(p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
    let (u, eta, e) = (F16_U, F16_ETA, p.e as f64);
    let (qn, _) = row_norm_and_max(q, p.e);
    let (kn, _) = row_norm_and_max(k, p.e);
    let delta = f64::from(p.scale.abs())
        * ((2.0 * u + u * u) * qn * kn + eta * e.sqrt() * (1.0 + u) * (qn + kn) + e * eta * eta);
    let eps = delta.exp_m1();
    let cols = value_columns(p, v);
    (0..p.ev)
        .map(|col| {
            (0..p.units)
                .map(|unit| {
                    let i = unit * p.ev + col;
                    let range = (cols.max[i] - cols.min[i]).max(0.0);
                    eps / (1.0 - eps) * range + u * cols.abs_max[i] + eta
                })
                .fold(0f64, f64::max)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_pack_two_halves_a_word_low_half_first_odd_rows_padded() {
        assert_eq!(
            pack_f16_rows(&[1, 2, 3, 4], 4),
            vec![1 | 2 << 16, 3 | 4 << 16]
        );
        // Width 3: each row gets a zero half.
        assert_eq!(
            pack_f16_rows(&[1, 2, 3, 4, 5, 6], 3),
            vec![1 | 2 << 16, 3, 4 | 5 << 16, 6]
        );
        assert_eq!(pack_f16_rows(&[7, 8], 1), vec![7, 8]);
        assert_eq!(Storage::F16.row_words(3), 2);
        assert_eq!(Storage::F16.row_words(64), 32);
        assert_eq!(Storage::F32.row_words(3), 3);
    }

    #[test]
    fn even_rows_are_read_in_place_others_packed_on_threads_alike() {
        // One row at a time, one word at a time.
        fn serial(rows: &[u16], width: usize) -> Vec<u32> {
            let word = |p: &[u16]| u32::from(p[0]) | p.get(1).map_or(0, |&h| u32::from(h) << 16);
            rows.chunks(width)
                .flat_map(|r| r.chunks(2).map(word))
                .collect()
        }
        // Over the threshold of copy_threads: several threads, whole rows each.
        let n: usize = (32 << 20) / 2 + 3 * 1000;
        let halves: Vec<u16> = (0..n).map(|i| (i * 7919 % 65_521) as u16).collect();
        for width in [3, 64] {
            let rows = &halves[..n / width * width];
            let want = serial(rows, width);
            assert_eq!(pack_f16_rows(rows, width), want, "width {width}");
            let packed = packed_rows(rows, width);
            assert_eq!(&packed[..], &want[..], "width {width}");
            // In place for even rows at a 4-byte address (a Vec<u16>'s is, on every allocator
            // of a 64-bit host), copied otherwise.
            let in_place = matches!(packed, Cow::Borrowed(_));
            assert_eq!(in_place, width % 2 == 0 && cfg!(target_endian = "little"));
            let shifted = &rows[1..=rows.len() - width]; // whole rows at an odd address
            let odd = packed_rows(shifted, width);
            assert!(matches!(odd, Cow::Owned(_)));
            assert_eq!(&odd[..], &serial(shifted, width)[..], "width {width}");
        }
    }

    #[test]
    fn input_rounding_is_about_two_u_scale_qk_times_the_range() {
        let p = Problem {
            units: 1,
            group: 1,
            l: 2,
            s: 2,
            e: 4,
            ev: 1,
            causal: false,
            scale: 0.5,
        };
        // |q| = |k| = 2: delta about 0.5 * 2u * 4 = 4u; range 2, |v| <= 1.
        let q = vec![1.0f32; 8];
        let v = [-1.0f32, 1.0];
        let b = f16_input_rounding(&p, &q, &q, &v);
        let want = 4.0 * F16_U * 2.0 + F16_U;
        assert!((b[0] / want - 1.0).abs() < 0.01, "{b:?} {want}");
    }
}
