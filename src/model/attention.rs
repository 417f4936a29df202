//! Grouped-query attention of one layer over each sequence's KV cache, in tensor ops, one
//! sequence at a time (steps on the CPU with f32 caches run in
//! [`host_pass`](super::host_pass) instead).

use super::config::{Config, Sequence};
use anyhow::{Context, Result};
use candle_core::Tensor;

/// `q_all`: `[tokens, n_heads, head_dim]`, `k_all`/`v_all`: `[tokens, kv_heads, head_dim]` (rotary
/// embedding applied), the sequences' tokens one after another. Writes the new keys and values
/// into each sequence's cache and returns the attention output `[tokens, hidden]`.
pub(super) fn attend(
    c: &Config,
    layer: usize,
    q_all: &Tensor,
    k_all: &Tensor,
    v_all: &Tensor,
    seqs: &mut [Sequence],
    masks: &[Option<Tensor>],
) -> Result<Tensor> {
    let group = c.n_heads / c.n_kv_heads;
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    let mut outs = Vec::with_capacity(seqs.len());
    let mut row = 0;
    for (s, mask) in seqs.iter_mut().zip(masks) {
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
