//! Where a request goes, settled in one place, in three steps the handler runs in turn.
//! `Pinning::route`, before admission: the pins of its ids are read (one round trip at most, none
//! for known pins; a new session is pinned in that round trip where the decision without a pin
//! sends it), the pure decision is made, a flow's pin is written first-writer-wins (following the
//! winner if another writer was first), and the split by requests counts it.
//! `Pinning::admitted`, once the throttler gave the request a pod: its session is pinned there
//! (unless the lookup already did), or the request moves to the pod another writer pinned it
//! to. `Route::after_failure`, when that pod failed it: another ready pod of the revision, or
//! none.
//!
//! Talks to the pin store only; acquiring slots and forwarding stay with the caller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::cookie::CookieKeys;
use super::decide::{Departure, Lookup, Origin, PinWrite, decide, follow_flow_winner};
use super::keys::{Keys, SignedCookie};
use super::share;
use crate::pins::{Found, Lifetime, Pin, PinKey, PinSource, Pins, Watch};
use crate::retry;
use crate::seats;
use crate::throttle::{AcquireError, Want};
use crate::world::{Revision, Service};

/// Whether the missing cookie keys were reported; once is enough.
static NO_KEYS_REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where a request is going.
pub(crate) struct Route {
    pub revision: Arc<Revision>,
    pub want: Want,
    pub origin: Origin,
    /// Where the pin that decided (or its absence) was looked up.
    pub pin_source: Option<PinSource>,
    /// The pod that answered, once one did.
    pub pod: Option<SocketAddr>,
    /// Time spent waiting for a slot.
    pub queued: Duration,
    /// A newly signed pin cookie for the response (`sticky-session-mode: signed-cookie`).
    pub set_cookie: Option<String>,
    /// Why the session's pod is no longer its own: with strict sessions the request is answered
    /// 503 saying so (`lost`); otherwise the response of the request that moved it says so.
    pub session_left: Option<SessionLeft>,
    session_write: Option<PinWrite>,
    /// The session's hash, by which it is placed when it is pinned anew.
    placement: Option<u64>,
    /// A session of a revision whose pods hold a bounded number of sessions, to be pinned by a
    /// seat's claim before admission, replacing the pin inside (`None`: it has none).
    seat: Option<Option<Pin>>,
    /// The pin the seat's claim left: the session's own pod.
    seated: Option<Pin>,
}

impl Route {
    /// What to ask the throttler for when the request must go to another pod of its revision
    /// (its pod failed it): for a session, the pod its hash prefers among those ready now, so
    /// replicas re-pin it alike; else any.
    pub(crate) fn elsewhere(&self) -> Want {
        let preferred = self.placement.and_then(|hash| place(&self.revision, hash));
        preferred.map_or(Want::Any, Want::Prefer)
    }

    /// Where the request goes after its pod failed it, with what is sent there: another pod of
    /// its revision if one is ready now (with none left, the client hears at once, as upstream
    /// answers, rather than waiting for the revision's timeout), and for a request that reached
    /// its pod only if it was kept and the revision's retry budget allows. Counts resends and
    /// retries.
    pub(crate) fn after_failure<T>(&self, failed: Failed<T>) -> Option<(Want, T)> {
        let revision = &self.revision;
        let ready = revision.throttler.has_ready_pods();
        let again = match failed {
            Failed::Unsent(again) => {
                if ready {
                    revision.stats.resent.inc();
                }
                Some(again).filter(|_| ready)
            }
            Failed::Reached(Resend::NotAllowed) => None,
            Failed::Reached(resend) => {
                let (outcome, again) = match resend {
                    Resend::Kept(_) if !ready => (retry::Outcome::NoPod, None),
                    Resend::Kept(_) if !revision.retries.try_retry() => (retry::Outcome::OverBudget, None),
                    Resend::Kept(again) => (retry::Outcome::Retried, Some(again)),
                    Resend::NotKept | Resend::NotAllowed => (retry::Outcome::NotKept, None),
                };
                revision.stats.retried.get(outcome).inc();
                again
            }
        };
        again.map(|again| (self.elsewhere(), again))
    }
}

