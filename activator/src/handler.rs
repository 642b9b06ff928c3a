//! The request path as a list of steps, from a parsed request to a response: probes, finding
//! the target service (`world::Snapshot::resolve`), reading its affinity ids, its route
//! (`affinity::Pinning`), admission by the revision's throttler, forwarding (`proxy`), and
//! accounting.
//!
//! Reads the world through one snapshot load per request and never blocks on a world update.
//! Decides nothing itself: where a request goes, once admitted and again after its pod failed
//! it, is `affinity`'s; what the activator answers by itself is `respond`'s. This file sequences
//! the steps, takes pods that fail out of rotation, and moves the request's in-flight count
//! when it changes revision.

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

use crate::affinity::{
    Admitted, CookieKeys, Decisions, Departure, Failed, Keys, Pinning, Resend, Route, SessionLeft, chat, extract,
    names_its_conversation,
};
use crate::autoscaler::{InFlight, Reporter};
use crate::headers::{DECISION, SESSION_MOVED};
use crate::health::Health;
use crate::pins::Pins;
use crate::pins::{PinKey, PinSource};
use crate::probe_answers;
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
use crate::tls::{HandshakeFailures, Peer};
use crate::world::{NotFound, Revision, Snapshot, Target};
use tracing::{Instrument as _, Span};

/// The most of an HTTP/1.1 request body a waiting request can make the activator hold: what
/// arrived with the headers in hyper's read buffer. The rest waits in the client's socket.
const HTTP1_READ_AHEAD: u64 = 64 * 1024;
/// The longest a chat request's body is waited for to name its conversation
/// (`sticky-session-chat-prefix`); after it, the request is routed with what arrived.
const CHAT_PREFIX_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// An HTTP/2 stream may send this much request body before the client must wait (the server's
/// stream window), which is also the most a waiting HTTP/2 request can make the activator hold.
pub(crate) const H2_STREAM_WINDOW: u32 = 1 << 20;
/// What one HTTP/2 client connection may send before the activator reads, over all its streams.
pub(crate) const H2_CONNECTION_WINDOW: u32 = 1 << 20;

