//! What the network cannot do to `qwen-run serve`: drive it from a web page or without the key,
//! crash it with out-of-range fields, or outgrow its limits. The real binary over real HTTP
//! with a tiny random model.

mod common;

use common::server::Server;
use common::shared_tiny_model as tiny_model;
use qwen_run_kernels::QuantType;
use serde_json::{json, Value};

fn chat() -> Value {
    json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0})
}

/// Sends `method path` with `headers` and an optional body; the status, headers and body.
fn send(
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = s.http.request(method.parse().unwrap(), s.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r.body(b.to_string());
    }
    let resp = r.send().unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.text().unwrap())
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[test]
fn a_web_page_cannot_drive_the_server() {
    let s = Server::start(tiny_model(), &["-t", "1"]);
    let body = chat().to_string();
    // The issue's case: a cross-site text/plain POST (no preflight in a browser) was answered 200.
    let (status, _, text) = send(
        &s,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "text/plain"),
            ("origin", "http://evil.test"),
        ],
        Some(&body),
    );
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("http://evil.test") && text.contains("--cors-origin"),
        "{text}"
    );
    // Every endpoint, JSON or not, GET or POST.
    for (method, path) in [
        ("GET", "/v1/models"),
        ("POST", "/api/generate"),
        ("GET", "/api/ps"),
        ("POST", "/completion"),
    ] {
        let (status, _, text) = send(
            &s,
            method,
            path,
            &[JSON, ("origin", "http://evil.test")],
            Some("{}"),
        );
        assert_eq!(status, 403, "{method} {path}: {text}");
    }
    // A preflight from a page of another origin is refused, so the browser sends nothing.
    let (status, h, _) = send(
        &s,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("origin", "http://evil.test"),
            ("access-control-request-method", "POST"),
        ],
        None,
    );
    assert_eq!(status, 403);
    assert!(h.get("access-control-allow-origin").is_none());
    // DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends its Host.
    let (status, _, text) = send(
        &s,
        "POST",
        "/v1/chat/completions",
        &[JSON, ("host", "evil.test:8080")],
        Some(&body),
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("evil.test"), "{text}");
    // A browser request with a body that is not JSON: 415, even without an Origin.
    let (status, _, text) = send(
        &s,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "text/plain"),
            ("sec-fetch-site", "cross-site"),
        ],
        Some(&body),
    );
    assert_eq!(status, 415, "{text}");
    // Clients that are not browsers are unaffected, curl's `-d` (a form type) included.
    for ct in ["application/json", "application/x-www-form-urlencoded"] {
        let (status, _, text) = send(
            &s,
            "POST",
            "/v1/chat/completions",
            &[("content-type", ct)],
            Some(&body),
        );
        assert_eq!(status, 200, "{ct}: {text}");
    }
    let (status, _, text) = send(
        &s,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "text/plain")],
        Some(&body),
    );
    assert_eq!(status, 415, "{text}");
    assert!(text.contains("application/json"), "{text}");
    assert!(
        !s.startup.contains("warning"),
        "no warning on loopback: {}",
        s.startup
    );
}

/// The chat page at `/`: served to a browser with its types and a strict CSP (the one-line
/// answer to anything else), its files open without the key, and its own requests (of the
/// server's origin) taken while other pages stay refused.
#[test]
fn the_chat_page_is_served_and_may_call_its_server() {
    let s = Server::start(tiny_model(), &["-t", "1", "--api-key", "k"]);
    let (status, h, text) = send(&s, "GET", "/", &[], None);
    assert_eq!((status, text.as_str()), (200, "qwen-run is running"));
    assert!(h.get("content-security-policy").is_none());
    let html = ("accept", "text/html,application/xhtml+xml,*/*;q=0.8");
    for (path, accept, kind) in [
        ("/", html, "text/html"),
        ("/ui/app.js", ("accept", "*/*"), "text/javascript"),
        ("/ui/style.css", ("accept", "text/css"), "text/css"),
        ("/ui/icon.svg", ("accept", "*/*"), "image/svg+xml"),
    ] {
        let (status, h, text) = send(&s, "GET", path, &[accept], None);
        assert_eq!(status, 200, "{path}: {text}");
        let ct = h["content-type"].to_str().unwrap();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff");
    }
    let page = s.base.clone();
    let host = page.strip_prefix("http://").unwrap();
    let body = chat().to_string();
    let own = [JSON, ("origin", page.as_str()), ("host", host)];
    let (status, _, text) = send(&s, "POST", "/v1/chat/completions", &own, Some(&body));
    assert_eq!(status, 401, "the page needs the key too: {text}");
    let keyed = [
        JSON,
        ("origin", page.as_str()),
        ("host", host),
        ("authorization", "Bearer k"),
    ];
    let (status, _, text) = send(&s, "POST", "/v1/chat/completions", &keyed, Some(&body));
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["timings"]["predicted_n"].is_u64(), "{v}");
    // Another page (another port of this machine is another origin) is still refused.
    let other = [
        JSON,
        ("origin", "http://127.0.0.1:1"),
        ("host", host),
        ("authorization", "Bearer k"),
    ];
    let (status, _, text) = send(&s, "POST", "/v1/chat/completions", &other, Some(&body));
    assert_eq!(status, 403, "{text}");
}

