//! Batches and prefill for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (n_tokens >= 2) and Q4_K,
//! Q5_K, Q6_K (n_tokens >= 4).
//!
//! A panel of 4 weight rows is unpacked once per chunk of tokens into plain
//! bytes, transposed so that each 32-byte vector holds 8 consecutive values of
//! each of the 4 rows ("steps"), plus pre-broadcast scale vectors. The 4 x T
//! micro-kernels then broadcast 8 activation bytes at a time
//! (`vpbroadcastq` from memory) against a step vector, so one `maddubs`
//! serves all four rows, partial sums stay in i16 where the value ranges allow
//! it, and one accumulator per token holds the rows as [r0 r0 r1 r1 r2 r2 r3 r3].
//! Q4_0/Q5_0 are unpacked as unsigned values with the -8/-16 offset folded into
//! a float "min" term (like Q4_1/Q5_1), so only Q8_0 needs the sign trick.
//!
//! Token tiles are up to 8 wide (`tile_width`), so a batch of up to 8 tokens
//! (decode under continuous batching) needs one pass over a panel; while a
//! panel is unpacked, the next one is prefetched when all tokens fit in one
//! chunk (the weights then stream from memory once, as in decode). For the
//! 32-element formats, batches of up to 16 tokens skip the buffer:
//! `gemm_steps_q32` unpacks and transposes each block in registers
//! (`unpack_block`) and runs the same per-token arithmetic (`block_token`), so
//! both paths give the same bits.

#![allow(clippy::needless_range_loop)]

use super::iquant::{unpack_rows4_iq4nl, unpack_rows4_iq4xs};
use super::isa::Isa;
use super::pairs::{tile_k_rows4_pairs, Interleaved};
use super::simd::{f16_ld, ld128, ld256, prefetch, scale_min_bytes_k4, unpack32u_vals};
use super::{
    q32_block_bytes, q32_signed, Operands, K_IQ4NLR4, K_IQ4XSR4, K_Q4_0, K_Q4_0R4, K_Q4_1, K_Q5K,
    K_Q5_0, K_Q5_0R4, K_Q5_1, K_Q6K, K_Q8_0, K_Q8_0R4,
};
use crate::layout::{
    BlockQ8, BlockQ8K, Q4K_D, Q4K_DMIN, Q4K_GROUP_BYTES, Q4K_MINS, Q4K_SCALES, Q6K_D, Q6K_SCALES,
};
use std::arch::x86_64::*;
use std::mem::size_of;

/// Rows per panel.
pub(super) const PR: usize = 4;
/// Tokens per micro-kernel call.
const PT: usize = 4;
/// Bytes per unpacked block of the panel: values[4][32], signed[4][32], d[8], m[8].
const PB: usize = 4 * 32 * 2 + 64;
const OFF_SGN: usize = 128;
const OFF_D: usize = 256;
const OFF_M: usize = 288;

thread_local! {
    static PANEL: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Four 32-byte row vectors as four "step" vectors: step k holds bytes 8k..8k+8
/// of rows 0, 1, 2, 3 (so one broadcast 8-byte activation chunk meets all four
/// rows in a single maddubs).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn steps4(v: [__m256i; 4]) -> [__m256i; 4] {
    // 4x4 transpose of 64-bit elements
    let t0 = _mm256_unpacklo_epi64(v[0], v[1]); // r0q0 r1q0 | r0q2 r1q2
    let t1 = _mm256_unpackhi_epi64(v[0], v[1]); // r0q1 r1q1 | r0q3 r1q3
    let t2 = _mm256_unpacklo_epi64(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi64(v[2], v[3]);
    [
        _mm256_permute2x128_si256::<0x20>(t0, t2),
        _mm256_permute2x128_si256::<0x20>(t1, t3),
        _mm256_permute2x128_si256::<0x31>(t0, t2),
        _mm256_permute2x128_si256::<0x31>(t1, t3),
    ]
}

/// [`steps4`] stored at `dst`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_steps(v: [__m256i; 4], dst: *mut u8) {
    let s = steps4(v);
    for k in 0..4 {
        _mm256_storeu_si256(dst.add(32 * k) as *mut __m256i, s[k]);
    }
}

/// One block of a 4-row panel, unpacked in registers.
#[derive(Clone, Copy)]
pub(super) struct PanelBlock {
    /// Value steps: |w| for the signed types (Q8_0, IQ4_NL, IQ4_XS), unsigned values otherwise.
    pub w: [__m256i; 4],
    /// Signed steps (the signed types only).
    pub s: [__m256i; 4],
    /// [d0 d0 d1 d1 d2 d2 d3 d3]
    pub d: __m256,
    /// [m0 0 m1 0 m2 0 m3 0]: x = d * v + m (Q4_0/Q5_0: the -8/-16 offset)
    pub m: __m256,
}

