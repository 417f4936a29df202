//! The repacked weights of a model in a file, memory-mapped by later loads instead of being
//! repacked again: the rows4 copies ([`QMatrix::repack_for_cpu`](super::QMatrix)) are most of
//! what a CPU load costs, and a mapped file costs next to nothing until the pages are read.
//!
//! One file per model and packing, named by a hash of the model's identity
//! ([`model_identity`]) and of a layout probe (a fixed block repacked by this build's kernels
//! for every type that has a rows4 layout, so a kernel change that moves bytes around gets a
//! new file instead of reading an old one). Layout (little-endian):
//!
//! ```text
//! magic "QWRUNW4\0" | version u32 | entries u32 | model identity u64 | probe u64
//! | data start u64 | file size u64 | sampled checksum u64 | index checksum u64
//! | index: per entry: name length u16 | name | ggml type u32 | rows u64 | cols u64
//! |        | offset u64 | length u64
//! | data: each entry's bytes at a 4 KiB boundary
//! ```
//!
//! The index checksum covers the header before it and the index; the sampled checksum covers the
//! first and last 4 KiB of each entry's data (all of it is not read at load: that read is the cost
//! this file is there to save). A file that is stale, foreign, truncated or corrupt in what is
//! checked is ignored with a warning and rewritten. Like the prompt cache, it trusts its
//! directory: created private (0700, files 0600), read only as regular files, never through a
//! symlink, and only at the size the header implies. Files are written to a temporary name and
//! renamed, without waiting for the disk; the directory keeps the most recently used files
//! within [`MAX_BYTES`].

use crate::prefix_cache::{create_private_dir, hash_bytes, open_regular, touch};
use anyhow::{bail, Context, Result};
use memmap2::{Mmap, MmapOptions};
use qwen_run_kernels::QuantType;
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const MAGIC: &[u8; 8] = b"QWRUNW4\0";
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 6 * 8;
const EXT: &str = "qwr4";
const ALIGN: u64 = 4096;
/// Bytes of each end of an entry the sampled checksum covers.
const SAMPLE: usize = 4096;
/// Bytes of files kept in the directory: when a new one is written, the least recently used
/// others go until the rest fits (a model's file is about the size of its GGUF).
pub const MAX_BYTES: u64 = 8 << 30;
/// Bounds on what an index may claim, checked before anything is allocated for it.
const MAX_ENTRIES: usize = 1 << 16;
const MAX_INDEX_BYTES: u64 = 16 << 20;

/// Where a model's repacked weights are cached: the directory and the model's identity.
#[derive(Clone, Debug)]
pub struct WeightCache {
    pub dir: PathBuf,
    /// [`model_identity`] of the GGUF file(s).
    pub model: u64,
}

/// One matrix in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    ty: QuantType,
    rows: usize,
    cols: usize,
    range: Range<usize>,
}

/// A validated cache file, mapped.
pub struct CachedWeights {
    map: Arc<Mmap>,
    entries: HashMap<String, Entry>,
}

