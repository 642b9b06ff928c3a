//! The data-plane listener: accepts connections up to a bound, serves HTTP/1.1 (with upgrades)
//! and h2c prior knowledge on one port, closes connections that stay idle, and drains on
//! shutdown (upgraded connections included).
//!
//! Every connection may be held for as long as its revision takes to scale from zero, so what one
//! costs while it waits is kept small: the protocol is told from peeked bytes, hyper's room for
//! a request is a pointer until a request comes, and the connection is not held twice.
//!
//! Owns connection lifetimes only; every request goes to the `handler`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::Either;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use crate::handler::{H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, Handler, Inflow};
use crate::metrics::Registrar;
use crate::socket::{self, SendTimeout, keep_alive};
use crate::tls::{HandshakeFailures, InternalTls, Peer, ServerSettings};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Pause after a failed accept (for example out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 pings keep connections through middleboxes alive and find dead peers.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Streams one HTTP/2 connection may have open at once (Go's default, which upstream serves with).
const H2_MAX_STREAMS: u32 = 250;
/// The most header bytes one HTTP/2 request may send (Envoy's default is 60 KiB, nginx's 32 KiB):
/// enough for large cookies and tokens, and a bound on what one connection can make us hold.
const H2_MAX_HEADER_LIST: u32 = 64 << 10;
/// The client preface of HTTP/2 (RFC 9113 §3.4), with which an h2c prior-knowledge client begins.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A listener, and for the TLS port (system-internal TLS) what it serves with.
pub(crate) struct Listener {
    pub socket: TcpListener,
    pub tls: Option<TlsServing>,
}

/// What the TLS port serves with: the certificates of system-internal TLS as the watches last
/// gave them, and `ACTIVATOR_TLS_*`. It takes connections only while TLS is enabled and a
/// certificate is there; others are closed at once.
#[derive(Clone)]
pub(crate) struct TlsServing {
    pub tls: Arc<InternalTls>,
    pub settings: ServerSettings,
}

/// Client connections open and turned away, and TLS handshakes that failed.
#[derive(Clone)]
pub(crate) struct ConnectionMetrics {
    open: IntGauge,
    limit_reached: IntCounter,
    handshakes_failed: HandshakeFailures,
}

impl ConnectionMetrics {
    pub(crate) fn register(reg: &Registrar, handshakes_failed: HandshakeFailures) -> Self {
        ConnectionMetrics {
            open: reg.gauge("activator_open_connections", "Client connections open on the data port"),
            limit_reached: reg.counter(
                "activator_connection_limit_reached_total",
                "Times the data port reached --max-connections and left new connections in the listen backlog",
            ),
            handshakes_failed,
        }
    }
}

/// How connections are bounded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may accept no byte of a response before its connection is closed.
    pub send_timeout: Duration,
    /// A connection on which no request starts for this long is closed gracefully (HTTP/2
    /// connections and ones that never sent a request; hyper closes idle HTTP/1.1 ones sooner).
    pub idle_timeout: Duration,
    /// Upstream's `ReadHeaderTimeout`: a client that has not finished its request's headers this
    /// long after it started them (or after its connection opened) is dropped.
    pub header_read_timeout: Duration,
}

/// Serves every listener with the same handling until `stop_accepting` completes, then lets
/// open connections and upgraded tunnels finish: for at most `grace` when one is set, else for as
/// long as they take, as upstream's `Shutdown` (the pod's `terminationGracePeriodSeconds` is then
/// the bound, and no request it allows is cut before it).
pub(crate) async fn serve(
    listeners: Vec<Listener>,
    handler: Arc<Handler>,
    stop_accepting: impl Future<Output = ()>,
    grace: Option<Duration>,
    limits: Limits,
    metrics: ConnectionMetrics,
) {
    let mut http1 = http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST);
    let (shutdown, shutting_down) = watch::channel(false);
    let acceptor = Arc::new(Acceptor {
        http1,
        http2,
        handler: handler.clone(),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        at_limit: AtomicBool::new(false),
        limits,
        metrics,
        shutting_down,
        connections: TaskTracker::new(),
    });
    let accepting = TaskTracker::new();
    for Listener { socket, tls } in listeners {
        accepting.spawn(acceptor.clone().accept(socket, tls));
    }
    accepting.close();
    stop_accepting.await;
    let _ = shutdown.send(true);
    // The accept loops drop their listeners as they see the shutdown.
    accepting.wait().await;
    tracing::info!("stopped accepting; waiting for open requests and upgraded connections to finish");
    if drain(&acceptor.connections, &handler.tunnels, grace).await {
        tracing::info!("all connections closed");
    } else {
        tracing::warn!(?grace, "grace timeout expired with connections still open");
    }
}

