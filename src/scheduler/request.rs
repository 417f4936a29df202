//! What goes into the scheduler (a [`Request`], where its output goes, an optional [`Guide`]) and
//! what comes out (text, then a [`Generation`]).

use crate::kv_cache::Session;
use crate::prefix_cache::CacheSource;
use crate::sampler::Sampler;
use crate::speculative::{SpecConfig, SpecStats};
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

/// A value the scheduler either owns or borrows from its caller for the call's duration: the
/// server's slots own their sessions; `run` and `chat` lend theirs, so a conversation's cache
/// (and a seeded sampler's state) carries over from one turn to the next.
pub enum Held<'a, T> {
    Owned(T),
    Borrowed(&'a mut T),
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Owned(t) => t,
            Held::Borrowed(t) => t,
        }
    }
}

impl<T> DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        match self {
            Held::Owned(t) => t,
            Held::Borrowed(t) => t,
        }
    }
}

/// One generation to run.
pub struct Request<'a> {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (the context may stop it earlier).
    pub max_tokens: usize,
    pub sampler: Held<'a, Sampler>,
    /// Strings that end the generation; the text stops before them.
    pub stop: Vec<String>,
    pub guide: Option<Box<dyn Guide + 'a>>,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (0-20), as [`Event::Logprob`]s.
    pub logprobs: Option<usize>,
    /// When the request was made: its queue time runs from here to admission.
    pub enqueued: Instant,
    /// How it speculates; None: as the engine was loaded to.
    pub spec: Option<SpecConfig>,
}

impl<'a> Request<'a> {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampler: Held<'a, Sampler>) -> Request<'a> {
        Request {
            prompt,
            max_tokens,
            sampler,
            stop: Vec::new(),
            guide: None,
            logprobs: None,
            enqueued: Instant::now(),
            spec: None,
        }
    }
}

/// A request's hook into the generation loop: which tokens may come next (structured output,
/// tool_choice) and which tokens to try ahead (speculative decoding). The scheduler checks every
/// draft against the model, so a guide can change what is allowed but never what the model says.
pub trait Guide: Send {
    /// Called before each token is sampled, with the tokens generated so far: sets the logits of
    /// the tokens not allowed next to negative infinity.
    fn mask(&mut self, _generated: &[u32], _logits: &mut [f32]) {}

    /// Called before each decode step with the prompt and the tokens generated so far (the last
    /// `generated` of `history`), the last of which runs next: the tokens likely to follow it,
    /// written to `drafts` (empty: none). They run in the same step and are kept as far as
    /// sampling picks them too.
    fn draft(&mut self, _history: &[u32], _generated: usize, _drafts: &mut Vec<u32>) {}
}

/// What the scheduler tells a request's owner.
pub enum Event<'e> {
    /// The request left the queue for a generation slot.
    Started,
    /// A generated token's log-probabilities (when the request asks for them), sent before the
    /// text that holds the token.
    Logprob(&'e TokenLogprob),
    /// The next piece of text.
    Text(&'e str),
    /// The generation is over.
    Done(Generation),
    /// The generation failed.
    Error(String),
}

/// Most alternatives a request may ask to see per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability and the most likely tokens in its place (most likely
/// first), under the distribution it was sampled from: after the guide's mask, the penalties and
/// the logit bias, before temperature and truncation (top-k/p, min-p).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Where a request's events go.
pub trait Output {
    /// Takes an event; false when nobody listens any more, which stops the generation.
    fn send(&mut self, event: Event<'_>) -> bool;

    /// Whether the listener has gone; checked before each step, so that a request whose client
    /// left frees its slot without running another step.
    fn is_closed(&self) -> bool {
        false
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer, or a stop string was reached.
    Stop,
    /// The token limit was reached.
    Length,
    /// The context filled up before the token limit.
    ContextFull,
    /// The answer is a tool call (set by whoever parses the text for calls).
    ToolCalls,
    /// The listener stopped it.
    Cancelled,
}

impl FinishReason {
    /// The name the OpenAI and Ollama APIs use.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A finished generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Prompt tokens served from a cache instead of being processed.
    pub reused_tokens: usize,
    /// Where the reused tokens came from.
    pub cache_source: CacheSource,
    /// Bytes of KV the session holds at the end (prompt and generated tokens).
    pub kv_bytes: usize,
    /// Generated token ids, the end-of-generation token included if one was produced.
    pub tokens: Vec<u32>,
    /// Generated tokens that are text (the end-of-generation token left out).
    pub completion_tokens: usize,
    pub finish: FinishReason,
    /// From the request to its admission.
    pub queue_time: Duration,
    /// From admission to the prompt's logits.
    pub prefill_time: Duration,
    /// From admission to the first sampled token.
    pub ttft: Duration,
    /// From the prompt's logits to the end.
    pub decode_time: Duration,
    /// From the request to the end.
    pub total_time: Duration,
    /// Drafted and kept tokens, and decode steps.
    pub spec: SpecStats,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens that needed a forward pass (the first comes from prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }

    /// Tokens generated per decode step (above 1 where drafts were kept).
    pub fn tokens_per_pass(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.spec.passes.max(1) as f64
    }
}

/// A session for a generation slot: made on first use, or lent by the caller.
pub(super) enum SlotSession<'a> {
    Unmade,
    Ready(Held<'a, Session>),
}
