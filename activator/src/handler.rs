//! The request path as a list of steps, from a parsed request to a response: probes, resolving
//! the target service, reading its affinity ids, settling its route (`affinity::Pinning`),
//! admission by the revision's throttler, forwarding (`proxy`), accounting.
//!
//! Reads the world through one snapshot load per request and never blocks on a world update.
//! Where a request goes first is `affinity`'s, what the activator answers by itself is
//! `respond`'s. This file still settles what follows admission: it resolves the target service
//! from the request (`resolve`), counts the request for the split by requests, takes the slot
//! again when another writer moved the session (`Moved`), and resends to another pod when the
//! first failed before any byte reached it or, for a safe request, before any response byte.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::affinity::{Keys, Origin, Pinning, Route, chat, extract, names_its_conversation};
use crate::autoscaler::{InFlight, Reporter};
use crate::headers::{DECISION, KNATIVE_NAMESPACE, KNATIVE_REVISION, KNATIVE_TAG};
use crate::health::Health;
use crate::labelled::Labelled;
use crate::pins::Pins;
use crate::pins::{PinKey, PinSource};
use crate::probes;
use crate::proxy::{self, Exchange, Outbound, Replay};
use crate::readiness::Prober;
use crate::request_body::RequestBody;
use crate::respond::{self, reply};
use crate::response_body::ResponseBody;
use crate::retry;
use crate::stats::Stats;
use crate::stats::knative::{ClientSeries, Protocol, Scheme};
use crate::telemetry::{Ending, Entry, LoggedRoute, Outcome, Routed, Telemetry};
use crate::throttle::{AcquireError, Lease, Want};
use crate::world::{Revision, Service, Snapshot};
use prometheus::IntCounter;
use tracing::{Instrument as _, Span};

/// The most of an HTTP/1.1 request body a waiting request can make the activator hold: what
/// arrived with the headers in hyper's read buffer. The rest waits in the client's socket.
const HTTP1_READ_AHEAD: u64 = 64 * 1024;
/// The longest a chat request's body is waited for to name its conversation
/// (`sticky-session-chat-prefix`); after it, the request is routed with what arrived.
const CHAT_PREFIX_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// An HTTP/2 stream may send this much request body before the client must wait (the server's
/// stream window), which is also the most a waiting HTTP/2 request can make the activator hold.
pub const H2_STREAM_WINDOW: u32 = 1 << 20;
/// What one HTTP/2 client connection may send before the activator reads, over all its streams.
pub const H2_CONNECTION_WINDOW: u32 = 1 << 20;

pub struct Handler {
    pub world: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<Health>,
    pub stats: Stats,
    pub pins: Pins,
    pub reporter: Reporter,
    /// Probes pods taken out of rotation until they take traffic again.
    pub prober: Prober,
    /// Adds `X-Activator-Decision` to responses.
    pub debug_headers: bool,
    /// The cluster's DNS domain, for requests that name a revision by its cluster-local host.
    pub cluster_domain: String,
    /// `activator_decisions_total`, one counter per `Origin`.
    pub decisions: Labelled<Origin, IntCounter>,
    /// Spans, trace context and the request log.
    pub telemetry: Telemetry,
    /// Upgraded connections (websockets), which outlive their requests and the HTTP connections
    /// they came on; shutdown waits for them too.
    pub tunnels: TaskTracker,
}

