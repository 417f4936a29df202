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
//! blocks before its first ones). Temporary files a crashed process left count in the budget
//! and go once they are an hour old.
//!
//! What it trusts: the directory. A file there that passes the checks above is used as the KV
//! of its prompt prefix, and a checksum is no signature, so anyone who can write the directory
//! can change what the model answers to prompts with that prefix. The directory is therefore
//! created private (0700, files 0600); only regular files are read, never through a symlink,
//! and only when their size is the one their header implies, so a file there cannot make the
//! reader block (a FIFO), read elsewhere (a link) or allocate more than a block's size. Point
//! `--prompt-cache` only at a directory no other user can write.
//!
//! A saved server slot (llama-server's `POST /slots/{id}?action=save`, [`save_session`]) is a
//! file of the same layout and checks: one block, index 0, of all the tokens the slot holds.

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

/// A hash that names the model file: its size, its first and last MiB (the GGUF header and
/// metadata, and the last tensor's data) and 32 stripes of 64 KiB spread evenly between them,
/// part by part. Survives moving or renaming the file; another model, another quantization of
/// the same one, or another fine-tune of the same base (same size, header and often the same
/// last tensor, other weights in the middle) gets another identity.
pub fn model_identity(paths: &[PathBuf]) -> Result<u64> {
    const SPAN: u64 = 1 << 20;
    const STRIPES: u64 = 32;
    const STRIPE: u64 = 64 << 10;
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
        let mut stripe = vec![0u8; STRIPE.min(size) as usize];
        for i in 1..=STRIPES {
            let at = (size - stripe.len() as u64) / (STRIPES + 1) * i;
            f.seek(SeekFrom::Start(at))?;
            f.read_exact(&mut stripe)?;
            h = hash_bytes(h, &stripe);
        }
    }
    Ok(h)
}

/// Opens a cache file for reading only if it is a regular file reached without a symlink; the
/// open itself never blocks (a FIFO).
pub(crate) fn open_regular(path: &Path) -> Result<(fs::File, u64)> {
    let mut options = fs::File::options();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    #[cfg(not(unix))]
    if fs::symlink_metadata(path)?.file_type().is_symlink() {
        bail!("it is a symbolic link, which qwen-run's caches never follow");
    }
    let f = options.open(path).map_err(|e| {
        #[cfg(unix)]
        if e.raw_os_error() == Some(libc::ELOOP) {
            return anyhow::anyhow!("it is a symbolic link, which qwen-run's caches never follow");
        }
        anyhow::anyhow!("cannot open it: {e}")
    })?;
    let meta = f.metadata().context("cannot read its metadata")?;
    if !meta.is_file() {
        bail!("it is not a regular file");
    }
    Ok((f, meta.len()))
}

/// A temporary file of a write (`.{name}.{pid}-{n}.tmp`).
fn is_temp(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("tmp")
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
}

