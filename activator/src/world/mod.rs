//! The world view the request path reads: services, their traffic split, and their revisions
//! with the throttlers that hold their ready pods, as one immutable [`Snapshot`] swapped whole on
//! every change and read without locking.
//!
//! `policy` is what annotations configure, `publisher` turns the sources' specs (`crate::spec`)
//! into snapshots, `resolve` finds the service a request is for. Must not know which source a spec came from (nothing here imports `source`),
//! do file or network I/O, or hold per-request state: in-flight counts and queues live in
//! `throttle`.

pub(crate) mod policy;
pub(crate) mod publisher;
mod resolve;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::autoscaler::Concurrency;
use crate::pins::Lifetime;
use crate::retry::Budget;
use crate::served::Served;
use crate::spec::{HostRewrite, Probe, RevisionConfig, TagSpec};
use crate::stats::RevisionStats;
use crate::throttle::Throttler;

pub(crate) use policy::{Annotated, Policy};
pub(crate) use publisher::{Publisher, WorldMetrics};
pub(crate) use resolve::{NotFound, Target};

/// A revision as the request path sees it.
pub(crate) struct Revision {
    pub namespace: String,
    pub service: String,
    /// Shared with the pins into this revision, so a pin carries no copy of the name.
    pub name: Arc<str>,
    pub config: RevisionConfig,
    /// How new endpoints prove ready.
    pub probe: Probe,
    /// How the client's `Host` reaches the pod.
    pub host: HostRewrite,
    /// The activator's annotations of the revision over those of its service.
    pub affinity: Annotated,
    pub throttler: Arc<Throttler>,
    pub stats: Arc<RevisionStats>,
    pub concurrency: Arc<Concurrency>,
    /// Requests served over a sliding window, for `sticky-split-mode: requests`.
    pub served: Arc<Served>,
    /// How many more requests may be sent again after their pod failed them.
    pub retries: Arc<Budget>,
}

pub(crate) struct TrafficTarget {
    pub revision: Arc<Revision>,
    pub percent: u32,
}

pub(crate) struct Service {
    pub namespace: String,
    pub name: String,
    pub traffic: Vec<TrafficTarget>,
    pub tags: Vec<TagSpec>,
    /// How requests to this service carry session and flow ids.
    pub affinity: Policy,
}

impl Service {
    /// The weighted split: `roll` is uniform in `0..100`. Targets at 0 % are never chosen.
    pub(crate) fn split(&self, roll: u32) -> &Arc<Revision> {
        let mut acc = 0;
        for target in &self.traffic {
            acc += target.percent;
            if roll < acc {
                return &target.revision;
            }
        }
        // Validation makes the percents add up to 100, so only an out-of-range roll gets here.
        &self.traffic.iter().rfind(|t| t.percent > 0).unwrap_or(&self.traffic[0]).revision
    }

    /// Whether a request the ingress sent to `revision` asked for it by one of its tags: with
    /// `Knative-Serving-Tag` (`tag_header`), or at the tag's own host.
    pub(crate) fn tagged(&self, revision: &str, tag_header: Option<&[u8]>, host: &str) -> bool {
        let label = host.split(['.', ':']).next().unwrap_or_default();
        self.tags.iter().filter(|t| t.revision == revision).any(|t| {
            tag_header == Some(t.tag.as_bytes())
                || t.host_label.as_deref().is_some_and(|l| !l.is_empty() && l.eq_ignore_ascii_case(label))
        })
    }

    /// Whether `revision` is listed in the traffic at any percent (a valid affinity target).
    pub(crate) fn routes_to(&self, revision: &str) -> Option<&Arc<Revision>> {
        self.traffic.iter().find(|t| *t.revision.name == *revision).map(|t| &t.revision)
    }

    /// How long pins into `revision` live; pins into a revision that left the traffic are
    /// replaced on their next use, so the default serves them.
    pub(crate) fn lifetime_of(&self, revision: &str) -> Lifetime {
        self.routes_to(revision).map_or_else(|| Annotated::default().lifetime(), |r| r.affinity.lifetime())
    }
}

