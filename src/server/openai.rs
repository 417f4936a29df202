//! The OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`; and
//! llama-server's `POST /apply-template`, which takes a chat completion's body.

use super::api::AppState;
use super::api::{
    chat_prompt, compile_format, grammar_fields, logprob_json, normalize_tool_calls, parse_body,
    stream_response, timings, tool_call_format, top_logprobs, unix_now, Sampling,
};
use super::error::ApiError;
use super::fields;
use super::models::{keep_alive_field, LoadedModel};
use super::output::{served_headers, OutEvent, Output};
use super::protocol::{GenRequest, Logprob};
use super::routing::RouteFacts;
use super::tool_calls::ToolCall;
use crate::grammar::Format;
use crate::scheduler::{FinishReason, Generation, MAX_TOP_LOGPROBS};
use crate::tokenizer::Message;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub fn error(e: ApiError) -> Response {
    let kind = match e.status {
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    e.response(json!({"error": {"message": e.message, "type": kind, "param": null, "code": e.status.as_u16()}}))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<i64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<Value>,
    /// Chat: true or false; completions: how many alternatives per token.
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<i64>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    stop: Option<StopField>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    response_format: Option<Value>,
    /// Not OpenAI's, but llama-server's: a GBNF grammar or a JSON schema for the answer.
    #[serde(default)]
    grammar: Option<String>,
    #[serde(default)]
    json_schema: Option<Value>,
    /// Not OpenAI's, but Ollama's: how long the model stays loaded after this request.
    #[serde(default)]
    keep_alive: Option<Value>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    common: Common,
    /// Fields none of the above read; see [`fields`].
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    /// Text after the insertion point: the prompt and this are filled in the middle.
    #[serde(default)]
    suffix: Option<String>,
    #[serde(flatten)]
    common: Common,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl ChatRequest {
    /// What the chat template renders: the messages, and the tools unless `tool_choice` is
    /// "none". Takes the messages out of the request.
    fn conversation(&mut self) -> Result<(Vec<Message>, Option<Value>), ApiError> {
        let tools = match (&self.tools, &self.tool_choice) {
            (_, Some(Value::String(c))) if c == "none" => None,
            (Some(t), _) if t.as_array().is_some_and(|a| !a.is_empty()) => Some(t.clone()),
            (Some(Value::Array(_)) | Some(Value::Null) | None, _) => None,
            (Some(_), _) => return Err(ApiError::bad_request("'tools' must be an array")),
        };
        Ok((to_messages(std::mem::take(&mut self.messages))?, tools))
    }
}

impl Common {
    fn request(
        &self,
        model: &LoadedModel,
        prompt: Vec<u32>,
        default_max: Option<i64>,
        tool_calls: Option<Format>,
        logprobs: Option<usize>,
    ) -> Result<GenRequest, ApiError> {
        if self.n.unwrap_or(1) != 1 {
            return Err(ApiError::bad_request("only n = 1 is supported"));
        }
        let sampling = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
        };
        let params = sampling.params(model.engine.config().vocab_size)?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        let asked = self
            .max_completion_tokens
            .or(self.max_tokens)
            .or(default_max);
        let answer_format = match (
            response_format(self.response_format.as_ref())?,
            grammar_fields(self.grammar.as_deref(), self.json_schema.as_ref())?,
        ) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "response_format and llama-server's grammar / json_schema cannot be combined; send one",
                ))
            }
            (a, b) => a.or(b),
        };
        let format = match (answer_format, tool_calls) {
            // Under tool_choice auto a response_format holds the whole answer to JSON.
            (Some(f), Some(Format::Triggered { .. })) => Some(f),
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "response_format and a tool_choice that requires a call cannot be combined: the answer is either JSON or a tool call",
                ))
            }
            (f, calls) => f.or(calls),
        };
        Ok(GenRequest {
            prompt,
            max_tokens: model.budget(asked),
            deterministic: sampling.deterministic(&params),
            params,
            stop,
            format: compile_format(model, format)?,
            logprobs,
            spec: None,
        })
    }

    /// Chat's `logprobs` (true or false) and `top_logprobs` (0-20, with logprobs only).
    fn chat_logprobs(&self) -> Result<Option<usize>, ApiError> {
        let on = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "logprobs must be true or false, got {other}"
                )))
            }
        };
        let top = top_logprobs("top_logprobs", self.top_logprobs)?;
        match (on, self.top_logprobs) {
            (true, _) => Ok(Some(top)),
            (false, Some(n)) if n > 0 => {
                Err(ApiError::bad_request("top_logprobs needs logprobs: true"))
            }
            (false, _) => Ok(None),
        }
    }

    /// Completions' `logprobs`: how many alternatives per token (0-20), or none.
    fn completion_logprobs(&self) -> Result<Option<usize>, ApiError> {
        match &self.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) => top_logprobs("logprobs", Some(n)).map(Some),
                None => Err(ApiError::bad_request(format!(
                    "logprobs must be a number of alternatives per token (0-{MAX_TOP_LOGPROBS}) on /v1/completions, got {v}"
                ))),
            },
        }
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// OpenAI's `tool_choice`, enforced by a grammar over Qwen's own
/// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` format: `required` (some tool must be
/// called), a named function (that one must be), or `auto` (the default with tools: the answer
/// may be prose, but a call, once the model begins one, names a listed tool and has arguments
/// valid against its parameters). With `parallel_tool_calls` (the default) several calls may
/// follow one another.
fn tool_choice_format(
    choice: Option<&Value>,
    tools: Option<&Value>,
    parallel: bool,
) -> Result<Option<Format>, ApiError> {
    let listed: Vec<&Value> = tools
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let name_of = |t: &Value| {
        t.get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (wanted, lazy): (Vec<&Value>, bool) = match choice {
        Some(Value::String(s)) if s == "none" => return Ok(None),
        None | Some(Value::Null) => (listed.clone(), true),
        Some(Value::String(s)) if s == "auto" => (listed.clone(), true),
        Some(Value::String(s)) if s == "required" => (listed.clone(), false),
        Some(v @ Value::Object(_)) => {
            let Some(name) = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            else {
                return Err(ApiError::bad_request(
                    "tool_choice as an object needs function.name",
                ));
            };
            let found: Vec<&Value> = listed
                .iter()
                .copied()
                .filter(|t| name_of(t).as_deref() == Some(name))
                .collect();
            if found.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "tool_choice names '{name}', which is not among the request's tools"
                )));
            }
            (found, false)
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "tool_choice {other} is not supported; use none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
            )))
        }
    };
    if wanted.is_empty() {
        return match lazy {
            true => Ok(None),
            false => Err(ApiError::bad_request(
                "tool_choice asks for a tool call, but the request has no tools",
            )),
        };
    }
    Ok(Some(tool_call_format(&wanted, parallel, lazy)))
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with its `schema`.
fn response_format(v: Option<&Value>) -> Result<Option<Format>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Format::JsonObject)),
        "json_schema" => match v.get("json_schema").and_then(|s| s.get("schema")) {
            Some(schema) if schema.is_object() => Ok(Some(Format::JsonSchema(schema.clone()))),
            _ => Err(ApiError::bad_request(
                "response_format json_schema needs json_schema.schema, a JSON schema object",
            )),
        },
        other => Err(ApiError::bad_request(format!(
            "response_format type '{other}' is not supported; use text, json_object or json_schema"
        ))),
    }
}

