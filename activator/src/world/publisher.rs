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
use prometheus::IntCounterVec;

use super::policy::{Annotated, Policy};
use super::{Listed, Revision, Service, Snapshot, TrafficTarget};
use crate::autoscaler::Concurrency;
use crate::metrics::Registrar;
use crate::readiness::Prober;
use crate::retry::Budget;
use crate::served::Served;
use crate::spec::{Backends, RevisionSpec, ServiceSpec, WorldSpec};
use crate::stats::knative::RevisionNames;
use crate::stats::{RevisionStats, Stats};
use crate::throttle::{QueueLimits, ThrottleMetrics, Throttler};
use crate::tls::InternalTls;

/// What a revision keeps across snapshots and shares among the services that list it.
#[derive(Clone)]
struct Runtime {
    throttler: Arc<Throttler>,
    stats: Arc<RevisionStats>,
    concurrency: Arc<Concurrency>,
    retries: Arc<Budget>,
}

/// Updates of the world by whether they applied, and annotations ignored.
#[derive(Clone)]
pub(crate) struct WorldMetrics {
    reloads: IntCounterVec,
    annotation_errors: IntCounterVec,
}

impl WorldMetrics {
    pub(crate) fn register(reg: &Registrar) -> Self {
        WorldMetrics {
            reloads: reg.counter_vec(
                "activator_topology_reloads_total",
                "Topology reloads, by result (applied, rejected)",
                &["result"],
            ),
            annotation_errors: reg.counter_vec(
                "activator_annotation_errors_total",
                "Malformed or unknown activator annotations ignored",
                &["annotation"],
            ),
        }
    }
}

pub(crate) struct Publisher {
    current: Arc<ArcSwap<Snapshot>>,
    stats: Stats,
    metrics: WorldMetrics,
    queue: QueueLimits,
    prober: Prober,
    internal_tls: Arc<InternalTls>,
    /// The cluster's default: whether services that do not say read `K-Session` and `K-Revision`
    /// (`--default-ids`, or Knative mode's `config-affinity-activator`).
    default_ids: std::sync::atomic::AtomicBool,
}

