//! The answers the activator writes itself, with upstream's status codes and bodies byte for byte
//! where upstream has them (tools and Knative's own autoscaler compare them), and a one-line
//! `text/plain` body saying what happened where it has none. Anything else a client sees comes
//! from a pod, unchanged.

use http::{HeaderValue, Response, StatusCode};

use crate::go;
use crate::response_body::ResponseBody;

/// Seconds a client is asked to wait after a 503 for a full queue.
const RETRY_AFTER_SECONDS: &str = "1";
const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// An error answer as Go's `http.Error` writes it, which upstream uses for most of its own: the
/// message and a newline, `text/plain`, and `X-Content-Type-Options: nosniff`.
pub(crate) fn reply(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let mut resp = exact(status, format!("{message}\n"));
    resp.headers_mut().insert(http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// An answer whose body is `body` and nothing more, as upstream writes with `io.WriteString`
/// (Go sniffs such a body as `text/plain`).
pub(crate) fn exact(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    let body = body.into();
    let mut resp = Response::new(if body.is_empty() { ResponseBody::empty() } else { ResponseBody::text(body) });
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, TEXT_PLAIN);
    resp
}

/// A status without a body, as upstream's `WriteHeader` alone.
pub(crate) fn status(status: StatusCode) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = status;
    resp
}

/// The revision's timeout passed before the response started: upstream's timeout handler writes
/// its message with no newline.
pub(crate) fn timed_out() -> Response<ResponseBody> {
    exact(StatusCode::GATEWAY_TIMEOUT, "activator request timeout")
}

/// The revision's wait queue is full: upstream's text (its breaker's `ErrRequestQueueFull`), and
/// when to try again.
pub(crate) fn queue_full() -> Response<ResponseBody> {
    let mut resp = reply(StatusCode::SERVICE_UNAVAILABLE, "pending request queue full");
    resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
    resp
}

/// A strict session whose pod (or revision) is gone: its state went with it, so the client is
/// told rather than moved; `K-Session-Lost` says why. Its pin is released: sending again starts
/// a new session.
pub(crate) fn session_lost(why: &'static str) -> Response<ResponseBody> {
    let mut resp =
        reply(StatusCode::SERVICE_UNAVAILABLE, "the session's pod is gone; send again to start a new session");
    resp.headers_mut().insert(crate::headers::SESSION_LOST, HeaderValue::from_static(why));
    resp
}

/// No revision answers to what the request names: upstream's text for a revision its lister does
/// not know (`name` is empty when nothing named one).
pub(crate) fn revision_not_found(name: &str) -> Response<ResponseBody> {
    reply(
        StatusCode::NOT_FOUND,
        &format!("Error getting active endpoint: revision.serving.knative.dev {} not found", go::quote(name)),
    )
}

/// The pod could not be reached, or the exchange with it failed: the error's text, as Go's
/// reverse proxy writes the transport's.
pub(crate) fn bad_gateway(error: &dyn std::error::Error) -> Response<ResponseBody> {
    reply(StatusCode::BAD_GATEWAY, &error.to_string())
}

/// A client addressed its service's session-end path (`sticky-session-end-path`): only the
/// activator tells a pod that a session ended, or any client could end another's session.
pub(crate) fn forged_session_end() -> Response<ResponseBody> {
    reply(StatusCode::FORBIDDEN, "the session-end path is the activator's to call")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(resp: Response<ResponseBody>) -> Vec<u8> {
        resp.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    /// Upstream's bodies, byte for byte: `pkg/http/handler/timeout.go` `timeoutAndWriteError`
    /// writes the message alone; `pkg/activator/handler/context_handler.go` `sendError` and
    /// `knative.dev/pkg/network/error_handler.go` `ErrorHandler` go through `http.Error`, which
    /// adds a newline.
    #[tokio::test]
    async fn upstreams_bodies_byte_for_byte() {
        assert_eq!(body(timed_out()).await, b"activator request timeout");
        let missing = revision_not_found("");
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.headers()["x-content-type-options"], "nosniff");
        assert_eq!(
            body(missing).await,
            b"Error getting active endpoint: revision.serving.knative.dev \"\" not found\n"
        );
        assert_eq!(body(queue_full()).await, b"pending request queue full\n");
    }
}
