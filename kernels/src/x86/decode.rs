//! The direct R x T tile kernels: every weight type has a `tile` computing an `R x T` block of
//! outputs (R weight rows, T tokens), each weight block loaded and unpacked once per tile and
//! combined with the T activation blocks using integer dot products (`maddubs`/`madd`, or
//! `vpdpbusd`/`vpdpwssd`: the [`Isa`] the kernel is compiled for).
//!
//! [`gemm_small`] serves decode and, for the GGUF-layout K-quants, batches of 2 or 3 tokens (one
//! call per weight and decode step under continuous batching): weights prefetched one row tile
//! ahead, each row tile unpacked once per tile of up to 3 tokens. [`gemm`] walks a row chunk in
//! tiles for every token count; it serves the float types and Q8_K. The 32-element formats from
//! 2 tokens on, the K-quants from 4 on and the rows4 layouts go to the panel kernels (panel.rs).

#![allow(clippy::needless_range_loop)]

use super::isa::Isa;
use super::simd::{
    bits32, f16_ld, hsum_ps, ld128, ld256, nibbles32, prefetch, scale_min_bytes_k4, unpack32u_vals,
};
use super::{
    q32_block_bytes, Operands, K_F16, K_F32, K_Q4K, K_Q4_0, K_Q4_1, K_Q5K, K_Q5_0, K_Q5_1, K_Q6K,
    K_Q8K, K_Q8_0,
};
use crate::layout::{BlockQ8, BlockQ8K};
use std::arch::x86_64::*;
use std::ops::Range;

/// Tokens processed together before moving to the next row tile (keeps the
/// quantized activations of a token chunk in L2 while weights stream).
const TOKEN_CHUNK: usize = 64;

/// Decode prefetch distance, in row tiles ahead (the hardware prefetcher alone
/// leaves much of the streaming bandwidth unused).
const PREFETCH_TILES: usize = 1;

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
                let (v, _, _) = unpack32u_vals::<K>(p);
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

/// Rows `r..r + R` of `o` for tokens `tokens` in R x T tiles, then the remaining tokens one at a
/// time (those prefetch `pf` bytes ahead).
#[inline(always)]
unsafe fn row_tiles<I: Isa, const K: u8, const R: usize, const T: usize>(
    o: &Operands<u8>,
    r: usize,
    tokens: Range<usize>,
    pf: usize,
) {
    let Operands {
        rb,
        a,
        astride,
        nb,
        ystride,
        ..
    } = *o;
    let (w, y) = (o.w.add(r * rb), o.y.add(r));
    let mut t = tokens.start;
    while t + T <= tokens.end {
        let o = tile::<I, K, R, T>(w, rb, a.add(t * astride), astride, nb, 0);
        for (r, or) in o.iter().enumerate() {
            for (j, v) in or.iter().enumerate() {
                *y.add((t + j) * ystride + r) = *v;
            }
        }
        t += T;
    }
    while t < tokens.end {
        let o = tile::<I, K, R, 1>(w, rb, a.add(t * astride), astride, nb, pf);
        for (r, or) in o.iter().enumerate() {
            *y.add(t * ystride + r) = or[0];
        }
        t += 1;
    }
}

/// All rows and tokens of `o`.
#[inline(always)]
pub(super) unsafe fn gemm<I: Isa, const K: u8, const R: usize, const T: usize>(o: Operands<u8>) {
    let Operands {
        rb, nrows, ntok, ..
    } = o;
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
            row_tiles::<I, K, R, T>(&o, r, tc..te, pf);
            r += R;
        }
        while r < nrows {
            row_tiles::<I, K, 1, T>(&o, r, tc..te, pf / R);
            r += 1;
        }
        tc = te;
    }
}

/// One R x T tile of `o`: rows `r..r + R`, tokens `t..t + T`.
#[inline(always)]
unsafe fn put_tile<I: Isa, const K: u8, const R: usize, const T: usize>(
    o: &Operands<u8>,
    r: usize,
    t: usize,
    pf: usize,
) {
    let Operands {
        rb,
        a,
        astride,
        nb,
        ystride,
        ..
    } = *o;
    let (w, y) = (o.w.add(r * rb), o.y.add(r));
    let o = tile::<I, K, R, T>(w, rb, a.add(t * astride), astride, nb, pf);
    for (r, or) in o.iter().enumerate() {
        for (j, v) in or.iter().enumerate() {
            *y.add((t + j) * ystride + r) = *v;
        }
    }
}

/// Most tokens per tile of [`gemm_small`] (it serves fewer than
/// [`crate::layout::K_PANEL_MIN_TOKENS`] tokens).
const SMALL_T: usize = 3;

/// All tokens of rows `r..r + R` of `o` in token tiles of at most [`SMALL_T`]: the weights are
/// unpacked once per token tile, and only the first tile prefetches (the others find the row
/// tile in cache).
#[inline(always)]
unsafe fn small_tiles<I: Isa, const K: u8, const R: usize>(o: &Operands<u8>, r: usize, pf: usize) {
    let ntok = o.ntok;
    let mut pf = pf;
    let mut t = 0;
    while t < ntok {
        let left = ntok - t;
        // even split of what is left into ceil(left / SMALL_T) tiles
        let n = left.div_ceil(left.div_ceil(SMALL_T));
        match n {
            1 => put_tile::<I, K, R, 1>(o, r, t, pf),
            2 => put_tile::<I, K, R, 2>(o, r, t, pf),
            _ => put_tile::<I, K, R, 3>(o, r, t, pf),
        }
        pf = 0;
        t += n;
    }
}

/// Decode and small batches (continuous batching: one call per weight with a
/// token per active request): the rows of `o` in tiles of 4, all its tokens
/// of a row tile before the next, the next row tile prefetched as in decode.
#[inline(always)]
pub(super) unsafe fn gemm_small<I: Isa, const K: u8>(o: Operands<u8>) {
    const R: usize = 4;
    let pf = PREFETCH_TILES * R * o.rb;
    let mut r = 0;
    while r + R <= o.nrows {
        small_tiles::<I, K, R>(&o, r, pf);
        r += R;
    }
    while r < o.nrows {
        small_tiles::<I, K, 1>(&o, r, pf / R);
        r += 1;
    }
}