/// Unpacks block `b` of rows `0..nr` (nr <= 4, row stride `rb`) at `w`; missing rows are
/// zero. Prefetches the same block `pf` bytes ahead (0: none).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_block<const K: u8>(
    w: *const u8,
    b: usize,
    rb: usize,
    nr: usize,
    pf: usize,
) -> PanelBlock {
    // IQ4_XS's sub-blocks share their group-block's d, so are not addressed alone
    if K == K_IQ4XSR4 {
        return unpack_rows4_iq4xs(w, b, pf);
    }
    if K == K_IQ4NLR4 {
        return unpack_rows4_iq4nl(w, b, pf);
    }
    let bb = q32_block_bytes(K);
    let p = w.add(b * bb);
    if matches!(K, K_Q4_0R4 | K_Q5_0R4 | K_Q8_0R4) {
        return unpack_rows4::<K>(p, pf);
    }
    let ld16 = |p: *const u8| std::ptr::read_unaligned(p as *const i16);
    // lanes [0 0 1 1 2 2 3 3] of the four rows' f16 fields
    let f16x4 = |f: [i16; 4]| {
        let v = _mm_cvtph_ps(_mm_setr_epi16(f[0], f[1], f[2], f[3], 0, 0, 0, 0));
        _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(v),
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        )
    };
    let even = _mm256_setr_ps(1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0);
    let mut vals = [_mm256_setzero_si256(); 4];
    let mut sgn = [_mm256_setzero_si256(); 4];
    let mut dbits = [0i16; 4];
    let mut mbits = [0i16; 4];
    for r in 0..nr {
        let p = p.add(r * rb);
        if pf != 0 {
            prefetch(p.wrapping_add(pf), bb);
        }
        dbits[r] = ld16(p);
        if K == K_Q8_0 {
            let v = ld256(p.add(2));
            sgn[r] = v;
            vals[r] = _mm256_sign_epi8(v, v);
        } else {
            vals[r] = unpack32u_vals::<K>(p).0;
            if matches!(K, K_Q4_1 | K_Q5_1) {
                mbits[r] = ld16(p.add(2));
            }
        }
    }
    let d = f16x4(dbits);
    let m = match K {
        K_Q4_0 => _mm256_mul_ps(d, _mm256_mul_ps(even, _mm256_set1_ps(-8.0))),
        K_Q5_0 => _mm256_mul_ps(d, _mm256_mul_ps(even, _mm256_set1_ps(-16.0))),
        K_Q4_1 | K_Q5_1 => _mm256_mul_ps(f16x4(mbits), even),
        _ => _mm256_setzero_ps(),
    };
    PanelBlock {
        w: steps4(vals),
        s: if K == K_Q8_0 { steps4(sgn) } else { sgn },
        d,
        m,
    }
}

/// One rows4 group-block (layout.rs) at `p`: the steps are stored as they are used, so
/// unpacking is a few loads and masks (for Q5_0 one shift per step brings the fifth bits
/// into place, see `Q5_HIGH_BIT`). Prefetches `pf` bytes ahead (0: none).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_rows4<const K: u8>(p: *const u8, pf: usize) -> PanelBlock {
    let bb = q32_block_bytes(K);
    if pf != 0 {
        prefetch(p.wrapping_add(pf), bb);
    }
    let scales = _mm_loadl_epi64(p.add(bb - 8) as *const __m128i);
    let d = _mm256_cvtph_ps(_mm_unpacklo_epi16(scales, scales));
    let even = |v: f32| _mm256_setr_ps(v, 0.0, v, 0.0, v, 0.0, v, 0.0);
    if K == K_Q8_0R4 {
        let s = [
            ld256(p),
            ld256(p.add(32)),
            ld256(p.add(64)),
            ld256(p.add(96)),
        ];
        return PanelBlock {
            w: [
                _mm256_sign_epi8(s[0], s[0]),
                _mm256_sign_epi8(s[1], s[1]),
                _mm256_sign_epi8(s[2], s[2]),
                _mm256_sign_epi8(s[3], s[3]),
            ],
            s,
            d,
            m: _mm256_setzero_ps(),
        };
    }
    let m4 = _mm256_set1_epi8(0x0f);
    let (v0, v1) = (ld256(p), ld256(p.add(32)));
    let mut w = [
        _mm256_and_si256(v0, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v0), m4),
        _mm256_and_si256(v1, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v1), m4),
    ];
    let offset = if K == K_Q5_0R4 {
        let h = _mm256_broadcastsi128_si256(ld128(p.add(64)));
        let b4 = _mm256_set1_epi8(0x10);
        let hb = [
            _mm256_sllv_epi64(h, _mm256_setr_epi64x(4, 4, 3, 3)),
            _mm256_sllv_epi64(h, _mm256_setr_epi64x(2, 2, 1, 1)),
            _mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 0, 3, 3)),
            _mm256_srlv_epi64(h, _mm256_setr_epi64x(1, 1, 2, 2)),
        ];
        for k in 0..4 {
            w[k] = _mm256_or_si256(w[k], _mm256_and_si256(hb[k], b4));
        }
        -16.0
    } else {
        -8.0
    };
    PanelBlock {
        w,
        s: [_mm256_setzero_si256(); 4],
        d,
        m: _mm256_mul_ps(d, even(offset)),
    }
}

/// Unpacks rows `0..nr` (nr <= 4) of `nb` blocks into `panel`; missing rows are zero.
/// Per block: value steps[4], signed steps[4] (Q8_0 only), d[8], m[8] (see
/// [`PanelBlock`]). Prefetches the same blocks `pf` bytes ahead (the next panel).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_panel<const K: u8>(
    w: *const u8,
    rb: usize,
    nr: usize,
    nb: usize,
    panel: *mut u8,
    pf: usize,
) {
    for b in 0..nb {
        let pb = panel.add(b * PB);
        let u = unpack_block::<K>(w, b, rb, nr, pf);
        for k in 0..4 {
            _mm256_storeu_si256(pb.add(32 * k) as *mut __m256i, u.w[k]);
            if q32_signed(K) {
                _mm256_storeu_si256(pb.add(OFF_SGN + 32 * k) as *mut __m256i, u.s[k]);
            }
        }
        _mm256_storeu_ps(pb.add(OFF_D) as *mut f32, u.d);
        _mm256_storeu_ps(pb.add(OFF_M) as *mut f32, u.m);
    }
}

