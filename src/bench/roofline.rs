//! The decode roofline: one generated token reads every weight matrix once, so decode speed is
//! bounded by memory bandwidth / bytes of weights per token.

use crate::engine::Engine;
use std::time::Instant;

/// Bytes of weights one decode step reads: every tensor but the token embedding table, of which
/// a step reads one row (unless the output head is tied to it, in which case it is read whole).
pub fn decode_bytes_per_token(engine: &Engine) -> u64 {
    let g = &engine.gguf;
    let tied = g.tensor("output.weight").is_none();
    g.tensors
        .iter()
        .filter(|t| tied || t.name != "token_embd.weight")
        .map(|t| t.size as u64)
        .sum()
}

/// Sustained read bandwidth of main memory with `threads` readers, in GB/s (1e9 bytes): the best
/// of a few passes over a buffer much larger than the caches.
pub fn measure_read_bandwidth(threads: usize) -> f64 {
    const BYTES: usize = 512 << 20;
    let words = BYTES / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
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
