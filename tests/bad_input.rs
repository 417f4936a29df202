//! Bad input through the real binary: every case is one clear message and exit code 1, never a
//! panic or a backtrace.

mod common;

use qwen_run::gguf::Value;
use qwen_run_kernels::QuantType;
use std::path::Path;
use std::process::Command;

fn qwen_run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "panic: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stderr)
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let (code, stderr) = qwen_run(args);
    assert_eq!(code, 1, "exit code for {args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: expected {n:?} in: {stderr}");
    }
}

fn run_model(path: &Path, needles: &[&str]) {
    expect_error(
        &["-m", path.to_str().unwrap(), "-p", "hi", "-n", "2"],
        needles,
    );
}

#[test]
fn missing_file() {
    run_model(
        Path::new("/nonexistent/model.gguf"),
        &["cannot open model file", "/nonexistent/model.gguf"],
    );
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.gguf");
    std::fs::write(&p, "this is a text file, not a model").unwrap();
    run_model(&p, &["not a GGUF file", "magic"]);
    std::fs::write(&p, "GG").unwrap();
    run_model(&p, &["not a GGUF file", "2 bytes"]);
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(common::write_tiny_model(dir.path(), QuantType::Q8_0)).unwrap();
    let p = dir.path().join("cut.gguf");
    // Cut inside the tensor data, then inside the header.
    std::fs::write(&p, &full[..full.len() - 1000]).unwrap();
    run_model(&p, &["is truncated", "tensor '", "Download the file again"]);
    std::fs::write(&p, &full[..200]).unwrap();
    run_model(&p, &["is truncated", "header"]);
}

#[test]
fn corrupt_header_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(common::write_tiny_model(dir.path(), QuantType::Q8_0)).unwrap();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = dir.path().join("corrupt.gguf");
    std::fs::write(&p, &bytes).unwrap();
    run_model(&p, &["corrupt", "tensors"]);
}

#[test]
fn unsupported_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(common::write_tiny_model(dir.path(), QuantType::Q8_0)).unwrap();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    let p = dir.path().join("v1.gguf");
    std::fs::write(&p, &bytes).unwrap();
    run_model(&p, &["GGUF version 1", "versions 2 and 3"]);
}

#[test]
fn unsupported_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(common::write_tiny_model(dir.path(), QuantType::Q8_0)).unwrap();
    // The type field follows the name, the dimension count and two u64 dimensions.
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    bytes[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
    let p = dir.path().join("iq4.gguf");
    std::fs::write(&p, &bytes).unwrap();
    run_model(
        &p,
        &["blk.0.attn_q.weight", "IQ4_NL", "does not support", "Q4_K"],
    );
}

#[test]
fn other_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    w.meta("general.architecture", Value::String("llama".into()));
    let p = dir.path().join("llama.gguf");
    w.write(&p).unwrap();
    run_model(&p, &["'llama' model", "qwen2"]);
}

#[test]
fn directory_instead_of_file() {
    let dir = tempfile::tempdir().unwrap();
    run_model(dir.path(), &["directory"]);
}

#[test]
fn bad_flags() {
    expect_error(&["--bogus-flag"], &["--bogus-flag"]);
    expect_error(
        &["-m", "x.gguf", "-p", "hi", "--threads", "many"],
        &["invalid value 'many'"],
    );
    expect_error(
        &["-m", "x.gguf", "-p", "hi", "--device", "tpu"],
        &["unknown device 'tpu'"],
    );
    expect_error(
        &["-m", "x.gguf", "-p", "hi", "--cache-type", "q3"],
        &["unknown KV cache type"],
    );
    expect_error(&["-p", "hi"], &["no model given", "--model"]);
}

