//! Qwen2 / Qwen2.5: a decoder-only transformer with grouped-query attention (q/k/v biases),
//! rotary embeddings in the NeoX layout, RMSNorm and a SwiGLU MLP.

use super::weight_arena::WeightArena;
use super::weights::{load_vector, Embedding, Linear};
use super::{attention, host_pass, ops};
use crate::gguf::GgufFile;
use crate::kv_cache::{CacheType, KvCache};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl Config {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Config> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "qwen2" {
            bail!(
                "{} is a '{arch}' model; qwen-run runs Qwen2 and Qwen2.5 models (architecture 'qwen2')",
                gguf.path.display()
            );
        }
        let u = |k: &str| -> Result<usize> { Ok(gguf.get_u64(&format!("qwen2.{k}"))? as usize) };
        let hidden = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = gguf
            .get("qwen2.attention.head_count_kv")
            .and_then(|v| v.as_u64())
            .map_or(n_heads, |v| v as usize);
        if n_heads == 0 || n_kv_heads == 0 || hidden % n_heads != 0 || n_heads % n_kv_heads != 0 {
            bail!("inconsistent attention shape in {}: hidden {hidden}, {n_heads} heads, {n_kv_heads} KV heads", gguf.path.display());
        }
        let embd = gguf.require_tensor("token_embd.weight")?;
        Ok(Config {
            n_layers: u("block_count")?,
            hidden,
            ffn: u("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            rope_base: gguf
                .get("qwen2.rope.freq_base")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e6) as f32,
            rms_eps: gguf
                .get("qwen2.attention.layer_norm_rms_epsilon")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6) as f32,
            context_length: u("context_length")?,
            vocab_size: *embd
                .dims
                .get(1)
                .context("token_embd.weight is not a matrix")?,
        })
    }

    pub fn kv_bytes_per_token(&self, ty: CacheType) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * ty.dtype().size_in_bytes()
    }
}

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

/// Which positions the output head runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (fidelity checks, perplexity).
    All,
}

/// Which device runs each layer and the output head. As llama.cpp's `-ngl N`: the last `N` layers
/// go to the GPU, and the output head too once `N` exceeds the layer count; the rest, and the
/// token embeddings, stay on the CPU.
#[derive(Clone, Debug)]
pub struct Placement {
    pub layers: Vec<Device>,
    pub output: Device,
}

impl Placement {
    pub fn new(n_layers: usize, gpu: &Device, gpu_layers: usize) -> Placement {
        let first_on_gpu = n_layers.saturating_sub(gpu_layers);
        let on = |gpu_here: bool| if gpu_here { gpu.clone() } else { Device::Cpu };
        Placement {
            layers: (0..n_layers).map(|i| on(i >= first_on_gpu)).collect(),
            output: on(gpu_layers > n_layers),
        }
    }

    pub fn gpu_layers(&self) -> usize {
        self.layers.iter().filter(|d| !d.is_cpu()).count()
    }

    /// Whether any layer or the output head runs on the CPU (and so on our kernels).
    pub fn uses_cpu(&self) -> bool {
        self.layers.iter().chain([&self.output]).any(|d| d.is_cpu())
    }

    /// The accelerator, if any part runs on one.
    pub fn gpu(&self) -> Option<&Device> {
        self.layers
            .iter()
            .chain([&self.output])
            .find(|d| !d.is_cpu())
    }
}

