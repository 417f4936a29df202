//! The engine: a loaded model (its [`ModelRunner`], tokenizer, chat template and prompt cache) on
//! its own worker threads. [`Engine::step`] runs one model step over any number of sessions; the
//! [`scheduler`](crate::scheduler) builds generation on it, and [`Engine::generate`] runs the
//! scheduler with one slot for the CLI, the benchmark and the tests; [`Engine::embed`] pools a
//! text's final hidden states into an embedding.

mod device;
mod draft;
mod embed;
mod load;

pub use device::{gpu_memory, gpu_name, select_device, DeviceChoice};
pub use draft::{check_vocabulary, VOCAB_SIZE_TOLERANCE};
pub use embed::Pooling;
pub use load::{
    LoadOptions, DEFAULT_CACHE_RAM_MIB, DEFAULT_PREFIX_BLOCK, DEFAULT_PROMPT_CACHE_MAX_MIB,
};

use crate::gguf::GgufFile;
use crate::grammar::Grammars;
use crate::kv_cache::CacheType;
use crate::model::{Config, Head, Logits, ModelRunner, Placement, Sequence};
use crate::prefix_cache::PromptCache;
use crate::sampler::Sampler;
use crate::scheduler::{Event, Held, Output, Request, Scheduler};
use crate::speculative::{SpecConfig, StepCosts};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use anyhow::{bail, Result};
use smallvec::SmallVec;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::kv_cache::Session;
pub use crate::prefix_cache::CacheSource;
pub use crate::scheduler::{FinishReason, Generation};

pub struct Engine {
    pub gguf: Arc<GgufFile>,
    pub runner: ModelRunner,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub ctx_size: usize,
    /// Prompt tokens per step when nothing else runs (`--batch-size`).
    pub batch_size: usize,
    pub threads: usize,
    pub load_time: Duration,
    pool: rayon::ThreadPool,
    /// Held by the thread that runs a step, outside the pool: see [`Engine::run_pass`].
    passes: Mutex<()>,
    prompt_cache: PromptCache,
    /// Built on first use: most runs never constrain their output.
    grammars: std::sync::OnceLock<Result<Grammars, String>>,
    /// How generations speculate unless their request says otherwise.
    pub spec: SpecConfig,
    /// Step times by tokens per step, for sizing drafts.
    step_costs: StepCosts,
    /// The draft model of speculative decoding (`-md`), with its own steps and step costs.
    draft: Option<Box<Engine>>,
}

/// One session's part of a step: the tokens to append and which of them need logits.
pub struct Step<'a> {
    pub session: &'a mut Session,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

impl Engine {
    /// This engine running every step in tensor ops: the tests check the host pass against it.
    #[cfg(feature = "test-hooks")]
    pub fn into_tensor_ops(mut self) -> Engine {
        self.runner = self.runner.into_tensor_ops();
        self
    }

    pub fn config(&self) -> &Config {
        self.runner.config()
    }

    /// The context size for reports, with the rope scaling that allows it when there is one.
    pub fn ctx_report(&self) -> String {
        match self.config().rope.scaling_note() {
            Some(note) => format!("{} ({note})", self.ctx_size),
            None => self.ctx_size.to_string(),
        }
    }

    pub fn placement(&self) -> &Placement {
        self.runner.placement()
    }

    pub fn cache_type_k(&self) -> CacheType {
        self.runner.cache_types().0
    }

    pub fn cache_type_v(&self) -> CacheType {
        self.runner.cache_types().1
    }

    pub fn prompt_cache(&self) -> &PromptCache {
        &self.prompt_cache
    }

    /// How long this engine's steps take, by tokens per step.
    pub fn step_costs(&self) -> &StepCosts {
        &self.step_costs
    }

    /// The model's vocabulary as the constrained decoder sees it (built on first use).
    pub fn grammars(&self) -> Result<&Grammars> {
        self.grammars
            .get_or_init(|| Grammars::new(&self.tokenizer).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("constrained decoding is unavailable: {e}"))
    }

    pub fn new_session(&self) -> Result<Session> {
        Ok(Session::new(self.runner.new_cache(self.ctx_size)?))
    }

    /// How this engine's KV is laid out in files (the prompt cache's, a saved slot's), in blocks
    /// of `block` tokens: reads the model file's identity.
    pub fn kv_file_shape(&self, block: usize) -> Result<crate::prefix_cache::Shape> {
        let c = self.config();
        let identity = crate::prefix_cache::model_identity(self.gguf.paths())?;
        Ok(crate::prefix_cache::Shape {
            model: load::rope_keyed(identity, c),
            type_k: self.cache_type_k(),
            type_v: self.cache_type_v(),
            layers: c.n_layers,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            block,
        })
    }

