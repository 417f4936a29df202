//! Qwen2.5 tool calls: the model answers a call as
//! `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`. [`ToolCallParser`] splits a
//! stream of text pieces (cut anywhere, even inside the tags) into plain text and parsed calls.
//! Text is held back only while it may be the start of a `<tool_call>` tag or inside a call
//! block; a block whose JSON does not parse is given back as text, never dropped. Small Qwen
//! models sometimes answer with the bare JSON object and no tags; that is taken as a call too
//! when it starts the answer and names one of the request's tools.

use crate::scheduler::stop::partial_suffix;
use serde_json::Value;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object (or whatever JSON value the model wrote there).
    pub arguments: Value,
}

impl ToolCall {
    /// Arguments as the JSON text OpenAI's API carries.
    pub fn arguments_string(&self) -> String {
        match &self.arguments {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        }
    }

    /// Arguments as the object Ollama's API carries.
    pub fn arguments_object(&self) -> Value {
        match &self.arguments {
            Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| self.arguments.clone()),
            v => v.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String),
    Call(ToolCall),
}

/// Parses the JSON inside one `<tool_call>` block; None when it is not a call.
pub fn parse_call(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Default::default()),
        // Some models write the arguments as a JSON string; unwrap it when it holds JSON.
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(a) => a.clone(),
    };
    Some(ToolCall { name, arguments })
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Nothing but whitespace since the start or the last call.
    #[default]
    Start,
    Text,
    /// Inside `<tool_call>`, waiting for `</tool_call>`.
    InTag,
    /// A bare JSON object at the start (small Qwen models often drop the tags), or one in a
    /// ```json fence (`fenced`).
    Bare {
        fenced: bool,
    },
}

enum Bare {
    NeedMore,
    /// The call and the bytes of the buffer it spans.
    Call(ToolCall, usize),
    NotCall,
}

/// Splits streamed text into text and tool calls. Recognizes `<tool_call>` blocks anywhere, and
/// a bare `{"name": ..., "arguments": ...}` object at the start of the answer (or right after a
/// call) when its name is one of the request's tools.
#[derive(Default)]
pub struct ToolCallParser {
    buf: String,
    state: State,
    tools: Vec<String>,
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that also takes bare JSON calls of these tools.
    pub fn with_tools(tools: Vec<String>) -> Self {
        ToolCallParser {
            tools,
            ..Self::default()
        }
    }

