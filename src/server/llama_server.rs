//! llama-server's own endpoints: `POST /completion` (a prompt as text or token ids, with its GBNF
//! `grammar`, `json_schema` and `n_probs`) and `POST /infill` (fill in the middle), streaming as
//! llama-server does: SSE `data:` objects, the last with `"stop": true`; and its tools around
//! them: `/tokenize`, `/detokenize`, `GET /props`, `GET /slots` (`/apply-template` is in
//! [`openai`](super::openai), since it takes a chat completion's body).

use super::api::{
    compile_format, grammar_fields, parse_body, stream_response, timings, top_logprobs, AppState,
    Sampling,
};
use super::error::ApiError;
use super::fields;
use super::models::LoadedModel;
use super::output::{served_headers, OutEvent};
use super::protocol::{GenRequest, Logprob, SlotAction, SlotReply};
use super::routing::RouteFacts;
use crate::prefix_cache::{load_session, save_session};
use crate::scheduler::{FinishReason, Generation};
use crate::speculative::SpecConfig;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub fn error(e: ApiError) -> Response {
    let kind = match e.status {
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::NOT_IMPLEMENTED => "not_supported_error",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    e.response(json!({"error": {"code": e.status.as_u16(), "message": e.message, "type": kind}}))
}

/// `prompt`: text, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Tokens(Vec<u32>),
}

/// The fields `/completion` and `/infill` share.
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n_predict: Option<i64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    top_p: Option<f32>,
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
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    grammar: Option<String>,
    #[serde(default)]
    json_schema: Option<Value>,
    /// Alternatives to report per token (llama-server's `completion_probabilities`).
    #[serde(default)]
    n_probs: Option<i64>,
    /// Most drafted tokens per step (0: no speculation for this request).
    #[serde(default, rename = "speculative.n_max")]
    spec_n_max: Option<usize>,
    #[serde(default, rename = "speculative.n_min")]
    spec_n_min: Option<usize>,
    /// The draft model's confidence floor (no effect without a draft model).
    #[serde(default, rename = "speculative.p_min")]
    spec_p_min: Option<f32>,
    #[serde(default)]
    model: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct InfillRequest {
    #[serde(default)]
    input_prefix: String,
    #[serde(default)]
    input_suffix: String,
    /// Other files for context: `[{"filename": ..., "text": ...}]`.
    #[serde(default)]
    input_extra: Vec<ExtraFile>,
    /// Text the middle starts with.
    #[serde(default)]
    prompt: String,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ExtraFile {
    #[serde(default)]
    filename: String,
    #[serde(default)]
    text: String,
}

impl Common {
    fn request(&self, model: &LoadedModel, prompt: Vec<u32>) -> Result<GenRequest, ApiError> {
        fields::check(
            &self.extra,
            &[fields::LLAMA_SERVER, fields::LLAMA_SAMPLERS],
            "the request",
        )?;
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
        let format = grammar_fields(self.grammar.as_deref(), self.json_schema.as_ref())?;
        let logprobs = match self.n_probs {
            None | Some(0) => None,
            n => Some(top_logprobs("n_probs", n)?),
        };
        Ok(GenRequest {
            prompt,
            max_tokens: model.budget(self.n_predict),
            deterministic: sampling.deterministic(&params),
            params,
            stop: self.stop.clone().unwrap_or_default(),
            format: compile_format(model, format)?,
            logprobs,
            spec: self.spec(model)?,
        })
    }
}

impl Common {
    /// The model's speculation with the request's `speculative.n_max` / `n_min` / `p_min`, if
    /// it sets them.
    fn spec(&self, model: &LoadedModel) -> Result<Option<SpecConfig>, ApiError> {
        if self.spec_n_max.is_none() && self.spec_n_min.is_none() && self.spec_p_min.is_none() {
            return Ok(None);
        }
        let mut spec = model.engine.spec;
        if let Some(n) = self.spec_n_max {
            spec.n_max = n;
        }
        if let Some(n) = self.spec_n_min {
            spec.n_min = n;
        }
        if let Some(p) = self.spec_p_min {
            spec.p_min = p;
        }
        spec.check().map_err(|e| {
            ApiError::bad_request(format!(
                "speculative.n_max / speculative.n_min / speculative.p_min: {e:#}"
            ))
        })?;
        Ok(Some(spec))
    }
}

pub async fn completion(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completion_inner(state, body).await.unwrap_or_else(error)
}

async fn completion_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    let facts = match &req.prompt {
        PromptField::Text(t) => RouteFacts::prompt(t),
        PromptField::Tokens(_) => RouteFacts::default(),
    };
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.common.model.as_deref()),
            &facts,
            None,
        )
        .await?;
    let prompt = match req.prompt {
        PromptField::Text(t) => lease.tokenize(&t)?,
        PromptField::Tokens(ids) => lease.check_tokens(ids)?,
    };
    let gen = req.common.request(&lease, prompt)?;
    respond(lease, gen, req.common.stream.unwrap_or(false)).await
}

