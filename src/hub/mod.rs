//! Models from the Hugging Face Hub: `-hf Qwen/Qwen2.5-7B-Instruct-GGUF:Q5_K_M`.
//!
//! [`resolve_model`] picks the GGUF file(s) of the quantization asked for from the repo listing
//! (every part of a split model), downloads them into the standard Hugging Face cache (hf-hub's
//! layout: `$HF_HOME/hub/models--{org}--{name}/blobs|snapshots|refs`, shared with the Python
//! `huggingface_hub` and other tools), and returns the local path of the model (its first part).
//! Downloads show a progress bar, resume after an interruption, and are checked against the size
//! and sha256 the Hub lists before they are used. A model already in the cache is used without
//! the network.
//!
//! Environment: `HF_TOKEN` (private and gated repos), `HF_ENDPOINT` (a mirror), `HF_HOME` /
//! `HF_HUB_CACHE` (where the cache is), `HF_HUB_OFFLINE=1` (never use the network).

mod download;
mod select;

pub use download::RemoteFile;
pub use select::{matches_quant, select_files, split_part, SelectError, DEFAULT_QUANT};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Hub, when `HF_ENDPOINT` does not name another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// What `-hf REPO[:QUANT]` and `--hf-file FILE` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    /// `org/name`
    pub repo: String,
    /// `Q5_K_M`, matched case-insensitively against the file names.
    pub quant: Option<String>,
    /// A file of the repo, which wins over `quant`.
    pub file: Option<String>,
}

impl HubSpec {
    /// Parses `org/name[:QUANT]` (and the optional `--hf-file`).
    pub fn parse(spec: &str, file: Option<&str>) -> Result<HubSpec> {
        let spec = spec.trim();
        let bare = spec
            .strip_prefix("https://huggingface.co/")
            .or_else(|| spec.strip_prefix("hf.co/"))
            .unwrap_or(spec);
        let (repo, quant) = match bare.split_once(':') {
            Some((r, q)) => (r.trim(), Some(q.trim())),
            None => (bare, None),
        };
        let repo = repo.trim_end_matches('/');
        let valid = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        match repo.split_once('/') {
            Some((org, name)) if valid(org) && valid(name) => {}
            _ => bail!(
                "'{spec}' is not a Hugging Face model repo: give it as ORG/NAME[:QUANT], e.g. -hf Qwen/Qwen2.5-7B-Instruct-GGUF:Q5_K_M"
            ),
        }
        if quant.is_some_and(str::is_empty) {
            bail!("'{spec}' ends in ':' but names no quantization: give it as ORG/NAME:QUANT, e.g. Qwen/Qwen2.5-7B-Instruct-GGUF:Q5_K_M");
        }
        let file = file.map(|f| f.trim().trim_start_matches('/').to_string());
        if let Some(f) = &file {
            if f.is_empty() || f.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                bail!("--hf-file '{f}' is not a file path inside a repo");
            }
        }
        Ok(HubSpec {
            repo: repo.to_string(),
            quant: quant.map(str::to_string),
            file,
        })
    }

    fn describe(&self) -> String {
        match (&self.file, &self.quant) {
            (Some(f), _) => format!("{} file {f}", self.repo),
            (None, Some(q)) => format!("{}:{q}", self.repo),
            (None, None) => self.repo.clone(),
        }
    }
}

/// Settings from the environment.
#[derive(Debug, Clone)]
pub struct HubEnv {
    pub endpoint: String,
    /// The `hub` directory that holds `models--org--name`.
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// Accept files the listing gives no size and sha256 for (`--hf-no-verify`).
    pub no_verify: bool,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubEnv {
    pub fn from_env() -> Result<HubEnv> {
        let hf_home = env_nonempty("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache = env_nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env_nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("huggingface"))
        });
        let cache_dir = match env_nonempty("HF_HUB_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => hf_home
                .as_ref()
                .map(|h| h.join("hub"))
                .context("cannot tell where the Hugging Face cache is: set HF_HOME (or HF_HUB_CACHE) to a directory")?,
        };
        let token = env_nonempty("HF_TOKEN")
            .or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                env_nonempty("HF_TOKEN_PATH")
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            })
            // hf-hub reads `$HF_HOME/token`, where `huggingface-cli login` puts it.
            .or_else(|| {
                hf_home
                    .as_ref()
                    .and_then(|h| Cache::new(h.join("hub")).token())
            });
        let endpoint = env_nonempty("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        Ok(HubEnv {
            endpoint,
            cache_dir,
            token,
            offline,
            no_verify: false,
        })
    }
}

/// The local path of the model that `-hf spec` (and `--hf-file`) asks for: from the cache when it
/// is there, otherwise downloaded and verified first. `no_verify` accepts a file that the Hub
/// lists without a size and sha256.
pub fn resolve_model(spec: &str, file: Option<&str>, no_verify: bool) -> Result<PathBuf> {
    let spec = HubSpec::parse(spec, file)?;
    let env = HubEnv {
        no_verify,
        ..HubEnv::from_env()?
    };
    resolve(&spec, &env)
}