#[test]
fn allowed_origins_get_cors_headers() {
    let s = Server::start_with_env(
        tiny_model(),
        &["-t", "1", "--cors-origin", "http://localhost:3000"],
        &[("OLLAMA_ORIGINS", "chrome-extension://*, http://app.test")],
    );
    let body = chat().to_string();
    for origin in [
        "http://localhost:3000",
        "chrome-extension://abcdef",
        "http://app.test",
    ] {
        let (status, h, _) = send(
            &s,
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "content-type, authorization",
                ),
            ],
            None,
        );
        assert_eq!(status, 204, "{origin}");
        assert_eq!(h["access-control-allow-origin"], origin);
        assert!(h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST"));
        assert_eq!(
            h["access-control-allow-headers"],
            "content-type, authorization"
        );
        let (status, h, text) = send(
            &s,
            "POST",
            "/v1/chat/completions",
            &[JSON, ("origin", origin)],
            Some(&body),
        );
        assert_eq!(status, 200, "{origin}: {text}");
        assert_eq!(h["access-control-allow-origin"], origin);
        assert_eq!(h["vary"], "Origin");
    }
    // Allowed pages still send JSON.
    let (status, _, _) = send(
        &s,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "text/plain"),
            ("origin", "http://localhost:3000"),
        ],
        Some(&body),
    );
    assert_eq!(status, 415);
    for other in ["http://localhost:3001", "http://app.test.evil"] {
        let (status, _, _) = send(&s, "GET", "/v1/models", &[("origin", other)], None);
        assert_eq!(status, 403, "{other}");
    }
    let any = Server::start(tiny_model(), &["-t", "1", "--cors-origin", "*"]);
    let (status, h, _) = send(
        &any,
        "GET",
        "/v1/models",
        &[("origin", "http://x.test")],
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(h["access-control-allow-origin"], "*");
}

#[test]
fn api_keys_guard_every_endpoint_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# team keys\nfile-key\n\n").unwrap();
    let s = Server::start_with_env(
        tiny_model(),
        &[
            "-t",
            "1",
            "--api-key",
            "flag-key",
            "--api-key-file",
            file.to_str().unwrap(),
        ],
        &[("QWEN_RUN_API_KEY", "env-key")],
    );
    let body = chat().to_string();
    let ollama = json!({"messages": [{"role": "user", "content": "hi"}], "stream": false, "options": {"num_predict": 1}}).to_string();
    for (method, path, body) in [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", Some(body.as_str())),
        ("POST", "/api/chat", Some(ollama.as_str())),
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        (
            "POST",
            "/completion",
            Some(r#"{"prompt": "hi", "n_predict": 1}"#),
        ),
        ("GET", "/metrics", None),
        ("GET", "/no/such/route", None),
    ] {
        let (status, h, text) = send(&s, method, path, &[JSON], body);
        assert_eq!(status, 401, "{method} {path}: {text}");
        assert!(text.contains("needs an API key"), "{text}");
        assert_eq!(h["www-authenticate"], "Bearer");
        let v: Value = serde_json::from_str(&text).unwrap();
        if path.starts_with("/api/") {
            assert!(v["error"].is_string(), "Ollama's error form: {v}");
        } else {
            assert_eq!(v["error"]["code"], 401, "OpenAI's error object: {v}");
        }
        let (status, _, text) = send(
            &s,
            method,
            path,
            &[JSON, ("authorization", "Bearer wrong")],
            body,
        );
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("not valid"), "{text}");
        if path != "/no/such/route" {
            for key in ["Bearer flag-key", "Bearer file-key", "bearer env-key"] {
                let (status, _, text) =
                    send(&s, method, path, &[JSON, ("authorization", key)], body);
                assert_eq!(status, 200, "{method} {path} {key}: {text}");
            }
        }
    }
    let (status, _, _) = send(&s, "GET", "/v1/models", &[("x-api-key", "flag-key")], None);
    assert_eq!(status, 200);
    for open in ["/health", "/"] {
        let (status, _, _) = send(&s, "GET", open, &[], None);
        assert_eq!(status, 200, "{open}");
    }
}

