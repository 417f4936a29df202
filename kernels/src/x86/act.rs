//! Activation quantization into Q8 and Q8_K blocks with AVX2: the same rounding as the scalar
//! reference (round-half-to-even of `x * (1/d)`, `cvtps` in the default rounding mode, with the
//! scale from [`q8_scale`]), so the blocks are bit-identical.

use crate::layout::{q8_scale, BlockQ8, BlockQ8K};
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
        let (d, id) = q8_scale(hmax(m));
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
        let (d, id) = q8_scale(hmax(m));
        let idv = _mm256_set1_ps(id);
        for k in 0..8 {
            let i = q32(p.add(32 * k), idv, ob.qs.as_mut_ptr().add(32 * k));
            ob.bsums[2 * k] = hsum_i32(_mm256_add_epi32(i[0], i[1])) as i16;
            ob.bsums[2 * k + 1] = hsum_i32(_mm256_add_epi32(i[2], i[3])) as i16;
        }
        ob.d = d;
    }
}
