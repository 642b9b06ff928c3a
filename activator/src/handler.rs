//! The request path, from a parsed request to a response: probes, resolving the target service,
//! choosing the revision, admission by the revision's throttler, forwarding, accounting.
//!
//! Owns the status codes the activator answers by itself. Reads the topology through one
//! snapshot load per request and never blocks on a topology update.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::HeaderName;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::probes::{self, Health, reply};
use crate::proxy::{self, ResponseBody};
use crate::stats::Stats;
use crate::throttle::{AcquireError, Want};
use crate::topology::{Revision, Snapshot};

const KNATIVE_REVISION: HeaderName = HeaderName::from_static("knative-serving-revision");
const KNATIVE_NAMESPACE: HeaderName = HeaderName::from_static("knative-serving-namespace");

/// Seconds a client is asked to wait after a 503 for a full queue.
const RETRY_AFTER_SECONDS: &str = "1";

pub struct Handler {
    pub topology: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<Health>,
    pub stats: Stats,
}

impl Handler {
    pub async fn handle(&self, mut req: Request<Incoming>, client: SocketAddr) -> Response<ResponseBody> {
        let started = Instant::now();
        if let Some(resp) = probes::answer(&mut req, &self.health) {
            return resp;
        }
        let revision = match resolve(&self.topology.load(), &req) {
            Ok(revision) => revision,
            Err(message) => {
                self.stats.unrouted(StatusCode::NOT_FOUND.as_u16(), started.elapsed());
                return reply(StatusCode::NOT_FOUND, &message);
            }
        };
        let stats = &revision.stats;
        stats.in_flight.inc();
        let resp = match tokio::time::timeout(revision.timeout, forward(req, &revision, client)).await {
            Ok(resp) => resp,
            Err(_) => reply(StatusCode::GATEWAY_TIMEOUT, "activator request timeout"),
        };
        stats.in_flight.dec();
        stats.record(resp.status().as_u16(), started.elapsed());
        resp
    }
}

/// Which revision serves the request: the one the ingress named, or the weighted split of the
/// service the `Host` reaches. The `Host` chooses a service, never an address.
fn resolve<B>(snapshot: &Snapshot, req: &Request<B>) -> Result<Arc<Revision>, String> {
    let headers = req.headers();
    if let (Some(ns), Some(name)) = (headers.get(KNATIVE_NAMESPACE), headers.get(KNATIVE_REVISION)) {
        let (ns, name) = (String::from_utf8_lossy(ns.as_bytes()), String::from_utf8_lossy(name.as_bytes()));
        return match snapshot.revision(&ns, &name) {
            Some((_, revision)) => Ok(revision.clone()),
            None => Err(format!("revision {ns}/{name} not found")),
        };
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    match snapshot.service_for_host(host) {
        Some(service) => Ok(service.split(fastrand::u32(..100)).clone()),
        None => Err(format!("no service for host {host:?}")),
    }
}

async fn forward(req: Request<Incoming>, revision: &Revision, client: SocketAddr) -> Response<ResponseBody> {
    let lease = match revision.throttler.acquire(Want::Any).await {
        Ok(lease) => lease,
        Err(AcquireError::NoReadyPods) => {
            let message = format!("no ready endpoint for revision {}/{}", revision.namespace, revision.name);
            return reply(StatusCode::SERVICE_UNAVAILABLE, &message);
        }
        Err(AcquireError::QueueFull) => {
            let message = format!("request queue of revision {}/{} is full", revision.namespace, revision.name);
            let mut resp = reply(StatusCode::SERVICE_UNAVAILABLE, &message);
            resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
            return resp;
        }
    };
    match proxy::forward(req, lease, client.ip()).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(revision = %revision.name, error = %e, "proxy error");
            reply(StatusCode::BAD_GATEWAY, &e.to_string())
        }
    }
}