/// A temporary file this old was left by a process that died while writing it.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

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
        let cache = DiskCache {
            dir,
            max_bytes,
            shape,
        };
        cache.remove_stale_temps();
        cache
    }

    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let path = entry.path();
            let stale = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > STALE_TEMP);
            if is_temp(&path) && stale {
                let _ = fs::remove_file(&path);
            }
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

    fn file_size(&self, index: usize) -> usize {
        self.shape.file_size(index)
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
        read_file(path, &self.shape, Expect::Block { index, tokens }).map(|(_, b)| b)
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
        create_private_dir(&self.dir)
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
        write_file(path, &self.shape, index, tokens, b).map(|_| ())
    }

    /// Deletes the least recently used cache files until the directory is within budget,
    /// never one of `keep`.
    fn trim(&self, keep: &[PathBuf]) -> Result<()> {
        let mut files = Vec::new();
        let now = SystemTime::now();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let temp = is_temp(&path);
            if !temp && path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            let meta = entry.metadata()?;
            let mut mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            // Another process may be writing a fresh one; a stale one goes first.
            if temp {
                match now.duration_since(mtime) {
                    Ok(age) if age > STALE_TEMP => mtime = SystemTime::UNIX_EPOCH,
                    _ => {
                        files.push((now, meta.len(), path, true));
                        continue;
                    }
                }
            }
            files.push((mtime, meta.len(), path, false));
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path, in_use) in files {
            if total <= self.max_bytes {
                break;
            }
            if in_use || keep.contains(&path) {
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
                    .filter(|e| {
                        let p = e.path();
                        is_temp(&p) || p.extension().and_then(|x| x.to_str()) == Some(EXT)
                    })
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Shape {
    /// Bytes of one block's keys and values, all layers.
    fn block_bytes(&self) -> usize {
        self.layers
            * self.kv_heads
            * self.block
            * (self.type_k.row_bytes(self.head_dim) + self.type_v.row_bytes(self.head_dim))
    }

    /// The size of the file of block `index`.
    fn file_size(&self, index: usize) -> usize {
        HEADER + 4 * (index + 1) * self.block + self.block_bytes() + 8
    }
}

/// What a reader expects of a file.
enum Expect<'a> {
    /// Block `index` of a prompt prefix, whose tokens up to the block's end are `tokens`.
    Block { index: usize, tokens: &'a [u32] },
    /// A saved session: one block (index 0) of any length up to `max_tokens`.
    Session { max_tokens: usize },
}

/// Reads a file written by [`write_file`] after checking it is the file expected (of this
/// model, cache types and shape, intact); its tokens and its block's KV.
fn read_file(path: &Path, shape: &Shape, expect: Expect) -> Result<(Vec<u32>, KvBlock)> {
    let (mut f, len) = open_regular(path)?;
    // The header first, so a foreign file is named for what it is; the rest only when the
    // size is the one the header implies, so a huge file is never read into memory.
    let mut bytes = vec![0u8; HEADER.min(len as usize)];
    f.read_exact(&mut bytes).context("cannot read it")?;
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        bail!("not a qwen-run KV file (bad magic)");
    }
    if bytes.len() < HEADER {
        bail!("it is {len} bytes, shorter than a header (truncated or damaged)");
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        bail!(
            "format version {version}, this qwen-run reads version {FORMAT_VERSION} (stale file)"
        );
    }
    let model = u64::from_le_bytes(bytes[12..20].try_into().expect("8"));
    if model != shape.model {
        bail!("it was made for another model file (or other rope settings)");
    }
    let (tk, tv) = (CacheType::from_id(bytes[20]), CacheType::from_id(bytes[21]));
    if tk != Some(shape.type_k) || tv != Some(shape.type_v) {
        bail!(
            "it holds a {}/{} KV cache, this run uses {}/{}",
            tk.map_or("unknown", CacheType::name),
            tv.map_or("unknown", CacheType::name),
            shape.type_k.name(),
            shape.type_v.name()
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
    let (index, want_block, known) = match expect {
        Expect::Block { index, tokens } => (index, shape.block, Some(tokens)),
        Expect::Session { max_tokens } => {
            if n_tokens > max_tokens {
                bail!("it holds {n_tokens} tokens, more than the context of {max_tokens}");
            }
            (0, n_tokens, None)
        }
    };
    let want_tokens = known.map_or(n_tokens, <[u32]>::len);
    if (layers, kv_heads, head_dim, block)
        != (shape.layers, shape.kv_heads, shape.head_dim, want_block)
    {
        bail!("its KV shape (layers {layers}, KV heads {kv_heads}, head size {head_dim}, block {block}) does not match this model's");
    }
    if at_index != index || n_tokens != want_tokens {
        bail!("it holds block {at_index} of {n_tokens} tokens, expected block {index} of {want_tokens}");
    }
    let shape = Shape {
        block,
        ..shape.clone()
    };
    let size = shape.file_size(index);
    if len != size as u64 {
        bail!("it is {len} bytes, expected {size} (truncated or damaged), so it was not read");
    }
    bytes.resize(size, 0);
    f.read_exact(&mut bytes[HEADER..])
        .context("cannot read it")?;
    let sum = u64::from_le_bytes(bytes[size - 8..].try_into().expect("8"));
    if hash_bytes(0, &bytes[..size - 8]) != sum {
        bail!("checksum mismatch (the file is corrupt)");
    }
    let tokens: Vec<u32> = bytes[HEADER..HEADER + 4 * n_tokens]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    if known.is_some_and(|want| tokens != want) {
        bail!("it holds other tokens (hash collision)");
    }
    let (rk, rv) = (
        shape.kv_heads * block * shape.type_k.row_bytes(shape.head_dim),
        shape.kv_heads * block * shape.type_v.row_bytes(shape.head_dim),
    );
    let mut at = HEADER + 4 * n_tokens;
    let mut take = |n: usize| {
        let v = bytes[at..at + n].to_vec();
        at += n;
        v
    };
    let kv = KvBlock {
        tokens: block,
        type_k: shape.type_k,
        type_v: shape.type_v,
        layers: (0..layers).map(|_| (take(rk), take(rv))).collect(),
    };
    Ok((tokens, kv))
}

/// Writes `tokens` and block `index`'s KV `b` to `path` atomically (a temporary file in the same
/// directory, renamed), private to this user; the bytes written.
fn write_file(
    path: &Path,
    shape: &Shape,
    index: usize,
    tokens: &[u32],
    b: &KvBlock,
) -> Result<usize> {
    if b.type_k != shape.type_k
        || b.type_v != shape.type_v
        || b.layers.len() != shape.layers
        || b.tokens != shape.block
    {
        bail!("a block of another cache layout");
    }
    let size = shape.file_size(index);
    let mut buf = Vec::with_capacity(size);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&shape.model.to_le_bytes());
    buf.extend_from_slice(&[shape.type_k.id(), shape.type_v.id(), 0, 0]);
    for v in [
        shape.layers,
        shape.kv_heads,
        shape.head_dim,
        shape.block,
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
        bail!("internal error: the KV block has an unexpected size");
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> Result<()> {
        let mut options = fs::File::options();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(size)
}

/// Saves a session (its `tokens` and their KV `kv`) to `path` in the cache's file layout: one
/// block, index 0, of all its tokens. `shape.block` is ignored. The bytes written.
pub fn save_session(path: &Path, shape: &Shape, tokens: &[u32], kv: &KvBlock) -> Result<usize> {
    if kv.tokens != tokens.len() {
        bail!(
            "internal error: the KV holds {} tokens, the session {}",
            kv.tokens,
            tokens.len()
        );
    }
    let shape = Shape {
        block: tokens.len(),
        ..shape.clone()
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_file(path, &shape, 0, tokens, kv)
}

/// Reads a session saved by [`save_session`] under the same checks as a cache file, refusing
/// one of more than `max_tokens`; its tokens and their KV. `shape.block` is ignored.
pub fn load_session(path: &Path, shape: &Shape, max_tokens: usize) -> Result<(Vec<u32>, KvBlock)> {
    read_file(path, shape, Expect::Session { max_tokens })
}

/// Marks files used now, in the given order (the last gets the newest time).
pub(crate) fn touch<'a>(paths: impl Iterator<Item = &'a PathBuf>) {
    for p in paths {
        let mut options = fs::File::options();
        options.append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            &mut options,
            libc::O_NOFOLLOW | libc::O_NONBLOCK,
        );
        if let Ok(f) = options.open(p) {
            if f.metadata().is_ok_and(|m| m.is_file()) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
    }
}

/// Creates `dir` (and its parents) readable and writable by this user only; the parents get
/// the usual mode.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            model: 7,
            type_k: CacheType::F32,
            type_v: CacheType::F32,
            layers: 2,
            kv_heads: 1,
            head_dim: 4,
            block: 64,
        }
    }

    fn kv(tokens: usize) -> KvBlock {
        let row = CacheType::F32.row_bytes(4);
        KvBlock {
            tokens,
            type_k: CacheType::F32,
            type_v: CacheType::F32,
            layers: (0..2u8)
                .map(|l| (vec![l; tokens * row], vec![l + 10; tokens * row]))
                .collect(),
        }
    }

    #[test]
    fn a_saved_session_comes_back_only_into_what_it_fits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots").join("a.bin");
        let tokens: Vec<u32> = (0..5).collect();
        let written = save_session(&path, &shape(), &tokens, &kv(5)).unwrap();
        assert_eq!(written as u64, fs::metadata(&path).unwrap().len());
        let (back, block) = load_session(&path, &shape(), 5).unwrap();
        assert_eq!(back, tokens);
        assert_eq!(block.layers, kv(5).layers);
        // More tokens than the context, another model, another cache type: refused by name.
        let err = |s: &Shape, max: usize| format!("{:#}", load_session(&path, s, max).unwrap_err());
        assert!(err(&shape(), 4).contains("more than the context"));
        let other = Shape {
            model: 8,
            ..shape()
        };
        assert!(err(&other, 5).contains("another model"));
        let f16 = Shape {
            type_k: CacheType::F16,
            ..shape()
        };
        assert!(err(&f16, 5).contains("f32/f32"));
        // An empty slot saves and restores as nothing.
        save_session(&path, &shape(), &[], &kv(0)).unwrap();
        assert!(load_session(&path, &shape(), 5).unwrap().0.is_empty());
        // The KV must be the tokens'.
        assert!(save_session(&path, &shape(), &tokens, &kv(4)).is_err());
    }
}
