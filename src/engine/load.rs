//! Loading: options, validation, the weights and tokenizer read in parallel, the prompt cache.

use super::device::select_device;
use super::{DeviceChoice, Engine};
use crate::gguf::GgufFile;
use crate::kv_cache::CacheType;
use crate::model::{
    check_shapes, Config, ModelRunner, Placement, Qwen2, RopeOverrides, WeightCache,
};
use crate::prefix_cache::{model_identity, DiskCache, PromptCache, Shape};
use crate::speculative::SpecConfig;
use crate::tokenizer::{ChatTemplate, TemplateOverride, Tokenizer};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub model: PathBuf,
    pub device: DeviceChoice,
    /// Layers on the GPU, counted from the last (llama.cpp's -ngl); None = all, and the output head.
    pub gpu_layers: Option<usize>,
    /// Worker threads for the CPU kernels; 0 = physical cores.
    pub threads: usize,
    /// Context size in tokens; 0 = min(model context, 4096).
    pub ctx_size: usize,
    /// Prompt tokens per forward pass during prefill.
    pub batch_size: usize,
    /// Storage type of keys and values, unless `cache_type_k` / `cache_type_v` say otherwise.
    pub cache_type: CacheType,
    pub cache_type_k: Option<CacheType>,
    pub cache_type_v: Option<CacheType>,
    /// Memory for the in-process prompt-prefix cache, in MiB; 0 turns it off.
    pub cache_ram_mib: usize,
    /// Directory of the persistent prompt cache; None turns it off.
    pub prompt_cache: Option<PathBuf>,
    /// Size limit of the persistent prompt cache, in MiB.
    pub prompt_cache_max_mib: u64,
    /// Tokens per prefix-cache block (prefixes are cached in whole blocks).
    pub prefix_block: usize,
    /// Back the CPU copy of the weights with 2 MiB pages where the system offers them: faster
    /// decoding, a slower load where fresh 2 MiB pages are slow to get.
    pub huge_pages: bool,
    /// The chat template to use instead of the GGUF's (`--chat-template`, `--chat-template-file`).
    pub chat_template: Option<TemplateOverride>,
    /// How generations speculate by default (`--spec-type` and its settings).
    pub spec: SpecConfig,
    /// The draft model (`-md`), loaded with these options; `spec.draft_model` must be set
    /// with it.
    pub draft_model: Option<PathBuf>,
    /// Directory of the weight cache (the CPU kernels' copies of the weights, mapped by later
    /// loads instead of being made again); None turns it off. Unused with `huge_pages`, whose
    /// point is memory a mapped file cannot have.
    pub weight_cache: Option<PathBuf>,
    /// Rotary settings overriding the file's (`--rope-scaling`, `--rope-scale`, `--yarn-*`).
    pub rope: RopeOverrides,
}

/// Default memory budget of the prompt-prefix cache, MiB.
pub const DEFAULT_CACHE_RAM_MIB: usize = 1024;
/// Default size limit of the on-disk prompt cache, MiB.
pub const DEFAULT_PROMPT_CACHE_MAX_MIB: u64 = 4096;
/// Default tokens per prefix-cache block.
pub const DEFAULT_PREFIX_BLOCK: usize = 64;

impl LoadOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        LoadOptions {
            model: model.into(),
            device: DeviceChoice::Cpu,
            gpu_layers: None,
            threads: 0,
            ctx_size: 0,
            batch_size: 512,
            cache_type: CacheType::F32,
            cache_type_k: None,
            cache_type_v: None,
            cache_ram_mib: DEFAULT_CACHE_RAM_MIB,
            prompt_cache: None,
            prompt_cache_max_mib: DEFAULT_PROMPT_CACHE_MAX_MIB,
            prefix_block: DEFAULT_PREFIX_BLOCK,
            huge_pages: false,
            chat_template: None,
            spec: SpecConfig::default(),
            draft_model: None,
            weight_cache: None,
            rope: RopeOverrides::default(),
        }
    }
}

