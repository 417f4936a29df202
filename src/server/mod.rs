//! `qwen-run serve`: an HTTP server speaking the OpenAI (`/v1/...`) and Ollama (`/api/...`)
//! APIs, with streaming (SSE and NDJSON) and Qwen2.5 tool calls.
//!
//! Layout: [`state`] holds the loaded engine and the generation scheduler (one thread,
//! `--parallel` slots batched into shared forward passes, a bounded queue), [`openai`] and [`ollama`] are the two APIs, [`tool_calls`] parses
//! `<tool_call>` blocks out of the model's text, [`metrics`] is `GET /metrics`.

pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod state;
pub mod tool_calls;

use crate::cli::ModelArgs;
use crate::engine::Engine;
use crate::gguf::Value as GgufValue;
use crate::sampler::SamplingParams;
use crate::tokenizer::Message;
use anyhow::{bail, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use serde::de::DeserializeOwned;
use state::{ApiError, AppState};
use std::sync::Arc;

pub use state::Finish;

/// Largest request body accepted; bigger ones get 413.
pub const MAX_BODY_BYTES: usize = 8 << 20;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests that may wait for a free generation slot; more get 503.
    #[arg(long = "queue-size", default_value_t = 16)]
    pub queue_size: usize,
    /// Generation slots: requests served at the same time, batched into shared forward passes
    /// (continuous batching). Each busy slot holds a KV cache of --ctx-size tokens.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Cap on generated tokens per request (0: only the context limits it).
    #[arg(long = "max-tokens", default_value_t = 0)]
    pub max_tokens: usize,
    /// Name to serve the model under (default: the file name without .gguf).
    #[arg(long)]
    pub alias: Option<String>,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    if args.queue_size == 0 {
        bail!("--queue-size must be at least 1");
    }
    let opts = args.model.load_options()?;
    let stem = opts
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let engine = Engine::load(&opts)?;
    let mut aliases = vec![stem.clone()];
    if let Some(name) = engine.gguf.get("general.name").and_then(GgufValue::as_str) {
        aliases.push(name.to_string());
    }
    let name = args.alias.clone().unwrap_or(stem);
    eprintln!(
        "[qwen-run] loaded {} in {:.2} s | {} | {} threads | ctx {}",
        opts.model.display(),
        engine.load_time.as_secs_f64(),
        engine.device_name(),
        engine.threads,
        engine.ctx_size
    );
    if let Some(gpu) = engine.gpu_report() {
        eprintln!("[qwen-run] GPU {gpu}");
    }
    let state = AppState::new(
        engine,
        name,
        aliases,
        args.queue_size,
        args.max_tokens,
        args.parallel,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("qwen-run-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "[qwen-run] serving '{}' (OpenAI API at http://{local}/v1, Ollama API at http://{local}/api)",
            state.model_name
        );
        eprintln!("listening on http://{local}");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("the HTTP server failed")
    })
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { "qwen-run is running" }))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

const ENDPOINTS: &[&str] = &[
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
    "/api/tags",
    "/api/show",
    "/api/version",
];

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| **e == path)
        .copied()
        .unwrap_or("other");
    let resp = next.run(req).await;
    state
        .metrics
        .record_request(endpoint, resp.status().as_u16());
    resp
}

/// A body announced as too large gets 413 at once, before any of it is read (the limit on the
/// body itself catches chunked bodies that grow too large).
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > MAX_BODY_BYTES as u64 => {
            let e = too_large();
            if req.uri().path().starts_with("/api/") {
                ollama::error(e)
            } else {
                openai::error(e)
            }
        }
        _ => next.run(req).await,
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than the limit of {MAX_BODY_BYTES} bytes"),
    )
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ok",
        "model": state.model_name,
        "queue_depth": state.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    let msg = format!("no route for {} {}", req.method(), req.uri().path());
    if req.uri().path().starts_with("/api/") {
        ollama::error(ApiError::new(StatusCode::NOT_FOUND, msg))
    } else {
        openai::error(ApiError::new(StatusCode::NOT_FOUND, msg))
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

/// Renders a chat through the model's template and tokenizes it.
pub fn chat_prompt(
    state: &AppState,
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
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
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
