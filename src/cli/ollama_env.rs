//! The `OLLAMA_*` environment variables `serve` reads, so that a setup written for Ollama (a
//! systemd unit, a compose file) starts qwen-run as it started Ollama. Each maps to a serve
//! option; a flag given on the command line wins over its variable, and a value that cannot be
//! read stops the server with a message naming the variable.

use crate::kv_cache::CacheType;
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Ollama's port, where `OLLAMA_HOST` names none.
pub const OLLAMA_PORT: u16 = 11434;

/// The variables read here and what each sets (OLLAMA_ORIGINS is read with the API keys).
pub const READ: &[&str] = &[
    "OLLAMA_HOST",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_KV_CACHE_TYPE",
    "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_ORIGINS",
    "OLLAMA_MODELS",
    "OLLAMA_CONTEXT_LENGTH",
];

/// What the variables that are set ask for.
#[derive(Debug, Default, PartialEq)]
pub struct OllamaEnv {
    pub host: Option<(String, u16)>,
    pub num_parallel: Option<usize>,
    pub max_queue: Option<usize>,
    pub max_loaded_models: Option<usize>,
    pub keep_alive: Option<String>,
    pub kv_cache_type: Option<CacheType>,
    pub models: Option<PathBuf>,
    pub context_length: Option<usize>,
}

impl OllamaEnv {
    /// Reads the variables through `var` (the process environment, or a test's table). An empty
    /// variable counts as unset, as Ollama reads it.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<OllamaEnv> {
        let get = |name: &str| {
            var(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        // 0 is Ollama's "choose for me": the serve default.
        let count = |name: &str| -> Result<Option<usize>> {
            match get(name) {
                None => Ok(None),
                Some(v) => match v.parse::<usize>() {
                    Ok(0) => Ok(None),
                    Ok(n) => Ok(Some(n)),
                    Err(_) => bail!("{name}='{v}' is not a whole number (0: the default)"),
                },
            }
        };
        let host = get("OLLAMA_HOST")
            .map(|v| parse_host(&v).map_err(|e| anyhow::anyhow!("OLLAMA_HOST='{v}': {e}")))
            .transpose()?;
        let kv_cache_type = get("OLLAMA_KV_CACHE_TYPE")
            .map(|v| CacheType::parse(&v).map_err(|e| anyhow::anyhow!("OLLAMA_KV_CACHE_TYPE: {e}")))
            .transpose()?;
        if let Some(v) = get("OLLAMA_FLASH_ATTENTION") {
            // Read as Go's strconv.ParseBool reads it; it changes nothing here (as -fa).
            if !matches!(
                v.as_str(),
                "1" | "t"
                    | "T"
                    | "true"
                    | "TRUE"
                    | "True"
                    | "0"
                    | "f"
                    | "F"
                    | "false"
                    | "FALSE"
                    | "False"
            ) {
                bail!("OLLAMA_FLASH_ATTENTION='{v}' is not a boolean: use 1 or 0 (true or false)");
            }
        }
        let models = get("OLLAMA_MODELS").map(PathBuf::from);
        if let Some(dir) = &models {
            if !dir.is_dir() {
                bail!(
                    "OLLAMA_MODELS='{}' is not a directory; qwen-run serves the GGUF files of a directory (Ollama's own blob store is not read)",
                    dir.display()
                );
            }
        }
        Ok(OllamaEnv {
            host,
            num_parallel: count("OLLAMA_NUM_PARALLEL")?,
            max_queue: count("OLLAMA_MAX_QUEUE")?,
            max_loaded_models: count("OLLAMA_MAX_LOADED_MODELS")?,
            keep_alive: get("OLLAMA_KEEP_ALIVE"),
            kv_cache_type,
            models,
            context_length: count("OLLAMA_CONTEXT_LENGTH")?,
        })
    }

    /// The `OLLAMA_*` variables set in `vars` that qwen-run does not read, for a note at startup.
    pub fn unread(vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
        let mut names: Vec<String> = vars
            .filter(|(k, v)| k.starts_with("OLLAMA_") && !v.trim().is_empty())
            .map(|(k, _)| k)
            .filter(|k| !READ.contains(&k.as_str()))
            .collect();
        names.sort();
        names
    }
}

/// `OLLAMA_HOST` as Ollama reads it: `host`, `host:port`, `:port` (every interface), `[v6]:port`,
/// or a URL `http://host[:port][/path]`. Without a port: 11434, or 80 / 443 after an explicit
/// `http://` / `https://`, as Ollama defaults.
pub fn parse_host(v: &str) -> Result<(String, u16), String> {
    let (default_port, rest) = match v.split_once("://") {
        None => (OLLAMA_PORT, v),
        Some(("http", rest)) => (80, rest),
        Some(("https", rest)) => (443, rest),
        Some((scheme, _)) => return Err(format!("the scheme '{scheme}' is not http or https")),
    };
    let hostport = rest.split('/').next().unwrap_or("");
    // IPv6 addresses keep their brackets: the address is written host:port to listen on it.
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or("an IPv6 address opened with [ is not closed with ]")?;
        match after {
            "" => (format!("[{addr}]"), None),
            p => match p.strip_prefix(':') {
                Some(p) => (format!("[{addr}]"), Some(p)),
                None => return Err(format!("'{after}' after the IPv6 address is not :PORT")),
            },
        }
    } else if hostport.matches(':').count() > 1 {
        (format!("[{hostport}]"), None)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("the port '{p}' is not a number from 0 to 65535"))?,
    };
    let host = match host.as_str() {
        // `:port` listens on every interface, as Ollama's Go listener does; nothing: its default.
        "" if port_given(hostport) => "0.0.0.0".to_string(),
        "" => "127.0.0.1".to_string(),
        _ => host,
    };
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the host holds spaces or control characters".into());
    }
    Ok((host, port))
}