impl Engine {
    pub fn load(opts: &LoadOptions) -> Result<Engine> {
        let t0 = Instant::now();
        let cpus = num_cpus::get().max(1);
        let threads = match opts.threads {
            0 => num_cpus::get_physical().max(1),
            // The pool's threads spin through a forward pass: far more of them than the CPU
            // runs at once do not just slow it down, they stall it.
            n if n > 2 * cpus => bail!(
                "--threads {n} is more than twice the {cpus} CPUs this machine has; use at most {} (leave it out for one per physical core)",
                2 * cpus
            ),
            n => n,
        };
        // Candle's own CPU ops size their parallelism from these variables. Its f32 matmul (the
        // attention) reads RAYON_NUM_THREADS on every call and, when it is unset, parses
        // /proc/cpuinfo each time, a visible share of a batched decode step. Set only when different, so a
        // server loading a second model never writes the environment while others read it.
        let n = threads.to_string();
        for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            if std::env::var(var).ok().as_deref() != Some(n.as_str()) {
                std::env::set_var(var, &n);
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("qwen-run-worker-{i}"))
            .build()
            .context("cannot start the worker threads")?;
        let device = select_device(opts.device, opts.gpu_layers)?;
        let gguf = Arc::new(GgufFile::open(&opts.model)?);
        let mut cfg = Config::from_gguf(&gguf)?;
        check_shapes(&gguf, &cfg)?;
        cfg.rope = cfg.rope.resolve(&opts.rope, "the command line")?;
        if opts.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let max_ctx = cfg.rope.max_context(cfg.context_length);
        let ctx_size = match opts.ctx_size {
            0 => cfg.context_length.min(4096),
            n if n > max_ctx && max_ctx == cfg.context_length => bail!(
                "--ctx-size {n} exceeds the model's trained context of {} tokens; a longer one needs rope scaling, e.g. --rope-scaling yarn --rope-scale {} --yarn-orig-ctx {} (as the model card says, if it was trained for it)",
                cfg.context_length,
                n.div_ceil(cfg.context_length),
                cfg.context_length
            ),
            n if n > max_ctx => bail!(
                "--ctx-size {n} exceeds the {max_ctx} tokens this rope scaling reaches ({} original tokens x {}); raise --rope-scale",
                cfg.rope.orig_ctx,
                1.0 / cfg.rope.freq_scale
            ),
            n => n,
        };
        let placement =
            Placement::new(cfg.n_layers, &device, opts.gpu_layers.unwrap_or(usize::MAX));
        let weight_dir = opts.weight_cache.as_ref().filter(|_| !opts.huge_pages);
        let identity = match weight_dir.is_some() || opts.prompt_cache.is_some() {
            true => Some(model_identity(gguf.paths())?),
            false => None,
        };
        let weight_cache = weight_dir.zip(identity).map(|(dir, model)| WeightCache {
            dir: dir.clone(),
            model,
        });
        // The tokenizer (a quarter of a second for Qwen's 151k-token vocabulary) is built on its
        // own thread while this one loads the weights.
        let (text, model) = std::thread::scope(|s| {
            let text = s.spawn(|| -> Result<_> {
                Ok((
                    Tokenizer::from_gguf(&gguf)?,
                    ChatTemplate::for_model(&gguf, opts.chat_template.as_ref())?,
                ))
            });
            let model = Qwen2::load(
                &gguf,
                cfg.clone(),
                placement,
                ctx_size,
                opts.huge_pages,
                weight_cache.as_ref(),
            );
            let text = text
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("building the tokenizer panicked")));
            (text, model)
        });
        let (tokenizer, template) = text?;
        let weights = model?;
        let cache_type_k = opts.cache_type_k.unwrap_or(opts.cache_type);
        let cache_type_v = opts.cache_type_v.unwrap_or(opts.cache_type);
        for ty in [cache_type_k, cache_type_v] {
            if ty == CacheType::Q8_0 && !cfg.head_dim.is_multiple_of(crate::kv_cache::Q8_0_BLOCK) {
                bail!("a q8_0 KV cache needs a head size that is a multiple of 32; this model's is {}: use f16 or f32", cfg.head_dim);
            }
        }
        if opts.prefix_block == 0 {
            bail!("the prefix-cache block size must be at least 1 token");
        }
        let cache_ram = mib_to_bytes(opts.cache_ram_mib as u64, "--cache-ram")?;
        let prompt_cache_max = mib_to_bytes(opts.prompt_cache_max_mib, "--prompt-cache-max")?;
        let disk = match (&opts.prompt_cache, identity) {
            (Some(dir), Some(model)) if opts.prompt_cache_max_mib > 0 => Some(DiskCache::new(
                dir.clone(),
                prompt_cache_max,
                Shape {
                    model: rope_keyed(model, &cfg),
                    type_k: cache_type_k,
                    type_v: cache_type_v,
                    layers: cfg.n_layers,
                    kv_heads: cfg.n_kv_heads,
                    head_dim: cfg.head_dim,
                    block: opts.prefix_block,
                },
            )),
            _ => None,
        };
        let prompt_cache = PromptCache::new(
            opts.prefix_block,
            cache_ram as usize,
            disk,
            cache_type_k,
            cache_type_v,
        );
        if opts.spec.draft_model != opts.draft_model.is_some() {
            bail!(
                "speculative type draft-simple needs a draft model (-md FILE or -hfd REPO), and a draft model needs draft-simple among --spec-type"
            );
        }
        let mut engine = Engine {
            gguf,
            runner: ModelRunner::new(weights, cache_type_k, cache_type_v),
            tokenizer,
            template,
            ctx_size,
            batch_size: opts.batch_size,
            threads,
            load_time: t0.elapsed(),
            pool,
            passes: Mutex::new(()),
            prompt_cache,
            grammars: Default::default(),
            spec: opts.spec,
            step_costs: Default::default(),
            draft: None,
        };
        if let Some(path) = &opts.draft_model {
            engine.draft = Some(Box::new(super::draft::load(&engine, opts, path)?));
            engine.load_time = t0.elapsed();
        }
        engine.check_kv_fits(1)?;
        Ok(engine)
    }
}

