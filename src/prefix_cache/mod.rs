//! Prompt-prefix caching: the KV of prompt prefixes that many requests share (a long system
//! prompt, a tool list) is computed once and copied into later sessions instead of being
//! prefilled again.
//!
//! Prompts are cut into fixed-size blocks of tokens; block `i` is keyed by a chained hash of
//! every token up to its end, so a key names a whole prefix. [`PrefixCache`] keeps blocks in
//! memory under a byte budget with least-recently-used eviction (leaves first, so a cached chain
//! never loses its head); [`DiskCache`] keeps whole block-aligned prefixes in files that
//! outlive the process; [`PromptCache`] is the policy over both that the engine and scheduler
//! use (`lookup` before a prompt runs, `store` after).

mod disk;
mod prompt_cache;

pub(crate) use disk::{create_private_dir, open_regular, touch};
pub use disk::{
    load_session, model_identity, save_session, DiskCache, DiskLoad, Shape, FORMAT_VERSION, MAGIC,
};
pub use prompt_cache::{CacheSource, Found, PromptCache};

use crate::kv_cache::{CacheType, KvBlock};
use std::collections::HashMap;
use std::sync::Arc;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A 64-bit hash of bytes, word by word (FNV-1a-like, with a rotation so high bits reach low).
/// Used for keys and file checksums; fast enough to check hundreds of MiB.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ FNV_OFFSET;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(FNV_PRIME).rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
    }
    // Length and a final mix, so a tail of zeros changes the hash.
    h ^= bytes.len() as u64;
    h = (h ^ (h >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

fn hash_tokens(seed: u64, tokens: &[u32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    hash_bytes(seed, &bytes)
}

/// The chained hashes of the full `block`-token blocks of `tokens`: entry `i` covers
/// `tokens[..(i + 1) * block]`. `seed` separates caches that must not mix (cache types).
pub fn chain_hashes(tokens: &[u32], block: usize, seed: u64) -> Vec<u64> {
    let mut h = seed;
    tokens
        .chunks_exact(block.max(1))
        .map(|b| {
            h = hash_tokens(h, b);
            h
        })
        .collect()
}

/// The seed of the chained hashes for a cache of these types and block size.
pub fn chain_seed(type_k: CacheType, type_v: CacheType, block: usize) -> u64 {
    hash_bytes(
        0x7177_656e_2d72_756e,
        &[
            &[type_k.id(), type_v.id()][..],
            &(block as u64).to_le_bytes()[..],
        ]
        .concat(),
    )
}

struct Entry {
    parent: Option<u64>,
    /// The block's own tokens, checked on every hit so a hash collision can never serve KV.
    tokens: Vec<u32>,
    data: Arc<KvBlock>,
    stamp: u64,
    children: usize,
}

/// In-memory prefix cache shared by every request of a process (the engine holds it in a
/// mutex). Bounded by a byte budget; the least recently used leaf block goes first.
pub struct PrefixCache {
    block: usize,
    budget: usize,
    used: usize,
    clock: u64,
    map: HashMap<u64, Entry>,
}

impl PrefixCache {
    pub fn new(block: usize, budget_bytes: usize) -> PrefixCache {
        PrefixCache {
            block: block.max(1),
            budget: budget_bytes,
            used: 0,
            clock: 0,
            map: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    /// Bytes of KV held now.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The cached blocks that start `tokens`, in order (possibly none); marks them used.
    /// `hashes` are `chain_hashes(tokens, ..)`.
    pub fn lookup(&mut self, tokens: &[u32], hashes: &[u64]) -> Vec<Arc<KvBlock>> {
        let mut found = Vec::new();
        let mut parent = None;
        for (i, h) in hashes.iter().enumerate() {
            let block = &tokens[i * self.block..(i + 1) * self.block];
            match self.map.get_mut(h) {
                Some(e) if e.parent == parent && e.tokens == block => {
                    self.clock += 1;
                    e.stamp = self.clock;
                    found.push(e.data.clone());
                }
                _ => break,
            }
            parent = Some(*h);
        }
        found
    }

    /// How many leading blocks of the chain are cached (without marking them used).
    pub fn cached_blocks(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.map.contains_key(h))
            .count()
    }

    /// Adds block `index` of the chain (its parent must be cached unless it is the first), then
    /// evicts down to the budget. Returns false when the block was not kept.
    pub fn insert(
        &mut self,
        tokens: &[u32],
        hashes: &[u64],
        index: usize,
        data: Arc<KvBlock>,
    ) -> bool {
        let h = hashes[index];
        let parent = index.checked_sub(1).map(|p| hashes[p]);
        if self.map.contains_key(&h) {
            return true;
        }
        if data.bytes() > self.budget {
            return false;
        }
        if let Some(p) = parent {
            match self.map.get_mut(&p) {
                Some(e) => e.children += 1,
                None => return false,
            }
        }
        self.clock += 1;
        self.used += data.bytes();
        self.map.insert(
            h,
            Entry {
                parent,
                tokens: tokens[index * self.block..(index + 1) * self.block].to_vec(),
                data,
                stamp: self.clock,
                children: 0,
            },
        );
        self.evict_to(self.budget);
        self.map.contains_key(&h)
    }

    /// Evicts least recently used leaf blocks until at most `bytes` are held.
    pub fn evict_to(&mut self, bytes: usize) {
        while self.used > bytes {
            let Some((&victim, _)) = self
                .map
                .iter()
                .filter(|(_, e)| e.children == 0)
                .min_by_key(|(_, e)| e.stamp)
            else {
                break;
            };
            let e = self.map.remove(&victim).expect("present");
            self.used -= e.data.bytes();
            if let Some(p) = e.parent.and_then(|p| self.map.get_mut(&p)) {
                p.children -= 1;
            }
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(bytes: usize) -> Arc<KvBlock> {
        Arc::new(KvBlock {
            tokens: 4,
            type_k: CacheType::F32,
            type_v: CacheType::F32,
            layers: vec![(vec![0; bytes / 2], vec![0; bytes / 2])],
        })
    }

    #[test]
    fn longest_prefix_and_lru_eviction_of_leaves() {
        let mut c = PrefixCache::new(4, 300);
        let a: Vec<u32> = (0..12).collect();
        let ha = chain_hashes(&a, 4, 1);
        assert_eq!(ha.len(), 3);
        for i in 0..3 {
            assert!(c.insert(&a, &ha, i, block(100)));
        }
        assert_eq!(c.used_bytes(), 300);
        // Shares the first block only.
        let mut b = a.clone();
        b[5] = 99;
        let hb = chain_hashes(&b, 4, 1);
        assert_eq!(c.lookup(&b, &hb).len(), 1);
        assert_eq!(c.lookup(&a, &ha).len(), 3);
        // A new branch evicts the least recently used leaf (a's last block), never a parent.
        assert!(c.insert(&b, &hb, 1, block(100)));
        assert!(c.used_bytes() <= 300);
        assert_eq!(c.lookup(&a, &ha).len(), 2);
        assert_eq!(c.lookup(&b, &hb).len(), 2);
        // Too big for the budget: not kept.
        assert!(!c.insert(&b, &hb, 2, block(400)));
        // Another seed (cache type) never matches.
        assert!(c.lookup(&a, &chain_hashes(&a, 4, 2)).is_empty());
    }
}
