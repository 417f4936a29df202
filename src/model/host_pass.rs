//! A step (prompt chunks, decode steps, batched decode) of a model that runs wholly on the CPU
//! with f32 KV caches, over host memory.
//!
//! The [`tensor_pass`](super::tensor_pass) computes the same thing for everything else (GPUs,
//! f16 and q8_0 caches). Built from tensor ops, a decode step makes thousands of small
//! allocations (each op's output, shape and strides) and some copies, which cost about as much
//! as the step's small ops themselves; a prompt chunk's temporaries are large, and the
//! allocator keeps some of them after it frees them, so the resident memory grows over repeated
//! long prompts (docs/BENCHMARKS.md has figures). Here each pass writes its activations into buffers kept from pass to
//! pass, writes and reads the KV caches in place, and allocates nothing once the buffers have
//! grown to the pass's size.

use super::config::{logit_rows, Head, Sequence};
use super::qwen2::Qwen2;
use super::weights::{native_matmul, Linear, MatMulPart};
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, Layout, Storage, StorageRef};
use qwen_run_kernels::attention::{cached_attention, AttnDims, CachedSeq};
use qwen_run_kernels::elementwise::{add_assign, rms_norm, rope_neox, silu_mul};
use smallvec::SmallVec;

/// The activations of a pass, kept for the next one (grown, never shrunk).
#[derive(Default)]
pub(super) struct Scratch {
    h: Vec<f32>,
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

/// The first `n` values of `buf`, grown to hold them if needed.
fn part(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// Runs one step (shapes and room in the caches checked by the caller) and writes what `head`
/// says of the rows the sequences ask for into `logits`: `[rows, vocab]` or `[rows, hidden]`.
pub(super) fn run(
    model: &Qwen2,
    seqs: &mut [Sequence],
    head: Head,
    scratch: &mut Scratch,
    logits: &mut Vec<f32>,
) -> Result<()> {
    let c = &model.cfg;
    let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let (d, kv, half) = (c.hidden, c.n_kv_heads * c.head_dim, c.head_dim / 2);
    let Scratch {
        h,
        x,
        q,
        k,
        v,
        att,
        proj,
        gate,
        up,
        act,
    } = scratch;
    let (h, x, q, att, proj) = (
        part(h, t * d),
        part(x, t * d),
        part(q, t * d),
        part(att, t * d),
        part(proj, t * d),
    );
    let (k, v) = (part(k, t * kv), part(v, t * kv));
    let (gate, up, act) = (
        part(gate, t * c.ffn),
        part(up, t * c.ffn),
        part(act, t * c.ffn),
    );

    let mut row = 0;
    for s in seqs.iter() {
        let n = s.tokens.len();
        model
            .embed
            .lookup_into(s.tokens, &mut h[row * d..(row + n) * d])?;
        row += n;
    }
    let rope = model.rope.first().context("no rotary tables")?;
    let (cos, sin) = (rope.cos.storage_and_layout(), rope.sin.storage_and_layout());
    let (cos, sin) = (host_f32(&cos)?, host_f32(&sin)?);
    let dims = AttnDims {
        n_heads: c.n_heads,
        kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    };
    let scale = 1.0 / (c.head_dim as f32).sqrt();

    for (i, l) in model.layers.iter().enumerate() {
        // Attention: projections and rotary embedding for all tokens, then each sequence
        // writes its keys and values into its own cache and attends over it in place.
        let norm = l.attn_norm.storage_and_layout();
        rms_norm(h, host_f32(&norm)?, c.rms_eps, x);
        native_matmul(
            [
                native(&l.q, &mut *q)?,
                native(&l.k, &mut *k)?,
                native(&l.v, &mut *v)?,
            ],
            x,
            t,
        );
        let mut row = 0;
        for s in seqs.iter_mut() {
            let n = s.tokens.len();
            for j in 0..n {
                let p = s.cache.len() + j;
                let (cos, sin) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                rope_neox(&mut q[(row + j) * d..(row + j + 1) * d], cos, sin);
                rope_neox(&mut k[(row + j) * kv..(row + j + 1) * kv], cos, sin);
            }
            let rows = row * kv..(row + n) * kv;
            s.cache.write_host(i, &k[rows.clone()], &v[rows])?;
            row += n;
        }
        let cached = seqs
            .iter()
            .map(|s| {
                let (keys, values) = s.cache.host_layer(i).context("not a host cache")?;
                Ok(CachedSeq {
                    keys,
                    values,
                    pos: s.cache.len(),
                    n: s.tokens.len(),
                })
            })
            .collect::<Result<SmallVec<[_; 8]>>>()?;
        cached_attention(dims, q, &cached, scale, att);
        native_matmul([native(&l.o, &mut *proj)?], att, t);
        add_assign(h, proj);
        // MLP.
        let norm = l.ffn_norm.storage_and_layout();
        rms_norm(h, host_f32(&norm)?, c.rms_eps, x);
        native_matmul(
            [native(&l.gate, &mut *gate)?, native(&l.up, &mut *up)?],
            x,
            t,
        );
        silu_mul(gate, up, act);
        native_matmul([native(&l.down, &mut *proj)?], act, t);
        add_assign(h, proj);
    }
    for s in seqs.iter_mut() {
        s.cache.advance(s.tokens.len());
    }

    // The output head, on the rows asked for, normed into `x`.
    let norm = model.norm.storage_and_layout();
    let norm = host_f32(&norm)?;
    let mut rows = 0;
    for r in logit_rows(seqs) {
        rms_norm(
            &h[r * d..(r + 1) * d],
            norm,
            c.rms_eps,
            &mut x[rows * d..(rows + 1) * d],
        );
        rows += 1;
    }
    if head == Head::Hidden {
        logits.clear();
        logits.extend_from_slice(&x[..rows * d]);
        return Ok(());
    }
    let (head, _) = model
        .output
        .native()
        .context("the output head is not on the CPU")?;
    logits.resize(rows * head.rows, 0.0);
    native_matmul(
        [native(&model.output, &mut logits[..])?],
        &x[..rows * d],
        rows,
    );
    Ok(())
}

/// A projection's matrix and bias, with the output they are to be written to.
fn native<'a>(l: &'a Linear, y: &'a mut [f32]) -> Result<MatMulPart<'a>> {
    let (w, bias) = l.native().context("a projection is not on the CPU")?;
    Ok((w, bias, y))
}

/// The values of a contiguous f32 tensor in host memory, under its read guard.
pub(super) fn host_f32<'a>((storage, layout): &'a (StorageRef<'_>, &Layout)) -> Result<&'a [f32]> {
    match (&**storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(x)), Some((a, b))) => Ok(&x[a..b]),
        _ => bail!("the host pass expects contiguous f32 tensors in host memory"),
    }
}
