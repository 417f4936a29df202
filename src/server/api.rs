//! What the two APIs share: the server state, request-body parsing, sampling settings, chat
//! prompts, streaming bodies and time stamps.

use super::error::ApiError;
use super::metrics::Metrics;
use super::models::{LoadedModel, ModelPool, ModelStatus};
use super::protocol::Logprob;
use crate::grammar::{Constraint, Format};
use crate::sampler::SamplingParams;
use crate::scheduler::{Generation, MAX_TOP_LOGPROBS};
use crate::tokenizer::Message;
use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
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

/// "loaded", "loading", "unloaded", or "failed" (its generation thread stopped; the next request
/// reloads it), as the model lists show it.
pub fn model_state(s: &ModelStatus) -> &'static str {
    match &s.loaded {
        _ if s.loading => "loading",
        Some(m) if m.failure().is_some() => "failed",
        Some(_) => "loaded",
        None => "unloaded",
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
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// OpenAI's `logit_bias`: token ids (as strings) to a bias in [-100, 100].
    pub logit_bias: Option<Value>,
    pub seed: Option<i64>,
}

impl Sampling {
    /// Whether the answer is fixed by the request: greedy, or sampled with a seed the client
    /// chose.
    pub fn deterministic(&self, p: &SamplingParams) -> bool {
        p.temperature <= 0.0 || self.seed.is_some_and(|s| s >= 0)
    }

    /// The sampler's settings for a model of `vocab` tokens.
    pub fn params(&self, vocab: usize) -> Result<SamplingParams, ApiError> {
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
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        p.logit_bias = logit_bias(self.logit_bias.as_ref(), vocab)?;
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

/// Parses `{"token id": bias}`; an id outside the vocabulary or a bias that is not a number is
/// a 400.
fn logit_bias(v: Option<&Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "logit_bias must be an object of token ids to biases, e.g. {\"1234\": -100} (or llama-server's [[1234, -100], [42, false]])",
        )
    };
    let pairs: Vec<(String, Value)> = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m.iter().map(|(k, b)| (k.clone(), b.clone())).collect(),
        // llama-server's form; false bans the token.
        Some(Value::Array(list)) => list
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([id, b]) => Ok((
                    id.to_string(),
                    if b == &Value::Bool(false) {
                        serde_json::json!(-100)
                    } else {
                        b.clone()
                    },
                )),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    pairs
        .iter()
        .map(|(k, b)| {
            let id = k.parse::<u32>().ok().filter(|&id| (id as usize) < vocab);
            match (id, b.as_f64()) {
                (Some(id), Some(b)) => Ok((id, b as f32)),
                (None, _) => Err(ApiError::bad_request(format!(
                    "logit_bias key '{k}' is not a token id of this model (0 to {})",
                    vocab - 1
                ))),
                (_, None) => Err(ApiError::bad_request(format!(
                    "logit_bias of token {k} must be a number, got {b}"
                ))),
            }
        })
        .collect()
}

/// llama-server's `grammar` (GBNF) and `json_schema` (`{}`: any JSON object); at most one.
pub fn grammar_fields(
    grammar: Option<&str>,
    json_schema: Option<&Value>,
) -> Result<Option<Format>, ApiError> {
    let schema = match json_schema {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) if o.is_empty() => Some(Format::JsonObject),
        Some(s @ Value::Object(_)) => Some(Format::JsonSchema(s.clone())),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "json_schema must be a JSON schema object, got {other}"
            )))
        }
    };
    match (grammar.filter(|g| !g.trim().is_empty()), schema) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "grammar and json_schema cannot be combined; send one",
        )),
        (Some(g), None) => Ok(Some(Format::Gbnf(g.to_string()))),
        (None, schema) => Ok(schema),
    }
}

/// Checks a requested number of alternatives per token (`top_logprobs`, `n_probs`).
pub fn top_logprobs(field: &str, n: Option<i64>) -> Result<usize, ApiError> {
    match n {
        None => Ok(0),
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::bad_request(format!(
            "{field} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"
        ))),
    }
}