/// A matrix's repacked bytes inside a mapped cache file.
pub struct MappedWeights {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl std::ops::Deref for MappedWeights {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// A matrix to store: its name, type, shape and rows4 bytes.
pub struct StoredMatrix<'a> {
    pub name: &'a str,
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl CachedWeights {
    /// The rows4 bytes of matrix `name`, if the file holds it with this type and shape.
    pub fn get(
        &self,
        name: &str,
        ty: QuantType,
        rows: usize,
        cols: usize,
    ) -> Option<MappedWeights> {
        let e = self.entries.get(name)?;
        let expect = qwen_run_kernels::rows4_row_bytes(ty, cols)?.checked_mul(rows)?;
        (e.ty == ty && e.rows == rows && e.cols == cols && e.range.len() == expect).then(|| {
            MappedWeights {
                map: self.map.clone(),
                range: e.range.clone(),
            }
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A hash of how this build's kernels lay out the rows4 copy of a fixed block of each type
/// that has one.
pub fn layout_probe() -> u64 {
    let mut h = 0x7277_3470_726f_6265u64;
    let cols = 256;
    for ty in QuantType::ALL {
        if !qwen_run_kernels::has_rows4(ty) {
            continue;
        }
        let (Some(rb), Some(prb)) = (
            ty.row_bytes(cols),
            qwen_run_kernels::rows4_row_bytes(ty, cols),
        ) else {
            continue;
        };
        // Small byte values keep every f16 scale finite, whatever a packer does with them.
        let src: Vec<u8> = (0..4 * rb).map(|i| ((i * 7 + 3) % 61) as u8).collect();
        let mut out = vec![0u8; 4 * prb];
        let packed = qwen_run_kernels::repack_rows4_into(ty, 4, cols, &src, &mut out).is_some();
        h = hash_bytes(h, &[ty.ggml_id() as u8, packed as u8]);
        h = hash_bytes(h, &out);
    }
    h
}

impl WeightCache {
    /// The file of this model with this build's layout.
    pub fn path(&self, probe: u64) -> PathBuf {
        let key = hash_bytes(self.model, &probe.to_le_bytes());
        self.dir.join(format!("{key:016x}.{EXT}"))
    }

    /// The cache file of this model, mapped, if there is a valid one; a rejected file is named
    /// on stderr (it is rewritten after the load).
    pub fn open(&self, probe: u64) -> Option<CachedWeights> {
        let path = self.path(probe);
        if fs::symlink_metadata(&path).is_err() {
            return None;
        }
        match self.read(&path, probe) {
            Ok(c) => {
                touch([&path].into_iter());
                Some(c)
            }
            Err(e) => {
                eprintln!(
                    "warning: ignoring weight cache file {}: {e:#}",
                    path.display()
                );
                None
            }
        }
    }

    fn read(&self, path: &Path, probe: u64) -> Result<CachedWeights> {
        let (mut f, len) = open_regular(path)?;
        let mut header = vec![0u8; HEADER.min(len as usize)];
        f.read_exact(&mut header).context("cannot read it")?;
        if header.len() < 8 || &header[..8] != MAGIC {
            bail!("not a qwen-run weight cache file (bad magic)");
        }
        if header.len() < HEADER {
            bail!("it is {len} bytes, shorter than its header (truncated or damaged)");
        }
        let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            bail!("format version {version}, this qwen-run reads version {FORMAT_VERSION} (stale file)");
        }
        let n = u32_at(12) as usize;
        if u64_at(16) != self.model {
            bail!("it was made for another model file");
        }
        if u64_at(24) != probe {
            bail!("it was made by a build whose kernels lay the weights out differently");
        }
        let (data_start, size, sampled, index_sum) =
            (u64_at(32), u64_at(40), u64_at(48), u64_at(56));
        if size != len {
            bail!("it is {len} bytes, expected {size} (truncated or damaged)");
        }
        if n > MAX_ENTRIES
            || data_start < HEADER as u64
            || data_start - (HEADER as u64) > MAX_INDEX_BYTES
            || data_start > len
        {
            bail!("its header is damaged");
        }
        let mut index = vec![0u8; (data_start - HEADER as u64) as usize];
        f.read_exact(&mut index).context("cannot read it")?;
        let mut summed = header[..56].to_vec();
        summed.extend_from_slice(&index);
        if hash_bytes(0, &summed) != index_sum {
            bail!("index checksum mismatch (the file is corrupt)");
        }
        let entries = parse_index(&index, n, data_start, len)?;
        // SAFETY: a file this process maps read-only; files are only ever replaced by rename,
        // never written in place, so the mapping's bytes do not change under it.
        let map = unsafe { MmapOptions::new().map(&f) }.context("cannot map it")?;
        if map.len() as u64 != len {
            bail!("it changed size while being read");
        }
        populate(&map);
        if sample_sum(&map, entries.values().map(|e| e.range.clone())) != sampled {
            bail!("data checksum mismatch (the file is corrupt)");
        }
        Ok(CachedWeights {
            map: Arc::new(map),
            entries,
        })
    }

    /// Writes the file of this model (atomically, replacing any), then trims the directory to
    /// [`MAX_BYTES`]. Errors are for the caller to report; nothing is fatal.
    pub fn store(&self, probe: u64, matrices: &[StoredMatrix]) -> Result<()> {
        create_private_dir(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.path(probe);
        let mut index = Vec::new();
        let index_len: usize = matrices.iter().map(|m| 2 + m.name.len() + 4 + 4 * 8).sum();
        let data_start = ((HEADER + index_len) as u64).next_multiple_of(ALIGN);
        let mut at = data_start;
        let mut ranges = Vec::with_capacity(matrices.len());
        for m in matrices {
            let name_len = u16::try_from(m.name.len()).context("a tensor name is too long")?;
            index.extend_from_slice(&name_len.to_le_bytes());
            index.extend_from_slice(m.name.as_bytes());
            index.extend_from_slice(&m.ty.ggml_id().to_le_bytes());
            for v in [m.rows as u64, m.cols as u64, at, m.bytes.len() as u64] {
                index.extend_from_slice(&v.to_le_bytes());
            }
            ranges.push(at as usize..at as usize + m.bytes.len());
            at = (at + m.bytes.len() as u64).next_multiple_of(ALIGN);
        }
        index.resize((data_start as usize) - HEADER, 0);
        let size = ranges.last().map_or(data_start, |r| r.end as u64);
        let sampled = {
            let mut h = 0;
            for m in matrices {
                h = sample_hash(h, m.bytes);
            }
            h
        };
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&(matrices.len() as u32).to_le_bytes());
        for v in [self.model, probe, data_start, size, sampled] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        let mut summed = header.clone();
        summed.extend_from_slice(&index);
        header.extend_from_slice(&hash_bytes(0, &summed).to_le_bytes());
        let tmp = self.dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("weights"),
            std::process::id(),
        ));
        let write = || -> Result<()> {
            let mut options = fs::File::options();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let f = options.open(&tmp)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            w.write_all(&header)?;
            w.write_all(&index)?;
            let mut written = data_start;
            for (m, r) in matrices.iter().zip(&ranges) {
                w.write_all(&vec![0u8; (r.start as u64 - written) as usize])?;
                w.write_all(m.bytes)?;
                written = r.end as u64;
            }
            // No fsync: it would make the first load wait for the disk, and a file a crash
            // leaves short or with holes fails the size or sampled check and is rewritten.
            w.flush()?;
            fs::rename(&tmp, &path)?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        self.trim(&path);
        Ok(())
    }

    /// Deletes the least recently used cache files (never `keep`) until the rest fit in
    /// [`MAX_BYTES`], and temporary files an hour old (left by a process that died while
    /// writing).
    fn trim(&self, keep: &Path) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let now = std::time::SystemTime::now();
        let mut files = Vec::new();
        let mut total = 0u64;
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            let ext = p.extension().and_then(|x| x.to_str());
            if !meta.is_file() {
                continue;
            }
            if ext == Some("tmp") {
                if now.duration_since(mtime).is_ok_and(|a| a.as_secs() > 3600) {
                    let _ = fs::remove_file(&p);
                }
            } else if ext == Some(EXT) {
                total += meta.len();
                if p != keep {
                    files.push((mtime, meta.len(), p));
                }
            }
        }
        files.sort();
        for (_, len, p) in files {
            if total <= MAX_BYTES {
                break;
            }
            if fs::remove_file(p).is_ok() {
                total -= len;
            }
        }
    }
}

fn parse_index(
    index: &[u8],
    n: usize,
    data_start: u64,
    len: u64,
) -> Result<HashMap<String, Entry>> {
    let mut at = 0usize;
    let mut take = |k: usize| -> Result<&[u8]> {
        let s = index.get(at..at + k).context("its index is truncated")?;
        at += k;
        Ok(s)
    };
    let mut entries = HashMap::with_capacity(n);
    for _ in 0..n {
        let name_len = u16::from_le_bytes(take(2)?.try_into().expect("2")) as usize;
        let name = std::str::from_utf8(take(name_len)?)
            .context("its index holds a name that is not UTF-8")?
            .to_string();
        let ty = QuantType::from_ggml_id(u32::from_le_bytes(take(4)?.try_into().expect("4")))
            .context("its index holds an unknown tensor type")?;
        let mut u = || -> Result<u64> { Ok(u64::from_le_bytes(take(8)?.try_into().expect("8"))) };
        let (rows, cols, offset, length) = (u()?, u()?, u()?, u()?);
        let end = offset.checked_add(length).context("its index is damaged")?;
        if offset < data_start || end > len || offset % ALIGN != 0 {
            bail!("its index points outside the file");
        }
        let entry = Entry {
            ty,
            rows: rows as usize,
            cols: cols as usize,
            range: offset as usize..end as usize,
        };
        if entries.insert(name, entry).is_some() {
            bail!("its index names a tensor twice");
        }
    }
    Ok(entries)
}

/// The sampled checksum of a file's data: the first and last [`SAMPLE`] bytes of each entry,
/// in index order.
fn sample_sum(map: &[u8], ranges: impl Iterator<Item = Range<usize>>) -> u64 {
    let mut ranges: Vec<_> = ranges.collect();
    ranges.sort_by_key(|r| r.start);
    ranges.into_iter().fold(0, |h, r| sample_hash(h, &map[r]))
}

fn sample_hash(h: u64, bytes: &[u8]) -> u64 {
    let head = &bytes[..bytes.len().min(SAMPLE)];
    let tail = &bytes[bytes.len().saturating_sub(SAMPLE)..];
    hash_bytes(hash_bytes(h, head), tail)
}

/// Maps every page of `map` in now, on several threads: the page tables of a large file are
/// most of what opening it costs, and one thread filling them all is the longest part of a load.
/// What a thread cannot map here is faulted in when first read.
fn populate(map: &Mmap) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let chunk = map
        .len()
        .div_ceil(threads)
        .next_multiple_of(1 << 21)
        .max(1 << 21);
    std::thread::scope(|s| {
        for start in (0..map.len()).step_by(chunk) {
            let len = chunk.min(map.len() - start);
            s.spawn(move || {
                if map
                    .advise_range(memmap2::Advice::PopulateRead, start, len)
                    .is_err()
                {
                    // Kernels before Linux 5.14 have no MADV_POPULATE_READ: a read per page.
                    for page in (start..start + len).step_by(4096) {
                        std::hint::black_box(map[page]);
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrices() -> Vec<(String, Vec<u8>)> {
        (0..3)
            .map(|i| {
                let prb = qwen_run_kernels::rows4_row_bytes(QuantType::Q8_0, 64).unwrap();
                let bytes = (0..8 * prb).map(|b| (b * 31 + i * 7) as u8).collect();
                (format!("blk.{i}.ffn_up.weight"), bytes)
            })
            .collect()
    }

    fn store(cache: &WeightCache, probe: u64, m: &[(String, Vec<u8>)]) {
        let stored: Vec<StoredMatrix> = m
            .iter()
            .map(|(name, bytes)| StoredMatrix {
                name,
                ty: QuantType::Q8_0,
                rows: 8,
                cols: 64,
                bytes,
            })
            .collect();
        cache.store(probe, &stored).unwrap();
    }

    #[test]
    fn round_trip_and_rejections() {
        let dir = tempfile::tempdir().unwrap();
        let cache = WeightCache {
            dir: dir.path().join("weights"),
            model: 42,
        };
        let m = matrices();
        store(&cache, 7, &m);
        let c = cache.open(7).expect("a valid file");
        assert_eq!(c.len(), 3);
        for (name, bytes) in &m {
            assert_eq!(&*c.get(name, QuantType::Q8_0, 8, 64).unwrap(), &bytes[..]);
            assert!(c.get(name, QuantType::Q8_0, 4, 64).is_none());
            assert!(c.get(name, QuantType::Q4_0, 8, 64).is_none());
        }
        assert!(c
            .get("blk.9.ffn_up.weight", QuantType::Q8_0, 8, 64)
            .is_none());
        drop(c);
        // Another model or another layout: another file name, so nothing is found.
        let other = WeightCache {
            dir: cache.dir.clone(),
            model: 43,
        };
        assert!(other.open(7).is_none());
        assert!(cache.open(8).is_none());
        // The same name with another model's header (a renamed file) is rejected.
        fs::copy(cache.path(7), other.path(7)).unwrap();
        assert!(other.read(&other.path(7), 7).is_err());

        let path = cache.path(7);
        let good = fs::read(&path).unwrap();
        let check = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            cache.read(&path, 7)
        };
        for cut in [0, 5, HEADER - 1, HEADER + 3, good.len() - 1] {
            let e = check(&good[..cut]).err().expect("truncated file accepted");
            assert!(
                format!("{e:#}").contains("bytes") || format!("{e:#}").contains("magic"),
                "{e:#}"
            );
        }
        // A flipped byte in the header, the index and the sampled data.
        for at in [10, 20, HEADER + 5, 4096 + 3, good.len() - 2] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(check(&bad).is_err(), "corruption at {at} accepted");
        }
        // A header that claims a huge index is refused before anything is allocated for it.
        let mut bad = good.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check(&bad).is_err());
        assert!(check(&good).is_ok());
        // open() turns every rejection into None, and a rewrite makes it valid again.
        fs::write(&path, &good[..100]).unwrap();
        assert!(cache.open(7).is_none());
        store(&cache, 7, &m);
        assert!(cache.open(7).is_some());
    }

    #[cfg(unix)]
    #[test]
    fn links_and_directories_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let cache = WeightCache {
            dir: dir.path().to_path_buf(),
            model: 1,
        };
        let m = matrices();
        store(&cache, 7, &m);
        let real = dir.path().join("real");
        fs::rename(cache.path(7), &real).unwrap();
        std::os::unix::fs::symlink(&real, cache.path(7)).unwrap();
        assert!(cache.open(7).is_none());
        fs::remove_file(cache.path(7)).unwrap();
        fs::create_dir(cache.path(7)).unwrap();
        assert!(cache.open(7).is_none());
    }

    #[test]
    fn trim_keeps_what_fits_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let m = matrices();
        let cache = |model| WeightCache {
            dir: dir.path().to_path_buf(),
            model,
        };
        for model in 0..3 {
            store(&cache(model), 7, &m);
        }
        // A file that alone takes the whole budget (sparse: no disk used).
        let big = cache(99).path(7);
        fs::File::create(&big).unwrap().set_len(MAX_BYTES).unwrap();
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(10);
        fs::File::options()
            .append(true)
            .open(&big)
            .unwrap()
            .set_modified(t)
            .unwrap();
        store(&cache(3), 7, &m);
        assert!(
            !big.exists(),
            "the least recently used file over the budget stays"
        );
        for model in 0..4 {
            assert!(cache(model).path(7).exists(), "model {model} was deleted");
        }
    }
}
