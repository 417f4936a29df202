//! A synthetic Qwen2.5-7B-Instruct Q5_K_M: the exact tensor names, shapes and types of the real
//! file (llama.cpp's Q5_K_M mix), random weights, and the tokenizer and chat template of a small
//! real model. It exists to benchmark the 7B's memory traffic (on a GPU, or the CPU) where the real
//! 5.4 GB file cannot be downloaded; its output is gibberish.
//!
//! ```sh
//! cargo run --release --example synth-gguf -- --like $(python3 models/fetch.py 0.5b) \
//!     --out /tmp/qwen2.5-7b-instruct-q5_k_m-synthetic.gguf [--layers N]
//! ```
//!
//! Quantizing 7.6 billion random floats would take hours, so for each distinct (type, row length)
//! 256 random rows (~N(0, 0.02)) are quantized once with Candle's quantizer and their blocks are
//! tiled over every tensor of that kind (from a per-tensor starting row). The blocks are valid and
//! their scales realistic. The file is streamed to disk, so memory stays at a few MB.
//! `tests/synth_gguf.rs` includes this file as a module.

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use clap::Parser;
use qwen_run::gguf::{GgufFile, GgufWriter, TensorSource, Value};
use qwen_run_kernels::QuantType;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Qwen2.5-7B-Instruct's shape.
pub const HIDDEN: usize = 3584;
pub const FFN: usize = 18944;
pub const LAYERS: usize = 28;
pub const HEADS: usize = 28;
pub const KV_HEADS: usize = 4;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const VOCAB: usize = 152064;
pub const CONTEXT: u32 = 32768;
/// llama.cpp's LLAMA_FTYPE_MOSTLY_Q5_K_M.
pub const FILE_TYPE_Q5_K_M: u32 = 17;
/// Rows quantized per distinct (type, row length), then tiled.
const TILE_ROWS: usize = 256;
/// Standard deviation of the random weights: keeps activations finite through 28 layers.
const WEIGHT_STD: f32 = 0.02;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "synth-gguf",
    about = "Write a synthetic Qwen2.5-7B-Instruct Q5_K_M GGUF (random weights, real layout)"
)]
pub struct Options {
    /// A small real Qwen2 GGUF whose tokenizer and chat template are copied.
    #[arg(long)]
    pub like: PathBuf,
    /// Output file.
    #[arg(long, default_value = "/tmp/qwen2.5-7b-instruct-q5_k_m-synthetic.gguf")]
    pub out: PathBuf,
    /// Number of transformer layers (28 in the real model); fewer makes a smaller file, with the
    /// Q5_K_M type mix computed for that many layers.
    #[arg(long, default_value_t = LAYERS)]
    pub layers: usize,
    /// Embedding/output rows (tests only: shrinks the 152064-row tables).
    #[arg(long, default_value_t = VOCAB, hide = true)]
    pub vocab: usize,
}

/// One tensor of the file: name, dims in ggml order (innermost first), type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: QuantType,
}

/// llama.cpp's `use_more_bits`: the layers where Q4_K_M/Q5_K_M give attn_v and ffn_down Q6_K.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    // Short-circuit: the subtraction only runs when i >= n / 8.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The tensors of Qwen2.5-7B-Instruct Q5_K_M with `layers` layers and `vocab` embedding rows, in
/// file order.
pub fn spec(layers: usize, vocab: usize) -> Vec<TensorSpec> {
    let kv = KV_HEADS * HEAD_DIM;
    let mut out = Vec::new();
    let mut t = |name: String, dims: &[usize], ty: QuantType| {
        out.push(TensorSpec {
            name,
            dims: dims.to_vec(),
            ty,
        })
    };
    let (q5, q6, f32) = (QuantType::Q5K, QuantType::Q6K, QuantType::F32);
    t("token_embd.weight".into(), &[HIDDEN, vocab], q5);
    for i in 0..layers {
        let more = if use_more_bits(i, layers) { q6 } else { q5 };
        let p = format!("blk.{i}");
        t(format!("{p}.attn_norm.weight"), &[HIDDEN], f32);
        t(format!("{p}.attn_q.weight"), &[HIDDEN, HIDDEN], q5);
        t(format!("{p}.attn_q.bias"), &[HIDDEN], f32);
        t(format!("{p}.attn_k.weight"), &[HIDDEN, kv], q5);
        t(format!("{p}.attn_k.bias"), &[kv], f32);
        t(format!("{p}.attn_v.weight"), &[HIDDEN, kv], more);
        t(format!("{p}.attn_v.bias"), &[kv], f32);
        t(format!("{p}.attn_output.weight"), &[HIDDEN, HIDDEN], q5);
        t(format!("{p}.ffn_norm.weight"), &[HIDDEN], f32);
        t(format!("{p}.ffn_gate.weight"), &[HIDDEN, FFN], q5);
        t(format!("{p}.ffn_up.weight"), &[HIDDEN, FFN], q5);
        t(format!("{p}.ffn_down.weight"), &[FFN, HIDDEN], more);
    }
    t("output_norm.weight".into(), &[HIDDEN], f32);
    t("output.weight".into(), &[HIDDEN, vocab], q6);
    out
}

