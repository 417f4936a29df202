//! Embeddings: a text's final hidden states (after the output norm, before the output head),
//! pooled into one vector, from the same step the generation runs.

use super::Engine;
use crate::gguf::GgufFile;
use crate::model::{Head, Logits, Sequence};
use anyhow::{bail, Result};

/// How the hidden states of a text's positions become its embedding (llama.cpp's
/// `--pooling`, and its numbers in `<arch>.pooling_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// No pooling: one vector per token.
    None,
    /// The average over the positions.
    Mean,
    /// The first position.
    Cls,
    /// The last position, as Qwen2-based embedding models (gte-Qwen2, Qwen3-Embedding) pool.
    Last,
}

impl Pooling {
    pub const NAMES: &'static str = "none, mean, cls or last";

    pub fn parse(name: &str) -> Option<Pooling> {
        Some(match name {
            "none" => Pooling::None,
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "last" => Pooling::Last,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Pooling::None => "none",
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
        }
    }

    /// The pooling the model file names in `<arch>.pooling_type`, else last (the Qwen2
    /// embedding models' pooling, and the only one that sees every token of a causal model).
    pub fn of_model(gguf: &GgufFile) -> Result<Pooling> {
        let arch = gguf
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("qwen2");
        let key = format!("{arch}.pooling_type");
        let Some(v) = gguf.get(&key) else {
            return Ok(Pooling::Last);
        };
        Ok(match v.as_i64() {
            // -1: unspecified.
            Some(-1) => Pooling::Last,
            Some(0) => Pooling::None,
            Some(1) => Pooling::Mean,
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::Last,
            Some(4) => bail!(
                "{} is a reranker ({key} 4, rank pooling), which qwen-run does not run; pass --pooling {} to embed with it anyway",
                gguf.path.display(),
                Pooling::NAMES
            ),
            _ => bail!(
                "{} has {key} {v:?}, which is not a pooling llama.cpp defines; pass --pooling {}",
                gguf.path.display(),
                Pooling::NAMES
            ),
        })
    }
}

impl Engine {
    /// The final hidden states of `tokens`, run as one sequence on a cache of its own in steps
    /// of at most `--batch-size` tokens, pooled as `pooling` says: one vector, or with
    /// [`Pooling::None`] one per token. Not normalized.
    pub fn embed(&self, tokens: &[u32], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            bail!("the input is empty");
        }
        if tokens.len() > self.ctx_size {
            bail!(
                "the input has {} tokens but the context holds {}; shorten it or raise --ctx-size (the model supports up to {})",
                tokens.len(),
                self.ctx_size,
                self.config().context_length
            );
        }
        // Attention is causal: no later token changes the first position's state.
        let tokens = match pooling {
            Pooling::Cls => &tokens[..1],
            _ => tokens,
        };
        let which = match pooling {
            Pooling::Last | Pooling::Cls => Logits::Last,
            Pooling::Mean | Pooling::None => Logits::All,
        };
        let d = self.config().hidden;
        let mut cache = self.runner.new_cache(tokens.len())?;
        let mut states = Vec::new();
        let mut pooled = vec![0f32; d];
        let mut rows = Vec::new();
        for chunk in tokens.chunks(self.batch_size.max(1)) {
            let mut seq = [Sequence {
                tokens: chunk,
                cache: &mut cache,
                logits: which,
            }];
            self.run_pass(|| self.runner.step(&mut seq, Head::Hidden, &mut states))?;
            match pooling {
                Pooling::Mean => {
                    for row in states.chunks_exact(d) {
                        pooled.iter_mut().zip(row).for_each(|(p, x)| *p += x);
                    }
                }
                Pooling::Last | Pooling::Cls => pooled.copy_from_slice(&states[..d]),
                Pooling::None => rows.extend(states.chunks_exact(d).map(<[f32]>::to_vec)),
            }
        }
        Ok(match pooling {
            Pooling::None => rows,
            Pooling::Mean => {
                let n = tokens.len() as f32;
                pooled.iter_mut().for_each(|p| *p /= n);
                vec![pooled]
            }
            Pooling::Last | Pooling::Cls => vec![pooled],
        })
    }
}
