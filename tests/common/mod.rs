//! Test fixtures: tiny Qwen2 GGUF files with random weights and the real tensor layout, and the
//! paths of the real test models fetched by `models/fetch.py`.
#![allow(dead_code)]

pub mod server;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use qwen_run::gguf::{GgufWriter, Value};
use qwen_run_kernels::QuantType;
use std::path::{Path, PathBuf};

pub const HIDDEN: usize = 256;
pub const FFN: usize = 512;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const LAYERS: usize = 2;

/// A byte-level vocabulary: the 256 byte symbols, a few merges, and Qwen's special tokens.
pub fn tokenizer_metadata(w: &mut GgufWriter) -> usize {
    tokenizer_metadata_with(w, 0)
}

/// [`tokenizer_metadata`] with `extra` plain tokens after the special ones (a larger vocabulary
/// with the same ids for what both have).
pub fn tokenizer_metadata_with(w: &mut GgufWriter, extra: usize) -> usize {
    let mut tokens: Vec<String> = byte_symbols();
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1i32; tokens.len()];
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(3);
    }
    let n = tokens.len();
    for i in 0..extra {
        tokens.push(format!("extra{i}"));
        types.push(1);
    }
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("qwen2".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        )
        .meta(
            "tokenizer.ggml.merges",
            Value::Array(
                merges
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        )
        .meta("tokenizer.ggml.eos_token_id", Value::U32(n as u32 - 1))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(n as u32 - 3))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false));
    n + extra
}

/// GPT-2's byte-to-symbol alphabet, in byte order.
fn byte_symbols() -> Vec<String> {
    let mut shifted = 0u32;
    (0..=255u8)
        .map(|b| {
            let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            if printable {
                char::from(b).to_string()
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap().to_string()
            }
        })
        .collect()
}

fn candle_dtype(ty: QuantType) -> Option<GgmlDType> {
    Some(match ty {
        QuantType::F32 => GgmlDType::F32,
        QuantType::F16 => GgmlDType::F16,
        QuantType::BF16 => GgmlDType::BF16,
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4_1 => GgmlDType::Q4_1,
        QuantType::Q5_0 => GgmlDType::Q5_0,
        QuantType::Q5_1 => GgmlDType::Q5_1,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q2K => GgmlDType::Q2K,
        QuantType::Q3K => GgmlDType::Q3K,
        QuantType::Q4K => GgmlDType::Q4K,
        QuantType::Q5K => GgmlDType::Q5K,
        QuantType::Q6K => GgmlDType::Q6K,
        QuantType::Q8K => GgmlDType::Q8K,
        // the i-quants
        _ => return None,
    })
}

/// Random weights of `rows x cols`, quantized to `ty` (by Candle, an independent quantizer).
pub fn random_weights(ty: QuantType, rows: usize, cols: usize, scale: f32, seed: u64) -> Vec<u8> {
    let n = rows * cols;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    let Some(dtype) = candle_dtype(ty) else {
        return random_iquant_blocks(ty, rows * cols, scale, values);
    };
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    q.data().unwrap().into_owned()
}

/// `n` values of an i-quant (which Candle cannot quantize to): blocks of bytes drawn from
/// `values`, with d chosen so that the values are about `scale` in size.
fn random_iquant_blocks(ty: QuantType, n: usize, scale: f32, values: Vec<f32>) -> Vec<u8> {
    let mut bytes: Vec<u8> = values
        .iter()
        .cycle()
        .take(n / ty.block_size() * ty.block_bytes())
        .map(|v| (v.to_bits() >> 7) as u8)
        .collect();
    for b in bytes.chunks_exact_mut(ty.block_bytes()) {
        let d = if ty.is_grid_iquant() {
            // the largest value of the block with d = 1 becomes `scale`
            qwen_run_kernels::set_iquant_d(ty, b, 1.0);
            let mut v = vec![0f32; ty.block_size()];
            qwen_run_kernels::dequantize(ty, b, &mut v);
            scale / v.iter().fold(1e-3f32, |m, x| m.max(x.abs()))
        } else {
            // the largest grid value is 127; IQ4_XS's sub-block scales average about 16
            scale / 127.0 / if ty == QuantType::IQ4XS { 16.0 } else { 1.0 }
        };
        qwen_run_kernels::set_iquant_d(ty, b, d);
    }
    bytes
}

/// A complete tiny Qwen2 model whose matrices are of type `ty`.
pub fn tiny_model_writer(ty: QuantType) -> GgufWriter {
    tiny_model_writer_with_vocab(ty, 0)
}

