//! Correctness of dequantization (against candle) and of matmul (SIMD and
//! scalar against dequantize + f64 dot).

mod common;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use qwen_run_kernels::{dequantize, matmul, matmul_scalar, matmul_with, Backend, QuantType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn candle_dtype(ty: QuantType) -> Option<GgmlDType> {
    Some(match ty {
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4_1 => GgmlDType::Q4_1,
        QuantType::Q5_0 => GgmlDType::Q5_0,
        QuantType::Q5_1 => GgmlDType::Q5_1,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q2K => GgmlDType::Q2K,
        QuantType::Q3K => GgmlDType::Q3K,
        QuantType::Q4K => GgmlDType::Q4K,
        QuantType::Q5K => GgmlDType::Q5K,
        QuantType::Q6K => GgmlDType::Q6K,
        QuantType::Q8K => GgmlDType::Q8K,
        _ => return None,
    })
}

fn random_values(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            // roughly gaussian, with an occasional outlier and a per-32 offset
            let g: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.5;
            let o = if rng.random_range(0..97) == 0 {
                4.0
            } else {
                1.0
            };
            g * o + 0.1 * ((i / 32) % 5) as f32 - 0.2
        })
        .collect()
}

/// Raw bytes of `rows x cols` weights of type `ty`, plus the exact values they encode.
fn make_weights(ty: QuantType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let vals = random_values(&mut rng, rows * cols);
    match ty {
        QuantType::F32 => {
            let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            (bytes, vals)
        }
        QuantType::F16 => {
            let h: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
            let bytes = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            (bytes, h.iter().map(|v| v.to_f32()).collect())
        }
        QuantType::BF16 => {
            let h: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let bytes = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            (bytes, h.iter().map(|v| v.to_f32()).collect())
        }
        QuantType::IQ4NL | QuantType::IQ4XS => common::random_iquant(ty, rows, cols, &mut rng),
        _ if ty.is_grid_iquant() => common::random_iquant(ty, rows, cols, &mut rng),
        _ => {
            let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, candle_dtype(ty).unwrap()).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let deq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (bytes, deq)
        }
    }
}

/// The quantized weight types candle can make test weights of (`make_weights`), in a fixed order
/// (some tests seed each type's weights by its index).
const QUANTIZED: [QuantType; 10] = [
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q5_0,
    QuantType::Q5_1,
    QuantType::Q8_0,
    QuantType::Q2K,
    QuantType::Q3K,
    QuantType::Q4K,
    QuantType::Q5K,
    QuantType::Q6K,
];

#[test]
fn ids_names_sizes() {
    for ty in QuantType::ALL {
        assert_eq!(QuantType::from_ggml_id(ty.ggml_id()), Some(ty));
        let rb = ty.row_bytes(ty.block_size() * 3).unwrap();
        assert_eq!(rb, 3 * ty.block_bytes());
        if let Some(cd) = candle_dtype(ty) {
            assert_eq!(cd.block_size(), ty.block_size(), "{ty}");
            assert_eq!(cd.type_size(), ty.block_bytes(), "{ty}");
        }
    }
    assert_eq!(QuantType::Q4K.name(), "Q4_K");
    assert_eq!(QuantType::Q4_0.name(), "Q4_0");
    assert_eq!(QuantType::from_ggml_id(30), Some(QuantType::BF16));
    assert_eq!(QuantType::from_ggml_id(4), None);
    assert_eq!(QuantType::Q4K.row_bytes(100), None);
    assert_eq!(QuantType::F16.row_bytes(7), Some(14));
}

#[test]
fn dequantize_matches_candle() {
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        let (rows, cols) = (6, 768);
        let (bytes, reference) = make_weights(ty, rows, cols, 100 + i as u64);
        assert_eq!(bytes.len(), ty.row_bytes(cols).unwrap() * rows, "{ty}");
        // whole tensor at once and row by row (unaligned starting offsets)
        let mut out = vec![0f32; rows * cols];
        dequantize(ty, &bytes, &mut out);
        let rb = ty.row_bytes(cols).unwrap();
        let mut out_rows = vec![0f32; rows * cols];
        for r in 0..rows {
            let mut shifted = vec![0u8; rb + 1];
            shifted[1..].copy_from_slice(&bytes[r * rb..(r + 1) * rb]);
            dequantize(ty, &shifted[1..], &mut out_rows[r * cols..(r + 1) * cols]);
        }
        for (j, ((&a, &b), &c)) in out.iter().zip(&reference).zip(&out_rows).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{ty}: element {j}: ours {a} candle {b}"
            );
            assert_eq!(
                a.to_bits(),
                c.to_bits(),
                "{ty}: row-wise dequantization differs"
            );
        }
    }
}

