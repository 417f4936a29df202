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
    bytes[at..at + 4].copy_from_slice(&34u32.to_le_bytes());
    let p = dir.path().join("tq1.gguf");
    std::fs::write(&p, &bytes).unwrap();
    run_model(
        &p,
        &[
            "blk.0.attn_q.weight",
            "TQ1_0",
            "does not support",
            "Q4_K",
            "IQ4_XS",
            "IQ3_XXS",
            "IQ1_M",
        ],
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
            && err.contains("scalar, avx2, avxvnni, avx512"),
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

/// The file of the tiny model with `edit` applied to its bytes.
fn edited_tiny_model(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) -> std::path::PathBuf {
    let mut bytes = std::fs::read(common::write_tiny_model(dir, QuantType::Q8_0)).unwrap();
    edit(&mut bytes);
    let p = dir.join(name);
    std::fs::write(&p, &bytes).unwrap();
    p
}

/// Where the data offset of tensor `name` (of two dimensions) is in the header.
fn offset_field(bytes: &[u8], name: &str) -> usize {
    let name = name.as_bytes();
    bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16 + 4
}

#[test]
fn tensor_offset_that_overflows_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_tiny_model(dir.path(), "overflow.gguf", |b| {
        let at = offset_field(b, "blk.0.attn_q.weight");
        b[at..at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    });
    run_model(
        &p,
        &[
            "corrupt",
            "blk.0.attn_q.weight",
            "overflows or lies past the end",
        ],
    );
    let p = edited_tiny_model(dir.path(), "past-end.gguf", |b| {
        let at = offset_field(b, "blk.0.attn_q.weight");
        b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    });
    run_model(
        &p,
        &["blk.0.attn_q.weight", "overflows or lies past the end"],
    );
}

#[test]
fn metadata_arrays_that_would_cost_gigabytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    // 5 MiB in the file, 160 MiB as values; the bound is on the count, so this stands for the
    // 1 GiB array that would cost 32 GiB.
    w.meta("general.blob", Value::Array(vec![Value::U8(7); 5 << 20]));
    let p = dir.path().join("blob.gguf");
    w.write(&p).unwrap();
    run_model(
        &p,
        &["general.blob", "elements", "corrupt or not a model file"],
    );
}

#[test]
fn duplicate_metadata_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    w.meta("qwen2.block_coun7", Value::U32(1));
    let p = dir.path().join("dup.gguf");
    w.write(&p).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes
        .windows(17)
        .position(|w| w == b"qwen2.block_coun7")
        .unwrap();
    bytes[at + 16] = b't';
    std::fs::write(&p, &bytes).unwrap();
    run_model(&p, &["corrupt", "'qwen2.block_count' twice"]);
}

#[test]
fn duplicate_tensor_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_tiny_model(dir.path(), "dup-tensor.gguf", |b| {
        let name = b"blk.1.attn_q.weight";
        let at = b.windows(name.len()).position(|w| w == name).unwrap();
        b[at + 4] = b'0';
    });
    run_model(&p, &["'blk.0.attn_q.weight' twice", "malformed"]);
}

#[test]
fn split_parts_must_belong_to_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let w = common::tiny_model_writer(QuantType::Q8_0);
    let paths = w.write_split(dir.path(), "m", 3).unwrap();
    let first = paths[0].to_str().unwrap();
    let run = |needles: &[&str]| {
        expect_error(&["-m", first, "-p", "hi", "-n", "1"], needles);
    };
    // Part 3 in part 2's place.
    let part2 = std::fs::read(&paths[1]).unwrap();
    std::fs::copy(&paths[2], &paths[1]).unwrap();
    run(&["m-00002-of-00003.gguf", "split.no is 2 (expected 1)"]);
    // Part 2 of a model split in two.
    let other = tempfile::tempdir().unwrap();
    let two = w.write_split(other.path(), "m", 2).unwrap();
    std::fs::copy(&two[1], &paths[1]).unwrap();
    run(&["m-00002-of-00003.gguf", "split.count is 2"]);
    // Part 2 of another architecture.
    let mut foreign = qwen_run::gguf::GgufWriter::new();
    foreign
        .meta("general.architecture", Value::String("llama".into()))
        .meta("split.no", Value::U16(1))
        .meta("split.count", Value::U16(3));
    foreign.write(&paths[1]).unwrap();
    run(&["'llama' model", "'qwen2' model", "different models"]);
    // The right part loads.
    std::fs::write(&paths[1], part2).unwrap();
    let (code, stderr) = qwen_run(&["-m", first, "-p", "hi", "-n", "1", "-t", "1"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn special_token_ids_outside_the_vocabulary_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.eot_token_id",
    ] {
        let mut w = common::tiny_model_writer(QuantType::Q8_0);
        w.meta(key, Value::U32(100_000));
        let p = dir.path().join("ids.gguf");
        w.write(&p).unwrap();
        run_model(&p, &[key, "100000", "vocabulary has", "broken"]);
    }
}

