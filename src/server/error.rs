//! An error answer, which each API formats its own way.

use axum::http::{HeaderValue, StatusCode};

/// An error answer; each API formats it its own way.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// The HTTP answer, with `body` in the API's error format; an overloaded server (429, 503)
    /// also says when to try again.
    pub fn response(&self, body: serde_json::Value) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut r = (self.status, axum::Json(body)).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from_static("1"),
            );
        }
        r
    }
}
