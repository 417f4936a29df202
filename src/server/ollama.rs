//! The Ollama API: `POST /api/chat`, `POST /api/generate` (NDJSON streaming by default),
//! `GET /api/tags`, `POST /api/show`, `GET /api/version`.

use super::api::AppState;
use super::api::{
    chat_prompt, compile_format, logprob_json, model_state, normalize_tool_calls, parse_body,
    rfc3339, rfc3339_now, stream_response, tool_call_format, top_logprobs, Sampling,
};
use super::error::ApiError;
use super::fields;
use super::models::{keep_alive_field, KeepAlive, LoadedModel, ModelSpec};
use super::output::{served_headers, OutEvent, Output};
use super::protocol::{GenRequest, Logprob};
use super::routing::RouteFacts;
use crate::grammar::Format;
use crate::scheduler::{FinishReason, Generation};
use crate::tokenizer::Message;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
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
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(flatten)]
    extra: Map<String, Value>,
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
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(flatten)]
    logprobs: LogprobsFields,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Recent Ollama's `logprobs` and `top_logprobs`.
#[derive(Deserialize, Default)]
struct LogprobsFields {
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<i64>,
}

impl LogprobsFields {
    fn wanted(&self) -> Result<Option<usize>, ApiError> {
        let top = top_logprobs("top_logprobs", self.top_logprobs)?;
        Ok((self.logprobs == Some(true) || top > 0).then_some(top))
    }
}

#[derive(Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    /// Text after the insertion point: the prompt and this are filled in the middle.
    #[serde(default)]
    suffix: Option<String>,
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
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(flatten)]
    logprobs: LogprobsFields,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Ollama's `format`: `"json"`, or a JSON schema.
fn format_field(v: Option<&Value>) -> Result<Option<Format>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Format::JsonObject)),
        Some(schema @ Value::Object(_)) => Ok(Some(Format::JsonSchema(schema.clone()))),
        Some(other) => Err(ApiError::bad_request(format!(
            "format {other} is not supported; use \"json\" or a JSON schema object"
        ))),
    }
}

/// Ollama's answer to a request with nothing to generate: load the model, or unload it with
/// `keep_alive: 0`.
async fn load_or_unload(
    state: &Arc<AppState>,
    model: Option<&str>,
    keep: Option<KeepAlive>,
    empty: Value,
) -> Result<Response, ApiError> {
    let (name, reason) = if keep == Some(Some(std::time::Duration::ZERO)) {
        state.pool.unload(model)?;
        (state.pool.find(model)?.name.clone(), "unload")
    } else {
        let lease = state
            .pool
            .acquire(model, &RouteFacts::default(), keep)
            .await?;
        (lease.name.clone(), "load")
    };
    let head = json!({
        "model": name, "created_at": rfc3339_now(), "done_reason": reason, "done": true,
    });
    Ok(Json(merge(head, empty)).into_response())
}

