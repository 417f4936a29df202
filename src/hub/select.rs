//! Which files of a Hub repository make up the model that `-hf REPO[:QUANT]` asks for.

use std::fmt;

/// The quantization picked when `-hf REPO` names none (llama.cpp's default too).
pub const DEFAULT_QUANT: &str = "Q4_K_M";

/// Why no model could be picked from a list of files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectError {
    /// The repository holds no GGUF model at all.
    NoGguf { files: Vec<String> },
    /// No GGUF file matches the quantization asked for.
    NoMatch { quant: String, ggufs: Vec<String> },
    /// Several models match; `--hf-file` must pick one.
    Ambiguous { quant: String, models: Vec<String> },
    /// No quantization was given, the repo has no Q4_K_M and more than one model.
    NoDefault { ggufs: Vec<String> },
    /// `--hf-file` names a file that is not in the repo.
    FileNotFound { file: String, ggufs: Vec<String> },
    /// A split model lacks some of its parts.
    MissingParts { first: String, missing: Vec<String> },
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectError::NoGguf { files } => {
                write!(f, "it holds no GGUF file")?;
                if !files.is_empty() {
                    write!(f, " (its files: {})", files.join(", "))?;
                }
                Ok(())
            }
            SelectError::NoMatch { quant, ggufs } => write!(
                f,
                "no GGUF file matches the quantization {quant}; the GGUF files there are: {}. Pick one with REPO:QUANT (e.g. :{}) or --hf-file FILE",
                ggufs.join(", "),
                example_quant(ggufs)
            ),
            SelectError::Ambiguous { quant, models } => write!(
                f,
                "several models match {quant}: {}; pick one with --hf-file FILE",
                models.join(", ")
            ),
            SelectError::NoDefault { ggufs } => write!(
                f,
                "no quantization was given and it has no {DEFAULT_QUANT} file but several models: {}. Pick one with REPO:QUANT (e.g. :{}) or --hf-file FILE",
                ggufs.join(", "),
                example_quant(ggufs)
            ),
            SelectError::FileNotFound { file, ggufs } => {
                write!(f, "it has no file named {file}")?;
                if !ggufs.is_empty() {
                    write!(f, "; the GGUF files there are: {}", ggufs.join(", "))?;
                }
                Ok(())
            }
            SelectError::MissingParts { first, missing } => write!(
                f,
                "the split model {first} lacks its parts {}",
                missing.join(", ")
            ),
        }
    }
}

impl std::error::Error for SelectError {}

/// A quantization name seen in a file name, for the examples in messages.
fn example_quant(ggufs: &[String]) -> String {
    const KNOWN: [&str; 14] = [
        "q4_k_m", "q5_k_m", "q8_0", "q6_k", "q4_0", "q3_k_m", "q2_k", "q5_0", "q4_k_s", "q5_k_s",
        "q3_k_s", "q3_k_l", "f16", "bf16",
    ];
    for q in KNOWN {
        if ggufs.iter().any(|g| matches_quant(g, q)) {
            return q.to_uppercase();
        }
    }
    DEFAULT_QUANT.to_string()
}

/// `name-00002-of-00005.gguf` -> (`name`, 2, 5).
pub fn split_part(name: &str) -> Option<(&str, usize, usize)> {
    let lower = name.to_ascii_lowercase();
    let rest = lower.strip_suffix(".gguf")?;
    // "-00002-of-00005" is 15 bytes.
    if rest.len() < 15 {
        return None;
    }
    let tail = &rest[rest.len() - 15..];
    let b = tail.as_bytes();
    if b[0] != b'-' || &tail[6..10] != "-of-" {
        return None;
    }
    let no: usize = tail[1..6].parse().ok()?;
    let count: usize = tail[10..15].parse().ok()?;
    if no == 0 || count == 0 || no > count {
        return None;
    }
    Some((&name[..rest.len() - 15], no, count))
}

