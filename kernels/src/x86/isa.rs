//! The integer products that differ between x86 feature levels, behind one trait, so that
//! every kernel is written once and compiled once per level.
//!
//! AVX2 multiplies u8 x i8 pairs into i16 (`maddubs`), widens pairs of those into i32 with
//! `madd`, then adds; VNNI does the three in one `vpdpbusd` (u8 x i8) or `vpdpwssd`
//! (i16 x i16). AVX-512 VNNI runs them here on 256-bit registers (AVX512VL), so the kernels
//! keep their layouts; AVX-VNNI (Intel since Alder Lake, AMD since Zen 5) is the same two
//! instructions in VEX encoding, for CPUs with no AVX-512.
//! Both produce the same integers (the kernels keep every i16 partial sum in range), so the
//! levels give bit-identical results.
//!
//! The products, and the kernels generic over [`Isa`], are `#[inline(always)]` with no target
//! features of their own: they take those of the function they are inlined into. Those are
//! the trait's entry points (`gemm_*`, one per kernel family, and `product_chains`), each
//! compiled with its level's features by `entry_points!`: `#[target_feature]` cannot vary with
//! a generic parameter, so each level's impl stamps them out.

use super::{decode, kquant_low, panel, Operands};
use crate::layout::{BlockQ8, BlockQ8K};
use std::arch::x86_64::*;

/// One x86 feature level's integer dot products (see the module docs).
pub(crate) trait Isa {
    /// Whether the level's K-quant rows4 batch kernels put two tokens in each 512-bit register
    /// (pairs.rs).
    const PAIRS: bool = false;

    /// i32 lanes: each lane's four u8 x i8 products of `u[k]` and `s[k]`, summed over k.
    /// Exact when every adjacent pair of products fits in i16.
    unsafe fn dot4(u: &[__m256i; 4], s: &[__m256i; 4]) -> __m256i;

    /// [`Isa::dot4`] where the sums over k of each adjacent pair of products also fit in i16
    /// (AVX2 adds them in i16 before widening once).
    unsafe fn dot4_narrow(u: &[__m256i; 4], s: &[__m256i; 4]) -> __m256i;

