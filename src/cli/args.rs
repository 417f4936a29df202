use crate::engine::{
    DeviceChoice, LoadOptions, DEFAULT_CACHE_RAM_MIB, DEFAULT_PREFIX_BLOCK,
    DEFAULT_PROMPT_CACHE_MAX_MIB,
};
use crate::grammar::Format;
use crate::kv_cache::CacheType;
use crate::model::{RopeOverrides, RopeScaling};
use crate::sampler::SamplingParams;
use crate::server::ModelSource;
use crate::speculative::{SpecConfig, SpecType};
use crate::tokenizer::TemplateOverride;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "qwen-run",
    version,
    about = "Run Qwen2.5 models from quantized GGUF files",
    args_conflicts_with_subcommands = true,
    after_help = "Example: qwen-run -m qwen2.5-7b-instruct-q5_k_m.gguf -p \"Write a haiku about Rust.\""
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl Cli {
    /// The model flags of the command given; `template`, which reads no weights, has none.
    pub fn model_args(&self) -> Option<&ModelArgs> {
        match &self.command {
            Some(Command::Run(a)) => Some(&a.model),
            Some(Command::Chat(a)) => Some(&a.model),
            Some(Command::Bench(a)) => Some(&a.model),
            Some(Command::Serve(a)) => Some(&a.model),
            Some(Command::Fidelity(a)) => Some(&a.model),
            Some(Command::Template(_)) => None,
            None => Some(&self.run.model),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a completion for one prompt (the default command).
    Run(RunArgs),
    /// Interactive multi-turn chat on stdin/stdout (/reset, /system TEXT, /exit).
    Chat(ChatArgs),
    /// Measure prompt processing and generation speed, as llama-bench does.
    Bench(BenchArgs),
    /// Serve the model over HTTP with OpenAI- and Ollama-compatible APIs.
    Serve(super::serve::ServeArgs),
    /// Compare next-token distributions and greedy continuations with llama.cpp's.
    Fidelity(FidelityArgs),
    /// Print a conversation as the chat template renders it (the exact prompt text the model
    /// reads), without loading the weights.
    Template(TemplateCmdArgs),
}

/// The chat template to use instead of the model file's (`tokenizer.chat_template`).
#[derive(Args, Debug, Clone, Default)]
pub struct TemplateArgs {
    /// Use this chat template instead of the model's: a built-in name (chatml, qwen2.5), or the
    /// Jinja text itself (a value holding `{{` or `{%`). Any other value is refused.
    #[arg(
        long = "chat-template",
        value_name = "NAME|JINJA",
        conflicts_with = "chat_template_file"
    )]
    pub chat_template: Option<String>,
    /// Use the Jinja chat template in FILE instead of the model's (at most 1 MiB; checked before
    /// the model loads).
    #[arg(long = "chat-template-file", value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
}

