//! Forwarding one request to one chosen pod: header hygiene (hop-by-hop removal,
//! `X-Forwarded-For`, Knative's proxy headers), the request target each HTTP version needs,
//! HTTP/1.1 upgrades spliced both ways, and the response handed back with what it holds.
//!
//! Bodies stream in both directions; nothing here buffers or retries, though a request may be
//! copied as it goes (`Replay`) for the caller to send again. Must not choose the pod: it is
//! handed a [`Lease`] from `throttle`, and the pod's connections from `pool`.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::autoscaler::InFlight;
use crate::headers::{
    KNATIVE_NAMESPACE, KNATIVE_REVISION, ORIGINAL_HOST, PASSTHROUGH_LB, PROXY_REQUEST, SESSION_END,
    SESSION_END_SIGNATURE, SESSION_END_TIME, X_FORWARDED_FOR,
};
use crate::pool::SendError;
use crate::request_body::{Kept, RequestBody};
use crate::response_body::{Held, ResponseBody};
use crate::spec::HostRewrite;
use crate::throttle::Lease;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, RFC 9113 §8.2.2),
/// plus the legacy `Proxy-Connection`. `TE` is handled apart: `te: trailers` must reach gRPC
/// backends. `Trailer` is not among them: it announces the trailers, which HTTP/1.1 needs to send.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("http2-settings"),
];

/// Why a pod gave no response; displayed as Go's transport words it, which upstream's 502
/// carries: `dial tcp 10.0.0.5:8012: connect: connection refused`.
#[derive(Debug)]
pub(crate) struct ForwardError {
    pub pod: SocketAddr,
    source: SendError,
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            SendError::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut && e.raw_os_error().is_none() => {
                write!(f, "dial tcp {}: i/o timeout", self.pod)
            }
            SendError::Connect(e) => match e.raw_os_error() {
                Some(errno) => {
                    let text = nix::errno::Errno::from_raw(errno).desc();
                    let mut chars = text.chars();
                    let first = chars.next().map(|c| c.to_ascii_lowercase()).into_iter();
                    write!(f, "dial tcp {}: connect: {}", self.pod, first.chain(chars).collect::<String>())
                }
                None => write!(f, "dial tcp {}: {e}", self.pod),
            },
            SendError::Tls(e) => write!(f, "tls: {e}"),
            SendError::Http(e) => write!(f, "{e}"),
        }
    }
}

impl ForwardError {
    /// The pod's TLS handshake failed, or its certificate was refused.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.source, SendError::Tls(_))
    }

    /// Whether the pod's connection failed (refused, closed or reset, as when the pod dies), not
    /// just this one exchange: a stream the pod reset on a connection that lives on is not.
    pub(crate) fn connection_failed(&self) -> bool {
        match &self.source {
            SendError::Connect(_) | SendError::Tls(_) => true,
            SendError::Http(e) => {
                let mut cause = std::error::Error::source(e);
                let io = std::iter::from_fn(|| {
                    let this = cause?;
                    cause = this.source();
                    Some(this)
                })
                .any(|c| c.is::<std::io::Error>());
                e.is_closed() || e.is_incomplete_message() || io
            }
        }
    }
}

impl std::error::Error for ForwardError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A forward that failed; with the request back when none of it reached the pod.
pub(crate) struct ForwardFailed {
    pub error: ForwardError,
    pub unsent: Option<Unsent>,
}

/// A request no byte of which reached its pod, and its place in the revision's concurrency: it
/// may go to another pod as it is.
pub(crate) struct Unsent {
    pub outbound: Outbound,
    pub in_flight: InFlight,
}

/// A client's request made ready for a pod of its revision, whichever pod that turns out to be:
/// its headers are cleaned once, and only its address is set per attempt.
pub(crate) struct Outbound {
    /// Boxed: a request waiting for a slot holds a pointer to it, not a copy per step.
    req: Box<Request<RequestBody>>,
    /// The authority the pod is addressed by; `None` for the pod's own address.
    authority: Option<Authority>,
    /// The client's side of an upgrade it asked for.
    client_side: Option<hyper::upgrade::OnUpgrade>,
}

impl Outbound {
    /// Cleans the request's headers for the pod: hop-by-hop ones out, `X-Forwarded-For`,
    /// Knative's proxy headers, `Host` as `host` says.
    pub(crate) fn new(mut req: Box<Request<RequestBody>>, client_ip: IpAddr, host: &HostRewrite) -> Self {
        let upgrade = upgrade_protocol(&req);
        let authority = prepare_request(&mut req, upgrade.as_ref(), client_ip, host);
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut *req));
        Outbound { req, authority, client_side }
    }
}

