//! `qwen-run serve` over real HTTP: the real binary on 127.0.0.1 with a tiny random model (both
//! APIs, streaming and not, every error), tool-call parsing on recorded Qwen2.5 outputs, and the
//! real 0.5B model answering with a tool call.

mod common;

use qwen_run::server::tool_calls::{parse_all, Piece, ToolCall, ToolCallParser};
use qwen_run_kernels::QuantType;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::server::Server;
use common::shared_tiny_model as tiny_model;

fn tiny_server() -> Server {
    Server::start(tiny_model(), &["-t", "1"])
}

fn sse_payloads(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            l.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {l}"))
                .to_string()
        })
        .collect()
}

fn chat_body(stream: bool) -> Value {
    json!({
        "model": "tiny-Q8_0",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": stream,
    })
}

#[test]
fn openai_chat_stream_and_not() {
    let s = tiny_server();
    let (status, v) = s.post("/v1/chat/completions", &chat_body(false));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny-Q8_0");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "length" || finish == "stop", "{v}");
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(u["completion_tokens"].as_u64().unwrap() <= 6);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    // The same greedy request again reuses the cached prompt.
    let (_, again) = s.post("/v1/chat/completions", &chat_body(false));
    assert_eq!(again["choices"][0]["message"]["content"], text.as_str());
    assert!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{again}"
    );

    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, ct, lines) = s.post_stream("/v1/chat/completions", &body);
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let payloads = sse_payloads(&lines);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finishes = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(ch) = c["choices"].as_array().unwrap().first() {
            streamed.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if !ch["finish_reason"].is_null() {
                finishes.push(ch["finish_reason"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finishes, vec![finish.to_string()]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], u["completion_tokens"]);
}

#[test]
fn openai_completions_and_models() {
    let s = tiny_server();
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "temperature": 0, "seed": 1}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    // OpenAI's default limit for this endpoint: 16 tokens.
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();

    let (status, _, lines) = s.post_stream(
        "/v1/completions",
        &json!({"prompt": ["hello"], "temperature": 0, "stream": true, "max_tokens": 16}),
    );
    assert_eq!(status, 200);
    let payloads = sse_payloads(&lines);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let streamed: String = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| {
            let v: Value = serde_json::from_str(p).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(streamed, text);

    // Stop strings cut the text before them.
    if text.chars().count() > 3 {
        let stop: String = text.chars().skip(2).take(2).collect();
        let (_, v) = s.post(
            "/v1/completions",
            &json!({"prompt": "hello", "temperature": 0, "stop": [stop]}),
        );
        let cut = v["choices"][0]["text"].as_str().unwrap();
        assert!(
            text.starts_with(cut) && !cut.contains(&stop),
            "{cut:?} {stop:?}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-Q8_0");
}

#[test]
fn ollama_chat_and_generate() {
    let s = tiny_server();
    let body = json!({
        "model": "tiny-q8_0:latest",
        "messages": [{"role": "user", "content": "hello"}],
        "options": {"num_predict": 5, "temperature": 0, "top_k": 10, "top_p": 0.9, "seed": 3, "num_ctx": 128},
        "keep_alive": "5m",
    });
    let (status, ct, lines) = s.post_stream("/api/chat", &body);
    assert_eq!(status, 200);
    assert!(ct.starts_with("application/x-ndjson"), "{ct}");
    let objs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, pieces) = objs.split_last().unwrap();
    let mut streamed = String::new();
    for p in pieces {
        assert_eq!(p["done"], false);
        assert_eq!(p["message"]["role"], "assistant");
        streamed.push_str(p["message"]["content"].as_str().unwrap());
    }
    assert_eq!(last["done"], true);
    assert!(["stop", "length"].contains(&last["done_reason"].as_str().unwrap()));
    assert!(last["prompt_eval_count"].as_u64().unwrap() > 0);
    assert!(last["eval_count"].as_u64().unwrap() <= 5);
    for k in [
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(last[k].is_u64(), "{k} in {last}");
    }
    assert!(last["created_at"].as_str().unwrap().ends_with('Z'));

    let mut b = body.clone();
    b["stream"] = json!(false);
    let (status, v) = s.post("/api/chat", &b);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done"], true);
    assert_eq!(v["message"]["content"], streamed.as_str());

    let gen = json!({"model": "tiny-Q8_0", "prompt": "hello", "stream": false, "options": {"num_predict": 4, "temperature": 0}});
    let (status, v) = s.post("/api/generate", &gen);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done"], true);
    let text = v["response"].as_str().unwrap().to_string();
    let mut g = gen.clone();
    g["stream"] = json!(true);
    let (status, _, lines) = s.post_stream("/api/generate", &g);
    assert_eq!(status, 200);
    let objs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let streamed: String = objs
        .iter()
        .map(|o| o["response"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(objs.last().unwrap()["done"], true);
    assert!(objs.last().unwrap()["eval_count"].as_u64().unwrap() <= 4);

    // raw mode and the empty "load" request.
    let (status, v) = s.post(
        "/api/generate",
        &json!({"prompt": "hello", "raw": true, "stream": false, "options": {"num_predict": 2}}),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = s.post("/api/generate", &json!({"model": "tiny-Q8_0"}));
    assert_eq!(status, 200);
    assert_eq!(v["done_reason"], "load");

    let (status, body) = s.get("/api/tags");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["models"][0]["name"], "tiny-Q8_0");
    assert_eq!(v["models"][0]["details"]["format"], "gguf");
    let (status, body) = s.get("/api/version");
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["version"].is_string());
    let (status, v) = s.post("/api/show", &json!({"model": "tiny-Q8_0"}));
    assert_eq!(status, 200);
    assert!(v["template"].as_str().unwrap().contains("im_start"));
}

#[test]
fn health_and_metrics() {
    let s = tiny_server();
    let (status, body) = s.get("/health");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    s.post("/v1/chat/completions", &chat_body(false));
    s.post("/v1/chat/completions", &chat_body(false));
    s.post("/api/chat", &json!({"model": "nope", "messages": []}));
    let (status, m) = s.get("/metrics");
    assert_eq!(status, 200);
    for needle in [
        "qwen_run_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2",
        "qwen_run_requests_total{endpoint=\"/api/chat\",status=\"404\"} 1",
        "qwen_run_generations_total 2",
        "# TYPE qwen_run_time_to_first_token_seconds histogram",
        "qwen_run_time_to_first_token_seconds_count 2",
        "qwen_run_time_per_output_token_seconds_bucket{le=\"+Inf\"}",
        "qwen_run_queue_depth 0",
        "qwen_run_prefix_cache_hit_ratio",
    ] {
        assert!(m.contains(needle), "{needle} not in:\n{m}");
    }
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("qwen_run_generated_tokens_total") > 0.0);
    // The second request reused the first one's prompt.
    assert!(value("qwen_run_prefix_cache_hit_ratio") > 0.0);
    assert!(value("qwen_run_prompt_tokens_reused_total") > 0.0);
}

fn expect_error(s: &Server, path: &str, body: Vec<u8>, status: u16, needles: &[&str]) -> Value {
    let (got, v) = s.post_raw(path, body);
    assert_eq!(got, status, "{path}: {v}");
    let msg = if path.starts_with("/api/") {
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_string()
    } else {
        v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_string()
    };
    for n in needles {
        assert!(msg.contains(n), "{path}: expected {n:?} in {msg:?}");
    }
    v
}

#[test]
fn errors() {
    let s = tiny_server();
    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    for path in ["/v1/chat/completions", "/api/chat"] {
        expect_error(
            &s,
            path,
            b"{\"messages\": [".to_vec(),
            400,
            &["invalid JSON", "EOF while parsing"],
        );
        let long = "hello world ".repeat(200);
        expect_error(
            &s,
            path,
            j(json!({"messages": [{"role": "user", "content": long}]})),
            400,
            &["tokens but the context holds 256"],
        );
        // 9 MiB announced: refused with 413 before the body is read.
        let (status, body) = s.raw_oversized_post(path, 9 << 20);
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("larger than the limit"), "{body}");
    }
    expect_error(
        &s,
        "/v1/chat/completions",
        j(json!({"model": ""})),
        400,
        &["missing field `messages`"],
    );
    expect_error(
        &s,
        "/v1/chat/completions",
        j(json!({"messages": "hi"})),
        400,
        &["invalid type"],
    );
    expect_error(
        &s,
        "/v1/chat/completions",
        j(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1})),
        400,
        &["temperature"],
    );
    expect_error(
        &s,
        "/v1/chat/completions",
        j(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
        400,
        &["image_url"],
    );
    // Ollama's endpoints name the model they need: an unknown one is 404 even with one model.
    expect_error(
        &s,
        "/api/chat",
        j(json!({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})),
        404,
        &["model 'llama3' not found", "tiny-Q8_0"],
    );
    expect_error(
        &s,
        "/api/chat",
        j(json!({"messages": [{"role": "user", "content": "hi"}], "options": {"num_ctx": 100000}})),
        400,
        &["num_ctx 100000 exceeds", "--ctx-size"],
    );
    expect_error(
        &s,
        "/api/generate",
        j(json!({"model": "llama3", "prompt": "hi"})),
        404,
        &["not found"],
    );
    expect_error(
        &s,
        "/api/generate",
        j(json!({"prompt": 5})),
        400,
        &["invalid type: integer"],
    );
    let (status, _) = s.get("/v2/nothing");
    assert_eq!(status, 404);
    // The server is still fine after all that.
    let (status, _) = s.post("/v1/chat/completions", &chat_body(false));
    assert_eq!(status, 200);
}

