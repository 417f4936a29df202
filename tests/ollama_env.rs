//! `qwen-run serve` as Ollama's users run it: started by its environment variables (OLLAMA_HOST,
//! OLLAMA_NUM_PARALLEL, OLLAMA_MAX_QUEUE, OLLAMA_MAX_LOADED_MODELS, OLLAMA_KEEP_ALIVE,
//! OLLAMA_KV_CACHE_TYPE, OLLAMA_FLASH_ATTENTION, OLLAMA_CONTEXT_LENGTH and OLLAMA_MODELS; a
//! flag wins over its variable, and a bad value stops it naming the variable), and its models
//! managed by `/api/show`, `/api/copy` and `/api/delete`.

mod common;

use common::server::Server;
use qwen_run_kernels::QuantType;
use serde_json::{json, Value};
use std::process::Command;

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn serve_reads_the_ollama_variables() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let models = dir.path().to_str().unwrap();
    // No -m, --host or --port: the variables say it all.
    let s = Server::spawn(
        &["serve", "-t", "1"],
        &[
            ("OLLAMA_HOST", "127.0.0.1:0"),
            ("OLLAMA_MODELS", models),
            ("OLLAMA_NUM_PARALLEL", "2"),
            ("OLLAMA_MAX_QUEUE", "3"),
            ("OLLAMA_MAX_LOADED_MODELS", "1"),
            ("OLLAMA_KEEP_ALIVE", "10m"),
            ("OLLAMA_KV_CACHE_TYPE", "f16"),
            ("OLLAMA_FLASH_ATTENTION", "1"),
            ("OLLAMA_CONTEXT_LENGTH", "256"),
            ("OLLAMA_DEBUG", "1"),
        ],
    );
    assert!(s.base.starts_with("http://127.0.0.1:"), "{}", s.base);
    assert!(
        s.startup
            .contains("OLLAMA_DEBUG is set, but qwen-run does not read it"),
        "{}",
        s.startup
    );
    let (status, props) = s.get("/props");
    assert_eq!(status, 200, "{props}");
    let props = json(&props);
    assert_eq!(props["total_slots"], 2, "{props}");
    assert_eq!(props["model_alias"], "tiny-Q8_0", "{props}");
    assert_eq!(
        props["default_generation_settings"]["n_ctx"], 256,
        "{props}"
    );
    // Kept 10 minutes from now, not for good.
    let (_, ps) = s.get("/api/ps");
    let ps = json(&ps);
    let expires = ps["models"][0]["expires_at"].as_str().unwrap().to_string();
    assert!(!expires.starts_with("2318"), "{ps}");
    drop(s);

    // A flag wins over its variable.
    let s = Server::spawn(
        &[
            "serve",
            "--port",
            "0",
            "-m",
            common::shared_tiny_model().to_str().unwrap(),
            "--parallel",
            "1",
            "-c",
            "128",
        ],
        &[
            ("OLLAMA_HOST", "127.0.0.1:1"),
            ("OLLAMA_NUM_PARALLEL", "3"),
            ("OLLAMA_CONTEXT_LENGTH", "256"),
        ],
    );
    let props = json(&s.get("/props").1);
    assert_eq!(props["total_slots"], 1, "{props}");
    assert_eq!(
        props["default_generation_settings"]["n_ctx"], 128,
        "{props}"
    );
    assert!(!s.base.ends_with(":1"), "{}", s.base);
}

#[test]
fn a_bad_ollama_variable_stops_serve_naming_it() {
    let model = common::shared_tiny_model().to_str().unwrap().to_string();
    for (name, value) in [
        ("OLLAMA_HOST", "localhost:http"),
        ("OLLAMA_NUM_PARALLEL", "many"),
        ("OLLAMA_MAX_QUEUE", "-3"),
        ("OLLAMA_MAX_LOADED_MODELS", "1.5"),
        ("OLLAMA_KEEP_ALIVE", "forever"),
        ("OLLAMA_KV_CACHE_TYPE", "q4_0"),
        ("OLLAMA_FLASH_ATTENTION", "yes please"),
        ("OLLAMA_MODELS", "/nonexistent/qwen-run-models"),
        ("OLLAMA_CONTEXT_LENGTH", "big"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-run"));
        cmd.args(["serve", "-m", &model, "--port", "0"]);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OLLAMA_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.env(name, value).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}={value}: {err}");
        assert!(err.contains(name), "{name}={value}: {err}");
    }
}