    /// `acc` + per i32 lane, the lane's four u8 x i8 products of `u` and `s` (one instruction's
    /// worth of the products [`Isa::dot4`] sums).
    unsafe fn dot_acc(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;

    /// `acc` + per i32 lane, the two i16 products of `p` and `s` (`madd`).
    unsafe fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i;

    /// `acc` + per i32 lane, `s` times [`Isa::dot4`] of `u` and `a`, where the sum of any of a
    /// lane's products fits in i16 and `s` holds one i16 scale twice in every lane.
    unsafe fn dot4_scaled(acc: __m256i, u: &[__m256i; 4], a: &[__m256i; 4], s: __m256i) -> __m256i;

    /// [`panel::gemm_steps_q32`] compiled for this level.
    unsafe fn gemm_steps_q32<const K: u8>(o: Operands<BlockQ8>);
    /// [`panel::gemm_panel_q32`] compiled for this level.
    unsafe fn gemm_panel_q32<const K: u8>(o: Operands<BlockQ8>);
    /// [`panel::gemm_k_rows4`] compiled for this level.
    unsafe fn gemm_k_rows4<const SIX: bool>(o: Operands<BlockQ8K>);
    /// [`panel::gemm_panel_k`] compiled for this level.
    unsafe fn gemm_panel_k<const K: u8>(o: Operands<BlockQ8K>);
    /// [`kquant_low::gemm_low_k`] compiled for this level.
    unsafe fn gemm_low_k<const Q3: bool>(o: Operands<BlockQ8K>);
    /// [`decode::gemm_small`] compiled for this level.
    unsafe fn gemm_small<const K: u8>(o: Operands<u8>);
    /// [`decode::gemm`] compiled for this level.
    unsafe fn gemm<const K: u8, const R: usize, const T: usize>(o: Operands<u8>);
    /// [`product_chains`] compiled for this level.
    unsafe fn product_chains(iters: usize) -> i32;
}

/// The [`Isa`] entry points of one level, compiled with its target features `$features`; the
/// K-quant kernels with the products of `$kquants` (the level's own by default).
macro_rules! entry_points {
    ($features:literal) => {
        entry_points!($features, Self);
    };
    ($features:literal, $kquants:ty) => {
        #[target_feature(enable = $features)]
        unsafe fn gemm_steps_q32<const K: u8>(o: Operands<BlockQ8>) {
            panel::gemm_steps_q32::<Self, K>(o)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemm_panel_q32<const K: u8>(o: Operands<BlockQ8>) {
            panel::gemm_panel_q32::<Self, K>(o)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemm_k_rows4<const SIX: bool>(o: Operands<BlockQ8K>) {
            panel::gemm_k_rows4::<$kquants, SIX>(o)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemm_panel_k<const K: u8>(o: Operands<BlockQ8K>) {
            panel::gemm_panel_k::<$kquants, K>(o)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemm_low_k<const Q3: bool>(o: Operands<BlockQ8K>) {
            kquant_low::gemm_low_k::<$kquants, Q3>(o)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemm_small<const K: u8>(o: Operands<u8>) {
            decode::gemm_small::<Self, K>(o)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemm<const K: u8, const R: usize, const T: usize>(o: Operands<u8>) {
            decode::gemm::<Self, K, R, T>(o)
        }
        #[target_feature(enable = $features)]
        unsafe fn product_chains(iters: usize) -> i32 {
            self::product_chains::<Self>(iters)
        }
    };
}

/// AVX2 + FMA + F16C.
pub(crate) struct Avx2;

/// AVX-VNNI (VEX-encoded `vpdpbusd`, `vpdpwssd`), plus AVX2 + FMA + F16C. Its K-quant kernels
/// keep AVX2's products: with the VNNI ones they prefilled the 1.5B test model 12-15% slower than
/// the AVX2 level on a Zen 5 (docs/BENCHMARKS.md), where the 32-element formats gained.
pub(crate) struct AvxVnni;

/// AVX-512 F/BW/VL with VNNI (on 256-bit registers), plus AVX2 + FMA + F16C.
pub(crate) struct Avx512Vnni;

impl Isa for Avx2 {
    #[inline(always)]
    unsafe fn dot4(u: &[__m256i; 4], s: &[__m256i; 4]) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let p = |k: usize| _mm256_madd_epi16(_mm256_maddubs_epi16(u[k], s[k]), ones);
        _mm256_add_epi32(_mm256_add_epi32(p(0), p(1)), _mm256_add_epi32(p(2), p(3)))
    }

    #[inline(always)]
    unsafe fn dot4_narrow(u: &[__m256i; 4], s: &[__m256i; 4]) -> __m256i {
        let p = |k: usize| _mm256_maddubs_epi16(u[k], s[k]);
        let h = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
        _mm256_madd_epi16(h, _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
        _mm256_add_epi32(acc, p)
    }

    #[inline(always)]
    unsafe fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
    }

    #[inline(always)]
    unsafe fn dot4_scaled(acc: __m256i, u: &[__m256i; 4], a: &[__m256i; 4], s: __m256i) -> __m256i {
        // any partial sum of the lane fits in i16, so the i16 adds cannot overflow
        let p = |k: usize| _mm256_maddubs_epi16(u[k], a[k]);
        let h = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
        Self::madd_acc(acc, h, s)
    }

    entry_points!("avx2,fma,f16c");
}

/// The [`Isa`] of a level whose products are `vpdpbusd` (`$dpbusd`) and `vpdpwssd`
/// (`$dpwssd`), compiled with `$features`.
macro_rules! vnni_isa {
    ($level:ty, $dpbusd:ident, $dpwssd:ident, $features:literal, $pairs:literal, $kquants:ty) => {
        impl Isa for $level {
            const PAIRS: bool = $pairs;

            #[inline(always)]
            unsafe fn dot4(u: &[__m256i; 4], s: &[__m256i; 4]) -> __m256i {
                (0..4).fold(_mm256_setzero_si256(), |h, k| Self::dot_acc(h, u[k], s[k]))
            }

            #[inline(always)]
            unsafe fn dot4_narrow(u: &[__m256i; 4], s: &[__m256i; 4]) -> __m256i {
                Self::dot4(u, s)
            }

            #[inline(always)]
            unsafe fn dot_acc(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
                $dpbusd(acc, u, s)
            }

            #[inline(always)]
            unsafe fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
                $dpwssd(acc, p, s)
            }

            #[inline(always)]
            unsafe fn dot4_scaled(
                acc: __m256i,
                u: &[__m256i; 4],
                a: &[__m256i; 4],
                s: __m256i,
            ) -> __m256i {
                // the i32 sum fits in i16: its low half is the sum and its high half the sign,
                // so the scale goes in the low half alone
                let s_low = _mm256_and_si256(s, _mm256_set1_epi32(0xffff));
                $dpwssd(acc, Self::dot4(u, a), s_low)
            }

            entry_points!($features, $kquants);
        }
    };
}

vnni_isa!(
    AvxVnni,
    _mm256_dpbusd_avx_epi32,
    _mm256_dpwssd_avx_epi32,
    "avx2,fma,f16c,avxvnni",
    false,
    Avx2
);
vnni_isa!(
    Avx512Vnni,
    _mm256_dpbusd_epi32,
    _mm256_dpwssd_epi32,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    Self
);

/// Independent accumulator chains of [`product_rate`]: enough to hide the products' latency.
const CHAINS: usize = 12;

/// `iters` rounds of [`CHAINS`] u8 x i8 products of [`product_bytes`] bytes each, as the level
/// computes them (AVX2: `maddubs`, `madd`, add; VNNI: `vpdpbusd`), on values in registers; each
/// chain feeds its own result back in, so nothing can be hoisted. Returns a value that depends on
/// every product (so the loop is not removed).
#[inline(always)]
unsafe fn product_chains<I: Isa>(iters: usize) -> i32 {
    if I::PAIRS {
        return super::pairs::product_chains::<CHAINS>(iters);
    }
    let s = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_si256(); CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm256_set1_epi32(i as i32);
    }
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = I::dot_acc(*a, *a, s);
        }
    }
    let mut out = [0i32; 8];
    let sum = acc
        .iter()
        .fold(_mm256_setzero_si256(), |x, a| _mm256_add_epi32(x, *a));
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, sum);
    out.iter().fold(0, |x, v| x.wrapping_add(*v))
}

/// Bytes of one product instruction of the level's batch kernels: 64 where they use 512-bit
/// registers ([`Isa::PAIRS`]).
fn product_bytes<I: Isa>() -> usize {
    if I::PAIRS {
        64
    } else {
        32
    }
}

/// The 8-bit multiply-adds one thread computes per second with level `I`'s product
/// instructions and nothing else: the compute ceiling of the quantized kernels (prefill, batched
/// decode).
///
/// # Safety
/// Requires the level's CPU features.
pub(crate) unsafe fn product_rate<I: Isa>(seconds: f64) -> f64 {
    let mut iters = 1 << 12;
    loop {
        let t0 = std::time::Instant::now();
        std::hint::black_box(I::product_chains(iters));
        let dt = t0.elapsed().as_secs_f64();
        if dt >= seconds || iters >= 1 << 34 {
            return (iters * CHAINS * product_bytes::<I>()) as f64 / dt;
        }
        iters *= 2;
    }
}
