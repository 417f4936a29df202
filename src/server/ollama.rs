//! The Ollama API: `POST /api/chat`, `POST /api/generate` (NDJSON streaming by default),
//! `GET /api/tags`, `POST /api/show`, `GET /api/version`.

use super::state::{ApiError, AppState, Finish, GenRequest, OutEvent, Output, Summary};
use super::{
    chat_prompt, normalize_tool_calls, parse_body, rfc3339_now, stream_response, Sampling,
};
use crate::tokenizer::Message;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn error(e: ApiError) -> Response {
    e.response(json!({"error": e.message}))
}

#[derive(Deserialize, Default)]
struct Options {
    #[serde(default)]
    num_ctx: Option<i64>,
    #[serde(default)]
    num_predict: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<i64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Vec<InMessage>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Options>,
    /// Accepted and ignored: the model stays loaded for the server's lifetime.
    #[serde(default, rename = "keep_alive")]
    _keep_alive: Option<Value>,
}

#[derive(Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: Option<bool>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Options>,
    #[serde(default, rename = "keep_alive")]
    _keep_alive: Option<Value>,
}

fn gen_request(
    state: &AppState,
    prompt: Vec<u32>,
    options: Option<Options>,
) -> Result<GenRequest, ApiError> {
    let o = options.unwrap_or_default();
    if let Some(n) = o.num_ctx {
        if n > state.engine.ctx_size as i64 {
            return Err(ApiError::bad_request(format!(
                "options.num_ctx {n} exceeds the server's context of {} tokens; restart `qwen-run serve` with --ctx-size {n} (the model supports up to {})",
                state.engine.ctx_size,
                state.engine.config().context_length
            )));
        }
    }
    let params = Sampling {
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k,
        min_p: o.min_p,
        repeat_penalty: o.repeat_penalty,
        repeat_last_n: o.repeat_last_n,
        seed: o.seed,
    }
    .params()?;
    Ok(GenRequest {
        prompt,
        // -1: until the model stops, -2: until the context is full; both are "no limit" here.
        max_tokens: state.budget(o.num_predict)?,
        params,
        stop: o.stop.unwrap_or_default(),
    })
}

fn no_images(images: &Option<Vec<Value>>) -> Result<(), ApiError> {
    match images {
        Some(v) if !v.is_empty() => Err(ApiError::bad_request(
            "images are not supported; this model reads text only",
        )),
        _ => Ok(()),
    }
}

fn done_reason(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        _ => "stop",
    }
}

