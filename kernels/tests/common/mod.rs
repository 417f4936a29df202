//! Helpers the kernel test binaries share.

use qwen_run_kernels::{dequantize, QuantType};
use rand::rngs::StdRng;
use rand::Rng;

/// Random `rows x cols` weights of an i-quant `ty` (candle cannot make them): random bytes with
/// a sane f16 `d` in each block, and their values as our dequantization reads them
/// (tests/iquants.rs checks that against gguf-py).
pub fn random_iquant(
    ty: QuantType,
    rows: usize,
    cols: usize,
    rng: &mut StdRng,
) -> (Vec<u8>, Vec<f32>) {
    let mut bytes: Vec<u8> = (0..ty.row_bytes(cols).unwrap() * rows)
        .map(|_| rng.random())
        .collect();
    for b in bytes.chunks_exact_mut(ty.block_bytes()) {
        let d = rng.random_range(0.002f32..0.02) * if rng.random() { 1.0 } else { -1.0 };
        set_iquant_d(ty, b, d);
    }
    let mut vals = vec![0f32; rows * cols];
    dequantize(ty, &bytes, &mut vals);
    (bytes, vals)
}

/// Sets the f16 scale `d` of an i-quant block: its first two bytes, but for IQ1_M, whose d is
/// spread over the top nibbles of the four u16 at bytes 48..56.
pub fn set_iquant_d(ty: QuantType, block: &mut [u8], d: f32) {
    let bits = half::f16::from_f32(d).to_bits();
    if ty == QuantType::IQ1M {
        for k in 0..4 {
            let o = 48 + 2 * k;
            let w = u16::from_le_bytes([block[o], block[o + 1]]) & 0x0fff;
            let w = w | ((bits >> (4 * k)) & 0xf) << 12;
            block[o..o + 2].copy_from_slice(&w.to_le_bytes());
        }
    } else {
        block[..2].copy_from_slice(&bits.to_le_bytes());
    }
}
