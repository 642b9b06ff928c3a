//! The probes the activator answers on the data port itself (kubelet, KIngress network probes,
//! the KPA's activator probe), with the exact status codes and bodies upstream uses.
//!
//! Must not route: a probe is answered here or passed on untouched.

use http::{HeaderValue, Request, Response, StatusCode};

use crate::go;
use crate::headers::{KUBELET_PROBE, NETWORK_HASH, NETWORK_PROBE};
use crate::health::Health;
use crate::respond::{exact, reply, status};
use crate::response_body::ResponseBody;

/// Answers the request if it is a probe meant for the activator. Strips a stray
/// `K-Network-Hash` from requests that pass through, as upstream does.
pub(crate) fn answer<B>(req: &mut Request<B>, health: &Health) -> Option<Response<ResponseBody>> {
    let headers = req.headers();
    let is_kubelet = headers.get(http::header::USER_AGENT).is_some_and(|ua| ua.as_bytes().starts_with(b"kube-probe/"))
        || headers.get(KUBELET_PROBE).is_some_and(|v| !v.is_empty());
    if is_kubelet {
        return Some(match health.check() {
            Ok(()) => status(StatusCode::OK),
            Err(reason) => reply(StatusCode::INTERNAL_SERVER_ERROR, &reason),
        });
    }
    match headers.get(NETWORK_PROBE).map(HeaderValue::as_bytes) {
        None | Some(b"") => {
            req.headers_mut().remove(NETWORK_HASH);
            None
        }
        Some(b"probe") => Some(match headers.get(NETWORK_HASH).filter(|h| !h.is_empty()) {
            Some(hash) => {
                let mut resp = status(StatusCode::OK);
                resp.headers_mut().insert(NETWORK_HASH, hash.clone());
                resp
            }
            None => {
                reply(StatusCode::BAD_REQUEST, "a probe request must contain a non-empty \"K-Network-Hash\" header")
            }
        }),
        // The autoscaler compares this body's bytes before it lets a revision scale to zero.
        Some(b"activator") => Some(exact(StatusCode::OK, "activator")),
        Some(other) => Some(reply(
            StatusCode::BAD_REQUEST,
            &format!("unexpected probe header value: {}", go::quote(&html_escape(&String::from_utf8_lossy(other)))),
        )),
    }
}

/// What Go's `html.EscapeString` escapes, as upstream escapes an unexpected probe value.
fn html_escape(s: &str) -> String {
    let mut escaped = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '&' => escaped.push_str("&amp;"),
            '\'' => escaped.push_str("&#39;"),
            '"' => escaped.push_str("&#34;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(headers: &[(&str, &str)], health: &Health) -> Option<Response<ResponseBody>> {
        let mut req = Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        answer(&mut req.body(()).unwrap(), health)
    }

    #[test]
    fn kubelet_probe_follows_draining() {
        let health = Health::default();
        assert_eq!(probe(&[("user-agent", "kube-probe/1.33")], &health).unwrap().status(), 200);
        health.start_draining();
        assert_eq!(probe(&[("k-kubelet-probe", "1")], &health).unwrap().status(), 500);
    }

    #[test]
    fn network_probes() {
        let health = Health::default();
        let ok = probe(&[("k-network-probe", "probe"), ("k-network-hash", "abc")], &health).unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.headers()["k-network-hash"], "abc");
        assert_eq!(probe(&[("k-network-probe", "probe")], &health).unwrap().status(), 400);
        assert_eq!(probe(&[("k-network-probe", "activator")], &health).unwrap().status(), 200);
        assert_eq!(probe(&[("k-network-probe", "queue")], &health).unwrap().status(), 400);
        assert!(probe(&[("user-agent", "curl/8")], &health).is_none());
    }

    async fn body(resp: Response<ResponseBody>) -> Vec<u8> {
        use http_body_util::BodyExt;
        resp.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    /// `pkg/activator/handler/probe_handler.go` `ProbeHandler.ServeHTTP`: `io.WriteString(w,
    /// activator.Name)` for the autoscaler's probe, which the KPA compares byte for byte
    /// (`pkg/reconciler/autoscaling/kpa/scaler.go` `activatorProbe`), and `http.Error` with the
    /// html-escaped value quoted by `%q` for any other value.
    #[tokio::test]
    async fn probe_bodies_are_upstreams_bytes() {
        let health = Health::default();
        let activator = probe(&[("k-network-probe", "activator")], &health).unwrap();
        assert_eq!(body(activator).await, b"activator", "no newline, nothing trimmed");
        let other = probe(&[("k-network-probe", "<q\"&'>")], &health).unwrap();
        assert_eq!(body(other).await, b"unexpected probe header value: \"&lt;q&#34;&amp;&#39;&gt;\"\n");
        let ok = probe(&[("user-agent", "kube-probe/1.33")], &health).unwrap();
        assert!(body(ok).await.is_empty());
    }

    #[test]
    fn stray_network_hash_is_removed() {
        let mut req = Request::builder().header("k-network-hash", "x").body(()).unwrap();
        assert!(answer(&mut req, &Health::default()).is_none());
        assert!(!req.headers().contains_key("k-network-hash"));
    }
}
