//! Constrained decoding: a JSON schema (or any JSON, a Lark grammar, or a GBNF grammar) turned by
//! `llguidance` into a mask over the vocabulary before each token is sampled, so the answer
//! always parses. [`Grammars`] is built once per model from its GGUF tokenizer (no
//! tokenizer.json needed); each request gets a [`Constraint`], the scheduler's [`Guide`] for it.
//! GBNF, llama.cpp's grammar format, is translated to llguidance's Lark dialect by [`gbnf`].

pub mod gbnf;

use crate::scheduler::Guide;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

pub use gbnf::GbnfError;

/// What a request constrains its answer to.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// Any JSON object (OpenAI's `json_object`, Ollama's `"json"`).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// A Lark grammar, llguidance's dialect.
    Lark(String),
    /// A GBNF grammar (llama.cpp's format, `root` the whole answer).
    Gbnf(String),
    /// Free text until the model generates the `trigger` token, then `then` (OpenAI's
    /// `tool_choice: "auto"`: the answer may be prose, but a tool call once begun must be
    /// valid). When `then` is complete the text is free again with `rearm`, else it ends.
    Triggered {
        trigger: String,
        then: Box<Format>,
        rearm: bool,
    },
}

impl Format {
    /// A stable text for cache keys.
    pub fn key(&self) -> String {
        match self {
            Format::JsonObject => "json_object".into(),
            Format::JsonSchema(s) => format!("json_schema:{s}"),
            Format::Lark(g) => format!("lark:{g}"),
            Format::Gbnf(g) => format!("gbnf:{g}"),
            Format::Triggered {
                trigger,
                then,
                rearm,
            } => format!("triggered:{trigger}:{rearm}:{}", then.key()),
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Format::JsonObject => {
                TopLevelGrammar::from_json_schema(bounded_whitespace(json!({"type": "object"})))
            }
            Format::JsonSchema(s) => {
                TopLevelGrammar::from_json_schema(bounded_whitespace(s.clone()))
            }
            Format::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            Format::Gbnf(g) => TopLevelGrammar::from_lark(
                gbnf::to_lark(g).map_err(|e| anyhow!("the GBNF grammar is not valid: {e}"))?,
            ),
            Format::Triggered { then, .. } => then.grammar()?,
        })
    }
}

/// Whitespace between JSON tokens: a space, or one or two line breaks and up to 20 spaces or tabs
/// of indentation (llama.cpp's grammars allow the same). Unbounded whitespace lets a small model
/// pad with spaces until its token budget runs out, where the schema wants a key it does not
/// choose to write.
pub const JSON_WHITESPACE: &str = r"[ ]|\n{1,2}[ \t]{0,20}";

/// `schema` with llguidance's whitespace option set to [`JSON_WHITESPACE`], unless it sets
/// its own `x-guidance` options.
pub fn bounded_whitespace(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// Compiled parsers kept for reuse, most recently used last.
const PARSER_CACHE_ENTRIES: usize = 64;

/// A model's vocabulary as llguidance sees it, the factory of parsers over it, and the parsers
/// compiled lately (compiling a schema takes milliseconds; a copy of a compiled one, microseconds).
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
    cache: Mutex<VecDeque<(String, TokenParser)>>,
}