#[test]
fn zero_layers_or_context_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for key in ["qwen2.block_count", "qwen2.context_length"] {
        let mut w = common::tiny_model_writer(QuantType::Q8_0);
        w.meta(key, Value::U32(0));
        let p = dir.path().join("zero.gguf");
        w.write(&p).unwrap();
        let (code, stderr) = qwen_run(&["-m", p.to_str().unwrap(), "-p", "hi", "-n", "2"]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&format!("'{key}'"))
                && stderr.contains("is 0")
                && stderr.contains("broken"),
            "{key}: {stderr}"
        );
        assert!(
            !stderr.contains("rotary") && !stderr.contains("up to 0"),
            "{key}: {stderr}"
        );
    }
}

#[test]
fn more_tokens_than_embedding_rows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    let n = {
        let mut t = qwen_run::gguf::GgufWriter::new();
        common::tokenizer_metadata(&mut t)
    };
    let extra: Vec<Value> = (0..n + 5).map(|i| Value::String(format!("t{i}"))).collect();
    w.meta("tokenizer.ggml.tokens", Value::Array(extra));
    let p = dir.path().join("rows.gguf");
    w.write(&p).unwrap();
    run_model(&p, &["tokenizer.ggml.tokens holds", "rows"]);
}

#[test]
fn chat_template_flags_are_checked_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let m = p.to_str().unwrap();
    let run = |extra: &[&str], needles: &[&str]| {
        for cmd in [
            &["run", "-p", "hi", "-n", "1", "-c", "256"][..],
            &["template"],
            &["serve", "--port", "0"],
        ] {
            let mut args: Vec<&str> = cmd.to_vec();
            args.extend(["-m", m]);
            args.extend(extra);
            expect_error(&args, needles);
        }
    };
    // An unknown name lists the names; a bare word is never taken as a template.
    run(
        &["--chat-template", "qwen25"],
        &[
            "--chat-template 'qwen25' is not a built-in template",
            "chatml, qwen2.5",
            "--chat-template-file",
        ],
    );
    // Both flags: one is refused.
    let good = dir.path().join("good.jinja");
    std::fs::write(&good, "{{ messages[0].content }}").unwrap();
    run(
        &[
            "--chat-template",
            "chatml",
            "--chat-template-file",
            good.to_str().unwrap(),
        ],
        &["--chat-template", "cannot be used with"],
    );
    // A file that is missing, too large, not UTF-8 or not Jinja names the file and the problem.
    let missing = dir.path().join("missing.jinja");
    run(
        &["--chat-template-file", missing.to_str().unwrap()],
        &["--chat-template-file", "missing.jinja", "cannot read it"],
    );
    let big = dir.path().join("big.jinja");
    std::fs::write(&big, "x".repeat((1 << 20) + 1)).unwrap();
    run(
        &["--chat-template-file", big.to_str().unwrap()],
        &["big.jinja", "larger than 1024 KiB"],
    );
    let binary = dir.path().join("binary.jinja");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00]).unwrap();
    run(
        &["--chat-template-file", binary.to_str().unwrap()],
        &["binary.jinja", "not UTF-8"],
    );
    let broken = dir.path().join("broken.jinja");
    std::fs::write(&broken, "{% for m in messages %}\n{{ m.content }}").unwrap();
    run(
        &["--chat-template-file", broken.to_str().unwrap()],
        &[
            "the chat template file",
            "broken.jinja",
            "does not parse",
            "syntax error",
            "line 2",
        ],
    );
    // Inline Jinja text is parsed too.
    run(
        &["--chat-template", "{{ messages"],
        &["the --chat-template text does not parse", "syntax error"],
    );
    // The raw prompt has no template to choose.
    expect_error(
        &[
            "-m",
            m,
            "-p",
            "hi",
            "--no-chat-template",
            "--chat-template",
            "chatml",
        ],
        &["--no-chat-template", "cannot be used with"],
    );
    // fidelity feeds token ids, renders no chat: the flag is not taken, not ignored.
    expect_error(
        &["fidelity", "-m", m, "--chat-template", "chatml"],
        &["unexpected argument '--chat-template'"],
    );
}

