//! The data-plane listener: accepts connections up to a bound, serves HTTP/1.1 (with upgrades)
//! and h2c prior knowledge on one port, closes connections that stay idle, and drains on
//! shutdown (upgraded connections included).
//!
//! Owns connection lifetimes only; every request goes to the `handler`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use crate::handler::{H2_STREAM_WINDOW, Handler};
use crate::socket::{SendTimeout, keep_alive};

/// Upstream's `ReadHeaderTimeout`: a client that never finishes its headers is dropped. hyper
/// applies it to an idle HTTP/1.1 keep-alive connection too.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a failed accept (for example out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 pings keep connections through middleboxes alive and find dead peers.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

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
}

/// Serves until `stop_accepting` completes, then lets open connections and upgraded tunnels
/// finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    stop_accepting: impl Future<Output = ()>,
    grace: Duration,
    limits: Limits,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE)
        .initial_stream_window_size(H2_STREAM_WINDOW);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (shutdown, shutting_down) = watch::channel(false);
    let connections = TaskTracker::new();
    let open = handler.stats.open_connections.clone();
    tokio::pin!(stop_accepting);
    let mut at_limit = false;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                at_limit = false;
                slot
            }
            Err(_) => {
                if !at_limit {
                    at_limit = true;
                    handler.stats.connection_limit_reached.inc();
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait in the listen backlog until one closes \
                         (raise --max-connections if the open-files limit allows)"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = &mut stop_accepting => break,
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
            () = &mut stop_accepting => break,
        };
        let _ = stream.set_nodelay(true);
        keep_alive(&stream);
        let started = Arc::new(AtomicU64::new(0));
        let service = {
            let (handler, started) = (handler.clone(), started.clone());
            service_fn(move |req| {
                started.fetch_add(1, Ordering::Relaxed);
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, client).await) }
            })
        };
        let io = TokioIo::new(SendTimeout::new(stream, limits.send_timeout));
        let conn = builder.serve_connection_with_upgrades(io, service).into_owned();
        let mut shutting_down = shutting_down.clone();
        let open = open.clone();
        open.inc();
        connections.spawn(async move {
            tokio::pin!(conn);
            let mut idle_check = Box::pin(tokio::time::sleep(HEADER_READ_TIMEOUT.min(limits.idle_timeout)));
            let mut seen = 0;
            let mut closing = false;
            let ended = loop {
                tokio::select! {
                    ended = conn.as_mut() => break ended,
                    _ = shutting_down.changed(), if !closing => {
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
                        idle_check.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
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
    drop(listener);
    tracing::info!("stopped accepting; waiting for open requests and upgraded connections to finish");
    let _ = shutdown.send(true);
    connections.close();
    handler.tunnels.close();
    let drained = async {
        connections.wait().await;
        handler.tunnels.wait().await;
    };
    tokio::select! {
        () = drained => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace timeout expired with connections still open"),
    }
}
