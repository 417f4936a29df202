//! `qwen-run serve` as a child process on 127.0.0.1 (port 0: the address it prints is read back
//! from stderr), with blocking HTTP helpers; killed on drop.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub http: reqwest::blocking::Client,
    /// What it printed on stderr before it listened (warnings, the load line).
    pub startup: String,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(model, extra, &[])
    }

    /// Starts it with `env` set (and QWEN_RUN_API_KEY and the OLLAMA_* variables cleared unless
    /// given).
    pub fn start_with_env(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args = vec!["serve", "-m", model.to_str().unwrap(), "--port", "0"];
        args.extend(extra);
        Self::spawn(&args, env)
    }

    /// Runs `qwen-run ARGS` (which must make it serve on 127.0.0.1, e.g. with OLLAMA_HOST in
    /// `env`), with `env` set and QWEN_RUN_API_KEY and the OLLAMA_* variables cleared unless
    /// given.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwen-run"));
        cmd.args(args).env_remove("QWEN_RUN_API_KEY");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OLLAMA_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        break addr.trim().to_string();
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                _ => panic!("the server did not start: {seen}"),
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        Server {
            child,
            base,
            http,
            startup: seen,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.http.post(self.url(path)).json(body).send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, v)
    }

    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Announces a body of `len` bytes but sends only its start, then reads the answer.
    pub fn raw_oversized_post(&self, path: &str, len: usize) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.base.strip_prefix("http://").unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{{\"messages\": ["
        )
        .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let status = resp.split(' ').nth(1).unwrap().parse().unwrap();
        (status, resp)
    }

    /// Each model's name and state in /v1/models.
    pub fn model_states(&self) -> Vec<(String, String)> {
        let (_, body) = self.get("/v1/models");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["status"]["value"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// A metric's value from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(self.url(path)).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    /// Posts and returns the response's lines (SSE `data:` payloads, or NDJSON objects).
    pub fn post_stream(&self, path: &str, body: &Value) -> (u16, String, Vec<String>) {
        let r = self.http.post(self.url(path)).json(body).send().unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let lines = BufReader::new(r)
            .lines()
            .map(|l| l.unwrap())
            .filter(|l| !l.is_empty())
            .collect();
        (status, ct, lines)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