/// Waits for the connections and tunnels open now to end, within `grace` if there is one; `false`
/// when it ran out first.
async fn drain(connections: &TaskTracker, tunnels: &TaskTracker, grace: Option<Duration>) -> bool {
    connections.close();
    tunnels.close();
    let drained = async {
        connections.wait().await;
        tunnels.wait().await;
    };
    match grace {
        Some(grace) => tokio::time::timeout(grace, drained).await.is_ok(),
        None => {
            drained.await;
            true
        }
    }
}

/// What every accept loop shares: the connection bound, the shutdown signal, the open connections.
struct Acceptor {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    handler: Arc<Handler>,
    slots: Arc<Semaphore>,
    /// Set while at the connection bound, so it is logged once per episode.
    at_limit: AtomicBool,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutting_down: watch::Receiver<bool>,
    connections: TaskTracker,
}

impl Acceptor {
    async fn accept(self: Arc<Self>, listener: TcpListener, tls: Option<TlsServing>) {
        let mut stop = self.shutting_down.clone();
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    self.at_limit.store(false, Ordering::Relaxed);
                    slot
                }
                Err(_) => {
                    if !self.at_limit.swap(true, Ordering::Relaxed) {
                        self.metrics.limit_reached.inc();
                        tracing::warn!(
                            max_connections = self.limits.max_connections,
                            "connection limit reached: new connections wait in the listen backlog until one closes \
                             (raise --max-connections if the open-files limit allows)"
                        );
                    }
                    tokio::select! {
                        slot = self.slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                        () = stopped(&mut stop) => return,
                    }
                }
            };
            let (stream, client) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                () = stopped(&mut stop) => return,
            };
            self.serve_connection(stream, socket::canonical(client), slot, tls.clone());
        }
    }

    fn serve_connection(
        self: &Arc<Self>,
        stream: TcpStream,
        client: std::net::SocketAddr,
        slot: tokio::sync::OwnedSemaphorePermit,
        tls: Option<TlsServing>,
    ) {
        let _ = stream.set_nodelay(true);
        keep_alive(&stream);
        let open = self.metrics.open.clone();
        open.inc();
        let acceptor = self.clone();
        self.connections.spawn(async move {
            match tls {
                None => acceptor.connection(stream, client).await,
                Some(tls) => acceptor.tls_connection(stream, client, tls).await,
            }
            open.dec();
            drop(slot);
        });
    }

    /// Serves one plain connection in the protocol its first bytes ask for.
    async fn connection(&self, stream: TcpStream, client: std::net::SocketAddr) {
        let mut shutting_down = self.shutting_down.clone();
        let mut idle_check = self.first_deadline();
        let h2 = tokio::select! {
            h2 = speaks_h2(&stream) => h2,
            // Silent until the first deadline, or no request will be served: nothing to finish.
            () = idle_check.as_mut() => return,
            () = stopped(&mut shutting_down) => return,
        };
        match h2 {
            Ok(Some(h2)) => self.serve_http(stream, client, h2, idle_check).await,
            Ok(None) => {}
            Err(e) => tracing::debug!(%client, error = %e, "connection failed before its first request"),
        }
    }

    /// Serves one connection to the TLS port: the handshake (within the time a client has for
    /// its first request's headers), then HTTP/2 or HTTP/1.1 as ALPN chose.
    async fn tls_connection(&self, stream: TcpStream, client: std::net::SocketAddr, tls: TlsServing) {
        let Some(acceptor) = tls.tls.acceptor(&tls.settings) else {
            tracing::debug!(%client, "system-internal TLS is off, or has no certificate yet: closing");
            return;
        };
        let mut shutting_down = self.shutting_down.clone();
        let mut idle_check = self.first_deadline();
        let accepted = tokio::select! {
            accepted = acceptor.accept(stream) => accepted,
            () = idle_check.as_mut() => return,
            () = stopped(&mut shutting_down) => return,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                self.metrics.handshakes_failed.count(Peer::Client);
                return tracing::debug!(%client, error = %e, "TLS handshake with a client failed");
            }
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        self.serve_http(stream, client, h2, idle_check).await;
    }

    /// When a new connection that has served nothing is given up.
    fn first_deadline(&self) -> Pin<Box<tokio::time::Sleep>> {
        Box::pin(tokio::time::sleep(self.limits.header_read_timeout.min(self.limits.idle_timeout)))
    }

    /// Serves HTTP on a connection until it ends, until it stays idle, or until shutdown closes
    /// it gracefully.
    async fn serve_http<I>(
        &self,
        stream: I,
        client: std::net::SocketAddr,
        h2: bool,
        mut idle_check: Pin<Box<tokio::time::Sleep>>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut shutting_down = self.shutting_down.clone();
        let idle_timeout = self.limits.idle_timeout;
        let started = Arc::new(AtomicU64::new(0));
        let service = {
            let (handler, started) = (self.handler.clone(), started.clone());
            let inflow = h2.then(|| Arc::new(Inflow::default()));
            // hyper keeps room for one request's future per connection from the moment it opens;
            // boxed, that room is a pointer, and a request's state is allocated when it arrives.
            service_fn(move |req| -> BoxFuture<Result<_, Infallible>> {
                started.fetch_add(1, Ordering::Relaxed);
                Box::pin(handler.handle(req, client, inflow.clone()).map(Ok))
            })
        };
        let io = TokioIo::new(SendTimeout::new(stream, self.limits.send_timeout));
        // Boxed so this future does not hold the connection twice (as moved in and as pinned).
        let mut conn = Box::pin(if h2 {
            Either::Right(self.http2.serve_connection(io, service))
        } else {
            Either::Left(self.http1.serve_connection(io, service).with_upgrades())
        });
        let mut closing = false;
        let mut seen = 0;
        let ended = loop {
            let close = tokio::select! {
                ended = conn.as_mut() => break ended,
                () = stopped(&mut shutting_down), if !closing => true,
                () = idle_check.as_mut(), if !closing => {
                    let now = started.load(Ordering::Relaxed);
                    let idle = now == seen;
                    seen = now;
                    idle_check.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                    idle
                }
            };
            if close {
                closing = true;
                match conn.as_mut().as_pin_mut() {
                    Either::Left(http1) => http1.graceful_shutdown(),
                    Either::Right(http2) => http2.graceful_shutdown(),
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%client, error = %e, "connection ended with an error");
        }
    }
}

