//! The scheduler: the one generation loop. It serves up to N requests at a time, one slot each,
//! and runs them all in one model step per iteration (continuous batching): a decoding request
//! adds one token (and its guide's drafts), a prefilling one a chunk of its prompt. Requests join
//! between steps as slots free up, and leave as soon as they finish. `serve` runs it with
//! `--parallel` slots on a thread per model; `run`, `chat`, `bench` and `fidelity` with one
//! ([`Engine::generate`](crate::engine::Engine::generate)).

mod decoder;
mod draft;
mod request;
pub mod stop;

pub use request::{
    Event, FinishReason, Generation, Guide, Held, Output, Request, TokenLogprob, MAX_TOP_LOGPROBS,
};

use crate::engine::{Engine, Step};
use crate::kv_cache::Session;
use crate::model::Logits;
use crate::prefix_cache::Found;
use crate::speculative::{CostTable, Drafter, Planned, SpecStats};
use decoder::Decoder;
use request::SlotSession;
use smallvec::SmallVec;
use std::time::{Duration, Instant};

/// Prompt tokens a prefilling request may run in one step while others decode, by default: small
/// enough that their streams keep flowing, large enough to keep the weights busy.
pub const DEFAULT_PREFILL_CHUNK_WHILE_DECODING: usize = 64;

/// How prompts are cut into steps.
#[derive(Clone, Copy, Debug)]
pub struct ChunkPolicy {
    /// Prompt tokens per step when nothing decodes (`--batch-size`).
    pub alone: usize,
    /// Prompt tokens per step while other requests decode.
    pub while_decoding: usize,
}

impl ChunkPolicy {
    pub fn of(engine: &Engine) -> ChunkPolicy {
        ChunkPolicy {
            alone: engine.batch_size,
            while_decoding: DEFAULT_PREFILL_CHUNK_WHILE_DECODING.min(engine.batch_size),
        }
    }
}

/// One generation slot. Its session (KV cache) outlives requests, so a follow-up request that
/// starts with the same tokens (a conversation's next turn) reuses them.
struct Slot<'a> {
    session: SlotSession<'a>,
    active: Option<Active<'a>>,
}

/// A request being served by a slot.
struct Active<'a> {
    req: Request<'a>,
    out: Box<dyn Output + 'a>,
    found: Found,
    /// Prompt tokens in the session so far; prefill is done when this reaches the prompt length.
    fed: usize,
    decoder: Decoder,
    /// What the next step runs, once decoding: the last sampled token, then the drafts.
    run: Vec<u32>,
    /// The latest drafts, the guide's or the drafter's.
    drafts: Vec<u32>,
    /// Proposes drafts when the guide has none (speculative decoding).
    drafter: Option<Drafter>,
    /// Whether the drafts in this step are the drafter's (it learns from how many are kept).
    drafter_drafted: bool,
    spec: SpecStats,
    queue_time: Duration,
    started: Instant,
    prefill_time: Option<Duration>,
    ttft: Option<Duration>,
    decode_start: Option<Instant>,
    /// Tokens and logits rows in the current step.
    in_step: Option<(usize, usize)>,
}

impl Active<'_> {
    fn prefilling(&self) -> bool {
        self.fed < self.req.prompt.len()
    }
}

pub struct Scheduler<'a> {
    engine: &'a Engine,
    slots: Vec<Slot<'a>>,
    chunks: ChunkPolicy,
    /// The logits of the last step, kept so that a step allocates none.
    logits: Vec<f32>,
    /// The engine's step costs, copied for the drafters before each step.
    costs: CostTable,
    /// The draft model's step costs and logits, when the engine has one.
    draft_costs: CostTable,
    draft_logits: Vec<f32>,
}