impl TemplateArgs {
    /// The template the flags name, read and parsed; None: the model's own.
    pub fn template_override(&self) -> Result<Option<TemplateOverride>> {
        match (&self.chat_template, &self.chat_template_file) {
            (Some(_), Some(_)) => {
                bail!("--chat-template and --chat-template-file both choose the chat template; pass one")
            }
            (Some(name), None) => TemplateOverride::named(name).map(Some),
            (None, Some(file)) => TemplateOverride::from_file(file).map(Some),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct TemplateCmdArgs {
    /// The GGUF model file whose tokenizer and chat template are used (its weights are not read).
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Hugging Face model repo to take the model from, as for `run` (downloaded if not cached).
    #[arg(
        long = "hf-repo",
        visible_alias = "hf",
        value_name = "REPO[:QUANT]",
        conflicts_with = "model"
    )]
    pub hf_repo: Option<String>,
    /// The GGUF file of --hf-repo to use.
    #[arg(long = "hf-file", value_name = "FILE", requires = "hf_repo")]
    pub hf_file: Option<String>,
    /// Download a --hf-repo file the Hub lists no size and sha256 for.
    #[arg(long = "hf-no-verify", requires = "hf_repo")]
    pub hf_no_verify: bool,
    /// The conversation: a JSON array of OpenAI-style messages ({"role", "content",
    /// "tool_calls"}), or an object with "messages" and "tools", as a chat completion request
    /// holds them; `-` reads stdin. Default: a short example conversation.
    #[arg(long, value_name = "FILE|-")]
    pub messages: Option<PathBuf>,
    /// A JSON array of tools (OpenAI's function definitions) for the template to list.
    #[arg(long, value_name = "FILE")]
    pub tools: Option<PathBuf>,
    /// Leave out the prompt that opens the assistant's reply (add_generation_prompt = false).
    #[arg(long = "no-generation-prompt")]
    pub no_generation_prompt: bool,
    /// Print the token ids (a JSON array) instead of the text.
    #[arg(long)]
    pub tokens: bool,
    #[command(flatten)]
    pub template: TemplateArgs,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths to test (pp), comma separated; 0 skips.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test (tg), comma separated; 0 skips.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Tokens already in the context when each test starts, comma separated (llama-bench's -d):
    /// `tg128 @ d2048` decodes 128 tokens after a 2048-token prompt, as a long system prompt or
    /// tool list leaves it. The prefill of that depth is not timed.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub n_depth: Vec<usize>,
    /// Sequences decoded together in the tg tests, comma separated (as `serve --parallel` batches
    /// requests); `tg128 x8` reports the aggregate t/s of 8 sequences of 128 tokens.
    #[arg(long = "parallel", value_delimiter = ',', default_value = "1")]
    pub parallel: Vec<usize>,
    /// Repetitions of each test, after one warm-up run.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// Output format: md, csv or json.
    #[arg(short = 'o', long = "output", default_value = "md", value_parser = ["md", "csv", "json"])]
    pub output: String,
    /// Constrained decoding in the tg tests: each token is picked (greedily) from the logits
    /// masked by this JSON schema or GBNF grammar, as `run -j` / `--grammar` picks it; when the
    /// answer is complete the next starts. The rows' test names end in +json, +schema or +gbnf.
    #[command(flatten)]
    pub format: FormatArgs,
    #[command(flatten)]
    pub template: TemplateArgs,
}

#[derive(Args, Debug, Clone)]
pub struct FidelityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// llama.cpp's logits at every position of a text (made by benches/llama_logits.c).
    #[arg(long, value_name = "FILE")]
    pub logits: Option<PathBuf>,
    /// llama.cpp's greedy continuations: a reference JSON with prompt_ids and greedy_ids.
    #[arg(long, value_name = "FILE")]
    pub greedy: Option<PathBuf>,
    /// Which list of prompts in the --greedy file to use.
    #[arg(long = "greedy-set", default_value = "prompts_flash_attn_off")]
    pub greedy_set: String,
    /// Instead of comparing, write this engine's logits at every position of --text to FILE, in
    /// the --logits format: a reference for checking one device against another.
    #[arg(long = "write-logits", value_name = "FILE", requires = "text", conflicts_with_all = ["logits", "greedy"])]
    pub write_logits: Option<PathBuf>,
    /// The text whose logits --write-logits writes.
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Output format: md or json.
    #[arg(short = 'o', long = "output", default_value = "md", value_parser = ["md", "json"])]
    pub output: String,
}

/// Where the model comes from and how it is loaded; shared by every command.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Path of the GGUF model file (the first part of a split model). `serve` takes it more than
    /// once, or a directory of GGUF files, to serve several models.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: Vec<PathBuf>,
    /// Hugging Face model repo to download the model from (or use from the cache), with an
    /// optional quantization picking the GGUF file (default Q4_K_M), e.g.
    /// `-hf Qwen/Qwen2.5-7B-Instruct-GGUF:Q5_K_M`. Env: HF_TOKEN, HF_ENDPOINT, HF_HOME,
    /// HF_HUB_OFFLINE=1.
    #[arg(
        long = "hf-repo",
        visible_alias = "hf",
        value_name = "REPO[:QUANT]",
        conflicts_with = "model"
    )]
    pub hf_repo: Option<String>,
    /// The GGUF file of --hf-repo to use (of a split model, its first part), instead of picking
    /// one by quantization.
    #[arg(long = "hf-file", value_name = "FILE", requires = "hf_repo")]
    pub hf_file: Option<String>,
    /// Download a --hf-repo file even though the Hub lists no size and sha256 for it, so it
    /// cannot be verified (without this, such a file is refused).
    #[arg(long = "hf-no-verify", requires = "hf_repo")]
    pub hf_no_verify: bool,
    /// Worker threads for the CPU (default: physical cores); `bench` takes a comma list.
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Context size in tokens (default: min(model context, 4096)).
    #[arg(
        short = 'c',
        long = "ctx-size",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub ctx_size: usize,
    /// Prompt tokens processed per forward pass.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// cpu, cuda or auto (auto picks the GPU when one is compiled in and visible).
    #[arg(long, default_value = "auto", value_parser = DeviceChoice::parse)]
    pub device: DeviceChoice,
    /// Layers to run on the GPU, counted from the last (llama.cpp's -ngl; default: all, and the
    /// output head). A number above the layer count also puts the output head there; 0 keeps
    /// everything on the CPU. Layers that do not fit on a small GPU stay on the CPU.
    #[arg(long = "gpu-layers", alias = "n-gpu-layers", value_name = "N")]
    pub gpu_layers: Option<usize>,
    /// Storage type of the KV cache, keys and values: f32 (the default), f16 or q8_0. `serve`
    /// also reads OLLAMA_KV_CACHE_TYPE when no cache type flag is given.
    #[arg(long = "cache-type", value_name = "TYPE", value_parser = CacheType::parse)]
    pub cache_type: Option<CacheType>,
    /// Storage type of the cached keys (overrides --cache-type): f32, f16 or q8_0.
    #[arg(long = "cache-type-k", value_name = "TYPE", value_parser = CacheType::parse)]
    pub cache_type_k: Option<CacheType>,
    /// Storage type of the cached values (overrides --cache-type): f32, f16 or q8_0.
    #[arg(long = "cache-type-v", value_name = "TYPE", value_parser = CacheType::parse)]
    pub cache_type_v: Option<CacheType>,
    /// Memory for the in-process prompt-prefix cache, in MiB (0: off). Requests that start with
    /// the same long prompt (a system prompt, a tool list) reuse its KV instead of prefilling it.
    #[arg(long = "cache-ram", value_name = "MiB", default_value_t = DEFAULT_CACHE_RAM_MIB)]
    pub cache_ram: usize,
    /// Directory of the persistent prompt cache, which lets a new process skip the prefill of a
    /// prompt prefix seen before (default: $XDG_CACHE_HOME/qwen-run/prompt-cache, or
    /// ~/.cache/qwen-run/prompt-cache).
    #[arg(long = "prompt-cache", value_name = "DIR")]
    pub prompt_cache: Option<PathBuf>,
    /// Do not read or write the persistent prompt cache.
    #[arg(long = "no-prompt-cache", conflicts_with = "prompt_cache")]
    pub no_prompt_cache: bool,
    /// Size limit of the persistent prompt cache, in MiB; the least recently used files go first.
    #[arg(long = "prompt-cache-max", value_name = "MiB", default_value_t = DEFAULT_PROMPT_CACHE_MAX_MIB)]
    pub prompt_cache_max: u64,
    /// Directory of the weight cache: the CPU kernels' copy of a model's weights, which later
    /// loads map instead of making it again (default: $XDG_CACHE_HOME/qwen-run/weight-cache, or
    /// ~/.cache/qwen-run/weight-cache). A file is about the size of its model's GGUF; the least
    /// recently used go when the directory passes 8 GiB. Not used with --huge-pages on.
    #[arg(long = "weight-cache", value_name = "DIR")]
    pub weight_cache: Option<PathBuf>,
    /// Do not read or write the weight cache (every load makes the CPU copy of the weights).
    #[arg(long = "no-weight-cache", conflicts_with = "weight_cache")]
    pub no_weight_cache: bool,
    /// on: keep the CPU copy of the weights in 2 MiB pages, for faster decoding, at the price of
    /// a slower load where fresh 2 MiB pages are slow to get (docs/BENCHMARKS.md has figures).
    /// Default: on for `serve`, which loads once and decodes for long, off for one-shot commands.
    #[arg(long = "huge-pages", value_name = "on|off", value_parser = parse_on_off)]
    pub huge_pages: Option<bool>,
    /// llama.cpp's -ub: prompt tokens per forward pass; with --batch-size, the smaller of the two
    /// is used (a llama.cpp physical batch is never larger than its logical one).
    #[arg(long = "ubatch-size", value_name = "N", value_parser = parse_positive)]
    pub ubatch_size: Option<usize>,
    /// llama.cpp's -tb: threads for prompt processing. One thread pool runs prompt processing
    /// and generation here, so it must equal --threads.
    #[arg(long = "threads-batch", value_name = "N")]
    pub threads_batch: Option<usize>,
    /// llama.cpp's -fa: accepted with no effect. There is one attention path here, the same for
    /// every setting, and q8_0 values need no flash attention.
    #[arg(long = "flash-attn", value_name = "on|off|auto", value_parser = ["on", "off", "auto", "1", "0"])]
    pub flash_attn: Option<String>,
    /// Accepted with no effect: the weights are not locked in memory (use a machine without swap,
    /// or enough RAM, to keep them resident).
    #[arg(long = "mlock")]
    pub mlock: bool,
    /// Do not map the kernels' copy of the weights from the weight cache: make it in the
    /// process's memory, as --no-weight-cache does.
    #[arg(long = "no-mmap")]
    pub no_mmap: bool,
    /// llama.cpp's priority level (-1 low, 0 normal, 1 medium, 2 high, 3 realtime): accepted with
    /// no effect, the threads run at the process's priority (set it with nice or chrt).
    #[arg(long = "prio", value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..=3))]
    pub prio: Option<i32>,
    /// Also write everything qwen-run prints on stderr (reports, notices, errors) to FILE.
    #[arg(long = "log-file", value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub rope: RopeArgs,
}

