//! Per-revision admission: which pods may take traffic, how many requests each may hold
//! (`containerConcurrency`), which pod the next request goes to, and the FIFO queue of requests
//! waiting for a slot, including while the revision has no ready pod at all (scale from zero).
//! The queue is bounded by requests and by the body bytes they may hold, per revision and in
//! total.
//!
//! Owns in-flight counts. A request that finds a free slot touches only atomics; the queue's
//! mutex is taken only when a request has to wait or a slot is freed while someone waits. Must
//! not know about hosts, splits or pins: callers say which pod they want, if any.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::sync::oneshot;

use crate::proxy::PodClient;
use crate::readiness::Probe;

/// Above this `containerConcurrency`, round robin spreads better than first-available
/// (the same cut-over as Knative's activator).
const FIRST_AVAILABLE_MAX_CC: u32 = 3;

/// Bounds of the wait queues.
#[derive(Clone, Debug)]
pub struct QueueLimits {
    /// Requests that may wait in one revision.
    pub max_waiting: usize,
    /// Body bytes the requests waiting in one revision may hold.
    pub max_bytes: u64,
    /// What all revisions' queues share.
    pub total: Arc<QueueBudget>,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits { max_waiting: 10_000, max_bytes: 64 << 20, total: Arc::new(QueueBudget::new(100_000, 512 << 20)) }
    }
}

/// The queue capacity all revisions share, so many revisions at zero cannot add up to
/// unbounded memory.
#[derive(Debug)]
pub struct QueueBudget {
    max_waiting: u64,
    max_bytes: u64,
    waiting: AtomicU64,
    bytes: AtomicU64,
}

impl QueueBudget {
    pub fn new(max_waiting: u64, max_bytes: u64) -> Self {
        QueueBudget { max_waiting, max_bytes, waiting: AtomicU64::new(0), bytes: AtomicU64::new(0) }
    }

    fn take(&self, bytes: u64) -> bool {
        let within = |counter: &AtomicU64, amount: u64, max: u64| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_add(amount).filter(|t| *t <= max))
                .is_ok()
        };
        if !within(&self.waiting, 1, self.max_waiting) {
            return false;
        }
        if !within(&self.bytes, bytes, self.max_bytes) {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give_back(&self, bytes: u64) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    /// CC = 0: two random pods, the one with fewer requests in flight.
    PowerOfTwo,
    /// Small CC: the first pod, in address order, with a free slot.
    FirstAvailable,
    /// Large CC: round robin over pods with a free slot.
    RoundRobin,
}

/// Which pod a request may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Any,
    /// This pod, waiting for its capacity if it is busy; any pod if it is no longer ready.
    Pod(SocketAddr),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    #[error("the request queue is full")]
    QueueFull,
}

pub struct Pod {
    pub addr: SocketAddr,
    pub client: PodClient,
    in_flight: AtomicUsize,
}

impl Pod {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, capacity: Option<usize>) -> bool {
        match capacity {
            None => {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                true
            }
            Some(cap) => {
                self.in_flight.fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| (n < cap).then_some(n + 1)).is_ok()
            }
        }
    }
}

struct Pending {
    probe: Probe,
    endpoints: Vec<SocketAddr>,
    new_client: fn(SocketAddr) -> PodClient,
}

fn new_pod(addr: SocketAddr, new_client: fn(SocketAddr) -> PodClient) -> Arc<Pod> {
    Arc::new(Pod { addr, client: new_client(addr), in_flight: AtomicUsize::new(0) })
}

struct Waiter {
    id: u64,
    want: Want,
    /// Body bytes this request may hold while it waits.
    bytes: u64,
    grant: oneshot::Sender<Arc<Pod>>,
}

#[derive(Default)]
struct Queue {
    waiters: VecDeque<Waiter>,
    pinned: usize,
    bytes: u64,
    next_id: u64,
}

pub struct Throttler {
    capacity: Option<usize>,
    policy: Policy,
    limits: QueueLimits,
    queued: IntGauge,
    /// Pods that may take traffic, sorted by address.
    pods: ArcSwap<Vec<Arc<Pod>>>,
    /// Endpoints waiting for their first successful readiness probe.
    pending: Mutex<Pending>,
    cursor: AtomicUsize,
    /// Mirrors `queue.waiters.len()` so a release can skip the mutex when nobody waits.
    waiting: AtomicUsize,
    queue: Mutex<Queue>,
}

