//! The models one server serves (`-m` given several times, or a directory of GGUF files): which
//! are loaded, loading on first use, unloading when their keep-alive runs out or to make room
//! under `--max-loaded` (least recently used first), and which one `model: "auto"` picks
//! ([`routing`](super::routing) has the rule).
//!
//! A loaded model is a [`LoadedModel`]: its engine and its scheduler thread. Requests hold it
//! through a [`ModelLease`]; a model is idle when nothing but the pool holds it, and only idle
//! models are unloaded, so a request never loses its model half way. Dropping the pool's handle
//! ends the scheduler thread, which frees the engine.

use super::error::ApiError;
use super::metrics::Metrics;
use super::output::{Output, Served};
use super::protocol::{GenRequest, Job, Place, SlotAction, SlotJob, SlotReply, Task, WorkerEvent};
use super::response_cache::{CacheKey, ResponseCache};
use super::routing::{RouteFacts, RouteRule};
use super::worker;
use crate::engine::{Engine, LoadOptions, Pooling};
use crate::gguf::GgufFile;
use crate::scheduler::{ChunkPolicy, SlotState};
use anyhow::{bail, Context, Result};
use axum::http::StatusCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::unbounded_channel;

/// How long an idle model stays loaded; None: for good.
pub type KeepAlive = Option<Duration>;

/// The longest keep-alive taken as a duration, in seconds (ten years): longer ones are refused
/// rather than overflowing the clock (-1 keeps a model for good).
const MAX_KEEP_ALIVE_SECS: f64 = 10.0 * 365.0 * 86400.0;

/// Parses a keep-alive as Ollama takes it: seconds as a number, or a duration such as "30s",
/// "5m", "1h", "500ms"; negative means for good, 0 means unload as soon as idle.
pub fn parse_keep_alive(v: &serde_json::Value) -> Result<KeepAlive, String> {
    let bad = || {
        format!("keep_alive {v} is not a duration: use seconds (300), a duration (\"5m\", \"1h\", \"30s\"), 0 to unload when idle, or -1 to keep the model loaded")
    };
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        serde_json::Value::String(s) => {
            let s = s.trim();
            let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
                Some(i) => s.split_at(i),
                None => (s, "s"),
            };
            let n: f64 = num.trim().parse().map_err(|_| bad())?;
            n * match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    };
    if !secs.is_finite() {
        return Err(bad());
    }
    if secs > MAX_KEEP_ALIVE_SECS {
        return Err(format!(
            "keep_alive {v} is longer than ten years: use -1 to keep the model loaded for good"
        ));
    }
    Ok((secs >= 0.0).then(|| Duration::from_secs_f64(secs)))
}

/// A request's optional `keep_alive` field; a bad one is a 400.
pub fn keep_alive_field(v: &Option<serde_json::Value>) -> Result<Option<KeepAlive>, ApiError> {
    v.as_ref()
        .map(parse_keep_alive)
        .transpose()
        .map_err(ApiError::bad_request)
}

/// Limits and switches that apply to every model of the server.
#[derive(Clone)]
pub struct ServeOptions {
    pub parallel: usize,
    pub queue_size: usize,
    pub queue_timeout: Duration,
    /// Cap on generated tokens per request (0: only the context limits it).
    pub max_tokens: usize,
    pub max_loaded: usize,
    pub keep_alive: KeepAlive,
    /// Answers kept by the response cache (0: off).
    pub response_cache: usize,
    pub route: RouteRule,
    /// Prompt tokens a request may run per step while others decode.
    pub prefill_chunk: usize,
    /// The embedding endpoints answer (`--embedding`); without it they are refused.
    pub embeddings: bool,
    /// How embeddings pool the hidden states (`--pooling`); None: as each model file says.
    pub pooling: Option<Pooling>,
    /// Where `POST /slots/{id}?action=save|restore` keep their files (`--slot-save-path`);
    /// None: those actions are refused.
    pub slot_save_path: Option<std::path::PathBuf>,
}

