//! Speculative decoding with a draft model (`-md`): the draft's tokens are only proposals, so
//! greedy and seeded output are what plain decoding gives, in `run` and through the server; a
//! draft whose vocabulary is not the target's is refused, naming what differs.

mod common;

use common::server::Server;
use qwen_run::engine::{Engine, LoadOptions};
use qwen_run::gguf::{GgufFile, GgufWriter, Value};
use qwen_run::sampler::{Sampler, SamplingParams};
use qwen_run::scheduler::{Generation, Held, Request};
use qwen_run::speculative::{SpecConfig, SpecType};
use qwen_run_kernels::QuantType;
use serde_json::json;
use std::path::{Path, PathBuf};

/// A tiny target (Q8_0) and its draft: the same random weights in Q4_0, so that the draft is
/// right often but not always.
struct Pair {
    _dir: tempfile::TempDir,
    target: PathBuf,
    draft: PathBuf,
}

fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let target = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let draft = common::write_tiny_model(dir.path(), QuantType::Q4_0);
    Pair {
        _dir: dir,
        target,
        draft,
    }
}

fn load(target: &Path, draft: Option<&Path>, spec: SpecConfig) -> anyhow::Result<Engine> {
    let mut o = LoadOptions::new(target);
    o.threads = 2;
    o.cache_ram_mib = 0;
    o.spec = spec;
    o.draft_model = draft.map(Path::to_path_buf);
    Engine::load(&o)
}

/// The draft model alone, every draft tried whole.
const MODEL_ONLY: SpecConfig = SpecConfig {
    kind: SpecType::None,
    draft_model: true,
    n_max: 4,
    adaptive: false,
    ..SpecConfig::OFF
};

/// Two turns of a conversation on one session (the second resumes the first's cache, and the
/// draft's), with `params`.
fn two_turns(e: &Engine, params: &SamplingParams) -> (Vec<u32>, Vec<Generation>) {
    let mut sampler = Sampler::new(params.clone()).unwrap();
    let mut session = e.new_session().unwrap();
    let mut prompt = e.tokenizer.encode("hello world, hello").unwrap();
    let mut gens = Vec::new();
    for n in [40, 30] {
        let req = Request::new(prompt.clone(), n, Held::Borrowed(&mut sampler));
        let g = e.generate_request(&mut session, req, |_| true).unwrap();
        prompt.extend_from_slice(&g.tokens);
        prompt.extend(e.tokenizer.encode(" world hello").unwrap());
        gens.push(g);
    }
    (prompt, gens)
}

#[test]
fn greedy_and_seeded_output_are_unchanged_by_a_draft_model() {
    let p = pair();
    let plain = load(&p.target, None, SpecConfig::OFF).unwrap();
    let seeded = SamplingParams {
        temperature: 0.9,
        seed: 7,
        ..SamplingParams::default()
    };
    for spec in [
        MODEL_ONLY,
        SpecConfig {
            draft_model: true,
            ..SpecConfig::default()
        },
    ] {
        let drafted = load(&p.target, Some(&p.draft), spec).unwrap();
        assert!(drafted.draft().is_some());
        for params in [SamplingParams::greedy(), seeded.clone()] {
            let (want, _) = two_turns(&plain, &params);
            let (got, gens) = two_turns(&drafted, &params);
            assert_eq!(got, want, "{spec:?} {params:?}");
            if spec == MODEL_ONLY && drafted.runner.exact_step_tokens() > 1 {
                let drafted: usize = gens.iter().map(|g| g.spec.drafted).sum();
                let kept: usize = gens.iter().map(|g| g.spec.accepted).sum();
                assert!(
                    drafted > 0 && kept > 0,
                    "{params:?}: drafted {drafted} kept {kept}"
                );
                assert!(gens.iter().all(|g| g.tokens_per_pass() >= 1.0));
            }
        }
    }
}

