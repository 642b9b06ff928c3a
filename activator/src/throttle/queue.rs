//! The wait queue of one revision: requests that found no free slot wait here in arrival order,
//! bounded in requests and in the body bytes they may hold, per revision and across all of them
//! (`QueueBudget`). A freed slot goes to the oldest request that can use that pod, found without
//! walking the queue: requests for one pod wait in that pod's deque, the others in one deque for
//! any pod, and only the two fronts are compared. A request that gives up leaves at once (its
//! bounds given back) and its entry is swept later.
//!
//! Must not choose pods (`balance`) or change which pods are ready (`backends`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::oneshot;

use super::pace::{RELEASE_BATCH, RELEASE_GROWTH, RELEASE_WINDOW};
use super::{AcquireError, Lease, Pod, Throttler, Want};
use crate::sync::lock;

/// Cancelled waiters left in the queues before they are swept out; they are skipped meanwhile.
const MIN_SWEEP: usize = 64;

/// Bounds of the wait queues.
#[derive(Clone, Debug)]
pub(crate) struct QueueLimits {
    /// Requests that may wait in one revision.
    pub max_waiting: usize,
    /// Body bytes the requests waiting in one revision may hold.
    pub max_bytes: u64,
    /// What all revisions' queues share.
    pub total: Arc<QueueBudget>,
}

#[cfg(test)]
impl Default for QueueLimits {
    fn default() -> Self {
        let total = Arc::new(QueueBudget::new(DEFAULT_MAX_WAITING_TOTAL, DEFAULT_MAX_BYTES_TOTAL));
        QueueLimits { max_waiting: DEFAULT_MAX_WAITING, max_bytes: DEFAULT_MAX_BYTES, total }
    }
}

/// The queue capacity all revisions share, so many revisions at zero cannot add up to
/// unbounded memory.
#[derive(Debug)]
pub(crate) struct QueueBudget {
    max_waiting: u64,
    max_bytes: u64,
    waiting: AtomicU64,
    bytes: AtomicU64,
}

impl QueueBudget {
    pub(crate) fn new(max_waiting: u64, max_bytes: u64) -> Self {
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

/// Requests that may wait in one revision, and the body bytes they may hold; requests and bytes
/// across all revisions. The command line's defaults.
pub(crate) const DEFAULT_MAX_WAITING: usize = 10_000;
pub(crate) const DEFAULT_MAX_BYTES: u64 = 64 << 20;
pub(crate) const DEFAULT_MAX_WAITING_TOTAL: u64 = 100_000;
pub(crate) const DEFAULT_MAX_BYTES_TOTAL: u64 = 512 << 20;

struct Waiter {
    /// Arrival order across every queue of the revision.
    id: u64,
    /// Body bytes this request may hold while it waits.
    bytes: u64,
    /// Whether it waits in its pod's deque rather than with requests for any pod; shared with the
    /// waiting request so it can leave the right count when it gives up.
    pinned: Arc<AtomicBool>,
    grant: oneshot::Sender<Arc<Pod>>,
}

impl Waiter {
    /// The request gave up; its bounds were given back when it did.
    fn is_cancelled(&self) -> bool {
        self.grant.is_closed()
    }
}

#[derive(Default)]
pub(super) struct Queue {
    /// Requests that may use any pod.
    any: VecDeque<Waiter>,
    /// Requests for one pod each, by pod.
    pinned: HashMap<SocketAddr, VecDeque<Waiter>>,
    /// Waiting requests, cancelled ones excluded.
    live: usize,
    /// Cancelled requests still in the deques.
    cancelled: usize,
    bytes: u64,
    next_id: u64,
}

impl Queue {
    /// Drops cancelled entries from the front of `deque`.
    fn skip_cancelled(deque: &mut VecDeque<Waiter>, cancelled: &mut usize) {
        while deque.front().is_some_and(Waiter::is_cancelled) {
            deque.pop_front();
            *cancelled -= 1;
        }
    }

    /// Sweeps cancelled entries once they outnumber the live ones, so a queue whose requests keep
    /// timing out does not grow.
    fn sweep(&mut self) {
        if self.cancelled < MIN_SWEEP || self.cancelled < self.live {
            return;
        }
        self.any.retain(|w| !w.is_cancelled());
        self.pinned.retain(|_, deque| {
            deque.retain(|w| !w.is_cancelled());
            !deque.is_empty()
        });
        self.cancelled = 0;
    }
}

/// A queued request. Dropping it (timeout, client gone) leaves the queue, or returns a slot that
/// was granted after it stopped listening.
pub(super) struct Waiting<'a> {
    throttler: &'a Arc<Throttler>,
    /// The pod it waits for, while it waits in that pod's deque.
    pinned: Option<(SocketAddr, Arc<AtomicBool>)>,
    bytes: u64,
    grant: oneshot::Receiver<Arc<Pod>>,
    /// Set once its grant was received: the slot is the request's now.
    served: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let throttler = self.throttler;
        let mut queue = throttler.lock_queue();
        // Under the lock, a grant either happened already or never will.
        self.grant.close();
        if let Ok(pod) = self.grant.try_recv() {
            drop(queue);
            throttler.release(&pod);
            return;
        }
        // Still queued: give back its bounds now; the entry is skipped and swept later.
        queue.live -= 1;
        queue.cancelled += 1;
        queue.bytes -= self.bytes;
        throttler.limits.total.give_back(self.bytes);
        throttler.waiting.fetch_sub(1, Ordering::SeqCst);
        match &self.pinned {
            Some((addr, pinned)) if pinned.load(Ordering::SeqCst) => {
                if let Some(pod) = throttler.ready_pod(*addr) {
                    pod.pinned_waiting.fetch_sub(1, Ordering::SeqCst);
                }
            }
            _ => {
                throttler.waiting_any.fetch_sub(1, Ordering::SeqCst);
            }
        }
        throttler.metrics.set_queued(queue.live);
        queue.sweep();
    }
}