/// What became of a session whose pinned pod or revision is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionLeft {
    /// Strict sessions: it is over; the request is answered 503.
    Lost(Departure),
    /// It was pinned to another pod, by this request.
    Moved(Departure),
}

/// What the request does once it holds a slot on a pod.
pub(crate) enum Admitted {
    /// It stays: its session is pinned to the pod, or it has none.
    Keep,
    /// Another writer pinned the session first, to a ready pod that the route now names: the
    /// request takes a slot there instead, as it will through every replica.
    /// `revision_changed` when that pod serves another revision than the one admitted.
    Moved { pod: SocketAddr, revision_changed: bool },
}

/// How the request's pod failed it, with what would be sent again (`T`).
pub(crate) enum Failed<T> {
    /// None of the request reached the pod: it may go to another whatever its method.
    Unsent(T),
    /// The pod failed it after it reached it, before any response byte.
    Reached(Resend<T>),
}

/// Whether a request its pod failed can be sent again (`crate::retry`).
pub(crate) enum Resend<T> {
    /// Its service does not resend such requests.
    NotAllowed,
    /// Allowed, but its body was not kept whole.
    NotKept,
    Kept(T),
}

/// A request's ids, its service, and what the pin table said about them.
pub(crate) struct Pinning<'a> {
    pins: &'a Pins,
    cookies: &'a CookieKeys,
    service: &'a Service,
    keys: &'a Keys,
    lookup: Lookup,
    /// The session's pin, when the lookup made it (the decision then saw no pin).
    created: Option<Pin>,
    /// The request's verified pin cookie: when it expires and when its pin was first made.
    cookie: Option<(SystemTime, Option<SystemTime>)>,
}

