//! `qwen-run chat`: an interactive multi-turn conversation on stdin/stdout.
//!
//! One session lives across turns, so each turn only prefills what is new: the rendered
//! conversation extends the tokens the session already holds (the previous prompt and the reply,
//! whose `<|im_end|>` the template renders after it).

use super::run::report;
use super::{ChatArgs, ContextOverflow};
use crate::engine::{Engine, FinishReason};
use crate::sampler::Sampler;
use crate::tokenizer::Message;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, IsTerminal, Write};

pub fn chat(args: &ChatArgs) -> Result<()> {
    let mut system = match (&args.system, &args.system_file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the system file {}", f.display()))?,
        ),
        (None, None) => None,
    };
    let max_tokens = match args.n_predict {
        n if n < 0 => usize::MAX,
        n => n as usize,
    };
    let mut sampler = Sampler::new(args.sampling.params())?;
    let mut load = args.model.load_options()?;
    load.chat_template = args.template.template_override()?;
    let engine = Engine::load(&load)?;
    let mut session = engine.new_session()?;
    // Room to keep free for the reply when dropping old turns.
    let reserve = max_tokens.min(engine.ctx_size / 4).max(1);
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("qwen-run chat: type a message; /reset clears the conversation, /system TEXT sets the system message, /exit quits.");
    }
    let stdout = std::io::stdout();
    let mut input = stdin.lock();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        let command = line.trim();
        if command.is_empty() {
            continue;
        }
        if command == "/exit" || command == "/quit" {
            break;
        }
        if command == "/reset" {
            history.clear();
            eprintln!("[qwen-run] conversation cleared");
            continue;
        }
        if command == "/system" || command.starts_with("/system ") {
            let text = command["/system".len()..].trim();
            system = (!text.is_empty()).then(|| text.to_string());
            history.clear();
            eprintln!("[qwen-run] system message set; conversation cleared");
            continue;
        }
        if command.starts_with('/') && !command.starts_with("//") {
            eprintln!("[qwen-run] unknown command {command}: use /reset, /system TEXT or /exit (start a message with // to send a slash)");
            continue;
        }
        let text = line
            .strip_prefix('/')
            .filter(|_| command.starts_with("//"))
            .unwrap_or(line);
        history.push(Message::new("user", text));
        let tokens = match fit(
            &engine,
            system.as_deref(),
            &mut history,
            reserve,
            args.context_overflow,
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e:#}");
                history.pop();
                continue;
            }
        };
        let mut reply = String::new();
        let mut out = stdout.lock();
        let mut write_failed = false;
        let result = engine.generate(&mut session, &tokens, max_tokens, &mut sampler, |piece| {
            reply.push_str(piece);
            write_failed = out
                .write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .is_err();
            !write_failed
        });
        if write_failed {
            return Ok(());
        }
        let _ = writeln!(out);
        drop(out);
        match result {
            Ok(g) => {
                history.push(Message::new("assistant", &reply));
                if !args.quiet {
                    eprintln!("{}", report(&engine, &g));
                }
                if g.finish == FinishReason::ContextFull {
                    eprintln!("[qwen-run] the context is full: /reset, raise --ctx-size, or use --context-overflow drop-oldest");
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                history.pop();
            }
        }
    }
    Ok(())
}

/// Renders the conversation with the generation prompt; with `drop-oldest`, drops the oldest
/// turns (never the system message or the new user message) until `reserve` tokens are free.
fn fit(
    engine: &Engine,
    system: Option<&str>,
    history: &mut Vec<Message>,
    reserve: usize,
    policy: ContextOverflow,
) -> Result<Vec<u32>> {
    loop {
        let mut messages = Vec::with_capacity(history.len() + 1);
        if let Some(s) = system {
            messages.push(Message::new("system", s));
        }
        messages.extend(history.iter().cloned());
        let tokens = engine
            .tokenizer
            .encode(&engine.template.render(&messages, None, true)?)?;
        let fits = tokens.len() + reserve <= engine.ctx_size;
        if fits || policy == ContextOverflow::Error {
            if tokens.len() >= engine.ctx_size {
                bail!(
                    "the conversation has {} tokens but the context holds {}: /reset, raise --ctx-size, or use --context-overflow drop-oldest",
                    tokens.len(),
                    engine.ctx_size
                );
            }
            return Ok(tokens);
        }
        if history.len() <= 1 {
            if tokens.len() < engine.ctx_size {
                return Ok(tokens);
            }
            bail!(
                "the message and system prompt alone take {} tokens, more than the context of {}; raise --ctx-size",
                tokens.len(),
                engine.ctx_size
            );
        }
        // Drop the oldest turn: a user message and the replies that follow it.
        history.remove(0);
        while history.len() > 1 && history[0].role != "user" {
            history.remove(0);
        }
        eprintln!("[qwen-run] context full: dropped the oldest turn");
    }
}
