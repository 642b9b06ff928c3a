//! Whether this activator should receive traffic, and the probes it answers on the data port
//! itself (kubelet, KIngress network probes, the KPA's activator probe), with the exact
//! status codes and bodies upstream uses.
//!
//! Must not route: a probe is answered here or passed on untouched.

use std::sync::atomic::{AtomicBool, Ordering};

use http::header::HeaderName;
use http::{HeaderValue, Request, Response, StatusCode};

use crate::body::ResponseBody;

const NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
const NETWORK_HASH: HeaderName = HeaderName::from_static("k-network-hash");
const KUBELET_PROBE: HeaderName = HeaderName::from_static("k-kubelet-probe");

/// Readiness of this replica: fails at once on SIGTERM so load balancers stop sending, and,
/// when an autoscaler is configured, while its connection is down (as upstream).
#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
    needs_autoscaler: AtomicBool,
    autoscaler_connected: AtomicBool,
}

impl Health {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn require_autoscaler(&self) {
        self.needs_autoscaler.store(true, Ordering::SeqCst);
    }

    pub fn set_autoscaler_connected(&self, connected: bool) {
        self.autoscaler_connected.store(connected, Ordering::SeqCst);
    }

    /// `Ok` when this replica should receive traffic, else the reason.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.is_draining() {
            Err("received SIGTERM from kubelet")
        } else if self.needs_autoscaler.load(Ordering::SeqCst) && !self.autoscaler_connected.load(Ordering::SeqCst) {
            Err("connection has not yet been established")
        } else {
            Ok(())
        }
    }
}

/// Answers the request if it is a probe meant for the activator. Strips a stray
/// `K-Network-Hash` from requests that pass through, as upstream does.
pub fn answer<B>(req: &mut Request<B>, health: &Health) -> Option<Response<ResponseBody>> {
    let headers = req.headers();
    let is_kubelet = headers.get(http::header::USER_AGENT).is_some_and(|ua| ua.as_bytes().starts_with(b"kube-probe/"))
        || headers.get(KUBELET_PROBE).is_some_and(|v| !v.is_empty());
    if is_kubelet {
        return Some(match health.check() {
            Ok(()) => reply(StatusCode::OK, ""),
            Err(reason) => reply(StatusCode::INTERNAL_SERVER_ERROR, reason),
        });
    }
    match headers.get(NETWORK_PROBE).map(HeaderValue::as_bytes) {
        None | Some(b"") => {
            req.headers_mut().remove(NETWORK_HASH);
            None
        }
        Some(b"probe") => Some(match headers.get(NETWORK_HASH).filter(|h| !h.is_empty()) {
            Some(hash) => {
                let mut resp = reply(StatusCode::OK, "");
                resp.headers_mut().insert(NETWORK_HASH, hash.clone());
                resp
            }
            None => {
                reply(StatusCode::BAD_REQUEST, "a probe request must contain a non-empty \"K-Network-Hash\" header")
            }
        }),
        Some(b"activator") => Some(reply(StatusCode::OK, "activator")),
        Some(other) => Some(reply(
            StatusCode::BAD_REQUEST,
            &format!("unexpected probe header value: {:?}", String::from_utf8_lossy(other)),
        )),
    }
}

/// A response written by the activator itself: plain text, one line.
pub fn reply(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = if message.is_empty() { ResponseBody::empty() } else { ResponseBody::text(format!("{message}\n")) };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
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
    fn readiness_follows_the_autoscaler_connection_when_required() {
        let health = Health::default();
        assert!(health.check().is_ok(), "no autoscaler configured");
        health.require_autoscaler();
        assert_eq!(health.check(), Err("connection has not yet been established"));
        health.set_autoscaler_connected(true);
        assert!(health.check().is_ok());
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

    #[test]
    fn stray_network_hash_is_removed() {
        let mut req = Request::builder().header("k-network-hash", "x").body(()).unwrap();
        assert!(answer(&mut req, &Health::default()).is_none());
        assert!(!req.headers().contains_key("k-network-hash"));
    }
}