    /// Feeds one piece of generated text; returns what can be released now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let t = self.buf.trim_start();
                    if t.is_empty() || self.tools.is_empty() {
                        if t.is_empty() {
                            break;
                        }
                        self.state = State::Text;
                        continue;
                    }
                    if let Some(after) = t.strip_prefix("```") {
                        let rest = after.strip_prefix("json").unwrap_or(after).trim_start();
                        if (after.len() < 4 && "json".starts_with(after)) || rest.is_empty() {
                            break; // Wait for the fence's first line.
                        }
                        self.state = if rest.starts_with('{') {
                            State::Bare { fenced: true }
                        } else {
                            State::Text
                        };
                    } else if "```".starts_with(t) {
                        break;
                    } else if t.starts_with('{') {
                        self.state = State::Bare { fenced: false };
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Bare { fenced } => match self.bare(fenced, false) {
                    Bare::NeedMore => break,
                    Bare::Call(call, end) => {
                        self.buf.drain(..end);
                        out.push(Piece::Call(call));
                        self.state = State::Start;
                    }
                    // Plain text after all; the tag search goes on from here.
                    Bare::NotCall => self.state = State::Text,
                },
                State::InTag => {
                    let Some(end) = self.buf.find(CLOSE) else {
                        break;
                    };
                    let body = self.buf[..end].to_string();
                    self.buf.drain(..end + CLOSE.len());
                    out.push(match parse_call(&body) {
                        Some(call) => {
                            self.state = State::Start;
                            Piece::Call(call)
                        }
                        None => {
                            self.state = State::Text;
                            Piece::Text(format!("{OPEN}{body}{CLOSE}"))
                        }
                    });
                }
                State::Text => {
                    if let Some(start) = self.buf.find(OPEN) {
                        out.push(Piece::Text(self.buf[..start].to_string()));
                        self.buf.drain(..start + OPEN.len());
                        self.state = State::InTag;
                    } else {
                        // Release everything but a tail that could still become "<tool_call>".
                        let keep = partial_suffix(&self.buf, OPEN);
                        let release = self.buf.len() - keep;
                        out.push(Piece::Text(self.buf[..release].to_string()));
                        self.buf.drain(..release);
                        break;
                    }
                }
            }
        }
        merge_text(out)
    }

    /// End of generation: an unclosed block is a call if its JSON is complete (the model may
    /// stop right after it), otherwise text.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        let state = std::mem::take(&mut self.state);
        let piece = match state {
            State::InTag => match parse_call(&rest) {
                Some(call) => Piece::Call(call),
                None => Piece::Text(format!("{OPEN}{rest}")),
            },
            State::Bare { fenced } => {
                self.buf = rest;
                let piece = match self.bare(fenced, true) {
                    Bare::Call(call, _) => Piece::Call(call),
                    _ => Piece::Text(std::mem::take(&mut self.buf)),
                };
                self.buf.clear();
                piece
            }
            _ => Piece::Text(rest),
        };
        merge_text(vec![piece])
    }

    /// Looks for a bare (or fenced) call of a known tool at the start of the buffer.
    fn bare(&self, fenced: bool, eof: bool) -> Bare {
        let Some(start) = self.buf.find('{') else {
            return Bare::NotCall;
        };
        let mut it = serde_json::Deserializer::from_str(&self.buf[start..]).into_iter::<Value>();
        let (value, mut end) = match it.next() {
            Some(Ok(v)) => (v, start + it.byte_offset()),
            Some(Err(e)) if e.is_eof() && !eof => return Bare::NeedMore,
            _ => return Bare::NotCall,
        };
        let Some(call) = parse_call(&value.to_string()) else {
            return Bare::NotCall;
        };
        if !self.tools.contains(&call.name) {
            return Bare::NotCall;
        }
        if fenced {
            let tail = &self.buf[end..];
            let t = tail.trim_start();
            if t.starts_with("```") {
                end += tail.len() - t.len() + 3;
            } else if !eof && (t.is_empty() || "```".starts_with(t)) {
                return Bare::NeedMore;
            } else if !eof {
                return Bare::NotCall;
            }
        }
        Bare::Call(call, end)
    }
}

/// Parses a complete output at once; `tools`: the request's tool names.
pub fn parse_all(text: &str, tools: &[&str]) -> Vec<Piece> {
    let mut p = ToolCallParser::with_tools(tools.iter().map(|t| t.to_string()).collect());
    let mut out = p.push(text);
    out.extend(p.finish());
    merge_text(out)
}

/// The function names of a request's `tools` (OpenAI and Ollama shape: `function.name`).
pub fn tool_names(tools: &Value) -> Vec<String> {
    tools
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            t.get("function")
                .unwrap_or(t)
                .get("name")
                .and_then(Value::as_str)
        })
        .map(str::to_string)
        .collect()
}

fn merge_text(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match (out.last_mut(), p) {
            (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
            (_, Piece::Text(b)) if b.is_empty() => {}
            (_, p) => out.push(p),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_forms() {
        let c = parse_call(r#"{"name": "f", "arguments": "{\"a\": 1}"}"#).unwrap();
        assert_eq!(c.arguments, json!({"a": 1}));
        assert_eq!(c.arguments_string(), r#"{"a":1}"#);
        let c = parse_call(r#"{"name": "f"}"#).unwrap();
        assert_eq!(c.arguments_string(), "{}");
        assert!(parse_call(r#"{"arguments": {}}"#).is_none());
        assert!(parse_call("[1, 2]").is_none());
    }
}
