use super::RunArgs;
use crate::engine::{Engine, Generation};
use crate::sampler::Sampler;
use crate::scheduler::{Held, Request};
use crate::tokenizer::Message;
use anyhow::{bail, Context, Result};
use std::io::Write;

pub fn run(args: &RunArgs) -> Result<()> {
    if args.text.in_prefix.is_some() || args.text.in_suffix.is_some() {
        bail!("--in-prefix/--in-suffix wrap the messages typed in a chat: use them with `qwen-run chat` or -cnv");
    }
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => args.text.unescape(p),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the prompt file {}", f.display()))?,
        (None, None) => bail!("no prompt given: pass --prompt TEXT or --file FILE"),
    };
    let max_tokens = match args.n_predict {
        n if n < 0 => usize::MAX,
        n => n as usize,
    };
    let mut sampler = Sampler::new(args.sampling.params())?;
    let mut load = args.model.load_options()?;
    load.chat_template = args.template.template_override()?;
    let engine = Engine::load(&load)?;
    let text = if args.no_chat_template {
        prompt
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", &args.text.unescape(s)));
        }
        messages.push(Message::new("user", &prompt));
        engine.template.render(&messages, None, true)?
    };
    let tokens = engine.tokenizer.encode(&text)?;
    let format = args.format()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for _ in 0..args.repeat.max(1) {
        let mut session = engine.new_session()?;
        let mut write_failed = false;
        let mut request = Request::new(tokens.clone(), max_tokens, Held::Borrowed(&mut sampler));
        request.stop = args.text.stops();
        if let Some(f) = &format {
            request.guide = Some(Box::new(engine.grammars()?.constraint(f)?));
        }
        let generation = engine.generate_request(&mut session, request, |piece| {
            // A closed pipe (`| head`) ends generation quietly instead of failing.
            write_failed = out
                .write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .is_err();
            !write_failed
        })?;
        if !write_failed {
            let _ = writeln!(out);
        }
        if !args.quiet {
            eprintln!("{}", report(&engine, &generation));
        }
        if write_failed {
            break;
        }
    }
    // The process ends after this: the system takes the engine's memory back at once, faster
    // than dropping it piece by piece (the tokenizer's hundreds of thousands of allocations,
    // the weights' mappings). Only the prompt cache's queued writes must finish first.
    engine.prompt_cache().flush();
    std::mem::forget(engine);
    Ok(())
}

pub fn report(engine: &Engine, g: &Generation) -> String {
    let cached = if g.reused_tokens > 0 {
        format!(" ({} from {})", g.reused_tokens, g.cache_source.as_str())
    } else {
        String::new()
    };
    let types = if engine.cache_type_k() == engine.cache_type_v() {
        engine.cache_type_k().name().to_string()
    } else {
        format!(
            "K {} V {}",
            engine.cache_type_k().name(),
            engine.cache_type_v().name()
        )
    };
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let prefix = match engine.prompt_cache().memory_stats() {
        Some((used, _, _)) => format!(" | prefix cache {:.1} MiB", mib(used)),
        None => String::new(),
    };
    let spec = if g.spec.drafted > 0 || engine.draft().is_some() {
        format!(
            " | drafted {} kept {} ({:.0}%), {:.2} tokens/pass",
            g.spec.drafted,
            g.spec.accepted,
            100.0 * g.spec.acceptance(),
            g.tokens_per_pass()
        )
    } else {
        String::new()
    };
    let spec = match engine.draft() {
        Some(d) => format!(
            "{spec} | draft model {}",
            d.gguf
                .path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        ),
        None => spec,
    };
    let gpu = match engine.gpu_report() {
        Some(r) => format!("\n[qwen-run] GPU {r}"),
        None => String::new(),
    };
    format!(
        "\n[qwen-run] load {:.0} ms | prompt {} tokens{cached} | time to first token {:.0} ms | prefill {:.1} tok/s | generated {} tokens | decode {:.1} tok/s{spec} | finish: {} | {} | {} threads | ctx {} | KV {types} {:.1} MiB used of {:.0} MiB{prefix}{gpu}",
        engine.load_time.as_secs_f64() * 1e3,
        g.prompt_tokens,
        g.ttft.as_secs_f64() * 1e3,
        g.prefill_tok_s(),
        g.tokens.len(),
        g.decode_tok_s(),
        g.finish.as_str(),
        engine.device_name(),
        engine.threads,
        engine.ctx_report(),
        mib(g.kv_bytes),
        mib(engine.kv_bytes_per_token() * engine.ctx_size),
    )
}
