//! The routing decision as a pure function of the request's ids, the service as the snapshot
//! has it, and the pins found for those ids: which revision, whether a particular pod, and
//! which pins to write. No I/O; `pinning` reads the pins before and performs the writes after.
//!
//! Order (the README's "How a request is routed"): a session pin whose revision is still a valid target (listed in the
//! traffic at any percent) wins, on its pod if that pod is ready; then a flow pin to a valid
//! revision; then the ingress's pick or the weighted split. Pins to revisions that left the
//! traffic are replaced; missing pins are created first-writer-wins.

use std::sync::Arc;

use crate::labelled::label_values;
use crate::pins::Pin;
use crate::throttle::Want;
use crate::world::{Revision, Service};

label_values! {
    /// Why the request goes where it goes (`X-Activator-Decision` with `--debug-headers`).
    pub(crate) enum Origin {
        /// The session's pinned pod.
        SessionPin = "session-pin",
        /// The revision pinned for the flow.
        RevisionPin = "revision-pin",
        /// No id: the split.
        Split = "split",
        /// No id: the revision Knative's ingress picked by the split.
        Ingress = "ingress",
        /// An id without a pin: the split (or the ingress's pick), then a new pin.
        NewPin = "new-pin",
        /// An id whose pin names a pod or revision that left: a new pod (in the same revision while
        /// it is still a target), then the pin is replaced.
        RePin = "re-pin",
        /// With strict sessions, a session whose pod or revision left: answered 503, its pin
        /// released, so its next request starts a new session.
        SessionLost = "session-lost",
        /// Soft affinity: the session's pod had `sticky-session-spill-threshold` requests waiting,
        /// so this one went to another pod of its revision; the pin stays.
        Spill = "spill",
    }
}

label_values! {
    /// Why a session left its pod (`K-Session-Lost` with strict sessions, else `K-Session-Moved`).
    pub(crate) enum Departure {
        /// Its pod is not among the revision's ready pods.
        PodGone = "pod-gone",
        /// Its revision is no longer in the service's traffic.
        RevisionGone = "revision-gone",
    }
}

/// A pin to write once the pod is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PinWrite {
    /// No pin yet: first writer wins.
    Create,
    /// Replace this (stale) pin, unless another writer replaced it first.
    Replace(Pin),
}

impl PinWrite {
    pub(super) fn expected(&self) -> Option<&Pin> {
        match self {
            PinWrite::Create => None,
            PinWrite::Replace(pin) => Some(pin),
        }
    }

    fn for_missing_or_stale(current: Option<&Pin>) -> Self {
        current.cloned().map_or(PinWrite::Create, PinWrite::Replace)
    }
}

/// What the request carries and what the pin table says about it.
#[derive(Clone, Debug, Default)]
pub(super) struct Lookup {
    pub has_session: bool,
    pub has_flow: bool,
    pub session: Option<Pin>,
    pub flow: Option<Pin>,
}

pub(super) struct Decision {
    pub revision: Arc<Revision>,
    pub want: Want,
    pub origin: Origin,
    pub session_write: Option<PinWrite>,
    pub flow_write: Option<PinWrite>,
}

