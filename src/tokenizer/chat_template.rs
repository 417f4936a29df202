use crate::gguf::{GgufFile, Value};
use anyhow::{bail, Context, Result};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// A chat message as the template (and the OpenAI/Ollama APIs) see it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: None,
        }
    }
}

/// The templates `--chat-template NAME` names. ChatML is what Qwen2.5 is trained on, without its
/// tool-calling system prompt; `qwen2.5` is Qwen2.5-Instruct's format, tools included.
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    ("chatml", include_str!("templates/chatml.jinja")),
    ("qwen2.5", include_str!("templates/qwen2.5.jinja")),
];

/// The largest `--chat-template-file` read: real templates are a few KiB, and the file is held
/// in memory by every model that uses it.
pub const MAX_TEMPLATE_FILE: u64 = 1 << 20;

/// Template steps one rendering may take. The template comes from the model file, so a loop of
/// a billion turns must end in an error, not hold a request thread forever; real templates take
/// a few hundred steps a message.
pub const FUEL: u64 = 10_000_000;

/// Rendered bytes allowed beyond four times the messages' and tools' own bytes (templates
/// repeat the content at most once or twice).
pub const OUTPUT_SLACK: usize = 32 << 20;

/// A chat template given on the command line, in place of the GGUF's: its text and where it
/// came from (which every error about it names).
#[derive(Clone, Debug)]
pub struct TemplateOverride {
    pub origin: String,
    pub source: std::sync::Arc<str>,
}

impl TemplateOverride {
    /// `--chat-template VALUE`: a built-in name, or Jinja text (a value holding `{{` or `{%`, as
    /// llama.cpp takes it). Anything else is a misspelt name, refused rather than rendered as a
    /// template that prints the word.
    pub fn named(value: &str) -> Result<TemplateOverride> {
        let t = if let Some((name, source)) = BUILTIN_TEMPLATES.iter().find(|(n, _)| *n == value) {
            TemplateOverride {
                origin: format!("the built-in chat template '{name}' (--chat-template)"),
                source: (*source).into(),
            }
        } else if value.contains("{{") || value.contains("{%") {
            TemplateOverride {
                origin: "the --chat-template text".into(),
                source: value.into(),
            }
        } else {
            bail!(
                "--chat-template '{value}' is not a built-in template; the built-in ones are {}. A template's Jinja text goes in --chat-template-file FILE (or in --chat-template itself)",
                builtin_names()
            );
        };
        ChatTemplate::with_origin(&t.source, &t.origin)?;
        Ok(t)
    }

    /// `--chat-template-file FILE`, read (at most [`MAX_TEMPLATE_FILE`] bytes) and parsed.
    pub fn from_file(path: &std::path::Path) -> Result<TemplateOverride> {
        use std::io::Read;
        let what = format!("--chat-template-file {}", path.display());
        let file = std::fs::File::open(path).with_context(|| format!("{what}: cannot read it"))?;
        let mut bytes = Vec::new();
        file.take(MAX_TEMPLATE_FILE + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("{what}: cannot read it"))?;
        if bytes.len() as u64 > MAX_TEMPLATE_FILE {
            bail!(
                "{what}: the file is larger than {} KiB, too large for a chat template",
                MAX_TEMPLATE_FILE >> 10
            );
        }
        let source = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("{what}: the file is not UTF-8 text ({e})"))?;
        let t = TemplateOverride {
            origin: format!(
                "the chat template file {} (--chat-template-file)",
                path.display()
            ),
            source: source.into(),
        };
        ChatTemplate::with_origin(&t.source, &t.origin)?;
        Ok(t)
    }
}

