//! Shared server state and the generation scheduler. The engine is synchronous, so generation
//! runs on a dedicated thread fed by a bounded queue, batching the requests of its `--parallel`
//! slots into shared forward passes; each request gets its pieces back through a tokio channel.
//! Dropping the receiver (client gone) stops that request's generation.

use super::metrics::Metrics;
use super::tool_calls::{Piece, ToolCallParser};
use crate::engine::{Decoder, Engine, FinishReason, Prefill, Session, Timings};
use crate::sampler::{Sampler, SamplingParams};
use axum::http::StatusCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// An error answer; each API formats it its own way.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// The HTTP answer, with `body` in the API's error format; a busy server (503) also says when
    /// to try again.
    pub fn response(&self, body: serde_json::Value) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

pub struct AppState {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    /// The name the model is served under (the file stem).
    pub model_name: String,
    /// Other names accepted for it (the GGUF's general.name).
    pub aliases: Vec<String>,
    /// Server-wide cap on generated tokens per request (0: none beyond the context).
    pub max_tokens: usize,
    pub created: u64,
    queue: SyncSender<Job>,
}

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    ToolCalls,
    Cancelled,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
            Finish::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    pub finish: Finish,
    pub queue_time: Duration,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub total_time: Duration,
}

pub enum WorkerEvent {
    Text(String),
    Done(Summary),
    Error(String),
}

struct Job {
    req: GenRequest,
    tx: UnboundedSender<WorkerEvent>,
    enqueued: Instant,
}

impl AppState {
    pub fn new(
        engine: Engine,
        model_name: String,
        aliases: Vec<String>,
        queue_size: usize,
        max_tokens: usize,
        parallel: usize,
    ) -> Arc<AppState> {
        let engine = Arc::new(engine);
        let metrics = Arc::new(Metrics::default());
        let (queue, jobs) = sync_channel(queue_size.max(1));
        {
            let engine = engine.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("qwen-run-generate".into())
                .spawn(move || scheduler(engine, metrics, jobs, parallel))
                .expect("cannot start the generation thread");
        }
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Arc::new(AppState {
            engine,
            metrics,
            model_name,
            aliases,
            max_tokens,
            created,
            queue,
        })
    }

    /// Checks the `model` field of a request: empty, the served name (any case, with or without an
    /// Ollama-style `:latest` tag) or an alias.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        let m = model.unwrap_or("").trim();
        let base = m.strip_suffix(":latest").unwrap_or(m);
        let same = |a: &str| a.eq_ignore_ascii_case(m) || a.eq_ignore_ascii_case(base);
        if m.is_empty() || same(&self.model_name) || self.aliases.iter().any(|a| same(a)) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model '{m}' not found; this server serves '{}'",
                    self.model_name
                ),
            ))
        }
    }

    /// Tokenizes a rendered prompt and checks it against the context.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let tokens = self
            .engine
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
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

    /// The token budget for a request asking for `asked` (None: as many as fit).
    pub fn budget(&self, asked: Option<i64>) -> Result<usize, ApiError> {
        let asked = match asked {
            None => usize::MAX,
            Some(n) if n < 0 => usize::MAX,
            Some(n) => n as usize,
        };
        Ok(match self.max_tokens {
            0 => asked,
            cap => asked.min(cap),
        })
    }

    /// Queues a generation; 503 when the queue is full.
    pub fn submit(&self, req: GenRequest) -> Result<Output, ApiError> {
        let (tx, rx) = unbounded_channel();
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            req,
            tx,
            enqueued: Instant::now(),
        };
        match self.queue.try_send(job) {
            Ok(()) => Ok(Output::new(rx)),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the server is busy: the request queue is full (see --queue-size); retry later",
                    ),
                    TrySendError::Disconnected(_) => ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the generation worker has stopped",
                    ),
                })
            }
        }
    }
}

/// Prompt tokens a prefilling request may run in one step while other requests are decoding:
/// small enough that their streams keep flowing (a step of this many tokens takes about as long as
/// a few decode steps), large enough to keep the weights busy.
const PREFILL_CHUNK_WHILE_DECODING: usize = 64;

