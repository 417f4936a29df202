//! The engine: a loaded model with its tokenizer and template, sessions that own a KV cache,
//! and the generation loop. The CLI, the benchmark and the server all talk to this.

mod device;

pub use device::{gpu_memory, gpu_name, select_device, DeviceChoice};

use crate::gguf::GgufFile;
use crate::kv_cache::{CacheType, KvBlock, KvCache};
use crate::model::{check_shapes, Config, Logits, Placement, Qwen2, Sequence};
use crate::prefix_cache::{
    chain_hashes, chain_seed, model_identity, DiskCache, PrefixCache, Shape,
};
use crate::sampler::Sampler;
use crate::tokenizer::{ChatTemplate, TextStream, Tokenizer};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        }
    }
}

/// Where a request's reused prompt tokens came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheSource {
    /// Nothing was reused.
    None,
    /// The session already held them (the previous turn of a conversation).
    Session,
    /// The in-process prefix cache.
    Memory,
    /// The persistent prompt cache on disk.
    Disk,
}

impl CacheSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheSource::None => "none",
            CacheSource::Session => "session",
            CacheSource::Memory => "prefix cache",
            CacheSource::Disk => "disk prompt cache",
        }
    }
}

pub struct Engine {
    pub gguf: Arc<GgufFile>,
    pub model: Qwen2,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub ctx_size: usize,
    pub batch_size: usize,
    pub cache_type_k: CacheType,
    pub cache_type_v: CacheType,
    pub threads: usize,
    pub load_time: Duration,
    pool: rayon::ThreadPool,
    /// Held by the thread that runs a forward pass, outside the pool: see [`Engine::run_pass`].
    passes: Mutex<()>,
    /// Tokens per prefix-cache block.
    pub prefix_block: usize,
    prefix: Option<Mutex<PrefixCache>>,
    disk: Option<DiskCache>,
}

impl Engine {
    pub fn load(opts: &LoadOptions) -> Result<Engine> {
        Self::load_with(opts, None)
    }

