//! A small single-threaded f32 matrix product for the attention of prompt chunks:
//! `c (=|+=) a b`, `a` `[m, k]`, `b` `[k, n]` with `n` a multiple of [`COLS`], all row-major
//! with their own row strides.
//!
//! Attention runs it inside tasks that already share the threads, on blocks that fit in L2, so
//! it needs no packing, no threads and no allocation; a general GEMM crate does all three per
//! call. The AVX2 kernel keeps a block of up to 6 rows x 16 columns of `c` in registers while
//! it walks `k`: each step loads two vectors of `b` and broadcasts one value of `a` per row.

use crate::Backend;

/// Columns per block of `c` (two AVX2 vectors).
pub(crate) const COLS: usize = 16;

/// `c[i][j] (=|+=) sum_p a[i][p] b[p][j]` for `i < m`, `j < n`, `p < k`; the slices hold the
/// rows at strides `lda`, `ldb`, `ldc`. Panics where `n` is not a multiple of [`COLS`] or a
/// slice is too short.
pub(crate) fn gemm(
    backend: Backend,
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
    accumulate: bool,
) {
    assert!(n.is_multiple_of(COLS), "gemm: {n} columns");
    let fits = |len: usize, rows: usize, stride: usize, cols: usize| {
        rows == 0 || len >= (rows - 1) * stride + cols
    };
    assert!(
        fits(a.len(), m, lda, k) && fits(b.len(), k, ldb, n) && fits(c.len(), m, ldc, n),
        "gemm: a matrix is shorter than its shape"
    );
    match backend {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the shapes were checked against the slices above.
        level if level.is_simd() => unsafe {
            avx2::gemm((m, n, k), (a, lda), (b, ldb), (c, ldc), accumulate)
        },
        _ => {
            for i in 0..m {
                for j in 0..n {
                    let dot: f32 = (0..k).map(|p| a[i * lda + p] * b[p * ldb + j]).sum();
                    let out = &mut c[i * ldc + j];
                    *out = if accumulate { *out + dot } else { dot };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::COLS;
    use std::arch::x86_64::*;

    /// [`super::gemm`] once the shapes are checked.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(
        (m, n, k): (usize, usize, usize),
        (a, lda): (&[f32], usize),
        (b, ldb): (&[f32], usize),
        (c, ldc): (&mut [f32], usize),
        accumulate: bool,
    ) {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let mut i = 0;
        while i < m {
            let (a, c) = (a.add(i * lda), c.add(i * ldc));
            let rows = (m - i).min(6);
            match rows {
                6 => rows_block::<6>((n, k), (a, lda), (b, ldb), (c, ldc), accumulate),
                5 => rows_block::<5>((n, k), (a, lda), (b, ldb), (c, ldc), accumulate),
                4 => rows_block::<4>((n, k), (a, lda), (b, ldb), (c, ldc), accumulate),
                3 => rows_block::<3>((n, k), (a, lda), (b, ldb), (c, ldc), accumulate),
                2 => rows_block::<2>((n, k), (a, lda), (b, ldb), (c, ldc), accumulate),
                _ => rows_block::<1>((n, k), (a, lda), (b, ldb), (c, ldc), accumulate),
            }
            i += rows;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_block<const R: usize>(
        (n, k): (usize, usize),
        (a, lda): (*const f32, usize),
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        accumulate: bool,
    ) {
        for j in (0..n).step_by(COLS) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for p in 0..k {
                let bp = b.add(p * ldb + j);
                let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(r * lda + p));
                    acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let cp = c.add(r * ldc + j);
                let (mut c0, mut c1) = (acc[0], acc[1]);
                if accumulate {
                    c0 = _mm256_add_ps(c0, _mm256_loadu_ps(cp));
                    c1 = _mm256_add_ps(c1, _mm256_loadu_ps(cp.add(8)));
                }
                _mm256_storeu_ps(cp, c0);
                _mm256_storeu_ps(cp.add(8), c1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_for_every_row_count_and_both_modes() {
        let value = |i: usize| ((i * 7919 % 211) as f32 - 105.0) / 64.0;
        for m in 1..=13 {
            for (n, k) in [(16, 1), (32, 9), (48, 64)] {
                let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
                let a: Vec<f32> = (0..m * lda).map(value).collect();
                let b: Vec<f32> = (0..k * ldb).map(|i| value(i + 1000)).collect();
                let start: Vec<f32> = (0..m * ldc).map(|i| value(i + 5000)).collect();
                for accumulate in [false, true] {
                    for backend in [Backend::Scalar, Backend::detect()] {
                        let mut c = start.clone();
                        gemm(
                            backend,
                            (m, n, k),
                            (&a, lda),
                            (&b, ldb),
                            (&mut c, ldc),
                            accumulate,
                        );
                        for i in 0..m {
                            for j in 0..ldc {
                                let at = i * ldc + j;
                                let want = if j >= n {
                                    start[at] as f64
                                } else {
                                    let dot: f64 = (0..k)
                                        .map(|p| a[i * lda + p] as f64 * b[p * ldb + j] as f64)
                                        .sum();
                                    dot + if accumulate { start[at] as f64 } else { 0.0 }
                                };
                                assert!(
                                    (c[at] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "{backend:?} m={m} n={n} k={k} acc={accumulate} [{i}][{j}]: {} vs {want}",
                                    c[at]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
