//! Prompt-prefix caching on tiny random-weight models: output with the cache (in memory and on
//! disk) is token-identical to output without it; bad cache files are rejected with a warning;
//! both caches stay within their budgets; the q8_0 KV cache stays close to f32; `qwen-run chat`
//! carries a conversation across turns.

mod common;

use common::*;
use qwen_run::engine::{CacheSource, Engine, Generation, LoadOptions};
use qwen_run::kv_cache::{CacheType, KvBlock};
use qwen_run::model::Logits;
use qwen_run::prefix_cache::{chain_hashes, model_identity, DiskCache, Shape};
use qwen_run::sampler::{Sampler, SamplingParams};
use qwen_run_kernels::QuantType;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const BLOCK: usize = 16;

fn options(model: &Path) -> LoadOptions {
    let mut o = LoadOptions::new(model);
    o.threads = 2;
    o.ctx_size = 256;
    o.prefix_block = BLOCK;
    o
}

fn no_cache(model: &Path) -> Engine {
    let mut o = options(model);
    o.cache_ram_mib = 0;
    Engine::load(&o).unwrap()
}

fn generate(engine: &Engine, prompt: &[u32]) -> Generation {
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut s = engine.new_session().unwrap();
    engine
        .generate(&mut s, prompt, 10, &mut sampler, |_| true)
        .unwrap()
}

/// A long "system prompt" of about `n` tokens (the tiny vocabulary is mostly single bytes).
fn system_text(n: usize, salt: usize) -> String {
    (0..n)
        .map(|i| char::from(b'a' + ((i * 7 + salt * 3 + i / 5) % 26) as u8))
        .collect()
}

fn tokens(engine: &Engine, text: &str) -> Vec<u32> {
    engine.tokenizer.encode(text).unwrap()
}

#[test]
fn memory_cache_output_is_token_identical() {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Engine>();
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), QuantType::Q8_0);
    let reference = no_cache(&model);
    let cached = Engine::load(&options(&model)).unwrap();
    let system = system_text(120, 0);
    let prompts: Vec<Vec<u32>> = ["one question", "another, longer question?", "one question"]
        .iter()
        .map(|q| tokens(&cached, &format!("{system}\n{q}")))
        .collect();
    for (i, p) in prompts.iter().enumerate() {
        let want = generate(&reference, p);
        let got = generate(&cached, p);
        assert_eq!(got.tokens, want.tokens, "prompt {i}");
        if i == 0 {
            assert_eq!(got.reused_tokens, 0);
        } else {
            // Every whole block of the shared system prompt comes from the cache.
            assert!(
                got.reused_tokens >= 120 / BLOCK * BLOCK,
                "{}",
                got.reused_tokens
            );
            assert_eq!(got.cache_source, CacheSource::Memory);
        }
    }
    // A prompt that is exactly whole blocks still runs its last token.
    let exact = &prompts[0][..BLOCK * 4];
    let want = generate(&reference, exact);
    let _ = generate(&cached, exact);
    let got = generate(&cached, exact);
    assert_eq!(got.reused_tokens, BLOCK * 4 - 1);
    assert_eq!(got.tokens, want.tokens);
    // A session that already holds part of the prompt is extended from the cache.
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut s = cached.new_session().unwrap();
    cached
        .generate(&mut s, &prompts[0][..20], 1, &mut sampler, |_| true)
        .unwrap();
    let g = cached
        .generate(&mut s, &prompts[1], 10, &mut sampler, |_| true)
        .unwrap();
    assert_eq!(g.cache_source, CacheSource::Memory);
    assert_eq!(g.tokens, generate(&reference, &prompts[1]).tokens);
}

