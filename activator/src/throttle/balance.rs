//! Which pod a request takes among those with a free slot, by the revision's policy as Knative's
//! activator chooses it from `containerConcurrency` (power of two choices when unlimited, first
//! available when small, round robin otherwise), and which pod a key is placed on by rendezvous
//! hashing, so replicas that list the same pods place a new session alike.
//!
//! Must not change the ready set or the queue: it reads the pods it is given.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Pod, Throttler};

/// Above this `containerConcurrency`, round robin spreads better than first-available
/// (the same cut-over as Knative's activator).
const FIRST_AVAILABLE_MAX_CC: usize = 3;

/// Pods ready for less than this are left out of `rendezvous`: replicas find a new pod ready a
/// probe period apart, and would place keys apart meanwhile.
const RENDEZVOUS_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LbPolicy {
    /// CC = 0: two random pods, the one with fewer requests in flight.
    PowerOfTwo,
    /// Small CC: the first pod, in address order, with a free slot.
    FirstAvailable,
    /// Large CC: round robin over pods with a free slot.
    RoundRobin,
}

impl Throttler {
    fn policy(capacity: usize) -> LbPolicy {
        match capacity {
            0 => LbPolicy::PowerOfTwo,
            cc if cc <= FIRST_AVAILABLE_MAX_CC => LbPolicy::FirstAvailable,
            _ => LbPolicy::RoundRobin,
        }
    }

    /// A pod with a free slot by the revision's policy, among those `eligible` allows.
    pub(super) fn pick(&self, pods: &[Arc<Pod>], capacity: usize, eligible: impl Fn(&Pod) -> bool) -> Option<Arc<Pod>> {
        let n = pods.len();
        if n == 0 {
            return None;
        }
        let chosen = match Self::policy(capacity) {
            LbPolicy::PowerOfTwo => {
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
            LbPolicy::FirstAvailable => pods.iter().find(|p| eligible(p) && p.try_reserve(capacity)),
            LbPolicy::RoundRobin => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| &pods[(start + k) % n]).find(|p| eligible(p) && p.try_reserve(capacity))
            }
        };
        chosen.cloned()
    }

    /// The ready pod holding the fewest live sessions (`sticky-session-placement:
    /// least-sessions`), the fewest requests in flight breaking a tie, then the address.
    pub(crate) fn fewest_sessions(&self) -> Option<SocketAddr> {
        let pods = self.pods.load();
        let load = |p: &Arc<Pod>| (p.sessions.load(Ordering::Relaxed), p.in_flight(), p.addr);
        pods.iter()
            .filter(|p| p.is_assigned())
            .min_by_key(|p| load(p))
            .or_else(|| pods.iter().min_by_key(|p| load(p)))
            .map(|p| p.addr)
    }

    /// One more session was pinned to `addr` here.
    pub(crate) fn note_session(&self, addr: SocketAddr) {
        self.with_ready(addr, |pod| pod.sessions.fetch_add(1, Ordering::Relaxed));
    }

    /// The live session pins per pod, as the pin table counted them; pods it did not name hold
    /// none. Wakes `sessions_dropped` when a pod now holds fewer than before.
    pub(crate) fn set_sessions(&self, count: impl Fn(SocketAddr) -> u64) {
        let mut dropped = false;
        for pod in self.pods.load().iter() {
            let now = count(pod.addr);
            dropped |= pod.sessions.swap(now, Ordering::Relaxed) > now;
        }
        if dropped {
            self.sessions_dropped.notify_waiters();
        }
    }

    /// Completes when a count of `set_sessions` drops (a seat may be free). Enable it before
    /// reading the counts, so a drop in between is not missed.
    pub(crate) fn sessions_dropped(&self) -> tokio::sync::futures::Notified<'_> {
        self.sessions_dropped.notified()
    }

    /// The ready pods a new session of a revision with a cap on sessions per pod may claim a seat
    /// on, fewest sessions first (then fewest requests in flight, then address), at most `limit`.
    /// Every replica's pods, not only this one's subset: a seat is a seat wherever it is.
    pub(crate) fn seat_candidates(&self, limit: usize) -> Vec<SocketAddr> {
        let pods = self.pods.load();
        let mut order: Vec<&Arc<Pod>> = pods.iter().collect();
        order.sort_by_key(|p| (p.sessions.load(Ordering::Relaxed), p.in_flight(), p.addr));
        order.into_iter().take(limit).map(|p| p.addr).collect()
    }

    /// The ready pods' addresses, sorted.
    pub(crate) fn ready_addrs(&self) -> Vec<SocketAddr> {
        self.pods.load().iter().map(|p| p.addr).collect()
    }

    /// The ready pod `hash` picks by rendezvous hashing: replicas that list the same pods pick
    /// the same one with nothing to agree through, and a pod leaving moves only the keys it had.
    pub(crate) fn rendezvous(&self, hash: u64) -> Option<SocketAddr> {
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::throttle::*;

    #[test]
    fn the_pod_with_the_fewest_sessions_takes_the_next_one() {
        let t = throttler(0, 3);
        let pods = addrs(3);
        t.set_sessions(|pod| if pod == pods[0] { 0 } else { 4 });
        assert_eq!(t.fewest_sessions(), Some(pods[0]));
        for _ in 0..4 {
            t.note_session(pods[0]);
        }
        assert_eq!(t.fewest_sessions(), Some(pods[0]), "a tie: the lowest address, all idle");
        t.note_session(pods[0]);
        assert_eq!(t.fewest_sessions(), Some(pods[1]));
        t.set_sessions(|pod| if pod == pods[2] { 1 } else { 9 });
        assert_eq!(t.fewest_sessions(), Some(pods[2]), "a new count replaces what was noted");
        assert_eq!(throttler(0, 0).fewest_sessions(), None);
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
}
