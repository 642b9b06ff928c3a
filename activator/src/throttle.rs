//! Per-revision admission: which pods may take traffic, how many requests each may hold
//! (`containerConcurrency`), which pod the next request goes to, and the FIFO queue of requests
//! waiting for a slot, including while the revision has no ready pod at all (scale from zero).
//! The queue is bounded by requests and by the body bytes they may hold, per revision and in
//! total.
//!
//! Owns in-flight counts. A request that finds a free slot touches only atomics; the queue's
//! mutex is taken only when a request has to wait or a slot is freed while someone waits. Waiting
//! is first come, first served: a new request never takes a slot an older one waits for, and a
//! freed slot goes to the oldest request that can use that pod, found without walking the queue.
//!
//! Also owns how a revision's pods are reached, as Knative's activator does: pods the platform
//! vouches for take traffic at once, others once a readiness probe passes; when several
//! activators share a revision with `containerConcurrency` > 0, this one balances only over its
//! subset of the pods (a request pinned to another pod still reaches it); and when pods cannot be
//! reached one by one (a service mesh), all traffic goes through the revision's private Service.
//! Must not know about hosts, splits or pins: callers say which pod they want, if any.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::pool::{PodClient, Transport};
use crate::sync::lock;

/// Above this `containerConcurrency`, round robin spreads better than first-available
/// (the same cut-over as Knative's activator).
const FIRST_AVAILABLE_MAX_CC: usize = 3;
/// How long after a pod is first listed a request pinned to it waits for this replica's first
/// probe of it, rather than moving its session: another replica already found it ready, and the
/// probe here takes one probe period.
const FIRST_PROBE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a request pinned to a pod this replica does not list yet waits for it to be listed:
/// another replica saw it join first, and the world here follows within moments. An address
/// waited for in vain, or that left, is not waited for within `UNLISTED_MEMORY` (the default pin
/// lifetime): it is gone, not new.
const UNLISTED_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
const UNLISTED_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);
/// Pods ready for less than this are left out of `rendezvous`: replicas find a new pod ready a
/// probe period apart, and would place keys apart meanwhile.
const RENDEZVOUS_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);
/// Cancelled waiters left in the queues before they are swept out; they are skipped meanwhile.
const MIN_SWEEP: usize = 64;
/// Waiters taking any pod that are let go at once. When more could go together (a pod turned
/// ready under a queue, as at scale from zero), the rest are paced like TCP's slow start: each
/// exchange that ends lets `RELEASE_GROWTH` more go, so requests leave the queue as fast as the
/// pod and the activator finish them, and the first ones are not slowed by a thousand others
/// starting at once on the same CPUs (Knative #9888, the thundering herd).
const RELEASE_BATCH: usize = 8;
const RELEASE_GROWTH: usize = 2;
/// Requests on one pod past which an ending exchange lets only one more go: the window stops
/// growing once it is large enough to keep the pod busy, so a burst reuses connections rather
/// than opening one per waiter.
const RELEASE_WINDOW: usize = 32;
/// While paced, a batch also goes whenever this passes with no exchange ending, so long requests
/// (streams, long polls) do not hold the rest of the queue.
const RELEASE_STALL: std::time::Duration = std::time::Duration::from_millis(2);

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

/// How a revision's endpoints prove they are ready before they take traffic (see `readiness`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Trusted as soon as they are listed.
    None,
    /// `GET <path>` answers 2xx.
    Http { path: String },
    /// Knative's queue-proxy probe: `GET <path>` with `K-Network-Probe: queue` answers 200 `queue`.
    /// With `passthrough_host`, the probe names that host and asks a mesh to pass it through to
    /// the pod (upstream's passthrough load balancing).
    Queue { path: String, passthrough_host: Option<String> },
}

/// A revision's pods as its source sees them, and how to reach them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    /// Pods that take traffic once the revision's probe passes against them.
    pub probed: Vec<SocketAddr>,
    /// Pods the platform vouches for: they take traffic at once.
    pub trusted: Vec<SocketAddr>,
    /// The revision's private Service, for when pods cannot be reached one by one.
    pub cluster_ip: Option<ClusterIp>,
    /// This activator's share of the pods, when several activators split a revision.
    pub subset: Option<Subset>,
    /// With system-internal TLS: how each pod (and the private Service) is reached over TLS.
    pub tls: Option<TlsPorts>,
}

/// Where a revision's pods take TLS, and the namespace their certificates must name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPorts {
    pub namespace: String,
    /// The TLS port of each pod by its serving address (and 443 of the private Service); a pod
    /// missing here is reached on queue-proxy's 8112.
    pub ports: std::collections::BTreeMap<SocketAddr, u16>,
}

impl Backends {
    fn has_pods(&self) -> bool {
        !self.probed.is_empty() || !self.trusted.is_empty()
    }
}

/// A revision's private Service address, and when to send traffic through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterIp {
    pub addr: SocketAddr,
    /// `true`: always (a mesh is known to be there); `false`: only once no pod answers a probe
    /// directly, every failure looks like a mesh's, and the Service's address answers.
    pub always: bool,
    /// Pods the platform reports ready behind it, which sizes its capacity.
    pub ready_pods: usize,
}

/// Which of the activators sharing a revision this one is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subset {
    pub index: usize,
    pub count: usize,
}

/// What the readiness prober should try for a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePlan {
    pub probe: Probe,
    /// Pods waiting for their first successful probe.
    pub pods: Vec<SocketAddr>,
    /// The private Service to probe: on its own, or when every pod failed as only a mesh explains.
    pub cluster_ip: Option<SocketAddr>,
}