/// A JSON array of messages in a chat completion request's form, as the chat template sees them
/// (for `qwen-run template`, which shows the prompt such a request gets).
pub fn messages_from_json(messages: Value) -> Result<Vec<Message>, String> {
    let msgs: Vec<InMessage> = serde_json::from_value(messages).map_err(|e| {
        format!("the messages are not an array of {{\"role\", \"content\", \"tool_calls\"}} objects: {e}")
    })?;
    to_messages(msgs).map_err(|e| e.message)
}

fn to_messages(msgs: Vec<InMessage>) -> Result<Vec<Message>, ApiError> {
    msgs.into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::bad_request(format!(
                                "content parts of type '{}' are not supported; this model reads text only",
                                p.kind
                            )));
                        }
                        s.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    s
                }
            };
            let role = match m.role.as_str() {
                "developer" => "system".to_string(),
                _ => m.role,
            };
            let tool_calls = match m.tool_calls {
                None | Some(Value::Null) => None,
                Some(v) => Some(normalize_tool_calls(&v)?),
            };
            Ok(Message {
                role,
                content,
                tool_calls,
            })
        })
        .collect()
}

fn usage(s: &Generation) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.reused_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": s.spec.accepted,
            "rejected_prediction_tokens": s.spec.drafted - s.spec.accepted,
        },
    })
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        // The client is gone; nobody reads this, but keep to the API's values.
        FinishReason::Cancelled => "stop",
        f => f.as_str(),
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

