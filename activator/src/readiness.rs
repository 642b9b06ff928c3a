//! Which pods of a revision are ready: a new pod takes traffic once its readiness probe
//! succeeds, as Knative's activator does before Kubernetes marks a pod ready, and so does a pod
//! that refused a connection, once it accepts one again. Each revision with waiting pods has a
//! probing task of its own, which probes them in parallel at once and every probe period. When no pod answers and every
//! failure is one a service mesh would cause (no connection, or a 502/503 from a sidecar), the
//! revision's private Service is probed instead, and traffic goes through it if it answers.
//!
//! Owns the probe requests only; what is ready, and how traffic reaches it, lives in `throttle`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderValue, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use crate::headers::{NETWORK_PROBE, PASSTHROUGH_LB};
use crate::spec::Probe;
use crate::sync::lock;
use crate::throttle::Throttler;

const PROBE_USER_AGENT: HeaderValue = HeaderValue::from_static("Knative-Activator-Probe");

/// How often waiting pods are probed, and how long one probe may take (upstream's
/// `PROBE_FREQUENCY` and `PROBE_TIMEOUT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProbeTiming {
    pub period: Duration,
    pub timeout: Duration,
}

impl Default for ProbeTiming {
    fn default() -> Self {
        ProbeTiming { period: Duration::from_millis(200), timeout: Duration::from_millis(300) }
    }
}

/// Probes the waiting pods of each revision it is handed, in a task of that revision's own: at
/// once, then every probe period until none waits, and at once again whenever the revision is
/// handed over again (a pod listed, or one that refused a connection), as upstream's revision
/// watcher probes on each Endpoints update. One revision's slow probes never delay another's.
#[derive(Clone)]
pub(crate) struct Prober {
    /// `None` in tests whose probes never run.
    inner: Option<Arc<Probing>>,
}

struct Probing {
    client: ProbeClient,
    timing: ProbeTiming,
    /// The revisions being probed, by throttler, with what wakes their task early.
    revisions: Mutex<HashMap<usize, Arc<Notify>>>,
}

impl Prober {
    /// A prober whose tasks run on the current runtime.
    pub(crate) fn start(timing: ProbeTiming) -> Self {
        let client: ProbeClient = Client::builder(TokioExecutor::new()).build_http();
        Prober { inner: Some(Arc::new(Probing { client, timing, revisions: Mutex::default() })) }
    }

    /// A prober whose probes never run, for building snapshots in tests.
    #[cfg(test)]
    pub(crate) fn idle() -> Self {
        Prober { inner: None }
    }

    pub(crate) fn watch(&self, throttler: Arc<Throttler>) {
        let Some(probing) = &self.inner else { return };
        let key = Arc::as_ptr(&throttler) as usize;
        let mut revisions = lock(&probing.revisions);
        if let Some(wake) = revisions.get(&key) {
            wake.notify_one();
            return;
        }
        let wake = Arc::new(Notify::new());
        revisions.insert(key, wake.clone());
        tokio::spawn(probe_until_ready(probing.clone(), throttler, wake));
    }
}

/// Probes one revision until no pod of it waits for a probe.
async fn probe_until_ready(probing: Arc<Probing>, throttler: Arc<Throttler>, wake: Arc<Notify>) {
    let key = Arc::as_ptr(&throttler) as usize;
    loop {
        probe_revision(&probing.client, &throttler, probing.timing.timeout).await;
        if throttler.probe_plan().is_none() {
            // Under the lock `watch` takes: a pod listed meanwhile finds this task still here.
            let mut revisions = lock(&probing.revisions);
            if throttler.probe_plan().is_none() {
                revisions.remove(&key);
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(probing.timing.period) => {}
            () = wake.notified() => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Backends;
    use crate::throttle::{QueueLimits, ThrottleMetrics};
    use prometheus::IntGauge;

    /// A pod that answers `GET /healthz` with `status`, counting the probes.
    async fn pod(status: u16) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = probes.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async move {
                            let mut resp = http::Response::new(Empty::<Bytes>::new());
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        (addr, probes)
    }

    fn revision(pods: Vec<SocketAddr>) -> Arc<Throttler> {
        let gauge = |name| IntGauge::new(name, "test").unwrap();
        let metrics = ThrottleMetrics {
            queued: [gauge("q1"), gauge("q2")],
            active: gauge("a"),
            outside_subset: prometheus::IntCounter::new("o", "test").unwrap(),
        };
        let throttler = Throttler::new(0, QueueLimits::default(), metrics);
        throttler
            .set_backends(&Backends { probed: pods, ..Backends::default() }, Probe::Http { path: "/healthz".into() });
        throttler
    }

    /// Upstream probes a revision's new pods on the Endpoints update itself: a revision handed
    /// over while another's pod keeps failing is probed at once, not after a probe period.
    #[tokio::test]
    async fn a_revision_is_probed_at_once_whatever_others_wait_for() {
        let prober = Prober::start(ProbeTiming { period: Duration::from_secs(30), timeout: Duration::from_secs(1) });
        let (failing_pod, probes) = pod(503).await;
        let failing = revision(vec![failing_pod]);
        prober.watch(failing.clone());
        // Once its pod answered 503, the failing revision waits out its 30 s period.
        tokio::time::timeout(Duration::from_secs(5), async {
            while probes.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let ready = revision(vec![pod(200).await.0]);
        prober.watch(ready.clone());
        tokio::time::timeout(Duration::from_secs(5), async {
            while !ready.has_ready_pods() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("probed at once, not after the other revision's 30 s period");
        assert!(!failing.has_ready_pods());
    }
}
