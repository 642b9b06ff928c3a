//! Seats: the pin-table rule for revisions whose pods hold a bounded number of sessions
//! (`sticky-sessions-per-pod`). A session of such a revision is pinned only to a pod holding
//! fewer live session pins than the cap, and the check and the write are one atomic step, so
//! sessions racing through any replicas never share a pod beyond the cap.
//!
//! Each pod's seats are an index of the pin keys pinned to it (in Redis, a set beside the pins in
//! the service's slot; here, a map). The pins stay the truth: a member whose pin expired, was
//! deleted, or names another pod no longer counts and is pruned when next read, so a seat is
//! freed by whatever ends its pin (idle TTL, max age, the session-end call, `activator pins
//! delete`) without anyone telling the index. Must not choose pods: callers order the candidates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::memory::MemoryPins;
use super::{Lifetime, Pin, PinKey};
use crate::sync::lock;

/// What a claim for a seat got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The session is pinned to this pod, which had a free seat.
    Seated(Pin),
    /// Another writer's pin holds (the session was pinned meanwhile, or re-pinned from the pin
    /// the claim expected).
    Taken(Pin),
    /// Every candidate pod is full.
    Full,
}

/// The seat index of the pins this replica holds, when there is no Redis.
#[derive(Default)]
pub(super) struct LocalSeats {
    /// Pin keys pinned to each pod, by service scope, revision and pod; may hold stale keys.
    by_pod: Mutex<HashMap<PodOf, Vec<PinKey>>>,
}

/// A pod of a revision of a service scope.
type PodOf = (Arc<str>, Arc<str>, SocketAddr);

/// A claim: the session's key, the pin it must still hold (`None`: none), the revision and its
/// candidate pods in order of preference, the cap, and the pin's lifetime.
pub struct SeatClaim<'a> {
    pub key: &'a PinKey,
    pub expected: Option<&'a Pin>,
    pub revision: &'a Arc<str>,
    pub candidates: &'a [SocketAddr],
    pub per_pod: u32,
    pub lifetime: Lifetime,
}

impl LocalSeats {
    /// Pins the claim's key to its first candidate with a free seat, in `memory`; atomic with
    /// every other local claim.
    pub(super) fn claim(&self, memory: &MemoryPins, claim: &SeatClaim<'_>) -> Claim {
        let mut by_pod = lock(&self.by_pod);
        if let Some(current) = memory.peek(claim.key).filter(|current| Some(current) != claim.expected) {
            return Claim::Taken(current);
        }
        for &pod in claim.candidates {
            let seats = by_pod.entry((claim.key.scope().clone(), claim.revision.clone(), pod)).or_default();
            Self::prune(memory, seats, claim.revision, pod);
            seats.retain(|k| k != claim.key);
            if seats.len() < claim.per_pod as usize {
                let pin = Pin::session(claim.revision.clone(), pod);
                let written = memory.write(claim.key, claim.expected, pin, claim.lifetime);
                if !written.won {
                    return Claim::Taken(written.pin);
                }
                seats.push(claim.key.clone());
                return Claim::Seated(written.pin);
            }
        }
        Claim::Full
    }

    /// Live seats of each of `pods` of `revision` in `scope`, pruning the index as it goes.
    pub(super) fn held(
        &self,
        memory: &MemoryPins,
        scope: &Arc<str>,
        revision: &Arc<str>,
        pods: &[SocketAddr],
    ) -> Vec<u64> {
        let mut by_pod = lock(&self.by_pod);
        // A pod not ready now (a readiness flap) keeps its seats while its pins live; the index
        // forgets a pod once none of its pins does.
        by_pod.retain(|(s, r, pod), seats| {
            if s == scope && r == revision {
                Self::prune(memory, seats, revision, *pod);
            }
            !seats.is_empty()
        });
        pods.iter()
            .map(|&pod| by_pod.get(&(scope.clone(), revision.clone(), pod)).map_or(0, |seats| seats.len() as u64))
            .collect()
    }

    fn prune(memory: &MemoryPins, seats: &mut Vec<PinKey>, revision: &str, pod: SocketAddr) {
        seats.retain(|key| memory.peek(key).is_some_and(|pin| *pin.revision == *revision && pin.pod == Some(pod)));
    }
}

/// The Redis key of a pod's seat set: in the service's hash slot, beside its pins, but outside
/// the pattern of its pins (`aa:{scope}:*`), which `activator pins` reads as pins.
pub(super) fn seat_set_key(scope: &str, revision: &str, pod: SocketAddr) -> String {
    format!("aa:seats:{{{scope}}}:{revision}:{pod}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn claim<'a>(key: &'a PinKey, revision: &'a Arc<str>, pods: &'a [SocketAddr], ttl: Duration) -> SeatClaim<'a> {
        SeatClaim {
            key,
            expected: None,
            revision,
            candidates: pods,
            per_pod: 1,
            lifetime: Lifetime { ttl, max_age: None },
        }
    }

    #[test]
    fn one_session_per_seat_and_an_ended_pin_frees_its_seat() {
        let (memory, seats) = (MemoryPins::new(1000), LocalSeats::default());
        let scope: Arc<str> = Arc::from("ns/svc");
        let revision: Arc<str> = Arc::from("r-1");
        let pods: Vec<SocketAddr> = vec!["10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap()];
        let keys: Vec<PinKey> =
            (0..3).map(|i| PinKey::new(&scope, super::super::PinKind::Session, format!("s{i}").as_bytes())).collect();
        let long = Duration::from_secs(600);
        assert_eq!(
            seats.claim(&memory, &claim(&keys[0], &revision, &pods, long)),
            Claim::Seated(Pin::session("r-1", pods[0]))
        );
        assert_eq!(
            seats.claim(&memory, &claim(&keys[1], &revision, &pods, long)),
            Claim::Seated(Pin::session("r-1", pods[1]))
        );
        assert_eq!(seats.claim(&memory, &claim(&keys[2], &revision, &pods, long)), Claim::Full);
        assert_eq!(
            seats.claim(&memory, &claim(&keys[0], &revision, &pods, long)),
            Claim::Taken(Pin::session("r-1", pods[0])),
            "a pinned session keeps its pin"
        );
        assert_eq!(seats.held(&memory, &scope, &revision, &pods), vec![1, 1]);
        assert_eq!(seats.held(&memory, &scope, &revision, &pods[1..]), vec![1], "pod 0 not ready for a moment");
        assert_eq!(seats.held(&memory, &scope, &revision, &pods), vec![1, 1], "and back: its seat was kept");
        memory.remove(&keys[0]);
        assert_eq!(seats.held(&memory, &scope, &revision, &pods), vec![0, 1], "the ended pin's seat is free");
        assert_eq!(
            seats.claim(&memory, &claim(&keys[2], &revision, &pods, long)),
            Claim::Seated(Pin::session("r-1", pods[0]))
        );
    }
}
