//! The byte-level BPE model: the merges that turn one pre-tokenized word into token ids.
//!
//! The `tokenizers` crate's BPE model gives the same tokens, but its tables are string-keyed
//! maps with an allocation per vocabulary entry and per merge rule, and building them for
//! Qwen's 151k tokens and 151k merges took most of a model's load. Here the token texts live
//! packed in one string, the lookup table holds only ids, and the merge table is keyed by id
//! pairs: built in a few milliseconds. Everything around the model (the pre-tokenizer split,
//! control tokens, decoding) stays the crate's; tests check every id against the crate's own
//! BPE built from the same vocabulary.

use anyhow::{bail, Result};
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::{Model, Token};

/// Byte-level words are made of these characters (GPT-2's alphabet ends at U+0143); a direct
/// table from character to id is faster than a string lookup for each.
const CHAR_TABLE: usize = 0x144;
const NONE: u32 = u32::MAX;

#[derive(Clone)]
pub struct ByteLevelBpe(Arc<Tables>);

struct Tables {
    /// Every token's text, one after another; `ends[i]` is where token i's ends.
    text: String,
    ends: Vec<u32>,
    /// Token ids, found by their text (hashed with `hasher`).
    ids: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// (left id, right id) -> (rank of the rule, id of the merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The id of each one-character token below `CHAR_TABLE`, NONE where there is none.
    chars: Vec<u32>,
}

impl std::fmt::Debug for ByteLevelBpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ByteLevelBpe({} tokens, {} merges)",
            self.0.ends.len(),
            self.0.merges.len()
        )
    }
}

