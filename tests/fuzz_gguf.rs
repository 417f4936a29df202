//! Fuzzing what a model file brings: a structure-aware mutator over a tiny GGUF (and, with
//! QWEN_RUN_MODEL_0_5B set, the real 0.5B header), and random or mutated chat templates with
//! random messages. Every case must end in Ok or a clean Err: no panic, no hang, no huge
//! allocation. A failure names the seed and the mutations, which replay it:
//! `QWEN_RUN_FUZZ_SEED=S QWEN_RUN_FUZZ_CASES=1 cargo test --release --test fuzz_gguf`.
//!
//! The default run is a few hundred cases; `QWEN_RUN_FUZZ_CASES=N` runs N of each kind.

mod common;

use qwen_run::engine::{Engine, LoadOptions};
use qwen_run::gguf::{GgufFile, Value};
use qwen_run::model::{check_shapes, Config, Logits};
use qwen_run::tokenizer::{ChatTemplate, Message, Tokenizer};
use qwen_run_kernels::QuantType;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Allocation watch: a case that asks for a huge block is reported with its description before
// the process aborts (an abort cannot be caught), and the live bytes' peak is checked per case.

struct Watch;

/// One allocation larger than this is a finding.
const HUGE: usize = 2 << 30;
/// Live bytes a case may add at its peak.
const PEAK_LIMIT: usize = 1 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CASE: Mutex<String> = Mutex::new(String::new());

fn note_alloc(size: usize) {
    if size > HUGE {
        if let Ok(case) = CASE.try_lock() {
            let _ = std::io::stderr().write_all(b"fuzz: huge allocation in case: ");
            let _ = std::io::stderr().write_all(case.as_bytes());
            let _ = std::io::stderr().write_all(b"\n");
        }
    }
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note_alloc(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note_alloc(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        note_alloc(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static WATCH: Watch = Watch;

// ---------------------------------------------------------------------------------------------
// The harness.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn cases(default: usize) -> usize {
    std::env::var("QWEN_RUN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn first_seed() -> u64 {
    std::env::var("QWEN_RUN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Runs `case` on its own thread under a time limit; a panic, a hang or a peak of live bytes
/// past the limit fails the test with `describe`.
fn run_case(describe: String, limit: Duration, case: impl FnOnce() + Send + 'static) {
    *CASE.lock().unwrap() = describe.clone();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case));
        let _ = tx.send(r.err().map(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        }));
    });
    match rx.recv_timeout(limit) {
        Ok(None) => {}
        Ok(Some(panic)) => panic!("fuzz case panicked ({panic}): {describe}"),
        Err(_) => panic!("fuzz case did not finish in {limit:?}: {describe}"),
    }
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(
        peak <= PEAK_LIMIT,
        "fuzz case allocated {peak} bytes at its peak: {describe}"
    );
}

// ---------------------------------------------------------------------------------------------
// The GGUF mutator: the header parsed into typed fields, then fields set to boundary values,
// bytes flipped, inserted or deleted, or the file cut.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    TensorCount,
    KvCount,
    KeyLen,
    ValueType,
    ArrayType,
    ArrayLen,
    StrLen,
    /// A scalar value of this GGUF type.
    Scalar(u32),
    NDims,
    Dim,
    TensorType,
    Offset,
}

#[derive(Clone, Debug)]
struct Field {
    kind: Kind,
    at: usize,
    width: usize,
    /// The metadata key or tensor name it belongs to.
    owner: String,
}

struct HeaderMap {
    fields: Vec<Field>,
    /// Where the tensor infos end (the header's end before alignment).
    header_end: usize,
}