impl Outbound {
    /// Keeps what it takes to send this request again should its pod fail before answering: its
    /// head as it goes out, and up to `limit` bytes of its body (if it has one) as they pass.
    /// `None` for an upgrade, whose connection is the client's own.
    pub(crate) fn keep_for_replay(&mut self, limit: usize) -> Option<Replay> {
        if self.client_side.is_some() {
            return None;
        }
        let body = self.req.body_mut().keep(limit);
        let req = &self.req;
        Some(Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            authority: self.authority.clone(),
            body,
        })
    }
}

/// A request as it went to a pod, to send again (`Outbound::keep_for_replay`).
pub(crate) struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    authority: Option<Authority>,
    /// `None`: the request had no body.
    body: Option<std::sync::Arc<Kept>>,
}

impl Replay {
    /// The request again, if the whole of its body passed and was kept.
    pub(crate) fn outbound(self) -> Option<Outbound> {
        let body = match &self.body {
            Some(kept) => kept.replay()?,
            None => RequestBody::empty(),
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        Some(Outbound { req: Box::new(req), authority: self.authority, client_side: None })
    }
}

/// What an exchange holds besides the request.
pub(crate) struct Exchange<'a> {
    pub lease: Lease,
    pub in_flight: InFlight,
    /// Upgraded connections outlive their request; they are tracked so shutdown can wait for them.
    pub tunnels: &'a TaskTracker,
}

/// Sends the request to the pod `exchange.lease` holds a slot on.
pub(crate) async fn forward(
    outbound: Outbound,
    exchange: Exchange<'_>,
) -> Result<Response<ResponseBody>, ForwardFailed> {
    let Exchange { lease, in_flight, tunnels } = exchange;
    let Outbound { mut req, authority, client_side } = outbound;
    let pod = lease.pod().clone();
    let (tls, target) = pod.client.target();
    address(&mut req, authority.as_ref(), target, tls);
    let sent = match req.version() {
        Version::HTTP_2 => pod.client.send_http2(*req).await.map(|(resp, lent)| (resp, Some(lent))),
        _ => pod.client.send_http1(*req).await.map(|(resp, lent)| (resp, Some(lent))),
    };
    let (mut resp, lent) = match sent {
        Ok(sent) => sent,
        Err(failed) => {
            let unsent = failed
                .unsent
                .map(|req| Unsent { outbound: Outbound { req: Box::new(req), authority, client_side }, in_flight });
            return Err(ForwardFailed { error: ForwardError { pod: pod.addr, source: failed.error }, unsent });
        }
    };
    // The protocol the pod switched to, not the list the client offered.
    let switched_to = resp.headers().get(header::UPGRADE).cloned();
    strip_hop_by_hop(resp.headers_mut());
    if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_side)) = (resp.status(), client_side) {
        let pod_side = hyper::upgrade::on(&mut resp);
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = switched_to {
            headers.insert(header::UPGRADE, protocol);
        }
        // The upgraded connection is spent: it does not go back to the pool.
        tunnels.spawn(splice_upgraded(client_side, pod_side, Held { lease, in_flight, lent: None }));
        return Ok(resp.map(|_| ResponseBody::empty()));
    }
    Ok(resp.map(|body| ResponseBody::upstream(body, Held { lease, in_flight, lent })))
}