impl ByteLevelBpe {
    /// The model over `tokens` (id order) and `merges` ("left right", highest priority first).
    pub fn new<'a>(
        tokens: &[&str],
        merges: impl ExactSizeIterator<Item = Result<&'a str>>,
    ) -> Result<ByteLevelBpe> {
        if tokens.len() >= NONE as usize {
            bail!("the vocabulary has {} tokens, too many", tokens.len());
        }
        let total: usize = tokens.iter().map(|t| t.len()).sum();
        if total >= u32::MAX as usize {
            bail!("the vocabulary's token texts add up to {total} bytes, too many");
        }
        let mut text = String::with_capacity(total);
        let mut ends = Vec::with_capacity(tokens.len());
        for t in tokens {
            text.push_str(t);
            ends.push(text.len() as u32);
        }
        let hasher = DefaultHashBuilder::default();
        let mut ids = HashTable::with_capacity(tokens.len());
        let mut chars = vec![NONE; CHAR_TABLE];
        let mut repeated = false;
        for (id, t) in tokens.iter().enumerate() {
            let id = id as u32;
            let hash = hasher.hash_one(t);
            let entry = ids.entry(
                hash,
                |&other: &u32| token(&text, &ends, other) == *t,
                |&other: &u32| hasher.hash_one(token(&text, &ends, other)),
            );
            // A text given twice keeps the later id, as a map built from the list would.
            let entry = entry.or_insert(id);
            repeated |= *entry.get() != id;
            *entry.into_mut() = id;
            let mut cs = t.chars();
            if let (Some(c), None) = (cs.next(), cs.next()) {
                if (c as usize) < CHAR_TABLE {
                    chars[c as usize] = id;
                }
            }
        }
        let mut tables = Tables {
            text,
            ends,
            ids,
            hasher,
            merges: HashMap::with_capacity(merges.len()),
            chars,
        };
        let mut joined = String::new();
        for (rank, rule) in merges.enumerate() {
            let rule = rule?;
            let Some((left, right)) = rule.split_once(' ') else {
                bail!("merge rule {rank} ({rule:?}) is not two tokens separated by a space");
            };
            // GPT-2 style vocabularies (Qwen's among them) list the 256 byte tokens, then each
            // rule's merged token in rule order: look there before hashing the joined text.
            let guess = 256 + rank as u32;
            let merged = match tables.text_of(guess) {
                Some(t)
                    if !repeated
                        && t.len() == left.len() + right.len()
                        && t.starts_with(left)
                        && t.ends_with(right) =>
                {
                    Some(guess)
                }
                _ => {
                    joined.clear();
                    joined.push_str(left);
                    joined.push_str(right);
                    tables.id(&joined)
                }
            };
            let (Some(l), Some(r), Some(m)) = (tables.id(left), tables.id(right), merged) else {
                bail!("merge rule {rank} ({rule:?}) names a token that is not in the vocabulary");
            };
            // The first rule for a pair is the one that applies.
            tables.merges.entry((l, r)).or_insert((rank as u32, m));
        }
        Ok(ByteLevelBpe(Arc::new(tables)))
    }

    /// A token's text as the vocabulary spells it.
    pub fn text(&self, id: u32) -> Option<&str> {
        self.0.text_of(id)
    }

    pub fn len(&self) -> usize {
        self.0.ends.len()
    }

    /// The ids of one pre-tokenized word, with each token's byte range in it, in `syms`;
    /// `queue` is scratch space.
    fn merge_word(&self, word: &str, syms: &mut Vec<Symbol>, queue: &mut Queue) {
        let t = &*self.0;
        syms.clear();
        queue.clear();
        for (start, c) in word.char_indices() {
            let len = c.len_utf8();
            let id = match t.chars.get(c as usize) {
                Some(&id) => id,
                None => t.id(&word[start..start + len]).unwrap_or(NONE),
            };
            // A character with no token of its own is dropped, as the `tokenizers` BPE without
            // an unknown token does (every byte has one in a byte-level vocabulary).
            if id == NONE {
                continue;
            }
            let i = syms.len() as u32;
            syms.push(Symbol {
                id,
                start: start as u32,
                len: len as u32,
                prev: i.checked_sub(1).unwrap_or(NONE),
                next: i + 1,
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        // The lowest-ranked pair first, the leftmost among equals; a queued pair that a merge
        // next to it has changed is skipped when it comes up.
        queue.extend(syms.windows(2).enumerate().filter_map(|(pos, w)| {
            let &(rank, merged) = t.merges.get(&(w[0].id, w[1].id))?;
            Some(Reverse((rank, pos as u32, merged)))
        }));
        while let Some(Reverse((_, pos, merged))) = queue.pop() {
            let s = syms[pos as usize];
            if s.len == 0 || s.next == NONE {
                continue;
            }
            let right = syms[s.next as usize];
            if t.merges.get(&(s.id, right.id)).map(|m| m.1) != Some(merged) {
                continue;
            }
            syms[pos as usize] = Symbol {
                id: merged,
                len: s.len + right.len,
                next: right.next,
                ..s
            };
            syms[s.next as usize].len = 0;
            if right.next != NONE {
                syms[right.next as usize].prev = pos;
                if let Some(&(rank, m)) = t.merges.get(&(merged, syms[right.next as usize].id)) {
                    queue.push(Reverse((rank, pos, m)));
                }
            }
            if s.prev != NONE {
                if let Some(&(rank, m)) = t.merges.get(&(syms[s.prev as usize].id, merged)) {
                    queue.push(Reverse((rank, s.prev, m)));
                }
            }
        }
        syms.retain(|s| s.len > 0);
    }
}

impl Tables {
    fn text_of(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.ends.len()).then(|| token(&self.text, &self.ends, id))
    }

    fn id(&self, text: &str) -> Option<u32> {
        self.ids
            .find(self.hasher.hash_one(text), |&id| {
                token(&self.text, &self.ends, id) == text
            })
            .copied()
    }
}

fn token<'a>(text: &'a str, ends: &[u32], id: u32) -> &'a str {
    let end = ends[id as usize] as usize;
    let start = match id {
        0 => 0,
        _ => ends[id as usize - 1] as usize,
    };
    &text[start..end]
}

/// Pairs to merge: (rank, position of the left symbol, merged id), lowest rank first.
type Queue = BinaryHeap<Reverse<(u32, u32, u32)>>;

thread_local! {
    /// Each thread's scratch space for [`ByteLevelBpe::merge_word`], so that a word costs no
    /// allocation of its own.
    static SCRATCH: std::cell::RefCell<(Vec<Symbol>, Queue)> = Default::default();
}

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    start: u32,
    /// Bytes of the word this symbol covers; 0 once merged into the symbol before it.
    len: u32,
    prev: u32,
    next: u32,
}

impl Model for ByteLevelBpe {
    /// Never used: qwen-run does not train tokenizers. The trait asks for a trainer type.
    type Trainer = BpeTrainer;