fn parse_layout(b: &[u8]) -> HeaderMap {
    let mut pos = 8;
    let mut fields = Vec::new();
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
    let field = |fields: &mut Vec<Field>, kind, at, width, owner: &str| {
        fields.push(Field {
            kind,
            at,
            width,
            owner: owner.to_string(),
        })
    };
    field(&mut fields, Kind::TensorCount, pos, 8, "");
    let n_t = u64_at(pos);
    pos += 8;
    field(&mut fields, Kind::KvCount, pos, 8, "");
    let n_kv = u64_at(pos);
    pos += 8;
    fn value(
        b: &[u8],
        pos: &mut usize,
        ty: u32,
        key: &str,
        fields: &mut Vec<Field>,
        in_array: bool,
    ) {
        let width = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let len = u64::from_le_bytes(b[*pos..*pos + 8].try_into().unwrap()) as usize;
                // Only a few strings of a long array: the tokens' lengths all look alike.
                if !in_array || fields.len().is_multiple_of(7) {
                    fields.push(Field {
                        kind: Kind::StrLen,
                        at: *pos,
                        width: 8,
                        owner: key.into(),
                    });
                }
                *pos += 8 + len;
                return;
            }
            9 => {
                let elem = u32::from_le_bytes(b[*pos..*pos + 4].try_into().unwrap());
                fields.push(Field {
                    kind: Kind::ArrayType,
                    at: *pos,
                    width: 4,
                    owner: key.into(),
                });
                fields.push(Field {
                    kind: Kind::ArrayLen,
                    at: *pos + 4,
                    width: 8,
                    owner: key.into(),
                });
                let n = u64::from_le_bytes(b[*pos + 4..*pos + 12].try_into().unwrap());
                *pos += 12;
                for _ in 0..n {
                    value(b, pos, elem, key, fields, true);
                }
                return;
            }
            _ => unreachable!("the base file is valid"),
        };
        if !in_array || fields.len().is_multiple_of(7) {
            fields.push(Field {
                kind: Kind::Scalar(ty),
                at: *pos,
                width,
                owner: key.into(),
            });
        }
        *pos += width;
    }
    for _ in 0..n_kv {
        field(&mut fields, Kind::KeyLen, pos, 8, "");
        let len = u64_at(pos) as usize;
        let key = String::from_utf8_lossy(&b[pos + 8..pos + 8 + len]).into_owned();
        pos += 8 + len;
        field(&mut fields, Kind::ValueType, pos, 4, &key);
        let ty = u32_at(pos);
        pos += 4;
        value(b, &mut pos, ty, &key, &mut fields, false);
    }
    for _ in 0..n_t {
        let len = u64_at(pos) as usize;
        let name = String::from_utf8_lossy(&b[pos + 8..pos + 8 + len]).into_owned();
        field(&mut fields, Kind::StrLen, pos, 8, &name);
        pos += 8 + len;
        field(&mut fields, Kind::NDims, pos, 4, &name);
        let n = u32_at(pos) as usize;
        pos += 4;
        for _ in 0..n {
            field(&mut fields, Kind::Dim, pos, 8, &name);
            pos += 8;
        }
        field(&mut fields, Kind::TensorType, pos, 4, &name);
        pos += 4;
        field(&mut fields, Kind::Offset, pos, 8, &name);
        pos += 8;
    }
    HeaderMap {
        fields,
        header_end: pos,
    }
}

/// Printed (Debug) in failure reports, which is how its fields are read.
#[allow(dead_code)]
#[derive(Clone, Debug)]
enum Mutation {
    Set {
        field: String,
        at: usize,
        value: u64,
    },
    Flip {
        at: usize,
        bit: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Cut {
        len: usize,
    },
}

fn interesting(rng: &mut Rng, f: &Field, old: u64, file_len: usize) -> u64 {
    if let Kind::Scalar(6) = f.kind {
        let floats = [
            0.0f32,
            -0.0,
            -1.0,
            1e-45,
            1e38,
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
        ];
        return rng.pick(&floats).to_bits() as u64;
    }
    if f.kind == Kind::TensorType && rng.chance(2) {
        // Types qwen-run implements, so the case goes on past the type check.
        return *rng.pick(&[0u64, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14]);
    }
    if let Kind::Scalar(12) = f.kind {
        let floats = [0.0f64, -1.0, 1e300, f64::NAN, f64::INFINITY];
        return rng.pick(&floats).to_bits();
    }
    let max = if f.width == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * f.width)) - 1
    };
    let v = match rng.below(16) {
        0 => 0,
        1 => 1,
        2 => max,
        3 => max - 1,
        4 => max / 2,
        5 => max / 2 + 1,
        6 => old.wrapping_add(1),
        7 => old.wrapping_sub(1),
        8 => old.wrapping_mul(2),
        9 => old / 2,
        10 => file_len as u64,
        11 => u64::MAX - 31,
        12 => rng.below(40) as u64,
        13 => 1 << rng.below(64),
        14 => old.wrapping_add(32),
        _ => rng.next(),
    };
    v & max
}