async fn splice_upgraded(client: hyper::upgrade::OnUpgrade, pod: hyper::upgrade::OnUpgrade, held: Held) {
    let lease = &held.lease;
    match tokio::try_join!(client, pod) {
        Ok((client, pod)) => {
            let (mut client, mut pod) = (TokioIo::new(client), TokioIo::new(pod));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut pod).await {
                tracing::debug!(pod = %lease.pod().addr, error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(pod = %lease.pod().addr, error = %e, "upgrade failed"),
    }
}

/// The protocols an HTTP/1.1 request asks to switch to, if it asks for any but `h2c`: upgrading
/// to h2c is a matter between the client and the activator, which serves HTTP/2 with prior
/// knowledge only, so such a request goes on as plain HTTP/1.1.
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants_upgrade = req.headers().get_all(header::CONNECTION).iter().any(|v| has_token(v, "upgrade"));
    let offered = req.headers().get(header::UPGRADE).filter(|_| wants_upgrade)?.to_str().ok()?;
    let protocols: Vec<&str> =
        offered.split(',').map(str::trim).filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c")).collect();
    if protocols.is_empty() {
        return None;
    }
    HeaderValue::try_from(protocols.join(", ")).ok()
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::try_from(t.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    let trailers = headers.get_all(header::TE).iter().any(|v| has_token(v, "trailers"));
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Cleans the headers and returns the authority the pod is to be addressed by (`None`: the pod's
/// own address).
fn prepare_request<B>(
    req: &mut Request<B>,
    upgrade: Option<&HeaderValue>,
    client_ip: IpAddr,
    host: &HostRewrite,
) -> Option<Authority> {
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    append_forwarded_for(headers, client_ip);
    // The ingress named the revision with these; the pod must not see them (as upstream).
    headers.remove(KNATIVE_REVISION);
    headers.remove(KNATIVE_NAMESPACE);
    // Only the activator tells a pod that a session ended; a client's word would end another's.
    for forged in [SESSION_END, SESSION_END_TIME, SESSION_END_SIGNATURE] {
        headers.remove(forged);
    }
    headers.insert(PROXY_REQUEST, HeaderValue::from_static("activator"));

    // The authority the client addressed: the URI's (HTTP/2, or an absolute-form HTTP/1.1
    // target), else its Host.
    let client_authority = req
        .uri()
        .authority()
        .cloned()
        .or_else(|| req.headers().get(header::HOST).and_then(|h| Authority::try_from(h.as_bytes()).ok()));
    match host {
        HostRewrite::Keep => client_authority,
        HostRewrite::ToOriginalHost | HostRewrite::Passthrough(_) => {
            let headers = req.headers_mut();
            if !headers.contains_key(ORIGINAL_HOST)
                && let Some(value) = client_authority.and_then(|a| HeaderValue::try_from(a.as_str()).ok())
            {
                headers.insert(ORIGINAL_HOST, value);
            }
            match host {
                HostRewrite::Passthrough(private) => {
                    headers.insert(PASSTHROUGH_LB, HeaderValue::from_static("true"));
                    Authority::try_from(private.as_str()).ok()
                }
                _ => None,
            }
        }
    }
}

/// Sets the request target each HTTP version needs, addressed to `authority` or else the pod (at
/// the address its connections go to, `https` when they are TLS).
fn address<B>(req: &mut Request<B>, authority: Option<&Authority>, pod: SocketAddr, tls: bool) {
    let authority = authority
        .cloned()
        .unwrap_or_else(|| Authority::try_from(pod.to_string()).expect("a socket address is an authority"));
    let path = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if req.version() == Version::HTTP_2 {
        // HTTP/2 carries the authority in `:authority`, built from an absolute URI.
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    } else {
        // HTTP/1.1 sends the origin form and the authority in `Host`.
        if let Ok(host) = HeaderValue::try_from(authority.as_str()) {
            req.headers_mut().insert(header::HOST, host);
        }
        *req.uri_mut() = Uri::from(path);
    }
}

/// Appends the client to `X-Forwarded-For`, keeping every hop already listed on any of the
/// header's lines.
fn append_forwarded_for(headers: &mut HeaderMap, client_ip: IpAddr) {
    let mut value = String::new();
    for prior in headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()) {
        let prior = prior.trim();
        if !prior.is_empty() {
            value.push_str(prior);
            value.push_str(", ");
        }
    }
    value.push_str(&client_ip.to_string());
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().uri("/incr?x=1").version(Version::HTTP_11);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap()
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));
    fn prepare<B>(req: &mut Request<B>, upgrade: Option<&HeaderValue>, host: &HostRewrite) {
        let authority = prepare_request(req, upgrade, CLIENT, host);
        address(req, authority.as_ref(), POD, false);
    }

    const POD: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9000);

    /// Upstream's 502 carries Go's transport error (`knative.dev/pkg/network/error_handler.go`
    /// `ErrorHandler`); a refused dial reads as Go's `net.OpError` does.
    #[test]
    fn a_refused_dial_reads_as_gos() {
        let refused = ForwardError {
            pod: "[fd00::5]:8012".parse().unwrap(),
            source: SendError::Connect(std::io::Error::from_raw_os_error(nix::libc::ECONNREFUSED)),
        };
        assert_eq!(refused.to_string(), "dial tcp [fd00::5]:8012: connect: connection refused");
        let timed_out = ForwardError {
            pod: POD,
            source: SendError::Connect(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 1s")),
        };
        assert_eq!(timed_out.to_string(), "dial tcp 127.0.0.1:9000: i/o timeout");
    }

    #[test]
    fn removes_hop_by_hop_and_headers_named_in_connection() {
        let mut req = request(&[
            ("host", "svc.example.com"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "basic x"),
            ("te", "trailers, deflate"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
            ("knative-serving-revision", "r"),
            ("k-session-end", "idle"),
            ("k-session-end-time", "1"),
            ("k-session-end-signature", "v1=00"),
        ]);
        prepare(&mut req, None, &HostRewrite::Keep);
        let h = req.headers();
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "upgrade",
            "knative-serving-revision",
            "k-session-end",
            "k-session-end-time",
            "k-session-end-signature",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["k-proxy-request"], "activator");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["host"], "svc.example.com");
        assert_eq!(req.uri(), "/incr?x=1", "HTTP/1.1 gets the origin form");
    }

    #[test]
    fn appends_to_forwarded_for_and_falls_back_to_pod_authority() {
        let mut req = request(&[("x-forwarded-for", "1.1.1.1")]);
        prepare(&mut req, None, &HostRewrite::Keep);
        assert_eq!(req.headers()["x-forwarded-for"], "1.1.1.1, 10.1.2.3");
        assert_eq!(req.headers()["host"], "127.0.0.1:9000");
        let mut lines = request(&[("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("x-forwarded-for", "3.3.3.3")]);
        prepare(&mut lines, None, &HostRewrite::Keep);
        assert_eq!(lines.headers()["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3", "every line is kept");
    }

    #[test]
    fn http2_keeps_the_clients_authority_in_an_absolute_uri() {
        let mut req = Request::builder().uri("http://svc.example.com/a?b").version(Version::HTTP_2).body(()).unwrap();
        prepare(&mut req, None, &HostRewrite::Keep);
        assert_eq!(req.uri(), "http://svc.example.com/a?b");
    }

    #[test]
    fn keeps_upgrade_headers_for_an_upgrade() {
        let mut req = request(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let protocol = upgrade_protocol(&req);
        assert_eq!(protocol.as_ref().unwrap(), "websocket");
        prepare(&mut req, protocol.as_ref(), &HostRewrite::Keep);
        assert_eq!(req.headers()["connection"], "upgrade");
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert!(upgrade_protocol(&request(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn for_queue_proxy_the_host_moves_to_k_original_host() {
        let mut req = request(&[("host", "svc.example.com")]);
        prepare(&mut req, None, &HostRewrite::ToOriginalHost);
        assert_eq!(req.headers()["k-original-host"], "svc.example.com");
        assert_eq!(req.headers()["host"], "127.0.0.1:9000", "queue-proxy is addressed by its pod address");
        let mut kept = request(&[("host", "svc.example.com"), ("k-original-host", "mapped.example.com")]);
        prepare(&mut kept, None, &HostRewrite::ToOriginalHost);
        assert_eq!(kept.headers()["k-original-host"], "mapped.example.com", "a domain mapping's original host is kept");
        let mut h2 = Request::builder().uri("http://svc.example.com/a").version(Version::HTTP_2).body(()).unwrap();
        prepare(&mut h2, None, &HostRewrite::Passthrough("rev-private.ns".into()));
        assert_eq!(h2.uri(), "http://rev-private.ns/a");
        assert_eq!(
            (&h2.headers()["k-original-host"], &h2.headers()["k-passthrough-lb"]),
            (&"svc.example.com".parse::<HeaderValue>().unwrap(), &"true".parse::<HeaderValue>().unwrap())
        );
    }

    #[test]
    fn a_request_resent_to_another_pod_is_addressed_to_it_and_cleaned_once() {
        let mut req = request(&[("host", "svc.example.com"), ("x-forwarded-for", "1.1.1.1")]);
        let authority = prepare_request(&mut req, None, CLIENT, &HostRewrite::ToOriginalHost);
        address(&mut req, authority.as_ref(), POD, false);
        let other = SocketAddr::new(POD.ip(), 9001);
        address(&mut req, authority.as_ref(), other, false);
        assert_eq!(req.headers()["host"], "127.0.0.1:9001");
        assert_eq!(req.headers()["k-original-host"], "svc.example.com");
        assert_eq!(req.headers()["x-forwarded-for"], "1.1.1.1, 10.1.2.3", "this hop is listed once");
        assert_eq!(req.uri(), "/incr?x=1");
    }

    #[test]
    fn an_h2c_upgrade_is_not_tunnelled() {
        let h2c = request(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"), ("http2-settings", "AAMA")]);
        assert!(upgrade_protocol(&h2c).is_none());
        let mut h2c = h2c;
        prepare(&mut h2c, None, &HostRewrite::Keep);
        for gone in ["connection", "upgrade", "http2-settings"] {
            assert!(!h2c.headers().contains_key(gone), "{gone} reaches the pod");
        }
        let mixed = request(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert_eq!(upgrade_protocol(&mixed).unwrap(), "websocket");
    }

    #[test]
    fn trailer_announcements_pass() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TRAILER, HeaderValue::from_static("grpc-status"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers[header::TRAILER], "grpc-status");
    }
}
