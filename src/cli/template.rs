//! `qwen-run template`: a conversation rendered by the chat template, as the model would read it.
//! Only the file's metadata is read (the tokenizer and template), never the weights.

use super::args::model_file;
use super::TemplateCmdArgs;
use crate::gguf::GgufFile;
use crate::tokenizer::{ChatTemplate, Message, Tokenizer};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{Read, Write};

/// The conversation shown when no --messages is given: a system prompt and two user turns.
fn example() -> Vec<Message> {
    vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", "Hello!"),
        Message::new("assistant", "Hello! How can I help you today?"),
        Message::new("user", "What is the capital of France?"),
    ]
}

/// The bytes of a --messages or --tools file larger than which it is refused: a conversation
/// this size already fills any context.
const MAX_INPUT: u64 = 64 << 20;

fn read_json(path: &std::path::Path, flag: &str) -> Result<Value> {
    let what = format!("{flag} {}", path.display());
    let mut bytes = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().take(MAX_INPUT + 1).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_INPUT + 1).read_to_end(&mut bytes))
    };
    read.with_context(|| format!("{what}: cannot read it"))?;
    if bytes.len() as u64 > MAX_INPUT {
        bail!("{what} is larger than {} MiB", MAX_INPUT >> 20);
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{what} is not valid JSON"))
}

pub fn template(args: &TemplateCmdArgs) -> Result<()> {
    let chosen = args.template.template_override()?;
    let (messages, mut tools) = match &args.messages {
        None => (example(), None),
        Some(path) => {
            let (list, tools) = match read_json(path, "--messages")? {
                Value::Object(mut o) => {
                    let Some(list) = o.remove("messages") else {
                        bail!(
                            "--messages {}: the object has no \"messages\" array",
                            path.display()
                        );
                    };
                    (list, o.remove("tools").filter(|t| !t.is_null()))
                }
                list => (list, None),
            };
            let messages = crate::server::openai::messages_from_json(list)
                .map_err(|e| anyhow::anyhow!("--messages {}: {e}", path.display()))?;
            (messages, tools)
        }
    };
    if let Some(path) = &args.tools {
        if tools.is_some() {
            bail!(
                "the tools are given twice: in --messages' \"tools\" and by --tools {}; pass one",
                path.display()
            );
        }
        tools = Some(read_json(path, "--tools")?);
    }
    if let Some(t) = &tools {
        if !t.is_array() {
            bail!("the tools must be a JSON array of function definitions");
        }
    }
    let model = model_file(
        args.model.as_slice(),
        args.hf_repo.as_deref(),
        args.hf_file.as_deref(),
        args.hf_no_verify,
    )?;
    let gguf = GgufFile::open(&model)?;
    let template = ChatTemplate::for_model(&gguf, chosen.as_ref())?;
    let text = template.render(&messages, tools.as_ref(), !args.no_generation_prompt)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // A closed pipe (`| head`) is not an error.
    let _ = if args.tokens {
        let ids = Tokenizer::from_gguf(&gguf)?.encode(&text)?;
        writeln!(out, "{}", serde_json::to_string(&ids)?)
    } else {
        // As is: the prompt is exactly these bytes, no newline added.
        out.write_all(text.as_bytes())
    }
    .and_then(|_| out.flush());
    eprintln!("[qwen-run] rendered with {}", template.origin());
    Ok(())
}