/// A token's logprob as OpenAI's chat and Ollama write it.
pub fn logprob_json(lp: &Logprob) -> Value {
    let top: Vec<Value> = lp
        .top
        .iter()
        .map(|(t, l)| serde_json::json!({"token": t.text, "logprob": l, "bytes": t.bytes}))
        .collect();
    serde_json::json!({
        "token": lp.token.text,
        "logprob": lp.logprob,
        "bytes": lp.token.bytes,
        "top_logprobs": top,
    })
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
    off_runtime(|| compile(model, format))
}

fn compile(model: &LoadedModel, format: Format) -> Result<Option<(Format, Constraint)>, ApiError> {
    let grammars = model
        .engine
        .grammars()
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    // A model with no `<tool_call>` token (none of Qwen2.5's lack it) cannot begin a call the
    // grammar would follow: its answer stays free, and the output parser reads what it wrote.
    if let Format::Triggered { trigger, .. } = &format {
        if grammars.token_id(trigger).is_none() {
            return Ok(None);
        }
    }
    let constraint = grammars
        .constraint(&format)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    Ok(Some((format, constraint)))
}

/// Renders a chat through the model's template and tokenizes it.
pub fn chat_prompt(
    state: &LoadedModel,
    messages: &[Message],
    tools: Option<&Value>,
) -> Result<Vec<u32>, ApiError> {
    off_runtime(|| state.tokenize(&chat_text(state, messages, tools)?))
}

/// Renders a chat through the model's template (with the assistant's turn opened), as the chat
/// endpoints prompt the model and llama-server's `/apply-template` shows it.
pub fn chat_text(
    state: &LoadedModel,
    messages: &[Message],
    tools: Option<&Value>,
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("'messages' is empty"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::bad_request(format!(
            "'messages' has {} entries; at most {MAX_MESSAGES} are taken",
            messages.len()
        )));
    }
    let n_tools = tools.and_then(Value::as_array).map_or(0, Vec::len);
    if n_tools > MAX_TOOLS {
        return Err(ApiError::bad_request(format!(
            "'tools' has {n_tools} entries; at most {MAX_TOOLS} are taken"
        )));
    }
    off_runtime(|| {
        state
            .engine
            .template
            .render(messages, tools, true)
            .map_err(template_error)
    })
}

/// A conversation the chat template failed to render: 400 when the template refused it
/// (`raise_exception`), 500 when the template itself failed (the client cannot fix that).
pub fn template_error(e: anyhow::Error) -> ApiError {
    let status = match e.downcast_ref::<crate::tokenizer::RenderError>() {
        Some(r) if !r.refused => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        _ => axum::http::StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, format!("{e:#}"))
}

/// Caps on what one request may hold (besides the body's size and the context).
pub const MAX_MESSAGES: usize = 4096;
pub const MAX_TOOLS: usize = 512;
pub const MAX_STOPS: usize = 64;
pub const MAX_STOP_BYTES: usize = 16 << 10;

/// Checks a request's stop strings against [`MAX_STOPS`] and [`MAX_STOP_BYTES`] (each is matched
/// against the text after every token).
pub fn check_stops(stop: &[String]) -> Result<(), ApiError> {
    let bytes: usize = stop.iter().map(String::len).sum();
    if stop.len() > MAX_STOPS || bytes > MAX_STOP_BYTES {
        return Err(ApiError::bad_request(format!(
            "'stop' has {} strings of {bytes} bytes in all; at most {MAX_STOPS} strings of {MAX_STOP_BYTES} bytes are taken",
            stop.len()
        )));
    }
    Ok(())
}

/// Runs CPU-heavy request preparation (template rendering, tokenization, grammar compilation)
/// where it does not hold up the async runtime (so /health and streams stay responsive under an
/// 8 MiB prompt or a slow template), and at most one per core at a time, so that many large
/// requests at once cannot starve generation. Calls nested inside one another run directly.
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    thread_local! {
        static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if INSIDE.with(|c| c.get()) {
        return f();
    }
    static RUNNING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
    static FREED: std::sync::Condvar = std::sync::Condvar::new();
    fn running() -> std::sync::MutexGuard<'static, usize> {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner())
    }
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            *running() -= 1;
            FREED.notify_one();
            INSIDE.with(|c| c.set(false));
        }
    }
    // Asked once: on Linux it reads the cgroup's CPU quota from files.
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let run = || {
        let mut n = running();
        while *n >= limit {
            n = FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        drop(n);
        let _release = Release;
        INSIDE.with(|c| c.set(true));
        f()
    };
    let on_worker = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if on_worker {
        tokio::task::block_in_place(run)
    } else {
        run()
    }
}

