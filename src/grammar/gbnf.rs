//! GBNF, llama.cpp's grammar format, translated to llguidance's Lark dialect.
//!
//! GBNF is a context-free grammar over characters: `name ::= ...` rules, `root` the whole
//! answer, string literals, character classes, `.`, groups, `* + ? {m,n}`, and (in recent
//! llama.cpp) token references `<[ID]>`. llguidance reads Lark, where literals and `/regex/`s are
//! the lexemes of an Earley parser and the lexer takes the longest match it can. Putting every
//! character in a lexeme of its own would keep GBNF's meaning but make masks slow (and
//! llguidance refuses grammars that repeat one-character lexemes for long), so the translation
//! fuses what is regular into single lexemes:
//!
//! - a rule that refers to no rule but regular ones, and to itself only at the end of an
//!   alternative (`ws ::= ([ \t] ws)?`), is one regular expression, used as one lexeme;
//! - in the other rules each repeated or multi-character item (`[0-9]+`, `"true"`,
//!   `("," ws)*`) is one lexeme.
//!
//! A fused lexeme changes the meaning where the longest match takes characters that the text
//! after it needs: `[a-z]+ "ing"` must give "ing" back to the literal, which a lexer never does.
//! So each translation is checked: for every lexeme, the bytes that could extend a complete
//! match of it (or of a lexeme that may be read in its place) are compared with the bytes that
//! may follow it in the grammar, by walking the lexemes' automata (llguidance's own regex
//! engine). Where they meet, the lexeme is split back into its parts, down to single characters
//! if need be, and the check runs again. The grammar llguidance gets accepts exactly the texts
//! the GBNF grammar accepts.

use llguidance::derivre::{Regex, StateID};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::rc::Rc;

/// A grammar that cannot be used: where (1-based, in characters), and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GbnfError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for GbnfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for GbnfError {}