/// One of the `--parallel` generation slots. Its session (KV cache) outlives requests, so a
/// follow-up request that starts with the same tokens (a conversation's next turn) reuses them.
#[derive(Default)]
struct Slot {
    session: Option<Session>,
    active: Option<Active>,
}

/// A request being served by a slot.
struct Active {
    job: Job,
    prefill: Prefill,
    /// Prompt tokens in the session so far; prefill is done when this reaches the prompt length.
    fed: usize,
    decoder: Decoder,
    sampler: Sampler,
    stops: StopMatcher,
    stopped: bool,
    /// The token the next step runs, once decoding.
    next: Option<u32>,
    queue_time: Duration,
    started: Instant,
    prefill_time: Option<Duration>,
    ttft: Option<Duration>,
    decode_start: Option<Instant>,
    /// Part of the current step.
    in_step: bool,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.fed < self.job.req.prompt.len()
    }
}

/// Continuous batching: every step runs one forward pass over all active requests (one token
/// each while decoding, a chunk of prompt while prefilling), requests join between steps as slots
/// free up, and finished ones leave at once.
fn scheduler(engine: Arc<Engine>, metrics: Arc<Metrics>, jobs: Receiver<Job>, parallel: usize) {
    let mut slots: Vec<Slot> = (0..parallel.max(1)).map(|_| Slot::default()).collect();
    loop {
        if slots.iter().all(|s| s.active.is_none()) {
            let Ok(job) = jobs.recv() else {
                return; // The server is shutting down and nothing is running.
            };
            admit(&engine, &metrics, &mut slots, job);
        }
        while slots.iter().any(|s| s.active.is_none()) {
            let Ok(job) = jobs.try_recv() else {
                break;
            };
            admit(&engine, &metrics, &mut slots, job);
        }
        step(&engine, &metrics, &mut slots);
    }
}

/// Puts a job in a free slot, preferring the one whose cache shares the longest prefix with it.
fn admit(engine: &Engine, metrics: &Metrics, slots: &mut [Slot], job: Job) {
    metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
    if job.tx.is_closed() {
        return; // The client left while waiting.
    }
    let prompt = &job.req.prompt;
    let Some(slot) = slots
        .iter_mut()
        .filter(|s| s.active.is_none())
        .max_by_key(|s| s.session.as_ref().map_or(0, |x| x.common_prefix(prompt)))
    else {
        let _ = job
            .tx
            .send(WorkerEvent::Error("no free generation slot".into()));
        return;
    };
    if slot.session.is_none() {
        match engine.new_session() {
            Ok(s) => slot.session = Some(s),
            Err(e) => {
                let _ = job.tx.send(WorkerEvent::Error(format!(
                    "cannot create a session: {e:#}"
                )));
                return;
            }
        }
    }
    let session = slot.session.as_mut().expect("created above");
    let queue_time = job.enqueued.elapsed();
    let started = Instant::now();
    let setup = Sampler::new(job.req.params.clone())
        .and_then(|sampler| Ok((sampler, engine.begin(session, prompt)?)));
    let (sampler, prefill) = match setup {
        Ok(x) => x,
        Err(e) => {
            let _ = job.tx.send(WorkerEvent::Error(format!("{e:#}")));
            return;
        }
    };
    metrics.busy.fetch_add(1, Ordering::SeqCst);
    slot.active = Some(Active {
        fed: prefill.reused,
        decoder: Decoder::new(engine, prompt, job.req.max_tokens),
        stops: StopMatcher::new(&job.req.stop),
        sampler,
        prefill,
        job,
        stopped: false,
        next: None,
        queue_time,
        started,
        prefill_time: None,
        ttft: None,
        decode_start: None,
        in_step: false,
    });
}