fn port_given(hostport: &str) -> bool {
    hostport.starts_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn host(v: &str) -> Result<(String, u16), String> {
        parse_host(v)
    }

    #[test]
    fn ollama_host_forms() {
        let ok = |v: &str, h: &str, p: u16| assert_eq!(host(v), Ok((h.to_string(), p)), "{v}");
        ok("0.0.0.0", "0.0.0.0", 11434);
        ok("127.0.0.1:8000", "127.0.0.1", 8000);
        ok(":8000", "0.0.0.0", 8000);
        ok("localhost", "localhost", 11434);
        ok("http://example.com", "example.com", 80);
        ok("https://example.com/ollama", "example.com", 443);
        ok("http://10.0.0.2:11435/", "10.0.0.2", 11435);
        ok("[::1]:9000", "[::1]", 9000);
        ok("[::1]", "[::1]", 11434);
        ok("::1", "[::1]", 11434);
        ok("", "127.0.0.1", 11434);
        for bad in [
            "host:port",
            "host:70000",
            "ftp://x",
            "[::1",
            "[::1]x",
            "a b",
        ] {
            assert!(host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn variables_and_their_errors() {
        let read = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            OllamaEnv::read(|k| map.get(k).cloned())
        };
        assert_eq!(read(&[]).unwrap(), OllamaEnv::default());
        let e = read(&[
            ("OLLAMA_HOST", "0.0.0.0:9999"),
            ("OLLAMA_NUM_PARALLEL", "2"),
            ("OLLAMA_MAX_QUEUE", "0"),
            ("OLLAMA_MAX_LOADED_MODELS", "1"),
            ("OLLAMA_KEEP_ALIVE", "10m"),
            ("OLLAMA_KV_CACHE_TYPE", "q8_0"),
            ("OLLAMA_FLASH_ATTENTION", "1"),
            ("OLLAMA_CONTEXT_LENGTH", " 2048 "),
            ("OLLAMA_MODELS", ""),
        ])
        .unwrap();
        assert_eq!(e.host, Some(("0.0.0.0".into(), 9999)));
        assert_eq!(e.num_parallel, Some(2));
        assert_eq!(e.max_queue, None);
        assert_eq!(e.max_loaded_models, Some(1));
        assert_eq!(e.keep_alive.as_deref(), Some("10m"));
        assert_eq!(e.kv_cache_type, Some(CacheType::Q8_0));
        assert_eq!(e.context_length, Some(2048));
        assert_eq!(e.models, None);
        for (k, v) in [
            ("OLLAMA_HOST", "x:y"),
            ("OLLAMA_NUM_PARALLEL", "two"),
            ("OLLAMA_MAX_QUEUE", "-1"),
            ("OLLAMA_KV_CACHE_TYPE", "q4_0"),
            ("OLLAMA_FLASH_ATTENTION", "maybe"),
            ("OLLAMA_MODELS", "/nonexistent/models"),
        ] {
            let err = format!("{:#}", read(&[(k, v)]).unwrap_err());
            assert!(err.contains(k), "{k}={v}: {err}");
        }
        let unread = OllamaEnv::unread(
            [
                ("OLLAMA_DEBUG", "1"),
                ("OLLAMA_HOST", "x"),
                ("OLLAMA_NOPRUNE", ""),
                ("PATH", "/bin"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        assert_eq!(unread, vec!["OLLAMA_DEBUG".to_string()]);
    }
}
