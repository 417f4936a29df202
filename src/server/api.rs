//! What the two APIs share: the server state, request-body parsing, sampling settings, chat
//! prompts, streaming bodies and time stamps.

use super::error::ApiError;
use super::metrics::Metrics;
use super::models::{LoadedModel, ModelPool, ModelStatus};
use crate::grammar::{Constraint, Format};
use crate::sampler::SamplingParams;
use crate::tokenizer::Message;
use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Largest request body accepted; bigger ones get 413.
pub const MAX_BODY_BYTES: usize = 8 << 20;

pub struct AppState {
    pub pool: Arc<ModelPool>,
    pub metrics: Arc<Metrics>,
    pub created: u64,
}

pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than the limit of {MAX_BODY_BYTES} bytes"),
    )
}

/// "loaded" or "unloaded", as the model lists show it.
pub fn model_state(s: &ModelStatus) -> &'static str {
    if s.loaded.is_some() {
        "loaded"
    } else {
        "unloaded"
    }
}

/// Parses a JSON request body, with serde's message on failure.
pub fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::new(status, format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON in the request body: {e}")))
}

/// Sampling settings common to both APIs; None keeps the server default.
#[derive(Default)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub seed: Option<i64>,
}

impl Sampling {
    /// Whether the answer is fixed by the request: greedy, or sampled with a seed the client
    /// chose.
    pub fn deterministic(&self, p: &SamplingParams) -> bool {
        p.temperature <= 0.0 || self.seed.is_some_and(|s| s >= 0)
    }

    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams::default();
        if let Some(t) = self.temperature {
            p.temperature = t;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(k) = self.top_k {
            p.top_k = k.max(0) as usize;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repeat_penalty {
            p.repeat_penalty = v;
        }
        if let Some(n) = self.repeat_last_n {
            p.repeat_last_n = n.max(0) as usize;
        }
        p.seed = match self.seed {
            Some(s) if s >= 0 => s as u64,
            // No seed (or -1): a fresh one per request, as the APIs do.
            _ => rand::random(),
        };
        p.validate()
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        Ok(p)
    }
}

/// Compiles a request's response format for `model`; a schema or grammar it cannot use is a 400
/// that says why.
pub fn compile_format(
    model: &LoadedModel,
    format: Option<Format>,
) -> Result<Option<(Format, Constraint)>, ApiError> {
    let Some(format) = format else {
        return Ok(None);
    };
    let constraint = model
        .engine
        .grammars()
        .and_then(|g| g.constraint(&format))
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    Ok(Some((format, constraint)))
}

/// Renders a chat through the model's template and tokenizes it.
pub fn chat_prompt(
    state: &LoadedModel,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("'messages' is empty"));
    }
    let text = state
        .engine
        .template
        .render(messages, tools, true)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    state.tokenize(&text)
}

/// Normalizes tool calls sent back in an assistant message to what Qwen's template renders:
/// `{"function": {"name", "arguments": <object>}}`, arguments parsed when they are a JSON string
/// (OpenAI sends them so).
pub fn normalize_tool_calls(calls: &serde_json::Value) -> Result<serde_json::Value, ApiError> {
    use serde_json::Value;
    let Some(list) = calls.as_array() else {
        return Err(ApiError::bad_request("'tool_calls' must be an array"));
    };
    let mut out = Vec::with_capacity(list.len());
    for c in list {
        let f = c.get("function").unwrap_or(c);
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad_request("each entry of 'tool_calls' needs function.name")
        })?;
        let args = match f.get("arguments") {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(Value::String(s)) => {
                serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
            }
            Some(v) => v.clone(),
        };
        out.push(serde_json::json!({"function": {"name": name, "arguments": args}}));
    }
    Ok(Value::Array(out))
}

/// A streaming response body fed by a channel of ready-made chunks.
pub fn stream_response(
    content_type: &'static str,
    rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current time as RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`.
pub fn rfc3339_now() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as RFC 3339 in UTC with nanoseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}