/// Adds one token's products with one panel block to `acc` (lanes
/// [r0 r0 r1 r1 r2 r2 r3 r3]). Shared by the panel micro-kernels and the
/// in-register small-batch kernel, so that both give the same bits.
#[inline(always)]
pub(super) unsafe fn block_token<I: Isa, const SIGNED: bool>(
    u: &PanelBlock,
    ab: &BlockQ8,
    acc: __m256,
) -> __m256 {
    let aq = ab.qs.as_ptr() as *const u8;
    let bq = |k: usize| _mm256_set1_epi64x(std::ptr::read_unaligned(aq.add(8 * k) as *const i64));
    let a = [bq(0), bq(1), bq(2), bq(3)];
    let sc = _mm256_mul_ps(u.d, _mm256_broadcast_ss(&ab.d));
    if SIGNED {
        let s = [
            _mm256_sign_epi8(a[0], u.s[0]),
            _mm256_sign_epi8(a[1], u.s[1]),
            _mm256_sign_epi8(a[2], u.s[2]),
            _mm256_sign_epi8(a[3], u.s[3]),
        ];
        let h = I::dot4(&u.w, &s);
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), sc, acc)
    } else {
        // |8 products| <= 8 * 31 * 127 < 2^15: i16 sums cannot overflow
        let h = I::dot4_narrow(&u.w, &a);
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), sc, acc);
        _mm256_fmadd_ps(u.m, _mm256_broadcast_ss(&ab.s), acc)
    }
}

/// 4 rows x T tokens over `nb` blocks. Accumulator lanes are [r0 r0 r1 r1 r2 r2 r3 r3].
#[inline(always)]
unsafe fn micro<I: Isa, const SIGNED: bool, const T: usize>(
    panel: *const u8,
    nb: usize,
    a: *const BlockQ8,
    astride: usize,
) -> [[f32; T]; PR] {
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let pb = panel.add(b * PB);
        let ld4 = |o: usize| {
            [
                ld256(pb.add(o)),
                ld256(pb.add(o + 32)),
                ld256(pb.add(o + 64)),
                ld256(pb.add(o + 96)),
            ]
        };
        let u = PanelBlock {
            w: ld4(0),
            s: if SIGNED {
                ld4(OFF_SGN)
            } else {
                [_mm256_setzero_si256(); 4]
            },
            d: _mm256_loadu_ps(pb.add(OFF_D) as *const f32),
            m: if SIGNED {
                _mm256_setzero_ps()
            } else {
                _mm256_loadu_ps(pb.add(OFF_M) as *const f32)
            },
        };
        for t in 0..T {
            acc[t] = block_token::<I, SIGNED>(&u, &*a.add(t * astride + b), acc[t]);
        }
    }
    finish(acc)
}

/// 4 rows (`nr` of them real) x T tokens straight from the packed weights: each
/// block is unpacked and transposed in registers once for the T tokens, with the
/// panel kernels' arithmetic (same results as the panel path for every token).
/// Prefetches `pf` bytes ahead like the decode kernel.
#[inline(always)]
pub(super) unsafe fn tile_steps<I: Isa, const K: u8, const T: usize>(
    w: *const u8,
    rb: usize,
    nr: usize,
    a: *const BlockQ8,
    astride: usize,
    nb: usize,
    pf: usize,
) -> [[f32; T]; PR] {
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let u = unpack_block::<K>(w, b, rb, nr, pf);
        for t in 0..T {
            let ab = &*a.add(t * astride + b);
            acc[t] = if q32_signed(K) {
                block_token::<I, true>(&u, ab, acc[t])
            } else {
                block_token::<I, false>(&u, ab, acc[t])
            };
        }
    }
    finish(acc)
}

/// [r0 r0 r1 r1 r2 r2 r3 r3] accumulators -> out[row][token].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn finish<const T: usize>(acc: [__m256; T]) -> [[f32; T]; PR] {
    let mut out = [[0f32; T]; PR];
    for t in 0..T {
        let mut c = [0f32; 8];
        _mm256_storeu_ps(c.as_mut_ptr(), acc[t]);
        for r in 0..PR {
            out[r][t] = c[2 * r] + c[2 * r + 1];
        }
    }
    out
}

/// Token tile sizes: `ntok` tokens split evenly into tiles of at most [`PT_MAX`],
/// so that small batches need few passes over a panel (tiles up to 8 wide), and
/// each tile size is a separate instantiation of the micro-kernel.
pub(super) const PT_MAX: usize = 8;

#[inline]
pub(super) fn tile_width(left: usize) -> usize {
    left.div_ceil(left.div_ceil(PT_MAX))
}