impl Grammars {
    pub fn new(tokenizer: &Tokenizer) -> Result<Grammars> {
        let vocab = tokenizer.vocab_size();
        // Control tokens print nothing; llguidance knows them by a 0xff byte before their name,
        // so that no text can match them.
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                [] => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.token_text(id).as_bytes());
                    w
                }
                b => b.to_vec(),
            })
            .collect();
        Self::from_words(&words, tokenizer.eos)
    }

    /// Over a vocabulary given as each token's bytes.
    fn from_words(words: &[Vec<u8>], eos: u32) -> Result<Grammars> {
        let vocab = words.len();
        let info = TokRxInfo::new(vocab as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, words)));
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Grammars {
            factory,
            vocab,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// Compiles `format` into a constraint for one generation (or copies the parser compiled
    /// for the same format before); an unsupported schema or a bad grammar is an error that
    /// says why.
    pub fn constraint(&self, format: &Format) -> Result<Constraint> {
        let key = format.key();
        let parser = match self.cached(&key) {
            Some(parser) => parser,
            None => {
                let parser = self
                    .factory
                    .create_parser(format.grammar()?)
                    .map_err(|e| anyhow!("the response format cannot be used: {e}"))?;
                self.remember(key, &parser);
                parser
            }
        };
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(anyhow!("the response format cannot be used: {e}"));
        }
        let trigger = match format {
            Format::Triggered { trigger, rearm, .. } => Some(Trigger {
                token: self.token_id(trigger).ok_or_else(|| {
                    anyhow!("the response format cannot be used: '{trigger}' is not one token of this model's vocabulary")
                })?,
                active: false,
                rearm: *rearm,
            }),
            _ => None,
        };
        Ok(Constraint {
            matcher,
            seen: 0,
            vocab: self.vocab,
            trigger,
        })
    }

    /// The token whose text is `text` (a control token's name included).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        let trie = self.factory.tok_env().tok_trie();
        let mut special = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        special.extend_from_slice(text.as_bytes());
        trie.token_id(text.as_bytes())
            .or_else(|| trie.token_id(&special))
    }

    /// A copy of the parser compiled for `key`, which becomes the most recently used. The copy
    /// shares the original's lexer (its automaton, built as masks need it, behind a lock), so
    /// what one generation built the next one reuses.
    fn cached(&self, key: &str) -> Option<TokenParser> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let at = cache.iter().position(|(k, _)| k == key)?;
        let entry = cache.remove(at)?;
        let copy = entry.1.clone();
        cache.push_back(entry);
        Some(copy)
    }

    fn remember(&self, key: String, parser: &TokenParser) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.iter().any(|(k, _)| *k == key) {
            return;
        }
        if cache.len() >= PARSER_CACHE_ENTRIES {
            cache.pop_front();
        }
        cache.push_back((key, parser.clone()));
    }
}

/// One generation's grammar state: fed the tokens generated so far, it masks every token that
/// cannot come next. Once the grammar is complete only end-of-generation is allowed.
pub struct Constraint {
    matcher: Matcher,
    /// Generated tokens already looked at.
    seen: usize,
    vocab: usize,
    trigger: Option<Trigger>,
}

/// A [`Format::Triggered`] constraint's state: the matcher sees only the tokens after the
/// trigger, and masks nothing before it.
struct Trigger {
    token: u32,
    active: bool,
    rearm: bool,
}

