//! `qwen-run bench`: llama-bench's tests (pp = prompt processing, tg = text generation) and its
//! table, plus what llama-bench does not report: load time, time to first token, peak RSS and
//! decode speed against the memory-bandwidth roofline.

pub mod alloc_count;
pub mod fidelity;
mod roofline;

pub use roofline::{
    decode_bytes_per_token, measure_device_bandwidth, measure_product_rate, measure_read_bandwidth,
    multiply_adds_per_token,
};

use crate::engine::{Engine, LoadOptions, Session, Step};
use crate::grammar::{Constraint, Format};
use crate::model::Logits;
use crate::scheduler::Guide;
use anyhow::{bail, Result};
use serde::Serialize;
use std::cell::Cell;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub load: LoadOptions,
    pub prompt_lens: Vec<usize>,
    pub gen_lens: Vec<usize>,
    /// Context already filled when each test starts (llama-bench's n_depth); empty means 0.
    pub depths: Vec<usize>,
    pub threads: Vec<usize>,
    /// Sequences decoded together in the tg tests (batched decode, as the server's --parallel
    /// slots run it); 1 is llama-bench's tg.
    pub parallel: Vec<usize>,
    pub repetitions: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub model: String,
    pub size_bytes: u64,
    pub params: u64,
    pub backend: String,
    pub threads: usize,
    pub test: String,
    /// Tokens per test: prompt or generated tokens, over all sequences.
    pub n_tokens: usize,
    /// Sequences decoded together (tg tests); 1 otherwise.
    pub sequences: usize,
    /// Tokens in the context before the test's own (llama-bench's n_depth).
    pub depth: usize,
    /// The format the tg test's tokens were constrained to (json, schema, lark, gbnf).
    pub format: Option<String>,
    pub samples_ts: Vec<f64>,
    pub avg_ts: f64,
    pub stddev_ts: f64,
}

impl BenchRow {
    /// A test's row: its sequences decoded together and the tokens of context before its own.
    fn new(
        engine: &Engine,
        test: String,
        n_tokens: usize,
        (sequences, depth): (usize, usize),
        format: Option<String>,
        samples: Vec<f64>,
    ) -> BenchRow {
        let (avg_ts, stddev_ts) = mean_sd(&samples);
        BenchRow {
            model: model_label(engine),
            size_bytes: engine.gguf.tensors.iter().map(|t| t.size as u64).sum(),
            params: engine
                .gguf
                .tensors
                .iter()
                .map(|t| t.elements() as u64)
                .sum(),
            backend: engine.device_name(),
            threads: engine.threads,
            test,
            n_tokens,
            sequences,
            depth,
            format,
            samples_ts: samples,
            avg_ts,
            stddev_ts,
        }
    }
}

/// What a format costs before its first token, in milliseconds: the model's vocabulary indexed
/// for llguidance (once per model), the format compiled (once per format text), and a copy of the
/// compiled parser (each request after the first).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FormatTimes {
    pub vocabulary_ms: f64,
    pub compile_ms: f64,
    pub cached_ms: f64,
    /// Microseconds per token spent masking the logits, in the last tg test under the format.
    pub mask_us_per_token: Option<f64>,
}

/// What a draft model did in a bench generation.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DraftTimes {
    /// Drafted tokens kept over drafted tokens.
    pub acceptance: f64,
    /// Tokens generated per target decode step.
    pub tokens_per_pass: f64,
    pub drafted: usize,
    pub accepted: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchExtras {
    pub load_s: f64,
    /// With a draft model (`-md`): what it did in the last `chatN +draft` test.
    pub draft: Option<DraftTimes>,
    pub format: Option<FormatTimes>,
    pub ttft_ms: f64,
    pub ttft_prompt_tokens: usize,
    pub peak_rss_mib: f64,
    pub read_bandwidth_gbs: f64,
    /// All weight bytes a decode step reads, wherever they are.
    pub decode_bytes_per_token: u64,
    /// The GPU's copy bandwidth (read + write), when layers run on one.
    pub gpu_bandwidth_gbs: Option<f64>,
    /// The part of `decode_bytes_per_token` read from GPU memory.
    pub decode_bytes_on_gpu: u64,
    /// Decode t/s of the last tg test over the bandwidth bound: host bytes / host bandwidth +
    /// GPU bytes / GPU bandwidth per token.
    pub roofline_pct: Option<f64>,
    /// 8-bit multiply-adds per second the CPU threads compute with the kernels' product
    /// instructions alone, in units of 1e9 (`None`: scalar kernels).
    pub int8_peak_gmacs: Option<f64>,
    /// 8-bit multiply-adds of one token through the CPU's layers.
    pub multiply_adds_per_token: u64,
    /// The last pp test's multiply-adds per second over `int8_peak_gmacs`.
    pub prefill_compute_pct: Option<f64>,
    /// The same for the last batched decode test (several sequences).
    pub batched_compute_pct: Option<f64>,
    /// Heap allocations per generated token (decode of one sequence), and their bytes; `None`
    /// where the counting allocator is not installed.
    pub allocations_per_token: Option<f64>,
    pub allocated_bytes_per_token: Option<f64>,
    /// Minor page faults per generated token (memory the allocator had to map afresh).
    pub page_faults_per_token: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub rows: Vec<BenchRow>,
    pub extras: BenchExtras,
}

pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    run_constrained(opts, None)
}

/// [`run`], with the tg tests under constrained decoding where `format` is given: each token is
/// the most likely one the format allows, where llama-bench's tg feeds fixed tokens.
pub fn run_constrained(opts: &BenchOptions, format: Option<&Format>) -> Result<BenchReport> {
    if opts.repetitions == 0 {
        bail!("-r/--repetitions must be at least 1");
    }
    if opts.parallel.contains(&0) {
        bail!("--parallel values must be at least 1");
    }
    let mut rows = Vec::new();
    let mut load_s = 0.0;
    let mut ttft_ms = 0.0;
    let mut format_times = None;
    let mut ttft_prompt_tokens = 0;
    let (mut host_bytes, mut gpu_bytes) = (0, 0);
    let mut macs_per_token = 0;
    let mut gpu_bandwidth_gbs = None;
    let mut per_token = DecodeCosts::default();
    let mut draft = None;
    for &threads in &opts.threads {
        let mut load = opts.load.clone();
        load.threads = threads;
        let need = opts
            .prompt_lens
            .iter()
            .chain(&opts.gen_lens)
            .copied()
            .max()
            .unwrap_or(0)
            + opts.depths.iter().copied().max().unwrap_or(0)
            + 1;
        if load.ctx_size == 0 {
            // Room for the time-to-first-token chat prompt too.
            load.ctx_size = need.max(256);
        }
        let engine = Engine::load(&load)?;
        if need > engine.ctx_size {
            bail!(
                "a test needs {need} positions but --ctx-size is {}",
                engine.ctx_size
            );
        }
        load_s = engine.load_time.as_secs_f64();
        (host_bytes, gpu_bytes) = decode_bytes_per_token(&engine);
        macs_per_token = multiply_adds_per_token(&engine);
        if let (None, Some(gpu)) = (gpu_bandwidth_gbs, engine.placement().gpu()) {
            gpu_bandwidth_gbs = Some(measure_device_bandwidth(gpu)?);
        }
        per_token = decode_costs(&engine)?;
        if let Some(f) = format {
            let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let grammars = engine.grammars()?;
            let vocabulary_ms = ms(t);
            let t = Instant::now();
            grammars.constraint(f)?;
            let compile_ms = ms(t);
            let t = Instant::now();
            grammars.constraint(f)?;
            format_times = Some(FormatTimes {
                vocabulary_ms,
                compile_ms,
                cached_ms: ms(t),
                mask_us_per_token: None,
            });
        }
        let ttft = time_to_first_token(&engine)?;
        ttft_ms = ttft.0.as_secs_f64() * 1e3;
        ttft_prompt_tokens = ttft.1;
        let parallel: Vec<usize> = match &opts.parallel[..] {
            [] => vec![1],
            p => p.to_vec(),
        };
        let depths: Vec<usize> = match &opts.depths[..] {
            [] => vec![0],
            d => d.to_vec(),
        };
        let tests = opts
            .prompt_lens
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| (format!("pp{n}"), n, true, 1))
            .chain(opts.gen_lens.iter().filter(|&&n| n > 0).flat_map(|&n| {
                parallel.iter().map(move |&b| match b {
                    1 => (format!("tg{n}"), n, false, 1),
                    b => (format!("tg{n} x{b}"), n, false, b),
                })
            }))
            .flat_map(|test| depths.iter().map(move |&d| (test.clone(), d)));
        let chat_tests = match engine.draft() {
            // With a draft model, each tg length also runs as a greedy chat answer through the
            // scheduler, plain and drafted: tg's fixed tokens give a draft nothing to predict.
            Some(_) => opts.gen_lens.iter().filter(|&&n| n > 0).copied().collect(),
            None => Vec::new(),
        };
        for n in chat_tests {
            for drafted in [false, true] {
                let once = |e: &Engine| time_chat_answer(e, n, drafted);
                once(&engine)?; // warm-up
                let runs = (0..opts.repetitions)
                    .map(|_| once(&engine))
                    .collect::<Result<Vec<_>>>()?;
                let samples: Vec<f64> = runs.iter().map(|g| g.decode_tok_s()).collect();
                if let (true, Some(g)) = (drafted, runs.last()) {
                    draft = Some(DraftTimes {
                        acceptance: g.spec.acceptance(),
                        tokens_per_pass: g.tokens_per_pass(),
                        drafted: g.spec.drafted,
                        accepted: g.spec.accepted,
                    });
                }
                rows.push(BenchRow::new(
                    &engine,
                    format!("chat{n}{}", if drafted { " +draft" } else { "" }),
                    runs.last().map_or(n, |g| g.tokens.len()),
                    (1, 0),
                    None,
                    samples,
                ));
            }
        }
        for ((name, n, is_prompt, seqs), depth) in tests {
            let format = format.filter(|_| !is_prompt);
            let name = match format {
                Some(f) => format!("{name} +{}", format_label(f)),
                None => name,
            };
            let name = match depth {
                0 => name,
                d => format!("{name} @ d{d}"),
            };
            let masked = Cell::new((Duration::ZERO, 0));
            let once = |e: &Engine| {
                if is_prompt {
                    time_prompt(e, n, depth)
                } else {
                    time_generation(e, n, seqs, depth, format, &masked)
                }
            };
            once(&engine)?; // warm-up, as llama-bench does
            let samples = (0..opts.repetitions)
                .map(|_| once(&engine).map(|d| (n * seqs) as f64 / d.as_secs_f64()))
                .collect::<Result<Vec<f64>>>()?;
            if let (Some(times), (spent, tokens @ 1..)) = (&mut format_times, masked.get()) {
                times.mask_us_per_token = Some(spent.as_secs_f64() * 1e6 / tokens as f64);
            }
            rows.push(BenchRow::new(
                &engine,
                name,
                n * seqs,
                (seqs, depth),
                format.map(|f| format_label(f).to_string()),
                samples,
            ));
        }
    }
    // before the bandwidth probe, whose 512 MiB buffer is not the engine's
    let peak_rss_mib = peak_rss_bytes() as f64 / (1 << 20) as f64;
    let read_bandwidth_gbs = measure_read_bandwidth(*opts.threads.iter().max().unwrap_or(&1));
    let seconds_per_token = host_bytes as f64 / (read_bandwidth_gbs * 1e9)
        + gpu_bandwidth_gbs.map_or(0.0, |bw| gpu_bytes as f64 / (bw * 1e9));
    let roofline_pct = rows
        .iter()
        .rev()
        .find(|r| r.test.starts_with("tg") && r.sequences == 1 && r.depth == 0)
        .map(|r| 100.0 * r.avg_ts * seconds_per_token);
    let int8_peak_gmacs =
        measure_product_rate(*opts.threads.iter().max().unwrap_or(&1)).map(|r| r / 1e9);
    let compute_pct = |row: Option<&BenchRow>| {
        let (row, peak) = (row?, int8_peak_gmacs?);
        Some(100.0 * row.avg_ts * macs_per_token as f64 / (peak * 1e9))
    };
    let prefill_compute_pct = compute_pct(
        rows.iter()
            .rev()
            .find(|r| r.test.starts_with("pp") && r.depth == 0),
    );
    let batched_compute_pct = compute_pct(
        rows.iter()
            .rev()
            .find(|r| r.test.starts_with("tg") && r.sequences > 1 && r.depth == 0),
    );
    Ok(BenchReport {
        rows,
        extras: BenchExtras {
            load_s,
            draft,
            format: format_times,
            ttft_ms,
            ttft_prompt_tokens,
            peak_rss_mib,
            read_bandwidth_gbs,
            decode_bytes_per_token: host_bytes + gpu_bytes,
            gpu_bandwidth_gbs,
            decode_bytes_on_gpu: gpu_bytes,
            roofline_pct,
            int8_peak_gmacs,
            multiply_adds_per_token: macs_per_token,
            prefill_compute_pct,
            batched_compute_pct,
            allocations_per_token: per_token.allocations,
            allocated_bytes_per_token: per_token.bytes,
            page_faults_per_token: per_token.page_faults,
        },
    })
}