/// [`tiny_model_writer`] with `extra` tokens after the vocabulary's (see
/// [`tokenizer_metadata_with`]).
pub fn tiny_model_writer_with_vocab(ty: QuantType, extra: usize) -> GgufWriter {
    let mut w = GgufWriter::new();
    let vocab = tokenizer_metadata_with(&mut w, extra);
    let chatml = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
    w.meta("general.architecture", Value::String("qwen2".into()))
        .meta("general.name", Value::String("tiny-test".into()))
        .meta("qwen2.block_count", Value::U32(LAYERS as u32))
        .meta("qwen2.context_length", Value::U32(256))
        .meta("qwen2.embedding_length", Value::U32(HIDDEN as u32))
        .meta("qwen2.feed_forward_length", Value::U32(FFN as u32))
        .meta("qwen2.attention.head_count", Value::U32(HEADS as u32))
        .meta("qwen2.attention.head_count_kv", Value::U32(KV_HEADS as u32))
        .meta("qwen2.rope.freq_base", Value::F32(10000.0))
        .meta("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6))
        .meta("tokenizer.chat_template", Value::String(chatml.into()));
    let kv = KV_HEADS * HIDDEN / HEADS;
    let mut seed = 1;
    let mut mat = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: QuantType| {
        seed += 1;
        // Norm weights and biases are 1-D in real files.
        let dims = if rows == 1 {
            vec![cols]
        } else {
            vec![cols, rows]
        };
        w.tensor(name, &dims, ty, random_weights(ty, rows, cols, 0.5, seed))
            .unwrap();
    };
    mat(&mut w, "token_embd.weight", vocab, HIDDEN, ty);
    for i in 0..LAYERS {
        let p = format!("blk.{i}");
        mat(
            &mut w,
            &format!("{p}.attn_norm.weight"),
            1,
            HIDDEN,
            QuantType::F32,
        );
        mat(&mut w, &format!("{p}.attn_q.weight"), HIDDEN, HIDDEN, ty);
        mat(
            &mut w,
            &format!("{p}.attn_q.bias"),
            1,
            HIDDEN,
            QuantType::F32,
        );
        mat(&mut w, &format!("{p}.attn_k.weight"), kv, HIDDEN, ty);
        mat(&mut w, &format!("{p}.attn_k.bias"), 1, kv, QuantType::F32);
        mat(&mut w, &format!("{p}.attn_v.weight"), kv, HIDDEN, ty);
        mat(&mut w, &format!("{p}.attn_v.bias"), 1, kv, QuantType::F32);
        mat(
            &mut w,
            &format!("{p}.attn_output.weight"),
            HIDDEN,
            HIDDEN,
            ty,
        );
        mat(
            &mut w,
            &format!("{p}.ffn_norm.weight"),
            1,
            HIDDEN,
            QuantType::F32,
        );
        mat(&mut w, &format!("{p}.ffn_gate.weight"), FFN, HIDDEN, ty);
        mat(&mut w, &format!("{p}.ffn_up.weight"), FFN, HIDDEN, ty);
        mat(&mut w, &format!("{p}.ffn_down.weight"), HIDDEN, FFN, ty);
    }
    mat(&mut w, "output_norm.weight", 1, HIDDEN, QuantType::F32);
    mat(&mut w, "output.weight", vocab, HIDDEN, ty);
    w
}

/// One Q8_0 tiny model per test binary, written on first use.
pub fn shared_tiny_model() -> &'static Path {
    static PATH: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = write_tiny_model(dir.path(), QuantType::Q8_0);
            (dir, p)
        })
        .1
}

pub fn write_tiny_model(dir: &Path, ty: QuantType) -> PathBuf {
    let path = dir.join(format!("tiny-{}.gguf", ty.name()));
    tiny_model_writer(ty).write(&path).unwrap();
    path
}

/// A real test model, fetched and verified by `models/fetch.py` (which CI runs first).
pub fn real_model(size: &str) -> PathBuf {
    let var = format!("QWEN_RUN_MODEL_{}", size.replace('.', "_").to_uppercase());
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new("python3")
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/models/fetch.py"),
            size,
        ])
        .output()
        .expect("python3 runs");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && Path::new(&path).exists(),
        "the real {size} test model could not be fetched: run `python3 models/fetch.py {size}` (or set {var}). {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(path)
}

/// Runs the binary with `stdin` as its input: (exit code, stdout, stderr). Fails on a panic.
pub fn qwen_run_with_input(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}
