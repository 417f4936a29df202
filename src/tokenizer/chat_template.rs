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

/// ChatML, what Qwen2.5 is trained on; used when a GGUF carries no template.
const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Template steps one rendering may take. The template comes from the model file, so a loop of
/// a billion turns must end in an error, not hold a request thread forever; real templates take
/// a few hundred steps a message.
pub const FUEL: u64 = 10_000_000;

/// Rendered bytes allowed beyond four times the messages' and tools' own bytes (templates
/// repeat the content at most once or twice).
pub const OUTPUT_SLACK: usize = 32 << 20;

/// The model's Jinja chat template (`tokenizer.chat_template`), rendered with minijinja under a
/// step budget ([`FUEL`]) and an output cap, so a hostile template errors out instead of
/// spinning or filling memory.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    pub fn from_gguf(gguf: &GgufFile) -> Result<ChatTemplate> {
        let source = gguf
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .unwrap_or(CHATML);
        Self::new(source)
    }

    pub fn new(source: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Python's json.dumps layout (", " and ": ", no HTML escaping): the text the model was
        // trained on, which minijinja's own compact, HTML-safe tojson is not.
        env.add_filter("tojson", python_tojson);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .context("the model's chat template (tokenizer.chat_template) does not parse")?;
        Ok(ChatTemplate { env })
    }

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
        match rendered {
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|_| anyhow::anyhow!("the chat template rendered invalid UTF-8")),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => bail!(
                "the model's chat template (tokenizer.chat_template) took more than {FUEL} steps to render this conversation, so it was stopped: the template loops without end or is hostile. Run with --no-chat-template (and format the prompt yourself) or use a model file with a sound template"
            ),
            Err(_) if out.over => bail!(
                "the model's chat template (tokenizer.chat_template) rendered more than {} bytes for this conversation, so it was stopped: the template repeats without end or is hostile. Run with --no-chat-template (and format the prompt yourself) or use a model file with a sound template",
                out.cap
            ),
            Err(e) => bail!("rendering the chat template failed: {e:#}"),
        }
    }
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
        let t = ChatTemplate::new(CHATML).unwrap();
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
