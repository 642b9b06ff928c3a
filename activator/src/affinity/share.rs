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
//! Counting, for the services that split by requests only, is two relaxed atomic adds on the
//! request path; choosing reads the window, only for requests that make a new pin. Must not
//! decide anything else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::pins::Pins;
use crate::world::{Revision, Service, Snapshot};

/// Seconds the window covers.
const WINDOW_SECONDS: u64 = 60;
/// Totals from Redis older than this many exchange intervals are not trusted: the replica falls
/// back to its own counts.
const STALE_AFTER_INTERVALS: u32 = 3;
/// The shared counts' periods (`Pins::exchange_counts` keeps one hash per period): what was
/// routed here and not sent yet is kept by the period it was routed in, so counts held through
/// an outage land where they belong, and those older than the window are dropped.
pub const COUNT_PERIOD_SECONDS: u64 = 10;
const UNSENT_PERIODS: usize = (WINDOW_SECONDS / COUNT_PERIOD_SECONDS) as usize + 1;

/// Requests routed to one revision over the last `WINDOW_SECONDS`: this replica's, and every
/// replica's as of the last exchange through Redis.
pub struct Served {
    start: Instant,
    /// Seconds since the Unix epoch at `start`, so periods are the same on every replica.
    start_unix: u64,
    /// Slot `s % WINDOW_SECONDS` counts second `s`, which `seconds` records.
    counts: [AtomicU64; WINDOW_SECONDS as usize],
    seconds: [AtomicU64; WINDOW_SECONDS as usize],
    /// Routed here since the last exchange, by period: slot `p % UNSENT_PERIODS` counts period
    /// `p` (Unix seconds / `COUNT_PERIOD_SECONDS`), which `unsent_periods` records.
    unsent: [AtomicU64; UNSENT_PERIODS],
    unsent_periods: [AtomicU64; UNSENT_PERIODS],
    /// Every replica's requests within the window, as Redis last said.
    shared: AtomicU64,
    /// Until when, in milliseconds since `start`, `shared` is trusted; 0 before any exchange.
    shared_until: AtomicU64,
}

impl Default for Served {
    fn default() -> Self {
        fn zeros<const N: usize>() -> [AtomicU64; N] {
            std::array::from_fn(|_| AtomicU64::new(0))
        }
        let start_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Served {
            start: Instant::now(),
            start_unix,
            counts: zeros(),
            seconds: zeros(),
            unsent: zeros(),
            unsent_periods: zeros(),
            shared: AtomicU64::new(0),
            shared_until: AtomicU64::new(0),
        }
    }
}

impl Served {
    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The shared counts' period now.
    fn period(&self) -> u64 {
        (self.start_unix + self.now()) / COUNT_PERIOD_SECONDS
    }

    pub fn record(&self) {
        let now = self.now();
        let slot = (now % WINDOW_SECONDS) as usize;
        // The first request of a second claims its slot and clears what an older second left;
        // the others only read, so concurrent requests do not all write one cache line.
        if self.seconds[slot].load(Ordering::Acquire) != now && self.seconds[slot].swap(now, Ordering::AcqRel) != now {
            self.counts[slot].store(0, Ordering::Release);
        }
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.add_unsent(self.period(), 1);
    }