/// Normalizes tool calls sent back in an assistant message to what Qwen's template renders:
/// `{"function": {"name", "arguments": <object>}}`, arguments parsed when they are a JSON string
/// (OpenAI sends them so).
pub fn normalize_tool_calls(calls: &Value) -> Result<Value, ApiError> {
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

/// llama-server's `timings` of a generation (its `/completion` answers carry them, and so do the
/// last chunk and the answer of `/v1/chat/completions`, as llama-server's do).
pub fn timings(s: &Generation) -> Value {
    let prompt_n = s.prompt_tokens - s.reused_tokens;
    let prompt_ms = s.prefill_time.as_secs_f64() * 1e3;
    let predicted_n = s.completion_tokens;
    let predicted_ms = s.decode_time.as_secs_f64() * 1e3;
    let per = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
    let rate = |ms: f64, n: usize| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    let mut timings = json!({
        "cache_n": s.reused_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": per(prompt_ms, prompt_n),
        "prompt_per_second": rate(prompt_ms, prompt_n),
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": per(predicted_ms, predicted_n),
        "predicted_per_second": rate(predicted_ms, predicted_n),
    });
    if s.spec.drafted > 0 {
        timings["draft_n"] = json!(s.spec.drafted);
        timings["draft_n_accepted"] = json!(s.spec.accepted);
    }
    timings
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

/// The grammar of calls to `tools` (OpenAI-style `{"type": "function", "function": {...}}`
/// entries): from the start of the answer, or with `lazy` from the moment the model generates
/// `<tool_call>`.
pub fn tool_call_format(tools: &[&Value], parallel: bool, lazy: bool) -> Format {
    let mut defs = serde_json::Map::new();
    let calls: Vec<Value> = tools
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let f = t.get("function").unwrap_or(t);
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let mut params = f
                .get("parameters")
                .filter(|p| p.is_object())
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            hoist_definitions(&mut params, &format!("tool{k}_"), &mut defs);
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        })
        .collect();
    let mut schema = json!({"anyOf": calls});
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    let schema = crate::grammar::bounded_whitespace(schema);
    let call = format!("\"\\n\" %json {schema} \"\\n</tool_call>\"");
    if lazy {
        return Format::Triggered {
            trigger: "<tool_call>".into(),
            then: Box::new(Format::Lark(format!("start: {call}\n"))),
            rearm: parallel,
        };
    }
    let repeat = if parallel { r#" ("\n" call)*"# } else { "" };
    Format::Lark(format!(
        "start: call{repeat}\ncall: \"<tool_call>\" {call}\n"
    ))
}

/// Moves a tool's `$defs` (or `definitions`, as pydantic and zod write nested models) to the
/// root of the calls' schema, where its `#/$defs/...` references resolve once the parameters sit
/// inside the call wrapper; each name gets `prefix` so two tools' definitions cannot collide.
fn hoist_definitions(params: &mut Value, prefix: &str, defs: &mut serde_json::Map<String, Value>) {
    let Some(obj) = params.as_object_mut() else {
        return;
    };
    let mut found = Vec::new();
    for key in ["$defs", "definitions"] {
        if let Some(Value::Object(d)) = obj.remove(key) {
            found.extend(d);
        }
    }
    if found.is_empty() {
        return;
    }
    fn rewrite(v: &mut Value, prefix: &str) {
        match v {
            Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => {
                            for from in ["#/$defs/", "#/definitions/"] {
                                if let Some(name) = r.strip_prefix(from) {
                                    *r = format!("#/$defs/{prefix}{name}");
                                    break;
                                }
                            }
                        }
                        (_, x) => rewrite(x, prefix),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, prefix)),
            _ => {}
        }
    }
    rewrite(params, prefix);
    for (name, mut def) in found {
        rewrite(&mut def, prefix);
        defs.insert(format!("{prefix}{name}"), def);
    }
}