/// Whether a client speaks HTTP/2 with prior knowledge, told from its first bytes. They are
/// peeked, not read: they stay in the socket for hyper, so an HTTP/1.1 connection's read buffer
/// starts empty instead of being grown to take them back, which doubled what every held
/// HTTP/1.1 connection cost. A preface that arrived in part is waited for on the socket's
/// readiness, peeked again only when more bytes come, never on a timer (a thousand half-sent
/// prefaces cost nothing while they wait). `None`: the client closed before sending a byte.
async fn speaks_h2(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut first = [std::mem::MaybeUninit::<u8>::uninit(); H2_PREFACE.len()];
    let mut seen = 0;
    loop {
        stream.readable().await?;
        // Nothing new since the last peek: tokio clears the readiness, and the next wait lasts
        // until the client sends more (or closes).
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            #[cfg(test)]
            tests::PEEKS.with(|p| p.set(p.get() + 1));
            let n = socket2::SockRef::from(stream).peek(&mut first)?;
            if n == seen && n > 0 { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
        });
        let n = match peeked {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: `peek` initialised the first `n` bytes of `first`, and `n <= first.len()`.
        let bytes = unsafe { std::slice::from_raw_parts(first.as_ptr().cast::<u8>(), n) };
        if !H2_PREFACE.starts_with(bytes) {
            return Ok(Some(false));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(true));
        }
        seen = n;
    }
}

