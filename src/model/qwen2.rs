//! The weights of a Qwen2 / Qwen2.5 model, as both passes read them: a decoder-only transformer
//! with grouped-query attention (q/k/v biases), rotary embeddings in the NeoX layout, RMSNorm and
//! a SwiGLU MLP. Each layer's weights sit on the device [`Placement`] gives it.

use super::config::{Config, Placement};
use super::weight_arena::WeightArena;
use super::weight_cache::{layout_probe, StoredMatrix, WeightCache};
use super::weights::{load_vector, Embedding, Linear};
use crate::gguf::GgufFile;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

pub(super) struct Layer {
    pub(super) device: Device,
    pub(super) attn_norm: Tensor,
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
    pub(super) ffn_norm: Tensor,
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
}

/// Rotary tables on one device.
pub(super) struct Rope {
    pub(super) device: Device,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

/// The weights; [`ModelRunner`](super::ModelRunner) runs them.
pub struct Qwen2 {
    pub cfg: Config,
    pub placement: Placement,
    pub(super) embed: Embedding,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Tensor,
    pub(super) output: Linear,
    /// One per device the placement uses.
    pub(super) rope: Vec<Rope>,
}

impl Qwen2 {
    /// Every matrix of the layers and the output head.
    pub(super) fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .chain([&self.output])
    }

    /// `cfg` is this file's [`Config`] (its rotary settings maybe overridden); `placement` comes
    /// from [`Placement::new`] with its layer count.
    /// `huge_pages`: back the CPU copies of the weights with 2 MiB pages ([`WeightArena`]).
    /// `weight_cache`: map the CPU copies from there when an earlier load stored them, and store
    /// them there when it made any.
    pub fn load(
        gguf: &Arc<GgufFile>,
        cfg: Config,
        placement: Placement,
        max_positions: usize,
        huge_pages: bool,
        weight_cache: Option<&WeightCache>,
    ) -> Result<Qwen2> {
        if placement.layers.len() != cfg.n_layers {
            bail!(
                "placement for {} layers, the model has {}",
                placement.layers.len(),
                cfg.n_layers
            );
        }
        // One arena for the CPU copies of all matrices, so that all of them sit in 2 MiB pages.
        let probe = weight_cache.map(|_| layout_probe());
        let cached = weight_cache.zip(probe).and_then(|(c, p)| c.open(p));
        let arena = WeightArena::with_cache(huge_pages, cached);
        let lin = |name: &str, bias: bool, device: &Device| {
            Linear::load(
                gguf,
                &format!("{name}.weight"),
                bias.then(|| format!("{name}.bias")).as_deref(),
                device,
                &arena,
            )
        };
        let layers = placement
            .layers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let p = format!("blk.{i}");
                Ok(Layer {
                    device: d.clone(),
                    attn_norm: load_vector(gguf, &format!("{p}.attn_norm.weight"), d)?,
                    q: lin(&format!("{p}.attn_q"), true, d)?,
                    k: lin(&format!("{p}.attn_k"), true, d)?,
                    v: lin(&format!("{p}.attn_v"), true, d)?,
                    o: lin(&format!("{p}.attn_output"), false, d)?,
                    ffn_norm: load_vector(gguf, &format!("{p}.ffn_norm.weight"), d)?,
                    gate: lin(&format!("{p}.ffn_gate"), false, d)?,
                    up: lin(&format!("{p}.ffn_up"), false, d)?,
                    down: lin(&format!("{p}.ffn_down"), false, d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = Embedding::load(gguf, "token_embd.weight")?;
        let out_dev = &placement.output;
        let output = match gguf.tensor("output.weight") {
            Some(_) => lin("output", false, out_dev)?,
            None => embed.as_linear(out_dev, &arena)?,
        };
        let mut rope: Vec<Rope> = Vec::new();
        for d in placement.layers.iter() {
            if !rope.iter().any(|r| r.device.same_device(d)) {
                let (cos, sin) = cfg.rope.tensors(cfg.head_dim, max_positions, d)?;
                rope.push(Rope {
                    device: d.clone(),
                    cos,
                    sin,
                });
            }
        }
        let model = Qwen2 {
            norm: load_vector(gguf, "output_norm.weight", out_dev)?,
            cfg,
            placement,
            embed,
            layers,
            output,
            rope,
        };
        if let Some((cache, probe)) = weight_cache.zip(probe) {
            if let Err(e) = model.store_rows4_copies(cache, probe) {
                eprintln!("warning: the weight cache was not written: {e:#}");
            }
        }
        Ok(model)
    }

    /// Writes the rows4 copies of all matrices to `cache` if this load made any of them.
    fn store_rows4_copies(&self, cache: &WeightCache, probe: u64) -> Result<()> {
        let linears = self
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
        let mut any_made = false;
        let mut stored = Vec::new();
        for lin in linears.chain([&self.output]) {
            let Some((w, _)) = lin.native() else { continue };
            let Some((bytes, made_here)) = w.rows4_copy() else {
                continue;
            };
            any_made |= made_here;
            stored.push(StoredMatrix {
                name: w.name(),
                ty: w.ty(),
                rows: w.rows,
                cols: w.cols,
                bytes,
            });
        }
        if any_made {
            cache.store(probe, &stored)?;
        }
        Ok(())
    }
}