#[test]
fn a_chat_template_that_fails_to_render_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let m = p.to_str().unwrap();
    let t = dir.path().join("undefined.jinja");
    std::fs::write(
        &t,
        "{% for m in messages %}\n{{ m.content.words.first }}{% endfor %}",
    )
    .unwrap();
    let file = t.to_str().unwrap();
    for args in [
        &[
            "-m",
            m,
            "-p",
            "hi",
            "-n",
            "1",
            "-c",
            "256",
            "--chat-template-file",
            file,
        ][..],
        &["template", "-m", m, "--chat-template-file", file],
    ] {
        expect_error(
            args,
            &[
                "rendering the conversation with the chat template file",
                "undefined.jinja",
                "undefined value",
                "line 2",
            ],
        );
    }
    std::fs::write(&t, "{{ raise_exception('only one user turn, please') }}").unwrap();
    expect_error(
        &["template", "-m", m, "--chat-template-file", file],
        &["undefined.jinja (--chat-template-file) refuses this conversation: only one user turn, please"],
    );
}

/// A greedy run of the tiny model with `extra` flags: (stdout, stderr).
fn tiny_run(extra: &[&str]) -> (String, String) {
    let m = common::shared_tiny_model().to_str().unwrap();
    let mut args = vec![
        "-m",
        m,
        "-n",
        "12",
        "--temp",
        "0",
        "-c",
        "256",
        "-t",
        "2",
        "--no-prompt-cache",
    ];
    args.extend(extra);
    let (code, out, err) = common::qwen_run_with_input(&args, "");
    assert_eq!(code, 0, "{args:?}: {err}");
    (out, err)
}

#[test]
fn llama_cpp_spellings_that_clap_would_misparse() {
    // -fa on was -f a plus a command `on`; -sys x the seed "ys"; -ctk q8_0 the context "tk".
    let (out, err) = tiny_run(&["-p", "hello", "-fa", "on"]);
    assert!(err.contains("time to first token"), "{err}");
    assert_eq!(out, tiny_run(&["-p", "hello", "-fa=off"]).0);
    let (sys, _) = tiny_run(&["-p", "hello", "-sys", "be brief"]);
    assert_eq!(sys, tiny_run(&["-p", "hello", "--system", "be brief"]).0);
    assert_ne!(sys, tiny_run(&["-p", "hello"]).0);
    let (_, err) = tiny_run(&["-p", "hello", "-ctk", "q8_0", "-ctv", "f16"]);
    assert!(err.contains("KV K q8_0 V f16"), "{err}");
    // Accepted with no effect (README says why; --no-mmap only turns the weight cache off), and
    // the prompt flags that do something.
    let (_, err) = tiny_run(&[
        "-p",
        "hello",
        "--mlock",
        "--no-mmap",
        "--prio",
        "-1",
        "-co",
        "-no-cnv",
        "-e",
        "-tb",
        "2",
        "-ub",
        "16",
        "-v",
    ]);
    assert!(err.contains("2 threads"), "{err}");
}

#[test]
fn llama_cpp_spellings_refused_with_a_reason() {
    let m = "x.gguf";
    // A single-dash word that is no flag is named, never taken as a letter and its value.
    expect_error(
        &["-m", m, "-p", "hi", "-fit", "on"],
        &["unknown flag '-fit'", "-f it"],
    );
    expect_error(
        &["-m", m, "-p", "hi", "-sm", "row"],
        &["unknown flag '-sm'"],
    );
    expect_error(
        &["-m", m, "-pHello"],
        &["unknown flag '-pHello'", "-p Hello"],
    );
    expect_error(&["serve", "-m", m, "-kvu"], &["unknown flag '-kvu'"]);
    expect_error(
        &["-m", m, "-p", "hi", "-ctk", "q4_0"],
        &["'q4_0' is one of llama.cpp's", "f32, f16 or q8_0"],
    );
    expect_error(
        &["-m", m, "-p", "hi", "-fa", "maybe"],
        &["invalid value 'maybe'", "-attn"],
    );
    expect_error(
        &["-m", m, "-p", "hi", "-tb", "3"],
        &["-tb", "one thread pool", "-t 3"],
    );
    expect_error(
        &["-m", m, "-p", "hi", "-t", "2", "-tb", "3"],
        &["must equal -t"],
    );
    expect_error(&["-m", m, "-p", "hi", "-ub", "0"], &["at least 1"]);
    expect_error(&["-m", m, "-p", "hi", "--prio", "4"], &["--prio"]);
    expect_error(&["-m", m, "-p", "hi", "-q", "-v"], &["cannot be used with"]);
    expect_error(
        &["-m", m, "-cnv", "-p", "hi", "--grammar", "root ::= \"a\""],
        &["-cnv/-i runs the interactive chat", "--grammar"],
    );
    let tiny = common::shared_tiny_model().to_str().unwrap();
    expect_error(
        &["-m", tiny, "-p", "hi", "--in-prefix", "x"],
        &["--in-prefix", "chat"],
    );
}