/// `n` long greedy completions sent at once; every answer is 200 or `refused`, which must carry
/// Retry-After and a message containing `why`. Checks that some were refused, some answered, and
/// that the server generated exactly the answered ones. Returns how many were refused.
fn overload(s: &Server, n: usize, refused: u16, why: &str) -> usize {
    let statuses: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(|| {
                    let r = s
                        .http
                        .post(s.url("/v1/completions"))
                        .json(&json!({"prompt": "hello", "max_tokens": 200, "temperature": 0}))
                        .send()
                        .unwrap();
                    let status = r.status().as_u16();
                    if status == refused {
                        assert_eq!(r.headers()["retry-after"], "1");
                    }
                    (status, r.json().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let no: Vec<_> = statuses.iter().filter(|(st, _)| *st == refused).collect();
    assert!(!no.is_empty(), "no {refused} among {statuses:?}");
    let msg = no[0].1["error"]["message"].as_str().unwrap();
    assert!(msg.contains(why), "{msg}");
    assert!(statuses.iter().all(|(st, _)| *st == 200 || *st == refused));
    let answered = statuses.iter().filter(|(st, _)| *st == 200).count();
    assert!(answered > 0);
    // Nothing accepted was lost or generated twice.
    assert_eq!(s.metric("qwen_run_generations_total"), answered as f64);
    no.len()
}

#[test]
fn full_queue_gets_429_and_every_request_is_answered_once() {
    let s = Server::start(tiny_model(), &["-t", "1", "--queue-size", "1"]);
    // 4 slots (the default) + 1 queue place: at most 7 of 12 are refused (fewer if some answers
    // finish before the last requests arrive).
    assert!(overload(&s, 12, 429, "queue is full") <= 7);
}

#[test]
fn bad_serve_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args([
            "serve",
            "-m",
            tiny_model().to_str().unwrap(),
            "--parallel",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--parallel must be at least 1"));
}

#[test]
fn queued_requests_time_out_with_503() {
    // One slot, and a queue time-out far shorter than a 200-token answer.
    let s = Server::start(
        tiny_model(),
        &["-t", "1", "--parallel", "1", "--queue-timeout", "0.01"],
    );
    let timed_out = overload(&s, 6, 503, "--queue-timeout");
    assert_eq!(s.metric("qwen_run_queue_timeouts_total"), timed_out as f64);
}

/// A second tiny model, smaller than `tiny_model()` (Q4_0 against Q8_0).
fn small_tiny_model() -> &'static Path {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = common::write_tiny_model(dir.path(), QuantType::Q4_0);
            (dir, p)
        })
        .1
}

fn ps_names(s: &Server) -> Vec<String> {
    let (_, body) = s.get("/api/ps");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting until {what}");
}

fn complete_with(s: &Server, body: &Value) -> (String, String, Value) {
    let r = s
        .http
        .post(s.url("/v1/completions"))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let header = |n: &str| {
        r.headers()
            .get(n)
            .map_or(String::new(), |v| v.to_str().unwrap().to_string())
    };
    let (model, route) = (header("x-qwen-run-model"), header("x-qwen-run-route"));
    (model, route, r.json().unwrap())
}

#[test]
fn several_models_load_on_first_use_with_lru_unload() {
    let small = small_tiny_model().to_str().unwrap();
    let s = Server::start(tiny_model(), &["-t", "1", "-m", small, "--max-loaded", "1"]);
    let loaded = |name: &str| (name.to_string(), "loaded".to_string());
    let unloaded = |name: &str| (name.to_string(), "unloaded".to_string());
    // The first -m is loaded at startup, the other on first use.
    assert_eq!(
        s.model_states(),
        vec![loaded("tiny-Q8_0"), unloaded("tiny-Q4_0")]
    );
    let (_, tags) = s.get("/api/tags");
    let tags: Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(tags["models"].as_array().unwrap().len(), 2);
    assert_eq!(tags["models"][1]["state"], "unloaded");
    let body = json!({"model": "tiny-Q4_0", "prompt": "hello", "max_tokens": 4, "temperature": 0});
    let (model, _, v) = complete_with(&s, &body);
    assert_eq!(model, "tiny-Q4_0");
    assert_eq!(v["model"], "tiny-Q4_0");
    // --max-loaded 1: loading it unloaded the other one.
    assert_eq!(
        s.model_states(),
        vec![unloaded("tiny-Q8_0"), loaded("tiny-Q4_0")]
    );
    assert_eq!(ps_names(&s), vec!["tiny-Q4_0".to_string()]);
    // No model field: the first model, loaded again.
    let (model, _, _) = complete_with(&s, &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(model, "tiny-Q8_0");
    assert_eq!(s.metric("qwen_run_model_loads_total"), 3.0);
    assert_eq!(s.metric("qwen_run_model_unloads_total"), 2.0);
    // An unknown model: 404, naming the served ones (with several models a name must be theirs).
    let (status, v) = s.post("/v1/completions", &json!({"model": "nope", "prompt": "hi"}));
    assert_eq!(status, 404);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("'tiny-Q8_0', 'tiny-Q4_0'"), "{msg}");
    let mut chat = chat_body(false);
    chat["model"] = json!("gpt-4o-mini");
    let (status, v) = s.post("/v1/chat/completions", &chat);
    assert_eq!(status, 404, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("model 'gpt-4o-mini' not found") && msg.contains("'tiny-Q8_0', 'tiny-Q4_0'"),
        "{msg}"
    );
}

#[test]
fn one_model_answers_any_model_name_on_the_openai_endpoints() {
    let s = tiny_server();
    let mut chat = chat_body(false);
    chat["model"] = json!("gpt-4o-mini");
    let (status, v) = s.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "tiny-Q8_0");
    chat["stream"] = json!(true);
    let (status, _, lines) = s.post_stream("/v1/chat/completions", &chat);
    assert_eq!(status, 200);
    let first: Value = serde_json::from_str(&sse_payloads(&lines)[0]).unwrap();
    assert_eq!(first["model"], "tiny-Q8_0");
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": "text-davinci-003", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "tiny-Q8_0");
    let (status, v) = s.post(
        "/completion",
        &json!({"model": "anything", "prompt": "hi", "n_predict": 2}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "tiny-Q8_0");
    // Ollama's endpoints keep their rule: the name must be the model's.
    let (status, _) = s.post(
        "/api/generate",
        &json!({"model": "gpt-4o-mini", "prompt": "hi", "stream": false}),
    );
    assert_eq!(status, 404);
}

#[test]
fn a_models_directory_is_served() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path(), QuantType::Q8_0);
    common::write_tiny_model(dir.path(), QuantType::Q4_0);
    std::fs::write(dir.path().join("notes.txt"), "not a model").unwrap();
    let s = Server::start(dir.path(), &["-t", "1"]);
    let names: Vec<String> = s.model_states().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec!["tiny-Q4_0".to_string(), "tiny-Q8_0".to_string()]
    );
}

#[test]
fn keep_alive_unloads_idle_models() {
    let small = small_tiny_model().to_str().unwrap();
    let s = Server::start(
        tiny_model(),
        &["-t", "1", "-m", small, "--keep-alive", "300ms"],
    );
    let body = json!({"model": "tiny-Q4_0", "prompt": "hello", "max_tokens": 2});
    complete_with(&s, &body);
    // Both expire 300 ms after their last request.
    wait_until("both models are unloaded", || ps_names(&s).is_empty());
    // Ollama's per-request keep_alive: -1 keeps the model, 0 unloads it once the answer is done.
    let (status, v) = s.post(
        "/api/generate",
        &json!({"model": "tiny-Q4_0", "prompt": "hi", "stream": false, "keep_alive": -1, "options": {"num_predict": 2}}),
    );
    assert_eq!(status, 200, "{v}");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(ps_names(&s), vec!["tiny-Q4_0".to_string()]);
    let (_, ps) = s.get("/api/ps");
    assert!(ps.contains("2318-01-01"), "{ps}");
    let (status, v) = s.post(
        "/api/chat",
        &json!({"model": "tiny-Q4_0", "messages": [{"role": "user", "content": "hi"}], "stream": false, "keep_alive": 0, "options": {"num_predict": 2}}),
    );
    assert_eq!(status, 200, "{v}");
    wait_until("keep_alive 0 unloads", || ps_names(&s).is_empty());
    // Ollama's load and unload requests: no prompt.
    let (status, v) = s.post("/api/generate", &json!({"model": "tiny-Q8_0"}));
    assert_eq!((status, v["done_reason"].as_str()), (200, Some("load")));
    let (status, v) = s.post(
        "/api/generate",
        &json!({"model": "tiny-Q8_0", "keep_alive": "0"}),
    );
    assert_eq!((status, v["done_reason"].as_str()), (200, Some("unload")));
    assert!(ps_names(&s).is_empty());
    let (status, v) = s.post(
        "/api/generate",
        &json!({"model": "tiny-Q8_0", "prompt": "hi", "keep_alive": "soon"}),
    );
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().contains("not a duration"),
        "{v}"
    );
}

