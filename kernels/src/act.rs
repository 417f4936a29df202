//! Quantization of f32 activations into Q8 blocks (32 elements) and Q8_K blocks
//! (256 elements). Scalar and AVX2 versions produce bit-identical results
//! (round-half-to-even of `x * (1/d)` with `d = amax / 127`).

/// 32 activations quantized to i8: `x ~= d * qs`, `s = d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

impl Default for BlockQ8 {
    fn default() -> Self {
        BlockQ8 {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        }
    }
}

/// 256 activations quantized to i8: `x ~= d * qs`; `bsums[g]` = sum of `qs[16g..16g+16]`.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(8))]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; 256],
            bsums: [0; 16],
        }
    }
}

#[inline(always)]
fn scale_of(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

#[inline(always)]
fn q(x: f32, id: f32) -> i8 {
    (x * id).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Scalar: quantizes `x` (a multiple of 32 long) into `out`.
pub fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * 32);
    for (xb, ob) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = scale_of(amax);
        let mut sum = 0i32;
        for (o, &v) in ob.qs.iter_mut().zip(xb) {
            *o = q(v, id);
            sum += *o as i32;
        }
        ob.d = d;
        ob.s = d * sum as f32;
    }
}

/// Scalar: quantizes `x` (a multiple of 256 long) into `out`.
pub fn quantize_q8k_scalar(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * 256);
    for (xb, ob) in x.chunks_exact(256).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = scale_of(amax);
        for (o, &v) in ob.qs.iter_mut().zip(xb) {
            *o = q(v, id);
        }
        for g in 0..16 {
            ob.bsums[g] = ob.qs[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum();
        }
        ob.d = d;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{scale_of, BlockQ8, BlockQ8K};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn amax8(v: __m256) -> __m256 {
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Quantizes 32 floats at `x` with inverse scale `id`; returns packed i8 and
    /// the four i32 vectors (for sums).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q32(x: *const f32, id: __m256, dst: *mut i8) -> [__m256i; 4] {
        let lim = _mm256_set1_ps(127.0);
        let nlim = _mm256_set1_ps(-127.0);
        let mut i = [_mm256_setzero_si256(); 4];
        for (k, iv) in i.iter_mut().enumerate() {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.add(8 * k)), id);
            let v = _mm256_min_ps(_mm256_max_ps(v, nlim), lim);
            *iv = _mm256_cvtps_epi32(v);
        }
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst as *mut __m256i, p);
        i
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
        assert_eq!(x.len(), out.len() * 32);
        for (b, ob) in out.iter_mut().enumerate() {
            let p = x.as_ptr().add(32 * b);
            let mut m = amax8(_mm256_loadu_ps(p));
            for k in 1..4 {
                m = _mm256_max_ps(m, amax8(_mm256_loadu_ps(p.add(8 * k))));
            }
            let (d, id) = scale_of(hmax(m));
            let i = q32(p, _mm256_set1_ps(id), ob.qs.as_mut_ptr());
            let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            ob.d = d;
            ob.s = d * hsum_i32(s) as f32;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
        assert_eq!(x.len(), out.len() * 256);
        for (b, ob) in out.iter_mut().enumerate() {
            let p = x.as_ptr().add(256 * b);
            let mut m = amax8(_mm256_loadu_ps(p));
            for k in 1..32 {
                m = _mm256_max_ps(m, amax8(_mm256_loadu_ps(p.add(8 * k))));
            }
            let (d, id) = scale_of(hmax(m));
            let idv = _mm256_set1_ps(id);
            for k in 0..8 {
                let i = q32(p.add(32 * k), idv, ob.qs.as_mut_ptr().add(32 * k));
                ob.bsums[2 * k] = hsum_i32(_mm256_add_epi32(i[0], i[1])) as i16;
                ob.bsums[2 * k + 1] = hsum_i32(_mm256_add_epi32(i[2], i[3])) as i16;
            }
            ob.d = d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        let mut s = 12345u32;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                let v = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                // include exact ties, zeros and a zero block
                if i % 97 == 0 || (256..288).contains(&i) {
                    0.0
                } else {
                    v * if i % 31 == 0 { 10.0 } else { 1.0 }
                }
            })
            .collect()
    }

    #[test]
    fn simd_quantization_is_bit_identical() {
        #[cfg(target_arch = "x86_64")]
        if crate::Backend::Avx2.is_available() {
            let x = data(1024);
            let mut a = vec![BlockQ8::default(); 32];
            let mut b = vec![BlockQ8::default(); 32];
            quantize_q8_scalar(&x, &mut a);
            unsafe { avx2::quantize_q8(&x, &mut b) };
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.qs, q.qs);
                assert_eq!(p.d.to_bits(), q.d.to_bits());
                assert_eq!(p.s.to_bits(), q.s.to_bits());
            }
            let mut a = vec![BlockQ8K::default(); 4];
            let mut b = vec![BlockQ8K::default(); 4];
            quantize_q8k_scalar(&x, &mut a);
            unsafe { avx2::quantize_q8k(&x, &mut b) };
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.qs, q.qs);
                assert_eq!(p.bsums, q.bsums);
                assert_eq!(p.d.to_bits(), q.d.to_bits());
            }
        }
    }

    #[test]
    fn quantization_error_is_bounded() {
        let x = data(256);
        let mut a = vec![BlockQ8::default(); 8];
        quantize_q8_scalar(&x, &mut a);
        for (xb, ab) in x.chunks(32).zip(&a) {
            for (v, q) in xb.iter().zip(&ab.qs) {
                assert!((v - ab.d * *q as f32).abs() <= ab.d * 0.5 + 1e-7);
            }
        }
    }
}
