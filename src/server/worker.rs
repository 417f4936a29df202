//! A loaded model's generation thread: takes jobs from a bounded queue into the
//! [`Scheduler`]'s `--parallel` slots and sends each request's events back on its channel.
//! Dropping the receiver (the client left) stops that request.

use super::metrics::Metrics;
use super::protocol::{
    Job, Logprob, Place, ShownToken, SlotAction, SlotJob, SlotReply, Task, WorkerEvent,
};
use crate::engine::Engine;
use crate::sampler::Sampler;
use crate::scheduler::{
    ChunkPolicy, Event, FinishReason, Held, Output, Request, Scheduler, SlotState,
};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

pub(super) fn run(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    jobs: Receiver<Task>,
    parallel: usize,
    chunks: ChunkPolicy,
    slots: Arc<Mutex<Vec<SlotState>>>,
) {
    let mut scheduler = Scheduler::new(&engine, parallel).with_chunks(chunks);
    let take = |scheduler: &mut Scheduler, task| match task {
        Task::Generate(job) => admit(scheduler, &engine, &metrics, *job),
        Task::Slot(job) => slot_job(scheduler, job),
    };
    loop {
        if scheduler.is_idle() {
            let Ok(task) = jobs.recv() else {
                return; // The server is shutting down and nothing is running.
            };
            take(&mut scheduler, task);
        }
        // Slot jobs wait here while every slot is busy, as generations do.
        while scheduler.has_free_slot() {
            let Ok(task) = jobs.try_recv() else {
                break;
            };
            take(&mut scheduler, task);
        }
        let busy = publish(&scheduler, &slots, &metrics);
        if scheduler.is_idle() {
            continue; // only slot jobs came, or a request that could not start
        }
        scheduler.step();
        metrics.llamacpp.record_step(busy);
        publish(&scheduler, &slots, &metrics);
    }
}

/// Shows what each slot is doing to `GET /slots` (and the context's high-water mark to
/// /metrics); returns how many slots are busy.
fn publish(scheduler: &Scheduler, slots: &Mutex<Vec<SlotState>>, metrics: &Metrics) -> usize {
    let mut board = slots.lock().unwrap_or_else(|e| e.into_inner());
    board.clear();
    board.extend(scheduler.slot_states());
    let most = board.iter().map(|s| s.cached).max().unwrap_or(0);
    metrics.llamacpp.record_context(most);
    board.iter().filter(|s| s.busy).count()
}

fn admit(scheduler: &mut Scheduler, engine: &Arc<Engine>, metrics: &Arc<Metrics>, job: Job) {
    metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
    let out = Box::new(JobOutput {
        tx: job.tx,
        engine: engine.clone(),
        metrics: metrics.clone(),
        busy: false,
        _place: job.place,
    });
    let sampler = match Sampler::new(job.req.params) {
        Ok(s) => s,
        Err(e) => {
            let _ = out.tx.send(WorkerEvent::Error(format!("{e:#}")));
            return;
        }
    };
    let mut req = Request::new(job.req.prompt, job.req.max_tokens, Held::Owned(sampler));
    req.spec = job.req.spec;
    req.stop = job.req.stop;
    req.logprobs = job.req.logprobs;
    req.guide = job
        .req
        .format
        .map(|(_, c)| Box::new(c) as Box<dyn crate::scheduler::Guide>);
    req.enqueued = job.enqueued;
    scheduler.admit(req, out);
}

/// Saves, restores or erases a slot's session between steps; refused while the slot serves a
/// request.
fn slot_job(scheduler: &mut Scheduler, job: SlotJob) {
    let reply = scheduler
        .idle_session(job.slot)
        .and_then(|session| match job.action {
            SlotAction::Export => {
                let tokens = session.tokens().to_vec();
                let kv = session.cache.export(0, tokens.len())?;
                Ok(SlotReply::Exported(tokens, kv))
            }
            SlotAction::Import(tokens, kv) => {
                session.truncate(0);
                if let Err(e) = session.cache.import(0, &kv) {
                    session.truncate(0);
                    return Err(e);
                }
                session.set_tokens(&tokens);
                Ok(SlotReply::Imported(tokens.len()))
            }
            SlotAction::Erase => {
                let n = session.tokens().len();
                session.truncate(0);
                Ok(SlotReply::Erased(n))
            }
        });
    let _ = job.tx.send(reply.map_err(|e| format!("{e:#}")));
}

/// A request's events, sent to its handler; counts it busy from its start to its end.
struct JobOutput {
    tx: UnboundedSender<WorkerEvent>,
    /// For the tokens' text in logprobs.
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    busy: bool,
    _place: Place,
}

impl Output for JobOutput {
    fn send(&mut self, event: Event<'_>) -> bool {
        let event = match event {
            Event::Started => {
                self.busy = true;
                self.metrics.busy.fetch_add(1, Ordering::SeqCst);
                WorkerEvent::Started
            }
            Event::Logprob(lp) => {
                let show = |id: u32| {
                    // A control token is shown by its name, as OpenAI shows special tokens.
                    let bytes = self.engine.tokenizer.piece(id).to_vec();
                    ShownToken {
                        text: String::from_utf8_lossy(&bytes).into_owned(),
                        bytes,
                    }
                };
                WorkerEvent::Logprob(Logprob {
                    token: show(lp.token),
                    logprob: lp.logprob,
                    top: lp.top.iter().map(|&(id, l)| (show(id), l)).collect(),
                })
            }
            Event::Text(t) => WorkerEvent::Text(t.to_string()),
            Event::Done(g) => {
                self.not_busy();
                self.metrics.record_generation(
                    g.prompt_tokens,
                    g.reused_tokens,
                    g.completion_tokens,
                    g.prefill_time,
                    g.decode_time,
                );
                self.metrics.record_speculation(g.spec);
                if g.finish == FinishReason::Cancelled {
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                WorkerEvent::Done(g)
            }
            Event::Error(e) => {
                self.not_busy();
                WorkerEvent::Error(e)
            }
        };
        self.tx.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl JobOutput {
    fn not_busy(&mut self) {
        if std::mem::take(&mut self.busy) {
            self.metrics.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for JobOutput {
    fn drop(&mut self) {
        self.not_busy();
    }
}