/// One model the server can serve, loaded or not.
pub struct ModelSpec {
    pub name: String,
    /// Other names accepted for it (the file stem, the GGUF's general.name).
    pub aliases: Vec<String>,
    pub opts: LoadOptions,
    /// The context length the model was trained for.
    pub context_length: usize,
    /// What the model lists show without loading it; the file's metadata itself is not kept
    /// while the model is unloaded (a directory of models would hold every vocabulary).
    pub file_size: u64,
    /// `general.file_type`, llama.cpp's number for the quantization mix.
    pub file_type: Option<u64>,
    pub parameters: usize,
}

/// A model file `serve` is given: named by -m, or found in an -m directory (a bad file there is
/// skipped with a message, so one planted file cannot stop the server).
pub struct ModelSource {
    pub load: LoadOptions,
    pub from_directory: bool,
}

impl ModelSpec {
    /// Opens and checks the file, so that a bad one is reported at startup, not on first use.
    pub fn open(opts: LoadOptions, name: Option<String>) -> Result<ModelSpec> {
        let gguf = GgufFile::open(&opts.model)?;
        let config = crate::model::Config::from_gguf(&gguf)
            .with_context(|| format!("{} is not a usable model", opts.model.display()))?;
        let stem = opts
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let mut aliases = vec![stem.clone()];
        if let Some(n) = gguf
            .get("general.name")
            .and_then(crate::gguf::Value::as_str)
        {
            aliases.push(n.to_string());
        }
        Ok(ModelSpec {
            name: name.unwrap_or(stem),
            aliases,
            opts,
            context_length: config.context_length,
            file_size: gguf.file_size(),
            file_type: gguf
                .get("general.file_type")
                .and_then(crate::gguf::Value::as_u64),
            parameters: gguf.tensors.iter().map(|t| t.elements()).sum(),
        })
    }

    /// The chat template the model renders with (for /api/show): the command line's, or the
    /// file's, read again from the file.
    pub fn chat_template(&self) -> Result<String> {
        if let Some(t) = &self.opts.chat_template {
            return Ok(t.source.to_string());
        }
        let gguf = GgufFile::open(&self.opts.model)?;
        Ok(gguf
            .get("tokenizer.chat_template")
            .and_then(crate::gguf::Value::as_str)
            .unwrap_or("")
            .to_string())
    }

    /// Whether a request's `model` names this one: its name or an alias, in any case, with or
    /// without an Ollama-style `:latest` tag.
    fn answers_to(&self, asked: &str) -> bool {
        let base = asked.strip_suffix(":latest").unwrap_or(asked);
        let same = |a: &str| a.eq_ignore_ascii_case(asked) || a.eq_ignore_ascii_case(base);
        same(&self.name) || self.aliases.iter().any(|a| same(a))
    }
}

/// A loaded model: its engine, and the queue of its scheduler thread.
pub struct LoadedModel {
    pub name: String,
    pub engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    /// None only while it is being dropped.
    queue: Option<Sender<Task>>,
    /// Why its generation thread stopped, if it did: the model is then reloaded on its next
    /// request.
    failed: Arc<Mutex<Option<String>>>,
    /// The generation and grammar threads, joined on drop, so that an unloaded model's memory is
    /// free before another load starts.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Requests generating or queued, and how many may be (--parallel + --queue-size).
    places: Arc<AtomicUsize>,
    capacity: usize,
    cache: Option<Arc<ResponseCache>>,
    max_tokens: usize,
    queue_timeout: Duration,
    /// What each generation slot is doing, as its thread last published it (`GET /slots`).
    pub slots: Arc<Mutex<Vec<SlotState>>>,
    /// How its embeddings pool; None: the server was started without `--embedding`.
    pub pooling: Option<Pooling>,
    /// When the last request let go of the model.
    last_used: Mutex<Instant>,
    keep_alive: Mutex<KeepAlive>,
}

