//! The rows4 packer of Q4_0, Q5_0 and Q8_0 with AVX2: each block group goes through the panel
//! kernels' own unpacking into steps, which is most of the work of packing.

use super::panel::{unpack_block, PR};
use super::{q32_block_bytes, K_Q4_0, K_Q5_0, K_Q8_0};
use crate::layout::QuantType;
use std::arch::x86_64::*;

/// Groups of four GGUF rows of `ty` (Q4_0, Q5_0, Q8_0 or IQ4_NL; `rb` bytes per row) in `src` as
/// rows4 groups in `dst` (see [`crate::layout`]).
///
/// # Safety
/// Requires AVX2, FMA and F16C.
pub(crate) unsafe fn pack_rows4(ty: QuantType, rb: usize, src: &[u8], dst: &mut [u8]) {
    assert!(src.len() == dst.len() && src.len().is_multiple_of(4 * rb));
    let nb = rb / ty.block_bytes();
    for (s, d) in src.chunks_exact(4 * rb).zip(dst.chunks_exact_mut(4 * rb)) {
        let (s, d) = (s.as_ptr(), d.as_mut_ptr());
        match ty {
            // IQ4_NL blocks have Q4_0's bytes
            QuantType::Q4_0 | QuantType::IQ4NL => pack_group_blocks::<K_Q4_0>(s, rb, nb, d),
            QuantType::Q5_0 => pack_group_blocks::<K_Q5_0>(s, rb, nb, d),
            QuantType::Q8_0 => pack_group_blocks::<K_Q8_0>(s, rb, nb, d),
            _ => unreachable!("no rows4 form for {ty}"),
        }
    }
}

/// The inverse of the panel's rows4 unpacking (`panel::unpack_rows4`): `nb` blocks of four GGUF
/// rows at `src` (row stride `rb`) as rows4 group-blocks at `dst`, the same bytes as the scalar
/// packer writes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_group_blocks<const K: u8>(src: *const u8, rb: usize, nb: usize, dst: *mut u8) {
    let bb = q32_block_bytes(K);
    let gb = 4 * bb;
    let m4 = _mm256_set1_epi8(0x0f);
    let b4 = _mm256_set1_epi8(0x10);
    for b in 0..nb {
        let (p, g) = (src.add(b * bb), dst.add(b * gb));
        let u = unpack_block::<K>(src, b, rb, PR, 0);
        for r in 0..PR {
            std::ptr::copy_nonoverlapping(p.add(r * rb), g.add(gb - 8 + 2 * r), 2);
        }
        let st = |o: usize, v: __m256i| _mm256_storeu_si256(g.add(o) as *mut __m256i, v);
        if K == K_Q8_0 {
            for k in 0..4 {
                st(32 * k, u.s[k]);
            }
            continue;
        }
        let nib = |lo: __m256i, hi: __m256i| {
            _mm256_or_si256(
                _mm256_and_si256(lo, m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(hi, m4)),
            )
        };
        st(0, nib(u.w[0], u.w[1]));
        st(32, nib(u.w[2], u.w[3]));
        if K == K_Q5_0 {
            let hb = |k: usize| _mm256_and_si256(u.w[k], b4);
            let h = _mm256_or_si256(
                _mm256_or_si256(
                    _mm256_srlv_epi64(hb(0), _mm256_setr_epi64x(4, 4, 3, 3)),
                    _mm256_srlv_epi64(hb(1), _mm256_setr_epi64x(2, 2, 1, 1)),
                ),
                _mm256_or_si256(
                    _mm256_sllv_epi64(hb(2), _mm256_setr_epi64x(0, 0, 3, 3)),
                    _mm256_sllv_epi64(hb(3), _mm256_setr_epi64x(1, 1, 2, 2)),
                ),
            );
            let h = _mm_or_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
            _mm_storeu_si128(g.add(64) as *mut __m128i, h);
        }
    }
}
