//! The whole engine on tiny random-weight models that the tests write: every weight type loads
//! and runs, the KV cache gives the same logits as a full recomputation, and files split in
//! parts load as one.

mod common;

use common::*;
use qwen_run::engine::{Engine, LoadOptions, Step};
use qwen_run::kv_cache::CacheType;
use qwen_run::model::Logits;
use qwen_run::sampler::{Sampler, SamplingParams};
use qwen_run_kernels::QuantType;

fn load(path: &std::path::Path) -> Engine {
    let mut opts = LoadOptions::new(path);
    opts.threads = 2;
    opts.ctx_size = 128;
    Engine::load(&opts).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_weight_type_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    // Q8_K is the K-quants' activation format; model files do not hold weights in it
    for ty in QuantType::ALL.into_iter().filter(|&t| t != QuantType::Q8K) {
        let engine = load(&write_tiny_model(dir.path(), ty));
        let mut session = engine.new_session().unwrap();
        let logits = engine
            .forward(&mut session, &[1, 2, 3, 4], Logits::All)
            .unwrap();
        assert_eq!(logits.len(), 4, "{ty:?}");
        assert!(
            logits.iter().flatten().all(|x| x.is_finite()),
            "{ty:?} gives non-finite logits"
        );
    }
}

/// Prefill of n tokens at once must equal feeding them one by one through the cache: this checks
/// the causal mask, RoPE positions and the in-place KV cache together (with f32 caches in the
/// host pass, with f16 caches in the tensor pass).
#[test]
fn cached_decode_matches_full_prefill() {
    let dir = tempfile::tempdir().unwrap();
    for cache_type in [CacheType::F32, CacheType::F16] {
        let mut opts = LoadOptions::new(write_tiny_model(dir.path(), QuantType::Q8_0));
        opts.threads = 2;
        opts.ctx_size = 64;
        opts.cache_type = cache_type;
        let engine = Engine::load(&opts).unwrap();
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 250).collect();
        let mut full = engine.new_session().unwrap();
        let all = engine.forward(&mut full, &tokens, Logits::All).unwrap();
        let mut step = engine.new_session().unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            let one = engine.forward(&mut step, &[t], Logits::Last).unwrap();
            // Relative to the logits' scale. With f16, a 1e-5 difference between the prefill and decode
            // kernels' summation orders can round K/V to neighbouring f16 values (5e-4 apart), and
            // random weights give sharp attention that amplifies it.
            let scale = all[i].iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = max_abs_diff(&one[0], &all[i]) / scale;
            let tol = if cache_type == CacheType::F32 {
                1e-4
            } else {
                2e-2
            };
            assert!(
                d < tol,
                "position {i}, cache {cache_type:?}: relative max diff {d} (scale {scale})"
            );
        }
    }
}

/// The host pass (CPU, f32 caches) computes what the tensor pass does: a prompt chunk longer than
/// an attention task's block, then a step of two sequences, one of them several tokens long.
#[test]
fn host_pass_matches_tensor_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_model(dir.path(), QuantType::Q4K);
    let prompt: Vec<u32> = (0..45).map(|i| (i * 29 + 3) % 250).collect();
    let steps: [&[u32]; 2] = [&[7], &[11, 12, 13]];
    let mut results = Vec::new();
    for engine in [load(&path), load(&path).into_tensor_ops()] {
        let (mut a, mut b) = (engine.new_session().unwrap(), engine.new_session().unwrap());
        let mut prefill = Vec::new();
        engine
            .step(
                &mut [Step {
                    session: &mut a,
                    tokens: &prompt,
                    logits: Logits::All,
                }],
                &mut prefill,
            )
            .unwrap();
        let mut step = Vec::new();
        engine
            .step(
                &mut [
                    Step {
                        session: &mut a,
                        tokens: steps[0],
                        logits: Logits::All,
                    },
                    Step {
                        session: &mut b,
                        tokens: steps[1],
                        logits: Logits::Last,
                    },
                ],
                &mut step,
            )
            .unwrap();
        assert_eq!(step.len(), 2 * engine.config().vocab_size);
        results.push((prefill, step));
    }
    let scale = results[1].0.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (host, tensor) in [
        (&results[0].0, &results[1].0),
        (&results[0].1, &results[1].1),
    ] {
        assert_eq!(host.len(), tensor.len());
        let d = max_abs_diff(host, tensor) / scale;
        assert!(d < 1e-4, "relative max diff {d}");
    }
}

#[test]
fn prefill_in_small_batches_matches_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_model(dir.path(), QuantType::Q4K);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 13 % 260) as u32).collect();
    let one = {
        let e = load(&path);
        let mut s = e.new_session().unwrap();
        e.forward(&mut s, &tokens, Logits::Last).unwrap()
    };
    let mut opts = LoadOptions::new(&path);
    opts.threads = 1;
    opts.ctx_size = 128;
    opts.batch_size = 3;
    let e = Engine::load(&opts).unwrap();
    let mut s = e.new_session().unwrap();
    let batched = e.forward(&mut s, &tokens, Logits::Last).unwrap();
    assert!(max_abs_diff(&one[0], &batched[0]) < 1e-3);
}

