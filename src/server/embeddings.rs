//! Embeddings in each API's shape: OpenAI's `POST /v1/embeddings`, llama-server's
//! `POST /embedding` (and `/embeddings`), Ollama's `POST /api/embed` and its older
//! `POST /api/embeddings`. One path for all: inputs → tokens → [`LoadedModel::embed`] → the
//! API's normalization and shape. They answer on a server started with `--embedding`; without
//! it each is a 501 naming the flag, as llama-server answers.

use super::api::{off_runtime, parse_body, AppState};
use super::error::ApiError;
use super::fields;
use super::models::{embeddings_off, keep_alive_field, LoadedModel};
use super::routing::RouteFacts;
use super::{llama_server, ollama, openai};
use crate::engine::Pooling;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// Inputs one request may hold (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// llama-server's `embd_normalize` default, and what OpenAI and Ollama's `/api/embed` give:
/// Euclidean (L2) normalization.
const EUCLIDEAN: i64 = 2;

/// Ollama's `/api/embeddings` returns the pooled vector as the model gives it.
const UNNORMALIZED: i64 = -1;

enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

/// `input` as OpenAI and llama-server take it: a string, a list of strings, a list of token ids,
/// or a list of token id lists (llama-server also mixes strings and id lists).
fn inputs(v: &Value, field: &str) -> Result<Vec<Input>, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "'{field}' must be a string, a list of strings, a list of token ids, or a list of token id lists"
        ))
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<_>>()
            .ok_or_else(bad)
    };
    let list = match v {
        Value::String(s) => return Ok(vec![Input::Text(s.clone())]),
        Value::Array(a) => a,
        _ => return Err(bad()),
    };
    if list.is_empty() {
        return Err(ApiError::bad_request(format!("'{field}' is an empty list")));
    }
    if list.iter().all(Value::is_number) {
        return Ok(vec![Input::Tokens(ids(list)?)]);
    }
    if list.len() > MAX_INPUTS {
        return Err(ApiError::bad_request(format!(
            "'{field}' holds {} inputs; at most {MAX_INPUTS} are taken in one request",
            list.len()
        )));
    }
    list.iter()
        .map(|x| match x {
            Value::String(s) => Ok(Input::Text(s.clone())),
            Value::Array(a) => Ok(Input::Tokens(ids(a)?)),
            _ => Err(bad()),
        })
        .collect()
}

/// The inputs' tokens: text tokenized as llama-server tokenizes it for embeddings (with the BOS
/// and EOS tokens the model file asks for), ids checked against the vocabulary. An input longer
/// than `limit` tokens is cut to it when `truncate` says so, else a 400.
fn tokens(
    model: &LoadedModel,
    inputs: Vec<Input>,
    limit: usize,
    truncate: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let engine = &model.engine;
    let add_eos = engine
        .gguf
        .get("tokenizer.ggml.add_eos_token")
        .and_then(crate::gguf::Value::as_bool)
        == Some(true);
    let vocab = engine.config().vocab_size;
    off_runtime(|| {
        inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| {
                let mut ids = match input {
                    Input::Text(t) => {
                        let mut ids = engine
                            .tokenizer
                            .encode(&t)
                            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
                        if add_eos && !ids.is_empty() {
                            ids.push(engine.tokenizer.eos);
                        }
                        ids
                    }
                    Input::Tokens(ids) => ids,
                };
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ApiError::bad_request(format!(
                        "input {i}: token id {bad} is not in this model's vocabulary (0 to {})",
                        vocab - 1
                    )));
                }
                if ids.is_empty() {
                    return Err(ApiError::bad_request(format!(
                        "input {i} is empty; each input needs at least one token"
                    )));
                }
                if ids.len() > limit {
                    if !truncate {
                        return Err(ApiError::bad_request(format!(
                            "input {i} has {} tokens but the context holds {limit}; shorten it{}",
                            ids.len(),
                            if limit < engine.ctx_size {
                                String::new()
                            } else {
                                format!(
                                    " or restart the server with a larger --ctx-size (the model supports up to {})",
                                    engine.config().context_length
                                )
                            }
                        )));
                    }
                    ids.truncate(limit);
                }
                Ok(ids)
            })
            .collect()
    })
}

