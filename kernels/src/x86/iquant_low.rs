//! The grid i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) in the GGUF layout,
//! for every token count.
//!
//! A super-block of one row is read once per chunk of tokens: the grid entries its indices
//! select ([`grid_groups`], the scalar reference's reading) become, per 32 values, a vector of
//! magnitudes and one of signs; each token's activations take the signs (`sign_epi8`), meet
//! the magnitudes in `maddubs` and the 16-value scales `2 ls + 1` in `madd`. The integer sum of
//! a block is exactly the scalar reference's, and it is scaled and added in the same order, so
//! the results are the reference's bits for any number of tokens. The levels share this code:
//! a scale per 16 values leaves nothing for VNNI's 4-product sums to save.

use super::Operands;
use crate::dequant::{grid_groups, grid_iquant_factor};
use crate::layout::{BlockQ8K, QuantType};
use std::arch::x86_64::*;

/// Tokens whose activations one pass over the rows reads (their running sums stay on the stack).
const TOKENS_PER_PASS: usize = 32;

/// A super-block of one row, per 32 values: the magnitudes (unsigned bytes), the signs for the
/// activations (bytes of 1 or -1, or any non-zero value of the wanted sign), and the scales of
/// its two 16s as i16 lanes (the first eight lanes: the first 16 values' scale).
struct GridRow {
    mag: [__m256i; 8],
    sign: [__m256i; 8],
    scale: [__m256i; 8],
    d: f32,
}

/// The grid i-quant a kernel instance reads, by ggml id.
#[inline(always)]
fn grid_type(id: u8) -> QuantType {
    match id {
        16 => QuantType::IQ2XXS,
        17 => QuantType::IQ2XS,
        18 => QuantType::IQ3XXS,
        19 => QuantType::IQ1S,
        21 => QuantType::IQ3S,
        22 => QuantType::IQ2S,
        _ => QuantType::IQ1M,
    }
}

/// Reads the super-block at `b` of a row of `ty`.
#[inline(always)]
unsafe fn grid_row(ty: QuantType, b: &[u8]) -> GridRow {
    let g = grid_groups(ty, b);
    let iq1 = matches!(ty, QuantType::IQ1S | QuantType::IQ1M);
    // byte k of 32 takes group byte k / 8 of the four broadcast ones
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let one = _mm256_set1_epi8(1);
    let mut r = GridRow {
        mag: [_mm256_setzero_si256(); 8],
        sign: [_mm256_setzero_si256(); 8],
        scale: [_mm256_setzero_si256(); 8],
        d: g.d,
    };
    for j in 0..8 {
        let grid = _mm256_loadu_si256(g.grid.as_ptr().add(4 * j) as *const __m256i);
        let s = u32::from_le_bytes([
            g.signs[4 * j],
            g.signs[4 * j + 1],
            g.signs[4 * j + 2],
            g.signs[4 * j + 3],
        ]);
        let s = _mm256_shuffle_epi8(_mm256_set1_epi32(s as i32), spread);
        if iq1 {
            // eight times the grid value (-1, 0, 1) plus the offset, 1 or -1: odd, so never 0
            let offset = _mm256_sub_epi8(one, _mm256_add_epi8(s, s));
            let q = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), grid), offset);
            r.mag[j] = _mm256_abs_epi8(q);
            r.sign[j] = q;
        } else {
            let negative = _mm256_cmpeq_epi8(_mm256_and_si256(s, bit), bit);
            r.mag[j] = grid;
            r.sign[j] = _mm256_or_si256(negative, one);
        }
        let m = |k: usize| _mm_set1_epi16(2 * g.ls[k] as i16 + 1);
        r.scale[j] = _mm256_set_m128i(m(2 * j + 1), m(2 * j));
    }
    r
}

/// The integer sum of a super-block with a token's activations: `sum (2 ls + 1) q x`.
#[inline(always)]
unsafe fn row_token(r: &GridRow, x: &BlockQ8K) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for j in 0..8 {
        let xv = _mm256_loadu_si256(x.qs.as_ptr().add(32 * j) as *const __m256i);
        // |magnitude x 2 x 127| <= 62 * 254 < 2^15: maddubs does not saturate
        let p = _mm256_maddubs_epi16(r.mag[j], _mm256_sign_epi8(xv, r.sign[j]));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, r.scale[j]));
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256::<1>(acc),
    );
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
    _mm_cvtsi128_si32(s)
}

/// All rows and tokens of `o`, weights of the grid i-quant with ggml id `ID` (GGUF layout).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm_grid<const ID: u8>(o: Operands<BlockQ8K>) {
    let Operands {
        w,
        rb,
        nrows,
        a,
        astride,
        nb,
        ntok,
        y,
        ystride,
    } = o;
    let ty = grid_type(ID);
    let bb = ty.block_bytes();
    let factor = grid_iquant_factor(ty);
    let mut sums = [0f32; TOKENS_PER_PASS];
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + TOKENS_PER_PASS).min(ntok);
        for r in 0..nrows {
            let row = w.add(r * rb);
            sums.fill(0.0);
            for b in 0..nb {
                let block = grid_row(ty, std::slice::from_raw_parts(row.add(b * bb), bb));
                let d = block.d * factor;
                for (t, sum) in (tc..te).zip(sums.iter_mut()) {
                    let ab = &*a.add(t * astride + b);
                    // the scalar reference's float steps, in its order
                    *sum += ab.d * d * row_token(&block, ab) as f32;
                }
            }
            for (t, sum) in (tc..te).zip(&sums) {
                *y.add(t * ystride + r) = *sum;
            }
        }
        tc = te;
    }
}
