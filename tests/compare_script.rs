//! `benches/compare.py` end to end on a tiny model, with llama.cpp's tools replaced by stubs that
//! print output recorded from the real llama-bench b11434: checks the parsing and the table, not
//! any speed.

mod common;

use qwen_run_kernels::QuantType;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Answers like llama-bench -o json (fields trimmed to those the script reads, values as recorded).
const FAKE_LLAMA_BENCH: &str = r#"#!/usr/bin/env python3
import json, sys
a = sys.argv
def arg(f, d):
    return a[a.index(f) + 1] if f in a else d
p, n, r = int(arg("-p", "512")), int(arg("-n", "128")), int(arg("-r", "5"))
rows = []
for np_, ng in ((p, 0), (0, n)):
    if np_ or ng:
        ts = 12.1217 if np_ else 30.36
        rows.append({"build_number": 11434, "model_type": "qwen2 1B Q4_K - Medium", "n_threads": 2,
                     "n_prompt": np_, "n_gen": ng, "avg_ts": ts, "stddev_ts": 0.0,
                     "samples_ts": [ts] * r})
print(json.dumps(rows, indent=2))
"#;

const FAKE_LLAMA_COMPLETION: &str = r#"#!/bin/sh
echo "Hi there" 
echo "llama_perf_context_print:        load time =     181.52 ms" >&2
"#;

fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn compare_script_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let bin = dir.path().join("llama-bin");
    std::fs::create_dir(&bin).unwrap();
    script(&bin, "llama-bench", FAKE_LLAMA_BENCH);
    script(&bin, "llama-completion", FAKE_LLAMA_COMPLETION);
    let raw = dir.path().join("raw.json");
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/compare.py"))
        .args(["--model", model.to_str().unwrap()])
        .args(["--qwen-run", env!("CARGO_BIN_EXE_qwen-run")])
        .args(["--llama-bin", bin.to_str().unwrap()])
        .args([
            "--no-fidelity",
            "-t",
            "1",
            "-p",
            "16",
            "-n",
            "4",
            "-r",
            "2",
            "--rounds",
            "2",
        ])
        .args(["--json", raw.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compare.py failed:\n{stdout}\n{stderr}"
    );
    for needle in [
        "| metric | qwen-run | llama.cpp | ratio (qwen-run / llama.cpp) |",
        "| pp16 (t/s) |",
        "| 12.12 ± 0.00 |",
        "| tg4 (t/s) |",
        "| 30.36 ± 0.00 |",
        "time to first token",
        "model load, warm page cache (ms)",
        "| 181.5 |",
        "| peak RSS over the pp16 and tg4 runs (MiB) |",
        "roofline:",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(raw).unwrap()).unwrap();
    // 2 rounds x 2 repetitions of each engine.
    assert_eq!(raw["qwen_run"]["pp16"].as_array().unwrap().len(), 4);
    assert_eq!(raw["llama_cpp"]["tg4"].as_array().unwrap().len(), 4);
}
