//! Grouped-query attention of one layer over each sequence's KV cache.
//!
//! Two ways, same result: steps of a few tokens per sequence (decode) on a CPU with f32 caches
//! run one kernel over all sequences, reading the caches in place; everything else (prompt
//! chunks, GPUs, f16 and q8_0 caches) runs tensor ops per sequence.

use super::qwen2::{Config, Sequence};
use anyhow::{Context, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use qwen_run_kernels::attention::{cached_attention, AttnDims, CachedSeq};

/// The most tokens a sequence may run in a step for the in-place kernel; longer runs (prompt
/// chunks) are matrix products, where tensor ops are faster.
const MAX_KERNEL_TOKENS: usize = 16;

/// `q_all`: `[tokens, n_heads, head_dim]`, `k_all`/`v_all`: `[tokens, kv_heads, head_dim]` (rotary
/// embedding applied), the sequences' tokens one after another. Writes the new keys and values
/// into each sequence's cache and returns the attention output `[tokens, hidden]`.
pub(super) fn attend(
    c: &Config,
    layer: usize,
    q_all: &Tensor,
    k_all: &Tensor,
    v_all: &Tensor,
    seqs: &[Sequence],
    masks: &[Option<Tensor>],
) -> Result<Tensor> {
    let in_place = q_all.device().is_cpu()
        && seqs
            .iter()
            .all(|s| s.tokens.len() <= MAX_KERNEL_TOKENS && s.cache.host_f32(layer).is_some());
    if in_place {
        in_cache(c, layer, q_all, k_all, v_all, seqs)
    } else {
        per_sequence(c, layer, q_all, k_all, v_all, seqs, masks)
    }
}

fn in_cache(
    c: &Config,
    layer: usize,
    q_all: &Tensor,
    k_all: &Tensor,
    v_all: &Tensor,
    seqs: &[Sequence],
) -> Result<Tensor> {
    let (k_all, v_all) = (k_all.contiguous()?, v_all.contiguous()?);
    let mut row = 0;
    let mut caches = Vec::with_capacity(seqs.len());
    for s in seqs {
        let n = s.tokens.len();
        let (k, v) = s.cache.write_host_f32(layer, &k_all, &v_all, row, n)?;
        caches.push((k.clone(), v.clone(), s.cache.len(), n));
        row += n;
    }
    let op = InCache {
        dims: AttnDims {
            n_heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        },
        caches,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
    };
    Ok(q_all
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .reshape((row, c.hidden))?)
}

/// The in-place kernel as a Candle op on the queries; the caches are read under their locks.
struct InCache {
    dims: AttnDims,
    /// Per sequence: key and value buffers, position of its first new token, new tokens.
    caches: Vec<(Tensor, Tensor, usize, usize)>,
    scale: f32,
}

impl CustomOp1 for InCache {
    fn name(&self) -> &'static str {
        "qwen-run-attention-in-cache"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("attention expects contiguous f32 queries");
        };
        let guards: Vec<_> = self
            .caches
            .iter()
            .map(|(k, v, _, _)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let seqs = guards
            .iter()
            .zip(&self.caches)
            .map(|((k, v), &(_, _, pos, n))| {
                Ok(CachedSeq {
                    keys: host_f32(k)?,
                    values: host_f32(v)?,
                    pos,
                    n,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let q = &q[a..b];
        let mut y = vec![0f32; q.len()];
        cached_attention(self.dims, q, &seqs, self.scale, &mut y);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

fn host_f32<'a>(
    (storage, layout): &'a (candle_core::StorageRef<'_>, &Layout),
) -> candle_core::Result<&'a [f32]> {
    match (&**storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(x)), Some((a, b))) => Ok(&x[a..b]),
        _ => candle_core::bail!("attention expects contiguous f32 caches in host memory"),
    }
}

fn per_sequence(
    c: &Config,
    layer: usize,
    q_all: &Tensor,
    k_all: &Tensor,
    v_all: &Tensor,
    seqs: &[Sequence],
    masks: &[Option<Tensor>],
) -> Result<Tensor> {
    let group = c.n_heads / c.n_kv_heads;
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    let mut outs = Vec::with_capacity(seqs.len());
    let mut row = 0;
    for (s, mask) in seqs.iter().zip(masks) {
        let n = s.tokens.len();
        // (tokens, heads, dim) rows of this sequence as (heads, tokens, dim).
        let heads = |y: &Tensor| -> Result<Tensor> {
            Ok(y.narrow(0, row, n)?.transpose(0, 1)?.contiguous()?)
        };
        let (q, k, v) = (heads(q_all)?, heads(k_all)?, heads(v_all)?);
        let (keys, values) = s.cache.append(layer, &k, &v)?;
        // The `group` query heads that share a KV head are stacked as rows of one matrix, so
        // each KV head is read once.
        let q = q.reshape((c.n_kv_heads, group * n, c.head_dim))?;
        let mut att = (q.matmul(&keys.t()?)? * scale)?;
        if let Some(mask) = mask {
            let l_all = keys.dim(1)?;
            att = att
                .reshape((c.n_kv_heads, group, n, l_all))?
                .broadcast_add(mask)?
                .reshape((c.n_kv_heads, group * n, l_all))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        outs.push(
            att.matmul(&values)?
                .reshape((c.n_heads, n, c.head_dim))?
                .transpose(0, 1)?
                .reshape((n, c.hidden))?,
        );
        row += n;
    }
    Ok(match outs.len() {
        1 => outs.pop().context("one sequence")?,
        _ => Tensor::cat(&outs, 0)?,
    })
}