    fn tokenize(&self, word: &str) -> tokenizers::Result<Vec<Token>> {
        let t = &*self.0;
        SCRATCH.with_borrow_mut(|(syms, queue)| {
            self.merge_word(word, syms, queue);
            Ok(syms
                .iter()
                .map(|s| Token {
                    id: s.id,
                    value: token(&t.text, &t.ends, s.id).to_string(),
                    offsets: (s.start as usize, (s.start + s.len) as usize),
                })
                .collect())
        })
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.0.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.text(id).map(str::to_string)
    }

    fn get_vocab(&self) -> std::collections::HashMap<String, u32> {
        (0..self.len() as u32)
            .map(|id| (token(&self.0.text, &self.0.ends, id).to_string(), id))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("qwen-run's BPE model is built from the GGUF and is not saved".into())
    }

    fn get_trainer(&self) -> BpeTrainer {
        BpeTrainer::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(tokens: &[&str], merges: &[&str]) -> ByteLevelBpe {
        ByteLevelBpe::new(tokens, merges.iter().map(|m| Ok(*m))).unwrap()
    }

    fn ids(m: &ByteLevelBpe, word: &str) -> Vec<u32> {
        m.tokenize(word).unwrap().iter().map(|t| t.id).collect()
    }

    #[test]
    fn merges_by_rank_leftmost_first() {
        let m = model(
            &["a", "b", "c", "ab", "bc", "abc", "aa", "aaa"],
            &["a b", "b c", "ab c", "a a", "aa a"],
        );
        assert_eq!(ids(&m, "abc"), [5]);
        // "a b" outranks "b c": ab + c, then "ab c".
        assert_eq!(ids(&m, "bc"), [4]);
        // Equal ranks merge from the left: (aa)(aa)a → "aa a" joins the last two.
        assert_eq!(ids(&m, "aaaaa"), [6, 7]);
        assert_eq!(ids(&m, ""), Vec::<u32>::new());
        let toks = m.tokenize("cab").unwrap();
        assert_eq!(toks[0].offsets, (0, 1));
        assert_eq!(toks[1].offsets, (1, 3));
        assert_eq!(toks[1].value, "ab");
    }

    #[test]
    fn unknown_characters_are_dropped_and_bad_rules_refused() {
        let m = model(&["a", "é"], &[]);
        assert_eq!(ids(&m, "aéxa"), [0, 1, 0]);
        assert_eq!(m.token_to_id("é"), Some(1));
        assert_eq!(m.id_to_token(1).as_deref(), Some("é"));
        assert_eq!(m.id_to_token(2), None);
        for bad in ["a", "a z", "a a"] {
            let e = ByteLevelBpe::new(&["a", "b"], [Ok(bad)].into_iter()).unwrap_err();
            assert!(e.to_string().contains("merge rule 0"), "{e}");
        }
    }

    #[test]
    fn a_repeated_text_keeps_the_later_id() {
        let m = model(&["a", "b", "a"], &[]);
        assert_eq!(m.token_to_id("a"), Some(2));
    }

    /// Merged tokens found where GPT-2 vocabularies put them (id 256 + rank) and elsewhere.
    #[test]
    fn merged_tokens_in_rule_order_or_not() {
        let bytes: Vec<String> = (0..256).map(|i| format!("<{i}>")).collect();
        let mut tokens: Vec<&str> = bytes.iter().map(String::as_str).collect();
        tokens.extend(["<1><2>", "<3><4>", "<1><2><3><4>"]);
        let m = model(&tokens, &["<1> <2>", "<3> <4>", "<1><2> <3><4>"]);
        let swapped = model(&tokens, &["<3> <4>", "<1> <2>", "<1><2> <3><4>"]);
        for m in [m, swapped] {
            let merged = |l: &str, r: &str| {
                m.0.merges[&(m.token_to_id(l).unwrap(), m.token_to_id(r).unwrap())]
            };
            assert_eq!(merged("<1>", "<2>").1, 256);
            assert_eq!(merged("<3>", "<4>").1, 257);
            assert_eq!(merged("<1><2>", "<3><4>"), (2, 258));
        }
        // A repeated text: the later id, not the one at 256 + rank.
        tokens.push("<1><2>");
        let m = model(&tokens, &["<1> <2>"]);
        assert_eq!(m.0.merges[&(1, 2)], (0, 259));
    }
}