impl LoadedModel {
    fn start(
        engine: Engine,
        name: String,
        opts: &ServeOptions,
        shared: &Shared,
    ) -> Result<LoadedModel> {
        let pooling = match (opts.embeddings, opts.pooling) {
            (false, _) => None,
            (true, Some(p)) => Some(p),
            (true, None) => Some(Pooling::of_model(&engine.gguf)?),
        };
        let engine = Arc::new(engine);
        let (queue, jobs) = channel();
        let failed = Arc::new(Mutex::new(None));
        let slots = Arc::new(Mutex::new(vec![SlotState::default(); opts.parallel.max(1)]));
        let mut threads = Vec::new();
        {
            let board = slots.clone();
            let engine = engine.clone();
            let metrics = shared.metrics.clone();
            let parallel = opts.parallel;
            let chunks = ChunkPolicy {
                alone: engine.batch_size,
                while_decoding: opts.prefill_chunk.min(engine.batch_size),
            };
            // The constrained decoder's view of the vocabulary takes a fraction of a second to
            // build: built now, in the background, a structured-output request does not wait.
            let vocab = engine.clone();
            threads.extend(
                std::thread::Builder::new()
                    .name("qwen-run-grammar".into())
                    .spawn(move || {
                        let _ = vocab.grammars();
                    })
                    .ok(),
            );
            let (failed, name) = (failed.clone(), name.clone());
            let worker = std::thread::Builder::new()
                .name("qwen-run-generate".into())
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| {
                        worker::run(engine, metrics, jobs, parallel, chunks, board)
                    });
                    if let Err(p) = std::panic::catch_unwind(run) {
                        let why = crate::scheduler::panic_message(&p);
                        eprintln!("[qwen-run] the generation thread of '{name}' failed ({why}); the model is reloaded on its next request");
                        *lock(&failed) = Some(why);
                    }
                })
                .context("cannot start the generation thread")?;
            threads.push(worker);
        }
        Ok(LoadedModel {
            name,
            engine,
            metrics: shared.metrics.clone(),
            queue: Some(queue),
            failed,
            threads,
            places: Arc::new(AtomicUsize::new(0)),
            capacity: opts.parallel + opts.queue_size,
            cache: shared.cache.clone(),
            max_tokens: opts.max_tokens,
            queue_timeout: opts.queue_timeout,
            slots,
            pooling,
            last_used: Mutex::new(Instant::now()),
            keep_alive: Mutex::new(opts.keep_alive),
        })
    }

    /// Why its generation thread stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failed).clone()
    }

    /// When it will be unloaded if no request comes; None: never.
    pub fn expires(&self) -> Option<Instant> {
        let last = *lock(&self.last_used);
        lock(&self.keep_alive).and_then(|k| last.checked_add(k))
    }

    /// Tokenizes a rendered prompt and checks it against the context.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        super::api::off_runtime(|| self.fits(self.engine.tokenizer.encode(text)))
    }

    /// The fill-in-the-middle prompt for the text between `prefix` and `suffix`, checked
    /// against the context.
    pub fn fill_in_middle(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>, ApiError> {
        super::api::off_runtime(|| self.fits(self.engine.tokenizer.fill_in_middle(prefix, suffix)))
    }

    /// A prompt given as token ids, checked against the vocabulary and the context.
    pub fn check_tokens(&self, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
        let vocab = self.engine.config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::bad_request(format!(
                "token id {bad} in the prompt is not in this model's vocabulary (0 to {})",
                vocab - 1
            )));
        }
        self.fits(Ok(ids))
    }

    fn fits(&self, tokens: anyhow::Result<Vec<u32>>) -> Result<Vec<u32>, ApiError> {
        let tokens = tokens.map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        if tokens.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        let ctx = self.engine.ctx_size;
        if tokens.len() >= ctx {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens but the context holds {ctx}; shorten the prompt or restart the server with a larger --ctx-size (the model supports up to {})",
                tokens.len(),
                self.engine.config().context_length
            )));
        }
        Ok(tokens)
    }

    /// The embeddings of `inputs` (token ids in the vocabulary, each within the context), one
    /// list per input: one pooled vector, or one per token without pooling; not normalized.
    /// Each input runs as a sequence of its own, in steps shared in turn with the generation
    /// thread's; the request holds one of the model's places meanwhile (429 when none is free).
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<Vec<f32>>>, ApiError> {
        let Some(pooling) = self.pooling else {
            return Err(embeddings_off());
        };
        let Some(_place) = Place::take(&self.places, self.capacity) else {
            return Err(busy());
        };
        let engine = &self.engine;
        super::api::off_runtime(|| {
            inputs
                .iter()
                .map(|tokens| engine.embed(tokens, pooling))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
    }

    /// The token budget for a request asking for `asked` (None or negative: as many as fit).
    pub fn budget(&self, asked: Option<i64>) -> usize {
        let asked = match asked {
            Some(n) if n >= 0 => n as usize,
            _ => usize::MAX,
        };
        match self.max_tokens {
            0 => asked,
            cap => asked.min(cap),
        }
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // Closing the queue ends the generation thread once its running requests are done (an
        // idle model has none).
        self.queue = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A request's hold on a loaded model; `route` says why `model: "auto"` chose it.
pub struct ModelLease {
    model: Arc<LoadedModel>,
    pub route: Option<String>,
}

impl std::ops::Deref for ModelLease {
    type Target = LoadedModel;
    fn deref(&self) -> &LoadedModel {
        &self.model
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        *lock(&self.model.last_used) = Instant::now();
    }
}

impl ModelLease {
    fn served(self) -> Served {
        Served {
            name: self.name.clone(),
            route: self.route.clone(),
            hold: Box::new(self),
        }
    }

    /// Has the model's thread save, restore or erase slot `slot`'s session between steps; waits
    /// at most --queue-timeout for it (while every slot is busy it waits as a request does).
    pub async fn slot_job(&self, slot: usize, action: SlotAction) -> Result<SlotReply, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = SlotJob { slot, action, tx };
        if self
            .queue
            .as_ref()
            .is_none_or(|q| q.send(Task::Slot(job)).is_err())
        {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the generation worker has stopped",
            ));
        }
        match tokio::time::timeout(self.queue_timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(e))) => Err(ApiError::bad_request(e)),
            Ok(Err(_)) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the generation worker has stopped",
            )),
            Err(_) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("slot {slot} stayed busy past --queue-timeout"),
            )),
        }
    }

    /// Queues a generation and waits until a slot takes it. The answer comes from the response
    /// cache when it has one; a full queue gets 429, a wait past --queue-timeout 503.
    pub async fn submit(self, req: GenRequest) -> Result<Output, ApiError> {
        super::api::check_stops(&req.stop)?;
        let cache_on = self.cache.is_some().then_some(false);
        let cache = self
            .cache
            .clone()
            .and_then(|c| CacheKey::of(&self.name, &req).map(|k| (c, k)));
        if let Some((c, key)) = &cache {
            if let Some(hit) = c.get(key) {
                self.metrics
                    .response_cache_hits
                    .fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = unbounded_channel();
                for t in &hit.texts {
                    let _ = tx.send(WorkerEvent::Text(t.clone()));
                }
                let _ = tx.send(WorkerEvent::Done(hit.summary.clone()));
                return Ok(Output::new(rx, self.served(), None, Some(true)));
            }
        }
        let Some(place) = Place::take(&self.places, self.capacity) else {
            return Err(busy());
        };
        let (tx, mut rx) = unbounded_channel();
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            req,
            tx,
            enqueued: Instant::now(),
            place,
        };
        if self
            .queue
            .as_ref()
            .is_none_or(|q| q.send(Task::Generate(Box::new(job))).is_err())
        {
            self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the generation worker has stopped",
            ));
        }
        let timeout = self.queue_timeout;
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(WorkerEvent::Started)) => Ok(Output::new(rx, self.served(), cache, cache_on)),
            Ok(Some(first)) => {
                // An answer without a start (an error at admission): hand it on as it is.
                let (tx, rx2) = unbounded_channel();
                let _ = tx.send(first);
                Ok(Output::new(rx2, self.served(), None, cache_on))
            }
            Ok(None) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the generation worker stopped before taking the request",
            )),
            Err(_) => {
                // Dropping `rx` withdraws the request: the scheduler skips it.
                self.metrics.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the request waited {:.1} s for a generation slot without getting one (--queue-timeout); the server is overloaded, retry later",
                        timeout.as_secs_f64()
                    ),
                ))
            }
        }
    }
}