/// [`resolve_model`] with the settings given.
pub fn resolve(spec: &HubSpec, env: &HubEnv) -> Result<PathBuf> {
    let repo = Repo::new(spec.repo.clone(), RepoType::Model);
    let repo_dir = env.cache_dir.join(repo.folder_name());

    // 1. The cache, without the network.
    let cached = cached_files(&repo_dir, repo.revision());
    if let Some((snapshot, names)) = &cached {
        let from_cache = match (&spec.file, &spec.quant) {
            (None, None) if env.offline => select_files(names, None, None),
            // Without a quantization, only the default one is sure to be what the Hub would
            // pick; anything else asks the Hub.
            (None, None) => select_files(names, Some(DEFAULT_QUANT), None),
            _ => select_files(names, spec.quant.as_deref(), spec.file.as_deref()),
        };
        if let Ok(files) = from_cache {
            let path = snapshot.join(&files[0]);
            eprintln!(
                "qwen-run: using {} {} from the Hugging Face cache ({})",
                spec.repo,
                files[0],
                path.display()
            );
            return Ok(path);
        }
    }
    if env.offline {
        let mut msg = format!(
            "{} is not in the Hugging Face cache at {}, and HF_HUB_OFFLINE is set, so it cannot be downloaded. Run the command once without HF_HUB_OFFLINE (with network access) to download it into the cache",
            spec.describe(),
            env.cache_dir.display()
        );
        if let Some((_, names)) = &cached {
            let ggufs: Vec<&str> = names
                .iter()
                .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
                .map(String::as_str)
                .collect();
            if !ggufs.is_empty() {
                msg += &format!(
                    "; the cache holds these GGUF files of {}: {}",
                    spec.repo,
                    ggufs.join(", ")
                );
            }
        }
        bail!("{msg}.");
    }

    // 2. The Hub.
    let (commit, remote) = list_repo(env, &spec.repo)?;
    let names: Vec<String> = remote.iter().map(|f| f.name.clone()).collect();
    let files = select_files(&names, spec.quant.as_deref(), spec.file.as_deref()).map_err(|e| {
        anyhow!(
            "cannot pick a model from {} on {}: {e}.",
            spec.repo,
            env.endpoint
        )
    })?;
    let agent = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .user_agent(&format!(
            "qwen-run/{}; hf-hub/0.4",
            env!("CARGO_PKG_VERSION")
        ))
        .build();
    let dl = download::Download {
        env,
        agent: &agent,
        repo_id: &spec.repo,
        repo_dir: &repo_dir,
        commit: &commit,
    };
    let at_commit = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_progress(false)
        .build()
        .context("cannot set up the Hugging Face Hub client")?
        .repo(Repo::with_revision(
            spec.repo.clone(),
            RepoType::Model,
            commit.clone(),
        ));
    let mut first = None;
    for name in &files {
        let file = remote
            .iter()
            .find(|f| f.name == *name)
            .expect("selected from the listing");
        let path = dl.fetch(file, &at_commit.url(name))?;
        first.get_or_insert(path);
    }
    // Only once every part is there does `refs/main` lead to them.
    Cache::new(env.cache_dir.clone())
        .repo(repo)
        .create_ref(&commit)
        .map_err(|e| download::disk_error(e, &repo_dir, "write the cache's refs/main"))?;
    Ok(first.expect("at least one file selected"))
}

/// The snapshot that `refs/{revision}` points at and the files in it (relative paths, `/`).
fn cached_files(repo_dir: &Path, revision: &str) -> Option<(PathBuf, Vec<String>)> {
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let commit = commit.trim();
    if !is_commit_id(commit) {
        return None;
    }
    let snapshot = repo_dir.join("snapshots").join(commit);
    let mut names = Vec::new();
    walk(&snapshot, "", &mut names);
    names.sort();
    Some((snapshot, names))
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let path = entry.path();
        let rel = format!("{prefix}{name}");
        if path.is_dir() {
            walk(&path, &format!("{rel}/"), out);
        } else if path.is_file() {
            // `is_file` follows the link: a dangling one (blob gone) does not count.
            out.push(rel);
        }
    }
}