#[test]
fn auto_routing_follows_the_rule_and_says_so() {
    let small = small_tiny_model().to_str().unwrap();
    let s = Server::start(
        tiny_model(),
        &[
            "-t",
            "1",
            "-m",
            small,
            "--route-long-prompt",
            "40",
            "--route-keywords",
            "prove,step by step",
        ],
    );
    let chat = |content: &str, tools: bool| {
        let mut body = json!({"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 2});
        if tools {
            body["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        }
        let r = s
            .http
            .post(s.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let h = |n: &str| r.headers()[n].to_str().unwrap().to_string();
        let (model, route) = (h("x-qwen-run-model"), h("x-qwen-run-route"));
        let v: Value = r.json().unwrap();
        assert_eq!(v["model"].as_str().unwrap(), model);
        (model, route)
    };
    // Small and large by file size: Q4_0 is the smaller file.
    assert_eq!(chat("hi", false), ("tiny-Q4_0".into(), "default".into()));
    assert_eq!(chat("hi", true), ("tiny-Q8_0".into(), "tools".into()));
    assert_eq!(
        chat("Prove that 2 is prime", false),
        ("tiny-Q8_0".into(), "keyword 'prove'".into())
    );
    let (model, route) = chat(&"words ".repeat(10), false);
    assert_eq!(model, "tiny-Q8_0");
    assert!(route.starts_with("long prompt (60 > 40"), "{route}");
    // A named model is never routed.
    let (model, route, _) = complete_with(
        &s,
        &json!({"model": "tiny-Q4_0", "prompt": "prove it", "max_tokens": 2}),
    );
    assert_eq!((model.as_str(), route.as_str()), ("tiny-Q4_0", ""));
}

#[test]
fn response_cache_answers_repeated_deterministic_requests() {
    let s = Server::start(tiny_model(), &["-t", "1", "--response-cache", "4"]);
    let send = |body: &Value| {
        let r = s
            .http
            .post(s.url("/v1/chat/completions"))
            .json(body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let hit = r.headers()["x-qwen-run-cache"]
            .to_str()
            .unwrap()
            .to_string();
        (hit, r.text().unwrap())
    };
    let text = |body: &str| -> String {
        let v: Value = serde_json::from_str(body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let greedy = chat_body(false);
    let (first, a) = send(&greedy);
    let (second, b) = send(&greedy);
    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(text(&a), text(&b));
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"],
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
    );
    // A streamed request hits the same entry and streams the same text.
    let r = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body(true))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-qwen-run-cache"], "hit");
    let streamed: String = r
        .text()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, text(&a));
    // Sampling with a fresh random seed is never cached; with a chosen seed it is.
    let mut sampled = chat_body(false);
    sampled["temperature"] = json!(0.9);
    assert_eq!(send(&sampled).0, "miss");
    assert_eq!(send(&sampled).0, "miss");
    sampled["seed"] = json!(42);
    let (m, x) = send(&sampled);
    let (h, y) = send(&sampled);
    assert_eq!((m.as_str(), h.as_str()), ("miss", "hit"));
    assert_eq!(text(&x), text(&y));
    assert_eq!(s.metric("qwen_run_response_cache_hits_total"), 3.0);
    // Only real generations are counted as such.
    assert_eq!(s.metric("qwen_run_generations_total"), 4.0);
}

#[test]
fn bad_multi_model_flags() {
    let tiny = tiny_model().to_str().unwrap();
    let small = small_tiny_model().to_str().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-m", tiny, "--keep-alive", "soon"], "--keep-alive"),
        (
            vec!["-m", tiny, "--max-loaded", "0"],
            "--max-loaded must be at least 1",
        ),
        (vec!["-m", tiny, "--queue-timeout", "0"], "--queue-timeout"),
        (vec!["-m", tiny, "--queue-timeout", "1e20"], "at most 86400"),
        (
            vec!["-m", tiny, "--keep-alive", "99999999999"],
            "longer than ten years",
        ),
        (
            vec!["-m", tiny, "-m", small, "--alias", "x"],
            "--alias names one model",
        ),
        (
            vec!["-m", tiny, "-m", small, "--route-large", "big"],
            "--route-large 'big' is not among",
        ),
        (
            vec!["-m", tiny, "-m", tiny],
            "two models are served as 'tiny-Q8_0'",
        ),
        (
            vec!["-m", empty.path().to_str().unwrap()],
            "holds no .gguf file",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Other commands take one model.
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args(["run", "-m", tiny, "-m", small, "-p", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("only `qwen-run serve` serves several models"));
}

/// Greedy completions of `prompts`, all sent at once.
fn complete_concurrently(s: &Server, prompts: &[&str], max_tokens: usize) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                scope.spawn(move || {
                    let (status, v) = s.post(
                        "/v1/completions",
                        &json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0}),
                    );
                    assert_eq!(status, 200, "{v}");
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Continuous batching: requests served together, in shared forward passes, each get what they
/// get alone (greedy), and every one is answered once. `exact`: the whole text must match; else
/// only the first word. (The batched matmuls sum in another order than the single-token ones,
/// ~1e-6 relative; through a real model's int8 activation rounding that can flip a later token
/// where two candidates are nearly tied, as llama.cpp's batches can.)
fn batched_equals_solo(model: &Path, prompts: &[&str], max_tokens: usize, exact: bool) {
    let solo = Server::start(model, &["-t", "2", "--parallel", "1"]);
    let want: Vec<String> = prompts
        .iter()
        .map(|p| complete_concurrently(&solo, &[p], max_tokens).remove(0))
        .collect();
    drop(solo);
    let batched = Server::start(model, &["-t", "2", "--parallel", "4"]);
    // Twice as many requests as slots: some wait, then join running batches.
    let twice: Vec<&str> = prompts.iter().chain(prompts).copied().collect();
    let got = complete_concurrently(&batched, &twice, max_tokens);
    for (i, text) in got.iter().enumerate() {
        let want = &want[i % prompts.len()];
        let first_word = |t: &str| t.split_whitespace().next().unwrap_or("").to_string();
        if exact {
            assert_eq!(text, want, "request {i} ({:?})", twice[i]);
        } else {
            assert_eq!(
                first_word(text),
                first_word(want),
                "request {i}: {text:?} vs {want:?}"
            );
        }
    }
    let (_, metrics) = batched.get("/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("qwen_run_generations_total"))
        .unwrap();
    assert!(line.ends_with(&format!(" {}", twice.len())), "{line}");
}

#[test]
fn batched_requests_match_solo_outputs() {
    batched_equals_solo(
        tiny_model(),
        &["hello world", "the cat", "one two three four five", "a"],
        12,
        true,
    );
}

#[test]
fn batched_requests_match_solo_outputs_real_model() {
    batched_equals_solo(
        &common::real_model("0.5b"),
        &[
            "The capital of France is",
            "def fibonacci(n):",
            "Rust is a programming language that",
            "1, 2, 3, 4,",
        ],
        24,
        false,
    );
}

/// A request's prompt goes into the prefix cache as soon as it has run: a request with the same
/// long system prompt that arrives while the first one is still generating skips that part.
#[test]
fn a_running_requests_prompt_is_reused_by_the_next() {
    let s = Server::start(
        &common::real_model("0.5b"),
        &["-t", "2", "--parallel", "2", "--no-prompt-cache"],
    );
    let system = "You are a careful assistant who answers in plain words. ".repeat(16);
    let body = |user: &str, max_tokens: usize, stream: bool| {
        json!({
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        })
    };
    // The first request streams a long answer; once its first token is out, its prompt has run
    // (the stream opens with an empty role chunk, sent before that: skip it).
    let first = s
        .http
        .post(s.url("/v1/chat/completions"))
        .json(&body(
            "Count from 1 to 1000, one number per line.",
            1000,
            true,
        ))
        .send()
        .unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let mut lines = BufReader::new(first).lines();
    let first_token = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("\"content\":\"") && !l.contains("\"content\":\"\""));
    assert!(
        first_token.is_some(),
        "the first request ended without text"
    );
    let (status, v) = s.post("/v1/chat/completions", &body("Say hi.", 4, false));
    assert_eq!(status, 200, "{v}");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 64, "the shared system prompt was not reused: {v}");
    // (The first request is still generating: 1000 tokens take far longer than this.)
    drop(lines);
}

// ---- Tool-call parsing on recorded Qwen2.5 outputs ----

const TOOLS: &[&str] = &["get_weather"];

/// Recorded from qwen2.5-coder-0.5b-instruct (q4_k_m) through `qwen-run serve` with a
/// get_weather tool, greedy: the small coder models write the call without the tags...
const RECORDED_BARE: &str =
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}";
/// ...or in a json fence ("What is the weather in Paris and in Tokyo, in celsius?")...
const RECORDED_FENCED: &str = "```json\n{\n  \"name\": \"get_weather\",\n  \"arguments\": {\n    \"city\": \"Paris\",\n    \"unit\": \"celsius\"\n  }\n}\n```";
/// ...or, asked for a joke, a broken object naming no tool: text.
const RECORDED_MALFORMED_BARE: &str = "{\"name\": \"cat joke\", \"arguments\": {\"cat\": \"Meow\"}";
/// The tagged form of Qwen2.5's template, as the instruct models write it.
const TAGGED_CALL: &str =
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
const TAGGED_TWO_CALLS: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tokyo\", \"unit\": \"celsius\"}}\n</tool_call>";
const TAGGED_TEXT_THEN_CALL: &str = "Let me check the weather for you.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Berlin\"}}\n</tool_call>";
const MALFORMED: &str =
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}\n</tool_call>";

fn parser() -> ToolCallParser {
    ToolCallParser::with_tools(TOOLS.iter().map(|t| t.to_string()).collect())
}

fn call(name: &str, args: Value) -> Piece {
    Piece::Call(ToolCall {
        name: name.into(),
        arguments: args,
    })
}

/// Feeds `text` cut at the given byte positions and merges adjacent text pieces.
fn parse_split(text: &str, cuts: &[usize]) -> Vec<Piece> {
    let mut p = parser();
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&text.len())) {
        out.extend(p.push(&text[last..c]));
        last = c;
    }
    out.extend(p.finish());
    let mut merged: Vec<Piece> = Vec::new();
    for piece in out {
        match (merged.last_mut(), piece) {
            (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
            (_, p) => merged.push(p),
        }
    }
    merged
}

#[test]
fn tool_calls_parse_recorded_outputs() {
    assert_eq!(
        parse_all(TAGGED_CALL, TOOLS),
        vec![call("get_weather", json!({"city": "Paris"}))]
    );
    let two = parse_all(TAGGED_TWO_CALLS, TOOLS);
    assert_eq!(
        two,
        vec![
            call("get_weather", json!({"city": "Paris", "unit": "celsius"})),
            Piece::Text("\n".into()),
            call("get_weather", json!({"city": "Tokyo", "unit": "celsius"})),
        ]
    );
    assert_eq!(
        parse_all(TAGGED_TEXT_THEN_CALL, TOOLS),
        vec![
            Piece::Text("Let me check the weather for you.\n".into()),
            call("get_weather", json!({"city": "Berlin"})),
        ]
    );
    let paris = json!({"city": "Paris", "unit": "celsius"});
    assert_eq!(
        parse_all(RECORDED_BARE, TOOLS),
        vec![call("get_weather", paris.clone())]
    );
    assert_eq!(
        parse_all(RECORDED_FENCED, TOOLS),
        vec![call("get_weather", paris.clone())]
    );
    assert_eq!(
        parse_all(RECORDED_MALFORMED_BARE, TOOLS),
        vec![Piece::Text(RECORDED_MALFORMED_BARE.into())]
    );
    // A bare object is a call only for the request's tools, and only at the start.
    let other = r#"{"name": "get_time", "arguments": {}}"#;
    assert_eq!(parse_all(other, TOOLS), vec![Piece::Text(other.into())]);
    assert_eq!(
        parse_all(RECORDED_BARE, &[]),
        vec![Piece::Text(RECORDED_BARE.into())]
    );
    let late = format!("Sure: {RECORDED_BARE}");
    assert_eq!(parse_all(&late, TOOLS), vec![Piece::Text(late.clone())]);
    let fence_then_text = format!(
        "{RECORDED_FENCED}
This calls the tool."
    );
    assert_eq!(
        parse_all(&fence_then_text, TOOLS),
        vec![
            call("get_weather", paris),
            Piece::Text(
                "
This calls the tool."
                    .into()
            )
        ]
    );
    // Malformed JSON comes back as the text it was.
    assert_eq!(
        parse_all(MALFORMED, TOOLS),
        vec![Piece::Text(MALFORMED.into())]
    );
    // An unclosed block with complete JSON (the model stopped right after it) is a call; an
    // unclosed one with broken JSON is text.
    assert_eq!(
        parse_all("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n", TOOLS),
        vec![call("f", json!({}))]
    );
    assert_eq!(
        parse_all("<tool_call>\n{\"name\": \"f\", \"argu", TOOLS),
        vec![Piece::Text("<tool_call>\n{\"name\": \"f\", \"argu".into())]
    );
    // Text that only looks like the start of a tag is released at the end.
    assert_eq!(
        parse_all("a < b <tool", TOOLS),
        vec![Piece::Text("a < b <tool".into())]
    );
    assert_eq!(
        parse_all("plain answer, no tools", TOOLS),
        vec![Piece::Text("plain answer, no tools".into())]
    );
}

#[test]
fn tool_calls_parse_across_every_chunk_boundary() {
    for text in [
        TAGGED_CALL,
        TAGGED_TWO_CALLS,
        TAGGED_TEXT_THEN_CALL,
        MALFORMED,
        RECORDED_BARE,
        RECORDED_FENCED,
        RECORDED_MALFORMED_BARE,
        "Über <tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": \"é\"}}\n</tool_call> ok",
    ] {
        let whole = parse_all(text, TOOLS);
        let bounds: Vec<usize> = (1..text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &bounds {
            assert_eq!(parse_split(text, &[a]), whole, "cut at {a} of {text:?}");
        }
        for (i, &a) in bounds.iter().enumerate().step_by(3) {
            for &b in bounds[i + 1..].iter().step_by(5) {
                assert_eq!(
                    parse_split(text, &[a, b]),
                    whole,
                    "cuts {a},{b} of {text:?}"
                );
            }
        }
        // Token-sized pieces: nothing of a call is released before its block closes.
        let mut p = parser();
        let mut released = String::new();
        for ch in text.chars() {
            for piece in p.push(&ch.to_string()) {
                if let Piece::Text(t) = piece {
                    released.push_str(&t);
                }
            }
            assert!(
                !released.contains("<tool_call>") || text == MALFORMED,
                "released part of a call: {released:?}"
            );
        }
    }
}

// ---- The real 0.5B model ----

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name"},
                },
                "required": ["city"],
            },
        },
    }])
}

