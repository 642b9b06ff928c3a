//! A split that holds although sessions stick (`sticky-split-mode: requests`): each revision
//! counts the requests routed to it over a sliding window (counted when routed, so requests
//! decided at the same moment see each other), and a new pin goes to the revision whose
//! share of those requests is furthest below its percent, so long or busy sessions on one side
//! are balanced by where new sessions go.
//!
//! With the Redis pin store the counts are every replica's: `sync` adds what this replica routed
//! since its last exchange to a per-service count in Redis and reads back the window's totals,
//! once per pin refresh interval in one pipeline per service, never per request. So a replica
//! that mostly sees new sessions steers them against the traffic that sessions pinned elsewhere
//! carry through other replicas. Without Redis, or while it does not answer, each replica
//! balances its own share.
//!
//! Counting (`crate::served`), for the services that split by requests only, is two relaxed
//! atomic adds on the request path; choosing reads the window, only for requests that make a new
//! pin. Must not decide anything else.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::pins::Pins;
use crate::served::WINDOW_SECONDS;
use crate::world::{Revision, Service, Snapshot};

/// Totals from Redis older than this many exchange intervals are not trusted: the replica falls
/// back to its own counts.
const STALE_AFTER_INTERVALS: u32 = 3;

/// The revision of `service`'s traffic (at more than 0 %) whose share of the requests routed
/// within the window is furthest below its percent: before any, the one with the largest percent.
pub fn most_under_served(service: &Service) -> Option<&Arc<Revision>> {
    let served: Vec<(u64, &Arc<Revision>, u32)> = service
        .traffic
        .iter()
        .filter(|t| t.percent > 0)
        .map(|t| (t.revision.served.total(), &t.revision, t.percent))
        .collect();
    let total = served.iter().map(|(n, ..)| *n).fold(0u64, u64::saturating_add).max(1) as f64;
    let deficit = |(n, _, percent): &(u64, &Arc<Revision>, u32)| f64::from(*percent) / 100.0 - *n as f64 / total;
    served.iter().max_by(|a, b| deficit(a).total_cmp(&deficit(b))).map(|(_, revision, _)| *revision)
}

/// Exchanges the counts of every service that splits by requests with the other replicas
/// through the pin store, every `interval`. Runs only with the Redis store.
pub async fn exchange_loop(world: &ArcSwap<Snapshot>, pins: &Pins, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let fresh_for = interval * STALE_AFTER_INTERVALS;
    loop {
        tick.tick().await;
        let splitting: Vec<Arc<Service>> =
            world.load().services().filter(|s| s.affinity.split_by_requests()).cloned().collect();
        for service in splitting {
            let revisions: Vec<&Arc<Revision>> =
                service.traffic.iter().filter(|t| t.percent > 0).map(|t| &t.revision).collect();
            let taken: Vec<Vec<(u64, u64)>> = revisions.iter().map(|r| r.served.take_unsent()).collect();
            let counts: Vec<(&str, &[(u64, u64)])> =
                revisions.iter().map(|r| r.name.as_str()).zip(taken.iter().map(Vec::as_slice)).collect();
            match pins.exchange_counts(service.affinity.scope(), &counts, WINDOW_SECONDS).await {
                Some(totals) => {
                    revisions.iter().zip(totals).for_each(|(r, total)| r.served.shared_total(total, fresh_for));
                }
                None => revisions.iter().zip(&taken).for_each(|(r, taken)| r.served.unsent_again(taken)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use crate::spec::testing::service as spec;
    use crate::world::publisher::tests::world;

    #[test]
    fn new_pins_go_where_the_request_share_is_furthest_below_the_percent() {
        let pod = SocketAddr::from(([127, 0, 0, 1], 9000));
        let svc = world(vec![spec("svc", &[(90, vec![pod]), (10, vec![pod]), (0, vec![pod])])])
            .service_for_host("svc.test")
            .unwrap()
            .clone();
        assert_eq!(most_under_served(&svc).map(|r| &*r.name), Some("svc-0"), "before any: the largest percent");
        let (stable, canary) = (&svc.traffic[0].revision, &svc.traffic[1].revision);
        (0..95).for_each(|_| stable.served.record());
        (0..5).for_each(|_| canary.served.record());
        assert_eq!(stable.served.total(), 95);
        assert_eq!(most_under_served(&svc).map(|r| &*r.name), Some("svc-1"), "5 % served of 10 %");
        (0..20).for_each(|_| canary.served.record());
        assert_eq!(most_under_served(&svc).map(|r| &*r.name), Some("svc-0"), "a revision at 0 % is never chosen");
    }
}