/// What [`write`] did.
#[derive(Debug)]
pub struct Summary {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// A small deterministic generator (splitmix64), with Box-Muller normals.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    fn normal(&mut self, std: f32) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos() * std
    }
}

fn candle_dtype(ty: QuantType) -> Result<GgmlDType> {
    Ok(match ty {
        QuantType::Q5K => GgmlDType::Q5K,
        QuantType::Q6K => GgmlDType::Q6K,
        QuantType::Q4K => GgmlDType::Q4K,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        other => bail!("synth-gguf does not tile {} tensors", other.name()),
    })
}

/// `TILE_ROWS` random rows of `cols` values, quantized to `ty` by Candle.
fn quantized_tile(ty: QuantType, cols: usize, rng: &mut Rng) -> Result<Vec<u8>> {
    let values: Vec<f32> = (0..TILE_ROWS * cols)
        .map(|_| rng.normal(WEIGHT_STD))
        .collect();
    let t = Tensor::from_vec(values, (TILE_ROWS, cols), &Device::Cpu)?;
    let q = QTensor::quantize(&t, candle_dtype(ty)?)?;
    let bytes = q.data()?.into_owned();
    ensure!(
        Some(bytes.len()) == ty.row_bytes(TILE_ROWS * cols),
        "Candle's {} quantization of {TILE_ROWS}x{cols} gave {} bytes",
        ty.name(),
        bytes.len()
    );
    Ok(bytes)
}

/// Writes `rows` rows by cycling through `tile`'s rows, starting at row `start`.
fn tiled_source(tile: Arc<Vec<u8>>, rows: usize, start: usize) -> TensorSource {
    Arc::new(move |w: &mut dyn Write| {
        let rb = tile.len() / TILE_ROWS;
        let (mut done, mut pos) = (0, start % TILE_ROWS);
        while done < rows {
            let take = (TILE_ROWS - pos).min(rows - done);
            w.write_all(&tile[pos * rb..(pos + take) * rb])?;
            done += take;
            pos = 0;
        }
        Ok(())
    })
}

/// The tokenizer (and chat template) of `like`, its token list padded to `vocab` entries the
/// way llama.cpp's converter pads Qwen's (`[PAD{i}]`, type unused).
fn tokenizer_metadata(like: &GgufFile, vocab: usize) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for (k, v) in &like.metadata {
        if !k.starts_with("tokenizer.") {
            continue;
        }
        let v = match (k.as_str(), v) {
            ("tokenizer.ggml.tokens", Value::Array(tokens)) => {
                ensure!(
                    tokens.len() <= vocab,
                    "{} has {} tokens, more than the {vocab} embedding rows asked for",
                    like.path.display(),
                    tokens.len()
                );
                let mut tokens = tokens.clone();
                for i in tokens.len()..vocab {
                    tokens.push(Value::String(format!("[PAD{i}]")));
                }
                Value::Array(tokens)
            }
            ("tokenizer.ggml.token_type", Value::Array(types)) => {
                let mut types = types.clone();
                types.resize(vocab.max(types.len()), Value::I32(5));
                Value::Array(types)
            }
            _ => v.clone(),
        };
        out.push((k.clone(), v));
    }
    ensure!(
        out.iter().any(|(k, _)| k == "tokenizer.ggml.tokens"),
        "{} has no tokenizer (tokenizer.ggml.tokens); --like needs a Qwen2 GGUF",
        like.path.display()
    );
    Ok(out)
}