/// Token ids spread over the vocabulary, like llama-bench's random prompt; fixed so runs compare.
fn bench_tokens(engine: &Engine, n: usize) -> Vec<u32> {
    let vocab = engine.config().vocab_size.min(150_000) as u64;
    (0..n as u64)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect()
}

/// A session holding `depth` prompt tokens (untimed), and the `n` tokens to time after them.
fn session_at_depth(engine: &Engine, depth: usize, n: usize) -> Result<(Session, Vec<u32>)> {
    let tokens = bench_tokens(engine, depth + n);
    let mut session = engine.new_session()?;
    if depth > 0 {
        engine.forward(&mut session, &tokens[..depth], Logits::Last)?;
    }
    Ok((session, tokens[depth..].to_vec()))
}

fn time_prompt(engine: &Engine, n: usize, depth: usize) -> Result<Duration> {
    let (mut session, tokens) = session_at_depth(engine, depth, n)?;
    let t0 = Instant::now();
    engine.forward(&mut session, &tokens, Logits::Last)?;
    Ok(t0.elapsed())
}

/// The short name of a format in a test's name.
fn format_label(f: &Format) -> &'static str {
    match f {
        Format::JsonObject => "json",
        Format::JsonSchema(_) => "schema",
        Format::Lark(_) => "lark",
        Format::Gbnf(_) => "gbnf",
        Format::Triggered { .. } => "triggered",
    }
}

