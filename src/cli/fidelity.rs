use super::FidelityArgs;
use crate::bench::fidelity::{compare_logits, greedy_match, LogitsFidelity, LogitsReference};
use crate::engine::Engine;
use anyhow::{bail, Context, Result};
use serde::Serialize;

#[derive(Serialize)]
struct GreedyRow {
    prompt: String,
    matched: usize,
    of: usize,
}

#[derive(Serialize)]
struct Report {
    logits: Option<LogitsFidelity>,
    greedy: Vec<GreedyRow>,
}

pub fn fidelity(args: &FidelityArgs) -> Result<()> {
    if let (Some(out), Some(text)) = (&args.write_logits, &args.text) {
        return write_logits(args, text, out);
    }
    if args.logits.is_none() && args.greedy.is_none() {
        bail!("nothing to compare: pass --logits FILE (from benches/llama_logits.c) and/or --greedy FILE (a reference JSON)");
    }
    let reference = args
        .logits
        .as_deref()
        .map(LogitsReference::open)
        .transpose()?;
    let mut load = args.model.load_options()?;
    // Every position must be computed, not served from a prompt cache.
    load.cache_ram_mib = 0;
    load.prompt_cache = None;
    if load.ctx_size == 0 {
        // Room for the reference's tokens; 0 (the default size) when there is none.
        load.ctx_size = reference.as_ref().map_or(0, |r| r.tokens.len() + 1);
    }
    let engine = Engine::load(&load)?;
    let logits = reference
        .as_ref()
        .map(|r| compare_logits(&engine, r))
        .transpose()?;
    let mut greedy = Vec::new();
    if let Some(path) = &args.greedy {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let prompts = json[&args.greedy_set].as_array().with_context(|| {
            format!(
                "{} has no list '{}' of prompts",
                path.display(),
                args.greedy_set
            )
        })?;
        let ids = |v: &serde_json::Value| -> Result<Vec<u32>> {
            serde_json::from_value(v.clone()).context("token ids must be a list of integers")
        };
        for p in prompts {
            let want = ids(&p["greedy_ids"])?;
            let (matched, _) = greedy_match(&engine, &ids(&p["prompt_ids"])?, &want)?;
            greedy.push(GreedyRow {
                prompt: p["prompt"].as_str().unwrap_or("?").to_string(),
                matched,
                of: want.len(),
            });
        }
    }
    let report = Report { logits, greedy };
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if let Some(l) = &report.logits {
        println!("| positions | top-1 agreement | mean KL | max KL |");
        println!("| ---: | ---: | ---: | ---: |");
        println!(
            "| {} | {:.2}% | {:.6} | {:.6} |\n",
            l.positions,
            100.0 * l.top1_agreement,
            l.mean_kl,
            l.max_kl
        );
    }
    if !report.greedy.is_empty() {
        println!("| prompt | greedy tokens equal to llama.cpp |");
        println!("| --- | ---: |");
        for g in &report.greedy {
            println!(
                "| {} | {}/{} |",
                g.prompt.replace('|', "\\|"),
                g.matched,
                g.of
            );
        }
    }
    Ok(())
}

fn write_logits(args: &FidelityArgs, text: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let text =
        std::fs::read_to_string(text).with_context(|| format!("cannot read {}", text.display()))?;
    let mut load = args.model.load_options()?;
    load.cache_ram_mib = 0;
    load.prompt_cache = None;
    let engine = Engine::load(&load)?;
    let tokens = engine.tokenizer.encode(&text)?;
    LogitsReference::write(&engine, &tokens, out)?;
    eprintln!(
        "[qwen-run] wrote the logits of {} tokens ({}) to {}",
        tokens.len(),
        engine.device_name(),
        out.display()
    );
    Ok(())
}
