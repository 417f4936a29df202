//! The only dispatcher of the matmul kernels: shape validation, activation quantization (once per
//! call), splitting of the rows across the threads ([`crate::pool`]), and, for every piece of
//! work, the choice between the scalar reference ([`crate::scalar`], [`crate::repack`]) and the
//! x86 levels. Neither of those calls the other or back into this module.

use crate::layout::{
    has_rows4, rows4_row_bytes, stored_row_bytes, Act, BlockQ8, BlockQ8K, Packing, QuantType,
    RowsPlan, YPtr,
};
use crate::{repack, scalar, Backend};
use rayon::prelude::*;
use smallvec::SmallVec;
use std::cell::Cell;
use std::ops::Range;

thread_local! {
    static SCRATCH_Q8: Cell<Vec<BlockQ8>> = const { Cell::new(Vec::new()) };
    static SCRATCH_Q8K: Cell<Vec<BlockQ8K>> = const { Cell::new(Vec::new()) };
}

/// Kind of activation quantization a weight type uses.
fn act_kind(ty: QuantType) -> u8 {
    match ty {
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => 0,
        QuantType::Q4_0
        | QuantType::Q4_1
        | QuantType::Q5_0
        | QuantType::Q5_1
        | QuantType::Q8_0
        | QuantType::IQ4NL
        | QuantType::IQ4XS => 1,
        _ => 2,
    }
}

/// Minimum number of weight bytes per parallel task (below that, fewer tasks).
const MIN_TASK_BYTES: usize = 32 * 1024;