pub(crate) struct Handler {
    pub world: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<Health>,
    pub stats: Stats,
    pub pins: Pins,
    /// The keys that seal and open pin cookies (`sticky-session-mode: signed-cookie`).
    pub cookie_keys: CookieKeys,
    pub reporter: Reporter,
    /// Probes pods taken out of rotation until they take traffic again.
    pub prober: Prober,
    /// Adds `X-Activator-Decision` to responses.
    pub debug_headers: bool,
    /// The cluster's DNS domain, for requests that name a revision by its cluster-local host.
    pub cluster_domain: String,
    /// `activator_decisions_total`, one counter per `Origin`.
    pub decisions: Decisions,
    pub handshakes_failed: HandshakeFailures,
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
    pub(crate) fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        client: SocketAddr,
        inflow: Option<Arc<Inflow>>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
        let started = Instant::now();
        if let Some(resp) = probe_answers::answer(&mut req, &self.health) {
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
        let Target { service, ingress_pick } = match self.world.load().resolve(&req, &self.cluster_domain) {
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
        let (pinning, mut route) =
            Box::pin(Pinning::route(&self.pins, &self.cookie_keys, &service, &keys, ingress_pick.as_ref())).await;
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
        self.decisions.count(route.origin);
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
            self.telemetry.finish(span, &Outcome { status, routed: Some(routed) });
        }
        if let Some(entry) = &mut log {
            let revision = &route.revision;
            entry.routed(LoggedRoute {
                namespace: revision.namespace.as_str().into(),
                service: revision.service.as_str().into(),
                configuration: revision.stats.names().configuration.as_str().into(),
                revision: revision.name.clone(),
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
            self.telemetry.finish(span, &Outcome { status, routed: None });
        }
        if let Some(entry) = log {
            self.telemetry.log_answered(&entry, status, size, elapsed);
        }
        resp
    }

    /// Takes a slot on a pod of the route's revision, lets affinity settle the session there, and
    /// forwards; when the pod fails the request, affinity says whether it goes to another pod of
    /// the revision (once). `route` ends up naming the revision that answered.
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
        if let Some(SessionLeft::Lost(why)) = route.session_left {
            pinning.release_lost(route).await;
            return respond::session_lost(why.as_str());
        }
        match pinning.take_seat(route).await {
            Ok(true) => in_flight = self.reporter.redirect(in_flight, &route.revision.concurrency),
            Ok(false) => {}
            Err(refusal) => return refused(&route.revision, refusal),
        }
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
                self.handshakes_failed.count(Peer::Pod);
            }
            if attempt > 0 {
                return respond::bad_gateway(&failed.error);
            }
            // A pod whose connection was refused, or failed mid-exchange, takes no more traffic
            // until a probe passes.
            let pod_failed = failed.unsent.is_some() || failed.error.connection_failed();
            if pod_failed && revision.throttler.mark_unreachable(failed.error.pod) {
                revision.stats.unreachable.inc();
                self.prober.watch(revision.throttler.clone());
            }
            // A strict session does not move to another pod: its state was on this one.
            if pod_failed && pinning.strict_session_failed(route) {
                pinning.release_lost(route).await;
                return respond::session_lost(Departure::PodGone.as_str());
            }
            let failure = match failed.unsent {
                Some(unsent) => Failed::Unsent((unsent.outbound, Some(unsent.in_flight))),
                None => Failed::Reached(match replay.map(|kept| kept.and_then(Replay::outbound)) {
                    None => Resend::NotAllowed,
                    Some(None) => Resend::NotKept,
                    Some(Some(again)) => Resend::Kept((again, None)),
                }),
            };
            let Some((elsewhere, (again, counted))) = route.after_failure(failure) else {
                return respond::bad_gateway(&failed.error);
            };
            // A retry is a new request to the revision; a resend is the same one, still counted.
            in_flight = counted.unwrap_or_else(|| self.reporter.arrive(&route.revision.concurrency));
            (outbound, want) = (again, elsewhere);
        }
        unreachable!("the second attempt returns")
    }

    /// A slot on a pod of the route's revision, with the session settled there; or on the pod
    /// another writer pinned it to first, whose revision `route` then names.
    async fn admit(
        &self,
        pinning: &Pinning<'_>,
        route: &mut Route,
        mut in_flight: InFlight,
        want: Want,
        body_bytes: u64,
    ) -> Result<(Lease, InFlight), Response<ResponseBody>> {
        let lease = acquire(route, want, body_bytes).await?;
        match Box::pin(pinning.admitted(route, lease.pod().addr)).await {
            Admitted::Keep => Ok((lease, in_flight)),
            Admitted::Moved { pod, revision_changed } => {
                drop(lease);
                if revision_changed {
                    in_flight = self.reporter.redirect(in_flight, &route.revision.concurrency);
                }
                Ok((acquire(route, Want::Pod(pod), body_bytes).await?, in_flight))
            }
        }
    }

    /// What the activator adds to any response: made-up session and revision cookies, a made-up
    /// session id in the session header, and with
    /// `--debug-headers` why the request went where it went.
    fn annotate(&self, resp: &mut Response<ResponseBody>, keys: &Keys, route: &Route) {
        let headers = resp.headers_mut();
        for cookie in [&keys.new_cookie, &keys.new_flow_cookie].into_iter().flatten() {
            if let Ok(value) = HeaderValue::try_from(cookie.header_value(route.revision.affinity.lifetime().max_age)) {
                headers.append(http::header::SET_COOKIE, value);
            }
        }
        if let Some((name, id)) = &keys.new_header_id {
            headers.insert(name.clone(), id.clone());
        }
        if let Some(value) = route.set_cookie.as_deref().and_then(|v| HeaderValue::try_from(v).ok()) {
            headers.append(http::header::SET_COOKIE, value);
        }
        if let Some(SessionLeft::Moved(why)) = route.session_left {
            headers.insert(SESSION_MOVED, HeaderValue::from_static(why.as_str()));
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
pub(crate) struct Inflow {
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

/// A slot on a pod of the route's revision, the wait counted in the route.
async fn acquire(route: &mut Route, want: Want, body_bytes: u64) -> Result<Lease, Response<ResponseBody>> {
    let waiting = Instant::now();
    let lease = route.revision.throttler.acquire(want, body_bytes).await;
    route.queued += waiting.elapsed();
    lease.map_err(|e| refused(&route.revision, e))
}

fn refused(revision: &Revision, error: AcquireError) -> Response<ResponseBody> {
    match error {
        AcquireError::QueueFull => {
            tracing::debug!(namespace = %revision.namespace, revision = %revision.name, "the revision's wait queue is full");
            respond::queue_full()
        }
    }
}
