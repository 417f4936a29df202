//! x86 kernels: AVX2 + FMA + F16C, and the same kernels with AVX-512 VNNI integer products.
//!
//! Every weight type has a `tile` computing an `R x T` block of outputs (R weight
//! rows, T tokens): each weight block is loaded and unpacked once per tile and
//! combined with the T activation blocks using integer dot products (`maddubs`/`madd`, or
//! `vpdpbusd`/`vpdpwssd`: the [`isa::Isa`] the kernel is compiled for). `gemm` walks a row
//! chunk in tiles; `gemm_small` serves decode and,
//! for the K-quants, batches of 2 or 3 tokens (one call per weight and decode
//! step under continuous batching): weights prefetched one row tile ahead, each
//! row tile unpacked once per tile of up to 3 tokens. The 32-element formats
//! from 2 tokens on and the K-quants from 4 on go to panel.rs.
//!
//! [`chunk_rows`] is the way in, instantiated by the driver for the run-time [`crate::Backend`].

#![allow(clippy::needless_range_loop)]

use crate::act::{BlockQ8, BlockQ8K};
use crate::driver::{Act, YPtr};
use crate::{Packing, QuantType};
use std::arch::x86_64::*;
use std::mem::size_of;

mod isa;
mod panel;

pub(crate) use isa::product_rate;
use isa::Isa;
pub(crate) use isa::{Avx2, Avx512Vnni};

const K_Q4_0: u8 = 0;
const K_Q4_1: u8 = 1;
const K_Q5_0: u8 = 2;
const K_Q5_1: u8 = 3;
const K_Q8_0: u8 = 4;
const K_Q4K: u8 = 5;
const K_Q5K: u8 = 6;
const K_Q6K: u8 = 7;
const K_Q8K: u8 = 8;
const K_F32: u8 = 9;
const K_F16: u8 = 10;
const K_BF16: u8 = 11;
/// The rows4 layouts (repack.rs) of Q4_0, Q5_0 and Q8_0.
const K_Q4_0R4: u8 = 12;
const K_Q5_0R4: u8 = 13;
const K_Q8_0R4: u8 = 14;

/// Tokens processed together before moving to the next row tile (keeps the
/// quantized activations of a token chunk in L2 while weights stream).
const TOKEN_CHUNK: usize = 64;

/// Decode prefetch distance, in row tiles ahead (the hardware prefetcher alone
/// reached only ~60% of the streaming bandwidth).
const PREFETCH_TILES: usize = 1;

/// Token counts and kernels of the 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0): 1: the decode kernel (`tile_q32_dec`); 2..=Q32_STEPS_MAX (decode steps
/// of continuous batching): `panel::gemm_steps_q32`, each block unpacked in
/// registers once per tile of up to 8 tokens; more: the panel kernels, weights
/// unpacked into a buffer once per chunk of tokens. The last two compute the
/// same bits for a token whatever the other tokens of the call are. Weights in
/// the rows4 layout (repack.rs; what the engine loads Q4_0, Q5_0 and Q8_0 into)
/// take those two paths for every token count, decode included: their blocks
/// need no transposing, so the steps kernel is also the fastest decode kernel.
const Q32_STEPS_MAX: usize = 16;

/// From this many tokens on, the K-quants (Q4_K, Q5_K, Q6_K) use the panel
/// kernels (panel.rs); fewer: the direct R x T tiles (`tile_q45k`,
/// `tile_q6k`), whose results for a token do not depend on the other tokens.
const K_PANEL_MIN_TOKENS: usize = 4;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_ld(p: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Prefetches the cache lines of `len` bytes at `p` (no fault if out of range).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch(p: *const u8, len: usize) {
    let mut o = 0;
    while o < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
        o += 64;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

/// 16 packed nibbles -> 32 bytes: low nibbles then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    // same 16 bytes in both lanes, the upper lane shifted right by 4
    let v = _mm256_broadcastsi128_si256(ld128(p));
    let v = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4));
    _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
}

/// 32 bits -> 32 bytes, 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits32(p: *const u8) -> __m256i {
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