pub async fn infill(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infill_inner(state, body).await.unwrap_or_else(error)
}

async fn infill_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: InfillRequest = parse_body(body)?;
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.common.model.as_deref()),
            &RouteFacts::prompt(&req.input_prefix),
            None,
        )
        .await?;
    // Other files go before the one being edited, as Qwen2.5-Coder's repository format has it.
    let mut prefix = String::new();
    for f in &req.input_extra {
        prefix.push_str(&format!("<|file_sep|>{}\n{}", f.filename, f.text));
    }
    if !prefix.is_empty() {
        prefix.push_str("<|file_sep|>");
    }
    prefix.push_str(&req.input_prefix);
    let mut prompt = lease.fill_in_middle(&prefix, &req.input_suffix)?;
    if !req.prompt.is_empty() {
        prompt.extend(lease.tokenize(&req.prompt)?);
        prompt = lease.check_tokens(prompt)?;
    }
    let gen = req.common.request(&lease, prompt)?;
    respond(lease, gen, req.common.stream.unwrap_or(false)).await
}

/// llama-server's `stop_type`.
fn stop_type(f: FinishReason, stopped_by_word: bool) -> &'static str {
    match f {
        FinishReason::Length | FinishReason::ContextFull => "limit",
        _ if stopped_by_word => "word",
        _ => "eos",
    }
}

/// llama-server's `completion_probabilities` entries.
fn probabilities(lps: &[Logprob]) -> Vec<Value> {
    lps.iter()
        .map(|lp| {
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|(t, l)| json!({"token": t.text, "bytes": t.bytes, "logprob": l}))
                .collect();
            json!({"token": lp.token.text, "bytes": lp.token.bytes, "logprob": lp.logprob, "top_logprobs": top})
        })
        .collect()
}

async fn respond(
    lease: super::models::ModelLease,
    gen: GenRequest,
    stream: bool,
) -> Result<Response, ApiError> {
    let wants_probs = gen.logprobs.is_some();
    let stops = gen.stop.clone();
    let out = lease.submit(gen).await?;
    let headers = out.headers();
    let model = out.model_name();
    let end = move |s: &Generation| {
        // Stopped, without the end-of-generation token: a stop string ended it.
        let by_word = s.finish == FinishReason::Stop && s.completion_tokens == s.tokens.len();
        let word = match &stops[..] {
            [only] if by_word => only.clone(),
            _ => String::new(),
        };
        json!({
            "model": model,
            "stop": true,
            "stop_type": stop_type(s.finish, by_word),
            "stopping_word": word,
            "tokens_predicted": s.completion_tokens,
            "tokens_evaluated": s.prompt_tokens,
            "tokens_cached": s.reused_tokens,
            "truncated": false,
            "timings": timings(s),
        })
    };
    if !stream {
        let c = out.collect().await?;
        let s = c.summary.expect("checked by collect");
        let mut v = end(&s);
        v["content"] = json!(c.text);
        if wants_probs {
            v["completion_probabilities"] = json!(probabilities(&c.logprobs));
        }
        return Ok(served_headers(Json(v).into_response(), &headers));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let mut out = out;
        let mut pending = Vec::new();
        while let Some(e) = out.next().await {
            let v = match e {
                OutEvent::Logprob(lp) => {
                    pending.push(lp);
                    continue;
                }
                OutEvent::Text(t) => {
                    let mut v = json!({"content": t, "stop": false});
                    if wants_probs {
                        v["completion_probabilities"] = json!(probabilities(&pending));
                        pending.clear();
                    }
                    v
                }
                OutEvent::Call(_) => continue,
                OutEvent::Done(s) => {
                    let mut v = end(&s);
                    v["content"] = json!("");
                    v
                }
                OutEvent::Error(msg) => {
                    json!({"error": {"code": 500, "message": msg, "type": "server_error"}})
                }
            };
            if tx
                .send(Bytes::from(format!("data: {v}\n\n")))
                .await
                .is_err()
            {
                return; // Client gone: dropping `out` stops the generation.
            }
        }
    });
    Ok(served_headers(
        stream_response("text/event-stream", rx),
        &headers,
    ))
}