/// One batched forward pass over the active slots, then sampling for those past their prompt.
fn step(engine: &Engine, metrics: &Metrics, slots: &mut [Slot]) {
    let decoding = slots
        .iter()
        .any(|s| s.active.as_ref().is_some_and(|a| !a.prefilling()));
    let mut prefill_budget = if decoding {
        PREFILL_CHUNK_WHILE_DECODING.min(engine.batch_size)
    } else {
        engine.batch_size
    };
    let mut tokens: Vec<Vec<u32>> = Vec::new();
    for slot in slots.iter_mut() {
        let Some(a) = slot.active.as_mut() else {
            continue;
        };
        a.in_step = false;
        if a.job.tx.is_closed() {
            a.decoder.cancel();
            finish(engine, metrics, slot);
            continue;
        }
        let run: Vec<u32> = if a.prefilling() {
            let n = (a.job.req.prompt.len() - a.fed).min(prefill_budget);
            prefill_budget -= n;
            a.job.req.prompt[a.fed..a.fed + n].to_vec()
        } else {
            a.next.into_iter().collect()
        };
        if !run.is_empty() {
            a.in_step = true;
            tokens.push(run);
        }
    }
    if tokens.is_empty() {
        return;
    }
    let mut sessions: Vec<&mut Session> = slots
        .iter_mut()
        .filter(|s| s.active.as_ref().is_some_and(|a| a.in_step))
        .filter_map(|s| s.session.as_mut())
        .collect();
    let refs: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.forward_batch(&mut sessions, &refs)
    }));
    let mut rows = match result {
        Ok(Ok(rows)) => rows.into_iter(),
        failed => {
            let message = match failed {
                Ok(Err(e)) => format!("{e:#}"),
                _ => "internal error during generation".to_string(),
            };
            for slot in slots.iter_mut() {
                if slot.active.as_ref().is_some_and(|a| a.in_step) {
                    // The caches may be half-written: the next request starts from scratch.
                    if let Some(s) = slot.session.as_mut() {
                        s.truncate(0);
                    }
                    let a = slot.active.take().expect("in the step");
                    metrics.busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = a.job.tx.send(WorkerEvent::Error(message.clone()));
                }
            }
            return;
        }
    };
    for (slot, n) in slots
        .iter_mut()
        .filter(|s| s.active.as_ref().is_some_and(|a| a.in_step))
        .zip(tokens.iter().map(|t| t.len()))
    {
        let mut logits = rows.next().unwrap_or_default();
        let a = slot.active.as_mut().expect("in the step");
        if a.prefilling() {
            a.fed += n;
            if a.prefilling() {
                continue;
            }
        }
        a.prefill_time.get_or_insert_with(|| a.started.elapsed());
        a.decode_start.get_or_insert_with(Instant::now);
        let Active {
            decoder,
            sampler,
            stops,
            stopped,
            job,
            ..
        } = a;
        let mut on_text = |piece: &str| {
            if *stopped {
                return false;
            }
            let (text, hit) = stops.push(piece);
            let sent = text.is_empty() || job.tx.send(WorkerEvent::Text(text)).is_ok();
            *stopped = hit;
            sent && !hit
        };
        a.next = decoder.step(engine, sampler, &mut logits, &mut on_text);
        a.ttft.get_or_insert_with(|| a.started.elapsed());
        if a.next.is_none() {
            finish(engine, metrics, slot);
        }
    }
}

/// Ends the slot's request: the rest of its text, the prefix caches, its summary.
fn finish(engine: &Engine, metrics: &Metrics, slot: &mut Slot) {
    let (Some(mut a), Some(session)) = (slot.active.take(), slot.session.as_ref()) else {
        return;
    };
    metrics.busy.fetch_sub(1, Ordering::SeqCst);
    // Text held back as a possible stop-string start, at the natural end.
    if !a.stopped {
        let rest = a.stops.finish();
        if !rest.is_empty() {
            let _ = a.job.tx.send(WorkerEvent::Text(rest));
        }
    }
    let stopped = a.stopped;
    let prompt = std::mem::take(&mut a.job.req.prompt);
    engine.end(session, &prompt, &a.prefill);
    let elapsed = a.started.elapsed();
    let g = a.decoder.finish(
        &a.prefill,
        session,
        Timings {
            prefill: a.prefill_time.unwrap_or(elapsed),
            ttft: a.ttft.unwrap_or(elapsed),
            decode: a.decode_start.map_or(Duration::ZERO, |t| t.elapsed()),
        },
    );
    let finish = match g.finish {
        FinishReason::Stop => Finish::Stop,
        FinishReason::Length | FinishReason::ContextFull => Finish::Length,
        FinishReason::Cancelled if stopped => Finish::Stop,
        FinishReason::Cancelled => Finish::Cancelled,
    };
    let eog = g.tokens.last().is_some_and(|&t| engine.tokenizer.is_eog(t));
    let summary = Summary {
        prompt_tokens: g.prompt_tokens,
        reused_tokens: g.reused_tokens,
        completion_tokens: g.tokens.len() - usize::from(eog),
        finish,
        queue_time: a.queue_time,
        prefill_time: g.prefill_time,
        decode_time: g.decode_time,
        total_time: a.queue_time + elapsed,
    };
    metrics.record_generation(
        summary.prompt_tokens,
        summary.reused_tokens,
        summary.completion_tokens,
        summary.prefill_time,
        summary.decode_time,
    );
    let _ = a.job.tx.send(WorkerEvent::Done(summary));
}