/// Until the shutdown signal is up.
async fn stopped(signal: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once shutdown is over anyway.
    let _ = signal.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::socket::tests::pair;

    /// Upstream's drain (`cmd/activator/main.go`) calls `Shutdown(context.Background())`: no
    /// deadline of its own, so a request the pod's grace period allows is never cut.
    #[tokio::test(start_paused = true)]
    async fn the_drain_waits_as_long_as_requests_take_unless_bounded() {
        let (connections, tunnels) = (TaskTracker::new(), TaskTracker::new());
        let long = Duration::from_secs(3600);
        connections.spawn(tokio::time::sleep(long));
        let started = tokio::time::Instant::now();
        assert!(drain(&connections, &tunnels, None).await);
        assert_eq!(started.elapsed(), long, "an hour-long request finished, far past any cap of ours");

        let (connections, tunnels) = (TaskTracker::new(), TaskTracker::new());
        tunnels.spawn(tokio::time::sleep(long));
        assert!(!drain(&connections, &tunnels, Some(Duration::from_secs(30))).await, "an operator's bound holds");
    }

    thread_local! {
        /// Peeks `speaks_h2` made on this thread.
        pub(super) static PEEKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Issue 25, item 6: a partial HTTP/2 preface is waited for on readiness; while no more
    /// bytes come, no peek is made (a timer would peek every millisecond, a thousand a second).
    #[tokio::test(start_paused = true)]
    async fn a_partial_http2_preface_does_not_busy_poll() {
        let (server, mut client) = pair().await;
        client.write_all(&H2_PREFACE[..16]).await.unwrap();
        let waiting = tokio::spawn(async move {
            let told = speaks_h2(&server).await;
            (told, PEEKS.with(std::cell::Cell::get))
        });
        // A second of (paused) time passes with the preface half-sent.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        client.write_all(&H2_PREFACE[16..]).await.unwrap();
        let (told, peeks) = waiting.await.unwrap();
        assert_eq!(told.unwrap(), Some(true));
        assert!(peeks <= 4, "{peeks} peeks for two pieces of a preface");
    }

    #[tokio::test]
    async fn the_protocol_is_told_from_first_bytes_that_stay_for_hyper() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"PUT / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(speaks_h2(&server).await.unwrap(), Some(false));
        let mut read = [0u8; 16];
        server.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"PUT / HTTP/1.1\r\n", "peeked bytes are still there to read");

        // A preface that arrives in two pieces is waited for, not taken for HTTP/1.1.
        let (mut server, mut client) = pair().await;
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        let partial = tokio::time::timeout(Duration::from_millis(50), speaks_h2(&server)).await;
        assert!(partial.is_err(), "part of a preface decides nothing");
        client.write_all(&H2_PREFACE[10..]).await.unwrap();
        assert_eq!(speaks_h2(&server).await.unwrap(), Some(true));
        let mut read = [0u8; 24];
        server.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, H2_PREFACE);

        let (server, client) = pair().await;
        drop(client);
        assert_eq!(speaks_h2(&server).await.unwrap(), None, "a client that closes at once sent nothing");
    }
}