/// Runs `micro`-like kernel `$f::<.., T>` for every token tile of `t0..t1` and
/// stores rows `0..nr` of the results.
macro_rules! token_tiles {
    ($t0:expr, $t1:expr, $nr:expr, $y:expr, $ystride:expr, |$t:ident, $T:ident| $call:expr) => {{
        let mut t = $t0;
        while t < $t1 {
            let n = tile_width($t1 - t);
            macro_rules! go {
                ($n:literal) => {{
                    const $T: usize = $n;
                    let $t = t;
                    let o: [[f32; $n]; PR] = $call;
                    for r in 0..$nr {
                        for j in 0..$n {
                            *$y.add((t + j) * $ystride + r) = o[r][j];
                        }
                    }
                }};
            }
            match n {
                1 => go!(1),
                2 => go!(2),
                3 => go!(3),
                4 => go!(4),
                5 => go!(5),
                6 => go!(6),
                7 => go!(7),
                _ => go!(8),
            }
            t += n;
        }
    }};
}
pub(super) use token_tiles;

/// All rows and tokens of `o`. Every token gets the same operations whatever the number of
/// tokens is (1 included).
#[inline(always)]
pub(super) unsafe fn gemm_panel_q32<I: Isa, const K: u8>(o: Operands<BlockQ8>) {
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
    let mut buf = PANEL.with(|c| c.take());
    buf.resize((nb * PB).div_ceil(8), 0); // u64-backed: 8-byte aligned f32/i16 fields
    let panel = buf.as_mut_ptr() as *mut u8;
    // tokens per chunk: keep the chunk's activations within ~256 KiB (L2)
    let tch = ((256 << 10) / (nb * size_of::<BlockQ8>())).clamp(16, 192) / PT * PT;
    // few tokens: weights stream from memory once, prefetch the next panel
    let pf = if ntok <= tch { PR * rb } else { 0 };
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + tch).min(ntok);
        let mut r = 0;
        while r < nrows {
            let nr = (nrows - r).min(PR);
            unpack_panel::<K>(w.add(r * rb), rb, nr, nb, panel, pf);
            let yr = y.add(r);
            if q32_signed(K) {
                token_tiles!(tc, te, nr, yr, ystride, |t, T| micro::<I, true, T>(
                    panel,
                    nb,
                    a.add(t * nb),
                    nb
                ));
            } else {
                token_tiles!(tc, te, nr, yr, ystride, |t, T| micro::<I, false, T>(
                    panel,
                    nb,
                    a.add(t * nb),
                    nb
                ));
            }
            r += PR;
        }
        tc = te;
    }
    PANEL.with(|c| c.set(buf));
}

/// Small batches: the rows of `o` in tiles of 4, each block unpacked in registers
/// once per token tile ([`tile_steps`]), the next row tile prefetched as in decode.
/// Same results as [`gemm_panel_q32`].
#[inline(always)]
pub(super) unsafe fn gemm_steps_q32<I: Isa, const K: u8>(o: Operands<BlockQ8>) {
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
    let mut r = 0;
    while r < nrows {
        let nr = (nrows - r).min(PR);
        let wr = w.add(r * rb);
        let yr = y.add(r);
        // the first token tile streams the weights; the next ones find them in cache
        let mut pf = PR * rb;
        token_tiles!(0, ntok, nr, yr, ystride, |t, T| {
            let o = tile_steps::<I, K, T>(wr, rb, nr, a.add(t * nb), nb, nb, pf);
            pf = 0;
            o
        });
        r += PR;
    }
}

// ---------------------------------------------------------------------------
// K-quants (Q4_K, Q5_K, Q6_K) prefill path.
//
// Panel of 4 rows per 256-element super-block (same broadcast layout as above):
//   vals [8 sub-blocks][4 steps][4 rows x 8 bytes]   unsigned values
//   scl  Q4_K/Q5_K: [8 sub-blocks][r0 x4, r1 x4, r2 x4, r3 x4] i16
//        Q6_K:      [16 groups of 16][same]
//   minv [4 steps][4 rows x 4 i16]: factors of the 16 activation bsums
//        (Q4_K/Q5_K: min of sub-block g/2; Q6_K: scale of group g)
//   d8, dmin8: [d0 d0 d1 d1 d2 d2 d3 d3] (f32)

const KPB_VALS: usize = 0;
const KPB_SCL: usize = 1024;
const KPB_MINV: usize = 1024 + 512;
const KPB_D: usize = KPB_MINV + 128;
const KPB_DMIN: usize = KPB_D + 32;
const KPB: usize = KPB_DMIN + 32;

