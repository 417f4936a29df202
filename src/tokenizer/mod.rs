//! The tokenizer and chat template, both built from the GGUF metadata alone (no tokenizer.json).

mod bpe;
mod chat_template;
mod stream;

pub use chat_template::{
    builtin_names, ChatTemplate, Message, RenderError, TemplateOverride, BUILTIN_TEMPLATES,
    MAX_TEMPLATE_FILE,
};
pub use stream::TextStream;

use crate::gguf::{GgufFile, Value};
use anyhow::{bail, Context, Result};
use bpe::ByteLevelBpe;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, TokenizerImpl,
};

/// Qwen2's pre-tokenizer split (the `qwen2` pre-tokenizer of llama.cpp, the same regex as the
/// model's own tokenizer.json): single digits, letters with one leading non-letter, punctuation
/// runs, newline runs.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The `tokenizers` pipeline (pre-tokenizer split, control tokens) around our BPE model.
type Pipeline = TokenizerImpl<
    ByteLevelBpe,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

pub struct Tokenizer {
    inner: Pipeline,
    /// The BPE model in `inner`, which also holds the literal text of every token (control
    /// tokens included), for `--special` style output.
    bpe: ByteLevelBpe,
    /// The raw bytes each token stands for; empty for control tokens, which print nothing.
    token_bytes: Packed<Vec<u8>>,
    eog: Vec<u32>,
    pub eos: u32,
    /// The model's beginning-of-text token, added to prompts only when `add_bos` says so.
    pub bos: Option<u32>,
    pub add_bos: Option<u32>,
    /// A copy of `inner` that reads control tokens written in the text as plain text (llama-server's
    /// `parse_special: false`); made on first use, since few requests ask for it.
    plain: std::sync::OnceLock<Pipeline>,
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!(
                "the tokenizer of {} is '{model}'; qwen-run supports the gpt2 byte-level BPE that Qwen2 models use",
                gguf.path.display()
            );
        }
        if let Some(pre) = gguf.get("tokenizer.ggml.pre").and_then(Value::as_str) {
            if pre != "qwen2" {
                tracing_warn(&format!(
                    "pre-tokenizer '{pre}' is not 'qwen2'; tokenizing with the Qwen2 rules"
                ));
            }
        }
        let tokens: Vec<&str> = gguf
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| {
                v.as_str()
                    .context("tokenizer.ggml.tokens holds a non-string")
            })
            .collect::<Result<_>>()?;
        let types: Vec<i64> = match gguf.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .context("tokenizer.ggml.token_type is not an array")?
                .iter()
                .map(|t| t.as_i64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let token_bytes = token_bytes(&tokens, &types);
        let (inner, bpe) = bpe_pipeline(gguf, &tokens, &types)?;
        // Special ids index the vocabulary (and the embedding rows): one past its end would be
        // read far from where it belongs.
        let id = |key: &str| -> Result<Option<u32>> {
            let Some(v) = gguf.get(key) else {
                return Ok(None);
            };
            match v.as_u64() {
                Some(i) if i < tokens.len() as u64 => Ok(Some(i as u32)),
                _ => bail!(
                    "GGUF metadata key '{key}' in {} is {v}, but the vocabulary has {} tokens (ids 0 to {}); the file is broken. Use an intact copy of the model",
                    gguf.path.display(),
                    tokens.len(),
                    tokens.len().saturating_sub(1)
                ),
            }
        };
        let eos = id("tokenizer.ggml.eos_token_id")?
            .context("the GGUF has no tokenizer.ggml.eos_token_id")?;
        id("tokenizer.ggml.padding_token_id")?;
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let mut eog = vec![eos];
        eog.extend(id("tokenizer.ggml.eot_token_id")?);
        // The fill-in-the-middle separators end a completion too, as llama.cpp treats them.
        for name in [
            "<|endoftext|>",
            "<|im_end|>",
            "<|eot_id|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ] {
            if let Some(&i) = vocab_lookup(&tokens, name).as_ref() {
                eog.push(i);
            }
        }
        eog.sort_unstable();
        eog.dedup();
        let add_bos = match gguf
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
        {
            Some(true) => bos,
            _ => None,
        };
        Ok(Tokenizer {
            inner,
            bpe,
            token_bytes,
            eog,
            eos,
            bos,
            add_bos,
            plain: std::sync::OnceLock::new(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bpe.len()
    }

    /// Tokenizes text; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true, true)
    }

    /// Tokenizes text as llama-server's `/tokenize` does: `add_special` puts the model's BOS
    /// first where the model asks for one; without `parse_special`, control tokens written in the
    /// text are tokenized as the characters they are made of.
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let inner = if parse_special {
            &self.inner
        } else {
            self.plain.get_or_init(|| {
                let mut t = self.inner.clone();
                t.set_encode_special_tokens(true);
                t
            })
        };
        let enc = inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing the prompt failed: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special {
            ids.extend(self.add_bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The prompt that asks a fill-in-the-middle model (Qwen2.5-Coder) for the text between
    /// `prefix` and `suffix`; an error if the model has no FIM tokens.
    pub fn fill_in_middle(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        ids.extend(self.add_bos);
        for (marker, text) in [
            ("<|fim_prefix|>", prefix),
            ("<|fim_suffix|>", suffix),
            ("<|fim_middle|>", ""),
        ] {
            let id = self.inner.token_to_id(marker).with_context(|| {
                format!("this model has no {marker} token, so it cannot fill in the middle (Qwen2.5-Coder models can)")
            })?;
            ids.push(id);
            if !text.is_empty() {
                let enc = self
                    .inner
                    .encode_fast(text, false)
                    .map_err(|e| anyhow::anyhow!("tokenizing the prompt failed: {e}"))?;
                ids.extend_from_slice(enc.get_ids());
            }
        }
        Ok(ids)
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    /// Raw bytes of a token as it appears in generated text (control tokens: none).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .range(id)
            .map_or(&[], |r| &self.token_bytes.all[r])
    }

    /// A token as llama.cpp prints it with special tokens shown: its bytes, or a control
    /// token's name.
    pub fn piece(&self, id: u32) -> &[u8] {
        match self.token_bytes(id) {
            [] => self.token_text(id).as_bytes(),
            b => b,
        }
    }

    pub fn token_text(&self, id: u32) -> &str {
        self.bpe.text(id).unwrap_or("")
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// One table entry per token, all in one buffer (one allocation, not one per token).
struct Packed<T> {
    all: T,
    /// Where each token's entry ends in `all`.
    ends: Vec<usize>,
}

impl<T> Packed<T> {
    fn range(&self, id: u32) -> Option<std::ops::Range<usize>> {
        let end = *self.ends.get(id as usize)?;
        let start = match id {
            0 => 0,
            _ => self.ends[id as usize - 1],
        };
        Some(start..end)
    }
}

/// The bytes each token stands for (none for control tokens).
fn token_bytes(tokens: &[&str], types: &[i64]) -> Packed<Vec<u8>> {
    let decode_byte = byte_level_decoder();
    let mut bytes = Packed {
        all: Vec::with_capacity(tokens.iter().map(|t| t.len()).sum()),
        ends: Vec::with_capacity(tokens.len()),
    };
    for (i, t) in tokens.iter().enumerate() {
        match types.get(i).copied().unwrap_or(1) {
            TOKEN_TYPE_CONTROL => {}
            TOKEN_TYPE_USER_DEFINED => bytes.all.extend_from_slice(t.as_bytes()),
            _ => bytes.all.extend(
                t.chars()
                    .map(|c| decode_byte.get(c as usize).copied().unwrap_or(b'?')),
            ),
        }
        bytes.ends.push(bytes.all.len());
    }
    bytes
}

/// Our BPE model over the GGUF vocabulary and merges, in the `tokenizers` pipeline.
fn bpe_pipeline(
    gguf: &GgufFile,
    tokens: &[&str],
    types: &[i64],
) -> Result<(Pipeline, ByteLevelBpe)> {
    let merges = gguf.get_array("tokenizer.ggml.merges")?;
    let bpe = ByteLevelBpe::new(
        tokens,
        merges.iter().map(|m| {
            m.as_str()
                .context("tokenizer.ggml.merges holds a non-string")
        }),
    )
    .map_err(|e| {
        anyhow::anyhow!("cannot build the BPE tokenizer from the GGUF vocabulary: {e:#}")
    })?;
    Ok((pipeline(bpe.clone(), tokens, types)?, bpe))
}

/// A BPE model with Qwen2's pre-tokenizer, the byte-level decoder, and the control and
/// user-defined tokens as added tokens.
fn pipeline<M: tokenizers::Model>(
    model: M,
    tokens: &[&str],
    types: &[i64],
) -> Result<
    TokenizerImpl<M, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>,
> {
    let mut inner = TokenizerImpl::new(model);
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
    inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]))));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(t, &ty)| AddedToken::from(t.to_string(), ty == TOKEN_TYPE_CONTROL))
        .collect();
    inner.add_special_tokens(&added);
    Ok(inner)
}

