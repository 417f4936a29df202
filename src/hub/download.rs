//! One file from the Hub into hf-hub's cache layout: a resumable transfer into
//! `blobs/{sha256}.part`, checked for size and sha256, then renamed to `blobs/{sha256}` and linked
//! from `snapshots/{commit}/{file}`. A file that fails the check is deleted, never used.

use super::{human_bytes, HubEnv};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Transfers retried after a network failure, resuming where the last one stopped.
const RETRIES: usize = 2;

/// What the repo listing says about one file.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub name: String,
    pub size: Option<u64>,
    /// Of an LFS file (every GGUF): its sha256, which is also its etag and blob name.
    pub sha256: Option<String>,
    /// The git blob id (the etag of a non-LFS file).
    pub blob_id: Option<String>,
}

/// An error of one transfer attempt: worth retrying (the network) or not.
enum Attempt {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

pub(super) struct Download<'a> {
    pub env: &'a HubEnv,
    pub agent: &'a ureq::Agent,
    pub repo_id: &'a str,
    /// `.../models--org--name`
    pub repo_dir: &'a Path,
    pub commit: &'a str,
}

impl Download<'_> {
    /// Makes `snapshots/{commit}/{file}` point at a verified blob, downloading it if needed;
    /// returns the snapshot path.
    pub fn fetch(&self, remote: &RemoteFile, url: &str) -> Result<PathBuf> {
        if (remote.size.is_none() || remote.sha256.is_none()) && !self.env.no_verify {
            bail!(
                "the Hub lists {} of {} without a {}, so the download could not be verified; refusing it. If you trust {} and the repo, run again with --hf-no-verify to download it unverified.",
                remote.name,
                self.repo_id,
                match (remote.size, &remote.sha256) {
                    (None, None) => "size and sha256",
                    (None, _) => "size",
                    _ => "sha256",
                },
                self.env.endpoint
            );
        }
        let blobs = self.repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| disk_error(e, &blobs, "create the Hugging Face cache directory"))?;
        let key = remote
            .sha256
            .clone()
            .or_else(|| remote.blob_id.clone())
            .filter(|k| is_safe_key(k));
        // Already in the cache (another snapshot, or a run that stopped before linking)?
        if let Some(key) = &key {
            let blob = blobs.join(key);
            if let (Ok(meta), Some(size)) = (std::fs::metadata(&blob), remote.size) {
                if meta.len() == size {
                    return self.link(&blob, key, &remote.name);
                }
            }
        }
        let temp_key = key.clone().unwrap_or_else(|| {
            format!("{}-{}", self.commit, remote.name.replace(['/', '\\'], "_"))
        });
        let part = blobs.join(format!("{temp_key}.part"));
        let lock = Lock::take(blobs.join(format!("{temp_key}.lock")), &remote.name)?;
        // The other process may have finished it meanwhile.
        if let Some(key) = &key {
            let blob = blobs.join(key);
            if let (Ok(meta), Some(size)) = (std::fs::metadata(&blob), remote.size) {
                if meta.len() == size {
                    drop(lock);
                    return self.link(&blob, key, &remote.name);
                }
            }
        }
        let (size, sha) = self.transfer(remote, url, &part)?;
        if let Some(want) = remote.size {
            if size != want {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "the download of {} from {} is {size} bytes but the Hub lists it as {want} bytes; the file was deleted. Run the command again to download it anew.",
                    remote.name,
                    self.repo_id
                );
            }
        }
        if let Some(want) = &remote.sha256 {
            if !sha.eq_ignore_ascii_case(want) {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "the download of {} from {} is corrupt: its sha256 is {sha} but the Hub lists {want}; the file was deleted. Run the command again to download it anew.",
                    remote.name,
                    self.repo_id
                );
            }
        }
        let key = key.unwrap_or(sha);
        let blob = blobs.join(&key);
        std::fs::rename(&part, &blob)
            .map_err(|e| disk_error(e, &blob, "move the verified download into place"))?;
        drop(lock);
        self.link(&blob, &key, &remote.name)
    }

    /// `snapshots/{commit}/{name}` -> `../../blobs/{key}`.
    fn link(&self, blob: &Path, key: &str, name: &str) -> Result<PathBuf> {
        let pointer = self.repo_dir.join("snapshots").join(self.commit).join(name);
        if let Some(dir) = pointer.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| disk_error(e, dir, "create the snapshot directory"))?;
        }
        if std::fs::symlink_metadata(&pointer).is_ok() {
            std::fs::remove_file(&pointer)
                .with_context(|| format!("cannot replace {}", pointer.display()))?;
        }
        let up = "../".repeat(name.matches('/').count() + 2);
        let target = PathBuf::from(format!("{up}blobs/{key}"));
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&target, &pointer);
        #[cfg(not(unix))]
        let linked = {
            let _ = target;
            std::fs::hard_link(blob, &pointer)
                .or_else(|_| std::fs::copy(blob, &pointer).map(|_| ()))
        };
        linked.with_context(|| {
            format!(
                "cannot link {} to {} in the Hugging Face cache",
                pointer.display(),
                blob.display()
            )
        })?;
        Ok(pointer)
    }

    /// Downloads into `part`, resuming what is there; returns the size and sha256.
    fn transfer(&self, remote: &RemoteFile, url: &str, part: &Path) -> Result<(u64, String)> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(|e| disk_error(e, part, "create the download file"))?;
        let mut have = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut hasher = Sha256::new();
        if remote.size.is_some_and(|s| have > s) {
            file.set_len(0)
                .map_err(|e| disk_error(e, part, "truncate the download file"))?;
            have = 0;
        }
        if have > 0 {
            hash_prefix(part, have, &mut hasher)?;
        }
        if let Some(size) = remote.size {
            check_free_space(part, size.saturating_sub(have))?;
        }
        let started = Instant::now();
        let resumed_from = have;
        match (have, remote.size) {
            (0, Some(size)) => eprintln!(
                "qwen-run: downloading {} ({}) from {}/{}",
                remote.name,
                human_bytes(size),
                self.env.endpoint,
                self.repo_id
            ),
            (0, None) => eprintln!(
                "qwen-run: downloading {} from {}/{}",
                remote.name, self.env.endpoint, self.repo_id
            ),
            (_, size) => eprintln!(
                "qwen-run: resuming the download of {} at {} of {} from {}/{}",
                remote.name,
                human_bytes(have),
                size.map(human_bytes).unwrap_or_else(|| "?".into()),
                self.env.endpoint,
                self.repo_id
            ),
        }
        let bar = progress_bar(&remote.name, remote.size.unwrap_or(0), have);
        let mut attempt = 0;
        let total = loop {
            match self.attempt(url, &mut file, part, &mut have, &mut hasher, &bar, remote) {
                Ok(total) => break total,
                Err(Attempt::Fatal(e)) => {
                    bar.abandon();
                    return Err(e);
                }
                Err(Attempt::Retry(e)) if attempt < RETRIES => {
                    attempt += 1;
                    bar.suspend(|| {
                        eprintln!(
                            "qwen-run: the download of {} broke off at {} ({e:#}); retrying ({attempt} of {RETRIES})",
                            remote.name,
                            human_bytes(have)
                        )
                    });
                    std::thread::sleep(Duration::from_millis(500 * attempt as u64));
                }
                Err(Attempt::Retry(e)) => {
                    bar.abandon();
                    return Err(anyhow!(
                        "the download of {} from {} failed after {} of {} ({e:#}). Check the network connection; the part downloaded so far is kept in {} and the next run resumes from there.",
                        remote.name,
                        self.env.endpoint,
                        human_bytes(have),
                        remote.size.map(human_bytes).unwrap_or_else(|| "?".into()),
                        part.display()
                    ));
                }
            }
        };
        bar.finish_and_clear();
        file.sync_all()
            .map_err(|e| disk_error(e, part, "write the download file"))?;
        let secs = started.elapsed().as_secs_f64();
        let fetched = total.saturating_sub(resumed_from);
        eprintln!(
            "qwen-run: {}: {} in {:.1} s ({}/s){}, size{} verified",
            remote.name,
            human_bytes(fetched),
            secs,
            human_bytes((fetched as f64 / secs.max(1e-3)) as u64),
            if resumed_from > 0 {
                format!(", resumed at {}", human_bytes(resumed_from))
            } else {
                String::new()
            },
            if remote.sha256.is_some() {
                " and sha256"
            } else {
                ""
            }
        );
        Ok((total, hex(&hasher.finalize())))
    }

    /// One request from byte `have` on; returns the total size once the file is complete.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        url: &str,
        file: &mut File,
        part: &Path,
        have: &mut u64,
        hasher: &mut Sha256,
        bar: &ProgressBar,
        remote: &RemoteFile,
    ) -> Result<u64, Attempt> {
        // The bytes as stored: the sizes and hashes are of those.
        let mut request = self.agent.get(url).set("Accept-Encoding", "identity");
        if let Some(token) = &self.env.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        if *have > 0 {
            request = request.set("Range", &format!("bytes={}-", *have));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) if *have > 0 => {
                if remote.size == Some(*have) {
                    return Ok(*have);
                }
                // What we have does not fit the file on the Hub: start over.
                restart(file, part, have, hasher)?;
                return Err(Attempt::Retry(anyhow!(
                    "the server refused to resume the download"
                )));
            }
            Err(ureq::Error::Status(code, r)) => {
                let e = super::status_error(self.env, self.repo_id, Some(&remote.name), code, &r);
                return Err(if code >= 500 || code == 429 {
                    Attempt::Retry(e)
                } else {
                    Attempt::Fatal(e)
                });
            }
            Err(ureq::Error::Transport(t)) => return Err(Attempt::Retry(anyhow!("{t}"))),
        };
        let content_length: Option<u64> = response
            .header("Content-Length")
            .and_then(|v| v.trim().parse().ok());
        let total = if response.status() == 206 {
            let range = response.header("Content-Range").unwrap_or_default();
            match parse_content_range(range) {
                Some((start, total)) if start == *have => {
                    total.or(content_length.map(|l| start + l))
                }
                _ => {
                    restart(file, part, have, hasher)?;
                    return Err(Attempt::Retry(anyhow!(
                        "the server resumed at the wrong place ({range:?})"
                    )));
                }
            }
        } else {
            if *have > 0 {
                // The server ignored the Range header and sends the whole file.
                restart(file, part, have, hasher)?;
            }
            content_length
        };
        if let (Some(t), Some(want)) = (total, remote.size) {
            if t > want {
                restart(file, part, have, hasher)?;
                return Err(Attempt::Fatal(anyhow!(
                    "the server sends {} as {t} bytes but the Hub lists it as {want} bytes; the download was stopped and discarded. Run the command again later, or check HF_ENDPOINT",
                    remote.name
                )));
            }
        }
        let total = total.or(remote.size);
        if let Some(t) = total {
            bar.set_length(t);
        }
        let mut reader = response.into_reader();
        let mut buf = vec![0u8; 1 << 18];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Attempt::Retry(anyhow!("{e}"))),
            };
            // Never more than the listed size on disk, whatever the server's headers said.
            if remote.size.is_some_and(|want| *have + n as u64 > want) {
                restart(file, part, have, hasher)?;
                return Err(Attempt::Fatal(anyhow!(
                    "the server sent more of {} than the {} bytes the Hub lists; the download was stopped and discarded. Run the command again later, or check HF_ENDPOINT",
                    remote.name,
                    remote.size.unwrap_or_default()
                )));
            }
            file.write_all(&buf[..n])
                .map_err(|e| Attempt::Fatal(disk_error(e, part, "write the download")))?;
            hasher.update(&buf[..n]);
            *have += n as u64;
            bar.inc(n as u64);
        }
        match total {
            Some(t) if *have < t => Err(Attempt::Retry(anyhow!(
                "the connection closed after {} of {}",
                human_bytes(*have),
                human_bytes(t)
            ))),
            _ => Ok(*have),
        }
    }
}

