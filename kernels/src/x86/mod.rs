//! x86 kernels: AVX2 + FMA + F16C, and the same kernels with VNNI integer products (AVX-VNNI, AVX-512 VNNI).
//!
//! * `isa.rs`: what differs between the two levels (the [`Isa`] trait), and each level's entry
//!   points, the kernels compiled with its target features.
//! * `decode.rs`: the direct R x T tile kernels (decode, small batches, float and Q8_K weights).
//! * `panel.rs`: batches and prefill, weights unpacked once per panel of four rows, and every
//!   token count of the rows4 layouts.
//! * `kquant_low.rs`: Q2_K and Q3_K, every token count, each super-block of four rows transposed
//!   in registers and combined with the tokens by the panel kernels' K-quant arithmetic.
//! * `simd.rs`: loads and block unpacking both share.
//! * `iquant.rs`: IQ4_NL and IQ4_XS rows4 blocks unpacked for the 32-element kernels.
//! * `iquant_low.rs`: the grid i-quants (IQ1_S to IQ3_S), every token count, one AVX2 kernel
//!   for every level.
//! * `act.rs`: activation quantization; `repack.rs`: the rows4 packer.
//!
//! [`chunk_rows`] is the way in: it only picks the kernel for a row chunk, and the driver
//! instantiates it for the run-time [`crate::Backend`]. Nothing here calls back into the driver or
//! the scalar reference: a type without a kernel here is reported back to the driver.

use crate::layout::{Act, BlockQ8, BlockQ8K, Packing, QuantType, RowsPlan, K_PANEL_MIN_TOKENS};
use std::mem::size_of;
use std::ops::Range;

mod act;
mod decode;
mod iquant;
mod iquant_low;
mod isa;
mod kquant_low;
mod pairs;
mod panel;
mod repack;
mod simd;

pub(crate) use act::{quantize_q8, quantize_q8k};
pub(crate) use isa::{product_rate, Avx2, Avx512Vnni, AvxVnni, Isa};
pub(crate) use repack::pack_rows4;

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
/// The rows4 layouts (layout.rs) of Q4_0, Q5_0 and Q8_0.
const K_Q4_0R4: u8 = 12;
const K_Q5_0R4: u8 = 13;
const K_Q8_0R4: u8 = 14;
/// The rows4 layouts of IQ4_NL and IQ4_XS (iquant.rs).
const K_IQ4NLR4: u8 = 20;
const K_IQ4XSR4: u8 = 21;

/// Token counts and kernels of the 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0): 1: the decode kernel (decode.rs: `tile_q32_dec`); 2..=Q32_STEPS_MAX (decode steps
/// of continuous batching): `panel::gemm_steps_q32`, each block unpacked in
/// registers once per tile of up to 8 tokens; more: the panel kernels, weights
/// unpacked into a buffer once per chunk of tokens. The last two compute the
/// same bits for a token whatever the other tokens of the call are. Weights in
/// the rows4 layout (layout.rs; what the engine loads Q4_0, Q5_0 and Q8_0 into)
/// take those two paths for every token count, decode included: their blocks
/// need no transposing, so the steps kernel is also the fastest decode kernel.
const Q32_STEPS_MAX: usize = 16;

/// Bytes of a block of the 32-element kernel `K` (for the rows4 kernels, of a group-block).
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
        K_IQ4NLR4 => 72,
        // a sub-block; the eight of a group-block are followed by their d
        K_IQ4XSR4 => crate::layout::IQ4XS_SUB_BYTES,
        _ => 34,
    }
}

/// Whether the 32-element kernel `K` multiplies signed weights (the sign trick) rather than
/// unsigned values with an offset.
const fn q32_signed(k: u8) -> bool {
    matches!(k, K_Q8_0 | K_Q8_0R4 | K_IQ4NLR4 | K_IQ4XSR4)
}

/// A row chunk of a product as the kernels address it: `nrows` weight rows from `w`, `rb` bytes
/// apart; `ntok` tokens of activations from `a`, `astride` `A`s apart, `nb` blocks (or for the
/// float types `nb` values) each; the output of token `t`, row `r` at `y + t * ystride + r`.
/// The panel kernels find token `t`'s blocks at `a + t * nb`, so theirs have `astride == nb`.
#[derive(Clone, Copy)]
pub(crate) struct Operands<A> {
    pub w: *const u8,
    pub rb: usize,
    pub nrows: usize,
    pub a: *const A,
    pub astride: usize,
    pub nb: usize,
    pub ntok: usize,
    pub y: *mut f32,
    pub ystride: usize,
}

impl<A> Operands<A> {
    /// The same operands with the activations addressed in bytes: the tile kernels read every
    /// activation format that way.
    fn in_bytes(self) -> Operands<u8> {
        Operands {
            w: self.w,
            rb: self.rb,
            nrows: self.nrows,
            a: self.a as *const u8,
            astride: self.astride * size_of::<A>(),
            nb: self.nb,
            ntok: self.ntok,
            y: self.y,
            ystride: self.ystride,
        }
    }
}

/// Rows `rows` of `plan` against activations `a` (`astride` `A`s and `nb` blocks or values per
/// token).
///
/// # Safety
/// `rows` must lie within the plan's rows.
unsafe fn operands<A>(
    plan: &RowsPlan<'_>,
    rows: &Range<usize>,
    a: *const A,
    astride: usize,
    nb: usize,
) -> Operands<A> {
    Operands {
        w: plan.w.as_ptr().add(rows.start * plan.row_bytes),
        rb: plan.row_bytes,
        nrows: rows.len(),
        a,
        astride,
        nb,
        ntok: plan.n_tokens,
        y: plan.y.0.add(rows.start),
        ystride: plan.rows,
    }
}

