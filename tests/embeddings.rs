//! Embeddings over real HTTP (`qwen-run serve --embedding`) in each API's shape: OpenAI's
//! `/v1/embeddings`, llama-server's `/embedding`, Ollama's `/api/embed` and `/api/embeddings`,
//! on the real 0.5B model; and the 501 without the flag.

mod common;

use common::server::Server;
use serde_json::{json, Value};
use std::process::Command;

const CAT: &str = "The cat sat on the mat.";
const CAT_AGAIN: &str = "A cat was sitting on the rug.";
const REVENUE: &str = "Quarterly revenue rose five percent in Europe.";
const MODEL: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m";

fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a vector: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

fn unit(mut a: Vec<f32>) -> Vec<f32> {
    let n = norm(&a);
    a.iter_mut().for_each(|x| *x /= n);
    a
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

fn base64_floats(s: &str) -> Vec<f32> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let mut bytes = Vec::new();
    for quad in s.as_bytes().chunks(4) {
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let n = quad
            .iter()
            .fold(0u32, |n, &c| n << 6 | if c == b'=' { 0 } else { value(c) });
        bytes.extend(&n.to_be_bytes()[1..4 - pad]);
    }
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn openai(s: &Server, input: Value) -> Vec<Vec<f32>> {
    let (status, v) = s.post(
        "/v1/embeddings",
        &json!({"input": input, "model": "text-embedding-3-small"}),
    );
    assert_eq!(status, 200, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| vector(&d["embedding"]))
        .collect()
}

#[test]
fn embeddings_in_every_api_shape() {
    let s = Server::start(
        &common::real_model("0.5b"),
        &["--embedding", "--pooling", "mean", "-c", "512", "-t", "1"],
    );

    // OpenAI: the shape, usage, and L2-normalized vectors of the model's width.
    let (status, v) = s.post(
        "/v1/embeddings",
        &json!({"input": [CAT, CAT_AGAIN, REVENUE], "model": "text-embedding-3-small", "user": "u1"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], MODEL);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
    }
    let batch: Vec<Vec<f32>> = data.iter().map(|d| vector(&d["embedding"])).collect();
    assert!(batch.iter().all(|e| e.len() == 896));
    assert!(batch.iter().all(|e| (norm(e) - 1.0).abs() < 1e-4));
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 15, "{v}");
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(tokens));

    // A batch equals its inputs sent one at a time; the same text gives the same vector.
    for (text, e) in [CAT, CAT_AGAIN, REVENUE].iter().zip(&batch) {
        assert_eq!(&openai(&s, json!(text))[0], e);
    }
    assert_eq!(openai(&s, json!([CAT]))[0], batch[0]);
    // Two sentences about a cat are closer than one about revenue.
    let (near, far) = (dot(&batch[0], &batch[1]), dot(&batch[0], &batch[2]));
    assert!(near > far + 0.1, "cat-cat {near}, cat-revenue {far}");

    // Token ids give what their text gives.
    let (_, t) = s.post("/tokenize", &json!({"content": CAT}));
    let ids = t["tokens"].clone();
    assert_eq!(openai(&s, ids.clone())[0], batch[0]);
    assert_eq!(openai(&s, json!([ids, CAT_AGAIN]))[1], batch[1]);

    // base64: the same floats, little-endian.
    let (status, v) = s.post(
        "/v1/embeddings",
        &json!({"input": CAT, "encoding_format": "base64"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        base64_floats(v["data"][0]["embedding"].as_str().unwrap()),
        batch[0]
    );

    // llama-server's native shape: [{"index", "embedding": [vector]}], normalized as
    // `embd_normalize` says (2 by default, -1 not at all).
    let (status, v) = s.post("/embedding", &json!({"content": CAT}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v[0]["index"], 0);
    assert_eq!(vector(&v[0]["embedding"][0]), batch[0]);
    let (status, raw) = s.post(
        "/embeddings",
        &json!({"content": [CAT, REVENUE], "embd_normalize": -1}),
    );
    assert_eq!(status, 200, "{raw}");
    assert_eq!(raw.as_array().unwrap().len(), 2);
    let raw_cat = vector(&raw[0]["embedding"][0]);
    assert!(norm(&raw_cat) > 2.0, "not normalized: {}", norm(&raw_cat));
    assert!(close(&unit(raw_cat.clone()), &batch[0], 1e-5));

    // Ollama: /api/embed L2-normalized, /api/embeddings as the model gives it.
    let (status, v) = s.post(
        "/api/embed",
        &json!({"model": MODEL, "input": [CAT, REVENUE]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], MODEL);
    let e = v["embeddings"].as_array().unwrap();
    assert_eq!(vector(&e[0]), batch[0]);
    assert_eq!(vector(&e[1]), batch[2]);
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 10);
    assert!(v["total_duration"].as_u64().unwrap() > 0);
    let (status, v) = s.post("/api/embed", &json!({"model": MODEL, "input": CAT}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(vector(&v["embeddings"][0]), batch[0]);
    let (status, v) = s.post("/api/embeddings", &json!({"model": MODEL, "prompt": CAT}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(vector(&v["embedding"]), raw_cat);
    // No input loads the model and embeds nothing.
    let (status, v) = s.post("/api/embed", &json!({"model": MODEL}));
    assert_eq!((status, v["embeddings"].clone()), (200, json!([])), "{v}");
    let (status, v) = s.post("/api/embeddings", &json!({"model": MODEL, "prompt": ""}));
    assert_eq!((status, v["embedding"].clone()), (200, json!([])), "{v}");

    // Longer than the context: cut by Ollama's `truncate` (its default), else a 400.
    let long = "word ".repeat(700);
    let (status, v) = s.post("/api/embed", &json!({"model": MODEL, "input": long}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["prompt_eval_count"], 512);
    let (status, v) = s.post(
        "/api/embed",
        &json!({"model": MODEL, "input": long, "truncate": false}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("context"), "{v}");
    let (status, v) = s.post("/v1/embeddings", &json!({"input": long}));
    assert_eq!(status, 400, "{v}");
    let (status, v) = s.post(
        "/api/embed",
        &json!({"model": MODEL, "input": CAT, "options": {"num_ctx": 3, "temperature": 0.5}}),
    );
    assert_eq!(
        (status, v["prompt_eval_count"].clone()),
        (200, json!(3)),
        "{v}"
    );

    // What is refused, and why.
    for (path, body, needle) in [
        (
            "/v1/embeddings",
            json!({"input": CAT, "dimensions": 256}),
            "896",
        ),
        (
            "/v1/embeddings",
            json!({"input": CAT, "dimensions": 896}),
            "",
        ),
        (
            "/v1/embeddings",
            json!({"input": CAT, "encoding_format": "int8"}),
            "base64",
        ),
        ("/v1/embeddings", json!({"input": []}), "empty"),
        ("/v1/embeddings", json!({"input": ""}), "empty"),
        ("/v1/embeddings", json!({"input": [1, -2]}), "token ids"),
        ("/v1/embeddings", json!({"input": [[151936]]}), "vocabulary"),
        ("/v1/embeddings", json!({}), "'input'"),
        (
            "/v1/embeddings",
            json!({"input": CAT, "frobnicate": 1}),
            "frobnicate",
        ),
        (
            "/embedding",
            json!({"content": CAT, "embd_normalize": 99}),
            "embd_normalize",
        ),
        (
            "/api/embed",
            json!({"model": MODEL, "input": CAT, "dimensions": 3}),
            "896",
        ),
        (
            "/api/embed",
            json!({"model": MODEL, "input": CAT, "options": {"num_ctx": 100000}}),
            "num_ctx",
        ),
        (
            "/api/embed",
            json!({"model": "nope", "input": CAT}),
            "not found",
        ),
    ] {
        let (status, v) = s.post(path, &body);
        if needle.is_empty() {
            assert_eq!(status, 200, "{path} {body}: {v}");
            continue;
        }
        assert!(
            status == 400 || status == 404,
            "{path} {body}: {status} {v}"
        );
        assert!(v.to_string().contains(needle), "{path} {body}: {v}");
    }
}

/// `--pooling none` gives a vector per token (llama-server's `/embedding` only); its last row
/// is the default pooling's vector, and their mean `--pooling mean`'s.
#[test]
fn poolings_agree_with_the_vectors_per_token() {
    let model = common::real_model("0.5b");
    let per_token = Server::start(&model, &["--embedding", "--pooling", "none", "-t", "1"]);
    let (status, v) = per_token.post("/embedding", &json!({"content": CAT}));
    assert_eq!(status, 200, "{v}");
    let rows: Vec<Vec<f32>> = v[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(vector)
        .collect();
    let (_, t) = per_token.post("/tokenize", &json!({"content": CAT}));
    assert_eq!(rows.len(), t["tokens"].as_array().unwrap().len());
    let (status, v) = per_token.post("/v1/embeddings", &json!({"input": CAT}));
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("--pooling"), "{v}");
    let (status, v) = per_token.post("/api/embed", &json!({"model": MODEL, "input": CAT}));
    assert_eq!(status, 400, "{v}");
    drop(per_token);

    // No --pooling: the file says nothing, so the last token's state, as Qwen2 embedders pool.
    let last = Server::start(&model, &["--embedding", "-t", "1"]);
    let e = openai(&last, json!(CAT)).remove(0);
    assert!(close(&e, &unit(rows.last().unwrap().clone()), 1e-5));
    drop(last);

    let mean = Server::start(&model, &["--embedding", "--pooling", "mean", "-t", "1"]);
    let e = openai(&mean, json!(CAT)).remove(0);
    let mut sum = vec![0f32; e.len()];
    for r in &rows {
        sum.iter_mut().zip(r).for_each(|(s, x)| *s += x);
    }
    assert!(close(&e, &unit(sum), 1e-5));
    drop(mean);

    let cls = Server::start(&model, &["--embedding", "--pooling", "cls", "-t", "1"]);
    let e = openai(&cls, json!(CAT)).remove(0);
    assert!(close(&e, &unit(rows[0].clone()), 1e-4));
}

#[test]
fn embeddings_need_the_flag() {
    let s = Server::start(common::shared_tiny_model(), &["-t", "1"]);
    for path in [
        "/v1/embeddings",
        "/embedding",
        "/embeddings",
        "/api/embed",
        "/api/embeddings",
    ] {
        let (status, v) = s.post(path, &json!({"input": "x", "prompt": "x", "content": "x"}));
        assert_eq!(status, 501, "{path}: {v}");
        assert!(v.to_string().contains("--embedding"), "{path}: {v}");
    }
    // Chat still answers with --embedding.
    let s = Server::start(common::shared_tiny_model(), &["-t", "1", "--embeddings"]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{v}");

    let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args([
            "serve",
            "-m",
            common::shared_tiny_model().to_str().unwrap(),
            "--pooling",
            "mean",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--embedding"));
}