/// Decides where a request goes. `ingress_pick` is the revision Knative's ingress named, used
/// in place of the split; `roll` is uniform in `0..100` and picks from the split.
/// `under_served` gives the revision a new pin goes to when the service splits by requests
/// (`affinity::share`); it replaces the roll (and the ingress's pick) for requests that will be
/// pinned, and is asked only for those.
pub(super) fn decide<'s>(
    service: &'s Service,
    ingress_pick: Option<&Arc<Revision>>,
    under_served: impl FnOnce() -> Option<&'s Arc<Revision>>,
    lookup: &Lookup,
    roll: u32,
) -> Decision {
    let valid = |pin: &Pin| service.routes_to(&pin.revision).cloned();
    // A flow keeps a pin to a valid revision even when a session pin wins this request.
    let flow_write = (lookup.has_flow && lookup.flow.as_ref().is_none_or(|pin| valid(pin).is_none()))
        .then(|| PinWrite::for_missing_or_stale(lookup.flow.as_ref()));

    if lookup.has_session
        && let Some(pin) = &lookup.session
        && let Some(revision) = valid(pin)
    {
        return match pin.pod.filter(|pod| revision.throttler.is_ready(*pod)) {
            Some(pod) => {
                Decision { want: Want::Pod(pod), origin: Origin::SessionPin, session_write: None, flow_write, revision }
            }
            None if service.affinity.strict_sessions() => {
                Decision { want: Want::Any, origin: Origin::SessionLost, session_write: None, flow_write, revision }
            }
            // The pod left: the session stays in its revision on a new pod.
            None => Decision {
                want: Want::Any,
                origin: Origin::RePin,
                session_write: Some(PinWrite::Replace(pin.clone())),
                flow_write,
                revision,
            },
        };
    }

    // Past here a session's pin, if any, names a revision that left the traffic.
    if lookup.has_session && lookup.session.is_some() && service.affinity.strict_sessions() {
        let revision = service.split(roll).clone();
        return Decision { want: Want::Any, origin: Origin::SessionLost, session_write: None, flow_write, revision };
    }
    let session_write = lookup.has_session.then(|| PinWrite::for_missing_or_stale(lookup.session.as_ref()));
    if lookup.has_flow
        && let Some(revision) = lookup.flow.as_ref().and_then(valid)
    {
        return Decision { want: Want::Any, origin: Origin::RevisionPin, session_write, flow_write, revision };
    }

    let pinning = lookup.has_session || lookup.has_flow;
    // A service that splits by requests steers new pins by its own percents, in Knative mode
    // too: sticky requests skew what the ingress's per-request pick would give them.
    let steered = if pinning { under_served() } else { None };
    let revision = steered.or(ingress_pick).cloned().unwrap_or_else(|| service.split(roll).clone());
    let stale = matches!(session_write, Some(PinWrite::Replace(_))) || matches!(flow_write, Some(PinWrite::Replace(_)));
    let origin = match (lookup.has_session || lookup.has_flow, stale, ingress_pick.is_some()) {
        (true, true, _) => Origin::RePin,
        (true, false, _) => Origin::NewPin,
        (false, _, true) => Origin::Ingress,
        (false, _, false) => Origin::Split,
    };
    Decision { want: Want::Any, origin, session_write, flow_write, revision }
}

