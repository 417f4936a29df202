//! The persistent prompt cache: the KV of prompt prefixes in files, so a new process with the
//! same long system prompt skips its prefill.
//!
//! Like the memory cache, it works in blocks: one file per block of a prefix, named by a hash of
//! the model's identity, the cache types and the chained hash of every token up to the block's
//! end. A prompt reuses the longest run of blocks found from its start, so prompts that share a
//! system prompt share its files whatever follows, and a growing conversation only writes its
//! new blocks. Layout of a file (little-endian):
//!
//! ```text
//! magic "QWRUNKV\0" | version u32 | model identity u64 | type_k u8 | type_v u8 | 0u16
//! | layers u32 | kv_heads u32 | head_dim u32 | block u32 | index u32 | tokens u32
//! | token ids u32 * tokens        (the whole prefix, blocks 0..=index)
//! | per layer: keys then values of block `index` ([kv_heads][block][row] in the cache types)
//! | checksum u64 (hash_bytes of everything before)
//! ```
//!
//! A file that is stale (another format version), foreign (another model, cache type or
//! shape), truncated or corrupt is ignored with a warning on stderr and never used. Files are
//! written to a temporary name and renamed, so a reader never sees half a file; the directory
//! is kept under a byte budget by deleting the least recently used files (a prefix's later
//! blocks before its first ones).

use super::hash_bytes;
use crate::kv_cache::{CacheType, KvBlock};
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

pub const MAGIC: &[u8; 8] = b"QWRUNKV\0";
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 4 + 6 * 4;
const EXT: &str = "qkv";

/// A hash that names the model file: its size and its first and last MiB (the GGUF header and
/// metadata, and the last tensor's data), part by part. Survives moving or renaming the file;
/// another model, or another quantization of the same one, gets another identity.
pub fn model_identity(paths: &[PathBuf]) -> Result<u64> {
    const SPAN: u64 = 1 << 20;
    let mut h = 0x6d6f_6465_6c5f_6964u64;
    for p in paths {
        let mut f = fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        let size = f.metadata()?.len();
        h = hash_bytes(h, &size.to_le_bytes());
        let mut buf = vec![0u8; SPAN.min(size) as usize];
        f.read_exact(&mut buf)?;
        h = hash_bytes(h, &buf);
        f.seek(SeekFrom::Start(size - buf.len() as u64))?;
        f.read_exact(&mut buf)?;
        h = hash_bytes(h, &buf);
    }
    Ok(h)
}

/// What the cache expects of a file: everything but the tokens and the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// `model_identity` of the GGUF file(s).
    pub model: u64,
    pub type_k: CacheType,
    pub type_v: CacheType,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block.
    pub block: usize,
}

pub struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    shape: Shape,
}

