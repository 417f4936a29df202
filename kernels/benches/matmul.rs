//! Simple timing harness (no criterion): `cargo bench -p qwen-run-kernels --bench matmul [filter]`.
//!
//! For every shape it reports, on the current rayon pool (RAYON_NUM_THREADS,
//! default = all cores):
//!  * n=1 (decode): time per call and GB/s of weights streamed. The weights are
//!    rotated through enough copies (>= 256 MiB) that they come from DRAM, as in
//!    a real forward pass.
//!  * n=512 (prefill): time per call, GFLOP/s and tokens x rows per second.
//!  * small batches (filter `small`, `small:0.5b` or `small:1.5b`; also part of the
//!    default run): the decode step of continuous batching, one call per weight with
//!    n = 1, 2, 3, 4, 8, 16 tokens (BENCH_SMALL_N) on the real Qwen2.5 0.5B and 1.5B
//!    Q4_K_M shapes, weights from DRAM. Time per call and its ratio to n=1, then the
//!    matmul time of a whole forward step (layers x shapes + output head) per n. Types
//!    with a rows4 layout are timed in both layouts ("Q5_0r4": rows4); the step counts
//!    rows4, as the engine uses it.
//!
//! It also measures the machine's streaming-read bandwidth for comparison.

use qwen_run_kernels::{
    has_rows4, matmul, matmul_many_with, matmul_with, repack_rows4, Backend, MatMulJob, Packing,
    QuantType,
};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn rng_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Random blocks with sane f16 scale fields (no NaN/Inf/denormals).
fn make_weights(ty: QuantType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut w = rng_bytes(rows * rb, seed);
    let d = half::f16::from_f32(0.01).to_le_bytes();
    let fields: &[usize] = match ty {
        QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => &[0],
        QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4K | QuantType::Q5K => &[0, 2],
        QuantType::Q6K => &[208],
        QuantType::Q2K => &[80, 82],
        QuantType::Q3K => &[108],
        QuantType::F16 => {
            for c in w.chunks_exact_mut(2) {
                c.copy_from_slice(&d);
            }
            &[]
        }
        _ => &[],
    };
    if !fields.is_empty() {
        for blk in w.chunks_exact_mut(ty.block_bytes()) {
            for &f in fields {
                blk[f..f + 2].copy_from_slice(&d);
            }
        }
    }
    w
}

fn time_it(min_time: Duration, min_iters: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut iters = 0usize;
    let start = Instant::now();
    while iters < min_iters || start.elapsed() < min_time {
        f();
        iters += 1;
    }
    start.elapsed().as_secs_f64() / iters as f64
}

fn stream_bandwidth() -> f64 {
    let n = 512 << 20; // 512 MiB
    let v: Vec<u64> = (0..n / 8).map(|i| i as u64).collect();
    let per = time_it(Duration::from_millis(1500), 3, || {
        let s: u64 = v
            .par_chunks(1 << 20)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum();
        black_box(s);
    });
    n as f64 / per / 1e9
}

fn bench_shape(ty: QuantType, rows: usize, cols: usize, backend: Backend, n_list: &[usize]) {
    let rb = ty.row_bytes(cols).unwrap();
    let bytes = rows * rb;
    for &n in n_list {
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut y = vec![0f32; n * rows];
        if n == 1 {
            let copies = ((256usize << 20) / bytes).max(2);
            let ws: Vec<Vec<u8>> = (0..copies)
                .map(|c| make_weights(ty, rows, cols, c as u64 + 1))
                .collect();
            let mut i = 0;
            let per = time_it(Duration::from_millis(1500), 20, || {
                matmul_with(backend, ty, &ws[i % copies], rows, cols, &x, n, &mut y);
                i += 1;
                black_box(&y);
            });
            println!(
                "{:<5} {:>6}x{:<5} n={:<4} {:>9.1} us  {:>6.2} GB/s  {:>7.1} GFLOP/s",
                ty.name(),
                rows,
                cols,
                n,
                per * 1e6,
                bytes as f64 / per / 1e9,
                2.0 * (rows * cols * n) as f64 / per / 1e9
            );
        } else {
            let w = make_weights(ty, rows, cols, 1);
            let per = time_it(Duration::from_millis(2000), 3, || {
                matmul_with(backend, ty, &w, rows, cols, &x, n, &mut y);
                black_box(&y);
            });
            println!(
                "{:<5} {:>6}x{:<5} n={:<4} {:>9.1} us  {:>6.2} GB/s  {:>7.1} GFLOP/s  {:>7.2} M tok*rows/s",
                ty.name(),
                rows,
                cols,
                n,
                per * 1e6,
                bytes as f64 / per / 1e9,
                2.0 * (rows * cols * n) as f64 / per / 1e9,
                (rows * n) as f64 / per / 1e6
            );
        }
    }
}

