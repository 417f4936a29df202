//! `--log-file FILE`: everything written to stderr also goes to FILE. Standard error is replaced
//! by a pipe whose reader copies each write to the terminal (or wherever stderr went) and to the
//! file, so every message, from any thread, reaches both without each caller knowing of the file.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::thread::JoinHandle;

/// Puts the original stderr back and waits for the copier when dropped.
pub struct StderrCopy {
    original: OwnedFd,
    copier: Option<JoinHandle<()>>,
}

pub fn start(path: &Path) -> Result<StderrCopy> {
    let mut file = File::create(path)
        .with_context(|| format!("--log-file: cannot create {}", path.display()))?;
    let original = std::io::stderr().as_fd().try_clone_to_owned()?;
    let mut console = File::from(original.try_clone()?);
    let (mut reader, writer) = std::io::pipe()?;
    // SAFETY: dup2 on two open descriptors; fd 2 is replaced atomically.
    if unsafe { libc::dup2(writer.as_raw_fd(), 2) } < 0 {
        return Err(std::io::Error::last_os_error()).context("--log-file: cannot redirect stderr");
    }
    drop(writer);
    let copier = std::thread::Builder::new()
        .name("log-file".into())
        .spawn(move || {
            let mut buf = [0u8; 8192];
            let mut file_ok = true;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let _ = console.write_all(&buf[..n]);
                // a full disk stops the copy, not the program or its stderr
                file_ok = file_ok && file.write_all(&buf[..n]).is_ok();
            }
        })?;
    Ok(StderrCopy {
        original,
        copier: Some(copier),
    })
}

impl Drop for StderrCopy {
    fn drop(&mut self) {
        // Closing the pipe's last writer (fd 2) ends the copier once it has copied everything.
        // SAFETY: as in `start`.
        unsafe { libc::dup2(self.original.as_raw_fd(), 2) };
        if let Some(c) = self.copier.take() {
            let _ = c.join();
        }
    }
}