#[test]
fn real_model_tool_call() {
    let s = Server::start(&common::real_model("0.5b"), &["-c", "2048"]);
    let messages =
        json!([{"role": "user", "content": "What's the weather like in Paris right now?"}]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "tools": weather_tools(), "temperature": 0, "max_tokens": 100}),
    );
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let tc = &choice["message"]["tool_calls"][0];
    assert_eq!(tc["type"], "function");
    assert!(tc["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(tc["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(tc["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].as_str().unwrap().contains("Paris"), "{args}");

    // Streaming: the call arrives whole, in one chunk, and no tag text leaks out.
    let (status, _, lines) = s.post_stream(
        "/v1/chat/completions",
        &json!({"messages": messages, "tools": weather_tools(), "temperature": 0, "max_tokens": 100, "stream": true}),
    );
    assert_eq!(status, 200);
    let payloads = sse_payloads(&lines);
    let mut calls = Vec::new();
    let mut finish = Value::Null;
    for p in &payloads[..payloads.len() - 1] {
        let c: Value = serde_json::from_str(p).unwrap();
        let d = &c["choices"][0]["delta"];
        assert!(
            !d["content"].as_str().unwrap_or("").contains("tool_call"),
            "{p}"
        );
        if let Some(tcs) = d["tool_calls"].as_array() {
            calls.extend(tcs.iter().cloned());
        }
        if !c["choices"][0]["finish_reason"].is_null() {
            finish = c["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(finish, "tool_calls");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["name"], "get_weather");

    // The tool's answer goes back; the model answers in text, using it.
    let followup = json!([
        messages[0],
        {"role": "assistant", "content": null, "tool_calls": [tc]},
        {"role": "tool", "tool_call_id": tc["id"], "content": "{\"temperature_c\": 18, \"sky\": \"sunny\"}"},
    ]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": followup, "tools": weather_tools(), "temperature": 0, "max_tokens": 60}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("18"), "{v}");

    // Ollama: arguments as an object.
    let (status, v) = s.post(
        "/api/chat",
        &json!({"messages": messages, "tools": weather_tools(), "stream": false, "options": {"temperature": 0}}),
    );
    assert_eq!(status, 200, "{v}");
    let tc = &v["message"]["tool_calls"][0]["function"];
    assert_eq!(tc["name"], "get_weather");
    assert!(
        tc["arguments"]["city"].as_str().unwrap().contains("Paris"),
        "{v}"
    );

    // A client that leaves mid-stream frees the worker at once.
    let r = s
        .http
        .post(s.url("/api/generate"))
        .json(&json!({"prompt": "Write a very long story about a dragon.", "options": {"num_predict": 2000}}))
        .send()
        .unwrap();
    let mut lines = BufReader::new(r).lines();
    lines.next().unwrap().unwrap();
    drop(lines);
    let t0 = std::time::Instant::now();
    let (status, v) = s.post(
        "/api/generate",
        &json!({"prompt": "Say hi.", "stream": false, "options": {"num_predict": 3}}),
    );
    assert_eq!(status, 200, "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the worker was not freed: {:?}",
        t0.elapsed()
    );
    let (_, m) = s.get("/metrics");
    let generated: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("qwen_run_generated_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        generated < 1000.0,
        "the abandoned generation ran on: {generated}"
    );
}

#[test]
fn openai_python_client() {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("note: skipping the openai client test: `python3 -c \"import openai\"` fails (pip install openai)");
        return;
    }
    let s = tiny_server();
    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
models = [m.id for m in c.models.list()]
assert models == ["tiny-Q8_0"], models
r = c.chat.completions.create(model="tiny-Q8_0", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0)
text = r.choices[0].message.content
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.completion_tokens <= 5, r.usage
parts = []
for chunk in c.chat.completions.create(model="tiny-Q8_0", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == text, (parts, text)
r = c.completions.create(model="tiny-Q8_0", prompt="hello", max_tokens=3, temperature=0)
assert r.object == "text_completion"
# one model served: any name is answered by it, as llama-server does
r = c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
assert r.model == "tiny-Q8_0", r.model
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script, &s.base])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// A JSON schema or `"json"` holds the real 0.5B to valid JSON on a prose prompt, on both APIs
/// and streaming, and a schema the constrained decoder cannot use is a 400 that says why.
#[test]
fn real_model_structured_output() {
    let s = Server::start(&common::real_model("0.5b"), &["-c", "2048"]);
    let book = json!({
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
            "genre": {"enum": ["fiction", "non-fiction", "poetry"]},
            "characters": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
            "author": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "alive": {"type": "boolean"}},
                "required": ["name", "alive"],
                "additionalProperties": false
            }
        },
        "required": ["title", "year", "genre", "characters", "author"],
        "additionalProperties": false
    });
    let check_book = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 5, "{v}");
        assert!(v["title"].is_string(), "{v}");
        let year = v["year"].as_i64().unwrap();
        assert!((1000..=2100).contains(&year), "{v}");
        assert!(
            ["fiction", "non-fiction", "poetry"].contains(&v["genre"].as_str().unwrap()),
            "{v}"
        );
        let n = v["characters"].as_array().unwrap().len();
        assert!((1..=3).contains(&n), "{v}");
        assert!(
            v["author"]["name"].is_string() && v["author"]["alive"].is_boolean(),
            "{v}"
        );
    };
    let messages =
        json!([{"role": "user", "content": "Describe your favourite book in a sentence."}]);
    let format = json!({"type": "json_schema", "json_schema": {"name": "book", "schema": book, "strict": true}});
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "response_format": format, "temperature": 0, "max_tokens": 200}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    check_book(v["choices"][0]["message"]["content"].as_str().unwrap());

    // Sampled, streamed: still valid.
    let (status, _, lines) = s.post_stream(
        "/v1/chat/completions",
        &json!({"messages": messages, "response_format": format, "temperature": 1.0, "seed": 7, "max_tokens": 200, "stream": true}),
    );
    assert_eq!(status, 200);
    let payloads = sse_payloads(&lines);
    let text: String = payloads[..payloads.len() - 1]
        .iter()
        .filter_map(|p| {
            let c: Value = serde_json::from_str(p).unwrap();
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    check_book(&text);

    // Ollama: a schema, and "json".
    let (status, v) = s.post(
        "/api/chat",
        &json!({"messages": messages, "format": book, "stream": false, "options": {"temperature": 0, "num_predict": 200}}),
    );
    assert_eq!(status, 200, "{v}");
    check_book(v["message"]["content"].as_str().unwrap());
    let (status, v) = s.post(
        "/api/generate",
        &json!({"prompt": "List three colours.", "format": "json", "stream": false, "options": {"temperature": 0, "num_predict": 100}}),
    );
    assert_eq!(status, 200, "{v}");
    let any: Value = serde_json::from_str(v["response"].as_str().unwrap()).unwrap();
    assert!(any.is_object(), "{any}");
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 100}),
    );
    assert_eq!(status, 200, "{v}");
    let any: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(any.is_object(), "{any}");

    // Refused, with the reason.
    for (format, needle) in [
        (json!({"type": "xml"}), "'xml' is not supported"),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            "json_schema.schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}),
            "response format cannot be used",
        ),
    ] {
        let (status, v) = s.post(
            "/v1/chat/completions",
            &json!({"messages": messages, "response_format": format, "max_tokens": 5}),
        );
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains(needle), "{v}");
    }
    let (status, v) = s.post(
        "/api/chat",
        &json!({"messages": messages, "format": 7, "stream": false}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("format 7 is not supported"), "{v}");
}