/// A slot on one pod, held for as long as the request (and its response body or upgraded
/// connection) lives.
pub struct Lease {
    throttler: Arc<Throttler>,
    pod: Arc<Pod>,
}

impl Lease {
    pub fn pod(&self) -> &Arc<Pod> {
        &self.pod
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.throttler.release(&self.pod);
    }
}

impl Throttler {
    /// `queued` is kept at the number of waiting requests.
    pub fn new(container_concurrency: u32, limits: QueueLimits, queued: IntGauge) -> Self {
        let (capacity, policy) = match container_concurrency {
            0 => (None, Policy::PowerOfTwo),
            cc if cc <= FIRST_AVAILABLE_MAX_CC => (Some(cc as usize), Policy::FirstAvailable),
            cc => (Some(cc as usize), Policy::RoundRobin),
        };
        Throttler {
            capacity,
            policy,
            limits,
            queued,
            pods: ArcSwap::default(),
            pending: Mutex::new(Pending { probe: Probe::None, endpoints: Vec::new(), new_client: PodClient::new }),
            cursor: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
        }
    }

    /// The pods that may take traffic now, sorted by address.
    pub fn ready(&self) -> arc_swap::Guard<Arc<Vec<Arc<Pod>>>> {
        self.pods.load()
    }

    pub fn is_ready(&self, addr: SocketAddr) -> bool {
        self.pods.load().binary_search_by_key(&addr, |p| p.addr).is_ok()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Replaces the revision's endpoints. Endpoints already ready stay so, keeping their in-flight
    /// count and connection pool; new ones take traffic once `probe` succeeds against them (see
    /// `readiness`), or at once without a probe. Returns whether any endpoint awaits its probe.
    pub fn set_candidates(
        &self,
        endpoints: &[SocketAddr],
        probe: Probe,
        new_client: fn(SocketAddr) -> PodClient,
    ) -> bool {
        let current = self.pods.load();
        let mut ready = Vec::new();
        let mut waiting_for_probe = Vec::new();
        for &addr in endpoints {
            match current.binary_search_by_key(&addr, |p| p.addr) {
                Ok(i) => ready.push(current[i].clone()),
                Err(_) if probe == Probe::None => ready.push(new_pod(addr, new_client)),
                Err(_) => waiting_for_probe.push(addr),
            }
        }
        ready.sort_by_key(|p| p.addr);
        let has_pending = !waiting_for_probe.is_empty();
        *self.lock_pending() = Pending { probe, endpoints: waiting_for_probe, new_client };
        self.pods.store(Arc::new(ready));
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.dispatch();
        }
        has_pending
    }

    /// The probe and the endpoints still waiting for it.
    pub fn pending(&self) -> (Probe, Vec<SocketAddr>) {
        let pending = self.lock_pending();
        (pending.probe.clone(), pending.endpoints.clone())
    }