/// Requests that may wait in one revision, and the body bytes they may hold; requests and bytes
/// across all revisions. The command line's defaults.
pub const DEFAULT_MAX_WAITING: usize = 10_000;
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
pub const DEFAULT_MAX_WAITING_TOTAL: u64 = 100_000;
pub const DEFAULT_MAX_BYTES_TOTAL: u64 = 512 << 20;

/// Which pod a request may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Any,
    /// This pod, waiting for its capacity if it is busy; any pod if it is no longer ready.
    Pod(SocketAddr),
    /// This pod if it has room now (and is in this activator's subset), else any: where a new
    /// session goes when every replica is to place it alike (`rendezvous`).
    Prefer(SocketAddr),
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
    /// Requests queued for this pod in particular; a new request does not take a slot of theirs.
    pinned_waiting: AtomicUsize,
    /// Whether the pod is in this activator's subset, which unpinned requests are balanced over.
    assigned: AtomicBool,
    /// When it began to take traffic here.
    ready_since: Instant,
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

    pub fn in_flight(&self) -> usize {
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

struct Pending {
    probe: Probe,
    /// Pods waiting for their first successful probe.
    endpoints: Vec<SocketAddr>,
    /// Pods among `endpoints` that refused or dropped a connection: they wait for a probe even
    /// while the platform still vouches for them, since it has not noticed yet.
    unreachable: Vec<SocketAddr>,
    /// When pods among `endpoints` that have never been ready here were first listed.
    first_listed: HashMap<SocketAddr, Instant>,
    cluster_ip: Option<ClusterIp>,
    /// Cleared for good once pods failed as only a mesh explains and the Service answered, as
    /// upstream does: later pods of the revision are reached through the Service too.
    pods_addressable: bool,
    has_pods: bool,
    subset: Option<Subset>,
    tls: Option<TlsPorts>,
    /// Pods that left the revision within `UNLISTED_MEMORY`, and when: a session's end is still
    /// told to them for `LEFT_GRACE`, never after (their address may be another pod's by then),
    /// and a request pinned to one does not wait for it to come back.
    departed: HashMap<SocketAddr, Instant>,
    /// Addresses not listed here that a pinned request waited for, and when it began to.
    awaited: HashMap<SocketAddr, Instant>,
}

/// How long a pod that left its revision is still told of its sessions' ends.
pub const LEFT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Pending {
    /// Traffic goes through the private Service rather than to pods.
    fn through_cluster_ip(&self) -> Option<ClusterIp> {
        self.cluster_ip.filter(|c| c.always || !self.pods_addressable)
    }
}

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
struct Queue {
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

pub struct Throttler {
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
pub struct ThrottleMetrics {
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
        self.throttler.metrics.active.dec();
        self.throttler.release(&self.pod);
    }
}

impl Throttler {
    pub fn new(container_concurrency: u32, limits: QueueLimits, metrics: ThrottleMetrics) -> Arc<Self> {
        Arc::new_cyclic(|me| Throttler {
            container_concurrency: AtomicUsize::new(container_concurrency as usize),
            through_cluster_ip: AtomicBool::new(false),
            cluster_ip_slots: AtomicUsize::new(0),
            limits,
            metrics,
            pods: ArcSwap::default(),
            pending: Mutex::new(Pending {
                probe: Probe::None,
                endpoints: Vec::new(),
                unreachable: Vec::new(),
                first_listed: HashMap::new(),
                cluster_ip: None,
                pods_addressable: true,
                has_pods: false,
                subset: None,
                tls: None,
                departed: HashMap::new(),
                awaited: HashMap::new(),
            }),
            cursor: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            waiting_any: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            probed: Notify::new(),
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

    fn policy(capacity: usize) -> Policy {
        match capacity {
            0 => Policy::PowerOfTwo,
            cc if cc <= FIRST_AVAILABLE_MAX_CC => Policy::FirstAvailable,
            _ => Policy::RoundRobin,
        }
    }

    /// Changes `containerConcurrency`; requests in flight keep their slots and waiters are served
    /// at once if the pods now have room.
    pub fn set_container_concurrency(&self, container_concurrency: u32) {
        let old = self.container_concurrency.swap(container_concurrency as usize, Ordering::AcqRel);
        if old != container_concurrency as usize {
            self.reassign(&self.lock_pending());
            self.dispatch_if_waiting();
        }
    }

    /// The pods that may take traffic now, sorted by address.
    #[cfg(test)]
    pub fn ready(&self) -> arc_swap::Guard<Arc<Vec<Arc<Pod>>>> {
        self.pods.load()
    }

    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Returns once `addr` is ready, unless it is a pod just listed that this replica has not
    /// probed yet: then it waits for that probe, for at most `FIRST_PROBE_GRACE` after the pod
    /// was listed; or a pod not listed here at all, which may be new: then it waits for the
    /// world to list it, for at most `UNLISTED_GRACE` (once per address: one that never comes
    /// is gone). A session pinned to a new pod by another replica so stays on it.
    pub async fn await_first_probe(&self, addr: SocketAddr) {
        loop {
            if self.is_ready(addr) {
                return;
            }
            let probed = self.probed.notified();
            tokio::pin!(probed);
            probed.as_mut().enable();
            let deadline = {
                let mut pending = self.lock_pending();
                if self.is_ready(addr) {
                    return;
                }
                let now = Instant::now();
                match pending.first_listed.get(&addr) {
                    Some(&listed) => listed + FIRST_PROBE_GRACE,
                    None if pending.endpoints.contains(&addr) || pending.departed.contains_key(&addr) => return,
                    None => {
                        pending.awaited.retain(|_, at| now.duration_since(*at) < UNLISTED_MEMORY);
                        let since = *pending.awaited.entry(addr).or_insert(now);
                        since + UNLISTED_GRACE
                    }
                }
            };
            tokio::select! {
                () = probed => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    pub fn has_ready_pods(&self) -> bool {
        !self.pods.load().is_empty()
    }

    pub fn is_ready(&self, addr: SocketAddr) -> bool {
        self.pods.load().binary_search_by_key(&addr, |p| p.addr).is_ok()
    }

    /// Whether the revision lists `addr` as a pod of its (ready, or waiting for a probe), or did
    /// until less than `LEFT_GRACE` ago.
    pub fn lists(&self, addr: SocketAddr) -> bool {
        if self.is_ready(addr) {
            return true;
        }
        let pending = self.lock_pending();
        pending.endpoints.contains(&addr) || pending.departed.get(&addr).is_some_and(|at| at.elapsed() < LEFT_GRACE)
    }

    /// Replaces the revision's pods. Pods already taking traffic keep doing so, with their
    /// in-flight counts and connection pools; trusted ones take traffic at once, probed ones once
    /// `probe` passes against them (see `readiness`). Returns whether the prober has work.
    pub fn set_backends(&self, backends: &Backends, probe: Probe) -> bool {
        let mut pending = self.lock_pending();
        if pending.tls != backends.tls {
            pending.tls = backends.tls.clone();
            for pod in self.pods.load().iter() {
                pod.client.retarget(self.transport(&pending, pod.addr));
            }
        }
        pending.probe = probe.clone();
        let now = Instant::now();
        let listed = |a: &SocketAddr| backends.trusted.contains(a) || backends.probed.contains(a);
        let before: Vec<SocketAddr> =
            self.pods.load().iter().map(|p| p.addr).chain(pending.endpoints.iter().copied()).collect();
        pending.departed.retain(|a, at| !listed(a) && now.duration_since(*at) < UNLISTED_MEMORY);
        for addr in before.into_iter().filter(|a| !listed(a)) {
            pending.departed.entry(addr).or_insert(now);
        }
        pending.cluster_ip = backends.cluster_ip;
        pending.subset = backends.subset;
        pending.has_pods = backends.has_pods();
        let current = self.pods.load();
        let ready = match pending.through_cluster_ip() {
            Some(service) => {
                pending.endpoints.clear();
                pending.first_listed.clear();
                self.set_cluster_ip_slots(&pending);
                // The Service keeps taking traffic while it has pods behind it; with none left
                // (scaled to zero) it must answer a probe again before the next requests.
                let verified = self.through_cluster_ip.load(Ordering::Acquire)
                    && current.first().is_some_and(|p| p.addr == service.addr);
                if verified && pending.has_pods {
                    current.iter().cloned().collect()
                } else {
                    self.through_cluster_ip.store(false, Ordering::Release);
                    Vec::new()
                }
            }
            None => {
                self.through_cluster_ip.store(false, Ordering::Release);
                let mut ready = Vec::new();
                pending.endpoints.clear();
                let listed = |a: &SocketAddr| backends.trusted.contains(a) || backends.probed.contains(a);
                pending.unreachable.retain(listed);
                let trusted = backends.trusted.iter().map(|a| (a, true));
                for (&addr, trusted) in trusted.chain(backends.probed.iter().map(|a| (a, false))) {
                    if ready.iter().any(|p: &Arc<Pod>| p.addr == addr) || pending.endpoints.contains(&addr) {
                        continue;
                    }
                    match current.binary_search_by_key(&addr, |p| p.addr) {
                        Ok(i) => ready.push(current[i].clone()),
                        Err(_) if pending.unreachable.contains(&addr) => pending.endpoints.push(addr),
                        Err(_) if trusted || probe == Probe::None => ready.push(self.new_pod(&pending, addr)),
                        Err(_) => {
                            pending.endpoints.push(addr);
                            pending.first_listed.entry(addr).or_insert_with(Instant::now);
                        }
                    }
                }
                let Pending { first_listed, endpoints, unreachable, .. } = &mut *pending;
                first_listed.retain(|a, _| endpoints.contains(a) && !unreachable.contains(a));
                ready.sort_by_key(|p| p.addr);
                ready
            }
        };
        self.pods.store(Arc::new(ready));
        self.reassign(&pending);
        self.probed.notify_waiters();
        let work = Self::has_probe_work(&pending, self.through_cluster_ip.load(Ordering::Acquire));
        drop(pending);
        self.dispatch_if_waiting();
        work
    }

    /// The certificates to reach pods with once their revision's backends ask for TLS.
    pub fn verify_tls_with(&self, tls: Arc<crate::tls::InternalTls>) {
        let _ = self.internal_tls.set(tls);
    }

    fn new_pod(&self, pending: &Pending, addr: SocketAddr) -> Arc<Pod> {
        Pod::new(addr, self.transport(pending, addr))
    }

    /// How the pod at `addr` (or the private Service) is reached now.
    fn transport(&self, pending: &Pending, addr: SocketAddr) -> Transport {
        match (&pending.tls, self.internal_tls.get()) {
            (Some(ports), Some(tls)) => Transport::Tls {
                tls: tls.clone(),
                namespace: Arc::from(ports.namespace.as_str()),
                to: SocketAddr::new(addr.ip(), ports.ports.get(&addr).copied().unwrap_or(crate::tls::POD_TLS_PORT)),
            },
            _ => Transport::Plain,
        }
    }

    /// Pods the platform now reports not ready: they stop taking traffic and must pass the probe
    /// again. Returns whether the prober has work.
    pub fn reprobe(&self, addrs: &[SocketAddr]) -> bool {
        let mut pending = self.lock_pending();
        self.demote(&mut pending, addrs);
        let work = Self::has_probe_work(&pending, self.through_cluster_ip.load(Ordering::Acquire));
        drop(pending);
        self.dispatch_if_waiting();
        work
    }

    /// A pod refused or dropped a connection before a request reached it: it stops taking
    /// traffic now, before the platform notices, and takes it again once a probe passes (a TCP
    /// connect where the revision has no probe). Returns whether it was taking traffic until now,
    /// in which case the prober has work.
    pub fn mark_unreachable(&self, addr: SocketAddr) -> bool {
        let mut pending = self.lock_pending();
        let demoted = self.demote(&mut pending, &[addr]);
        if demoted {
            pending.unreachable.push(addr);
        }
        drop(pending);
        self.dispatch_if_waiting();
        demoted
    }

    /// Moves ready pods among `addrs` back to the prober; whether any was ready. Traffic through
    /// the private Service has no pods to demote.
    fn demote(&self, pending: &mut Pending, addrs: &[SocketAddr]) -> bool {
        if pending.through_cluster_ip().is_some() {
            return false;
        }
        let current = self.pods.load();
        let (gone, kept): (Vec<_>, Vec<_>) = current.iter().cloned().partition(|p| addrs.contains(&p.addr));
        if gone.is_empty() {
            return false;
        }
        pending.endpoints.extend(gone.iter().map(|p| p.addr));
        self.pods.store(Arc::new(kept));
        self.reassign(pending);
        true
    }

    /// Requests waiting for pods that just left take any pod now; when more could go than a
    /// batch, the rest go at a pace.
    fn dispatch_if_waiting(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 && self.dispatch_all() {
            self.pace_release();
        }
    }

    /// Paces the release of the waiters that could go: ending exchanges let more go (`serve`),
    /// and a task lets a batch go whenever none ended for `RELEASE_STALL`, until the queue of
    /// waiters taking any pod is empty or no pod has room. Without a runtime (never the case
    /// in the activator) they all go at once.
    fn pace_release(&self) {
        let (Some(me), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current()) else {
            while self.dispatch_all() {}
            return;
        };
        if self.releasing.swap(true, Ordering::SeqCst) {
            return;
        }
        runtime.spawn(async move {
            let mut seen = me.released.load(Ordering::SeqCst);
            loop {
                tokio::time::sleep(RELEASE_STALL).await;
                let released = me.released.load(Ordering::SeqCst);
                if released == seen && !me.dispatch_all() {
                    break;
                }
                seen = me.released.load(Ordering::SeqCst);
                if me.waiting_any.load(Ordering::SeqCst) == 0 {
                    break;
                }
            }
            me.releasing.store(false, Ordering::SeqCst);
            // Slots freed while the pace ended may have been left to it.
            me.dispatch_if_waiting();
        });
    }

    fn has_probe_work(pending: &Pending, through_cluster_ip: bool) -> bool {
        match pending.through_cluster_ip() {
            Some(_) => pending.has_pods && !through_cluster_ip,
            None => !pending.endpoints.is_empty(),
        }
    }

    /// What the prober should try now, if anything.
    pub fn probe_plan(&self) -> Option<ProbePlan> {
        let pending = self.lock_pending();
        if !Self::has_probe_work(&pending, self.through_cluster_ip.load(Ordering::Acquire)) {
            return None;
        }
        let probe = pending.probe.clone();
        if let Some(service) = pending.through_cluster_ip() {
            return Some(ProbePlan { probe, pods: Vec::new(), cluster_ip: Some(service.addr) });
        }
        // The Service is the fallback only while no pod takes traffic directly.
        let fallback = pending.cluster_ip.filter(|_| self.pods.load().is_empty()).map(|c| c.addr);
        Some(ProbePlan { probe, pods: pending.endpoints.clone(), cluster_ip: fallback })
    }

    /// A pod passed its readiness probe: it takes traffic now, waiters first.
    pub fn mark_ready(&self, addr: SocketAddr) {
        let pending = {
            let mut pending = self.lock_pending();
            let Some(i) = pending.endpoints.iter().position(|a| *a == addr) else { return };
            pending.endpoints.swap_remove(i);
            pending.unreachable.retain(|a| *a != addr);
            pending.first_listed.remove(&addr);
            pending
        };
        let mut pods: Vec<Arc<Pod>> = self.pods.load().iter().cloned().collect();
        if let Err(i) = pods.binary_search_by_key(&addr, |p| p.addr) {
            pods.insert(i, self.new_pod(&pending, addr));
        }
        self.pods.store(Arc::new(pods));
        self.probed.notify_waiters();
        self.reassign(&pending);
        drop(pending);
        self.dispatch_if_waiting();
    }

    /// The private Service answered its probe: from now on traffic goes through it (and stays so
    /// for this revision, as upstream's watcher does once pods proved unreachable).
    pub fn mark_cluster_ip_ready(&self, addr: SocketAddr) {
        {
            let mut pending = self.lock_pending();
            if pending.cluster_ip.is_none_or(|c| c.addr != addr) || !pending.has_pods {
                return;
            }
            pending.pods_addressable = false;
            pending.endpoints.clear();
            pending.first_listed.clear();
            self.set_cluster_ip_slots(&pending);
            let current = self.pods.load();
            let service =
                current.iter().find(|p| p.addr == addr).cloned().unwrap_or_else(|| self.new_pod(&pending, addr));
            self.through_cluster_ip.store(true, Ordering::Release);
            self.pods.store(Arc::new(vec![service]));
            self.reassign(&pending);
        }
        self.dispatch_if_waiting();
    }

    /// Upstream's capacity through the Service: `containerConcurrency` times the ready pods,
    /// shared by the activators in the path, at least 1; unlimited for containerConcurrency 0.
    fn set_cluster_ip_slots(&self, pending: &Pending) {
        let cc = self.container_concurrency.load(Ordering::Acquire);
        let ready = pending.cluster_ip.map_or(0, |c| c.ready_pods);
        let activators = pending.subset.map_or(1, |s| s.count.max(1));
        let slots = if cc == 0 { 0 } else { (cc * ready / activators).max(1) };
        self.cluster_ip_slots.store(slots, Ordering::Release);
    }

    /// Marks the pods in this activator's subset, as upstream assigns them (since #14022): pods in
    /// `ip:port` string order, an equal slice each, the remainder one each to the first
    /// activators. With `containerConcurrency` 0, or through the Service, every pod is everyone's.
    fn reassign(&self, pending: &Pending) {
        let pods = self.pods.load();
        let cc = self.container_concurrency.load(Ordering::Acquire);
        let subset =
            pending.subset.filter(|s| cc > 0 && s.count > 0 && !self.through_cluster_ip.load(Ordering::Acquire));
        let Some(Subset { index, count }) = subset else {
            for pod in pods.iter() {
                pod.assigned.store(true, Ordering::Relaxed);
            }
            return;
        };
        let mut order: Vec<&Arc<Pod>> = pods.iter().collect();
        order.sort_by_cached_key(|p| p.addr.to_string());
        let n = order.len();
        let mine = |i: usize| -> bool {
            if count > n {
                return i == index % n;
            }
            let size = n / count;
            (index * size..(index + 1) * size).contains(&i) || (index < n % count && i == count * size + index)
        };
        for (i, pod) in order.iter().enumerate() {
            pod.assigned.store(mine(i), Ordering::Relaxed);
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }

    /// Takes a slot on a pod, waiting in FIFO order while every eligible pod is full or no pod
    /// is ready. `body_bytes` is what the request's body may occupy while it waits.
    pub async fn acquire(self: &Arc<Self>, want: Want, body_bytes: u64) -> Result<Lease, AcquireError> {
        let lease = self.wait_for_slot(want, body_bytes).await?;
        if !lease.pod.is_assigned() {
            self.metrics.outside_subset.inc();
        }
        Ok(lease)
    }

    async fn wait_for_slot(self: &Arc<Self>, want: Want, body_bytes: u64) -> Result<Lease, AcquireError> {
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

    /// The ready pod `hash` picks by rendezvous hashing: replicas that list the same pods pick
    /// the same one with nothing to agree through, and a pod leaving moves only the keys it had.
    pub fn rendezvous(&self, hash: u64) -> Option<SocketAddr> {
        let weight = |addr: SocketAddr| {
            let mut bytes = [0u8; 18];
            match addr.ip() {
                std::net::IpAddr::V4(ip) => bytes[..4].copy_from_slice(&ip.octets()),
                std::net::IpAddr::V6(ip) => bytes[..16].copy_from_slice(&ip.octets()),
            }
            bytes[16..].copy_from_slice(&addr.port().to_be_bytes());
            xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, hash)
        };
        let pods = self.pods.load();
        let settled = pods.iter().filter(|p| p.ready_since.elapsed() >= RENDEZVOUS_SETTLE).map(|p| p.addr);
        settled.max_by_key(|addr| weight(*addr)).or_else(|| pods.iter().map(|p| p.addr).max_by_key(|a| weight(*a)))
    }

    fn ready_pod(&self, addr: SocketAddr) -> Option<Arc<Pod>> {
        let pods = self.pods.load();
        pods.binary_search_by_key(&addr, |p| p.addr).ok().map(|i| pods[i].clone())
    }

    fn lease(self: &Arc<Self>, pod: Arc<Pod>) -> Lease {
        self.metrics.active.inc();
        Lease { throttler: self.clone(), pod }
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
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

    /// A pod with a free slot by the revision's policy, among those `eligible` allows.
    fn pick(&self, pods: &[Arc<Pod>], capacity: usize, eligible: impl Fn(&Pod) -> bool) -> Option<Arc<Pod>> {
        let n = pods.len();
        if n == 0 {
            return None;
        }
        let chosen = match Self::policy(capacity) {
            Policy::PowerOfTwo => {
                // Unlimited slots: nobody waits for a pod that is ready, and every pod is in every
                // activator's subset, so all are eligible.
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
                pods[chosen].try_reserve(capacity);
                return Some(pods[chosen].clone());
            }
            Policy::FirstAvailable => pods.iter().find(|p| eligible(p) && p.try_reserve(capacity)),
            Policy::RoundRobin => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| &pods[(start + k) % n]).find(|p| eligible(p) && p.try_reserve(capacity))
            }
        };
        chosen.cloned()
    }

    fn release(&self, pod: &Arc<Pod>) {
        pod.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let mut queue = self.lock_queue();
            self.serve(&mut queue, pod);
        }
    }

    /// Gives `pod`'s free slots to the oldest waiters that can use it: those pinned to it and
    /// those that take any pod, in arrival order (at most `RELEASE_GROWTH` of the latter while
    /// the release is paced). Only the fronts of two deques are looked at.
    fn serve(&self, queue: &mut Queue, pod: &Arc<Pod>) {
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
    fn dispatch_all(&self) -> bool {
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

/// A queued request. Dropping it (timeout, client gone) leaves the queue, or returns a slot that
/// was granted after it stopped listening.
struct Waiting<'a> {
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

    fn gauge() -> ThrottleMetrics {
        ThrottleMetrics {
            queued: [IntGauge::new("queued", "test").unwrap(), IntGauge::new("queued2", "test").unwrap()],
            active: IntGauge::new("active", "test").unwrap(),
            outside_subset: prometheus::IntCounter::new("outside", "test").unwrap(),
        }
    }

    /// Gives `t` these pods, probed with `probe` (trusted at once when it is `Probe::None`).
    fn set(t: &Throttler, pods: &[SocketAddr], probe: Probe) -> bool {
        t.set_backends(&Backends { probed: pods.to_vec(), ..Backends::default() }, probe)
    }

    fn waiting_for_probe(t: &Throttler) -> Vec<SocketAddr> {
        t.probe_plan().map(|p| p.pods).unwrap_or_default()
    }

    fn throttler(cc: u32, pods: u16) -> Arc<Throttler> {
        let t = Throttler::new(cc, limits(4, 1 << 20, 1000), gauge());
        set(&t, &addrs(pods), Probe::None);
        t
    }

    fn in_flight(t: &Throttler) -> Vec<usize> {
        t.ready().iter().map(|p| p.in_flight()).collect()
    }

    #[test]
    fn rendezvous_places_a_key_alike_everywhere_and_moves_only_a_leaving_pods_keys() {
        let (one, other) = (throttler(0, 4), throttler(0, 4));
        let placed: Vec<SocketAddr> = (0..400u64).map(|hash| one.rendezvous(hash).unwrap()).collect();
        assert!((0..400u64).all(|hash| other.rendezvous(hash) == Some(placed[hash as usize])), "replicas agree");
        let per_pod = |pod: SocketAddr| placed.iter().filter(|p| **p == pod).count();
        assert!(addrs(4).into_iter().all(|pod| per_pod(pod) > 50), "keys spread over the pods");
        let gone = addrs(4)[1];
        set(&one, &addrs(4).into_iter().filter(|a| *a != gone).collect::<Vec<_>>(), Probe::None);
        for (hash, before) in placed.iter().enumerate() {
            let after = one.rendezvous(hash as u64).unwrap();
            assert!(after == *before || *before == gone, "key {hash} moved from a pod that stayed");
        }
        assert_eq!(throttler(0, 0).rendezvous(7), None);
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
        let mut busy = Vec::new();
        for _ in 0..10 {
            busy.push(t.acquire(Want::Pod(addrs(2)[0]), 0).await.unwrap());
        }
        for _ in 0..20 {
            let lease = t.acquire(Want::Any, 0).await.unwrap();
            assert_eq!(lease.pod().addr, addrs(2)[1]);
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
    async fn endpoint_updates_keep_in_flight_counts() {
        let t = throttler(0, 2);
        let lease = t.acquire(Want::Pod(addrs(2)[1]), 0).await.unwrap();
        set(&t, &addrs(3), Probe::None);
        assert_eq!(in_flight(&t), vec![0, 1, 0]);
        set(&t, &addrs(1), Probe::None);
        drop(lease);
        assert_eq!(in_flight(&t), vec![0]);
    }

    #[tokio::test]
    async fn probed_endpoints_take_traffic_once_ready() {
        let t = throttler(0, 0);
        let probe = Probe::Http { path: "/healthz".into() };
        assert!(set(&t, &addrs(2), probe.clone()));
        assert!(t.ready().is_empty());
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire(Want::Any, 0).await.map(|l| l.pod().addr) })
        };
        wait_for(|| t.waiting() == 1).await;
        t.mark_ready(addrs(2)[1]);
        assert_eq!(waiter.await.unwrap(), Ok(addrs(2)[1]));
        assert_eq!(waiting_for_probe(&t), vec![addrs(2)[0]]);
        assert!(!set(&t, &addrs(2)[1..], probe), "a ready endpoint stays ready");
        t.mark_ready(addrs(2)[0]);
        assert_eq!(in_flight(&t).len(), 1, "a removed endpoint cannot come back through a late probe");
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

    fn spawn_acquire(t: &Arc<Throttler>, want: Want) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
        let t = t.clone();
        tokio::spawn(async move { t.acquire(want, 0).await })
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

    #[tokio::test]
    async fn trusted_pods_serve_at_once_and_demoted_ones_wait_for_the_probe() {
        let t = Throttler::new(0, limits(10, 1 << 20, 100), gauge());
        let probe = Probe::Queue { path: "/healthz".into(), passthrough_host: None };
        let pods = addrs(3);
        let backends = Backends { trusted: vec![pods[0]], probed: vec![pods[1], pods[2]], ..Backends::default() };
        assert!(t.set_backends(&backends, probe.clone()));
        assert_eq!(in_flight(&t).len(), 1, "only the trusted pod serves");
        assert_eq!(waiting_for_probe(&t), vec![pods[1], pods[2]]);
        t.mark_ready(pods[1]);
        assert!(t.reprobe(&[pods[1], pods[0]]), "demoted pods go back to the prober");
        assert!(t.ready().is_empty());
        let mut waiting = waiting_for_probe(&t);
        waiting.sort();
        assert_eq!(waiting, pods);
        // The platform reports it ready again: trusted, it serves without a new probe.
        assert!(t.set_backends(&backends, probe));
        assert!(t.is_ready(pods[0]));
    }

    #[tokio::test]
    async fn an_unreachable_pod_leaves_at_once_and_stays_out_until_its_probe_passes() {
        let t = throttler(1, 2);
        let pods: Vec<SocketAddr> = t.ready().iter().map(|p| p.addr).collect();
        let busy = t.acquire(Want::Pod(pods[1]), 0).await.unwrap();
        let pinned_waiter = spawn_acquire(&t, Want::Pod(pods[1]));
        wait_for(|| t.waiting() == 1).await;
        assert!(t.mark_unreachable(pods[1]));
        assert!(!t.mark_unreachable(pods[1]), "taken out once");
        let moved = pinned_waiter.await.unwrap().expect("a waiter for the lost pod takes another");
        assert_eq!(moved.pod().addr, pods[0]);
        drop((busy, moved));
        assert_eq!(waiting_for_probe(&t), vec![pods[1]]);
        // The platform has not noticed: it still lists the pod, which stays out.
        assert!(t.set_backends(&Backends { trusted: pods.clone(), ..Backends::default() }, Probe::None));
        assert!(!t.is_ready(pods[1]), "listed as ready, but it refused a connection");
        t.mark_ready(pods[1]);
        assert!(t.is_ready(pods[1]));
        assert!(!t.set_backends(&Backends { trusted: pods.clone(), ..Backends::default() }, Probe::None));
        assert!(t.is_ready(pods[1]), "probed back in, it is an ordinary pod again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_pinned_to_a_pod_not_listed_here_waits_for_the_world_briefly_once() {
        let t = throttler(0, 2);
        let new = SocketAddr::from(([127, 0, 0, 1], 9100));
        let waiting = tokio::spawn({
            let t = t.clone();
            async move { t.await_first_probe(new).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "another replica saw it join first: wait for the world here");
        set(&t, &[addrs(2), vec![new]].concat(), Probe::None);
        waiting.await.unwrap();
        assert!(t.is_ready(new));

        let gone = SocketAddr::from(([127, 0, 0, 1], 9200));
        let started = Instant::now();
        t.await_first_probe(gone).await;
        assert_eq!(started.elapsed(), UNLISTED_GRACE, "never listed: waited for the grace");
        let again = Instant::now();
        t.await_first_probe(gone).await;
        assert_eq!(again.elapsed(), std::time::Duration::ZERO, "waited for in vain once: gone, not new");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_pinned_to_a_pod_not_yet_probed_here_waits_for_its_probe_briefly() {
        let t = Throttler::new(0, limits(10, 1 << 20, 100), gauge());
        let probe = Probe::Http { path: "/healthz".into() };
        let pods = addrs(2);
        t.set_backends(&Backends { probed: pods.clone(), ..Backends::default() }, probe.clone());
        let waiting = tokio::spawn({
            let (t, pod) = (t.clone(), pods[0]);
            async move { t.await_first_probe(pod).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "waits for the first probe");
        t.mark_ready(pods[0]);
        waiting.await.unwrap();
        assert!(t.is_ready(pods[0]));
        // A pod whose probes keep failing is waited for only within the grace after listing.
        let started = Instant::now();
        t.await_first_probe(pods[1]).await;
        assert!(started.elapsed() <= FIRST_PROBE_GRACE, "bounded by the grace");
        let later = Instant::now();
        t.await_first_probe(pods[1]).await;
        assert_eq!(later.elapsed(), std::time::Duration::ZERO, "past the grace: no wait");
        // Nor is a pod this replica took out itself.
        t.mark_unreachable(pods[0]);
        let again = Instant::now();
        t.await_first_probe(pods[0]).await;
        assert_eq!(again.elapsed(), std::time::Duration::ZERO);
    }

    /// The pods (by port) activator `index` of `count` gets of `n` pods.
    fn subset_of(n: u16, index: usize, count: usize) -> Vec<u16> {
        let t = Throttler::new(1, limits(10, 1 << 20, 100), gauge());
        let backends = Backends { trusted: addrs(n), subset: Some(Subset { index, count }), ..Backends::default() };
        t.set_backends(&backends, Probe::None);
        t.ready().iter().filter(|p| p.is_assigned()).map(|p| p.addr.port() - 9000).collect()
    }

    #[test]
    fn subsets_follow_upstreams_assignment() {
        // Equal slices in `ip:port` string order: 9000..9003 sort as numbers do here.
        assert_eq!(subset_of(4, 0, 2), [0, 1]);
        assert_eq!(subset_of(4, 1, 2), [2, 3]);
        // The remainder goes one each to the first activators.
        assert_eq!(subset_of(5, 0, 2), [0, 1, 4]);
        assert_eq!(subset_of(5, 1, 2), [2, 3]);
        // More activators than pods: each gets one, pods shared round the ring.
        assert_eq!(subset_of(2, 2, 3), [0]);
        assert_eq!(subset_of(2, 1, 3), [1]);
        let every = |n| {
            let mut all: Vec<u16> = (0..3).flat_map(|i| subset_of(n, i, 3)).collect();
            all.sort();
            all
        };
        assert_eq!(every(7), (0..7).collect::<Vec<_>>(), "every pod is someone's, once");
    }

    #[tokio::test]
    async fn unpinned_requests_stay_in_the_subset_pinned_ones_reach_any_pod() {
        let t = Throttler::new(1, limits(10, 1 << 20, 100), gauge());
        let pods = addrs(4);
        let backends =
            Backends { trusted: pods.clone(), subset: Some(Subset { index: 1, count: 2 }), ..Backends::default() };
        t.set_backends(&backends, Probe::None);
        let a = t.acquire(Want::Any, 0).await.unwrap();
        let b = t.acquire(Want::Any, 0).await.unwrap();
        let mut mine = vec![a.pod().addr, b.pod().addr];
        mine.sort();
        assert_eq!(mine, pods[2..], "the second activator's half");
        let blocked = tokio::time::timeout(Duration::from_millis(20), t.acquire(Want::Any, 0)).await;
        assert!(blocked.is_err(), "the subset is full; the other pods are not this activator's");
        let pinned = t.acquire(Want::Pod(pods[0]), 0).await.unwrap();
        assert_eq!(pinned.pod().addr, pods[0], "a pinned request reaches a pod outside the subset");
        assert_eq!(t.metrics.outside_subset.get(), 1);
    }

    #[tokio::test]
    async fn through_the_private_service_when_pods_cannot_be_reached() {
        let t = Throttler::new(2, limits(10, 1 << 20, 100), gauge());
        let probe = Probe::Queue { path: "/healthz".into(), passthrough_host: None };
        let service = SocketAddr::from(([10, 96, 0, 1], 80));
        let cluster_ip = ClusterIp { addr: service, always: false, ready_pods: 3 };
        let backends = Backends {
            probed: addrs(3),
            cluster_ip: Some(cluster_ip),
            subset: Some(Subset { index: 0, count: 2 }),
            ..Backends::default()
        };
        t.set_backends(&backends, probe.clone());
        let plan = t.probe_plan().unwrap();
        assert_eq!((plan.pods.len(), plan.cluster_ip), (3, Some(service)), "pods first, the Service as fallback");
        t.mark_cluster_ip_ready(service);
        assert_eq!(in_flight(&t).len(), 1);
        assert!(t.probe_plan().is_none());
        // 2 slots a pod times 3 ready pods, shared by 2 activators.
        let leases: Vec<_> = futures_join(&t, 3).await;
        assert!(leases.iter().all(|l| l.pod().addr == service));
        assert!(tokio::time::timeout(Duration::from_millis(20), t.acquire(Want::Any, 0)).await.is_err());
        drop(leases);
        // Scaled to zero and back: the Service must answer again, and pods are not tried again.
        t.set_backends(&Backends { cluster_ip: Some(cluster_ip), ..Backends::default() }, probe.clone());
        assert!(t.ready().is_empty());
        t.set_backends(&backends, probe.clone());
        assert_eq!(
            t.probe_plan().unwrap(),
            ProbePlan { probe: probe.clone(), pods: vec![], cluster_ip: Some(service) }
        );
        // A mesh known to be there: the Service only, pods never probed.
        let always = Throttler::new(0, limits(10, 1 << 20, 100), gauge());
        let cluster_ip = Some(ClusterIp { always: true, ..cluster_ip });
        always.set_backends(&Backends { cluster_ip, ..backends.clone() }, probe.clone());
        assert_eq!(always.probe_plan().unwrap().pods, Vec::<SocketAddr>::new());
    }

    /// Lets every task that can run do so, without letting (paused) time pass.
    async fn settle() {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_at_a_pod_turning_ready_goes_at_the_pace_exchanges_end() {
        let t = Throttler::new(0, limits(1000, 1 << 30, 100_000), gauge());
        let mut waiters: VecDeque<_> = (0..100).map(|_| spawn_acquire(&t, Want::Any)).collect();
        settle().await;
        assert_eq!(t.waiting(), 100);
        set(&t, &addrs(1), Probe::None);
        settle().await;
        assert_eq!(t.waiting(), 100 - RELEASE_BATCH, "a first batch goes at once");
        assert!(waiters.iter().take(RELEASE_BATCH).all(|w| w.is_finished()), "the oldest go first");

        let mut leases = Vec::new();
        for _ in 0..RELEASE_BATCH {
            leases.push(waiters.pop_front().unwrap().await.unwrap().unwrap());
        }
        leases.pop();
        settle().await;
        assert_eq!(t.waiting(), 100 - RELEASE_BATCH - RELEASE_GROWTH, "an ended exchange lets two more go");

        tokio::time::advance(RELEASE_STALL).await;
        settle().await;
        assert_eq!(t.waiting(), 100 - RELEASE_BATCH - RELEASE_GROWTH, "an exchange ended in that period");
        tokio::time::advance(RELEASE_STALL).await;
        settle().await;
        let stalled = 100 - 2 * RELEASE_BATCH - RELEASE_GROWTH;
        assert_eq!(t.waiting(), stalled, "with no exchange ending for a period, a batch goes");

        while t.ready()[0].in_flight() < RELEASE_WINDOW {
            tokio::time::advance(RELEASE_STALL).await;
            settle().await;
        }
        let before = t.waiting();
        let granted = waiters.iter().position(|w| !w.is_finished()).unwrap();
        waiters
            .drain(..granted)
            .for_each(|w| leases.push(futures_util::FutureExt::now_or_never(w).unwrap().unwrap().unwrap()));
        leases.pop();
        settle().await;
        assert_eq!(t.waiting(), before - 1, "past the window an ended exchange lets one go");

        tokio::time::advance(RELEASE_STALL * 50).await;
        wait_for(|| t.waiting() == 0).await;
        wait_for(|| !t.releasing.load(Ordering::SeqCst)).await;
        let slow = spawn_acquire(&t, Want::Any);
        assert!(slow.await.unwrap().is_ok(), "after the burst, requests go at once");
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
