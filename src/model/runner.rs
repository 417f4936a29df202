//! The model runner: the one way the engine runs the model. Which pass runs is decided here, once,
//! at load, from where the layers sit and the KV cache types; neither changes afterwards.

use super::config::{check_room, Config, Head, Placement, Sequence};
use super::host_pass::{self, Scratch};
use super::qwen2::Qwen2;
use super::tensor_pass;
use super::{Linear, EXACT_STEP_TOKENS};
use crate::kv_cache::{CacheType, KvCache};
use anyhow::Result;
use std::sync::Mutex;

/// How a step is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Every layer and the output head on the CPU, f32 caches: our kernels over host memory,
    /// allocation-free once its buffers have grown ([`host_pass`]).
    Host,
    /// Candle tensor ops on any device and cache type ([`tensor_pass`]).
    Tensor,
}

pub struct ModelRunner {
    weights: Qwen2,
    cache_type_k: CacheType,
    cache_type_v: CacheType,
    pass: Pass,
    /// The host pass's activations, kept from step to step.
    scratch: Mutex<Scratch>,
    exact_step_tokens: usize,
}

impl ModelRunner {
    pub fn new(weights: Qwen2, cache_type_k: CacheType, cache_type_v: CacheType) -> ModelRunner {
        let on_cpu = weights.placement.gpu().is_none();
        let host_caches = cache_type_k == CacheType::F32 && cache_type_v == CacheType::F32;
        let pass = if on_cpu && host_caches {
            Pass::Host
        } else {
            Pass::Tensor
        };
        let exact_step_tokens = match pass {
            Pass::Host => weights
                .linears()
                .map(Linear::batch_invariant_tokens)
                .fold(EXACT_STEP_TOKENS, usize::min),
            Pass::Tensor => 1,
        };
        ModelRunner {
            weights,
            cache_type_k,
            cache_type_v,
            pass,
            scratch: Mutex::default(),
            exact_step_tokens,
        }
    }

    /// This runner computing every step in tensor ops, whatever the placement and caches: the
    /// tests check the host pass against it.
    #[cfg(feature = "test-hooks")]
    pub fn into_tensor_ops(mut self) -> ModelRunner {
        self.pass = Pass::Tensor;
        self.exact_step_tokens = 1;
        self
    }

    /// New tokens per sequence up to which a step gives each token the logits a step of that
    /// token alone gives ([`EXACT_STEP_TOKENS`], less where a weight type's kernels are not
    /// batch-invariant that far; 1 for the tensor pass, where it is not checked). Drafts are
    /// checked only in steps within it, so that they never change what is sampled.
    pub fn exact_step_tokens(&self) -> usize {
        self.exact_step_tokens
    }

    pub fn config(&self) -> &Config {
        &self.weights.cfg
    }

    pub fn placement(&self) -> &Placement {
        &self.weights.placement
    }

    pub fn cache_types(&self) -> (CacheType, CacheType) {
        (self.cache_type_k, self.cache_type_v)
    }

    /// An empty KV cache of `capacity` positions in the runner's cache types, each layer's on that
    /// layer's device.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let c = self.config();
        KvCache::new(
            c.n_kv_heads,
            c.head_dim,
            capacity,
            self.cache_type_k,
            self.cache_type_v,
            &self.weights.placement.layers,
        )
    }

    /// Runs one step over several sequences: their tokens are stacked into one matrix for the
    /// weight matmuls (each weight is read once for all of them), each attends only to its own
    /// cache, and what `head` says of the positions each asks for is written to `out`
    /// (`[rows, vocab]` logits or `[rows, hidden]` hidden states), sequence after sequence. The
    /// caches must come from [`new_cache`](Self::new_cache).
    pub fn step(&self, seqs: &mut [Sequence], head: Head, out: &mut Vec<f32>) -> Result<()> {
        check_room(seqs)?;
        match self.pass {
            Pass::Host => {
                let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                host_pass::run(&self.weights, seqs, head, &mut scratch, out)
            }
            Pass::Tensor => tensor_pass::run(&self.weights, seqs, head, out),
        }
    }
}
