//! Fidelity on the real test models against llama.cpp's outputs on the same files
//! (tests/data/README.md says where the reference comes from). Needs the models fetched by
//! `python3 models/fetch.py 0.5b` and `python3 models/fetch.py 1.5b` (CI does this first).

mod common;

use qwen_run::bench::fidelity::{greedy_match, kl_divergence};
use qwen_run::engine::{Engine, LoadOptions};
use qwen_run::model::Logits;
use qwen_run::sampler::{Sampler, SamplingParams};
use qwen_run::tokenizer::Message;
use serde_json::Value;
use std::sync::OnceLock;

fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        let text = include_str!("data/qwen2.5-coder-0.5b-q4_k_m.json");
        serde_json::from_str(text).unwrap()
    })
}

fn engine_05b() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let mut opts = LoadOptions::new(common::real_model("0.5b"));
        opts.ctx_size = 512;
        Engine::load(&opts).unwrap()
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn raw_tokenization_matches_llama_cpp() {
    let e = engine_05b();
    for case in reference()["raw_tokenization"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            e.tokenizer.encode(text).unwrap(),
            ids(&case["ids"]),
            "text {text:?}"
        );
        assert_eq!(e.tokenizer.decode(&ids(&case["ids"])), text);
    }
}

#[test]
fn chat_template_and_prompt_tokens_match_llama_cpp() {
    let e = engine_05b();
    for p in reference()["prompts"].as_array().unwrap() {
        let messages = [
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", p["prompt"].as_str().unwrap()),
        ];
        let text = e.template.render(&messages, None, true).unwrap();
        assert_eq!(text, p["formatted_prompt"].as_str().unwrap());
        assert_eq!(e.tokenizer.encode(&text).unwrap(), ids(&p["prompt_ids"]));
    }
}

