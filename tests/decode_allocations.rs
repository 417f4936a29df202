//! A CPU decode step, of one sequence or a batch of 8, allocates nothing once the sessions' and
//! the threads' buffers have grown: the heap allocations of the whole process are counted over
//! windows of 16 steps of model step and sampling (this binary holds one test, so nothing else runs
//! meanwhile), on tiny models and on the real 0.5B, whose matmuls and attention split over both
//! threads.

mod common;

use common::*;
use qwen_run::bench::alloc_count::{self, Counting};
use qwen_run::engine::{Engine, LoadOptions, Step};
use qwen_run::model::Logits;
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
        opts.ctx_size = 256;
        let engine = Engine::load(&opts).unwrap();
        let vocab = engine.config().vocab_size;
        for sequences in [1, 8] {
            let mut params = SamplingParams::greedy();
            params.temperature = 0.8;
            params.repeat_penalty = 1.1;
            let mut samplers: Vec<Sampler> = (0..sequences)
                .map(|_| Sampler::new(params.clone()).unwrap())
                .collect();
            let mut sessions: Vec<_> = (0..sequences)
                .map(|_| engine.new_session().unwrap())
                .collect();
            let mut histories: Vec<Vec<u32>> = (0..sequences as u32)
                .map(|s| {
                    let mut h = Vec::with_capacity(256);
                    h.extend([1 + s, 2, 3]);
                    h
                })
                .collect();
            let mut logits = Vec::new();
            let mut step = |n: usize| {
                for _ in 0..n {
                    let mut batch: smallvec::SmallVec<[Step; 8]> = sessions
                        .iter_mut()
                        .zip(&histories)
                        .map(|(session, h)| Step {
                            session,
                            tokens: &h[h.len() - 1..],
                            logits: Logits::Last,
                        })
                        .collect();
                    engine.step(&mut batch, &mut logits).unwrap();
                    drop(batch);
                    for ((row, sampler), h) in logits
                        .chunks_exact_mut(vocab)
                        .zip(&mut samplers)
                        .zip(&mut histories)
                    {
                        let next = sampler.sample(row, h, 0);
                        h.push(next);
                    }
                }
            };
            step(64);
            // A worker thread sizes its buffers the first time it takes a share of a step; on a
            // busy machine that can first happen after the warm-up. Growth is one-time, so a
            // later window of steps must allocate nothing.
            let mut counts = Vec::new();
            for _ in 0..4 {
                let before = alloc_count::snapshot().unwrap();
                step(16);
                let after = alloc_count::snapshot().unwrap();
                counts.push((after.0 - before.0, after.1 - before.1));
                if after.0 == before.0 {
                    break;
                }
            }
            assert_eq!(
                counts.last().unwrap().0,
                0,
                "{} x{sequences}: heap allocations (count, bytes) in windows of 16 decode steps: {counts:?}",
                model.display(),
            );
            println!(
                "{} x{sequences}: 0 heap allocations in 16 decode steps",
                model.display()
            );
        }
    }
}