#[derive(Deserialize)]
struct TokenizeRequest {
    content: String,
    /// Put the model's BOS first (where the model asks for one).
    #[serde(default)]
    add_special: bool,
    /// Read control tokens written in the text (`<|im_start|>`) as those tokens.
    #[serde(default = "yes")]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
    #[serde(default)]
    model: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn yes() -> bool {
    true
}

/// A token's text for `with_pieces`: a string when its bytes are UTF-8 on their own, else the
/// bytes, as llama-server writes it.
fn piece_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => json!(s),
        Err(_) => json!(bytes),
    }
}

/// `POST /tokenize`: `{"tokens": [ids]}`, or with `with_pieces` `[{"id", "piece"}]`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    tokenize_inner(state, body).await.unwrap_or_else(error)
}

async fn tokenize_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: TokenizeRequest = parse_body(body)?;
    fields::check(&req.extra, &[], "the request")?;
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.model.as_deref()),
            &RouteFacts::prompt(&req.content),
            None,
        )
        .await?;
    let tok = &lease.engine.tokenizer;
    let tokens = super::api::off_runtime(|| -> Result<Value, ApiError> {
        let ids = tok
            .encode_with(&req.content, req.add_special, req.parse_special)
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        Ok(if req.with_pieces {
            ids.iter()
                .map(|&id| json!({"id": id, "piece": piece_json(tok.piece(id))}))
                .collect()
        } else {
            json!(ids)
        })
    })?;
    Ok(Json(json!({"tokens": tokens})).into_response())
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    #[serde(default)]
    tokens: Vec<i64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `POST /detokenize`: `{"content": text}`, control tokens written by name (as llama-server
/// does); an id outside the vocabulary is a 400 that names it.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    detokenize_inner(state, body).await.unwrap_or_else(error)
}

async fn detokenize_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: DetokenizeRequest = parse_body(body)?;
    fields::check(&req.extra, &[], "the request")?;
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.model.as_deref()),
            &RouteFacts::default(),
            None,
        )
        .await?;
    let tok = &lease.engine.tokenizer;
    let vocab = tok.vocab_size();
    if let Some(bad) = req
        .tokens
        .iter()
        .find(|&&t| !(0..vocab as i64).contains(&t))
    {
        return Err(ApiError::bad_request(format!(
            "token id {bad} is not in this model's vocabulary of {vocab} tokens (0 to {})",
            vocab - 1
        )));
    }
    let bytes: Vec<u8> = req
        .tokens
        .iter()
        .flat_map(|&t| tok.piece(t as u32).iter().copied())
        .collect();
    Ok(Json(json!({"content": String::from_utf8_lossy(&bytes)})).into_response())
}

/// The query of the reporting endpoints: `?model=` where several models are served.
fn query_model(query: &HashMap<String, String>, also: &[&str]) -> Result<Option<String>, ApiError> {
    if let Some(k) = query
        .keys()
        .find(|k| *k != "model" && !also.contains(&k.as_str()))
    {
        let mut known = vec!["model"];
        known.extend(also);
        return Err(ApiError::bad_request(format!(
            "unknown query parameter '{k}'; this endpoint takes {}",
            known.join(", ")
        )));
    }
    Ok(query.get("model").cloned())
}

/// `GET /props`: the model's defaults and facts, in llama-server's shape. The model is loaded if
/// it is not (its tokenizer and template are needed), without counting as a use when it is.
pub async fn props(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    props_inner(state, query).await.unwrap_or_else(error)
}

