//! Sessions as capacity (`sticky-sessions-per-pod`): a pod of such a revision holds at most that
//! many live sessions. Owns the two halves of it around the pin table's atomic claim
//! (`pins::Pins::claim_seat`):
//! - `take`, on the request path: a new (or moved) session claims a seat on a ready pod, fewest
//!   sessions first, and waits while every pod is full, bounded as requests waiting for a cold
//!   revision are; its wait is demand the autoscaler hears of.
//! - `census_loop`, once a second: the live seats of each pod, counted for every replica (through
//!   Redis), given to the throttler (the order of the next claims, the scale-down order) and to
//!   the metrics, and the seats to report as demand: the waiting sessions by each replica, the
//!   held seats and the warm reserve by the one replica that holds the lease.
//!
//! Must not decide which revision a session goes to (`affinity` does) nor hand out request slots
//! (`throttle` does).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGaugeVec;

use crate::autoscaler::{Reporter, SeatWait};
use crate::metrics::Registrar;
use crate::pins::{Claim, Lifetime, Pin, PinKey, Pins, SeatClaim};
use crate::throttle::AcquireError;
use crate::world::{Revision, Snapshot};

/// Pods a claim tries, fewest sessions first: enough to find room among the pods the last census
/// counted, few enough that one claim reads a bounded number of seat sets.
const CANDIDATES: usize = 16;
/// How often a waiting session tries again without news: besides a pod joining and the census
/// finding a count dropped, which wake it at once.
const RETRY: Duration = Duration::from_secs(1);
/// How often seats are counted.
const CENSUS_PERIOD: Duration = Duration::from_secs(1);
/// The lease of the replica that reports held seats and the reserve outlives a missed renewal.
const LEASE: Duration = Duration::from_secs(5);
/// Every this many censuses, the leader puts pins that reached Redis without a claim into their
/// pods' seat sets (`Pins::reindex_seats`).
const REINDEX_EVERY: u64 = 10;

