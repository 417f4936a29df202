//! `-hf REPO[:QUANT]`: downloads from a mock Hugging Face Hub on 127.0.0.1 (set through
//! HF_ENDPOINT, with HF_HOME in a temp dir), driven through the real binary.

mod common;

use qwen_run::cli::expand_llama_flags;
use qwen_run::hub::{select_files, split_part, HubSpec, SelectError};
use qwen_run_kernels::QuantType;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// The mock Hub: the repo API and `/{repo}/resolve/{revision}/{file}`, with the headers the Hub
// sends (x-repo-commit, etag/x-linked-etag, content-range, content-length).

#[derive(Clone)]
struct MockFile {
    name: String,
    data: Arc<Vec<u8>>,
    /// What the listing says the sha256 is (the real one unless a test lies).
    listed_sha256: String,
    lfs: bool,
    /// What the listing says the size is, when a test lies.
    listed_size: Option<usize>,
}

impl MockFile {
    fn lfs(name: &str, data: Vec<u8>) -> MockFile {
        let sha = hex_sha256(&data);
        MockFile {
            name: name.into(),
            data: Arc::new(data),
            listed_sha256: sha,
            lfs: true,
            listed_size: None,
        }
    }
    fn small(name: &str, data: &[u8]) -> MockFile {
        MockFile {
            lfs: false,
            ..MockFile::lfs(name, data.to_vec())
        }
    }
}

struct MockRepo {
    id: String,
    commit: String,
    files: Vec<MockFile>,
    /// A bearer token the repo wants (a private repo).
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: Vec<MockRepo>,
    /// File name -> how many more transfers of it break off halfway.
    cuts: HashMap<String, usize>,
    /// Pause after each 64 KiB sent (to show the progress bar).
    throttle: Option<Duration>,
    /// "GET /path range=... auth=..." for every request.
    log: Vec<String>,
    /// Send files without a Content-Length, until the connection closes.
    no_length: bool,
}

struct MockHub {
    url: String,
    state: Arc<Mutex<State>>,
}

