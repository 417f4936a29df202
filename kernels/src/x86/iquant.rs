//! The i-quants with 4-bit indices (IQ4_NL, IQ4_XS) in the rows4 layout: each index becomes
//! its signed grid value by one in-lane byte shuffle of [`IQ4NL_VALUES`], after which a group-block
//! is a Q8_0 one to the 32-element kernels (`panel.rs`: the sign trick, no offset term).
//! IQ4_XS's sub-block scale is `d * scale`, computed here in f32 for each group-block.

use super::panel::PanelBlock;
use super::simd::{ld128, ld256, prefetch};
use crate::layout::{IQ4NL_VALUES, IQ4XS_GROUP_BYTES, IQ4XS_SCALES};
use std::arch::x86_64::*;

/// One IQ4_NL (`XS` false, 72 bytes) or IQ4_XS (`XS` true, 76 bytes) rows4 group-block at `p`
/// (layout.rs), prefetching `pf` bytes ahead (0: none).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_rows4_iq4<const XS: bool>(p: *const u8, pf: usize) -> PanelBlock {
    let bb = if XS { IQ4XS_GROUP_BYTES } else { 72 };
    if pf != 0 {
        prefetch(p.wrapping_add(pf), bb);
    }
    // lanes [d0 d0 d1 d1 d2 d2 d3 d3], as the accumulators hold the rows
    let dbits = _mm_loadl_epi64(p.add(bb - 8) as *const __m128i);
    let mut d = _mm256_cvtph_ps(_mm_unpacklo_epi16(dbits, dbits));
    if XS {
        let sc = _mm_cvtsi32_si128(std::ptr::read_unaligned(p.add(IQ4XS_SCALES) as *const i32));
        let sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpacklo_epi8(sc, sc)));
        // exact: an f16 significand times a 6-bit integer fits in an f32's
        d = _mm256_mul_ps(d, sc);
    }
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
