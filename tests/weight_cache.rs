//! The weight cache: a load maps the CPU copy of the weights an earlier load stored, and a file
//! that is truncated, corrupt or another model's is rejected and rewritten, with the same
//! output every time.

mod common;

use qwen_run::bench::fidelity::greedy_match;
use qwen_run::engine::{Engine, LoadOptions};
use qwen_run::model::{layout_probe, Logits, WeightCache};
use qwen_run::prefix_cache::model_identity;
use qwen_run_kernels::QuantType;
use std::fs;
use std::path::{Path, PathBuf};

fn options(model: &Path, cache: Option<&Path>) -> LoadOptions {
    let mut o = LoadOptions::new(model);
    o.threads = 2;
    o.ctx_size = 128;
    o.weight_cache = cache.map(Path::to_path_buf);
    o
}

fn cache_file(model: &Path, dir: &Path) -> PathBuf {
    WeightCache {
        dir: dir.to_path_buf(),
        model: model_identity(&[model.to_path_buf()]).unwrap(),
    }
    .path(layout_probe())
}

/// Every position's logits for a fixed prompt.
fn logits(model: &Path, cache: Option<&Path>) -> Vec<Vec<f32>> {
    let e = Engine::load(&options(model, cache)).unwrap();
    let mut s = e.new_session().unwrap();
    e.forward(&mut s, &[1, 2, 3, 4, 5, 6, 7, 8], Logits::All)
        .unwrap()
}

#[test]
fn a_bad_cache_file_is_rejected_and_rewritten() {
    if qwen_run_kernels::best_packing(QuantType::Q8_0, 4) != qwen_run_kernels::Packing::Rows4 {
        return; // the scalar kernels read the GGUF layout: there is nothing to cache
    }
    let dir = tempfile::tempdir().unwrap();
    let model = common::write_tiny_model(dir.path(), QuantType::Q8_0);
    let other = common::write_tiny_model(dir.path(), QuantType::Q4_0);
    let cache = dir.path().join("weight-cache");
    let file = cache_file(&model, &cache);

    let want = logits(&model, None);
    assert!(!file.exists(), "no cache directory, no file");
    assert_eq!(logits(&model, Some(&cache)), want, "the load that writes");
    let good = fs::read(&file).expect("the load stored its copies");
    assert_eq!(logits(&model, Some(&cache)), want, "the load that maps");

    let rewritten = |bad: &[u8], what: &str| {
        fs::write(&file, bad).unwrap();
        assert_eq!(logits(&model, Some(&cache)), want, "{what}");
        assert_eq!(fs::read(&file).unwrap(), good, "{what}: not rewritten");
    };
    rewritten(&good[..good.len() - 100], "truncated");
    rewritten(&good[..10], "truncated in the header");
    let mut corrupt = good.clone();
    corrupt[100] ^= 1;
    rewritten(&corrupt, "a corrupt index");
    let mut corrupt = good.clone();
    corrupt[4096] ^= 1;
    rewritten(&corrupt, "corrupt data");
    // Another model's file under this model's name.
    let _ = logits(&other, Some(&cache));
    let foreign = fs::read(cache_file(&other, &cache)).unwrap();
    rewritten(&foreign, "another model's file");
}

/// The real 0.5B decodes the same tokens from its own copy, the file's, and without a cache.
#[test]
fn greedy_output_is_the_same_with_and_without_the_cache() {
    let model = common::real_model("0.5b");
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = Engine::load(&options(&model, None))
        .unwrap()
        .tokenizer
        .encode("<|im_start|>user\nWrite a function that reverses a string in Rust.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let greedy = |cache: Option<&Path>| {
        let e = Engine::load(&options(&model, cache)).unwrap();
        greedy_match(&e, &prompt, &[0; 32]).unwrap().1
    };
    let want = greedy(None);
    assert_eq!(want.len(), 32);
    assert_eq!(greedy(Some(dir.path())), want, "the load that writes");
    assert!(cache_file(&model, dir.path()).exists());
    assert_eq!(greedy(Some(dir.path())), want, "the load that maps");
}