/// Translates a GBNF grammar into llguidance's Lark dialect.
pub fn to_lark(src: &str) -> Result<String, GbnfError> {
    let grammar = parse(src)?;
    Ok(Translator::new(&grammar).translate())
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Groups nested deeper than this are refused (llama.cpp has no limit; real grammars nest a few).
const MAX_NESTING: usize = 100;
/// The largest count a repetition `{m,n}` may name.
const MAX_REPEAT: u32 = 100_000;
/// Unicode scalar values, as ranges of code points.
const ALL_CHARS: [(u32, u32); 2] = [(0, 0xD7FF), (0xE000, 0x10FFFF)];

#[derive(Debug)]
struct Grammar {
    rules: Vec<RuleDef>,
    root: usize,
}

#[derive(Debug)]
struct RuleDef {
    name: String,
    alts: Vec<Seq>,
}

type Seq = Vec<Item>;

#[derive(Debug)]
struct Item {
    atom: Atom,
    min: u32,
    max: Option<u32>,
    /// Unique in the grammar: names the item's lexeme in the split set.
    id: usize,
}

#[derive(Debug)]
enum Atom {
    Lit(Vec<char>),
    /// Sorted, disjoint, non-empty ranges of Unicode scalar values.
    Class(Rc<Vec<(u32, u32)>>),
    /// A rule by name, where it was referenced, and (once resolved) its index.
    Ref {
        name: String,
        at: usize,
        rule: usize,
    },
    Group(Vec<Seq>),
    /// A token reference, already in Lark's syntax (`<[42]>`, `<[^42]>`, `<|im_end|>`).
    Token(String),
}

fn parse(src: &str) -> Result<Grammar, GbnfError> {
    let mut p = Parser {
        s: src.chars().collect(),
        i: 0,
        depth: 0,
        next_id: 0,
    };
    let mut rules: Vec<(RuleDef, usize)> = Vec::new();
    p.skip_space(true);
    while p.peek().is_some() {
        rules.push(p.rule()?);
        p.skip_space(true);
    }
    let mut index: HashMap<String, usize> = HashMap::new();
    for (k, (r, at)) in rules.iter().enumerate() {
        if let Some(&first) = index.get(&r.name) {
            let (line, column) = p.line_col(rules[first].1);
            return Err(p.err(
                *at,
                format!(
                    "rule '{}' is defined twice (first at line {line}, column {column})",
                    r.name
                ),
            ));
        }
        index.insert(r.name.clone(), k);
    }
    let Some(&root) = index.get("root") else {
        let at = if rules.is_empty() {
            0
        } else {
            src.chars().count()
        };
        let what = if rules.is_empty() {
            "the grammar has no rules: expected at least `root ::= ...`"
        } else {
            "the grammar has no 'root' rule: expected `root ::= ...`, the rule the whole answer matches"
        };
        return Err(p.err(at, what.to_string()));
    };
    let mut defs: Vec<RuleDef> = rules.into_iter().map(|(r, _)| r).collect();
    for d in &mut defs {
        for seq in &mut d.alts {
            resolve(seq, &index, &p)?;
        }
    }
    Ok(Grammar { rules: defs, root })
}

fn resolve(seq: &mut Seq, index: &HashMap<String, usize>, p: &Parser) -> Result<(), GbnfError> {
    for item in seq {
        match &mut item.atom {
            Atom::Ref { name, at, rule } => match index.get(name.as_str()) {
                Some(&k) => *rule = k,
                None => return Err(p.err(*at, format!("undefined rule '{name}'"))),
            },
            Atom::Group(alts) => {
                for s in alts {
                    resolve(s, index, p)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

struct Parser {
    s: Vec<char>,
    i: usize,
    depth: usize,
    next_id: usize,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn peek_at(&self, k: usize) -> Option<char> {
        self.s.get(self.i + k).copied()
    }

    fn line_col(&self, at: usize) -> (usize, usize) {
        let (mut line, mut column) = (1, 1);
        for &c in &self.s[..at.min(self.s.len())] {
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        (line, column)
    }

    fn err(&self, at: usize, message: String) -> GbnfError {
        let (line, column) = self.line_col(at);
        GbnfError {
            line,
            column,
            message,
        }
    }

    /// What is at the cursor, for "expected X, found Y".
    fn found(&self) -> String {
        match self.peek() {
            None => "the end of the grammar".into(),
            Some('\n' | '\r') => "the end of the line".into(),
            Some(c) if c.is_control() => format!("the character U+{:04X}", c as u32),
            Some(c) => format!("'{c}'"),
        }
    }

    fn expected(&self, what: &str) -> GbnfError {
        self.err(self.i, format!("expected {what}, found {}", self.found()))
    }

    /// Spaces, tabs and `#` comments; line ends too where `newline_ok` (inside a group, after
    /// `::=` or `|`, between rules).
    fn skip_space(&mut self, newline_ok: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.i += 1,
                '#' => {
                    while !matches!(self.peek(), None | Some('\n' | '\r')) {
                        self.i += 1;
                    }
                }
                '\n' | '\r' if newline_ok => self.i += 1,
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(is_name_char) {
            self.i += 1;
        }
        (self.i > start).then(|| self.s[start..self.i].iter().collect())
    }

    fn rule(&mut self) -> Result<(RuleDef, usize), GbnfError> {
        let at = self.i;
        let Some(name) = self.name() else {
            return Err(self.expected("a rule name (letters, digits, '-', '_') to start a rule"));
        };
        self.skip_space(false);
        if !(self.peek() == Some(':')
            && self.peek_at(1) == Some(':')
            && self.peek_at(2) == Some('='))
        {
            return Err(self.expected(&format!("'::=' after the rule name '{name}'")));
        }
        self.i += 3;
        self.skip_space(true);
        let alts = self.alternates(false)?;
        match self.peek() {
            None => {}
            Some('\n') => self.i += 1,
            Some('\r') => {
                self.i += 1;
                if self.peek() == Some('\n') {
                    self.i += 1;
                }
            }
            Some(')') => {
                return Err(self.err(
                    self.i,
                    format!("unmatched ')' in rule '{name}': no group is open"),
                ))
            }
            Some(_) => {
                return Err(self.expected(&format!(
                    "an item, '|' or the end of the line in rule '{name}'"
                )))
            }
        }
        Ok((RuleDef { name, alts }, at))
    }

    fn alternates(&mut self, nested: bool) -> Result<Vec<Seq>, GbnfError> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.i += 1;
            self.skip_space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts)
    }

    fn new_item(&mut self, atom: Atom) -> Item {
        self.next_id += 1;
        Item {
            atom,
            min: 1,
            max: Some(1),
            id: self.next_id,
        }
    }

    fn sequence(&mut self, nested: bool) -> Result<Seq, GbnfError> {
        let mut seq: Seq = Vec::new();
        while let Some(c) = self.peek() {
            let at = self.i;
            let atom = match c {
                '"' => {
                    self.i += 1;
                    Atom::Lit(self.literal(at)?)
                }
                '[' => {
                    self.i += 1;
                    Atom::Class(Rc::new(self.class(at)?))
                }
                '.' => {
                    self.i += 1;
                    Atom::Class(Rc::new(ALL_CHARS.to_vec()))
                }
                '(' => {
                    if self.depth >= MAX_NESTING {
                        return Err(self.err(
                            at,
                            format!("groups are nested more than {MAX_NESTING} deep"),
                        ));
                    }
                    self.i += 1;
                    self.depth += 1;
                    self.skip_space(true);
                    let alts = self.alternates(true)?;
                    self.depth -= 1;
                    if self.peek() != Some(')') {
                        let (line, column) = self.line_col(at);
                        return Err(self.expected(&format!(
                            "an item, '|' or ')' to close the group opened at line {line}, column {column}"
                        )));
                    }
                    self.i += 1;
                    Atom::Group(alts)
                }
                '<' | '!' => Atom::Token(self.token()?),
                '*' | '+' | '?' | '{' => {
                    let Some(last) = seq.pop() else {
                        return Err(self.err(
                            at,
                            format!("'{c}' must follow an item to repeat (a literal, class, rule name or group)"),
                        ));
                    };
                    let (min, max) = self.repetition(nested)?;
                    let item = if (last.min, last.max) == (1, Some(1)) {
                        Item { min, max, ..last }
                    } else {
                        let mut outer = self.new_item(Atom::Group(vec![vec![last]]));
                        (outer.min, outer.max) = (min, max);
                        outer
                    };
                    seq.push(item);
                    self.skip_space(nested);
                    continue;
                }
                c if is_name_char(c) => {
                    let name = self.name().unwrap_or_default();
                    Atom::Ref {
                        name,
                        at,
                        rule: usize::MAX,
                    }
                }
                _ => break,
            };
            let item = self.new_item(atom);
            seq.push(item);
            self.skip_space(nested);
        }
        Ok(seq)
    }

    /// `*`, `+`, `?`, `{m}`, `{m,}` or `{m,n}` at the cursor.
    fn repetition(&mut self, nested: bool) -> Result<(u32, Option<u32>), GbnfError> {
        let c = self.peek();
        self.i += 1;
        match c {
            Some('*') => return Ok((0, None)),
            Some('+') => return Ok((1, None)),
            Some('?') => return Ok((0, Some(1))),
            _ => {}
        }
        let open = self.i - 1;
        self.skip_space(nested);
        let min = self.number("a number after '{' (as in {2}, {2,} or {2,5})")?;
        self.skip_space(nested);
        let max = if self.peek() == Some(',') {
            self.i += 1;
            self.skip_space(nested);
            let max = if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                Some(self.number("a number")?)
            } else {
                None
            };
            self.skip_space(nested);
            max
        } else {
            Some(min)
        };
        if self.peek() != Some('}') {
            return Err(self.expected("',' or '}' to close the repetition"));
        }
        self.i += 1;
        if let Some(max) = max {
            if max < min {
                return Err(self.err(
                    open,
                    format!("the repetition {{{min},{max}}} has its maximum below its minimum"),
                ));
            }
        }
        Ok((min, max))
    }

    fn number(&mut self, what: &str) -> Result<u32, GbnfError> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        if self.i == start {
            return Err(self.expected(what));
        }
        let text: String = self.s[start..self.i].iter().collect();
        match text.parse::<u32>() {
            Ok(n) if n <= MAX_REPEAT => Ok(n),
            _ => Err(self.err(
                start,
                format!("the repetition count {text} is above the limit of {MAX_REPEAT}"),
            )),
        }
    }

    /// A string literal's characters; the cursor is past the opening quote.
    fn literal(&mut self, open: usize) -> Result<Vec<char>, GbnfError> {
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => {
                    let (line, column) = self.line_col(open);
                    return Err(self.expected(&format!(
                        "'\"' to close the string opened at line {line}, column {column}"
                    )));
                }
                Some('"') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => {
                    let at = self.i;
                    let code = self.char_code()?;
                    match char::from_u32(code) {
                        Some(c) => out.push(c),
                        None => {
                            return Err(self
                                .err(at, format!("U+{code:04X} is a surrogate, not a character")))
                        }
                    }
                }
            }
        }
    }

    /// One character of a literal or class, escapes decoded, as a code point.
    fn char_code(&mut self) -> Result<u32, GbnfError> {
        let at = self.i;
        let Some(c) = self.peek() else {
            return Err(self.expected("a character"));
        };
        self.i += 1;
        if c != '\\' {
            return Ok(c as u32);
        }
        let Some(e) = self.peek() else {
            return Err(self.expected("an escape after '\\'"));
        };
        self.i += 1;
        let digits = match e {
            'n' => return Ok('\n' as u32),
            't' => return Ok('\t' as u32),
            'r' => return Ok('\r' as u32),
            '\\' | '"' | '[' | ']' => return Ok(e as u32),
            'x' => 2,
            'u' => 4,
            'U' => 8,
            _ => {
                return Err(self.err(
                    at,
                    format!("unknown escape '\\{e}': expected one of \\n \\t \\r \\\\ \\\" \\[ \\] \\xHH \\uHHHH \\UHHHHHHHH"),
                ))
            }
        };
        let mut code: u32 = 0;
        for _ in 0..digits {
            match self.peek().and_then(|c| c.to_digit(16)) {
                Some(d) => {
                    code = code * 16 + d;
                    self.i += 1;
                }
                None => return Err(self.expected(&format!("{digits} hex digits after '\\{e}'"))),
            }
        }
        if code > 0x10FFFF {
            return Err(self.err(
                at,
                format!("\\{e}{code:X} is above U+10FFFF, the last Unicode code point"),
            ));
        }
        Ok(code)
    }

    /// A character class's ranges (negation applied); the cursor is past `[`.
    fn class(&mut self, open: usize) -> Result<Vec<(u32, u32)>, GbnfError> {
        let negated = self.peek() == Some('^');
        if negated {
            self.i += 1;
        }
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                None => {
                    let (line, column) = self.line_col(open);
                    return Err(self.expected(&format!(
                        "']' to close the character class opened at line {line}, column {column}"
                    )));
                }
                Some(']') => {
                    self.i += 1;
                    break;
                }
                _ => {}
            }
            let at = self.i;
            let lo = self.char_code()?;
            let mut hi = lo;
            if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']') {
                self.i += 1;
                hi = self.char_code()?;
                if hi < lo {
                    return Err(
                        self.err(at, format!("the range U+{lo:04X}-U+{hi:04X} is reversed"))
                    );
                }
            }
            ranges.push((lo, hi));
        }
        let mut ranges = normalize(ranges);
        if negated {
            ranges = complement(&ranges);
        }
        if ranges.is_empty() {
            return Err(self.err(open, "this character class matches no character".into()));
        }
        Ok(ranges)
    }

    /// `<[ID]>`, `!<[ID]>` or `<name>` at the cursor, in Lark's syntax.
    fn token(&mut self) -> Result<String, GbnfError> {
        let at = self.i;
        let negated = self.peek() == Some('!');
        if negated {
            self.i += 1;
            if self.peek() != Some('<') {
                return Err(self.expected("'<' after '!' (as in !<[ID]>)"));
            }
        }
        self.i += 1;
        if self.peek() == Some('[') {
            self.i += 1;
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            if self.i == start {
                return Err(self.expected("a token id after '<['"));
            }
            let id: String = self.s[start..self.i].iter().collect();
            if id.parse::<u32>().is_err() {
                return Err(self.err(start, format!("the token id {id} is too large")));
            }
            if !(self.peek() == Some(']') && self.peek_at(1) == Some('>')) {
                return Err(self.expected("']>' to close the token id"));
            }
            self.i += 2;
            return Ok(if negated {
                format!("<[^{id}]>")
            } else {
                format!("<[{id}]>")
            });
        }
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c != '>' && c != '<' && !c.is_whitespace())
        {
            self.i += 1;
        }
        if self.i == start || self.peek() != Some('>') {
            return Err(self.expected("a token name and '>' (as in <|im_end|>)"));
        }
        let name: String = self.s[start..self.i].iter().collect();
        self.i += 1;
        if negated {
            return Err(self.err(
                at,
                format!("!<{name}> is not supported: negate a token by its id, as !<[ID]>"),
            ));
        }
        Ok(format!("<{name}>"))
    }
}