/// Writes the synthetic model described by `opts`.
pub fn write(opts: &Options) -> Result<Summary> {
    let t0 = Instant::now();
    ensure!(opts.layers >= 1, "--layers must be at least 1");
    ensure!(opts.vocab >= 1, "--vocab must be at least 1");
    let like =
        GgufFile::open(&opts.like).with_context(|| format!("--like {}", opts.like.display()))?;
    let mut w = GgufWriter::new();
    let name = if opts.layers == LAYERS && opts.vocab == VOCAB {
        "Qwen2.5 7B Instruct (synthetic)".to_string()
    } else {
        format!(
            "Qwen2.5 7B Instruct (synthetic, {} layers, {} rows)",
            opts.layers, opts.vocab
        )
    };
    w.meta("general.architecture", Value::String("qwen2".into()))
        .meta("general.type", Value::String("model".into()))
        .meta("general.name", Value::String(name))
        .meta("general.basename", Value::String("Qwen2.5".into()))
        .meta("general.finetune", Value::String("Instruct".into()))
        .meta("general.size_label", Value::String("7B".into()))
        .meta(
            "general.description",
            Value::String(
                "synthetic: Qwen2.5-7B-Instruct Q5_K_M layout with random weights (qwen-run models/synth_gguf.rs); for benchmarks only".into(),
            ),
        )
        .meta("qwen2.block_count", Value::U32(opts.layers as u32))
        .meta("qwen2.context_length", Value::U32(CONTEXT))
        .meta("qwen2.embedding_length", Value::U32(HIDDEN as u32))
        .meta("qwen2.feed_forward_length", Value::U32(FFN as u32))
        .meta("qwen2.attention.head_count", Value::U32(HEADS as u32))
        .meta("qwen2.attention.head_count_kv", Value::U32(KV_HEADS as u32))
        .meta("qwen2.rope.freq_base", Value::F32(1_000_000.0))
        .meta("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6))
        .meta("general.file_type", Value::U32(FILE_TYPE_Q5_K_M));
    for (k, v) in tokenizer_metadata(&like, opts.vocab)? {
        w.meta(&k, v);
    }
    w.meta("general.quantization_version", Value::U32(2));

    let mut rng = Rng(0x5157_454e_2e35_3742);
    let mut tiles: HashMap<(QuantType, usize), Arc<Vec<u8>>> = HashMap::new();
    let spec = spec(opts.layers, opts.vocab);
    for (k, t) in spec.iter().enumerate() {
        let cols = t.dims[0];
        if t.ty == QuantType::F32 {
            // Norm weights around 1, biases around 0.
            let norm = t.name.contains("norm");
            let bytes: Vec<u8> = (0..cols)
                .map(|_| rng.normal(WEIGHT_STD) + if norm { 1.0 } else { 0.0 })
                .flat_map(f32::to_le_bytes)
                .collect();
            w.tensor(&t.name, &t.dims, t.ty, bytes)?;
            continue;
        }
        let tile = match tiles.get(&(t.ty, cols)) {
            Some(tile) => tile.clone(),
            None => {
                let tile = Arc::new(quantized_tile(t.ty, cols, &mut rng)?);
                tiles.insert((t.ty, cols), tile.clone());
                tile
            }
        };
        let rows = t.dims[1];
        let start = (k * 97) % TILE_ROWS;
        w.tensor_streamed(&t.name, &t.dims, t.ty, tiled_source(tile, rows, start))?;
    }
    let tmp = opts.out.with_extension("gguf.part");
    w.write(&tmp)?;
    std::fs::rename(&tmp, &opts.out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), opts.out.display()))?;
    Ok(Summary {
        tensors: spec.len(),
        bytes: std::fs::metadata(&opts.out)?.len(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let opts = Options::parse();
    let s = write(&opts)?;
    eprintln!(
        "synth-gguf: wrote {} ({} tensors, {:.2} GB) in {:.1} s",
        opts.out.display(),
        s.tensors,
        s.bytes as f64 / 1e9,
        s.seconds
    );
    println!("{}", opts.out.display());
    Ok(())
}
