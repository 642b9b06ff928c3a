//! Which endpoints of a revision are ready: a new endpoint takes traffic once its readiness
//! probe succeeds, as Knative's activator does before Kubernetes marks a pod ready. One task
//! probes every revision's waiting endpoints in parallel every `PROBE_PERIOD`.
//!
//! Owns the probe requests only; the ready set itself lives in `throttle`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::throttle::{Probe, Throttler};

/// Upstream's PROBE_FREQUENCY and PROBE_TIMEOUT.
const PROBE_PERIOD: Duration = Duration::from_millis(200);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const PROBE_USER_AGENT: HeaderValue = HeaderValue::from_static("Knative-Activator-Probe");

/// Hands revisions with unprobed endpoints to the probing task.
#[derive(Clone)]
pub struct Prober {
    watch: mpsc::UnboundedSender<Arc<Throttler>>,
}

impl Prober {
    /// Starts the probing task on the current runtime.
    pub fn start() -> Self {
        let (watch, revisions) = mpsc::unbounded_channel();
        tokio::spawn(probe_loop(revisions));
        Prober { watch }
    }

    /// A prober whose probes never run, for building snapshots in tests.
    #[cfg(test)]
    pub fn idle() -> Self {
        Prober { watch: mpsc::unbounded_channel().0 }
    }

    pub fn watch(&self, throttler: Arc<Throttler>) {
        // Only fails once the probing task is gone, that is at shutdown or in `idle`.
        let _ = self.watch.send(throttler);
    }
}

async fn probe_loop(mut revisions: mpsc::UnboundedReceiver<Arc<Throttler>>) {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut watched: Vec<Arc<Throttler>> = Vec::new();
    loop {
        if watched.is_empty() {
            match revisions.recv().await {
                Some(throttler) => watched.push(throttler),
                None => return,
            }
        }
        while let Ok(throttler) = revisions.try_recv() {
            if !watched.iter().any(|w| Arc::ptr_eq(w, &throttler)) {
                watched.push(throttler);
            }
        }
        let probes = watched.iter().flat_map(|throttler| {
            let (probe, endpoints) = throttler.pending();
            let client = &client;
            endpoints.into_iter().map(move |addr| {
                let probe = probe.clone();
                async move {
                    if is_ready(client, addr, &probe).await {
                        throttler.mark_ready(addr);
                    }
                }
            })
        });
        futures_util::future::join_all(probes).await;
        watched.retain(|t| !t.pending().1.is_empty());
        tokio::time::sleep(PROBE_PERIOD).await;
    }
}

async fn is_ready(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr, probe: &Probe) -> bool {
    let (path, queue) = match probe {
        Probe::None => return true,
        Probe::Http { path } => (path, false),
        Probe::Queue { path } => (path, true),
    };
    let mut req = Request::get(format!("http://{addr}{path}")).header(USER_AGENT, PROBE_USER_AGENT);
    if queue {
        req = req.header(crate::headers::NETWORK_PROBE, "queue");
    }
    let Ok(req) = req.body(Empty::new()) else { return false };
    let answered = async {
        let resp = client.request(req).await.ok()?;
        if !queue {
            return Some(resp.status().is_success());
        }
        let ok = resp.status() == StatusCode::OK;
        let body = Limited::new(resp.into_body(), 64).collect().await.ok()?.to_bytes();
        Some(ok && body == "queue")
    };
    tokio::time::timeout(PROBE_TIMEOUT, answered).await.ok().flatten().unwrap_or(false)
}
