//! The response cache (`--response-cache N`): a deterministic request (greedy, or with a seed the
//! client chose) that was answered before is answered again from memory, without the model.
//! Bounded to N answers, least recently used first out. What is kept is the model's text as the
//! scheduler produced it, so a replay goes through the same stop-string and tool-call handling
//! as a live answer, streaming or not.

use super::protocol::GenRequest;
use crate::scheduler::Generation;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Everything that decides a deterministic answer: the model, the exact prompt tokens (the
/// chat template, tools and all), the token budget, the stop strings and the sampling settings.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// None when the request is not deterministic (sampled with a fresh random seed) or wants
    /// logprobs.
    pub fn of(model: &str, req: &GenRequest) -> Option<CacheKey> {
        // Kept answers hold no logprobs.
        if !req.deterministic || req.logprobs.is_some() {
            return None;
        }
        let mut p = req.params.clone();
        if p.temperature <= 0.0 {
            p.seed = 0; // Greedy decoding ignores the seed.
        }
        let format = req.format.as_ref().map(|(f, _)| f.key());
        Some(CacheKey(format!(
            "{model}\u{0}{:?}\u{0}{}\u{0}{:?}\u{0}{p:?}\u{0}{format:?}",
            req.prompt, req.max_tokens, req.stop
        )))
    }
}

pub struct Cached {
    pub texts: Vec<String>,
    pub summary: Generation,
}

pub struct ResponseCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    clock: u64,
    entries: HashMap<CacheKey, (u64, std::sync::Arc<Cached>)>,
}

impl ResponseCache {
    pub fn new(capacity: usize) -> Self {
        ResponseCache {
            capacity,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<std::sync::Arc<Cached>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        let (used, cached) = inner.entries.get_mut(key)?;
        *used = now;
        Some(cached.clone())
    }

    pub fn put(&self, key: CacheKey, texts: Vec<String>, summary: Generation) {
        if self.capacity == 0 {
            return;
        }
        // A replay takes no time and processes no prompt: its summary says so.
        let summary = Generation {
            reused_tokens: summary.prompt_tokens,
            queue_time: Duration::ZERO,
            prefill_time: Duration::ZERO,
            ttft: Duration::ZERO,
            decode_time: Duration::ZERO,
            total_time: Duration::ZERO,
            spec: Default::default(),
            ..summary
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        if !inner.entries.contains_key(&key) && inner.entries.len() >= self.capacity {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                inner.entries.remove(&k);
            }
        }
        inner
            .entries
            .insert(key, (now, std::sync::Arc::new(Cached { texts, summary })));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplingParams;
    use crate::scheduler::FinishReason;

    fn req(prompt: Vec<u32>, temperature: f32, seed: u64, deterministic: bool) -> GenRequest {
        GenRequest {
            prompt,
            max_tokens: 8,
            params: SamplingParams {
                temperature,
                seed,
                ..SamplingParams::default()
            },
            stop: vec![],
            format: None,
            logprobs: None,
            deterministic,
            spec: None,
        }
    }

    fn summary() -> Generation {
        Generation {
            prompt_tokens: 3,
            reused_tokens: 0,
            cache_source: crate::prefix_cache::CacheSource::None,
            kv_bytes: 0,
            tokens: vec![5, 6],
            completion_tokens: 2,
            finish: FinishReason::Stop,
            queue_time: Duration::from_millis(5),
            prefill_time: Duration::from_millis(5),
            ttft: Duration::from_millis(5),
            decode_time: Duration::from_millis(5),
            total_time: Duration::from_millis(15),
            spec: Default::default(),
        }
    }

    #[test]
    fn keys_and_lru() {
        assert!(CacheKey::of("m", &req(vec![1], 0.8, 7, false)).is_none());
        // Greedy: the (random) seed does not matter.
        assert!(
            CacheKey::of("m", &req(vec![1], 0.0, 1, true))
                == CacheKey::of("m", &req(vec![1], 0.0, 2, true))
        );
        // Sampled with a chosen seed: it does.
        assert!(
            CacheKey::of("m", &req(vec![1], 0.7, 1, true))
                != CacheKey::of("m", &req(vec![1], 0.7, 2, true))
        );
        assert!(
            CacheKey::of("a", &req(vec![1], 0.0, 1, true))
                != CacheKey::of("b", &req(vec![1], 0.0, 1, true))
        );
        let c = ResponseCache::new(2);
        let k = |t: u32| CacheKey::of("m", &req(vec![t], 0.0, 0, true)).unwrap();
        c.put(k(1), vec!["one".into()], summary());
        c.put(k(2), vec!["two".into()], summary());
        assert!(c.get(&k(1)).is_some()); // 1 is now more recent than 2
        c.put(k(3), vec!["three".into()], summary());
        assert_eq!(c.len(), 2);
        assert!(c.get(&k(2)).is_none());
        let hit = c.get(&k(1)).unwrap();
        assert_eq!(hit.texts, vec!["one".to_string()]);
        assert_eq!(hit.summary.reused_tokens, 3);
        assert_eq!(hit.summary.total_time, Duration::ZERO);
    }
}
