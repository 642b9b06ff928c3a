//! Turning specs into snapshots and publishing them: the one place that owns the snapshot the
//! request path reads, and what building one needs (metrics, queue bounds, the readiness prober).
//!
//! A whole change (`apply`) builds a new snapshot and keeps each surviving revision's long-lived
//! state (throttler with its in-flight counts, queue and pools; metric handles; concurrency) from
//! the previous one. A change of one revision's endpoints (`set_endpoints`) touches only that
//! revision's throttler, so a source watching endpoints never rebuilds the world for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::policy::{Annotated, Policy};
use super::spec::{RevisionSpec, ServiceSpec, WorldSpec};
use super::{Revision, Service, Snapshot, TrafficTarget};
use crate::autoscaler::Concurrency;
use crate::readiness::Prober;
use crate::stats::Stats;
use crate::stats::knative::RevisionNames;
use crate::throttle::{Backends, QueueLimits, ThrottleMetrics, Throttler};
use crate::tls::InternalTls;

pub struct Publisher {
    current: Arc<ArcSwap<Snapshot>>,
    stats: Stats,
    queue: QueueLimits,
    prober: Prober,
    internal_tls: Arc<InternalTls>,
}

impl Publisher {
    /// Starts with an empty world.
    pub fn new(stats: Stats, queue: QueueLimits, prober: Prober) -> Self {
        Publisher {
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            stats,
            queue,
            prober,
            internal_tls: Arc::default(),
        }
    }

    /// Pods whose backends ask for TLS are verified with `tls`.
    pub fn with_internal_tls(mut self, tls: Arc<InternalTls>) -> Self {
        self.internal_tls = tls;
        self
    }

    /// The published snapshot, for readers.
    pub fn world(&self) -> Arc<ArcSwap<Snapshot>> {
        self.current.clone()
    }

    /// Publishes the world `spec` describes (the caller validated it), keeping the state of
    /// revisions that stay.
    pub fn apply(&self, spec: &WorldSpec) {
        let snapshot = self.build(spec, &self.current.load());
        self.current.store(Arc::new(snapshot));
        self.stats.topology_reload(true);
    }

    /// Counts an update a source had to reject; the source says why in its own log line.
    pub fn rejected(&self) {
        self.stats.topology_reload(false);
    }

    /// Replaces one revision's pods in place. Returns `false` if the revision is not in the
    /// published world (its pods then arrive with the spec that adds it).
    pub fn set_backends(&self, namespace: &str, revision: &str, backends: &Backends) -> bool {
        let world = self.current.load();
        let Some((_, revision)) = world.revision(namespace, revision) else { return false };
        if revision.throttler.set_backends(backends, revision.probe.clone()) {
            self.prober.watch(revision.throttler.clone());
        }
        true
    }

    /// Pods of a revision the platform no longer reports ready: they stop taking traffic until
    /// they pass the probe again.
    pub fn reprobe(&self, namespace: &str, revision: &str, pods: &[SocketAddr]) {
        if let Some((_, revision)) = self.current.load().revision(namespace, revision)
            && revision.throttler.reprobe(pods)
        {
            self.prober.watch(revision.throttler.clone());
        }
    }

