//! The rooflines: one generated token reads every weight matrix once, so decode speed is bounded
//! by memory bandwidth / bytes of weights per token; a prompt token (or a token of a batched
//! decode step) multiplies every layer's weights with its activations, so prefill is bounded by
//! the CPU's 8-bit multiply-add rate / multiply-adds per token.

use crate::engine::Engine;
use crate::model::WeightArena;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// Bytes of weights one decode step reads, (from host memory, from GPU memory): every tensor but
/// the token embedding table, of which a step reads one row (unless the output head is tied to
/// it, in which case it is read whole, on the output head's device).
pub fn decode_bytes_per_token(engine: &Engine) -> (u64, u64) {
    let g = &engine.gguf;
    let tied = g.tensor("output.weight").is_none();
    let tied_on_gpu = tied && !engine.placement().output.is_cpu();
    let (mut host, mut gpu) = (0u64, 0u64);
    for t in g
        .tensors
        .iter()
        .filter(|t| tied || t.name != "token_embd.weight")
    {
        let on_gpu = engine.on_gpu(&t.name) || (tied_on_gpu && t.name == "token_embd.weight");
        if on_gpu {
            gpu += t.size as u64;
        } else {
            host += cpu_bytes(t) as u64;
        }
    }
    (host, gpu)
}

/// Bytes of a tensor as the CPU kernels hold it: the rows4 layout where the engine repacks into
/// it (Q4_K's is 2.8% larger than its GGUF blocks), the GGUF bytes otherwise.
fn cpu_bytes(t: &crate::gguf::TensorInfo) -> usize {
    use qwen_run_kernels::{best_packing, stored_row_bytes};
    match t.dims[..] {
        [cols, rows] => {
            stored_row_bytes(t.ty, best_packing(t.ty, rows), cols).map_or(t.size, |rb| rows * rb)
        }
        _ => t.size,
    }
}

/// The GPU's memory bandwidth in GB/s, counting the bytes a large device-to-device copy reads and
/// writes: the best of a few copies of 1 GiB into a buffer allocated beforehand (an allocation
/// inside the timed region would be timed too).
pub fn measure_device_bandwidth(device: &Device) -> Result<f64> {
    const BYTES: usize = 1 << 30;
    let src = Tensor::zeros(BYTES / 4, DType::F32, device)?;
    let dst = Tensor::zeros(BYTES / 4, DType::F32, device)?;
    let mut best = 0.0f64;
    for _ in 0..5 {
        device.synchronize()?;
        let t0 = Instant::now();
        dst.slice_set(&src, 0, 0)?;
        device.synchronize()?;
        best = best.max(2.0 * BYTES as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

/// Sustained read bandwidth of main memory with `threads` readers, in GB/s (1e9 bytes): the best
/// of a few passes over a buffer much larger than the caches, in 2 MiB pages like the weights
/// (with 4 KiB pages, TLB misses would slow the probe, not the decode it is compared with).
pub fn measure_read_bandwidth(threads: usize) -> f64 {
    const BYTES: usize = 512 << 20;
    let words = BYTES / 8;
    let Ok(mut mem) = WeightArena::new(true).alloc(BYTES) else {
        return 0.0;
    };
    // SAFETY: the buffer is 2 MiB aligned and BYTES long; any bit pattern is a valid u64.
    let buf: &mut [u64] =
        unsafe { std::slice::from_raw_parts_mut(mem.as_mut_ptr() as *mut u64, words) };
    for (i, w) in buf.iter_mut().enumerate() {
        *w = i as u64;
    }
    let buf = &*buf;
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
    {
        Ok(p) => p,
        Err(_) => return 0.0,
    };
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..4 {
        let t0 = Instant::now();
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            buf.par_chunks(chunk)
                .map(|c| {
                    // Four independent accumulators keep the loads, not the adds, the bottleneck.
                    let mut acc = [0u64; 4];
                    for q in c.chunks_exact(4) {
                        for i in 0..4 {
                            acc[i] = acc[i].wrapping_add(q[i]);
                        }
                    }
                    acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                })
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max(BYTES as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// 8-bit multiply-adds of one token through the CPU's layers: rows x cols of every quantized
/// layer matrix on the host (the output head is left out: a prompt computes it for its last
/// token only; attention is float and grows with the context, so it is left out too).
pub fn multiply_adds_per_token(engine: &Engine) -> u64 {
    engine
        .gguf
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("blk.") && !t.ty.is_float() && !engine.on_gpu(&t.name))
        .map(|t| match t.dims[..] {
            [cols, rows] => (cols * rows) as u64,
            _ => 0,
        })
        .sum()
}

/// The 8-bit multiply-adds per second `threads` threads compute at once with the kernels'
/// product instructions alone (`None` for the scalar kernels): see
/// [`qwen_run_kernels::int8_product_rate`].
pub fn measure_product_rate(threads: usize) -> Option<f64> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .ok()?;
    // the best of a few short runs, as for the bandwidth
    (0..3)
        .filter_map(|_| pool.install(|| qwen_run_kernels::int8_product_rate(0.1)))
        .reduce(f64::max)
}