/// Checks both backends against the f64 reference for one shape.
fn check_matmul(ty: QuantType, rows: usize, cols: usize, n_tokens: usize, seed: u64) {
    let (bytes, wv) = make_weights(ty, rows, cols, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabcdef);
    let x = random_values(&mut rng, n_tokens * cols);
    // f64 reference on the exact weight values, and a rigorous bound on the
    // error introduced by quantizing the activations (|dx| <= amax_block / 254).
    let blk = match ty.block_size() {
        1 => 0,
        b => b,
    };
    let mut reference = vec![0f64; n_tokens * rows];
    let mut bound = vec![0f64; n_tokens * rows];
    let mut mags = vec![0f64; n_tokens * rows];
    for t in 0..n_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        let dx: Vec<f64> = if blk == 0 {
            vec![0.0; cols]
        } else {
            xt.chunks(blk)
                .flat_map(|c| {
                    let amax = c.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    std::iter::repeat_n(amax / 254.0, c.len())
                })
                .collect()
        };
        for r in 0..rows {
            let wr = &wv[r * cols..(r + 1) * cols];
            let mut s = 0f64;
            let mut e = 0f64;
            let mut mag = 0f64;
            for k in 0..cols {
                s += wr[k] as f64 * xt[k] as f64;
                e += (wr[k] as f64).abs() * dx[k];
                mag += (wr[k] as f64 * xt[k] as f64).abs();
            }
            reference[t * rows + r] = s;
            bound[t * rows + r] = e * 1.01 + 2e-5 * mag + 1e-5;
            mags[t * rows + r] = mag;
        }
    }
    let mut ys = vec![f32::NAN; n_tokens * rows];
    matmul_scalar(ty, &bytes, rows, cols, &x, n_tokens, &mut ys);
    let mut yd = vec![f32::NAN; n_tokens * rows];
    matmul(ty, &bytes, rows, cols, &x, n_tokens, &mut yd);
    // every SIMD level this CPU has gives the same bits as the one `matmul` picked
    for backend in simd_levels() {
        let mut yl = vec![f32::NAN; n_tokens * rows];
        matmul_with(backend, ty, &bytes, rows, cols, &x, n_tokens, &mut yl);
        assert_eq!(
            bits(&yl),
            bits(&yd),
            "{ty} rows={rows} cols={cols} n={n_tokens}: {backend:?} against {}",
            qwen_run_kernels::simd_name()
        );
    }
    for i in 0..n_tokens * rows {
        let what = format!(
            "{ty} rows={rows} cols={cols} n={n_tokens} t={} r={}",
            i / rows,
            i % rows
        );
        assert!(
            (ys[i] as f64 - reference[i]).abs() <= bound[i],
            "scalar {what}: {} vs {} (bound {})",
            ys[i],
            reference[i],
            bound[i]
        );
        assert!(
            (yd[i] as f64 - reference[i]).abs() <= bound[i],
            "{} {what}: {} vs {} (bound {})",
            qwen_run_kernels::simd_name(),
            yd[i],
            reference[i],
            bound[i]
        );
        // both backends quantize activations identically: they differ only by
        // float rounding (summation order; offsets of Q4_0/Q5_0 folded into a
        // float term), bounded relative to sum |w_i x_i|.
        let scale = 1e-4 * mags[i] + 1e-5;
        assert!(
            (yd[i] - ys[i]).abs() as f64 <= scale,
            "simd vs scalar {what}: {} vs {}",
            yd[i],
            ys[i]
        );
    }
}