fn tool_call_json(c: &ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({
        "id": new_id("call_"),
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments_string()},
    });
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = state
        .pool
        .statuses()
        .iter()
        .map(|m| {
            let ctx = m.loaded.as_ref().map(|l| l.engine.ctx_size);
            json!({
                "id": m.spec.name,
                "object": "model",
                "created": state.created,
                "owned_by": "qwen-run",
                "status": {"value": super::api::model_state(m)},
                "meta": {
                    "n_ctx": ctx,
                    "n_ctx_train": m.spec.context_length,
                    "size": m.spec.file_size,
                },
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

impl ChatRequest {
    /// A chat body, its fields checked against what this server reads.
    fn parse(body: Result<Bytes, BytesRejection>) -> Result<ChatRequest, ApiError> {
        let req: ChatRequest = parse_body(body)?;
        fields::check(
            &req.extra,
            &[fields::OPENAI, fields::LLAMA_SAMPLERS],
            "the request",
        )?;
        Ok(req)
    }
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    chat_inner(state, body).await.unwrap_or_else(error)
}

async fn chat_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req = ChatRequest::parse(body)?;
    let logprobs = req.common.chat_logprobs()?;
    let keep_alive = keep_alive_field(&req.common.keep_alive)?;
    let (messages, tools) = req.conversation()?;
    let facts = RouteFacts::chat(&messages, tools.is_some());
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.common.model.as_deref()),
            &facts,
            keep_alive,
        )
        .await?;
    let calls = tool_choice_format(
        req.tool_choice.as_ref(),
        tools.as_ref(),
        req.parallel_tool_calls.unwrap_or(true),
    )?;
    let prompt = chat_prompt(&lease, &messages, tools.as_ref())?;
    let gen = req.common.request(&lease, prompt, None, calls, logprobs)?;
    let out = lease.submit(gen).await?.with_tools(tools.as_ref());
    let headers = out.headers();
    let id = new_id("chatcmpl-");
    let created = unix_now();
    let model = out.model_name();
    if !req.common.stream.unwrap_or(false) {
        let c = out.collect().await?;
        let s = c.summary.expect("checked by collect");
        let mut message = json!({"role": "assistant", "content": c.text});
        if !c.calls.is_empty() {
            let text = c.text.trim();
            message["content"] = if text.is_empty() {
                Value::Null
            } else {
                json!(text)
            };
            message["tool_calls"] = c.calls.iter().map(|c| tool_call_json(c, None)).collect();
        }
        return Ok(served_headers(
            Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": concat!("qwen-run-", env!("CARGO_PKG_VERSION")),
                "choices": [{
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs.map(|_| chat_logprobs(&c.logprobs)),
                    "finish_reason": finish_str(s.finish),
                }],
                "usage": usage(&s),
                "timings": timings(&s),
            }))
            .into_response(),
            &headers,
        ));
    }
    let include_usage = req.common.include_usage();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Option<&str>| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": concat!("qwen-run-", env!("CARGO_PKG_VERSION")),
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        };
        if tx
            .send(sse(&chunk(
                json!({"role": "assistant", "content": ""}),
                None,
            )))
            .await
            .is_err()
        {
            return;
        }
        let with_logprobs = |mut c: Value, lps: &[Logprob]| {
            if logprobs.is_some() {
                c["choices"][0]["logprobs"] = chat_logprobs(lps);
            }
            c
        };
        stream_events(out, &tx, |e, n_calls, lps| match e {
            OutEvent::Text(t) => Some(with_logprobs(chunk(json!({"content": t}), None), lps)),
            OutEvent::Call(c) => Some(with_logprobs(
                chunk(
                    json!({"tool_calls": [tool_call_json(&c, Some(n_calls))]}),
                    None,
                ),
                lps,
            )),
            OutEvent::Logprob(_) => None,
            OutEvent::Done(s) => {
                let mut end = with_logprobs(chunk(json!({}), Some(finish_str(s.finish))), lps);
                end["timings"] = timings(&s);
                let mut last = vec![end];
                if include_usage {
                    let mut u = chunk(json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    last.push(u);
                }
                Some(Value::Array(last))
            }
            OutEvent::Error(_) => None,
        })
        .await;
    });
    Ok(served_headers(
        stream_response("text/event-stream", rx),
        &headers,
    ))
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Chat's `logprobs` object.
fn chat_logprobs(lps: &[Logprob]) -> Value {
    json!({"content": lps.iter().map(logprob_json).collect::<Vec<_>>(), "refusal": null})
}

