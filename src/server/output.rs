//! A generation's output as the handlers read it: text, tool calls parsed out when the request
//! had tools, then the summary; recorded for the response cache on the way.

use super::error::ApiError;
use super::protocol::{Logprob, WorkerEvent};
use super::response_cache::{CacheKey, ResponseCache};
use super::tool_calls::{Piece, ToolCallParser};
use crate::scheduler::{FinishReason, Generation};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

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

/// Which model answers and why; holds it loaded (and marked in use) until the answer is complete.
pub struct Served {
    pub name: String,
    /// Why `model: "auto"` chose it.
    pub route: Option<String>,
    pub hold: Box<dyn std::any::Any + Send + Sync>,
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
    /// A token's log-probabilities, before the text that holds it.
    Logprob(Logprob),
    Text(String),
    Call(super::tool_calls::ToolCall),
    Done(Generation),
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
    served: Served,
}

impl Output {
    /// `record`: where to keep the answer once complete; `cache_hit`: None when the response
    /// cache is off, else whether this answer came from it.
    pub(super) fn new(
        rx: UnboundedReceiver<WorkerEvent>,
        served: Served,
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
            served,
        }
    }

    /// The headers that say how this request is served.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![(MODEL_HEADER, self.served.name.clone())];
        if let Some(r) = &self.served.route {
            h.push((ROUTE_HEADER, r.clone()));
        }
        if let Some(hit) = self.cache_hit {
            h.push((CACHE_HEADER, if hit { "hit" } else { "miss" }.to_string()));
        }
        h
    }

    /// The name of the model that answers.
    pub fn model_name(&self) -> String {
        self.served.name.clone()
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
                Some(WorkerEvent::Logprob(lp)) => return Some(OutEvent::Logprob(lp)),
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
                        if s.finish != FinishReason::Cancelled {
                            r.cache.put(r.key, r.texts, s.clone());
                        }
                    }
                    if let Some(p) = &mut self.parser {
                        let pieces = p.finish();
                        self.queue_pieces(pieces);
                    }
                    if self.saw_call && s.finish == FinishReason::Stop {
                        s.finish = FinishReason::ToolCalls;
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
                OutEvent::Logprob(lp) => c.logprobs.push(lp),
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
    pub logprobs: Vec<Logprob>,
    pub summary: Option<Generation>,
}