/// n single-token steps after `depth` tokens of context (llama-bench's tg test, with its -d);
/// with several sequences, each step is one batched forward pass over all of them, each on its
/// own KV cache, as the server's continuous batching runs it.
fn time_generation(
    engine: &Engine,
    n: usize,
    sequences: usize,
    depth: usize,
    format: Option<&Format>,
    masked: &Cell<(Duration, usize)>,
) -> Result<Duration> {
    let mut sessions = Vec::with_capacity(sequences);
    let mut tokens = Vec::new();
    for _ in 0..sequences {
        let (session, t) = session_at_depth(engine, depth, n + sequences)?;
        sessions.push(session);
        tokens = t;
    }
    if let Some(f) = format {
        return time_guided_generation(engine, n, sessions, &tokens, f, masked);
    }
    let mut logits = Vec::new();
    let t0 = Instant::now();
    for i in 0..n {
        // A different token per sequence, as different requests would have.
        let mut batch = one_token_each(&mut sessions, &tokens[i..]);
        engine.step(&mut batch, &mut logits)?;
    }
    Ok(t0.elapsed())
}

/// The tg test under a format: after each step every sequence's logits are masked by its
/// constraint (the decoder's `Guide::mask`) and the most likely allowed token runs next. A
/// sequence whose answer is complete (only end-of-generation allowed) feeds that token, as tg
/// ignores end-of-generation, and starts a new answer with a new constraint (a copy of the
/// cached parser), so every test decodes its n tokens.
fn time_guided_generation(
    engine: &Engine,
    n: usize,
    mut sessions: Vec<Session>,
    tokens: &[u32],
    format: &Format,
    masked: &Cell<(Duration, usize)>,
) -> Result<Duration> {
    struct Answer {
        constraint: Constraint,
        generated: Vec<u32>,
    }
    let grammars = engine.grammars()?;
    let mut logits = Vec::new();
    let t0 = Instant::now();
    let mut answers = Vec::with_capacity(sessions.len());
    for _ in 0..sessions.len() {
        answers.push(Answer {
            constraint: grammars.constraint(format)?,
            generated: Vec::new(),
        });
    }
    let mut next: Vec<u32> = tokens[..sessions.len()].to_vec();
    for _ in 0..n {
        let mut batch = one_token_each(&mut sessions, &next);
        engine.step(&mut batch, &mut logits)?;
        drop(batch);
        let vocab = logits.len() / next.len();
        for ((row, answer), t) in logits.chunks_mut(vocab).zip(&mut answers).zip(&mut next) {
            let t0 = Instant::now();
            answer.constraint.mask(&answer.generated, row);
            let (spent, tokens) = masked.get();
            masked.set((spent + t0.elapsed(), tokens + 1));
            *t = crate::sampler::argmax(row);
            if engine.tokenizer.is_eog(*t) {
                answer.constraint = grammars.constraint(format)?;
                answer.generated.clear();
            } else {
                answer.generated.push(*t);
            }
        }
    }
    Ok(t0.elapsed())
}

