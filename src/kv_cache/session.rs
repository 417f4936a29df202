//! A session: one conversation's KV cache and the tokens it holds, kept in step.

use super::KvCache;

pub struct Session {
    pub cache: KvCache,
    tokens: Vec<u32>,
    /// The draft model's session beside this one (speculative decoding with `-md`), made on
    /// first use. It holds its own tokens: the scheduler brings it to the text before each
    /// draft, so it may lag behind or hold rejected drafts in between.
    pub draft: Option<Box<Session>>,
}

impl Session {
    pub fn new(cache: KvCache) -> Session {
        let tokens = Vec::with_capacity(cache.capacity());
        Session {
            cache,
            tokens,
            draft: None,
        }
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