/// One weight of a model: type, rows, cols, how many per forward step.
type ModelShape = (QuantType, usize, usize, f64);

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M (24 layers): ffn_down and attn_v alternate types.
const SHAPES_05B: &[ModelShape] = &[
    (QuantType::Q5_0, 896, 896, 48.0),   // attn_q, attn_output
    (QuantType::Q5_0, 128, 896, 36.0),   // attn_k, half the attn_v
    (QuantType::Q8_0, 128, 896, 12.0),   // half the attn_v
    (QuantType::Q5_0, 4864, 896, 48.0),  // ffn_gate, ffn_up
    (QuantType::Q4K, 896, 4864, 12.0),   // half the ffn_down
    (QuantType::Q6K, 896, 4864, 12.0),   // half the ffn_down
    (QuantType::Q8_0, 151936, 896, 1.0), // output
];

/// Qwen2.5-Coder-1.5B-Instruct Q4_K_M (28 layers).
const SHAPES_15B: &[ModelShape] = &[
    (QuantType::Q4K, 1536, 1536, 56.0),  // attn_q, attn_output
    (QuantType::Q4K, 256, 1536, 42.0),   // attn_k, half the attn_v
    (QuantType::Q6K, 256, 1536, 14.0),   // half the attn_v
    (QuantType::Q4K, 8960, 1536, 56.0),  // ffn_gate, ffn_up
    (QuantType::Q4K, 1536, 8960, 14.0),  // half the ffn_down
    (QuantType::Q6K, 1536, 8960, 14.0),  // half the ffn_down
    (QuantType::Q6K, 151936, 1536, 1.0), // output
];

/// Small-batch decode (continuous batching): every n with weights rotated through
/// >= 256 MiB of copies, as in a forward step where each weight is read once.
fn bench_small(model: &str, shapes: &[ModelShape], backend: Backend, n_list: &[usize]) {
    println!("small batches, {model} shapes (us per call; xN = ratio to n=1)");
    let mut head = format!("{:<22}", "shape");
    for n in n_list {
        head += &format!(" {:>15}", format!("n={n}"));
    }
    println!("{head}");
    let mut step = vec![0f64; n_list.len()];
    for &(ty, rows, cols, count) in shapes {
        let rb = ty.row_bytes(cols).unwrap();
        let copies = ((256usize << 20) / (rows * rb)).max(2);
        let gguf: Vec<Vec<u8>> = (0..copies)
            .map(|c| make_weights(ty, rows, cols, c as u64 + 1))
            .collect();
        // the engine's layout comes last and counts in the step: rows4 where the type has it
        let mut layouts = vec![(Packing::Gguf, gguf)];
        if has_rows4(ty) && rows % 4 == 0 {
            let packed = layouts[0]
                .1
                .iter()
                .map(|w| repack_rows4(ty, rows, cols, w).unwrap())
                .collect();
            layouts.push((Packing::Rows4, packed));
        }
        let engine = layouts.len() - 1;
        for (l, (packing, ws)) in layouts.iter().enumerate() {
            let name = match packing {
                Packing::Gguf => ty.name().to_string(),
                Packing::Rows4 => format!("{}r4", ty.name()),
            };
            let mut line = format!("{:<22}", format!("{name} {rows}x{cols} x{count}"));
            let mut t1 = 0.0;
            for (k, &n) in n_list.iter().enumerate() {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                let mut y = vec![0f32; n * rows];
                let mut i = 0;
                let per = time_it(Duration::from_millis(700), 2 * copies, || {
                    let mut jobs = [MatMulJob {
                        ty,
                        packing: *packing,
                        w: &ws[i % copies],
                        rows,
                        y: &mut y,
                    }];
                    matmul_many_with(backend, cols, &x, n, &mut jobs);
                    i += 1;
                    black_box(&y);
                });
                if k == 0 {
                    t1 = per;
                }
                if l == engine {
                    step[k] += per * count;
                }
                line += &format!(" {:>8.1} x{:<5.2}", per * 1e6, per / t1);
            }
            println!("{line}");
        }
    }
    let mut line = format!("{:<22}", "step (ms)");
    for &s in &step {
        line += &format!(" {:>8.2} x{:<5.2}", s * 1e3, s / step[0]);
    }
    println!("{line}");
    let mut line = format!("{:<22}", "tokens/s at n");
    for (k, &s) in step.iter().enumerate() {
        line += &format!(" {:>15.1}", n_list[k] as f64 / s);
    }
    println!("{line}");
}