/// Sorted, merged ranges, without the surrogates (no text holds them).
fn normalize(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    let mut clipped = Vec::with_capacity(ranges.len() + 1);
    for (lo, hi) in ranges.drain(..) {
        for (a, b) in ALL_CHARS {
            let (l, h) = (lo.max(a), hi.min(b));
            if l <= h {
                clipped.push((l, h));
            }
        }
    }
    clipped.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(clipped.len());
    for (lo, hi) in clipped {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn complement(ranges: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut next = 0u32;
    for &(lo, hi) in ranges {
        if lo > next {
            out.push((next, lo - 1));
        }
        next = hi + 1;
    }
    if next <= 0x10FFFF {
        out.push((next, 0x10FFFF));
    }
    normalize(out)
}

// ---------------------------------------------------------------------------------------------
// Regular expressions of the fused parts

/// Rules inlined into one lexeme nest at most this deep.
const MAX_RX_DEPTH: u32 = 60;
/// A lexeme's regular expression longer than this is not fused.
const MAX_RX_LEN: usize = 200_000;

#[derive(Debug)]
enum RxKind {
    Eps,
    /// One or more characters.
    Lit(Vec<char>),
    Class(Rc<Vec<(u32, u32)>>),
    Seq(Vec<Rx>),
    Alt(Vec<Rx>),
    Rep(Rx, u32, Option<u32>),
}

#[derive(Debug)]
struct RxNode {
    kind: RxKind,
    depth: u32,
    nullable: bool,
}

type Rx = Rc<RxNode>;

fn node(kind: RxKind) -> Rx {
    let (depth, nullable) = match &kind {
        RxKind::Eps => (0, true),
        RxKind::Lit(_) | RxKind::Class(_) => (0, false),
        RxKind::Seq(v) => (
            v.iter().map(|x| x.depth).max().unwrap_or(0) + 1,
            v.iter().all(|x| x.nullable),
        ),
        RxKind::Alt(v) => (
            v.iter().map(|x| x.depth).max().unwrap_or(0) + 1,
            v.iter().any(|x| x.nullable),
        ),
        RxKind::Rep(x, min, _) => (x.depth + 1, *min == 0 || x.nullable),
    };
    Rc::new(RxNode {
        kind,
        depth,
        nullable,
    })
}

fn eps() -> Rx {
    node(RxKind::Eps)
}

fn seq(parts: Vec<Rx>) -> Rx {
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        match &p.kind {
            RxKind::Eps => {}
            RxKind::Seq(v) => out.extend(v.iter().cloned()),
            _ => out.push(p),
        }
    }
    match out.len() {
        0 => eps(),
        1 => out.pop().unwrap_or_else(eps),
        _ => node(RxKind::Seq(out)),
    }
}

/// Alternatives; an empty one makes the rest optional. `parts` is not empty.
fn alt(parts: Vec<Rx>) -> Rx {
    let mut out = Vec::with_capacity(parts.len());
    let mut empty = false;
    for p in parts {
        match &p.kind {
            RxKind::Eps => empty = true,
            RxKind::Alt(v) => out.extend(v.iter().cloned()),
            _ => out.push(p),
        }
    }
    let inner = match out.len() {
        0 => return eps(),
        1 => out.pop().unwrap_or_else(eps),
        _ => node(RxKind::Alt(out)),
    };
    if empty && !inner.nullable {
        rep(inner, 0, Some(1))
    } else {
        inner
    }
}

fn rep(x: Rx, min: u32, max: Option<u32>) -> Rx {
    if matches!(x.kind, RxKind::Eps) || max == Some(0) {
        return eps();
    }
    if (min, max) == (1, Some(1)) {
        return x;
    }
    node(RxKind::Rep(x, min, max))
}

/// The non-empty strings of `x`; `None` when it has none.
fn non_empty(x: &Rx) -> Option<Rx> {
    if !x.nullable {
        return Some(x.clone());
    }
    match &x.kind {
        RxKind::Eps | RxKind::Lit(_) | RxKind::Class(_) => None,
        RxKind::Alt(v) => {
            let parts: Vec<Rx> = v.iter().filter_map(non_empty).collect();
            (!parts.is_empty()).then(|| alt(parts))
        }
        // Every part can be empty: the first non-empty part, then anything.
        RxKind::Seq(v) => {
            let mut parts = Vec::new();
            for (k, p) in v.iter().enumerate() {
                if let Some(ne) = non_empty(p) {
                    let mut s = vec![ne];
                    s.extend(v[k + 1..].iter().cloned());
                    parts.push(seq(s));
                }
            }
            (!parts.is_empty()).then(|| alt(parts))
        }
        // x is nullable, so a repetition of a non-nullable inner has min == 0.
        RxKind::Rep(inner, _, max) => {
            if !inner.nullable {
                return Some(rep(inner.clone(), 1, *max));
            }
            // inner{m,n} == inner{0,n} when inner can be empty
            let ne = non_empty(inner)?;
            Some(seq(vec![
                ne,
                rep(inner.clone(), 0, max.map(|n| n.saturating_sub(1))),
            ]))
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Prec {
    Alt,
    Seq,
    Rep,
}

/// `x` in Rust regex syntax, or `None` past `MAX_RX_LEN`.
fn print_rx(x: &Rx) -> Option<String> {
    let mut out = String::new();
    print_into(x, Prec::Alt, &mut out)?;
    Some(out)
}

fn print_into(x: &Rx, ctx: Prec, out: &mut String) -> Option<()> {
    if out.len() > MAX_RX_LEN {
        return None;
    }
    match &x.kind {
        RxKind::Eps => out.push_str("(?:)"),
        RxKind::Lit(chars) => {
            let wrap = chars.len() > 1 && ctx == Prec::Rep;
            if wrap {
                out.push_str("(?:");
            }
            for &c in chars {
                push_escaped(c as u32, out);
            }
            if wrap {
                out.push(')');
            }
        }
        RxKind::Class(ranges) => print_class(ranges, out),
        RxKind::Seq(v) => {
            let wrap = ctx == Prec::Rep;
            if wrap {
                out.push_str("(?:");
            }
            for p in v {
                print_into(p, Prec::Seq, out)?;
            }
            if wrap {
                out.push(')');
            }
        }
        RxKind::Alt(v) => {
            let wrap = ctx != Prec::Alt;
            if wrap {
                out.push_str("(?:");
            }
            for (k, p) in v.iter().enumerate() {
                if k > 0 {
                    out.push('|');
                }
                print_into(p, Prec::Alt, out)?;
            }
            if wrap {
                out.push(')');
            }
        }
        RxKind::Rep(inner, min, max) => {
            let wrap = ctx == Prec::Rep;
            if wrap {
                out.push_str("(?:");
            }
            print_into(inner, Prec::Rep, out)?;
            match (min, max) {
                (0, None) => out.push('*'),
                (1, None) => out.push('+'),
                (0, Some(1)) => out.push('?'),
                (m, None) => out.push_str(&format!("{{{m},}}")),
                (m, Some(n)) if m == n => out.push_str(&format!("{{{m}}}")),
                (m, Some(n)) => out.push_str(&format!("{{{m},{n}}}")),
            }
            if wrap {
                out.push(')');
            }
        }
    }
    Some(())
}

fn print_class(ranges: &[(u32, u32)], out: &mut String) {
    if let [(lo, hi)] = ranges {
        if lo == hi {
            push_escaped(*lo, out);
            return;
        }
    }
    out.push('[');
    for &(lo, hi) in ranges {
        push_escaped(lo, out);
        if hi > lo {
            out.push('-');
            push_escaped(hi, out);
        }
    }
    out.push(']');
}

/// A character for a regex inside Lark's `/.../`, in or out of a class: meta characters
/// escaped, `/`, control and non-ASCII characters as `\x{..}`.
fn push_escaped(c: u32, out: &mut String) {
    match char::from_u32(c) {
        Some(ch) if ch.is_ascii_alphanumeric() || ch == ' ' || ch == '_' => out.push(ch),
        Some(
            ch @ ('\\' | '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^'
            | '$' | '#' | '&' | '-' | '~'),
        ) => {
            out.push('\\');
            out.push(ch);
        }
        Some(ch) if ch.is_ascii_graphic() && ch != '/' => out.push(ch),
        _ => out.push_str(&format!("\\x{{{c:X}}}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Translation

/// What a lexeme stands for, to split it when it is not safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Site {
    /// A regular rule used as one lexeme.
    Rule(usize),
    /// An item (with its repetition) fused into one lexeme.
    Item(usize),
    /// One character: nothing to split.
    Fixed,
}

#[derive(Clone, Copy)]
enum Regular {
    Unknown,
    InProgress,
    No,
}

struct Translator<'g> {
    g: &'g Grammar,
    state: Vec<Regular>,
    rx: Vec<Option<Rx>>,
}

/// The grammar handed to llguidance, as built for one set of split sites.
struct Ir {
    rules: Vec<IrRule>,
    lexemes: Vec<IrLexeme>,
}

struct IrRule {
    name: String,
    alts: Vec<Vec<IrItem>>,
}

struct IrLexeme {
    regex: String,
    site: Site,
}

struct IrItem {
    node: IrNode,
    min: u32,
    max: Option<u32>,
}

enum IrNode {
    Lex(usize),
    Rule(usize),
    Group(Vec<Vec<IrItem>>),
    Token(String),
    Empty,
}

impl IrItem {
    fn one(node: IrNode) -> IrItem {
        IrItem {
            node,
            min: 1,
            max: Some(1),
        }
    }
}

/// Rounds of splitting before the translation is taken as it is.
const MAX_ROUNDS: usize = 64;

impl<'g> Translator<'g> {
    fn new(g: &'g Grammar) -> Translator<'g> {
        Translator {
            g,
            state: vec![Regular::Unknown; g.rules.len()],
            rx: vec![None; g.rules.len()],
        }
    }

    fn translate(mut self) -> String {
        for r in 0..self.g.rules.len() {
            self.rule_rx(r);
        }
        let mut split: HashSet<Site> = HashSet::new();
        let mut analysis = Analysis::default();
        for _ in 0..MAX_ROUNDS {
            let ir = Build::new(&self, &split).run();
            let victims = analysis.unsafe_sites(&ir);
            if victims.is_empty() || victims.is_subset(&split) {
                return ir.to_lark();
            }
            split.extend(victims);
        }
        Build::new(&self, &split).run().to_lark()
    }

    /// The rule as one regular expression, if it is regular.
    fn rule_rx(&mut self, r: usize) -> Option<Rx> {
        match self.state[r] {
            Regular::No | Regular::InProgress => return None,
            Regular::Unknown => {}
        }
        if let Some(rx) = &self.rx[r] {
            return Some(rx.clone());
        }
        self.state[r] = Regular::InProgress;
        let rx = self.compute_rule_rx(r);
        match &rx {
            Some(x) if x.depth <= MAX_RX_DEPTH => {
                self.state[r] = Regular::Unknown;
                self.rx[r] = Some(x.clone());
                Some(x.clone())
            }
            _ => {
                self.state[r] = Regular::No;
                None
            }
        }
    }

    fn compute_rule_rx(&mut self, r: usize) -> Option<Rx> {
        let g = self.g;
        let empty: Seq = Vec::new();
        // `r ::= (body)?` reads as `r ::= body | ""`.
        let top: Vec<&Seq> = match g.rules[r].alts.as_slice() {
            [only] if only.len() == 1 => match &only[0] {
                Item {
                    atom: Atom::Group(inner),
                    min: 0,
                    max: Some(1),
                    ..
                } => inner.iter().chain(std::iter::once(&empty)).collect(),
                _ => vec![only],
            },
            alts => alts.iter().collect(),
        };
        // Alternatives that end in `r` itself (tail recursion) repeat their prefix:
        // r ::= p1 r | p2 r | b1 | b2  is  (p1|p2)* (b1|b2).
        let mut prefixes = Vec::new();
        let mut bases = Vec::new();
        for s in top {
            let tail = matches!(s.last(), Some(Item {
                    atom: Atom::Ref { rule, .. },
                    min: 1,
                    max: Some(1),
                    ..
                }) if *rule == r);
            if tail {
                prefixes.push(self.seq_rx(&s[..s.len() - 1])?);
            } else {
                bases.push(self.seq_rx(s)?);
            }
        }
        if bases.is_empty() {
            return None;
        }
        let base = alt(bases);
        Some(if prefixes.is_empty() {
            base
        } else {
            seq(vec![rep(alt(prefixes), 0, None), base])
        })
    }

    fn seq_rx(&mut self, s: &[Item]) -> Option<Rx> {
        let mut parts = Vec::with_capacity(s.len());
        for item in s {
            let a = self.atom_rx(&item.atom)?;
            parts.push(rep(a, item.min, item.max));
        }
        let x = seq(parts);
        (x.depth <= MAX_RX_DEPTH).then_some(x)
    }

    fn atom_rx(&mut self, a: &Atom) -> Option<Rx> {
        match a {
            Atom::Lit(chars) if chars.is_empty() => Some(eps()),
            Atom::Lit(chars) => Some(node(RxKind::Lit(chars.clone()))),
            Atom::Class(ranges) => Some(node(RxKind::Class(ranges.clone()))),
            Atom::Ref { rule, .. } => self.rule_rx(*rule),
            Atom::Group(alts) => {
                let mut parts = Vec::with_capacity(alts.len());
                for s in alts {
                    parts.push(self.seq_rx(s)?);
                }
                Some(alt(parts))
            }
            Atom::Token(_) => None,
        }
    }

    /// The already computed regular expression of an atom (after `translate`'s first pass).
    fn known_rx(&self, a: &Atom) -> Option<Rx> {
        match a {
            Atom::Lit(chars) if chars.is_empty() => Some(eps()),
            Atom::Lit(chars) => Some(node(RxKind::Lit(chars.clone()))),
            Atom::Class(ranges) => Some(node(RxKind::Class(ranges.clone()))),
            Atom::Ref { rule, .. } => self.rx[*rule].clone(),
            Atom::Group(alts) => {
                let mut parts = Vec::with_capacity(alts.len());
                for s in alts {
                    let mut items = Vec::with_capacity(s.len());
                    for item in s {
                        items.push(rep(self.known_rx(&item.atom)?, item.min, item.max));
                    }
                    parts.push(seq(items));
                }
                let x = alt(parts);
                (x.depth <= MAX_RX_DEPTH).then_some(x)
            }
            Atom::Token(_) => None,
        }
    }
}

/// Builds the Lark grammar for one set of split sites.
struct Build<'t, 'g> {
    t: &'t Translator<'g>,
    split: &'t HashSet<Site>,
    rules: Vec<Option<IrRule>>,
    rule_index: HashMap<usize, usize>,
    lexemes: Vec<IrLexeme>,
}

fn mangle(name: &str) -> String {
    let mut out = String::from("r_");
    for c in name.chars() {
        match c {
            'A'..='Z' => {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            }
            '_' => out.push_str("__"),
            c => out.push(c),
        }
    }
    out
}

impl<'t, 'g> Build<'t, 'g> {
    fn new(t: &'t Translator<'g>, split: &'t HashSet<Site>) -> Self {
        Build {
            t,
            split,
            rules: Vec::new(),
            rule_index: HashMap::new(),
            lexemes: Vec::new(),
        }
    }

    fn run(mut self) -> Ir {
        let root = self.t.g.root;
        let fused = if self.split.contains(&Site::Rule(root)) {
            None
        } else {
            self.t.rx[root]
                .clone()
                .and_then(|rx| self.fused(&rx, 1, Some(1), Site::Rule(root)))
        };
        match fused {
            Some(item) => self.rules.push(Some(IrRule {
                name: "start".into(),
                alts: vec![vec![item]],
            })),
            None => {
                self.structural(root, Some("start".into()));
            }
        }
        Ir {
            rules: self.rules.into_iter().flatten().collect(),
            lexemes: self.lexemes,
        }
    }

    fn lexeme(&mut self, regex: String, site: Site) -> IrNode {
        self.lexemes.push(IrLexeme { regex, site });
        IrNode::Lex(self.lexemes.len() - 1)
    }

    fn char_lexeme(&mut self, ranges: &[(u32, u32)]) -> IrNode {
        let mut regex = String::new();
        print_class(ranges, &mut regex);
        self.lexeme(regex, Site::Fixed)
    }

    /// `rx{min,max}` as one lexeme (made optional when it can be empty); `None` when too large.
    fn fused(&mut self, rx: &Rx, min: u32, max: Option<u32>, site: Site) -> Option<IrItem> {
        let full = rep(rx.clone(), min, max);
        if !full.nullable {
            let regex = print_rx(&full)?;
            return Some(IrItem::one(self.lexeme(regex, site)));
        }
        match non_empty(&full) {
            None => Some(IrItem::one(IrNode::Empty)),
            Some(ne) => {
                let regex = print_rx(&ne)?;
                Some(IrItem {
                    node: self.lexeme(regex, site),
                    min: 0,
                    max: Some(1),
                })
            }
        }
    }

    /// The Lark rule of GBNF rule `r`, as rules and lexemes.
    fn structural(&mut self, r: usize, name: Option<String>) -> usize {
        if let Some(&k) = self.rule_index.get(&r) {
            return k;
        }
        let k = self.rules.len();
        self.rules.push(None);
        self.rule_index.insert(r, k);
        let g = self.t.g;
        let alts = g.rules[r].alts.iter().map(|s| self.seq(s)).collect();
        let name = name.unwrap_or_else(|| mangle(&g.rules[r].name));
        self.rules[k] = Some(IrRule { name, alts });
        k
    }

    fn seq(&mut self, s: &[Item]) -> Vec<IrItem> {
        s.iter().map(|item| self.item(item)).collect()
    }

    fn item(&mut self, item: &Item) -> IrItem {
        let once = (item.min, item.max) == (1, Some(1));
        let single = match &item.atom {
            Atom::Lit(chars) => chars.len() <= 1,
            Atom::Class(_) | Atom::Token(_) => true,
            Atom::Ref { .. } => true,
            Atom::Group(_) => false,
        };
        if !(self.split.contains(&Site::Item(item.id)) || once && single) {
            if let Some(rx) = self.t.known_rx(&item.atom) {
                if let Some(fused) = self.fused(&rx, item.min, item.max, Site::Item(item.id)) {
                    return fused;
                }
            }
        }
        let (node, nullable) = self.atom(&item.atom);
        match (item.max, nullable) {
            (Some(0), _) => IrItem::one(IrNode::Empty),
            (max, true) => IrItem { node, min: 0, max },
            (max, false) => IrItem {
                node,
                min: item.min,
                max,
            },
        }
    }

    /// The atom's node, and whether it stands for a lexeme made optional (its empty string
    /// taken out, to be given back by the item's repetition).
    fn atom(&mut self, atom: &Atom) -> (IrNode, bool) {
        match atom {
            Atom::Lit(chars) => match chars.as_slice() {
                [] => (IrNode::Empty, false),
                [c] => (self.char_lexeme(&[(*c as u32, *c as u32)]), false),
                cs => {
                    let items = cs
                        .iter()
                        .map(|&c| IrItem::one(self.char_lexeme(&[(c as u32, c as u32)])))
                        .collect();
                    (IrNode::Group(vec![items]), false)
                }
            },
            Atom::Class(ranges) => (self.char_lexeme(ranges), false),
            Atom::Token(t) => (IrNode::Token(t.clone()), false),
            Atom::Group(alts) => (
                IrNode::Group(alts.iter().map(|s| self.seq(s)).collect()),
                false,
            ),
            Atom::Ref { rule, .. } => {
                let r = *rule;
                if !self.split.contains(&Site::Rule(r)) {
                    if let Some(rx) = self.t.rx[r].clone() {
                        if let Some(item) = self.fused(&rx, 1, Some(1), Site::Rule(r)) {
                            return (item.node, item.min == 0);
                        }
                    }
                }
                (IrNode::Rule(self.structural(r, None)), false)
            }
        }
    }
}

impl Ir {
    fn to_lark(&self) -> String {
        let mut out = String::new();
        for r in &self.rules {
            out.push_str(&r.name);
            out.push_str(": ");
            self.alts(&r.alts, &mut out);
            out.push('\n');
        }
        out
    }

    fn alts(&self, alts: &[Vec<IrItem>], out: &mut String) {
        for (k, s) in alts.iter().enumerate() {
            if k > 0 {
                out.push_str(" | ");
            }
            let items: Vec<&IrItem> = s
                .iter()
                .filter(|i| !matches!(i.node, IrNode::Empty))
                .collect();
            if items.is_empty() {
                out.push_str("\"\"");
            }
            for (j, item) in items.into_iter().enumerate() {
                if j > 0 {
                    out.push(' ');
                }
                self.item(item, out);
            }
        }
    }

    fn item(&self, item: &IrItem, out: &mut String) {
        match &item.node {
            IrNode::Lex(k) => {
                out.push('/');
                out.push_str(&self.lexemes[*k].regex);
                out.push('/');
            }
            IrNode::Rule(k) => out.push_str(&self.rules[*k].name),
            IrNode::Group(alts) => {
                out.push('(');
                self.alts(alts, out);
                out.push(')');
            }
            IrNode::Token(t) => out.push_str(t),
            IrNode::Empty => out.push_str("\"\""),
        }
        match (item.min, item.max) {
            (1, Some(1)) => {}
            (0, Some(1)) => out.push('?'),
            (0, None) => out.push('*'),
            (1, None) => out.push('+'),
            (m, None) => out.push_str(&format!("{{{m},}}")),
            (m, Some(n)) if m == n => out.push_str(&format!("{{{m}}}")),
            (m, Some(n)) => out.push_str(&format!("{{{m},{n}}}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The check that the longest match never takes what the grammar needs next

/// Product states explored for one pair of lexemes before the pair is taken as unsafe.
const MAX_PAIR_STATES: usize = 4096;

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Bytes([u64; 4]);

impl Bytes {
    fn set(&mut self, b: u8) {
        self.0[(b >> 6) as usize] |= 1 << (b & 63);
    }
    fn or(&mut self, o: &Bytes) {
        for k in 0..4 {
            self.0[k] |= o.0[k];
        }
    }
    fn meets(&self, o: &Bytes) -> bool {
        (0..4).any(|k| self.0[k] & o.0[k] != 0)
    }
    fn all() -> Bytes {
        Bytes([u64::MAX; 4])
    }
}

#[derive(Clone, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, k: usize) {
        self.0[k / 64] |= 1 << (k % 64);
    }
    /// Adds `o`; whether anything was new.
    fn or(&mut self, o: &Bits) -> bool {
        let mut changed = false;
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            let n = *a | *b;
            changed |= n != *a;
            *a = n;
        }
        changed
    }
    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits >> b & 1 == 1)
                .map(move |b| w * 64 + b)
        })
    }
}

struct Automaton {
    /// `None`: the regex did not compile.
    re: Option<Regex>,
    first: Bytes,
}

#[derive(Default)]
struct Analysis {
    autos: Vec<Automaton>,
    by_regex: HashMap<String, usize>,
    /// Bytes that can extend a complete match of the first automaton into a prefix of the second.
    ext: HashMap<(usize, usize), Bytes>,
}

impl Analysis {
    fn automaton(&mut self, regex: &str) -> usize {
        if let Some(&k) = self.by_regex.get(regex) {
            return k;
        }
        let mut first = Bytes::default();
        let re = Regex::new(regex).ok().map(|mut re| {
            let s0 = re.initial_state();
            for b in 0..=255u8 {
                if !re.transition(s0, b).is_dead() {
                    first.set(b);
                }
            }
            re
        });
        self.autos.push(Automaton { re, first });
        self.by_regex
            .insert(regex.to_string(), self.autos.len() - 1);
        self.autos.len() - 1
    }

    fn extension(&mut self, x: usize, y: usize) -> Bytes {
        if let Some(e) = self.ext.get(&(x, y)) {
            return *e;
        }
        let e = self.walk_pair(x, y).unwrap_or_else(Bytes::all);
        self.ext.insert((x, y), e);
        e
    }

    fn walk_pair(&mut self, x: usize, y: usize) -> Option<Bytes> {
        let (sx0, sy0) = {
            let rx = self.autos[x].re.as_mut()?.initial_state();
            let ry = self.autos[y].re.as_mut()?.initial_state();
            (rx, ry)
        };
        let mut ext = Bytes::default();
        let mut seen: HashSet<(StateID, StateID)> = HashSet::new();
        let mut queue = VecDeque::new();
        seen.insert((sx0, sy0));
        queue.push_back((sx0, sy0, true));
        while let Some((sx, sy, initial)) = queue.pop_front() {
            // A non-empty match of x that is also a proper prefix of a match of y: the bytes
            // that lead on in y are where the longest match keeps going.
            if !initial && self.autos[x].re.as_mut()?.is_accepting(sx) {
                for b in 0..=255u8 {
                    if !self.autos[y].re.as_mut()?.transition(sy, b).is_dead() {
                        ext.set(b);
                    }
                }
            }
            for b in 0..=255u8 {
                let nx = self.autos[x].re.as_mut()?.transition(sx, b);
                if nx.is_dead() {
                    continue;
                }
                let ny = self.autos[y].re.as_mut()?.transition(sy, b);
                if ny.is_dead() {
                    continue;
                }
                if seen.insert((nx, ny)) {
                    if seen.len() > MAX_PAIR_STATES {
                        return None;
                    }
                    queue.push_back((nx, ny, false));
                }
            }
        }
        Some(ext)
    }

    /// The sites whose lexemes the longest match could make reject a text of the grammar.
    fn unsafe_sites(&mut self, ir: &Ir) -> HashSet<Site> {
        let n = ir.lexemes.len();
        let autos: Vec<usize> = ir
            .lexemes
            .iter()
            .map(|l| self.automaton(&l.regex))
            .collect();
        let mut victims = HashSet::new();
        for (l, &a) in ir.lexemes.iter().zip(&autos) {
            if self.autos[a].re.is_none() && l.site != Site::Fixed {
                victims.insert(l.site);
            }
        }
        if !victims.is_empty() {
            return victims;
        }
        let flow = Flow::new(ir, n);
        // Lexemes by automaton, and each automaton's splittable sites.
        let mut sites_of: HashMap<usize, Vec<Site>> = HashMap::new();
        for (l, &a) in ir.lexemes.iter().zip(&autos) {
            if l.site != Site::Fixed {
                sites_of.entry(a).or_default().push(l.site);
            }
        }
        let mut distinct: Vec<usize> = autos.clone();
        distinct.sort_unstable();
        distinct.dedup();
        for (k, l) in ir.lexemes.iter().enumerate() {
            let x = autos[k];
            let mut after = Bytes::default();
            for z in flow.follow[k].ones() {
                after.or(&self.autos[autos[z]].first);
            }
            let first_x = self.autos[x].first;
            for &y in &distinct {
                if !self.autos[y].first.meets(&first_x) {
                    continue;
                }
                if !self.extension(x, y).meets(&after) {
                    continue;
                }
                // Split the lexeme that reads on (when it is another), else this one.
                match sites_of.get(&y).filter(|_| y != x) {
                    Some(sites) => victims.extend(sites.iter().copied()),
                    None if l.site != Site::Fixed => {
                        victims.insert(l.site);
                    }
                    None => {}
                }
            }
        }
        victims
    }
}

/// FIRST and FOLLOW over lexemes.
struct Flow {
    first: Vec<Bits>,
    nullable: Vec<bool>,
    follow_rule: Vec<Bits>,
    follow: Vec<Bits>,
    n: usize,
}

impl Flow {
    fn new(ir: &Ir, n: usize) -> Flow {
        let mut f = Flow {
            first: vec![Bits::new(n); ir.rules.len()],
            nullable: vec![false; ir.rules.len()],
            follow_rule: vec![Bits::new(n); ir.rules.len()],
            follow: vec![Bits::new(n); n],
            n,
        };
        loop {
            let mut changed = false;
            for (k, r) in ir.rules.iter().enumerate() {
                let (first, nullable) = f.first_alts(&r.alts);
                changed |= f.first[k].or(&first);
                if nullable && !f.nullable[k] {
                    f.nullable[k] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        loop {
            let mut changed = false;
            for (k, r) in ir.rules.iter().enumerate() {
                for s in &r.alts {
                    let after = f.follow_rule[k].clone();
                    changed |= f.walk_seq(s, &after);
                }
            }
            if !changed {
                break;
            }
        }
        f
    }

    fn first_alts(&self, alts: &[Vec<IrItem>]) -> (Bits, bool) {
        let mut first = Bits::new(self.n);
        let mut nullable = false;
        for s in alts {
            let (f, e) = self.first_seq(s);
            first.or(&f);
            nullable |= e;
        }
        (first, nullable)
    }

    fn first_seq(&self, s: &[IrItem]) -> (Bits, bool) {
        let mut first = Bits::new(self.n);
        for item in s {
            let (f, e) = self.first_item(item);
            first.or(&f);
            if !e {
                return (first, false);
            }
        }
        (first, true)
    }

    fn first_item(&self, item: &IrItem) -> (Bits, bool) {
        let (f, e) = self.first_node(&item.node);
        (f, e || item.min == 0)
    }

    fn first_node(&self, node: &IrNode) -> (Bits, bool) {
        match node {
            IrNode::Lex(k) => {
                let mut b = Bits::new(self.n);
                b.set(*k);
                (b, false)
            }
            IrNode::Rule(r) => (self.first[*r].clone(), self.nullable[*r]),
            IrNode::Group(alts) => self.first_alts(alts),
            IrNode::Token(_) => (Bits::new(self.n), false),
            IrNode::Empty => (Bits::new(self.n), true),
        }
    }

    /// Gives each item of `s` what may follow it, `after` following the whole; whether a
    /// rule's FOLLOW grew.
    fn walk_seq(&mut self, s: &[IrItem], after: &Bits) -> bool {
        let mut changed = false;
        let mut cur = after.clone();
        for item in s.iter().rev() {
            let mut f = cur.clone();
            let (first, nullable) = self.first_item(item);
            if item.max != Some(1) {
                f.or(&first);
            }
            changed |= self.walk_node(&item.node, &f);
            if nullable {
                cur.or(&first);
            } else {
                cur = first;
            }
        }
        changed
    }

    fn walk_node(&mut self, node: &IrNode, f: &Bits) -> bool {
        match node {
            IrNode::Lex(k) => {
                self.follow[*k].or(f);
                false
            }
            IrNode::Rule(r) => self.follow_rule[*r].or(f),
            IrNode::Group(alts) => {
                let mut changed = false;
                for s in alts {
                    changed |= self.walk_seq(s, f);
                }
                changed
            }
            IrNode::Token(_) | IrNode::Empty => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> GbnfError {
        to_lark(src).expect_err(src)
    }

    #[test]
    fn yes_no_is_one_lexeme() {
        assert_eq!(
            to_lark("root ::= \"yes\" | \"no\"").unwrap(),
            "start: /yes|no/\n"
        );
    }

    #[test]
    fn names_are_mangled_uniquely() {
        assert_eq!(mangle("Value"), "r__value");
        assert_eq!(mangle("_value"), "r___value");
        assert_eq!(mangle("my-rule_2"), "r_my-rule__2");
        assert_ne!(mangle("aB"), mangle("a_b"));
    }

    #[test]
    fn errors_name_line_column_and_what_was_expected() {
        let e = err("root ::= \"a\"\nfoo = \"b\"\n");
        assert_eq!((e.line, e.column), (2, 5), "{e}");
        assert!(e.message.contains("expected '::='"), "{e}");
        let e = err("root ::= \"abc");
        assert!(e.message.contains("close the string"), "{e}");
        let e = err("root ::= [a-z");
        assert!(e.message.contains("']'"), "{e}");
        let e = err("root ::= (\"a\" | \"b\"\n");
        assert!(e.message.contains("')'"), "{e}");
        let e = err("root ::= x\n");
        assert_eq!(
            (e.line, e.column, e.message.as_str()),
            (1, 10, "undefined rule 'x'")
        );
        let e = err("item ::= \"a\"\n");
        assert!(e.message.contains("no 'root' rule"), "{e}");
        let e = err("root ::= \"\\q\"");
        assert!(e.message.contains("unknown escape"), "{e}");
        let e = err("root ::= \"a\"{3,2}");
        assert!(e.message.contains("maximum below"), "{e}");
        let e = err("root ::= * \"a\"");
        assert!(e.message.contains("must follow an item"), "{e}");
        let e = err("root ::= \"a\"\nroot ::= \"b\"");
        assert!(e.message.contains("defined twice"), "{e}");
        let e = err("root ::= [z-a]");
        assert!(e.message.contains("reversed"), "{e}");
        let e = err("root ::= \"\\x4\"");
        assert!(e.message.contains("2 hex digits"), "{e}");
        let e = err("");
        assert!(e.message.contains("no rules"), "{e}");
        let e = err("root ::= \"a\" )");
        assert!(e.message.contains("unmatched ')'"), "{e}");
    }

    #[test]
    fn continuation_lines_and_comments() {
        let g = "# a comment\nroot ::= (\n  \"a\" # inside\n  | \"b\"\n) |\n  \"c\"  # end\n\n";
        assert_eq!(to_lark(g).unwrap(), "start: /a|b|c/\n");
    }

    #[test]
    fn escapes_in_strings_and_classes() {
        let g = r#"root ::= "\n\t\r\"\\\x41\u00e9\U0001F600" [\x00-\x1f\]\[^-]"#;
        let lark = to_lark(g).unwrap();
        assert_eq!(
            lark,
            "start: /\\x{A}\\x{9}\\x{D}\"\\\\A\\x{E9}\\x{1F600}[\\x{0}-\\x{1F}\\-\\[\\]-\\^]/\n"
        );
    }

    #[test]
    fn the_longest_match_is_split_where_it_would_take_what_follows() {
        // A regular rule is one regular expression, which gives "ing" back by itself.
        let lark = to_lark("root ::= [a-z]+ \"ing\"").unwrap();
        assert_eq!(lark, "start: /[a-z]+ing/\n", "{lark}");
        // In a rule that is not regular, [a-z]+ must give "ing" back: the letters become one
        // lexeme each.
        let lark = to_lark("root ::= [a-z]+ \"ing\" p\np ::= \"(\" p \")\" | \"\"").unwrap();
        assert!(lark.starts_with("start: /[a-z]/+ "), "{lark}");
        // A digit run before a separator it cannot take stays one lexeme.
        let lark = to_lark("root ::= num (\",\" num)*\nnum ::= [0-9]+").unwrap();
        assert!(lark.starts_with("start: /[0-9]+(?:,[0-9]+)*/"), "{lark}");
    }

    /// Random and truncated inputs: an error or a grammar, never a panic.
    #[test]
    fn random_and_truncated_inputs_never_panic() {
        let pieces = [
            "root",
            " ::= ",
            "::=",
            "\"",
            "\\",
            "\\x4",
            "\\u00",
            "\\U0010FFFF",
            "[",
            "]",
            "^",
            "-",
            "(",
            ")",
            "|",
            "*",
            "+",
            "?",
            "{",
            "}",
            "{2,",
            "3}",
            "{0}",
            ",",
            "a",
            "Z",
            "-x",
            "\n",
            "\r\n",
            " ",
            "\t",
            "#c\n",
            ".",
            "<",
            ">",
            "<[12]>",
            "!",
            "é",
            "\u{0}",
            "ws",
            "root ::= ws\nws ::= [ \\t]* ws\n",
            "x ::= \"a\" x | \"\"\n",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut s = String::new();
            for _ in 0..(next() % 24) {
                s.push_str(pieces[(next() % pieces.len() as u64) as usize]);
            }
            let _ = to_lark(&s);
            let _ = to_lark(&format!("root ::= {s}"));
        }
        let good = "root ::= obj\nobj ::= \"{\" ws (pair (\",\" ws pair)*)? \"}\"\npair ::= str \":\" ws [0-9]+ ws\nstr ::= \"\\\"\" [^\"\\\\]* \"\\\"\"\nws ::= [ \\t\\n]*\n";
        let chars: Vec<char> = good.chars().collect();
        for k in 0..chars.len() {
            let cut: String = chars[..k].iter().collect();
            let _ = to_lark(&cut);
        }
        assert!(to_lark(good).is_ok());
    }
}
