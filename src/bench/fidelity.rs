//! Fidelity against llama.cpp on the same GGUF: next-token distributions at every position of a
//! fixed text (top-1 agreement, KL divergence), and how long greedy continuations stay equal.
//!
//! llama.cpp's logits come from `benches/llama_logits.c`, which writes this file format:
//! magic `QRLOGIT1`, u32 token count n, u32 vocabulary size v, n u32 token ids, then n x v f32
//! logits, all little-endian.

use crate::engine::Engine;
use crate::model::Logits;
use crate::sampler::{Sampler, SamplingParams};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

const MAGIC: &[u8; 8] = b"QRLOGIT1";

/// llama.cpp's logits for every position of a token sequence, memory-mapped.
pub struct LogitsReference {
    map: memmap2::Mmap,
    pub tokens: Vec<u32>,
    pub vocab: usize,
}

impl LogitsReference {
    pub fn open(path: &Path) -> Result<LogitsReference> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping of a file this process does not modify.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap()) as usize;
        if map.len() < 16 || &map[..8] != MAGIC {
            bail!("{} is not a llama.cpp logits file (expected magic QRLOGIT1; make it with benches/llama_logits.c)", path.display());
        }
        let (n, vocab) = (u32_at(8), u32_at(12));
        let want = 16 + 4 * n + 4 * n * vocab;
        if map.len() != want {
            bail!(
                "{} holds {} bytes, expected {want} for {n} tokens x {vocab} logits",
                path.display(),
                map.len()
            );
        }
        let tokens = (0..n).map(|i| u32_at(16 + 4 * i) as u32).collect();
        Ok(LogitsReference { map, tokens, vocab })
    }

    /// Writes this engine's own logits for every position of `tokens` in the same format, so that
    /// one backend can be checked against another (the GPU against the CPU).
    pub fn write(engine: &Engine, tokens: &[u32], path: &Path) -> Result<()> {
        use std::io::Write;
        if tokens.is_empty() || tokens.len() >= engine.ctx_size {
            bail!(
                "the text has {} tokens; it needs at least 1 and fewer than --ctx-size {}",
                tokens.len(),
                engine.ctx_size
            );
        }
        // Written beside the target and renamed at the end, so a failure leaves no partial file.
        let tmp = path.with_extension("partial");
        let written = (|| -> Result<()> {
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let vocab = engine.config().vocab_size as u32;
            out.write_all(MAGIC)?;
            out.write_all(&(tokens.len() as u32).to_le_bytes())?;
            out.write_all(&vocab.to_le_bytes())?;
            for t in tokens {
                out.write_all(&t.to_le_bytes())?;
            }
            let mut session = engine.new_session()?;
            for chunk in tokens.chunks(engine.batch_size) {
                for row in engine.forward(&mut session, chunk, Logits::All)? {
                    for x in row {
                        out.write_all(&x.to_le_bytes())?;
                    }
                }
            }
            out.flush()
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    pub fn logits(&self, pos: usize) -> Vec<f32> {
        let start = 16 + 4 * self.tokens.len() + 4 * pos * self.vocab;
        self.map[start..start + 4 * self.vocab]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LogitsFidelity {
    pub positions: usize,
    /// Share of positions where both pick the same most likely next token.
    pub top1_agreement: f64,
    /// Mean over positions of KL(llama.cpp || qwen-run), in nats.
    pub mean_kl: f64,
    pub max_kl: f64,
}

/// Runs the reference's tokens through the engine and compares every position's distribution.
pub fn compare_logits(engine: &Engine, reference: &LogitsReference) -> Result<LogitsFidelity> {
    if reference.vocab != engine.config().vocab_size {
        bail!(
            "the reference has a vocabulary of {} but the model has {}: it was made with another model",
            reference.vocab,
            engine.config().vocab_size
        );
    }
    let n = reference.tokens.len();
    if n >= engine.ctx_size {
        bail!("the reference has {n} tokens; raise --ctx-size above that");
    }
    let mut session = engine.new_session()?;
    let (mut agree, mut kl_sum, mut kl_max) = (0usize, 0f64, 0f64);
    let mut pos = 0;
    for chunk in reference.tokens.chunks(engine.batch_size) {
        for ours in engine.forward(&mut session, chunk, Logits::All)? {
            let theirs = reference.logits(pos);
            agree += (crate::sampler::argmax(&ours) == crate::sampler::argmax(&theirs)) as usize;
            let kl = kl_divergence(&theirs, &ours);
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            pos += 1;
        }
    }
    Ok(LogitsFidelity {
        positions: n,
        top1_agreement: agree as f64 / n as f64,
        mean_kl: kl_sum / n as f64,
        max_kl: kl_max,
    })
}

/// KL(p || q) between the softmax distributions of two logit vectors, in nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let max = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
        l.iter().map(|&x| x as f64 - lse).collect()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// Greedy-decodes `want.len()` tokens after `prompt` and returns how many equal `want` from the
/// start, with the tokens generated.
pub fn greedy_match(engine: &Engine, prompt: &[u32], want: &[u32]) -> Result<(usize, Vec<u32>)> {
    let mut sampler = Sampler::new(SamplingParams::greedy())?;
    let mut session = engine.new_session()?;
    let got = engine
        .generate(&mut session, prompt, want.len(), &mut sampler, |_| true)?
        .tokens;
    let same = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    Ok((same, got))
}
