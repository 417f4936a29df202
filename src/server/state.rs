//! What the handlers share: the server state (its model pool and metrics), error answers, and a
//! generation's output stream as the handlers read it.

use super::metrics::Metrics;
use super::models::{ModelLease, ModelPool};
use super::response_cache::{CacheKey, ResponseCache};
use super::tool_calls::{Piece, ToolCallParser};
use crate::sampler::SamplingParams;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

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

    /// The HTTP answer, with `body` in the API's error format; an overloaded server (429, 503)
    /// also says when to try again.
    pub fn response(&self, body: serde_json::Value) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut r = (self.status, axum::Json(body)).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from_static("1"),
            );
        }
        r
    }
}

pub struct AppState {
    pub pool: Arc<ModelPool>,
    pub metrics: Arc<Metrics>,
    pub created: u64,
}

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Greedy, or sampled with a seed the client chose: the same request gives the same answer,
    /// so the response cache may keep it.
    pub deterministic: bool,
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
    /// The request left the queue for a generation slot.
    Started,
    Text(String),
    Done(Summary),
    Error(String),
}

pub struct Job {
    pub req: GenRequest,
    pub tx: UnboundedSender<WorkerEvent>,
    pub enqueued: Instant,
    /// Holds the request's place among the model's slots and queue until the job is dropped.
    pub place: Place,
}

/// One of a model's `--parallel` + `--queue-size` places; given back when dropped.
pub struct Place(Arc<std::sync::atomic::AtomicUsize>);

impl Place {
    /// Takes a place if fewer than `limit` are taken.
    pub fn take(taken: &Arc<std::sync::atomic::AtomicUsize>, limit: usize) -> Option<Place> {
        use std::sync::atomic::Ordering;
        taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(taken.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Response headers that say how a request was served.
pub const MODEL_HEADER: &str = "x-qwen-run-model";
pub const ROUTE_HEADER: &str = "x-qwen-run-route";
pub const CACHE_HEADER: &str = "x-qwen-run-cache";

/// Adds the headers that say which model answered, why (with `model: "auto"`), and whether the
/// answer came from the response cache.
pub fn served_headers(
    mut resp: axum::response::Response,
    headers: &[(&'static str, String)],
) -> axum::response::Response {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(HeaderName::from_static(name), v);
        }
    }
    resp
}

/// Records a generation's text for the response cache; stored only if the generation ends
/// normally (not cancelled, not failed).
struct Recording {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    texts: Vec<String>,
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
    recording: Option<Recording>,
    /// None: the response cache is off; else whether this answer came from it.
    cache_hit: Option<bool>,
    /// Keeps the model loaded (and marks it in use) until the answer is complete.
    lease: ModelLease,
}

impl Output {
    /// `record`: where to keep the answer once complete; `cache_hit`: None when the response
    /// cache is off, else whether this answer came from it.
    pub(super) fn new(
        rx: UnboundedReceiver<WorkerEvent>,
        lease: ModelLease,
        record: Option<(Arc<ResponseCache>, CacheKey)>,
        cache_hit: Option<bool>,
    ) -> Self {
        let recording = record.map(|(cache, key)| Recording {
            cache,
            key,
            texts: Vec::new(),
        });
        Output {
            rx,
            parser: None,
            pending: Default::default(),
            saw_call: false,
            ended: false,
            recording,
            cache_hit,
            lease,
        }
    }

    /// The headers that say how this request is served.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![(MODEL_HEADER, self.lease.name.clone())];
        if let Some(r) = &self.lease.route {
            h.push((ROUTE_HEADER, r.clone()));
        }
        if let Some(hit) = self.cache_hit {
            h.push((CACHE_HEADER, if hit { "hit" } else { "miss" }.to_string()));
        }
        h
    }

    /// The name of the model that answers.
    pub fn model_name(&self) -> String {
        self.lease.name.clone()
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
                Some(WorkerEvent::Started) => {}
                Some(WorkerEvent::Text(t)) => {
                    if let Some(r) = &mut self.recording {
                        r.texts.push(t.clone());
                    }
                    match &mut self.parser {
                        Some(p) => {
                            let pieces = p.push(&t);
                            self.queue_pieces(pieces);
                        }
                        None => return Some(OutEvent::Text(t)),
                    }
                }
                Some(WorkerEvent::Done(mut s)) => {
                    if let Some(r) = self.recording.take() {
                        if s.finish != Finish::Cancelled {
                            r.cache.put(r.key, r.texts, s.clone());
                        }
                    }
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
