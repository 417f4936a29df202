//! Shape validation, activation quantization (once per call), and splitting of
//! the rows across the current rayon pool.

use crate::act::{self, BlockQ8, BlockQ8K};
use crate::{scalar, Backend, QuantType};
use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    static SCRATCH_Q8: Cell<Vec<BlockQ8>> = const { Cell::new(Vec::new()) };
    static SCRATCH_Q8K: Cell<Vec<BlockQ8K>> = const { Cell::new(Vec::new()) };
}

/// Raw output pointer shared by the row-chunk tasks (which write disjoint rows).
#[derive(Clone, Copy)]
pub(crate) struct YPtr(pub *mut f32);
unsafe impl Send for YPtr {}
unsafe impl Sync for YPtr {}

/// Activations of all tokens, in the form the weight type wants.
#[derive(Clone, Copy)]
pub(crate) enum Act<'a> {
    F32(&'a [f32]),
    Q8(&'a [BlockQ8]),
    Q8K(&'a [BlockQ8K]),
}

/// Kind of activation quantization a weight type uses.
fn act_kind(ty: QuantType) -> u8 {
    match ty {
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => 0,
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q8_0 => {
            1
        }
        _ => 2,
    }
}

/// Minimum number of weight bytes per parallel task (below that, fewer tasks).
const MIN_TASK_BYTES: usize = 32 * 1024;

#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    backend: Backend,
    ty: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    let rb = ty.row_bytes(cols).unwrap_or_else(|| {
        panic!(
            "matmul {}: cols {} not a multiple of block size {}",
            ty,
            cols,
            ty.block_size()
        )
    });
    assert_eq!(
        w.len(),
        rows * rb,
        "matmul {ty}: weight bytes != rows * row_bytes"
    );
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "matmul {ty}: x.len() != n_tokens * cols"
    );
    assert_eq!(
        y.len(),
        n_tokens * rows,
        "matmul {ty}: y.len() != n_tokens * rows"
    );
    if rows == 0 || n_tokens == 0 {
        return;
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let parallel_quant = n_tokens * cols >= 1 << 16 && rayon::current_num_threads() > 1;
    match act_kind(ty) {
        0 => run(backend, ty, w, rb, rows, cols, Act::F32(x), n_tokens, y),
        1 => {
            let nb = cols / 32;
            let mut buf = SCRATCH_Q8.with(|c| c.take());
            buf.clear();
            buf.resize(nb * n_tokens, BlockQ8::default());
            let q = |xs: &[f32], out: &mut [BlockQ8]| match backend {
                #[cfg(target_arch = "x86_64")]
                Backend::Avx2 => unsafe { act::avx2::quantize_q8(xs, out) },
                _ => act::quantize_q8_scalar(xs, out),
            };
            if parallel_quant {
                x.par_chunks(cols)
                    .zip(buf.par_chunks_mut(nb))
                    .for_each(|(xs, out)| q(xs, out));
            } else {
                q(x, &mut buf);
            }
            run(backend, ty, w, rb, rows, cols, Act::Q8(&buf), n_tokens, y);
            SCRATCH_Q8.with(|c| c.set(buf));
        }
        _ => {
            let nb = cols / 256;
            let mut buf = SCRATCH_Q8K.with(|c| c.take());
            buf.clear();
            buf.resize(nb * n_tokens, BlockQ8K::default());
            let q = |xs: &[f32], out: &mut [BlockQ8K]| match backend {
                #[cfg(target_arch = "x86_64")]
                Backend::Avx2 => unsafe { act::avx2::quantize_q8k(xs, out) },
                _ => act::quantize_q8k_scalar(xs, out),
            };
            if parallel_quant {
                x.par_chunks(cols)
                    .zip(buf.par_chunks_mut(nb))
                    .for_each(|(xs, out)| q(xs, out));
            } else {
                q(x, &mut buf);
            }
            run(backend, ty, w, rb, rows, cols, Act::Q8K(&buf), n_tokens, y);
            SCRATCH_Q8K.with(|c| c.set(buf));
        }
    }
}

/// Splits rows into chunks (multiples of 4 rows) and runs them on the pool.
#[allow(clippy::too_many_arguments)]
fn run(
    backend: Backend,
    ty: QuantType,
    w: &[u8],
    rb: usize,
    rows: usize,
    cols: usize,
    act: Act<'_>,
    n_tokens: usize,
    y: &mut [f32],
) {
    let threads = rayon::current_num_threads().max(1);
    let total = rows * rb * n_tokens.min(16);
    let max_tasks = (total / MIN_TASK_BYTES).max(1);
    let tasks = (threads * chunks_per_thread(n_tokens))
        .min(max_tasks)
        .min(rows.div_ceil(4))
        .max(1);
    let chunk = rows.div_ceil(tasks).next_multiple_of(4).min(rows);
    let yp = YPtr(y.as_mut_ptr());
    let job = |r0: usize| {
        let r1 = (r0 + chunk).min(rows);
        chunk_rows(backend, ty, w, rb, rows, cols, act, n_tokens, yp, r0, r1);
    };
    let n_chunks = rows.div_ceil(chunk);
    if n_chunks == 1 {
        job(0);
    } else {
        (0..n_chunks).into_par_iter().for_each(|c| job(c * chunk));
    }
}

fn chunks_per_thread(n_tokens: usize) -> usize {
    // measured: decode is fastest with one contiguous chunk per thread
    if n_tokens == 1 {
        1
    } else {
        2
    }
}

/// Computes rows `r0..r1` for all tokens.
#[allow(clippy::too_many_arguments)]
fn chunk_rows(
    backend: Backend,
    ty: QuantType,
    w: &[u8],
    rb: usize,
    rows: usize,
    cols: usize,
    act: Act<'_>,
    n_tokens: usize,
    y: YPtr,
    r0: usize,
    r1: usize,
) {
    match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => unsafe {
            crate::x86::chunk_rows(ty, w, rb, rows, cols, act, n_tokens, y, r0, r1)
        },
        _ => chunk_rows_scalar(ty, w, rb, rows, cols, act, n_tokens, y, r0, r1),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_rows_scalar(
    ty: QuantType,
    w: &[u8],
    rb: usize,
    rows: usize,
    cols: usize,
    act: Act<'_>,
    n_tokens: usize,
    y: YPtr,
    r0: usize,
    r1: usize,
) {
    for r in r0..r1 {
        let wr = &w[r * rb..(r + 1) * rb];
        for t in 0..n_tokens {
            let v = match act {
                Act::F32(x) => scalar::dot_float(ty, wr, &x[t * cols..(t + 1) * cols]),
                Act::Q8(a) => {
                    let nb = cols / 32;
                    scalar::dot_q8(ty, wr, &a[t * nb..(t + 1) * nb])
                }
                Act::Q8K(a) => {
                    let nb = cols / 256;
                    scalar::dot_q8k(ty, wr, &a[t * nb..(t + 1) * nb])
                }
            };
            // SAFETY: rows r0..r1 belong to this task only; index is in bounds.
            unsafe { *y.0.add(t * rows + r) = v };
        }
    }
}
