//! `qwen-run chat`: an interactive multi-turn conversation on stdin/stdout.
//!
//! One session lives across turns, so each turn only prefills what is new: the rendered
//! conversation extends the tokens the session already holds (the previous prompt and the reply,
//! whose `<|im_end|>` the template renders after it).
//!
//! Timings are kept for the end, as llama-cli keeps them: the report comes on /stats, after
//! every reply with -v, and when the chat ends (not with -q).

use super::run::report;
use super::{ChatArgs, ContextOverflow};
use crate::engine::{Engine, FinishReason, Generation};
use crate::sampler::Sampler;
use crate::scheduler::{Held, Request};
use crate::tokenizer::Message;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

/// The replies of a chat so far, for its report.
#[derive(Default)]
struct Totals {
    replies: usize,
    prompt_tokens: usize,
    reused_tokens: usize,
    generated: usize,
    prefill: Duration,
    decode: Duration,
    last: Option<Generation>,
}

impl Totals {
    fn add(&mut self, g: Generation) {
        self.replies += 1;
        self.prompt_tokens += g.prompt_tokens;
        self.reused_tokens += g.reused_tokens;
        self.generated += g.tokens.len();
        self.prefill += g.prefill_time;
        self.decode += g.decode_time;
        self.last = Some(g);
    }

    /// The last reply's report and the chat's totals.
    fn report(&self, engine: &Engine) -> String {
        let Some(last) = &self.last else {
            return "[qwen-run] no reply yet".to_string();
        };
        let processed = self.prompt_tokens - self.reused_tokens;
        format!(
            "{}\n[qwen-run] chat: {} replies | prompt {} tokens, {} processed ({:.1} tok/s), {} reused | generated {} tokens ({:.1} tok/s)",
            report(engine, last),
            self.replies,
            self.prompt_tokens,
            processed,
            processed as f64 / self.prefill.as_secs_f64().max(1e-9),
            self.reused_tokens,
            self.generated,
            self.generated.saturating_sub(self.replies) as f64 / self.decode.as_secs_f64().max(1e-9),
        )
    }
}

pub fn chat(args: &ChatArgs) -> Result<()> {
    let mut system = match (&args.system, &args.system_file) {
        (Some(s), _) => Some(args.text.unescape(s)),
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
        eprintln!("qwen-run chat: type a message; /reset clears the conversation, /system TEXT sets the system message, /stats shows timings, /exit quits.");
    }
    let stdout = std::io::stdout();
    let mut input = stdin.lock();
    let stops = args.text.stops();
    let mut totals = Totals::default();
    // -p: the first message, sent as it is (never a command, no --in-prefix/--in-suffix)
    let mut first = args.prompt.as_ref().map(|p| {
        if args.prompt_escaped {
            args.text.unescape(p)
        } else {
            p.clone()
        }
    });
    loop {
        let text = if let Some(p) = first.take() {
            p
        } else {
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
            if command == "/stats" {
                eprintln!("{}", totals.report(&engine));
                continue;
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
                eprintln!("[qwen-run] unknown command {command}: use /reset, /system TEXT, /stats or /exit (start a message with // to send a slash)");
                continue;
            }
            let typed = line
                .strip_prefix('/')
                .filter(|_| command.starts_with("//"))
                .unwrap_or(line);
            format!(
                "{}{typed}{}",
                args.text
                    .in_prefix
                    .as_deref()
                    .map(|t| args.text.unescape(t))
                    .unwrap_or_default(),
                args.text
                    .in_suffix
                    .as_deref()
                    .map(|t| args.text.unescape(t))
                    .unwrap_or_default(),
            )
        };
        history.push(Message::new("user", &text));
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
        let mut request = Request::new(tokens, max_tokens, Held::Borrowed(&mut sampler));
        request.stop = stops.clone();
        let result = engine.generate_request(&mut session, request, |piece| {
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
                if args.text.verbose {
                    eprintln!("{}", report(&engine, &g));
                }
                if g.finish == FinishReason::ContextFull {
                    eprintln!("[qwen-run] the context is full: /reset, raise --ctx-size, or use --context-overflow drop-oldest");
                }
                totals.add(g);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                history.pop();
            }
        }
    }
    if !args.quiet && totals.replies > 0 {
        eprintln!("{}", totals.report(&engine));
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