impl<'a> Scheduler<'a> {
    /// A scheduler with `slots` slots (at least one), whose sessions are made on first use.
    pub fn new(engine: &'a Engine, slots: usize) -> Scheduler<'a> {
        Scheduler {
            engine,
            slots: (0..slots.max(1))
                .map(|_| Slot {
                    session: SlotSession::Unmade,
                    active: None,
                })
                .collect(),
            chunks: ChunkPolicy::of(engine),
            logits: Vec::new(),
            costs: CostTable::default(),
            draft_costs: CostTable::default(),
            draft_logits: Vec::new(),
        }
    }

    /// A scheduler of one slot on the caller's session.
    pub fn on_session(engine: &'a Engine, session: &'a mut Session) -> Scheduler<'a> {
        let mut s = Scheduler::new(engine, 1);
        s.slots[0].session = SlotSession::Ready(Held::Borrowed(session));
        s
    }

    pub fn with_chunks(mut self, chunks: ChunkPolicy) -> Self {
        self.chunks = chunks;
        self
    }

    pub fn has_free_slot(&self) -> bool {
        self.slots.iter().any(|s| s.active.is_none())
    }

    pub fn is_idle(&self) -> bool {
        self.slots.iter().all(|s| s.active.is_none())
    }

    /// Puts a request in a free slot, preferring the one whose cache shares the longest prefix
    /// with it, and readies its session from the prompt cache. A request that cannot start gets
    /// an error event.
    pub fn admit(&mut self, req: Request<'a>, mut out: Box<dyn Output + 'a>) {
        if out.is_closed() {
            return; // The listener left while waiting.
        }
        let engine = self.engine;
        let prompt = &req.prompt;
        let Some(slot) = self
            .slots
            .iter_mut()
            .filter(|s| s.active.is_none())
            .max_by_key(|s| match &s.session {
                SlotSession::Ready(x) => x.common_prefix(prompt),
                SlotSession::Unmade => 0,
            })
        else {
            out.send(Event::Error("no free generation slot".into()));
            return;
        };
        let started = Instant::now();
        let setup = || -> anyhow::Result<Found> {
            engine.check_prompt(prompt)?;
            if let SlotSession::Unmade = slot.session {
                slot.session = SlotSession::Ready(Held::Owned(engine.new_session()?));
            }
            let SlotSession::Ready(session) = &mut slot.session else {
                unreachable!("made above")
            };
            engine.prompt_cache().lookup(session, prompt)
        };
        let found = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(setup)) {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                out.send(Event::Error(format!("{e:#}")));
                return;
            }
            Err(p) => {
                out.send(Event::Error(format!(
                    "internal error while starting the request: {}",
                    panic_message(&p)
                )));
                return;
            }
        };
        // The request leaves the queue: from here on its queue time-out no longer applies.
        out.send(Event::Started);
        let mut spec = req.spec.unwrap_or(engine.spec);
        spec.draft_model &= engine.draft().is_some();
        let drafter = Drafter::new(spec);
        let decoder = Decoder::new(
            prompt,
            req.max_tokens,
            engine.ctx_size - prompt.len(),
            &req.stop,
            req.logprobs,
        );
        slot.active = Some(Active {
            fed: found.reused,
            found,
            decoder,
            run: Vec::new(),
            drafts: Vec::new(),
            drafter,
            drafter_drafted: false,
            spec: SpecStats::default(),
            queue_time: req.enqueued.elapsed(),
            started,
            prefill_time: None,
            ttft: None,
            decode_start: None,
            in_step: None,
            req,
            out,
        });
    }

    /// One model step over the active slots, then sampling for those past their prompt.
    pub fn step(&mut self) {
        let engine = self.engine;
        let decoding = self
            .slots
            .iter()
            .any(|s| s.active.as_ref().is_some_and(|a| !a.prefilling()));
        let mut budget = if decoding {
            self.chunks.while_decoding
        } else {
            self.chunks.alone
        };
        let drafting = self.slots.iter().any(|s| {
            s.active
                .as_ref()
                .is_some_and(|a| a.drafter.is_some() && !a.prefilling())
        });
        if drafting {
            engine.step_costs().snapshot(&mut self.costs);
            if let Some(d) = engine.draft() {
                d.step_costs().snapshot(&mut self.draft_costs);
            }
        }
        let mut planned = Planned::default();
        let exact_step_tokens = engine.runner.exact_step_tokens();
        for slot in self.slots.iter_mut() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            a.in_step = None;
            if a.out.is_closed() {
                a.decoder.cancel();
                finish(engine, slot);
                continue;
            }
            if a.prefilling() {
                let n = (a.req.prompt.len() - a.fed).min(budget);
                budget -= n;
                if n > 0 {
                    a.in_step = Some((n, 1));
                    planned.tokens += n;
                    planned.expected += n as f64;
                }
            } else if !a.run.is_empty() {
                a.run.truncate(1);
                a.drafts.clear();
                a.drafter_drafted = false;
                if let Some(guide) = a.req.guide.as_mut() {
                    let generated = a.decoder.generated().len();
                    guide.draft(a.decoder.history(), generated, &mut a.drafts);
                    a.drafts.truncate(a.decoder.left());
                }
                let mut expected = 1.0 + a.drafts.len() as f64;
                if a.drafts.is_empty() {
                    if let Some(d) = a.drafter.as_mut() {
                        let history = a.decoder.history();
                        let room = a.decoder.left().min(exact_step_tokens - 1);
                        expected = d.propose(history, room, &self.costs, planned, &mut a.drafts);
                        let model = match (engine.draft(), &mut slot.session) {
                            (Some(model), SlotSession::Ready(session)) if a.drafts.is_empty() => {
                                Some((model, session))
                            }
                            _ => None,
                        };
                        if let Some((model, session)) = model {
                            let k = d.model_length(room, &self.costs, &self.draft_costs, planned);
                            if k > 0 {
                                let proposed =
                                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                        draft::propose(
                                            model,
                                            &mut session.draft,
                                            history,
                                            k,
                                            d.config().p_min,
                                            engine.tokenizer.vocab_size(),
                                            &mut self.draft_logits,
                                            &mut a.drafts,
                                        )
                                    }));
                                let failure = match proposed {
                                    Ok(Ok(())) => None,
                                    Ok(Err(e)) => Some(format!("{e:#}")),
                                    Err(p) => Some(panic_message(&p)),
                                };
                                if let Some(why) = failure {
                                    // Drafts change speed only: the request goes on without them.
                                    eprintln!("warning: the draft model failed ({why}); this generation goes on without it");
                                    d.stop_model();
                                    session.draft = None;
                                    a.drafts.clear();
                                }
                                expected = d.model_drafted(&mut a.drafts);
                            }
                        }
                        a.drafter_drafted = !a.drafts.is_empty();
                    }
                }
                a.run.extend_from_slice(&a.drafts);
                a.in_step = Some((a.run.len(), a.run.len()));
                planned.tokens += a.run.len();
                planned.expected += expected;
            }
        }
        let in_step: SmallVec<[usize; 8]> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .active
                    .as_ref()
                    .is_some_and(|a| a.in_step.is_some())
            })
            .collect();
        if in_step.is_empty() {
            return;
        }
        match self.run_batch(&in_step) {
            Ok(()) => self.take_tokens(&in_step),
            Err(message) if in_step.len() == 1 => self.fail(in_step[0], message),
            Err(_) => {
                // Which request broke the step is not known: each runs alone, so the others go
                // on and only the one that fails by itself gets the error.
                for &i in &in_step {
                    match self.run_batch(&[i]) {
                        Ok(()) => self.take_tokens(&[i]),
                        Err(message) => self.fail(i, message),
                    }
                }
            }
        }
    }

    /// One forward pass over the given slots' step tokens, their logits into `self.logits`.
    fn run_batch(&mut self, which: &[usize]) -> Result<(), String> {
        let engine = self.engine;
        let mut batch: SmallVec<[Step; 8]> = SmallVec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !which.contains(&i) {
                continue;
            }
            let (Some(a), SlotSession::Ready(session)) = (slot.active.as_ref(), &mut slot.session)
            else {
                continue;
            };
            let Some((n, rows)) = a.in_step else {
                continue;
            };
            // Whatever a failed pass wrote past the session's tokens is overwritten by the next.
            let held = session.tokens().len();
            session.truncate(held);
            let tokens = if a.prefilling() {
                &a.req.prompt[a.fed..a.fed + n]
            } else {
                &a.run[..]
            };
            batch.push(Step {
                session,
                tokens,
                logits: if rows == 1 { Logits::Last } else { Logits::All },
            });
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.step(&mut batch, &mut self.logits)
        }));
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(p) => Err(format!(
                "internal error during generation: {}",
                panic_message(&p)
            )),
        }
    }

    /// Ends slot `i`'s request with an error.
    fn fail(&mut self, i: usize, message: String) {
        let slot = &mut self.slots[i];
        // Its caches may be half-written: the next request in this slot starts from scratch.
        if let SlotSession::Ready(s) = &mut slot.session {
            s.truncate(0);
        }
        if let Some(mut a) = slot.active.take() {
            a.out.send(Event::Error(message));
        }
    }

    /// After a pass over `which`: moves each request's prompt on, or samples its next tokens
    /// from its logits rows (in the pass's order). A request whose own part fails (sampling, its
    /// guide, its output) ends with an error; the others are not touched.
    fn take_tokens(&mut self, which: &[usize]) {
        let engine = self.engine;
        let vocab = engine.config().vocab_size;
        let mut row = 0;
        for &i in which {
            let slot = &mut self.slots[i];
            let Some((n, rows)) = slot.active.as_ref().and_then(|a| a.in_step) else {
                continue;
            };
            let logits = &mut self.logits[row * vocab..(row + rows) * vocab];
            row += rows;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                take_slot_tokens(engine, slot, n, rows, logits)
            }));
            if let Err(p) = result {
                let message = format!(
                    "internal error while choosing the next token: {}",
                    panic_message(&p)
                );
                self.fail(i, message);
            }
        }
    }

    /// Runs steps until every active request has finished.
    pub fn run_to_completion(&mut self) {
        while !self.is_idle() {
            self.step();
        }
    }
}