    /// Adds to what is to be sent for `period`. The slot's last period is at least a window
    /// older: the first count of the new period claims the slot and drops it, as the window has.
    fn add_unsent(&self, period: u64, n: u64) {
        let slot = (period % UNSENT_PERIODS as u64) as usize;
        let held = self.unsent_periods[slot].load(Ordering::Acquire);
        if held < period
            && self.unsent_periods[slot].compare_exchange(held, period, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.unsent[slot].store(0, Ordering::Release);
        }
        // A newer period owns the slot: this count is older than the window.
        if self.unsent_periods[slot].load(Ordering::Acquire) == period {
            self.unsent[slot].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Requests within the window: every replica's while Redis's totals are fresh (plus this
    /// replica's since), else this replica's own.
    pub fn total(&self) -> u64 {
        if self.now_ms() < self.shared_until.load(Ordering::Acquire) {
            let unsent = self.unsent.iter().map(|n| n.load(Ordering::Relaxed)).fold(0u64, u64::saturating_add);
            return self.shared.load(Ordering::Relaxed).saturating_add(unsent);
        }
        let now = self.now();
        (0..WINDOW_SECONDS as usize)
            .filter(|&slot| now.saturating_sub(self.seconds[slot].load(Ordering::Acquire)) < WINDOW_SECONDS)
            .map(|slot| self.counts[slot].load(Ordering::Relaxed))
            .fold(0u64, u64::saturating_add)
    }

    /// What to add to the shared counts, by period within the window: taken, so a request is
    /// sent once.
    fn take_unsent(&self) -> Vec<(u64, u64)> {
        let oldest = self.period().saturating_sub(UNSENT_PERIODS as u64 - 1);
        (0..UNSENT_PERIODS)
            .filter_map(|slot| {
                let period = self.unsent_periods[slot].load(Ordering::Acquire);
                let n = self.unsent[slot].swap(0, Ordering::AcqRel);
                (n > 0 && period >= oldest).then_some((period, n))
            })
            .collect()
    }

    /// Redis answered: `total` requests within the window, ours included; trusted for `fresh_for`.
    fn shared_total(&self, total: u64, fresh_for: Duration) {
        self.shared.store(total, Ordering::Relaxed);
        let fresh_for = u64::try_from(fresh_for.as_millis()).unwrap_or(u64::MAX);
        self.shared_until.store(self.now_ms().saturating_add(fresh_for), Ordering::Release);
    }

    /// Redis did not answer: what was taken is sent with the next exchange, in its own periods.
    fn unsent_again(&self, taken: &[(u64, u64)]) {
        for &(period, n) in taken {
            self.add_unsent(period, n);
        }
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
    let total = served.iter().map(|(n, ..)| *n).fold(0u64, u64::saturating_add).max(1) as f64;
    let deficit = |(n, _, percent): &(u64, &Arc<Revision>, u32)| f64::from(*percent) / 100.0 - *n as f64 / total;
    served.iter().max_by(|a, b| deficit(a).total_cmp(&deficit(b))).map(|(_, revision, _)| *revision)
}

/// Exchanges the counts of every service that splits by requests with the other replicas
/// through the pin store, every `interval`. Runs only with the Redis store.
pub async fn sync(world: &ArcSwap<Snapshot>, pins: &Pins, interval: Duration) {
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

    #[test]
    fn every_replicas_totals_count_while_fresh_and_this_replicas_own_after() {
        let served = Served::default();
        (0..5).for_each(|_| served.record());
        let now = served.period();
        assert_eq!(served.take_unsent(), [(now, 5)]);
        served.shared_total(100, Duration::from_secs(60));
        served.record();
        assert_eq!(served.total(), 101, "Redis's total, which has ours, and what came since");
        served.unsent_again(&[(now, 3)]);
        assert_eq!(served.total(), 104, "a failed exchange's counts are sent again");
        served.shared_total(100, Duration::ZERO);
        assert_eq!(served.total(), 6, "stale totals give way to this replica's window");
    }

    /// Issue 25, item 9: requests counted during a Redis outage are sent for the periods they
    /// were routed in, and those older than the window are dropped rather than added to now.
    #[test]
    fn counts_from_an_outage_land_in_their_own_periods() {
        let served = Served::default();
        let now = served.period();
        served.unsent_again(&[(now - 2, 7), (now - 1, 4), (now - 40, 9)]);
        served.record();
        let mut taken = served.take_unsent();
        taken.sort_unstable();
        assert_eq!(taken, [(now - 2, 7), (now - 1, 4), (now, 1)], "aged, and one far older than the window gone");
    }
}
