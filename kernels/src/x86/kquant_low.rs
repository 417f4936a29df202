//! Q2_K and Q3_K in the GGUF layout, for every token count (decode, batches, prefill).
//!
//! Each super-block of four rows is transposed in registers into the panel kernels' steps
//! (layout.rs) while it is still packed: a sub-block's 2-bit fields (and Q3_K's high bits) sit at
//! the same byte positions for every sub-block, only at another bit, so one transpose of the
//! packed bytes serves four sub-blocks (Q3_K's high bits: all eight), and each sub-block's steps
//! are then a shift and a mask away. The tokens meet them through the K-quant panel arithmetic
//! in Q6_K's form, a scale per 16 values (`k_sub_block`, `k_block_token`). A token gets the same
//! operations whatever the number of tokens of the call, so its bits do not depend on them.
//!
//! * Q2_K: values 0..3 with a 4-bit scale and a 4-bit min per 16 values,
//!   `d * scale * q - dmin * min`; the mins go through the activation's bsums, as Q4_K's do.
//! * Q3_K: values -4..3 (two low bits, one high bit) with a signed 6-bit scale per 16 values. The
//!   kernel takes them as unsigned 0..7 times 8, with Q6_K's -32 offset and d / 8: Q6_K's
//!   arithmetic on eight times the integers, which scaling by a power of two keeps exact, so Q3_K
//!   needs no float step of its own.

#![allow(clippy::needless_range_loop)]

use super::isa::Isa;
use super::pairs::{doubled, k_sub_block_pair, split, Interleaved, PAIR_BLOCK};
use super::panel::{
    finish, k_block_token, k_sub_block, spread_i8, steps4, tile_width, token_tiles, PR, PT_MAX,
    Q6K_MINS_SPREAD, Q6K_SCALE_SPREAD,
};
use super::simd::{ld128, ld256, prefetch};
use super::Operands;
use crate::layout::BlockQ8K;
use std::arch::x86_64::*;
use std::mem::size_of;

/// Bytes of a Q2_K and of a Q3_K super-block.
const Q2K_BYTES: usize = 84;
const Q3K_BYTES: usize = 110;

/// The block that stands in for the missing rows of a last group of fewer than four: d = 0, so
/// its products are zero (and never stored).
static ZERO_BLOCK: [u8; Q3K_BYTES] = [0; Q3K_BYTES];

/// One super-block of four rows, transposed and partly unpacked (see the module docs).
struct LowBlock {
    /// The packed 2-bit fields of sub-blocks `4n..4n + 4` as steps: sub-block `4n + k` is bits
    /// `2k, 2k + 1` of `low[n]`.
    low: [[__m256i; 4]; 2],
    /// Q3_K: the high bits as steps (sub-block `j`'s at bit `j`).
    high: [__m256i; 4],
    /// Groups `8h..8h + 8` of every row as bytes (Q2_K: scales 0..15; Q3_K: -32..31), rows 0
    /// and 1 in the lower 128-bit half, 2 and 3 in the upper, each row's eight bytes in turn.
    scales: [__m256i; 2],
    /// The factors of the activation's 16 bsums in the same layout: Q2_K's mins, Q3_K's scales.
    factors: [__m256i; 2],
    /// [d0 d0 d1 d1 d2 d2 d3 d3] (Q3_K: d / 8) and the same of dmin (Q2_K).
    d8: __m256,
    dmin8: __m256,
}

/// Four rows' 16 bytes (one per group) as [`LowBlock::scales`]' two vectors.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_bytes(r: [__m128i; PR]) -> [__m256i; 2] {
    [
        _mm256_set_m128i(
            _mm_unpacklo_epi64(r[2], r[3]),
            _mm_unpacklo_epi64(r[0], r[1]),
        ),
        _mm256_set_m128i(
            _mm_unpackhi_epi64(r[2], r[3]),
            _mm_unpackhi_epi64(r[0], r[1]),
        ),
    ]
}

/// Four rows' f16 at offset `o` of their blocks as [v0 v0 v1 v1 v2 v2 v3 v3].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_pairs(p: &[*const u8; PR], o: usize) -> __m256 {
    let h = |r: usize| std::ptr::read_unaligned(p[r].add(o) as *const i16);
    let x = _mm_setr_epi16(h(0), h(1), h(2), h(3), 0, 0, 0, 0);
    _mm256_cvtph_ps(_mm_unpacklo_epi16(x, x))
}