fn busy() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "the server is busy: all generation slots are taken and the request queue is full (see --parallel and --queue-size); retry later",
    )
}

/// The answer of the embedding endpoints on a server started without `--embedding`, as
/// llama-server answers (501).
pub fn embeddings_off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "this server does not compute embeddings; restart `qwen-run serve` with --embedding (and --pooling mean|last|cls|none if the model file does not say how it pools)",
    )
}

/// What every loaded model shares.
struct Shared {
    metrics: Arc<Metrics>,
    cache: Option<Arc<ResponseCache>>,
}

struct Entry {
    spec: ModelSpec,
    loaded: Mutex<Option<Arc<LoadedModel>>>,
}

/// A model's state as the model lists show it.
pub struct ModelStatus<'a> {
    pub spec: &'a ModelSpec,
    pub loaded: Option<Arc<LoadedModel>>,
    /// Being loaded now (first load, reload, or load on demand).
    pub loading: bool,
}

pub struct ModelPool {
    entries: Vec<Entry>,
    opts: ServeOptions,
    shared: Shared,
    /// Indexes of the small and large model of `model: "auto"`.
    small: usize,
    large: usize,
    /// One load at a time, so that two loads never both take the last free place.
    loading: tokio::sync::Mutex<()>,
    /// The index of the model being loaded, while one is.
    loading_now: Mutex<Option<usize>>,
    /// Names given to served models by Ollama's `/api/copy`, with the model each names.
    copies: Mutex<Vec<(String, usize)>>,
}