/// One decode step: `tokens[k]` after sequence k's context.
fn one_token_each<'a>(sessions: &'a mut [Session], tokens: &'a [u32]) -> Vec<Step<'a>> {
    sessions
        .iter_mut()
        .zip(tokens)
        .map(|(session, t)| Step {
            session,
            tokens: std::slice::from_ref(t),
            logits: Logits::Last,
        })
        .collect()
}

#[derive(Clone, Copy, Debug, Default)]
struct DecodeCosts {
    allocations: Option<f64>,
    bytes: Option<f64>,
    page_faults: f64,
}

/// Heap allocations and minor page faults of single-sequence decode steps, per token: counted over
/// 16 steps after 64 warm-up steps. The first steps of a session size its buffers, and each worker
/// thread sizes its own when it first takes part in attention, which it does once the context is
/// long enough to be worth splitting (a few dozen tokens).
fn decode_costs(engine: &Engine) -> Result<DecodeCosts> {
    const WARM_UP: usize = 64;
    const STEPS: usize = 16;
    let tokens = bench_tokens(engine, WARM_UP + STEPS);
    let mut session = engine.new_session()?;
    let mut logits = Vec::new();
    let mut step = |t: &u32| {
        let mut one = [Step {
            session: &mut session,
            tokens: std::slice::from_ref(t),
            logits: Logits::Last,
        }];
        engine.step(&mut one, &mut logits)
    };
    for t in &tokens[..WARM_UP] {
        step(t)?;
    }
    let (a0, f0) = (alloc_count::snapshot(), minor_page_faults());
    for t in &tokens[WARM_UP..] {
        step(t)?;
    }
    let (a1, f1) = (alloc_count::snapshot(), minor_page_faults());
    let per = |x: u64| x as f64 / STEPS as f64;
    let counted = a0.zip(a1);
    Ok(DecodeCosts {
        allocations: counted.map(|((n0, _), (n1, _))| per(n1 - n0)),
        bytes: counted.map(|((_, b0), (_, b1))| per(b1 - b0)),
        page_faults: per(f1.saturating_sub(f0)),
    })
}

/// This process's minor page faults so far (0 where getrusage fails).
fn minor_page_faults() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0 {
            u.ru_minflt as u64
        } else {
            0
        }
    }
}

/// A short chat prompt from an empty cache to the first sampled token.
fn time_to_first_token(engine: &Engine) -> Result<(Duration, usize)> {
    let messages = [crate::tokenizer::Message::new(
        "user",
        "Write a haiku about Rust.",
    )];
    let tokens = engine
        .tokenizer
        .encode(&engine.template.render(&messages, None, true)?)?;
    let mut sampler = crate::sampler::Sampler::new(crate::sampler::SamplingParams::greedy())?;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let mut session = engine.new_session()?;
        let g = engine.generate(&mut session, &tokens, 1, &mut sampler, |_| true)?;
        best = best.min(g.ttft);
    }
    Ok((best, tokens.len()))
}

/// A greedy answer of up to `n` tokens to a coding request, through the scheduler, with the
/// engine's speculation (`drafted`) or none; the prompt is run anew each time.
fn time_chat_answer(
    engine: &Engine,
    n: usize,
    drafted: bool,
) -> Result<crate::scheduler::Generation> {
    let messages = [crate::tokenizer::Message::new(
        "user",
        "Write a Python function that checks whether a string is a palindrome, with a docstring and two examples.",
    )];
    let tokens = engine
        .tokenizer
        .encode(&engine.template.render(&messages, None, true)?)?;
    let mut sampler = crate::sampler::Sampler::new(crate::sampler::SamplingParams::greedy())?;
    let mut session = engine.new_session()?;
    let mut req =
        crate::scheduler::Request::new(tokens, n, crate::scheduler::Held::Borrowed(&mut sampler));
    req.spec = Some(match drafted {
        true => engine.spec,
        false => crate::speculative::SpecConfig::OFF,
    });
    engine.generate_request(&mut session, req, |_| true)
}

fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = if x.len() > 1 {
        x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn model_label(engine: &Engine) -> String {
    let g = &engine.gguf;
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let size = g
        .get("general.size_label")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let ftype = g
        .get("general.file_type")
        .and_then(|v| v.as_u64())
        .map_or("?", file_type_name);
    format!("{arch} {size} {ftype}").replace("  ", " ")
}

/// llama.cpp's names for `general.file_type`.
pub fn file_type_name(ft: u64) -> &'static str {
    match ft {
        0 => "all F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K - Medium",
        11 => "Q3_K - Small",
        12 => "Q3_K - Medium",
        13 => "Q3_K - Large",
        14 => "Q4_K - Small",
        15 => "Q4_K - Medium",
        16 => "Q5_K - Small",
        17 => "Q5_K - Medium",
        18 => "Q6_K",
        25 => "IQ4_NL - 4.5 bpw",
        30 => "IQ4_XS - 4.25 bpw",
        32 => "BF16",
        _ => "mixed",
    }
}

