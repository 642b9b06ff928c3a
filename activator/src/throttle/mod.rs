//! Per-revision admission: which pods may take traffic, how many requests each may hold
//! (`containerConcurrency`), which pod the next request goes to, and the FIFO queue of requests
//! waiting for a slot, including while the revision has no ready pod at all (scale from zero).
//!
//! This file owns the `Throttler` and a request's way through it: `acquire` takes a slot (a
//! `Lease`) at once when one is free, touching only atomics, or waits in the queue; dropping the
//! lease gives the slot back. The parts, as upstream splits the same ground into
//! `throttler.go`, `lb_policy.go` and `revision_backends.go`:
//! - `queue`: the wait queue, its bounds in requests and body bytes, and who a freed slot goes to;
//! - `balance`: which pod with a free slot a request takes (the policy by
//!   `containerConcurrency`), and where a new session is placed (rendezvous);
//! - `backends`: the ready set (trusted pods, probed pods, pods found unreachable), this
//!   activator's subset of them, and the revision's private Service when pods cannot be reached;
//! - `pace`: how fast a queue is let go when pods turn ready under it.
//!
//! Must not know about hosts, splits or pins: callers say which pod they want, if any.

mod backends;
mod balance;
mod pace;
mod queue;
#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::pool::{PodClient, Transport};
use backends::Pending;
use queue::Queue;

pub(crate) use queue::{
    DEFAULT_MAX_BYTES, DEFAULT_MAX_BYTES_TOTAL, DEFAULT_MAX_WAITING, DEFAULT_MAX_WAITING_TOTAL, QueueBudget,
    QueueLimits,
};

/// Which pod a request may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    Any,
    /// This pod, waiting for its capacity if it is busy; any pod if it is no longer ready.
    Pod(SocketAddr),
    /// This pod if it has room now (and is in this activator's subset), else any: where a new
    /// session goes when every replica is to place it alike (`rendezvous`).
    Prefer(SocketAddr),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AcquireError {
    #[error("the request queue is full")]
    QueueFull,
}

pub(crate) struct Pod {
    pub addr: SocketAddr,
    pub client: PodClient,
    in_flight: AtomicUsize,
    /// Requests queued for this pod in particular; a new request does not take a slot of theirs.
    pinned_waiting: AtomicUsize,
    /// Whether the pod is in this activator's subset, which unpinned requests are balanced over.
    assigned: AtomicBool,
    /// When it began to take traffic here.
    ready_since: Instant,
    /// Live session pins to it this replica knows of: counted from the pin table every few
    /// seconds, and one more for each session pinned here since (`sticky-session-placement`).
    sessions: AtomicU64,
}

impl Pod {
    fn new(addr: SocketAddr, transport: Transport) -> Arc<Self> {
        Arc::new(Pod {
            addr,
            client: PodClient::new(addr, transport),
            in_flight: AtomicUsize::new(0),
            pinned_waiting: AtomicUsize::new(0),
            assigned: AtomicBool::new(true),
            ready_since: Instant::now(),
            sessions: AtomicU64::new(0),
        })
    }

    fn is_assigned(&self) -> bool {
        self.assigned.load(Ordering::Relaxed)
    }

    /// May take a request that waits for any pod, now: in this activator's subset, and nobody
    /// waits for it in particular.
    fn open_to_any(&self) -> bool {
        self.is_assigned() && self.pinned_waiting.load(Ordering::SeqCst) == 0
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `capacity` 0 means unlimited.
    fn try_reserve(&self, capacity: usize) -> bool {
        if capacity == 0 {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        self.in_flight.fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| (n < capacity).then_some(n + 1)).is_ok()
    }
}

pub(crate) struct Throttler {
    /// `containerConcurrency`: the slots of one pod; 0 for unlimited. Can change in place (a
    /// topology edit), keeping in-flight counts and waiters.
    container_concurrency: AtomicUsize,
    /// Set while traffic goes through the private Service, whose slots are `cluster_ip_slots`.
    through_cluster_ip: AtomicBool,
    cluster_ip_slots: AtomicUsize,
    limits: QueueLimits,
    metrics: ThrottleMetrics,
    /// Pods that may take traffic, sorted by address.
    pods: ArcSwap<Vec<Arc<Pod>>>,
    /// Endpoints waiting for their first successful readiness probe.
    pending: Mutex<Pending>,
    cursor: AtomicUsize,
    /// Mirrors `queue.live` so a release can skip the mutex when nobody waits.
    waiting: AtomicUsize,
    /// Waiting requests that may use any pod; while there are some, a new request waits too.
    waiting_any: AtomicUsize,
    queue: Mutex<Queue>,
    /// Woken when pods become ready or leave, for requests waiting for a pod's first probe.
    probed: Notify,
    /// Woken when a pod's count of live sessions drops (`set_sessions`).
    sessions_dropped: Notify,
    /// Set while waiters are let go at a pace (`RELEASE_BATCH`).
    releasing: AtomicBool,
    /// Waiters taking any pod let go so far, for the pace's stall check.
    released: AtomicU64,
    /// This throttler, for the task that releases waiters in batches.
    me: Weak<Throttler>,
    /// The certificates pods are verified with when they are reached over TLS.
    internal_tls: std::sync::OnceLock<Arc<crate::tls::InternalTls>>,
}

/// What a throttler reports.
#[derive(Clone)]
pub(crate) struct ThrottleMetrics {
    /// Kept at the number of waiting requests (ours and upstream's name).
    pub queued: [IntGauge; 2],
    /// Kept at the number of requests holding a slot.
    pub active: IntGauge,
    /// Requests sent to a pinned pod outside this activator's subset.
    pub outside_subset: prometheus::IntCounter,
}

impl ThrottleMetrics {
    fn set_queued(&self, waiting: usize) {
        let waiting = i64::try_from(waiting).unwrap_or(i64::MAX);
        self.queued.iter().for_each(|gauge| gauge.set(waiting));
    }
}

/// A slot on one pod, held for as long as the request (and its response body or upgraded
/// connection) lives.
pub(crate) struct Lease {
    throttler: Arc<Throttler>,
    pod: Arc<Pod>,
}

impl Lease {
    pub(crate) fn pod(&self) -> &Arc<Pod> {
        &self.pod
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.throttler.metrics.active.dec();
        self.throttler.release(&self.pod);
    }
}

impl Throttler {
    pub(crate) fn new(container_concurrency: u32, limits: QueueLimits, metrics: ThrottleMetrics) -> Arc<Self> {
        Arc::new_cyclic(|me| Throttler {
            container_concurrency: AtomicUsize::new(container_concurrency as usize),
            through_cluster_ip: AtomicBool::new(false),
            cluster_ip_slots: AtomicUsize::new(0),
            limits,
            metrics,
            pods: ArcSwap::default(),
            pending: Mutex::new(Pending::new()),
            cursor: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            waiting_any: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            probed: Notify::new(),
            sessions_dropped: Notify::new(),
            releasing: AtomicBool::new(false),
            released: AtomicU64::new(0),
            me: me.clone(),
            internal_tls: std::sync::OnceLock::new(),
        })
    }

