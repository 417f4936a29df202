//! The engine: a loaded model with its tokenizer and template, sessions that own a KV cache,
//! and the generation loop. The CLI, the benchmark and the server all talk to this.

mod device;

pub use device::{select_device, DeviceChoice};

use crate::gguf::GgufFile;
use crate::kv_cache::{CacheType, KvCache};
use crate::model::{check_shapes, Config, Logits, Qwen2};
use crate::sampler::Sampler;
use crate::tokenizer::{ChatTemplate, TextStream, Tokenizer};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub model: PathBuf,
    pub device: DeviceChoice,
    /// Worker threads for the CPU kernels; 0 = physical cores.
    pub threads: usize,
    /// Context size in tokens; 0 = min(model context, 4096).
    pub ctx_size: usize,
    /// Prompt tokens per forward pass during prefill.
    pub batch_size: usize,
    pub cache_type: CacheType,
}

impl LoadOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        LoadOptions {
            model: model.into(),
            device: DeviceChoice::Cpu,
            threads: 0,
            ctx_size: 0,
            batch_size: 512,
            cache_type: CacheType::F32,
        }
    }
}

pub struct Engine {
    pub gguf: Arc<GgufFile>,
    pub model: Qwen2,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub ctx_size: usize,
    pub batch_size: usize,
    pub cache_type: CacheType,
    pub threads: usize,
    pub load_time: Duration,
    pool: rayon::ThreadPool,
}

impl Engine {
    pub fn load(opts: &LoadOptions) -> Result<Engine> {
        let t0 = Instant::now();
        let threads = match opts.threads {
            0 => num_cpus::get_physical().max(1),
            n => n,
        };
        // Candle's own CPU ops size their parallelism from this variable; set before any runs.
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("qwen-run-worker-{i}"))
            .build()
            .context("cannot start the worker threads")?;
        let device = select_device(opts.device)?;
        let gguf = Arc::new(GgufFile::open(&opts.model)?);
        let cfg = Config::from_gguf(&gguf)?;
        check_shapes(&gguf, &cfg)?;
        if opts.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let ctx_size = match opts.ctx_size {
            0 => cfg.context_length.min(4096),
            n if n > cfg.context_length => bail!(
                "--ctx-size {n} exceeds the model's trained context of {} tokens",
                cfg.context_length
            ),
            n => n,
        };
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let template = ChatTemplate::from_gguf(&gguf)?;
        let model = Qwen2::load(&gguf, &device, ctx_size)?;
        Ok(Engine {
            gguf,
            model,
            tokenizer,
            template,
            ctx_size,
            batch_size: opts.batch_size,
            cache_type: opts.cache_type,
            threads,
            load_time: t0.elapsed(),
            pool,
        })
    }

    pub fn config(&self) -> &Config {
        &self.model.cfg
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    pub fn device_name(&self) -> String {
        match self.device() {
            Device::Cpu => format!("CPU ({})", qwen_run_kernels::simd_name()),
            Device::Cuda(_) => "CUDA".to_string(),
            Device::Metal(_) => "Metal".to_string(),
        }
    }

    pub fn new_session(&self) -> Result<Session> {
        Ok(Session {
            cache: self.model.new_cache(self.ctx_size, self.cache_type)?,
            tokens: Vec::new(),
        })
    }

    /// Runs the model on `tokens` appended to the session; returns the logits of the last
    /// position (or every position) as rows of f32.
    pub fn forward(
        &self,
        session: &mut Session,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<Vec<f32>>> {
        let mut rows = Vec::new();
        for chunk in tokens.chunks(self.batch_size) {
            let logits = self
                .pool
                .install(|| self.model.forward(chunk, &mut session.cache, which))?;
            session.tokens.extend_from_slice(chunk);
            rows = match which {
                Logits::Last => logits.to_vec2::<f32>()?,
                Logits::All => {
                    rows.extend(logits.to_vec2::<f32>()?);
                    rows
                }
            };
        }
        Ok(rows)
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each piece of text as soon as
    /// it is complete; `on_text` returns false to stop early. Tokens the session already holds
    /// as a prefix of `prompt` are not processed again.
    pub fn generate(
        &self,
        session: &mut Session,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= self.ctx_size {
            bail!(
                "the prompt has {} tokens but the context holds {}; shorten the prompt or raise --ctx-size (the model supports up to {})",
                prompt.len(),
                self.ctx_size,
                self.config().context_length
            );
        }
        let t0 = Instant::now();
        // Reuse the cached common prefix, but always run at least the last prompt token to get
        // its logits.
        let reused = session.common_prefix(prompt).min(prompt.len() - 1);
        session.truncate(reused);
        let mut logits = self
            .forward(session, &prompt[reused..], Logits::Last)?
            .pop()
            .context("no logits")?;
        let prefill_time = t0.elapsed();
        let mut stream = TextStream::new();
        let mut generated = Vec::new();
        let mut history: Vec<u32> = prompt.to_vec();
        let mut finish = FinishReason::Length;
        let mut ttft = None;
        let budget = max_tokens.min(self.ctx_size - prompt.len());
        let t_decode = Instant::now();
        for step in 0..budget {
            let next = sampler.sample(&mut logits, &history);
            ttft.get_or_insert_with(|| t0.elapsed());
            generated.push(next);
            history.push(next);
            if self.tokenizer.is_eog(next) {
                finish = FinishReason::Stop;
                break;
            }
            let piece = stream.push(&self.tokenizer, next);
            if !piece.is_empty() && !on_text(&piece) {
                finish = FinishReason::Cancelled;
                break;
            }
            if step + 1 == budget {
                break;
            }
            logits = self
                .forward(session, &[next], Logits::Last)?
                .pop()
                .context("no logits")?;
        }
        let rest = stream.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
        if finish == FinishReason::Length && budget < max_tokens {
            finish = FinishReason::ContextFull;
        }
        Ok(Generation {
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            tokens: generated,
            prefill_time,
            decode_time: t_decode.elapsed(),
            ttft: ttft.unwrap_or_else(|| t0.elapsed()),
            finish,
        })
    }
}

/// One conversation's state: its KV cache and the tokens it holds.
pub struct Session {
    pub cache: KvCache,
    tokens: Vec<u32>,
}

impl Session {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.cache.truncate(len);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer.
    Stop,
    /// The token limit was reached.
    Length,
    /// The context filled up before the token limit.
    ContextFull,
    /// The caller stopped it.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the session's cache instead of being processed.
    pub reused_tokens: usize,
    /// Generated token ids, the end-of-generation token included if one was produced.
    pub tokens: Vec<u32>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub ttft: Duration,
    pub finish: FinishReason,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens that needed a forward pass (the first comes from prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}