/// The result of looking a prompt up on disk.
#[derive(Default)]
pub struct DiskLoad {
    /// The blocks found, in order, from the block asked for; empty if none.
    pub blocks: Vec<Arc<KvBlock>>,
    /// Indices of blocks whose file exists but was rejected (to be overwritten).
    pub rejected: Vec<usize>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl DiskCache {
    pub fn new(dir: PathBuf, max_bytes: u64, shape: Shape) -> DiskCache {
        DiskCache {
            dir,
            max_bytes,
            shape,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The file of the block whose chained hash is `hash`.
    pub fn path_for(&self, hash: u64) -> PathBuf {
        let s = &self.shape;
        let key = hash_bytes(
            s.model,
            &[&hash.to_le_bytes()[..], &[s.type_k.id(), s.type_v.id()][..]].concat(),
        );
        self.dir.join(format!("{key:016x}.{EXT}"))
    }

    fn block_bytes(&self) -> usize {
        let s = &self.shape;
        s.layers
            * s.kv_heads
            * s.block
            * (s.type_k.row_bytes(s.head_dim) + s.type_v.row_bytes(s.head_dim))
    }

    fn file_size(&self, index: usize) -> usize {
        HEADER + 4 * (index + 1) * self.shape.block + self.block_bytes() + 8
    }

    /// The blocks of `tokens` stored on disk, from block `from` on while they continue.
    pub fn load(&self, tokens: &[u32], hashes: &[u64], from: usize) -> DiskLoad {
        let mut out = DiskLoad::default();
        let mut used = Vec::new();
        for (i, &h) in hashes.iter().enumerate().skip(from) {
            let path = self.path_for(h);
            if !path.exists() {
                break;
            }
            match self.read(&path, i, &tokens[..(i + 1) * self.shape.block]) {
                Ok(block) => {
                    out.blocks.push(Arc::new(block));
                    used.push(path);
                }
                Err(e) => {
                    eprintln!(
                        "warning: ignoring prompt cache file {}: {e:#}",
                        path.display()
                    );
                    out.rejected.push(i);
                    break;
                }
            }
        }
        touch(used.iter().rev());
        out
    }

    fn read(&self, path: &Path, index: usize, tokens: &[u32]) -> Result<KvBlock> {
        let bytes = fs::read(path).context("cannot read it")?;
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            bail!("not a qwen-run prompt cache file (bad magic)");
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            bail!("format version {version}, this qwen-run reads version {FORMAT_VERSION} (stale file)");
        }
        let model = u64::from_le_bytes(bytes[12..20].try_into().expect("8"));
        let s = &self.shape;
        if model != s.model {
            bail!("it was made for another model file");
        }
        let (tk, tv) = (CacheType::from_id(bytes[20]), CacheType::from_id(bytes[21]));
        if tk != Some(s.type_k) || tv != Some(s.type_v) {
            bail!(
                "it holds a {}/{} KV cache, this run uses {}/{}",
                tk.map_or("unknown", CacheType::name),
                tv.map_or("unknown", CacheType::name),
                s.type_k.name(),
                s.type_v.name()
            );
        }
        let mut at = 24;
        let mut next = || {
            let v = u32_at(at) as usize;
            at += 4;
            v
        };
        let (layers, kv_heads, head_dim, block, at_index, n_tokens) =
            (next(), next(), next(), next(), next(), next());
        if (layers, kv_heads, head_dim, block) != (s.layers, s.kv_heads, s.head_dim, s.block) {
            bail!("its KV shape (layers {layers}, KV heads {kv_heads}, head size {head_dim}, block {block}) does not match this model's");
        }
        if at_index != index || n_tokens != tokens.len() {
            bail!(
                "it holds block {at_index} of {n_tokens} tokens, expected block {index} of {}",
                tokens.len()
            );
        }
        let expect = self.file_size(index);
        if bytes.len() != expect {
            bail!(
                "it is {} bytes, expected {expect} (truncated or damaged)",
                bytes.len()
            );
        }
        let sum = u64::from_le_bytes(bytes[expect - 8..].try_into().expect("8"));
        if hash_bytes(0, &bytes[..expect - 8]) != sum {
            bail!("checksum mismatch (the file is corrupt)");
        }
        if bytes[HEADER..HEADER + 4 * n_tokens]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .ne(tokens.iter().copied())
        {
            bail!("it holds other tokens (hash collision)");
        }
        let (rk, rv) = (
            s.kv_heads * block * s.type_k.row_bytes(s.head_dim),
            s.kv_heads * block * s.type_v.row_bytes(s.head_dim),
        );
        let mut at = HEADER + 4 * n_tokens;
        let mut take = |n: usize| {
            let v = bytes[at..at + n].to_vec();
            at += n;
            v
        };
        Ok(KvBlock {
            tokens: block,
            type_k: s.type_k,
            type_v: s.type_v,
            layers: (0..layers).map(|_| (take(rk), take(rv))).collect(),
        })
    }

    /// Stores the prefix's blocks (`blocks[i]` is block `i`, whose chained hash is `hashes[i]`)
    /// that are not on disk yet, or whose file was `rejected`; each file is written atomically.
    /// Then trims the directory to the budget, keeping this prefix's files. Errors are for the
    /// caller to report; nothing is fatal.
    pub fn store(
        &self,
        tokens: &[u32],
        hashes: &[u64],
        blocks: &[Arc<KvBlock>],
        rejected: &[usize],
    ) -> Result<()> {
        let s = &self.shape;
        let n = blocks.len().min(hashes.len());
        if n == 0 || tokens.len() < n * s.block {
            return Ok(());
        }
        // Only prefixes that fit the budget as a whole are worth storing.
        let total: u64 = (0..n).map(|i| self.file_size(i) as u64).sum();
        if total > self.max_bytes {
            return Ok(());
        }
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let mut chain = Vec::with_capacity(n);
        for i in 0..n {
            let path = self.path_for(hashes[i]);
            if !path.exists() || rejected.contains(&i) {
                self.write_block(&path, i, &tokens[..(i + 1) * s.block], &blocks[i])?;
            }
            chain.push(path);
        }
        // Later blocks older than earlier ones: eviction takes a prefix's tail first.
        touch(chain.iter().rev());
        self.trim(&chain)
    }

    fn write_block(&self, path: &Path, index: usize, tokens: &[u32], b: &KvBlock) -> Result<()> {
        let s = &self.shape;
        if b.type_k != s.type_k || b.type_v != s.type_v || b.layers.len() != s.layers {
            bail!("a block of another cache layout");
        }
        let size = self.file_size(index);
        let mut buf = Vec::with_capacity(size);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&s.model.to_le_bytes());
        buf.extend_from_slice(&[s.type_k.id(), s.type_v.id(), 0, 0]);
        for v in [
            s.layers,
            s.kv_heads,
            s.head_dim,
            s.block,
            index,
            tokens.len(),
        ] {
            buf.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        for (k, v) in &b.layers {
            buf.extend_from_slice(k);
            buf.extend_from_slice(v);
        }
        let sum = hash_bytes(0, &buf);
        buf.extend_from_slice(&sum.to_le_bytes());
        if buf.len() != size {
            bail!("internal error: the prompt cache block has an unexpected size");
        }
        let tmp = self.dir.join(format!(
            ".{}.{}-{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(())
    }

    /// Deletes the least recently used cache files until the directory is within budget,
    /// never one of `keep`.
    fn trim(&self, keep: &[PathBuf]) -> Result<()> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            let meta = entry.metadata()?;
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            files.push((mtime, meta.len(), path));
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if keep.contains(&path) {
                continue;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        Ok(())
    }

    /// Bytes of cache files in the directory now.
    pub fn used_bytes(&self) -> u64 {
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some(EXT))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Marks files used now, in the given order (the last gets the newest time).
fn touch<'a>(paths: impl Iterator<Item = &'a PathBuf>) {
    for p in paths {
        if let Ok(f) = fs::File::options().append(true).open(p) {
            let _ = f.set_modified(SystemTime::now());
        }
    }
}