#[test]
fn listening_beyond_loopback_without_a_key_warns() {
    let s = Server::start(tiny_model(), &["-t", "1", "--host", "0.0.0.0"]);
    assert!(
        s.startup.contains("warning") && s.startup.contains("--api-key"),
        "{}",
        s.startup
    );
    // Not on loopback, any Host is taken (the key is what guards it there).
    let (status, _, _) = send(
        &s,
        "GET",
        "/v1/models",
        &[("host", "server.lan:8080")],
        None,
    );
    assert_eq!(status, 200);
    // A page of the origin its Host names: the chat page when reached by IP address, but under
    // a name it may be a rebinding page (its own name resolved to this server): refused.
    let body = chat().to_string();
    for (host, expected) in [("192.168.1.5:8080", 200), ("evil.test:8080", 403)] {
        let origin = format!("http://{host}");
        let headers = [JSON, ("origin", origin.as_str()), ("host", host)];
        let (status, _, text) = send(&s, "POST", "/v1/chat/completions", &headers, Some(&body));
        assert_eq!(status, expected, "{host}: {text}");
    }
    let keyed = Server::start(
        tiny_model(),
        &["-t", "1", "--host", "0.0.0.0", "--api-key", "k"],
    );
    assert!(!keyed.startup.contains("warning"), "{}", keyed.startup);
}

#[test]
fn bad_access_flags_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "# nothing\n").unwrap();
    let missing = dir.path().join("missing");
    for (args, needle) in [
        (
            vec!["--api-key-file", empty.to_str().unwrap()],
            "holds no key",
        ),
        (
            vec!["--api-key-file", missing.to_str().unwrap()],
            "cannot read",
        ),
        (vec!["--api-key", "two words"], "no spaces"),
        (vec!["--cors-origin", "http://a b"], "is not an origin"),
    ] {
        let mut args = args;
        args.splice(0..0, ["serve", "-m", tiny_model().to_str().unwrap()]);
        exits_1_naming(&args, needle);
    }
}

/// Runs qwen-run with `args`: it must exit 1 with `needle` in its message.
fn exits_1_naming(args: &[&str], needle: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn caps_on_messages_tools_and_stop_strings() {
    let s = Server::start(tiny_model(), &["-t", "1"]);
    let many_messages: Vec<Value> = (0..4097)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    let tools: Vec<Value> = (0..513)
        .map(|i| json!({"type": "function", "function": {"name": format!("f{i}"), "parameters": {"type": "object"}}}))
        .collect();
    let stops: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
    let long_stop = "x".repeat(17 << 10);
    let mut cases = vec![
        (
            "/v1/chat/completions",
            json!({"messages": many_messages, "max_tokens": 1}),
            "at most 4096",
        ),
        (
            "/api/chat",
            json!({"messages": many_messages, "stream": false}),
            "at most 4096",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": tools, "max_tokens": 1}),
            "at most 512",
        ),
        (
            "/api/chat",
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": tools, "stream": false}),
            "at most 512",
        ),
    ];
    for stop in [json!(stops), json!([long_stop])] {
        cases.push((
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": stop, "max_tokens": 1}),
            "at most 64 strings",
        ));
        cases.push((
            "/v1/completions",
            json!({"prompt": "hi", "stop": stop, "max_tokens": 1}),
            "at most 64 strings",
        ));
        cases.push((
            "/api/generate",
            json!({"prompt": "hi", "options": {"stop": stop}, "stream": false}),
            "at most 64 strings",
        ));
        cases.push((
            "/completion",
            json!({"prompt": "hi", "stop": stop, "n_predict": 1}),
            "at most 64 strings",
        ));
    }
    for (path, body, needle) in cases {
        let (status, v) = s.post(path, &body);
        assert_eq!(status, 400, "{path}: {v}");
        assert!(v.to_string().contains(needle), "{path}: {v}");
    }
    // At the caps, requests are taken.
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "stop": stops[..64], "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn large_prompts_are_prepared_off_the_async_threads() {
    let s = std::sync::Arc::new(Server::start(tiny_model(), &["-t", "1", "-c", "256"]));
    // Prompts of 7 MiB take a while to tokenize (then are refused: they exceed the context).
    let prompt = "hello world ".repeat((7 << 20) / 12);
    let body = json!({"prompt": prompt, "max_tokens": 1}).to_string();
    let big = |s: &Server| {
        let (status, _, text) = send(s, "POST", "/v1/completions", &[JSON], Some(&body));
        assert_eq!(status, 400, "{}", &text[..text.len().min(300)]);
        assert!(text.contains("context"), "{}", &text[..text.len().min(300)]);
    };
    let t = std::time::Instant::now();
    big(&s);
    let alone = t.elapsed();
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (s, body) = (s.clone(), body.clone());
            std::thread::spawn(move || send(&s, "POST", "/v1/completions", &[JSON], Some(&body)).0)
        })
        .collect();
    // While they are tokenized, /health answers in a fraction of the time one of them takes
    // (with tokenization on the async threads it waited for one to finish).
    std::thread::sleep(alone / 8);
    let t = std::time::Instant::now();
    let (status, _, _) = send(&s, "GET", "/health", &[], None);
    let health = t.elapsed();
    assert_eq!(status, 200);
    for t in senders {
        assert_eq!(t.join().unwrap(), 400);
    }
    assert!(
        health < alone / 3,
        "/health took {health:?} while large prompts were prepared; one alone takes {alone:?}"
    );
}

