//! The generation scheduler of one loaded model: a dedicated thread (the engine is synchronous)
//! fed by a bounded queue, batching the requests of its `--parallel` slots into shared forward
//! passes (continuous batching). Each request gets its pieces back through a tokio channel;
//! dropping the receiver (client gone) stops that request's generation.

use super::metrics::Metrics;
use super::state::{Finish, Job, Summary, WorkerEvent};
use crate::engine::{Decoder, Engine, FinishReason, Prefill, Session, Timings};
use crate::sampler::Sampler;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Prompt tokens a prefilling request may run in one step while other requests are decoding:
/// small enough that their streams keep flowing (a step of this many tokens takes about as long as
/// a few decode steps), large enough to keep the weights busy.
const PREFILL_CHUNK_WHILE_DECODING: usize = 64;

/// One of the `--parallel` generation slots. Its session (KV cache) outlives requests, so a
/// follow-up request that starts with the same tokens (a conversation's next turn) reuses them.
#[derive(Default)]
struct Slot {
    session: Option<Session>,
    active: Option<Active>,
}

/// A request being served by a slot.
struct Active {
    job: Job,
    prefill: Prefill,
    /// Prompt tokens in the session so far; prefill is done when this reaches the prompt length.
    fed: usize,
    decoder: Decoder,
    sampler: Sampler,
    stops: StopMatcher,
    stopped: bool,
    /// The token the next step runs, once decoding.
    next: Option<u32>,
    queue_time: Duration,
    started: Instant,
    prefill_time: Option<Duration>,
    ttft: Option<Duration>,
    decode_start: Option<Instant>,
    /// Part of the current step.
    in_step: bool,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.fed < self.job.req.prompt.len()
    }
}

/// Continuous batching: every step runs one forward pass over all active requests (one token
/// each while decoding, a chunk of prompt while prefilling), requests join between steps as slots
/// free up, and finished ones leave at once.
pub(super) fn run(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    jobs: Receiver<Job>,
    parallel: usize,
) {
    let mut slots: Vec<Slot> = (0..parallel.max(1)).map(|_| Slot::default()).collect();
    loop {
        if slots.iter().all(|s| s.active.is_none()) {
            let Ok(job) = jobs.recv() else {
                return; // The server is shutting down and nothing is running.
            };
            admit(&engine, &metrics, &mut slots, job);
        }
        while slots.iter().any(|s| s.active.is_none()) {
            let Ok(job) = jobs.try_recv() else {
                break;
            };
            admit(&engine, &metrics, &mut slots, job);
        }
        step(&engine, &metrics, &mut slots);
    }
}

/// Puts a job in a free slot, preferring the one whose cache shares the longest prefix with it.
fn admit(engine: &Engine, metrics: &Metrics, slots: &mut [Slot], job: Job) {
    metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
    if job.tx.is_closed() {
        return; // The client left while waiting.
    }
    let prompt = &job.req.prompt;
    let Some(slot) = slots
        .iter_mut()
        .filter(|s| s.active.is_none())
        .max_by_key(|s| s.session.as_ref().map_or(0, |x| x.common_prefix(prompt)))
    else {
        let _ = job
            .tx
            .send(WorkerEvent::Error("no free generation slot".into()));
        return;
    };
    if slot.session.is_none() {
        match engine.new_session() {
            Ok(s) => slot.session = Some(s),
            Err(e) => {
                let _ = job.tx.send(WorkerEvent::Error(format!(
                    "cannot create a session: {e:#}"
                )));
                return;
            }
        }
    }
    let session = slot.session.as_mut().expect("created above");
    let queue_time = job.enqueued.elapsed();
    let started = Instant::now();
    let setup = Sampler::new(job.req.params.clone())
        .and_then(|sampler| Ok((sampler, engine.begin(session, prompt)?)));
    let (sampler, prefill) = match setup {
        Ok(x) => x,
        Err(e) => {
            let _ = job.tx.send(WorkerEvent::Error(format!("{e:#}")));
            return;
        }
    };
    metrics.busy.fetch_add(1, Ordering::SeqCst);
    // The request leaves the queue: from here on its queue time-out no longer applies.
    let _ = job.tx.send(WorkerEvent::Started);
    slot.active = Some(Active {
        fed: prefill.reused,
        decoder: Decoder::new(engine, prompt, job.req.max_tokens),
        stops: StopMatcher::new(&job.req.stop),
        sampler,
        prefill,
        job,
        stopped: false,
        next: None,
        queue_time,
        started,
        prefill_time: None,
        ttft: None,
        decode_start: None,
        in_step: false,
    });
}