#[test]
fn escapes_reverse_prompts_and_the_log_file() {
    // -e is on by default: "\n" in -p is a newline, as llama-cli reads it; --no-escape keeps it.
    let (escaped, _) = tiny_run(&["-p", "a\\nb"]);
    assert_eq!(escaped, tiny_run(&["-p", "a\nb"]).0);
    assert_eq!(
        tiny_run(&["-p", "a\\nb", "--no-escape"]).0,
        tiny_run(&["-p", "a\\\\nb"]).0
    );
    // -r ends the reply before the reverse prompt.
    let (full, _) = tiny_run(&["-p", "hello"]);
    let full = full.trim_end_matches('\n');
    let cut = full.char_indices().nth(3).map_or(full.len(), |(i, _)| i);
    let stop: String = full[cut..].chars().take(2).collect();
    assert!(!stop.is_empty(), "{full:?}");
    let (out, err) = tiny_run(&["-p", "hello", "-r", &stop]);
    let before = &full[..full.find(&stop).unwrap()];
    assert_eq!(
        out.trim_end_matches('\n'),
        before.trim_end_matches('\n'),
        "stop {stop:?} in {full:?}"
    );
    assert!(err.contains("finish: stop"), "{err}");
    // --log-file: what goes to stderr also goes to the file.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("qwen-run.log");
    let (_, err) = tiny_run(&["-p", "hello", "--log-file", log.to_str().unwrap()]);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("time to first token"), "{logged}");
    assert_eq!(logged, err);
}