/// One immutable view of the world.
#[derive(Default)]
pub(crate) struct Snapshot {
    by_host: HashMap<String, Arc<Service>>,
    /// Every service (a Route, in Knative mode), once.
    services: Vec<Arc<Service>>,
    by_revision: HashMap<(String, String), Listed>,
    /// Each revision as a service of its own, for requests that ask for it and no other.
    alone: HashMap<(String, String), Arc<Service>>,
}

/// A revision and the services whose traffic lists it.
struct Listed {
    /// Its own service (the one its Knative Service owns), else the first that lists it.
    primary: (Arc<Service>, Arc<Revision>),
    /// Every service that lists it, with the revision as that service sees it.
    routes: Vec<(Arc<Service>, Arc<Revision>)>,
    /// The Knative Service the revision belongs to (its `serving.knative.dev/service` label).
    owner: Option<String>,
}

impl Snapshot {
    /// The service reached by a `Host` header or `:authority` (port and case ignored).
    pub(crate) fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        let name = strip_port(host);
        match self.by_host.get(name) {
            Some(svc) => Some(svc),
            None if name.bytes().any(|b| b.is_ascii_uppercase()) => self.by_host.get(&name.to_ascii_lowercase()),
            None => None,
        }
    }

    /// A revision by namespace and name, with the service it is primarily served in (its own
    /// Knative Service's Route), for what concerns the revision alone (its pods).
    pub(crate) fn revision(&self, namespace: &str, name: &str) -> Option<&(Arc<Service>, Arc<Revision>)> {
        self.by_revision.get(&(namespace.to_owned(), name.to_owned())).map(|listed| &listed.primary)
    }

    /// The service a request for a revision (as Knative's ingress names it) belongs to: the one
    /// whose host it came in on, if that one lists the revision; else the Route of the
    /// revision's own Knative Service; else the only service that lists it. `None`: the revision
    /// is unknown, or only other services list it and the request names none of them, so it is
    /// served as asked, on its own.
    fn route_for(&self, namespace: &str, name: &str, host: &str) -> Option<&(Arc<Service>, Arc<Revision>)> {
        let listed = self.by_revision.get(&(namespace.to_owned(), name.to_owned()))?;
        let in_service = |svc: &Arc<Service>| listed.routes.iter().find(|(s, _)| Arc::ptr_eq(s, svc));
        if let Some(found) = self.service_for_host(host).and_then(in_service) {
            return Some(found);
        }
        if let Some(owner) = &listed.owner
            && let Some(found) = listed.routes.iter().find(|(s, _)| &s.name == owner)
        {
            return Some(found);
        }
        match listed.routes.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }

    /// Every service, once.
    pub(crate) fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.iter()
    }

    /// Gives each revision's pods the live session pins the pin table counted for them, keyed by
    /// service scope (`<namespace>/<service>`), revision and pod; a pod not named holds none.
    pub(crate) fn set_session_counts(&self, counts: &crate::pins::SessionCounts) {
        let mut by_revision: HashMap<(&str, &str), HashMap<SocketAddr, u64>> = HashMap::new();
        for ((scope, revision, pod), n) in counts {
            let namespace = scope.split_once('/').map_or(&**scope, |(namespace, _)| namespace);
            *by_revision.entry((namespace, revision)).or_default().entry(*pod).or_default() += n;
        }
        let empty = HashMap::new();
        // Seats are counted for every replica by their own census.
        let uncapped =
            self.services.iter().flat_map(|s| &s.traffic).filter(|t| t.revision.affinity.sessions_per_pod().is_none());
        for target in uncapped {
            let revision = &target.revision;
            let pods = by_revision.get(&(revision.namespace.as_str(), &*revision.name)).unwrap_or(&empty);
            revision.throttler.set_sessions(|pod| pods.get(&pod).copied().unwrap_or(0));
        }
    }

    /// A revision as the only target of a service of its own name: what a request that asks for
    /// it explicitly is routed in, so pins to its service's other revisions neither move the
    /// request nor are moved by it, while sessions still keep their pods inside it.
    fn revision_alone(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.alone.get(&(namespace.to_owned(), name.to_owned()))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a trailing :port.
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}