impl Constraint {
    /// Whether the tokens so far are a complete answer (`false` once the matcher failed).
    pub fn is_accepting(&mut self) -> bool {
        if self.trigger.as_ref().is_some_and(|t| !t.active) {
            return true;
        }
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Feeds tokens without masking; false when one is not allowed.
    pub fn consume(&mut self, tokens: &[u32]) -> bool {
        self.seen += tokens.len();
        self.feed(tokens).is_ok()
    }

    /// Gives the matcher the tokens it constrains: all of them, or with a trigger those from
    /// the trigger on until the triggered part is complete.
    fn feed(&mut self, tokens: &[u32]) -> anyhow::Result<()> {
        let Some(t) = &mut self.trigger else {
            return self.matcher.consume_tokens(tokens);
        };
        for &token in tokens {
            if !t.active {
                t.active = token == t.token;
                continue;
            }
            self.matcher.consume_token(token)?;
            // The triggered grammars end in a literal, so accepting means complete.
            if t.rearm && self.matcher.is_accepting()? {
                self.matcher.reset()?;
                t.active = false;
            }
        }
        Ok(())
    }
}

impl Guide for Constraint {
    fn mask(&mut self, generated: &[u32], logits: &mut [f32]) {
        let new = &generated[self.seen.min(generated.len())..];
        self.seen = generated.len();
        let fed = self.feed(new);
        if self.trigger.as_ref().is_some_and(|t| !t.active) && fed.is_ok() {
            return;
        }
        let allowed = fed.and_then(|()| self.matcher.compute_mask_or_eos());
        match allowed {
            Ok(mask) => {
                for (id, l) in logits.iter_mut().enumerate() {
                    if id >= self.vocab || !mask.is_allowed(id as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            // Cannot happen for tokens the mask allowed; end the answer rather than let it run free.
            Err(_) => {
                let eos = self.matcher.tok_env().map(|e| e.tok_trie().eos_token());
                for (id, l) in logits.iter_mut().enumerate() {
                    if eos.as_ref().map_or(true, |&e| id as u32 != e) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// The tokens the grammar forces after the last sampled one (a key's name, the punctuation
    /// around it), run in the same step as it: the mask leaves sampling nothing else but another
    /// split of the same bytes, so they are nearly always kept, and one step of several tokens
    /// costs less than as many steps.
    fn draft(&mut self, history: &[u32], generated: usize, drafts: &mut Vec<u32>) {
        let generated = &history[history.len() - generated.min(history.len())..];
        let new = &generated[self.seen.min(generated.len())..];
        self.seen = generated.len();
        if self.feed(new).is_err() || self.trigger.as_ref().is_some_and(|t| !t.active) {
            return;
        }
        // llguidance's own forced tokens need a canonical tokenizer; the trie's longest-match
        // split of the forced bytes is what BPE gives on them nearly always, and a draft the
        // model would split otherwise is only dropped.
        let forced = self.matcher.compute_ff_bytes();
        if forced.is_empty() {
            return;
        }
        if let Ok(env) = self.matcher.tok_env() {
            let tokens = env.tok_trie().greedy_tokenize(&forced);
            drafts.extend(tokens.into_iter().take(MAX_FORCED_DRAFTS));
        }
    }
}

/// Most forced tokens run in one step (a long constant's rest runs in the next).
const MAX_FORCED_DRAFTS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of one token per byte (but 0xff, never in UTF-8) and an end token: each
    /// text is its bytes, so a grammar's language can be checked without a model.
    fn byte_grammars() -> Grammars {
        let mut words: Vec<Vec<u8>> = (0..255u8).map(|b| vec![b]).collect();
        words.push(b"\xff<eos>".to_vec());
        Grammars::from_words(&words, 255).unwrap()
    }

    fn accepts(g: &Grammars, format: &Format, text: &str) -> bool {
        let mut c = g.constraint(format).unwrap();
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        c.consume(&tokens) && c.is_accepting()
    }

    fn check(gbnf: &str, good: &[&str], bad: &[&str]) {
        let g = byte_grammars();
        let f = Format::Gbnf(gbnf.to_string());
        let lark = gbnf::to_lark(gbnf).unwrap();
        for t in good {
            assert!(accepts(&g, &f, t), "{t:?} should match\n{gbnf}\n{lark}");
        }
        for t in bad {
            assert!(
                !accepts(&g, &f, t),
                "{t:?} should not match\n{gbnf}\n{lark}"
            );
        }
    }

    const JSON_GBNF: &str = r#"# JSON, as llama.cpp's grammars write it
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt/] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

    #[test]
    fn json_in_gbnf() {
        check(
            JSON_GBNF,
            &[
                "{}",
                r#"{"a": 1}"#,
                "{\"a\": [1, 2.5, -3e7, true, null, \"x\\n\\u00e9\"],\n  \"b\": {\"c\": false} }",
                r#"{"é": "ü"}"#,
            ],
            &[
                "",
                "{",
                r#"{"a" 1}"#,
                r#"{"a": 01x}"#,
                "[1]",
                r#"{"a": "\q"}"#,
                "{\"a\": \"\u{1}\"}",
            ],
        );
    }

    #[test]
    fn arithmetic_in_gbnf() {
        let g = "root  ::= (expr \"=\" ws term \"\\n\")+\nexpr  ::= term ([-+*/] term)*\nterm  ::= ident | num | \"(\" ws expr \")\" ws\nident ::= [a-z] [a-z0-9_]* ws\nnum   ::= [0-9]+ ws\nws    ::= [ \\t\\n]*\n";
        // `ident` and `num` end in `ws`, which could take the "\n" the root needs: the
        // translation must split them, or "a=b\n" would not parse.
        check(
            g,
            &["a=b\n", "x +12 *(y -3)= 4\n", "a=b\nc = 1\n", "(a)=(b)\n"],
            // No space may follow an operator.
            &["a=b", "=b\n", "a=\n", "a==b\n", "a=b + c\n"],
        );
    }

    #[test]
    fn list_in_gbnf() {
        let g = "root ::= item+\n# no line breaks inside an item\nitem ::= \"- \" [^\\r\\n\\x0b\\x0c\\x85\\u2028\\u2029]+ \"\\n\"\n";
        check(
            g,
            &["- milk\n", "- milk\n- eggs and ham\n"],
            &["", "- milk", "-milk\n", "- \n", "- a\r\n"],
        );
    }

    #[test]
    fn yes_no_in_gbnf() {
        check(
            "root ::= \"yes\" | \"no\"",
            &["yes", "no"],
            &["", "y", "yesno", "No"],
        );
    }

    #[test]
    fn longest_match_cases_keep_their_meaning() {
        // a lexeme that could read on must give back what follows it
        check(
            "root ::= [a-z]+ \"ing\" | \"(\" root \")\"",
            &["sing", "singing", "(bring)", "((thinging))"],
            &["ing", "sin", "(sing"],
        );
        check(
            "root ::= (\"a\" | \"ab\") \"bc\" | \"(\" root \")\"",
            &["abc", "abbc", "(abc)"],
            &["ac", "bc"],
        );
        check(
            "root ::= x x | \"(\" root \")\"\nx ::= [0-9]+",
            &["12", "123", "(99)"],
            &["1", "()"],
        );
        // `.` takes newlines; tail recursion; repetition counts; an empty alternative
        check(
            "root ::= . . \"!\" rest\nrest ::= [ab] rest |\n",
            &["\n\n!", "x\u{e9}!abba"],
            &["x!", "xy!c"],
        );
        check(
            "root ::= \"a\"{2} \"b\"{1,} \"c\"{0,2} d{3,4}\nd ::= \"d\" | \"\"",
            &["aab", "aabbbcc", "aabddd", "aabdddd", "aab"],
            &["ab", "aaccc", "aabccc", "aabddddd"],
        );
    }

    #[test]
    fn gbnf_errors_say_where_and_what() {
        let g = byte_grammars();
        let e = g
            .constraint(&Format::Gbnf("root ::= \"a\" | \n  ( \"b\"".into()))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("the GBNF grammar is not valid: line 2, column 8: expected"),
            "{e}"
        );
    }

    /// The tokens `mask` leaves allowed after `generated`.
    fn allowed(c: &mut Constraint, generated: &[u32], vocab: usize) -> Vec<u32> {
        let mut logits = vec![0.0; vocab];
        c.mask(generated, &mut logits);
        (0..vocab as u32)
            .filter(|&t| logits[t as usize].is_finite())
            .collect()
    }

    #[test]
    fn a_triggered_format_holds_only_what_follows_its_trigger() {
        // Bytes, end-of-generation (255) and a trigger token "<t>" (256).
        let mut words: Vec<Vec<u8>> = (0..255u8).map(|b| vec![b]).collect();
        words.push(b"\xff<eos>".to_vec());
        words.push(b"<t>".to_vec());
        let g = Grammars::from_words(&words, 255).unwrap();
        assert_eq!(g.token_id("<t>"), Some(256));
        let triggered = |rearm| Format::Triggered {
            trigger: "<t>".into(),
            then: Box::new(Format::Lark("start: \"ab\"".into())),
            rearm,
        };
        for rearm in [true, false] {
            let mut c = g.constraint(&triggered(rearm)).unwrap();
            let mut text: Vec<u32> = b"hi".iter().map(|&b| u32::from(b)).collect();
            assert_eq!(
                allowed(&mut c, &text, 257).len(),
                257,
                "free before the trigger"
            );
            assert!(c.is_accepting());
            text.push(256);
            assert_eq!(allowed(&mut c, &text, 257), [u32::from(b'a')]);
            assert!(!c.is_accepting(), "inside the triggered part");
            text.push(u32::from(b'a'));
            assert_eq!(allowed(&mut c, &text, 257), [u32::from(b'b')]);
            text.push(u32::from(b'b'));
            let after = allowed(&mut c, &text, 257);
            match rearm {
                true => assert_eq!(after.len(), 257, "free again"),
                false => assert_eq!(after, [255], "only the end"),
            }
        }
        let mut c = g.constraint(&triggered(true)).unwrap();
        assert!(!c.consume(&[256, u32::from(b'x')]));
        let missing = Format::Triggered {
            trigger: "<none>".into(),
            then: Box::new(Format::JsonObject),
            rearm: true,
        };
        let e = g.constraint(&missing).err().unwrap().to_string();
        assert!(e.contains("'<none>' is not one token"), "{e}");
    }

    #[test]
    fn forced_tokens_are_drafted() {
        let g = byte_grammars();
        let f = Format::Lark("start: \"hello\" /[0-9]/ \"!\"".into());
        let mut c = g.constraint(&f).unwrap();
        let bytes = |t: &str| t.bytes().map(u32::from).collect::<Vec<_>>();
        let mut drafts = Vec::new();
        // The prompt only: "hello" is forced.
        c.draft(&[7, 7], 0, &mut drafts);
        assert_eq!(drafts, bytes("hello"));
        // "he" sampled (the "e" not yet masked for): "llo" is left.
        let mut history = vec![7, 7];
        history.extend(bytes("he"));
        drafts.clear();
        c.draft(&history, 2, &mut drafts);
        assert_eq!(drafts, bytes("llo"));
        // Before the digit nothing is forced; after it, "!".
        history.extend(bytes("llo"));
        drafts.clear();
        c.draft(&history, 5, &mut drafts);
        assert!(drafts.is_empty(), "{drafts:?}");
        history.extend(bytes("4"));
        c.draft(&history, 6, &mut drafts);
        assert_eq!(drafts, bytes("!"));
        // A triggered format drafts nothing before its trigger.
        let mut words: Vec<Vec<u8>> = (0..255u8).map(|b| vec![b]).collect();
        words.push(b"\xff<eos>".to_vec());
        words.push(b"<t>".to_vec());
        let g = Grammars::from_words(&words, 255).unwrap();
        let f = Format::Triggered {
            trigger: "<t>".into(),
            then: Box::new(Format::Lark("start: \"ab\"".into())),
            rearm: true,
        };
        let mut c = g.constraint(&f).unwrap();
        drafts.clear();
        c.draft(&bytes("hi"), 2, &mut drafts);
        assert!(drafts.is_empty());
        c.draft(&[104, 105, 256], 3, &mut drafts);
        assert_eq!(drafts, bytes("ab"));
    }

    #[test]
    fn compiled_parsers_are_reused_and_bounded() {
        let g = byte_grammars();
        let f = Format::Gbnf("root ::= \"yes\" | \"no\"".into());
        assert!(accepts(&g, &f, "yes"));
        assert!(accepts(&g, &f, "no"));
        assert!(!accepts(&g, &f, "maybe"));
        assert_eq!(g.cache.lock().unwrap().len(), 1);
        for k in 0..PARSER_CACHE_ENTRIES + 5 {
            let f = Format::Lark(format!("start: \"x{k}\""));
            assert!(accepts(&g, &f, &format!("x{k}")));
        }
        let cache = g.cache.lock().unwrap();
        assert_eq!(cache.len(), PARSER_CACHE_ENTRIES);
        assert!(cache.iter().all(|(k, _)| !k.starts_with("gbnf:")));
    }
}