/// A size flag in MiB as bytes; one past what 64 bits (or this machine's address space) hold is
/// refused rather than wrapped around into some other size.
fn mib_to_bytes(mib: u64, flag: &str) -> Result<u64> {
    mib.checked_mul(1 << 20)
        .filter(|&b| usize::try_from(b).is_ok())
        .with_context(|| format!("{flag} {mib} MiB is more bytes than this machine can address"))
}

/// Bytes of memory the system can still hand out without swapping (Linux's MemAvailable);
/// None where that is not known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Engine {
    /// Checks that `sessions` full KV caches of this engine (a server's --parallel slots, each
    /// of --ctx-size tokens) fit in the memory still available, before any is made: the caches
    /// are made as slots are first used, and a machine that runs out then swaps or kills the
    /// process in the middle of serving.
    pub fn check_kv_fits(&self, sessions: usize) -> Result<()> {
        let Some(available) = available_memory() else {
            return Ok(());
        };
        if self.placement().gpu().is_some() {
            return Ok(()); // GPU memory is checked by the device when the caches are made.
        }
        let per_token =
            self.kv_bytes_per_token() + self.draft().map_or(0, |d| d.kv_bytes_per_token());
        let per_session = (self.ctx_size as u64).saturating_mul(per_token as u64);
        let need = per_session.saturating_mul(sessions as u64);
        if need > available {
            let mib = |b: u64| b >> 20;
            bail!(
                "the KV caches need {} MiB ({sessions} slot(s) x {} tokens of context x {} bytes per token), but only {} MiB of memory is available; lower --parallel or --ctx-size, or use a smaller KV type (--cache-type f16 or q8_0)",
                mib(need),
                self.ctx_size,
                per_token,
                mib(available)
            );
        }
        Ok(())
    }
}

/// The prompt cache's model key: the file's identity and the rotary settings, which the cached
/// keys were rotated with.
pub(super) fn rope_keyed(identity: u64, cfg: &Config) -> u64 {
    crate::prefix_cache::hash_bytes(identity, &cfg.rope.fingerprint())
}