/// Rows `rows` of `plan` for all its tokens, with the kernels of feature level `I` (`Avx2` or
/// `Avx512Vnni`): this only picks the kernel, which its level's [`Isa`] entry point runs.
/// Returns false, having written nothing, where this module has no kernel for the plan's type
/// and activations (IQ4_NL / IQ4_XS in the GGUF layout).
///
/// # Safety
/// Requires the level's CPU features; `plan.y` must be valid for `n_tokens * plan.rows` writes
/// and rows `rows` must not be written concurrently by anyone else.
#[must_use]
pub(crate) unsafe fn chunk_rows<I: Isa>(plan: &RowsPlan<'_>, rows: Range<usize>) -> bool {
    let &RowsPlan {
        ty,
        packing,
        cols,
        act,
        n_tokens,
        ..
    } = plan;
    let q8 = |a: &[BlockQ8]| {
        let nb = cols / 32;
        operands(plan, &rows, a.as_ptr(), nb, nb)
    };
    let q8k = |a: &[BlockQ8K]| {
        let nb = cols / 256;
        operands(plan, &rows, a.as_ptr(), nb, nb)
    };
    match (ty, act) {
        (
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q8_0,
            Act::Q8(a),
        ) if n_tokens >= 2 || packing == Packing::Rows4 => {
            let o = q8(a);
            macro_rules! q32 {
                ($k:expr) => {
                    if n_tokens <= Q32_STEPS_MAX {
                        I::gemm_steps_q32::<{ $k }>(o)
                    } else {
                        I::gemm_panel_q32::<{ $k }>(o)
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
        (QuantType::IQ4NL | QuantType::IQ4XS, Act::Q8(a)) if packing == Packing::Rows4 => {
            let o = q8(a);
            match (ty == QuantType::IQ4XS, n_tokens <= Q32_STEPS_MAX) {
                (false, true) => I::gemm_steps_q32::<K_IQ4NLR4>(o),
                (false, false) => I::gemm_panel_q32::<K_IQ4NLR4>(o),
                (true, true) => I::gemm_steps_q32::<K_IQ4XSR4>(o),
                (true, false) => I::gemm_panel_q32::<K_IQ4XSR4>(o),
            }
        }
        (QuantType::Q4K | QuantType::Q6K, Act::Q8K(a)) if packing == Packing::Rows4 => {
            if ty == QuantType::Q6K {
                I::gemm_k_rows4::<true>(q8k(a))
            } else {
                I::gemm_k_rows4::<false>(q8k(a))
            }
        }
        (QuantType::Q4K | QuantType::Q5K | QuantType::Q6K, Act::Q8K(a))
            if n_tokens >= K_PANEL_MIN_TOKENS =>
        {
            let o = q8k(a);
            match ty {
                QuantType::Q4K => I::gemm_panel_k::<K_Q4K>(o),
                QuantType::Q5K => I::gemm_panel_k::<K_Q5K>(o),
                _ => I::gemm_panel_k::<K_Q6K>(o),
            }
        }
        (
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q8_0,
            Act::Q8(a),
        ) => {
            let o = q8(a).in_bytes();
            match ty {
                QuantType::Q4_0 => I::gemm_small::<K_Q4_0>(o),
                QuantType::Q4_1 => I::gemm_small::<K_Q4_1>(o),
                QuantType::Q5_0 => I::gemm_small::<K_Q5_0>(o),
                QuantType::Q5_1 => I::gemm_small::<K_Q5_1>(o),
                _ => I::gemm_small::<K_Q8_0>(o),
            }
        }
        (QuantType::Q4K | QuantType::Q5K | QuantType::Q6K, Act::Q8K(a)) => {
            let o = q8k(a).in_bytes();
            match ty {
                QuantType::Q4K => I::gemm_small::<K_Q4K>(o),
                QuantType::Q5K => I::gemm_small::<K_Q5K>(o),
                _ => I::gemm_small::<K_Q6K>(o),
            }
        }
        (QuantType::Q2K, Act::Q8K(a)) => I::gemm_low_k::<false>(q8k(a)),
        (QuantType::Q3K, Act::Q8K(a)) => I::gemm_low_k::<true>(q8k(a)),
        (QuantType::Q8K, Act::Q8K(a)) => I::gemm::<K_Q8K, 4, 4>(q8k(a).in_bytes()),
        (_, Act::Q8K(a)) if ty.is_grid_iquant() => {
            let o = q8k(a);
            match ty {
                QuantType::IQ2XXS => iquant_low::gemm_grid::<16>(o),
                QuantType::IQ2XS => iquant_low::gemm_grid::<17>(o),
                QuantType::IQ3XXS => iquant_low::gemm_grid::<18>(o),
                QuantType::IQ1S => iquant_low::gemm_grid::<19>(o),
                QuantType::IQ3S => iquant_low::gemm_grid::<21>(o),
                QuantType::IQ2S => iquant_low::gemm_grid::<22>(o),
                _ => iquant_low::gemm_grid::<29>(o),
            }
        }
        (QuantType::F32 | QuantType::F16 | QuantType::BF16, Act::F32(x)) => {
            // one row of f32 values per token, `cols` of them
            let o = operands(plan, &rows, x.as_ptr(), cols, cols).in_bytes();
            match ty {
                QuantType::F32 => I::gemm::<K_F32, 4, 2>(o),
                QuantType::F16 => I::gemm::<K_F16, 4, 2>(o),
                _ => I::gemm::<K_BF16, 4, 2>(o),
            }
        }
        _ => return false,
    }
    true
}
