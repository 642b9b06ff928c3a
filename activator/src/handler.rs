//! The request path, from a parsed request to a response: probes, resolving the target service,
//! extracting affinity ids, looking up their pins, the decision, admission by the revision's
//! throttler, pinning the session to its pod, forwarding, accounting.
//!
//! Owns the status codes the activator answers by itself. Reads the topology through one
//! snapshot load per request and never blocks on a topology update.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::affinity::{Decision, Keys, Lookup, PinWrite, decide, extract, follow_flow_winner};
use crate::autoscaler::{InFlight, Reporter};
use crate::body::ResponseBody;
use crate::headers::{DECISION, KNATIVE_NAMESPACE, KNATIVE_REVISION};
use crate::health::Health;
use crate::pins::{Pin, Pins};
use crate::probes;
use crate::proxy::{self, Exchange};
use crate::respond::{self, reply};
use crate::server::H2_STREAM_WINDOW;
use crate::stats::Stats;
use crate::throttle::{AcquireError, Want};
use crate::world::{Revision, Service, Snapshot};

/// The most of an HTTP/1.1 request body a waiting request can make the activator hold: what
/// arrived with the headers in hyper's read buffer. The rest waits in the client's socket.
const HTTP1_READ_AHEAD: u64 = 64 * 1024;

pub struct Handler {
    pub world: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<Health>,
    pub stats: Stats,
    pub pins: Pins,
    pub reporter: Reporter,
    /// Adds `X-Activator-Decision` to responses.
    pub debug_headers: bool,
    /// Upgraded connections (websockets), which outlive their requests and the HTTP connections
    /// they came on; shutdown waits for them too.
    pub tunnels: TaskTracker,
}

/// A request resolved to its service, with its ids and what the pin table says about them.
struct Routed {
    service: Arc<Service>,
    keys: Keys,
    lookup: Lookup,
}

impl Handler {
    pub async fn handle(&self, mut req: Request<Incoming>, client: SocketAddr) -> Response<ResponseBody> {
        let started = Instant::now();
        if let Some(resp) = probes::answer(&mut req, &self.health) {
            return resp;
        }
        let (service, ingress_pick) = match resolve(&self.world.load(), &req) {
            Ok(target) => target,
            Err(message) => return self.unrouted(StatusCode::NOT_FOUND, &message, started),
        };
        let keys = match extract(&service.affinity, &req) {
            Ok(keys) => keys,
            Err(e) => return self.unrouted(StatusCode::BAD_REQUEST, &e.to_string(), started),
        };
        let lifetime_of = |revision: &str| service.lifetime_of(revision);
        let (session, flow) = self.pins.lookup(keys.session.as_ref(), keys.flow.as_ref(), &lifetime_of).await;
        let lookup = Lookup { has_session: keys.session.is_some(), has_flow: keys.flow.is_some(), session, flow };
        let mut decision = decide(&service, ingress_pick.as_ref(), &lookup, fastrand::u32(..100));
        if let (Some(key), Some(write)) = (&keys.flow, &decision.flow_write) {
            let ours = Pin::flow(&decision.revision.name);
            let lifetime = decision.revision.affinity.lifetime();
            let winner = self.pins.write(key, write.expected(), ours, lifetime, &lifetime_of).await;
            follow_flow_winner(&mut decision, &service, &lookup, &winner);
        }

        let revision = decision.revision.clone();
        let origin = decision.origin;
        let routed = Routed { service, keys, lookup };
        let in_flight = self.reporter.arrive(&revision.concurrency);
        // The revision's timeout runs from arrival: queueing, the pod's answer and its body.
        let mut deadline = Box::pin(tokio::time::sleep_until(started + revision.timeout));
        let mut resp = tokio::select! {
            resp = self.forward(req, &routed, decision, client, in_flight) => resp,
            () = deadline.as_mut() => respond::timed_out(),
        };
        resp.body_mut().cut_at(deadline);
        revision.stats.record(resp.status().as_u16(), started.elapsed());
        let headers = resp.headers_mut();
        if let Some(cookie) = &routed.keys.new_cookie
            && let Ok(value) = HeaderValue::try_from(cookie.header_value(revision.affinity.lifetime().max_age))
        {
            headers.append(http::header::SET_COOKIE, value);
        }
        if self.debug_headers {
            headers.insert(DECISION, HeaderValue::from_static(origin.as_str()));
        }
        resp
    }