/// What one slot is doing, as the server's `GET /slots` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// Serving a request.
    pub busy: bool,
    /// The request's prompt tokens, and how many of them have run (reused ones included).
    pub prompt_tokens: usize,
    pub prompt_done: usize,
    /// Tokens generated so far, and how many more it may generate.
    pub generated: usize,
    pub remaining: usize,
    /// Positions its KV cache holds; kept after a request, for the next one's prefix.
    pub cached: usize,
}

impl Scheduler<'_> {
    /// Slot `id`'s session while it serves no request (made now if it was not yet), for the
    /// server to save, restore or erase; an error saying why not.
    pub fn idle_session(&mut self, id: usize) -> anyhow::Result<&mut Session> {
        let n = self.slots.len();
        let Some(slot) = self.slots.get_mut(id) else {
            anyhow::bail!("there is no slot {id}: this model has {n} (0..{n})");
        };
        if slot.active.is_some() {
            anyhow::bail!("slot {id} is serving a request");
        }
        if let SlotSession::Unmade = slot.session {
            slot.session = SlotSession::Ready(Held::Owned(self.engine.new_session()?));
        }
        match &mut slot.session {
            SlotSession::Ready(session) => Ok(session),
            SlotSession::Unmade => unreachable!("made above"),
        }
    }

    /// Each slot's state, in slot order.
    pub fn slot_states(&self) -> impl Iterator<Item = SlotState> + '_ {
        self.slots.iter().map(|slot| {
            let cached = match &slot.session {
                SlotSession::Ready(s) => s.tokens().len(),
                SlotSession::Unmade => 0,
            };
            match &slot.active {
                None => SlotState {
                    cached,
                    ..SlotState::default()
                },
                Some(a) => SlotState {
                    busy: true,
                    prompt_tokens: a.req.prompt.len(),
                    prompt_done: a.fed.min(a.req.prompt.len()),
                    generated: a.decoder.generated().len(),
                    remaining: a.decoder.remaining(),
                    cached,
                },
            }
        })
    }
}

