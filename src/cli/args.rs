use crate::engine::{DeviceChoice, LoadOptions};
use crate::kv_cache::CacheType;
use crate::sampler::SamplingParams;
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
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
    /// Measure prompt processing and generation speed, as llama-bench does.
    Bench(BenchArgs),
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
    /// Repetitions of each test, after one warm-up run.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// Output format: md, csv or json.
    #[arg(short = 'o', long = "output", default_value = "md", value_parser = ["md", "csv", "json"])]
    pub output: String,
}

/// Where the model comes from and how it is loaded; shared by every command.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Path of the GGUF model file (the first part of a split model).
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: Option<PathBuf>,
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
    #[arg(long, default_value = "cpu", value_parser = DeviceChoice::parse)]
    pub device: DeviceChoice,
    /// Storage type of the KV cache: f32 or f16.
    #[arg(long = "cache-type", default_value = "f32", value_parser = CacheType::parse)]
    pub cache_type: CacheType,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        let Some(model) = &self.model else {
            bail!("no model given: pass --model FILE.gguf (run `python3 models/fetch.py` to get the test model)");
        };
        let threads = match self.threads[..] {
            [] => 0,
            [t] => t,
            _ => bail!("--threads takes one number here; only `qwen-run bench` takes a list"),
        };
        Ok(LoadOptions {
            model: model.clone(),
            device: self.device,
            threads,
            ctx_size: self.ctx_size,
            batch_size: self.batch_size,
            cache_type: self.cache_type,
        })
    }
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
    #[arg(long = "no-chat-template")]
    pub no_chat_template: bool,
    /// Tokens to generate at most (-1: until the model stops or the context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// No timing report on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}