impl<'a> Pinning<'a> {
    /// Reads the request's pins and decides its revision (and pod, for a pinned session).
    /// `ingress_pick` is the revision Knative's ingress named, which replaces the split.
    pub(crate) async fn route(
        pins: &'a Pins,
        cookies: &'a CookieKeys,
        service: &'a Service,
        keys: &'a Keys,
        ingress_pick: Option<&Arc<Revision>>,
    ) -> (Pinning<'a>, Route) {
        let lifetime_of = |revision: &str| service.lifetime_of(revision);
        // Steering to the under-served revision needs the shared counts: not without the store.
        let under_served = |unshared: bool| {
            let steered = service.affinity.split_by_requests() && !unshared;
            steered.then(|| share::most_under_served(service)).flatten()
        };
        // Where a session without a pin goes: the decision without one, to the pod its hash
        // prefers among its revision's ready pods. The lookup pins it there in its own round trip
        // unless another replica pinned it first; with no pod ready, it is pinned on admission.
        let new_session = |flow: Option<&Pin>| {
            let key = keys.session.as_ref()?;
            let lookup =
                Lookup { has_session: true, has_flow: keys.flow.is_some(), session: None, flow: flow.cloned() };
            let roll = (key.placement_hash() % 100) as u32;
            let decision = decide(service, ingress_pick, || under_served(false), &lookup, roll);
            decision.session_write.as_ref()?;
            // A seat is claimed before admission, not in the lookup.
            if decision.revision.affinity.sessions_per_pod().is_some() {
                return None;
            }
            let pod = place(&decision.revision, key.placement_hash())?;
            let lifetime = session_lifetime(keys, &decision.revision);
            Some((Pin::session(decision.revision.name.clone(), pod), lifetime))
        };
        let Found { session, flow, mut sources, created } =
            pins.lookup(keys.session.as_ref(), keys.flow.as_ref(), &lifetime_of, Some(&new_session)).await;
        // A session pin in a signed cookie needs no store: any replica verifies it.
        let verified = keys.signed.as_ref().map(|cookie| {
            let value = cookie.value.as_deref();
            value.and_then(|v| cookies.verify(service.affinity.scope(), v, SystemTime::now()))
        });
        let (session, cookie) = match verified {
            Some(verified) => {
                sources[0] = PinSource::Cookie;
                let cookie = verified.as_ref().map(|v| (v.expires, v.written));
                (verified.map(|v| v.pin), cookie)
            }
            None => (session, None),
        };
        let has_session = keys.session.is_some() || keys.signed.is_some();
        // A pod another replica pinned the session to, which this replica was told of only just
        // now, gets its first probe here before the session is moved off it.
        if let Some(pin) = &session
            && let Some(pod) = pin.pod
            && let Some(revision) = service.routes_to(&pin.revision)
        {
            revision.throttler.await_first_probe(pod).await;
        }
        // A key without a pin is placed by its hash: the split's roll, then (for a session) the
        // pod, by rendezvous over the revision's ready pods when that pod has room. Replicas that
        // decide apart (one cannot reach Redis, or finds it just emptied) then decide alike, and
        // the pins they push agree.
        let unpinned =
            |key: Option<&PinKey>, pin: &Option<Pin>| key.filter(|_| pin.is_none()).map(PinKey::placement_hash);
        let placed_by_hash = unpinned(keys.session.as_ref(), &session).or_else(|| unpinned(keys.flow.as_ref(), &flow));
        let unshared = [sources[0], sources[1]].contains(&PinSource::Fallback);
        let lookup = Lookup { has_session, has_flow: keys.flow.is_some(), session, flow };
        let roll = placed_by_hash.map_or_else(|| fastrand::u32(..100), |hash| (hash % 100) as u32);
        let mut decision = decide(service, ingress_pick, || under_served(unshared), &lookup, roll);
        if let (Some(key), Want::Any, Some(_)) = (&keys.session, decision.want, &decision.session_write)
            && let Some(pod) = place(&decision.revision, key.placement_hash())
        {
            decision.want = Want::Prefer(pod);
        }
        // Soft affinity: a pinned pod with that many requests already waiting for it sends this
        // one to another pod of the revision. The pin stays where the session's state is.
        if let (Origin::SessionPin, Want::Pod(pod)) = (decision.origin, decision.want)
            && let Some(limit) = decision.revision.affinity.spill_threshold()
            && decision.revision.throttler.queued_for(pod).is_some_and(|queued| queued >= limit)
        {
            decision.want = Want::Any;
            decision.origin = Origin::Spill;
        }
        if let (Some(key), Some(write)) = (&keys.flow, &decision.flow_write) {
            let ours = Pin::flow(decision.revision.name.clone());
            let lifetime = decision.revision.affinity.lifetime();
            // A made-up flow id is on probation until the client sends its cookie back.
            let lifetime = if keys.new_flow_cookie.is_some() { lifetime.provisional() } else { lifetime };
            let winner = pins.write(key, write.expected(), ours, lifetime, &lifetime_of).await;
            follow_flow_winner(&mut decision, service, &lookup, &winner);
        }
        if service.affinity.split_by_requests() {
            decision.revision.served.record();
        }
        let session_left = (decision.origin == Origin::SessionLost)
            .then(|| lookup.session.as_ref().map(|pin| SessionLeft::Lost(departure(service, pin))))
            .flatten();
        let pin_source = match decision.origin {
            Origin::RevisionPin => keys.flow.as_ref().map(|_| sources[1]),
            _ => has_session.then_some(sources[0]).or_else(|| keys.flow.as_ref().map(|_| sources[1])),
        };
        let seat = match (&keys.session, &keys.signed, &decision.session_write) {
            (Some(_), None, Some(write)) if decision.revision.affinity.sessions_per_pod().is_some() => {
                Some(write.expected().cloned())
            }
            _ => None,
        };
        let route = Route {
            revision: decision.revision,
            want: decision.want,
            origin: decision.origin,
            pin_source,
            pod: None,
            queued: Duration::ZERO,
            set_cookie: None,
            session_left,
            session_write: decision.session_write,
            placement: keys.session.as_ref().map(PinKey::placement_hash),
            seat,
            seated: None,
        };
        (Pinning { pins, cookies, service, keys, lookup, created, cookie }, route)
    }