    /// Loads `opts.model`, using `opened` when the caller already opened that file (the server
    /// opens every model at startup to check it) instead of parsing it again.
    pub fn load_with(opts: &LoadOptions, opened: Option<Arc<GgufFile>>) -> Result<Engine> {
        let t0 = Instant::now();
        let threads = match opts.threads {
            0 => num_cpus::get_physical().max(1),
            n => n,
        };
        // Candle's own CPU ops size their parallelism from these variables. Its f32 matmul (the
        // attention) reads RAYON_NUM_THREADS on every call and, when it is unset, parses
        // /proc/cpuinfo each time: ~10% of a batched decode step. Set only when different, so a
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
        let gguf = match opened {
            Some(g) => g,
            None => Arc::new(GgufFile::open(&opts.model)?),
        };
        let cfg = Config::from_gguf(&gguf)?;
        check_shapes(&gguf, &cfg)?;
        if opts.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let ctx_size = match opts.ctx_size {
            0 => cfg.context_length.min(4096),
            n if n > cfg.context_length => bail!(
                "--ctx-size {n} exceeds the model's trained context of {} tokens",
                cfg.context_length
            ),
            n => n,
        };
        let placement =
            Placement::new(cfg.n_layers, &device, opts.gpu_layers.unwrap_or(usize::MAX));
        // The tokenizer (a quarter of a second for Qwen's 151k-token vocabulary) is built on its
        // own thread while this one loads the weights.
        let (text, model) = std::thread::scope(|s| {
            let text = s.spawn(|| -> Result<_> {
                Ok((
                    Tokenizer::from_gguf(&gguf)?,
                    ChatTemplate::from_gguf(&gguf)?,
                ))
            });
            let model = Qwen2::load(&gguf, placement, ctx_size, opts.huge_pages);
            let text = text
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("building the tokenizer panicked")));
            (text, model)
        });
        let (tokenizer, template) = text?;
        let model = model?;
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
        let prefix = (opts.cache_ram_mib > 0).then(|| {
            Mutex::new(PrefixCache::new(
                opts.prefix_block,
                opts.cache_ram_mib << 20,
            ))
        });
        let disk = match &opts.prompt_cache {
            Some(dir) if opts.prompt_cache_max_mib > 0 => Some(DiskCache::new(
                dir.clone(),
                opts.prompt_cache_max_mib << 20,
                Shape {
                    model: model_identity(gguf.paths())?,
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
        Ok(Engine {
            gguf,
            model,
            tokenizer,
            template,
            ctx_size,
            batch_size: opts.batch_size,
            cache_type_k,
            cache_type_v,
            threads,
            load_time: t0.elapsed(),
            pool,
            passes: Mutex::new(()),
            prefix_block: opts.prefix_block,
            prefix,
            disk,
        })
    }

    pub fn config(&self) -> &Config {
        &self.model.cfg
    }

    pub fn placement(&self) -> &Placement {
        &self.model.placement
    }

    /// The backend, as llama-bench's column names it: "CPU (avx2)", "CUDA", or "CUDA+CPU" when
    /// only some layers are offloaded.
    pub fn device_name(&self) -> String {
        let p = self.placement();
        match p.gpu() {
            None => format!("CPU ({})", qwen_run_kernels::simd_name()),
            Some(gpu) => {
                let name = match gpu {
                    Device::Cuda(_) => "CUDA",
                    _ => "Metal",
                };
                let all = p.gpu_layers() == p.layers.len() && !p.output.is_cpu();
                if all {
                    name.to_string()
                } else {
                    format!("{name}+CPU")
                }
            }
        }
    }

    /// Whether the weight tensor `name` lives on the GPU. A tied output head reads the embedding
    /// table from a GPU copy too, but lookups read the host copy: counted as host.
    pub fn on_gpu(&self, name: &str) -> bool {
        let p = self.placement();
        match name.strip_prefix("blk.").and_then(|r| r.split('.').next()) {
            Some(i) => i.parse::<usize>().is_ok_and(|i| !p.layers[i].is_cpu()),
            None => name != "token_embd.weight" && !p.output.is_cpu(),
        }
    }

    /// Where the model runs on the GPU and the GPU memory it takes, for the run report; None on
    /// the CPU.
    pub fn gpu_report(&self) -> Option<String> {
        let p = self.placement();
        let gpu = p.gpu()?;
        let c = self.config();
        let weights: usize = self
            .gguf
            .tensors
            .iter()
            .filter(|t| self.on_gpu(&t.name))
            .map(|t| t.size)
            .sum();
        let kv = self.kv_bytes_per_token() / c.n_layers * p.gpu_layers() * self.ctx_size;
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let mut s = format!(
            "{}: {}/{} layers{} | weights {:.2} GiB + KV {:.2} GiB on the GPU",
            gpu_name(gpu),
            p.gpu_layers(),
            p.layers.len(),
            if p.output.is_cpu() { "" } else { " + output" },
            gib(weights),
            gib(kv)
        );
        if let Some((free, total)) = gpu_memory(gpu) {
            s.push_str(&format!(
                " | device memory {:.2} GiB used of {:.2} GiB",
                gib(total - free),
                gib(total)
            ));
        }
        Some(s)
    }

    pub fn new_session(&self) -> Result<Session> {
        Ok(Session {
            cache: self
                .model
                .new_cache(self.ctx_size, self.cache_type_k, self.cache_type_v)?,
            tokens: Vec::with_capacity(self.ctx_size),
            logits: Vec::new(),
        })
    }

    /// Bytes of KV per token, all layers, in this engine's cache types.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = self.config();
        c.n_layers
            * c.n_kv_heads
            * (self.cache_type_k.row_bytes(c.head_dim) + self.cache_type_v.row_bytes(c.head_dim))
    }

    /// The in-process prefix cache, if enabled: (bytes held, budget bytes, blocks held).
    pub fn prefix_cache_stats(&self) -> Option<(usize, usize, usize)> {
        self.prefix.as_ref().map(|p| {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            (p.used_bytes(), p.budget_bytes(), p.len())
        })
    }

    /// The persistent prompt cache, if enabled.
    pub fn disk_cache(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }

    /// Empties the in-process prefix cache.
    pub fn clear_prefix_cache(&self) {
        if let Some(p) = &self.prefix {
            p.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    fn prefix_hashes(&self, prompt: &[u32]) -> Vec<u64> {
        if self.prefix.is_none() && self.disk.is_none() {
            return Vec::new();
        }
        let seed = chain_seed(self.cache_type_k, self.cache_type_v, self.prefix_block);
        chain_hashes(prompt, self.prefix_block, seed)
    }

    /// Brings the session's cache to the longest cached prefix of `prompt` (memory, then disk)
    /// when that is longer than what the session holds (`reused`). Returns the tokens the
    /// session now holds, where they came from, and the disk entries found unusable.
    fn restore_prefix(
        &self,
        session: &mut Session,
        prompt: &[u32],
        hashes: &[u64],
        reused: usize,
    ) -> Result<(usize, CacheSource, Vec<usize>)> {
        let b = self.prefix_block;
        let limit = prompt.len() - 1;
        let mut blocks = match &self.prefix {
            Some(p) => p
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lookup(prompt, hashes),
            None => Vec::new(),
        };
        let mut source = CacheSource::Memory;
        let mut rejected = Vec::new();
        if let Some(disk) = &self.disk {
            // Only worth a look when a longer prefix than memory and session give is possible.
            if hashes.len() > blocks.len() && hashes.len() * b > reused.max(blocks.len() * b) {
                let start = blocks.len();
                let found = disk.load(prompt, hashes, start);
                rejected = found.rejected;
                if ((start + found.blocks.len()) * b).min(limit) > reused.max(start * b) {
                    if let Some(p) = &self.prefix {
                        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                        for (j, blk) in found.blocks.iter().enumerate() {
                            p.insert(prompt, hashes, start + j, blk.clone());
                        }
                    }
                    blocks.extend(found.blocks);
                    source = CacheSource::Disk;
                }
            }
        }
        let held = (blocks.len() * b).min(limit);
        if held <= reused {
            return Ok((reused, CacheSource::Session, rejected));
        }
        // Blocks before the one holding `reused` are already in the session.
        let first = reused / b;
        session.truncate(first * b);
        for (i, blk) in blocks.iter().enumerate().skip(first) {
            session.cache.import(i * b, blk)?;
        }
        session.tokens.clear();
        session
            .tokens
            .extend_from_slice(&prompt[..blocks.len() * b]);
        session.truncate(held);
        Ok((held, source, rejected))
    }

    /// Stores the prompt's whole blocks (now in the session's cache) in the prefix caches.
    fn store_prefix(&self, session: &Session, prompt: &[u32], hashes: &[u64], rejected: &[usize]) {
        let b = self.prefix_block;
        let n = hashes.len().min(session.cache.len() / b);
        if n == 0 || session.tokens.len() < n * b || session.tokens[..n * b] != prompt[..n * b] {
            return;
        }
        let export = |i: usize| -> Option<Arc<KvBlock>> {
            session.cache.export(i * b, b).ok().map(Arc::new)
        };
        let mut blocks: Vec<Arc<KvBlock>> = Vec::new();
        if let Some(p) = &self.prefix {
            let cached = p
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lookup(prompt, &hashes[..n]);
            blocks = cached;
            let mut new = Vec::new();
            for i in blocks.len()..n {
                match export(i) {
                    Some(blk) => new.push(blk),
                    None => return,
                }
            }
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            for blk in new {
                p.insert(prompt, hashes, blocks.len(), blk.clone());
                blocks.push(blk);
            }
        }
        if let Some(disk) = &self.disk {
            let on_disk =
                (0..n).all(|i| !rejected.contains(&i) && disk.path_for(hashes[i]).exists());
            if on_disk {
                return;
            }
            for i in blocks.len()..n {
                match export(i) {
                    Some(blk) => blocks.push(blk),
                    None => return,
                }
            }
            if let Err(e) = disk.store(prompt, &hashes[..n], &blocks[..n], rejected) {
                eprintln!("warning: the prompt cache was not saved: {e:#}");
            }
        }
    }

    /// Runs one forward pass on the engine's threads. When the CPU has part of the model, the
    /// other threads spin through the pass instead of sleeping between its parallel loops
    /// (waking them costs about as much as a small matmul).
    ///
    /// One pass at a time enters the pool, and callers wait for their turn here, on their own
    /// thread. A second pass let in would be run by a worker as a stolen job, nested inside a
    /// parallel loop of the first, and wait there for the model's buffers, which the first holds
    /// while it waits for that loop: a deadlock (two tests sharing one engine hit it).
    fn run_pass<R>(&self, pass: impl FnOnce() -> R + Send) -> R
    where
        R: Send,
    {
        let _one_pass = self.passes.lock().unwrap_or_else(|e| e.into_inner());
        self.pool.install(|| {
            if self.model.placement.uses_cpu() {
                qwen_run_kernels::pool::with_spinning_workers(pass)
            } else {
                pass()
            }
        })
    }

    /// Runs the model on `tokens` appended to the session; returns the logits of the last
    /// position (or every position) as rows of f32.
    pub fn forward(
        &self,
        session: &mut Session,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<Vec<f32>>> {
        let vocab = self.config().vocab_size;
        let mut rows = Vec::new();
        for chunk in tokens.chunks(self.batch_size) {
            self.run_chunk(session, chunk, which)?;
            if which == Logits::Last {
                rows.clear();
            }
            rows.extend(session.logits.chunks_exact(vocab).map(<[f32]>::to_vec));
        }
        Ok(rows)
    }

    /// Runs the model on `tokens` appended to the session and returns the logits of the last
    /// one, in a buffer the session keeps: a decode step on the CPU allocates nothing.
    pub fn forward_last<'s>(
        &self,
        session: &'s mut Session,
        tokens: &[u32],
    ) -> Result<&'s mut [f32]> {
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        for chunk in tokens.chunks(self.batch_size) {
            self.run_chunk(session, chunk, Logits::Last)?;
        }
        Ok(&mut session.logits)
    }

    fn run_chunk(&self, session: &mut Session, chunk: &[u32], which: Logits) -> Result<()> {
        let Session {
            cache,
            tokens,
            logits,
        } = session;
        self.run_pass(|| self.model.forward(chunk, cache, which, logits))?;
        tokens.extend_from_slice(chunk);
        Ok(())
    }

    /// Runs one step for several sessions at once, `tokens[i]` appended to `sessions[i]`, and
    /// returns each one's logits at its last new token. The weights are read once for all.
    pub fn forward_batch(
        &self,
        sessions: &mut [&mut Session],
        tokens: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        let mut seqs: Vec<Sequence> = sessions
            .iter_mut()
            .zip(tokens)
            .map(|(s, &t)| Sequence {
                tokens: t,
                cache: &mut s.cache,
            })
            .collect();
        let mut logits = Vec::new();
        self.run_pass(|| {
            self.model
                .forward_batch(&mut seqs, Logits::Last, &mut logits)
        })?;
        for (s, t) in sessions.iter_mut().zip(tokens) {
            s.tokens.extend_from_slice(t);
        }
        Ok(logits
            .chunks_exact(self.config().vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Readies `session` for `prompt`: keeps the prefix it already holds, or restores a longer
    /// one from the prefix caches, and says what is left to run. Always leaves at least the last
    /// prompt token to run, for its logits.
    pub fn begin(&self, session: &mut Session, prompt: &[u32]) -> Result<Prefill> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() >= self.ctx_size {
            bail!(
                "the prompt has {} tokens but the context holds {}; shorten the prompt or raise --ctx-size (the model supports up to {})",
                prompt.len(),
                self.ctx_size,
                self.config().context_length
            );
        }
        let reused = session.common_prefix(prompt).min(prompt.len() - 1);
        session.truncate(reused);
        let hashes = self.prefix_hashes(prompt);
        let (reused, cache_source, rejected) = if hashes.is_empty() {
            (reused, CacheSource::Session, Vec::new())
        } else {
            self.restore_prefix(session, prompt, &hashes, reused)?
        };
        let cache_source = if reused == 0 {
            CacheSource::None
        } else {
            cache_source
        };
        Ok(Prefill {
            reused,
            cache_source,
            hashes,
            rejected,
        })
    }

    /// Stores the prompt's KV blocks in the prefix caches. Called as soon as the prompt has run,
    /// so that requests arriving while this one still generates can reuse it.
    pub fn store_prompt(&self, session: &Session, prompt: &[u32], prefill: &Prefill) {
        if !prefill.hashes.is_empty() {
            self.store_prefix(session, prompt, &prefill.hashes, &prefill.rejected);
        }
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each piece of text as soon as
    /// it is complete; `on_text` returns false to stop early. Tokens the session already holds
    /// as a prefix of `prompt` are not processed again.
    pub fn generate(
        &self,
        session: &mut Session,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let t0 = Instant::now();
        let prefill = self.begin(session, prompt)?;
        self.forward_last(session, &prompt[prefill.reused..])?;
        let prefill_time = t0.elapsed();
        self.store_prompt(session, prompt, &prefill);
        let mut decoder = Decoder::new(self, prompt, max_tokens);
        let t_decode = Instant::now();
        let mut ttft = None;
        loop {
            let step = decoder.step(self, sampler, &mut session.logits, &mut on_text);
            ttft.get_or_insert_with(|| t0.elapsed());
            match step {
                Some(next) => {
                    self.forward_last(session, &[next])?;
                }
                None => break,
            }
        }
        Ok(decoder.finish(
            &prefill,
            session,
            Timings {
                prefill: prefill_time,
                ttft: ttft.unwrap_or_else(|| t0.elapsed()),
                decode: t_decode.elapsed(),
            },
        ))
    }
}

/// Where a generation's time went.
pub struct Timings {
    /// From the request to the prompt's logits.
    pub prefill: Duration,
    /// From the request to the first sampled token.
    pub ttft: Duration,
    /// From the prompt's logits to the end.
    pub decode: Duration,
}

/// What [`Engine::begin`] found for a prompt.
pub struct Prefill {
    /// Prompt tokens the session holds already; the rest must be run.
    pub reused: usize,
    pub cache_source: CacheSource,
    hashes: Vec<u64>,
    rejected: Vec<usize>,
}

/// The sampling side of one generation: picks each token from the logits, streams its text, and
/// decides when to stop. [`Engine::generate`] and the server's batched scheduler both drive it.
pub struct Decoder {
    prompt_tokens: usize,
    stream: TextStream,
    history: Vec<u32>,
    generated: Vec<u32>,
    budget: usize,
    max_tokens: usize,
    finish: FinishReason,
    done: bool,
}

impl Decoder {
    pub fn new(engine: &Engine, prompt: &[u32], max_tokens: usize) -> Decoder {
        Decoder {
            prompt_tokens: prompt.len(),
            stream: TextStream::new(),
            history: prompt.to_vec(),
            generated: Vec::new(),
            budget: max_tokens.min(engine.ctx_size - prompt.len()),
            max_tokens,
            finish: FinishReason::Length,
            done: false,
        }
    }

    /// Samples the next token from `logits` and streams its text. Returns the token to run next,
    /// or None when the generation is over (end of text, budget, or `on_text` said stop).
    pub fn step(
        &mut self,
        engine: &Engine,
        sampler: &mut Sampler,
        logits: &mut [f32],
        on_text: &mut impl FnMut(&str) -> bool,
    ) -> Option<u32> {
        if self.done || self.generated.len() >= self.budget {
            return self.stop(on_text);
        }
        let next = sampler.sample(logits, &self.history);
        self.generated.push(next);
        self.history.push(next);
        if engine.tokenizer.is_eog(next) {
            self.finish = FinishReason::Stop;
            return self.stop(on_text);
        }
        let piece = self.stream.push(&engine.tokenizer, next);
        if !piece.is_empty() && !on_text(&piece) {
            self.finish = FinishReason::Cancelled;
            return self.stop(on_text);
        }
        if self.generated.len() == self.budget {
            return self.stop(on_text);
        }
        Some(next)
    }

    fn stop(&mut self, on_text: &mut impl FnMut(&str) -> bool) -> Option<u32> {
        if !self.done {
            self.done = true;
            let rest = self.stream.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
            if self.finish == FinishReason::Length && self.budget < self.max_tokens {
                self.finish = FinishReason::ContextFull;
            }
        }
        None
    }

    pub fn tokens(&self) -> &[u32] {
        &self.generated
    }

    /// Ends the generation early (the client left).
    pub fn cancel(&mut self) {
        if !self.done {
            self.finish = FinishReason::Cancelled;
            self.done = true;
        }
    }

    pub fn finish(self, prefill: &Prefill, session: &Session, t: Timings) -> Generation {
        Generation {
            prompt_tokens: self.prompt_tokens,
            reused_tokens: prefill.reused,
            cache_source: prefill.cache_source,
            kv_bytes: session.cache.used_bytes(),
            tokens: self.generated,
            prefill_time: t.prefill,
            decode_time: t.decode,
            ttft: t.ttft,
            finish: self.finish,
        }
    }
}

/// One conversation's state: its KV cache and the tokens it holds.
pub struct Session {
    pub cache: KvCache,
    tokens: Vec<u32>,
    /// The logits of the last forward pass, `[rows, vocab]`, kept so that a step allocates none.
    logits: Vec<f32>,
}

impl Session {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.cache.truncate(len);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer.
    Stop,
    /// The token limit was reached.
    Length,
    /// The context filled up before the token limit.
    ContextFull,
    /// The caller stopped it.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the session's cache instead of being processed.
    pub reused_tokens: usize,
    /// Where the reused tokens came from.
    pub cache_source: CacheSource,
    /// Bytes of KV the session holds at the end (prompt and generated tokens).
    pub kv_bytes: usize,
    /// Generated token ids, the end-of-generation token included if one was produced.
    pub tokens: Vec<u32>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub ttft: Duration,
    pub finish: FinishReason,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens that needed a forward pass (the first comes from prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}