    fn unrouted(&self, status: StatusCode, message: &str, started: Instant) -> Response<ResponseBody> {
        self.stats.unrouted(status.as_u16(), started.elapsed());
        reply(status, message)
    }

    /// Takes a slot on the decided pod, pins the session to it, and forwards.
    async fn forward(
        &self,
        req: Request<Incoming>,
        routed: &Routed,
        decision: Decision,
        client: SocketAddr,
        mut in_flight: InFlight,
    ) -> Response<ResponseBody> {
        // What the request may make the activator buffer while it waits: its body, but no more
        // than the connection reads ahead before the client has to wait.
        let body_bytes = {
            let hint = http_body::Body::size_hint(req.body());
            let declared = hint.exact().or(hint.upper()).unwrap_or(u64::MAX);
            let read_ahead =
                if req.version() == Version::HTTP_2 { u64::from(H2_STREAM_WINDOW) } else { HTTP1_READ_AHEAD };
            declared.min(read_ahead)
        };
        let mut revision = decision.revision;
        let mut lease = match revision.throttler.acquire(decision.want, body_bytes).await {
            Ok(lease) => lease,
            Err(e) => return refused(&revision, e),
        };
        if let Some(key) = &routed.keys.session {
            let ours = Pin::session(&revision.name, lease.pod().addr);
            // Also re-pin when the pinned pod left between the decision and the acquire.
            let write = decision.session_write.or_else(|| match &routed.lookup.session {
                Some(current) if *current != ours => Some(PinWrite::Replace(current.clone())),
                _ => None,
            });
            if let Some(write) = write {
                let lifetime = revision.affinity.lifetime();
                // An id the activator made up for a client without its cookie is pinned only
                // briefly until the client shows it keeps cookies, so clients that never send
                // cookies back (bots, health checks) do not fill the pin table.
                let lifetime = if routed.keys.new_cookie.is_some() { lifetime.provisional() } else { lifetime };
                let lifetime_of = |revision: &str| routed.service.lifetime_of(revision);
                let winner = self.pins.write(key, write.expected(), ours.clone(), lifetime, &lifetime_of).await;
                if winner != ours {
                    match routed
                        .service
                        .routes_to(&winner.revision)
                        .filter(|r| winner.pod.is_some_and(|p| r.throttler.is_ready(p)))
                    {
                        // Another request or replica pinned the session first: use its pod, as
                        // every replica will.
                        Some(pinned) => {
                            drop(lease);
                            if !Arc::ptr_eq(pinned, &revision) {
                                in_flight = self.reporter.redirect(in_flight, &pinned.concurrency);
                            }
                            revision = pinned.clone();
                            let pod = winner.pod.expect("checked above");
                            lease = match revision.throttler.acquire(Want::Pod(pod), body_bytes).await {
                                Ok(lease) => lease,
                                Err(e) => return refused(&revision, e),
                            };
                        }
                        // The pin already there points at a pod or revision that is gone: ours
                        // replaces it now, so the session does not move on its next request.
                        None => {
                            self.pins.write(key, Some(&winner), ours, lifetime, &lifetime_of).await;
                        }
                    }
                }
            }
        }
        let exchange = Exchange { lease, in_flight, client_ip: client.ip(), tunnels: &self.tunnels };
        match proxy::forward(req, exchange).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(revision = %revision.name, error = %e, "proxy error");
                respond::bad_gateway(&e)
            }
        }
    }
}

/// Which service the request is for, and the revision the ingress named if it did. The `Host`
/// chooses a service, never an address.
fn resolve<B>(snapshot: &Snapshot, req: &Request<B>) -> Result<(Arc<Service>, Option<Arc<Revision>>), String> {
    let headers = req.headers();
    if let (Some(ns), Some(name)) = (headers.get(KNATIVE_NAMESPACE), headers.get(KNATIVE_REVISION)) {
        let (ns, name) = (String::from_utf8_lossy(ns.as_bytes()), String::from_utf8_lossy(name.as_bytes()));
        return match snapshot.revision(&ns, &name) {
            Some((service, revision)) => Ok((service.clone(), Some(revision.clone()))),
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
        Some(service) => Ok((service.clone(), None)),
        None => Err(format!("no service for host {host:?}")),
    }
}

fn refused(revision: &Revision, error: AcquireError) -> Response<ResponseBody> {
    match error {
        AcquireError::QueueFull => respond::queue_full(&revision.namespace, &revision.name),
    }
}
