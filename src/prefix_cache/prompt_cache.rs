//! The prompt cache manager: which prompt prefix a session can reuse, from the session itself,
//! the in-process [`PrefixCache`] or the on-disk [`DiskCache`], and storing a prompt's blocks in
//! both once it has run. The engine and the scheduler reach the caches only through
//! [`PromptCache::lookup`] and [`PromptCache::store`].

use super::{chain_hashes, chain_seed, DiskCache, PrefixCache};
use crate::kv_cache::{CacheType, KvBlock, Session};
use anyhow::Result;
use std::sync::{Arc, Mutex};

/// Where a request's reused prompt tokens came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheSource {
    /// Nothing was reused.
    None,
    /// The session already held them (the previous turn of a conversation).
    Session,
    /// The in-process prefix cache.
    Memory,
    /// The persistent prompt cache on disk.
    Disk,
}

impl CacheSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheSource::None => "none",
            CacheSource::Session => "session",
            CacheSource::Memory => "prefix cache",
            CacheSource::Disk => "disk prompt cache",
        }
    }
}

/// What [`PromptCache::lookup`] found for a prompt.
#[derive(Clone, Debug)]
pub struct Found {
    /// Prompt tokens the session holds now; the rest must be run.
    pub reused: usize,
    pub source: CacheSource,
    hashes: Vec<u64>,
    rejected: Vec<usize>,
}

pub struct PromptCache {
    /// Tokens per block.
    block: usize,
    seed: u64,
    memory: Option<Mutex<PrefixCache>>,
    disk: Option<Arc<DiskCache>>,
    writer: Option<DiskWriter>,
}