const fn q32_block_bytes(k: u8) -> usize {
    match k {
        K_Q4_0 => 18,
        K_Q4_1 => 20,
        K_Q5_0 => 22,
        K_Q5_1 => 24,
        // rows4: one group-block, the four rows' blocks of one index
        K_Q4_0R4 => 72,
        K_Q5_0R4 => 88,
        K_Q8_0R4 => 136,
        _ => 34,
    }
}

/// Whether the 32-element kernel `K` multiplies signed weights (the sign trick) rather than
/// unsigned values with an offset.
const fn q32_signed(k: u8) -> bool {
    matches!(k, K_Q8_0 | K_Q8_0R4)
}

/// Unpacks a 32-element block: (values, d, m). Signed values for Q4_0/Q5_0/Q8_0,
/// unsigned for Q4_1/Q5_1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack32<const K: u8>(p: *const u8) -> (__m256i, f32, f32) {
    match K {
        K_Q4_0 => {
            let w = _mm256_sub_epi8(nibbles32(p.add(2)), _mm256_set1_epi8(8));
            (w, f16_ld(p), 0.0)
        }
        K_Q4_1 => (nibbles32(p.add(4)), f16_ld(p), f16_ld(p.add(2))),
        K_Q5_0 => {
            let hb = bits32(p.add(2));
            let w = _mm256_or_si256(
                nibbles32(p.add(6)),
                _mm256_andnot_si256(hb, _mm256_set1_epi8(0xf0u8 as i8)),
            );
            (w, f16_ld(p), 0.0)
        }
        K_Q5_1 => {
            let hb = bits32(p.add(4));
            let w = _mm256_or_si256(
                nibbles32(p.add(8)),
                _mm256_and_si256(hb, _mm256_set1_epi8(0x10)),
            );
            (w, f16_ld(p), f16_ld(p.add(2)))
        }
        _ => (ld256(p.add(2)), f16_ld(p), 0.0),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q32<const K: u8, const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    pf: usize,
) -> [[f32; T]; R] {
    let bb = q32_block_bytes(K);
    let signed = matches!(K, K_Q4_0 | K_Q5_0 | K_Q8_0);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut corr = [[0f32; T]; R];
    for b in 0..nb {
        let mut av = [_mm256_setzero_si256(); T];
        let mut ad = [0f32; T];
        let mut asum = [0f32; T];
        for t in 0..T {
            let ab = &*(a.add(t * astride) as *const BlockQ8).add(b);
            av[t] = ld256(ab.qs.as_ptr() as *const u8);
            ad[t] = ab.d;
            asum[t] = ab.s;
        }
        for r in 0..R {
            let p = w.add(r * rb + b * bb);
            if pf != 0 {
                prefetch(p.wrapping_add(pf), bb);
            }
            let (wv, dw, mw) = unpack32::<K>(p);
            if signed {
                let ax = _mm256_sign_epi8(wv, wv);
                for t in 0..T {
                    let sy = _mm256_sign_epi8(av[t], wv);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                    acc[r][t] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p),
                        _mm256_set1_ps(dw * ad[t]),
                        acc[r][t],
                    );
                }
            } else {
                for t in 0..T {
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av[t]), ones);
                    acc[r][t] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p),
                        _mm256_set1_ps(dw * ad[t]),
                        acc[r][t],
                    );
                    corr[r][t] += mw * asum[t];
                }
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum_ps(acc[r][t]) + corr[r][t];
        }
    }
    out
}