#[test]
fn greedy_generation_is_deterministic_and_reuses_the_session_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q5_0));
    let prompt = engine.tokenizer.encode("hello world").unwrap();
    let run = |session: &mut qwen_run::engine::Session| {
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        engine
            .generate(session, &prompt, 12, &mut sampler, |_| true)
            .unwrap()
    };
    let mut s1 = engine.new_session().unwrap();
    let a = run(&mut s1);
    let mut s2 = engine.new_session().unwrap();
    let b = run(&mut s2);
    assert_eq!(a.tokens, b.tokens);
    // The same session again: the prompt comes from the cache, the output is unchanged.
    let c = run(&mut s1);
    assert_eq!(c.reused_tokens, prompt.len() - 1);
    assert_eq!(a.tokens, c.tokens);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q8_0));
    let prompt = engine.tokenizer.encode("hello").unwrap();
    let run = |seed| {
        let mut sampler = Sampler::new(SamplingParams {
            seed,
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        })
        .unwrap();
        let mut s = engine.new_session().unwrap();
        engine
            .generate(&mut s, &prompt, 16, &mut sampler, |_| true)
            .unwrap()
            .tokens
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q8_0));
    let prompt: Vec<u32> = vec![7; 200];
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut s = engine.new_session().unwrap();
    let err = engine
        .generate(&mut s, &prompt, 4, &mut sampler, |_| true)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("200 tokens") && msg.contains("128"), "{msg}");
}

#[test]
fn split_model_loads_as_one_and_matches_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = write_tiny_model(dir.path(), QuantType::Q6K);
    let parts = tiny_model_writer(QuantType::Q6K)
        .write_split(dir.path(), "tiny-split", 3)
        .unwrap();
    assert_eq!(parts.len(), 3);
    let a = load(&single);
    let b = load(&parts[0]);
    assert_eq!(b.gguf.paths().len(), 3);
    let tokens = [1u32, 2, 3];
    let la = a
        .forward(&mut a.new_session().unwrap(), &tokens, Logits::Last)
        .unwrap();
    let lb = b
        .forward(&mut b.new_session().unwrap(), &tokens, Logits::Last)
        .unwrap();
    assert_eq!(la, lb);
    // A missing part is named.
    std::fs::remove_file(&parts[2]).unwrap();
    let err = Engine::load(&LoadOptions::new(&parts[0])).err().unwrap();
    assert!(format!("{err:#}").contains("00003-of-00003"), "{err:#}");
}

#[test]
fn tokenizer_round_trips_text() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q8_0));
    let t = &engine.tokenizer;
    for text in [
        "hello world",
        "  spaces\tand\nnewlines",
        "émojis 🦀 中文",
        "",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids), text);
    }
    let ids = t.encode("<|im_start|>hello<|im_end|>").unwrap();
    assert_eq!(ids.len(), 3, "special tokens are single ids: {ids:?}");
    assert!(t.is_eog(*ids.last().unwrap()));
}

#[test]
fn bench_reports_batched_decode_and_depth_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_model(dir.path(), QuantType::Q8_0);
    let mut load = LoadOptions::new(&path);
    load.threads = 2;
    let report = qwen_run::bench::run(&qwen_run::bench::BenchOptions {
        load,
        prompt_lens: vec![8],
        gen_lens: vec![6],
        depths: vec![0, 20],
        threads: vec![2],
        parallel: vec![1, 3],
        repetitions: 1,
    })
    .unwrap();
    let rows: Vec<(&str, usize, usize, usize)> = report
        .rows
        .iter()
        .map(|r| (r.test.as_str(), r.n_tokens, r.sequences, r.depth))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("pp8", 8, 1, 0),
            ("pp8 @ d20", 8, 1, 20),
            ("tg6", 6, 1, 0),
            ("tg6 @ d20", 6, 1, 20),
            ("tg6 x3", 18, 3, 0),
            ("tg6 x3 @ d20", 18, 3, 20),
        ]
    );
    assert!(report.rows.iter().all(|r| r.avg_ts > 0.0));
}

/// A batched decode step (each sequence on its own cache, at its own position) gives each
/// sequence the logits it gets alone.
#[test]
fn batched_step_matches_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q4K));
    let prompts: Vec<Vec<u32>> = [3usize, 7, 20]
        .iter()
        .map(|&n| (0..n as u32).map(|i| (i * 31 + n as u32) % 250).collect())
        .collect();
    let next = [9u32, 77, 140];
    let mut alone = Vec::new();
    let mut sessions = Vec::new();
    for (p, &t) in prompts.iter().zip(&next) {
        let mut s = engine.new_session().unwrap();
        engine.forward(&mut s, p, Logits::Last).unwrap();
        let mut solo = engine.new_session().unwrap();
        engine.forward(&mut solo, p, Logits::Last).unwrap();
        alone.extend(engine.forward(&mut solo, &[t], Logits::Last).unwrap());
        sessions.push(s);
    }
    let mut batch: Vec<Step> = sessions
        .iter_mut()
        .zip(&next)
        .map(|(session, t)| Step {
            session,
            tokens: std::slice::from_ref(t),
            logits: Logits::Last,
        })
        .collect();
    let mut batched = Vec::new();
    engine.step(&mut batch, &mut batched).unwrap();
    let vocab = engine.config().vocab_size;
    assert_eq!(batched.len(), 3 * vocab);
    for (i, (b, a)) in batched.chunks_exact(vocab).zip(&alone).enumerate() {
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = max_abs_diff(b, a) / scale;
        assert!(d < 1e-4, "sequence {i}: relative max diff {d}");
    }
}
