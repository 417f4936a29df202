//! Server metrics in the Prometheus text format (`GET /metrics`).

use crate::speculative::SpecStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe_n(&mut self, v: f64, n: u64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += n;
            }
        }
        self.sum += v * n as f64;
        self.count += n;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    reused_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    generations: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub busy: AtomicUsize,
    pub response_cache_hits: AtomicU64,
    /// Generations stopped because their client went away (closed the stream, or aborted).
    pub cancelled: AtomicU64,
    pub queue_timeouts: AtomicU64,
    pub model_loads: AtomicU64,
    pub model_unloads: AtomicU64,
    draft_tokens: AtomicU64,
    draft_accepted: AtomicU64,
    ttft: Mutex<Histogram>,
    per_token: Mutex<Histogram>,
    pub llamacpp: LlamaCppMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            reused_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            generations: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            response_cache_hits: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            queue_timeouts: AtomicU64::new(0),
            model_loads: AtomicU64::new(0),
            model_unloads: AtomicU64::new(0),
            draft_tokens: AtomicU64::new(0),
            draft_accepted: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(TTFT_BUCKETS)),
            per_token: Mutex::new(Histogram::new(TOKEN_BUCKETS)),
            llamacpp: LlamaCppMetrics::default(),
        }
    }
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// One finished generation. `decode`: the time of the tokens after the first.
    pub fn record_generation(
        &self,
        prompt: usize,
        reused: usize,
        generated: usize,
        ttft: Duration,
        decode: Duration,
    ) {
        self.generations.fetch_add(1, Ordering::Relaxed);
        self.llamacpp
            .record_generation(prompt.saturating_sub(reused), generated, ttft, decode);
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.reused_tokens
            .fetch_add(reused as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        if generated > 0 {
            self.ttft
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe_n(ttft.as_secs_f64(), 1);
        }
        if generated > 1 {
            let n = generated as u64 - 1;
            self.per_token
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe_n(decode.as_secs_f64() / n as f64, n);
        }
    }

    /// What speculative decoding did in one finished generation.
    pub fn record_speculation(&self, spec: SpecStats) {
        self.draft_tokens
            .fetch_add(spec.drafted as u64, Ordering::Relaxed);
        self.draft_accepted
            .fetch_add(spec.accepted as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP qwen_run_requests_total HTTP requests by endpoint and status.\n# TYPE qwen_run_requests_total counter\n");
        for ((ep, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "qwen_run_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}"
            );
        }
        let prompt = self.prompt_tokens.load(Ordering::Relaxed);
        let reused = self.reused_tokens.load(Ordering::Relaxed);
        let counters = [
            (
                "qwen_run_generations_total",
                "Finished generations.",
                self.generations.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_prompt_tokens_total",
                "Prompt tokens of finished generations.",
                prompt,
            ),
            (
                "qwen_run_prompt_tokens_reused_total",
                "Prompt tokens served from the KV cache instead of being processed.",
                reused,
            ),
            (
                "qwen_run_generated_tokens_total",
                "Generated tokens.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_response_cache_hits_total",
                "Requests answered from the response cache (--response-cache).",
                self.response_cache_hits.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_generations_cancelled_total",
                "Generations stopped because their client went away.",
                self.cancelled.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_queue_timeouts_total",
                "Requests that waited longer than --queue-timeout for a generation slot.",
                self.queue_timeouts.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_model_loads_total",
                "Models loaded.",
                self.model_loads.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_draft_tokens_total",
                "Tokens drafted by speculative decoding and run.",
                self.draft_tokens.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_draft_tokens_accepted_total",
                "Drafted tokens kept (the model sampled them too).",
                self.draft_accepted.load(Ordering::Relaxed),
            ),
            (
                "qwen_run_model_unloads_total",
                "Models unloaded (keep-alive expired, --max-loaded, or keep_alive 0).",
                self.model_unloads.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let hit = if prompt == 0 {
            0.0
        } else {
            reused as f64 / prompt as f64
        };
        let gauges = [
            (
                "qwen_run_prefix_cache_hit_ratio",
                "Share of prompt tokens served from the KV cache.",
                hit,
            ),
            (
                "qwen_run_queue_depth",
                "Requests waiting for the worker.",
                self.queue_depth.load(Ordering::Relaxed) as f64,
            ),
            (
                "qwen_run_requests_processing",
                "Requests being generated now.",
                self.busy.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).write(
            &mut out,
            "qwen_run_time_to_first_token_seconds",
            "Time from the start of processing to the first generated token.",
        );
        self.per_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(
                &mut out,
                "qwen_run_time_per_output_token_seconds",
                "Time per generated token after the first.",
            );
        self.llamacpp.render(
            &mut out,
            self.busy.load(Ordering::Relaxed),
            self.queue_depth.load(Ordering::Relaxed),
        );
        out
    }
}

/// llama-server's metrics (`llamacpp:*`), for dashboards made for it, counted from the same
/// generations and model steps as ours. Rates are averages over the server's life (llama-server's
/// cover the time since the last scrape).
#[derive(Default)]
pub struct LlamaCppMetrics {
    /// Prompt tokens run (those reused from a cache are not).
    prompt_tokens: AtomicU64,
    prompt_micros: AtomicU64,
    predicted_tokens: AtomicU64,
    predicted_micros: AtomicU64,
    /// Model steps, and the busy slots summed over them.
    steps: AtomicU64,
    busy_in_steps: AtomicU64,
    /// The most positions one slot's context has held.
    context_max: AtomicU64,
}

impl LlamaCppMetrics {
    fn record_generation(&self, run: usize, generated: usize, prefill: Duration, decode: Duration) {
        self.prompt_tokens.fetch_add(run as u64, Ordering::Relaxed);
        self.prompt_micros
            .fetch_add(prefill.as_micros() as u64, Ordering::Relaxed);
        self.predicted_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        self.predicted_micros
            .fetch_add(decode.as_micros() as u64, Ordering::Relaxed);
    }

    /// One model step over `busy` slots.
    pub fn record_step(&self, busy: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.busy_in_steps.fetch_add(busy as u64, Ordering::Relaxed);
    }

    /// A slot's context now holds `positions`.
    pub fn record_context(&self, positions: usize) {
        self.context_max
            .fetch_max(positions as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, processing: usize, deferred: usize) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let prompt_s = get(&self.prompt_micros) as f64 / 1e6;
        let predicted_s = get(&self.predicted_micros) as f64 / 1e6;
        let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        let steps = get(&self.steps);
        let metrics: [(&str, &str, &str, f64); 11] = [
            (
                "prompt_tokens_total",
                "counter",
                "Number of prompt tokens processed.",
                get(&self.prompt_tokens) as f64,
            ),
            (
                "prompt_seconds_total",
                "counter",
                "Prompt process time in seconds.",
                prompt_s,
            ),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s.",
                rate(get(&self.prompt_tokens), prompt_s),
            ),
            (
                "tokens_predicted_total",
                "counter",
                "Number of generation tokens processed.",
                get(&self.predicted_tokens) as f64,
            ),
            (
                "tokens_predicted_seconds_total",
                "counter",
                "Predict process time in seconds.",
                predicted_s,
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s.",
                rate(get(&self.predicted_tokens), predicted_s),
            ),
            (
                "requests_processing",
                "gauge",
                "Number of requests processing.",
                processing as f64,
            ),
            (
                "requests_deferred",
                "gauge",
                "Number of requests deferred.",
                deferred as f64,
            ),
            (
                "n_tokens_max",
                "counter",
                "High watermark of the context size observed.",
                get(&self.context_max) as f64,
            ),
            (
                "n_decode_total",
                "counter",
                "Total number of model steps.",
                steps as f64,
            ),
            (
                "n_busy_slots_per_decode",
                "gauge",
                "Average number of busy slots per model step.",
                if steps > 0 {
                    get(&self.busy_in_steps) as f64 / steps as f64
                } else {
                    0.0
                },
            ),
        ];
        for (name, kind, help, v) in metrics {
            let _ = writeln!(
                out,
                "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {v}"
            );
        }
    }
}