/// Decode kernel for the 32-element formats: 4 rows x 1 token. The four rows'
/// products are folded with horizontal adds into one [r0 r1 r2 r3 | r0 r1 r2 r3]
/// vector, so scaling costs one or two fma per block for all four rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q32_dec<const K: u8>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    nb: usize,
    pf: usize,
) -> [f32; 4] {
    let bb = q32_block_bytes(K);
    let ones = _mm256_set1_epi16(1);
    let a = a as *const BlockQ8;
    let mut acc = _mm256_setzero_ps();
    let ld16 = |p: *const u8| std::ptr::read_unaligned(p as *const i16);
    for b in 0..nb {
        let ab = &*a.add(b);
        let av = ld256(ab.qs.as_ptr() as *const u8);
        let p0 = w.add(b * bb);
        let p1 = p0.add(rb);
        let p2 = p1.add(rb);
        let p3 = p2.add(rb);
        if pf != 0 {
            prefetch(p0.wrapping_add(pf), 1);
            prefetch(p1.wrapping_add(pf), 1);
            prefetch(p2.wrapping_add(pf), 1);
            prefetch(p3.wrapping_add(pf), 1);
        }
        let dh = _mm_setr_epi16(ld16(p0), ld16(p1), ld16(p2), ld16(p3), 0, 0, 0, 0);
        let d4 = _mm_cvtph_ps(dh);
        let d8 = _mm256_set_m128(d4, d4);
        let da = _mm256_broadcast_ss(&ab.d);
        if K == K_Q8_0 {
            let dot = |p: *const u8| {
                let v = ld256(p.add(2));
                _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(av, v)),
                    ones,
                )
            };
            let h = _mm256_hadd_epi32(
                _mm256_hadd_epi32(dot(p0), dot(p1)),
                _mm256_hadd_epi32(dot(p2), dot(p3)),
            );
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(d8, da), acc);
        } else {
            let dot = |p: *const u8| {
                let (v, _, _) = panel::unpack32u_vals::<K>(p);
                _mm256_maddubs_epi16(v, av)
            };
            let h = _mm256_hadd_epi16(
                _mm256_hadd_epi16(dot(p0), dot(p1)),
                _mm256_hadd_epi16(dot(p2), dot(p3)),
            );
            let hf = _mm256_cvtepi32_ps(_mm256_madd_epi16(h, ones));
            let s = _mm256_broadcast_ss(&ab.s);
            match K {
                K_Q4_0 | K_Q5_0 => {
                    let off = if K == K_Q4_0 { -8.0 } else { -16.0 };
                    // d * (da * isum + off * s); the upper half gets no offset term
                    let offv = _mm256_setr_ps(off, off, off, off, 0.0, 0.0, 0.0, 0.0);
                    let t = _mm256_fmadd_ps(hf, da, _mm256_mul_ps(offv, s));
                    acc = _mm256_fmadd_ps(t, d8, acc);
                }
                _ => {
                    let mh = _mm_setr_epi16(
                        ld16(p0.add(2)),
                        ld16(p1.add(2)),
                        ld16(p2.add(2)),
                        ld16(p3.add(2)),
                        0,
                        0,
                        0,
                        0,
                    );
                    let m8 = _mm256_set_m128(_mm_setzero_ps(), _mm_cvtph_ps(mh));
                    acc = _mm256_fmadd_ps(hf, _mm256_mul_ps(d8, da), acc);
                    acc = _mm256_fmadd_ps(m8, s, acc);
                }
            }
        }
    }
    let v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let mut c = [0f32; 4];
    _mm_storeu_ps(c.as_mut_ptr(), v);
    c
}

/// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K super-block (12 bytes at `s`) as two
/// little-endian byte arrays, unpacked with a few 32-bit operations (for every block of every
/// row, so not byte by byte).
#[inline]
pub(crate) unsafe fn scale_min_bytes_k4(s: *const u8) -> (u64, u64) {
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

/// [`scale_min_bytes_k4`] as vectors: (scales as i16 in both 128-bit lanes, mins as i16 each
/// twice, in the order of the activation's 16 partial sums).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales_mins_k4(s: *const u8) -> (__m256i, __m256i) {
    let (sc, mn) = scale_min_bytes_k4(s);
    let sc = _mm_cvtsi64_si128(sc as i64);
    let mn = _mm_cvtsi64_si128(mn as i64);
    (
        _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc)),
        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn)),
    )
}

/// Shuffle control that broadcasts i16 lane `lo` (of 8) to the lower 128-bit half and lane
/// `hi` to the upper half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pick_i16(lo: usize, hi: usize) -> __m256i {
    let l = (2 * lo) as i16 | ((2 * lo + 1) as i16) << 8;
    let h = (2 * hi) as i16 | ((2 * hi + 1) as i16) << 8;
    _mm256_set_m128i(_mm_set1_epi16(h), _mm_set1_epi16(l))
}

