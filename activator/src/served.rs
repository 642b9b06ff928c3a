//! Requests routed to each revision over a sliding window, this replica's and, as of the last
//! exchange through the pin store, every replica's: what `sticky-split-mode: requests` steers new
//! pins by (`affinity::share`). Counting is two relaxed atomic adds; nothing here talks to Redis
//! or reads the world.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Seconds the window covers.
pub(crate) const WINDOW_SECONDS: u64 = 60;
/// The shared counts' periods (`affinity::share` keeps one hash per period in Redis): what was
/// routed here and not sent yet is kept by the period it was routed in, so counts held through
/// an outage land where they belong, and those older than the window are dropped.
pub(crate) const COUNT_PERIOD_SECONDS: u64 = 10;
const UNSENT_PERIODS: usize = (WINDOW_SECONDS / COUNT_PERIOD_SECONDS) as usize + 1;

/// Requests routed to one revision over the last `WINDOW_SECONDS`: this replica's, and every
/// replica's as of the last exchange through Redis.
pub(crate) struct Served {
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
    pub(crate) fn period(&self) -> u64 {
        (self.start_unix + self.now()) / COUNT_PERIOD_SECONDS
    }

    pub(crate) fn record(&self) {
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
    pub(crate) fn total(&self) -> u64 {
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
    pub(crate) fn take_unsent(&self) -> Vec<(u64, u64)> {
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
    pub(crate) fn shared_total(&self, total: u64, fresh_for: Duration) {
        self.shared.store(total, Ordering::Relaxed);
        let fresh_for = u64::try_from(fresh_for.as_millis()).unwrap_or(u64::MAX);
        self.shared_until.store(self.now_ms().saturating_add(fresh_for), Ordering::Release);
    }

    /// Redis did not answer: what was taken is sent with the next exchange, in its own periods.
    pub(crate) fn unsent_again(&self, taken: &[(u64, u64)]) {
        for &(period, n) in taken {
            self.add_unsent(period, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
