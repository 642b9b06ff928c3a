//! When the request path stops asking Redis: after a failure, for a back-off that doubles with
//! each window that ends in a failure, then one probing call while the others keep routing with
//! local pins. Must not call Redis itself.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::pins::millis;

/// The request path's pause after a failed Redis call, doubling for each pause that ends in a
/// failure. The cap bounds how long sharing takes to resume after Redis returns.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Whether the request path may ask Redis now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Permit {
    /// Closed: every call may go.
    Call,
    /// The one call allowed after a back-off: its outcome closes or reopens the breaker.
    Probe,
}

/// Stops the request path asking Redis after a failure. Failures are counted per back-off
/// window: however many calls in flight fail together, the back-off grows once, and when it ends
/// a single call probes Redis while the others keep routing with local pins.
pub(super) struct Breaker {
    origin: Instant,
    /// 0 while closed, else the end of the back-off in milliseconds since `origin`.
    open_until_ms: AtomicU64,
    /// Back-off windows in a row that ended in a failure.
    failures: AtomicU32,
    /// Set while the half-open probe is out.
    probing: AtomicBool,
}

impl Breaker {
    pub(super) fn new() -> Self {
        Breaker {
            origin: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        // Never 0, which means closed.
        millis(self.origin.elapsed()).max(1)
    }

    /// Whether calls go through now (no back-off), without claiming anything.
    pub(super) fn is_closed(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) == 0
    }

    pub(super) fn permit(&self) -> Option<Permit> {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Some(Permit::Call);
        }
        if self.now_ms() < until {
            return None;
        }
        let claimed = self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        claimed.then_some(Permit::Probe)
    }

    /// Returns whether this success ended an outage.
    fn success(&self, permit: Permit) -> bool {
        if permit != Permit::Probe {
            // Read only: on the happy path nobody writes the shared cache line.
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.open_until_ms.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        true
    }

    /// Closes the breaker: Redis answered a call off the request path. Returns whether it was
    /// open.
    pub(super) fn reset(&self) -> bool {
        let was_open = self.open_until_ms.swap(0, Ordering::AcqRel) != 0;
        self.failures.store(0, Ordering::Relaxed);
        was_open
    }

    /// Opens the breaker unless a failure of this window already did; returns the back-off and
    /// whether this failure started an outage.
    pub(super) fn failure(&self, permit: Permit) -> Option<(Duration, bool)> {
        match permit {
            Permit::Probe => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                let backoff = backoff(failures);
                self.open_until_ms.store(self.now_ms().saturating_add(millis(backoff)), Ordering::Release);
                self.probing.store(false, Ordering::Release);
                Some((backoff, false))
            }
            Permit::Call => {
                let backoff = backoff(1);
                let until = self.now_ms().saturating_add(millis(backoff));
                // Only the first failure of a closed breaker opens it; calls that were already in
                // flight and fail afterwards belong to the same window.
                let opened = self.open_until_ms.compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed).is_ok();
                opened.then(|| {
                    self.failures.store(1, Ordering::Relaxed);
                    (backoff, true)
                })
            }
        }
    }
}

/// A permit to call Redis. A probe whose call never completes (its request went away) hands the
/// probe on to the next caller instead of leaving the breaker waiting for it.
pub(super) struct Granted<'a> {
    breaker: &'a Breaker,
    pub(super) permit: Permit,
    settled: bool,
}

impl<'a> Granted<'a> {
    /// A call `breaker` let through with `permit`, to be settled with its outcome.
    pub(super) fn new(breaker: &'a Breaker, permit: Permit) -> Self {
        Granted { breaker, permit, settled: false }
    }

    /// Records the outcome; returns whether a success ended an outage, or the back-off a failure
    /// started and whether it started an outage.
    pub(super) fn settle<T, E>(mut self, result: &Result<T, E>) -> Result<bool, Option<(Duration, bool)>> {
        self.settled = true;
        match result {
            Ok(_) => Ok(self.breaker.success(self.permit)),
            Err(_) => Err(self.breaker.failure(self.permit)),
        }
    }
}

impl Drop for Granted<'_> {
    fn drop(&mut self) {
        if !self.settled && self.permit == Permit::Probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

/// The back-off after `failures` windows in a row ended in a failure.
pub(super) fn backoff(failures: u32) -> Duration {
    MIN_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_once_per_window_and_one_probe_ends_it() {
        let breaker = Breaker::new();
        assert_eq!(breaker.permit(), Some(Permit::Call));
        // 200 calls in flight fail together: one window, the shortest back-off.
        let opened: Vec<_> = (0..200).filter_map(|_| breaker.failure(Permit::Call)).collect();
        assert_eq!(opened, [(MIN_BACKOFF, true)]);
        assert_eq!(breaker.permit(), None, "open");
        breaker.open_until_ms.store(1, Ordering::Release);
        assert_eq!(breaker.permit(), Some(Permit::Probe), "the back-off is over: one probe");
        assert_eq!(breaker.permit(), None, "everyone else waits for the probe");
        assert!(!breaker.success(Permit::Call), "a call from before the outage does not close it");
        assert_eq!(breaker.failure(Permit::Probe), Some((MIN_BACKOFF * 2, false)), "a failed probe doubles");
        for expected in [MIN_BACKOFF * 4, MIN_BACKOFF * 8, MIN_BACKOFF * 16, MAX_BACKOFF, MAX_BACKOFF] {
            breaker.open_until_ms.store(1, Ordering::Release);
            assert_eq!(breaker.permit(), Some(Permit::Probe));
            assert_eq!(breaker.failure(Permit::Probe), Some((expected, false)));
        }
        breaker.open_until_ms.store(1, Ordering::Release);
        let abandoned = Granted { breaker: &breaker, permit: breaker.permit().unwrap(), settled: false };
        drop(abandoned);
        assert_eq!(breaker.permit(), Some(Permit::Probe), "an abandoned probe passes the probe on");
        assert!(breaker.success(Permit::Probe), "the probe closes it");
        assert_eq!(breaker.permit(), Some(Permit::Call));
        assert_eq!(breaker.failure(Permit::Call), Some((MIN_BACKOFF, true)), "a new outage starts short");
    }
}