#[test]
fn chat_reports_on_request_and_at_the_end() {
    let m = common::shared_tiny_model().to_str().unwrap();
    let base = [
        "-m",
        m,
        "-n",
        "4",
        "--temp",
        "0",
        "-c",
        "256",
        "-t",
        "2",
        "--no-prompt-cache",
    ];
    let reports = |err: &str| {
        err.lines()
            .filter(|l| l.starts_with("[qwen-run] load"))
            .count()
    };
    // No report after each reply: one for /stats, one at the end.
    let args: Vec<&str> = ["chat"].iter().chain(&base).copied().collect();
    let (code, _, err) = common::qwen_run_with_input(&args, "hello\nagain\n/stats\nmore\n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(reports(&err), 2, "{err}");
    assert!(
        err.contains("[qwen-run] chat: 2 replies") && err.contains("[qwen-run] chat: 3 replies"),
        "{err}"
    );
    // -v: after every reply, and at the end; -q: only on /stats.
    let verbose: Vec<&str> = args.iter().copied().chain(["-v"]).collect();
    let (_, _, err) = common::qwen_run_with_input(&verbose, "hello\nagain\n");
    assert_eq!(reports(&err), 3, "{err}");
    let quiet: Vec<&str> = args.iter().copied().chain(["-q"]).collect();
    let (_, _, err) = common::qwen_run_with_input(&quiet, "hello\n/stats\n");
    assert_eq!(reports(&err), 1, "{err}");
    // -cnv (and -i) run the chat, -p its first message: as if it were typed.
    let cnv: Vec<&str> = base
        .iter()
        .copied()
        .chain(["-cnv", "-p", "hello"])
        .collect();
    let (code, out, err) = common::qwen_run_with_input(&cnv, "again\n");
    assert_eq!(code, 0, "{err}");
    let (_, typed, _) = common::qwen_run_with_input(&args, "hello\nagain\n");
    assert_eq!(out, typed);
    let i: Vec<&str> = base.iter().copied().chain(["-i"]).collect();
    assert_eq!(common::qwen_run_with_input(&i, "hello\nagain\n").1, typed);
    // --in-prefix/--in-suffix wrap what is typed.
    let wrapped: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--in-prefix", "he", "--in-suffix", "lo"])
        .collect();
    assert_eq!(
        common::qwen_run_with_input(&wrapped, "l\n").1,
        common::qwen_run_with_input(&args, "hello\n").1
    );
}

/// A greedy run of `model` with `args` (no prompt cache): exit code, stdout, stderr.
fn rope_run(model: &Path, args: &[&str]) -> (i32, String, String) {
    let m = model.to_str().unwrap();
    let mut all = vec![
        "-m",
        m,
        "-p",
        "hello there",
        "-n",
        "8",
        "--temp",
        "0",
        "-t",
        "2",
        "--no-prompt-cache",
        "--spec-type",
        "none",
    ];
    all.extend(args);
    common::qwen_run_with_input(&all, "")
}

#[test]
fn rope_scaling_flags_and_file_keys() {
    let tiny = common::shared_tiny_model();
    let t = tiny.to_str().unwrap();
    // Past the trained context (256) only with scaling, and only as far as it reaches.
    expect_error(
        &["-m", t, "-p", "hi", "-c", "1024"],
        &[
            "exceeds the model's trained context of 256",
            "--rope-scaling yarn --rope-scale 4",
        ],
    );
    expect_error(
        &[
            "-m",
            t,
            "-p",
            "hi",
            "-c",
            "2048",
            "--rope-scaling",
            "yarn",
            "--rope-scale",
            "4",
        ],
        &["exceeds the 1024 tokens this rope scaling reaches"],
    );
    let refused: [(&[&str], &[&str]); 7] = [
        (
            &["--rope-scaling", "cubic"],
            &["unknown rope scaling 'cubic'", "none, linear or yarn"],
        ),
        (&["--rope-scale", "0"], &["--rope-scale 0"]),
        (
            &["--rope-scale", "2", "--rope-freq-scale", "0.5"],
            &["cannot be used with"],
        ),
        (
            &["--yarn-ext-factor", "2"],
            &["--yarn-ext-factor 2", "between 0"],
        ),
        (&["--yarn-orig-ctx", "0"], &["--yarn-orig-ctx"]),
        (&["--rope-freq-base", "1"], &["above 1"]),
        (&["--yarn-beta-fast", "0"], &["--yarn-beta-fast 0"]),
    ];
    for (flags, needles) in refused {
        let mut args = vec!["-m", t, "-p", "hi"];
        args.extend(flags);
        expect_error(&args, needles);
    }

    let yarn = [
        "--rope-scaling",
        "yarn",
        "--rope-scale",
        "4",
        "--yarn-orig-ctx",
        "256",
    ];
    let (code, plain, err) = rope_run(tiny, &["-c", "256"]);
    assert_eq!(code, 0, "{err}");
    let mut args = yarn.to_vec();
    args.extend(["-c", "1024"]);
    let (code, flagged, err) = rope_run(tiny, &args);
    assert_eq!(code, 0, "{err}");
    // none turns scaling off whatever the factor says
    let (code, none, err) = rope_run(
        tiny,
        &["-c", "256", "--rope-scaling", "none", "--rope-scale", "4"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(none, plain);

    // A file that says the same in its metadata runs the same, and reaches the same context.
    let dir = tempfile::tempdir().unwrap();
    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    w.meta("qwen2.rope.scaling.type", Value::String("yarn".into()))
        .meta("qwen2.rope.scaling.factor", Value::F32(4.0))
        .meta(
            "qwen2.rope.scaling.original_context_length",
            Value::U32(256),
        );
    let p = dir.path().join("yarn.gguf");
    w.write(&p).unwrap();
    let (code, from_file, err) = rope_run(&p, &["-c", "1024"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ctx 1024 (rope yarn x4 of 256)"), "{err}");
    assert_eq!(from_file, flagged);
    // and --rope-scaling none undoes it
    let (code, undone, err) = rope_run(&p, &["-c", "256", "--rope-scaling", "none"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(undone, plain);

    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    w.meta("qwen2.rope.scaling.type", Value::String("longrope".into()));
    let bad = dir.path().join("bad.gguf");
    w.write(&bad).unwrap();
    let (code, _, err) = rope_run(&bad, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("'qwen2.rope.scaling.type'") && err.contains("none, linear and yarn"),
        "{err}"
    );
}

#[test]
fn the_disk_prompt_cache_is_keyed_by_the_rope_settings() {
    let tiny = common::shared_tiny_model().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().to_str().unwrap();
    let prompt = "the cat sat on the mat ".repeat(7);
    let run = |rope: &[&str]| {
        let mut args = vec![
            "-m",
            tiny,
            "-p",
            &prompt,
            "-n",
            "2",
            "--temp",
            "0",
            "-c",
            "256",
            "-t",
            "2",
            "--prompt-cache",
            cache,
        ];
        args.extend(rope);
        let (code, _, err) = common::qwen_run_with_input(&args, "");
        assert_eq!(code, 0, "{err}");
        err
    };
    run(&[]);
    assert!(
        run(&[]).contains("from disk"),
        "a second plain run reuses the prefix"
    );
    let linear = ["--rope-scaling", "linear", "--rope-scale", "2"];
    let scaled = run(&linear);
    assert!(
        !scaled.contains("from disk"),
        "keys rotated otherwise: {scaled}"
    );
    assert!(run(&linear).contains("from disk"));
}
