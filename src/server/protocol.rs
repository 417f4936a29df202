//! What passes between the HTTP handlers and a model's generation thread: a [`Job`] one way,
//! [`WorkerEvent`]s back. A leaf module: it imports nothing else from the server.

use crate::grammar::{Constraint, Format};
use crate::kv_cache::KvBlock;
use crate::sampler::SamplingParams;
use crate::scheduler::Generation;
use crate::speculative::SpecConfig;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Greedy, or sampled with a seed the client chose: the same request gives the same answer,
    /// so the response cache may keep it.
    pub deterministic: bool,
    /// What the answer must parse as, and its compiled constraint.
    pub format: Option<(Format, Constraint)>,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// How it speculates, when the request says (llama-server's `speculative.*`).
    pub spec: Option<SpecConfig>,
}

/// A token as the APIs show it: its text (bytes that are not UTF-8 on their own replaced) and
/// its bytes.
#[derive(Clone, Debug)]
pub struct ShownToken {
    pub text: String,
    pub bytes: Vec<u8>,
}

/// A generated token's log-probability and the most likely alternatives, most likely first.
#[derive(Clone, Debug)]
pub struct Logprob {
    pub token: ShownToken,
    pub logprob: f32,
    pub top: Vec<(ShownToken, f32)>,
}

pub enum WorkerEvent {
    /// The request left the queue for a generation slot.
    Started,
    Logprob(Logprob),
    Text(String),
    Done(Generation),
    Error(String),
}

pub struct Job {
    pub req: GenRequest,
    pub tx: UnboundedSender<WorkerEvent>,
    pub enqueued: Instant,
    /// Holds the request's place among the model's slots and queue until the job is dropped.
    pub place: Place,
}

/// What a model's thread is asked to do: a generation, or something to one of its slots.
pub enum Task {
    Generate(Box<Job>),
    Slot(SlotJob),
}

/// `POST /slots/{id}?action=...`: the thread does the part that touches the slot's session, the
/// handler the file.
pub struct SlotJob {
    pub slot: usize,
    pub action: SlotAction,
    pub tx: tokio::sync::oneshot::Sender<Result<SlotReply, String>>,
}

pub enum SlotAction {
    /// The tokens the slot holds and their KV, to save.
    Export,
    /// Replace what the slot holds with these tokens and their KV (read from a saved file).
    Import(Vec<u32>, KvBlock),
    /// Forget what the slot holds.
    Erase,
}

pub enum SlotReply {
    Exported(Vec<u32>, KvBlock),
    /// Tokens the slot now holds.
    Imported(usize),
    /// Tokens it held.
    Erased(usize),
}

/// One of a model's `--parallel` + `--queue-size` places; given back when dropped.
pub struct Place(Arc<AtomicUsize>);

impl Place {
    /// Takes a place if fewer than `limit` are taken.
    pub fn take(taken: &Arc<AtomicUsize>, limit: usize) -> Option<Place> {
        taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(taken.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
