//! `qwen-run serve` as Ollama's users run it: started by its environment variables (OLLAMA_HOST,
//! OLLAMA_NUM_PARALLEL, OLLAMA_MAX_QUEUE, OLLAMA_MAX_LOADED_MODELS, OLLAMA_KEEP_ALIVE,
//! OLLAMA_KV_CACHE_TYPE, OLLAMA_FLASH_ATTENTION, OLLAMA_CONTEXT_LENGTH and OLLAMA_MODELS; a
//! flag wins over its variable, and a bad value stops it naming the variable).

mod common;

use common::server::Server;
use qwen_run_kernels::QuantType;
use serde_json::Value;
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
