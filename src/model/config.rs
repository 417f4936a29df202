//! The types both passes and the engine share: the model's shape, where its layers run, and a
//! step's sequences.

use super::rope::RopeParams;
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use anyhow::{bail, Context, Result};
use candle_core::Device;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope: RopeParams,
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
        // Zero would surface much later as a puzzle about rotary tables or a context of 0.
        let nonzero = |k: &str, what: &str| -> Result<usize> {
            match u(k)? {
                0 => bail!(
                    "GGUF metadata key 'qwen2.{k}' in {} is 0, but a model has at least one {what}; the file is broken. Use an intact copy of the model",
                    gguf.path.display()
                ),
                n => Ok(n),
            }
        };
        let n_layers = nonzero("block_count", "layer")?;
        let context_length = nonzero("context_length", "token of context")?;
        let embd = gguf.require_tensor("token_embd.weight")?;
        Ok(Config {
            n_layers,
            hidden,
            ffn: u("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            rope: RopeParams::from_gguf(gguf, "qwen2", context_length)?,
            rms_eps: gguf
                .get("qwen2.attention.layer_norm_rms_epsilon")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6) as f32,
            context_length,
            vocab_size: *embd
                .dims
                .get(1)
                .context("token_embd.weight is not a matrix")?,
        })
    }
}

/// Which positions a step's output covers (the output head's logits, or the hidden states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (fidelity checks, perplexity, draft verification).
    All,
}

/// What a step writes for the positions [`Logits`] selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// The output head's logits, `[rows, vocab]`.
    Logits,
    /// The final hidden states, after the output norm and before the output head,
    /// `[rows, hidden]`: what embedding models pool.
    Hidden,
}

/// The rows of a step's stacked tokens whose logits are asked for, in order.
pub(super) fn logit_rows<'a>(seqs: &'a [Sequence]) -> impl Iterator<Item = usize> + 'a {
    seqs.iter()
        .scan(0, |start, s| {
            let (first, n) = (*start, s.tokens.len());
            *start += n;
            Some(match s.logits {
                Logits::All => first..first + n,
                Logits::Last => first + n - 1..first + n,
            })
        })
        .flatten()
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

/// One sequence of a model step: its new tokens, its own KV cache, and which of its new
/// positions need logits.
pub struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
}

/// Fails unless every sequence has tokens and room for them in its cache.
pub(super) fn check_room(seqs: &[Sequence]) -> Result<()> {
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
    // Every token id must have an embedding row (the rows may be padded beyond the tokens).
    if let Some(tokens) = gguf.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        if tokens.len() > cfg.vocab_size {
            bail!(
                "{} is broken: tokenizer.ggml.tokens holds {} tokens but token_embd.weight has only {} rows",
                gguf.path.display(),
                tokens.len(),
                cfg.vocab_size
            );
        }
    }
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
    // The vectors too: the kernels take their lengths as given.
    let vector = |name: &str, len: usize| -> Result<()> {
        match gguf.tensor(name) {
            Some(_) => expect(name, &[len]),
            None => Ok(()),
        }
    };
    vector("output_norm.weight", cfg.hidden)?;
    for i in 0..cfg.n_layers {
        let p = format!("blk.{i}");
        vector(&format!("{p}.attn_norm.weight"), cfg.hidden)?;
        vector(&format!("{p}.ffn_norm.weight"), cfg.hidden)?;
        vector(&format!("{p}.attn_q.bias"), cfg.hidden)?;
        vector(&format!("{p}.attn_k.bias"), kv)?;
        vector(&format!("{p}.attn_v.bias"), kv)?;
    }
    Ok(())
}