/// Scales `v` as llama.cpp's `embd_normalize` says: -1 not at all, 0 the largest magnitude to
/// 32760 (int16's range), 2 to Euclidean length 1, any other p > 0 to p-norm 1 (1: taxicab).
fn normalize(v: &mut [f32], p: i64) {
    let size = match p {
        -1 => return,
        0 => v.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)) / 32760.0,
        2 => v
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt(),
        p => {
            let p = p as f64;
            v.iter()
                .map(|&x| (x.abs() as f64).powf(p))
                .sum::<f64>()
                .powf(1.0 / p)
        }
    };
    let scale = if size > 0.0 { 1.0 / size } else { 0.0 };
    v.iter_mut().for_each(|x| *x = (*x as f64 * scale) as f32);
}

fn check_normalize(p: Option<i64>) -> Result<i64, ApiError> {
    match p {
        None => Ok(EUCLIDEAN),
        Some(p) if (-1..=64).contains(&p) => Ok(p),
        Some(p) => Err(ApiError::bad_request(format!(
            "embd_normalize {p} is not supported; use -1 (none), 0 (max absolute, int16), 1 (taxicab), 2 (Euclidean, the default) or a p-norm up to 64"
        ))),
    }
}

/// Refuses a `dimensions` other than the model's: shortening a vector is only meaningful for
/// models trained for it, which this server cannot tell.
fn check_dimensions(dimensions: Option<i64>, model: &LoadedModel) -> Result<(), ApiError> {
    let hidden = model.engine.config().hidden;
    match dimensions {
        Some(d) if d != hidden as i64 => Err(ApiError::bad_request(format!(
            "dimensions {d} is not supported: this model's embeddings have {hidden} dimensions (send {hidden}, or leave it out)"
        ))),
        _ => Ok(()),
    }
}

/// One vector per input: the pooled one, normalized as `p` says; a 400 naming `api` when the
/// server pools nothing (a vector per token, which the API cannot carry).
fn pooled(
    rows: Vec<Vec<Vec<f32>>>,
    p: i64,
    model: &LoadedModel,
    api: &str,
) -> Result<Vec<Vec<f32>>, ApiError> {
    if model.pooling == Some(Pooling::None) {
        return Err(ApiError::bad_request(format!(
            "the server runs with --pooling none, a vector per token, which {api} cannot carry; restart it with --pooling mean, last or cls, or use llama-server's POST /embedding"
        )));
    }
    Ok(rows
        .into_iter()
        .map(|mut r| {
            let mut v = r.pop().unwrap_or_default();
            normalize(&mut v, p);
            v
        })
        .collect())
}