/// `acc + isum * (d * ad) - msum * (dmin * ad)`, the float step of a K-quant super-block, with
/// `dm` = [d, dmin] from the block's two f16 fields.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_block_acc(acc: __m256, isum: __m256i, msum: __m256i, dm: __m128, ad: f32) -> __m256 {
    let f = _mm_mul_ps(dm, _mm_set1_ps(ad));
    let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcastss_ps(f), acc);
    let fmin = _mm256_broadcastss_ps(_mm_movehdup_ps(f));
    _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), fmin, acc)
}

/// Q4_K (FIVE = false) and Q5_K (FIVE = true).
#[inline(always)]
unsafe fn tile_q45k<I: Isa, const FIVE: bool, const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    pf: usize,
) -> [[f32; T]; R] {
    let bb = if FIVE { 176 } else { 144 };
    let m4 = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(1);
    let two = _mm256_set1_epi8(2);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..nb {
        for r in 0..R {
            let p = w.add(r * rb + b * bb);
            if pf != 0 {
                prefetch(p.wrapping_add(pf), bb);
            }
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            let (scales, mins) = scales_mins_k4(p.add(4));
            let qs = p.add(if FIVE { 48 } else { 16 });
            let qhv = if FIVE {
                ld256(p.add(16))
            } else {
                _mm256_setzero_si256()
            };
            let mut isum = [_mm256_setzero_si256(); T];
            for j in 0..4 {
                let q = ld256(qs.add(32 * j));
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                if FIVE {
                    let h = _mm256_srl_epi16(qhv, _mm_cvtsi32_si128(2 * j as i32));
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(h, one)));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16::<3>(_mm256_and_si256(h, two)));
                }
                let s0 = _mm256_shuffle_epi8(scales, pick_i16(2 * j, 2 * j));
                let s1 = _mm256_shuffle_epi8(scales, pick_i16(2 * j + 1, 2 * j + 1));
                for t in 0..T {
                    let ab = &*(a.add(t * astride) as *const BlockQ8K).add(b);
                    let aq = ab.qs.as_ptr() as *const u8;
                    let p0 = _mm256_maddubs_epi16(lo, ld256(aq.add(64 * j)));
                    let p1 = _mm256_maddubs_epi16(hi, ld256(aq.add(64 * j + 32)));
                    isum[t] = I::madd_acc(I::madd_acc(isum[t], p0, s0), p1, s1);
                }
            }
            for t in 0..T {
                let ab = &*(a.add(t * astride) as *const BlockQ8K).add(b);
                let msum = _mm256_madd_epi16(ld256(ab.bsums.as_ptr() as *const u8), mins);
                acc[r][t] = k_block_acc(acc[r][t], isum[t], msum, dm, ab.d);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum_ps(acc[r][t]);
        }
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q6k<const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    pf: usize,
) -> [[f32; T]; R] {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..nb {
        for r in 0..R {
            let p = w.add(r * rb + b * 210);
            if pf != 0 {
                prefetch(p.wrapping_add(pf), 210);
            }
            let d = f16_ld(p.add(208));
            let sc16 = _mm256_cvtepi8_epi16(ld128(p.add(192)));
            let mut isum = [_mm256_setzero_si256(); T];
            for n in 0..2 {
                // scales 8n..8n+8 as i16 in both 128-bit lanes
                let scn = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(
                    p.add(192 + 8 * n) as *const __m128i,
                )));
                let qla = ld256(p.add(64 * n));
                let qlb = ld256(p.add(64 * n + 32));
                let qh = ld256(p.add(128 + 32 * n));
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(qla, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(qlb, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qla), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qlb), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m3)),
                    ),
                ];
                for (k, qk) in q.iter().enumerate() {
                    // groups 8n+2k (lower half of the 32 values) and 8n+2k+1 (upper half)
                    let sv = _mm256_shuffle_epi8(scn, pick_i16(2 * k, 2 * k + 1));
                    for t in 0..T {
                        let ab = &*(a.add(t * astride) as *const BlockQ8K).add(b);
                        let av = ld256((ab.qs.as_ptr() as *const u8).add(128 * n + 32 * k));
                        let pr = _mm256_madd_epi16(_mm256_maddubs_epi16(*qk, av), sv);
                        isum[t] = _mm256_add_epi32(isum[t], pr);
                    }
                }
            }
            for t in 0..T {
                let ab = &*(a.add(t * astride) as *const BlockQ8K).add(b);
                let c = _mm256_madd_epi16(ld256(ab.bsums.as_ptr() as *const u8), sc16);
                let i = _mm256_sub_epi32(isum[t], _mm256_slli_epi32::<5>(c));
                acc[r][t] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(d * ab.d), acc[r][t]);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum_ps(acc[r][t]);
        }
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q8k<const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    pf: usize,
) -> [[f32; T]; R] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..nb {
        for r in 0..R {
            let p = w.add(r * rb + b * 292);
            if pf != 0 {
                prefetch(p.wrapping_add(pf), 292);
            }
            let d = std::ptr::read_unaligned(p as *const f32);
            let mut isum = [_mm256_setzero_si256(); T];
            for k in 0..8 {
                let wv = ld256(p.add(4 + 32 * k));
                let ax = _mm256_sign_epi8(wv, wv);
                for t in 0..T {
                    let ab = &*(a.add(t * astride) as *const BlockQ8K).add(b);
                    let av = ld256((ab.qs.as_ptr() as *const u8).add(32 * k));
                    let sy = _mm256_sign_epi8(av, wv);
                    let pr = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                    isum[t] = _mm256_add_epi32(isum[t], pr);
                }
            }
            for t in 0..T {
                let ab = &*(a.add(t * astride) as *const BlockQ8K).add(b);
                acc[r][t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[t]),
                    _mm256_set1_ps(d * ab.d),
                    acc[r][t],
                );
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum_ps(acc[r][t]);
        }
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const K: u8>(row: *const u8, k: usize) -> __m256 {
    match K {
        K_F32 => _mm256_loadu_ps((row as *const f32).add(k)),
        K_F16 => _mm256_cvtph_ps(ld128(row.add(2 * k))),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(ld128(
            row.add(2 * k),
        )))),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load1<const K: u8>(row: *const u8, k: usize) -> f32 {
    match K {
        K_F32 => std::ptr::read_unaligned((row as *const f32).add(k)),
        K_F16 => f16_ld(row.add(2 * k)),
        _ => f32::from_bits((std::ptr::read_unaligned(row.add(2 * k) as *const u16) as u32) << 16),
    }
}

/// Float weights (F32/F16/BF16) against f32 activations; `cols` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_float<const K: u8, const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    cols: usize,
    pf: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let n8 = cols / 8 * 8;
    let mut k = 0;
    while k < n8 {
        let mut xs = [_mm256_setzero_ps(); T];
        for t in 0..T {
            xs[t] = _mm256_loadu_ps((a.add(t * astride) as *const f32).add(k));
        }
        for r in 0..R {
            if pf != 0 && k % 32 == 0 {
                prefetch(
                    w.add(r * rb + k * (if K == K_F32 { 4 } else { 2 }))
                        .wrapping_add(pf),
                    1,
                );
            }
            let wv = load8::<K>(w.add(r * rb), k);
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, xs[t], acc[r][t]);
            }
        }
        k += 8;
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum_ps(acc[r][t]);
            for kk in n8..cols {
                s += load1::<K>(w.add(r * rb), kk) * *(a.add(t * astride) as *const f32).add(kk);
            }
            out[r][t] = s;
        }
    }
    out
}

