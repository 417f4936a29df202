//! Shape validation, activation quantization (once per call), and splitting of
//! the rows across the threads ([`crate::pool`]).

use crate::act::{self, BlockQ8, BlockQ8K};
use crate::repack::{self, Packing};
use crate::{scalar, Backend, QuantType};
use rayon::prelude::*;
use smallvec::SmallVec;
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

/// Bytes per weight row of `cols` columns as stored in `packing` (`None`: `cols` is not a
/// multiple of the block size).
pub fn stored_row_bytes(ty: QuantType, packing: Packing, cols: usize) -> Option<usize> {
    match packing {
        Packing::Gguf => ty.row_bytes(cols),
        Packing::Rows4 => repack::rows4_row_bytes(ty, cols),
    }
}

/// Minimum number of weight bytes per parallel task (below that, fewer tasks).
const MIN_TASK_BYTES: usize = 32 * 1024;

/// One weight matrix of a [`matmul_many`] call and its output, `[n_tokens, rows]`.
pub struct MatMulJob<'a> {
    pub ty: QuantType,
    /// How `w` is laid out ([`Packing::Rows4`]: from [`crate::repack_rows4`]).
    pub packing: Packing,
    pub w: &'a [u8],
    pub rows: usize,
    pub y: &'a mut [f32],
}

/// `y = x w^T` for every job, all sharing the input `x` (`[n_tokens, cols]`): the input is
/// quantized once per activation format, and the row chunks of every matrix run in one parallel
/// region, so projections that read the same input (q, k and v; gate and up) pay for one
/// fork-join and one weight stream instead of one each.
pub(crate) fn matmul_many(
    backend: Backend,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    jobs: &mut [MatMulJob<'_>],
) {
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "matmul: x.len() != n_tokens * cols"
    );
    for j in jobs.iter() {
        let ty = j.ty;
        if j.packing == Packing::Rows4 {
            assert!(
                repack::has_rows4(ty) && j.rows.is_multiple_of(4),
                "matmul {ty}: no rows4 layout for {} rows of this type",
                j.rows
            );
        }
        let rb = stored_row_bytes(ty, j.packing, cols).unwrap_or_else(|| {
            panic!(
                "matmul {ty}: cols {cols} not a multiple of block size {}",
                ty.block_size()
            )
        });
        assert_eq!(
            j.w.len(),
            j.rows * rb,
            "matmul {ty}: weight bytes != rows * row_bytes"
        );
        assert_eq!(
            j.y.len(),
            n_tokens * j.rows,
            "matmul {ty}: y.len() != n_tokens * rows"
        );
    }
    if n_tokens == 0 {
        return;
    }
    if cols == 0 {
        jobs.iter_mut().for_each(|j| j.y.fill(0.0));
        return;
    }
    let parallel_quant = n_tokens * cols >= 1 << 16 && rayon::current_num_threads() > 1;
    let needs = |kind: u8| jobs.iter().any(|j| act_kind(j.ty) == kind);
    let mut q8 = SCRATCH_Q8.with(|c| c.take());
    let mut q8k = SCRATCH_Q8K.with(|c| c.take());
    if needs(1) {
        quantize_rows(
            x,
            cols,
            32,
            parallel_quant,
            &mut q8,
            |xs, out| match backend {
                #[cfg(target_arch = "x86_64")]
                Backend::Avx2 | Backend::Avx512 => unsafe { act::avx2::quantize_q8(xs, out) },
                _ => act::quantize_q8_scalar(xs, out),
            },
        );
    }
    if needs(2) {
        quantize_rows(
            x,
            cols,
            256,
            parallel_quant,
            &mut q8k,
            |xs, out| match backend {
                #[cfg(target_arch = "x86_64")]
                Backend::Avx2 | Backend::Avx512 => unsafe { act::avx2::quantize_q8k(xs, out) },
                _ => act::quantize_q8k_scalar(xs, out),
            },
        );
    }
    // Each job's row chunks are tasks `first_task..first_task + chunks` of one parallel loop.
    // Plans sit inline (a call has a few matrices), so a call allocates nothing.
    let mut plans: SmallVec<[Plan; 4]> = SmallVec::new();
    let mut n_tasks = 0;
    for j in jobs.iter_mut() {
        let act = match act_kind(j.ty) {
            0 => Act::F32(x),
            1 => Act::Q8(&q8),
            _ => Act::Q8K(&q8k),
        };
        let rb = stored_row_bytes(j.ty, j.packing, cols).expect("checked above");
        let chunk = chunk_rows_for(j.rows, rb, n_tokens);
        plans.push(Plan {
            ty: j.ty,
            packing: j.packing,
            w: j.w,
            rb,
            rows: j.rows,
            act,
            y: YPtr(j.y.as_mut_ptr()),
            chunk,
            first_task: n_tasks,
        });
        n_tasks += j.rows.div_ceil(chunk);
    }
    let job = |i: usize| {
        let p = plans
            .iter()
            .rev()
            .find(|p| p.first_task <= i)
            .expect("task 0 belongs to the first plan");
        let r0 = (i - p.first_task) * p.chunk;
        let r1 = (r0 + p.chunk).min(p.rows);
        chunk_rows(
            backend, p.ty, p.packing, p.w, p.rb, p.rows, cols, p.act, n_tokens, p.y, r0, r1,
        )
    };
    crate::pool::for_each(n_tasks, job);
    drop(plans);
    SCRATCH_Q8.with(|c| c.set(q8));
    SCRATCH_Q8K.with(|c| c.set(q8k));
}

