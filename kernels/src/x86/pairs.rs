//! The Q4_K and Q6_K rows4 kernels of batches with two tokens in each 512-bit register (AVX-512
//! levels); kquant_low.rs uses the same pieces for Q2_K and Q3_K.
//!
//! The 256-bit kernels (panel.rs: `tile_k_rows4`) meet a sub-block's step vectors, four rows of
//! 8 bytes each, with one token's 8 activation bytes broadcast to the four rows. Here each row's
//! 8 bytes are doubled ([r0 r0 r1 r1 r2 r2 r3 r3] in 64-bit units) and met by two tokens' 8
//! bytes ([t u t u t u t u]), so one `vpdpbusd` does the work of two. Two tokens' bytes come from
//! one 16-byte broadcast load because the activations are first copied into [`Interleaved`]
//! form, once per chunk of tokens for all the rows. The integer sums are the 256-bit kernels'
//! (every product and partial sum is the same integer); each super-block's are split back into
//! one register per token before the float step, which is theirs, so the bits are the same for
//! every token whatever the tiles are.
//!
//! This pays where a 512-bit product costs what a 256-bit one does (AMD Zen 5: twice the
//! multiply-adds per cycle, measured by `bench`); AMD Zen 4 splits it in two halves.

use super::isa::Isa;
use super::panel::{
    finish, k_block_token, k_rows4_mins_d, k_rows4_scales, k_sub_block, q4k_rows4_sub_block,
    q6k_rows4_sub_block, tile_width, PR,
};
use super::simd::prefetch;
use crate::layout::{BlockQ8K, Q4K_GROUP_BYTES};
use std::arch::x86_64::*;

/// The features every function here is compiled with: those of the AVX-512 VNNI level.
macro_rules! avx512 {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            $item
        )*
    };
}

/// Bytes of one super-block of a pair of tokens: 256 activation bytes each.
pub(super) const PAIR_BLOCK: usize = 512;

/// The activation bytes of a chunk of tokens, in pairs: pair `i` of a tile whose first token is
/// `u` tokens into the chunk is slot `u / 2 + i` (distinct for every pair, since a pair's
/// tokens belong to no other pair); in a slot, super-block `b`, sub-block `j`, step `k` holds
/// the first token's 8 bytes then the second's, at `512 b + 64 j + 16 k`.
pub(super) struct Interleaved {
    bytes: Vec<u64>,
}

thread_local! {
    static BUFFER: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Interleaved {
    /// Tokens `t0..t1` of `a` (`nb` super-blocks per token), paired as the token tiles of
    /// `tile_width` pair them.
    ///
    /// # Safety
    /// `a` must hold `t1` tokens of `nb` blocks.
    pub(super) unsafe fn new(a: *const BlockQ8K, nb: usize, t0: usize, t1: usize) -> Interleaved {
        let mut bytes = BUFFER.with(|c| c.take());
        bytes.clear();
        bytes.resize((t1 - t0).div_ceil(2) * nb * PAIR_BLOCK / 8, 0);
        let mut t = t0;
        while t < t1 {
            let n = tile_width(t1 - t);
            for i in (0..n - 1).step_by(2) {
                let slot = (t + i - t0) / 2;
                let out = &mut bytes[slot * nb * PAIR_BLOCK / 8..][..nb * PAIR_BLOCK / 8];
                for b in 0..nb {
                    let (x, y) = (&*a.add((t + i) * nb + b), &*a.add((t + i + 1) * nb + b));
                    let eight = |q: &[i8; 256], c: usize| {
                        std::ptr::read_unaligned(q.as_ptr().add(8 * c) as *const u64)
                    };
                    for c in 0..32 {
                        out[b * PAIR_BLOCK / 8 + 2 * c] = eight(&x.qs, c);
                        out[b * PAIR_BLOCK / 8 + 2 * c + 1] = eight(&y.qs, c);
                    }
                }
            }
            t += n;
        }
        Interleaved { bytes }
    }

    /// The first pair of the tile whose first token is `u` tokens into the chunk.
    pub(super) fn tile(&self, u: usize, nb: usize) -> *const u8 {
        self.bytes[(u / 2) * nb * PAIR_BLOCK / 8..].as_ptr() as *const u8
    }
}

impl Drop for Interleaved {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        BUFFER.with(|c| c.set(bytes));
    }
}