/// Rotary position scaling for contexts beyond the trained one, with llama.cpp's flag names;
/// each overrides what the GGUF file says.
#[derive(Args, Debug, Clone, Default)]
pub struct RopeArgs {
    /// How positions are scaled: none, linear or yarn (default: the file's `rope.scaling.type`,
    /// linear when it has none). Qwen2.5 models reach 128k tokens with yarn: `--rope-scaling
    /// yarn --rope-scale 4 --yarn-orig-ctx 32768 -c 131072`.
    #[arg(long = "rope-scaling", value_name = "none|linear|yarn", value_parser = RopeScaling::parse)]
    pub scaling: Option<RopeScaling>,
    /// The context scaling factor N: the context reaches N times the original one (the same as
    /// --rope-freq-scale 1/N).
    #[arg(long = "rope-scale", value_name = "N", conflicts_with = "freq_scale")]
    pub scale: Option<f32>,
    /// Rotary base frequency (default: the file's `rope.freq_base`).
    #[arg(long = "rope-freq-base", value_name = "N")]
    pub freq_base: Option<f32>,
    /// Rotary frequency scale: the context reaches 1/N times the original one.
    #[arg(long = "rope-freq-scale", value_name = "N")]
    pub freq_scale: Option<f32>,
    /// YaRN: the context the model was trained with before extension (default: the file's
    /// `rope.scaling.original_context_length`, else its context length).
    #[arg(long = "yarn-orig-ctx", value_name = "N")]
    pub orig_ctx: Option<usize>,
    /// YaRN: the blend of trained and interpolated frequencies, 0 (plain interpolation) to 1
    /// (default: 1 with yarn, 0 otherwise).
    #[arg(long = "yarn-ext-factor", value_name = "N")]
    pub ext_factor: Option<f32>,
    /// YaRN: multiplies the magnitude of the rotated queries and keys (default 1; with yarn it
    /// multiplies YaRN's own correction, where llama.cpp drops it).
    #[arg(long = "yarn-attn-factor", value_name = "N")]
    pub attn_factor: Option<f32>,
    /// YaRN: the low correction dimension (default 32).
    #[arg(long = "yarn-beta-fast", value_name = "N")]
    pub beta_fast: Option<f32>,
    /// YaRN: the high correction dimension (default 1).
    #[arg(long = "yarn-beta-slow", value_name = "N")]
    pub beta_slow: Option<f32>,
}