/// Whether a file name carries the quantization `quant` (case-insensitive), as a whole word:
/// preceded by the start, `-`, `.`, `_` or `/`, and followed by the end, `-`, `.` or `/` (not `_`,
/// so that Q4_K does not match q4_k_m and Q4_0 does not match q4_0_4_4).
pub fn matches_quant(name: &str, quant: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let quant = quant.to_ascii_lowercase();
    if quant.is_empty() {
        return false;
    }
    let bytes = name.as_bytes();
    let mut from = 0;
    while let Some(i) = name[from..].find(&quant) {
        let start = from + i;
        let end = start + quant.len();
        let before_ok = start == 0 || matches!(bytes[start - 1], b'-' | b'.' | b'_' | b'/');
        let after_ok = end == bytes.len() || matches!(bytes[end], b'-' | b'.' | b'/');
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
    }
    false
}

fn is_model_gguf(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let base = lower.rsplit('/').next().unwrap_or(&lower);
    lower.ends_with(".gguf") && !base.contains("mmproj")
}

/// One model: a single GGUF file, or all the parts of a split one (first part first).
#[derive(Debug, Clone)]
struct Model {
    /// How the model is named in messages: the file, or the first part.
    label: String,
    parts: Vec<String>,
    missing: Vec<String>,
}

fn models(names: &[String]) -> Vec<Model> {
    let mut out: Vec<Model> = Vec::new();
    let mut seen_split: Vec<(String, usize)> = Vec::new();
    for name in names.iter().filter(|n| is_model_gguf(n)) {
        match split_part(name) {
            None => out.push(Model {
                label: name.clone(),
                parts: vec![name.clone()],
                missing: Vec::new(),
            }),
            Some((stem, _, count)) => {
                if seen_split.iter().any(|(s, c)| s == stem && *c == count) {
                    continue;
                }
                seen_split.push((stem.to_string(), count));
                let mut parts = Vec::new();
                let mut missing = Vec::new();
                for i in 1..=count {
                    let want = format!("-{i:05}-of-{count:05}.gguf");
                    match names.iter().find(|n| {
                        n.len() == stem.len() + want.len()
                            && n.starts_with(stem)
                            && n[stem.len()..].eq_ignore_ascii_case(&want)
                    }) {
                        Some(n) => parts.push(n.clone()),
                        None => missing.push(format!("{stem}{want}")),
                    }
                }
                let label = format!("{stem}-00001-of-{count:05}.gguf");
                out.push(Model {
                    label,
                    parts,
                    missing,
                });
            }
        }
    }
    out
}

fn complete(model: Model) -> Result<Vec<String>, SelectError> {
    if model.missing.is_empty() {
        Ok(model.parts)
    } else {
        Err(SelectError::MissingParts {
            first: model.label,
            missing: model.missing,
        })
    }
}

/// Picks the files of the model asked for among a repository's files: the file `file` (and, if
/// it is part of a split model, all its parts), else the model whose name carries `quant`, else
/// the Q4_K_M one, else the only GGUF model. Returns the paths in the repo, first part first.
pub fn select_files(
    names: &[String],
    quant: Option<&str>,
    file: Option<&str>,
) -> Result<Vec<String>, SelectError> {
    let all = models(names);
    let ggufs: Vec<String> = names
        .iter()
        .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
        .cloned()
        .collect();
    if let Some(file) = file {
        if !names.iter().any(|n| n == file) {
            return Err(SelectError::FileNotFound {
                file: file.to_string(),
                ggufs,
            });
        }
        if split_part(file).is_some() {
            if let Some(m) = all.into_iter().find(|m| m.parts.iter().any(|p| p == file)) {
                return complete(m);
            }
        }
        return Ok(vec![file.to_string()]);
    }
    if all.is_empty() {
        return Err(SelectError::NoGguf {
            files: names.to_vec(),
        });
    }
    let (quant, explicit) = match quant {
        Some(q) => (q, true),
        None => (DEFAULT_QUANT, false),
    };
    let mut matching: Vec<Model> = all
        .iter()
        .filter(|m| {
            m.parts
                .iter()
                .chain(&m.missing)
                .any(|p| matches_quant(p, quant))
        })
        .cloned()
        .collect();
    match matching.len() {
        1 => complete(matching.remove(0)),
        0 if !explicit && all.len() == 1 => complete(all.into_iter().next().unwrap()),
        0 if !explicit => Err(SelectError::NoDefault { ggufs }),
        0 => Err(SelectError::NoMatch {
            quant: quant.to_string(),
            ggufs,
        }),
        _ => Err(SelectError::Ambiguous {
            quant: quant.to_string(),
            models: matching.into_iter().map(|m| m.label).collect(),
        }),
    }
}