/// `tool_choice: "required"` makes the real 0.5B call a tool even on a greeting, a named function
/// is the one called even when another fits the question better, `parallel_tool_calls: false`
/// allows one call, and a name that is not among the tools is a 400.
#[test]
fn real_model_tool_choice() {
    let s = Server::start(&common::real_model("0.5b"), &["-c", "2048"]);
    let mut tools = weather_tools();
    tools.as_array_mut().unwrap().push(json!({
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    }));
    let ask = |content: &str, choice: Value, parallel: bool| {
        s.post(
            "/v1/chat/completions",
            &json!({
                "messages": [{"role": "user", "content": content}],
                "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel,
                "temperature": 0, "max_tokens": 120
            }),
        )
    };
    let (status, v) = ask("Hello there!", json!("required"), true);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty(), "{v}");
    for c in calls {
        let name = c["function"]["name"].as_str().unwrap();
        assert!(["get_weather", "get_time"].contains(&name), "{v}");
        let _: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
    }
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let (status, v) = ask("What's the weather like in Paris right now?", named, false);
    assert_eq!(status, 200, "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["function"]["name"], "get_time", "{v}");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["zone"].is_string(), "{args}");
    // auto: a greeting stays prose; a call, once begun, follows the tool's schema (an enum
    // the question does not offer, a required field).
    let (status, v) = ask("Hello there!", json!("auto"), true);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{v}"
    );
    let strict_tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": false,
            },
        },
    }]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "What's the weather in Paris, in kelvin?"}],
            "tools": strict_tools, "tool_choice": "auto", "temperature": 0, "max_tokens": 120
        }),
    );
    assert_eq!(status, 200, "{v}");
    for c in v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
    {
        assert_eq!(c["function"]["name"], "get_weather", "{v}");
        let args: Value =
            serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args["city"].is_string(), "{v}");
        assert!(
            ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
            "{v}"
        );
    }
    // Nested models as pydantic writes them: "$defs" and "$ref"s into them.
    let nested = json!([{
        "type": "function",
        "function": {
            "name": "add_contact",
            "parameters": {
                "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                "type": "object",
                "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/Address"}},
                "required": ["name", "address"],
            },
        },
    }]);
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "Add Ana, who lives in Porto."}],
            "tools": nested, "tool_choice": {"type": "function", "function": {"name": "add_contact"}},
            "temperature": 0, "max_tokens": 80
        }),
    );
    assert_eq!(status, 200, "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["address"]["city"].is_string(), "{v}");
    for (choice, needle) in [
        (
            json!({"type": "function", "function": {"name": "nope"}}),
            "'nope'",
        ),
        (json!("always"), "not supported"),
    ] {
        let (status, v) = ask("Hi", choice, true);
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains(needle), "{v}");
    }
}

/// Checks one token's logprobs as OpenAI's chat and Ollama write them: <= 0, alternatives sorted
/// and as many as asked, and under greedy decoding the token is the most likely alternative with
/// the same logprob.
fn check_logprob_entry(e: &Value, top: usize, greedy: bool) {
    let lp = e["logprob"].as_f64().unwrap();
    assert!(lp <= 0.0, "{e}");
    let token = e["token"].as_str().unwrap();
    let bytes: Vec<u8> = e["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(String::from_utf8_lossy(&bytes), token, "{e}");
    let alts = e["top_logprobs"].as_array().unwrap();
    assert_eq!(alts.len(), top, "{e}");
    let lps: Vec<f64> = alts
        .iter()
        .map(|a| a["logprob"].as_f64().unwrap())
        .collect();
    assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{e}");
    assert!(lps.iter().all(|&l| l <= 0.0), "{e}");
    for a in alts {
        if a["bytes"] == e["bytes"] {
            assert!((a["logprob"].as_f64().unwrap() - lp).abs() < 1e-6, "{e}");
        }
    }
    if greedy && top > 0 {
        assert_eq!(alts[0]["bytes"], e["bytes"], "{e}");
        assert!((lps[0] - lp).abs() < 1e-6, "{e}");
    }
}

/// Two logprob lists agree: the same tokens and alternatives, logprobs within float noise (a
/// repeated prompt runs from the prefix cache, through differently batched kernels).
fn assert_same_logprobs(a: &[Value], b: &[Value]) {
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["bytes"], y["bytes"], "{x}\n{y}");
        assert!((x["logprob"].as_f64().unwrap() - y["logprob"].as_f64().unwrap()).abs() < 1e-3);
        let (xs, ys) = (
            x["top_logprobs"].as_array().unwrap(),
            y["top_logprobs"].as_array().unwrap(),
        );
        assert_eq!(xs.len(), ys.len(), "{x}\n{y}");
        for (p, q) in xs.iter().zip(ys) {
            assert!((p["logprob"].as_f64().unwrap() - q["logprob"].as_f64().unwrap()).abs() < 1e-3);
        }
    }
}

