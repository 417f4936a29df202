//! `qwen-run serve`: an HTTP server speaking the OpenAI (`/v1/...`) and Ollama (`/api/...`)
//! APIs, with streaming (SSE and NDJSON) and Qwen2.5 tool calls.
//!
//! Layout: [`state`] is what the handlers share (the model pool, error answers, a generation's
//! output), [`models`] the pool (which models are loaded, keep-alive, `--max-loaded`, `"auto"`
//! routing), [`scheduler`] one loaded model's generation thread (`--parallel` slots batched into
//! shared forward passes), [`response_cache`] the cache of deterministic answers, [`openai`] and
//! [`ollama`] the two APIs, [`tool_calls`] the `<tool_call>` parser, [`metrics`] `GET /metrics`.

pub mod metrics;
pub mod models;
pub mod ollama;
pub mod openai;
pub mod response_cache;
mod scheduler;
pub mod state;
pub mod tool_calls;

use crate::cli::ModelArgs;
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
use models::{LoadedModel, ModelPool, ModelSpec, RouteRule, ServeOptions};
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
    /// Requests that may wait for a free generation slot, per model; more get 429.
    #[arg(long = "queue-size", visible_alias = "queue", default_value_t = 16)]
    pub queue_size: usize,
    /// Seconds a request may wait in the queue for a generation slot; then it gets 503.
    #[arg(
        long = "queue-timeout",
        value_name = "SECONDS",
        default_value_t = 300.0
    )]
    pub queue_timeout: f64,
    /// Generation slots per model: requests served at the same time, batched into shared forward
    /// passes (continuous batching). Each busy slot holds a KV cache of --ctx-size tokens.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Cap on generated tokens per request (0: only the context limits it).
    #[arg(long = "max-tokens", default_value_t = 0)]
    pub max_tokens: usize,
    /// Name to serve the model under (default: the file name without .gguf); one model only.
    #[arg(long)]
    pub alias: Option<String>,
    /// How long an idle model stays loaded: seconds, or 30s / 5m / 1h; -1: for good (the
    /// default, as llama-server; Ollama's default is 5m); 0: unload as soon as it is idle.
    /// A request's `keep_alive` replaces it for that model.
    #[arg(
        long = "keep-alive",
        value_name = "DURATION",
        default_value = "-1",
        allow_hyphen_values = true
    )]
    pub keep_alive: String,
    /// Models loaded at the same time; loading one more unloads the least recently used idle one.
    #[arg(long = "max-loaded", value_name = "N", default_value_t = 3)]
    pub max_loaded: usize,
    /// Answers kept for identical deterministic requests (temperature 0, or the same seed), which
    /// are then answered without the model (header x-qwen-run-cache: hit); 0: off.
    #[arg(long = "response-cache", value_name = "N", default_value_t = 0)]
    pub response_cache: usize,
    /// `model: "auto"`: the small model (default: the smallest file).
    #[arg(long = "route-small", value_name = "NAME")]
    pub route_small: Option<String>,
    /// `model: "auto"`: the large model (default: the largest file).
    #[arg(long = "route-large", value_name = "NAME")]
    pub route_large: Option<String>,
    /// `model: "auto"`: prompts longer than this many characters go to the large model.
    #[arg(
        long = "route-long-prompt",
        value_name = "CHARS",
        default_value_t = 4000
    )]
    pub route_long_prompt: usize,
    /// `model: "auto"`: where requests with tools go: large or small.
    #[arg(long = "route-tools", value_name = "MODEL", default_value = "large", value_parser = ["large", "small"])]
    pub route_tools: String,
    /// `model: "auto"`: words that send a request to the large model when its last user message
    /// contains one (any case), comma-separated, e.g. "prove,debug,step by step".
    #[arg(long = "route-keywords", value_name = "LIST", value_delimiter = ',')]
    pub route_keywords: Vec<String>,
}

impl ServeArgs {
    fn serve_options(&self) -> Result<ServeOptions> {
        if self.parallel == 0 {
            bail!("--parallel must be at least 1");
        }
        if self.queue_size == 0 {
            bail!("--queue-size must be at least 1");
        }
        if self.max_loaded == 0 {
            bail!("--max-loaded must be at least 1");
        }
        // a day at most: longer would overflow the clock before it meant anything
        if !(self.queue_timeout.is_finite()
            && self.queue_timeout > 0.0
            && self.queue_timeout <= 86400.0)
        {
            bail!(
                "--queue-timeout {} must be a positive number of seconds, at most 86400 (a day)",
                self.queue_timeout
            );
        }
        let keep_alive =
            models::parse_keep_alive(&serde_json::Value::String(self.keep_alive.clone()))
                .map_err(|e| anyhow::anyhow!("--keep-alive: {e}"))?;
        Ok(ServeOptions {
            parallel: self.parallel,
            queue_size: self.queue_size,
            queue_timeout: std::time::Duration::from_secs_f64(self.queue_timeout),
            max_tokens: self.max_tokens,
            max_loaded: self.max_loaded,
            keep_alive,
            response_cache: self.response_cache,
            route: RouteRule {
                small: self.route_small.clone(),
                large: self.route_large.clone(),
                long_prompt_chars: self.route_long_prompt,
                tools_to_large: self.route_tools == "large",
                keywords: self
                    .route_keywords
                    .iter()
                    .map(|k| k.trim().to_string())
                    .filter(|k| !k.is_empty())
                    .collect(),
            },
        })
    }
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let opts = args.serve_options()?;
    let all = args.model.load_options_all()?;
    if all.len() > 1 && args.alias.is_some() {
        bail!("--alias names one model; with several models each is served under its file name");
    }
    let specs = all
        .into_iter()
        .map(|o| ModelSpec::open(o, args.alias.clone()))
        .collect::<Result<Vec<_>>>()?;
    let metrics = Arc::new(metrics::Metrics::default());
    let pool = Arc::new(ModelPool::new(specs, opts, metrics.clone())?);
    // The default model is loaded at once, so its errors show at startup and its first request
    // is fast; the others load on first use.
    pool.preload_default()?;
    let created = unix_now();
    let state = Arc::new(AppState {
        pool,
        metrics,
        created,
    });
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
        let names: Vec<String> = state
            .pool
            .statuses()
            .iter()
            .map(|s| format!("'{}'", s.spec.name))
            .collect();
        eprintln!(
            "[qwen-run] serving {} (OpenAI API at http://{local}/v1, Ollama API at http://{local}/api)",
            names.join(", ")
        );
        eprintln!("listening on http://{local}");
        let pool = state.pool.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
            loop {
                tick.tick().await;
                pool.unload_expired();
            }
        });
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
        .route("/api/ps", get(ollama::ps))
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
    "/api/ps",
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
    let models: Vec<serde_json::Value> = state
        .pool
        .statuses()
        .iter()
        .map(|s| serde_json::json!({"name": s.spec.name, "state": model_state(s)}))
        .collect();
    axum::Json(serde_json::json!({
        "status": "ok",
        "model": state.pool.default_model().name,
        "models": models,
        "queue_depth": state.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .into_response()
}

/// "loaded" or "unloaded", as the model lists show it.
pub fn model_state(s: &models::ModelStatus) -> &'static str {
    if s.loaded.is_some() {
        "loaded"
    } else {
        "unloaded"
    }
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