impl Publisher {
    /// Starts with an empty world.
    pub(crate) fn new(stats: Stats, metrics: WorldMetrics, queue: QueueLimits, prober: Prober) -> Self {
        Publisher {
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            stats,
            metrics,
            queue,
            prober,
            internal_tls: Arc::default(),
            default_ids: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Sets the cluster's default for the default id headers; whether it changed (the source
    /// then publishes again).
    pub(crate) fn set_default_ids(&self, on: bool) -> bool {
        self.default_ids.swap(on, std::sync::atomic::Ordering::Relaxed) != on
    }

    /// Pods whose backends ask for TLS are verified with `tls`.
    pub(crate) fn with_internal_tls(mut self, tls: Arc<InternalTls>) -> Self {
        self.internal_tls = tls;
        self
    }

    /// The published snapshot, for readers.
    pub(crate) fn world(&self) -> Arc<ArcSwap<Snapshot>> {
        self.current.clone()
    }

    /// Publishes the world `spec` describes (the caller validated it), keeping the state of
    /// revisions that stay.
    pub(crate) fn apply(&self, spec: &WorldSpec) {
        let snapshot = self.build(spec, &self.current.load());
        self.current.store(Arc::new(snapshot));
        self.metrics.reloads.with_label_values(&["applied"]).inc();
    }

    /// Counts an update a source had to reject; the source says why in its own log line.
    pub(crate) fn rejected(&self) {
        self.metrics.reloads.with_label_values(&["rejected"]).inc();
    }

    /// Replaces one revision's pods in place. Returns `false` if the revision is not in the
    /// published world (its pods then arrive with the spec that adds it).
    pub(crate) fn set_backends(&self, namespace: &str, revision: &str, backends: &Backends) -> bool {
        let world = self.current.load();
        let Some((_, revision)) = world.revision(namespace, revision) else { return false };
        if revision.throttler.set_backends(backends, revision.probe.clone()) {
            self.prober.watch(revision.throttler.clone());
        }
        true
    }

    /// Pods of a revision the platform no longer reports ready: they stop taking traffic until
    /// they pass the probe again.
    pub(crate) fn reprobe(&self, namespace: &str, revision: &str, pods: &[SocketAddr]) {
        if let Some((_, revision)) = self.current.load().revision(namespace, revision)
            && revision.throttler.reprobe(pods)
        {
            self.prober.watch(revision.throttler.clone());
        }
    }

    fn build(&self, spec: &WorldSpec, previous: &Snapshot) -> Snapshot {
        // One cluster default for the whole snapshot, however it changes meanwhile.
        let default_ids = self.default_ids.load(std::sync::atomic::Ordering::Relaxed);
        let mut snapshot = Snapshot::default();
        // A revision several services list is one revision: one set of pods, one throttler.
        let mut runtimes: HashMap<(String, String), Runtime> = HashMap::new();
        let before: HashMap<(&str, &str), &Arc<Service>> =
            previous.services().map(|s| ((s.namespace.as_str(), s.name.as_str()), s)).collect();
        for svc in &spec.services {
            let served_before = before.get(&(svc.namespace.as_str(), svc.name.as_str()));
            let service_affinity = self.annotated(&format!("service {}/{}", svc.namespace, svc.name), &svc.annotations);
            let revisions: Vec<(&str, Arc<Revision>)> = svc
                .revisions
                .iter()
                .map(|rev| {
                    let key = (svc.namespace.clone(), rev.name.clone());
                    let runtime = runtimes.entry(key).or_insert_with(|| self.runtime(svc, rev, previous)).clone();
                    // The service's split counts for the revision stay with it.
                    let served = served_before.and_then(|s| s.routes_to(&rev.name)).map(|r| r.served.clone());
                    (rev.name.as_str(), self.revision(svc, rev, &service_affinity, runtime, served))
                })
                .collect();
            let by_name: HashMap<&str, &Arc<Revision>> = revisions.iter().map(|(n, r)| (*n, r)).collect();
            let traffic: Vec<TrafficTarget> = svc
                .traffic
                .iter()
                .map(|t| TrafficTarget { revision: by_name[t.revision.as_str()].clone(), percent: t.percent })
                .collect();
            let annotated = traffic.iter().map(|t| &t.revision.affinity);
            let affinity = Policy::with_default_ids(&svc.namespace, &svc.name, annotated, default_ids);
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
            snapshot.services.push(service.clone());
            for (rev, (name, revision)) in svc.revisions.iter().zip(revisions) {
                let key = (svc.namespace.clone(), name.to_owned());
                let owner = rev.owners.service.clone();
                let owned = owner.as_deref() == Some(svc.name.as_str());
                let listed = snapshot.by_revision.entry(key.clone()).or_insert_with(|| Listed {
                    primary: (service.clone(), revision.clone()),
                    routes: Vec::new(),
                    owner,
                });
                if owned {
                    listed.primary = (service.clone(), revision.clone());
                }
                listed.routes.push((service.clone(), revision.clone()));
                if !snapshot.alone.contains_key(&key) || owned {
                    let alone = if service.traffic.len() == 1 && service.name == name {
                        service.clone()
                    } else {
                        Arc::new(Service {
                            namespace: svc.namespace.clone(),
                            name: name.to_owned(),
                            affinity: Policy::with_default_ids(&svc.namespace, name, [&revision.affinity], default_ids),
                            traffic: vec![TrafficTarget { revision: revision.clone(), percent: 100 }],
                            tags: Vec::new(),
                        })
                    };
                    snapshot.alone.insert(key, alone);
                }
            }
        }
        snapshot
    }

    /// What one revision keeps across snapshots and shares among the services that list it: its
    /// throttler (pods, slots, queue), its series, its concurrency and its retry budget, from `previous` if the
    /// revision was there under the same names.
    fn runtime(&self, svc: &ServiceSpec, rev: &RevisionSpec, previous: &Snapshot) -> Runtime {
        let names = RevisionNames {
            namespace: svc.namespace.clone(),
            service: rev.owners.service.clone().unwrap_or_else(|| svc.name.clone()),
            configuration: rev.owners.configuration.clone().unwrap_or_else(|| svc.name.clone()),
            revision: rev.name.clone(),
            server_address: svc
                .hosts
                .first()
                .cloned()
                .unwrap_or_else(|| ServiceSpec::default_host(&svc.namespace, &svc.name)),
        };
        let reused = previous.revision(&svc.namespace, &rev.name).map(|(_, r)| r).filter(|r| *r.stats.names() == names);
        let runtime = match reused {
            Some(r) => {
                r.throttler.set_container_concurrency(rev.config.container_concurrency);
                Runtime {
                    throttler: r.throttler.clone(),
                    stats: r.stats.clone(),
                    concurrency: r.concurrency.clone(),
                    retries: r.retries.clone(),
                }
            }
            None => {
                let stats = self.stats.revision(names);
                let metrics = ThrottleMetrics {
                    queued: [stats.queued.clone(), stats.knative.queued.clone()],
                    active: stats.knative.active.clone(),
                    outside_subset: stats.outside_subset.clone(),
                };
                let throttler = Throttler::new(rev.config.container_concurrency, self.queue.clone(), metrics);
                throttler.verify_tls_with(self.internal_tls.clone());
                let concurrency = Concurrency::new(
                    &svc.namespace,
                    &rev.name,
                    stats.in_flight.clone(),
                    stats.knative.concurrency.clone(),
                );
                Runtime { throttler, stats, concurrency: Arc::new(concurrency), retries: Arc::default() }
            }
        };
        if runtime.throttler.set_backends(&rev.backends, rev.probe.clone()) {
            self.prober.watch(runtime.throttler.clone());
        }
        runtime
    }

    /// One revision as one service sees it: its runtime, its annotations over the service's, and
    /// the service's split counts for it (`served`, kept from the previous snapshot).
    fn revision(
        &self,
        svc: &ServiceSpec,
        rev: &RevisionSpec,
        service: &Annotated,
        runtime: Runtime,
        served: Option<Arc<Served>>,
    ) -> Arc<Revision> {
        let served = served.unwrap_or_default();
        let scope = format!("revision {}/{}", svc.namespace, rev.name);
        let Runtime { throttler, stats, concurrency, retries } = runtime;
        Arc::new(Revision {
            namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            name: rev.name.as_str().into(),
            config: rev.config,
            probe: rev.probe.clone(),
            host: rev.host.clone(),
            affinity: self.annotated(&scope, &rev.annotations).over(service),
            throttler,
            stats,
            concurrency,
            served,
            retries,
        })
    }

    /// The activator's annotations of one object, each it has to ignore logged and counted.
    fn annotated(&self, scope: &str, annotations: &std::collections::BTreeMap<String, String>) -> Annotated {
        Annotated::parse(annotations, &mut |key, reason| {
            self.metrics.annotation_errors.with_label_values(&[key]).inc();
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

    use crate::spec::Probe;
    use crate::spec::testing::service;

    pub(crate) fn publisher() -> Publisher {
        let reg = crate::metrics::Registrar::default();
        Publisher::new(Stats::register(&reg), WorldMetrics::register(&reg), QueueLimits::default(), Prober::idle())
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
        let picks: Vec<_> = (0..100).map(|r| &*svc.split(r).name).collect();
        assert_eq!(picks.iter().filter(|n| **n == "counter-0").count(), 30);
        assert_eq!(picks.iter().filter(|n| **n == "counter-1").count(), 70);
        assert_eq!(&*svc.split(1000).name, "counter-1");
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
        svc.revisions[0].config.container_concurrency = 3;
        publisher.apply(&WorldSpec { services: vec![svc] });
        let after = publisher.throttler("default", "counter-0").unwrap();
        assert!(Arc::ptr_eq(&before, &after), "a new containerConcurrency keeps the throttler");
        let world = publisher.world().load_full();
        assert_eq!(world.revision("default", "counter-0").unwrap().1.config.container_concurrency, 3);
    }

    /// Knative Routes may share a revision: one throttler for its pods, a service per Route, and
    /// the Route a request belongs to told by its host, else the revision's own Service's Route,
    /// else the only one that lists it.
    #[test]
    fn routes_that_share_a_revision_share_its_pods_and_are_told_apart() {
        let publisher = publisher();
        let own = service("shop", &[(100, vec![addr(1)])]);
        let mut preview = service("preview", &[(50, vec![addr(1)]), (50, vec![])]);
        preview.revisions[0].name = "shop-0".into();
        preview.traffic[0].revision = "shop-0".into();
        let mut shop = own.clone();
        shop.revisions[0].owners.service = Some("shop".into());
        preview.revisions[0].owners.service = Some("shop".into());
        publisher.apply(&WorldSpec { services: vec![preview, shop] });
        let world = publisher.world().load_full();
        let in_route = |host: &str| world.route_for("default", "shop-0", host).map(|(s, _)| s.name.clone());
        assert_eq!(in_route("preview.test").as_deref(), Some("preview"));
        assert_eq!(in_route("shop.test").as_deref(), Some("shop"));
        assert_eq!(in_route("nobody.test").as_deref(), Some("shop"), "its own Service's Route");
        let (a, b) = (
            world.route_for("default", "shop-0", "preview.test").unwrap(),
            world.route_for("default", "shop-0", "shop.test").unwrap(),
        );
        assert!(Arc::ptr_eq(&a.1.throttler, &b.1.throttler), "one revision, one set of pods");
        assert!(!Arc::ptr_eq(&a.1.served, &b.1.served), "each Route counts its own split");
        assert_eq!(
            world.route_for("default", "preview-1", "nobody.test").map(|(s, _)| s.name.as_str()),
            Some("preview"),
            "the only Route"
        );
        assert!(world.route_for("default", "nope", "shop.test").is_none());
        assert_eq!(world.services().count(), 2);
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