    fn build(&self, spec: &WorldSpec, previous: &Snapshot) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for svc in &spec.services {
            let service_affinity = self.annotated(&format!("service {}/{}", svc.namespace, svc.name), &svc.annotations);
            let revisions: HashMap<&str, Arc<Revision>> = svc
                .revisions
                .iter()
                .map(|rev| (rev.name.as_str(), self.revision(svc, rev, &service_affinity, previous)))
                .collect();
            let traffic: Vec<TrafficTarget> = svc
                .traffic
                .iter()
                .map(|t| TrafficTarget { revision: revisions[t.revision.as_str()].clone(), percent: t.percent })
                .collect();
            let affinity = Policy::new(&svc.namespace, &svc.name, traffic.iter().map(|t| &t.revision.affinity));
            let service = Arc::new(Service {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                traffic,
                tags: svc.tags.clone(),
                affinity,
            });
            for host in &svc.hosts {
                snapshot.by_host.insert(host.clone(), service.clone());
            }
            for (name, revision) in revisions {
                let key = (svc.namespace.clone(), name.to_owned());
                let alone = if service.traffic.len() == 1 && service.name == name {
                    service.clone()
                } else {
                    Arc::new(Service {
                        namespace: svc.namespace.clone(),
                        name: name.to_owned(),
                        affinity: Policy::new(&svc.namespace, name, [&revision.affinity]),
                        traffic: vec![TrafficTarget { revision: revision.clone(), percent: 100 }],
                        tags: Vec::new(),
                    })
                };
                snapshot.alone.insert(key.clone(), alone);
                snapshot.by_revision.insert(key, (service.clone(), revision));
            }
        }
        snapshot
    }

    /// One revision, with the long-lived state of the same revision in `previous` if it had one.
    fn revision(
        &self,
        svc: &ServiceSpec,
        rev: &RevisionSpec,
        service: &Annotated,
        previous: &Snapshot,
    ) -> Arc<Revision> {
        let reused = previous.revision(&svc.namespace, &rev.name).map(|(_, r)| r).filter(|r| r.service == svc.name);
        let (throttler, stats, concurrency, served) = match reused {
            Some(r) => {
                r.throttler.set_container_concurrency(rev.container_concurrency);
                (r.throttler.clone(), r.stats.clone(), r.concurrency.clone(), r.served.clone())
            }
            None => {
                let stats = self.stats.revision(RevisionNames {
                    namespace: svc.namespace.clone(),
                    service: rev.owners.service.clone().unwrap_or_else(|| svc.name.clone()),
                    configuration: rev.owners.configuration.clone().unwrap_or_else(|| svc.name.clone()),
                    revision: rev.name.clone(),
                    server_address: svc
                        .hosts
                        .first()
                        .cloned()
                        .unwrap_or_else(|| ServiceSpec::default_host(&svc.namespace, &svc.name)),
                });
                let metrics = ThrottleMetrics {
                    queued: [stats.queued.clone(), stats.knative.queued.clone()],
                    active: stats.knative.active.clone(),
                    outside_subset: stats.outside_subset.clone(),
                };
                let throttler = Throttler::new(rev.container_concurrency, self.queue.clone(), metrics);
                throttler.verify_tls_with(self.internal_tls.clone());
                let concurrency = Concurrency::new(
                    &svc.namespace,
                    &rev.name,
                    stats.in_flight.clone(),
                    stats.knative.concurrency.clone(),
                );
                (throttler, stats, Arc::new(concurrency), Arc::default())
            }
        };
        if throttler.set_backends(&rev.backends, rev.probe.clone()) {
            self.prober.watch(throttler.clone());
        }
        let scope = format!("revision {}/{}", svc.namespace, rev.name);
        Arc::new(Revision {
            namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            name: rev.name.clone(),
            container_concurrency: rev.container_concurrency,
            timeout: rev.timeout,
            response_start_timeout: rev.response_start_timeout,
            idle_timeout: rev.idle_timeout,
            probe: rev.probe.clone(),
            host: rev.host.clone(),
            affinity: self.annotated(&scope, &rev.annotations).over(service),
            throttler,
            stats,
            concurrency,
            served,
        })
    }

    /// The activator's annotations of one object, each it has to ignore logged and counted.
    fn annotated(&self, scope: &str, annotations: &std::collections::BTreeMap<String, String>) -> Annotated {
        Annotated::parse(annotations, &mut |key, reason| {
            self.stats.annotation_error(key);
            tracing::warn!(%scope, annotation = key, %reason, "ignoring annotation");
        })
    }

    /// Revisions of the published world, for tests that look at their throttlers.
    #[cfg(test)]
    pub(crate) fn throttler(&self, namespace: &str, revision: &str) -> Option<Arc<Throttler>> {
        self.current.load().revision(namespace, revision).map(|(_, r)| r.throttler.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    use crate::throttle::Probe;
    use crate::world::spec::tests::service;

    pub(crate) fn publisher() -> Publisher {
        Publisher::new(Stats::new(), QueueLimits::default(), Prober::idle())
    }

    /// The snapshot of a world made of `services`.
    pub(crate) fn world(services: Vec<ServiceSpec>) -> Arc<Snapshot> {
        let publisher = publisher();
        publisher.apply(&WorldSpec { services });
        publisher.world().load_full()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn host_lookup_ignores_port_and_case() {
        let s = world(vec![service("counter", &[(100, vec![])])]);
        assert!(s.service_for_host("counter.test").is_some());
        assert!(s.service_for_host("Counter.TEST:8080").is_some());
        assert!(s.service_for_host("other.test").is_none());
        assert!(s.service_for_host("").is_none());
        assert_eq!(super::super::strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn split_follows_percents_and_skips_zero() {
        let s = world(vec![service("counter", &[(30, vec![]), (70, vec![]), (0, vec![])])]);
        let svc = s.service_for_host("counter.test").unwrap();
        let picks: Vec<_> = (0..100).map(|r| svc.split(r).name.as_str()).collect();
        assert_eq!(picks.iter().filter(|n| **n == "counter-0").count(), 30);
        assert_eq!(picks.iter().filter(|n| **n == "counter-1").count(), 70);
        assert_eq!(svc.split(1000).name, "counter-1");
        assert!(svc.routes_to("counter-2").is_some(), "0 % is still a valid target");
    }

    #[test]
    fn revision_annotations_override_the_service() {
        let mut svc = service("counter", &[(50, vec![]), (50, vec![])]);
        svc.annotations = [("activator.knative.dev/sticky-ttl".to_owned(), "60s".to_owned())].into();
        svc.revisions[1].annotations = [("activator.knative.dev/sticky-ttl".to_owned(), "5s".to_owned())].into();
        let s = world(vec![svc]);
        let ttl = |rev: &str| s.revision("default", rev).unwrap().1.affinity.lifetime().ttl;
        assert_eq!(ttl("counter-1"), Duration::from_secs(5));
        assert_eq!(ttl("counter-0"), Duration::from_secs(60));
    }

    #[test]
    fn a_new_spec_keeps_the_state_of_revisions_that_stay() {
        let publisher = publisher();
        let mut svc = service("counter", &[(100, vec![addr(1)])]);
        publisher.apply(&WorldSpec { services: vec![svc.clone()] });
        let before = publisher.throttler("default", "counter-0").unwrap();
        svc.revisions[0].container_concurrency = 3;
        publisher.apply(&WorldSpec { services: vec![svc] });
        let after = publisher.throttler("default", "counter-0").unwrap();
        assert!(Arc::ptr_eq(&before, &after), "a new containerConcurrency keeps the throttler");
        let world = publisher.world().load_full();
        assert_eq!(world.revision("default", "counter-0").unwrap().1.container_concurrency, 3);
    }

    #[test]
    fn pods_change_in_place_without_a_new_snapshot() {
        let publisher = publisher();
        let mut svc = service("counter", &[(100, vec![])]);
        svc.revisions[0].probe = Probe::Http { path: "/healthz".into() };
        publisher.apply(&WorldSpec { services: vec![svc] });
        let before = publisher.world().load_full();
        let backends = Backends { probed: vec![addr(1), addr(2)], trusted: vec![addr(3)], ..Backends::default() };
        assert!(publisher.set_backends("default", "counter-0", &backends));
        assert!(Arc::ptr_eq(&before, &publisher.world().load_full()), "the world is not rebuilt");
        let throttler = publisher.throttler("default", "counter-0").unwrap();
        assert_eq!(throttler.probe_plan().unwrap().pods.len(), 2, "new pods wait for the revision's probe");
        assert!(throttler.is_ready(addr(3)), "a trusted pod takes traffic at once");
        publisher.reprobe("default", "counter-0", &[addr(3)]);
        assert!(!throttler.is_ready(addr(3)), "a pod reported not ready waits for the probe again");
        assert!(!publisher.set_backends("default", "nope", &backends));
    }
}