impl Throttler {
    pub(super) async fn wait_for_slot(self: &Arc<Self>, want: Want, body_bytes: u64) -> Result<Lease, AcquireError> {
        if let Some(pod) = self.try_reserve(want) {
            return Ok(self.lease(pod));
        }
        let (want, grant) = {
            let mut queue = self.lock_queue();
            // Counted before the retry so a release that races with us either frees the slot we
            // retry for, or sees us waiting and dispatches once we are queued.
            self.waiting.fetch_add(1, Ordering::SeqCst);
            if let Some(pod) = self.try_reserve(want) {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Ok(self.lease(pod));
            }
            let fits = queue.live < self.limits.max_waiting
                && queue.bytes.saturating_add(body_bytes) <= self.limits.max_bytes
                && self.limits.total.take(body_bytes);
            if !fits {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(AcquireError::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            // A request for a pod that is not ready takes any pod, so it waits with those.
            let pod = match want {
                Want::Pod(addr) => self.ready_pod(addr),
                Want::Any | Want::Prefer(_) => None,
            };
            let pinned = Arc::new(AtomicBool::new(pod.is_some()));
            let waiter = Waiter { id: queue.next_id, bytes: body_bytes, pinned: pinned.clone(), grant: tx };
            queue.next_id += 1;
            queue.live += 1;
            queue.bytes += body_bytes;
            match &pod {
                Some(pod) => {
                    pod.pinned_waiting.fetch_add(1, Ordering::SeqCst);
                    queue.pinned.entry(pod.addr).or_default().push_back(waiter);
                }
                None => {
                    self.waiting_any.fetch_add(1, Ordering::SeqCst);
                    queue.any.push_back(waiter);
                }
            }
            self.metrics.set_queued(queue.live);
            (pod.map(|p| (p.addr, pinned)), rx)
        };
        let mut waiting = Waiting { throttler: self, pinned: want, bytes: body_bytes, grant, served: false };
        // The sender lives in the queue until it grants, so this cannot fail while we wait.
        let pod = (&mut waiting.grant).await.map_err(|_| AcquireError::QueueFull)?;
        waiting.served = true;
        Ok(self.lease(pod))
    }

    pub(super) fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    /// Gives `pod`'s free slots to the oldest waiters that can use it: those pinned to it and
    /// those that take any pod, in arrival order (at most `RELEASE_GROWTH` of the latter while
    /// the release is paced). Only the fronts of two deques are looked at.
    pub(super) fn serve(&self, queue: &mut Queue, pod: &Arc<Pod>) {
        let capacity = self.capacity();
        let mut any_left = match self.releasing.load(Ordering::SeqCst) {
            false => usize::MAX,
            true if pod.in_flight() < RELEASE_WINDOW => RELEASE_GROWTH,
            true => 1,
        };
        loop {
            let Queue { any, pinned, cancelled, .. } = &mut *queue;
            Queue::skip_cancelled(any, cancelled);
            let mine = pinned.get_mut(&pod.addr);
            if let Some(mine) = mine {
                Queue::skip_cancelled(mine, cancelled);
            }
            let pinned_front = pinned.get(&pod.addr).and_then(VecDeque::front).map(|w| w.id);
            let any_front = any.front().filter(|_| pod.is_assigned() && any_left > 0).map(|w| w.id);
            let from_pinned = match (pinned_front, any_front) {
                (Some(p), Some(a)) => p < a,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return,
            };
            if !pod.try_reserve(capacity) {
                return;
            }
            let waiter = if from_pinned {
                let deque = pinned.get_mut(&pod.addr).expect("has a front");
                let waiter = deque.pop_front().expect("has a front");
                if deque.is_empty() {
                    pinned.remove(&pod.addr);
                }
                pod.pinned_waiting.fetch_sub(1, Ordering::SeqCst);
                waiter
            } else {
                any_left -= 1;
                self.waiting_any.fetch_sub(1, Ordering::SeqCst);
                self.released.fetch_add(1, Ordering::SeqCst);
                any.pop_front().expect("has a front")
            };
            self.granted(queue, waiter, pod.clone());
        }
    }

    /// Hands a pod to a waiter taken out of the queue, giving back its share of the bounds.
    fn granted(&self, queue: &mut Queue, waiter: Waiter, pod: Arc<Pod>) {
        queue.live -= 1;
        queue.bytes -= waiter.bytes;
        self.limits.total.give_back(waiter.bytes);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.set_queued(queue.live);
        // Cancellation happens under the queue lock we hold, so the receiver is still there.
        let _ = waiter.grant.send(pod);
    }

    /// Hands free slots to waiters after the pods or their capacity changed: requests pinned to a
    /// pod that left now take any pod; pinned waiters get their pods' slots, then up to
    /// `RELEASE_BATCH` others get pods by the revision's policy. True when more of those could
    /// have gone.
    pub(super) fn dispatch_all(&self) -> bool {
        let mut queue = self.lock_queue();
        let pods = self.pods.load();
        let orphaned: Vec<SocketAddr> =
            queue.pinned.keys().filter(|addr| pods.binary_search_by_key(*addr, |p| p.addr).is_err()).copied().collect();
        for addr in orphaned {
            let deque = queue.pinned.remove(&addr).unwrap_or_default();
            for waiter in &deque {
                waiter.pinned.store(false, Ordering::SeqCst);
            }
            let live = deque.iter().filter(|w| !w.is_cancelled()).count();
            self.waiting_any.fetch_add(live, Ordering::SeqCst);
            let mut merged: Vec<Waiter> = queue.any.drain(..).chain(deque).collect();
            merged.sort_by_key(|w| w.id);
            queue.any = merged.into();
        }
        for pod in pods.iter() {
            if queue.pinned.contains_key(&pod.addr) {
                self.serve(&mut queue, pod);
            }
        }
        let capacity = self.capacity();
        for _ in 0..RELEASE_BATCH {
            let Queue { any, cancelled, .. } = &mut *queue;
            Queue::skip_cancelled(any, cancelled);
            if any.is_empty() {
                return false;
            }
            let Some(pod) = self.pick(&pods, capacity, Pod::open_to_any) else {
                return false;
            };
            self.waiting_any.fetch_sub(1, Ordering::SeqCst);
            self.released.fetch_add(1, Ordering::SeqCst);
            let waiter = queue.any.pop_front().expect("not empty");
            self.granted(&mut queue, waiter, pod);
        }
        self.waiting_any.load(Ordering::SeqCst) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::throttle::*;
    use std::time::Duration;

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
        set(&t, &addrs(1), Probe::None);
        assert_eq!(first.await.unwrap(), Ok(addrs(1)[0]));
        let busy = t.acquire(Want::Any, 0).await.unwrap();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire(Want::Any, 0).await.map(|l| l.pod().addr) })
        };
        wait_for(|| t.waiting() == 1).await;
        set(&t, &addrs(2), Probe::None);
        assert_eq!(waiter.await.unwrap(), Ok(addrs(2)[1]));
        drop(busy);
    }

    #[tokio::test]
    async fn body_bytes_bound_the_queue_per_revision_and_in_total() {
        let total = Arc::new(QueueBudget::new(3, 1 << 30));
        let shared = |max_bytes| QueueLimits { max_waiting: 100, max_bytes, total: total.clone() };
        let (a, b) = (Throttler::new(1, shared(1000), gauge()), Throttler::new(1, shared(1000), gauge()));
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

    #[tokio::test]
    async fn new_arrivals_do_not_overtake_waiters() {
        let t = throttler(1, 1);
        let busy = t.acquire(Want::Any, 0).await.unwrap();
        let first = spawn_acquire(&t, Want::Any);
        wait_for(|| t.waiting() == 1).await;
        // The slot frees and, at the same moment, a newcomer tries for it: the waiter gets it.
        drop(busy);
        let newcomer = spawn_acquire(&t, Want::Pod(addrs(1)[0]));
        let first = first.await.unwrap().expect("the waiter is served");
        wait_for(|| t.waiting() == 1).await;
        assert!(!newcomer.is_finished(), "the newcomer queued behind the waiter");
        drop(first);
        assert!(newcomer.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_release_serves_the_oldest_waiter_that_can_use_the_pod() {
        let t = Throttler::new(1, limits(1000, 1 << 20, 1000), gauge());
        set(&t, &addrs(2), Probe::None);
        let [p0, p1] = [addrs(2)[0], addrs(2)[1]];
        let hold0 = t.acquire(Want::Pod(p0), 0).await.unwrap();
        let hold1 = t.acquire(Want::Pod(p1), 0).await.unwrap();
        // Many requests wait for p0; one waits for p1; one takes any pod.
        let for_p0: Vec<_> = (0..100).map(|_| spawn_acquire(&t, Want::Pod(p0))).collect();
        wait_for(|| t.waiting() == 100).await;
        let for_p1 = spawn_acquire(&t, Want::Pod(p1));
        wait_for(|| t.waiting() == 101).await;
        let any = spawn_acquire(&t, Want::Any);
        wait_for(|| t.waiting() == 102).await;
        drop(hold1);
        let served = for_p1.await.unwrap().unwrap();
        assert_eq!(served.pod().addr, p1, "p1's slot goes to the one waiting for p1, older than the any-waiter");
        assert!(!any.is_finished() && for_p0.iter().all(|w| !w.is_finished()));
        drop(served);
        assert_eq!(any.await.unwrap().unwrap().pod().addr, p1, "then to the any-waiter");
        drop(hold0);
        for waiter in for_p0 {
            let lease = waiter.await.unwrap().unwrap();
            assert_eq!(lease.pod().addr, p0);
        }
    }

    #[tokio::test]
    async fn given_up_waiters_free_their_bounds_at_once_and_are_swept() {
        let t = Throttler::new(1, limits(10_000, 1 << 30, 100_000), gauge());
        set(&t, &addrs(1), Probe::None);
        let _busy = t.acquire(Want::Any, 0).await.unwrap();
        for round in 0..3 {
            let waiters: Vec<_> = (0..1000).map(|_| spawn_acquire(&t, Want::Any)).collect();
            wait_for(|| t.waiting() == 1000).await;
            for w in &waiters {
                w.abort();
            }
            wait_for(|| t.waiting() == 0).await;
            let queue = t.lock_queue();
            assert_eq!(queue.live, 0, "round {round}");
            assert!(queue.any.len() <= 1000, "cancelled entries are swept, not piled up: {}", queue.any.len());
        }
        assert_eq!(t.limits.total.waiting.load(Ordering::Relaxed), 0);
    }
}