async fn props_inner(
    state: Arc<AppState>,
    query: HashMap<String, String>,
) -> Result<Response, ApiError> {
    let asked = query_model(&query, &[])?;
    let (spec, loaded) = state.pool.peek(asked.as_deref())?;
    let lease;
    let held;
    let model: &LoadedModel = match loaded {
        Some(m) => {
            held = m;
            &held
        }
        None => {
            lease = state
                .pool
                .acquire(
                    state.pool.any_name_if_one(asked.as_deref()),
                    &RouteFacts::default(),
                    None,
                )
                .await?;
            &lease
        }
    };
    let engine = &model.engine;
    let tok = &engine.tokenizer;
    let text = |id: Option<u32>| id.map_or(String::new(), |i| tok.token_text(i).to_string());
    let d = crate::sampler::SamplingParams::default();
    let n_predict = match model.budget(None) {
        usize::MAX => -1,
        n => n as i64,
    };
    let slots = model.slots.lock().unwrap_or_else(|e| e.into_inner()).len();
    Ok(Json(json!({
        "default_generation_settings": {
            "id": 0,
            "id_task": -1,
            "n_ctx": engine.ctx_size,
            "is_processing": false,
            "speculative": engine.spec.speculates(),
            "params": {
                "n_predict": n_predict,
                "max_tokens": n_predict,
                // llama-server's number for "a new random seed per request".
                "seed": u32::MAX,
                "temperature": d.temperature,
                "dynatemp_range": 0.0,
                "top_k": d.top_k,
                "top_p": d.top_p,
                "min_p": d.min_p,
                "top_n_sigma": -1.0,
                "xtc_probability": 0.0,
                "typical_p": 1.0,
                "repeat_last_n": d.repeat_last_n,
                "repeat_penalty": d.repeat_penalty,
                "presence_penalty": d.presence_penalty,
                "frequency_penalty": d.frequency_penalty,
                "dry_multiplier": 0.0,
                "mirostat": 0,
                "stop": [],
                "n_keep": 0,
                "ignore_eos": false,
                "stream": false,
                "n_probs": 0,
                "grammar": "",
                "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
                "post_sampling_probs": false,
                "lora": [],
                "speculative.type": engine.spec.type_names(),
                "speculative.n_max": engine.spec.n_max,
                "speculative.n_min": engine.spec.n_min,
                "speculative.p_min": engine.spec.p_min,
            },
            "prompt": "",
        },
        "total_slots": slots,
        "model_alias": spec.name,
        "model_path": spec.opts.model.display().to_string(),
        "chat_template": engine.template.source(),
        "bos_token": text(tok.bos),
        "eos_token": text(Some(tok.eos)),
        "modalities": {"vision": false, "audio": false},
        "build_info": concat!("qwen-run ", env!("CARGO_PKG_VERSION")),
        "is_sleeping": false,
    }))
    .into_response())
}

/// `POST /props`: refused; llama-server takes it only when started with `--props`, and there is
/// nothing it could change here.
pub async fn change_props() -> Response {
    error(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "POST /props is not supported: qwen-run's settings are fixed by its command line (llama-server's --props flag is not implemented); GET /props reads them",
    ))
}

/// `GET /slots`: each generation slot of the model (`--parallel` of them) as its thread last
/// showed it; `?fail_on_no_slot=1` answers 503 when none is free. A model that is not loaded is
/// not loaded for this: its slots are shown idle.
pub async fn slots(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    slots_inner(state, query).unwrap_or_else(error)
}

fn slots_inner(state: Arc<AppState>, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let asked = query_model(&query, &["fail_on_no_slot"])?;
    let fail_on_no_slot = match query.get("fail_on_no_slot").map(String::as_str) {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fail_on_no_slot must be 0 or 1, got '{other}'"
            )))
        }
    };
    let (_, loaded) = state.pool.peek(asked.as_deref())?;
    let (states, n_ctx) = match &loaded {
        Some(m) => (
            m.slots.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            Some(m.engine.ctx_size),
        ),
        None => (vec![Default::default(); state.pool.parallel().max(1)], None),
    };
    if fail_on_no_slot && states.iter().all(|s| s.busy) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no slot available",
        ));
    }
    let list: Vec<Value> = states
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({
                "id": id,
                "n_ctx": n_ctx,
                "is_processing": s.busy,
                "n_prompt_tokens": s.prompt_tokens,
                "n_prompt_tokens_processed": s.prompt_done,
                "n_cached": s.cached,
                "next_token": {
                    "has_next_token": s.busy,
                    "n_remain": s.remaining,
                    "n_decoded": s.generated,
                },
            })
        })
        .collect();
    Ok(Json(Value::Array(list)).into_response())
}