fn gen_request(
    model: &LoadedModel,
    prompt: Vec<u32>,
    options: Option<Options>,
    format: Option<Format>,
    logprobs: Option<usize>,
) -> Result<GenRequest, ApiError> {
    let o = options.unwrap_or_default();
    fields::check(&o.extra, &[fields::OLLAMA_OPTIONS], "options")?;
    if let Some(n) = o.num_ctx {
        if n > model.engine.ctx_size as i64 {
            return Err(ApiError::bad_request(format!(
                "options.num_ctx {n} exceeds the server's context of {} tokens; restart `qwen-run serve` with --ctx-size {n} (the model supports up to {})",
                model.engine.ctx_size,
                model.engine.config().context_length
            )));
        }
    }
    let sampling = Sampling {
        temperature: o.temperature,
        top_p: o.top_p,
        top_k: o.top_k,
        min_p: o.min_p,
        repeat_penalty: o.repeat_penalty,
        repeat_last_n: o.repeat_last_n,
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        logit_bias: None,
        seed: o.seed,
    };
    let params = sampling.params(model.engine.config().vocab_size)?;
    Ok(GenRequest {
        prompt,
        // -1: until the model stops, -2: until the context is full; both are "no limit" here.
        max_tokens: model.budget(o.num_predict),
        deterministic: sampling.deterministic(&params),
        params,
        stop: o.stop.unwrap_or_default(),
        format: compile_format(model, format)?,
        logprobs,
        spec: None,
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

fn done_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length | FinishReason::ContextFull => "length",
        _ => "stop",
    }
}

fn stats(s: &Generation) -> Value {
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
    fields::check(&req.extra, &[fields::OLLAMA], "the request")?;
    let logprobs = req.logprobs.wanted()?;
    let keep = keep_alive_field(&req.keep_alive)?;
    if req.messages.is_empty() {
        let empty = json!({"message": {"role": "assistant", "content": ""}});
        return load_or_unload(&state, req.model.as_deref(), keep, empty).await;
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
    let facts = RouteFacts::chat(&messages, tools.is_some());
    let lease = state
        .pool
        .acquire(req.model.as_deref(), &facts, keep)
        .await?;
    let prompt = chat_prompt(&lease, &messages, tools.as_ref())?;
    // A tool call, once the model begins one, is held to the listed tools (OpenAI's
    // tool_choice "auto"); a `format` holds the whole answer instead.
    let calls = match (&tools, format_field(req.format.as_ref())?) {
        (_, Some(f)) => Some(f),
        (Some(Value::Array(t)), None) => {
            Some(tool_call_format(&t.iter().collect::<Vec<_>>(), true, true))
        }
        (_, None) => None,
    };
    let gen = gen_request(&lease, prompt, req.options, calls, logprobs)?;
    let out = lease.submit(gen).await?.with_tools(tools.as_ref());
    let headers = out.headers();
    let model = out.model_name();
    if !req.stream.unwrap_or(true) {
        let c = out.collect().await?;
        let s = c.summary.expect("checked by collect");
        let mut message = json!({"role": "assistant", "content": c.text});
        if !c.calls.is_empty() {
            message["content"] = json!(c.text.trim());
            message["tool_calls"] = c.calls.iter().map(call_json).collect();
        }
        let mut head = json!({
            "model": model, "created_at": rfc3339_now(), "message": message,
            "done_reason": done_reason(s.finish), "done": true,
        });
        add_logprobs(&mut head, logprobs, &c.logprobs);
        return Ok(served_headers(
            Json(merge(head, stats(&s))).into_response(),
            &headers,
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        stream_lines(out, &tx, logprobs, |e| match e {
            OutEvent::Text(t) => json!({
                "model": model, "created_at": rfc3339_now(),
                "message": {"role": "assistant", "content": t}, "done": false,
            }),
            OutEvent::Logprob(_) => Value::Null,
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
    Ok(served_headers(
        stream_response("application/x-ndjson", rx),
        &headers,
    ))
}

/// Adds `logprobs` to a response object when the request asked for them.
fn add_logprobs(v: &mut Value, wanted: Option<usize>, lps: &[Logprob]) {
    if wanted.is_some() {
        v["logprobs"] = lps.iter().map(logprob_json).collect();
    }
}

/// Sends a generation as NDJSON lines, each with the logprobs of its tokens when `logprobs`.
async fn stream_lines(
    mut out: Output,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    logprobs: Option<usize>,
    format: impl Fn(OutEvent) -> Value,
) {
    let mut saw_call = false;
    let mut pending = Vec::new();
    while let Some(e) = out.next().await {
        match e {
            OutEvent::Logprob(lp) => {
                pending.push(lp);
                continue;
            }
            OutEvent::Text(ref t) if saw_call && t.trim().is_empty() => continue,
            OutEvent::Call(_) => saw_call = true,
            _ => {}
        }
        let mut v = format(e);
        if v.is_null() {
            continue;
        }
        if v.get("error").is_none() {
            add_logprobs(&mut v, logprobs, &pending);
            pending.clear();
        }
        let line = format!("{v}\n");
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
    fields::check(&req.extra, &[fields::OLLAMA], "the request")?;
    let logprobs = req.logprobs.wanted()?;
    no_images(&req.images)?;
    let keep = keep_alive_field(&req.keep_alive)?;
    let prompt_text = req.prompt.unwrap_or_default();
    if prompt_text.is_empty() {
        let empty = json!({"response": ""});
        return load_or_unload(&state, req.model.as_deref(), keep, empty).await;
    }
    let lease = state
        .pool
        .acquire(
            req.model.as_deref(),
            &RouteFacts::prompt(&prompt_text),
            keep,
        )
        .await?;
    let prompt = if let Some(suffix) = req.suffix.as_deref().filter(|s| !s.is_empty()) {
        lease.fill_in_middle(&prompt_text, suffix)?
    } else if req.raw.unwrap_or(false) {
        lease.tokenize(&prompt_text)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = req.system.filter(|s| !s.is_empty()) {
            messages.push(Message::new("system", &s));
        }
        messages.push(Message::new("user", &prompt_text));
        let text = lease
            .engine
            .template
            .render(&messages, None, true)
            .map_err(super::api::template_error)?;
        lease.tokenize(&text)?
    };
    let format = format_field(req.format.as_ref())?;
    let gen = gen_request(&lease, prompt, req.options, format, logprobs)?;
    let out = lease.submit(gen).await?;
    let headers = out.headers();
    let model = out.model_name();
    if !req.stream.unwrap_or(true) {
        let c = out.collect().await?;
        let s = c.summary.expect("checked by collect");
        let mut head = json!({
            "model": model, "created_at": rfc3339_now(), "response": c.text,
            "done_reason": done_reason(s.finish), "done": true,
        });
        add_logprobs(&mut head, logprobs, &c.logprobs);
        return Ok(served_headers(
            Json(merge(head, stats(&s))).into_response(),
            &headers,
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        stream_lines(out, &tx, logprobs, |e| match e {
            OutEvent::Text(t) => json!({
                "model": model, "created_at": rfc3339_now(), "response": t, "done": false,
            }),
            OutEvent::Call(_) | OutEvent::Logprob(_) => Value::Null,
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
    Ok(served_headers(
        stream_response("application/x-ndjson", rx),
        &headers,
    ))
}

fn details(spec: &ModelSpec) -> Value {
    let file_type = spec.file_type;
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": "qwen2",
        "families": ["qwen2"],
        "parameter_size": format!(
            "{:.2}B",
            spec.parameters as f64 / 1e9
        ),
        "quantization_level": file_type.map_or(String::new(), quantization_name),
    })
}

/// Ollama's name for llama.cpp's `general.file_type` (its `details.quantization_level`).
fn quantization_name(file_type: u64) -> String {
    let name = match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4",
        other => return format!("file type {other}"),
    };
    name.to_string()
}

/// A GGUF metadata value as JSON; arrays (the vocabulary, the merges) only when `verbose`, else
/// null, as Ollama shows them.
fn metadata_json(v: &crate::gguf::Value, verbose: bool) -> Value {
    use crate::gguf::Value as G;
    match v {
        G::U8(x) => json!(x),
        G::I8(x) => json!(x),
        G::U16(x) => json!(x),
        G::I16(x) => json!(x),
        G::U32(x) => json!(x),
        G::I32(x) => json!(x),
        G::U64(x) => json!(x),
        G::I64(x) => json!(x),
        // Through its shortest decimal form: 1e-6, not the f64 nearest to the f32 nearest to it.
        G::F32(x) => json!(x.to_string().parse::<f64>().unwrap_or(*x as f64)),
        G::F64(x) => json!(x),
        G::Bool(x) => json!(x),
        G::String(s) => json!(s),
        G::Array(items) if verbose => items.iter().map(|i| metadata_json(i, true)).collect(),
        G::Array(_) => Value::Null,
    }
}

fn modified_at(spec: &ModelSpec) -> String {
    std::fs::metadata(&spec.opts.model)
        .and_then(|m| m.modified())
        .map_or_else(|_| rfc3339_now(), rfc3339)
}

pub async fn tags(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Value> = state
        .pool
        .statuses()
        .iter()
        .map(|m| {
            json!({
                "name": m.spec.name,
                "model": m.spec.name,
                "modified_at": modified_at(m.spec),
                "size": m.spec.file_size,
                "digest": "",
                "details": details(m.spec),
                "state": model_state(m),
            })
        })
        .chain(state.pool.copies().into_iter().map(|(name, spec)| {
            json!({
                "name": name,
                "model": name,
                "modified_at": modified_at(spec),
                "size": spec.file_size,
                "digest": "",
                "details": details(spec),
                "copy_of": spec.name,
            })
        }))
        .collect();
    Json(json!({"models": models})).into_response()
}

/// The loaded models, with when each will be unloaded.
pub async fn ps(State(state): State<Arc<AppState>>) -> Response {
    let now_instant = std::time::Instant::now();
    let now = std::time::SystemTime::now();
    let models: Vec<Value> = state
        .pool
        .statuses()
        .iter()
        .filter_map(|m| {
            let loaded = m.loaded.as_ref()?;
            let size = m.spec.file_size;
            let on_gpu = loaded.engine.placement().gpu().is_some();
            // Ollama writes a far-off date for a model kept for good.
            let expires = match loaded.expires() {
                Some(t) => rfc3339(now + t.saturating_duration_since(now_instant)),
                None => "2318-01-01T00:00:00.000000000Z".to_string(),
            };
            Some(json!({
                "name": m.spec.name,
                "model": m.spec.name,
                "size": size,
                "digest": "",
                "details": details(m.spec),
                "expires_at": expires,
                "size_vram": if on_gpu { size } else { 0 },
                "context_length": loaded.engine.ctx_size,
            }))
        })
        .collect();
    Json(json!({"models": models})).into_response()
}

/// `POST /api/show`: the model's Modelfile (as `ollama show --modelfile` writes one), its
/// parameters (the server's sampling defaults, and its context once loaded), its chat template
/// (Jinja here, where Ollama's are Go templates), details with the quantization's name, and
/// `model_info`: the GGUF file's metadata (arrays only with `verbose`, as Ollama).
pub async fn show(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    show_inner(state, body).await.unwrap_or_else(error)
}

async fn show_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    struct ShowRequest {
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        verbose: Option<bool>,
        #[serde(flatten)]
        extra: Map<String, Value>,
    }
    let req: ShowRequest = parse_body(body)?;
    fields::check(&req.extra, &[fields::OLLAMA_SHOW], "the request")?;
    let spec = state
        .pool
        .find(req.model.as_deref().or(req.name.as_deref()))?;
    let ctx = state
        .pool
        .statuses()
        .iter()
        .find(|s| s.spec.name == spec.name)
        .and_then(|s| s.loaded.as_ref().map(|m| m.engine.ctx_size));
    let verbose = req.verbose.unwrap_or(false);
    let (template, model_info) = super::api::off_runtime(|| -> anyhow::Result<_> {
        let template = spec.chat_template()?;
        let gguf = crate::gguf::GgufFile::open(&spec.opts.model)?;
        let mut info: Map<String, Value> = gguf
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), metadata_json(v, verbose)))
            .collect();
        info.entry("general.parameter_count")
            .or_insert(json!(spec.parameters));
        Ok((template, info))
    })
    .map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the model file of '{}': {e:#}", spec.name),
        )
    })?;
    let d = crate::sampler::SamplingParams::default();
    let mut parameters: Vec<(&str, String)> = ctx
        .map(|n| ("num_ctx", n.to_string()))
        .into_iter()
        .collect();
    parameters.extend([
        ("temperature", d.temperature.to_string()),
        ("top_k", d.top_k.to_string()),
        ("top_p", d.top_p.to_string()),
        ("min_p", d.min_p.to_string()),
        ("repeat_penalty", d.repeat_penalty.to_string()),
        ("repeat_last_n", d.repeat_last_n.to_string()),
    ]);
    let mut modelfile = format!(
        "# Modelfile of '{name}', as `ollama show --modelfile` writes one. TEMPLATE is the model's\n# Jinja chat template (Ollama's are Go templates).\n# FROM {name}\n\nFROM {path}\nTEMPLATE \"\"\"{template}\"\"\"\n",
        name = spec.name,
        path = spec.opts.model.display(),
    );
    for (k, v) in &parameters {
        modelfile.push_str(&format!("PARAMETER {k} {v}\n"));
    }
    let parameters = parameters
        .iter()
        .map(|(k, v)| format!("{k:<30} {v}"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut capabilities = vec!["completion", "tools"];
    if state.pool.embeddings() {
        capabilities.push("embedding");
    }
    Ok(Json(json!({
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": details(spec),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": modified_at(spec),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct CopyRequest {
    source: String,
    destination: String,
}

/// `POST /api/copy` `{"source", "destination"}`: another name for a served model, listed by
/// `/api/tags` and answered by every endpoint, until `/api/delete` removes it (or the server
/// stops: names are not kept across restarts).
pub async fn copy(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Response, ApiError> {
        let req: CopyRequest = parse_body(body)?;
        state.pool.copy(&req.source, &req.destination)?;
        Ok(Json(json!({})).into_response())
    };
    run().unwrap_or_else(error)
}

/// `POST /api/pull`: refused (501). The server serves the models it was started with; `-hf
/// REPO[:QUANT]` downloads one at startup.
pub async fn pull() -> Response {
    error(ApiError::new(
        axum::http::StatusCode::NOT_IMPLEMENTED,
        "qwen-run does not pull models while it runs: start `qwen-run serve -hf REPO[:QUANT]` (e.g. -hf Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M) to download and serve one, or -m FILE.gguf",
    ))
}

#[derive(Deserialize)]
struct DeleteRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// `DELETE /api/delete` `{"model"}`: removes a name `/api/copy` made. A served model file is
/// not deleted (a 400 that says so).
pub async fn delete(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Response, ApiError> {
        let req: DeleteRequest = parse_body(body)?;
        let name = req
            .model
            .or(req.name)
            .ok_or_else(|| ApiError::bad_request("'model' is required"))?;
        state.pool.delete(&name)?;
        Ok(Json(json!({})).into_response())
    };
    run().unwrap_or_else(error)
}

pub async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}