fn restart(
    file: &mut File,
    part: &Path,
    have: &mut u64,
    hasher: &mut Sha256,
) -> Result<(), Attempt> {
    file.set_len(0)
        .map_err(|e| Attempt::Fatal(disk_error(e, part, "truncate the download file")))?;
    *have = 0;
    *hasher = Sha256::new();
    Ok(())
}

/// An exclusive lock on `blobs/{key}.lock` while one process downloads the blob; the file goes
/// when the lock does.
///
/// The holder deletes the file before it unlocks, so a waiter can wake holding the lock of a
/// file that no longer has a name while a third process locks a new file of that name: both
/// would append to one `.part`. A lock therefore counts only once the locked file is still the
/// one at the path; otherwise it is taken again.
struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    fn take(path: PathBuf, name: &str) -> Result<Lock> {
        let mut said = false;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| disk_error(e, &path, "create the download lock"))?;
            if file.try_lock().is_err() {
                if !said {
                    eprintln!(
                        "qwen-run: waiting for another process that is downloading {name} ..."
                    );
                    said = true;
                }
                file.lock()
                    .with_context(|| format!("cannot lock {}", path.display()))?;
            }
            if same_file(&file, &path) {
                return Ok(Lock { file, path });
            }
        }
    }
}

/// Whether `path` still names the open `file`.
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    // Windows does not delete a file that is open, so the name cannot have moved on.
    path.exists()
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// `bytes 100-199/1000` -> (100, Some(1000)); `bytes 100-199/*` -> (100, None).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let v = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = v.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

