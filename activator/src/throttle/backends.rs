//! A revision's pods and how they are reached, as Knative's activator keeps them: pods the
//! platform vouches for take traffic at once, others once a readiness probe passes, and a pod
//! that refused a connection leaves at once until a probe passes again. When several activators
//! share a revision with `containerConcurrency` > 0, this one balances only over its subset of
//! the pods (a request pinned to another pod still reaches it). When pods cannot be reached one
//! by one (a service mesh), all traffic goes through the revision's private Service. Also how a
//! pod is reached (plain or TLS), and the short waits for pods another replica saw first.
//!
//! Must not hand out slots: it publishes the ready set and wakes the queue when it changed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use tokio::time::Instant;

use super::{Pod, Throttler};
use crate::pool::Transport;
use crate::spec::{Backends, ClusterIp, Probe, Subset, TlsPorts};
use crate::sync::lock;

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

/// What the readiness prober should try for a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProbePlan {
    pub probe: Probe,
    /// Pods waiting for their first successful probe.
    pub pods: Vec<SocketAddr>,
    /// The private Service to probe: on its own, or when every pod failed as only a mesh explains.
    pub cluster_ip: Option<SocketAddr>,
}

pub(super) struct Pending {
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
    /// The Kubernetes Pod behind each address, where the platform names it.
    pod_names: std::collections::BTreeMap<SocketAddr, String>,
}

/// How long a pod that left its revision is still told of its sessions' ends.
pub(crate) const LEFT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Pending {
    pub(super) fn new() -> Self {
        Pending {
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
            pod_names: std::collections::BTreeMap::new(),
        }
    }

    /// Traffic goes through the private Service rather than to pods.
    fn through_cluster_ip(&self) -> Option<ClusterIp> {
        self.cluster_ip.filter(|c| c.always || !self.pods_addressable)
    }
}

impl Throttler {
    /// Returns once `addr` is ready, unless it is a pod just listed that this replica has not
    /// probed yet: then it waits for that probe, for at most `FIRST_PROBE_GRACE` after the pod
    /// was listed; or a pod not listed here at all, which may be new: then it waits for the
    /// world to list it, for at most `UNLISTED_GRACE` (once per address: one that never comes
    /// is gone). A session pinned to a new pod by another replica so stays on it.
    pub(crate) async fn await_first_probe(&self, addr: SocketAddr) {
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

    pub(crate) fn has_ready_pods(&self) -> bool {
        !self.pods.load().is_empty()
    }

    pub(crate) fn is_ready(&self, addr: SocketAddr) -> bool {
        self.with_ready(addr, |_| ()).is_some()
    }

    /// What `read` says of the ready pod `addr`; `None` if it is not ready. The ready pods are
    /// sorted by address, so finding one is a binary search.
    pub(super) fn with_ready<T>(&self, addr: SocketAddr, read: impl FnOnce(&Pod) -> T) -> Option<T> {
        let pods = self.pods.load();
        pods.binary_search_by_key(&addr, |p| p.addr).ok().map(|i| read(&pods[i]))
    }

    /// The ready pods the platform names, with their Pod's name.
    pub(crate) fn named_pods(&self) -> Vec<(SocketAddr, String)> {
        let pending = self.lock_pending();
        let pods = self.pods.load();
        pods.iter().filter_map(|p| Some((p.addr, pending.pod_names.get(&p.addr)?.clone()))).collect()
    }

    /// Requests queued for the ready pod `addr` in particular (its sessions' requests waiting for a
    /// slot); `None` if it is not ready.
    pub(crate) fn queued_for(&self, addr: SocketAddr) -> Option<usize> {
        self.with_ready(addr, |pod| pod.pinned_waiting.load(Ordering::SeqCst))
    }

    /// Whether the revision lists `addr` as a pod of its (ready, or waiting for a probe), or did
    /// until less than `LEFT_GRACE` ago.
    pub(crate) fn lists(&self, addr: SocketAddr) -> bool {
        if self.is_ready(addr) {
            return true;
        }
        let pending = self.lock_pending();
        pending.endpoints.contains(&addr) || pending.departed.get(&addr).is_some_and(|at| at.elapsed() < LEFT_GRACE)
    }

    /// Replaces the revision's pods. Pods already taking traffic keep doing so, with their
    /// in-flight counts and connection pools; trusted ones take traffic at once, probed ones once
    /// `probe` passes against them (see `readiness`). Returns whether the prober has work.
    pub(crate) fn set_backends(&self, backends: &Backends, probe: Probe) -> bool {
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
        pending.pod_names.clone_from(&backends.pod_names);
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
    pub(crate) fn verify_tls_with(&self, tls: Arc<crate::tls::InternalTls>) {
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
    pub(crate) fn reprobe(&self, addrs: &[SocketAddr]) -> bool {
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
    pub(crate) fn mark_unreachable(&self, addr: SocketAddr) -> bool {
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

    fn has_probe_work(pending: &Pending, through_cluster_ip: bool) -> bool {
        match pending.through_cluster_ip() {
            Some(_) => pending.has_pods && !through_cluster_ip,
            None => !pending.endpoints.is_empty(),
        }
    }

    /// What the prober should try now, if anything.
    pub(crate) fn probe_plan(&self) -> Option<ProbePlan> {
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
    pub(crate) fn mark_ready(&self, addr: SocketAddr) {
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
    pub(crate) fn mark_cluster_ip_ready(&self, addr: SocketAddr) {
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
    pub(super) fn reassign(&self, pending: &Pending) {
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

    pub(super) fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::throttle::*;
    use std::time::Duration;

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
}