/// Names `/api/copy` may add, all models together.
pub const MAX_COPIES: usize = 256;

/// Whether `name` is `asked`, in any case, with or without Ollama's `:latest` tag on either.
fn same_name(name: &str, asked: &str) -> bool {
    let base = |n: &str| n.strip_suffix(":latest").unwrap_or(n).to_ascii_lowercase();
    base(name) == base(asked)
}

impl ModelPool {
    pub fn new(specs: Vec<ModelSpec>, opts: ServeOptions, metrics: Arc<Metrics>) -> Result<Self> {
        if specs.is_empty() {
            bail!("no model to serve");
        }
        for (i, a) in specs.iter().enumerate() {
            if let Some(b) = specs[..i]
                .iter()
                .find(|b| b.name.eq_ignore_ascii_case(&a.name))
            {
                bail!(
                    "two models are served as '{}' ({} and {}); rename one file",
                    a.name,
                    b.opts.model.display(),
                    a.opts.model.display()
                );
            }
        }
        let by_size = |pick_max: bool| {
            let sizes = specs.iter().map(|s| s.file_size).enumerate();
            if pick_max {
                sizes.max_by_key(|&(_, s)| s).map_or(0, |(i, _)| i)
            } else {
                sizes.min_by_key(|&(_, s)| s).map_or(0, |(i, _)| i)
            }
        };
        let find = |name: &Option<String>, flag: &str, default: usize| -> Result<usize> {
            match name {
                None => Ok(default),
                Some(n) => specs.iter().position(|s| s.answers_to(n)).with_context(|| {
                    format!(
                        "{flag} '{n}' is not among the served models ({})",
                        specs
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
            }
        };
        let small = find(&opts.route.small, "--route-small", by_size(false))?;
        let large = find(&opts.route.large, "--route-large", by_size(true))?;
        let cache =
            (opts.response_cache > 0).then(|| Arc::new(ResponseCache::new(opts.response_cache)));
        Ok(ModelPool {
            entries: specs
                .into_iter()
                .map(|spec| Entry {
                    spec,
                    loaded: Mutex::new(None),
                })
                .collect(),
            opts,
            shared: Shared { metrics, cache },
            small,
            large,
            loading: tokio::sync::Mutex::new(()),
            loading_now: Mutex::new(None),
            copies: Mutex::new(Vec::new()),
        })
    }

    /// Whether the embedding endpoints answer (`--embedding`).
    pub fn embeddings(&self) -> bool {
        self.opts.embeddings
    }

    /// Generation slots per loaded model (`--parallel`).
    pub fn parallel(&self) -> usize {
        self.opts.parallel
    }

    /// The model a request without a `model` field gets: the first one given.
    pub fn default_model(&self) -> &ModelSpec {
        &self.entries[0].spec
    }

    pub fn statuses(&self) -> Vec<ModelStatus<'_>> {
        let loading = *lock(&self.loading_now);
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| ModelStatus {
                spec: &e.spec,
                loaded: lock(&e.loaded).clone(),
                loading: loading == Some(i),
            })
            .collect()
    }

    /// The model a request names, if it is loaded and working, without loading it or counting
    /// the look as a use (keep-alive runs on): for the endpoints that only report.
    /// `--slot-save-path`.
    pub fn slot_save_path(&self) -> Option<&std::path::Path> {
        self.opts.slot_save_path.as_deref()
    }

    pub fn peek(
        &self,
        asked: Option<&str>,
    ) -> Result<(&ModelSpec, Option<Arc<LoadedModel>>), ApiError> {
        let i = self.index(self.any_name_if_one(asked))?;
        let loaded = self.loaded(i).filter(|m| m.failure().is_none());
        Ok((&self.entries[i].spec, loaded))
    }

    /// The name the OpenAI and llama-server endpoints look up: with one model served, whatever
    /// the request names is that model (as llama-server answers any `model`; clients often send
    /// a fixed one such as "gpt-4o-mini"), and the response names the real one. With several,
    /// the name as given, so that an unknown one is a 404 listing them.
    pub fn any_name_if_one<'a>(&self, asked: Option<&'a str>) -> Option<&'a str> {
        asked.filter(|_| self.entries.len() > 1)
    }

    /// The model a request names: empty for the default, a name or alias, or "auto".
    pub fn find(&self, asked: Option<&str>) -> Result<&ModelSpec, ApiError> {
        self.index(asked).map(|i| &self.entries[i].spec)
    }

    fn index(&self, asked: Option<&str>) -> Result<usize, ApiError> {
        let m = asked.unwrap_or("").trim();
        if m.is_empty() {
            return Ok(0);
        }
        self.entries
            .iter()
            .position(|e| e.spec.answers_to(m))
            .or_else(|| {
                lock(&self.copies)
                    .iter()
                    .find(|(name, _)| same_name(name, m))
                    .map(|&(_, i)| i)
            })
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "model '{m}' not found; this server serves {} (or \"auto\" to let it choose)",
                        self.entries
                            .iter()
                            .map(|e| format!("'{}'", e.spec.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }

    /// Ollama's `/api/copy`: `destination` becomes another name of the model `source` names
    /// (replacing a copy of that name). It must not be a served model's own name.
    pub fn copy(&self, source: &str, destination: &str) -> Result<(), ApiError> {
        let i = self.index(Some(source))?;
        let name = destination.trim();
        if name.is_empty()
            || name.len() > 256
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ApiError::bad_request(format!(
                "destination '{destination}' is not a model name: 1 to 256 characters, no spaces or control characters"
            )));
        }
        if self.entries.iter().any(|e| e.spec.answers_to(name)) {
            return Err(ApiError::bad_request(format!(
                "'{name}' already names a served model; copy to a new name"
            )));
        }
        let mut copies = lock(&self.copies);
        copies.retain(|(n, _)| !same_name(n, name));
        if copies.len() >= MAX_COPIES {
            return Err(ApiError::bad_request(format!(
                "the server holds {MAX_COPIES} copied names already; delete one first (DELETE /api/delete)"
            )));
        }
        copies.push((name.to_string(), i));
        Ok(())
    }

    /// Ollama's `/api/delete`: removes a name `/api/copy` made. A served model's own name is
    /// refused: the files `serve` was started with stay (it deletes no file).
    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        let mut copies = lock(&self.copies);
        let before = copies.len();
        copies.retain(|(n, _)| !same_name(n, name));
        if copies.len() < before {
            return Ok(());
        }
        drop(copies);
        let i = self.index(Some(name))?;
        Err(ApiError::bad_request(format!(
            "'{name}' is the model file {} that this server was started with; /api/delete removes only names made by /api/copy, and qwen-run deletes no model file (remove it yourself and restart the server)",
            self.entries[i].spec.opts.model.display()
        )))
    }

    /// The names `/api/copy` made, each with the model it names.
    pub fn copies(&self) -> Vec<(String, &ModelSpec)> {
        lock(&self.copies)
            .iter()
            .map(|(n, i)| (n.clone(), &self.entries[*i].spec))
            .collect()
    }

    /// Loads the default model now, at startup.
    pub fn preload_default(&self) -> Result<()> {
        *lock(&self.entries[0].loaded) = Some(Arc::new(self.load(0)?));
        Ok(())
    }

    fn load(&self, i: usize) -> Result<LoadedModel> {
        struct Loading<'a>(&'a Mutex<Option<usize>>);
        impl Drop for Loading<'_> {
            fn drop(&mut self) {
                *lock(self.0) = None;
            }
        }
        *lock(&self.loading_now) = Some(i);
        let _loading = Loading(&self.loading_now);
        let spec = &self.entries[i].spec;
        let engine = Engine::load(&spec.opts)?;
        engine.check_kv_fits(self.opts.parallel)?;
        eprintln!(
            "[qwen-run] loaded '{}' ({}) in {:.2} s | {} | {} threads | ctx {}",
            spec.name,
            spec.opts.model.display(),
            engine.load_time.as_secs_f64(),
            engine.device_name(),
            engine.threads,
            engine.ctx_report()
        );
        if let Some(gpu) = engine.gpu_report() {
            eprintln!("[qwen-run] GPU {gpu}");
        }
        self.shared
            .metrics
            .model_loads
            .fetch_add(1, Ordering::Relaxed);
        LoadedModel::start(engine, spec.name.clone(), &self.opts, &self.shared)
    }

    /// The model for a request, loaded if need be; `keep_alive` (the request's) replaces the
    /// model's keep-alive from now on, as in Ollama.
    pub async fn acquire(
        self: &Arc<Self>,
        asked: Option<&str>,
        facts: &RouteFacts,
        keep_alive: Option<KeepAlive>,
    ) -> Result<ModelLease, ApiError> {
        let (i, route) = if asked.is_some_and(|m| m.trim().eq_ignore_ascii_case("auto")) {
            let (large, why) = self.opts.route.pick(facts);
            (if large { self.large } else { self.small }, Some(why))
        } else {
            (self.index(asked)?, None)
        };
        let model = match self.loaded(i) {
            Some(m) if m.failure().is_none() => m,
            _ => self.load_on_demand(i).await?,
        };
        if let Some(k) = keep_alive {
            *lock(&model.keep_alive) = k;
        }
        Ok(ModelLease { model, route })
    }

    fn loaded(&self, i: usize) -> Option<Arc<LoadedModel>> {
        lock(&self.entries[i].loaded).clone()
    }

    /// Loads model `i` in a task of its own, which runs to its end even when the request that
    /// started it goes away; requests that come meanwhile wait for it instead of loading again.
    async fn load_on_demand(self: &Arc<Self>, i: usize) -> Result<Arc<LoadedModel>, ApiError> {
        let pool = self.clone();
        tokio::spawn(async move { pool.load_one_at_a_time(i).await })
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the model load failed: {e}"),
                )
            })?
    }

    async fn load_one_at_a_time(self: &Arc<Self>, i: usize) -> Result<Arc<LoadedModel>, ApiError> {
        let _one_at_a_time = self.loading.lock().await;
        match self.loaded(i) {
            Some(m) if m.failure().is_none() => return Ok(m), // Loaded meanwhile.
            Some(_) => {
                let failed = lock(&self.entries[i].loaded).take();
                let name = &self.entries[i].spec.name;
                eprintln!("[qwen-run] reloading '{name}' after its generation thread failed");
                drop_off_runtime(failed);
            }
            None => {}
        }
        self.make_room().await?;
        let pool = self.clone();
        let name = self.entries[i].spec.name.clone();
        let model = tokio::task::spawn_blocking(move || pool.load(i))
            .await
            .map_err(|e| anyhow::anyhow!("the load failed: {e}"))
            .and_then(|r| r)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot load model '{name}': {e:#}"),
                )
            })?;
        let model = Arc::new(model);
        *lock(&self.entries[i].loaded) = Some(model.clone());
        Ok(model)
    }

    /// Unloads the least recently used idle models until one more fits under --max-loaded,
    /// waiting (up to --queue-timeout) for a busy one to finish when none is idle.
    async fn make_room(&self) -> Result<(), ApiError> {
        let deadline = Instant::now() + self.opts.queue_timeout;
        loop {
            let mut by_age: Vec<(Instant, usize)> = (0..self.entries.len())
                .filter_map(|i| self.loaded(i).map(|m| (*lock(&m.last_used), i)))
                .collect();
            if by_age.len() < self.opts.max_loaded.max(1) {
                return Ok(());
            }
            by_age.sort();
            let freed = by_age
                .iter()
                .any(|&(_, i)| self.unload_if_idle(i, "to make room under --max-loaded"));
            if !freed {
                if Instant::now() >= deadline {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "all {} loaded models are busy and --max-loaded {} allows no more; retry later",
                            by_age.len(),
                            self.opts.max_loaded
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Unloads model `i` if nothing but the pool holds it. True if it did.
    fn unload_if_idle(&self, i: usize, why: &str) -> bool {
        let mut slot = lock(&self.entries[i].loaded);
        let idle = slot.as_ref().is_some_and(|m| Arc::strong_count(m) == 1);
        if idle {
            let unloaded = slot.take();
            drop(slot);
            drop_off_runtime(unloaded);
            self.shared
                .metrics
                .model_unloads
                .fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "[qwen-run] unloaded '{}' ({why})",
                self.entries[i].spec.name
            );
        }
        idle
    }

    /// Unloads the model a request names, once idle (Ollama's `keep_alive: 0` with no prompt).
    pub fn unload(&self, asked: Option<&str>) -> Result<(), ApiError> {
        let i = self.index(asked)?;
        if let Some(m) = self.loaded(i) {
            *lock(&m.keep_alive) = Some(Duration::ZERO);
        }
        self.unload_if_idle(i, "keep_alive 0");
        Ok(())
    }

    /// Unloads the idle models whose keep-alive has run out; the server calls it periodically.
    pub fn unload_expired(&self) {
        let now = Instant::now();
        for i in 0..self.entries.len() {
            let expired = self
                .loaded(i)
                .and_then(|m| m.expires())
                .is_some_and(|t| t <= now);
            if expired {
                self.unload_if_idle(i, "keep-alive expired");
            }
        }
    }
}

/// Drops a model where waiting for its threads does not hold up the async runtime's other tasks.
fn drop_off_runtime(model: Option<Arc<LoadedModel>>) {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(move || drop(model));
    } else {
        drop(model);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keep_alive_forms() {
        let d = |s: f64| Ok(Some(Duration::from_secs_f64(s)));
        assert_eq!(parse_keep_alive(&json!(300)), d(300.0));
        assert_eq!(parse_keep_alive(&json!("5m")), d(300.0));
        assert_eq!(parse_keep_alive(&json!("1h")), d(3600.0));
        assert_eq!(parse_keep_alive(&json!("30s")), d(30.0));
        assert_eq!(parse_keep_alive(&json!("250ms")), d(0.25));
        assert_eq!(parse_keep_alive(&json!("10")), d(10.0));
        assert_eq!(parse_keep_alive(&json!(0)), d(0.0));
        assert_eq!(parse_keep_alive(&json!(-1)), Ok(None));
        assert_eq!(parse_keep_alive(&json!("-1m")), Ok(None));
        for bad in [json!("soon"), json!("5 weeks"), json!(true), json!([1])] {
            let e = parse_keep_alive(&bad).unwrap_err();
            assert!(e.contains("not a duration"), "{e}");
        }
        // beyond what a clock holds (these once panicked in the handler or the unload task)
        for huge in [
            json!(1e20),
            json!(1e19),
            json!("2000000000000h"),
            json!(f64::MAX),
        ] {
            let e = parse_keep_alive(&huge).unwrap_err();
            assert!(
                e.contains("longer than ten years") && e.contains("-1"),
                "{e}"
            );
        }
        assert_eq!(
            parse_keep_alive(&json!("87600h")),
            d(MAX_KEEP_ALIVE_SECS),
            "ten years is still a duration"
        );
    }
}