#[test]
fn a_load_runs_to_its_end_when_its_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let second = common::write_tiny_model(dir.path(), QuantType::Q4_0);
    let s = Server::start(
        tiny_model(),
        &[
            "-t",
            "1",
            "-m",
            second.to_str().unwrap(),
            "--max-loaded",
            "1",
        ],
    );
    let state = |name: &str| -> String {
        let states = s.model_states();
        states.into_iter().find(|(id, _)| id == name).unwrap().1
    };
    assert_eq!(state("tiny-Q4_0"), "unloaded");
    // A client that asks for the unloaded model and hangs up at once.
    {
        use std::io::Write;
        let addr = s.base.strip_prefix("http://").unwrap();
        let body = json!({"model": "tiny-Q4_0", "prompt": "hi", "max_tokens": 1}).to_string();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut loaded = false;
    for _ in 0..200 {
        if state("tiny-Q4_0") == "loaded" {
            loaded = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(loaded, "the load the client started was dropped");
    assert_eq!(state("tiny-Q8_0"), "unloaded", "--max-loaded 1 holds");
    // Concurrent requests for a model being loaded wait for one load.
    let loads_before = s.metric("qwen_run_model_loads_total");
    let s = std::sync::Arc::new(s);
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.post(
                    "/v1/completions",
                    &json!({"model": "tiny-Q8_0", "prompt": "hi", "max_tokens": 1}),
                )
                .0
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    assert_eq!(s.metric("qwen_run_model_loads_total"), loads_before + 1.0);
}

#[test]
fn flags_out_of_range_exit_1_with_the_reason() {
    let model = tiny_model().to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "serve",
                "-m",
                model,
                "--parallel",
                "100000000000",
                "-c",
                "256",
            ],
            "the KV caches need",
        ),
        (
            vec!["run", "-m", model, "-p", "hi", "-t", "100000"],
            "--threads 100000",
        ),
        (
            vec![
                "run",
                "-m",
                model,
                "-p",
                "hi",
                "--cache-ram",
                "999999999999999",
            ],
            "--cache-ram 999999999999999 MiB",
        ),
        (
            vec![
                "run",
                "-m",
                model,
                "-p",
                "hi",
                "--prompt-cache-max",
                "99999999999999999",
            ],
            "--prompt-cache-max",
        ),
    ] {
        exits_1_naming(&args, needle);
    }
}