#[inline(always)]
unsafe fn tile<I: Isa, const K: u8, const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    pf: usize,
) -> [[f32; T]; R] {
    match K {
        K_Q4_0 | K_Q4_1 | K_Q5_0 | K_Q5_1 | K_Q8_0 if R == 4 && T == 1 => {
            let o = tile_q32_dec::<K>(w, rb, a, nb, pf);
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                out[r][0] = o[r];
            }
            out
        }
        K_Q4_0 | K_Q4_1 | K_Q5_0 | K_Q5_1 | K_Q8_0 => {
            tile_q32::<K, R, T>(w, rb, a, astride, nb, pf)
        }
        K_Q4K => tile_q45k::<I, false, R, T>(w, rb, a, astride, nb, pf),
        K_Q5K => tile_q45k::<I, true, R, T>(w, rb, a, astride, nb, pf),
        K_Q6K => tile_q6k::<R, T>(w, rb, a, astride, nb, pf),
        K_Q8K => tile_q8k::<R, T>(w, rb, a, astride, nb, pf),
        _ => tile_float::<K, R, T>(w, rb, a, astride, nb, pf),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_tiles<I: Isa, const K: u8, const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    t0: usize,
    t1: usize,
    y: *mut f32,
    ystride: usize,
    pf: usize,
) {
    let mut t = t0;
    while t + T <= t1 {
        let o = tile::<I, K, R, T>(w, rb, a.add(t * astride), astride, nb, 0);
        for (r, or) in o.iter().enumerate() {
            for (j, v) in or.iter().enumerate() {
                *y.add((t + j) * ystride + r) = *v;
            }
        }
        t += T;
    }
    while t < t1 {
        let o = tile::<I, K, R, 1>(w, rb, a.add(t * astride), astride, nb, pf);
        for (r, or) in o.iter().enumerate() {
            *y.add(t * ystride + r) = or[0];
        }
        t += 1;
    }
}