/// The same pipeline around the `tokenizers` crate's own BPE model, which ours is checked
/// against: ids of `text` (control tokens written in it read as such).
#[cfg(feature = "test-hooks")]
pub fn reference_encode(gguf: &GgufFile) -> Result<impl Fn(&str) -> Vec<u32>> {
    let tokens: Vec<&str> = gguf
        .get_array("tokenizer.ggml.tokens")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let types: Vec<i64> = gguf
        .get_array("tokenizer.ggml.token_type")?
        .iter()
        .map(|t| t.as_i64().unwrap_or(1))
        .collect();
    let merges: Vec<(String, String)> = gguf
        .get_array("tokenizer.ggml.merges")?
        .iter()
        .filter_map(|m| m.as_str()?.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let inner = pipeline(bpe, &tokens, &types)?;
    Ok(move |text: &str| inner.encode_fast(text, false).unwrap().get_ids().to_vec())
}

fn vocab_lookup(tokens: &[&str], name: &str) -> Option<u32> {
    // Special tokens sit at the end of the vocabulary; search from there.
    tokens.iter().rposition(|t| *t == name).map(|i| i as u32)
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are shifted to
/// code points from 256 on, in order. This is the inverse map.
fn byte_level_decoder() -> Vec<u8> {
    let mut map = vec![b'?'; 256 + 68];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("valid code point")
        };
        map[c as usize] = b;
    }
    map
}

fn tracing_warn(msg: &str) {
    eprintln!("warning: {msg}");
}