#[test]
fn show_copy_and_delete() {
    let s = Server::start(&common::real_model("0.5b"), &["-t", "1", "--embedding"]);
    let name = "qwen2.5-coder-0.5b-instruct-q4_k_m";
    let (status, v) = s.post("/api/show", &json!({"model": name}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["details"]["quantization_level"], "Q4_K_M",
        "{}",
        v["details"]
    );
    assert_eq!(v["details"]["family"], "qwen2");
    let info = &v["model_info"];
    assert_eq!(info["general.architecture"], "qwen2");
    assert_eq!(info["qwen2.block_count"], 24);
    assert_eq!(info["qwen2.embedding_length"], 896);
    assert_eq!(info["qwen2.context_length"], 32768);
    assert_eq!(info["general.file_type"], 15);
    assert!(info["general.parameter_count"].as_u64().unwrap() > 400_000_000);
    assert!(
        info["tokenizer.ggml.tokens"].is_null(),
        "arrays only with verbose"
    );
    let modelfile = v["modelfile"].as_str().unwrap();
    assert!(modelfile.contains("\nFROM /"), "{modelfile}");
    assert!(modelfile.contains("TEMPLATE \"\"\""), "{modelfile}");
    assert!(modelfile.contains("PARAMETER num_ctx 4096"), "{modelfile}");
    let parameters = v["parameters"].as_str().unwrap();
    assert!(
        parameters
            .lines()
            .any(|l| l.starts_with("temperature") && l.ends_with(" 0.8")),
        "{parameters}"
    );
    assert!(v["template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(
        v["capabilities"],
        json!(["completion", "tools", "embedding"])
    );
    let (_, verbose) = s.post("/api/show", &json!({"model": name, "verbose": true}));
    let tokens = verbose["model_info"]["tokenizer.ggml.tokens"]
        .as_array()
        .unwrap();
    assert_eq!(tokens.len(), 151936);
    let (status, v) = s.post("/api/show", &json!({"model": name, "frobnicate": 1}));
    assert_eq!(status, 400, "{v}");

    // A copy is another name for the model, listed and answered, until it is deleted.
    let (status, v) = s.post(
        "/api/copy",
        &json!({"source": name, "destination": "coder:small"}),
    );
    assert_eq!(status, 200, "{v}");
    let tags = json(&s.get("/api/tags").1);
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [name, "coder:small"], "{tags}");
    let (status, v) = s.post(
        "/api/generate",
        &json!({"model": "CODER:small", "prompt": "1+1=", "stream": false, "options": {"num_predict": 2, "temperature": 0}}),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = s.post("/api/show", &json!({"model": "coder:small"}));
    assert_eq!(
        (status, v["details"]["quantization_level"].clone()),
        (200, json!("Q4_K_M"))
    );
    for (body, status, needle) in [
        (
            json!({"source": "nope", "destination": "x"}),
            404,
            "not found",
        ),
        (
            json!({"source": name, "destination": name}),
            400,
            "already names",
        ),
        (
            json!({"source": name, "destination": "a b"}),
            400,
            "not a model name",
        ),
    ] {
        let (got, v) = s.post("/api/copy", &body);
        assert_eq!(got, status, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
    let delete = |model: &str| {
        let r = s
            .http
            .delete(s.url("/api/delete"))
            .json(&json!({"model": model}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    assert_eq!(delete("coder:small").0, 200);
    assert_eq!(delete("coder:small").0, 404);
    let (status, v) = s.post(
        "/api/generate",
        &json!({"model": "coder:small", "prompt": "x"}),
    );
    assert_eq!(status, 404, "{v}");
    let (status, body) = delete(name);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("deletes no model file"), "{body}");
    let (status, v) = s.post("/api/pull", &json!({"model": "qwen2.5:0.5b"}));
    assert_eq!(status, 501, "{v}");
    assert!(v["error"].as_str().unwrap().contains("-hf"), "{v}");
}