/// Unpacks rows `0..nr` (nr <= 4) of `nb` super-blocks of a K-quant into the panel.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_panel_k<const K: u8>(
    w: *const u8,
    rb: usize,
    nr: usize,
    nb: usize,
    panel: *mut u8,
    pf: usize,
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let two = _mm256_set1_epi8(2);
    for b in 0..nb {
        let pb = panel.add(b * KPB);
        let scl = pb.add(KPB_SCL) as *mut i16;
        let minv = pb.add(KPB_MINV) as *mut i16;
        let d8 = pb.add(KPB_D) as *mut f32;
        let dmin8 = pb.add(KPB_DMIN) as *mut f32;
        // vals[j][r]: 32 values of sub-block j of row r
        let mut vals = [[_mm256_setzero_si256(); PR]; 8];
        // per row: 16 group scales (Q6_K) or 8 sub-block scales; 16 bsum factors
        // (as i16 vectors; Q4_K/Q5_K scales in the low 128 bits)
        let mut gs = [_mm256_setzero_si256(); PR];
        let mut bf = [_mm256_setzero_si256(); PR];
        let mut dd = [0f32; PR];
        let mut dm = [0f32; PR];
        for r in 0..nr {
            let p = w.add(r * rb + b * K_BLOCK_BYTES[K as usize]);
            if pf != 0 {
                prefetch(p.wrapping_add(pf), K_BLOCK_BYTES[K as usize]);
            }
            if K == K_Q6K {
                dd[r] = f16_ld(p.add(208));
                let sc = p.add(192) as *const i8;
                for n in 0..2 {
                    let qla = ld256(p.add(64 * n));
                    let qlb = ld256(p.add(64 * n + 32));
                    let qh = ld256(p.add(128 + 32 * n));
                    vals[4 * n][r] = _mm256_or_si256(
                        _mm256_and_si256(qla, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3)),
                    );
                    vals[4 * n + 1][r] = _mm256_or_si256(
                        _mm256_and_si256(qlb, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m3)),
                    );
                    vals[4 * n + 2][r] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qla), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m3)),
                    );
                    vals[4 * n + 3][r] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qlb), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m3)),
                    );
                }
                gs[r] = _mm256_cvtepi8_epi16(ld128(sc as *const u8));
                bf[r] = gs[r];
            } else {
                let five = K == K_Q5K;
                dd[r] = f16_ld(p);
                dm[r] = f16_ld(p.add(2));
                let (sc, mn) = scale_min_bytes_k4(p.add(4));
                let qs = p.add(if five { 48 } else { 16 });
                let qhv = if five {
                    ld256(p.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                for jj in 0..4 {
                    let q = ld256(qs.add(32 * jj));
                    let mut lo = _mm256_and_si256(q, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    if five {
                        let h = _mm256_srl_epi16(qhv, _mm_cvtsi32_si128(2 * jj as i32));
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(h, one)));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16::<3>(_mm256_and_si256(h, two)));
                    }
                    vals[2 * jj][r] = lo;
                    vals[2 * jj + 1][r] = hi;
                }
                let s16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
                let m16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                gs[r] = _mm256_castsi128_si256(s16);
                // factor g of the 16 bsums: min of sub-block g / 2
                bf[r] =
                    _mm256_set_m128i(_mm_unpackhi_epi16(m16, m16), _mm_unpacklo_epi16(m16, m16));
            }
        }
        for j in 0..8 {
            store_steps(vals[j], pb.add(KPB_VALS + 128 * j));
        }
        // scale vector of group g: [gs0[g] x4, gs1[g] x4, gs2[g] x4, gs3[g] x4]
        let halves = if K == K_Q6K { 2 } else { 1 };
        for h in 0..halves {
            let (ga, gb) = if h == 0 {
                (
                    _mm256_permute2x128_si256::<0x20>(gs[0], gs[2]),
                    _mm256_permute2x128_si256::<0x20>(gs[1], gs[3]),
                )
            } else {
                (
                    _mm256_permute2x128_si256::<0x31>(gs[0], gs[2]),
                    _mm256_permute2x128_si256::<0x31>(gs[1], gs[3]),
                )
            };
            for j in 0..8 {
                let ctl = _mm256_set1_epi16((((2 * j + 1) << 8) | (2 * j)) as i16);
                let v = _mm256_blend_epi32::<0b1100_1100>(
                    _mm256_shuffle_epi8(ga, ctl),
                    _mm256_shuffle_epi8(gb, ctl),
                );
                _mm256_storeu_si256(scl.add(16 * (8 * h + j)) as *mut __m256i, v);
            }
        }
        // step q of the bsum factors: factors 4q..4q+4 of rows 0, 1, 2, 3
        store_steps(bf, minv as *mut u8);
        for r in 0..PR {
            *d8.add(2 * r) = dd[r];
            *d8.add(2 * r + 1) = dd[r];
            *dmin8.add(2 * r) = dm[r];
            *dmin8.add(2 * r + 1) = dm[r];
        }
    }
}

const K_BLOCK_BYTES: [usize; 9] = [0, 0, 0, 0, 0, 144, 176, 210, 292];

/// 4 rows x T tokens over `nb` super-blocks; accumulator lanes [r0 r0 r1 r1 r2 r2 r3 r3].
#[inline(always)]
unsafe fn micro_k<I: Isa, const BITS: u32, const T: usize>(
    panel: *const u8,
    nb: usize,
    a: *const BlockQ8K,
    astride: usize,
) -> [[f32; T]; PR] {
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        micro_k_block::<I, BITS, T>(panel.add(b * KPB), a.add(b), astride, &mut acc);
    }
    finish(acc)
}

/// Adds one token's products with a K-quant sub-block of 32 values (its four steps `w`; the
/// token's 32 activation bytes at `aq`) to `isum`: Q6_K (`BITS` 6) scales each 16-value half by
/// its own `s[0]`, `s[1]`; Q4_K/Q5_K (`BITS` 4, 5) the whole sub-block by `s[0]`. Lanes
/// [r0 r0 r1 r1 r2 r2 r3 r3]. Shared by the panel and rows4 kernels, so that both give the same
/// bits.
#[inline(always)]
pub(super) unsafe fn k_sub_block<I: Isa, const BITS: u32>(
    w: &[__m256i; 4],
    s: &[__m256i; 2],
    aq: *const u8,
    isum: __m256i,
) -> __m256i {
    let bq = |p: *const u8| _mm256_set1_epi64x(std::ptr::read_unaligned(p as *const i64));
    if BITS == 4 {
        // a lane's 16 products: |sum| <= 16 * 15 * 127 < 2^15
        let a = [bq(aq), bq(aq.add(8)), bq(aq.add(16)), bq(aq.add(24))];
        return I::dot4_scaled(isum, w, &a, s[0]);
    }
    let mb = |k: usize| _mm256_maddubs_epi16(w[k], bq(aq.add(8 * k)));
    if BITS == 6 {
        // |4 products| <= 4 * 63 * 127 < 2^15
        let pa = _mm256_add_epi16(mb(0), mb(1));
        let pb = _mm256_add_epi16(mb(2), mb(3));
        I::madd_acc(I::madd_acc(isum, pa, s[0]), pb, s[1])
    } else {
        // |8 products| <= 8 * 31 * 127 < 2^15
        let p = _mm256_add_epi16(
            _mm256_add_epi16(mb(0), mb(1)),
            _mm256_add_epi16(mb(2), mb(3)),
        );
        I::madd_acc(isum, p, s[0])
    }
}