#[test]
fn matmul_all_types_shapes() {
    let mut seed = 1;
    for ty in QuantType::ALL {
        let bs = ty.block_size().max(32);
        let col_options = if ty.block_size() == 1 {
            vec![8, 37, 96]
        } else {
            vec![bs, 3 * bs]
        };
        for &cols in &col_options {
            for &(rows, n_tokens) in &[
                (1, 1),
                (5, 3),
                (13, 7),
                (9, 64),
                (37, 1),
                (6, 5),
                (11, 4),
                (7, 2),
            ] {
                check_matmul(ty, rows, cols, n_tokens, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn matmul_larger_shapes() {
    // enough rows to be split across tasks, rows not a multiple of 4
    for (i, ty) in [
        QuantType::Q4_0,
        QuantType::Q5_0,
        QuantType::Q8_0,
        QuantType::Q4_1,
        QuantType::Q5_1,
        QuantType::Q2K,
        QuantType::Q3K,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
        QuantType::F16,
    ]
    .into_iter()
    .enumerate()
    {
        check_matmul(ty, 203, 512, 1, 500 + i as u64);
        check_matmul(ty, 67, 512, 70, 600 + i as u64);
    }
}

#[test]
fn matmul_in_custom_pools() {
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            check_matmul(QuantType::Q4K, 101, 512, 5, 7);
            check_matmul(QuantType::Q8_0, 130, 256, 1, 8);
            qwen_run_kernels::pool::with_spinning_workers(|| {
                check_matmul(QuantType::Q4K, 101, 512, 5, 9);
                check_matmul(QuantType::Q5_0, 130, 256, 1, 10);
                check_matmul(QuantType::Q8_0, 1030, 256, 16, 11);
            });
        });
    }
}

/// The SIMD levels this CPU runs (AVX2, AVX-VNNI, AVX-512 VNNI).
fn simd_levels() -> Vec<Backend> {
    Backend::ALL
        .into_iter()
        .filter(|b| b.is_simd() && b.is_available())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Prints the levels the other tests ran (`cargo test -- --nocapture kernel_levels`).
#[test]
fn kernel_levels() {
    let levels: Vec<_> = Backend::ALL
        .into_iter()
        .filter(|b| b.is_available())
        .map(|b| b.name())
        .collect();
    println!(
        "kernel levels tested on this CPU: {} (matmul uses {})",
        levels.join(", "),
        qwen_run_kernels::simd_name()
    );
    assert!(Backend::Scalar.is_available());
    assert_eq!(
        Backend::best(),
        *Backend::ALL
            .iter()
            .rev()
            .find(|b| b.is_available())
            .unwrap()
    );
    let name = qwen_run_kernels::simd_name();
    assert!(Backend::ALL.iter().any(|b| b.name() == name));
    for backend in simd_levels() {
        let (bytes, _) = make_weights(QuantType::Q6K, 8, 256, 3);
        let x = vec![0.5f32; 256 * 2];
        let mut a = vec![0f32; 16];
        let mut b = vec![0f32; 16];
        matmul_with(backend, QuantType::Q6K, &bytes, 8, 256, &x, 2, &mut a);
        matmul_with(
            Backend::Scalar,
            QuantType::Q6K,
            &bytes,
            8,
            256,
            &x,
            2,
            &mut b,
        );
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0));
        }
    }
}

#[test]
fn unaligned_weights_and_zero_activations() {
    let (bytes, _) = make_weights(QuantType::Q5_0, 12, 128, 11);
    let mut buf = vec![0u8; bytes.len() + 3];
    buf[3..].copy_from_slice(&bytes);
    let x = vec![0f32; 128 * 2];
    let mut y = vec![1f32; 24];
    matmul(QuantType::Q5_0, &buf[3..], 12, 128, &x, 2, &mut y);
    assert!(y.iter().all(|&v| v == 0.0));
    check_matmul(QuantType::Q8_0, 4, 64, 2, 12);
}

#[test]
fn degenerate_shapes() {
    let mut y: Vec<f32> = vec![];
    matmul(QuantType::Q4K, &[], 0, 256, &[0.0; 256], 1, &mut y);
    let (bytes, _) = make_weights(QuantType::Q4_0, 3, 32, 5);
    matmul(QuantType::Q4_0, &bytes, 3, 32, &[], 0, &mut y);
}

#[test]
#[should_panic]
fn bad_cols_panics() {
    let mut y = vec![0f32; 1];
    matmul(QuantType::Q4K, &[0u8; 144], 1, 100, &[0.0; 100], 1, &mut y);
}