/// Base64 of the values' little-endian bytes, as OpenAI's `encoding_format: "base64"` sends them.
fn base64(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Fails at once, before a model is loaded, on a server without `--embedding`.
fn check_on(state: &AppState) -> Result<(), ApiError> {
    if state.pool.embeddings() {
        Ok(())
    } else {
        Err(embeddings_off())
    }
}

#[derive(Deserialize)]
struct OpenAiRequest {
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<i64>,
    /// llama-server's, on its OpenAI endpoint too.
    #[serde(default)]
    embd_normalize: Option<i64>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// OpenAI's `POST /v1/embeddings`.
pub async fn openai(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    openai_inner(state, body)
        .await
        .unwrap_or_else(openai::error)
}

async fn openai_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_on(&state)?;
    let req: OpenAiRequest = parse_body(body)?;
    fields::check(&req.extra, &[fields::EMBEDDINGS], "the request")?;
    let base64_wanted = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format '{other}' is not supported; use \"float\" or \"base64\""
            )))
        }
    };
    let p = check_normalize(req.embd_normalize)?;
    let input = inputs(
        req.input
            .as_ref()
            .ok_or_else(|| ApiError::bad_request("'input' is required"))?,
        "input",
    )?;
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.model.as_deref()),
            &RouteFacts::default(),
            None,
        )
        .await?;
    check_dimensions(req.dimensions, &lease)?;
    let tokens = tokens(&lease, input, lease.engine.ctx_size, false)?;
    let count: usize = tokens.iter().map(Vec::len).sum();
    let vectors = pooled(lease.embed(&tokens)?, p, &lease, "OpenAI's API")?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64_wanted {
                json!(base64(v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": lease.name,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }))
    .into_response())
}

#[derive(Deserialize)]
struct NativeRequest {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    embd_normalize: Option<i64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// llama-server's `POST /embedding` (and `/embeddings`): `content` (or `input`) as
/// [`inputs`] takes it; `[{"index", "embedding": [vector]}]`, or without pooling
/// `[{"index", "embedding": [one vector per token]}]` (those not normalized, as llama-server).
pub async fn native(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    native_inner(state, body)
        .await
        .unwrap_or_else(llama_server::error)
}

async fn native_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_on(&state)?;
    let req: NativeRequest = parse_body(body)?;
    fields::check(&req.extra, &[], "the request")?;
    let p = check_normalize(req.embd_normalize)?;
    let (v, field) = match (&req.input, &req.content) {
        (Some(v), _) => (v, "input"),
        (None, Some(v)) => (v, "content"),
        (None, None) => return Err(ApiError::bad_request("'content' (or 'input') is required")),
    };
    let input = inputs(v, field)?;
    let lease = state
        .pool
        .acquire(
            state.pool.any_name_if_one(req.model.as_deref()),
            &RouteFacts::default(),
            None,
        )
        .await?;
    let tokens = tokens(&lease, input, lease.engine.ctx_size, false)?;
    let per_token = lease.pooling == Some(Pooling::None);
    let results: Vec<Value> = lease
        .embed(&tokens)?
        .into_iter()
        .enumerate()
        .map(|(i, mut rows)| {
            if !per_token {
                rows.iter_mut().for_each(|r| normalize(r, p));
            }
            json!({"index": i, "embedding": rows})
        })
        .collect();
    Ok(Json(Value::Array(results)).into_response())
}

#[derive(Deserialize)]
struct OllamaEmbedRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<i64>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Ollama's `options` for an embedding: `num_ctx` limits the input (at most the server's
/// context); the generation options change nothing here. Returns the token limit.
fn ollama_limit(
    options: Option<&Map<String, Value>>,
    model: &LoadedModel,
) -> Result<usize, ApiError> {
    let ctx = model.engine.ctx_size;
    let Some(o) = options else {
        return Ok(ctx);
    };
    let mut rest = o.clone();
    let limit = match rest.remove("num_ctx") {
        None | Some(Value::Null) => ctx,
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 && n as usize <= ctx => n as usize,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "options.num_ctx {v} must be a number of tokens from 1 to the server's context of {ctx}; restart `qwen-run serve` with a larger --ctx-size for more (the model supports up to {})",
                    model.engine.config().context_length
                )))
            }
        },
    };
    fields::check(
        &rest,
        &[fields::OLLAMA_OPTIONS, fields::OLLAMA_GENERATION_OPTIONS],
        "options",
    )?;
    Ok(limit)
}

/// Ollama's `POST /api/embed`: `input` a string or a list of strings (token ids too);
/// `truncate` (default true) cuts an input to the context, false makes a long one a 400;
/// answers `{"model", "embeddings": [L2-normalized vectors], ...}`. No input loads the model.
pub async fn ollama_embed(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    ollama_embed_inner(state, body)
        .await
        .unwrap_or_else(ollama::error)
}

