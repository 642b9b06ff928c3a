//! Sending a request again after its pod failed it before any response byte arrived (the pod
//! died, or reset or closed the connection mid-exchange), as Envoy's `retry_on: reset` does:
//! which requests may go twice (`Retry`, from `activator.knative.dev/retry`), how much of a body
//! is kept to send it again (`BODY_LIMIT`), and the per-revision `Budget` that keeps retries from
//! multiplying the load when a whole revision fails. Must not choose pods nor send anything: the
//! handler does both.
//!
//! A request none of whose bytes reached its pod is not a retry: the pod never saw it, so it goes
//! to another pod whatever its method, outside the budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::header::HeaderName;
use http::{Method, Request};

use crate::labelled::label_values;

/// The most body kept to send a request again; a larger body makes its request go once.
pub(crate) const BODY_LIMIT: usize = 64 * 1024;

/// The header (an IETF draft that Stripe and others use) by which a client says that sending its
/// request twice does what sending it once does.
pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Which requests of a revision may be sent again (`activator.knative.dev/retry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Never: every request reaches a pod at most once.
    Off,
    /// Requests that are safe to repeat: `GET`, `HEAD`, `OPTIONS`, and any carrying an
    /// `Idempotency-Key`.
    #[default]
    Safe,
    /// Every request whose body was kept, for services whose every request may be repeated.
    All,
}

impl Retry {
    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value {
            "off" => Some(Retry::Off),
            "safe" => Some(Retry::Safe),
            "all" => Some(Retry::All),
            _ => None,
        }
    }

    /// Whether `req` may reach a pod twice.
    pub(crate) fn allows<B>(self, req: &Request<B>) -> bool {
        match self {
            Retry::Off => false,
            Retry::All => true,
            Retry::Safe => {
                matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
                    || req.headers().contains_key(IDEMPOTENCY_KEY)
            }
        }
    }
}

label_values! {
    /// What became of a request its pod failed after it reached it, as
    /// `activator_requests_retried_total` labels it.
    pub(crate) enum Outcome {
        /// Sent again, to another ready pod of its revision.
        Retried = "retried",
        /// The revision's budget was spent: the client got the pod's failure.
        OverBudget = "over-budget",
        /// Allowed, but its body was larger than `BODY_LIMIT` or had not all passed.
        NotKept = "not-kept",
        /// No other pod of the revision was ready.
        NoPod = "no-pod",
    }
}

/// Each revision's retries stay within `MIN_RETRIES` plus `RATIO_PERCENT` of the requests it was
/// sent, over the current `WINDOW` and the one before (Finagle's and Linkerd's rule): a pod dying
/// costs its few requests one more try each, a revision failing everything costs it a fifth more
/// load at most.
pub(crate) const MIN_RETRIES: u64 = 10;
pub(crate) const RATIO_PERCENT: u64 = 20;
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// One window's counts; `window` is its number since the budget's origin.
#[derive(Default)]
struct Slot {
    window: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A revision's retry budget. Counting a request is one atomic add; a reset at a window's turn
/// may lose a few counts to a race, which only makes the budget approximate.
pub(crate) struct Budget {
    origin: Instant,
    slots: [Slot; 2],
}

impl Default for Budget {
    fn default() -> Self {
        Budget { origin: Instant::now(), slots: Default::default() }
    }
}

impl Budget {
    fn window(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_millis() / WINDOW.as_millis()) as u64
    }

    /// The slot of `window`, emptied first if it still holds an older window's counts.
    fn slot(&self, window: u64) -> &Slot {
        let slot = &self.slots[(window % 2) as usize];
        let held = slot.window.load(Ordering::Acquire);
        if held != window && slot.window.compare_exchange(held, window, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts a request sent to the revision.
    pub(crate) fn sent(&self) {
        self.sent_at(Instant::now());
    }

    fn sent_at(&self, now: Instant) {
        self.slot(self.window(now)).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, if it has one.
    pub(crate) fn try_retry(&self) -> bool {
        self.try_retry_at(Instant::now())
    }

    fn try_retry_at(&self, now: Instant) -> bool {
        let window = self.window(now);
        let current = self.slot(window);
        let previous = &self.slots[((window + 1) % 2) as usize];
        let (mut requests, mut retries) =
            (current.requests.load(Ordering::Relaxed), current.retries.load(Ordering::Relaxed));
        if window > 0 && previous.window.load(Ordering::Acquire) == window - 1 {
            requests += previous.requests.load(Ordering::Relaxed);
            retries += previous.retries.load(Ordering::Relaxed);
        }
        if retries >= MIN_RETRIES + requests * RATIO_PERCENT / 100 {
            return false;
        }
        current.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().method(method).uri("/");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn safe_requests_are_the_safe_methods_and_those_with_an_idempotency_key() {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(Retry::Safe.allows(&request(method.clone(), &[])), "{method}");
        }
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(!Retry::Safe.allows(&request(method.clone(), &[])), "{method}");
            assert!(Retry::Safe.allows(&request(method.clone(), &[("Idempotency-Key", "k1")])), "{method}");
            assert!(Retry::All.allows(&request(method.clone(), &[])), "{method}");
        }
        assert!(!Retry::Off.allows(&request(Method::GET, &[("Idempotency-Key", "k1")])));
        assert_eq!(
            ["off", "safe", "all", "yes"].map(Retry::parse),
            [Some(Retry::Off), Some(Retry::Safe), Some(Retry::All), None]
        );
    }

    #[test]
    fn retries_stay_within_the_minimum_and_a_fifth_of_the_requests() {
        let budget = Budget::default();
        let now = budget.origin;
        let granted = (0..100).filter(|_| budget.try_retry_at(now)).count();
        assert_eq!(granted as u64, MIN_RETRIES, "a revision that serves nothing may still retry a few");
        for _ in 0..1000 {
            budget.sent_at(now);
        }
        let more = (0..1000).filter(|_| budget.try_retry_at(now)).count();
        assert_eq!(more as u64, 1000 * RATIO_PERCENT / 100, "a fifth of the requests");

        // The next window still counts this one's; the one after has forgotten it.
        let next = now + WINDOW;
        assert!(!budget.try_retry_at(next), "the previous window's retries still count");
        let later = now + WINDOW * 3;
        assert_eq!((0..100).filter(|_| budget.try_retry_at(later)).count() as u64, MIN_RETRIES);
    }
}
