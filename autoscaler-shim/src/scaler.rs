//! Deciding each revision's scale from the concurrency the activators report: a moving window of
//! reported concurrency, a target per pod, an immediate scale-up on a poke from zero, and
//! scale to zero after an idle grace period, within min/max scale. The decision is a pure
//! function; `Scaler` only keeps the windows.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How one revision scales.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Concurrent requests one pod should carry.
    pub target: f64,
    pub min_scale: u32,
    /// 0: no upper bound.
    pub max_scale: u32,
    /// How long a revision must see no demand before it goes to zero.
    pub idle_grace: Duration,
    /// Pods kept beyond the demand (`sticky-session-reserve`): with one session per pod, pods
    /// with a free seat, so a new session starts on a warm pod.
    pub reserve: u32,
}

/// The pods `policy` wants for a revision with `current` pods, `average` concurrency over the
/// window, and no demand for `idle_for`: the demand's pods and the reserve beyond them.
pub fn desired(policy: &Policy, current: u32, average: f64, idle_for: Duration) -> u32 {
    let want = if average > 0.0 {
        ((average / policy.target).ceil() as u32).max(1).saturating_add(policy.reserve)
    } else if idle_for < policy.idle_grace {
        current
    } else {
        0
    };
    let want = want.max(policy.reserve).max(policy.min_scale);
    if policy.max_scale > 0 { want.min(policy.max_scale) } else { want }
}

/// One report of one revision from one activator.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub namespace: String,
    pub revision: String,
    pub concurrency: f64,
    pub requests: f64,
}

#[derive(Default)]
struct Window {
    samples: VecDeque<(Instant, f64)>,
    last_demand: Option<Instant>,
}

/// The concurrency windows of every revision the activators report.
pub struct Scaler {
    window: Duration,
    revisions: HashMap<(String, String), Window>,
}

impl Scaler {
    pub fn new(window: Duration) -> Self {
        Scaler { window, revisions: HashMap::new() }
    }

    /// Records a report; returns whether it is demand (a poke, or requests) for the revision.
    pub fn record(&mut self, report: &Report, now: Instant) -> bool {
        let window = self.revisions.entry((report.namespace.clone(), report.revision.clone())).or_default();
        window.samples.push_back((now, report.concurrency));
        let demand = report.concurrency > 0.0 || report.requests > 0.0;
        if demand {
            window.last_demand = Some(now);
        }
        demand
    }

    /// Average reported concurrency over the window (summed over activators, per second) and how
    /// long the revision has seen no demand.
    pub fn observe(&mut self, namespace: &str, revision: &str, now: Instant) -> (f64, Duration) {
        let Some(window) = self.revisions.get_mut(&(namespace.to_owned(), revision.to_owned())) else {
            return (0.0, Duration::MAX);
        };
        while window.samples.front().is_some_and(|(at, _)| now.duration_since(*at) > self.window) {
            window.samples.pop_front();
        }
        let total: f64 = window.samples.iter().map(|(_, c)| c).sum();
        let average = total / self.window.as_secs_f64().max(1.0);
        let idle_for = window.last_demand.map_or(Duration::MAX, |at| now.duration_since(at));
        (average, idle_for)
    }

    pub fn revisions(&self) -> Vec<(String, String)> {
        self.revisions.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy =
        Policy { target: 10.0, min_scale: 0, max_scale: 5, idle_grace: Duration::from_secs(30), reserve: 0 };

    #[test]
    fn follows_demand_within_bounds() {
        let idle = Duration::ZERO;
        assert_eq!(desired(&POLICY, 0, 0.1, idle), 1, "any demand wakes a revision at zero");
        assert_eq!(desired(&POLICY, 1, 25.0, idle), 3);
        assert_eq!(desired(&POLICY, 3, 500.0, idle), 5, "max-scale");
        assert_eq!(desired(&Policy { max_scale: 0, ..POLICY }, 3, 500.0, idle), 50, "no max");
        assert_eq!(desired(&Policy { min_scale: 2, ..POLICY }, 0, 0.0, Duration::MAX), 2, "min-scale");
    }

    #[test]
    fn the_reserve_is_kept_beyond_the_demand_even_at_rest() {
        let sessions = Policy { target: 1.0, max_scale: 0, reserve: 1, ..POLICY };
        assert_eq!(desired(&sessions, 0, 0.0, Duration::MAX), 1, "a warm pod before any session");
        assert_eq!(desired(&sessions, 1, 1.0, Duration::ZERO), 2, "one held, one free");
        assert_eq!(desired(&sessions, 2, 3.0, Duration::ZERO), 4);
        assert_eq!(desired(&Policy { max_scale: 3, ..sessions }, 2, 3.0, Duration::ZERO), 3, "within max-scale");
    }

    #[test]
    fn scales_to_zero_only_after_the_grace_period() {
        assert_eq!(desired(&POLICY, 2, 0.0, Duration::from_secs(29)), 2);
        assert_eq!(desired(&POLICY, 2, 0.0, Duration::from_secs(30)), 0);
    }

    #[test]
    fn windows_average_and_forget() {
        let mut scaler = Scaler::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let report = |c| Report { namespace: "ns".into(), revision: "r".into(), concurrency: c, requests: 0.0 };
        assert!(scaler.record(&report(4.0), t0));
        assert!(!scaler.record(&report(0.0), t0 + Duration::from_secs(1)));
        assert_eq!(scaler.observe("ns", "r", t0 + Duration::from_secs(1)), (2.0, Duration::from_secs(1)));
        let (average, idle) = scaler.observe("ns", "r", t0 + Duration::from_secs(10));
        assert_eq!((average, idle), (0.0, Duration::from_secs(10)));
        assert_eq!(scaler.observe("ns", "other", t0).1, Duration::MAX);
    }
}
