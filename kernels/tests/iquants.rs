//! The i-quants: dequantization bit for bit against gguf-py's (test vectors made by
//! `python3 kernels/tests/data/make_iq_vectors.py kernels/tests/data`, with `pip install gguf`),
//! and the kernels the engine runs them with (IQ4_NL and IQ4_XS: rows4; the grid i-quants: the
//! GGUF layout) against the exact product and the scalar reference, on every level this CPU
//! has.

mod common;

use qwen_run_kernels::{
    batch_invariant_tokens, dequantize, matmul_many_with, repack_rows4, Backend, MatMulJob,
    Packing, QuantType,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DATA}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn dequantization_matches_gguf_py() {
    for (ty, name) in [
        (QuantType::IQ4NL, "iq4_nl"),
        (QuantType::IQ4XS, "iq4_xs"),
        (QuantType::IQ3XXS, "iq3_xxs"),
        (QuantType::IQ3S, "iq3_s"),
        (QuantType::IQ2XXS, "iq2_xxs"),
        (QuantType::IQ2XS, "iq2_xs"),
        (QuantType::IQ2S, "iq2_s"),
        (QuantType::IQ1S, "iq1_s"),
        (QuantType::IQ1M, "iq1_m"),
    ] {
        let blocks = read(&format!("{name}.blocks"));
        let want: Vec<u32> = read(&format!("{name}.gguf_py.f32"))
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(
            blocks.len() / ty.block_bytes() * ty.block_size(),
            want.len()
        );
        let mut got = vec![0f32; want.len()];
        dequantize(ty, &blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                *w,
                "{ty} element {i}: ours {g}, gguf-py {}",
                f32::from_bits(*w)
            );
        }
    }
}

/// Random `rows x cols` weights of `ty` (every index and scale value occurs) and their values.
fn weights(ty: QuantType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    common::random_iquant(ty, rows, cols, &mut StdRng::seed_from_u64(seed))
}

fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let v = rng.random_range(-1.0f32..1.0);
            if i % 61 == 0 {
                8.0 * v
            } else if i % 97 == 0 {
                0.0
            } else {
                v
            }
        })
        .collect()
}