/// One token's float step for a K-quant super-block: the integer sum `isum` less the mins term
/// (the bsums times the factors `m`, four steps of [4 rows x 4 i16]: Q4_K/Q5_K subtract it scaled
/// by dmin, Q6_K subtract 32 times it, its -32 offset, in integers), scaled by d and the token's
/// d, added to `acc`. Shared by the panel and rows4 kernels.
#[inline(always)]
pub(super) unsafe fn k_block_token<I: Isa, const SIX: bool>(
    acc: __m256,
    isum: __m256i,
    m: &[__m256i; 4],
    d8: __m256,
    dmin8: __m256,
    ab: &BlockQ8K,
) -> __m256 {
    let bp = ab.bsums.as_ptr() as *const u8;
    let bq = |k: usize| _mm256_set1_epi64x(std::ptr::read_unaligned(bp.add(8 * k) as *const i64));
    let mi = (0..4).fold(_mm256_setzero_si256(), |mi, k| I::madd_acc(mi, bq(k), m[k]));
    let da = _mm256_broadcast_ss(&ab.d);
    if SIX {
        let i = _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(mi));
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(d8, da), acc)
    } else {
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d8, da), acc);
        _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mi), _mm256_mul_ps(dmin8, da), acc)
    }
}

/// One super-block `pb` of the panel against T tokens (block `a` of token 0,
/// the next tokens `astride` blocks apart), added to `acc`.
#[inline(always)]
unsafe fn micro_k_block<I: Isa, const BITS: u32, const T: usize>(
    pb: *const u8,
    a: *const BlockQ8K,
    astride: usize,
    acc: &mut [__m256; T],
) {
    let mut isum = [_mm256_setzero_si256(); T];
    for j in 0..8 {
        let vp = pb.add(KPB_VALS + 128 * j);
        let w = [
            ld256(vp),
            ld256(vp.add(32)),
            ld256(vp.add(64)),
            ld256(vp.add(96)),
        ];
        let s = if BITS == 6 {
            let sp = pb.add(KPB_SCL + 64 * j);
            [ld256(sp), ld256(sp.add(32))]
        } else {
            [ld256(pb.add(KPB_SCL + 32 * j)); 2]
        };
        for t in 0..T {
            let aq = (*a.add(t * astride)).qs.as_ptr() as *const u8;
            isum[t] = k_sub_block::<I, BITS>(&w, &s, aq.add(32 * j), isum[t]);
        }
    }
    let mv = pb.add(KPB_MINV);
    let m = [
        ld256(mv),
        ld256(mv.add(32)),
        ld256(mv.add(64)),
        ld256(mv.add(96)),
    ];
    let d8 = _mm256_loadu_ps(pb.add(KPB_D) as *const f32);
    let dmin8 = _mm256_loadu_ps(pb.add(KPB_DMIN) as *const f32);
    for t in 0..T {
        let ab = &*a.add(t * astride);
        acc[t] = if BITS == 6 {
            k_block_token::<I, true>(acc[t], isum[t], &m, d8, dmin8, ab)
        } else {
            k_block_token::<I, false>(acc[t], isum[t], &m, d8, dmin8, ab)
        };
    }
}

/// Sub-block `j` of the Q4_K rows4 group-block at `p` (layout.rs): its four steps (two loads of
/// nibbles) and its scales spread to [r0 x4, r1 x4 | r2 x4, r3 x4] i16 by one byte shuffle of
/// the group-block's scale bytes `sc[0]` ([`k_rows4_scales`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_rows4_sub_block(
    p: *const u8,
    j: usize,
    sc: &[__m256i; 2],
) -> ([__m256i; 4], [__m256i; 2]) {
    let m4 = _mm256_set1_epi8(0x0f);
    let (va, vb) = (ld256(p.add(64 * j)), ld256(p.add(64 * j + 32)));
    let w = [
        _mm256_and_si256(va, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(va), m4),
        _mm256_and_si256(vb, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(vb), m4),
    ];
    let s = _mm256_shuffle_epi8(sc[0], shuffle_control(&Q4K_SCALE_SPREAD[j]));
    (w, [s; 2])
}

/// A 16-byte shuffle control, the same in both 128-bit halves. Loaded from a table rather than
/// built from a loop index, which would cost a chain of byte inserts per use.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn shuffle_control(c: &[i8; 16]) -> __m256i {
    _mm256_broadcastsi128_si256(_mm_loadu_si128(c.as_ptr() as *const __m128i))
}

