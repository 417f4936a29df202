//! `qwen-run serve`: the server's flags, turned into the plain options the server takes.

use super::ollama_env::OllamaEnv;
use super::{ModelArgs, TemplateArgs};
use crate::engine::Pooling;
use crate::scheduler::DEFAULT_PREFILL_CHUNK_WHILE_DECODING;
use crate::server::access::AccessOptions;
use crate::server::{parse_keep_alive, RouteRule, ServeOptions, ServerOptions};
use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (default 127.0.0.1). With neither --host nor --port, OLLAMA_HOST
    /// (host[:port] or a URL; its port defaults to 11434) sets both when it is set.
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (default 8080; 0: any free port; the address is printed on stderr).
    #[arg(long)]
    pub port: Option<u16>,
    /// Requests that may wait for a free generation slot, per model; more get 429 (default 16;
    /// also OLLAMA_MAX_QUEUE).
    #[arg(long = "queue-size", visible_alias = "queue")]
    pub queue_size: Option<usize>,
    /// Seconds a request may wait in the queue for a generation slot; then it gets 503.
    #[arg(
        long = "queue-timeout",
        value_name = "SECONDS",
        default_value_t = 300.0
    )]
    pub queue_timeout: f64,
    /// Generation slots per model: requests served at the same time, batched into shared forward
    /// passes (continuous batching). Each busy slot holds a KV cache of --ctx-size tokens
    /// (default 4; also OLLAMA_NUM_PARALLEL).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Prompt tokens a request runs per step while other requests are generating: smaller keeps
    /// their streams flowing, larger finishes the new prompt sooner (at most --batch-size).
    #[arg(long = "prefill-chunk", value_name = "N", default_value_t = DEFAULT_PREFILL_CHUNK_WHILE_DECODING)]
    pub prefill_chunk: usize,
    /// Cap on generated tokens per request (0: only the context limits it).
    #[arg(long = "max-tokens", default_value_t = 0)]
    pub max_tokens: usize,
    /// Name to serve the model under (default: the file name without .gguf); one model only.
    #[arg(long)]
    pub alias: Option<String>,
    /// How long an idle model stays loaded: seconds, or 30s / 5m / 1h; -1: for good (the
    /// default, as llama-server; Ollama's default is 5m); 0: unload as soon as it is idle.
    /// A request's `keep_alive` replaces it for that model. Also OLLAMA_KEEP_ALIVE.
    #[arg(
        long = "keep-alive",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub keep_alive: Option<String>,
    /// Models loaded at the same time; loading one more unloads the least recently used idle one
    /// (default 3; also OLLAMA_MAX_LOADED_MODELS).
    #[arg(long = "max-loaded", value_name = "N")]
    pub max_loaded: Option<usize>,
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
    /// An API key requests must send (`Authorization: Bearer KEY`); repeat for several. Every
    /// endpoint but / and /health then needs one. Also from QWEN_RUN_API_KEY.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (blank lines and lines starting with # skipped).
    #[arg(long = "api-key-file", value_name = "FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// An origin whose web pages may call the server (CORS), e.g. http://localhost:3000; `*` in
    /// it stands for anything, `*` alone allows every page. Repeatable; also OLLAMA_ORIGINS
    /// (comma-separated). Without one, requests from web pages are refused.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Answer the embedding endpoints (POST /v1/embeddings, /embedding, /api/embed,
    /// /api/embeddings), as llama-server's --embedding; without it they answer 501. Chat and
    /// completions keep working.
    #[arg(long = "embedding", visible_alias = "embeddings")]
    pub embedding: bool,
    /// How an embedding pools the final hidden states of a text's tokens: mean, last, cls, or
    /// none (a vector per token; POST /embedding only). Default: the model file's
    /// <arch>.pooling_type, else last, as Qwen2-based embedding models pool.
    #[arg(long, value_name = "TYPE", value_parser = ["none", "mean", "cls", "last"])]
    pub pooling: Option<String>,
    /// Directory for POST /slots/{id}?action=save|restore (a slot's tokens and KV cache in a
    /// file named by the request; created private if missing). Without it those actions are
    /// refused.
    #[arg(long = "slot-save-path", value_name = "DIR")]
    pub slot_save_path: Option<std::path::PathBuf>,
    // With several models, the chat template flags apply to every one of them.
    #[command(flatten)]
    pub template: TemplateArgs,
}