fn run(
    backend: Backend,
    ty: QuantType,
    packing: Packing,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
) -> Vec<f32> {
    let n = x.len() / cols;
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
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// The rows4 kernels (decode: 1 token; small batches: up to 16, in registers; prefill: more, in
/// panels) against the reference (see [`check`]).
#[test]
fn rows4_kernels_match_the_reference() {
    for (i, ty) in [QuantType::IQ4NL, QuantType::IQ4XS].into_iter().enumerate() {
        for (rows, cols) in [(4, 256), (12, 512), (44, 768), (8, 4096)] {
            let seed = 10 * i as u64 + cols as u64;
            let (bytes, wv) = weights(ty, rows, cols, seed);
            let packed = repack_rows4(ty, rows, cols, &bytes).expect("rows4 form");
            check(ty, (&bytes, &packed), &wv, rows, cols, seed);
        }
    }
}

/// The grid i-quants (in the GGUF layout, the one the engine loads them in) against the
/// reference (see [`check`]); odd row counts leave a last group of fewer than four rows.
#[test]
fn grid_iquant_kernels_match_the_reference() {
    for (i, ty) in GRID_IQUANTS.into_iter().enumerate() {
        for (rows, cols) in [(4, 256), (13, 512), (6, 1280)] {
            let seed = 100 + 10 * i as u64 + cols as u64;
            let (bytes, wv) = weights(ty, rows, cols, seed);
            check(ty, (&bytes, &[]), &wv, rows, cols, seed);
        }
    }
}

const GRID_IQUANTS: [QuantType; 7] = [
    QuantType::IQ3XXS,
    QuantType::IQ3S,
    QuantType::IQ2XXS,
    QuantType::IQ2XS,
    QuantType::IQ2S,
    QuantType::IQ1S,
    QuantType::IQ1M,
];

/// `rows x cols` weights of `ty` (`bytes`: in the GGUF layout, and in the rows4 one when not
/// empty; their exact values `wv`) times 1 to 40 tokens: the kernels of every SIMD level give the
/// same bits, each token the bits it gets alone, and every result is within the error of the
/// activations' 8-bit quantization of the f64 product of the exact values, and near the
/// scalar reference's.
fn check(ty: QuantType, bytes: (&[u8], &[u8]), wv: &[f32], rows: usize, cols: usize, seed: u64) {
    let simd: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|b| b.is_simd() && b.is_available())
        .collect();
    let (gguf, packed) = bytes;
    let (packing, w) = if packed.is_empty() {
        (Packing::Gguf, gguf)
    } else {
        (Packing::Rows4, packed)
    };
    let x = activations(40 * cols, seed + 1);
    for n in [1, 2, 3, 5, 8, 9, 16, 17, 40] {
        let x = &x[..n * cols];
        let scalar = run(Backend::Scalar, ty, Packing::Gguf, gguf, rows, cols, x);
        if packing == Packing::Rows4 {
            let scalar4 = run(Backend::Scalar, ty, packing, w, rows, cols, x);
            assert_eq!(bits(&scalar), bits(&scalar4), "{ty} scalar rows4 n={n}");
        }
        let mut first: Option<Vec<f32>> = None;
        for &b in &simd {
            let y = run(b, ty, packing, w, rows, cols, x);
            match &first {
                Some(f) => assert_eq!(bits(&y), bits(f), "{ty} {b:?} n={n}"),
                None => first = Some(y),
            }
        }
        if ty.is_grid_iquant() {
            // the same integer sums and float steps as the reference
            if let Some(y) = &first {
                assert_eq!(bits(y), bits(&scalar), "{ty} {rows}x{cols} n={n} vs scalar");
            }
        }
        let (y, level) = match first {
            Some(y) => (y, simd[0]),
            None => (scalar.clone(), Backend::Scalar),
        };
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let alone = run(level, ty, packing, w, rows, cols, xt);
            assert_eq!(
                bits(&y[t * rows..(t + 1) * rows]),
                bits(&alone),
                "{ty} {rows}x{cols}: token {t} of {n} vs alone"
            );
            // the K-quant activations' blocks are 256 values, the others' 32
            let ab = if ty.block_size() == 256 && ty != QuantType::IQ4XS {
                256
            } else {
                32
            };
            for r in 0..rows {
                let wr = &wv[r * cols..(r + 1) * cols];
                let (mut exact, mut bound, mut mag) = (0f64, 0f64, 0f64);
                for (xb, wb) in xt.chunks(ab).zip(wr.chunks(ab)) {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    for (&a, &w) in xb.iter().zip(wb) {
                        exact += a as f64 * w as f64;
                        bound += (w as f64).abs() * amax / 254.0;
                        mag += (a as f64 * w as f64).abs();
                    }
                }
                let (got, s) = (y[t * rows + r] as f64, scalar[t * rows + r] as f64);
                let what = format!("{ty} {rows}x{cols} n={n} t={t} r={r}");
                assert!(
                    (got - exact).abs() <= bound * 1.01 + 2e-5 * mag + 1e-5,
                    "{what}: {got} vs exact {exact}"
                );
                assert!(
                    (got - s).abs() <= 1e-4 * mag + 1e-5,
                    "{what}: {got} vs scalar {s}"
                );
            }
        }
    }
}

#[test]
fn every_token_count_is_batch_invariant() {
    for ty in [QuantType::IQ4NL, QuantType::IQ4XS] {
        for packing in [Packing::Gguf, Packing::Rows4] {
            assert_eq!(batch_invariant_tokens(ty, packing), usize::MAX, "{ty}");
        }
    }
    for ty in GRID_IQUANTS {
        assert_eq!(
            batch_invariant_tokens(ty, Packing::Gguf),
            usize::MAX,
            "{ty}"
        );
    }
}