impl RopeArgs {
    pub fn overrides(&self) -> Result<RopeOverrides> {
        let freq_scale = match self.scale {
            Some(n) if !(n.is_finite() && n > 0.0) => {
                bail!("--rope-scale {n} must be a positive factor (4 stretches the context four times)")
            }
            Some(n) => Some(1.0 / n),
            None => self.freq_scale,
        };
        Ok(RopeOverrides {
            scaling: self.scaling,
            freq_scale,
            freq_base: self.freq_base,
            orig_ctx: self.orig_ctx,
            ext_factor: self.ext_factor,
            attn_factor: self.attn_factor,
            beta_fast: self.beta_fast,
            beta_slow: self.beta_slow,
        })
    }
}

/// Speculative decoding, with llama.cpp's flag names.
#[derive(Args, Debug, Clone, Default)]
pub struct SpecArgs {
    /// How to draft tokens ahead of the model, checked in the same step as the token before
    /// them (output unchanged), a comma list: ngram-simple (the default) looks the text's last
    /// words up in the prompt and the answer so far and drafts what followed them;
    /// draft-simple asks the draft model (-md), where ngram-simple found nothing when both are
    /// given; none turns it off. With -md and no --spec-type: ngram-simple,draft-simple.
    #[arg(long = "spec-type", value_name = "TYPE")]
    pub spec_type: Option<String>,
    /// The longest n-gram ngram-simple looks up, 2 to 64 (it tries shorter ones down to 2).
    #[arg(long = "spec-ngram-simple-size-n", value_name = "N")]
    pub ngram_size: Option<usize>,
    /// The most tokens ngram-simple drafts at once (the same setting as --spec-draft-n-max).
    #[arg(long = "spec-ngram-simple-size-m", value_name = "N")]
    pub ngram_draft: Option<usize>,
    /// Accepted with no effect, as in llama.cpp b11434, whose ngram-simple does not read it.
    #[arg(long = "spec-ngram-simple-min-hits", value_name = "N")]
    pub ngram_min_hits: Option<usize>,
    /// The most tokens drafted at once, by either type.
    #[arg(long = "spec-draft-n-max", visible_aliases = ["draft-max", "draft", "draft-n"], value_name = "N")]
    pub draft_max: Option<usize>,
    /// Drafts of fewer tokens than this are not tried.
    #[arg(long = "spec-draft-n-min", visible_aliases = ["draft-min", "draft-n-min"], value_name = "N")]
    pub draft_min: Option<usize>,
    /// The draft model stops drafting at a token whose probability, among its ten most likely,
    /// is below P (0 to 1; default 0, as in llama.cpp b11434). Only the draft model reads it.
    #[arg(
        long = "spec-draft-p-min",
        visible_alias = "draft-p-min",
        value_name = "P"
    )]
    pub draft_p_min: Option<f32>,
    /// on (default): each draft is as long as pays on this machine, from the measured share of
    /// drafted tokens kept and the measured cost of longer steps (and of the draft model's own
    /// steps), and none while none pays; off: every draft is tried whole, up to
    /// --spec-draft-n-max.
    #[arg(long = "spec-adaptive", value_name = "on|off", value_parser = parse_on_off)]
    pub adaptive: Option<bool>,
    /// A draft model (-md): a smaller model with the target's vocabulary (Qwen2.5 0.5B for the
    /// larger Qwen2.5 models), loaded with the target's settings, that proposes tokens for the
    /// target to check (speculative type draft-simple).
    #[arg(
        long = "model-draft",
        visible_alias = "spec-draft-model",
        value_name = "FILE",
        conflicts_with = "hf_repo_draft"
    )]
    pub model_draft: Option<PathBuf>,
    /// The draft model from Hugging Face (-hfd ORG/REPO[:QUANT]), downloaded as -hf is.
    #[arg(
        long = "hf-repo-draft",
        visible_alias = "spec-draft-hf",
        value_name = "REPO"
    )]
    pub hf_repo_draft: Option<String>,
}

impl SpecArgs {
    /// The speculation these flags ask for.
    pub fn config(&self) -> Result<SpecConfig> {
        let has_model = self.model_draft.is_some() || self.hf_repo_draft.is_some();
        let mut c = SpecConfig::default();
        match &self.spec_type {
            Some(types) => {
                c.kind = SpecType::None;
                for t in types.split(',') {
                    match SpecType::parse(t.trim()).map_err(anyhow::Error::msg)? {
                        SpecType::None => {}
                        SpecType::NgramSimple => c.kind = SpecType::NgramSimple,
                        SpecType::DraftSimple => c.draft_model = true,
                    }
                }
                if c.draft_model && !has_model {
                    bail!("--spec-type {types}: draft-simple needs a draft model, -md FILE or -hfd ORG/REPO[:QUANT]");
                }
                if has_model && !c.draft_model {
                    bail!("a draft model (-md/-hfd) is given but --spec-type {types} does not use it; add draft-simple (--spec-type ngram-simple,draft-simple), or leave --spec-type out");
                }
            }
            None => c.draft_model = has_model,
        }
        if let Some(n) = self.ngram_size {
            c.ngram_size = n;
        }
        match (self.ngram_draft, self.draft_max) {
            (Some(m), Some(n)) if m != n => bail!(
                "--spec-ngram-simple-size-m {m} and --spec-draft-n-max {n} set the same limit here; give one"
            ),
            (Some(n), _) | (_, Some(n)) => c.n_max = n,
            (None, None) => {}
        }
        if let Some(n) = self.draft_min {
            c.n_min = n;
        }
        if let Some(p) = self.draft_p_min {
            c.p_min = p;
        }
        if let Some(on) = self.adaptive {
            c.adaptive = on;
        }
        c.check()?;
        Ok(c)
    }