/// A small seeded generator, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A random JSON value of the shapes requests hold: numbers at the edges of their types,
/// strings, and nesting.
fn random_value(r: &mut Rng, depth: usize) -> Value {
    let numbers = [
        json!(0),
        json!(-1),
        json!(1),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e300),
        json!(-1e300),
        json!(0.5),
        json!(4294967296u64),
    ];
    match r.below(if depth > 2 { 5 } else { 7 }) {
        0 => numbers[r.below(numbers.len())].clone(),
        1 => Value::Null,
        2 => json!(r.below(2) == 0),
        3 => json!(["", "hi", "-1", "5m", "1e20", "\u{0}", "<|im_end|>", "user"][r.below(8)]),
        4 => json!("x".repeat(r.below(3000))),
        5 => Value::Array(
            (0..r.below(4))
                .map(|_| random_value(r, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "role",
                "content",
                "name",
                "type",
                "function",
                "parameters",
                "arguments",
                "tool_calls",
                "stop",
                "prompt",
                "messages",
                "json_schema",
                "schema",
            ];
            Value::Object(
                (0..r.below(4))
                    .map(|_| {
                        (
                            keys[r.below(keys.len())].to_string(),
                            random_value(r, depth + 1),
                        )
                    })
                    .collect(),
            )
        }
    }
}

/// Random request bodies into every endpoint: each answer is a 2xx or a 4xx with an error
/// message (a 5xx or a dropped connection is a finding), and the server still answers after.
/// QWEN_RUN_FUZZ_CASES=N runs more (default 300).
#[test]
fn random_requests_get_answers_not_crashes() {
    let cases: usize = std::env::var("QWEN_RUN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let s = Server::start(tiny_model(), &["-t", "1", "-c", "256", "--max-tokens", "4"]);
    let endpoints = [
        "/v1/chat/completions",
        "/v1/completions",
        "/api/chat",
        "/api/generate",
        "/api/show",
        "/completion",
        "/infill",
        "/tokenize",
        "/detokenize",
        "/apply-template",
    ];
    let fields = [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stream",
        "n",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "tools",
        "tool_choice",
        "keep_alive",
        "options",
        "format",
        "suffix",
        "n_predict",
        "n_probs",
        "grammar",
        "json_schema",
        "input_prefix",
        "input_suffix",
        "stream_options",
        "raw",
        "template",
        "system",
        "think",
        "images",
    ];
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..cases {
        let path = endpoints[r.below(endpoints.len())];
        let mut body = serde_json::Map::new();
        // Mostly valid skeletons, so the fuzz reaches past the first check.
        if path.contains("chat") {
            body.insert(
                "messages".into(),
                json!([{"role": "user", "content": "hi"}]),
            );
        } else {
            body.insert("prompt".into(), json!("hi"));
        }
        body.insert("stream".into(), json!(false));
        for _ in 0..r.below(4) {
            let f = fields[r.below(fields.len())];
            body.insert(f.into(), random_value(&mut r, 0));
        }
        let text = Value::Object(body).to_string();
        let resp = s
            .http
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(text.clone())
            .send()
            .unwrap_or_else(|e| panic!("case {case}: {path} {text}: no answer: {e}"));
        let status = resp.status().as_u16();
        let answer = resp.text().unwrap_or_default();
        assert!(
            status < 500,
            "case {case}: {path} {text}: {status} {answer}"
        );
        if status >= 400 {
            assert!(
                answer.contains("error"),
                "case {case}: {path} {text}: {answer}"
            );
        }
    }
    let (status, _) = s.get("/health");
    assert_eq!(status, 200);
}

#[test]
fn a_hostile_file_in_a_models_directory_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    // A header that claims 2^62 tensors, and a file that is not a GGUF at all.
    let mut bad = b"GGUF".to_vec();
    bad.extend(3u32.to_le_bytes());
    bad.extend((1u64 << 62).to_le_bytes());
    bad.extend(0u64.to_le_bytes());
    std::fs::write(dir.path().join("a-hostile.gguf"), &bad).unwrap();
    std::fs::write(dir.path().join("b-garbage.gguf"), b"not a model").unwrap();
    let s = Server::start(dir.path(), &["-t", "1"]);
    for name in ["a-hostile.gguf", "b-garbage.gguf"] {
        assert!(
            s.startup.contains("skipping") && s.startup.contains(name),
            "{}",
            s.startup
        );
    }
    let (_, body) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [good.file_stem().unwrap().to_str().unwrap()]);
    // A file named on its own is the user's choice: it stops the server with the reason.
    exits_1_naming(
        &[
            "serve",
            "-m",
            dir.path().join("b-garbage.gguf").to_str().unwrap(),
        ],
        "b-garbage.gguf",
    );
}
