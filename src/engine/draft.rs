//! The draft model of speculative decoding (`-md`): a second engine loaded beside the target with
//! the target's settings, whose vocabulary must be the target's so that its token ids mean the
//! same text. The scheduler runs it on each slot's draft session (`Session::draft`).

use super::{Engine, LoadOptions};
use crate::gguf::Value;
use crate::speculative::SpecConfig;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Most tokens by which the two vocabularies may differ in size (llama.cpp's tolerance: added
/// tokens at the end of one that the other lacks).
pub const VOCAB_SIZE_TOLERANCE: usize = 128;

impl Engine {
    /// The draft model, when one was loaded (`-md`).
    pub fn draft(&self) -> Option<&Engine> {
        self.draft.as_deref()
    }
}

/// Loads `path` as the draft model of `target`, with the target's device, threads and context,
/// no prompt cache and no speculation of its own, and checks its vocabulary.
pub(super) fn load(target: &Engine, opts: &LoadOptions, path: &Path) -> Result<Engine> {
    let mut o = opts.clone();
    o.model = path.to_path_buf();
    o.draft_model = None;
    o.spec = SpecConfig::OFF;
    o.ctx_size = target.ctx_size;
    o.threads = target.threads;
    o.cache_ram_mib = 0;
    o.prompt_cache = None;
    o.chat_template = None;
    let draft = Engine::load(&o)
        .with_context(|| format!("cannot load the draft model {}", path.display()))?;
    check_vocabulary(target, &draft)?;
    Ok(draft)
}

/// Fails unless `draft` tokenizes as `target` does: the same tokenizer type and pre-tokenizer,
/// vocabulary sizes within [`VOCAB_SIZE_TOLERANCE`], the same text for every token id both have,
/// and the same beginning- and end-of-text ids. The error names what differs.
pub fn check_vocabulary(target: &Engine, draft: &Engine) -> Result<()> {
    let what = |e: &Engine| e.gguf.path.display().to_string();
    let (t, d) = (&target.tokenizer, &draft.tokenizer);
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre"] {
        let of = |e: &Engine| e.gguf.get(key).and_then(Value::as_str).map(str::to_owned);
        let (a, b) = (of(target), of(draft));
        if a != b {
            bail!(
                "the draft model's tokenizer type differs from the target's ({key}: {} in the draft {}, {} in the target {}); a draft model must share the target's vocabulary",
                b.as_deref().unwrap_or("none"),
                what(draft),
                a.as_deref().unwrap_or("none"),
                what(target)
            );
        }
    }
    let (nt, nd) = (t.vocab_size(), d.vocab_size());
    if nt.abs_diff(nd) > VOCAB_SIZE_TOLERANCE {
        bail!(
            "the draft model's vocabulary has {nd} tokens and the target's {nt}: more than {VOCAB_SIZE_TOLERANCE} apart; a draft model must share the target's vocabulary"
        );
    }
    if let Some(i) = (0..nt.min(nd) as u32).find(|&i| t.token_text(i) != d.token_text(i)) {
        bail!(
            "token {i} is {:?} in the draft model and {:?} in the target; a draft model must share the target's vocabulary",
            d.token_text(i),
            t.token_text(i)
        );
    }
    let name = |id: Option<u32>| id.map_or("none".to_string(), |i| i.to_string());
    if t.eos != d.eos {
        bail!(
            "the draft model's end-of-text token is {} and the target's {}; a draft model must share the target's special tokens",
            d.eos,
            t.eos
        );
    }
    if t.bos != d.bos || t.add_bos != d.add_bos {
        bail!(
            "the draft model's beginning-of-text token is {} (added to prompts: {}) and the target's {} (added: {}); a draft model must share the target's special tokens",
            name(d.bos),
            d.add_bos.is_some(),
            name(t.bos),
            t.add_bos.is_some()
        );
    }
    Ok(())
}
