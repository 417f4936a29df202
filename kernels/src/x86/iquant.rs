//! The i-quants with 4-bit indices (IQ4_NL, IQ4_XS) in the rows4 layout: each index becomes
//! its signed grid value by one in-lane byte shuffle of [`IQ4NL_VALUES`], after which a
//! group-block is a Q8_0 one to the 32-element kernels (`panel.rs`: the sign trick, no offset
//! term). IQ4_XS's sub-block scale is `d * scale`, computed here in f32 for each sub-block.

use super::panel::PanelBlock;
use super::simd::{ld128, ld256, prefetch};
use crate::layout::{IQ4NL_VALUES, IQ4XS_D, IQ4XS_GROUP_BYTES, IQ4XS_SCALES, IQ4XS_SUB_BYTES};
use std::arch::x86_64::*;

/// IQ4_NL group-block `b` of the rows4 rows at `w` (layout.rs), prefetching `pf` bytes ahead
/// (0: none).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_rows4_iq4nl(w: *const u8, b: usize, pf: usize) -> PanelBlock {
    let p = w.add(72 * b);
    if pf != 0 {
        prefetch(p.wrapping_add(pf), 72);
    }
    signed_steps(p, d_lanes(p.add(64)))
}

/// Sub-block `b` (of 32 values) of the IQ4_XS rows4 rows at `w`, prefetching `pf` bytes ahead
/// (0: none).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_rows4_iq4xs(w: *const u8, b: usize, pf: usize) -> PanelBlock {
    let g = w.add(b / 8 * IQ4XS_GROUP_BYTES);
    let p = g.add(b % 8 * IQ4XS_SUB_BYTES);
    if pf != 0 {
        prefetch(p.wrapping_add(pf), IQ4XS_SUB_BYTES);
        if b % 8 == 7 {
            prefetch(g.add(IQ4XS_D).wrapping_add(pf), 8);
        }
    }
    let sc = _mm_cvtsi32_si128(std::ptr::read_unaligned(p.add(IQ4XS_SCALES) as *const i32));
    let sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpacklo_epi8(sc, sc)));
    // exact: an f16 significand times a 6-bit integer fits in an f32's
    signed_steps(p, _mm256_mul_ps(d_lanes(g.add(IQ4XS_D)), sc))
}

/// The four rows' f16 d at `p` in lanes [d0 d0 d1 d1 d2 d2 d3 d3], as the accumulators hold
/// the rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn d_lanes(p: *const u8) -> __m256 {
    let bits = _mm_loadl_epi64(p as *const __m128i);
    _mm256_cvtph_ps(_mm_unpacklo_epi16(bits, bits))
}

/// The 64 bytes of rows4 nibbles at `p` as signed steps (and their magnitudes), scaled by `d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signed_steps(p: *const u8, d: __m256) -> PanelBlock {
    let grid = _mm256_broadcastsi128_si256(ld128(IQ4NL_VALUES.as_ptr() as *const u8));
    let m4 = _mm256_set1_epi8(0x0f);
    let (v0, v1) = (ld256(p), ld256(p.add(32)));
    let value = |nibbles: __m256i| _mm256_shuffle_epi8(grid, _mm256_and_si256(nibbles, m4));
    let s = [
        value(v0),
        value(_mm256_srli_epi16::<4>(v0)),
        value(v1),
        value(_mm256_srli_epi16::<4>(v1)),
    ];
    PanelBlock {
        w: s.map(|v| _mm256_sign_epi8(v, v)),
        s,
        d,
        m: _mm256_setzero_ps(),
    }
}