    /// The draft model's file: -md, or -hfd's (downloaded if it is not in the cache).
    pub fn draft_file(&self, hf_no_verify: bool) -> Result<Option<PathBuf>> {
        let file = match (&self.model_draft, &self.hf_repo_draft) {
            (Some(f), _) => f.clone(),
            (None, Some(repo)) => crate::hub::resolve_model(repo, None, hf_no_verify)?,
            (None, None) => return Ok(None),
        };
        if file.is_dir() {
            bail!(
                "--model-draft {} is a directory; give one GGUF file",
                file.display()
            );
        }
        Ok(Some(file))
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a number of at least 1, got '{s}'")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, got '{s}'")),
    }
}

/// The default directory of the persistent prompt cache, if a home or cache directory is known.
pub fn default_prompt_cache_dir() -> Option<PathBuf> {
    default_cache_dir("prompt-cache")
}

/// The default directory of the weight cache, beside the prompt cache's.
pub fn default_weight_cache_dir() -> Option<PathBuf> {
    default_cache_dir("weight-cache")
}

fn default_cache_dir(name: &str) -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("qwen-run").join(name))
}

impl ModelArgs {
    /// The load options of a one-shot command's one model.
    pub fn load_options(&self) -> Result<LoadOptions> {
        self.one_model_options(false)
    }

    /// `long_lived`: the default of --huge-pages.
    fn one_model_options(&self, long_lived: bool) -> Result<LoadOptions> {
        let threads = self.thread_count()?;
        let model = model_file(
            &self.model,
            self.hf_repo.as_deref(),
            self.hf_file.as_deref(),
            self.hf_no_verify,
        )?;
        self.options_for(model, threads, long_lived)
    }