    /// A session of a revision whose pods hold a bounded number of sessions, new or moving, takes
    /// a seat before admission: it is pinned to a ready pod with room, waiting for one while all
    /// are full (`seats::take`). Returns whether the route now names another revision (another
    /// writer pinned the session into it first).
    pub(crate) async fn take_seat(&self, route: &mut Route) -> Result<bool, AcquireError> {
        let (Some(expected), Some(key)) = (route.seat.take(), &self.keys.session) else { return Ok(false) };
        let service = self.service;
        let usable = |pin: &Pin| {
            let revision = service.routes_to(&pin.revision);
            revision.zip(pin.pod).is_some_and(|(revision, pod)| revision.throttler.is_ready(pod))
        };
        let lifetime = session_lifetime(self.keys, &route.revision);
        let (pin, ours) = seats::take(self.pins, &route.revision, key, expected.clone(), lifetime, usable).await?;
        let revision_changed = *pin.revision != *route.revision.name;
        if let Some(revision) = service.routes_to(&pin.revision).filter(|_| revision_changed) {
            route.revision = revision.clone();
        }
        if let Some(current) = expected.filter(|current| ours && *current != pin) {
            route.session_left = Some(SessionLeft::Moved(departure(service, &current)));
        }
        route.want = pin.pod.map_or(Want::Any, Want::Pod);
        route.seated = Some(pin);
        Ok(revision_changed)
    }

    /// The request holds a slot on `pod` of `route.revision`: its session is pinned there, and
    /// watched for its end; or, if another writer pinned it first to a pod that is ready, the
    /// route names that pod (and its revision) instead.
    pub(crate) async fn admitted(&self, route: &mut Route, pod: SocketAddr) -> Admitted {
        route.pod = Some(pod);
        let moved = self.pin_session(route, pod).await;
        self.watch_end();
        let Some((revision, pod)) = moved else { return Admitted::Keep };
        let revision_changed = !Arc::ptr_eq(&revision, &route.revision);
        route.revision = revision;
        route.pod = Some(pod);
        Admitted::Moved { pod, revision_changed }
    }

    /// Whether the request belongs to a strict session that its pin sent to the pod that just
    /// failed it: that pod (and the session's state) is gone, so the client is told, not moved.
    pub(crate) fn strict_session_failed(&self, route: &Route) -> bool {
        route.origin == Origin::SessionPin && self.service.affinity.strict_sessions()
    }

    /// A strict session's pod is gone: its pin is released (a signed pin cookie is expired), so
    /// the client's next request starts a new session.
    pub(crate) async fn release_lost(&self, route: &mut Route) {
        if let Some(cookie) = &self.keys.signed {
            route.set_cookie = Some(cookie.expired_header_value());
            return;
        }
        if let (Some(key), Some(pin)) = (&self.keys.session, &self.lookup.session) {
            self.pins.release(key, pin).await;
        }
    }

    /// Watches the session's pin for its end, when the service asked to hear of it
    /// (`sticky-session-end-path`); the raw id stays in this replica's memory.
    fn watch_end(&self) {
        if let (Some(key), Some(id), Some(call)) =
            (&self.keys.session, &self.keys.session_id, self.service.affinity.session_end())
        {
            self.pins.watch_end(key, || Watch { id: id.clone(), call: call.clone() });
        }
    }

    /// Pins the session to `pod` of `route.revision`. Returns where the request must go instead
    /// if another writer pinned the session to a pod that is ready.
    async fn pin_session(&self, route: &mut Route, pod: SocketAddr) -> Option<(Arc<Revision>, SocketAddr)> {
        // A spilled request borrows another pod; its session stays pinned where it was. A seated
        // session was pinned by its claim; admitted elsewhere (its pod just left), its next
        // request claims a seat again.
        if route.origin == Origin::Spill || route.seated.is_some() {
            return None;
        }
        if let Some(cookie) = &self.keys.signed {
            self.sign_cookie(cookie, route, pod);
            return None;
        }
        let key = self.keys.session.as_ref()?;
        let ours = Pin::session(route.revision.name.clone(), pod);
        let write = match &self.created {
            // Pinned by the lookup to the pod the request was admitted to: nothing to write.
            Some(created) if *created == ours => {
                note_session(&route.revision, pod);
                return None;
            }
            // Admitted elsewhere (the preferred pod had no room): the pin follows the request,
            // unless another writer moved it first.
            Some(created) => PinWrite::Replace(created.clone()),
            // Also re-pin when the pinned pod left between the decision and admission.
            None => route.session_write.clone().or_else(|| match &self.lookup.session {
                Some(current) if *current != ours => Some(PinWrite::Replace(current.clone())),
                _ => None,
            })?,
        };
        let lifetime = session_lifetime(self.keys, &route.revision);
        let lifetime_of = |revision: &str| self.service.lifetime_of(revision);
        let winner = self.pins.write(key, write.expected(), ours.clone(), lifetime, &lifetime_of).await;
        if winner == ours {
            note_session(&route.revision, pod);
            // This request moved the session off its pin: its response says so, once.
            if self.created.is_none()
                && let Some(current) = self.lookup.session.as_ref().filter(|current| **current != ours)
            {
                route.session_left = Some(SessionLeft::Moved(departure(self.service, current)));
            }
            return None;
        }
        let usable = self.service.routes_to(&winner.revision).zip(winner.pod).filter(|(r, p)| r.throttler.is_ready(*p));
        match usable {
            Some((revision, pod)) => Some((revision.clone(), pod)),
            // The pin already there points at a pod or revision that is gone: ours replaces it now,
            // so the session does not move on its next request.
            None => {
                self.pins.write(key, Some(&winner), ours, lifetime, &lifetime_of).await;
                None
            }
        }
    }