/// Rows `0..nrows` (starting at `w`, outputs at `y`) for all `ntok` tokens.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<I: Isa, const K: u8, const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    nrows: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    ntok: usize,
    y: *mut f32,
    ystride: usize,
) {
    let pf = if ntok == 1 {
        PREFETCH_TILES * R * rb
    } else {
        0
    };
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + TOKEN_CHUNK).min(ntok);
        let mut r = 0;
        while r + R <= nrows {
            row_tiles::<I, K, R, T>(
                w.add(r * rb),
                rb,
                a,
                astride,
                nb,
                tc,
                te,
                y.add(r),
                ystride,
                pf,
            );
            r += R;
        }
        while r < nrows {
            row_tiles::<I, K, 1, T>(
                w.add(r * rb),
                rb,
                a,
                astride,
                nb,
                tc,
                te,
                y.add(r),
                ystride,
                pf / R,
            );
            r += 1;
        }
        tc = te;
    }
}

/// One R x T tile at token `t`, written to `y`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn put_tile<I: Isa, const K: u8, const R: usize, const T: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    t: usize,
    y: *mut f32,
    ystride: usize,
    pf: usize,
) {
    let o = tile::<I, K, R, T>(w, rb, a.add(t * astride), astride, nb, pf);
    for (r, or) in o.iter().enumerate() {
        for (j, v) in or.iter().enumerate() {
            *y.add((t + j) * ystride + r) = *v;
        }
    }
}

/// Most tokens per tile of [`gemm_small`] (it serves fewer than
/// [`K_PANEL_MIN_TOKENS`] tokens).
const SMALL_T: usize = 3;

/// All `ntok` tokens of one row tile in token tiles of at most [`SMALL_T`]: the
/// weights are unpacked once per token tile, and only the first tile prefetches
/// (the others find the row tile in cache).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn small_tiles<I: Isa, const K: u8, const R: usize>(
    w: *const u8,
    rb: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    ntok: usize,
    y: *mut f32,
    ystride: usize,
    pf: usize,
) {
    let mut pf = pf;
    let mut t = 0;
    while t < ntok {
        let left = ntok - t;
        // even split of what is left into ceil(left / SMALL_T) tiles
        let n = left.div_ceil(left.div_ceil(SMALL_T));
        match n {
            1 => put_tile::<I, K, R, 1>(w, rb, a, astride, nb, t, y, ystride, pf),
            2 => put_tile::<I, K, R, 2>(w, rb, a, astride, nb, t, y, ystride, pf),
            _ => put_tile::<I, K, R, 3>(w, rb, a, astride, nb, t, y, ystride, pf),
        }
        pf = 0;
        t += n;
    }
}

