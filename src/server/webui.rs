//! The chat page at `GET /` (as llama-server serves one): four static files in `webui/`,
//! compiled into the binary, that talk to `/v1/models` and the `/v1/chat/completions` stream
//! like any other client (same origin, the same API key). A client that does not ask for HTML
//! (curl, a liveness probe) still gets the one-line answer `/` always gave.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("webui/index.html");
const APP_JS: &str = include_str!("webui/app.js");
const STYLE_CSS: &str = include_str!("webui/style.css");
const ICON_SVG: &str = include_str!("webui/icon.svg");

/// The page's files, by path; they need no API key (the page asks for one when the server has
/// one).
pub const PATHS: &[&str] = &["/ui/app.js", "/ui/style.css", "/ui/icon.svg"];

/// The page loads only its own script and style and talks only to this server: no inline
/// script, nothing from elsewhere, not framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the page to a browser (which asks for `text/html`), a line of text to anything else.
pub async fn index(headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if wants_html {
        static_file("text/html; charset=utf-8", INDEX_HTML)
    } else {
        "qwen-run is running".into_response()
    }
}

pub async fn app_js() -> Response {
    static_file("text/javascript; charset=utf-8", APP_JS)
}

pub async fn style_css() -> Response {
    static_file("text/css; charset=utf-8", STYLE_CSS)
}

pub async fn icon_svg() -> Response {
    static_file("image/svg+xml", ICON_SVG)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary; a browser asks again rather than run an old script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