fn stats(s: &Summary) -> Value {
    json!({
        "total_duration": s.total_time.as_nanos() as u64,
        "load_duration": s.queue_time.as_nanos() as u64,
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": s.prefill_time.as_nanos() as u64,
        "eval_count": s.completion_tokens,
        "eval_duration": s.decode_time.as_nanos() as u64,
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn call_json(c: &super::tool_calls::ToolCall) -> Value {
    json!({"function": {"name": c.name, "arguments": c.arguments_object()}})
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
    let req: ChatRequest = parse_body(body)?;
    state.check_model(req.model.as_deref())?;
    let model = state.model_name.clone();
    if req.messages.is_empty() {
        // Ollama answers an empty chat by loading the model.
        return Ok(Json(json!({
            "model": model, "created_at": rfc3339_now(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": "load", "done": true,
        }))
        .into_response());
    }
    let tools = match &req.tools {
        Some(Value::Array(a)) if !a.is_empty() => Some(Value::Array(a.clone())),
        Some(Value::Array(_)) | Some(Value::Null) | None => None,
        Some(_) => return Err(ApiError::bad_request("'tools' must be an array")),
    };
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        no_images(&m.images)?;
        let tool_calls = match m.tool_calls {
            None | Some(Value::Null) => None,
            Some(v) => Some(normalize_tool_calls(&v)?),
        };
        messages.push(Message {
            role: m.role,
            content: m.content.unwrap_or_default(),
            tool_calls,
        });
    }
    let prompt = chat_prompt(&state, &messages, tools.as_ref())?;
    let gen = gen_request(&state, prompt, req.options)?;
    let out = state.submit(gen)?.with_tools(tools.as_ref());
    if !req.stream.unwrap_or(true) {
        let c = out.collect().await?;
        let s = c.summary.expect("checked by collect");
        let mut message = json!({"role": "assistant", "content": c.text});
        if !c.calls.is_empty() {
            message["content"] = json!(c.text.trim());
            message["tool_calls"] = c.calls.iter().map(call_json).collect();
        }
        let head = json!({
            "model": model, "created_at": rfc3339_now(), "message": message,
            "done_reason": done_reason(s.finish), "done": true,
        });
        return Ok(Json(merge(head, stats(&s))).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        stream_lines(out, &tx, |e| match e {
            OutEvent::Text(t) => json!({
                "model": model, "created_at": rfc3339_now(),
                "message": {"role": "assistant", "content": t}, "done": false,
            }),
            OutEvent::Call(c) => json!({
                "model": model, "created_at": rfc3339_now(),
                "message": {"role": "assistant", "content": "", "tool_calls": [call_json(&c)]},
                "done": false,
            }),
            OutEvent::Done(s) => merge(
                json!({
                    "model": model, "created_at": rfc3339_now(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": done_reason(s.finish), "done": true,
                }),
                stats(&s),
            ),
            OutEvent::Error(msg) => json!({"error": msg}),
        })
        .await;
    });
    Ok(stream_response("application/x-ndjson", rx))
}

async fn stream_lines(
    mut out: Output,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    format: impl Fn(OutEvent) -> Value,
) {
    let mut saw_call = false;
    while let Some(e) = out.next().await {
        match &e {
            OutEvent::Text(t) if saw_call && t.trim().is_empty() => continue,
            OutEvent::Call(_) => saw_call = true,
            _ => {}
        }
        let line = format!("{}\n", format(e));
        if tx.send(Bytes::from(line)).await.is_err() {
            return; // Client gone: dropping `out` stops the generation.
        }
    }
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate_inner(state, body).await.unwrap_or_else(error)
}

async fn generate_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: GenerateRequest = parse_body(body)?;
    state.check_model(req.model.as_deref())?;
    no_images(&req.images)?;
    let model = state.model_name.clone();
    let prompt_text = req.prompt.unwrap_or_default();
    if prompt_text.is_empty() {
        // Ollama answers an empty prompt by loading the model.
        return Ok(Json(json!({
            "model": model, "created_at": rfc3339_now(), "response": "",
            "done_reason": "load", "done": true,
        }))
        .into_response());
    }
    let text = if req.raw.unwrap_or(false) {
        prompt_text
    } else {
        let mut messages = Vec::new();
        if let Some(s) = req.system.filter(|s| !s.is_empty()) {
            messages.push(Message::new("system", &s));
        }
        messages.push(Message::new("user", &prompt_text));
        state
            .engine
            .template
            .render(&messages, None, true)
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?
    };
    let prompt = state.tokenize(&text)?;
    let gen = gen_request(&state, prompt, req.options)?;
    let out = state.submit(gen)?;
    if !req.stream.unwrap_or(true) {
        let c = out.collect().await?;
        let s = c.summary.expect("checked by collect");
        let head = json!({
            "model": model, "created_at": rfc3339_now(), "response": c.text,
            "done_reason": done_reason(s.finish), "done": true,
        });
        return Ok(Json(merge(head, stats(&s))).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        stream_lines(out, &tx, |e| match e {
            OutEvent::Text(t) => json!({
                "model": model, "created_at": rfc3339_now(), "response": t, "done": false,
            }),
            OutEvent::Call(_) => Value::Null,
            OutEvent::Done(s) => merge(
                json!({
                    "model": model, "created_at": rfc3339_now(), "response": "",
                    "done_reason": done_reason(s.finish), "done": true,
                }),
                stats(&s),
            ),
            OutEvent::Error(msg) => json!({"error": msg}),
        })
        .await;
    });
    Ok(stream_response("application/x-ndjson", rx))
}

fn details(state: &AppState) -> Value {
    let g = &state.engine.gguf;
    let file_type = g
        .get("general.file_type")
        .and_then(crate::gguf::Value::as_u64);
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": "qwen2",
        "families": ["qwen2"],
        "parameter_size": format!(
            "{:.2}B",
            g.tensors.iter().map(|t| t.elements()).sum::<usize>() as f64 / 1e9
        ),
        "quantization_level": file_type.map_or(String::new(), |t| format!("file type {t}")),
    })
}

pub async fn tags(State(state): State<Arc<AppState>>) -> Response {
    let size = state.engine.gguf.file_size();
    Json(json!({
        "models": [{
            "name": state.model_name,
            "model": state.model_name,
            "modified_at": rfc3339_now(),
            "size": size,
            "digest": "",
            "details": details(&state),
        }],
    }))
    .into_response()
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    #[derive(Deserialize)]
    struct ShowRequest {
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        name: Option<String>,
    }
    let req: ShowRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    if let Err(e) = state.check_model(req.model.as_deref().or(req.name.as_deref())) {
        return error(e);
    }
    let template = state
        .engine
        .gguf
        .get("tokenizer.chat_template")
        .and_then(crate::gguf::Value::as_str)
        .unwrap_or("")
        .to_string();
    Json(json!({
        "modelfile": "",
        "parameters": "",
        "template": template,
        "details": details(&state),
        "model_info": {
            "general.architecture": "qwen2",
            "qwen2.context_length": state.engine.ctx_size,
        },
        "capabilities": ["completion", "tools"],
    }))
    .into_response()
}

pub async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}
