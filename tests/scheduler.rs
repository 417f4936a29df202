//! The generation loop's per-request hooks, on a tiny model: drafts are checked against the
//! model, so right, wrong and partly right drafts all give the tokens plain decoding gives; a
//! mask keeps every sampled token inside the allowed set; stop strings end the text before them.

mod common;

use common::*;
use qwen_run::engine::{Engine, LoadOptions};
use qwen_run::sampler::{Sampler, SamplingParams};
use qwen_run::scheduler::{Guide, Held, Request};
use qwen_run_kernels::QuantType;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn load(path: &std::path::Path) -> Engine {
    let mut opts = LoadOptions::new(path);
    opts.threads = 2;
    opts.ctx_size = 128;
    opts.cache_ram_mib = 0;
    Engine::load(&opts).unwrap()
}

/// Drafts `k` tokens: those of `script` that follow the generated ones, with every `wrong`-th
/// one replaced by a token the model would not pick.
struct Scripted {
    prompt: usize,
    script: Vec<u32>,
    k: usize,
    wrong: usize,
    /// Decode steps run: each asks for drafts once.
    calls: Arc<AtomicUsize>,
}

impl Guide for Scripted {
    fn draft(&mut self, history: &[u32], generated: usize, drafts: &mut Vec<u32>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let done = generated;
        assert_eq!(done, history.len() - self.prompt);
        for (i, &t) in self.script.iter().skip(done).take(self.k).enumerate() {
            let bad = self.wrong > 0 && (done + i).is_multiple_of(self.wrong);
            drafts.push(if bad { (t + 1) % 200 } else { t });
        }
    }
}

fn generate(engine: &Engine, prompt: &[u32], n: usize, guide: Option<Box<dyn Guide>>) -> Vec<u32> {
    let mut session = engine.new_session().unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut req = Request::new(prompt.to_vec(), n, Held::Borrowed(&mut sampler));
    req.guide = guide;
    let g = engine
        .generate_request(&mut session, req, |_| true)
        .unwrap();
    // what the session holds is what was run: the prompt and every token but the last
    assert_eq!(
        &session.tokens()[prompt.len()..],
        &g.tokens[..g.tokens.len() - 1]
    );
    g.tokens
}

#[test]
fn drafts_never_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q4K));
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 250).collect();
    let plain = generate(&engine, &prompt, 24, None);
    assert!(plain.len() >= 4, "{plain:?}");
    for (k, wrong) in [(4, 0), (3, 5), (2, 1), (6, 3)] {
        let calls = Arc::new(AtomicUsize::new(0));
        let guide = Scripted {
            prompt: prompt.len(),
            script: plain.clone(),
            k,
            wrong,
            calls: calls.clone(),
        };
        let got = generate(&engine, &prompt, 24, Some(Box::new(guide)));
        assert_eq!(got, plain, "drafts of {k}, every {wrong}th wrong");
        if wrong == 0 {
            // right drafts are kept: a step yields up to k + 1 tokens
            let steps = calls.load(Ordering::Relaxed);
            assert!(
                steps <= plain.len().div_ceil(k + 1) + 1,
                "{steps} decode steps"
            );
        }
    }
}

/// Allows only even token ids.
struct EvenOnly;

impl Guide for EvenOnly {
    fn mask(&mut self, _generated: &[u32], logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if i % 2 == 1 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[test]
fn a_mask_limits_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q8_0));
    let prompt: Vec<u32> = (0..10).map(|i| (i * 13 + 1) % 250).collect();
    let got = generate(&engine, &prompt, 16, Some(Box::new(EvenOnly)));
    assert!(!got.is_empty());
    assert!(got.iter().all(|t| t % 2 == 0), "{got:?}");
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q4K));
    let prompt: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 250).collect();
    let mut text = String::new();
    let mut session = engine.new_session().unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let req = Request::new(prompt.clone(), 24, Held::Borrowed(&mut sampler));
    engine
        .generate_request(&mut session, req, |t| {
            text.push_str(t);
            true
        })
        .unwrap();
    // a stop string from the middle of the plain text
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 6 {
        return; // this tiny model's text is too short to cut
    }
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let want: String = text[..text.find(&stop).unwrap()].to_string();
    let mut got = String::new();
    let mut session = engine.new_session().unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut req = Request::new(prompt, 24, Held::Borrowed(&mut sampler));
    req.stop = vec![stop];
    let g = engine
        .generate_request(&mut session, req, |t| {
            got.push_str(t);
            true
        })
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(g.finish, qwen_run::scheduler::FinishReason::Stop);
}