    /// The load options of every model `serve` is given: each -m file, each GGUF file of an -m
    /// directory (the first part of a split model), or the -hf model.
    /// They are a server's, so 2 MiB pages are on unless --huge-pages off.
    pub fn load_options_all(&self) -> Result<Vec<ModelSource>> {
        if self.model.len() < 2 && !self.model.iter().any(|m| m.is_dir()) {
            return Ok(vec![ModelSource {
                load: self.one_model_options(true)?,
                from_directory: false,
            }]);
        }
        let threads = self.thread_count()?;
        let mut files = Vec::new();
        for m in &self.model {
            if m.is_dir() {
                let mut found: Vec<PathBuf> = std::fs::read_dir(m)
                    .with_context(|| format!("cannot read the model directory {}", m.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_model_file(p))
                    .collect();
                if found.is_empty() {
                    bail!("the model directory {} holds no .gguf file", m.display());
                }
                found.sort();
                files.extend(found.into_iter().map(|f| (f, true)));
            } else {
                files.push((m.clone(), false));
            }
        }
        files
            .into_iter()
            .map(|(f, from_directory)| {
                Ok(ModelSource {
                    load: self.options_for(f, threads, true)?,
                    from_directory,
                })
            })
            .collect()
    }

    /// The one thread count of every command but `bench`.
    fn thread_count(&self) -> Result<usize> {
        let threads = match self.threads[..] {
            [] => 0,
            [t] => t,
            _ => bail!("--threads takes one number here; only `qwen-run bench` takes a list"),
        };
        self.check_threads_batch()?;
        Ok(threads)
    }

    /// -tb is accepted only where it asks for what the one thread pool does anyway.
    pub fn check_threads_batch(&self) -> Result<()> {
        match (self.threads_batch, &self.threads[..]) {
            (None, _) => Ok(()),
            (Some(tb), list) if !list.is_empty() && list.iter().all(|&t| t == tb) => Ok(()),
            (Some(tb), _) => bail!(
                "-tb/--threads-batch {tb}: qwen-run runs prompt processing and generation on one thread pool, so -tb must equal -t; pass -t {tb} (or leave -tb out)"
            ),
        }
    }

    /// Prompt tokens per forward pass: --batch-size, or -ub when that is smaller.
    fn pass_size(&self) -> usize {
        self.ubatch_size
            .map_or(self.batch_size, |ub| ub.min(self.batch_size))
    }

    /// `long_lived`: the default of --huge-pages.
    fn options_for(&self, model: PathBuf, threads: usize, long_lived: bool) -> Result<LoadOptions> {
        Ok(LoadOptions {
            model,
            device: self.device,
            gpu_layers: self.gpu_layers,
            threads,
            ctx_size: self.ctx_size,
            batch_size: self.pass_size(),
            cache_type: self.cache_type.unwrap_or(CacheType::F32),
            cache_type_k: self.cache_type_k,
            cache_type_v: self.cache_type_v,
            cache_ram_mib: self.cache_ram,
            prompt_cache: if self.no_prompt_cache {
                None
            } else {
                self.prompt_cache.clone().or_else(default_prompt_cache_dir)
            },
            prompt_cache_max_mib: self.prompt_cache_max,
            prefix_block: DEFAULT_PREFIX_BLOCK,
            huge_pages: self.huge_pages.unwrap_or(long_lived),
            chat_template: None,
            weight_cache: if self.no_weight_cache || self.no_mmap {
                None
            } else {
                self.weight_cache.clone().or_else(default_weight_cache_dir)
            },
            spec: self.spec.config()?,
            draft_model: self.spec.draft_file(self.hf_no_verify)?,
            rope: self.rope.overrides()?,
        })
    }
}

/// The one model file of a command that takes one: -m FILE, or the -hf repo's file (downloaded
/// if it is not in the cache).
pub fn model_file(
    model: &[PathBuf],
    hf_repo: Option<&str>,
    hf_file: Option<&str>,
    hf_no_verify: bool,
) -> Result<PathBuf> {
    let model = match (model, hf_repo) {
        ([model], _) => model.clone(),
        ([], Some(repo)) => crate::hub::resolve_model(repo, hf_file, hf_no_verify)?,
        ([], None) => bail!("no model given: pass --model FILE.gguf or -hf ORG/REPO[:QUANT] (run `python3 models/fetch.py` to get the test model)"),
        (_, _) => bail!("--model is given {} times; only `qwen-run serve` serves several models", model.len()),
    };
    if model.is_dir() {
        bail!("--model {} is a directory; only `qwen-run serve` takes a directory of models, other commands take one GGUF file", model.display());
    }
    Ok(model)
}

/// A GGUF file that is a whole model or the first part of a split one.
fn is_model_file(p: &std::path::Path) -> bool {
    let name = p
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let later_part = name.contains("-of-") && !name.contains("-00001-of-");
    p.is_file() && name.ends_with(".gguf") && !later_part
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one (0: off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for tokens among the last --repeat-last-n (1.0: off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Subtracted from the logit of each token already generated (0: off; -2 to 2).
    #[arg(
        long = "presence-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated (0: off; -2 to 2).
    #[arg(
        long = "frequency-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub frequency_penalty: f32,
    /// Random seed: the same seed gives the same output.
    #[arg(short = 's', long, default_value_t = 0xC0FFEE)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: Vec::new(),
            seed: self.seed,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt (the user's message, put through the model's chat template).
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        conflicts_with = "prompt"
    )]
    pub prompt_file: Option<PathBuf>,
    /// System message for the chat template (llama.cpp's -sys).
    #[arg(long = "system", visible_aliases = ["sys", "system-prompt"])]
    pub system: Option<String>,
    /// Feed the prompt to the model as is, without the chat template.
    #[arg(long = "no-chat-template", conflicts_with_all = ["chat_template", "chat_template_file"])]
    pub no_chat_template: bool,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Tokens to generate at most (-1: until the model stops or the context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// No timing report on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Run the same prompt N times in one process, each in a new session (the prompt-prefix
    /// cache serves the repeats; for measuring it).
    #[arg(long = "repeat", default_value_t = 1, value_name = "N")]
    pub repeat: usize,
    #[command(flatten)]
    pub format: FormatArgs,
    /// Run the interactive chat instead (llama-cli's -cnv and -i): as `qwen-run chat`, with -p or
    /// -f as the first message.
    #[arg(short = 'i', long = "conversation", visible_alias = "interactive")]
    pub conversation: bool,
    /// llama-cli's -no-cnv: accepted with no effect, `run` answers one prompt and ends anyway.
    #[arg(long = "no-conversation", conflicts_with = "conversation")]
    pub no_conversation: bool,
    #[command(flatten)]
    pub text: TextArgs,
}

/// llama-cli's text and output flags, shared by `run` and `chat`.
#[derive(Args, Debug, Clone, Default)]
pub struct TextArgs {
    /// Stop the reply at this text (llama-cli's reverse prompt); repeatable. In `chat` the
    /// next message is then read.
    #[arg(short = 'r', long = "reverse-prompt", value_name = "TEXT")]
    pub reverse_prompt: Vec<String>,
    /// Text put before each message typed in `chat` (llama-cli's --in-prefix).
    #[arg(long = "in-prefix", value_name = "TEXT")]
    pub in_prefix: Option<String>,
    /// Text put after each message typed in `chat` (llama-cli's --in-suffix).
    #[arg(long = "in-suffix", value_name = "TEXT")]
    pub in_suffix: Option<String>,
    /// Turn \n, \r, \t, \', \", \\ and \xHH in -p, --system, -r, --in-prefix and
    /// --in-suffix into the characters they stand for (on by default, as in llama-cli).
    #[arg(short = 'e', long = "escape", overrides_with = "no_escape")]
    pub escape: bool,
    /// Take -p, --system, -r, --in-prefix and --in-suffix as written.
    #[arg(long = "no-escape")]
    pub no_escape: bool,
    /// Accepted with no effect: the reply is the only text on stdout, so there is nothing to
    /// tell apart by colour.
    #[arg(long = "color", visible_alias = "colour", value_name = "on|off|auto", num_args = 0..=1, default_missing_value = "on", value_parser = ["on", "off", "auto"])]
    pub color: Option<String>,
    /// The timing report after every reply of `chat` (which otherwise prints it on /stats and at
    /// the end); `run` prints it anyway.
    #[arg(short = 'v', long = "verbose", conflicts_with = "quiet")]
    pub verbose: bool,
}

impl TextArgs {
    /// `text` with its escapes turned into characters, unless --no-escape.
    pub fn unescape(&self, text: &str) -> String {
        if self.no_escape {
            text.to_string()
        } else {
            process_escapes(text)
        }
    }

    /// The reverse prompts as stop strings.
    pub fn stops(&self) -> Vec<String> {
        self.reverse_prompt
            .iter()
            .map(|r| self.unescape(r))
            .collect()
    }
}

/// llama.cpp's escapes: \n \r \t \' \" \\ and \xHH; any other backslash stays as written.
pub fn process_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek().copied() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some(q @ ('\'' | '"' | '\\')) => out.push(q),
            Some('x') => {
                let hex: String = chars.clone().skip(1).take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 && b.is_ascii() => {
                        chars.nth(2);
                        out.push(b as char);
                        continue;
                    }
                    _ => {
                        out.push('\\');
                        continue;
                    }
                }
            }
            _ => {
                out.push('\\');
                continue;
            }
        }
        chars.next();
    }
    out
}

