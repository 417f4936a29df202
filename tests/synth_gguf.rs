//! The synthetic Qwen2.5-7B-Instruct Q5_K_M writer (`models/synth_gguf.rs`): its tensor layout
//! against the real file's, and a one-layer, small-vocabulary instance that qwen-run loads and runs.

mod common;

#[path = "../models/synth_gguf.rs"]
#[allow(dead_code)]
mod synth_gguf;

use qwen_run::gguf::{GgufFile, Value};
use qwen_run_kernels::QuantType;
use std::process::Command;
use synth_gguf::{spec, use_more_bits, Options};

#[test]
fn the_full_spec_is_qwen2_5_7b_instruct_q5_k_m() {
    let s = spec(28, 152064);
    // llama-quantize's Q5_K_M of Qwen2.5-7B-Instruct: 339 tensors.
    assert_eq!(s.len(), 339);
    let count = |ty| s.iter().filter(|t| t.ty == ty).count();
    assert_eq!(count(QuantType::Q5K), 169);
    assert_eq!(count(QuantType::Q6K), 29);
    assert_eq!(count(QuantType::F32), 141);
    let find = |name: &str| s.iter().find(|t| t.name == name).unwrap().clone();
    assert_eq!(find("token_embd.weight").dims, [3584, 152064]);
    assert_eq!(find("token_embd.weight").ty, QuantType::Q5K);
    assert_eq!(find("output.weight").dims, [3584, 152064]);
    assert_eq!(find("output.weight").ty, QuantType::Q6K);
    assert_eq!(find("blk.0.attn_k.weight").dims, [3584, 512]);
    assert_eq!(find("blk.0.attn_k.bias").dims, [512]);
    assert_eq!(find("blk.0.attn_q.bias").ty, QuantType::F32);
    assert_eq!(find("blk.27.ffn_down.weight").dims, [18944, 3584]);
    assert_eq!(find("blk.27.ffn_gate.weight").dims, [3584, 18944]);
    // use_more_bits for 28 layers: 0-2, 24-27, and 5, 8, ..., 23.
    let more: Vec<usize> = (0..28).filter(|&i| use_more_bits(i, 28)).collect();
    assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
    for i in 0..28 {
        let want = if more.contains(&i) {
            QuantType::Q6K
        } else {
            QuantType::Q5K
        };
        assert_eq!(
            find(&format!("blk.{i}.attn_v.weight")).ty,
            want,
            "layer {i}"
        );
        assert_eq!(
            find(&format!("blk.{i}.ffn_down.weight")).ty,
            want,
            "layer {i}"
        );
        assert_eq!(find(&format!("blk.{i}.attn_q.weight")).ty, QuantType::Q5K);
    }
}

#[test]
fn a_one_layer_synthetic_model_loads_and_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let like = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let out = dir.path().join("synthetic.gguf");
    let opts = Options {
        like: like.clone(),
        out: out.clone(),
        layers: 1,
        vocab: 320,
    };
    synth_gguf::write(&opts).unwrap();

    let g = GgufFile::open(&out).unwrap();
    let got: Vec<(String, Vec<usize>, QuantType)> = g
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone(), t.ty))
        .collect();
    let want: Vec<(String, Vec<usize>, QuantType)> = spec(1, 320)
        .into_iter()
        .map(|t| (t.name, t.dims, t.ty))
        .collect();
    assert_eq!(got, want);
    // With one layer, that layer is a "more bits" one.
    assert_eq!(
        g.tensor("blk.0.ffn_down.weight").unwrap().ty,
        QuantType::Q6K
    );
    assert_eq!(g.get_u64("general.file_type").unwrap(), 17);
    assert_eq!(g.get_u64("qwen2.embedding_length").unwrap(), 3584);
    assert_eq!(g.get_u64("qwen2.context_length").unwrap(), 32768);
    assert_eq!(g.get_u64("qwen2.attention.head_count_kv").unwrap(), 4);
    assert_eq!(g.get_f64("qwen2.rope.freq_base").unwrap(), 1e6);
    // The tokenizer and template are the --like model's, the token list padded to the rows.
    let src = GgufFile::open(&like).unwrap();
    assert_eq!(
        g.get("tokenizer.chat_template"),
        src.get("tokenizer.chat_template")
    );
    let tokens = g.get_array("tokenizer.ggml.tokens").unwrap();
    let n_src = src.get_array("tokenizer.ggml.tokens").unwrap().len();
    assert_eq!(tokens.len(), 320);
    assert_eq!(
        tokens[..n_src],
        src.get_array("tokenizer.ggml.tokens").unwrap()[..]
    );
    assert_eq!(tokens[319], Value::String("[PAD319]".into()));
    assert_eq!(g.get_array("tokenizer.ggml.token_type").unwrap().len(), 320);

    let run = Command::new(env!("CARGO_BIN_EXE_qwen-run"))
        .args(["-m", out.to_str().unwrap(), "-p", "hello", "-n", "2"])
        .args(["--temp", "0", "-c", "64", "-t", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("decode"), "no report: {stderr}");
}