/// Claims a seat for the session `key` in `revision` (whose pods hold at most `per_pod`
/// sessions) and pins it there, replacing `expected` (its pin to a pod that left; `None` for a
/// new session). Waits while every ready pod is full or none is ready. Returns the pin that
/// holds: ours, or another writer's that `usable` accepts (one it refuses, to a pod that left, is
/// replaced in turn), and whether it is ours. `QueueFull` when as many sessions as requests may
/// wait already wait.
pub(crate) async fn take(
    pins: &Pins,
    revision: &Arc<Revision>,
    key: &PinKey,
    mut expected: Option<Pin>,
    lifetime: Lifetime,
    usable: impl Fn(&Pin) -> bool,
) -> Result<(Pin, bool), AcquireError> {
    let per_pod = revision.affinity.sessions_per_pod().unwrap_or(u32::MAX);
    let throttler = &revision.throttler;
    let mut waiting: Option<SeatWait> = None;
    loop {
        let (joined, freed) = (throttler.pods_changed(), throttler.sessions_dropped());
        tokio::pin!(joined, freed);
        joined.as_mut().enable();
        freed.as_mut().enable();
        let candidates = throttler.seat_candidates(CANDIDATES);
        if !candidates.is_empty() {
            let claim = SeatClaim {
                key,
                expected: expected.as_ref(),
                revision: &revision.name,
                candidates: &candidates,
                per_pod,
                lifetime,
            };
            match pins.claim_seat(&claim).await {
                Claim::Seated(pin) => {
                    if let Some(pod) = pin.pod {
                        throttler.note_session(pod);
                    }
                    revision.concurrency.note_seated();
                    return Ok((pin, true));
                }
                Claim::Taken(pin) => {
                    // A pod another replica seated the session on, that this one has not
                    // listed or probed yet, gets its moment before the session moves off it.
                    if let Some(pod) = pin.pod.filter(|_| *pin.revision == *revision.name) {
                        throttler.await_first_probe(pod).await;
                    }
                    if usable(&pin) {
                        return Ok((pin, false));
                    }
                    expected = Some(pin);
                    continue;
                }
                Claim::Full => {}
            }
        }
        if waiting.is_none() {
            let wait = revision.concurrency.wait_for_seat(throttler.max_waiting());
            waiting = Some(wait.ok_or(AcquireError::QueueFull)?);
        }
        tokio::select! {
            () = joined => {}
            () = freed => {}
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// What the seats look like, per revision and per pod.
#[derive(Clone)]
pub(crate) struct SeatMetrics {
    held: IntGaugeVec,
    held_by_pod: IntGaugeVec,
    waiting: IntGaugeVec,
    waiting_by_pod: IntGaugeVec,
}

impl SeatMetrics {
    pub(crate) fn register(reg: &Registrar) -> Self {
        let revision = ["namespace", "service", "revision"];
        let pod = ["namespace", "service", "revision", "pod"];
        SeatMetrics {
            held: reg.gauge_vec(
                "activator_sessions_held",
                "Live sessions on the pods of a revision with sticky-sessions-per-pod, counted for every replica",
                &revision,
            ),
            held_by_pod: reg.gauge_vec(
                "activator_sessions_held_by_pod",
                "Live sessions one pod holds, of a revision with sticky-sessions-per-pod",
                &pod,
            ),
            waiting: reg.gauge_vec(
                "activator_sessions_waiting",
                "New sessions waiting in this replica for a pod with a free seat",
                &revision,
            ),
            waiting_by_pod: reg.gauge_vec(
                "activator_sessions_waiting_by_pod",
                "Requests of seated sessions waiting in this replica for their pod's capacity",
                &pod,
            ),
        }
    }
}

/// How the seats' census runs.
pub(crate) struct Census {
    pub world: Arc<ArcSwap<Snapshot>>,
    pub reporter: Reporter,
    pub metrics: SeatMetrics,
    /// Whether the reserve is reported to the autoscaler as demand (Knative's autoscaler knows no
    /// reserve); otherwise autoscaler-shim keeps it itself, from the same annotation.
    pub reserve_in_stats: bool,
}

/// Once a second: counts the seats of every revision with a cap on sessions per pod (see the
/// module's doc).
pub(crate) async fn census_loop(census: Census, pins: &Pins) {
    let mut tick = tokio::time::interval(CENSUS_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published: Vec<[String; 4]> = Vec::new();
    let mut published_revisions: Vec<[String; 3]> = Vec::new();
    for round in 0u64.. {
        tick.tick().await;
        let world = census.world.load_full();
        let capped = capped_revisions(&world);
        // A revision whose cap was removed scales on its requests again.
        for target in world.services().flat_map(|s| &s.traffic) {
            if target.revision.affinity.sessions_per_pod().is_none() && target.revision.concurrency.is_seated() {
                target.revision.concurrency.set_seats_reported(None);
            }
        }
        if capped.is_empty() && published.is_empty() && published_revisions.is_empty() {
            continue;
        }
        // A replica that cannot tell whether it leads reports no held seats: the autoscaler sees
        // too few for a moment rather than twice as many.
        let leads = pins.lead("seats", LEASE).await.unwrap_or(false);
        if leads && round % REINDEX_EVERY == 0 {
            reindex(pins, &capped).await;
        }
        let mut now_published = Vec::new();
        let mut now_published_revisions = Vec::new();
        for (scope, revision) in &capped {
            let throttler = &revision.throttler;
            let pods = throttler.ready_addrs();
            let held = pins.seats_held(scope, &revision.name, &pods).await;
            // Sorted, as the throttler keeps them; a pod that joined since holds none yet.
            throttler.set_sessions(|pod| pods.binary_search(&pod).map_or(0, |i| held[i]));
            let total: u64 = held.iter().sum();
            let per_pod = u64::from(revision.affinity.sessions_per_pod().unwrap_or(1));
            let reserve =
                if census.reserve_in_stats { u64::from(revision.affinity.session_reserve()) * per_pod } else { 0 };
            let concurrency = &revision.concurrency;
            concurrency.set_seats_reported(Some(if leads { total + reserve } else { 0 }));
            if (leads && total + reserve > 0) || concurrency.seats_waiting() > 0 {
                census.reporter.track(concurrency);
            }
            let labels = [revision.namespace.as_str(), revision.service.as_str(), &revision.name];
            census.metrics.held.with_label_values(&labels).set(gauge(total));
            census.metrics.waiting.with_label_values(&labels).set(gauge(concurrency.seats_waiting()));
            now_published_revisions.push(labels.map(str::to_owned));
            for (pod, n) in pods.iter().zip(&held) {
                let labels = [labels[0].to_owned(), labels[1].to_owned(), labels[2].to_owned(), pod.to_string()];
                let refs = labels.each_ref().map(String::as_str);
                census.metrics.held_by_pod.with_label_values(&refs).set(gauge(*n));
                let queued = throttler.queued_for(*pod).unwrap_or(0) as u64;
                census.metrics.waiting_by_pod.with_label_values(&refs).set(gauge(queued));
                now_published.push(labels);
            }
        }
        for gone in published.iter().filter(|l| !now_published.contains(l)) {
            let refs = gone.each_ref().map(String::as_str);
            let _ = census.metrics.held_by_pod.remove_label_values(&refs);
            let _ = census.metrics.waiting_by_pod.remove_label_values(&refs);
        }
        published = now_published;
        for gone in published_revisions.iter().filter(|l| !now_published_revisions.contains(l)) {
            let refs = gone.each_ref().map(String::as_str);
            let _ = census.metrics.held.remove_label_values(&refs);
            let _ = census.metrics.waiting.remove_label_values(&refs);
        }
        published_revisions = now_published_revisions;
    }
}

/// Puts the pins of `capped` revisions that reached Redis without a claim into their pods' seat
/// sets, one service scope at a time.
async fn reindex(pins: &Pins, capped: &[(Arc<str>, Arc<Revision>)]) {
    let mut by_scope: Vec<(&Arc<str>, Vec<Arc<str>>)> = Vec::new();
    for (scope, revision) in capped {
        match by_scope.iter_mut().find(|(s, _)| *s == scope) {
            Some((_, revisions)) => revisions.push(revision.name.clone()),
            None => by_scope.push((scope, vec![revision.name.clone()])),
        }
    }
    for (scope, revisions) in by_scope {
        if !pins.reindex_seats(scope, &revisions).await {
            tracing::debug!(%scope, "could not bring the seat sets up to date with the pins; next time");
        }
    }
}

/// Each revision whose pods hold a bounded number of sessions, once, with the scope its
/// sessions' pins are kept in.
fn capped_revisions(world: &Snapshot) -> Vec<(Arc<str>, Arc<Revision>)> {
    let mut capped: Vec<(Arc<str>, Arc<Revision>)> = Vec::new();
    for service in world.services() {
        for target in &service.traffic {
            let revision = &target.revision;
            let listed = capped.iter().any(|(_, r)| Arc::ptr_eq(&r.throttler, &revision.throttler));
            if revision.affinity.sessions_per_pod().is_some() && !listed {
                capped.push((service.affinity.scope().clone(), revision.clone()));
            }
        }
    }
    capped
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