/// Moves one slot on after a pass (see [`Scheduler::take_tokens`]).
fn take_slot_tokens(engine: &Engine, slot: &mut Slot, n: usize, rows: usize, logits: &mut [f32]) {
    let vocab = engine.config().vocab_size;
    let Some(a) = slot.active.as_mut() else {
        return;
    };
    let decode_step = !a.prefilling();
    if a.prefilling() {
        a.fed += n;
        if a.prefilling() {
            return;
        }
    }
    let SlotSession::Ready(session) = &mut slot.session else {
        return;
    };
    if a.prefill_time.is_none() {
        if let (Some(model), Some(d)) = (engine.draft(), a.drafter.as_mut()) {
            if d.config().draft_model {
                let mut draft_logits = Vec::new();
                let read =
                    draft::catch_up(model, &mut session.draft, &a.req.prompt, &mut draft_logits);
                if let Err(e) = read {
                    eprintln!("warning: the draft model failed ({e:#}); this generation goes on without it");
                    d.stop_model();
                    session.draft = None;
                }
            }
        }
        a.prefill_time = Some(a.started.elapsed());
        engine
            .prompt_cache()
            .store(session, &a.req.prompt, &a.found);
    }
    a.decode_start.get_or_insert_with(Instant::now);
    // Row i holds the logits after run[i]: sample from each in turn while the sampled
    // token is the draft that follows, keep the first that differs.
    let drafts = rows - 1;
    let mut accepted = 0;
    let mut next = None;
    for (i, row) in logits.chunks_exact_mut(vocab).enumerate() {
        next = a.decoder.step(
            &engine.tokenizer,
            &mut a.req.sampler,
            a.req.guide.as_deref_mut(),
            row,
            &mut *a.out,
        );
        a.ttft.get_or_insert_with(|| a.started.elapsed());
        match next {
            Some(t) if i < drafts && t == a.run[i + 1] => accepted += 1,
            _ => break,
        }
    }
    if accepted < drafts {
        let keep = session.tokens().len() - (drafts - accepted);
        session.truncate(keep);
    }
    a.spec.passes += usize::from(decode_step);
    a.spec.drafted += drafts;
    a.spec.accepted += accepted;
    if a.drafter_drafted {
        if let Some(d) = a.drafter.as_mut() {
            d.record(drafts, accepted);
        }
    }
    a.run.clear();
    a.run.extend(next);
    if next.is_none() {
        finish(engine, slot);
    }
}

