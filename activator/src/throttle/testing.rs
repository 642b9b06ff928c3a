//! What the throttler's tests share: pods, bounds, metrics and throttlers to test with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;

use super::*;
pub(super) use crate::spec::{Backends, Probe};

pub(super) fn addrs(n: u16) -> Vec<SocketAddr> {
    (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i))).collect()
}

pub(super) fn limits(max_waiting: usize, max_bytes: u64, total: u64) -> QueueLimits {
    QueueLimits { max_waiting, max_bytes, total: Arc::new(QueueBudget::new(total, 1 << 30)) }
}

pub(super) fn gauge() -> ThrottleMetrics {
    ThrottleMetrics {
        queued: [IntGauge::new("queued", "test").unwrap(), IntGauge::new("queued2", "test").unwrap()],
        active: IntGauge::new("active", "test").unwrap(),
        outside_subset: prometheus::IntCounter::new("outside", "test").unwrap(),
    }
}

/// Gives `t` these pods, probed with `probe` (trusted at once when it is `Probe::None`).
pub(super) fn set(t: &Throttler, pods: &[SocketAddr], probe: Probe) -> bool {
    t.set_backends(&Backends { probed: pods.to_vec(), ..Backends::default() }, probe)
}

pub(super) fn waiting_for_probe(t: &Throttler) -> Vec<SocketAddr> {
    t.probe_plan().map(|p| p.pods).unwrap_or_default()
}

pub(super) fn throttler(cc: u32, pods: u16) -> Arc<Throttler> {
    let t = Throttler::new(cc, limits(4, 1 << 20, 1000), gauge());
    set(&t, &addrs(pods), Probe::None);
    t
}

pub(super) fn in_flight(t: &Throttler) -> Vec<usize> {
    t.ready().iter().map(|p| p.in_flight()).collect()
}

pub(super) async fn futures_join(t: &Arc<Throttler>, n: usize) -> Vec<Lease> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(t.acquire(Want::Any, 0).await.unwrap());
    }
    out
}

pub(super) fn spawn_acquire(t: &Arc<Throttler>, want: Want) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
    let t = t.clone();
    tokio::spawn(async move { t.acquire(want, 0).await })
}

pub(super) async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met in time");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
