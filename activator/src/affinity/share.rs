//! A split that holds although sessions stick (`sticky-split-mode: requests`): each revision
//! counts the requests routed to it over a sliding window (counted when routed, so requests
//! decided at the same moment see each other), and a new pin goes to the revision whose
//! share of those requests is furthest below its percent, so long or busy sessions on one side
//! are balanced by where new sessions go. Counts are this replica's; with several replicas each
//! balances its own share, so the whole does too when the load spreads evenly.
//!
//! Counting is one relaxed atomic add on the request path; choosing reads the window. Must not
//! decide anything else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::world::{Revision, Service};

/// Seconds the window covers.
const WINDOW_SECONDS: u64 = 60;

/// Requests served per second over the last `WINDOW_SECONDS`.
pub struct Served {
    start: Instant,
    /// Slot `s % WINDOW_SECONDS` counts second `s`, which `seconds` records.
    counts: [AtomicU64; WINDOW_SECONDS as usize],
    seconds: [AtomicU64; WINDOW_SECONDS as usize],
}

impl Default for Served {
    fn default() -> Self {
        let zeros = || std::array::from_fn(|_| AtomicU64::new(0));
        Served { start: Instant::now(), counts: zeros(), seconds: zeros() }
    }
}

impl Served {
    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    pub fn record(&self) {
        let now = self.now();
        let slot = (now % WINDOW_SECONDS) as usize;
        // The first request of a second claims its slot and clears what an older second left.
        if self.seconds[slot].swap(now, Ordering::AcqRel) != now {
            self.counts[slot].store(0, Ordering::Release);
        }
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests served within the window.
    pub fn total(&self) -> u64 {
        let now = self.now();
        (0..WINDOW_SECONDS as usize)
            .filter(|&slot| now.saturating_sub(self.seconds[slot].load(Ordering::Acquire)) < WINDOW_SECONDS)
            .map(|slot| self.counts[slot].load(Ordering::Relaxed))
            .sum()
    }
}

/// The revision of `service`'s traffic (at more than 0 %) whose share of the requests routed
/// within the window is furthest below its percent: before any, the one with the largest percent.
pub fn most_under_served(service: &Service) -> Option<&Arc<Revision>> {
    let served: Vec<(u64, &Arc<Revision>, u32)> = service
        .traffic
        .iter()
        .filter(|t| t.percent > 0)
        .map(|t| (t.revision.served.total(), &t.revision, t.percent))
        .collect();
    let total = served.iter().map(|(n, ..)| n).sum::<u64>().max(1) as f64;
    let deficit = |(n, _, percent): &(u64, &Arc<Revision>, u32)| f64::from(*percent) / 100.0 - *n as f64 / total;
    served.iter().max_by(|a, b| deficit(a).total_cmp(&deficit(b))).map(|(_, revision, _)| *revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use crate::world::publisher::tests::world;
    use crate::world::spec::tests::service as spec;

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
