//! A CPU decode step allocates nothing once the session's and the threads' buffers have grown:
//! the heap allocations of the whole process are counted around 16 steps of forward pass and
//! sampling (this binary holds one test, so nothing else runs meanwhile), on tiny models and on
//! the real 0.5B, whose matmuls and attention split over both threads.

mod common;

use common::*;
use qwen_run::bench::alloc_count::{self, Counting};
use qwen_run::engine::{Engine, LoadOptions};
use qwen_run::sampler::{Sampler, SamplingParams};
use qwen_run_kernels::QuantType;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn decode_steps_allocate_nothing() {
    Counting::mark_installed();
    let dir = tempfile::tempdir().unwrap();
    let models = [
        write_tiny_model(dir.path(), QuantType::Q4K),
        write_tiny_model(dir.path(), QuantType::Q8_0),
        real_model("0.5b"),
    ];
    for model in models {
        let mut opts = LoadOptions::new(&model);
        opts.threads = 2;
        opts.ctx_size = 128;
        let engine = Engine::load(&opts).unwrap();
        let mut params = SamplingParams::greedy();
        params.temperature = 0.8;
        params.repeat_penalty = 1.1;
        let mut sampler = Sampler::new(params).unwrap();
        let mut session = engine.new_session().unwrap();
        let mut history = Vec::with_capacity(128);
        history.extend([1u32, 2, 3]);
        let mut step = |n: usize| {
            for _ in 0..n {
                let last = *history.last().unwrap();
                let logits = engine.forward_last(&mut session, &[last]).unwrap();
                let next = sampler.sample(logits, &history);
                history.push(next);
            }
        };
        step(64);
        let before = alloc_count::snapshot().unwrap();
        step(16);
        let after = alloc_count::snapshot().unwrap();
        assert_eq!(
            after.0 - before.0,
            0,
            "{}: {} heap allocations ({} bytes) in 16 decode steps",
            model.display(),
            after.0 - before.0,
            after.1 - before.1
        );
    }
}
