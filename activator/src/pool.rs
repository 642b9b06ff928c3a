//! Keep-alive connections to one pod: a lock-free queue of idle HTTP/1.1 connections and one
//! shared h2c (prior knowledge) connection, dialled on demand.
//!
//! A pool belongs to one pod, so how a client spells its `Host` never opens connections: the
//! request's URI and headers are forwarded as they are, and the socket goes to the pod. A request
//! that could not be written (the pod refused the connection, or a kept-alive connection turned
//! out closed before a byte went out) is handed back to the caller, who may send it elsewhere.
//!
//! A burst (a thousand requests released as a pod turns ready) does not open a thousand
//! connections at once, which would overflow the pod's accept backlog: at most
//! `MAX_DIALS_PER_POD` dials run at a time, and a request waiting for one takes a connection an
//! earlier request gives back if that comes first.
//!
//! With system-internal TLS a pod's connections go to queue-proxy's TLS port, verified by `tls`;
//! a pool whose transport changes drops the connections it made the old way.
//!
//! Owns sockets and hyper's client connections; must not rewrite requests (that is `proxy`) or
//! choose pods (that is `throttle`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::request_body::RequestBody;
use crate::tls::InternalTls;

/// Knative's `MAX_IDLE_PROXY_CONNS_PER_HOST` default.
const MAX_IDLE_PER_POD: usize = 100;
/// Go's `IdleConnTimeout` in Knative's transport.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection given back just as its previous exchange ends may need a moment before hyper
/// takes a new request on it; one that is still not ready after this is dropped.
const SETTLE_TIME: Duration = Duration::from_secs(1);
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// New HTTP/1.1 connections being opened to one pod at once.
const MAX_DIALS_PER_POD: usize = 32;
/// HTTP/2 connections to one pod: past this, streams wait on the least busy one.
const MAX_H2_CONNECTIONS: usize = 32;
/// HTTP/2's frame header, and the type and setting the pod's first SETTINGS frame is read for.
const FRAME_HEADER: usize = 9;
const SETTINGS_FRAME: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// Why a request did not get a response from the pod.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("connecting to the pod: {0}")]
    Connect(#[source] std::io::Error),
    /// The pod's TLS handshake failed or its certificate was refused: nothing was sent.
    #[error("TLS with the pod: {0}")]
    Tls(#[source] std::io::Error),
    #[error("{0}")]
    Http(#[source] hyper::Error),
}

/// How a pod's connections are made.
#[derive(Clone, Debug)]
pub(crate) enum Transport {
    /// Plain TCP to the pod's address: HTTP/1.1, or h2c with prior knowledge.
    Plain,
    /// TLS to `to` (queue-proxy's TLS port, or the private Service's 443), verified for a
    /// revision of `namespace`.
    Tls { tls: Arc<InternalTls>, namespace: Arc<str>, to: SocketAddr },
}

impl PartialEq for Transport {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Transport::Plain, Transport::Plain) => true,
            (Transport::Tls { tls: a, namespace: n, to: t }, Transport::Tls { tls: b, namespace: m, to: u }) => {
                Arc::ptr_eq(a, b) && n == m && t == u
            }
            _ => false,
        }
    }
}

/// Reads the pod's first HTTP/2 frame as it passes (a server starts with its SETTINGS) for the
/// streams it allows at once; every byte goes on to hyper unchanged, and after that frame the
/// tap only passes reads through.
struct SettingsTap<T> {
    inner: T,
    /// The first frame's bytes so far; `None` once it has been read.
    first: Option<Vec<u8>>,
    settings: Arc<PeerSettings>,
}

impl<T> SettingsTap<T> {
    fn new(inner: T, settings: Arc<PeerSettings>) -> Self {
        SettingsTap { inner, first: Some(Vec::new()), settings }
    }

