//! Element-wise kernels of the forward pass. The SwiGLU gate (`silu(g) * u`) and the softmax of
//! attention cost their exponentials: a scalar `expf` call costs a few nanoseconds; eight lanes
//! of a polynomial cost about as much as one, which matters for the MLP's `ffn` values per token
//! and per layer. RMSNorm and the rotary embedding are plain loops the compiler vectorizes.

use crate::Backend;
use rayon::prelude::*;

/// Below this many values the work stays on the calling thread.
const MIN_PARALLEL: usize = 1 << 16;

/// `out[i] = silu(gate[i]) * up[i]`, with `silu(x) = x / (1 + e^-x)`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_with(Backend::detect(), gate, up, out)
}

pub fn silu_mul_with(backend: Backend, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "silu_mul: lengths differ"
    );
    let run = |g: &[f32], u: &[f32], o: &mut [f32]| match backend {
        #[cfg(target_arch = "x86_64")]
        level if level.is_simd() => unsafe { avx2::silu_mul(g, u, o) },
        _ => silu_mul_scalar(g, u, o),
    };
    if out.len() < MIN_PARALLEL || rayon::current_num_threads() < 2 {
        run(gate, up, out);
    } else {
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| run(g, u, o));
    }
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`, scaled by `w`. Rows run in parallel
/// only where there are many (prompt chunks), not for the few of a decode step.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && out.len() == x.len(),
        "rms_norm: {} values in rows of {d} into {}",
        x.len(),
        out.len()
    );
    let row = |(x, y): (&[f32], &mut [f32])| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = x * scale * w;
        }
    };
    if x.len() / d >= 16 {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(row);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(row);
    }
}

/// Rotary embedding in the NeoX layout, in place, on every head of one token: `x` holds heads of
/// `2 * cos.len()` values; the first and second halves of each head rotate as pairs by the angles
/// whose cosines and sines are given.
pub fn rope_neox(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    assert!(
        half > 0 && sin.len() == half && x.len().is_multiple_of(2 * half),
        "rope: {} values in heads of {}",
        x.len(),
        2 * half
    );
    for head in x.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// `acc[i] += x[i]` (the residual connections).
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_assign: lengths differ");
    acc.iter_mut().zip(x).for_each(|(a, x)| *a += x);
}

fn silu_mul_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `xs[i] = e^(xs[i] - max)` in place, `max` being the largest of them; returns their sum (the
/// softmax denominator).
pub(crate) fn exp_shifted(backend: Backend, xs: &mut [f32], max: f32) -> f32 {
    match backend {
        #[cfg(target_arch = "x86_64")]
        level if level.is_simd() => unsafe {
            avx2::exp_shifted::<true>(xs.as_mut_ptr(), xs.len(), max)
        },
        _ => xs
            .iter_mut()
            .map(|x| {
                *x = (*x - max).exp();
                *x
            })
            .sum(),
    }
}

/// The sum of `e^(x - max)` over `xs`, `max` being the largest of them (a softmax denominator
/// over a whole vocabulary, for log-probabilities), leaving `xs` as it is.
pub fn sum_exp_shifted(xs: &[f32], max: f32) -> f32 {
    sum_exp_shifted_with(Backend::detect(), xs, max)
}

pub fn sum_exp_shifted_with(backend: Backend, xs: &[f32], max: f32) -> f32 {
    match backend {
        // Without STORE the kernel only reads through the pointer.
        #[cfg(target_arch = "x86_64")]
        level if level.is_simd() => unsafe {
            avx2::exp_shifted::<false>(xs.as_ptr().cast_mut(), xs.len(), max)
        },
        _ => xs.iter().map(|x| (x - max).exp()).sum(),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// e^x on 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (its
    /// Taylor coefficients, minimax-adjusted: relative error ~2e-7), 2^n through the exponent
    /// bits. Inputs are clamped to [-87.3, 88.3], where the result is a normal f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n ln2, with ln2 split in two so that n * ln2_hi is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let c = |v: f32| _mm256_set1_ps(v);
        let mut p = c(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, c(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, c(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, c(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, c(0.166_666_65));
        p = _mm256_fmadd_ps(p, r, c(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let e_r = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), c(1.0));
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(e_r, two_n)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n8 = out.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let denom = _mm256_add_ps(one, exp(_mm256_sub_ps(zero, g)));
            let s = _mm256_div_ps(g, denom);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, u));
        }
        super::silu_mul_scalar(&gate[n8..], &up[n8..], &mut out[n8..]);
    }

    /// The sum of `e^(x - max)` over the `len` floats at `xs`, written back in place with
    /// `STORE` (without it `xs` is only read).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted<const STORE: bool>(xs: *mut f32, len: usize, max: f32) -> f32 {
        let n8 = len / 8 * 8;
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            let p = xs.add(i);
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p), m));
            if STORE {
                _mm256_storeu_ps(p, e);
            }
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        for i in n8..len {
            let e = (*xs.add(i) - max).exp();
            if STORE {
                *xs.add(i) = e;
            }
            sum += e;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<f32> {
        // Every magnitude an activation or an attention score can take, the clamps included.
        let mut v: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.01).collect();
        v.extend([
            -200.0, -100.0, -88.0, -87.0, -30.0, 30.0, 87.0, 88.0, 100.0, 0.0, -0.0,
        ]);
        v.extend((0..37).map(|i| (i as f32 * 0.37).sin() * 12.0)); // a tail after 8-lane chunks
        v
    }

    #[test]
    fn silu_mul_matches_the_definition() {
        let g = inputs();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for backend in [Backend::Scalar, Backend::detect()] {
            let mut out = vec![f32::NAN; g.len()];
            silu_mul_with(backend, &g, &u, &mut out);
            for i in 0..g.len() {
                let x = g[i] as f64;
                let want = x / (1.0 + (-x).exp()) * u[i] as f64;
                let err = (out[i] as f64 - want).abs();
                assert!(
                    err <= 1e-6 * want.abs().max(1e-30) + 1e-30,
                    "{backend:?}: silu({x}) * {} = {} vs {want}",
                    u[i],
                    out[i]
                );
            }
        }
    }

    #[test]
    fn exp_shifted_matches_the_definition() {
        let xs = inputs();
        // Softmax shifts by the maximum: every exponent is <= 0.
        let max = xs.iter().copied().fold(f32::MIN, f32::max);
        for backend in [Backend::Scalar, Backend::detect()] {
            let mut got = xs.clone();
            let sum = exp_shifted(backend, &mut got, max);
            let mut want_sum = 0f64;
            for (g, &x) in got.iter().zip(&xs) {
                let want = ((x - max) as f64).max(-87.3).exp();
                want_sum += want;
                assert!(
                    (*g as f64 - want).abs() <= 1e-6 * want + 1e-37,
                    "{backend:?}: exp({x} - {max}) = {g} vs {want}"
                );
            }
            assert!((sum as f64 - want_sum).abs() <= 1e-5 * want_sum);
            let unchanged = xs.clone();
            let read_only = sum_exp_shifted_with(backend, &unchanged, max);
            assert_eq!(
                unchanged, xs,
                "{backend:?}: sum_exp_shifted wrote its input"
            );
            assert_eq!(read_only, sum, "{backend:?}");
        }
    }
}