    /// The response carries the session's pin in a newly signed cookie when the pin is new or
    /// moved, or its cookie is past half its idle lifetime, so an active session never expires.
    fn sign_cookie(&self, cookie: &SignedCookie, route: &mut Route, pod: SocketAddr) {
        let ours = Pin::session(route.revision.name.clone(), pod);
        let lifetime = route.revision.affinity.lifetime();
        let now = SystemTime::now();
        let same = self.lookup.session.as_ref() == Some(&ours);
        if let Some(current) = self.lookup.session.as_ref().filter(|_| !same) {
            route.session_left = Some(SessionLeft::Moved(departure(self.service, current)));
        }
        // The pin keeps the moment it was first made, so `sticky-max-age` ends it however often
        // its cookie is signed again.
        let written = self.cookie.and_then(|(_, written)| written).filter(|_| same).unwrap_or(now);
        let age = now.duration_since(written).unwrap_or_default();
        let expires = now + lifetime.remaining(age);
        // Signed again only once half its idle lifetime has passed, and only if that extends it.
        if same && self.cookie.is_some_and(|(current, _)| current + lifetime.ttl / 2 >= expires) {
            return;
        }
        let signed = self.cookies.sign(self.service.affinity.scope(), &ours, written, expires);
        if signed.is_none() && !NO_KEYS_REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                scope = %self.service.affinity.scope(),
                "sticky-session-mode: signed-cookie needs --pin-cookie-keys; its sessions are not pinned"
            );
        }
        route.set_cookie = signed.map(|value| cookie.header_value(&value));
    }
}

/// The pod a session without a pin goes to in `revision`: where its `hash` places it among the
/// ready pods (replicas place it alike), or with `sticky-session-placement: least-sessions` the
/// pod holding the fewest live sessions.
fn place(revision: &Revision, hash: u64) -> Option<SocketAddr> {
    if revision.affinity.places_by_sessions() {
        revision.throttler.fewest_sessions()
    } else {
        revision.throttler.rendezvous(hash)
    }
}

/// Counts a session just pinned to `pod`, for the placement that reads the counts; other
/// services pay nothing for it.
fn note_session(revision: &Revision, pod: SocketAddr) {
    if revision.affinity.places_by_sessions() {
        revision.throttler.note_session(pod);
    }
}

/// Why a session's pin `current` no longer holds: its revision left the service's traffic, or
/// only its pod left.
fn departure(service: &Service, current: &Pin) -> Departure {
    match service.routes_to(&current.revision) {
        Some(_) => Departure::PodGone,
        None => Departure::RevisionGone,
    }
}

/// How long a session's pin into `revision` lives. An id the activator made up for a client
/// without its cookie (or session header) is pinned only briefly until the client shows it sends
/// the id back, so clients that never do (bots, health checks) do not fill the pin table.
fn session_lifetime(keys: &Keys, revision: &Revision) -> Lifetime {
    let lifetime = revision.affinity.lifetime();
    let made_up = keys.new_cookie.is_some() || keys.new_header_id.is_some();
    if made_up { lifetime.provisional() } else { lifetime }
}