/// Byte-shuffle controls that spread 8 chosen bytes of a 128-bit half to 8 i16 lanes: byte
/// `idx[i]` goes to the low byte of lane i (`HIGH` false, zero-extended) or to its high byte
/// (`HIGH` true, for a following arithmetic shift that sign-extends it); -128 clears a byte.
const fn spread_control<const HIGH: bool>(idx: [i8; 8]) -> [i8; 16] {
    let mut c = [-128i8; 16];
    let mut i = 0;
    while i < 8 {
        c[2 * i + HIGH as usize] = idx[i];
        i += 1;
    }
    c
}

/// Controls that spread scale byte `i` of each row of a 128-bit half (bytes `i` and `8 + i`, for
/// its two rows) to four i16 lanes per row, for `i` in 0..8.
const fn scale_spread<const HIGH: bool>() -> [[i8; 16]; 8] {
    let mut t = [[0i8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let (lo, hi) = (i as i8, 8 + i as i8);
        t[i] = spread_control::<HIGH>([lo, lo, lo, lo, hi, hi, hi, hi]);
        i += 1;
    }
    t
}

/// Controls for Q4_K rows4 sub-block `j` (zero-extended: its scales are unsigned).
const Q4K_SCALE_SPREAD: [[i8; 16]; 8] = scale_spread::<false>();

/// Controls for Q6_K rows4 group `g % 8` of a half of the scale bytes (for [`spread_i8`]).
pub(super) const Q6K_SCALE_SPREAD: [[i8; 16]; 8] = scale_spread::<true>();

/// Controls for the Q6_K bsum factors of step q (its group scales 4 (q % 2)..+4 per row).
pub(super) const Q6K_MINS_SPREAD: [[i8; 16]; 2] = {
    let mut t = [[0i8; 16]; 2];
    let mut h = 0;
    while h < 2 {
        let o = 4 * h as i8;
        t[h] = spread_control::<true>([o, o + 1, o + 2, o + 3, o + 8, o + 9, o + 10, o + 11]);
        h += 1;
    }
    t
};

/// The i8 bytes of each 128-bit half of `v` that control `c` (a `spread_control::<true>`) picks,
/// as sign-extended i16 lanes (each byte shuffled to the high half of its lane, then an
/// arithmetic shift).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn spread_i8(v: __m256i, c: &[i8; 16]) -> __m256i {
    _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(v, shuffle_control(c)))
}

/// The scale bytes of the Q4_K (SIX = false) or Q6_K rows4 group-block at `p`, loaded once per
/// group-block: Q4_K's 32 in `[0]`, Q6_K's groups `8h..8h + 8` in `[h]`. Row r's sit at
/// 8 (r % 2) in the 128-bit half of rows 2 (r / 2), 2 (r / 2) + 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k_rows4_scales<const SIX: bool>(p: *const u8) -> [__m256i; 2] {
    if SIX {
        [ld256(p.add(Q6K_SCALES)), ld256(p.add(Q6K_SCALES + 32))]
    } else {
        [ld256(p.add(Q4K_SCALES)), _mm256_setzero_si256()]
    }
}

/// Sub-block `j` of the Q6_K rows4 group-block at `p`: steps 0-2 as 6-bit values from three
/// loads, step 3 from their top bits, and the scales of its two groups of 16 from `sc`
/// ([`k_rows4_scales`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k_rows4_sub_block(
    p: *const u8,
    j: usize,
    sc: &[__m256i; 2],
) -> ([__m256i; 4], [__m256i; 2]) {
    let m3f = _mm256_set1_epi8(0x3f);
    let v = |i: usize| ld256(p.add(96 * j + 32 * i));
    let (va, vb, vc) = (v(0), v(1), v(2));
    let top = _mm256_or_si256(
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<6>(va), _mm256_set1_epi8(0x03)),
            _mm256_and_si256(_mm256_srli_epi16::<4>(vb), _mm256_set1_epi8(0x0c)),
        ),
        _mm256_and_si256(_mm256_srli_epi16::<2>(vc), _mm256_set1_epi8(0x30)),
    );
    let w = [
        _mm256_and_si256(va, m3f),
        _mm256_and_si256(vb, m3f),
        _mm256_and_si256(vc, m3f),
        top,
    ];
    let group = |g: usize| spread_i8(sc[g / 8], &Q6K_SCALE_SPREAD[g % 8]);
    (w, [group(2 * j), group(2 * j + 1)])
}

/// The bsum factors (four steps, as the panel's minv), d8 and dmin8 of the Q4_K (SIX = false)
/// or Q6_K rows4 group-block at `p`: Q4_K's mins of sub-blocks 2q, 2q + 1 as
/// [m m m' m'] per row; Q6_K's group scales 4q..4q + 4 per row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k_rows4_mins_d<const SIX: bool>(
    p: *const u8,
    sc: &[__m256i; 2],
) -> ([__m256i; 4], __m256, __m256) {
    let f16x8 = |o: usize| {
        let x = _mm_loadl_epi64(p.add(o) as *const __m128i);
        _mm256_cvtph_ps(_mm_unpacklo_epi16(x, x))
    };
    if SIX {
        let m = |q: usize| spread_i8(sc[q / 2], &Q6K_MINS_SPREAD[q % 2]);
        let m = [m(0), m(1), m(2), m(3)];
        (m, f16x8(Q6K_D), _mm256_setzero_ps())
    } else {
        let m = |q: usize| {
            let x = _mm_loadl_epi64(p.add(Q4K_MINS + 8 * q) as *const __m128i);
            _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x, x))
        };
        let m = [m(0), m(1), m(2), m(3)];
        (m, f16x8(Q4K_D), f16x8(Q4K_DMIN))
    }
}