/// One weight matrix of a [`crate::matmul_many`] call and its output, `[n_tokens, rows]`.
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
                has_rows4(ty) && j.rows.is_multiple_of(4),
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
        quantize_rows(x, cols, 32, parallel_quant, &mut q8, |xs, out| {
            quantize_q8(backend, xs, out)
        });
    }
    if needs(2) {
        quantize_rows(x, cols, 256, parallel_quant, &mut q8k, |xs, out| {
            quantize_q8k(backend, xs, out)
        });
    }
    // Each job's row chunks are tasks `first_task..first_task + chunks` of one parallel loop.
    // Plans sit inline (a call has a few matrices), so a call allocates nothing.
    let mut plans: SmallVec<[JobTasks; 4]> = SmallVec::new();
    let mut n_tasks = 0;
    for j in jobs.iter_mut() {
        let act = match act_kind(j.ty) {
            0 => Act::F32(x),
            1 => Act::Q8(&q8),
            _ => Act::Q8K(&q8k),
        };
        let row_bytes = stored_row_bytes(j.ty, j.packing, cols).expect("checked above");
        let chunk = chunk_rows_for(j.rows, row_bytes, n_tokens);
        plans.push(JobTasks {
            plan: RowsPlan {
                ty: j.ty,
                packing: j.packing,
                w: j.w,
                row_bytes,
                rows: j.rows,
                cols,
                act,
                n_tokens,
                y: YPtr(j.y.as_mut_ptr()),
            },
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
        let r1 = (r0 + p.chunk).min(p.plan.rows);
        // SAFETY: `y` was checked to hold `n_tokens * rows` values, and the tasks' row ranges
        // do not overlap
        unsafe { chunk_rows(backend, &p.plan, r0..r1) }
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
struct JobTasks<'a> {
    plan: RowsPlan<'a>,
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
    // decode: one contiguous chunk per thread keeps each thread streaming its own rows
    if n_tokens == 1 {
        1
    } else {
        2
    }
}

/// Computes rows `rows` of `plan` for all tokens with `backend`'s kernels; the x86 levels leave
/// the types they have no kernel for to the scalar reference.
///
/// # Safety
/// `plan.y` must be valid for `n_tokens * plan.rows` writes, and no one else may write rows
/// `rows` of it while this runs.
unsafe fn chunk_rows(backend: Backend, plan: &RowsPlan<'_>, rows: Range<usize>) {
    let done = match backend {
        // SAFETY: the backend was checked against the CPU's features (`Backend::is_available`)
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => crate::x86::chunk_rows::<crate::x86::Avx2>(plan, rows.clone()),
        #[cfg(target_arch = "x86_64")]
        Backend::AvxVnni => crate::x86::chunk_rows::<crate::x86::AvxVnni>(plan, rows.clone()),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => crate::x86::chunk_rows::<crate::x86::Avx512Vnni>(plan, rows.clone()),
        _ => false,
    };
    if !done {
        scalar::chunk_rows(plan, rows)
    }
}

/// Quantizes `x` (a multiple of 32 long) into Q8 blocks with `backend`'s code.
fn quantize_q8(backend: Backend, x: &[f32], out: &mut [BlockQ8]) {
    match backend {
        // SAFETY: the backend was checked against the CPU's features
        #[cfg(target_arch = "x86_64")]
        level if level.is_simd() => unsafe { crate::x86::quantize_q8(x, out) },
        _ => scalar::quantize_q8(x, out),
    }
}

/// Quantizes `x` (a multiple of 256 long) into Q8_K blocks with `backend`'s code.
fn quantize_q8k(backend: Backend, x: &[f32], out: &mut [BlockQ8K]) {
    match backend {
        // SAFETY: the backend was checked against the CPU's features
        #[cfg(target_arch = "x86_64")]
        level if level.is_simd() => unsafe { crate::x86::quantize_q8k(x, out) },
        _ => scalar::quantize_q8k(x, out),
    }
}

/// `rows x cols` GGUF weights of `ty` in the rows4 layout ([`rows4_row_bytes`] per row), or
/// `None` when `ty` has no rows4 form or `rows` is not a multiple of four.
pub fn repack_rows4(ty: QuantType, rows: usize, cols: usize, data: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; rows * rows4_row_bytes(ty, cols)?];
    repack_rows4_into(ty, rows, cols, data, &mut out)?;
    Some(out)
}

/// [`repack_rows4`] into `out`, for callers that choose the memory.
pub fn repack_rows4_into(
    ty: QuantType,
    rows: usize,
    cols: usize,
    data: &[u8],
    out: &mut [u8],
) -> Option<()> {
    let (rb, prb) = (ty.row_bytes(cols)?, rows4_row_bytes(ty, cols)?);
    let fits = data.len() == rows * rb && out.len() == rows * prb;
    if !has_rows4(ty) || !rows.is_multiple_of(4) || !fits {
        return None;
    }
    let backend = Backend::detect();
    // groups are independent: one parallel task per few hundred KiB
    let groups_per_task = (256usize << 10).div_ceil(4 * rb);
    out.par_chunks_mut(groups_per_task * 4 * prb)
        .zip(data.par_chunks(groups_per_task * 4 * rb))
        .for_each(|(dst, src)| pack_rows4(backend, ty, rb, src, dst));
    Some(())
}

/// Groups of four GGUF rows of `ty` (`rb` bytes per row) in `src` as rows4 groups in `dst`, with
/// `backend`'s packer where it has one for `ty` (the super-block types have only the scalar one).
fn pack_rows4(backend: Backend, ty: QuantType, rb: usize, src: &[u8], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if backend.is_simd() && !matches!(ty, QuantType::Q4K | QuantType::Q6K | QuantType::IQ4XS) {
        // SAFETY: the backend was checked against the CPU's features
        return unsafe { crate::x86::pack_rows4(ty, rb, src, dst) };
    }
    let _ = backend;
    repack::pack_rows4(ty, rb, src, dst)
}

/// 8-bit multiply-adds per second of all threads of the current rayon pool with `backend`'s
/// product instructions (`None` for the scalar kernels); see [`crate::int8_product_rate`].
pub(crate) fn int8_product_rate(backend: Backend, seconds: f64) -> Option<f64> {
    // SAFETY (every level): the backend was checked against the CPU's features
    let rates = match backend {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => {
            rayon::broadcast(|_| unsafe { crate::x86::product_rate::<crate::x86::Avx2>(seconds) })
        }
        #[cfg(target_arch = "x86_64")]
        Backend::AvxVnni => rayon::broadcast(|_| unsafe {
            crate::x86::product_rate::<crate::x86::AvxVnni>(seconds)
        }),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => rayon::broadcast(|_| unsafe {
            crate::x86::product_rate::<crate::x86::Avx512Vnni>(seconds)
        }),
        _ => return None,
    };
    Some(rates.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repack::tests::bytes;
    use crate::scalar::tests::activations;

    fn simd_levels() -> impl Iterator<Item = Backend> {
        Backend::ALL
            .into_iter()
            .filter(|b| b.is_simd() && b.is_available())
    }

    #[test]
    fn simd_quantization_is_bit_identical() {
        let x = activations(1024);
        for backend in simd_levels() {
            let mut a = vec![BlockQ8::default(); 32];
            let mut b = vec![BlockQ8::default(); 32];
            quantize_q8(Backend::Scalar, &x, &mut a);
            quantize_q8(backend, &x, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.qs, q.qs);
                assert_eq!(p.d.to_bits(), q.d.to_bits());
                assert_eq!(p.s.to_bits(), q.s.to_bits());
            }
            let mut a = vec![BlockQ8K::default(); 4];
            let mut b = vec![BlockQ8K::default(); 4];
            quantize_q8k(Backend::Scalar, &x, &mut a);
            quantize_q8k(backend, &x, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.qs, q.qs);
                assert_eq!(p.bsums, q.bsums);
                assert_eq!(p.d.to_bits(), q.d.to_bits());
            }
        }
    }

    /// The SIMD packer (used by `repack_rows4` where AVX2 runs) writes what the scalar one does.
    #[test]
    fn simd_packer_matches_the_scalar_one() {
        for backend in simd_levels() {
            for ty in [
                QuantType::Q4_0,
                QuantType::Q5_0,
                QuantType::Q8_0,
                QuantType::IQ4NL,
            ] {
                let (rows, cols) = (8, 96);
                let rb = ty.row_bytes(cols).unwrap();
                let data = bytes(rows * rb, 11);
                let mut simd = vec![0u8; data.len()];
                pack_rows4(backend, ty, rb, &data, &mut simd);
                let mut scalar = vec![0u8; data.len()];
                pack_rows4(Backend::Scalar, ty, rb, &data, &mut scalar);
                assert_eq!(simd, scalar, "{ty}");
            }
        }
    }

    #[test]
    fn only_supported_shapes() {
        assert!(repack_rows4(QuantType::Q5K, 4, 256, &[0; 4 * 176]).is_none());
        assert!(repack_rows4(QuantType::Q8_0, 3, 32, &[0; 3 * 34]).is_none());
        assert!(repack_rows4(QuantType::Q8_0, 4, 32, &[0; 3 * 34]).is_none());
        assert!(repack_rows4(QuantType::Q8_0, 4, 32, &[0; 4 * 34]).is_some());
    }
}