fn mutate(rng: &mut Rng, base: &[u8], layout: &HeaderMap) -> (Vec<u8>, Vec<Mutation>) {
    let mut b = base.to_vec();
    let mut done = Vec::new();
    let n = if rng.chance(2) { 1 } else { 1 + rng.below(3) };
    for _ in 0..n {
        let m = match rng.below(12) {
            0..=7 => {
                // Values that shape the model (scalars, dimensions, types, offsets) more often
                // than the framing, which mostly ends at the first check.
                let shaping = !rng.chance(5);
                let f = loop {
                    let f = rng.pick(&layout.fields);
                    let shapes = matches!(
                        f.kind,
                        Kind::Scalar(_) | Kind::Dim | Kind::TensorType | Kind::Offset
                    );
                    if shapes == shaping {
                        break f;
                    }
                };
                let old = match f.width {
                    1 => base[f.at] as u64,
                    2 => u16::from_le_bytes(base[f.at..f.at + 2].try_into().unwrap()) as u64,
                    4 => u32::from_le_bytes(base[f.at..f.at + 4].try_into().unwrap()) as u64,
                    _ => u64::from_le_bytes(base[f.at..f.at + 8].try_into().unwrap()),
                };
                Mutation::Set {
                    field: format!("{:?} of '{}'", f.kind, f.owner),
                    at: f.at,
                    value: interesting(rng, f, old, base.len()),
                }
            }
            8 => Mutation::Flip {
                at: rng.below(layout.header_end),
                bit: rng.below(8) as u8,
            },
            9 => Mutation::Insert {
                at: rng.pick(&layout.fields).at,
                bytes: (0..1 + rng.below(12)).map(|_| rng.next() as u8).collect(),
            },
            10 => Mutation::Delete {
                at: rng.pick(&layout.fields).at,
                len: 1 + rng.below(12),
            },
            _ => Mutation::Cut {
                len: rng.below(b.len()),
            },
        };
        apply(&mut b, &m, layout);
        done.push(m);
    }
    (b, done)
}