    /// An endpoint passed its readiness probe: it takes traffic now, waiters first.
    pub fn mark_ready(&self, addr: SocketAddr) {
        let new_client = {
            let mut pending = self.lock_pending();
            let Some(i) = pending.endpoints.iter().position(|a| *a == addr) else { return };
            pending.endpoints.swap_remove(i);
            pending.new_client
        };
        let mut pods: Vec<Arc<Pod>> = self.pods.load().iter().cloned().collect();
        if let Err(i) = pods.binary_search_by_key(&addr, |p| p.addr) {
            pods.insert(i, new_pod(addr, new_client));
        }
        self.pods.store(Arc::new(pods));
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.dispatch();
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a slot on a pod, waiting in FIFO order while every eligible pod is full or no pod
    /// is ready. `body_bytes` is what the request's body may occupy while it waits.
    pub async fn acquire(self: &Arc<Self>, want: Want, body_bytes: u64) -> Result<Lease, AcquireError> {
        if let Some(pod) = self.try_reserve(want) {
            return Ok(self.lease(pod));
        }
        let (id, grant) = {
            let mut queue = self.lock_queue();
            // Counted before the retry so a release that races with us either frees the slot we
            // retry for, or sees us waiting and dispatches.
            self.waiting.fetch_add(1, Ordering::SeqCst);
            if let Some(pod) = self.try_reserve(want) {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Ok(self.lease(pod));
            }
            let fits = queue.waiters.len() < self.limits.max_waiting
                && queue.bytes.saturating_add(body_bytes) <= self.limits.max_bytes
                && self.limits.total.take(body_bytes);
            if !fits {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(AcquireError::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let id = queue.next_id;
            queue.next_id += 1;
            if matches!(want, Want::Pod(_)) {
                queue.pinned += 1;
            }
            queue.bytes += body_bytes;
            queue.waiters.push_back(Waiter { id, want, bytes: body_bytes, grant: tx });
            self.queued.set(queue.waiters.len() as i64);
            (id, rx)
        };
        let mut waiting = Waiting { throttler: self, id, grant };
        // The sender lives in the queue until it grants, so this cannot fail while we wait.
        let pod = (&mut waiting.grant).await.map_err(|_| AcquireError::QueueFull)?;
        Ok(self.lease(pod))
    }

    /// Takes waiter `index` out of the queue and gives back its share of the bounds.
    fn dequeue(&self, queue: &mut Queue, index: usize) -> Option<Waiter> {
        let waiter = queue.waiters.remove(index)?;
        if matches!(waiter.want, Want::Pod(_)) {
            queue.pinned -= 1;
        }
        queue.bytes -= waiter.bytes;
        self.limits.total.give_back(waiter.bytes);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.queued.set(queue.waiters.len() as i64);
        Some(waiter)
    }

    fn lease(self: &Arc<Self>, pod: Arc<Pod>) -> Lease {
        Lease { throttler: self.clone(), pod }
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn try_reserve(&self, want: Want) -> Option<Arc<Pod>> {
        let pods = self.pods.load();
        if let Want::Pod(addr) = want
            && let Ok(i) = pods.binary_search_by_key(&addr, |p| p.addr)
        {
            let pod = &pods[i];
            return pod.try_reserve(self.capacity).then(|| pod.clone());
        }
        self.pick(&pods)
    }

    fn pick(&self, pods: &[Arc<Pod>]) -> Option<Arc<Pod>> {
        let n = pods.len();
        if n == 0 {
            return None;
        }
        let chosen = match self.policy {
            Policy::PowerOfTwo => {
                let a = fastrand::usize(..n);
                let chosen = if n == 1 {
                    a
                } else {
                    let mut b = fastrand::usize(..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    if pods[b].in_flight() < pods[a].in_flight() { b } else { a }
                };
                pods[chosen].try_reserve(self.capacity);
                return Some(pods[chosen].clone());
            }
            Policy::FirstAvailable => pods.iter().find(|p| p.try_reserve(self.capacity)),
            Policy::RoundRobin => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| &pods[(start + k) % n]).find(|p| p.try_reserve(self.capacity))
            }
        };
        chosen.cloned()
    }

    fn release(&self, pod: &Pod) {
        pod.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.dispatch();
        }
    }

    /// Hands free slots to waiters, oldest first. A waiter for a busy pinned pod does not hold up
    /// the waiters behind it.
    fn dispatch(&self) {
        let mut queue = self.lock_queue();
        let mut any_exhausted = false;
        let mut i = 0;
        while i < queue.waiters.len() {
            if any_exhausted && queue.pinned == 0 {
                break;
            }
            let want = queue.waiters[i].want;
            if want == Want::Any && any_exhausted {
                i += 1;
                continue;
            }
            let Some(pod) = self.try_reserve(want) else {
                any_exhausted |= want == Want::Any;
                i += 1;
                continue;
            };
            let waiter = self.dequeue(&mut queue, i).expect("index is in bounds");
            if let Err(pod) = waiter.grant.send(pod) {
                // The waiter gave up before we got to it: the slot goes to the next one.
                pod.in_flight.fetch_sub(1, Ordering::SeqCst);
                any_exhausted = false;
            }
        }
    }
}

/// A queued request. Dropping it (timeout, client gone) leaves the queue, or returns a slot that
/// was granted after it stopped listening.
struct Waiting<'a> {
    throttler: &'a Arc<Throttler>,
    id: u64,
    grant: oneshot::Receiver<Arc<Pod>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut queue = self.throttler.lock_queue();
        if let Some(i) = queue.waiters.iter().position(|w| w.id == self.id) {
            self.throttler.dequeue(&mut queue, i);
            return;
        }
        drop(queue);
        if let Ok(pod) = self.grant.try_recv() {
            self.throttler.release(&pod);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i))).collect()
    }

    fn limits(max_waiting: usize, max_bytes: u64, total: u64) -> QueueLimits {
        QueueLimits { max_waiting, max_bytes, total: Arc::new(QueueBudget::new(total, 1 << 30)) }
    }

    fn gauge() -> IntGauge {
        IntGauge::new("queued", "test").unwrap()
    }

    fn throttler(cc: u32, pods: u16) -> Arc<Throttler> {
        let t = Arc::new(Throttler::new(cc, limits(4, 1 << 20, 1000), gauge()));
        t.set_candidates(&addrs(pods), Probe::None, PodClient::new);
        t
    }

    fn in_flight(t: &Throttler) -> Vec<usize> {
        t.ready().iter().map(|p| p.in_flight()).collect()
    }

    #[tokio::test]
    async fn first_available_fills_pods_in_order() {
        let t = throttler(2, 3);
        let mut leases = Vec::new();
        for _ in 0..5 {
            leases.push(t.acquire(Want::Any, 0).await.unwrap());
        }
        assert_eq!(in_flight(&t), vec![2, 2, 1]);
        drop(leases);
        assert_eq!(in_flight(&t), vec![0, 0, 0]);
    }

    #[tokio::test]
    async fn round_robin_spreads() {
        let t = throttler(10, 3);
        let leases: Vec<_> = futures_join(&t, 6).await;
        assert_eq!(in_flight(&t), vec![2, 2, 2]);
        drop(leases);
    }

    async fn futures_join(t: &Arc<Throttler>, n: usize) -> Vec<Lease> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(t.acquire(Want::Any, 0).await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn power_of_two_prefers_the_idle_pod() {
        let t = throttler(0, 2);
        let busy: Vec<_> = (0..10).map(|_| t.try_reserve(Want::Pod(addrs(2)[0])).unwrap()).collect();
        for _ in 0..20 {
            let lease = t.acquire(Want::Any, 0).await.unwrap();
            assert_eq!(lease.pod().addr, addrs(2)[1]);
        }
        for pod in busy {
            t.release(&pod);
        }
    }

    #[tokio::test]
    async fn waiters_are_served_in_order_when_slots_free() {
        let t = throttler(1, 1);
        let first = t.acquire(Want::Any, 0).await.unwrap();
        let (a, b) = (t.clone(), t.clone());
        let second = tokio::spawn(async move { a.acquire(Want::Any, 0).await.map(|l| l.pod().addr) });
        wait_for(|| t.waiting() == 1).await;
        let third = tokio::spawn(async move { b.acquire(Want::Any, 0).await.map(|l| l.pod().addr) });
        wait_for(|| t.waiting() == 2).await;
        drop(first);
        assert!(second.await.unwrap().is_ok());
        assert!(third.await.unwrap().is_ok());
        assert_eq!(t.waiting(), 0);
        assert_eq!(in_flight(&t), vec![0]);
    }

    #[tokio::test]
    async fn pinned_waiter_gets_its_pod_and_does_not_block_others() {
        let t = throttler(1, 2);
        let [p0, p1] = [addrs(2)[0], addrs(2)[1]];
        let hold0 = t.acquire(Want::Pod(p0), 0).await.unwrap();
        let hold1 = t.acquire(Want::Pod(p1), 0).await.unwrap();
        let pinned = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire(Want::Pod(p0), 0).await.map(|l| l.pod().addr) })
        };
        wait_for(|| t.waiting() == 1).await;
        let any = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire(Want::Any, 0).await.map(|l| l.pod().addr) })
        };
        wait_for(|| t.waiting() == 2).await;
        drop(hold1);
        assert_eq!(any.await.unwrap(), Ok(p1), "the unpinned waiter takes the other pod");
        drop(hold0);
        assert_eq!(pinned.await.unwrap(), Ok(p0));
    }

    #[tokio::test]
    async fn pinned_to_a_gone_pod_falls_back_to_any() {
        let t = throttler(0, 2);
        let lease = t.acquire(Want::Pod(SocketAddr::from(([10, 0, 0, 1], 1))), 0).await.unwrap();
        assert!(addrs(2).contains(&lease.pod().addr));
    }

    #[tokio::test]
    async fn queue_is_bounded_and_cancelled_waiters_leave_it() {
        let t = throttler(1, 1);
        let _busy = t.acquire(Want::Any, 0).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..4 {
            let t = t.clone();
            waiters.push(tokio::spawn(async move { t.acquire(Want::Any, 0).await.map(|_| ()) }));
        }
        wait_for(|| t.waiting() == 4).await;
        assert_eq!(t.acquire(Want::Any, 0).await.err(), Some(AcquireError::QueueFull));
        let timed_out = tokio::time::timeout(Duration::from_millis(10), t.acquire(Want::Any, 0)).await;
        assert!(timed_out.is_err() || timed_out.unwrap().is_err());
        for w in &waiters {
            w.abort();
        }
        wait_for(|| t.waiting() == 0).await;
    }

    #[tokio::test]
    async fn requests_wait_for_the_first_pod_and_new_pods_serve_waiters() {
        let t = throttler(1, 0);
        let first = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire(Want::Any, 0).await.map(|l| l.pod().addr) })
        };
        wait_for(|| t.waiting() == 1).await;
        t.set_candidates(&addrs(1), Probe::None, PodClient::new);
        assert_eq!(first.await.unwrap(), Ok(addrs(1)[0]));
        let busy = t.acquire(Want::Any, 0).await.unwrap();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire(Want::Any, 0).await.map(|l| l.pod().addr) })
        };
        wait_for(|| t.waiting() == 1).await;
        t.set_candidates(&addrs(2), Probe::None, PodClient::new);
        assert_eq!(waiter.await.unwrap(), Ok(addrs(2)[1]));
        drop(busy);
    }

    #[tokio::test]
    async fn endpoint_updates_keep_in_flight_counts() {
        let t = throttler(0, 2);
        let lease = t.acquire(Want::Pod(addrs(2)[1]), 0).await.unwrap();
        t.set_candidates(&addrs(3), Probe::None, PodClient::new);
        assert_eq!(in_flight(&t), vec![0, 1, 0]);
        t.set_candidates(&addrs(1), Probe::None, PodClient::new);
        drop(lease);
        assert_eq!(in_flight(&t), vec![0]);
    }

    #[tokio::test]
    async fn probed_endpoints_take_traffic_once_ready() {
        let t = throttler(0, 0);
        let probe = Probe::Http { path: "/healthz".into() };
        assert!(t.set_candidates(&addrs(2), probe.clone(), PodClient::new));
        assert!(t.ready().is_empty());
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire(Want::Any, 0).await.map(|l| l.pod().addr) })
        };
        wait_for(|| t.waiting() == 1).await;
        t.mark_ready(addrs(2)[1]);
        assert_eq!(waiter.await.unwrap(), Ok(addrs(2)[1]));
        assert_eq!(t.pending().1, vec![addrs(2)[0]]);
        assert!(!t.set_candidates(&addrs(2)[1..], probe, PodClient::new), "a ready endpoint stays ready");
        t.mark_ready(addrs(2)[0]);
        assert_eq!(in_flight(&t).len(), 1, "a removed endpoint cannot come back through a late probe");
    }

    #[tokio::test]
    async fn body_bytes_bound_the_queue_per_revision_and_in_total() {
        let total = Arc::new(QueueBudget::new(3, 1 << 30));
        let shared = |max_bytes| QueueLimits { max_waiting: 100, max_bytes, total: total.clone() };
        let (a, b) =
            (Arc::new(Throttler::new(1, shared(1000), gauge())), Arc::new(Throttler::new(1, shared(1000), gauge())));
        let mut waiters = Vec::new();
        for (t, bytes) in [(&a, 600), (&b, 10), (&b, 10)] {
            let t = t.clone();
            waiters.push(tokio::spawn(async move { t.acquire(Want::Any, bytes).await.map(|_| ()) }));
        }
        wait_for(|| a.waiting() == 1 && b.waiting() == 2).await;
        assert_eq!(a.acquire(Want::Any, 500).await.err(), Some(AcquireError::QueueFull), "revision bytes");
        assert_eq!(a.acquire(Want::Any, 1).await.err(), Some(AcquireError::QueueFull), "total count");
        for w in &waiters {
            w.abort();
        }
        wait_for(|| a.waiting() == 0 && b.waiting() == 0).await;
        assert_eq!(total.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(total.bytes.load(Ordering::Relaxed), 0);
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "condition not met in time");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