/// Writes `w` as `name` in `dir` and tries it as the draft of `target`: the error, if any.
fn draft_error(dir: &Path, target: &Path, name: &str, w: &GgufWriter) -> Option<String> {
    let path = dir.join(name);
    w.write(&path).unwrap();
    load(target, Some(&path), MODEL_ONLY)
        .err()
        .map(|e| format!("{e:#}"))
}

fn refused(dir: &Path, target: &Path, name: &str, w: &GgufWriter, says: &str) {
    let err = draft_error(dir, target, name, w).unwrap_or_else(|| panic!("{name}: accepted"));
    assert!(err.contains(says), "{name}: {err}");
}

#[test]
fn a_draft_of_another_tokenizer_type_is_refused() {
    let p = pair();
    let mut w = common::tiny_model_writer(QuantType::Q4_0);
    w.meta("tokenizer.ggml.pre", Value::String("llama-bpe".into()));
    refused(
        p._dir.path(),
        &p.target,
        "pre.gguf",
        &w,
        "tokenizer.ggml.pre: llama-bpe in the draft",
    );
}

#[test]
fn a_draft_vocabulary_of_another_size_is_refused_beyond_the_tolerance() {
    let p = pair();
    let w = common::tiny_model_writer_with_vocab(QuantType::Q4_0, 129);
    refused(
        p._dir.path(),
        &p.target,
        "large.gguf",
        &w,
        "more than 128 apart",
    );
    // Within the tolerance, the shared ids are checked and drafting works: the draft's own
    // tokens past the target's vocabulary end its drafts.
    let w = common::tiny_model_writer_with_vocab(QuantType::Q4_0, 128);
    let path = p._dir.path().join("within.gguf");
    w.write(&path).unwrap();
    let plain = load(&p.target, None, SpecConfig::OFF).unwrap();
    let drafted = load(&p.target, Some(&path), MODEL_ONLY).unwrap();
    let greedy = SamplingParams::greedy();
    assert_eq!(two_turns(&drafted, &greedy).0, two_turns(&plain, &greedy).0);
}

#[test]
fn a_draft_with_other_token_texts_is_refused() {
    let p = pair();
    // Both with 10 extra tokens; the draft names one of them differently.
    let target = p._dir.path().join("target-extra.gguf");
    common::tiny_model_writer_with_vocab(QuantType::Q8_0, 10)
        .write(&target)
        .unwrap();
    let mut w = common::tiny_model_writer_with_vocab(QuantType::Q4_0, 10);
    let Some(Value::Array(mut tokens)) = GgufFile::open(&target)
        .unwrap()
        .get("tokenizer.ggml.tokens")
        .cloned()
    else {
        panic!("no tokens")
    };
    let at = tokens.len() - 4;
    tokens[at] = Value::String("renamed".into());
    w.meta("tokenizer.ggml.tokens", Value::Array(tokens));
    refused(
        p._dir.path(),
        &target,
        "text.gguf",
        &w,
        &format!("token {at} is \"renamed\" in the draft model and \"extra6\""),
    );
}

#[test]
fn a_draft_with_other_special_tokens_is_refused() {
    let p = pair();
    let vocab = GgufFile::open(&p.target)
        .unwrap()
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array().map(|a| a.len()))
        .unwrap() as u32;
    let mut w = common::tiny_model_writer(QuantType::Q4_0);
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(vocab - 2));
    refused(
        p._dir.path(),
        &p.target,
        "eos.gguf",
        &w,
        "end-of-text token",
    );
    let mut w = common::tiny_model_writer(QuantType::Q4_0);
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(vocab - 2));
    refused(
        p._dir.path(),
        &p.target,
        "bos.gguf",
        &w,
        "beginning-of-text token",
    );
}