impl MockHub {
    fn start(repos: Vec<MockRepo>) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &st);
                });
            }
        });
        MockHub { url, state }
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    fn set_cuts(&self, file: &str, n: usize) {
        self.state.lock().unwrap().cuts.insert(file.into(), n);
    }
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default().to_string();
    let range = headers.get("range").cloned();
    let auth = headers.get("authorization").cloned();
    let mut st = state.lock().unwrap();
    st.log.push(format!(
        "{method} {target} range={} auth={}",
        range.as_deref().unwrap_or("-"),
        auth.as_deref().unwrap_or("-")
    ));
    let not_found = |stream: &mut TcpStream| {
        respond(
            stream,
            404,
            "Not Found",
            &[("X-Error-Code", "RepoNotFound".into())],
            br#"{"error":"Repository not found"}"#,
        )
    };
    let authorized = |repo: &MockRepo| match &repo.token {
        None => true,
        Some(t) => auth.as_deref() == Some(&format!("Bearer {t}")),
    };

    // GET /api/models/{org}/{name}/revision/{rev}?blobs=true
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let segs: Vec<&str> = rest.split('/').collect();
        if segs.len() != 4 || segs[2] != "revision" {
            return not_found(&mut stream);
        }
        let id = format!("{}/{}", segs[0], segs[1]);
        let Some(repo) = st.repos.iter().find(|r| r.id == id) else {
            return not_found(&mut stream);
        };
        if !authorized(repo) {
            return respond(
                &mut stream,
                401,
                "Unauthorized",
                &[],
                br#"{"error":"Invalid credentials in Authorization header"}"#,
            );
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| {
                let size = f.listed_size.unwrap_or(f.data.len());
                let mut s = serde_json::json!({
                    "rfilename": f.name,
                    "blobId": &f.listed_sha256[..40],
                    "size": size,
                });
                if f.lfs {
                    s["lfs"] = serde_json::json!({
                        "sha256": f.listed_sha256,
                        "size": size,
                        "pointerSize": 134,
                    });
                }
                s
            })
            .collect();
        let body = serde_json::json!({
            "_id": "0123",
            "id": repo.id,
            "sha": repo.commit,
            "private": repo.token.is_some(),
            "siblings": siblings,
        });
        return respond(
            &mut stream,
            200,
            "OK",
            &[("Content-Type", "application/json".into())],
            body.to_string().as_bytes(),
        );
    }

    // GET /{org}/{name}/resolve/{rev}/{file}
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() != 5 || segs[2] != "resolve" {
        return not_found(&mut stream);
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let Some(repo) = st.repos.iter().find(|r| r.id == id) else {
        return not_found(&mut stream);
    };
    if !authorized(repo) {
        return respond(&mut stream, 401, "Unauthorized", &[], b"");
    }
    if segs[3] != repo.commit && segs[3] != "main" {
        return respond(
            &mut stream,
            404,
            "Not Found",
            &[("X-Error-Code", "RevisionNotFound".into())],
            b"",
        );
    }
    let Some(file) = repo.files.iter().find(|f| f.name == segs[4]).cloned() else {
        return respond(
            &mut stream,
            404,
            "Not Found",
            &[("X-Error-Code", "EntryNotFound".into())],
            b"",
        );
    };
    let commit = repo.commit.clone();
    let len = file.data.len();
    let (start, end) = match range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
    {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().map(|b: usize| b + 1).unwrap_or(len).min(len);
            if a >= len {
                return respond(
                    &mut stream,
                    416,
                    "Range Not Satisfiable",
                    &[("Content-Range", format!("bytes */{len}"))],
                    b"",
                );
            }
            (a, b)
        }
        None => (0, len),
    };
    let cut = match st.cuts.get_mut(&file.name) {
        Some(n) if *n > 0 && method == "GET" && end - start > 1 => {
            *n -= 1;
            true
        }
        _ => false,
    };
    let throttle = st.throttle;
    let no_length = st.no_length;
    drop(st);
    let etag = format!("\"{}\"", hex_sha256(&file.data));
    let mut hdrs = vec![
        ("X-Repo-Commit", commit),
        ("ETag", etag.clone()),
        ("Accept-Ranges", "bytes".to_string()),
        ("Content-Type", "application/octet-stream".to_string()),
    ];
    if file.lfs {
        hdrs.push(("X-Linked-Etag", etag));
        hdrs.push(("X-Linked-Size", len.to_string()));
    }
    let (code, reason) = if range.is_some() {
        hdrs.push(("Content-Range", format!("bytes {start}-{}/{len}", end - 1)));
        (206, "Partial Content")
    } else {
        (200, "OK")
    };
    let body = &file.data[start..end];
    let mut head = format!("HTTP/1.1 {code} {reason}\r\nConnection: close\r\n");
    if !no_length {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    for (k, v) in &hdrs {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())?;
    let send = if cut { body.len() / 2 } else { body.len() };
    for chunk in body[..send].chunks(64 * 1024) {
        stream.write_all(chunk)?;
        if let Some(t) = throttle {
            std::thread::sleep(t);
        }
    }
    stream.flush()?;
    if cut {
        // Break the connection off mid-file.
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fixtures and running the binary.

fn tiny_model_bytes(ty: QuantType) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::read(common::write_tiny_model(dir.path(), ty)).unwrap()
}

fn split_model_files(stem: &str, n: usize) -> Vec<MockFile> {
    let dir = tempfile::tempdir().unwrap();
    let paths = common::tiny_model_writer(QuantType::Q8_0)
        .write_split(dir.path(), stem, n)
        .unwrap();
    paths
        .iter()
        .map(|p| {
            MockFile::lfs(
                p.file_name().unwrap().to_str().unwrap(),
                std::fs::read(p).unwrap(),
            )
        })
        .collect()
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn tiny_repo(id: &str) -> MockRepo {
    MockRepo {
        id: id.into(),
        commit: COMMIT.into(),
        files: vec![
            MockFile::small(
                ".gitattributes",
                b"*.gguf filter=lfs diff=lfs merge=lfs -text\n",
            ),
            MockFile::small("README.md", b"# tiny test model\n"),
            MockFile::lfs("tiny-q8_0.gguf", tiny_model_bytes(QuantType::Q8_0)),
            MockFile::lfs("tiny-q4_0.gguf", tiny_model_bytes(QuantType::Q4_0)),
        ],
        token: None,
    }
}

struct Env {
    home: tempfile::TempDir,
    endpoint: String,
    vars: Vec<(String, String)>,
}

impl Env {
    fn new(endpoint: &str) -> Env {
        Env {
            home: tempfile::tempdir().unwrap(),
            endpoint: endpoint.into(),
            vars: Vec::new(),
        }
    }

    fn var(mut self, k: &str, v: &str) -> Env {
        self.vars.push((k.into(), v.into()));
        self
    }

    fn repo_dir(&self, id: &str) -> PathBuf {
        self.home
            .path()
            .join("hub")
            .join(format!("models--{}", id.replace('/', "--")))
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "panic: {stderr}"
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-run"));
        for k in [
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_OFFLINE",
            "HF_HUB_CACHE",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("HF_HOME", self.home.path())
            .env("XDG_CACHE_HOME", self.home.path().join("xdg"))
            .env("HF_ENDPOINT", &self.endpoint);
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd.args(args).args(["--no-prompt-cache", "-t", "1"]);
        cmd
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, _, stderr) = self.run(args);
        assert_eq!(code, 0, "{args:?} failed: {stderr}");
        stderr
    }

    fn fails(&self, args: &[&str], needles: &[&str]) -> String {
        let (code, _, stderr) = self.run(args);
        assert_eq!(code, 1, "exit code of {args:?}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: expected {n:?} in: {stderr}");
        }
        assert_eq!(
            stderr
                .trim()
                .lines()
                .filter(|l| l.starts_with("error:"))
                .count(),
            1,
            "one error paragraph: {stderr}"
        );
        stderr
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(d: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn closed_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

// ---------------------------------------------------------------------------------------------
// A hostile or broken Hub: nothing it lists or sends may write outside the cache, more than it
// listed, or an unverified file without consent.

fn resolve_requests(hub: &MockHub) -> Vec<String> {
    hub.log()
        .into_iter()
        .filter(|l| l.contains("/resolve/"))
        .collect()
}

#[test]
fn listing_names_that_leave_the_cache_are_refused() {
    for bad in [
        "../../../x-Q4_K_M.gguf",
        "/tmp/x-Q4_K_M.gguf",
        "a\\..\\..\\x-Q4_K_M.gguf",
        "x\n-Q4_K_M.gguf",
        "a//x-Q4_K_M.gguf",
        "./x-Q4_K_M.gguf",
        "C:x-Q4_K_M.gguf",
    ] {
        let mut repo = tiny_repo("test/Evil-GGUF");
        repo.files
            .push(MockFile::lfs(bad, tiny_model_bytes(QuantType::Q8_0)));
        let hub = MockHub::start(vec![repo]);
        let env = Env::new(&hub.url);
        env.fails(
            &["-hf", "test/Evil-GGUF:Q4_K_M", "-p", "hi", "-n", "1"],
            &[
                "lists a file of test/Evil-GGUF named",
                "not a plain relative path",
                "refusing",
            ],
        );
        assert_eq!(resolve_requests(&hub), Vec::<String>::new(), "{bad:?}");
        let written: Vec<String> = files_under(env.home.path())
            .into_iter()
            .filter(|f| f.contains("x-Q4_K_M"))
            .collect();
        assert_eq!(written, Vec::<String>::new(), "{bad:?}");
    }
}

#[test]
fn a_commit_id_that_is_not_a_hash_is_refused() {
    for bad in [
        "abc",
        "../../../../tmp",
        "0123456789abcdef0123456789abcdef0123456g",
    ] {
        let mut repo = tiny_repo("test/Odd-GGUF");
        repo.commit = bad.into();
        let hub = MockHub::start(vec![repo]);
        let env = Env::new(&hub.url);
        env.fails(
            &["-hf", "test/Odd-GGUF:Q8_0", "-p", "hi", "-n", "1"],
            &["test/Odd-GGUF", "not a git commit hash"],
        );
        assert_eq!(resolve_requests(&hub), Vec::<String>::new(), "{bad:?}");
    }
}

#[test]
fn a_download_never_writes_more_than_the_listed_size() {
    let mut repo = tiny_repo("test/Big-GGUF");
    let listed = repo.files[2].data.len() - 1000;
    repo.files[2].listed_size = Some(listed);
    let hub = MockHub::start(vec![repo]);
    let env = Env::new(&hub.url);
    let args = ["-hf", "test/Big-GGUF:Q8_0", "-p", "hi", "-n", "1"];
    let too_big = |env: &Env| {
        for f in files_under(&env.repo_dir("test/Big-GGUF")) {
            let len = std::fs::metadata(env.repo_dir("test/Big-GGUF").join(&f))
                .unwrap()
                .len();
            assert!(len as usize <= listed, "{f} holds {len} bytes");
        }
    };
    // The server says how much it sends.
    env.fails(
        &args,
        &[
            "tiny-q8_0.gguf",
            &format!("lists it as {listed} bytes"),
            "stopped",
        ],
    );
    too_big(&env);
    // It does not, and sends more.
    hub.state.lock().unwrap().no_length = true;
    env.fails(
        &args,
        &[
            "sent more of tiny-q8_0.gguf than",
            &format!("{listed} bytes"),
            "stopped",
        ],
    );
    too_big(&env);
}

#[test]
fn a_file_without_size_and_sha256_needs_hf_no_verify() {
    let mut repo = tiny_repo("test/Plain-GGUF");
    // Not an LFS file: the listing has its size but no sha256.
    repo.files[2].lfs = false;
    let hub = MockHub::start(vec![repo]);
    let env = Env::new(&hub.url);
    env.fails(
        &["-hf", "test/Plain-GGUF:Q8_0", "-p", "hi", "-n", "1"],
        &[
            "tiny-q8_0.gguf",
            "without a sha256",
            "could not be verified",
            "--hf-no-verify",
        ],
    );
    assert_eq!(resolve_requests(&hub), Vec::<String>::new());
    let stderr = env.ok(&[
        "-hf",
        "test/Plain-GGUF:Q8_0",
        "--hf-no-verify",
        "-p",
        "hi",
        "-n",
        "1",
    ]);
    assert!(stderr.contains("downloading tiny-q8_0.gguf"), "{stderr}");
    assert!(!stderr.contains("sha256 verified"), "{stderr}");
}

/// The lock's holder deletes the lock file, then unlocks. A process that was waiting wakes
/// holding the lock of a file that no longer has a name, while a third has locked a new file
/// of that name: the waiter must wait for the third, not append to the same `.part`.
#[test]
fn a_waiting_download_never_shares_the_part_file() {
    let repo = tiny_repo("test/Race-GGUF");
    let sha = repo.files[2].listed_sha256.clone();
    let hub = MockHub::start(vec![repo]);
    let env = Env::new(&hub.url);
    let blobs = env.repo_dir("test/Race-GGUF").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let lock_path = blobs.join(format!("{sha}.lock"));
    let first = std::fs::File::create(&lock_path).unwrap();
    first.lock().unwrap();

    let mut waiter = env
        .command(&["-hf", "test/Race-GGUF:Q8_0", "-p", "hi", "-n", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let said = Arc::new(Mutex::new(String::new()));
    let mut pipe = waiter.stderr.take().unwrap();
    let into = said.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let t0 = std::time::Instant::now();
    while !said.lock().unwrap().contains("waiting for another process") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{}",
            said.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The first holder lets go as the lock's Drop does; a third process has taken the name.
    std::fs::remove_file(&lock_path).unwrap();
    let third = std::fs::File::create(&lock_path).unwrap();
    third.lock().unwrap();
    first.unlock().unwrap();
    drop(first);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        resolve_requests(&hub),
        Vec::<String>::new(),
        "the waiter downloads while another process holds the lock"
    );

    std::fs::remove_file(&lock_path).unwrap();
    third.unlock().unwrap();
    drop(third);
    let status = waiter.wait().unwrap();
    reader.join().unwrap();
    let said = said.lock().unwrap().clone();
    assert!(status.success(), "{said}");
    assert!(!said.contains("panicked"), "{said}");
    assert_eq!(resolve_requests(&hub).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// End to end.

#[test]
fn download_run_then_cache_then_offline() {
    let repo = tiny_repo("test/Tiny-GGUF");
    let q8 = repo.files[2].clone();
    let hub = MockHub::start(vec![repo]);
    let env = Env::new(&hub.url);

    // llama.cpp's two-letter `-hf`, lower-case quantization.
    let stderr = env.ok(&["-hf", "test/Tiny-GGUF:q8_0", "-p", "hi", "-n", "4"]);
    assert!(stderr.contains("downloading tiny-q8_0.gguf"), "{stderr}");
    assert!(stderr.contains("size and sha256 verified"), "{stderr}");
    let log = hub.log();
    assert!(
        log[0].starts_with("GET /api/models/test/Tiny-GGUF/revision/main?blobs=true"),
        "{log:?}"
    );
    assert_eq!(log.len(), 2, "one listing and one file: {log:?}");
    assert!(
        log[1].starts_with(&format!(
            "GET /test/Tiny-GGUF/resolve/{COMMIT}/tiny-q8_0.gguf"
        )),
        "{log:?}"
    );

    // hf-hub's cache layout, the blob named by its sha256.
    let dir = env.repo_dir("test/Tiny-GGUF");
    assert_eq!(
        files_under(&dir),
        vec![
            format!("blobs/{}", q8.listed_sha256),
            "refs/main".to_string(),
            format!("snapshots/{COMMIT}/tiny-q8_0.gguf"),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let link = dir.join(format!("snapshots/{COMMIT}/tiny-q8_0.gguf"));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&link).unwrap(), *q8.data);

    // Again: from the cache, no request at all.
    let stderr = env.ok(&["--hf-repo", "test/Tiny-GGUF:Q8_0", "-p", "hi", "-n", "4"]);
    assert!(stderr.contains("from the Hugging Face cache"), "{stderr}");
    assert_eq!(hub.log().len(), 2, "{:?}", hub.log());

    // Offline, with the Hub gone: the cache serves it, also through --hf-file.
    let offline = Env {
        home: env.home,
        endpoint: closed_port_url(),
        vars: vec![("HF_HUB_OFFLINE".into(), "1".into())],
    };
    offline.ok(&["-hf", "test/Tiny-GGUF:Q8_0", "-p", "hi", "-n", "4"]);
    offline.ok(&[
        "--hf",
        "test/Tiny-GGUF",
        "-hff",
        "tiny-q8_0.gguf",
        "-p",
        "hi",
        "-n",
        "4",
    ]);
    // Offline, what the cache lacks is a clear error.
    offline.fails(
        &["-hf", "test/Tiny-GGUF:Q4_0", "-p", "hi", "-n", "4"],
        &[
            "test/Tiny-GGUF:Q4_0",
            "not in the Hugging Face cache",
            "HF_HUB_OFFLINE",
            "tiny-q8_0.gguf",
        ],
    );
}

#[test]
fn split_model_downloads_every_part() {
    let mut files = split_model_files("Tiny-Split-Q8_0", 3);
    files.push(MockFile::lfs("Tiny-Split-Q4_K_M.gguf", vec![7u8; 1000]));
    let hub = MockHub::start(vec![MockRepo {
        id: "test/Split-GGUF".into(),
        commit: COMMIT.into(),
        files,
        token: None,
    }]);
    let env = Env::new(&hub.url);
    env.ok(&["-hf", "test/Split-GGUF:Q8_0", "-p", "hi", "-n", "4"]);
    let got: Vec<String> = hub
        .log()
        .iter()
        .skip(1)
        .map(|l| l.split(' ').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        (1..=3)
            .map(|i| format!(
                "/test/Split-GGUF/resolve/{COMMIT}/Tiny-Split-Q8_0-{i:05}-of-00003.gguf"
            ))
            .collect::<Vec<_>>()
    );
    let snap = env
        .repo_dir("test/Split-GGUF")
        .join("snapshots")
        .join(COMMIT);
    assert_eq!(files_under(&snap).len(), 3);
    // Second run: all from the cache.
    env.ok(&["-hf", "test/Split-GGUF:q8_0", "-p", "hi", "-n", "4"]);
    assert_eq!(hub.log().len(), 4);
}

#[test]
fn interrupted_download_resumes() {
    let repo = tiny_repo("test/Flaky-GGUF");
    let q8 = repo.files[2].clone();
    let hub = MockHub::start(vec![repo]);
    let env = Env::new(&hub.url);
    // Every try of the first run breaks off halfway: it fails, keeping the part.
    hub.set_cuts("tiny-q8_0.gguf", 3);
    env.fails(
        &["-hf", "test/Flaky-GGUF:Q8_0", "-p", "hi", "-n", "4"],
        &["tiny-q8_0.gguf", "failed after", "next run resumes"],
    );
    let blobs = env.repo_dir("test/Flaky-GGUF").join("blobs");
    let part = blobs.join(format!("{}.part", q8.listed_sha256));
    let have = std::fs::metadata(&part).unwrap().len() as usize;
    assert!(have > 0 && have < q8.data.len(), "{have}");
    assert_eq!(std::fs::read(&part).unwrap(), q8.data[..have]);
    assert!(!blobs.join(&q8.listed_sha256).exists());
    assert!(!env.repo_dir("test/Flaky-GGUF").join("snapshots").exists());
    assert!(!env.repo_dir("test/Flaky-GGUF").join("refs").exists());
    // The retries inside that run resumed where the last one stopped.
    let ranges: Vec<String> = hub
        .log()
        .iter()
        .filter(|l| l.contains("/resolve/"))
        .map(|l| {
            l.split(" range=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[0], "-");
    assert!(
        ranges[1].starts_with("bytes=") && ranges[1] != "bytes=0-",
        "{ranges:?}"
    );

    // The second run resumes from the part (one more break is retried) and verifies the whole.
    hub.set_cuts("tiny-q8_0.gguf", 1);
    let stderr = env.ok(&["-hf", "test/Flaky-GGUF:Q8_0", "-p", "hi", "-n", "4"]);
    assert!(stderr.contains("resuming the download"), "{stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    assert!(stderr.contains("size and sha256 verified"), "{stderr}");
    let log = hub.log();
    let resumed = log.iter().rev().find(|l| l.contains("/resolve/")).unwrap();
    assert!(resumed.contains("range=bytes="), "{log:?}");
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("range=bytes={have}-"))),
        "{log:?}"
    );
    assert_eq!(
        std::fs::read(blobs.join(&q8.listed_sha256)).unwrap(),
        *q8.data
    );
    assert!(!part.exists());
}

#[test]
fn corrupt_download_is_never_used() {
    let mut repo = tiny_repo("test/Bad-GGUF");
    repo.files[2].listed_sha256 = "ab".repeat(32);
    let hub = MockHub::start(vec![repo]);
    let env = Env::new(&hub.url);
    env.fails(
        &["-hf", "test/Bad-GGUF:Q8_0", "-p", "hi", "-n", "4"],
        &["tiny-q8_0.gguf", "corrupt", "sha256", "deleted"],
    );
    let dir = env.repo_dir("test/Bad-GGUF");
    assert_eq!(files_under(&dir), Vec::<String>::new(), "nothing kept");
}

#[test]
fn unknown_repo_is_a_clear_error() {
    let hub = MockHub::start(vec![tiny_repo("test/Tiny-GGUF")]);
    let env = Env::new(&hub.url);
    env.fails(
        &["-hf", "test/No-Such-Repo:Q8_0", "-p", "hi", "-n", "4"],
        &[
            "test/No-Such-Repo",
            "was not found",
            "404",
            "case-sensitive",
        ],
    );
}

#[test]
fn private_repo_needs_hf_token() {
    let mut repo = tiny_repo("test/Private-GGUF");
    repo.token = Some("hf_secret".into());
    let hub = MockHub::start(vec![repo]);
    let args = ["-hf", "test/Private-GGUF:Q8_0", "-p", "hi", "-n", "4"];
    Env::new(&hub.url).fails(&args, &["test/Private-GGUF", "401", "set HF_TOKEN"]);
    Env::new(&hub.url)
        .var("HF_TOKEN", "hf_wrong")
        .fails(&args, &["401", "HF_TOKEN given was not accepted"]);
    Env::new(&hub.url).var("HF_TOKEN", "hf_secret").ok(&args);
    let log = hub.log();
    let file = log.iter().find(|l| l.contains("/resolve/")).unwrap();
    assert!(file.contains("auth=Bearer hf_secret"), "{log:?}");
}

#[test]
fn no_matching_quant_lists_the_ggufs() {
    let hub = MockHub::start(vec![tiny_repo("test/Tiny-GGUF")]);
    let env = Env::new(&hub.url);
    env.fails(
        &["-hf", "test/Tiny-GGUF:Q5_K_M", "-p", "hi", "-n", "4"],
        &["Q5_K_M", "tiny-q8_0.gguf", "tiny-q4_0.gguf", "--hf-file"],
    );
    env.fails(
        &[
            "--hf-repo",
            "test/Tiny-GGUF",
            "--hf-file",
            "nope.gguf",
            "-p",
            "hi",
        ],
        &["nope.gguf", "tiny-q8_0.gguf"],
    );
    // No quantization, no Q4_K_M, two models: which one must be said.
    env.fails(
        &["-hf", "test/Tiny-GGUF", "-p", "hi"],
        &["Q4_K_M", "tiny-q8_0.gguf", "tiny-q4_0.gguf"],
    );
    assert_eq!(
        hub.log().iter().filter(|l| l.contains("/resolve/")).count(),
        0
    );
}

#[test]
fn offline_without_cache_and_network_failure() {
    let hub = MockHub::start(vec![tiny_repo("test/Tiny-GGUF")]);
    Env::new(&hub.url).var("HF_HUB_OFFLINE", "1").fails(
        &["-hf", "test/Tiny-GGUF:Q8_0", "-p", "hi"],
        &[
            "not in the Hugging Face cache",
            "HF_HUB_OFFLINE",
            "without HF_HUB_OFFLINE",
        ],
    );
    assert!(hub.log().is_empty());
    Env::new(&closed_port_url()).fails(
        &["-hf", "test/Tiny-GGUF:Q8_0", "-p", "hi"],
        &["cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE=1"],
    );
    Env::new(&hub.url).fails(&["-hf", "not-a-repo", "-p", "hi"], &["ORG/NAME"]);
    Env::new(&hub.url).fails(
        &["-m", "x.gguf", "-hf", "test/Tiny-GGUF", "-p", "hi"],
        &["cannot be used with"],
    );
}

// ---------------------------------------------------------------------------------------------
// Picking files, parsing, flags.

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn quant_selection() {
    let repo = names(&[
        "README.md",
        "qwen2.5-7b-instruct-q4_k_m.gguf",
        "qwen2.5-7b-instruct-q4_k_s.gguf",
        "qwen2.5-7b-instruct-q5_k_m-00001-of-00002.gguf",
        "qwen2.5-7b-instruct-q5_k_m-00002-of-00002.gguf",
        "qwen2.5-7b-instruct-q4_0.gguf",
        "qwen2.5-7b-instruct-q4_0_4_4.gguf",
        "mmproj-qwen2.5-f16.gguf",
    ]);
    let pick = |q: Option<&str>| select_files(&repo, q, None);
    assert_eq!(
        pick(Some("Q5_K_M")).unwrap(),
        names(&[
            "qwen2.5-7b-instruct-q5_k_m-00001-of-00002.gguf",
            "qwen2.5-7b-instruct-q5_k_m-00002-of-00002.gguf",
        ])
    );
    assert_eq!(
        pick(Some("q4_k_m")).unwrap(),
        names(&["qwen2.5-7b-instruct-q4_k_m.gguf"])
    );
    assert_eq!(
        pick(None).unwrap(),
        names(&["qwen2.5-7b-instruct-q4_k_m.gguf"])
    );
    // Whole words: Q4_0 is not Q4_0_4_4, Q4_K is no file's quantization.
    assert_eq!(
        pick(Some("Q4_0")).unwrap(),
        names(&["qwen2.5-7b-instruct-q4_0.gguf"])
    );
    assert!(matches!(
        pick(Some("Q4_K")),
        Err(SelectError::NoMatch { .. })
    ));
    assert!(
        matches!(pick(Some("F16")), Err(SelectError::NoMatch { .. })),
        "mmproj is no model"
    );
    // --hf-file of a later part brings the whole split model.
    assert_eq!(
        select_files(
            &repo,
            None,
            Some("qwen2.5-7b-instruct-q5_k_m-00002-of-00002.gguf")
        )
        .unwrap()
        .len(),
        2
    );
    // A split model missing a part is an error, not a broken download.
    let broken = names(&["m-q8_0-00001-of-00003.gguf", "m-q8_0-00003-of-00003.gguf"]);
    assert!(matches!(
        select_files(&broken, Some("Q8_0"), None),
        Err(SelectError::MissingParts { .. })
    ));
    // The only model is the default; files in folders count.
    let one = names(&["README.md", "Q8_0/model-Q8_0.gguf"]);
    assert_eq!(
        select_files(&one, None, None).unwrap(),
        names(&["Q8_0/model-Q8_0.gguf"])
    );
    assert_eq!(
        select_files(&one, Some("q8_0"), None).unwrap(),
        names(&["Q8_0/model-Q8_0.gguf"])
    );
    // Two models with the same quantization: ambiguous.
    let two = names(&["a-Q8_0.gguf", "b.Q8_0.gguf"]);
    assert!(matches!(
        select_files(&two, Some("Q8_0"), None),
        Err(SelectError::Ambiguous { .. })
    ));
    assert!(matches!(
        select_files(&names(&["README.md"]), None, None),
        Err(SelectError::NoGguf { .. })
    ));
    assert_eq!(split_part("x-00002-of-00005.gguf"), Some(("x", 2, 5)));
    assert_eq!(split_part("x.gguf"), None);
}

#[test]
fn spec_parsing_and_flags() {
    let s = HubSpec::parse("Qwen/Qwen2.5-7B-Instruct-GGUF:Q5_K_M", None).unwrap();
    assert_eq!(s.repo, "Qwen/Qwen2.5-7B-Instruct-GGUF");
    assert_eq!(s.quant.as_deref(), Some("Q5_K_M"));
    let s = HubSpec::parse(
        "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        Some("a.gguf"),
    )
    .unwrap();
    assert_eq!(
        (s.repo.as_str(), s.quant, s.file.as_deref()),
        ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", None, Some("a.gguf"))
    );
    for bad in ["Qwen", "a/b/c", "a/b:", "/b", "a/..", "a b/c"] {
        assert!(HubSpec::parse(bad, None).is_err(), "{bad}");
    }
    assert!(HubSpec::parse("a/b", Some("../x")).is_err());
    let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
    assert_eq!(
        expand_llama_flags(args(&[
            "qwen-run", "-hf", "a/b:Q8_0", "-hff", "f.gguf", "-hfr=c/d", "-ngl", "20", "--", "-hf"
        ]))
        .unwrap(),
        args(&[
            "qwen-run",
            "--hf-repo",
            "a/b:Q8_0",
            "--hf-file",
            "f.gguf",
            "--hf-repo=c/d",
            "--gpu-layers",
            "20",
            "--",
            "-hf"
        ])
    );
}

/// A terminal transcript for the docs: `cargo test --release --test hub -- --ignored --nocapture`.
/// Downloads a tiny model from the mock Hub (slowed down so the bar shows) under `script`, which
/// gives the binary a terminal, then runs it again offline from the cache.
#[test]
#[ignore]
fn transcript() {
    let mut repo = tiny_repo("Qwen/Tiny-Test-GGUF");
    // A bigger file so that the bar has something to show.
    repo.files.push(MockFile::lfs(
        "tiny-f16.gguf",
        tiny_model_bytes(QuantType::F16),
    ));
    let hub = MockHub::start(vec![repo]);
    hub.state.lock().unwrap().throttle = Some(Duration::from_millis(60));
    let home = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_qwen-run");
    let show = |env: &str, args: &str| {
        let line = format!("{env} qwen-run {args}");
        println!("$ {line}");
        let cmd = format!(
            "cd {} && export HF_HOME={} XDG_CACHE_HOME={}/xdg; export {env}; {bin} {args} --no-prompt-cache -t 1",
            home.path().display(),
            home.path().display(),
            home.path().display()
        );
        let out = Command::new("script")
            .args(["-qfec", &cmd, "/dev/null"])
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        println!();
    };
    show(
        &format!("HF_ENDPOINT={}", hub.url),
        "-hf Qwen/Tiny-Test-GGUF:F16 -p 'Say hi' -n 8 --temp 0",
    );
    show(
        "HF_HUB_OFFLINE=1",
        "-hf Qwen/Tiny-Test-GGUF:F16 -p 'Say hi' -n 8 --temp 0",
    );
    show(
        "HF_HUB_OFFLINE=1",
        "-hf Qwen/Tiny-Test-GGUF:Q5_K_M -p 'Say hi' -n 8",
    );
    show(
        &format!("HF_ENDPOINT={}", hub.url),
        "-hf Qwen/Tiny-Test-GGUF:Q5_K_M -p 'Say hi' -n 8",
    );
}
