//! Who may drive the server: API keys, cross-origin (browser) requests, request body types and,
//! on a loopback address, the `Host` header.
//!
//! A web page the user opens can send requests to any address the browser reaches, including
//! 127.0.0.1. Browsers send "simple" cross-origin requests (a `text/plain` POST, a form) without
//! asking first, so leaving out CORS headers is not enough: the request has run by the time the
//! browser hides its answer. Requests from a page (they carry `Origin`) are therefore refused
//! unless `--cors-origin` / `OLLAMA_ORIGINS` allows that origin, and a DNS-rebinding page (whose
//! requests name the attacker's host in `Host`) is refused while the server listens on loopback.
//! The server's own chat page (`/`) is of the server's origin, and its requests are taken.

use super::error::ApiError;
use super::{ollama, openai, webui};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// What the access checks need.
#[derive(Clone, Debug, Default)]
pub struct AccessOptions {
    /// Keys a request may present (`Authorization: Bearer KEY` or `X-Api-Key: KEY`); empty: none
    /// needed.
    pub api_keys: Vec<String>,
    /// Origins whose pages may call the server: exact (`http://localhost:3000`), `*` for any, or
    /// with `*` standing for any run of characters (`http://localhost:*`), as OLLAMA_ORIGINS.
    pub cors_origins: Vec<String>,
    /// Whether the server listens on a loopback address only: then `Host` must name one.
    pub loopback: bool,
}

/// Paths anyone may read without a key: liveness checks (and the chat page at `/`, with its
/// files in [`webui::PATHS`]).
const OPEN_PATHS: &[&str] = &["/", "/health"];

/// Headers a page may read from our answers besides the CORS-safelisted ones.
const EXPOSED: &str = "x-qwen-run-model, x-qwen-run-route, x-qwen-run-cache";

impl AccessOptions {
    fn origin_allowed(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|p| glob_match(p, origin))
    }

    fn key_accepted(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let plain = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        [bearer, plain]
            .into_iter()
            .flatten()
            .any(|k| self.api_keys.iter().any(|a| same_secret(a, k)))
    }
}