/// Peak resident memory of this process (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

fn human_params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.2} M", n as f64 / 1e6)
    }
}

/// llama-bench's markdown table.
pub fn to_markdown(report: &BenchReport) -> String {
    let mut s = String::new();
    s.push_str("| model                          |       size |     params | backend    | threads |            test |                  t/s |\n");
    s.push_str("| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: | -------------------: |\n");
    for r in &report.rows {
        s.push_str(&format!(
            "| {:<30} | {:>10} | {:>10} | {:<10} | {:>7} | {:>15} | {:>20} |\n",
            r.model,
            human_size(r.size_bytes),
            human_params(r.params),
            r.backend,
            r.threads,
            r.test,
            format!("{:.2} ± {:.2}", r.avg_ts, r.stddev_ts)
        ));
    }
    let e = &report.extras;
    s.push_str(&format!(
        "\nload {:.3} s | time to first token {:.1} ms ({} prompt tokens) | peak RSS {:.0} MiB | memory read bandwidth {:.1} GB/s | weights read per token {:.1} MiB",
        e.load_s,
        e.ttft_ms,
        e.ttft_prompt_tokens,
        e.peak_rss_mib,
        e.read_bandwidth_gbs,
        e.decode_bytes_per_token as f64 / (1 << 20) as f64
    ));
    if let Some(f) = e.format {
        s.push_str(&format!(
            " | format: vocabulary indexed in {:.0} ms (once per model), compiled in {:.1} ms (once per format), copied in {:.2} ms",
            f.vocabulary_ms, f.compile_ms, f.cached_ms
        ));
        if let Some(us) = f.mask_us_per_token {
            s.push_str(&format!(", masks {us:.0} us per token"));
        }
    }
    if let Some(bw) = e.gpu_bandwidth_gbs {
        s.push_str(&format!(
            " | GPU memory bandwidth {bw:.0} GB/s (copy) | weights read per token from the GPU {:.1} MiB",
            e.decode_bytes_on_gpu as f64 / (1 << 20) as f64
        ));
    }
    if let Some(d) = e.draft {
        s.push_str(&format!(
            " | draft model: drafted {} kept {} ({:.0}%), {:.2} tokens per pass",
            d.drafted,
            d.accepted,
            100.0 * d.acceptance,
            d.tokens_per_pass
        ));
    }
    if let Some(p) = e.roofline_pct {
        s.push_str(&format!(" | decode at {p:.0}% of the bandwidth roofline"));
    }
    if let Some(peak) = e.int8_peak_gmacs {
        s.push_str(&format!(
            " | 8-bit multiply-add peak {peak:.0} G/s ({:.2} G per token)",
            e.multiply_adds_per_token as f64 / 1e9
        ));
    }
    if let Some(p) = e.prefill_compute_pct {
        s.push_str(&format!(" | prefill at {p:.0}% of it"));
    }
    if let Some(p) = e.batched_compute_pct {
        s.push_str(&format!(" | batched decode at {p:.0}% of it"));
    }
    match (e.allocations_per_token, e.allocated_bytes_per_token) {
        (Some(n), Some(b)) => s.push_str(&format!(
            " | per generated token: {n:.0} heap allocations ({:.1} KiB), {:.1} page faults",
            b / 1024.0,
            e.page_faults_per_token
        )),
        _ => s.push_str(&format!(
            " | per generated token: {:.1} page faults (heap allocations are counted in a build with --features count-allocations)",
            e.page_faults_per_token
        )),
    }
    s.push('\n');
    s
}

pub fn to_csv(report: &BenchReport) -> String {
    let mut s =
        String::from("model,size_bytes,params,backend,threads,test,n_tokens,avg_ts,stddev_ts\n");
    for r in &report.rows {
        s.push_str(&format!(
            "\"{}\",{},{},\"{}\",{},{},{},{:.4},{:.4}\n",
            r.model,
            r.size_bytes,
            r.params,
            r.backend,
            r.threads,
            r.test,
            r.n_tokens,
            r.avg_ts,
            r.stddev_ts
        ));
    }
    s
}