    /// Bytes of KV per token, all layers, in this engine's cache types.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = self.config();
        c.n_layers
            * c.n_kv_heads
            * (self.cache_type_k().row_bytes(c.head_dim)
                + self.cache_type_v().row_bytes(c.head_dim))
    }

    /// Runs one forward pass on the engine's threads. When the CPU has part of the model, the
    /// other threads spin through the pass instead of sleeping between its parallel loops
    /// (waking them costs about as much as a small matmul).
    ///
    /// One pass at a time enters the pool, and callers wait for their turn here, on their own
    /// thread. A second pass let in would be run by a worker as a stolen job, nested inside a
    /// parallel loop of the first, and wait there for the model's buffers, which the first holds
    /// while it waits for that loop: a deadlock (two tests sharing one engine hit it).
    fn run_pass<R>(&self, pass: impl FnOnce() -> R + Send) -> R
    where
        R: Send,
    {
        let _one_pass = self.passes.lock().unwrap_or_else(|e| e.into_inner());
        self.pool.install(|| {
            if self.placement().uses_cpu() {
                qwen_run_kernels::pool::with_spinning_workers(pass)
            } else {
                pass()
            }
        })
    }

    /// Runs one model step on the engine's threads: `batch[i].tokens` appended to
    /// `batch[i].session`, the weights read once for all. Writes the logits each asks for into
    /// `logits`, `[rows, vocab]`, in order. Allocates nothing on the CPU for up to 8 sessions once
    /// the buffers have grown.
    pub fn step(&self, batch: &mut [Step], logits: &mut Vec<f32>) -> Result<()> {
        let mut seqs: SmallVec<[Sequence; 8]> = batch
            .iter_mut()
            .map(|s| Sequence {
                tokens: s.tokens,
                cache: &mut s.session.cache,
                logits: s.logits,
            })
            .collect();
        let started = std::time::Instant::now();
        self.run_pass(|| self.runner.step(&mut seqs, Head::Logits, logits))?;
        let tokens = seqs.iter().map(|s| s.tokens.len()).sum();
        self.step_costs.record(tokens, started.elapsed());
        drop(seqs);
        for s in batch.iter_mut() {
            s.session.extend(s.tokens);
        }
        Ok(())
    }

    /// Runs `tokens` appended to the session, in steps of at most `--batch-size` tokens, and
    /// returns the logits of the last position (or every position) as rows of f32.
    pub fn forward(
        &self,
        session: &mut Session,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        let vocab = self.config().vocab_size;
        let mut rows = Vec::new();
        let mut logits = Vec::new();
        for chunk in tokens.chunks(self.batch_size) {
            let mut step = [Step {
                session: &mut *session,
                tokens: chunk,
                logits: which,
            }];
            self.step(&mut step, &mut logits)?;
            if which == Logits::Last {
                rows.clear();
            }
            rows.extend(logits.chunks_exact(vocab).map(<[f32]>::to_vec));
        }
        Ok(rows)
    }

    /// Fails unless `prompt` can be generated from: not empty, and room left after it.
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
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
        Ok(())
    }

    /// Generates a continuation of `prompt` on `session` (the scheduler with one slot), calling
    /// `on_text` with each piece of text as soon as it is complete; `on_text` returns false to
    /// stop early. Tokens the session (or the prompt cache) already holds as a prefix of `prompt`
    /// are not run again.
    pub fn generate(
        &self,
        session: &mut Session,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generate_request(
            session,
            Request::new(prompt.to_vec(), max_tokens, Held::Borrowed(sampler)),
            on_text,
        )
    }

    /// [`generate`](Self::generate) with every request option (stop strings, a guide).
    pub fn generate_request(
        &self,
        session: &mut Session,
        request: Request,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut result = None;
        {
            let mut scheduler = Scheduler::on_session(self, session);
            scheduler.admit(
                request,
                Box::new(Callback {
                    on_text,
                    result: &mut result,
                }),
            );
            scheduler.run_to_completion();
        }
        result.unwrap_or_else(|| bail!("the generation ended without a result"))
    }
}

/// [`Engine::generate`]'s output: text to a closure, the end into `result`.
struct Callback<'r, F> {
    on_text: F,
    result: &'r mut Option<Result<Generation>>,
}

impl<F: FnMut(&str) -> bool> Output for Callback<'_, F> {
    fn send(&mut self, event: Event<'_>) -> bool {
        match event {
            Event::Started | Event::Logprob(_) => true,
            Event::Text(t) => (self.on_text)(t),
            Event::Done(g) => {
                *self.result = Some(Ok(g));
                true
            }
            Event::Error(e) => {
                *self.result = Some(Err(anyhow::anyhow!(e)));
                true
            }
        }
    }
}