fn hash_prefix(path: &Path, len: u64, hasher: &mut Sha256) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = buf.len().min(left as usize);
        f.read_exact(&mut buf[..want])
            .with_context(|| format!("cannot read {}", path.display()))?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A blob name must be a plain file name (the Hub's are hex digests).
fn is_safe_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn progress_bar(name: &str, size: u64, have: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{wide_bar:.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    let short = name.rsplit('/').next().unwrap_or(name);
    let msg = if short.chars().count() > 32 {
        let tail: String = short
            .chars()
            .rev()
            .take(31)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    } else {
        short.to_string()
    };
    bar.set_message(msg);
    bar.set_position(have);
    bar.reset_eta();
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A clear message for a failed write to the cache: the disk full, or another I/O error.
pub(super) fn disk_error(e: std::io::Error, path: &Path, what: &str) -> anyhow::Error {
    if e.kind() == ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        anyhow!(
            "cannot {what}: the disk holding {} is full. Free some space, or set HF_HOME (or HF_HUB_CACHE) to a directory on a disk with room; a partial download is kept and resumes on the next run.",
            path.display()
        )
    } else {
        anyhow!("cannot {what} ({}): {e}", path.display())
    }
}

/// Refuses to start a download that cannot fit on the disk.
fn check_free_space(path: &Path, need: u64) -> Result<()> {
    let Some(free) = free_space(path.parent().unwrap_or(Path::new("."))) else {
        return Ok(());
    };
    if free < need {
        bail!(
            "not enough disk space for the download: it needs {} more but the disk holding {} has {} free. Free some space, or set HF_HOME (or HF_HUB_CACHE) to a directory on a disk with room.",
            human_bytes(need),
            path.parent().unwrap_or(path).display(),
            human_bytes(free)
        );
    }
    Ok(())
}

#[cfg(unix)]
#[allow(clippy::unnecessary_cast)]
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_space(_dir: &Path) -> Option<u64> {
    None
}