/// The repo's commit and files, from `GET /api/models/{repo}/revision/main?blobs=true`.
fn list_repo(env: &HubEnv, repo_id: &str) -> Result<(String, Vec<RemoteFile>)> {
    let api = ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(false)
        .with_user_agent("qwen-run", env!("CARGO_PKG_VERSION"))
        .build()
        .context("cannot set up the Hugging Face Hub client")?;
    let response = match api
        .model(repo_id.to_string())
        .info_request()
        .query("blobs", "true")
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(status_error(env, repo_id, None, code, &r))
        }
        Err(ureq::Error::Transport(t)) => return Err(network_error(env, &t)),
    };
    let json: serde_json::Value = response.into_json().map_err(|e| {
        anyhow!(
            "the Hub at {} sent an unreadable description of {repo_id} ({e}); is HF_ENDPOINT a Hugging Face Hub?",
            env.endpoint
        )
    })?;
    let commit = match json.get("sha").and_then(|s| s.as_str()) {
        Some(c) if is_commit_id(c) => c.to_string(),
        Some(c) => bail!(
            "the Hub at {} sent {:?} as the commit id of {repo_id}, which is not a git commit hash (40 or 64 hex digits); refusing to use the listing. Is HF_ENDPOINT a Hugging Face Hub you trust?",
            env.endpoint,
            c.chars().take(80).collect::<String>()
        ),
        None => bail!(
            "the Hub at {} sent no commit id for {repo_id}; is HF_ENDPOINT a Hugging Face Hub?",
            env.endpoint
        ),
    };
    let siblings = json
        .get("siblings")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    let files = siblings
        .iter()
        .filter_map(|s| {
            let name = s.get("rfilename")?.as_str()?.to_string();
            let lfs = s.get("lfs");
            Some(RemoteFile {
                size: lfs
                    .and_then(|l| l.get("size"))
                    .or_else(|| s.get("size"))
                    .and_then(|v| v.as_u64()),
                sha256: lfs
                    .and_then(|l| l.get("sha256"))
                    .and_then(|v| v.as_str())
                    .map(|v| v.to_ascii_lowercase()),
                blob_id: s.get("blobId").and_then(|v| v.as_str()).map(str::to_string),
                name,
            })
        })
        .collect::<Vec<RemoteFile>>();
    // The names become paths in the cache: one that climbs out of it must never get that far.
    if let Some(bad) = files.iter().find(|f| !is_safe_file_name(&f.name)) {
        bail!(
            "the Hub at {} lists a file of {repo_id} named {:?}, which is not a plain relative path (it is empty, absolute, or holds '..', a backslash or a control character); refusing the listing. Is HF_ENDPOINT a Hugging Face Hub you trust?",
            env.endpoint,
            bad.name.chars().take(200).collect::<String>()
        );
    }
    Ok((commit, files))
}

/// A git commit hash: 40 (SHA-1) or 64 (SHA-256) hex digits.
pub fn is_commit_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A repo file name that is safe to join to a directory: `/`-separated components, none empty,
/// `.` or `..`, no backslash or colon (a separator and a drive on Windows), no control
/// characters, not absolute.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && !name.contains('\\')
        && !name.chars().any(char::is_control)
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains(':'))
}

fn network_error(env: &HubEnv, t: &ureq::Transport) -> anyhow::Error {
    anyhow!(
        "cannot reach the Hugging Face Hub at {} ({t}). Check the network connection and proxy settings (HTTPS_PROXY), or set HF_HUB_OFFLINE=1 to use only models already in the cache.",
        env.endpoint
    )
}

/// One clear paragraph for an HTTP error answer of the Hub.
fn status_error(
    env: &HubEnv,
    repo_id: &str,
    file: Option<&str>,
    code: u16,
    response: &ureq::Response,
) -> anyhow::Error {
    let error_code = response.header("X-Error-Code").unwrap_or_default();
    let page = format!("{}/{repo_id}", env.endpoint);
    let token_hint = if env.token.is_some() {
        "The HF_TOKEN given was not accepted for it: check that it is valid and that its account has access"
    } else {
        "No token was given: set HF_TOKEN to a Hugging Face access token (https://huggingface.co/settings/tokens) of an account that can read it"
    };
    let what = match file {
        Some(f) => format!("{f} in {repo_id}"),
        None => repo_id.to_string(),
    };
    if error_code.eq_ignore_ascii_case("GatedRepo") {
        return anyhow!(
            "{repo_id} is a gated model (HTTP {code}): accept its terms at {page} while logged in, then set HF_TOKEN to an access token of that account (https://huggingface.co/settings/tokens)."
        );
    }
    if error_code.eq_ignore_ascii_case("RepoNotFound") || (code == 404 && file.is_none()) {
        return anyhow!(
            "the model repository {repo_id} was not found on {} (HTTP {code}). Check the name, which is case-sensitive (e.g. Qwen/Qwen2.5-7B-Instruct-GGUF); if the repository is private, set HF_TOKEN to an access token that can read it.",
            env.endpoint
        );
    }
    match code {
        401 | 403 => anyhow!(
            "access to {what} on {} was refused (HTTP {code}): the repository is private or gated, or does not exist. {token_hint}.",
            env.endpoint
        ),
        404 => anyhow!(
            "{what} was not found on {} (HTTP 404); it may have been removed or renamed since the listing. Run the command again.",
            env.endpoint
        ),
        429 => anyhow!(
            "the Hub at {} is rate-limiting requests (HTTP 429); wait a minute and run the command again{}.",
            env.endpoint,
            if env.token.is_some() { "" } else { ", or set HF_TOKEN, which raises the limit" }
        ),
        _ => anyhow!(
            "the Hub at {} answered HTTP {code} ({}) for {what}; try again later.",
            env.endpoint,
            response.status_text()
        ),
    }
}

/// `1536` -> `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
