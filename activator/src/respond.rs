//! The answers the activator writes itself, each a one-line `text/plain` body saying what
//! happened, with upstream's status codes and texts where upstream has them. Anything else a
//! client sees comes from a pod, unchanged.

use http::{HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;

/// Seconds a client is asked to wait after a 503 for a full queue.
const RETRY_AFTER_SECONDS: &str = "1";

/// A response written by the activator itself: plain text, one line (or empty).
pub fn reply(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = if message.is_empty() { ResponseBody::empty() } else { ResponseBody::text(format!("{message}\n")) };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// The revision's timeout passed before the response started (upstream's text).
pub fn timed_out() -> Response<ResponseBody> {
    reply(StatusCode::GATEWAY_TIMEOUT, "activator request timeout")
}

/// The revision's wait queue is full.
pub fn queue_full(namespace: &str, revision: &str) -> Response<ResponseBody> {
    let mut resp =
        reply(StatusCode::SERVICE_UNAVAILABLE, &format!("request queue of revision {namespace}/{revision} is full"));
    resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
    resp
}

/// The pod could not be reached, or the exchange with it failed.
pub fn bad_gateway(error: &dyn std::error::Error) -> Response<ResponseBody> {
    reply(StatusCode::BAD_GATEWAY, &error.to_string())
}