/// logprobs on all four generation endpoints, streaming and not, in each API's shape; the
/// streamed logprobs are the non-streamed ones; bad values are 400s.
#[test]
fn logprobs_on_every_endpoint() {
    let s = tiny_server();
    let msgs = json!([{"role": "user", "content": "hello"}]);
    let body = json!({"messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (st, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        "{v}"
    );
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|e| {
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    for e in &content {
        check_logprob_entry(e, 3, true);
    }
    // Streaming: each chunk carries its tokens' logprobs; together they are the same.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (st, _, lines) = s.post_stream("/v1/chat/completions", &sbody);
    assert_eq!(st, 200);
    let mut streamed = Vec::new();
    for p in sse_payloads(&lines) {
        if p == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(&p).unwrap();
        if let Some(a) = c["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(a.iter().cloned());
        }
    }
    assert_same_logprobs(&streamed, &content);
    // Without logprobs: null.
    let (_, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 2}),
    );
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");

    // Completions: the legacy shape.
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 4, "{v}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(
        lp["text_offset"][0],
        json!(5),
        "offsets count from the prompt's start: {v}"
    );
    for (t, alts) in tokens.iter().zip(lp["top_logprobs"].as_array().unwrap()) {
        let alts = alts.as_object().unwrap();
        assert!(
            alts.len() <= 2 && alts.contains_key(t.as_str().unwrap()),
            "{v}"
        );
    }

    // Ollama: a `logprobs` list on each streamed line and on the whole answer.
    let obody = json!({"messages": msgs, "stream": false, "logprobs": true, "top_logprobs": 2, "options": {"temperature": 0, "num_predict": 5}});
    let (st, v) = s.post("/api/chat", &obody);
    assert_eq!(st, 200, "{v}");
    let whole = v["logprobs"].as_array().unwrap().clone();
    assert_eq!(
        whole.len(),
        v["eval_count"].as_u64().unwrap() as usize,
        "{v}"
    );
    for e in &whole {
        check_logprob_entry(e, 2, true);
    }
    let mut obody = obody;
    obody["stream"] = json!(true);
    let (_, _, lines) = s.post_stream("/api/chat", &obody);
    let streamed: Vec<Value> = lines
        .iter()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["logprobs"].as_array().cloned().unwrap_or_default()
        })
        .collect();
    assert_same_logprobs(&streamed, &whole);
    let (st, v) = s.post(
        "/api/generate",
        &json!({"prompt": "hello", "stream": false, "logprobs": true, "options": {"temperature": 0, "num_predict": 3}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 3, "{v}");

    for (path, bad, what) in [
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "top_logprobs": 2}),
            "logprobs: true",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": "yes"}),
            "true or false",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "logprobs": true}),
            "number of alternatives",
        ),
        (
            "/api/chat",
            json!({"messages": msgs, "top_logprobs": -1}),
            "top_logprobs",
        ),
    ] {
        let (st, v) = s.post(path, &bad);
        assert_eq!(st, 400, "{bad}: {v}");
        assert!(v.to_string().contains(what), "{bad}: {v}");
    }
}

/// Sampled at temperature 1 with nothing cut, each token's logprob is the one its distribution
/// reports for it.
#[test]
fn sampled_logprobs_match_the_distribution() {
    let s = tiny_server();
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 1,
                "top_p": 1, "top_k": 0, "min_p": 0, "seed": 5, "logprobs": true, "top_logprobs": 20}),
    );
    assert_eq!(st, 200, "{v}");
    for e in v["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        check_logprob_entry(e, 20, false);
    }
}

/// presence/frequency penalties and logit_bias reach the sampler (OpenAI and Ollama), and bad
/// values are 400s that say what is allowed.
#[test]
fn penalties_and_logit_bias() {
    let s = tiny_server();
    let msgs = json!([{"role": "user", "content": "hello"}]);
    // Byte tokens come first in the tiny vocabulary: 65 is "A".
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 4, "temperature": 0, "logit_bias": {"65": 100}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "AAAA", "{v}");
    // A frequency penalty makes the biased token pay for each repeat, so it stops winning.
    let (_, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 40, "temperature": 0, "logit_bias": {"65": 30}, "frequency_penalty": 2}),
    );
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with('A') && text != "A".repeat(40), "{v}");
    let (st, v) = s.post(
        "/api/chat",
        &json!({"messages": msgs, "stream": false, "options": {"temperature": 0, "num_predict": 4, "presence_penalty": 1.5, "frequency_penalty": 0.5}}),
    );
    assert_eq!(st, 200, "{v}");
    for (bad, what) in [
        (json!({"presence_penalty": 3}), "between -2 and 2"),
        (json!({"logit_bias": {"999999": 1}}), "not a token id"),
        (json!({"logit_bias": {"5": 101}}), "between -100 and 100"),
        (json!({"logit_bias": [1]}), "must be an object"),
        (json!({"n": 2}), "n = 1"),
    ] {
        let mut body = bad.clone();
        body["messages"] = msgs.clone();
        let (st, v) = s.post("/v1/chat/completions", &body);
        assert_eq!(st, 400, "{bad}: {v}");
        assert!(v.to_string().contains(what), "{bad}: {v}");
    }
}

/// Every request field is read, accepted as documented, or refused by name.
#[test]
fn request_fields_are_read_accepted_or_refused() {
    let s = tiny_server();
    let msgs = json!([{"role": "user", "content": "hello"}]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": msgs, "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s.post("/v1/chat/completions", &body)
    };
    // Harmless bookkeeping and llama-server's "off" values are accepted.
    let (st, v) = chat(
        json!({"user": "u", "metadata": {"a": "b"}, "store": false, "service_tier": "auto",
        "prompt_cache_key": "k", "modalities": ["text"], "cache_prompt": true, "typical_p": 1, "mirostat": 0}),
    );
    assert_eq!(st, 200, "{v}");
    for (extra, what) in [
        (json!({"frobnicate": true}), "unknown field 'frobnicate'"),
        (json!({"mirostat": 2}), "'mirostat'"),
        (json!({"modalities": ["text", "audio"]}), "'modalities'"),
        (json!({"functions": [{"name": "f"}]}), "'tools'"),
        (json!({"echo": true}), "'echo'"),
    ] {
        let (st, v) = chat(extra.clone());
        assert_eq!(st, 400, "{extra}: {v}");
        assert!(v.to_string().contains(what), "{extra}: {v}");
    }
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 1, "best_of": 3}),
    );
    assert_eq!(st, 400, "{v}");
    // Ollama: load-time options are accepted per request; unknown options and fields are not.
    let (st, v) = s.post(
        "/api/chat",
        &json!({"messages": msgs, "stream": false, "options": {"num_predict": 1, "num_thread": 4, "num_gpu": 99, "use_mmap": true}}),
    );
    assert_eq!(st, 200, "{v}");
    for (body, what) in [
        (
            json!({"messages": msgs, "options": {"bogus": 1}}),
            "options has an unknown field 'bogus'",
        ),
        (json!({"messages": msgs, "think": true}), "'think'"),
        (json!({"messages": msgs, "whatever": 1}), "'whatever'"),
    ] {
        let (st, v) = s.post("/api/chat", &body);
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v.to_string().contains(what), "{body}: {v}");
    }
    let (st, v) = s.post(
        "/api/generate",
        &json!({"prompt": "hi", "template": "{{ .Prompt }}"}),
    );
    assert_eq!(st, 400, "{v}");
    // A model without fill-in-the-middle tokens says so.
    let (st, v) = s.post("/v1/completions", &json!({"prompt": "a", "suffix": "b"}));
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("fim_prefix"), "{v}");
}

/// `suffix` fills in the middle with Qwen2.5-Coder's FIM tokens, on OpenAI's completions and
/// Ollama's generate.
#[test]
fn real_model_fill_in_the_middle() {
    let s = Server::start(&common::real_model("0.5b"), &["-c", "1024"]);
    let prefix = "def add(a, b):\n    ";
    let suffix = "\n\nprint(add(1, 2))\n";
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": prefix, "suffix": suffix, "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    let middle = v["choices"][0]["text"].as_str().unwrap();
    assert!(middle.contains("return a + b"), "{v}");
    assert!(!middle.contains("<|"), "{v}");
    let (st, v) = s.post(
        "/api/generate",
        &json!({"prompt": prefix, "suffix": suffix, "stream": false, "options": {"temperature": 0, "num_predict": 16}}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        v["response"].as_str().unwrap().contains("return a + b"),
        "{v}"
    );
    // llama-server's /infill, with another file for context.
    let (st, v) = s.post(
        "/infill",
        &json!({"input_prefix": prefix, "input_suffix": suffix, "n_predict": 16, "temperature": 0,
                "input_extra": [{"filename": "util.py", "text": "# helpers\n"}]}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        v["content"].as_str().unwrap().contains("return a + b"),
        "{v}"
    );
    // A GBNF grammar, on llama-server's /completion and on the OpenAI endpoint (its extension).
    let yes_no = "root ::= \"yes\" | \"no\"";
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": "Is the sky blue? Answer: ", "grammar": yes_no, "n_predict": 8}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        ["yes", "no"].contains(&v["content"].as_str().unwrap()),
        "{v}"
    );
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Is the sky blue?"}], "grammar": yes_no, "max_tokens": 8}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        ["yes", "no"].contains(&v["choices"][0]["message"]["content"].as_str().unwrap()),
        "{v}"
    );
}

