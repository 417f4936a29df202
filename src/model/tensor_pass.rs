//! A step in Candle tensor ops, on any device and cache type: the pass for GPUs (whole or partial
//! offload) and for f16 / q8_0 KV caches. The CPU with f32 caches runs [`host_pass`] instead.
//!
//! [`host_pass`]: super::host_pass

use super::config::{logit_rows, Head, Sequence};
use super::qwen2::Qwen2;
use super::weights::Linear;
use super::{attention, ops};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// Runs one step (shapes and room in the caches checked by the caller) and writes what `head`
/// says of the rows the sequences ask for into `logits`: `[rows, vocab]` or `[rows, hidden]`.
pub(super) fn run(
    model: &Qwen2,
    seqs: &mut [Sequence],
    head: Head,
    logits: &mut Vec<f32>,
) -> Result<()> {
    let out = self::logits(model, seqs, head)?;
    logits.clear();
    logits.extend(out.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

fn logits(model: &Qwen2, seqs: &mut [Sequence], head: Head) -> Result<Tensor> {
    let c = &model.cfg;
    let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
    // Per device: the rotary rows of every token (each sequence from its own position), and
    // each sequence's causal mask.
    let positions: Vec<u32> = seqs
        .iter()
        .flat_map(|s| {
            let pos = s.cache.len() as u32;
            pos..pos + s.tokens.len() as u32
        })
        .collect();
    let per_device = model
        .rope
        .iter()
        .map(|r| {
            let at = Tensor::new(positions.as_slice(), &r.device)?;
            let masks = seqs
                .iter()
                .map(|s| causal_mask(s.tokens.len(), s.cache.len(), &r.device))
                .collect::<Result<Vec<_>>>()?;
            Ok((
                r.cos.index_select(&at, 0)?,
                r.sin.index_select(&at, 0)?,
                masks,
            ))
        })
        .collect::<Result<Vec<_>>>()?;

    let mut h = model.embed.forward(&tokens, &model.layers[0].device)?;
    for (i, l) in model.layers.iter().enumerate() {
        let d = model
            .rope
            .iter()
            .position(|r| r.device.same_device(&l.device))
            .context("no rotary tables for a layer's device")?;
        // Crossing from the CPU layers to the GPU ones (partial offload) moves the activations.
        h = h.to_device(&l.device)?;
        // Attention: projections and rotary embedding for all tokens at once, then each
        // sequence on its own KV cache.
        let x = ops::rms_norm(&h, &l.attn_norm, c.rms_eps)?;
        let (cos, sin, masks) = &per_device[d];
        let all = tokens.len();
        let rotate = |y: Tensor, nh: usize| -> Result<Tensor> {
            let y = y.reshape((1, all, nh, c.head_dim))?;
            Ok(candle_nn::rotary_emb::rope_thd(&y, cos, sin)?.squeeze(0)?)
        };
        let [q, k, v] = Linear::forward_many([&l.q, &l.k, &l.v], &x)?;
        let q_all = rotate(q, c.n_heads)?;
        let k_all = rotate(k, c.n_kv_heads)?;
        let v_all = v.reshape((all, c.n_kv_heads, c.head_dim))?;
        let y = attention::attend(c, i, &q_all, &k_all, &v_all, &mut *seqs, masks)?;
        h = (h + l.o.forward(&y)?)?;
        // MLP.
        let x = ops::rms_norm(&h, &l.ffn_norm, c.rms_eps)?;
        let [gate, up] = Linear::forward_many([&l.gate, &l.up], &x)?;
        let y = ops::swiglu(&gate, &up)?;
        h = (h + l.down.forward(&y)?)?;
    }
    for s in seqs.iter_mut() {
        s.cache.advance(s.tokens.len());
    }
    let rows: Vec<u32> = logit_rows(seqs).map(|r| r as u32).collect();
    let h = if rows.len() == tokens.len() {
        h
    } else {
        h.index_select(&Tensor::new(rows.as_slice(), h.device())?, 0)?
    };
    let h = ops::rms_norm(
        &h.to_device(&model.placement.output)?,
        &model.norm,
        c.rms_eps,
    )?;
    if head == Head::Hidden {
        return Ok(h.to_dtype(DType::F32)?);
    }
    Ok(model.output.forward(&h)?.to_dtype(DType::F32)?)
}

/// `[n, pos + n]` additive mask: query `i` (at position `pos + i`) sees keys `0..=pos + i`.
fn causal_mask(n: usize, pos: usize, device: &Device) -> Result<Option<Tensor>> {
    if n == 1 {
        return Ok(None);
    }
    let total = pos + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (n, total), device)?))
}