/// Small batches (decode steps under continuous batching, n = 2..=16) and the
/// sizes around the kernel switches: direct tiles (K-quants n <= 3), in-register
/// panels (32-element formats n <= 16), buffered panels (more), token tiles of
/// up to 8 with uneven remainders, row counts that are not a multiple of 4.
#[test]
fn matmul_small_batches() {
    let mut seed = 900;
    for ty in QUANTIZED {
        let cols = if ty.block_size() == 256 { 512 } else { 160 };
        for &n in &[2, 3, 4, 5, 7, 8, 9, 16, 17] {
            for &rows in &[1, 3, 6, 13, 41] {
                check_matmul(ty, rows, cols, n, seed);
                seed += 1;
            }
        }
    }
}

/// Within the batched kernels a token's result must not depend on the other
/// tokens of the call (the server batches requests; a request must get the same
/// outputs alone and in any batch): the 32-element formats for n >= 2 (in-register
/// and buffered panels alike), the K-quants for n = 1..=3 (direct tiles) and for
/// n >= 4 (panels).
#[test]
fn batched_results_do_not_depend_on_the_batch() {
    for (i, ty) in QUANTIZED.into_iter().enumerate() {
        let (rows, cols) = (45, 512);
        let (bytes, _) = make_weights(ty, rows, cols, 40 + i as u64);
        let mut rng = StdRng::seed_from_u64(70 + i as u64);
        let x = random_values(&mut rng, 64 * cols);
        let run = |t0: usize, n: usize| {
            let mut y = vec![f32::NAN; n * rows];
            matmul(
                ty,
                &bytes,
                rows,
                cols,
                &x[t0 * cols..(t0 + n) * cols],
                n,
                &mut y,
            );
            y
        };
        let groups: &[&[usize]] = if ty.block_size() == 32 {
            &[&[2, 3, 5, 8, 9, 16, 17, 40]]
        } else if matches!(ty, QuantType::Q2K | QuantType::Q3K) {
            &[&[1, 2, 3, 4, 5, 8, 9, 16, 40]]
        } else {
            &[&[1, 2, 3], &[4, 5, 8, 9, 16, 40]]
        };
        for group in groups {
            // token 1 of the batch starting at token 1 of x, in batches of every size
            let want = run(1, group[0]);
            for &n in &group[1..] {
                let got = run(1, n);
                for r in 0..rows {
                    assert_eq!(
                        got[r].to_bits(),
                        want[r].to_bits(),
                        "{ty}: row {r}, token 0 of a batch of {n} vs of {}",
                        group[0]
                    );
                }
                // and a later token of the batch equals itself at the front
                let t = n - 1;
                let front = run(1 + t, group[0]);
                for r in 0..rows {
                    assert_eq!(
                        got[t * rows + r].to_bits(),
                        front[r].to_bits(),
                        "{ty}: row {r}, token {t} of a batch of {n}"
                    );
                }
            }
        }
    }
}

/// Matrices of different types sharing one input in one call give exactly what one call per
/// matrix gives, for decode, small batches and prefill.
#[test]
fn matmul_many_equals_one_call_per_matrix() {
    use qwen_run_kernels::{matmul_many, MatMulJob, Packing};
    let cols = 512;
    let shapes = [
        (QuantType::Q5_0, 96),
        (QuantType::Q8_0, 20),
        (QuantType::Q4K, 36),
        (QuantType::Q6K, 4),
        (QuantType::F16, 8),
    ];
    let weights: Vec<Vec<u8>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(ty, rows))| make_weights(ty, rows, cols, 70 + i as u64).0)
        .collect();
    let mut rng = StdRng::seed_from_u64(5);
    for n in [1, 3, 8, 40] {
        let x = random_values(&mut rng, n * cols);
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, r)| vec![0f32; n * r]).collect();
        let mut jobs: Vec<MatMulJob> = shapes
            .iter()
            .zip(&weights)
            .zip(outs.iter_mut())
            .map(|((&(ty, rows), w), y)| MatMulJob {
                ty,
                packing: Packing::Gguf,
                w,
                rows,
                y,
            })
            .collect();
        matmul_many(cols, &x, n, &mut jobs);
        for ((&(ty, rows), w), got) in shapes.iter().zip(&weights).zip(&outs) {
            let mut want = vec![0f32; n * rows];
            matmul(ty, w, rows, cols, &x, n, &mut want);
            assert_eq!(got, &want, "{ty} with {n} tokens");
        }
    }
}

