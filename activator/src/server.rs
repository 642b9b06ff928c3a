//! The data-plane listener: accepts connections up to a bound, serves HTTP/1.1 (with upgrades)
//! and h2c prior knowledge on one port, closes connections that stay idle, and drains on
//! shutdown (upgraded connections included).
//!
//! Owns connection lifetimes only; every request goes to the `handler`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use crate::handler::{H2_STREAM_WINDOW, Handler};
use crate::socket::{SendTimeout, keep_alive};

/// Pause after a failed accept (for example out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 pings keep connections through middleboxes alive and find dead peers.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Streams one HTTP/2 connection may have open at once (Go's default, which upstream serves with).
const H2_MAX_STREAMS: u32 = 250;
/// The most header bytes one HTTP/2 request may send (Envoy's default is 60 KiB, nginx's 32 KiB):
/// enough for large cookies and tokens, and a bound on what one connection can make us hold.
const H2_MAX_HEADER_LIST: u32 = 64 << 10;

/// How connections are bounded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
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
/// open connections and upgraded tunnels finish for at most `grace`.
pub async fn serve(
    listeners: Vec<TcpListener>,
    handler: Arc<Handler>,
    stop_accepting: impl Future<Output = ()>,
    grace: Duration,
    limits: Limits,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST);
    let (shutdown, shutting_down) = watch::channel(false);
    let acceptor = Arc::new(Acceptor {
        builder,
        handler: handler.clone(),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        at_limit: AtomicBool::new(false),
        limits,
        shutting_down,
        connections: TaskTracker::new(),
    });
    let accepting = TaskTracker::new();
    for listener in listeners {
        accepting.spawn(acceptor.clone().accept(listener));
    }
    accepting.close();
    stop_accepting.await;
    let _ = shutdown.send(true);
    // The accept loops drop their listeners as they see the shutdown.
    accepting.wait().await;
    tracing::info!("stopped accepting; waiting for open requests and upgraded connections to finish");
    acceptor.connections.close();
    handler.tunnels.close();
    let drained = async {
        acceptor.connections.wait().await;
        handler.tunnels.wait().await;
    };
    tokio::select! {
        () = drained => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace timeout expired with connections still open"),
    }
}

/// What every accept loop shares: the connection bound, the shutdown signal, the open connections.
struct Acceptor {
    builder: auto::Builder<TokioExecutor>,
    handler: Arc<Handler>,
    slots: Arc<Semaphore>,
    /// Set while at the connection bound, so it is logged once per episode.
    at_limit: AtomicBool,
    limits: Limits,
    shutting_down: watch::Receiver<bool>,
    connections: TaskTracker,
}

impl Acceptor {
    async fn accept(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.shutting_down.clone();
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    self.at_limit.store(false, Ordering::Relaxed);
                    slot
                }
                Err(_) => {
                    if !self.at_limit.swap(true, Ordering::Relaxed) {
                        self.handler.stats.connection_limit_reached.inc();
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
            self.serve_connection(stream, client, slot);
        }
    }

    fn serve_connection(
        &self,
        stream: tokio::net::TcpStream,
        client: std::net::SocketAddr,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        keep_alive(&stream);
        let started = Arc::new(AtomicU64::new(0));
        let service = {
            let (handler, started) = (self.handler.clone(), started.clone());
            service_fn(move |req| {
                started.fetch_add(1, Ordering::Relaxed);
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, client).await) }
            })
        };
        let io = TokioIo::new(SendTimeout::new(stream, self.limits.send_timeout));
        let conn = self.builder.serve_connection_with_upgrades(io, service).into_owned();
        let mut shutting_down = self.shutting_down.clone();
        let (idle_timeout, header_read_timeout) = (self.limits.idle_timeout, self.limits.header_read_timeout);
        let open = self.handler.stats.open_connections.clone();
        open.inc();
        self.connections.spawn(async move {
            tokio::pin!(conn);
            let mut idle_check = Box::pin(tokio::time::sleep(header_read_timeout.min(idle_timeout)));
            let mut seen = 0;
            let mut closing = false;
            let ended = loop {
                tokio::select! {
                    ended = conn.as_mut() => break ended,
                    () = stopped(&mut shutting_down), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = idle_check.as_mut(), if !closing => {
                        let now = started.load(Ordering::Relaxed);
                        if now == seen {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        seen = now;
                        idle_check.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%client, error = %e, "connection ended with an error");
            }
            open.dec();
            drop(slot);
        });
    }
}

/// Until the shutdown signal is up.
async fn stopped(signal: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once shutdown is over anyway.
    let _ = signal.wait_for(|stop| *stop).await;
}