/// One batched forward pass over the active slots, then sampling for those past their prompt.
fn step(engine: &Engine, metrics: &Metrics, slots: &mut [Slot]) {
    let decoding = slots
        .iter()
        .any(|s| s.active.as_ref().is_some_and(|a| !a.prefilling()));
    let mut prefill_budget = if decoding {
        PREFILL_CHUNK_WHILE_DECODING.min(engine.batch_size)
    } else {
        engine.batch_size
    };
    let mut tokens: Vec<Vec<u32>> = Vec::new();
    for slot in slots.iter_mut() {
        let Some(a) = slot.active.as_mut() else {
            continue;
        };
        a.in_step = false;
        if a.job.tx.is_closed() {
            a.decoder.cancel();
            finish(engine, metrics, slot);
            continue;
        }
        let run: Vec<u32> = if a.prefilling() {
            let n = (a.job.req.prompt.len() - a.fed).min(prefill_budget);
            prefill_budget -= n;
            a.job.req.prompt[a.fed..a.fed + n].to_vec()
        } else {
            a.next.into_iter().collect()
        };
        if !run.is_empty() {
            a.in_step = true;
            tokens.push(run);
        }
    }
    if tokens.is_empty() {
        return;
    }
    let mut sessions: Vec<&mut Session> = slots
        .iter_mut()
        .filter(|s| s.active.as_ref().is_some_and(|a| a.in_step))
        .filter_map(|s| s.session.as_mut())
        .collect();
    let refs: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.forward_batch(&mut sessions, &refs)
    }));
    let mut rows = match result {
        Ok(Ok(rows)) => rows.into_iter(),
        failed => {
            let message = match failed {
                Ok(Err(e)) => format!("{e:#}"),
                _ => "internal error during generation".to_string(),
            };
            for slot in slots.iter_mut() {
                if slot.active.as_ref().is_some_and(|a| a.in_step) {
                    // The caches may be half-written: the next request starts from scratch.
                    if let Some(s) = slot.session.as_mut() {
                        s.truncate(0);
                    }
                    let a = slot.active.take().expect("in the step");
                    metrics.busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = a.job.tx.send(WorkerEvent::Error(message.clone()));
                }
            }
            return;
        }
    };
    for (slot, n) in slots
        .iter_mut()
        .filter(|s| s.active.as_ref().is_some_and(|a| a.in_step))
        .zip(tokens.iter().map(|t| t.len()))
    {
        let mut logits = rows.next().unwrap_or_default();
        let a = slot.active.as_mut().expect("in the step");
        if a.prefilling() {
            a.fed += n;
            if a.prefilling() {
                continue;
            }
        }
        if a.prefill_time.is_none() {
            a.prefill_time = Some(a.started.elapsed());
            if let Some(session) = slot.session.as_ref() {
                engine.store_prompt(session, &a.job.req.prompt, &a.prefill);
            }
        }
        a.decode_start.get_or_insert_with(Instant::now);
        let Active {
            decoder,
            sampler,
            stops,
            stopped,
            job,
            ..
        } = a;
        let mut on_text = |piece: &str| {
            if *stopped {
                return false;
            }
            let (text, hit) = stops.push(piece);
            let sent = text.is_empty() || job.tx.send(WorkerEvent::Text(text)).is_ok();
            *stopped = hit;
            sent && !hit
        };
        a.next = decoder.step(engine, sampler, &mut logits, &mut on_text);
        a.ttft.get_or_insert_with(|| a.started.elapsed());
        if a.next.is_none() {
            finish(engine, metrics, slot);
        }
    }
}

/// Ends the slot's request: the rest of its text, the prefix caches, its summary.
fn finish(engine: &Engine, metrics: &Metrics, slot: &mut Slot) {
    let (Some(mut a), Some(session)) = (slot.active.take(), slot.session.as_ref()) else {
        return;
    };
    metrics.busy.fetch_sub(1, Ordering::SeqCst);
    // Text held back as a possible stop-string start, at the natural end.
    if !a.stopped {
        let rest = a.stops.finish();
        if !rest.is_empty() {
            let _ = a.job.tx.send(WorkerEvent::Text(rest));
        }
    }
    let stopped = a.stopped;
    if a.prefill_time.is_none() {
        // Cancelled during its prompt: keep what ran of it.
        engine.store_prompt(session, &a.job.req.prompt, &a.prefill);
    }
    let elapsed = a.started.elapsed();
    let g = a.decoder.finish(
        &a.prefill,
        session,
        Timings {
            prefill: a.prefill_time.unwrap_or(elapsed),
            ttft: a.ttft.unwrap_or(elapsed),
            decode: a.decode_start.map_or(Duration::ZERO, |t| t.elapsed()),
        },
    );
    let finish = match g.finish {
        FinishReason::Stop => Finish::Stop,
        FinishReason::Length | FinishReason::ContextFull => Finish::Length,
        FinishReason::Cancelled if stopped => Finish::Stop,
        FinishReason::Cancelled => Finish::Cancelled,
    };
    let eog = g.tokens.last().is_some_and(|&t| engine.tokenizer.is_eog(t));
    let summary = Summary {
        prompt_tokens: g.prompt_tokens,
        reused_tokens: g.reused_tokens,
        completion_tokens: g.tokens.len() - usize::from(eog),
        finish,
        queue_time: a.queue_time,
        prefill_time: g.prefill_time,
        decode_time: g.decode_time,
        total_time: a.queue_time + elapsed,
    };
    metrics.record_generation(
        summary.prompt_tokens,
        summary.reused_tokens,
        summary.completion_tokens,
        summary.prefill_time,
        summary.decode_time,
    );
    let _ = a.job.tx.send(WorkerEvent::Done(summary));
}

/// Cuts generated text at the first stop string, holding back a tail that may start one.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Returns the text to release and whether a stop string was hit.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| super::tool_calls::partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_across_pieces() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dxyz"), (String::new(), true));
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.finish(), "");
    }
}