avx512! {
    /// Each row's 8 bytes of a step vector twice: [r0 r0 r1 r1 r2 r2 r3 r3] in 64-bit units.
    #[inline]
    pub(super) unsafe fn doubled(v: __m256i) -> __m512i {
        _mm512_permutexvar_epi64(_mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0), _mm512_castsi256_si512(v))
    }

    /// A pair's integer sums, [r0 t, r0 u, r1 t, ...] in 64-bit units, as one 256-bit register per
    /// token in the 256-bit kernels' lanes ([r0 r0 r1 r1 r2 r2 r3 r3] in 32-bit lanes).
    #[inline]
    pub(super) unsafe fn split(v: __m512i) -> (__m256i, __m256i) {
        let v = _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), v);
        (_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
    }

    /// [`k_sub_block`] for a pair of tokens: the steps and scales doubled, the pair's 64
    /// interleaved activation bytes of the sub-block at `ap`.
    #[inline]
    pub(super) unsafe fn k_sub_block_pair<const SIX: bool>(
        w: &[__m512i; 4],
        s: &[__m512i; 2],
        ap: *const u8,
        isum: __m512i,
    ) -> __m512i {
        let a = |k: usize| _mm512_broadcast_i32x4(_mm_loadu_si128(ap.add(16 * k) as *const __m128i));
        if SIX {
            // as k_sub_block: |4 products| <= 4 * 63 * 127 < 2^15
            let mb = |k: usize| _mm512_maddubs_epi16(w[k], a(k));
            let pa = _mm512_add_epi16(mb(0), mb(1));
            let pb = _mm512_add_epi16(mb(2), mb(3));
            _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(isum, pa, s[0]), pb, s[1])
        } else {
            // as k_sub_block: a lane's 16 products fit in i16, so its i32 sum is the i16 sum
            // sign-extended, and the scale goes in the low half alone
            let d = (0..4).fold(_mm512_setzero_si512(), |d, k| _mm512_dpbusd_epi32(d, w[k], a(k)));
            let s_low = _mm512_and_si512(s[0], _mm512_set1_epi32(0xffff));
            _mm512_dpwssd_epi32(isum, d, s_low)
        }
    }

    /// `tile_k_rows4` with the tokens in pairs (`pairs`: the tile's first pair in
    /// [`Interleaved`] form) and, when T is odd, the last token alone as there.
    #[inline]
    pub(super) unsafe fn tile_k_rows4_pairs<I: Isa, const SIX: bool, const T: usize>(
        w: *const u8,
        a: *const BlockQ8K,
        astride: usize,
        nb: usize,
        pairs: *const u8,
        pf: usize,
    ) -> [[f32; T]; PR] {
        let gb = if SIX { 840 } else { Q4K_GROUP_BYTES };
        let np = T / 2;
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let p = w.add(b * gb);
            if pf != 0 {
                prefetch(p.wrapping_add(pf), gb);
            }
            let sc = k_rows4_scales::<SIX>(p);
            let mut isum = [_mm512_setzero_si512(); T];
            let mut last = _mm256_setzero_si256();
            for j in 0..8 {
                let (steps, s) = if SIX {
                    q6k_rows4_sub_block(p, j, &sc)
                } else {
                    q4k_rows4_sub_block(p, j, &sc)
                };
                let w2 = steps.map(|v| doubled(v));
                let s2 = [doubled(s[0]), if SIX { doubled(s[1]) } else { _mm512_setzero_si512() }];
                for (i, sum) in isum.iter_mut().enumerate().take(np) {
                    let ap = pairs.add(i * nb * PAIR_BLOCK + b * PAIR_BLOCK + 64 * j);
                    *sum = k_sub_block_pair::<SIX>(&w2, &s2, ap, *sum);
                }
                if T % 2 == 1 {
                    let aq = (*a.add((T - 1) * astride + b)).qs.as_ptr() as *const u8;
                    last = if SIX {
                        k_sub_block::<I, 6>(&steps, &s, aq.add(32 * j), last)
                    } else {
                        k_sub_block::<I, 4>(&steps, &s, aq.add(32 * j), last)
                    };
                }
            }
            let (m, d8, dmin8) = k_rows4_mins_d::<SIX>(p, &sc);
            let block = |t: usize| &*a.add(t * astride + b);
            for i in 0..np {
                let (x, y) = split(isum[i]);
                acc[2 * i] = k_block_token::<I, SIX>(acc[2 * i], x, &m, d8, dmin8, block(2 * i));
                acc[2 * i + 1] =
                    k_block_token::<I, SIX>(acc[2 * i + 1], y, &m, d8, dmin8, block(2 * i + 1));
            }
            if T % 2 == 1 {
                acc[T - 1] = k_block_token::<I, SIX>(acc[T - 1], last, &m, d8, dmin8, block(T - 1));
            }
        }
        finish(acc)
    }

    /// `iters` rounds of `C` 64-byte `vpdpbusd` chains (`product_chains` in isa.rs, at this
    /// width).
    #[inline]
    pub(super) unsafe fn product_chains<const C: usize>(iters: usize) -> i32 {
        let s = _mm512_set1_epi8(1);
        let mut acc: [__m512i; C] = std::array::from_fn(|i| _mm512_set1_epi32(i as i32));
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbusd_epi32(*a, *a, s);
            }
        }
        let sum = acc.iter().fold(_mm512_setzero_si512(), |x, a| _mm512_add_epi32(x, *a));
        _mm512_reduce_add_epi32(sum)
    }
}
