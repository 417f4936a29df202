//! llama-server's own generation endpoints: `POST /completion` (a prompt as text or token ids,
//! with its GBNF `grammar`, `json_schema` and `n_probs`) and `POST /infill` (fill in the middle),
//! streaming as llama-server does: SSE `data:` objects, the last with `"stop": true`.

use super::api::{
    compile_format, grammar_fields, parse_body, stream_response, top_logprobs, AppState, Sampling,
};
use super::error::ApiError;
use super::fields;
use super::models::LoadedModel;
use super::output::{served_headers, OutEvent};
use super::protocol::{GenRequest, Logprob};
use super::routing::RouteFacts;
use crate::scheduler::{FinishReason, Generation};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub fn error(e: ApiError) -> Response {
    let kind = if e.status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
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
        })
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

fn timings(s: &Generation) -> Value {
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