/// Decode and small batches (continuous batching: one call per weight with a
/// token per active request): rows `0..nrows` in tiles of 4, all `ntok` tokens
/// of a row tile before the next, the next row tile prefetched as in decode.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_small<I: Isa, const K: u8>(
    w: *const u8,
    rb: usize,
    nrows: usize,
    a: *const u8,
    astride: usize,
    nb: usize,
    ntok: usize,
    y: *mut f32,
    ystride: usize,
) {
    const R: usize = 4;
    let pf = PREFETCH_TILES * R * rb;
    let mut r = 0;
    while r + R <= nrows {
        small_tiles::<I, K, R>(
            w.add(r * rb),
            rb,
            a,
            astride,
            nb,
            ntok,
            y.add(r),
            ystride,
            pf,
        );
        r += R;
    }
    while r < nrows {
        small_tiles::<I, K, 1>(
            w.add(r * rb),
            rb,
            a,
            astride,
            nb,
            ntok,
            y.add(r),
            ystride,
            pf / R,
        );
        r += 1;
    }
}

/// Groups of four GGUF rows of `ty` (Q4_0, Q5_0 or Q8_0; `rb` bytes per row) in `src` as
/// rows4 groups in `dst` (see repack.rs).
///
/// # Safety
/// Requires AVX2, FMA and F16C.
pub(crate) unsafe fn pack_rows4(ty: QuantType, rb: usize, src: &[u8], dst: &mut [u8]) {
    assert!(src.len() == dst.len() && src.len().is_multiple_of(4 * rb));
    let nb = rb / ty.block_bytes();
    for (s, d) in src.chunks_exact(4 * rb).zip(dst.chunks_exact_mut(4 * rb)) {
        let (s, d) = (s.as_ptr(), d.as_mut_ptr());
        match ty {
            QuantType::Q4_0 => panel::pack_rows4::<K_Q4_0>(s, rb, nb, d),
            QuantType::Q5_0 => panel::pack_rows4::<K_Q5_0>(s, rb, nb, d),
            QuantType::Q8_0 => panel::pack_rows4::<K_Q8_0>(s, rb, nb, d),
            _ => unreachable!("no rows4 form for {ty}"),
        }
    }
}