impl Handler {
    /// A request's way through the activator: probes answered, the target resolved, its ids read,
    /// its route settled with the pins, admission by the revision's throttler, forwarding, and
    /// accounting.
    ///
    /// A request may wait long for a slot, so what its future holds is kept small: the request is
    /// boxed once here and passed down as a pointer (each async step would otherwise keep its own
    /// copy), and steps that are over before it can wait, or that only begin after, are boxed
    /// where they are awaited.
    /// `inflow` is the HTTP/2 connection's share of what its waiting requests may hold (`None`
    /// for HTTP/1.1).
    pub fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        client: SocketAddr,
        inflow: Option<Arc<Inflow>>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
        let started = Instant::now();
        if let Some(resp) = probes::answer(&mut req, &self.health) {
            return Either::Left(std::future::ready(resp));
        }
        let protocol = Protocol::of(req.method(), req.version());
        let span = self.telemetry.server_span(&req, protocol);
        let log = self.telemetry.log_entry(&req, protocol, client, &span);
        let req = Box::new(req.map(RequestBody::new));
        let arrived = Arrived { client, protocol, started, log, inflow };
        let routed = self.clone().route_and_forward(req, arrived, span.clone());
        Either::Right(routed.instrument(span))
    }

    async fn route_and_forward(
        self: Arc<Self>,
        mut req: Box<Request<RequestBody>>,
        arrived: Arrived,
        span: Span,
    ) -> Response<ResponseBody> {
        let span = &span;
        let Arrived { client, protocol, started, mut log, inflow } = arrived;
        let (service, ingress_pick) = match resolve(&self.world.load(), &req, &self.cluster_domain) {
            Ok(target) => target,
            Err(NotFound(name)) => {
                return self.unrouted(respond::revision_not_found(&name), protocol, started, span, log);
            }
        };
        if service.affinity.session_end().is_some_and(|end| end.is_addressed_by(req.uri().path())) {
            return self.unrouted(respond::forged_session_end(), protocol, started, span, log);
        }
        // A chat request's conversation is its session: its body's beginning is read to name it,
        // and goes to the pod first, the rest streaming after it.
        let conversation = if names_its_conversation(&service.affinity, &req) {
            let prefix = Box::pin(req.body_mut().read_prefix(chat::PREFIX_LIMIT, CHAT_PREFIX_WAIT)).await;
            chat::conversation_id(&prefix)
        } else {
            None
        };
        let keys = match extract(&service.affinity, &req, conversation.as_deref()) {
            Ok(keys) => keys,
            Err(e) => {
                return self.unrouted(reply(StatusCode::BAD_REQUEST, &e.to_string()), protocol, started, span, log);
            }
        };
        self.telemetry.inject(span, req.headers_mut());
        let (pinning, mut route) = Box::pin(Pinning::route(&self.pins, &service, &keys, ingress_pick.as_ref())).await;
        if service.affinity.split_by_requests() {
            route.revision.served.record();
        }
        let in_flight = self.reporter.arrive(&route.revision.concurrency);
        // The revision's timeouts run from arrival, queueing included, as upstream's: the whole
        // exchange, the wait for the response to start, and pauses in its body.
        let mut deadline = Box::pin(tokio::time::sleep_until(started + route.revision.config.timeout));
        let first_byte = route.revision.config.response_start_timeout.map(|t| started + t);
        let request_bytes = req.body_mut().counted();
        let mut exchange = None;
        let mut resp = tokio::select! {
            resp = self.admit_and_forward(req, &pinning, &mut route, in_flight, (client, inflow), &mut exchange) => resp,
            () = deadline.as_mut() => respond::timed_out(),
            () = sleep_until_some(first_byte) => respond::timed_out(),
        };
        resp.body_mut().cut_at(deadline);
        if let Some(idle) = route.revision.config.idle_timeout {
            resp.body_mut().cut_when_idle(idle);
        }
        let (status, elapsed) = (resp.status().as_u16(), started.elapsed());
        let server = route.revision.stats.record(status, protocol, elapsed);
        route.revision.stats.queue_wait.observe(route.queued.as_secs_f64());
        self.decisions.get(route.origin).inc();
        self.annotate(&mut resp, &keys, &route);
        if self.telemetry.wants_outcome(span) {
            let revision = &route.revision;
            let routed = Routed {
                namespace: &revision.namespace,
                service: &revision.service,
                revision: &revision.name,
                decision: route.origin.as_str(),
                pin_source: route.pin_source.map(PinSource::as_str),
                pod: route.pod,
                queued: route.queued,
                session: keys.session.as_ref().map(PinKey::short_hash),
                flow: keys.flow.as_ref().map(PinKey::short_hash),
            };
            self.telemetry.finish(span, &Outcome { protocol, status, elapsed, routed: Some(routed) });
        }
        if let Some(entry) = &mut log {
            let revision = &route.revision;
            entry.routed(LoggedRoute {
                namespace: revision.namespace.as_str().into(),
                service: revision.service.as_str().into(),
                configuration: revision.stats.names().configuration.as_str().into(),
                revision: revision.name.as_str().into(),
                decision: route.origin.as_str(),
                pin_source: route.pin_source.map(PinSource::as_str),
                pod: route.pod,
                queued: route.queued,
                session: keys.session.as_ref().map(PinKey::short_hash),
                flow: keys.flow.as_ref().map(PinKey::short_hash),
            });
        }
        let client_size = exchange.map(|series: ClientSeries| series.request_size);
        let ending = Ending { started, status, server, client_size, request_bytes, log };
        resp.body_mut().when_finished(self.telemetry.ending(ending));
        resp
    }

    fn unrouted(
        &self,
        resp: Response<ResponseBody>,
        protocol: Protocol,
        started: Instant,
        span: &Span,
        log: Option<Box<Entry>>,
    ) -> Response<ResponseBody> {
        let (status, elapsed) = (resp.status().as_u16(), started.elapsed());
        let size = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
        self.stats.unrouted(status, protocol, elapsed, size);
        if self.telemetry.wants_outcome(span) {
            self.telemetry.finish(span, &Outcome { protocol, status, elapsed, routed: None });
        }
        if let Some(entry) = log {
            self.telemetry.log_answered(&entry, status, size, elapsed);
        }
        resp
    }

    /// Takes a slot on a pod of the route's revision, pins the session to it (or follows the pin
    /// another writer made first), and forwards. A request none of which reached its pod (the
    /// pod refused or dropped the connection) goes to another pod of the revision, once; so does
    /// one its pod failed before answering, if it may be sent twice (`retry`). Its session is
    /// re-pinned there. `route` ends up naming the revision that answered.
    async fn admit_and_forward(
        &self,
        req: Box<Request<RequestBody>>,
        pinning: &Pinning<'_>,
        route: &mut Route,
        mut in_flight: InFlight,
        (client, inflow): (SocketAddr, Option<Arc<Inflow>>),
        exchange: &mut Option<ClientSeries>,
    ) -> Response<ResponseBody> {
        let protocol = Protocol::of(req.method(), req.version());
        // What may arrive while it waits is charged until it is admitted.
        let mut charge = waiting_body_bytes(&req, inflow.as_ref());
        let body_bytes = charge.bytes;
        let repeatable = route.revision.affinity.retry().allows(&req);
        let mut outbound = Outbound::new(req, client.ip(), &route.revision.host);
        let mut want = route.want;
        for attempt in 0..2 {
            let (lease, counted) = match self.admit(pinning, route, in_flight, want, body_bytes).await {
                Ok(admitted) => admitted,
                Err(refused) => return refused,
            };
            charge.release();
            let replay = if attempt == 0 {
                route.revision.retries.sent();
                repeatable.then(|| outbound.keep_for_replay(retry::BODY_LIMIT))
            } else {
                None
            };
            let held = Exchange { lease, in_flight: counted, tunnels: &self.tunnels };
            let sending = Instant::now();
            let forwarded = Box::pin(proxy::forward(outbound, held)).await;
            let code = forwarded.as_ref().ok().map(|resp| resp.status().as_u16());
            let series = route.revision.stats.client(code, protocol, Scheme::Http);
            series.duration.observe(sending.elapsed().as_secs_f64());
            *exchange = Some(series);
            let failed = match forwarded {
                Ok(resp) => return resp,
                Err(failed) => failed,
            };
            let revision = &route.revision;
            tracing::warn!(revision = %revision.name, error = %failed.error, "proxy error");
            if failed.error.is_tls() {
                self.stats.tls_refused.with_label_values(&["pod"]).inc();
            }
            if attempt > 0 {
                return respond::bad_gateway(&failed.error);
            }
            // A pod whose connection was refused, or failed mid-exchange, takes no more traffic
            // until a probe passes.
            if (failed.unsent.is_some() || failed.error.connection_failed())
                && revision.throttler.mark_unreachable(failed.error.pod)
            {
                revision.stats.unreachable.inc();
                self.prober.watch(revision.throttler.clone());
            }
            (outbound, in_flight) = match failed.unsent {
                // Resent only to a pod that is up now: with none left the client hears at once,
                // as upstream answers, rather than waiting for the revision's timeout.
                Some(unsent) if revision.throttler.has_ready_pods() => {
                    revision.stats.resent.inc();
                    (unsent.outbound, unsent.in_flight)
                }
                Some(_) => return respond::bad_gateway(&failed.error),
                None => match replay.map(|kept| self.retry(revision, kept)) {
                    Some(Ok(outbound)) => (outbound, self.reporter.arrive(&revision.concurrency)),
                    Some(Err(())) | None => return respond::bad_gateway(&failed.error),
                },
            };
            want = route.elsewhere();
        }
        unreachable!("the second attempt returns")
    }

    /// The request `kept` again, for another pod of `revision` after its pod failed it, if its
    /// body was kept, another pod is ready and the revision's budget allows; counted either way.
    fn retry(&self, revision: &Revision, kept: Option<Replay>) -> Result<Outbound, ()> {
        let outbound = kept.and_then(Replay::outbound);
        let outcome = match &outbound {
            None => retry::Outcome::NotKept,
            Some(_) if !revision.throttler.has_ready_pods() => retry::Outcome::NoPod,
            Some(_) if !revision.retries.try_retry() => retry::Outcome::OverBudget,
            Some(_) => retry::Outcome::Retried,
        };
        revision.stats.retried.get(outcome).inc();
        outbound.filter(|_| outcome == retry::Outcome::Retried).ok_or(())
    }

    /// A slot on a pod of the route's revision, with the session pinned to that pod; or on the pod
    /// another writer pinned it to first, whose revision `route` then names.
    async fn admit(
        &self,
        pinning: &Pinning<'_>,
        route: &mut Route,
        mut in_flight: InFlight,
        want: Want,
        body_bytes: u64,
    ) -> Result<(Lease, InFlight), Response<ResponseBody>> {
        let waiting = Instant::now();
        let lease = route.revision.throttler.acquire(want, body_bytes).await;
        route.queued += waiting.elapsed();
        let lease = lease.map_err(|e| refused(&route.revision, e))?;
        route.pod = Some(lease.pod().addr);
        let moved = Box::pin(pinning.pin_session(route, lease.pod().addr)).await;
        pinning.watch_end();
        let Some(moved) = moved else { return Ok((lease, in_flight)) };
        drop(lease);
        if !Arc::ptr_eq(&moved.revision, &route.revision) {
            in_flight = self.reporter.redirect(in_flight, &moved.revision.concurrency);
        }
        route.revision = moved.revision;
        route.pod = Some(moved.pod);
        let waiting = Instant::now();
        let lease = route.revision.throttler.acquire(Want::Pod(moved.pod), body_bytes).await;
        route.queued += waiting.elapsed();
        Ok((lease.map_err(|e| refused(&route.revision, e))?, in_flight))
    }

    /// What the activator adds to any response: a made-up session cookie, and with
    /// `--debug-headers` why the request went where it went.
    fn annotate(&self, resp: &mut Response<ResponseBody>, keys: &Keys, route: &Route) {
        let headers = resp.headers_mut();
        if let Some(cookie) = &keys.new_cookie
            && let Ok(value) = HeaderValue::try_from(cookie.header_value(route.revision.affinity.lifetime().max_age))
        {
            headers.append(http::header::SET_COOKIE, value);
        }
        if let Some(value) = route.set_cookie.as_deref().and_then(|v| HeaderValue::try_from(v).ok()) {
            headers.append(http::header::SET_COOKIE, value);
        }
        if self.debug_headers {
            headers.insert(DECISION, HeaderValue::from_static(route.origin.as_str()));
        }
    }
}

