//! Speculative decoding: a step of several tokens gives each the logits of a step of that token
//! alone, so prompt lookup never changes greedy output; drafts are made and kept on input that
//! repeats; the flags and request fields are read or refused by name.

mod common;

use common::server::Server;
use qwen_run::engine::{Engine, LoadOptions};
use qwen_run::model::{Logits, EXACT_STEP_TOKENS};
use qwen_run::sampler::{Sampler, SamplingParams};
use qwen_run::scheduler::{Held, Request};
use qwen_run::speculative::SpecConfig;
use qwen_run_kernels::Backend;
use serde_json::json;

/// A prompt the answer copies from: the model is asked to repeat code back.
const COPY_PROMPT: &str = "<|im_start|>user\nRepeat this code exactly.\n\nfn area(w: u32, h: u32) -> u32 {\n    let a = w * h;\n    println!(\"area of {w} by {h} is {a}\");\n    a\n}\n<|im_end|>\n<|im_start|>assistant\n";

fn engine_0_5b() -> Engine {
    let mut o = LoadOptions::new(common::real_model("0.5b"));
    o.threads = 2;
    Engine::load(&o).unwrap()
}

#[test]
fn a_step_of_several_tokens_gives_each_the_logits_of_one_token_steps() {
    let e = engine_0_5b();
    let tokens = e.tokenizer.encode(COPY_PROMPT).unwrap();
    let (prompt, rest) = tokens.split_at(12);
    // Every matrix of the Q4_K_M test models has a batch-invariant (rows4) layout.
    let limit = e.runner.exact_step_tokens();
    if Backend::detect().is_simd() {
        assert_eq!(limit, EXACT_STEP_TOKENS);
    }
    for k in [3, 8, limit] {
        let mut one_by_one = e.new_session().unwrap();
        e.forward(&mut one_by_one, prompt, Logits::Last).unwrap();
        let singles: Vec<Vec<f32>> = rest[..k]
            .iter()
            .map(|&t| {
                e.forward(&mut one_by_one, &[t], Logits::Last)
                    .unwrap()
                    .pop()
                    .unwrap()
            })
            .collect();
        let mut at_once = e.new_session().unwrap();
        e.forward(&mut at_once, prompt, Logits::Last).unwrap();
        let batch = e.forward(&mut at_once, &rest[..k], Logits::All).unwrap();
        for (i, (a, b)) in singles.iter().zip(&batch).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "token {i} of a step of {k}: logits differ");
        }
    }
}

#[test]
fn prompt_lookup_keeps_greedy_output_and_drafts_on_repeated_text() {
    let e = engine_0_5b();
    let prompt = e.tokenizer.encode(COPY_PROMPT).unwrap();
    let generate = |spec: SpecConfig| {
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut session = e.new_session().unwrap();
        let mut req = Request::new(prompt.clone(), 60, Held::Borrowed(&mut sampler));
        req.spec = Some(spec);
        e.generate_request(&mut session, req, |_| true).unwrap()
    };
    let plain = generate(SpecConfig::OFF);
    assert_eq!(plain.spec.drafted, 0);
    for adaptive in [true, false] {
        let spec = SpecConfig {
            adaptive,
            ..SpecConfig::default()
        };
        let g = generate(spec);
        assert_eq!(g.tokens, plain.tokens, "adaptive {adaptive}");
        assert!(
            g.spec.accepted > 0 && g.spec.passes < plain.spec.passes,
            "adaptive {adaptive}: {:?} against {:?}",
            g.spec,
            plain.spec
        );
    }
}

#[test]
fn flags_are_read_or_refused_by_name() {
    let model = common::shared_tiny_model().to_str().unwrap().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["-m", &model, "-p", "hello", "-n", "2", "--temp", "0"];
        args.extend_from_slice(extra);
        common::qwen_run_with_input(&args, "")
    };
    for (extra, says) in [
        (
            &["-md", "draft.gguf"][..],
            "cannot load the draft model draft.gguf",
        ),
        (
            &["--spec-type", "ngram-mod"],
            "supported: none, ngram-simple",
        ),
        (&["--spec-type", "eagle"], "unknown speculative type"),
        (
            &["--spec-draft-n-min", "5", "--spec-draft-n-max", "4"],
            "draft minimum 5 is more than the draft maximum 4",
        ),
        (&["--spec-ngram-simple-size-n", "1"], "n-gram size 1"),
        (&["--spec-ngram-simple-size-n", "65"], "it must be 2 to 64"),
        (
            &["--spec-ngram-simple-size-m", "8", "--draft-max", "9"],
            "set the same limit",
        ),
    ] {
        let (code, _, err) = run(extra);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    for extra in [
        &["--spec-type", "none"][..],
        &[
            "--spec-type",
            "ngram-simple",
            "--spec-ngram-simple-size-n",
            "3",
        ],
        &[
            "--draft-max",
            "4",
            "--draft-min",
            "1",
            "--draft-p-min",
            "0.5",
        ],
        &[
            "--spec-adaptive",
            "off",
            "--spec-ngram-simple-min-hits",
            "2",
        ],
    ] {
        let (code, _, err) = run(extra);
        assert_eq!(code, 0, "{extra:?}: {err}");
    }
}

#[test]
fn the_server_reports_drafts_and_takes_them_per_request() {
    let s = Server::start(&common::real_model("0.5b"), &["--parallel", "2"]);
    let completion = |extra: serde_json::Value| {
        let mut body = json!({"prompt": COPY_PROMPT, "n_predict": 40, "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, v) = s.post("/completion", &body);
        assert_eq!(st, 200, "{v}");
        v
    };
    // Both answers below start from the prompt as this one leaves it in the slot's cache (a
    // prompt run whole and one resumed from a cache may differ in their last bits).
    completion(json!({"n_predict": 1}));
    let drafted = completion(json!({}));
    assert!(
        drafted["timings"]["draft_n_accepted"].as_u64().unwrap() > 0,
        "{drafted}"
    );
    let plain = completion(json!({"speculative.n_max": 0}));
    assert!(plain["timings"].get("draft_n").is_none(), "{plain}");
    assert_eq!(plain["content"], drafted["content"]);
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": "hi", "speculative.n_min": 9, "speculative.n_max": 2}),
    );
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("speculative.n_max"), "{v}");

    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Repeat exactly: alpha beta gamma delta epsilon zeta eta theta alpha beta gamma delta"}],
                "max_tokens": 30, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    let details = &v["usage"]["completion_tokens_details"];
    assert!(
        details["accepted_prediction_tokens"].is_u64()
            && details["rejected_prediction_tokens"].is_u64(),
        "{v}"
    );
    assert!(s.metric("qwen_run_draft_tokens_accepted_total") > 0.0);
    let (_, props) = s.get("/props");
    assert!(props.contains("\"speculative\":true"), "{props}");
}