/// llama.cpp's reference without flash attention is the one whose attention numerics (f32
/// softmax over a full score matrix) ours follow.
#[test]
fn greedy_continuations_match_llama_cpp() {
    let e = engine_05b();
    let prompts = reference()["prompts_flash_attn_off"].as_array().unwrap();
    let mut matched = 0;
    let mut report = Vec::new();
    for p in prompts {
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["greedy_ids"]);
        let (same, got) = greedy_match(e, &prompt, &want).unwrap();
        if got == want {
            matched += 1;
        }
        report.push(format!(
            "{:?}: {same}/{} tokens equal (smallest reference margin {} at step {})",
            p["prompt"].as_str().unwrap(),
            want.len(),
            p["min_top1_top2_margin"],
            p["min_margin_step"]
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        matched >= 7,
        "only {matched}/8 prompts token-identical to llama.cpp:\n{}",
        report.join("\n")
    );
}

#[test]
fn first_position_logits_agree_with_llama_cpp() {
    let e = engine_05b();
    for (i, p) in reference()["prompts_flash_attn_off"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let mut session = e.new_session().unwrap();
        let logits = e
            .forward(&mut session, &ids(&p["prompt_ids"]), Logits::Last)
            .unwrap()
            .remove(0);
        let top: Vec<(u32, f32)> =
            serde_json::from_value::<Vec<Vec<(u32, f32)>>>(p["per_step_top10"].clone())
                .unwrap()
                .remove(0);
        let argmax = qwen_run::sampler::argmax(&logits);
        assert_eq!(argmax, top[0].0, "prompt {i}: top-1 differs");
        for (id, want) in top {
            let got = logits[id as usize];
            assert!(
                (got - want).abs() < 0.5,
                "prompt {i}, token {id}: logit {got} vs llama.cpp {want}"
            );
        }
    }
}

/// Against the full first-position distribution (flash attention on in the reference, so a
/// looser bound): the softmax distributions must be nearly the same.
#[test]
fn first_position_distribution_close_to_llama_cpp() {
    let e = engine_05b();
    let bytes = include_bytes!("data/qwen2.5-coder-0.5b-q4_k_m.prompt0_pos0_logits_f32.bin");
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let p = &reference()["prompts"][0];
    let mut session = e.new_session().unwrap();
    let got = e
        .forward(&mut session, &ids(&p["prompt_ids"]), Logits::Last)
        .unwrap()
        .remove(0);
    assert_eq!(got.len(), want.len());
    let kl = kl_divergence(&want, &got);
    eprintln!("KL(llama.cpp || qwen-run) at the first position: {kl:.6}");
    assert!(kl < 0.01, "KL divergence {kl}");
}

#[test]
fn second_model_loads_and_answers() {
    let mut opts = LoadOptions::new(common::real_model("1.5b"));
    opts.ctx_size = 256;
    let e = Engine::load(&opts).unwrap();
    let inspect: Value = serde_json::from_str(include_str!(
        "data/qwen2.5-coder-1.5b-instruct-q4_k_m.inspect.json"
    ))
    .unwrap();
    assert_eq!(
        e.gguf.tensors.len() as u64,
        inspect["n_tensors"].as_u64().unwrap()
    );
    let cfg = e.config();
    assert_eq!(
        (
            cfg.n_layers,
            cfg.hidden,
            cfg.ffn,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim
        ),
        (28, 1536, 8960, 12, 2, 128)
    );
    let prompt = e
        .template
        .render(
            &[
                Message::new("system", "You are a helpful assistant."),
                Message::new("user", "What is the capital of France?"),
            ],
            None,
            true,
        )
        .unwrap();
    let tokens = e.tokenizer.encode(&prompt).unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut session = e.new_session().unwrap();
    let mut text = String::new();
    e.generate(&mut session, &tokens, 16, &mut sampler, |t| {
        text.push_str(t);
        true
    })
    .unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
}

/// Our BPE model against the `tokenizers` crate's, built from the same vocabulary and merges,
/// on every source and document file of this repository and on text made to stress the
/// pre-tokenizer and the merges (scripts, emoji, whitespace runs, digits, control tokens).
#[test]
fn tokenization_matches_the_tokenizers_crate() {
    let e = engine_05b();
    let reference = qwen_run::tokenizer::reference_encode(&e.gguf).unwrap();
    let mut texts: Vec<String> = vec![
        "Hello, world! It's a test: don't, won't, we'll, I'd, you're, they've, I'm.".into(),
        "日本語のテキストと中文文本，还有한국어 텍스트. Ελληνικά, русский, عربي, עברית, हिन्दी"
            .into(),
        "emoji 👩‍💻🚀🇫🇷 and ✓ ✗ → ∑ ∞ ≠ and combining é é".into(),
        format!(
            "{}x{}\n\n\n\t\t  \r\n end",
            " ".repeat(300),
            "\n".repeat(50)
        ),
        "1234567890 3.14159 1e-9 0xdeadbeef 12,345.67 $100 100% #42".into(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>{\"a\": 1}</tool_call>"
            .into(),
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .into(),
        "\u{0}\u{1}\u{7f}\u{80}\u{ff}\u{fffd}\u{10ffff}".into(),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in [
        "src",
        "src/tokenizer",
        "src/server",
        "src/model",
        "docs",
        "benches",
        "tests",
    ] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if let Ok(text) = std::fs::read_to_string(&path) {
                texts.push(text);
            }
        }
    }
    texts.push(std::fs::read_to_string(root.join("README.md")).unwrap());
    let mut tokens = 0;
    for text in &texts {
        let ours = e.tokenizer.encode(text).unwrap();
        let theirs = reference(text);
        tokens += ours.len();
        if ours != theirs {
            let at = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            panic!(
                "ids differ at token {at} of a {}-byte text: ours {:?}, the crate's {:?}",
                text.len(),
                &ours[at..(at + 8).min(ours.len())],
                &theirs[at..(at + 8).min(theirs.len())]
            );
        }
    }
    assert!(tokens > 100_000, "only {tokens} tokens compared");
}
