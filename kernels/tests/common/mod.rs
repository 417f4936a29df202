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
        qwen_run_kernels::set_iquant_d(ty, b, d);
    }
    let mut vals = vec![0f32; rows * cols];
    dequantize(ty, &bytes, &mut vals);
    (bytes, vals)
}