#[test]
fn run_with_a_draft_model_prints_what_it_prints_without() {
    let p = pair();
    let (target, draft) = (p.target.to_str().unwrap(), p.draft.to_str().unwrap());
    let run = |extra: &[&str]| {
        let mut args = vec!["-m", target, "-p", "hello world", "-n", "24", "--temp", "0"];
        args.extend_from_slice(extra);
        let (code, out, err) = common::qwen_run_with_input(&args, "");
        assert_eq!(code, 0, "{extra:?}: {err}");
        (out, err)
    };
    let (plain, _) = run(&[]);
    let (out, err) = run(&["-md", draft, "--spec-adaptive", "off"]);
    assert_eq!(out, plain);
    assert!(err.contains("| draft model"), "{err}");
    let (out, _) = run(&["--spec-draft-model", draft, "--spec-type", "draft-simple"]);
    assert_eq!(out, plain);
    for (extra, says) in [
        (
            &["--spec-type", "draft-simple"][..],
            "draft-simple needs a draft model",
        ),
        (
            &["-md", draft, "--spec-type", "ngram-simple"],
            "does not use it",
        ),
        (&["-md", "missing.gguf"], "cannot load the draft model"),
        (&["-md", draft, "--draft-p-min", "2"], "it must be 0 to 1"),
    ] {
        let mut args = vec!["-m", target, "-p", "hello", "-n", "2"];
        args.extend_from_slice(extra);
        let (code, _, err) = common::qwen_run_with_input(&args, "");
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}

#[test]
fn the_server_drafts_with_the_model_per_slot_and_output_is_unchanged() {
    let p = pair();
    let draft = p.draft.to_str().unwrap();
    let s = Server::start(
        &p.target,
        &["-md", draft, "--spec-adaptive", "off", "--parallel", "2"],
    );
    let completion = |extra: serde_json::Value| {
        let mut body = json!({"prompt": "hello world, hello", "n_predict": 30, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, v) = s.post("/completion", &body);
        assert_eq!(st, 200, "{v}");
        v
    };
    // Both answers below start from the prompt as this one leaves it in the slot's cache.
    completion(json!({"n_predict": 1}));
    let plain = completion(json!({"speculative.n_max": 0}));
    assert!(plain["timings"].get("draft_n").is_none(), "{plain}");
    let drafted = completion(json!({"speculative.p_min": 0.0}));
    assert_eq!(drafted["content"], plain["content"]);
    assert!(
        drafted["timings"]["draft_n"].as_u64().unwrap() > 0,
        "{drafted}"
    );
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": "hi", "speculative.p_min": 1.5}),
    );
    assert_eq!(st, 400, "{v}");
    let (_, props) = s.get("/props");
    assert!(props.contains("draft-simple"), "{props}");
    assert!(s.metric("qwen_run_draft_tokens_total") > 0.0);
}

/// The real pair: Qwen2.5-Coder 0.5B drafting for the 1.5B, greedy output unchanged. Skipped
/// when the models cannot be had.
#[test]
fn the_real_pair_keeps_greedy_output() {
    let models =
        std::panic::catch_unwind(|| (common::real_model("0.5b"), common::real_model("1.5b")));
    let Ok((small, large)) = models else {
        eprintln!("skipped: the 0.5B and 1.5B test models are not available");
        return;
    };
    let plain = load(&large, None, SpecConfig::OFF).unwrap();
    let drafted = load(&large, Some(&small), MODEL_ONLY).unwrap();
    let prompt = plain
        .tokenizer
        .encode("<|im_start|>user\nWrite a Python function that returns the n-th Fibonacci number.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let generate = |e: &Engine| {
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut session = e.new_session().unwrap();
        let req = Request::new(prompt.clone(), 48, Held::Borrowed(&mut sampler));
        e.generate_request(&mut session, req, |_| true).unwrap()
    };
    let want = generate(&plain);
    let got = generate(&drafted);
    assert_eq!(got.tokens, want.tokens);
    assert!(got.spec.accepted > 0, "{:?}", got.spec);
}
