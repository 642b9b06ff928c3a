//! Which pods of a revision are ready: a new pod takes traffic once its readiness probe
//! succeeds, as Knative's activator does before Kubernetes marks a pod ready, and so does a pod
//! that refused a connection, once it accepts one again. One task probes
//! every revision's waiting pods in parallel every probe period. When no pod answers and every
//! failure is one a service mesh would cause (no connection, or a 502/503 from a sidecar), the
//! revision's private Service is probed instead, and traffic goes through it if it answers.
//!
//! Owns the probe requests only; what is ready, and how traffic reaches it, lives in `throttle`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderValue, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::headers::{NETWORK_PROBE, PASSTHROUGH_LB};
use crate::throttle::{Probe, Throttler};

const PROBE_USER_AGENT: HeaderValue = HeaderValue::from_static("Knative-Activator-Probe");

/// How often waiting pods are probed, and how long one probe may take (upstream's
/// `PROBE_FREQUENCY` and `PROBE_TIMEOUT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTiming {
    pub period: Duration,
    pub timeout: Duration,
}

impl Default for ProbeTiming {
    fn default() -> Self {
        ProbeTiming { period: Duration::from_millis(200), timeout: Duration::from_millis(300) }
    }
}

/// Hands revisions with unprobed pods to the probing task.
#[derive(Clone)]
pub struct Prober {
    watch: mpsc::UnboundedSender<Arc<Throttler>>,
}

impl Prober {
    /// Starts the probing task on the current runtime.
    pub fn start(timing: ProbeTiming) -> Self {
        let (watch, revisions) = mpsc::unbounded_channel();
        tokio::spawn(probe_loop(revisions, timing));
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

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ready,
    /// Not ready; `mesh_like` when the failure is one a mesh's sidecar would cause.
    NotReady {
        mesh_like: bool,
    },
}

type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

async fn probe_loop(mut revisions: mpsc::UnboundedReceiver<Arc<Throttler>>, timing: ProbeTiming) {
    let client: ProbeClient = Client::builder(TokioExecutor::new()).build_http();
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
        futures_util::future::join_all(watched.iter().map(|t| probe_revision(&client, t, timing.timeout))).await;
        watched.retain(|t| t.probe_plan().is_some());
        tokio::time::sleep(timing.period).await;
    }
}

/// Probes a revision's waiting pods in parallel, then, if its plan says so, its private Service.
async fn probe_revision(client: &ProbeClient, throttler: &Throttler, timeout: Duration) {
    let Some(plan) = throttler.probe_plan() else { return };
    let how = &plan.probe;
    let outcomes = futures_util::future::join_all(plan.pods.iter().map(|addr| async move {
        let outcome = probe(client, *addr, how, timeout).await;
        if outcome == Outcome::Ready {
            throttler.mark_ready(*addr);
        }
        outcome
    }))
    .await;
    // Upstream falls back to the Service only when no pod passed and nothing says "no mesh here".
    let only_mesh_failures = outcomes.iter().all(|o| *o == Outcome::NotReady { mesh_like: true });
    if let Some(service) = plan.cluster_ip
        && only_mesh_failures
        && probe(client, service, how, timeout).await == Outcome::Ready
    {
        tracing::info!(%service, "pods do not answer directly (a mesh?); sending traffic through the private Service");
        throttler.mark_cluster_ip_ready(service);
    }
}

async fn probe(client: &ProbeClient, addr: SocketAddr, probe: &Probe, timeout: Duration) -> Outcome {
    let (path, queue, passthrough) = match probe {
        // Such pods are trusted when listed; one reaches the prober only after it refused a
        // connection, so the question is whether it accepts one again.
        Probe::None => return accepts_connections(addr, timeout).await,
        Probe::Http { path } => (path, false, None),
        Probe::Queue { path, passthrough_host } => (path, true, passthrough_host.as_deref()),
    };
    let mut req = Request::get(format!("http://{addr}{path}")).header(USER_AGENT, PROBE_USER_AGENT);
    if queue {
        req = req.header(NETWORK_PROBE, "queue");
    }
    if let Some(host) = passthrough {
        req = req.header(HOST, host).header(PASSTHROUGH_LB, "true");
    }
    let Ok(req) = req.body(Empty::new()) else { return Outcome::NotReady { mesh_like: false } };
    let answered = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status();
        let mesh_like = matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE);
        let ready = if queue {
            let body = Limited::new(resp.into_body(), 64).collect().await.ok()?.to_bytes();
            status == StatusCode::OK && body == "queue"
        } else {
            status.is_success()
        };
        Some(if ready { Outcome::Ready } else { Outcome::NotReady { mesh_like } })
    };
    // No answer at all is what a mesh that blocks direct pod traffic looks like, too.
    tokio::time::timeout(timeout, answered).await.ok().flatten().unwrap_or(Outcome::NotReady { mesh_like: true })
}

async fn accepts_connections(addr: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::Ready,
        _ => Outcome::NotReady { mesh_like: false },
    }
}