    /// Slots per pod; 0 for unlimited. Through the private Service, the Service's slots.
    fn capacity(&self) -> usize {
        if self.through_cluster_ip.load(Ordering::Acquire) {
            return self.cluster_ip_slots.load(Ordering::Acquire);
        }
        self.container_concurrency.load(Ordering::Acquire)
    }

    /// Changes `containerConcurrency`; requests in flight keep their slots and waiters are served
    /// at once if the pods now have room.
    pub(crate) fn set_container_concurrency(&self, container_concurrency: u32) {
        let old = self.container_concurrency.swap(container_concurrency as usize, Ordering::AcqRel);
        if old != container_concurrency as usize {
            self.reassign(&self.lock_pending());
            self.dispatch_if_waiting();
        }
    }

    /// The pods that may take traffic now, sorted by address.
    #[cfg(test)]
    pub(crate) fn ready(&self) -> arc_swap::Guard<Arc<Vec<Arc<Pod>>>> {
        self.pods.load()
    }

    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Completes when the ready pods change (one joins, leaves, or passes its probe). Enable it
    /// before reading the pods, so a change in between is not missed.
    pub(crate) fn pods_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.probed.notified()
    }

    /// The most requests that may wait for this revision; sessions waiting for a seat are bounded
    /// alike.
    pub(crate) fn max_waiting(&self) -> usize {
        self.limits.max_waiting
    }

    /// Takes a slot on a pod, waiting in FIFO order while every eligible pod is full or no pod
    /// is ready. `body_bytes` is what the request's body may occupy while it waits.
    pub(crate) async fn acquire(self: &Arc<Self>, want: Want, body_bytes: u64) -> Result<Lease, AcquireError> {
        let lease = self.wait_for_slot(want, body_bytes).await?;
        if !lease.pod.is_assigned() {
            self.metrics.outside_subset.inc();
        }
        Ok(lease)
    }

    /// A slot for a new request, unless an older one waits for it.
    fn try_reserve(&self, want: Want) -> Option<Arc<Pod>> {
        if self.waiting_any.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let pods = self.pods.load();
        let capacity = self.capacity();
        if let Want::Pod(addr) = want
            && let Ok(i) = pods.binary_search_by_key(&addr, |p| p.addr)
        {
            let pod = &pods[i];
            let free = pod.pinned_waiting.load(Ordering::SeqCst) == 0 && pod.try_reserve(capacity);
            return free.then(|| pod.clone());
        }
        // A preferred pod outside this activator's subset is another activator's to fill.
        if let Want::Prefer(addr) = want
            && let Ok(i) = pods.binary_search_by_key(&addr, |p| p.addr)
            && pods[i].open_to_any()
            && pods[i].try_reserve(capacity)
        {
            return Some(pods[i].clone());
        }
        self.pick(&pods, capacity, Pod::open_to_any)
    }

    fn ready_pod(&self, addr: SocketAddr) -> Option<Arc<Pod>> {
        let pods = self.pods.load();
        pods.binary_search_by_key(&addr, |p| p.addr).ok().map(|i| pods[i].clone())
    }

    fn lease(self: &Arc<Self>, pod: Arc<Pod>) -> Lease {
        self.metrics.active.inc();
        Lease { throttler: self.clone(), pod }
    }

    fn release(&self, pod: &Arc<Pod>) {
        pod.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let mut queue = self.lock_queue();
            self.serve(&mut queue, pod);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn container_concurrency_changes_in_place() {
        let t = throttler(1, 1);
        let held = t.acquire(Want::Any, 0).await.unwrap();
        let waiter = spawn_acquire(&t, Want::Any);
        wait_for(|| t.waiting() == 1).await;
        t.set_container_concurrency(2);
        let second = waiter.await.unwrap().expect("served as soon as the pod has room");
        assert_eq!(in_flight(&t), vec![2], "the request in flight kept its slot");
        t.set_container_concurrency(1);
        drop((held, second));
        assert_eq!(in_flight(&t), vec![0]);
        let _one = t.acquire(Want::Any, 0).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(20), t.acquire(Want::Any, 0)).await;
        assert!(blocked.is_err(), "capacity 1 again");
    }
}