#[test]
fn disk_cache_output_is_token_identical_in_a_new_engine() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("prompt-cache");
    let model = write_tiny_model(dir.path(), QuantType::Q4K);
    let reference = no_cache(&model);
    let with_disk = || {
        let mut o = options(&model);
        o.prompt_cache = Some(cache_dir.clone());
        Engine::load(&o).unwrap()
    };
    let system = system_text(150, 1);
    let first = with_disk();
    let p1 = tokens(&first, &format!("{system}\nfirst"));
    assert_eq!(
        generate(&first, &p1).tokens,
        generate(&reference, &p1).tokens
    );
    // One file per whole block of the prompt, once the cache's thread has written them.
    first.prompt_cache().flush();
    assert_eq!(cache_files(&cache_dir).len(), p1.len() / BLOCK);
    // A new engine (a new process, as far as the cache can tell) with an empty memory cache.
    let second = with_disk();
    let p2 = tokens(&second, &format!("{system}\nsecond question"));
    let g = generate(&second, &p2);
    assert_eq!(g.cache_source, CacheSource::Disk);
    assert!(
        g.reused_tokens >= 150 / BLOCK * BLOCK,
        "{}",
        g.reused_tokens
    );
    assert_eq!(g.tokens, generate(&reference, &p2).tokens);
    // Then memory serves it.
    assert_eq!(generate(&second, &p2).cache_source, CacheSource::Memory);
    // Without the memory cache the disk alone serves it too.
    let mut o = options(&model);
    o.prompt_cache = Some(cache_dir.clone());
    o.cache_ram_mib = 0;
    let third = Engine::load(&o).unwrap();
    let g = generate(&third, &p1);
    assert_eq!(g.cache_source, CacheSource::Disk);
    assert_eq!(g.tokens, generate(&reference, &p1).tokens);
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "qkv"));
    v.sort();
    v
}

fn smallest(files: &[PathBuf]) -> PathBuf {
    files
        .iter()
        .min_by_key(|f| f.metadata().unwrap().len())
        .unwrap()
        .clone()
}

fn new_files(dir: &Path, before: &[PathBuf]) -> Vec<PathBuf> {
    let mut v = cache_files(dir);
    v.retain(|p| !before.contains(p));
    v
}

#[test]
fn bad_disk_cache_files_are_rejected_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("pc");
    let model = write_tiny_model(dir.path(), QuantType::Q8_0);
    let other_model = write_tiny_model(dir.path(), QuantType::Q5_0);
    let prompt = format!("{}\nquestion", system_text(150, 2));
    let run = |model: &Path, extra: &[&str]| {
        let mut args = vec![
            "-m",
            model.to_str().unwrap(),
            "--no-chat-template",
            "-p",
            &prompt,
            "-n",
            "6",
            "--temp",
            "0",
            "-t",
            "2",
            "--prompt-cache",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = qwen_run_with_input(&args, "");
        assert_eq!(code, 0, "{err}");
        (out, err)
    };
    let (want, err) = run(&model, &[]);
    assert!(!err.contains("from disk"), "{err}");
    // One file per 64-token block; the first block's file is the smallest (each file holds the
    // token ids of its whole prefix).
    let files = [smallest(&cache_files(&cache))];
    assert!(cache_files(&cache).len() >= 2);
    let good = std::fs::read(&files[0]).unwrap();
    let (out, err) = run(&model, &[]);
    assert!(err.contains("from disk prompt cache"), "{err}");
    assert_eq!(out, want);

    let expect_rejected = |bytes: &[u8], path: &Path, model: &Path, extra: &[&str], why: &str| {
        std::fs::write(path, bytes).unwrap();
        let (out, err) = run(model, extra);
        assert!(
            err.contains("warning: ignoring prompt cache file") && err.contains(why),
            "{why}: {err}"
        );
        assert!(!err.contains("from disk"), "{why}: used anyway: {err}");
        out
    };
    // Corrupt: one flipped bit in the KV data.
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x10;
    assert_eq!(
        expect_rejected(&corrupt, &files[0], &model, &[], "checksum"),
        want
    );
    // The rejected file was replaced by a good one.
    assert_eq!(std::fs::read(&files[0]).unwrap(), good);
    // Truncated.
    let out = expect_rejected(
        &good[..good.len() - 100],
        &files[0],
        &model,
        &[],
        "truncated",
    );
    assert_eq!(out, want);
    // Far larger than a block's file (sparse): refused by its size, never read into memory.
    std::fs::write(&files[0], &good).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let (out, err) = run(&model, &[]);
    assert!(
        err.contains("ignoring prompt cache file") && err.contains("so it was not read"),
        "{err}"
    );
    assert_eq!(out, want);
    // Another format version.
    let mut stale = good.clone();
    stale[8..12].copy_from_slice(&99u32.to_le_bytes());
    assert_eq!(
        expect_rejected(&stale, &files[0], &model, &[], "version"),
        want
    );
    // Not a cache file at all.
    expect_rejected(b"hello", &files[0], &model, &[], "magic");
    std::fs::write(&files[0], &good).unwrap();

    // Another model: its entry's name, holding the first model's file.
    let before = cache_files(&cache);
    let (other_want, _) = run(&other_model, &[]);
    let other_file = smallest(&new_files(&cache, &before));
    let out = expect_rejected(&good, &other_file, &other_model, &[], "another model");
    assert_eq!(out, other_want);
    // Another cache type.
    let before = cache_files(&cache);
    let (f16_want, _) = run(&model, &["--cache-type", "f16"]);
    let f16_file = smallest(&new_files(&cache, &before));
    let out = expect_rejected(
        &good,
        &f16_file,
        &model,
        &["--cache-type", "f16"],
        "f32/f32",
    );
    assert_eq!(out, f16_want);
    // --no-prompt-cache neither reads nor writes.
    let before = cache_files(&cache);
    let (code, out, err) = qwen_run_with_input(
        &[
            "-m",
            model.to_str().unwrap(),
            "--no-chat-template",
            "-p",
            &format!("{prompt} more"),
            "-n",
            "6",
            "--temp",
            "0",
            "--no-prompt-cache",
            "--cache-ram",
            "0",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("from"), "{err}");
    assert!(!out.is_empty());
    assert_eq!(cache_files(&cache), before);
}

#[test]
fn memory_cache_respects_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), QuantType::Q8_0);
    let mut o = options(&model);
    o.cache_ram_mib = 1;
    let engine = Engine::load(&o).unwrap();
    // 2 layers x 2 KV heads x 64 x (4 + 4) bytes = 2 KiB per token: 1 MiB holds 512 tokens.
    assert_eq!(engine.kv_bytes_per_token(), 2048);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| tokens(&engine, &system_text(200, 10 + i)))
        .collect();
    for p in &prompts {
        generate(&engine, p);
        let (used, budget, blocks) = engine.prompt_cache().memory_stats().unwrap();
        assert!(used <= budget, "{used} > {budget}");
        assert!(blocks > 0);
    }
    let (used, _, _) = engine.prompt_cache().memory_stats().unwrap();
    assert!(used > (1 << 20) / 2, "the budget is used: {used}");
    // The most recent prompt is still cached; the oldest is gone.
    assert_eq!(
        generate(&engine, &prompts[5]).cache_source,
        CacheSource::Memory
    );
    assert_eq!(generate(&engine, &prompts[0]).reused_tokens, 0);
}