/// The 16 scales of a Q3_K block (12 bytes at `s`: the low four bits in bytes 0..8, scales 0..8
/// in the low nibbles and 8..16 in the high ones; the top two bits in bytes 8..12, scale `i` at
/// bits `2 (i / 4)` of byte `8 + i % 4`), less their offset 32, as i8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3k_scales(s: *const u8) -> __m128i {
    // 12 bytes read as 8 and 4: 16 would reach past the last block of a matrix
    let top = std::ptr::read_unaligned(s.add(8) as *const i32);
    let x = _mm_insert_epi32::<2>(_mm_loadl_epi64(s as *const __m128i), top);
    let m4 = _mm_set1_epi8(0x0f);
    let low = _mm_unpacklo_epi64(
        _mm_and_si128(x, m4),
        _mm_and_si128(_mm_srli_epi16::<4>(x), m4),
    );
    // bytes 8..12 in every dword, dword q shifted right by 2q
    let t = _mm_srlv_epi32(_mm_shuffle_epi32::<0xaa>(x), _mm_setr_epi32(0, 2, 4, 6));
    let high = _mm_slli_epi32::<4>(_mm_and_si128(t, _mm_set1_epi8(3)));
    _mm_sub_epi8(_mm_or_si128(low, high), _mm_set1_epi8(32))
}

/// The super-block of four rows whose blocks are at `p` (Q3 false: Q2_K, true: Q3_K).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn low_block<const Q3: bool>(p: &[*const u8; PR]) -> LowBlock {
    let rows = |o: usize| steps4([0, 1, 2, 3].map(|r| ld256(p[r].add(o))));
    let m4 = _mm256_set1_epi8(0x0f);
    if Q3 {
        let scales = group_bytes([0, 1, 2, 3].map(|r| q3k_scales(p[r].add(96))));
        LowBlock {
            low: [rows(32), rows(64)],
            high: rows(0),
            scales,
            factors: scales,
            d8: _mm256_mul_ps(f16_pairs(p, 108), _mm256_set1_ps(0.125)),
            dmin8: _mm256_setzero_ps(),
        }
    } else {
        // each byte: scale in the low nibble, min in the high one
        let raw = group_bytes([0, 1, 2, 3].map(|r| ld128(p[r])));
        LowBlock {
            low: [rows(16), rows(48)],
            high: [_mm256_setzero_si256(); 4],
            scales: raw.map(|v| _mm256_and_si256(v, m4)),
            factors: raw.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4)),
            d8: f16_pairs(p, 80),
            dmin8: f16_pairs(p, 82),
        }
    }
}

/// `v` shifted left by `n` bits per 16-bit lane (right by `-n` when `n` is negative).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn shift16(v: __m256i, n: i32) -> __m256i {
    if n >= 0 {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128(n))
    } else {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(-n))
    }
}

impl LowBlock {
    /// Sub-block `j`'s four steps and the scales of its two groups of 16, spread to
    /// [r0 x4, r1 x4 | r2 x4, r3 x4] i16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sub_block<const Q3: bool>(&self, j: usize) -> ([__m256i; 4], [__m256i; 2]) {
        let (n, k) = (j / 4, (j % 4) as i32);
        let w = self.low[n].map(|q| {
            if Q3 {
                // the two low bits to bits 3, 4 and the high bit to bit 5: eight times 0..7
                _mm256_and_si256(shift16(q, 3 - 2 * k), _mm256_set1_epi8(0x18))
            } else {
                _mm256_and_si256(shift16(q, -2 * k), _mm256_set1_epi8(3))
            }
        });
        let w = if Q3 {
            let h = self
                .high
                .map(|h| _mm256_and_si256(shift16(h, 5 - j as i32), _mm256_set1_epi8(0x20)));
            [0, 1, 2, 3].map(|s| _mm256_or_si256(w[s], h[s]))
        } else {
            w
        };
        let group = |g: usize| spread_i8(self.scales[g / 8], &Q6K_SCALE_SPREAD[g % 8]);
        (w, [group(2 * j), group(2 * j + 1)])
    }

    /// The bsum factors as four steps ([`k_block_token`]'s `m`): factors `4q..4q + 4` of each
    /// row in step `q`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bsum_factors(&self) -> [__m256i; 4] {
        [0, 1, 2, 3].map(|q| spread_i8(self.factors[q / 2], &Q6K_MINS_SPREAD[q % 2]))
    }
}

/// Four rows (their blocks at `rows`, `step` bytes apart: 0 for a missing row) x T tokens over
/// `nb` super-blocks; prefetches `pf` bytes ahead of each row's blocks (0: none).
#[inline(always)]
unsafe fn tile_low<I: Isa, const Q3: bool, const T: usize>(
    rows: &[*const u8; PR],
    step: &[usize; PR],
    a: *const BlockQ8K,
    nb: usize,
    pf: usize,
) -> [[f32; T]; PR] {
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let block = low_block::<Q3>(&block_rows::<Q3>(rows, step, b, pf));
        let mut isum = [_mm256_setzero_si256(); T];
        for j in 0..8 {
            let (w, s) = block.sub_block::<Q3>(j);
            for t in 0..T {
                let aq = (*a.add(t * nb + b)).qs.as_ptr().add(32 * j) as *const u8;
                // |4 products| <= 4 * 56 * 127 < 2^15 (Q3_K's values times 8)
                isum[t] = k_sub_block::<I, 6>(&w, &s, aq, isum[t]);
            }
        }
        let m = block.bsum_factors();
        for t in 0..T {
            let ab = &*a.add(t * nb + b);
            acc[t] = k_block_token::<I, Q3>(acc[t], isum[t], &m, block.d8, block.dmin8, ab);
        }
    }
    finish(acc)
}