/// Quantizes each `cols`-wide row of `x` into `buf` (blocks of `per_block` values) with `q`.
fn quantize_rows<B: Default + Clone + Send>(
    x: &[f32],
    cols: usize,
    per_block: usize,
    parallel: bool,
    buf: &mut Vec<B>,
    q: impl Fn(&[f32], &mut [B]) + Sync,
) {
    let nb = cols / per_block;
    buf.clear();
    buf.resize(nb * (x.len() / cols), B::default());
    if parallel {
        x.par_chunks(cols)
            .zip(buf.par_chunks_mut(nb))
            .for_each(|(xs, out)| q(xs, out));
    } else {
        q(x, buf);
    }
}

/// One matrix of a call, cut into tasks of `chunk` rows.
struct Plan<'a> {
    ty: QuantType,
    packing: Packing,
    w: &'a [u8],
    rb: usize,
    rows: usize,
    act: Act<'a>,
    y: YPtr,
    chunk: usize,
    first_task: usize,
}

/// Rows per task (a multiple of 4, so rows4 groups are never split): a few tasks per thread, none under [`MIN_TASK_BYTES`].
fn chunk_rows_for(rows: usize, rb: usize, n_tokens: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let total = rows * rb * n_tokens.min(16);
    let max_tasks = (total / MIN_TASK_BYTES).max(1);
    let tasks = (threads * chunks_per_thread(n_tokens))
        .min(max_tasks)
        .min(rows.div_ceil(4))
        .max(1);
    rows.div_ceil(tasks).next_multiple_of(4).min(rows).max(1)
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
    packing: Packing,
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
        // SAFETY: the backend was checked against the CPU's features (`Backend::is_available`)
        Backend::Avx2 => unsafe {
            use crate::x86::{chunk_rows, Avx2};
            chunk_rows::<Avx2>(ty, packing, w, rb, rows, cols, act, n_tokens, y, r0, r1)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above
        Backend::Avx512 => unsafe {
            use crate::x86::{chunk_rows, Avx512Vnni};
            chunk_rows::<Avx512Vnni>(ty, packing, w, rb, rows, cols, act, n_tokens, y, r0, r1)
        },
        _ => chunk_rows_scalar(ty, packing, w, rb, rows, cols, act, n_tokens, y, r0, r1),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_rows_scalar(
    ty: QuantType,
    packing: Packing,
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
    // rows4 weights are read one group of four rows at a time, back in GGUF form
    let grb = ty.row_bytes(cols).expect("checked by matmul_many");
    let mut group = Vec::new();
    for r in r0..r1 {
        let wr = match packing {
            Packing::Gguf => &w[r * rb..(r + 1) * rb],
            Packing::Rows4 => {
                if r % 4 == 0 || group.is_empty() {
                    let g = r / 4 * 4;
                    group.resize(4 * grb, 0);
                    repack::unpack_rows4_group(ty, grb, &w[g * rb..(g + 4) * rb], &mut group);
                }
                &group[r % 4 * grb..(r % 4 + 1) * grb]
            }
        };
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