/// "chatml, qwen2.5", for messages.
pub fn builtin_names() -> String {
    BUILTIN_TEMPLATES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A chat template that failed to render a conversation. `refused`: the template raised an
/// exception on purpose (`raise_exception`, as templates reject roles they do not take), so the
/// conversation is at fault; otherwise the template is (a bug, a loop, runaway output).
#[derive(Debug)]
pub struct RenderError {
    pub refused: bool,
    message: String,
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RenderError {}

/// What `raise_exception` attaches to its error, so that a deliberate refusal is told apart
/// from a template bug.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

/// The model's Jinja chat template (`tokenizer.chat_template`, or the one the command line
/// gives), rendered with minijinja under a step budget ([`FUEL`]) and an output cap, so a hostile
/// template errors out instead of spinning or filling memory.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: std::sync::Arc<str>,
    origin: String,
}

impl ChatTemplate {
    /// The template of the model in `gguf`, or `chosen` in its place. A GGUF without one gets
    /// ChatML, what Qwen2.5 is trained on.
    pub fn for_model(gguf: &GgufFile, chosen: Option<&TemplateOverride>) -> Result<ChatTemplate> {
        if let Some(t) = chosen {
            return Self::with_origin(&t.source, &t.origin);
        }
        let file = gguf.path.display();
        match gguf.get("tokenizer.chat_template").and_then(Value::as_str) {
            Some(source) => Self::with_origin(
                source,
                &format!("the model's chat template (tokenizer.chat_template of {file})"),
            ),
            None => Self::with_origin(
                BUILTIN_TEMPLATES[0].1,
                &format!(
                    "the built-in chat template 'chatml' ({file} has no tokenizer.chat_template)"
                ),
            ),
        }
    }

    pub fn from_gguf(gguf: &GgufFile) -> Result<ChatTemplate> {
        Self::for_model(gguf, None)
    }

    /// A template from a model file, named as such in errors.
    pub fn new(source: &str) -> Result<ChatTemplate> {
        Self::with_origin(
            source,
            "the model's chat template (tokenizer.chat_template)",
        )
    }

    /// `origin` says where the template came from; every error about it names it.
    pub fn with_origin(source: &str, origin: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Python's json.dumps layout (", " and ": ", no HTML escaping): the text the model was
        // trained on, which minijinja's own compact, HTML-safe tojson is not.
        env.add_filter("tojson", python_tojson);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg).with_source(Raised))
        });
        if let Err(e) = env.add_template_owned("chat", source.to_string()) {
            bail!(
                "{origin} does not parse: {}. Choose another with --chat-template NAME ({}) or --chat-template-file FILE",
                jinja_message(&e),
                builtin_names()
            );
        }
        Ok(ChatTemplate {
            env,
            source: source.into(),
            origin: origin.to_string(),
        })
    }

    /// The Jinja text, as rendered.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from, in words.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The conversation as the model reads it. A failure is a [`RenderError`] naming the
    /// template's origin, minijinja's message and the template line.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        let tools = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len() + m.tool_calls.as_ref().map_or(0, json_len))
            .sum::<usize>()
            + tools.map_or(0, json_len);
        let mut out = Capped {
            buf: Vec::new(),
            cap: input.saturating_mul(4).saturating_add(OUTPUT_SLACK),
            over: false,
        };
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => "",
                eos_token => "<|im_end|>",
            },
            &mut out,
        );
        let origin = &self.origin;
        let instead = format!(
            "Choose another with --chat-template NAME ({}) or --chat-template-file FILE, or format the prompt yourself (--no-chat-template, raw: true)",
            builtin_names()
        );
        let (refused, message) = match rendered {
            Ok(_) => {
                return String::from_utf8(out.buf)
                    .map_err(|_| anyhow::anyhow!("{origin} rendered invalid UTF-8"))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => (
                false,
                format!("{origin} took more than {FUEL} steps to render this conversation, so it was stopped: the template loops without end or is hostile. {instead}"),
            ),
            Err(_) if out.over => (
                false,
                format!(
                    "{origin} rendered more than {} bytes for this conversation, so it was stopped: the template repeats without end or is hostile. {instead}",
                    out.cap
                ),
            ),
            Err(e) if raised(&e) => (
                true,
                format!(
                    "{origin} refuses this conversation: {}{}",
                    e.detail().unwrap_or("raise_exception"),
                    e.line().map_or(String::new(), |l| format!(" (template line {l})"))
                ),
            ),
            Err(e) => (
                false,
                format!(
                    "rendering the conversation with {origin} failed: {}. {instead}",
                    jinja_message(&e)
                ),
            ),
        };
        Err(RenderError { refused, message }.into())
    }
}

/// Whether the error (or one it wraps) came from the template's `raise_exception`.
fn raised(e: &Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if err.is::<Raised>() {
            return true;
        }
        next = err.source();
    }
    false
}

/// minijinja's message on one line: kind, detail and the template line, and what it wraps
/// (its alternate form adds a multi-line source excerpt, too long for an HTTP error).
fn jinja_message(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    let mut next = std::error::Error::source(e);
    while let Some(inner) = next {
        s.push_str(&format!(": {inner}"));
        next = inner.source();
    }
    s
}

fn json_len(v: &serde_json::Value) -> usize {
    serde_json::to_string(v).map_or(0, |s| s.len())
}

/// The rendered text, refusing to grow past `cap` bytes.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.cap {
            self.over = true;
            return Err(std::io::Error::other("the rendered template is too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn python_tojson(value: minijinja::Value) -> Result<minijinja::Value, Error> {
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_python_json(&json, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    match v {
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        J::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::to_string(k).expect("string serializes"));
                out.push_str(": ");
                write_python_json(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).expect("scalar serializes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_generation_prompt() {
        let t = ChatTemplate::new(BUILTIN_TEMPLATES[0].1).unwrap();
        let s = t
            .render(
                &[Message::new("system", "S"), Message::new("user", "hi")],
                None,
                true,
            )
            .unwrap();
        assert_eq!(s, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn tojson_matches_python_layout() {
        let t = ChatTemplate::new("{{ tools[0] | tojson }}").unwrap();
        let tools = serde_json::json!([{"name": "f", "parameters": {"a": [1, 2], "b": "<x>"}}]);
        let s = t.render(&[], Some(&tools), false).unwrap();
        assert_eq!(
            s,
            r#"{"name": "f", "parameters": {"a": [1, 2], "b": "<x>"}}"#
        );
    }
}