/// Writes prompt prefixes to the disk cache on a thread of its own, so that the scheduler's
/// thread (and every request it runs) never waits for the file system. Dropping it finishes
/// the writes already queued, so a one-shot command leaves its prefix on disk.
struct DiskWriter {
    jobs: Option<std::sync::mpsc::SyncSender<WriteJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum WriteJob {
    Store {
        tokens: Vec<u32>,
        hashes: Vec<u64>,
        blocks: Vec<Arc<KvBlock>>,
        rejected: Vec<usize>,
    },
    /// Answered once every write queued before it is done.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Prefixes that may wait to be written; when the disk is slower than this, later ones are
/// not stored (the cache is only an optimization).
const QUEUED_WRITES: usize = 8;

impl DiskWriter {
    fn start(disk: Arc<DiskCache>) -> Option<DiskWriter> {
        let (jobs, queue) = std::sync::mpsc::sync_channel(QUEUED_WRITES);
        let thread = std::thread::Builder::new()
            .name("qwen-run-prompt-cache".into())
            .spawn(move || {
                for job in queue {
                    match job {
                        WriteJob::Store {
                            tokens,
                            hashes,
                            blocks,
                            rejected,
                        } => {
                            if let Err(e) = disk.store(&tokens, &hashes, &blocks, &rejected) {
                                eprintln!("warning: the prompt cache was not saved: {e:#}");
                            }
                        }
                        WriteJob::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .ok()?;
        Some(DiskWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn send(&self, job: WriteJob) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.try_send(job);
        }
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PromptCache {
    /// `memory_bytes` 0 turns the in-process cache off; `disk` None the persistent one.
    pub fn new(
        block: usize,
        memory_bytes: usize,
        disk: Option<DiskCache>,
        type_k: CacheType,
        type_v: CacheType,
    ) -> PromptCache {
        let disk = disk.map(Arc::new);
        PromptCache {
            block,
            seed: chain_seed(type_k, type_v, block),
            memory: (memory_bytes > 0).then(|| Mutex::new(PrefixCache::new(block, memory_bytes))),
            writer: disk.clone().and_then(DiskWriter::start),
            disk,
        }
    }

    /// Waits until the prefixes stored so far are on disk.
    pub fn flush(&self) {
        if let Some(w) = &self.writer {
            let (done, wait) = std::sync::mpsc::channel();
            if let Some(jobs) = &w.jobs {
                if jobs.send(WriteJob::Flush(done)).is_ok() {
                    let _ = wait.recv();
                }
            }
        }
    }

    /// The in-process prefix cache, if enabled: (bytes held, budget bytes, blocks held).
    pub fn memory_stats(&self) -> Option<(usize, usize, usize)> {
        self.memory.as_ref().map(|p| {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            (p.used_bytes(), p.budget_bytes(), p.len())
        })
    }

    /// The persistent prompt cache, if enabled.
    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_deref()
    }

    /// Empties the in-process prefix cache.
    pub fn clear_memory(&self) {
        if let Some(p) = &self.memory {
            p.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Readies `session` for `prompt` (not empty): keeps the prefix it already holds, or restores
    /// a longer one from memory or disk. Always leaves at least the last prompt token to run, for
    /// its logits.
    pub fn lookup(&self, session: &mut Session, prompt: &[u32]) -> Result<Found> {
        let reused = session
            .common_prefix(prompt)
            .min(prompt.len().saturating_sub(1));
        session.truncate(reused);
        let hashes = if self.memory.is_none() && self.disk.is_none() {
            Vec::new()
        } else {
            chain_hashes(prompt, self.block, self.seed)
        };
        let (reused, source, rejected) = if hashes.is_empty() {
            (reused, CacheSource::Session, Vec::new())
        } else {
            self.restore(session, prompt, &hashes, reused)?
        };
        Ok(Found {
            reused,
            source: if reused == 0 {
                CacheSource::None
            } else {
                source
            },
            hashes,
            rejected,
        })
    }

    /// Stores the prompt's whole blocks, now in the session's cache, in memory and on disk.
    /// Called as soon as the prompt has run, so that requests arriving while this one still
    /// generates can reuse it.
    pub fn store(&self, session: &Session, prompt: &[u32], found: &Found) {
        if !found.hashes.is_empty() {
            self.store_blocks(session, prompt, &found.hashes, &found.rejected);
        }
    }

    /// Brings the session's cache to the longest cached prefix of `prompt` (memory, then disk)
    /// when that is longer than what the session holds (`reused`). Returns the tokens the
    /// session now holds, where they came from, and the disk entries found unusable.
    fn restore(
        &self,
        session: &mut Session,
        prompt: &[u32],
        hashes: &[u64],
        reused: usize,
    ) -> Result<(usize, CacheSource, Vec<usize>)> {
        let b = self.block;
        let limit = prompt.len() - 1;
        let mut blocks = match &self.memory {
            Some(p) => p
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lookup(prompt, hashes),
            None => Vec::new(),
        };
        let mut source = CacheSource::Memory;
        let mut rejected = Vec::new();
        if let Some(disk) = &self.disk {
            // Only worth a look when a longer prefix than memory and session give is possible.
            if hashes.len() > blocks.len() && hashes.len() * b > reused.max(blocks.len() * b) {
                let start = blocks.len();
                let found = disk.load(prompt, hashes, start);
                rejected = found.rejected;
                if ((start + found.blocks.len()) * b).min(limit) > reused.max(start * b) {
                    if let Some(p) = &self.memory {
                        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                        for (j, blk) in found.blocks.iter().enumerate() {
                            p.insert(prompt, hashes, start + j, blk.clone());
                        }
                    }
                    blocks.extend(found.blocks);
                    source = CacheSource::Disk;
                }
            }
        }
        let held = (blocks.len() * b).min(limit);
        if held <= reused {
            return Ok((reused, CacheSource::Session, rejected));
        }
        // Blocks before the one holding `reused` are already in the session.
        let first = reused / b;
        session.truncate(first * b);
        for (i, blk) in blocks.iter().enumerate().skip(first) {
            session.cache.import(i * b, blk)?;
        }
        session.set_tokens(&prompt[..blocks.len() * b]);
        session.truncate(held);
        Ok((held, source, rejected))
    }

    /// Stores the prompt's whole blocks (now in the session's cache) in the prefix caches.
    fn store_blocks(&self, session: &Session, prompt: &[u32], hashes: &[u64], rejected: &[usize]) {
        let b = self.block;
        let n = hashes.len().min(session.cache.len() / b);
        if n == 0 || session.tokens().len() < n * b || session.tokens()[..n * b] != prompt[..n * b]
        {
            return;
        }
        let export = |i: usize| -> Option<Arc<KvBlock>> {
            session.cache.export(i * b, b).ok().map(Arc::new)
        };
        let mut blocks: Vec<Arc<KvBlock>> = Vec::new();
        if let Some(p) = &self.memory {
            let cached = p
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lookup(prompt, &hashes[..n]);
            blocks = cached;
            let mut new = Vec::new();
            for i in blocks.len()..n {
                match export(i) {
                    Some(blk) => new.push(blk),
                    None => return,
                }
            }
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            for blk in new {
                p.insert(prompt, hashes, blocks.len(), blk.clone());
                blocks.push(blk);
            }
        }
        if let Some(disk) = &self.disk {
            let on_disk =
                (0..n).all(|i| !rejected.contains(&i) && disk.path_for(hashes[i]).exists());
            if on_disk {
                return;
            }
            for i in blocks.len()..n {
                match export(i) {
                    Some(blk) => blocks.push(blk),
                    None => return,
                }
            }
            if let Some(w) = &self.writer {
                w.send(WriteJob::Store {
                    tokens: prompt[..(n * self.block).min(prompt.len())].to_vec(),
                    hashes: hashes[..n].to_vec(),
                    blocks: blocks[..n].to_vec(),
                    rejected: rejected.to_vec(),
                });
            }
        }
    }
}