fn apply(b: &mut Vec<u8>, m: &Mutation, layout: &HeaderMap) {
    match m {
        Mutation::Set { at, value, .. } => {
            let width = layout
                .fields
                .iter()
                .find(|f| f.at == *at)
                .map_or(8, |f| f.width);
            if at + width <= b.len() {
                b[*at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
        Mutation::Flip { at, bit } => {
            if *at < b.len() {
                b[*at] ^= 1 << bit;
            }
        }
        Mutation::Insert { at, bytes } => {
            let at = (*at).min(b.len());
            b.splice(at..at, bytes.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let at = (*at).min(b.len());
            let end = (at + len).min(b.len());
            b.drain(at..end);
        }
        Mutation::Cut { len } => b.truncate(*len),
    }
}

/// Everything qwen-run does with a model file up to a first forward pass (only the header's
/// consumers for a large model); errors are fine, panics are not.
fn load_everything(path: &Path, full: bool) {
    let g = match GgufFile::open(path) {
        Ok(g) => g,
        Err(e) => {
            if std::env::var_os("QWEN_RUN_FUZZ_VERBOSE").is_some() {
                eprintln!("{e:#}");
            }
            return;
        }
    };
    REACHED[0].fetch_add(1, Ordering::Relaxed);
    for t in &g.tensors {
        let _ = g.tensor_data(t);
    }
    let Ok(cfg) = Config::from_gguf(&g) else {
        return;
    };
    if check_shapes(&g, &cfg).is_err() {
        return;
    }
    REACHED[1].fetch_add(1, Ordering::Relaxed);
    if let Ok(tok) = Tokenizer::from_gguf(&g) {
        let _ = tok.encode("hello <|im_start|> world");
    }
    if let Ok(t) = ChatTemplate::from_gguf(&g) {
        let _ = t.render(&[Message::new("user", "hi")], None, true);
    }
    if !full {
        return;
    }
    let mut opts = LoadOptions::new(path);
    opts.threads = 1;
    opts.ctx_size = 32;
    opts.cache_ram_mib = 1;
    let Ok(engine) = Engine::load(&opts) else {
        return;
    };
    REACHED[2].fetch_add(1, Ordering::Relaxed);
    if let Ok(mut s) = engine.new_session() {
        let _ = engine.forward(&mut s, &[1, 2, 3], Logits::Last);
    }
}

/// Cases that got as far as an open file, a checked config and a loaded engine: a harness whose
/// mutations all fail at the magic tests nothing.
static REACHED: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];

fn tiny_base() -> Vec<u8> {
    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    w.meta("general.alignment", Value::U32(32))
        .meta("tokenizer.ggml.padding_token_id", Value::U32(0));
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

/// Fuzzes the file `base`, padded (sparse) to `pad_to` bytes unless a mutation cut it.
fn fuzz_file(label: &str, base: Vec<u8>, pad_to: usize, n: usize, full: bool, limit: Duration) {
    let layout = Arc::new(parse_layout(&base));
    let base = Arc::new(base);
    let dir = tempfile::tempdir().unwrap();
    let seed0 = first_seed();
    for seed in seed0..seed0 + n as u64 {
        let mut rng = Rng::new(seed);
        let (bytes, muts) = mutate(&mut rng, &base, &layout);
        let path = dir.path().join(format!("case-{seed}.gguf"));
        let f = std::fs::File::create(&path).unwrap();
        (&f).write_all(&bytes).unwrap();
        // A sparse tail stands in for the tensor data of a large model.
        let cut = muts.iter().any(|m| matches!(m, Mutation::Cut { .. }));
        if bytes.len() < pad_to && !cut {
            f.set_len(pad_to as u64).unwrap();
        }
        drop(f);
        let p = path.clone();
        run_case(format!("{label} seed {seed}: {muts:?}"), limit, move || {
            load_everything(&p, full)
        });
        let _ = std::fs::remove_file(&path);
    }
    let r: Vec<usize> = REACHED
        .iter()
        .map(|r| r.swap(0, Ordering::Relaxed))
        .collect();
    eprintln!(
        "{label}: {n} cases; {} opened, {} passed the config and shape checks, {} loaded an engine",
        r[0], r[1], r[2]
    );
}

#[test]
fn fuzz_tiny_gguf() {
    let base = tiny_base();
    let len = base.len();
    fuzz_file(
        "tiny GGUF",
        base,
        len,
        cases(400),
        true,
        Duration::from_secs(60),
    );
}

#[test]
fn fuzz_real_0_5b_header() {
    let Ok(path) = std::env::var("QWEN_RUN_MODEL_0_5B") else {
        eprintln!("QWEN_RUN_MODEL_0_5B is not set: the real header is not fuzzed");
        return;
    };
    let g = GgufFile::open(&path).unwrap();
    let data_start = g.tensors.iter().map(|t| t.offset).min().unwrap();
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    drop(g);
    let mut header = vec![0u8; data_start];
    std::io::Read::read_exact(&mut std::fs::File::open(&path).unwrap(), &mut header).unwrap();
    // The header, then zeros up to the real length in place of the tensor data.
    fuzz_file(
        "0.5B header",
        header,
        len,
        cases(300) / 10,
        false,
        Duration::from_secs(120),
    );
}

// ---------------------------------------------------------------------------------------------
// Chat templates: random templates built from Jinja pieces, mutations of real templates, and
// random messages, through ChatTemplate.

const QWEN_LIKE: &str = r#"{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}{{- "\n\n# Tools\n\n<tools>" }}{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}{{- "\n</tools><|im_end|>\n" }}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- endif %}{%- endif %}{%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}{{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}{%- elif message.role == "tool" %}{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}{{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"#;

const PIECES: &[&str] = &[
    "{% for m in messages %}",
    "{% endfor %}",
    "{% for i in range(N) %}",
    "{% for t in tools %}",
    "{% if add_generation_prompt %}",
    "{% if m.role == 'user' %}",
    "{% elif loop.first %}",
    "{% else %}",
    "{% endif %}",
    "{{ m.content }}",
    "{{ m.role | upper }}",
    "{{ messages | length }}",
    "{{ tools | tojson }}",
    "{{ m.tool_calls | tojson }}",
    "{{ 'x' * N }}",
    "{{ messages[N].content }}",
    "{{ loop.index }}",
    "{{ raise_exception('no') }}",
    "{% set ns = namespace(a=N) %}",
    "{{ ns.a }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}",
    "{{ f(N) }}",
    "{{ m.content.split(' ') | join('|') }}",
    "{{ m.content[N:] }}",
    "{{ (m.content ~ m.role) | trim }}",
    "{{ m['content'].startswith('a') }}",
    "{% break %}",
    "{% continue %}",
    "{{ N // 0 }}",
    "{{ N ** N }}",
    "<|im_start|>",
    "text ",
    "{{",
    "}}",
    "{%",
    "%}",
];

const NUMBERS: &[&str] = &["0", "1", "-1", "3", "99999", "100000", "10**9", "2**63"];

fn random_template(rng: &mut Rng) -> String {
    let mut t = String::new();
    for _ in 0..1 + rng.below(14) {
        let n = *rng.pick::<&str>(NUMBERS);
        let piece = rng.pick(PIECES).replace('N', n);
        t.push_str(&piece);
    }
    t
}

fn mutate_template(rng: &mut Rng, src: &str) -> String {
    let mut t: Vec<char> = src.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(t.len() + 1);
        match rng.below(4) {
            0 => {
                let end = (at + 1 + rng.below(40)).min(t.len());
                t.drain(at..end);
            }
            1 => {
                let end = (at + 1 + rng.below(80)).min(t.len());
                let copy: Vec<char> = t[at..end].to_vec();
                t.splice(at..at, copy);
            }
            2 => {
                let n = *rng.pick::<&str>(NUMBERS);
                let piece = rng.pick(PIECES).replace('N', n);
                t.splice(at..at, piece.chars());
            }
            _ => {
                if at < t.len() {
                    t[at] = *rng.pick(&['{', '}', '%', '\'', '"', '|', '(', ')', ' ', 'x']);
                }
            }
        }
    }
    t.into_iter().collect()
}

fn random_text(rng: &mut Rng) -> String {
    let bits = [
        "hello",
        "{{ x }}",
        "{% if %}",
        "\u{1F600}",
        "\0",
        "<|im_end|>",
        "'",
        "\"",
        "\\",
        "\n",
        "é",
        " ",
        "a",
    ];
    (0..rng.below(12)).map(|_| *rng.pick(&bits)).collect()
}

fn random_messages(rng: &mut Rng) -> (Vec<Message>, Option<serde_json::Value>) {
    let roles = ["system", "user", "assistant", "tool", "", "x"];
    let messages = (0..rng.below(6))
        .map(|_| {
            let role = *rng.pick::<&str>(&roles);
            let mut m = Message::new(role, &random_text(rng));
            if rng.chance(4) {
                m.tool_calls = Some(serde_json::json!([
                    {"function": {"name": random_text(rng), "arguments": {"a": random_text(rng)}}},
                    {"name": 1, "arguments": null},
                ]));
            }
            m
        })
        .collect();
    let tools = rng.chance(3).then(|| {
        serde_json::json!([{"type": "function", "function": {"name": random_text(rng), "parameters": {}}}, 5, null])
    });
    (messages, tools)
}

#[test]
fn fuzz_chat_templates() {
    let mut sources = vec![QWEN_LIKE.to_string()];
    if let Ok(p) = std::env::var("QWEN_RUN_MODEL_0_5B") {
        if let Ok(g) = GgufFile::open(&p) {
            if let Some(t) = g.get("tokenizer.chat_template").and_then(Value::as_str) {
                sources.push(t.to_string());
            }
        }
    }
    let seed0 = first_seed();
    for seed in seed0..seed0 + cases(300) as u64 {
        let mut rng = Rng::new(seed ^ 0x7e3a);
        let source = if rng.chance(2) {
            random_template(&mut rng)
        } else {
            let s = rng.pick(&sources).clone();
            mutate_template(&mut rng, &s)
        };
        let (messages, tools) = random_messages(&mut rng);
        let gen = rng.chance(2);
        let describe = format!("chat template seed {seed}: template {source:?}, messages {messages:?}, tools {tools:?}");
        run_case(describe, Duration::from_secs(30), move || {
            if let Ok(t) = ChatTemplate::new(&source) {
                let _ = t.render(&messages, tools.as_ref(), gen);
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile templates, named.

fn render_within(source: &str, limit: Duration) -> anyhow::Result<String> {
    let (tx, rx) = mpsc::channel();
    let owned = source.to_string();
    std::thread::spawn(move || {
        let r = ChatTemplate::new(&owned)
            .and_then(|t| t.render(&[Message::new("user", "hi")], None, true));
        let _ = tx.send(r);
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("rendering {source:?} did not end within {limit:?}"))
}

#[test]
fn a_template_that_loops_forever_runs_out_of_steps() {
    let e = render_within(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        Duration::from_secs(60),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("tokenizer.chat_template") && msg.contains("steps") && msg.contains("hostile"),
        "{msg}"
    );
}

#[test]
fn a_template_that_renders_gigabytes_is_cut_off() {
    let e = render_within(
        "{% set s = 'x' * 99999999 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
        Duration::from_secs(60),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("tokenizer.chat_template") && msg.contains("bytes") && msg.contains("stopped"),
        "{msg}"
    );
}

#[test]
fn a_range_of_a_billion_is_an_error() {
    let e = render_within(
        "{% for i in range(10**9) %}x{% endfor %}",
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("chat template"), "{e:#}");
}

#[test]
fn a_real_template_renders_a_long_conversation_within_the_budget() {
    let t = ChatTemplate::new(QWEN_LIKE).unwrap();
    let messages: Vec<Message> = (0..2000)
        .map(|i| {
            Message::new(
                if i % 2 == 0 { "user" } else { "assistant" },
                "some words here",
            )
        })
        .collect();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let s = t.render(&messages, Some(&tools), true).unwrap();
    assert!(s.ends_with("<|im_start|>assistant\n"));
}

// ---------------------------------------------------------------------------------------------
// Findings of the fuzzer, kept as named cases.

/// The tiny base with field `kind` of `owner` set to `value`.
fn tiny_with(kind: Kind, owner: &str, value: u64) -> tempfile::NamedTempFile {
    let mut b = tiny_base();
    let layout = parse_layout(&b);
    let f = layout
        .fields
        .iter()
        .find(|f| f.kind == kind && f.owner == owner)
        .unwrap();
    b[f.at..f.at + f.width].copy_from_slice(&value.to_le_bytes()[..f.width]);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&b).unwrap();
    file
}

/// Seed 235: a norm vector of 257 values in a model of width 256 reached the kernels, which
/// panicked on the length.
#[test]
fn finding_a_norm_vector_of_the_wrong_length_is_a_shape_error() {
    let file = tiny_with(Kind::Dim, "blk.0.attn_norm.weight", 257);
    let g = GgufFile::open(file.path()).unwrap();
    let cfg = Config::from_gguf(&g).unwrap();
    let e = check_shapes(&g, &cfg).unwrap_err();
    assert!(
        format!("{e:#}").contains("'blk.0.attn_norm.weight' has shape [257], expected [256]"),
        "{e:#}"
    );
    run_case("norm of 257".into(), Duration::from_secs(60), move || {
        load_everything(file.path(), true)
    });
}