impl RunArgs {
    /// The answer's format, from --json-schema(-file) or --grammar(-file).
    pub fn format(&self) -> Result<Option<Format>> {
        self.format.format()
    }

    /// The chat that -cnv/-i asks for: -p, or the file of -f, is its first message.
    pub fn to_chat(&self) -> Result<ChatArgs> {
        let f = &self.format;
        let refused = [
            (self.no_chat_template, "--no-chat-template"),
            (self.repeat != 1, "--repeat"),
            (f.json_schema.is_some(), "--json-schema"),
            (f.json_schema_file.is_some(), "--json-schema-file"),
            (f.grammar.is_some(), "--grammar"),
            (f.grammar_file.is_some(), "--grammar-file"),
        ];
        if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
            bail!("-cnv/-i runs the interactive chat, which does not take {flag}; leave -cnv out to answer one prompt with it");
        }
        let prompt = match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read the prompt file {}", file.display()))?,
            ),
            (None, None) => None,
        };
        Ok(ChatArgs {
            model: self.model.clone(),
            sampling: self.sampling.clone(),
            system: self.system.clone(),
            system_file: None,
            n_predict: self.n_predict,
            context_overflow: ContextOverflow::Error,
            prompt,
            // a file is taken as written, as `run -f` takes it
            prompt_escaped: self.prompt.is_some(),
            quiet: self.quiet,
            template: self.template.clone(),
            text: self.text.clone(),
        })
    }
}

/// What the answer must match: a JSON schema or a GBNF grammar (llama-cli's flags).
#[derive(Args, Debug, Clone, Default)]
pub struct FormatArgs {
    /// Constrain the answer to JSON valid against this JSON schema (`{}`: any JSON object).
    #[arg(
        short = 'j',
        long = "json-schema",
        value_name = "SCHEMA",
        conflicts_with_all = ["grammar", "grammar_file"]
    )]
    pub json_schema: Option<String>,
    /// Read the JSON schema from a file.
    #[arg(
        long = "json-schema-file",
        value_name = "FILE",
        conflicts_with_all = ["json_schema", "grammar", "grammar_file"]
    )]
    pub json_schema_file: Option<PathBuf>,
    /// Constrain the answer to this GBNF grammar (llama.cpp's format; `root` is the answer).
    #[arg(long = "grammar", value_name = "GBNF")]
    pub grammar: Option<String>,
    /// Read the GBNF grammar from a file.
    #[arg(long = "grammar-file", value_name = "FILE", conflicts_with = "grammar")]
    pub grammar_file: Option<PathBuf>,
}

impl FormatArgs {
    /// The format the flags ask for; a schema that is not a JSON object, or a grammar that does
    /// not parse, is an error naming the flag (and for a grammar the line and column).
    pub fn format(&self) -> Result<Option<Format>> {
        if let Some(g) = &self.grammar {
            return gbnf_format(g.clone(), "--grammar");
        }
        if let Some(f) = &self.grammar_file {
            let text = std::fs::read_to_string(f).with_context(|| {
                format!(
                    "--grammar-file: cannot read the grammar file {}",
                    f.display()
                )
            })?;
            return gbnf_format(text, &format!("--grammar-file {}", f.display()));
        }
        let (text, from) = match (&self.json_schema, &self.json_schema_file) {
            (Some(s), _) => (s.clone(), "--json-schema".to_string()),
            (None, Some(f)) => (
                std::fs::read_to_string(f).with_context(|| {
                    format!(
                        "--json-schema-file: cannot read the JSON schema file {}",
                        f.display()
                    )
                })?,
                format!("--json-schema-file {}", f.display()),
            ),
            (None, None) => return Ok(None),
        };
        let schema: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{from} is not valid JSON"))?;
        match schema {
            serde_json::Value::Object(o) if o.is_empty() => Ok(Some(Format::JsonObject)),
            s @ serde_json::Value::Object(_) => Ok(Some(Format::JsonSchema(s))),
            _ => bail!("{from} must be a JSON schema object"),
        }
    }
}

/// A GBNF grammar checked here, so that a mistake is reported before the model loads.
fn gbnf_format(text: String, from: &str) -> Result<Option<Format>> {
    if let Err(e) = crate::grammar::gbnf::to_lark(&text) {
        bail!("{from}: the GBNF grammar is not valid: {e}");
    }
    Ok(Some(Format::Gbnf(text)))
}