/// Compares without stopping at the first differing byte, so timing does not leak a prefix.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// `pattern` against `text`, where each `*` stands for any run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: exact
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A `Host` header's name, without its port or IPv6 brackets, lower case.
fn host_name(host: &str) -> String {
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a `Host` header names this machine's loopback interface (any port).
fn loopback_host(host: &str) -> bool {
    let name = host_name(host);
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a `Host` header is an IP address (any port): no name that a page could rebind.
fn ip_literal_host(host: &str) -> bool {
    host_name(host).parse::<std::net::IpAddr>().is_ok()
}

/// Whether the request comes from a web page (browsers add these; other clients do not).
fn from_browser(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ORIGIN)
        || headers.contains_key("sec-fetch-site")
        || headers.contains_key("sec-fetch-mode")
}

/// Whether a POST body's type is one we read: JSON; or, from a client that is not a browser,
/// no type or curl's default form type (`curl -d`), which Ollama's examples rely on.
fn body_type_accepted(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return !from_browser(headers);
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
        || (essence == "application/x-www-form-urlencoded" && !from_browser(headers))
}

fn refuse(path: &str, status: StatusCode, message: String) -> Response {
    let e = ApiError::new(status, message);
    let mut r = if path.starts_with("/api/") {
        ollama::error(e)
    } else {
        openai::error(e)
    };
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The access checks, in the order a browser's request meets them: Host, Origin (and its
/// preflight), the key, the body's type.
pub async fn check(State(access): State<Arc<AccessOptions>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let headers = req.headers();
    if access.loopback {
        if let Some(host) = headers.get(header::HOST) {
            let host = host.to_str().unwrap_or("");
            if !loopback_host(host) {
                return refuse(
                    &path,
                    StatusCode::FORBIDDEN,
                    format!("Host '{host}' is not this machine: the server listens on a loopback address and answers only requests made to localhost, 127.0.0.1 or [::1] (a page that renamed its own host to reach this one is refused); to serve other hosts start it with --host 0.0.0.0 and an --api-key"),
                );
            }
        }
    }
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("").to_string());
    // A page of this server's own origin: the chat page. Under DNS rebinding a hostile page is
    // of "our" origin too, under a name of its own that resolves to us: taken only where the
    // Host check above has run (loopback) or where no name is involved (the page was reached
    // by IP address); a page reached by a host name needs that origin in --cors-origin.
    let same_origin = origin.as_deref().is_some_and(|o| {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        host.is_some_and(|h| {
            o.strip_prefix("http://").or(o.strip_prefix("https://")) == Some(h)
                && (access.loopback || ip_literal_host(h))
        })
    });
    let origin = origin.filter(|_| !same_origin);
    if let Some(origin) = &origin {
        if !access.origin_allowed(origin) {
            return refuse(
                &path,
                StatusCode::FORBIDDEN,
                format!("requests from the web page at origin '{origin}' are not allowed; to let pages of that origin use the server, start it with --cors-origin {origin} (or set OLLAMA_ORIGINS)"),
            );
        }
        if req.method() == Method::OPTIONS && headers.contains_key("access-control-request-method")
        {
            return preflight(&access, origin, headers);
        }
    }
    if !access.api_keys.is_empty()
        && !OPEN_PATHS.contains(&path.as_str())
        && !webui::PATHS.contains(&path.as_str())
        && !access.key_accepted(headers)
    {
        let why =
            if headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key") {
                "the API key is not valid"
            } else {
                "this server needs an API key"
            };
        return refuse(
            &path,
            StatusCode::UNAUTHORIZED,
            format!("{why}: send it as 'Authorization: Bearer KEY' (the key given to --api-key, --api-key-file or QWEN_RUN_API_KEY)"),
        );
    }
    if req.method() == Method::POST && !body_type_accepted(headers) {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .map_or("none".to_string(), |v| {
                format!("'{}'", v.to_str().unwrap_or("?"))
            });
        return refuse(
            &path,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the request body's type is {ct}; send JSON with 'Content-Type: application/json'"
            ),
        );
    }
    let mut resp = next.run(req).await;
    if let Some(origin) = origin {
        cors_headers(&access, &origin, resp.headers_mut());
    }
    resp
}

fn cors_headers(access: &AccessOptions, origin: &str, h: &mut HeaderMap) {
    let any = access.cors_origins.iter().any(|o| o == "*");
    let value = if any { "*" } else { origin };
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    if !any {
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED),
    );
}

fn preflight(access: &AccessOptions, origin: &str, req: &HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    cors_headers(access, origin, h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    let asked = req
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "http://evil.test"));
        assert!(glob_match("http://localhost:*", "http://localhost:3000"));
        assert!(!glob_match(
            "http://localhost:*",
            "http://localhost.evil.test"
        ));
        assert!(glob_match("http://localhost:3000", "http://localhost:3000"));
        assert!(!glob_match(
            "http://localhost:3000",
            "http://localhost:30000"
        ));
        assert!(glob_match("chrome-extension://*", "chrome-extension://abc"));
        assert!(glob_match("http://*.example.com", "http://a.b.example.com"));
        assert!(!glob_match(
            "http://*.example.com",
            "http://example.com.evil"
        ));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXcYb"));
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:11434",
            "127.8.9.1:1",
            "[::1]:8080",
            "[::1]",
            "LocalHost.",
            "app.localhost:3000",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "evil.test",
            "evil.test:8080",
            "192.168.1.5:8080",
            "localhost.evil.test",
            "0.0.0.0:8080",
            "[::2]:80",
            "",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
        for h in ["192.168.1.5:8080", "10.0.0.1", "[fe80::1]:80", "127.0.0.1"] {
            assert!(ip_literal_host(h), "{h}");
        }
        for h in [
            "evil.test:8080",
            "myserver.lan",
            "localhost",
            "1.2.3.4.evil.test",
            "",
        ] {
            assert!(!ip_literal_host(h), "{h}");
        }
    }

    #[test]
    fn secrets() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