#[test]
fn disk_cache_respects_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("pc");
    let model = write_tiny_model(dir.path(), QuantType::Q8_0);
    let mut o = options(&model);
    o.cache_ram_mib = 0;
    o.prompt_cache = Some(cache.clone());
    o.prompt_cache_max_mib = 1;
    let engine = Engine::load(&o).unwrap();
    // 192 tokens of KV = 384 KiB per prompt (12 files): two prompts fit in 1 MiB.
    for i in 0..5 {
        let p = tokens(&engine, &system_text(200, 20 + i));
        generate(&engine, &p);
        // written by the cache's own thread
        engine.prompt_cache().flush();
        let total: u64 = cache_files(&cache)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum();
        assert!(total <= 1 << 20, "{total} bytes on disk");
        assert!(!cache_files(&cache).is_empty());
        assert_eq!(engine.prompt_cache().disk().unwrap().used_bytes(), total);
    }
    let total = engine.prompt_cache().disk().unwrap().used_bytes();
    assert!(total > (1 << 20) / 2, "the budget is used: {total}");
    let last = tokens(&engine, &system_text(200, 24));
    assert_eq!(generate(&engine, &last).cache_source, CacheSource::Disk);
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

#[test]
fn q8_0_cache_runs_and_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), QuantType::Q8_0);
    let load = |k: CacheType, v: CacheType| {
        let mut o = options(&model);
        o.cache_type_k = Some(k);
        o.cache_type_v = Some(v);
        Engine::load(&o).unwrap()
    };
    let f32e = load(CacheType::F32, CacheType::F32);
    let toks: Vec<u32> = (0..40).map(|i| (i * 37 % 260) as u32).collect();
    let want = f32e
        .forward(&mut f32e.new_session().unwrap(), &toks, Logits::All)
        .unwrap();
    for (k, v) in [
        (CacheType::Q8_0, CacheType::Q8_0),
        (CacheType::F16, CacheType::Q8_0),
        (CacheType::Q8_0, CacheType::F32),
    ] {
        let e = load(k, v);
        // Prefill, then token by token through the cache.
        let mut s = e.new_session().unwrap();
        let all = e.forward(&mut s, &toks[..20], Logits::All).unwrap();
        let mut rows = all;
        for &t in &toks[20..] {
            rows.extend(e.forward(&mut s, &[t], Logits::Last).unwrap());
        }
        for (i, (got, want)) in rows.iter().zip(&want).enumerate() {
            let d = max_rel_diff(got, want);
            assert!(d < 5e-2, "{k:?}/{v:?} position {i}: relative diff {d}");
        }
        // The memory figure is real: q8_0 is 34 bytes per 32 values.
        assert_eq!(
            s.cache.used_bytes(),
            40 * 2 * 2 * (k.row_bytes(64) + v.row_bytes(64))
        );
    }
    let q8 = load(CacheType::Q8_0, CacheType::Q8_0);
    assert_eq!(
        q8.kv_bytes_per_token() * 128,
        f32e.kv_bytes_per_token() * 34
    );
    // The prefix cache works with q8_0 too, token-identical to q8_0 without it.
    let mut o = options(&model);
    o.cache_type = CacheType::Q8_0;
    o.cache_ram_mib = 0;
    let q8_ref = Engine::load(&o).unwrap();
    let p = tokens(&q8, &format!("{}\nq", system_text(100, 5)));
    let a = generate(&q8, &p);
    let b = generate(&q8, &p);
    assert_eq!(b.cache_source, CacheSource::Memory);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(b.tokens, generate(&q8_ref, &p).tokens);
}