/// The completions endpoint's `logprobs` object; `offset`: where the first token's text starts,
/// in characters of the prompt and completion.
fn completion_logprobs(lps: &[Logprob], mut offset: usize) -> Value {
    let mut tokens = Vec::with_capacity(lps.len());
    let mut token_logprobs = Vec::with_capacity(lps.len());
    let mut top = Vec::with_capacity(lps.len());
    let mut offsets = Vec::with_capacity(lps.len());
    for lp in lps {
        tokens.push(json!(lp.token.text));
        token_logprobs.push(json!(lp.logprob));
        let alternatives: Map<String, Value> = lp
            .top
            .iter()
            .map(|(t, l)| (t.text.clone(), json!(l)))
            .collect();
        top.push(Value::Object(alternatives));
        offsets.push(json!(offset));
        offset += lp.token.text.chars().count();
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// Sends the SSE events of a generation, then `[DONE]`. `format` turns an event into one chunk
/// (or an array of chunks, for the end), given the logprobs of the tokens since the last chunk;
/// errors become an `error` event.
async fn stream_events(
    mut out: Output,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    mut format: impl FnMut(OutEvent, usize, &[Logprob]) -> Option<Value>,
) {
    let mut n_calls = 0;
    let mut saw_call = false;
    let mut logprobs = Vec::new();
    while let Some(e) = out.next().await {
        let chunks = match e {
            OutEvent::Logprob(lp) => {
                logprobs.push(lp);
                continue;
            }
            OutEvent::Error(msg) => {
                vec![json!({"error": {"message": msg, "type": "server_error", "code": 500}})]
            }
            // Whitespace between tool calls is not worth a chunk.
            OutEvent::Text(t) if saw_call && t.trim().is_empty() => continue,
            e => {
                let is_call = matches!(e, OutEvent::Call(_));
                let v = format(e, n_calls, &logprobs);
                logprobs.clear();
                if is_call {
                    n_calls += 1;
                    saw_call = true;
                }
                match v {
                    Some(Value::Array(a)) => a,
                    Some(v) => vec![v],
                    None => continue,
                }
            }
        };
        for c in chunks {
            if tx.send(sse(&c)).await.is_err() {
                return; // Client gone: dropping `out` stops the generation.
            }
        }
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completions_inner(state, body).await.unwrap_or_else(error)
}

async fn completions_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    fields::check(
        &req.extra,
        &[fields::OPENAI, fields::LLAMA_SAMPLERS],
        "the request",
    )?;
    let logprobs = req.common.completion_logprobs()?;
    let keep_alive = keep_alive_field(&req.common.keep_alive)?;
    let text = match req.prompt {
        PromptField::One(s) => s,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(ApiError::bad_request(
                "'prompt' must be one string (batches of prompts are not supported)",
            ))
        }
    };
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.common.model.as_deref()),
            &RouteFacts::prompt(&text),
            keep_alive,
        )
        .await?;
    let prompt_chars = text.chars().count();
    let prompt = match req.suffix.as_deref() {
        None => lease.tokenize(&text)?,
        Some(suffix) => lease.fill_in_middle(&text, suffix)?,
    };
    // OpenAI's default for this endpoint is 16 tokens.
    let gen = req
        .common
        .request(&lease, prompt, Some(16), None, logprobs)?;
    let out = lease.submit(gen).await?;
    let headers = out.headers();
    let id = new_id("cmpl-");
    let created = unix_now();
    let model = out.model_name();
    if !req.common.stream.unwrap_or(false) {
        let c = out.collect().await?;
        let s = c.summary.expect("checked by collect");
        return Ok(served_headers(Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": concat!("qwen-run-", env!("CARGO_PKG_VERSION")),
            "choices": [{"text": c.text, "index": 0, "logprobs": logprobs.map(|_| completion_logprobs(&c.logprobs, prompt_chars)), "finish_reason": finish_str(s.finish)}],
            "usage": usage(&s),
        }))
        .into_response(), &headers));
    }
    let include_usage = req.common.include_usage();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let chunk = |text: &str, finish: Option<&str>| {
            json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": concat!("qwen-run-", env!("CARGO_PKG_VERSION")),
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
            })
        };
        let mut offset = prompt_chars;
        let mut with_logprobs = move |mut c: Value, lps: &[Logprob]| {
            if logprobs.is_some() {
                c["choices"][0]["logprobs"] = completion_logprobs(lps, offset);
                offset += lps
                    .iter()
                    .map(|l| l.token.text.chars().count())
                    .sum::<usize>();
            }
            c
        };
        stream_events(out, &tx, |e, _, lps| match e {
            OutEvent::Text(t) => Some(with_logprobs(chunk(&t, None), lps)),
            OutEvent::Done(s) => {
                let mut last = vec![with_logprobs(chunk("", Some(finish_str(s.finish))), lps)];
                if include_usage {
                    let mut u = chunk("", None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    last.push(u);
                }
                Some(Value::Array(last))
            }
            _ => None,
        })
        .await;
    });
    Ok(served_headers(
        stream_response("text/event-stream", rx),
        &headers,
    ))
}

/// llama-server's `POST /apply-template`: a chat completion request's body, answered with the
/// prompt the chat endpoints would give the model (`{"prompt": ...}`), without generating. Its
/// sampling fields are read as the chat endpoint reads them and change nothing here.
pub async fn apply_template(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    apply_template_inner(state, body)
        .await
        .unwrap_or_else(error)
}

async fn apply_template_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req = ChatRequest::parse(body)?;
    let (messages, tools) = req.conversation()?;
    let facts = RouteFacts::chat(&messages, tools.is_some());
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.common.model.as_deref()),
            &facts,
            None,
        )
        .await?;
    let prompt = super::api::chat_text(&lease, &messages, tools.as_ref())?;
    Ok(Json(json!({"prompt": prompt})).into_response())
}