/// What `chat` does when the conversation no longer fits the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ContextOverflow {
    /// Stop with an error that says what to do.
    Error,
    /// Keep the system prompt and drop the oldest turns until the conversation fits.
    DropOldest,
}

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System message for the conversation (change it with /system TEXT; llama.cpp's -sys).
    #[arg(long = "system", visible_aliases = ["sys", "system-prompt"])]
    pub system: Option<String>,
    /// Read the system message from a file.
    #[arg(
        long = "system-file",
        visible_alias = "system-prompt-file",
        value_name = "FILE",
        conflicts_with = "system"
    )]
    pub system_file: Option<PathBuf>,
    /// Tokens to generate at most per reply (-1: until the model stops or the context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// When the conversation outgrows the context: error, or drop-oldest (keeps the system
    /// prompt and drops the oldest turns).
    #[arg(long = "context-overflow", value_enum, default_value_t = ContextOverflow::Error)]
    pub context_overflow: ContextOverflow,
    /// The first message, sent before any is read (llama-cli's -p in conversation mode).
    #[arg(short = 'p', long = "prompt")]
    pub prompt: Option<String>,
    /// Whether --prompt's escapes are processed (not for a prompt read from a file).
    #[arg(skip = true)]
    pub prompt_escaped: bool,
    /// No timing report at the end.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[command(flatten)]
    pub text: TextArgs,
}

/// llama.cpp's multi-letter single-dash flags and the long flags they stand for here.
const LLAMA_FLAGS: &[(&str, &str)] = &[
    ("-hf", "--hf-repo"),
    ("-hfr", "--hf-repo"),
    ("-hff", "--hf-file"),
    ("-ngl", "--gpu-layers"),
    ("-np", "--parallel"),
    ("-sys", "--system"),
    ("-sysf", "--system-file"),
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-fa", "--flash-attn"),
    ("-ub", "--ubatch-size"),
    ("-tb", "--threads-batch"),
    ("-cnv", "--conversation"),
    ("-no-cnv", "--no-conversation"),
    ("-co", "--color"),
    ("-md", "--model-draft"),
    ("-hfd", "--hf-repo-draft"),
    ("-hfrd", "--hf-repo-draft"),
];

/// Rewrites llama.cpp's multi-letter single-dash flags (`-hf`, `-ngl`, `-sys`, `-ctk`, `-fa`...,
/// also in their `-fa=VALUE` forms), which clap cannot have, into their long flags. Any other
/// single-dash word is refused unless clap reads it as intended: a cluster of switches (`-qv`), or
/// one flag with its value attached (`-c256`); a letter flag followed only by letters (`-fit`,
/// `-sm`) is refused, since clap would take the letters as the value (`-f it`).
/// Arguments after `--` are left alone.
pub fn expand_llama_flags(args: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>> {
    let (switches, valued) = short_flags();
    let mut out = Vec::new();
    let mut rest = false;
    for (n, arg) in args.into_iter().enumerate() {
        let s = match arg.to_str() {
            Some(s) if !rest && n > 0 => s,
            _ => {
                out.push(arg);
                continue;
            }
        };
        if s == "--" {
            rest = true;
            out.push(arg);
            continue;
        }
        let (flag, value) = match s.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (s, None),
        };
        if let Some((_, long)) = LLAMA_FLAGS.iter().find(|(short, _)| *short == flag) {
            out.push(match value {
                Some(v) => format!("{long}={v}").into(),
                None => (*long).into(),
            });
            continue;
        }
        if let Some(word) = flag
            .strip_prefix('-')
            .filter(|w| w.chars().count() > 1 && w.starts_with(|c: char| c.is_ascii_alphabetic()))
        {
            check_cluster(flag, word, &switches, &valued)?;
        }
        out.push(arg);
    }
    Ok(out)
}

/// The short flags of every command: those that take no value, and those that take one.
fn short_flags() -> (Vec<char>, Vec<char>) {
    use clap::CommandFactory;
    let (mut switches, mut valued) = (Vec::new(), Vec::new());
    let root = Cli::command();
    let mut commands = vec![&root];
    commands.extend(root.get_subcommands());
    for c in commands {
        for a in c.get_arguments() {
            if let Some(short) = a.get_short() {
                let list = if a.get_action().takes_values() {
                    &mut valued
                } else {
                    &mut switches
                };
                list.push(short);
            }
        }
    }
    switches.extend(['h', 'V']);
    (switches, valued)
}

/// `word` (the flag without its dash and any `=VALUE`) is switches, then at most one flag
/// with a value, whose attached value is not letters alone.
fn check_cluster(flag: &str, word: &str, switches: &[char], valued: &[char]) -> Result<()> {
    for (i, c) in word.char_indices() {
        if switches.contains(&c) && !valued.contains(&c) {
            continue;
        }
        let attached = &word[i + c.len_utf8()..];
        if valued.contains(&c)
            && (attached.is_empty() || !attached.chars().all(|a| a.is_ascii_alphabetic()))
        {
            return Ok(());
        }
        let hint = if valued.contains(&c) {
            format!("; to give -{c} the value '{attached}', write -{c} {attached}")
        } else {
            String::new()
        };
        bail!("unknown flag '{flag}': it is not one of qwen-run's flags nor one of the llama.cpp spellings it takes (README.md, \"llama.cpp spellings\"){hint}");
    }
    Ok(())
}