/// Cuts generated text at the first stop string, holding back a tail that may start one.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Returns the text to release and whether a stop string was hit.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| super::tool_calls::partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// What a handler reads: text, tool calls, then the summary or an error.
pub enum OutEvent {
    Text(String),
    Call(super::tool_calls::ToolCall),
    Done(Summary),
    Error(String),
}

/// A generation's output as the handlers see it, with tool calls parsed out when the request
/// had tools.
pub struct Output {
    rx: UnboundedReceiver<WorkerEvent>,
    parser: Option<ToolCallParser>,
    pending: std::collections::VecDeque<OutEvent>,
    saw_call: bool,
    ended: bool,
}

impl Output {
    fn new(rx: UnboundedReceiver<WorkerEvent>) -> Self {
        Output {
            rx,
            parser: None,
            pending: Default::default(),
            saw_call: false,
            ended: false,
        }
    }

    /// Parses tool calls out of the text when the request has tools.
    pub fn with_tools(mut self, tools: Option<&serde_json::Value>) -> Self {
        if let Some(t) = tools {
            self.parser = Some(ToolCallParser::with_tools(super::tool_calls::tool_names(t)));
        }
        self
    }

    fn queue_pieces(&mut self, pieces: Vec<Piece>) {
        for p in pieces {
            self.pending.push_back(match p {
                Piece::Text(t) => OutEvent::Text(t),
                Piece::Call(c) => {
                    self.saw_call = true;
                    OutEvent::Call(c)
                }
            });
        }
    }

    pub async fn next(&mut self) -> Option<OutEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.ended {
                return None;
            }
            match self.rx.recv().await {
                Some(WorkerEvent::Text(t)) => match &mut self.parser {
                    Some(p) => {
                        let pieces = p.push(&t);
                        self.queue_pieces(pieces);
                    }
                    None => return Some(OutEvent::Text(t)),
                },
                Some(WorkerEvent::Done(mut s)) => {
                    if let Some(p) = &mut self.parser {
                        let pieces = p.finish();
                        self.queue_pieces(pieces);
                    }
                    if self.saw_call && s.finish == Finish::Stop {
                        s.finish = Finish::ToolCalls;
                    }
                    self.pending.push_back(OutEvent::Done(s));
                    self.ended = true;
                }
                Some(WorkerEvent::Error(e)) => {
                    self.pending.push_back(OutEvent::Error(e));
                    self.ended = true;
                }
                None => {
                    self.ended = true;
                    self.pending
                        .push_back(OutEvent::Error("the generation worker stopped".into()));
                }
            }
        }
    }

    /// Reads everything: the text, the calls and the summary.
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut c = Collected::default();
        while let Some(e) = self.next().await {
            match e {
                OutEvent::Text(t) => c.text.push_str(&t),
                OutEvent::Call(call) => c.calls.push(call),
                OutEvent::Done(s) => c.summary = Some(s),
                OutEvent::Error(e) => {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
                }
            }
        }
        if c.summary.is_none() {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "generation ended without a result",
            ));
        }
        Ok(c)
    }
}

#[derive(Default)]
pub struct Collected {
    pub text: String,
    pub calls: Vec<super::tool_calls::ToolCall>,
    pub summary: Option<Summary>,
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_across_pieces() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dxyz"), (String::new(), true));
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.finish(), "");
    }
}