/// What a caught panic said.
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Ends the slot's request: the prompt cache, its summary.
fn finish(engine: &Engine, slot: &mut Slot) {
    let (Some(mut a), SlotSession::Ready(session)) = (slot.active.take(), &slot.session) else {
        return;
    };
    let elapsed = a.started.elapsed();
    if a.prefill_time.is_none() {
        // Cancelled during its prompt: keep what ran of it.
        engine
            .prompt_cache()
            .store(session, &a.req.prompt, &a.found);
    }
    let finish = a.decoder.finish_reason();
    let tokens = a.decoder.into_generated();
    let eog = tokens.last().is_some_and(|&t| engine.tokenizer.is_eog(t));
    let g = Generation {
        prompt_tokens: a.req.prompt.len(),
        reused_tokens: a.found.reused,
        cache_source: a.found.source,
        kv_bytes: session.cache.used_bytes(),
        completion_tokens: tokens.len() - usize::from(eog),
        tokens,
        finish,
        queue_time: a.queue_time,
        prefill_time: a.prefill_time.unwrap_or(elapsed),
        ttft: a.ttft.unwrap_or(elapsed),
        decode_time: a.decode_start.map_or(Duration::ZERO, |t| t.elapsed()),
        total_time: a.queue_time + elapsed,
        spec: a.spec,
    };
    a.out.send(Event::Done(g));
}