/// What is known of a request from its arrival on.
struct Arrived {
    client: SocketAddr,
    protocol: Protocol,
    started: Instant,
    /// Its request-log entry, while the log is on.
    log: Option<Box<Entry>>,
    inflow: Option<Arc<Inflow>>,
}

/// What one HTTP/2 connection's waiting requests can make the activator hold, together: no more
/// than the connection's flow-control window, however many streams wait on it (a client's
/// thousand waiting gRPC calls hold one window, not a thousand).
#[derive(Debug, Default)]
pub struct Inflow {
    charged: AtomicU64,
}

/// A waiting request's charge: the bytes its queue counts, and its part of the connection's
/// window until it is admitted.
struct Charge {
    bytes: u64,
    share: Option<(Arc<Inflow>, u64)>,
}

impl Charge {
    fn release(&mut self) {
        if let Some((inflow, bytes)) = self.share.take() {
            inflow.charged.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a waiting request may make the activator buffer: its body, but no more than the
/// connection reads ahead before the client has to wait; on HTTP/2, no more than its stream's
/// window nor what is left of its connection's.
fn waiting_body_bytes<B: http_body::Body>(req: &Request<B>, inflow: Option<&Arc<Inflow>>) -> Charge {
    let hint = req.body().size_hint();
    let declared = hint.exact().or(hint.upper()).unwrap_or(u64::MAX);
    let Some(inflow) = inflow.filter(|_| req.version() == Version::HTTP_2) else {
        return Charge { bytes: declared.min(HTTP1_READ_AHEAD), share: None };
    };
    let want = declared.min(u64::from(H2_STREAM_WINDOW));
    let mut bytes = 0;
    let _ = inflow.charged.fetch_update(Ordering::AcqRel, Ordering::Acquire, |charged| {
        bytes = want.min(u64::from(H2_CONNECTION_WINDOW).saturating_sub(charged));
        Some(charged + bytes)
    });
    Charge { bytes, share: Some((inflow.clone(), bytes)) }
}

/// Which service the request is for, and the revision it names if it names one: by Knative's
/// ingress headers, else by `Host` (or `:authority`): a service's host, or a revision's
/// cluster-local name `<revision>.<namespace>.svc.<domain>` (upstream's fallback). The `Host`
/// chooses a service or revision, never an address.
///
/// The ingress's pick by the split is a service's revision, which pins may override; a revision
/// asked for by a traffic tag or by its own host is routed as a service of its own, which they
/// may not.
fn resolve<B>(
    snapshot: &Snapshot,
    req: &Request<B>,
    cluster_domain: &str,
) -> Result<(Arc<Service>, Option<Arc<Revision>>), NotFound> {
    let headers = req.headers();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default();
    // The revision is served in the service (Route) the request came in by; asked for
    // explicitly, or by no service of its, it is served on its own.
    let named = |ns: &str, name: &str, explicit: &dyn Fn(&Service) -> bool| {
        match snapshot.route_for(ns, name, host) {
            Some((service, revision)) if !explicit(service) => return Ok((service.clone(), Some(revision.clone()))),
            _ => {}
        }
        let alone = snapshot.revision_alone(ns, name).ok_or_else(|| NotFound(name.to_owned()))?;
        let revision = alone.routes_to(name).cloned();
        Ok((alone.clone(), revision))
    };
    if let (Some(ns), Some(name)) = (headers.get(KNATIVE_NAMESPACE), headers.get(KNATIVE_REVISION)) {
        let name = String::from_utf8_lossy(name.as_bytes());
        let tag = headers.get(KNATIVE_TAG).map(HeaderValue::as_bytes);
        return named(&String::from_utf8_lossy(ns.as_bytes()), &name, &|svc| svc.tagged(&name, tag, host));
    }
    if let Some(service) = snapshot.service_for_host(host) {
        return Ok((service.clone(), None));
    }
    match revision_host(host, cluster_domain) {
        Some((name, ns)) => named(ns, name, &|_| true),
        // Upstream looks up the revision its Host fallback found, here none: its answer names "".
        None => Err(NotFound(String::new())),
    }
}

/// The request names no revision or service the activator knows; upstream's lister error names
/// the revision it looked for.
struct NotFound(String);

/// `<name>.<namespace>.svc.<domain>[:port]` split into name and namespace.
fn revision_host<'h>(host: &'h str, cluster_domain: &str) -> Option<(&'h str, &'h str)> {
    let host =
        host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
    let mut parts = host.splitn(4, '.');
    let (name, namespace, svc, domain) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (svc == "svc" && domain.eq_ignore_ascii_case(cluster_domain) && !name.is_empty() && !namespace.is_empty())
        .then_some((name, namespace))
}

fn refused(revision: &Revision, error: AcquireError) -> Response<ResponseBody> {
    match error {
        AcquireError::QueueFull => {
            tracing::debug!(namespace = %revision.namespace, revision = %revision.name, "the revision's wait queue is full");
            respond::queue_full()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revisions_cluster_local_host_names_it() {
        assert_eq!(
            revision_host("counter-00001.shop.svc.cluster.local", "cluster.local"),
            Some(("counter-00001", "shop"))
        );
        assert_eq!(
            revision_host("counter-00001.shop.svc.cluster.local:80", "cluster.local"),
            Some(("counter-00001", "shop"))
        );
        assert_eq!(
            revision_host("counter-00001.shop.svc.corp.example", "corp.example"),
            Some(("counter-00001", "shop"))
        );
        for other in [
            "counter-00001.shop",
            "counter.shop.example.com",
            "counter-00001.shop.svc.other.local",
            ".shop.svc.cluster.local",
        ] {
            assert_eq!(revision_host(other, "cluster.local"), None, "{other}");
        }
    }
}