fn main() {
    // like the engine: all calls are made from inside the pool (ThreadPool::install)
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(real_main);
}

fn real_main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let filter = args.first().cloned().unwrap_or_default();
    let backend = if std::env::var("BENCH_SCALAR").is_ok() {
        Backend::Scalar
    } else {
        Backend::detect()
    };
    println!(
        "simd: {}  backend: {:?}  threads: {}",
        qwen_run_kernels::simd_name(),
        backend,
        rayon::current_num_threads()
    );
    if filter.is_empty() || filter == "bw" {
        println!("streaming read bandwidth: {:.2} GB/s", stream_bandwidth());
    }
    if filter.is_empty() || filter == "repack" {
        // load-time cost of the rows4 layout, on the test models' largest matrices
        for (ty, rows, cols) in [
            (QuantType::Q5_0, 4864, 896),
            (QuantType::Q8_0, 151936, 896),
            (QuantType::Q4K, 8960, 1536),
            (QuantType::Q6K, 1536, 8960),
        ] {
            let w = make_weights(ty, rows, cols, 1);
            let per = time_it(Duration::from_millis(700), 2, || {
                black_box(repack_rows4(ty, rows, cols, &w));
            });
            println!(
                "repack {} {rows}x{cols}: {:.1} ms, {:.2} GB/s",
                ty.name(),
                per * 1e3,
                w.len() as f64 / per / 1e9
            );
        }
    }
    let n_list: Vec<usize> = std::env::var("BENCH_N")
        .ok()
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or_else(|| vec![1, 512]);
    if filter.is_empty() || filter.starts_with("small") {
        let small_n: Vec<usize> = std::env::var("BENCH_SMALL_N")
            .ok()
            .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
            .unwrap_or_else(|| vec![1, 2, 3, 4, 8, 16]);
        assert_eq!(small_n.first(), Some(&1), "BENCH_SMALL_N must start with 1");
        if filter != "small:1.5b" {
            bench_small("0.5B Q4_K_M", SHAPES_05B, backend, &small_n);
        }
        if filter != "small:0.5b" {
            bench_small("1.5B Q4_K_M", SHAPES_15B, backend, &small_n);
        }
        if !filter.is_empty() {
            return;
        }
    }
    let shapes = [
        (QuantType::Q5_0, 896, 896),
        (QuantType::Q8_0, 4864, 896),
        (QuantType::Q4K, 1536, 1536),
        (QuantType::Q4K, 8960, 1536),
        (QuantType::Q6K, 1536, 8960),
        (QuantType::Q2K, 8960, 1536),
        (QuantType::Q3K, 8960, 1536),
        (QuantType::Q3K, 1536, 8960),
        (QuantType::Q5_0, 128, 896),
        (QuantType::Q5_0, 4864, 896),
        (QuantType::Q4_0, 4864, 896),
        (QuantType::Q5_1, 896, 896),
        (QuantType::Q8_0, 151936, 896),
    ];
    for (ty, rows, cols) in shapes {
        let tag = format!("{}:{}x{}", ty.name(), rows, cols);
        if !filter.is_empty() && !tag.contains(&filter) {
            continue;
        }
        let ns: Vec<usize> = if rows == 151936 {
            vec![1]
        } else {
            n_list.clone()
        };
        bench_shape(ty, rows, cols, backend, &ns);
    }
    let _ = matmul; // re-exported API used by the engine
}
