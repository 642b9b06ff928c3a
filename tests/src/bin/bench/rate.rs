//! Latency at a constant request rate, as wrk2 measures it (Debian's wrk has no `-R`): requests
//! are due at fixed intervals whatever the server does, and each latency counts from the moment
//! its request was due, so a server that stalls is charged for every request it held up (no
//! coordinated omission). A request whose connection was free when it was due counts from when it
//! was sent instead: the generator's own timer lateness is not the server's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// Connections the requests are spread over: enough for the rate times the worst latency.
const CONNECTIONS: usize = 64;

/// The latencies of one run, sorted, in microseconds, and how many requests failed.
pub struct Latencies {
    pub sorted_us: Vec<f64>,
    pub failed: u64,
}

impl Latencies {
    /// The latency below which `p` (0..=1) of the requests finished.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.sorted_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.sorted_us.len() as f64 * p).ceil() as usize).clamp(1, self.sorted_us.len());
        self.sorted_us[rank - 1]
    }
}

/// `GET /incr` to `addr` at `rate` requests per second for `duration`.
pub async fn run(addr: SocketAddr, rate: f64, duration: Duration) -> Latencies {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (duration.as_secs_f64() * rate) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failed = 0;
                let Ok(mut conn) = connect(addr).await else { return (latencies, u64::MAX) };
                let mut free_since = Instant::now();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let due = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
                    tokio::time::sleep_until(due).await;
                    let sent = Instant::now();
                    // Held up by this connection's previous request: the server's doing, counted
                    // from when it was due. Otherwise from when it went out.
                    let from = if free_since > due { due } else { sent };
                    let req = http::Request::get("/incr").header("host", "bench.test").body(Empty::<Bytes>::new());
                    let answered = match req {
                        Ok(req) if conn.ready().await.is_ok() => match conn.send_request(req).await {
                            Ok(resp) => resp.into_body().collect().await.is_ok(),
                            Err(_) => false,
                        },
                        _ => false,
                    };
                    free_since = Instant::now();
                    if answered {
                        latencies.push(free_since.duration_since(from).as_secs_f64() * 1e6);
                    } else {
                        failed += 1;
                        match connect(addr).await {
                            Ok(fresh) => conn = fresh,
                            Err(_) => break,
                        }
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total as usize);
    let mut failed = 0u64;
    for task in tasks {
        let (latencies, lost) = task.await.unwrap_or_default();
        all.extend(latencies);
        failed = failed.saturating_add(lost);
    }
    all.sort_by(f64::total_cmp);
    Latencies { sorted_us: all, failed }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