async fn ollama_embed_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    check_on(&state)?;
    let req: OllamaEmbedRequest = parse_body(body)?;
    fields::check(&req.extra, &[], "the request")?;
    let keep_alive = keep_alive_field(&req.keep_alive)?;
    let input = match &req.input {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) if s.is_empty() => vec![],
        Some(Value::Array(a)) if a.is_empty() => vec![],
        Some(v) => inputs(v, "input")?,
    };
    let lease = state
        .pool
        .acquire(req.model.as_deref(), &RouteFacts::default(), keep_alive)
        .await?;
    let loaded = Instant::now();
    check_dimensions(req.dimensions, &lease)?;
    let limit = ollama_limit(req.options.as_ref(), &lease)?;
    let tokens = tokens(&lease, input, limit, req.truncate.unwrap_or(true))?;
    let count: usize = tokens.iter().map(Vec::len).sum();
    let vectors = if tokens.is_empty() {
        vec![]
    } else {
        pooled(lease.embed(&tokens)?, EUCLIDEAN, &lease, "Ollama's API")?
    };
    Ok(Json(json!({
        "model": lease.name,
        "embeddings": vectors,
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": loaded.duration_since(started).as_nanos() as u64,
        "prompt_eval_count": count,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct OllamaEmbeddingsRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Ollama's older `POST /api/embeddings`: `prompt`, answered with `{"embedding": vector}`, not
/// normalized (as Ollama answers it); an empty prompt loads the model.
pub async fn ollama_embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    ollama_embeddings_inner(state, body)
        .await
        .unwrap_or_else(ollama::error)
}

async fn ollama_embeddings_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_on(&state)?;
    let req: OllamaEmbeddingsRequest = parse_body(body)?;
    fields::check(&req.extra, &[], "the request")?;
    let keep_alive = keep_alive_field(&req.keep_alive)?;
    let lease = state
        .pool
        .acquire(req.model.as_deref(), &RouteFacts::default(), keep_alive)
        .await?;
    let limit = ollama_limit(req.options.as_ref(), &lease)?;
    let prompt = req.prompt.unwrap_or_default();
    if prompt.is_empty() {
        return Ok(Json(json!({"embedding": []})).into_response());
    }
    let tokens = tokens(&lease, vec![Input::Text(prompt)], limit, false)?;
    let vector = pooled(lease.embed(&tokens)?, UNNORMALIZED, &lease, "Ollama's API")?;
    Ok(Json(json!({"embedding": vector.into_iter().next().unwrap_or_default()})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        // 1.0f32 is 00 00 80 3f little-endian.
        assert_eq!(base64(&[1.0]), "AACAPw==");
        assert_eq!(base64(&[1.0, -2.0]), "AACAPwAAAMA=");
        assert_eq!(base64(&[]), "");
    }

    #[test]
    fn normalizations_follow_llama_cpp() {
        let mut v = vec![3.0, -4.0];
        normalize(&mut v, 2);
        assert_eq!(v, vec![0.6, -0.8]);
        let mut v = vec![3.0, -4.0];
        normalize(&mut v, 1);
        assert!((v[0] - 3.0 / 7.0).abs() < 1e-7 && (v[1] + 4.0 / 7.0).abs() < 1e-7);
        let mut v = vec![3.0, -4.0];
        normalize(&mut v, 0);
        assert_eq!(v, vec![3.0 * 32760.0 / 4.0, -32760.0]);
        let mut v = vec![3.0, -4.0];
        normalize(&mut v, -1);
        assert_eq!(v, vec![3.0, -4.0]);
        let mut v = vec![0.0, 0.0];
        normalize(&mut v, 2);
        assert_eq!(v, vec![0.0, 0.0]);
    }

    #[test]
    fn inputs_take_every_shape() {
        let n = |v: Value| inputs(&v, "input").map(|i| i.len());
        assert_eq!(n(json!("a")).unwrap(), 1);
        assert_eq!(n(json!(["a", "b"])).unwrap(), 2);
        assert_eq!(n(json!([1, 2, 3])).unwrap(), 1);
        assert_eq!(n(json!([[1, 2], [3], "c"])).unwrap(), 3);
        assert!(n(json!([-1])).is_err());
        assert!(n(json!([1.5])).is_err());
        assert!(n(json!({"a": 1})).is_err());
        assert!(n(json!([null])).is_err());
        let many = Value::Array(vec![json!("x"); MAX_INPUTS + 1]);
        assert!(n(many).unwrap_err().message.contains("at most"));
    }
}