    fn observe(&mut self, read: &[u8]) {
        let Some(first) = &mut self.first else { return };
        first.extend_from_slice(read);
        if first.len() < FRAME_HEADER {
            return;
        }
        let length = usize::from(first[0]) << 16 | usize::from(first[1]) << 8 | usize::from(first[2]);
        if first[3] != SETTINGS_FRAME || length % 6 != 0 || length > 16 * 6 {
            // Not a SETTINGS frame a pod would send first: the pod's limit stays unknown (none).
            self.first = None;
            return self.settings.read();
        }
        if first.len() < FRAME_HEADER + length {
            return;
        }
        for setting in first[FRAME_HEADER..FRAME_HEADER + length].chunks_exact(6) {
            if u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS {
                let allowed = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                self.settings.allowed.store(allowed.max(1), Ordering::Release);
            }
        }
        self.first = None;
        self.settings.read();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SettingsTap<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.first.is_some() && polled.is_ready() {
            let read = buf.filled()[before..].to_vec();
            this.observe(&read);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SettingsTap<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A connection to a pod, plain or TLS.
pub(crate) enum PodStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for PodStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PodStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PodStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PodStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PodStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PodStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PodStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PodStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PodStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PodStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PodStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PodStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PodStream::Plain(s) => s.is_write_vectored(),
            PodStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A failed send, with the request if none of it reached the pod.
#[derive(Debug)]
pub(crate) struct SendFailed {
    pub error: SendError,
    pub unsent: Option<Request<RequestBody>>,
}

/// What an exchange holds of the pod's connections until its response body has ended: an
/// HTTP/1.1 connection, given back with [`PodClient::give_back`] so the next request reuses it;
/// or a stream of a shared HTTP/2 connection, free again when this is dropped.
pub(crate) struct Lent(Held);

enum Held {
    Http1(http1::SendRequest<RequestBody>),
    Http2(#[allow(dead_code, reason = "held for its Drop")] StreamSlot),
}

/// One HTTP/2 connection to the pod, with the streams the activator has open on it and how many
/// the pod allows (`SETTINGS_MAX_CONCURRENT_STREAMS`, read off the pod's first SETTINGS frame).
struct H2Conn {
    send: http2::SendRequest<RequestBody>,
    open: AtomicU32,
    settings: Arc<PeerSettings>,
}

/// What the pod's first SETTINGS frame said, once it arrived.
#[derive(Default)]
struct PeerSettings {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; unlimited until said.
    allowed: AtomicU32,
    arrived: tokio::sync::Notify,
    read: std::sync::atomic::AtomicBool,
}

impl PeerSettings {
    fn new() -> Arc<Self> {
        Arc::new(PeerSettings { allowed: AtomicU32::new(u32::MAX), ..Default::default() })
    }

    fn read(&self) {
        self.read.store(true, Ordering::Release);
        self.arrived.notify_waiters();
    }

    /// Until the pod's SETTINGS have been read (a server sends them at once), or `within`.
    async fn wait(&self, within: Duration) {
        let arrived = self.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if !self.read.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(within, arrived).await;
        }
    }
}

impl H2Conn {
    /// Takes a stream if the pod allows another on this connection.
    fn take_stream(self: &Arc<Self>) -> Option<StreamSlot> {
        let allowed = self.settings.allowed.load(Ordering::Acquire);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < allowed).then_some(open + 1))
            .ok()?;
        Some(StreamSlot(self.clone()))
    }
}

/// A stream an exchange has open on an HTTP/2 connection.
struct StreamSlot(Arc<H2Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Idle {
    conn: http1::SendRequest<RequestBody>,
    since: Instant,
}

pub(crate) struct PodClient {
    addr: SocketAddr,
    transport: ArcSwap<Transport>,
    /// Created on first use: most pods of a large cluster never hold an idle connection at once.
    idle: OnceLock<ArrayQueue<Idle>>,
    /// Signalled when a connection is given back, for requests waiting for a dial slot.
    returned: tokio::sync::Notify,
    dials: tokio::sync::Semaphore,
    /// The HTTP/2 connections to the pod: one, and more while every one is at the pod's limit of
    /// concurrent streams (as Go's transport opens them), rather than queueing streams here.
    h2: ArcSwap<Vec<Arc<H2Conn>>>,
    /// Held while dialling an HTTP/2 connection, so a burst opens one, not one per request.
    h2_dialling: tokio::sync::Mutex<()>,
}

impl PodClient {
    pub(crate) fn new(addr: SocketAddr, transport: Transport) -> Self {
        PodClient {
            addr,
            transport: ArcSwap::from_pointee(transport),
            idle: OnceLock::new(),
            returned: tokio::sync::Notify::new(),
            dials: tokio::sync::Semaphore::const_new(MAX_DIALS_PER_POD),
            h2: ArcSwap::default(),
            h2_dialling: Default::default(),
        }
    }

    /// Whether the pod is reached over TLS, and the address its connections go to.
    pub(crate) fn target(&self) -> (bool, SocketAddr) {
        match &**self.transport.load() {
            Transport::Plain => (false, self.addr),
            Transport::Tls { to, .. } => (true, *to),
        }
    }

    /// Makes the pod's connections as `transport` says from now on: the ones made otherwise are
    /// not reused (requests already on them finish).
    pub(crate) fn retarget(&self, transport: Transport) {
        if **self.transport.load() == transport {
            return;
        }
        self.transport.store(Arc::new(transport));
        if let Some(idle) = self.idle.get() {
            while idle.pop().is_some() {}
        }
        self.h2.store(Arc::default());
    }

    /// Sends an HTTP/1.1 request (origin-form URI) on an idle connection or a new one. The
    /// connection comes back with the response, to be given back when its body has ended.
    pub(crate) async fn send_http1(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lent), SendFailed> {
        loop {
            let next = match self.checkout() {
                Some(conn) => Ok((conn, true)),
                None => self.wait_http1().await,
            };
            let (mut conn, reused) = match next {
                Ok(next) => next,
                Err(error) => return Err(SendFailed { error, unsent: Some(req) }),
            };
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lent(Held::Http1(conn)))),
                Err(mut e) => match e.take_message() {
                    // The pod closed this kept-alive connection while it sat idle: try another.
                    Some(unsent) if reused => req = unsent,
                    unsent => return Err(SendFailed { error: SendError::Http(e.into_error()), unsent }),
                },
            }
        }
    }

    /// Sends an HTTP/2 request (absolute URI) on a shared HTTP/2 connection with a stream free;
    /// the stream is held until the returned `Lent` is dropped.
    pub(crate) async fn send_http2(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lent), SendFailed> {
        for attempt in 0..2 {
            let (mut conn, slot) = match self.h2_stream().await {
                Ok(stream) => stream,
                Err(error) => return Err(SendFailed { error, unsent: Some(req) }),
            };
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lent(Held::Http2(slot)))),
                Err(mut e) => match e.take_message() {
                    // The shared connection was going away (GOAWAY, closed): one new one.
                    Some(unsent) if attempt == 0 && conn.is_closed() => req = unsent,
                    unsent => return Err(SendFailed { error: SendError::Http(e.into_error()), unsent }),
                },
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Puts a connection whose exchange ended back in the idle queue; an HTTP/2 stream is freed.
    pub(crate) fn give_back(&self, Lent(held): Lent) {
        let Held::Http1(conn) = held else { return };
        if conn.is_closed() {
            return;
        }
        let idle = self.idle.get_or_init(|| ArrayQueue::new(MAX_IDLE_PER_POD));
        // A full queue drops the connection: the pod already has the most idle ones we keep.
        if idle.push(Idle { conn, since: Instant::now() }).is_ok() {
            self.returned.notify_one();
        }
    }

    /// A connection given back by another request, or a new one once a dial slot is free,
    /// whichever comes first.
    async fn wait_http1(&self) -> Result<(http1::SendRequest<RequestBody>, bool), SendError> {
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(conn) = self.checkout() {
                return Ok((conn, true));
            }
            tokio::select! {
                biased;
                () = &mut returned => {}
                slot = self.dials.acquire() => {
                    let _slot = slot.expect("the dial semaphore is never closed");
                    return Ok((self.dial_http1().await?, false));
                }
            }
        }
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.idle.get().map_or(0, ArrayQueue::len)
    }

    fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        let idle = self.idle.get()?;
        // Each connection is looked at once at most, so a queue of unsettled ones ends the loop.
        for _ in 0..idle.len() {
            let Idle { conn, since } = idle.pop()?;
            let age = since.elapsed();
            if conn.is_ready() && age < IDLE_TIMEOUT {
                return Some(conn);
            }
            if !conn.is_closed() && age < SETTLE_TIME {
                let _ = idle.push(Idle { conn, since });
            }
        }
        None
    }

    async fn dial(&self, h2: bool) -> Result<TokioIo<PodStream>, SendError> {
        let transport = self.transport.load_full();
        let to = match &*transport {
            Transport::Plain => self.addr,
            Transport::Tls { to, .. } => *to,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer in {CONNECT_TIMEOUT:?}")))
            .and_then(|connected| connected)
            .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        crate::socket::keep_alive(&stream);
        match &*transport {
            Transport::Plain => Ok(TokioIo::new(PodStream::Plain(stream))),
            Transport::Tls { tls, namespace, .. } => {
                let handshake = tls.connect(stream, namespace, h2);
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no TLS handshake in time"))
                    .and_then(|done| done)
                    .map_err(SendError::Tls)?;
                Ok(TokioIo::new(PodStream::Tls(Box::new(tls))))
            }
        }
    }

    async fn dial_http1(&self) -> Result<http1::SendRequest<RequestBody>, SendError> {
        let io = self.dial(false).await?;
        let (conn, driver) = http1::Builder::new().handshake(io).await.map_err(SendError::Http)?;
        let pod = self.addr;
        tokio::spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!(%pod, error = %e, "pod connection ended with an error");
            }
        });
        Ok(conn)
    }

    /// A stream on an open HTTP/2 connection with room, or on a new one when every one is at the
    /// pod's limit (up to `MAX_H2_CONNECTIONS`, past which the least busy one queues it).
    async fn h2_stream(&self) -> Result<(http2::SendRequest<RequestBody>, StreamSlot), SendError> {
        if let Some(stream) = self.free_h2_stream() {
            return Ok(stream);
        }
        let _dialling = self.h2_dialling.lock().await;
        if let Some(stream) = self.free_h2_stream() {
            return Ok(stream);
        }
        let open: Vec<Arc<H2Conn>> = self.h2.load().iter().filter(|c| !c.send.is_closed()).cloned().collect();
        if open.len() >= MAX_H2_CONNECTIONS
            && let Some(least) = open.iter().min_by_key(|c| c.open.load(Ordering::Acquire))
        {
            least.open.fetch_add(1, Ordering::AcqRel);
            return Ok((least.send.clone(), StreamSlot(least.clone())));
        }
        let settings = PeerSettings::new();
        let io = TokioIo::new(SettingsTap::new(self.dial(true).await?.into_inner(), settings.clone()));
        let (send, driver) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(SendError::Http)?;
        let pod = self.addr;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(%pod, error = %e, "HTTP/2 connection to the pod ended with an error");
            }
        });
        // Streams are handed out by the pod's limit, so it is known before the next one is.
        settings.wait(CONNECT_TIMEOUT).await;
        let conn = Arc::new(H2Conn { send, open: AtomicU32::new(1), settings });
        let mut conns = open;
        conns.push(conn.clone());
        self.h2.store(Arc::new(conns));
        Ok((conn.send.clone(), StreamSlot(conn)))
    }

    fn free_h2_stream(&self) -> Option<(http2::SendRequest<RequestBody>, StreamSlot)> {
        let conns = self.h2.load();
        let slot = conns.iter().filter(|c| !c.send.is_closed()).find_map(H2Conn::take_stream)?;
        Some((slot.0.send.clone(), slot))
    }

    /// HTTP/2 connections open to the pod now.
    #[cfg(test)]
    pub(crate) fn h2_connections(&self) -> usize {
        self.h2.load().iter().filter(|c| !c.send.is_closed()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::server::conn::auto;
    use tokio::net::TcpListener;

    /// A pod that counts the connections it accepts and answers each request with its Host.
    async fn pod() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let host = req.headers().get("host").cloned();
                        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                        let body =
                            format!("{} {authority}", host.map_or(String::new(), |h| h.to_str().unwrap().to_owned()));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    });
                    let _ =
                        auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        (addr, accepted)
    }

    /// An `Incoming` body is only made by hyper, so requests come from a relay server that hands
    /// each request it receives to the test.
    async fn relay()
    -> (SocketAddr, tokio::sync::mpsc::Receiver<(Request<RequestBody>, tokio::sync::oneshot::Sender<String>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let (done, answer) = tokio::sync::oneshot::channel();
                            tx.send((req.map(RequestBody::new), done)).await.unwrap();
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer.await.unwrap()))))
                        }
                    });
                    let _ =
                        auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        (addr, rx)
    }

    async fn drain(resp: Response<Incoming>) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn one_pool_per_pod_whatever_the_host_says() {
        let (pod_addr, accepted) = pod().await;
        let (relay_addr, mut requests) = relay().await;
        let client = PodClient::new(pod_addr, Transport::Plain);
        let http = reqwest_like(relay_addr);
        for port in 1..=20 {
            let sending = tokio::spawn(http(format!("svc.example:{port}")));
            let (mut req, done) = requests.recv().await.unwrap();
            // What `proxy` does: the client's `Connection: close` is about the client's connection.
            req.headers_mut().remove("connection");
            let (resp, lent) = client.send_http1(req).await.map_err(|f| f.error).unwrap();
            let body = drain(resp).await;
            assert_eq!(body, format!("svc.example:{port} "), "the Host reaches the pod as the client sent it");
            client.give_back(lent);
            done.send(body).unwrap();
            sending.await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "twenty Hosts, one pod connection");
        assert_eq!(client.idle(), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_hands_the_request_back() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let (relay_addr, mut requests) = relay().await;
        let http = reqwest_like(relay_addr);
        let sending = tokio::spawn(http("svc".to_owned()));
        let (req, done) = requests.recv().await.unwrap();
        let failed = PodClient::new(closed, Transport::Plain).send_http1(req).await.err().expect("nobody listens");
        assert!(matches!(failed.error, SendError::Connect(_)), "{:?}", failed.error);
        assert!(failed.unsent.is_some(), "nothing was written, so the request can go elsewhere");
        done.send(String::new()).unwrap();
        sending.await.unwrap();
    }

    /// An HTTP/2 pod that allows `streams` at once per connection and answers each request
    /// with a permit of `answer`; it counts the connections it accepts.
    async fn h2_pod(streams: u32, answer: Arc<tokio::sync::Semaphore>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| {
                        let answer = answer.clone();
                        async move {
                            answer.acquire().await.unwrap().forget();
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    builder.max_concurrent_streams(streams);
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        (addr, accepted)
    }

    /// As Go's transport: a pod at its limit of concurrent streams gets another connection
    /// rather than streams queued on the one there is (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[tokio::test]
    async fn a_pod_at_its_stream_limit_gets_another_connection() {
        let answer = Arc::new(tokio::sync::Semaphore::new(0));
        let (pod_addr, accepted) = h2_pod(2, answer.clone()).await;
        let client = Arc::new(PodClient::new(pod_addr, Transport::Plain));
        let (relay_addr, mut requests) = relay().await;
        let http = reqwest_like(relay_addr);
        let mut sending = Vec::new();
        let mut exchanges = Vec::new();
        for i in 0..4 {
            sending.push(tokio::spawn(http(format!("svc-{i}"))));
            let (mut req, done) = requests.recv().await.unwrap();
            *req.version_mut() = http::Version::HTTP_2;
            *req.uri_mut() = format!("http://{pod_addr}/").parse().unwrap();
            req.headers_mut().remove("connection");
            req.headers_mut().remove("host");
            let sender = client.clone();
            exchanges.push(tokio::spawn(async move {
                let (resp, lent) = sender.send_http2(req).await.map_err(|f| f.error).unwrap();
                let body = drain(resp).await;
                drop(lent);
                done.send(body).unwrap();
            }));
            // The first connection's SETTINGS arrive with its handshake; wait for each stream to
            // be open before the next, so the count is the pool's choice, not a race.
            while client.h2.load().iter().map(|c| c.open.load(Ordering::Acquire)).sum::<u32>() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(client.h2_connections(), 2, "four streams, two allowed per connection");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        answer.add_permits(4);
        for exchange in exchanges {
            exchange.await.unwrap();
        }
        for s in sending {
            s.await.unwrap();
        }
        let streams: u32 = client.h2.load().iter().map(|c| c.open.load(Ordering::Acquire)).sum();
        assert_eq!(streams, 0, "every stream is free again once its exchange ended");
    }

    /// A client of the relay: a raw HTTP/1.1 GET with the given Host.
    fn reqwest_like(
        relay: SocketAddr,
    ) -> impl Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        move |host: String| {
            Box::pin(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut stream = TcpStream::connect(relay).await.unwrap();
                let req = format!("GET /x HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
                stream.write_all(req.as_bytes()).await.unwrap();
                let mut out = Vec::new();
                stream.read_to_end(&mut out).await.unwrap();
            })
        }
    }
}