#[test]
fn bad_values_with_a_real_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let m = p.to_str().unwrap();
    expect_error(
        &["-m", m, "-p", "hi", "--top-p", "2"],
        &["top-p must be between 0 and 1"],
    );
    expect_error(
        &["-m", m, "-p", "hi", "-c", "100000"],
        &["exceeds the model's trained context"],
    );
    expect_error(&["-m", m], &["no prompt given"]);
    let long = "hello ".repeat(300);
    expect_error(
        &["-m", m, "-p", &long, "-c", "64"],
        &["the context holds 64", "--ctx-size"],
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_cuda_support_is_an_error_not_a_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    expect_error(
        &["-m", p.to_str().unwrap(), "-p", "hi", "--device", "cuda"],
        &["built without CUDA support", "--features cuda"],
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_layers_without_a_gpu_is_an_error_and_zero_is_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let m = p.to_str().unwrap();
    expect_error(
        &["-m", m, "-p", "hi", "-ngl", "5"],
        &[
            "--gpu-layers 5 asks for a GPU",
            "built without CUDA support",
        ],
    );
    expect_error(
        &["-m", m, "-p", "hi", "--device", "cpu", "--gpu-layers", "99"],
        &["--device cpu was given"],
    );
    let (code, stderr) = qwen_run(&["-m", m, "-p", "hi", "-n", "2", "-ngl", "0"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("CPU ("), "{stderr}");
}

/// `fidelity --write-logits` writes the file `--logits` reads: a model compared with its own
/// logits agrees everywhere, with zero divergence.
#[test]
fn written_logits_compare_equal_to_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_tiny_model(dir.path(), QuantType::Q4K);
    let m = p.to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "hello world, hello there").unwrap();
    let logits = dir.path().join("ref.logits");
    let (code, stderr) = qwen_run(&[
        "fidelity",
        "-m",
        m,
        "--text",
        text.to_str().unwrap(),
        "--write-logits",
        logits.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args(["fidelity", "-m", m, "--logits", logits.to_str().unwrap()])
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["logits"]["top1_agreement"], 1.0, "{report}");
    assert_eq!(report["logits"]["max_kl"], 0.0, "{report}");
    // A text the model cannot take leaves no file behind.
    let bad = dir.path().join("bad.logits");
    std::fs::write(&text, "").unwrap();
    let (code, _) = qwen_run(&[
        "fidelity",
        "-m",
        m,
        "--text",
        text.to_str().unwrap(),
        "--write-logits",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(!bad.exists() && !bad.with_extension("partial").exists());
}

#[test]
fn a_good_run_streams_text_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_tiny_model(dir.path(), QuantType::Q4K);
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args([
            "-m",
            p.to_str().unwrap(),
            "-p",
            "hello",
            "-n",
            "8",
            "--temp",
            "0",
            "-t",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for field in [
        "load",
        "time to first token",
        "prefill",
        "decode",
        "tok/s",
        "2 threads",
    ] {
        assert!(stderr.contains(field), "report lacks {field:?}: {stderr}");
    }
}

#[test]
fn a_forced_kernel_level_is_checked() {
    let run = |level: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
            .args(["-m", "/nonexistent.gguf", "-p", "hi"])
            .env("QWEN_RUN_KERNELS", level)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("avx3");
    assert_eq!(code, 1);
    assert!(
        err.contains("QWEN_RUN_KERNELS=avx3 is not a kernel level")
            && err.contains("scalar, avx2, avx512"),
        "{err}"
    );
    // a level this CPU has gets as far as the model file
    let (code, err) = run("scalar");
    assert_eq!(code, 1);
    assert!(err.contains("nonexistent.gguf"), "{err}");
    for b in qwen_run_kernels::Backend::ALL {
        if !b.is_available() {
            let (code, err) = run(b.env_name());
            assert_eq!(code, 1);
            assert!(err.contains("this CPU lacks"), "{err}");
        }
    }
}

/// `-j` holds the answer to the schema (the real 0.5B on a prose prompt); a schema that is not
/// JSON, not an object, or not usable is refused before anything runs.
#[test]
fn json_schema_flag() {
    let model = common::real_model("0.5b");
    let m = model.to_str().unwrap();
    let schema = r#"{"type":"object","properties":{"answer":{"type":"string"},"confidence":{"type":"integer","minimum":0,"maximum":10}},"required":["answer","confidence"],"additionalProperties":false}"#;
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args([
            "-m",
            m,
            "-p",
            "Is the sky blue?",
            "--temp",
            "0",
            "-n",
            "80",
            "-q",
            "-j",
            schema,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v["answer"].is_string(), "{v}");
    assert!((0..=10).contains(&v["confidence"].as_i64().unwrap()), "{v}");
    expect_error(
        &["-m", m, "-p", "hi", "-j", "{not json"],
        &["--json-schema is not valid JSON"],
    );
    expect_error(
        &["-m", m, "-p", "hi", "-j", "[1]"],
        &["must be a JSON schema object"],
    );
    expect_error(
        &["-m", m, "-p", "hi", "-j", r##"{"$ref": "#/nowhere"}"##],
        &["response format cannot be used"],
    );
}