/// Where super-block `b` of each of the four rows starts, prefetching `pf` bytes ahead of it (0:
/// none).
#[inline(always)]
unsafe fn block_rows<const Q3: bool>(
    rows: &[*const u8; PR],
    step: &[usize; PR],
    b: usize,
    pf: usize,
) -> [*const u8; PR] {
    let p = [0, 1, 2, 3].map(|r| rows[r].add(b * step[r]));
    if pf != 0 {
        let bytes = if Q3 { Q3K_BYTES } else { Q2K_BYTES };
        for r in p {
            prefetch(r.wrapping_add(pf), bytes);
        }
    }
    p
}

/// [`tile_low`] with the tokens in pairs, two to a 512-bit register (AVX-512 levels, `pairs`: the
/// tile's first pair in [`Interleaved`] form), and when T is odd the last token alone as there:
/// the same integer sums, so the same bits.
#[inline(always)]
unsafe fn tile_low_pairs<I: Isa, const Q3: bool, const T: usize>(
    rows: &[*const u8; PR],
    step: &[usize; PR],
    a: *const BlockQ8K,
    nb: usize,
    pairs: *const u8,
    pf: usize,
) -> [[f32; T]; PR] {
    let np = T / 2;
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let block = low_block::<Q3>(&block_rows::<Q3>(rows, step, b, pf));
        let mut isum = [_mm512_setzero_si512(); T];
        let mut last = _mm256_setzero_si256();
        for j in 0..8 {
            let (w, s) = block.sub_block::<Q3>(j);
            let w2 = w.map(|v| doubled(v));
            let s2 = s.map(|v| doubled(v));
            for (i, sum) in isum.iter_mut().enumerate().take(np) {
                let ap = pairs.add(i * nb * PAIR_BLOCK + b * PAIR_BLOCK + 64 * j);
                *sum = k_sub_block_pair::<true>(&w2, &s2, ap, *sum);
            }
            if T % 2 == 1 {
                let aq = (*a.add((T - 1) * nb + b)).qs.as_ptr().add(32 * j) as *const u8;
                last = k_sub_block::<I, 6>(&w, &s, aq, last);
            }
        }
        let m = block.bsum_factors();
        let token = |t: usize| &*a.add(t * nb + b);
        let (d8, dmin8) = (block.d8, block.dmin8);
        for i in 0..np {
            let (x, y) = split(isum[i]);
            acc[2 * i] = k_block_token::<I, Q3>(acc[2 * i], x, &m, d8, dmin8, token(2 * i));
            acc[2 * i + 1] =
                k_block_token::<I, Q3>(acc[2 * i + 1], y, &m, d8, dmin8, token(2 * i + 1));
        }
        if T % 2 == 1 {
            acc[T - 1] = k_block_token::<I, Q3>(acc[T - 1], last, &m, d8, dmin8, token(T - 1));
        }
    }
    finish(acc)
}

/// All rows and tokens of `o` (Q2_K for Q3 false, Q3_K for true; GGUF layout): tokens in chunks
/// whose activations stay in L2, each group of four rows through all tokens of a chunk in tiles
/// of up to 8 (on the AVX-512 levels two tokens to a register), the first tile prefetching the
/// next group when one chunk holds every token.
#[inline(always)]
pub(super) unsafe fn gemm_low_k<I: Isa, const Q3: bool>(o: Operands<BlockQ8K>) {
    let Operands {
        w,
        rb,
        nrows,
        a,
        nb,
        ntok,
        y,
        ystride,
        ..
    } = o;
    let bb = if Q3 { Q3K_BYTES } else { Q2K_BYTES };
    let tch = ((256 << 10) / (nb * size_of::<BlockQ8K>())).clamp(16, 192) / PT_MAX * PT_MAX;
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + tch).min(ntok);
        let pairs = (I::PAIRS && te - tc >= 2).then(|| Interleaved::new(a, nb, tc, te));
        let mut r = 0;
        while r < nrows {
            let nr = (nrows - r).min(PR);
            let rows = [0, 1, 2, 3].map(|i| {
                if i < nr {
                    w.add((r + i) * rb)
                } else {
                    ZERO_BLOCK.as_ptr()
                }
            });
            let step = [0, 1, 2, 3].map(|i| if i < nr { bb } else { 0 });
            let yr = y.add(r);
            let mut pf = if ntok <= tch { PR * rb } else { 0 };
            token_tiles!(tc, te, nr, yr, ystride, |t, T| {
                let at = a.add(t * nb);
                let o = match &pairs {
                    Some(p) if T >= 2 => {
                        tile_low_pairs::<I, Q3, T>(&rows, &step, at, nb, p.tile(t - tc, nb), pf)
                    }
                    _ => tile_low::<I, Q3, T>(&rows, &step, at, nb, pf),
                };
                pf = 0;
                o
            });
            r += PR;
        }
        tc = te;
    }
}
