//! Forwarding one request to one chosen pod: the per-pod pooled clients, header hygiene
//! (hop-by-hop removal, `X-Forwarded-For`, Knative's proxy headers), HTTP/1.1 upgrades, and the
//! response body that keeps the pod's slot until the body is done.
//!
//! Bodies stream in both directions; nothing here buffers or retries. Must not choose the pod:
//! it is handed a [`Lease`] from `throttle`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::autoscaler::InFlight;
use crate::throttle::Lease;

/// Knative's `MAX_IDLE_PROXY_CONNS_PER_HOST` default.
const MAX_IDLE_PER_POD: usize = 100;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the legacy
/// `Proxy-Connection`. `TE` is handled apart: `te: trailers` must reach gRPC backends.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The ingress names the revision with these; the pod must not see them (as upstream).
const KNATIVE_REVISION: HeaderName = HeaderName::from_static("knative-serving-revision");
const KNATIVE_NAMESPACE: HeaderName = HeaderName::from_static("knative-serving-namespace");
/// Tells queue-proxy the request came through the activator, so the autoscaler does not count
/// it twice.
const PROXY_REQUEST: HeaderName = HeaderName::from_static("k-proxy-request");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Dials one pod whatever the request URI says, so the URI and `Host` keep the client's
/// authority while the connection goes where the throttler decided.
#[derive(Clone)]
struct PodConnector {
    http: HttpConnector,
    pod: Uri,
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for PodConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, _requested: Uri) -> Self::Future {
        let connecting = tower_service::Service::call(&mut self.http, self.pod.clone());
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// Keep-alive connection pools to one pod: HTTP/1.1, and h2c with prior knowledge. The inbound
/// request's version picks the pool, as Knative's activator does.
#[derive(Clone)]
pub struct PodClient {
    http1: Client<PodConnector, Incoming>,
    h2c: Client<PodConnector, Incoming>,
}

impl PodClient {
    pub fn new(pod: SocketAddr) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_keepalive(Some(Duration::from_secs(30)));
        let pod = Uri::try_from(format!("http://{pod}")).expect("a socket address is a valid authority");
        let connector = PodConnector { http, pod };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_POD)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        PodClient { http1, h2c }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("forwarding to pod {pod} failed: {source}")]
pub struct ForwardError {
    pod: SocketAddr,
    #[source]
    source: hyper_util::client::legacy::Error,
}

/// What a response holds until its body ends (or its upgraded connection closes): the pod's
/// slot, and the request's place in its revision's concurrency.
pub struct Held {
    pub lease: Lease,
    pub in_flight: InFlight,
}

/// Sends `req` to the pod `held.lease` holds a slot on.
pub async fn forward(
    mut req: Request<Incoming>,
    held: Held,
    client_ip: IpAddr,
) -> Result<Response<ResponseBody>, ForwardError> {
    let lease = &held.lease;
    let upgrade = upgrade_protocol(&req);
    prepare_request(&mut req, upgrade.clone(), client_ip, lease.pod().addr);
    let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let pod = lease.pod().clone();
    let sent = match req.version() {
        Version::HTTP_2 => pod.client.h2c.request(req).await,
        _ => pod.client.http1.request(req).await,
    };
    let mut resp = sent.map_err(|source| ForwardError { pod: pod.addr, source })?;
    strip_hop_by_hop(resp.headers_mut());
    if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_side), Some(protocol)) = (resp.status(), client_side, upgrade)
    {
        let pod_side = hyper::upgrade::on(&mut resp);
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
        tokio::spawn(splice_upgraded(client_side, pod_side, held));
        return Ok(resp.map(|_| ResponseBody::empty()));
    }
    Ok(resp.map(|body| ResponseBody::upstream(body, held)))
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

/// The protocol an HTTP/1.1 request asks to switch to, if it asks.
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants_upgrade = req.headers().get_all(header::CONNECTION).iter().any(|v| has_token(v, "upgrade"));
    wants_upgrade.then(|| req.headers().get(header::UPGRADE).cloned()).flatten()
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

fn prepare_request<B>(req: &mut Request<B>, upgrade: Option<HeaderValue>, client_ip: IpAddr, pod: SocketAddr) {
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    append_forwarded_for(headers, client_ip);
    headers.remove(KNATIVE_REVISION);
    headers.remove(KNATIVE_NAMESPACE);
    headers.insert(PROXY_REQUEST, HeaderValue::from_static("activator"));

    // The pooled client wants an absolute URI; keep the client's authority so HTTP/2's
    // `:authority` is preserved. The connector dials the pod regardless.
    if req.uri().authority().is_none() {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| {
                http::uri::Authority::try_from(pod.to_string()).expect("socket address is an authority")
            });
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client_ip: IpAddr) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        _ => client_ip.to_string(),
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// A response body: either streamed from a pod, holding that pod's slot until it ends, or a
/// short message written by the activator itself.
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Upstream { body: Incoming, held: Option<Held> },
    Local(Full<Bytes>),
}

impl ResponseBody {
    fn upstream(body: Incoming, held: Held) -> Self {
        ResponseBody { kind: Kind::Upstream { body, held: Some(held) } }
    }

    pub fn text(text: impl Into<Bytes>) -> Self {
        ResponseBody { kind: Kind::Local(Full::new(text.into())) }
    }

    pub fn empty() -> Self {
        Self::text(Bytes::new())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Upstream { body, held } => {
                let polled = Pin::new(body).poll_frame(cx);
                if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                    held.take();
                }
                polled
            }
            Kind::Local(full) => Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Local(full) => full.size_hint(),
        }
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
    const POD: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9000);

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
        ]);
        prepare_request(&mut req, None, CLIENT, POD);
        let h = req.headers();
        for gone in
            ["connection", "x-secret", "keep-alive", "proxy-authorization", "upgrade", "knative-serving-revision"]
        {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["k-proxy-request"], "activator");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(req.uri(), "http://svc.example.com/incr?x=1");
    }

    #[test]
    fn appends_to_forwarded_for_and_falls_back_to_pod_authority() {
        let mut req = request(&[("x-forwarded-for", "1.1.1.1")]);
        prepare_request(&mut req, None, CLIENT, POD);
        assert_eq!(req.headers()["x-forwarded-for"], "1.1.1.1, 10.1.2.3");
        assert_eq!(req.uri(), "http://127.0.0.1:9000/incr?x=1");
    }

    #[test]
    fn keeps_upgrade_headers_for_an_upgrade() {
        let mut req = request(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let protocol = upgrade_protocol(&req);
        assert_eq!(protocol.as_ref().unwrap(), "websocket");
        prepare_request(&mut req, protocol, CLIENT, POD);
        assert_eq!(req.headers()["connection"], "upgrade");
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert!(upgrade_protocol(&request(&[("upgrade", "websocket")])).is_none());
    }
}