#[test]
fn chat_keeps_the_conversation_and_reuses_its_kv() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny_model(dir.path(), QuantType::Q8_0);
    let m = model.to_str().unwrap();
    let base = [
        "chat",
        "-m",
        m,
        "-n",
        "8",
        "--temp",
        "0",
        "-t",
        "2",
        "--no-prompt-cache",
        // the timing report after every reply
        "-v",
    ];
    let (code, out, err) = qwen_run_with_input(
        &base,
        "hello world\nand again\n/system be brief\nhello world\n/reset\nhello world\n/bogus\n/exit\nnot read\n",
    );
    assert_eq!(code, 0, "{err}");
    let reports: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("[qwen-run] load"))
        .collect();
    // one per reply (-v), and the last reply's again at the end
    assert_eq!(reports.len(), 5, "{err}");
    // The second turn extends the first: most of its prompt is the session's.
    assert!(reports[1].contains("from session"), "{}", reports[1]);
    assert!(err.contains("system message set") && err.contains("conversation cleared"));
    assert!(err.contains("unknown command /bogus"));
    // Replies match fresh chats of one message: the first, and (the system message stays
    // across /reset) the last two, whatever the session held before (replies of random weights
    // may hold newlines, so compare whole outputs rather than lines).
    let (_, first, _) = qwen_run_with_input(&base, "hello world\n");
    assert!(out.starts_with(&first), "{first:?} in {out:?}");
    let with_system: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--system", "be brief"])
        .collect();
    let (_, brief, _) = qwen_run_with_input(&with_system, "hello world\n");
    assert!(
        out.ends_with(&format!("{brief}{brief}")),
        "{brief:?} in {out:?}"
    );

    // A small context: by default a clear error, with drop-oldest the chat goes on.
    let long = "the quick brown fox jumps";
    let input = format!("{long}\n{long}\n{long}\n{long}\n");
    let small = ["-c", "96"];
    let args: Vec<&str> = base.iter().chain(&small).copied().collect();
    let (code, _, err) = qwen_run_with_input(&args, &input);
    assert_eq!(code, 0);
    assert!(err.contains("context holds 96"), "{err}");
    let args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--context-overflow", "drop-oldest"])
        .collect();
    let (code, out, err) = qwen_run_with_input(&args, &input);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("dropped the oldest turn"), "{err}");
    assert!(!err.contains("error"), "{err}");
    let replies = err
        .lines()
        .filter(|l| l.starts_with("[qwen-run] load"))
        .count();
    assert_eq!(replies, 5, "{out}");
}

// ---------------------------------------------------------------------------------------------
// What the disk cache trusts: its directory, private; only regular files, never through a link.