/// Q4_K (SIX = false) or Q6_K rows4 group-blocks (layout.rs) at `w` x T tokens over `nb`
/// super-blocks: each sub-block unpacked in registers once for the T tokens, then the panel
/// kernels' arithmetic (the same bits as the GGUF panel path, for every token count).
/// Prefetches `pf` bytes ahead (0: none).
#[inline(always)]
unsafe fn tile_k_rows4<I: Isa, const SIX: bool, const T: usize>(
    w: *const u8,
    a: *const BlockQ8K,
    astride: usize,
    nb: usize,
    pf: usize,
) -> [[f32; T]; PR] {
    let gb = if SIX { 840 } else { Q4K_GROUP_BYTES };
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let p = w.add(b * gb);
        if pf != 0 {
            prefetch(p.wrapping_add(pf), gb);
        }
        let sc = k_rows4_scales::<SIX>(p);
        let mut isum = [_mm256_setzero_si256(); T];
        for j in 0..8 {
            let (steps, s) = if SIX {
                q6k_rows4_sub_block(p, j, &sc)
            } else {
                q4k_rows4_sub_block(p, j, &sc)
            };
            for t in 0..T {
                let aq = (*a.add(t * astride + b)).qs.as_ptr() as *const u8;
                isum[t] = if SIX {
                    k_sub_block::<I, 6>(&steps, &s, aq.add(32 * j), isum[t])
                } else {
                    k_sub_block::<I, 4>(&steps, &s, aq.add(32 * j), isum[t])
                };
            }
        }
        let (m, d8, dmin8) = k_rows4_mins_d::<SIX>(p, &sc);
        for t in 0..T {
            acc[t] =
                k_block_token::<I, SIX>(acc[t], isum[t], &m, d8, dmin8, &*a.add(t * astride + b));
        }
    }
    finish(acc)
}

/// How far ahead of the group-block it reads the rows4 K-quant kernel prefetches in decode (one
/// token), in bytes, at most. The weights are one sequential stream that the hardware prefetcher
/// follows; a software prefetch a whole group of four rows ahead (tens of KiB on long rows) made
/// long rows stream more slowly than one that covers the next group-block or two, while prefill,
/// which spends long on each group, did better with the far one (docs/BENCHMARKS.md).
const K_ROWS4_DECODE_PREFETCH: usize = 1024;

/// Q4_K (SIX = false) or Q6_K rows4 weights (`o.nrows` a multiple of 4), all tokens of `o`, for
/// every token count: tokens in chunks whose activations stay in L2,
/// each group of four rows through all tokens of a chunk in tiles of up to 8, the next group
/// prefetched by the first tile.
#[inline(always)]
pub(super) unsafe fn gemm_k_rows4<I: Isa, const SIX: bool>(o: Operands<BlockQ8K>) {
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
    let tch = ((256 << 10) / (nb * size_of::<BlockQ8K>())).clamp(16, 192) / PT_MAX * PT_MAX;
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + tch).min(ntok);
        let pairs = (I::PAIRS && te - tc >= 2).then(|| Interleaved::new(a, nb, tc, te));
        let mut r = 0;
        while r < nrows {
            let (wr, yr) = (w.add(r * rb), y.add(r));
            let mut pf = if ntok == 1 {
                (PR * rb).min(K_ROWS4_DECODE_PREFETCH)
            } else {
                PR * rb
            };
            token_tiles!(tc, te, PR, yr, ystride, |t, T| {
                let at = a.add(t * nb);
                let o = match &pairs {
                    Some(p) if T >= 2 => {
                        tile_k_rows4_pairs::<I, SIX, T>(wr, at, nb, nb, p.tile(t - tc, nb), pf)
                    }
                    _ => tile_k_rows4::<I, SIX, T>(wr, at, nb, nb, pf),
                };
                pf = 0;
                o
            });
            r += PR;
        }
        tc = te;
    }
}

/// All rows and tokens of `o` (Q4_K, Q5_K or Q6_K in the GGUF layout).
#[inline(always)]
pub(super) unsafe fn gemm_panel_k<I: Isa, const K: u8>(o: Operands<BlockQ8K>) {
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
    const KT: usize = 4;
    let mut buf = PANEL.with(|c| c.take());
    buf.resize((nb * KPB).div_ceil(8), 0);
    let panel = buf.as_mut_ptr() as *mut u8;
    let tch = ((256 << 10) / (nb * size_of::<BlockQ8K>())).clamp(16, 192) / KT * KT;
    let pf = if ntok <= tch { PR * rb } else { 0 };
    let mut tc = 0;
    while tc < ntok {
        let te = (tc + tch).min(ntok);
        let mut r = 0;
        while r < nrows {
            let nr = (nrows - r).min(PR);
            unpack_panel_k::<K>(w.add(r * rb), rb, nr, nb, panel, pf);
            let yr = y.add(r);
            macro_rules! micro {
                ($bits:literal) => {
                    token_tiles!(tc, te, nr, yr, ystride, |t, T| micro_k::<I, $bits, T>(
                        panel,
                        nb,
                        a.add(t * nb),
                        nb
                    ))
                };
            }
            match K {
                K_Q6K => micro!(6),
                K_Q5K => micro!(5),
                _ => micro!(4),
            }
            r += PR;
        }
        tc = te;
    }
    PANEL.with(|c| c.set(buf));
}