/// Reconciles a decision with the flow pin that holds after its write: a flow another request or
/// replica pinned first sends this request there too, unless the session's own valid pin chose
/// the revision (a stale session pin, to a revision that left the traffic, does not).
pub(super) fn follow_flow_winner(decision: &mut Decision, service: &Service, lookup: &Lookup, winner: &Pin) {
    let session_chose = decision.origin == Origin::SessionPin
        || lookup.session.as_ref().is_some_and(|pin| service.routes_to(&pin.revision).is_some());
    if !session_chose && let Some(revision) = service.routes_to(&winner.revision) {
        decision.revision = revision.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use crate::spec::testing::service as spec;
    use crate::world::publisher::tests::world;

    fn pod(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9000 + n))
    }

    /// A service with revisions `svc-0..` at the given percents; revision `i` has pods
    /// `pod(10 * i + j)` for each `j` in `pods[i]`.
    fn service(percents: &[u32], pods: &[Vec<u16>]) -> Arc<Service> {
        let revisions: Vec<(u32, Vec<SocketAddr>)> = percents
            .iter()
            .zip(pods)
            .enumerate()
            .map(|(i, (p, pods))| (*p, pods.iter().map(|j| pod(10 * i as u16 + j)).collect()))
            .collect();
        world(vec![spec("svc", &revisions)]).service_for_host("svc.test").unwrap().clone()
    }

    fn lookup(session: Option<Option<Pin>>, flow: Option<Option<Pin>>) -> Lookup {
        Lookup {
            has_session: session.is_some(),
            has_flow: flow.is_some(),
            session: session.flatten(),
            flow: flow.flatten(),
        }
    }

    struct Case {
        name: &'static str,
        lookup: Lookup,
        revision: &'static str,
        want: Want,
        origin: Origin,
        session_write: Option<PinWrite>,
        flow_write: Option<PinWrite>,
    }

    /// With `sticky-session-strict`, a session whose pod or revision left is lost, not moved:
    /// nothing is written, and the handler answers 503. A ready pod or a new session is as ever.
    #[test]
    fn strict_sessions_are_lost_where_others_move() {
        let mut strict = spec("svc", &[(100, vec![pod(1), pod(2)])]);
        strict.annotations.insert("activator.knative.dev/sticky-session-strict".into(), "true".into());
        let svc = world(vec![strict]).service_for_host("svc.test").unwrap().clone();
        let decided = |session| decide(&svc, None, || None, &lookup(Some(session), None), 0);
        for gone in [Pin::session("svc-0", pod(7)), Pin::session("svc-9", pod(1))] {
            let lost = decided(Some(gone.clone()));
            assert_eq!(
                (lost.origin, lost.session_write, lost.want),
                (Origin::SessionLost, None, Want::Any),
                "{gone:?}"
            );
        }
        let kept = decided(Some(Pin::session("svc-0", pod(1))));
        assert_eq!((kept.origin, kept.want), (Origin::SessionPin, Want::Pod(pod(1))));
        assert_eq!(decided(None).origin, Origin::NewPin);
        let loose = service(&[100], &[vec![1, 2]]);
        let moved = decide(&loose, None, || None, &lookup(Some(Some(Pin::session("svc-0", pod(7)))), None), 0);
        assert_eq!(moved.origin, Origin::RePin, "without the annotation the session moves");
    }

    #[test]
    fn decision_table() {
        use Origin::*;
        use PinWrite::{Create, Replace};
        // svc-0 at 100 % with pods 1 and 2; svc-1 at 0 % with pod 11; svc-9 is not in the traffic.
        let svc = service(&[100, 0], &[vec![1, 2], vec![1]]);
        let case = |name, lookup, revision, want, origin, session_write, flow_write| Case {
            name,
            lookup,
            revision,
            want,
            origin,
            session_write,
            flow_write,
        };
        let any = Want::Any;
        let cases = [
            case("no ids → split", lookup(None, None), "svc-0", any, Split, None, None),
            case("new session → split and create", lookup(Some(None), None), "svc-0", any, NewPin, Some(Create), None),
            case(
                "pinned session on a ready pod, even at 0 %",
                lookup(Some(Some(Pin::session("svc-1", pod(11)))), None),
                "svc-1",
                Want::Pod(pod(11)),
                SessionPin,
                None,
                None,
            ),
            case(
                "pinned pod gone → same revision, re-pin",
                lookup(Some(Some(Pin::session("svc-0", pod(7)))), None),
                "svc-0",
                any,
                RePin,
                Some(Replace(Pin::session("svc-0", pod(7)))),
                None,
            ),
            case(
                "pinned revision gone → split, replace",
                lookup(Some(Some(Pin::session("svc-9", pod(1)))), None),
                "svc-0",
                any,
                RePin,
                Some(Replace(Pin::session("svc-9", pod(1)))),
                None,
            ),
            case(
                "flow pinned to a 0 % revision",
                lookup(None, Some(Some(Pin::flow("svc-1")))),
                "svc-1",
                any,
                RevisionPin,
                None,
                None,
            ),
            case("new flow → split and create", lookup(None, Some(None)), "svc-0", any, NewPin, None, Some(Create)),
            case(
                "flow pinned to a removed revision → split, replace",
                lookup(None, Some(Some(Pin::flow("svc-9")))),
                "svc-0",
                any,
                RePin,
                None,
                Some(Replace(Pin::flow("svc-9"))),
            ),
            case(
                "unpinned session follows its flow's pin",
                lookup(Some(None), Some(Some(Pin::flow("svc-1")))),
                "svc-1",
                any,
                RevisionPin,
                Some(Create),
                None,
            ),
            case(
                "session pin beats flow pin; the flow keeps its own valid pin",
                lookup(Some(Some(Pin::session("svc-0", pod(1)))), Some(Some(Pin::flow("svc-1")))),
                "svc-0",
                Want::Pod(pod(1)),
                SessionPin,
                None,
                None,
            ),
            case(
                "session pin seeds a new flow pin",
                lookup(Some(Some(Pin::session("svc-1", pod(11)))), Some(None)),
                "svc-1",
                Want::Pod(pod(11)),
                SessionPin,
                None,
                Some(Create),
            ),
        ];
        for c in cases {
            let d = decide(&svc, None, || None, &c.lookup, 42);
            assert_eq!(&*d.revision.name, c.revision, "{}", c.name);
            assert_eq!(d.want, c.want, "{}", c.name);
            assert_eq!(d.origin, c.origin, "{}", c.name);
            assert_eq!(d.session_write, c.session_write, "{}", c.name);
            assert_eq!(d.flow_write, c.flow_write, "{}", c.name);
        }
    }

    #[test]
    fn ingress_pick_replaces_the_split_but_not_pins() {
        let svc = service(&[50, 50], &[vec![1], vec![1]]);
        let r1 = svc.routes_to("svc-1").unwrap().clone();
        for roll in [0, 99] {
            assert_eq!(&*decide(&svc, Some(&r1), || None, &Lookup::default(), roll).revision.name, "svc-1");
        }
        let pinned = lookup(None, Some(Some(Pin::flow("svc-0"))));
        assert_eq!(&*decide(&svc, Some(&r1), || None, &pinned, 0).revision.name, "svc-0");
        assert_eq!(decide(&svc, Some(&r1), || None, &Lookup::default(), 0).origin, Origin::Ingress);
        assert_eq!(decide(&svc, Some(&r1), || None, &lookup(Some(None), None), 0).origin, Origin::NewPin);
    }

    #[test]
    fn a_lost_flow_race_follows_the_winner_unless_the_session_chose() {
        let svc = service(&[50, 50], &[vec![1], vec![1]]);
        let winner = Pin::flow("svc-1");
        let cases = [
            ("no session", lookup(None, Some(None)), "svc-1"),
            ("a session without a pin", lookup(Some(None), Some(None)), "svc-1"),
            ("a stale session pin", lookup(Some(Some(Pin::session("gone", pod(1)))), Some(None)), "svc-1"),
            ("a valid session pin", lookup(Some(Some(Pin::session("svc-0", pod(1)))), Some(None)), "svc-0"),
            (
                "a valid session pin whose pod left",
                lookup(Some(Some(Pin::session("svc-0", pod(9)))), Some(None)),
                "svc-0",
            ),
        ];
        for (name, lookup, expected) in cases {
            let r0 = svc.routes_to("svc-0").unwrap().clone();
            let mut decision = decide(&svc, Some(&r0), || None, &lookup, 0);
            assert!(decision.flow_write.is_some(), "{name}: the flow is written");
            follow_flow_winner(&mut decision, &svc, &lookup, &winner);
            assert_eq!(&*decision.revision.name, expected, "{name}");
        }
    }

    fn arb_pin(revisions: usize) -> impl Strategy<Value = Pin> {
        // Revision indexes past the service's count stand for revisions that left the traffic.
        (0..revisions + 1, 0u16..40, any::<bool>()).prop_map(|(r, p, session)| {
            let name = format!("svc-{r}");
            if session { Pin::session(name.as_str(), pod(p)) } else { Pin::flow(name.as_str()) }
        })
    }

    fn arb_case() -> impl Strategy<Value = (Vec<u32>, Vec<Vec<u16>>, Lookup, u32)> {
        (1usize..4)
            .prop_flat_map(|n| {
                let percents =
                    proptest::collection::vec(0u32..=100, n).prop_filter_map("needs a positive percent", |mut p| {
                        let total: u32 = p.iter().sum();
                        if total == 0 {
                            return None;
                        }
                        let mut scaled: Vec<u32> = p.iter().map(|x| x * 100 / total).collect();
                        let rest = 100 - scaled.iter().sum::<u32>();
                        let first = scaled.iter().position(|x| *x > 0).unwrap_or(0);
                        scaled[first] += rest;
                        p.clone_from(&scaled);
                        Some(p)
                    });
                let pods = proptest::collection::vec(proptest::collection::btree_set(0u16..4, 0..4), n)
                    .prop_map(|sets| sets.into_iter().map(|s| s.into_iter().collect()).collect());
                let pin = || proptest::option::of(arb_pin(n));
                let lookup = (any::<bool>(), any::<bool>(), pin(), pin()).prop_map(|(hs, hf, s, f)| Lookup {
                    has_session: hs,
                    has_flow: hf,
                    session: s.filter(|_| hs),
                    flow: f.filter(|_| hf),
                });
                (percents, pods, lookup, 0u32..100)
            })
            .boxed()
    }

    proptest! {
        #[test]
        fn decisions_respect_the_snapshot((percents, pods, lookup, roll) in arb_case()) {
            let svc = service(&percents, &pods);
            let d = decide(&svc, None, || None, &lookup, roll);
            prop_assert!(svc.routes_to(&d.revision.name).is_some(), "always a valid target");
            if let Want::Pod(p) = d.want {
                prop_assert!(d.revision.throttler.is_ready(p), "never a pod that is not ready");
            }
            if !lookup.has_session && !lookup.has_flow {
                prop_assert_eq!(d.origin, Origin::Split);
                prop_assert_eq!(&d.revision.name, &svc.split(roll).name);
                prop_assert!(d.session_write.is_none() && d.flow_write.is_none());
            }
            if let Some(pin) = lookup.session.as_ref().filter(|_| lookup.has_session)
                && let (Some(rev), Some(p)) = (svc.routes_to(&pin.revision), pin.pod)
                && rev.throttler.is_ready(p)
            {
                prop_assert_eq!(d.want, Want::Pod(p), "a pinned session keeps its pod");
                prop_assert!(d.session_write.is_none());
            }
            if lookup.has_session && lookup.session.is_none() {
                prop_assert_eq!(d.session_write, Some(PinWrite::Create));
            }
            let valid_session_pin = lookup.has_session
                && lookup.session.as_ref().is_some_and(|p| svc.routes_to(&p.revision).is_some());
            if !valid_session_pin
                && let Some(flow) = lookup.flow.as_ref().filter(|_| lookup.has_flow)
                && svc.routes_to(&flow.revision).is_some()
            {
                prop_assert_eq!(&*d.revision.name, &*flow.revision, "a valid flow pin holds");
            }
        }
    }
}