/// Rows `r0..r1` for all tokens, with the kernels of feature level `I` (`Avx2` or
/// `Avx512Vnni`): this only picks the kernel, which its level's [`Isa`] entry point runs.
///
/// # Safety
/// Requires the level's CPU features; `y` must be valid for `n_tokens * rows` writes and rows
/// `r0..r1` must not be written concurrently by anyone else.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn chunk_rows<I: Isa>(
    ty: QuantType,
    packing: Packing,
    w: &[u8],
    rb: usize,
    rows: usize,
    cols: usize,
    act: Act<'_>,
    n_tokens: usize,
    y: YPtr,
    r0: usize,
    r1: usize,
) {
    let nrows = r1 - r0;
    let wp = w.as_ptr().add(r0 * rb);
    let yp = y.0.add(r0);
    macro_rules! q8 {
        ($k:expr, $a:expr) => {{
            let nb = cols / 32;
            I::gemm_small::<{ $k }>(
                wp,
                rb,
                nrows,
                $a.as_ptr() as *const u8,
                nb * size_of::<BlockQ8>(),
                nb,
                n_tokens,
                yp,
                rows,
            )
        }};
    }
    macro_rules! q8k {
        ($k:expr, $a:expr) => {{
            let nb = cols / 256;
            I::gemm_small::<{ $k }>(
                wp,
                rb,
                nrows,
                $a.as_ptr() as *const u8,
                nb * size_of::<BlockQ8K>(),
                nb,
                n_tokens,
                yp,
                rows,
            )
        }};
    }
    macro_rules! fl {
        ($k:expr, $x:expr) => {{
            I::gemm::<{ $k }, 4, 2>(
                wp,
                rb,
                nrows,
                $x.as_ptr() as *const u8,
                cols * 4,
                cols,
                n_tokens,
                yp,
                rows,
            )
        }};
    }
    match (ty, act) {
        (
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q8_0,
            Act::Q8(a),
        ) if n_tokens >= 2 || packing == Packing::Rows4 => {
            let nb = cols / 32;
            let ap = a.as_ptr();
            macro_rules! q32 {
                ($k:expr) => {
                    if n_tokens <= Q32_STEPS_MAX {
                        I::gemm_steps_q32::<{ $k }>(wp, rb, nrows, ap, nb, n_tokens, yp, rows)
                    } else {
                        I::gemm_panel_q32::<{ $k }>(wp, rb, nrows, ap, nb, n_tokens, yp, rows)
                    }
                };
            }
            match (ty, packing) {
                (QuantType::Q4_0, Packing::Rows4) => q32!(K_Q4_0R4),
                (QuantType::Q5_0, Packing::Rows4) => q32!(K_Q5_0R4),
                (QuantType::Q8_0, Packing::Rows4) => q32!(K_Q8_0R4),
                (QuantType::Q4_0, _) => q32!(K_Q4_0),
                (QuantType::Q4_1, _) => q32!(K_Q4_1),
                (QuantType::Q5_0, _) => q32!(K_Q5_0),
                (QuantType::Q5_1, _) => q32!(K_Q5_1),
                _ => q32!(K_Q8_0),
            }
        }
        (QuantType::Q4K | QuantType::Q6K, Act::Q8K(a)) if packing == Packing::Rows4 => {
            let (ap, nb) = (a.as_ptr(), cols / 256);
            if ty == QuantType::Q6K {
                I::gemm_k_rows4::<true>(wp, rb, nrows, ap, nb, n_tokens, yp, rows)
            } else {
                I::gemm_k_rows4::<false>(wp, rb, nrows, ap, nb, n_tokens, yp, rows)
            }
        }
        (QuantType::Q4K | QuantType::Q5K | QuantType::Q6K, Act::Q8K(a))
            if n_tokens >= K_PANEL_MIN_TOKENS =>
        {
            let nb = cols / 256;
            let ap = a.as_ptr();
            macro_rules! kq {
                ($k:expr) => {
                    I::gemm_panel_k::<{ $k }>(wp, rb, nrows, ap, nb, n_tokens, yp, rows)
                };
            }
            match ty {
                QuantType::Q4K => kq!(K_Q4K),
                QuantType::Q5K => kq!(K_Q5K),
                _ => kq!(K_Q6K),
            }
        }
        (QuantType::Q4_0, Act::Q8(a)) => q8!(K_Q4_0, a),
        (QuantType::Q4_1, Act::Q8(a)) => q8!(K_Q4_1, a),
        (QuantType::Q5_0, Act::Q8(a)) => q8!(K_Q5_0, a),
        (QuantType::Q5_1, Act::Q8(a)) => q8!(K_Q5_1, a),
        (QuantType::Q8_0, Act::Q8(a)) => q8!(K_Q8_0, a),
        (QuantType::Q4K, Act::Q8K(a)) => q8k!(K_Q4K, a),
        (QuantType::Q5K, Act::Q8K(a)) => q8k!(K_Q5K, a),
        (QuantType::Q6K, Act::Q8K(a)) => q8k!(K_Q6K, a),
        (QuantType::Q8K, Act::Q8K(a)) => {
            let nb = cols / 256;
            I::gemm::<K_Q8K, 4, 4>(
                wp,
                rb,
                nrows,
                a.as_ptr() as *const u8,
                nb * size_of::<BlockQ8K>(),
                nb,
                n_tokens,
                yp,
                rows,
            )
        }
        (QuantType::F32, Act::F32(x)) => fl!(K_F32, x),
        (QuantType::F16, Act::F32(x)) => fl!(K_F16, x),
        (QuantType::BF16, Act::F32(x)) => fl!(K_BF16, x),
        _ => crate::driver::chunk_rows_scalar(
            ty, packing, w, rb, rows, cols, act, n_tokens, y, r0, r1,
        ),
    }
}
