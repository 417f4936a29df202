//! A session: one conversation's KV cache and the tokens it holds, kept in step.

use super::KvCache;

pub struct Session {
    pub cache: KvCache,
    tokens: Vec<u32>,
}

impl Session {
    pub fn new(cache: KvCache) -> Session {
        let tokens = Vec::with_capacity(cache.capacity());
        Session { cache, tokens }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.cache.truncate(len);
    }

    /// Records that `tokens` were run into the cache after what it held.
    pub(crate) fn extend(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// Names the tokens whose KV was just written into the cache by other means (imported).
    pub(crate) fn set_tokens(&mut self, tokens: &[u32]) {
        self.tokens.clear();
        self.tokens.extend_from_slice(tokens);
    }
}