/// A disk cache of one f32 layer, one KV head of 4, blocks of 2 tokens, holding `tokens`'
/// two blocks.
fn two_block_cache(dir: &Path) -> (DiskCache, Vec<u32>, Vec<u64>) {
    let cache = DiskCache::new(dir.to_path_buf(), 1 << 20, tiny_shape());
    let tokens = vec![1u32, 2, 3, 4];
    let hashes = chain_hashes(&tokens, 2, 0);
    let rows = 2 * CacheType::F32.row_bytes(4);
    let blocks: Vec<Arc<KvBlock>> = (0..2u8)
        .map(|v| {
            Arc::new(KvBlock {
                tokens: 2,
                type_k: CacheType::F32,
                type_v: CacheType::F32,
                layers: vec![(vec![v; rows], vec![v + 1; rows])],
            })
        })
        .collect();
    cache.store(&tokens, &hashes, &blocks, &[]).unwrap();
    assert_eq!(cache.load(&tokens, &hashes, 0).blocks.len(), 2);
    (cache, tokens, hashes)
}

#[cfg(unix)]
#[test]
fn disk_cache_directory_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pc = dir.path().join("cache").join("pc");
    let (cache, _, hashes) = two_block_cache(&pc);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pc), 0o700);
    for h in hashes {
        assert_eq!(mode(&cache.path_for(h)), 0o600);
    }
}

#[cfg(unix)]
#[test]
fn disk_cache_never_reads_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let pc = dir.path().join("pc");
    let (cache, tokens, hashes) = two_block_cache(&pc);
    let file = cache.path_for(hashes[0]);
    let elsewhere = dir.path().join("elsewhere.qkv");
    std::fs::rename(&file, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    let found = cache.load(&tokens, &hashes, 0);
    assert!(found.blocks.is_empty());
    assert_eq!(found.rejected, [0]);
}

#[cfg(unix)]
#[test]
fn disk_cache_does_not_block_on_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let pc = dir.path().join("pc");
    let (cache, tokens, hashes) = two_block_cache(&pc);
    let file = cache.path_for(hashes[0]);
    std::fs::remove_file(&file).unwrap();
    let made = Command::new("mkfifo").arg(&file).status().unwrap();
    assert!(made.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let found = cache.load(&tokens, &hashes, 0);
        let _ = tx.send((found.blocks.len(), found.rejected));
    });
    let (n, rejected) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("reading a FIFO in the cache blocks");
    assert_eq!((n, rejected), (0, vec![0]));
}

#[test]
fn stale_temporary_files_are_removed_and_fresh_ones_counted() {
    let dir = tempfile::tempdir().unwrap();
    let pc = dir.path().join("pc");
    let (cache, _, _) = two_block_cache(&pc);
    let used = cache.used_bytes();
    let stale = pc.join(".0123456789abcdef.qkv.999999-0.tmp");
    let fresh = pc.join(".fedcba9876543210.qkv.999999-1.tmp");
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    std::fs::write(&fresh, vec![0u8; 100]).unwrap();
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options()
        .append(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    // Opening the cache (a new process) cleans up after a crashed one.
    let reopened = DiskCache::new(pc.clone(), 1 << 20, tiny_shape());
    assert!(!stale.exists());
    assert!(
        fresh.exists(),
        "a write of another process may still be going on"
    );
    assert_eq!(reopened.used_bytes(), used + 100);
}

fn tiny_shape() -> Shape {
    Shape {
        model: 7,
        type_k: CacheType::F32,
        type_v: CacheType::F32,
        layers: 1,
        kv_heads: 1,
        head_dim: 4,
        block: 2,
    }
}

#[test]
fn model_identity_tells_fine_tunes_of_one_base_apart() {
    let dir = tempfile::tempdir().unwrap();
    // Same size, same first and last MiB; another MiB of weights in the middle.
    let base: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut tuned = base.clone();
    for b in &mut tuned[(3 << 20)..(4 << 20)] {
        *b = b.wrapping_add(1);
    }
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    std::fs::write(&a, &base).unwrap();
    std::fs::write(&b, &tuned).unwrap();
    assert_ne!(
        model_identity(std::slice::from_ref(&a)).unwrap(),
        model_identity(&[b]).unwrap()
    );
    let c = dir.path().join("c.gguf");
    std::fs::write(&c, &base).unwrap();
    assert_eq!(model_identity(&[a]).unwrap(), model_identity(&[c]).unwrap());
}
