//! Constrained decoding: a JSON schema (or any JSON, or a Lark grammar) turned by `llguidance`
//! into a mask over the vocabulary before each token is sampled, so the answer always parses.
//! [`Grammars`] is built once per model from its GGUF tokenizer (no tokenizer.json needed);
//! each request gets a [`Constraint`], the scheduler's [`Guide`] for it.

use crate::scheduler::Guide;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::Arc;

/// What a request constrains its answer to.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// Any JSON object (OpenAI's `json_object`, Ollama's `"json"`).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// A Lark grammar, llguidance's dialect.
    Lark(String),
}

impl Format {
    /// A stable text for cache keys.
    pub fn key(&self) -> String {
        match self {
            Format::JsonObject => "json_object".into(),
            Format::JsonSchema(s) => format!("json_schema:{s}"),
            Format::Lark(g) => format!("lark:{g}"),
        }
    }

    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Format::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"}))
            }
            Format::JsonSchema(s) => TopLevelGrammar::from_json_schema(s.clone()),
            Format::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// A model's vocabulary as llguidance sees it, and the factory of parsers over it.
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
}

impl Grammars {
    pub fn new(tokenizer: &Tokenizer) -> Result<Grammars> {
        let vocab = tokenizer.vocab_size();
        // Control tokens print nothing; llguidance knows them by a 0xff byte before their name,
        // so that no text can match them.
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                [] => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.token_text(id).as_bytes());
                    w
                }
                b => b.to_vec(),
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, tokenizer.eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Grammars { factory, vocab })
    }

    /// Compiles `format` into a constraint for one generation; an unsupported schema or a bad
    /// grammar is an error that says why.
    pub fn constraint(&self, format: &Format) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(format.grammar())
            .map_err(|e| anyhow!("the response format cannot be used: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(anyhow!("the response format cannot be used: {e}"));
        }
        Ok(Constraint {
            matcher,
            seen: 0,
            vocab: self.vocab,
        })
    }
}

/// One generation's grammar state: fed the tokens generated so far, it masks every token that
/// cannot come next. Once the grammar is complete only end-of-generation is allowed.
pub struct Constraint {
    matcher: Matcher,
    /// Generated tokens already given to the matcher.
    seen: usize,
    vocab: usize,
}

impl Guide for Constraint {
    fn mask(&mut self, generated: &[u32], logits: &mut [f32]) {
        let new = &generated[self.seen.min(generated.len())..];
        self.seen = generated.len();
        let allowed = self
            .matcher
            .consume_tokens(new)
            .and_then(|()| self.matcher.compute_mask_or_eos());
        match allowed {
            Ok(mask) => {
                for (id, l) in logits.iter_mut().enumerate() {
                    if id >= self.vocab || !mask.is_allowed(id as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            // Cannot happen for tokens the mask allowed; end the answer rather than let it run free.
            Err(_) => {
                let eos = self.matcher.tok_env().map(|e| e.tok_trie().eos_token());
                for (id, l) in logits.iter_mut().enumerate() {
                    if eos.as_ref().map_or(true, |&e| id as u32 != e) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}