/// The body of `POST /slots/{id}`: the file to save to or restore from.
#[derive(Deserialize, Default)]
struct SlotBody {
    #[serde(default)]
    filename: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `POST /slots/{id}?action=save|restore|erase`, as llama-server: a slot's tokens and KV cache
/// saved to, or restored from, a file under `--slot-save-path` (the prompt cache's file layout
/// and checks, one block of all the slot's tokens), or dropped. A slot serving a request is
/// refused (400); the action waits while every slot is busy.
pub async fn slot_action(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    slot_action_inner(state, id, query, body)
        .await
        .unwrap_or_else(error)
}

async fn slot_action_inner(
    state: Arc<AppState>,
    id: String,
    query: HashMap<String, String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let asked = query_model(&query, &["action"])?;
    let slot: usize = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("the slot id must be a number, got '{id}'")))?;
    let action = match query.get("action").map(String::as_str) {
        Some(a @ ("save" | "restore" | "erase")) => a,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown action '{other}'; POST /slots/{{id}} takes ?action=save, restore or erase"
            )))
        }
        None => {
            return Err(ApiError::bad_request(
                "POST /slots/{id} needs ?action=save, restore or erase",
            ))
        }
    };
    let body: SlotBody = match body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => SlotBody::default(),
        other => parse_body(other)?,
    };
    if let Some(k) = body.extra.keys().next() {
        return Err(ApiError::bad_request(format!(
            "unknown field '{k}'; POST /slots/{{id}} takes 'filename'"
        )));
    }
    let dir = match action {
        "erase" => None,
        _ => Some(state.pool.slot_save_path().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!("saving and restoring slots needs a directory for their files: start the server with --slot-save-path DIR (?action={action})"),
            )
        })?),
    };
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(asked.as_deref()),
            &RouteFacts::default(),
            None,
        )
        .await?;
    let Some(dir) = dir else {
        if body.filename.is_some() {
            return Err(ApiError::bad_request(
                "?action=erase takes no 'filename': it drops what the slot holds, not a file",
            ));
        }
        let SlotReply::Erased(n) = lease.slot_job(slot, SlotAction::Erase).await? else {
            return Err(unexpected_reply());
        };
        return Ok(Json(json!({"id_slot": slot, "n_erased": n})).into_response());
    };
    let filename = body
        .filename
        .ok_or_else(|| ApiError::bad_request(format!("?action={action} needs 'filename'")))?;
    check_slot_filename(&filename)?;
    let path = dir.join(&filename);
    let engine = lease.engine.clone();
    let t0 = Instant::now();
    let ms = |t0: Instant| t0.elapsed().as_secs_f64() * 1e3;
    if action == "save" {
        let SlotReply::Exported(tokens, kv) = lease.slot_job(slot, SlotAction::Export).await?
        else {
            return Err(unexpected_reply());
        };
        let n = tokens.len();
        let written = tokio::task::spawn_blocking(move || {
            save_session(&path, &engine.kv_file_shape(0)?, &tokens, &kv)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot save slot {slot} to '{filename}': {e:#}"),
            )
        })?;
        return Ok(Json(json!({
            "id_slot": slot,
            "filename": filename,
            "n_saved": n,
            "n_written": written,
            "timings": {"save_ms": ms(t0)},
        }))
        .into_response());
    }
    if std::fs::symlink_metadata(&path).is_err() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("there is no saved slot '{filename}' in --slot-save-path"),
        ));
    }
    let ctx = engine.ctx_size;
    let (tokens, kv, read) = tokio::task::spawn_blocking(move || {
        let (tokens, kv) = load_session(&path, &engine.kv_file_shape(0)?, ctx)?;
        let read = std::fs::metadata(&path).map_or(0, |m| m.len());
        anyhow::Ok((tokens, kv, read))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        ApiError::bad_request(format!(
            "cannot restore slot {slot} from '{filename}': {e:#}"
        ))
    })?;
    let SlotReply::Imported(n) = lease.slot_job(slot, SlotAction::Import(tokens, kv)).await? else {
        return Err(unexpected_reply());
    };
    Ok(Json(json!({
        "id_slot": slot,
        "filename": filename,
        "n_restored": n,
        "n_read": read,
        "timings": {"restore_ms": ms(t0)},
    }))
    .into_response())
}

fn unexpected_reply() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the generation thread answered another slot action",
    )
}

/// A slot file's name: a plain file name in --slot-save-path, never a path out of it, nor a
/// hidden file (the cache's temporary files start with a dot).
fn check_slot_filename(name: &str) -> Result<(), ApiError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if name.contains(['/', '\\']) {
        Some("it contains a path separator")
    } else if name.contains("..") {
        Some("it contains '..'")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if name.chars().any(|c| c.is_control() || c == ':') {
        Some("it contains a control character or ':'")
    } else if name.trim() != name {
        Some("it starts or ends with white space")
    } else {
        None
    };
    match why {
        Some(why) => Err(ApiError::bad_request(format!(
            "invalid slot filename '{}': {why}; give a plain file name, saved in --slot-save-path",
            name.escape_debug()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_slot_filename;

    #[test]
    fn slot_filenames() {
        for ok in ["x.bin", "slot 0.bin", "a-b_c.bin", "été.kv"] {
            assert!(check_slot_filename(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "..",
            "a/b",
            "a\\b",
            "/etc/passwd",
            ".hidden",
            "x..y",
            "a\0b",
            "c:x",
            " x",
            "x ",
            "a\nb",
        ] {
            assert!(check_slot_filename(bad).is_err(), "{bad:?}");
        }
        assert!(check_slot_filename(&"a".repeat(256)).is_err());
    }
}