/// llama-server's /completion: text or token-id prompts, its response and streaming shapes,
/// n_probs, and 400s that name the field.
#[test]
fn llama_server_completion() {
    let s = tiny_server();
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": "hello", "n_predict": 4, "temperature": 0, "n_probs": 2, "cache_prompt": true, "samplers": "edkypmxt"}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tokens_predicted"], 4, "{v}");
    assert_eq!(v["stop"], true);
    assert_eq!(v["stop_type"], "limit");
    assert!(
        v["timings"]["predicted_per_second"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    let probs = v["completion_probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), 4, "{v}");
    for p in probs {
        check_logprob_entry(p, 2, true);
    }
    let text = v["content"].as_str().unwrap().to_string();
    let streamed = |prompt: Value| {
        let (st, ct, lines) = s.post_stream(
            "/completion",
            &json!({"prompt": prompt, "n_predict": 4, "temperature": 0, "stream": true}),
        );
        assert_eq!(st, 200);
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let chunks: Vec<Value> = sse_payloads(&lines)
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let last = chunks.last().unwrap();
        assert_eq!(last["stop"], true, "{last}");
        chunks
            .iter()
            .map(|c| c["content"].as_str().unwrap())
            .collect::<String>()
    };
    assert_eq!(streamed(json!("hello")), text);
    // A prompt of token ids (the tiny vocabulary is bytes first), streamed and not.
    let ids: Vec<u32> = "hello".bytes().map(u32::from).collect();
    let (st, v) = s.post(
        "/completion",
        &json!({"prompt": ids, "n_predict": 4, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tokens_evaluated"], 5, "{v}");
    assert_eq!(streamed(json!(ids)), v["content"].as_str().unwrap());
    for (body, what) in [
        (
            json!({"prompt": [1, 99999999]}),
            "not in this model's vocabulary",
        ),
        (
            json!({"prompt": "x", "grammar": "root ::= (", "n_predict": 2}),
            "GBNF",
        ),
        (
            json!({"prompt": "x", "grammar": "root ::= \"a\"", "json_schema": {}}),
            "cannot be combined",
        ),
        (json!({"prompt": "x", "n_probs": 50}), "n_probs"),
        (
            json!({"prompt": "x", "post_sampling_probs": true}),
            "'post_sampling_probs'",
        ),
        (json!({"prompt": "x", "mystery": 1}), "'mystery'"),
    ] {
        let (st, v) = s.post("/completion", &body);
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v.to_string().contains(what), "{body}: {v}");
    }
}

/// llama-server's `POST /slots/{id}?action=save|erase|restore` on the real 0.5B model, with no
/// other cache (`--cache-ram 0`): an erased slot no longer serves its prompt, a restored one
/// does; bad filenames, actions, slots and files are refused.
#[test]
fn slots_save_erase_restore() {
    let dir = tempfile::tempdir().unwrap();
    let slot_dir = dir.path().join("slots");
    let s = Server::start(
        &common::real_model("0.5b"),
        &[
            "-c",
            "1024",
            "--parallel",
            "1",
            "--cache-ram",
            "0",
            "--slot-save-path",
            slot_dir.to_str().unwrap(),
        ],
    );
    let prompt = "// A ring buffer of fixed capacity in Rust, with push, pop, len and an iterator over the items from the oldest to the newest.\npub struct RingBuffer<T> {";
    let complete = || {
        let (st, v) = s.post(
            "/completion",
            &json!({"prompt": prompt, "n_predict": 8, "temperature": 0}),
        );
        assert_eq!(st, 200, "{v}");
        v
    };
    let cached = |v: &Value| v["tokens_cached"].as_u64().unwrap();
    let first = complete();
    let n_prompt = first["tokens_evaluated"].as_u64().unwrap();
    let slot_cached = || {
        let (_, body) = s.get("/slots");
        let v: Value = serde_json::from_str(&body).unwrap();
        v[0]["n_cached"].as_u64().unwrap()
    };
    // The board is published after the step that answered, which may come a moment after the
    // answer on a loaded machine (see llama_server_tokenize_template_props_slots).
    wait_until("the slot shows idle", || {
        let (_, body) = s.get("/slots");
        !body.contains("\"is_processing\":true")
    });
    let held = slot_cached();
    assert!(held >= n_prompt, "{held} {n_prompt}");

    let (st, v) = s.post("/slots/0?action=save", &json!({"filename": "ring.bin"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id_slot"], 0);
    assert_eq!(v["filename"], "ring.bin");
    assert_eq!(v["n_saved"], held, "{v}");
    let file = slot_dir.join("ring.bin");
    assert_eq!(
        v["n_written"].as_u64().unwrap(),
        std::fs::metadata(&file).unwrap().len()
    );
    assert!(v["timings"]["save_ms"].as_f64().is_some(), "{v}");

    // Erased, the slot holds nothing and the prompt runs whole.
    let (st, v) = s.post("/slots/0?action=erase", &json!({}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["n_erased"], held, "{v}");
    assert_eq!(slot_cached(), 0);
    assert_eq!(cached(&complete()), 0);

    // Restored, it serves the prompt again, with the same answer.
    s.post("/slots/0?action=erase", &json!({}));
    let (st, v) = s.post("/slots/0?action=restore", &json!({"filename": "ring.bin"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["n_restored"], held, "{v}");
    assert!(v["timings"]["restore_ms"].as_f64().is_some(), "{v}");
    assert_eq!(slot_cached(), held);
    let again = complete();
    assert_eq!(cached(&again), n_prompt - 1, "{again}");
    assert_eq!(again["content"], first["content"]);

    // Refused: each a 4xx naming why.
    let refused = |path: &str, body: Value, status: u16, needle: &str| {
        let (st, v) = s.post(path, &body);
        assert_eq!(st, status, "{path} {body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{path} {body}: {msg}");
    };
    for bad in [
        "../ring.bin",
        "a/b.bin",
        "..",
        ".hidden",
        "",
        "a\\b",
        "x\u{0}y",
    ] {
        for action in ["save", "restore"] {
            refused(
                &format!("/slots/0?action={action}"),
                json!({"filename": bad}),
                400,
                "invalid slot filename",
            );
        }
    }
    refused("/slots/0?action=save", json!({}), 400, "'filename'");
    refused(
        "/slots/0?action=save",
        json!({"filename": "a", "path": "/"}),
        400,
        "'path'",
    );
    refused(
        "/slots/0?action=load",
        json!({}),
        400,
        "save, restore or erase",
    );
    refused("/slots/0", json!({}), 400, "save, restore or erase");
    refused("/slots/7?action=erase", json!({}), 400, "no slot 7");
    refused("/slots/x?action=erase", json!({}), 400, "number");
    refused(
        "/slots/0?action=erase",
        json!({"filename": "ring.bin"}),
        400,
        "no 'filename'",
    );
    refused(
        "/slots/0?action=restore",
        json!({"filename": "none.bin"}),
        404,
        "none.bin",
    );
    std::fs::write(
        slot_dir.join("junk.bin"),
        b"not a KV file at all, just text",
    )
    .unwrap();
    refused(
        "/slots/0?action=restore",
        json!({"filename": "junk.bin"}),
        400,
        "bad magic",
    );
    let mut cut = std::fs::read(&file).unwrap();
    cut.truncate(cut.len() - 100);
    std::fs::write(slot_dir.join("cut.bin"), cut).unwrap();
    refused(
        "/slots/0?action=restore",
        json!({"filename": "cut.bin"}),
        400,
        "truncated",
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&file, slot_dir.join("link.bin")).unwrap();
        refused(
            "/slots/0?action=restore",
            json!({"filename": "link.bin"}),
            400,
            "symbolic link",
        );
        std::fs::create_dir(slot_dir.join("sub.bin")).unwrap();
        refused(
            "/slots/0?action=restore",
            json!({"filename": "sub.bin"}),
            400,
            "not a regular file",
        );
    }
    // A refused restore left the slot as it was.
    assert_eq!(slot_cached(), held);
}

/// llama-server's tools around generation, on the real 0.5B model: /tokenize and /detokenize
/// (round trip of non-ASCII text, pieces, special tokens), /apply-template (the prompt the chat
/// endpoint runs), /props, /slots, /health and its `llamacpp:*` metrics.
#[test]
fn llama_server_tokenize_template_props_slots() {
    let s = Server::start(
        &common::real_model("0.5b"),
        &["-c", "1024", "--parallel", "2"],
    );
    let text = "Grüße, 世界! 🦀 naïve café <|im_start|>";
    let (st, v) = s.post("/tokenize", &json!({"content": text}));
    assert_eq!(st, 200, "{v}");
    let ids: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(*ids.last().unwrap(), 151644, "a control token is read: {v}");
    let (st, v) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["content"], text);
    // With pieces: the same ids, and their bytes (a string, or the byte list where a character
    // is cut between tokens) add up to the text.
    let (st, v) = s.post("/tokenize", &json!({"content": text, "with_pieces": true}));
    assert_eq!(st, 200, "{v}");
    let mut bytes = Vec::new();
    let mut cut = false;
    for (t, id) in v["tokens"].as_array().unwrap().iter().zip(&ids) {
        assert_eq!(t["id"].as_u64(), Some(*id), "{v}");
        match &t["piece"] {
            Value::String(p) => bytes.extend_from_slice(p.as_bytes()),
            Value::Array(b) => {
                cut = true;
                bytes.extend(b.iter().map(|x| x.as_u64().unwrap() as u8));
            }
            other => panic!("piece {other}"),
        }
    }
    assert_eq!(String::from_utf8(bytes).unwrap(), text);
    assert!(cut, "the crab's bytes are split between tokens: {v}");
    // parse_special false: the control token's name is plain text; add_special adds no BOS to
    // Qwen (its GGUF does not ask for one).
    let (st, v) = s.post(
        "/tokenize",
        &json!({"content": "<|im_start|>", "parse_special": false, "add_special": true}),
    );
    assert_eq!(st, 200, "{v}");
    let plain = v["tokens"].as_array().unwrap();
    assert!(plain.len() > 1 && !plain.contains(&json!(151644)), "{v}");
    let (_, v) = s.post("/detokenize", &json!({"tokens": plain}));
    assert_eq!(v["content"], "<|im_start|>");
    for (path, body, needles) in [
        (
            "/detokenize",
            json!({"tokens": [1, 151936]}),
            vec!["151936", "151936 tokens"],
        ),
        ("/detokenize", json!({"tokens": [-1]}), vec!["-1"]),
        (
            "/tokenize",
            json!({"content": "x", "mystery": 1}),
            vec!["'mystery'"],
        ),
        ("/tokenize", json!({}), vec!["content"]),
    ] {
        let (st, v) = s.post(path, &body);
        assert_eq!(st, 400, "{body}: {v}");
        for n in needles {
            assert!(
                v["error"]["message"].as_str().unwrap().contains(n),
                "{n}: {v}"
            );
        }
    }

    // /apply-template: the prompt /v1/chat/completions runs, tools included.
    let chat = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie spät ist es?"}],
        "tools": weather_tools(),
        "max_tokens": 1,
        "temperature": 0,
    });
    let (st, v) = s.post("/apply-template", &chat);
    assert_eq!(st, 200, "{v}");
    let prompt = v["prompt"].as_str().unwrap().to_string();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    assert!(
        prompt.contains("Wie spät ist es?") && prompt.contains("get_weather"),
        "{prompt}"
    );
    let (_, v) = s.post("/tokenize", &json!({"content": prompt}));
    let n_prompt = v["tokens"].as_array().unwrap().len();
    let (st, v) = s.post("/v1/chat/completions", &chat);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], n_prompt, "{v}");
    let (st, v) = s.post("/apply-template", &json!({"messages": []}));
    assert_eq!(st, 400, "{v}");

    // /props, in llama-server's shape.
    let (st, body) = s.get("/props");
    assert_eq!(st, 200, "{body}");
    let p: Value = serde_json::from_str(&body).unwrap();
    let d = &p["default_generation_settings"];
    assert_eq!(d["n_ctx"], 1024, "{p}");
    assert_eq!(d["params"]["top_k"], 40, "{p}");
    assert!((d["params"]["temperature"].as_f64().unwrap() - 0.8).abs() < 1e-6);
    assert_eq!(p["total_slots"], 2, "{p}");
    assert!(p["model_path"].as_str().unwrap().ends_with(".gguf"), "{p}");
    assert!(p["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(p["eos_token"], "<|im_end|>", "{p}");
    assert_eq!(p["bos_token"], "<|endoftext|>", "{p}");
    assert_eq!(p["modalities"]["vision"], false, "{p}");
    assert!(p["build_info"].as_str().unwrap().starts_with("qwen-run"));
    let (st, v) = s.post("/props", &json!({}));
    assert_eq!(st, 501, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("--props"),
        "{v}"
    );

    // /slots: one per --parallel, idle now; saving a slot is refused by name. The board is
    // published after the step that answered the chat, which may come a moment after the answer
    // on a loaded machine.
    wait_until("the slots show idle", || {
        let (_, body) = s.get("/slots");
        !body.contains("\"is_processing\":true")
    });
    let (st, body) = s.get("/slots");
    assert_eq!(st, 200, "{body}");
    let slots: Value = serde_json::from_str(&body).unwrap();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 2, "{body}");
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(slot["id"], i);
        assert_eq!(slot["n_ctx"], 1024);
        assert_eq!(slot["is_processing"], false);
    }
    assert!(
        slots
            .iter()
            .any(|s| s["n_cached"].as_u64().unwrap() >= n_prompt as u64),
        "the chat's prompt stays in a slot's cache: {body}"
    );
    let (st, _) = s.get("/slots?fail_on_no_slot=1");
    assert_eq!(st, 200);
    // While a request generates, its slot says so.
    let busy = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            s.post(
                "/completion",
                &json!({"prompt": "def fib(n):", "n_predict": 48, "temperature": 0}),
            )
        });
        let mut busy = None;
        while busy.is_none() && !client.is_finished() {
            let (_, body) = s.get("/slots");
            let slots: Value = serde_json::from_str(&body).unwrap();
            busy = slots
                .as_array()
                .unwrap()
                .iter()
                .find(|s| {
                    s["is_processing"] == true && s["next_token"]["n_decoded"].as_u64() > Some(0)
                })
                .cloned();
        }
        let (st, v) = client.join().unwrap();
        assert_eq!(st, 200, "{v}");
        busy
    });
    let busy = busy.expect("a busy slot while the request generated");
    assert_eq!(busy["n_prompt_tokens"], 4, "{busy}");
    assert!(
        busy["next_token"]["n_remain"].as_u64().unwrap() > 0,
        "{busy}"
    );
    let (st, body) = s.get("/slots?action=save");
    assert_eq!(st, 400, "{body}");
    // Saving needs a directory for the files.
    let (st, v) = s.post("/slots/0?action=save", &json!({"filename": "a.bin"}));
    assert_eq!(st, 501, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--slot-save-path"));

    let (st, body) = s.get("/health");
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let (_, m) = s.get("/metrics");
    for name in [
        "llamacpp:prompt_tokens_total",
        "llamacpp:prompt_seconds_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:tokens_predicted_seconds_total",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "llamacpp:n_decode_total",
        "llamacpp:n_busy_slots_per_decode",
        "llamacpp:n_tokens_max",
    ] {
        assert!(
            m.contains(&format!("# TYPE {name} ")),
            "{name} not in:\n{m}"
        );
    }
    // Prompt tokens run: those the prompt cache (memory or disk) did not hold.
    assert_eq!(
        s.metric("qwen_run_prompt_tokens_total"),
        n_prompt as f64 + 4.0
    );
    let run = s.metric("llamacpp:prompt_tokens_total");
    assert_eq!(
        run,
        n_prompt as f64 + 4.0 - s.metric("qwen_run_prompt_tokens_reused_total")
    );
    assert!(run >= 2.0);
    assert_eq!(
        s.metric("llamacpp:tokens_predicted_total"),
        s.metric("qwen_run_generated_tokens_total")
    );
    assert!(s.metric("llamacpp:n_decode_total") >= 1.0);
    assert_eq!(s.metric("llamacpp:requests_processing"), 0.0);
    assert!(m.contains("qwen_run_requests_total{endpoint=\"/tokenize\",status=\"200\"}"));
}

/// /health answers llama-server's 503 while no model is loaded and one is loading (here: the
/// switch to another model under --max-loaded 1), and 200 again once it is loaded.
#[test]
fn health_is_503_while_no_model_is_loaded_and_one_loads() {
    let real = common::real_model("0.5b");
    let s = Server::start(
        tiny_model(),
        &["-t", "1", "-m", real.to_str().unwrap(), "--max-loaded", "1"],
    );
    let name = real.file_stem().unwrap().to_str().unwrap().to_string();
    let s = std::sync::Arc::new(s);
    let client = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.post(
                "/completion",
                &json!({"model": name, "prompt": "hi", "n_predict": 1}),
            )
        })
    };
    let mut seen = None;
    while !client.is_finished() {
        let (st, body) = s.get("/health");
        if st == 503 {
            seen = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (st, v) = client.join().unwrap();
    assert_eq!(st, 200, "{v}");
    let body: Value = serde_json::from_str(&seen.expect("a 503 during the load")).unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    );
    let (st, body) = s.get("/health");
    assert_eq!(st, 200, "{body}");
}
