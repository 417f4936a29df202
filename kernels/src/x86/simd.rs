//! Loads, unpacking and reductions that the decode and panel kernels share. They need no more
//! than the AVX2 features, so they inline into the entry points of either level.

use super::{K_Q4_0, K_Q4_1, K_Q5_0};
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_ld(p: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Prefetches the cache lines of `len` bytes at `p` (no fault if out of range).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn prefetch(p: *const u8, len: usize) {
    let mut o = 0;
    while o < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
        o += 64;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn ld256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn ld128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

/// 16 packed nibbles -> 32 bytes: low nibbles then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles32(p: *const u8) -> __m256i {
    // same 16 bytes in both lanes, the upper lane shifted right by 4
    let v = _mm256_broadcastsi128_si256(ld128(p));
    let v = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4));
    _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
}

/// 32 bits -> 32 bytes, 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bits32(p: *const u8) -> __m256i {
    let qh = std::ptr::read_unaligned(p as *const u32);
    let v = _mm256_set1_epi32(qh as i32);
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let v = _mm256_shuffle_epi8(v, shuf);
    let bm = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(v, bm), bm)
}

/// Unsigned values only (d and m are not read by callers that gather them).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack32u_vals<const K: u8>(p: *const u8) -> (__m256i, f32, f32) {
    match K {
        K_Q4_0 => (nibbles32(p.add(2)), 0.0, 0.0),
        K_Q4_1 => (nibbles32(p.add(4)), 0.0, 0.0),
        K_Q5_0 => {
            let hb = bits32(p.add(2));
            (
                _mm256_or_si256(
                    nibbles32(p.add(6)),
                    _mm256_and_si256(hb, _mm256_set1_epi8(0x10)),
                ),
                0.0,
                0.0,
            )
        }
        _ => {
            let hb = bits32(p.add(4));
            (
                _mm256_or_si256(
                    nibbles32(p.add(8)),
                    _mm256_and_si256(hb, _mm256_set1_epi8(0x10)),
                ),
                0.0,
                0.0,
            )
        }
    }
}

/// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K super-block (12 bytes at `s`) as two
/// little-endian byte arrays, unpacked with a few 32-bit operations (for every block of every
/// row, so not byte by byte).
#[inline]
pub(super) unsafe fn scale_min_bytes_k4(s: *const u8) -> (u64, u64) {
    let u = |i: usize| std::ptr::read_unaligned(s.add(4 * i) as *const u32);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let (low6, low4, top2) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
    // scales 0..3 and mins 0..3 are the low 6 bits of bytes 0..3 and 4..7; scales and mins
    // 4..7 are the nibbles of bytes 8..11 with the top 2 bits of bytes 0..3 / 4..7 above them
    let sc_hi = (u2 & low4) | (((u0 >> 6) & top2) << 4);
    let mn_hi = ((u2 >> 4) & low4) | (((u1 >> 6) & top2) << 4);
    (
        (u0 & low6) as u64 | (sc_hi as u64) << 32,
        (u1 & low6) as u64 | (mn_hi as u64) << 32,
    )
}