impl ServeArgs {
    /// The server's options: the models resolved (a Hugging Face repo downloaded first), the
    /// `OLLAMA_*` variables read where no flag says otherwise.
    pub fn server_options(&self) -> Result<ServerOptions> {
        let env = OllamaEnv::read(|k| std::env::var(k).ok())?;
        let vars = std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        });
        for name in OllamaEnv::unread(vars) {
            eprintln!("[qwen-run] note: {name} is set, but qwen-run does not read it (the README's \"Coming from Ollama\" lists the variables it reads)");
        }
        let parallel = self.parallel.or(env.num_parallel).unwrap_or(4);
        let queue_size = self.queue_size.or(env.max_queue).unwrap_or(16);
        let max_loaded = self.max_loaded.or(env.max_loaded_models).unwrap_or(3);
        let (host, port) = match (&self.host, self.port, env.host) {
            (None, None, Some(from_env)) => from_env,
            (host, port, _) => (
                host.clone().unwrap_or_else(|| "127.0.0.1".into()),
                port.unwrap_or(8080),
            ),
        };
        if parallel == 0 {
            bail!("--parallel must be at least 1");
        }
        if queue_size == 0 {
            bail!("--queue-size must be at least 1");
        }
        if self.prefill_chunk == 0 {
            bail!("--prefill-chunk must be at least 1");
        }
        if max_loaded == 0 {
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
        if self.pooling.is_some() && !self.embedding {
            bail!("--pooling applies to embeddings, which need --embedding; add it, or leave --pooling out");
        }
        let keep_alive = match (&self.keep_alive, &env.keep_alive) {
            (Some(k), _) => parse_keep_alive(&serde_json::Value::String(k.clone()))
                .map_err(|e| anyhow::anyhow!("--keep-alive: {e}"))?,
            (None, Some(k)) => parse_keep_alive(&serde_json::Value::String(k.clone()))
                .map_err(|e| anyhow::anyhow!("OLLAMA_KEEP_ALIVE: {e}"))?,
            (None, None) => None,
        };
        let serve = ServeOptions {
            parallel,
            queue_size,
            queue_timeout: std::time::Duration::from_secs_f64(self.queue_timeout),
            max_tokens: self.max_tokens,
            max_loaded,
            keep_alive,
            response_cache: self.response_cache,
            prefill_chunk: self.prefill_chunk,
            embeddings: self.embedding,
            pooling: self.pooling.as_deref().and_then(Pooling::parse),
            slot_save_path: self.slot_save_path.clone(),
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
        };
        let access = self.access_options(
            std::env::var("QWEN_RUN_API_KEY").ok(),
            std::env::var("OLLAMA_ORIGINS").ok(),
        )?;
        let template = self.template.template_override()?;
        let mut model_args = self.model.clone();
        if model_args.model.is_empty() && model_args.hf_repo.is_none() {
            model_args.model.extend(env.models);
        }
        if model_args.ctx_size == 0 {
            model_args.ctx_size = env.context_length.unwrap_or(0);
        }
        let no_cache_type_flag = model_args.cache_type.is_none()
            && model_args.cache_type_k.is_none()
            && model_args.cache_type_v.is_none();
        if no_cache_type_flag {
            model_args.cache_type = env.kv_cache_type;
        }
        let mut models = model_args.load_options_all()?;
        for m in &mut models {
            m.load.chat_template = template.clone();
        }
        Ok(ServerOptions {
            models,
            alias: self.alias.clone(),
            host,
            port,
            serve,
            access,
        })
    }

    /// The keys and origins from the flags, the key file and the environment's values.
    fn access_options(
        &self,
        env_key: Option<String>,
        env_origins: Option<String>,
    ) -> Result<AccessOptions> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--api-key-file: cannot read {}", path.display()))?;
            let before = keys.len();
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
            if keys.len() == before {
                bail!("--api-key-file {} holds no key", path.display());
            }
        }
        keys.extend(
            env_key
                .filter(|k| !k.trim().is_empty())
                .map(|k| k.trim().to_string()),
        );
        for k in &keys {
            if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("an API key must be non-empty and hold no spaces or control characters");
            }
        }
        let mut origins = self.cors_origins.clone();
        if let Some(env) = env_origins {
            origins.extend(
                env.split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(String::from),
            );
        }
        for o in &origins {
            if o.is_empty() || o.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("--cors-origin '{o}' is not an origin: use scheme://host[:port], e.g. http://localhost:3000, or *");
            }
        }
        Ok(AccessOptions {
            api_keys: keys,
            cors_origins: origins,
            loopback: true,
        })
    }
}