/// Weights repacked into the rows4 layout give, on every backend, the same bits as the GGUF
/// blocks they came from, in the 32-element formats' batch arithmetic for every token count
/// (decode included: a token's result is the one it gets in any batch of GGUF weights).
#[test]
fn rows4_weights_match_the_gguf_blocks() {
    use qwen_run_kernels::{matmul_many_with, repack_rows4, MatMulJob, Packing};
    let run = |backend: Backend, ty, packing, w: &[u8], rows, cols, x: &[f32], n| {
        let mut y = vec![f32::NAN; n * rows];
        let mut jobs = [MatMulJob {
            ty,
            packing,
            w,
            rows,
            y: &mut y,
        }];
        matmul_many_with(backend, cols, x, n, &mut jobs);
        y
    };
    let mut backends = vec![Backend::Scalar];
    backends.extend(simd_levels());
    for (i, ty) in [
        QuantType::Q4_0,
        QuantType::Q5_0,
        QuantType::Q8_0,
        QuantType::Q4K,
        QuantType::Q6K,
    ]
    .into_iter()
    .enumerate()
    {
        // below this many tokens the GGUF kernels use other (decode) arithmetic
        let batch_min = if ty.block_size() == 256 { 4 } else { 2 };
        // 9216 columns: the K-quants' 40 tokens span two chunks of tokens (an odd tile
        // start in each)
        for (rows, cols) in [(4, 256), (8, 768), (44, 512), (8, 9216)] {
            let (bytes, _) = make_weights(ty, rows, cols, 300 + i as u64);
            let packed = repack_rows4(ty, rows, cols, &bytes).expect("rows4 form");
            let mut rng = StdRng::seed_from_u64(310 + i as u64);
            let x = random_values(&mut rng, 40 * cols);
            for &backend in &backends {
                for n in [1, 2, 3, 4, 8, 9, 16, 17, 40] {
                    let x = &x[..n * cols];
                    let got = run(backend, ty, Packing::Rows4, &packed, rows, cols, x, n);
                    // a lone token against the same token at the front of a batch
                    let want = if n < batch_min && backend.is_simd() {
                        let xb: Vec<f32> =
                            x.iter().cycle().take(batch_min * cols).copied().collect();
                        let y = run(
                            backend,
                            ty,
                            Packing::Gguf,
                            &bytes,
                            rows,
                            cols,
                            &xb,
                            batch_min,
                        );
                        y[..n * rows].to_vec()
                    } else {
                        run(backend, ty, Packing::Gguf, &bytes, rows, cols, x, n)
                    };
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{ty} {rows}x{cols} n={n} {backend:?}"
                    );
                }
            }
        }
    }
}

/// What `batch_invariant_tokens` promises holds: up to that many tokens, every token of a call
/// gets the bits a call with that token alone gets, for every type and layout.
#[test]
fn batch_invariant_tokens_holds() {
    use qwen_run_kernels::{
        batch_invariant_tokens, has_rows4, matmul_many, repack_rows4, MatMulJob, Packing,
    };
    let (rows, cols) = (12, 512);
    for (i, ty) in QUANTIZED.into_iter().enumerate() {
        let (bytes, _) = make_weights(ty, rows, cols, 500 + i as u64);
        let mut layouts = vec![(Packing::Gguf, bytes.clone())];
        if has_rows4(ty) {
            layouts.push((
                Packing::Rows4,
                repack_rows4(ty, rows, cols, &bytes).unwrap(),
            ));
        }
        let mut rng = StdRng::seed_from_u64(510 + i as u64);
        let x = random_values(&mut rng, 24 * cols);
        for (packing, w) in &layouts {
            let run = |x: &[f32], n: usize| {
                let mut y = vec![f32::NAN; n * rows];
                let mut jobs = [MatMulJob {
                    ty,
                    packing: *packing,
                    w,
                    rows,
                    y: &mut y,
                }];
                matmul_many(cols, x, n, &mut jobs);
                y
            };
            let limit = batch_invariant_tokens(ty, *packing).min(24);
            for n in 2..=limit {
                let batch = run(&x[..n * cols], n);
                for t in 0..n {
                    let alone = run(&x[t * cols..(t + 1) * cols], 1);
                    assert_eq!(
                        bits(&batch[t * rows..(t + 1) * rows]),
                        bits(&alone),
                        "{ty} {packing:?}: token {t} of {n}"
                    );
                }
            }
        }
    }
}
