//! `qwen-run serve`: an HTTP server speaking the OpenAI (`/v1/...`), Ollama (`/api/...`) and
//! llama-server (`/completion`, `/tokenize`, `/props`, `/slots`...) APIs, with streaming (SSE
//! and NDJSON) and Qwen2.5 tool calls. A layer on the engine: it talks to the scheduler only
//! through a model's worker thread.
//!
//! Layout: [`access`] who may call it, [`api`] what the APIs share (state, body parsing,
//! sampling, chat prompts, streaming), [`openai`], [`ollama`] and [`llama_server`] the APIs,
//! [`embeddings`] their embedding endpoints, [`fields`] the request fields each reads or refuses, [`models`] the pool (which models are
//! loaded, keep-alive, `--max-loaded`) with [`routing`] for `"auto"`, [`protocol`] the jobs and
//! events between handlers and a model's worker thread (`worker`: the scheduler's `--parallel`
//! slots), [`output`] a generation's events as handlers read them, [`tool_calls`] the
//! `<tool_call>` parser, [`response_cache`] the cache of deterministic answers, [`error`] error
//! answers, [`metrics`] `GET /metrics`, [`webui`] the chat page at `/`.

pub mod access;
pub mod api;
pub mod embeddings;
pub mod error;
pub mod fields;
pub mod llama_server;
pub mod metrics;
pub mod models;
pub mod ollama;
pub mod openai;
pub mod output;
pub mod protocol;
pub mod response_cache;
pub mod routing;
pub mod tool_calls;
pub mod webui;
mod worker;

use access::AccessOptions;
use anyhow::{bail, Context, Result};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
pub use models::ModelSource;
use models::{ModelPool, ModelSpec};

use api::{model_state, too_large, unix_now, AppState};
use error::ApiError;
pub use models::{parse_keep_alive, ServeOptions};
pub use routing::RouteRule;

pub use api::MAX_BODY_BYTES;
use std::sync::Arc;

/// What `serve` needs: the models (the first is the default one), the address, and the
/// scheduling, keep-alive, routing and response-cache options.
pub struct ServerOptions {
    pub models: Vec<ModelSource>,
    /// Name to serve a single model under (default: the file name without .gguf).
    pub alias: Option<String>,
    pub host: String,
    pub port: u16,
    pub serve: ServeOptions,
    /// API keys and allowed origins (`loopback` is set from the address actually bound).
    pub access: AccessOptions,
}

pub fn serve(options: ServerOptions) -> Result<()> {
    let ServerOptions {
        models,
        alias,
        host,
        port,
        serve: opts,
        mut access,
    } = options;
    if models.len() > 1 && alias.is_some() {
        bail!("--alias names one model; with several models each is served under its file name");
    }
    let mut specs = Vec::new();
    for source in models {
        let path = source.load.model.clone();
        match ModelSpec::open(source.load, alias.clone()) {
            Ok(spec) => specs.push(spec),
            Err(e) if source.from_directory => {
                eprintln!("[qwen-run] skipping {}: {e:#}", path.display())
            }
            Err(e) => return Err(e),
        }
    }
    if specs.is_empty() {
        bail!("none of the model files given can be served (see the messages above)");
    }
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
        let addr = format!("{host}:{port}");
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        access.loopback = local.ip().is_loopback();
        if !access.loopback && access.api_keys.is_empty() {
            eprintln!(
                "[qwen-run] warning: listening on {local}, reachable from other machines, without an API key: anyone who can reach this port can use and load models; add --api-key KEY (or QWEN_RUN_API_KEY)"
            );
        }
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
        axum::serve(listener, router(state, Arc::new(access)))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("the HTTP server failed")
    })
}

pub fn router(state: Arc<AppState>, access: Arc<AccessOptions>) -> Router {
    Router::new()
        .route("/", get(webui::index))
        .route("/ui/app.js", get(webui::app_js))
        .route("/ui/style.css", get(webui::style_css))
        .route("/ui/icon.svg", get(webui::icon_svg))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/embedding", post(embeddings::native))
        .route("/embeddings", post(embeddings::native))
        .route("/completion", post(llama_server::completion))
        .route("/completions", post(llama_server::completion))
        .route("/infill", post(llama_server::infill))
        .route("/tokenize", post(llama_server::tokenize))
        .route("/detokenize", post(llama_server::detokenize))
        .route("/apply-template", post(openai::apply_template))
        .route(
            "/props",
            get(llama_server::props).post(llama_server::change_props),
        )
        .route("/slots", get(llama_server::slots))
        .route("/slots/{id}", post(llama_server::slot_action))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version))
        .route("/api/ps", get(ollama::ps))
        .route("/api/copy", post(ollama::copy))
        .route("/api/pull", post(ollama::pull))
        .route("/api/delete", delete(ollama::delete))
        .route("/api/embed", post(embeddings::ollama_embed))
        .route("/api/embeddings", post(embeddings::ollama_embeddings))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(access, access::check))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

const ENDPOINTS: &[&str] = &[
    "/",
    "/ui/app.js",
    "/ui/style.css",
    "/ui/icon.svg",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/embedding",
    "/embeddings",
    "/completion",
    "/completions",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/props",
    "/slots",
    "/api/chat",
    "/api/generate",
    "/api/tags",
    "/api/show",
    "/api/version",
    "/api/ps",
    "/api/embed",
    "/api/embeddings",
    "/api/copy",
    "/api/delete",
    "/api/pull",
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

/// `GET /health`: 200 while a model can answer or be loaded on demand; 503 in llama-server's
/// form while no model is loaded and one is loading. `serve` loads the default model before it
/// listens, so that is only seen while it is loaded again (after keep-alive unloaded it, or its
/// thread failed) or another replaces it under `--max-loaded`, with no other model loaded.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let statuses = state.pool.statuses();
    let answering = statuses
        .iter()
        .any(|s| s.loaded.as_ref().is_some_and(|m| m.failure().is_none()));
    if !answering && statuses.iter().any(|s| s.loading) {
        return llama_server::error(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Loading model",
        ));
    }
    let models: Vec<serde_json::Value> = statuses
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