/// A request's end: its tokens, or its error.
type Ending = (Option<Vec<u32>>, Option<String>);

/// A request's events, kept for the test to read.
#[derive(Clone, Default)]
struct Recorded(Arc<std::sync::Mutex<Ending>>);

impl qwen_run::scheduler::Output for Recorded {
    fn send(&mut self, event: qwen_run::scheduler::Event<'_>) -> bool {
        use qwen_run::scheduler::Event;
        let mut r = self.0.lock().unwrap();
        match event {
            Event::Done(g) => r.0 = Some(g.tokens),
            Event::Error(e) => r.1 = Some(e),
            _ => {}
        }
        true
    }
}

/// A fault in one request's own part of a step: its guide panics after `after` tokens.
struct PanicsAfter(usize);

impl Guide for PanicsAfter {
    fn mask(&mut self, generated: &[u32], _logits: &mut [f32]) {
        if generated.len() == self.0 {
            panic!("injected fault in the guide");
        }
    }
}

/// A fault in the shared forward pass: after `after` tokens it drafts a token the model does not
/// have, so the batched pass that holds it fails.
struct BadDraft(usize);

impl Guide for BadDraft {
    fn draft(&mut self, _history: &[u32], generated: usize, drafts: &mut Vec<u32>) {
        if generated == self.0 {
            drafts.push(1_000_000);
        }
    }
}

#[test]
fn a_fault_in_one_request_of_a_batch_ends_only_that_request() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&write_tiny_model(dir.path(), QuantType::Q8_0));
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|p| (0..10).map(|i| (i * 31 + p * 7 + 3) % 250).collect())
        .collect();
    let n = 16;
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| generate(&engine, p, n, None))
        .collect();
    let guides: Vec<Option<Box<dyn Guide>>> = vec![
        None,
        Some(Box::new(PanicsAfter(3))),
        Some(Box::new(BadDraft(2))),
        None,
    ];
    let mut scheduler = qwen_run::scheduler::Scheduler::new(&engine, 4);
    let mut records = Vec::new();
    for (prompt, guide) in prompts.iter().zip(guides) {
        let sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut req = Request::new(prompt.clone(), n, Held::Owned(sampler));
        req.guide = guide;
        let rec = Recorded::default();
        records.push(rec.clone());
        scheduler.admit(req, Box::new(rec));
    }
    scheduler.run_to_completion();
    let got: Vec<_> = records
        .iter()
        .map(|r| r.0.lock().unwrap().clone())
        .collect();
    for i in [0, 3] {
        assert_eq!(got[i].1, None, "request {i} failed");
        assert_eq!(got[i].0.as_ref(), Some(&solo[i]), "request {i}");
    }
    let e = got[1]
        .1
        .as_deref()
        .expect("the panicking request got an error");
    assert!(
        e.contains("internal error") && e.contains("injected fault"),
        "{e}"
    );
    assert!(got[1].0.is_none());
    let e = got[2]
        .1
        .as_deref()
        .expect("the request that broke the pass got an error");
    assert!(e.contains("outside the vocabulary"), "{e}");
    assert!(got[2].0.is_none());
    // The slots are usable again: a new request in the same scheduler matches solo.
    let sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let rec = Recorded::default();
    scheduler.admit(
        Request::new(prompts[2].clone(), n, Held::Owned(sampler)),
        Box::new(rec.clone()),
    );
    scheduler.run_to_completion();
    assert_eq!(rec.0.lock().unwrap().0.as_ref(), Some(&solo[2]));
}
