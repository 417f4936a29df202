use crate::engine::{
    DeviceChoice, LoadOptions, DEFAULT_CACHE_RAM_MIB, DEFAULT_PREFIX_BLOCK,
    DEFAULT_PROMPT_CACHE_MAX_MIB,
};
use crate::grammar::Format;
use crate::kv_cache::CacheType;
use crate::sampler::SamplingParams;
use crate::server::ModelSource;
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
    /// Storage type of the KV cache, keys and values: f32, f16 or q8_0.
    #[arg(long = "cache-type", default_value = "f32", value_parser = CacheType::parse)]
    pub cache_type: CacheType,
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
    /// on: keep the CPU copy of the weights in 2 MiB pages, for faster decoding, at the price of
    /// a slower load where fresh 2 MiB pages are slow to get (docs/BENCHMARKS.md has figures).
    /// Default: on for `serve`, which loads once and decodes for long, off for one-shot commands.
    #[arg(long = "huge-pages", value_name = "on|off", value_parser = parse_on_off)]
    pub huge_pages: Option<bool>,
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
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("qwen-run").join("prompt-cache"))
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
        Ok(self.options_for(model, threads, long_lived))
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
        Ok(files
            .into_iter()
            .map(|(f, from_directory)| ModelSource {
                load: self.options_for(f, threads, true),
                from_directory,
            })
            .collect())
    }

    /// The one thread count of every command but `bench`.
    fn thread_count(&self) -> Result<usize> {
        match self.threads[..] {
            [] => Ok(0),
            [t] => Ok(t),
            _ => bail!("--threads takes one number here; only `qwen-run bench` takes a list"),
        }
    }

    /// `long_lived`: the default of --huge-pages.
    fn options_for(&self, model: PathBuf, threads: usize, long_lived: bool) -> LoadOptions {
        LoadOptions {
            model,
            device: self.device,
            gpu_layers: self.gpu_layers,
            threads,
            ctx_size: self.ctx_size,
            batch_size: self.batch_size,
            cache_type: self.cache_type,
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
        }
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
    /// System message for the chat template.
    #[arg(long = "system", visible_alias = "sys")]
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
}

impl RunArgs {
    /// The answer's format, from --json-schema(-file) or --grammar(-file).
    pub fn format(&self) -> Result<Option<Format>> {
        self.format.format()
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
    /// System message for the conversation (change it with /system TEXT).
    #[arg(long = "system", visible_alias = "sys")]
    pub system: Option<String>,
    /// Read the system message from a file.
    #[arg(long = "system-file", value_name = "FILE", conflicts_with = "system")]
    pub system_file: Option<PathBuf>,
    /// Tokens to generate at most per reply (-1: until the model stops or the context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// When the conversation outgrows the context: error, or drop-oldest (keeps the system
    /// prompt and drops the oldest turns).
    #[arg(long = "context-overflow", value_enum, default_value_t = ContextOverflow::Error)]
    pub context_overflow: ContextOverflow,
    /// No timing report on stderr after each reply.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    #[command(flatten)]
    pub template: TemplateArgs,
}

/// Rewrites llama.cpp's multi-letter short flags, which clap cannot have: `-hf` and `-hfr` become
/// `--hf-repo`, `-hff` `--hf-file`, `-ngl` `--gpu-layers`, `-np` `--parallel` (also in their `-hf=VALUE` forms).
/// Arguments after `--` are left alone.
pub fn expand_llama_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest = false;
    for arg in args {
        if rest {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
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
        let long = match flag {
            "-hf" | "-hfr" => "--hf-repo",
            "-hff" => "--hf-file",
            "-ngl" => "--gpu-layers",
            "-np" => "--parallel",
            _ => {
                out.push(arg);
                continue;
            }
        };
        out.push(match value {
            Some(v) => format!("{long}={v}").into(),
            None => long.into(),
        });
    }
    out
}