/// Rotary tables on one device.
pub(super) struct Rope {
    device: Device,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

pub struct Qwen2 {
    pub cfg: Config,
    pub placement: Placement,
    pub(super) embed: Embedding,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Tensor,
    pub(super) output: Linear,
    /// One per device the placement uses.
    pub(super) rope: Vec<Rope>,
    /// The host pass's activations, kept from pass to pass.
    scratch: Mutex<host_pass::Scratch>,
}

impl Qwen2 {
    /// `placement` comes from [`Placement::new`] with this file's layer count.
    /// `huge_pages`: back the CPU copies of the weights with 2 MiB pages ([`WeightArena`]).
    pub fn load(
        gguf: &Arc<GgufFile>,
        placement: Placement,
        max_positions: usize,
        huge_pages: bool,
    ) -> Result<Qwen2> {
        let cfg = Config::from_gguf(gguf)?;
        if placement.layers.len() != cfg.n_layers {
            bail!(
                "placement for {} layers, the model has {}",
                placement.layers.len(),
                cfg.n_layers
            );
        }
        // One arena for the CPU copies of all matrices, so that all of them sit in 2 MiB pages.
        let arena = WeightArena::new(huge_pages);
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
                let (cos, sin) = rope_tables(cfg.head_dim, cfg.rope_base, max_positions, d)?;
                rope.push(Rope {
                    device: d.clone(),
                    cos,
                    sin,
                });
            }
        }
        Ok(Qwen2 {
            norm: load_vector(gguf, "output_norm.weight", out_dev)?,
            cfg,
            placement,
            embed,
            layers,
            output,
            rope,
            scratch: Mutex::default(),
        })
    }

    /// An empty KV cache of `capacity` positions, each layer's on that layer's device.
    pub fn new_cache(
        &self,
        capacity: usize,
        type_k: CacheType,
        type_v: CacheType,
    ) -> Result<KvCache> {
        let c = &self.cfg;
        KvCache::new(
            c.n_kv_heads,
            c.head_dim,
            capacity,
            type_k,
            type_v,
            &self.placement.layers,
        )
    }

    /// Runs `tokens` at positions `cache.len()..` and writes the logits (f32) of the positions
    /// `which` asks for into `logits`, `[n, vocab]` row after row.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.forward_batch(&mut [Sequence { tokens, cache }], which, logits)
    }

    /// Runs several sequences in one pass: their tokens are stacked into one matrix for the
    /// weight matmuls (each weight is read once for all of them), and each attends only to its own
    /// cache. Writes the logits of every sequence's last token, in order (`Logits::Last`), or of
    /// every token (`Logits::All`) into `logits`, `[rows, vocab]`.
    ///
    /// A model wholly on the CPU with f32 caches runs over host memory ([`host_pass`]),
    /// allocating nothing once its buffers have grown; everything else runs in tensor ops.
    pub fn forward_batch(
        &self,
        seqs: &mut [Sequence],
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        check_room(seqs)?;
        if host_pass::fits(self, seqs) {
            let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            return host_pass::run(self, seqs, which, &mut scratch, logits);
        }
        self.run_tensor_pass(seqs, which, logits)
    }

    /// [`forward_batch`](Self::forward_batch) in tensor ops whatever the placement and caches:
    /// the tests check the host pass against it.
    pub fn forward_batch_in_tensor_ops(
        &self,
        seqs: &mut [Sequence],
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        check_room(seqs)?;
        self.run_tensor_pass(seqs, which, logits)
    }

    fn run_tensor_pass(
        &self,
        seqs: &mut [Sequence],
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let out = self.tensor_pass(seqs, which)?;
        logits.clear();
        logits.extend(out.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// [`forward_batch`](Self::forward_batch) in tensor ops, on any device; returns the logits.
    fn tensor_pass(&self, seqs: &mut [Sequence], which: Logits) -> Result<Tensor> {
        let c = &self.cfg;
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
        let per_device = self
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

        let mut h = self.embed.forward(&tokens, &self.layers[0].device)?;
        for (i, l) in self.layers.iter().enumerate() {
            let d = self
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
        let h = match which {
            Logits::All => h,
            Logits::Last => {
                let mut last = Vec::with_capacity(seqs.len());
                let mut end = 0;
                for s in seqs.iter() {
                    end += s.tokens.len();
                    last.push(h.narrow(0, end - 1, 1)?);
                }
                match last.len() {
                    1 => last.pop().context("one sequence")?,
                    _ => Tensor::cat(&last, 0)?,
                }
            }
        };
        let h = ops::rms_norm(&h.to_device(&self.placement.output)?, &self.norm, c.rms_eps)?;
        Ok(self.output.forward(&h)?.to_dtype(DType::F32)?)
    }
}

/// One sequence of a batched forward pass: its new tokens and its own KV cache.
pub struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Fails unless every sequence has tokens and room for them in its cache.
fn check_room(seqs: &[Sequence]) -> Result<()> {
    if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
        bail!("forward needs at least one token per sequence");
    }
    for s in seqs {
        let (n, pos) = (s.tokens.len(), s.cache.len());
        if pos + n > s.cache.capacity() {
            bail!(
                "the context is full: {pos} tokens cached + {n} new exceed the context size {} (raise --ctx-size)",
                s.cache.capacity()
            );
        }
    }
    Ok(())
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

/// cos/sin tables `[positions, head_dim / 2]` for NeoX-style rotary embeddings.
fn rope_tables(
    head_dim: usize,
    base: f32,
    positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| base.powf(-2.0 * i as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in &inv_freq {
            let theta = p as f32 * f;
            cos.push(theta.cos());
            sin.push(theta.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (positions, half), device)?,
        Tensor::from_vec(sin, (positions, half), device)?,
    ))
}

/// Checks that shapes match the config, so a malformed file fails at load with a message.
pub fn check_shapes(gguf: &GgufFile, cfg: &Config) -> Result<()> {
    let kv = cfg.n_kv_heads * cfg.head_dim;
    let expect = |name: &str, dims: &[usize]| -> Result<()> {
        let t = gguf.require_tensor(name)?;
        if t.dims != dims {
            bail!(
                "tensor '{name}' has shape {:?}, expected {dims:?} for this model's config",
                t.dims
            );
        }
        Ok(())
    };
    expect("token_embd.weight", &[cfg.hidden, cfg.vocab_size])?;
    for i in 0..cfg.n_layers {
        let p = format!("blk.{i}");
        expect(&format!("{p}.attn_q.weight"), &[cfg.hidden, cfg.hidden])?;
        expect(&format!("{p}.attn_k.weight"), &[cfg.hidden, kv])?;
        expect(&format!("{p}.attn_v.weight"), &[cfg.hidden, kv])?;
        expect(
            &format!("{p}.attn_output.weight"),
            &[cfg.hidden, cfg.hidden],
        )?;
        expect(&format!("{p}.ffn_gate.weight"), &[cfg.hidden, cfg.ffn])?;
        expect(&format!("{p}.ffn_up.weight"), &[cfg.hidden, cfg.ffn])?;
        expect(&format!("{p}.ffn_down.weight"), &[cfg.ffn, cfg.hidden])?;
    }
    if gguf.tensor("output.weight").is_some() {
        expect("output.weight", &[cfg.hidden, cfg.vocab_size])?;
    }
    Ok(())
}
