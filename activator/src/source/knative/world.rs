//! Joining what the watches hold into the world, as a pure function: one service per Route (its
//! traffic as the route controller reports it, its Knative Service's annotations, and every
//! revision of the Configurations it routes to, so a pin to a revision that left the traffic is
//! recognised as stale); one service per revision no Route claims, served as named; and each
//! revision's pods from its private Endpoints, this activator's subset from its public Endpoints,
//! and its private Service for meshes, by `config-network`'s rules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use super::objects::{
    Annotations, EndpointsInfo, Key, MeshMode, NetworkConfig, Ports, RevisionInfo, RouteInfo, ServiceInfo,
};
use crate::spec::{
    Backends, ClusterIp, HostRewrite, Owners, Probe, RevisionSpec, ServiceSpec, Subset, TlsPorts, TrafficSpec,
    WorldSpec,
};

/// queue-proxy's readiness path for the activator's probe.
const PROBE_PATH: &str = "/healthz";

/// What the watches hold, translated; maps of revision-scoped objects are keyed by the namespace
/// and the revision they belong to.
#[derive(Debug, Default)]
pub(super) struct Reflection {
    pub revisions: BTreeMap<Key, RevisionInfo>,
    /// `None` while Routes cannot be read (RBAC).
    pub routes: Option<BTreeMap<Key, RouteInfo>>,
    /// `None` while Knative Services cannot be read (RBAC).
    pub services: Option<BTreeMap<Key, Annotations>>,
    pub private_endpoints: BTreeMap<Key, EndpointsInfo>,
    pub public_endpoints: BTreeMap<Key, Ports<IpAddr>>,
    pub private_services: BTreeMap<Key, ServiceInfo>,
    pub network: NetworkConfig,
    /// This activator's pod IP, which places it among a revision's activators.
    pub pod_ip: Option<IpAddr>,
}

impl Reflection {
    /// One service per Route with traffic, at the Route's hosts, over the revisions its status
    /// lists (a revision two Routes list is in both); one per revision no Route lists, served as
    /// named. Each revision's annotations are its own Knative Service's with its own over them,
    /// whichever Route it is reached by.
    pub(super) fn world(&self) -> WorldSpec {
        let mut listed: BTreeSet<&Key> = BTreeSet::new();
        let mut services = Vec::new();
        for route in self.routes.iter().flat_map(BTreeMap::values) {
            let ns = &route.namespace;
            let known = |rev: &str| self.revisions.get_key_value(&(ns.clone(), rev.to_owned())).map(|(k, _)| k);
            let traffic: Vec<(&Key, u32)> =
                route.traffic.iter().filter_map(|(rev, percent)| Some((known(rev)?, *percent))).collect();
            // A Route with no traffic yet routes nothing at the ingress; nor here.
            if traffic.is_empty() {
                continue;
            }
            listed.extend(traffic.iter().map(|(key, _)| *key));
            services.push(ServiceSpec {
                namespace: ns.clone(),
                name: route.name.clone(),
                hosts: route.hosts.clone(),
                annotations: Annotations::new(),
                traffic: traffic
                    .iter()
                    .map(|(key, percent)| TrafficSpec { revision: key.1.clone(), percent: *percent })
                    .collect(),
                tags: route
                    .tags
                    .iter()
                    .filter(|t| traffic.iter().any(|(key, _)| key.1 == t.revision))
                    .cloned()
                    .collect(),
                revisions: traffic.iter().map(|(key, _)| self.revision_spec(&self.revisions[*key])).collect(),
            });
        }
        // Revisions no Route lists (or all of them, without Routes): served as named, and
        // affinity scoped to the revision.
        for (key, rev) in self.revisions.iter().filter(|(key, _)| !listed.contains(key)) {
            services.push(ServiceSpec {
                namespace: key.0.clone(),
                name: rev.name.clone(),
                hosts: Vec::new(),
                annotations: Annotations::new(),
                traffic: vec![TrafficSpec { revision: rev.name.clone(), percent: 100 }],
                tags: Vec::new(),
                revisions: vec![self.revision_spec(rev)],
            });
        }
        WorldSpec { services }
    }

    /// A revision's annotations: its own Knative Service's (by its `serving.knative.dev/service`
    /// label, never another Service whose Route lists it), with its own over them.
    fn annotations(&self, rev: &RevisionInfo) -> Annotations {
        let services = self.services.as_ref();
        let owner = rev.service.as_ref().and_then(|s| services?.get(&(rev.namespace.clone(), s.clone())));
        let mut annotations = owner.cloned().unwrap_or_default();
        annotations.extend(rev.annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
        annotations
    }

    pub(super) fn revision_spec(&self, rev: &RevisionInfo) -> RevisionSpec {
        let private_host = format!("{}-private.{}", rev.name, rev.namespace);
        let passthrough = self.network.passthrough;
        RevisionSpec {
            name: rev.name.clone(),
            config: rev.config,
            annotations: self.annotations(rev),
            backends: self.backends(rev),
            probe: Probe::Queue {
                path: PROBE_PATH.into(),
                passthrough_host: passthrough.then(|| private_host.clone()),
            },
            host: if passthrough { HostRewrite::Passthrough(private_host) } else { HostRewrite::ToOriginalHost },
            owners: Owners { service: rev.service.clone(), configuration: rev.configuration.clone() },
        }
    }

    /// A revision's pods and how to reach them, by `config-network`'s mesh mode as upstream's
    /// revision watcher: in `auto` every pod is probed (the probe also tells whether a mesh is in
    /// the way); otherwise pods Kubernetes reports ready are trusted. Not-ready pods count only
    /// with the probe optimisation.
    pub(super) fn backends(&self, rev: &RevisionInfo) -> Backends {
        let key = (rev.namespace.clone(), rev.name.clone());
        let port = rev.port_name();
        let pods = |of: fn(&EndpointsInfo) -> &Ports<SocketAddr>| -> Vec<SocketAddr> {
            self.private_endpoints.get(&key).and_then(|e| of(e).get(port)).cloned().unwrap_or_default()
        };
        let (ready, not_ready) = (pods(|e| &e.ready), pods(|e| &e.not_ready));
        let unready = if rev.probe_optimisation { not_ready } else { Vec::new() };
        let service =
            self.private_services.get(&key).and_then(|s| Some(SocketAddr::new(s.cluster_ip, *s.ports.get(port)?)));
        let through = |always| {
            let passthrough = self.network.passthrough;
            service.filter(|_| !passthrough).map(|addr| ClusterIp { addr, always, ready_pods: ready.len() })
        };
        let subset = self.subset(&key, port);
        let tls = self.network.internal_tls.then(|| self.tls_ports(&key, rev));
        let pod_names = self.private_endpoints.get(&key).map(|e| e.pod_names.clone()).unwrap_or_default();
        match self.network.mesh {
            MeshMode::Auto => Backends {
                probed: [ready.clone(), unready].concat(),
                trusted: vec![],
                cluster_ip: through(false),
                subset,
                tls,
                pod_names,
            },
            MeshMode::Enabled => {
                Backends { probed: ready.clone(), trusted: vec![], cluster_ip: through(true), subset, tls, pod_names }
            }
            MeshMode::Disabled => {
                Backends { probed: unready, trusted: ready, cluster_ip: None, subset, tls, pod_names }
            }
        }
    }

    /// With system-internal TLS, where a revision's pods take TLS: the port named `https` of each
    /// pod's Endpoints subset (queue-proxy's 8112), and the private Service's `https` port (443)
    /// for its ClusterIP, as upstream's `useSecurePort`.
    fn tls_ports(&self, key: &Key, rev: &RevisionInfo) -> TlsPorts {
        let mut ports = self.private_endpoints.get(key).map(|e| e.tls_ports.clone()).unwrap_or_default();
        if let Some(service) = self.private_services.get(key)
            && let Some(port) = service.ports.get(rev.port_name())
        {
            let https = service.ports.get("https").copied().unwrap_or(crate::tls::SERVICE_TLS_PORT);
            ports.insert(SocketAddr::new(service.cluster_ip, *port), https);
        }
        TlsPorts { namespace: rev.namespace.clone(), ports }
    }

    /// Where this activator stands among the activators in a revision's path, by upstream's
    /// rule: the addresses on the revision's port sorted as strings; none if this pod is not one.
    fn subset(&self, key: &Key, port: &str) -> Option<Subset> {
        let me = self.pod_ip?.to_string();
        let mut activators: Vec<String> =
            self.public_endpoints.get(key)?.get(port)?.iter().map(IpAddr::to_string).collect();
        activators.sort();
        activators.dedup();
        let index = activators.iter().position(|ip| *ip == me)?;
        Some(Subset { index, count: activators.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{RevisionConfig, TagSpec};
    use std::time::Duration;

    fn revision(ns: &str, name: &str, configuration: &str) -> RevisionInfo {
        RevisionInfo {
            namespace: ns.into(),
            name: name.into(),
            service: Some(configuration.into()),
            configuration: Some(configuration.into()),
            config: RevisionConfig {
                container_concurrency: 1,
                timeout: Duration::from_secs(300),
                response_start_timeout: None,
                idle_timeout: None,
            },
            annotations: Annotations::new(),
            h2c: false,
            probe_optimisation: true,
        }
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.into(), name.into())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn reflection() -> Reflection {
        let mut r = Reflection::default();
        for (name, configuration) in [("a-1", "a"), ("a-2", "a"), ("a-3", "a"), ("b-1", "b"), ("lone-1", "lone")] {
            r.revisions.insert(key("ns", name), revision("ns", name, configuration));
        }
        let route = |name: &str, traffic: &[(&str, u32)]| RouteInfo {
            namespace: "ns".into(),
            name: name.into(),
            service: Some(name.into()),
            traffic: traffic.iter().map(|(r, p)| ((*r).to_owned(), *p)).collect(),
            tags: [("canary", "a-3"), ("old", "a-gone")]
                .iter()
                .filter(|(_, r)| traffic.iter().any(|(t, _)| t == r))
                .map(|(tag, r)| TagSpec { tag: (*tag).into(), revision: (*r).into(), host_label: None })
                .collect(),
            hosts: vec![format!("{name}.ns.example.com")],
        };
        r.routes = Some(
            [
                (key("ns", "a"), route("a", &[("a-2", 90), ("a-3", 10), ("a-gone", 0)])),
                (key("ns", "b"), route("b", &[("b-1", 100)])),
                // A Route of its own over a's and b's revisions, and one with no traffic yet.
                (key("ns", "preview"), route("preview", &[("a-3", 50), ("b-1", 50)])),
                (key("ns", "empty"), route("empty", &[])),
            ]
            .into(),
        );
        r.services =
            Some([(key("ns", "a"), [("activator.knative.dev/sticky-ttl".to_owned(), "5m".to_owned())].into())].into());
        r
    }

    #[test]
    fn one_service_per_route_at_its_hosts_and_one_per_revision_no_route_lists() {
        let world = reflection().world();
        type Summary<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, u32)>);
        let names: Vec<Summary> = world
            .services
            .iter()
            .map(|s| {
                let revisions = s.revisions.iter().map(|r| r.name.as_str()).collect();
                let traffic = s.traffic.iter().map(|t| (t.revision.as_str(), t.percent)).collect();
                (s.name.as_str(), revisions, traffic)
            })
            .collect();
        assert_eq!(
            names,
            [
                ("a", vec!["a-2", "a-3"], vec![("a-2", 90), ("a-3", 10)]),
                ("b", vec!["b-1"], vec![("b-1", 100)]),
                ("preview", vec!["a-3", "b-1"], vec![("a-3", 50), ("b-1", 50)]),
                ("a-1", vec!["a-1"], vec![("a-1", 100)]),
                ("lone-1", vec!["lone-1"], vec![("lone-1", 100)]),
            ],
            "a revision not seen yet is left out; one no Route lists is served as named; a Route with no \
             traffic is none"
        );
        assert_eq!(world.services[0].hosts, ["a.ns.example.com"]);
        // Annotations are each revision's own Knative Service's, whichever Route lists it.
        let of = |svc: usize, rev: usize| {
            world.services[svc].revisions[rev].annotations.get("activator.knative.dev/sticky-ttl").cloned()
        };
        assert_eq!((of(0, 1), of(2, 0), of(2, 1)), (Some("5m".into()), Some("5m".into()), None));
        assert!(world.services.iter().all(|s| s.annotations.is_empty()));
        assert_eq!(crate::spec::validate(&world), Ok(()), "a revision two Routes list is described alike");
        let tags: Vec<(&str, &str)> =
            world.services[0].tags.iter().map(|t| (t.tag.as_str(), t.revision.as_str())).collect();
        assert_eq!(tags, [("canary", "a-3")], "a tag of a revision not seen yet is left out with it");
        assert!(world.services.iter().all(|s| crate::spec::validate_service(s).is_ok()));
    }

    #[test]
    fn without_routes_every_revision_is_served_as_named() {
        let mut r = reflection();
        r.routes = None;
        r.services = None;
        let world = r.world();
        assert_eq!(world.services.len(), 5);
        assert!(world.services.iter().all(|s| s.revisions.len() == 1 && s.name == s.revisions[0].name));
    }

    #[test]
    fn pods_follow_the_mesh_mode_and_the_probe_optimisation() {
        let mut r = reflection();
        let ready = vec![addr("10.0.0.1:8012"), addr("10.0.0.2:8012")];
        let not_ready = vec![addr("10.0.0.3:8012")];
        r.private_endpoints.insert(
            key("ns", "a-2"),
            EndpointsInfo {
                revision: "a-2".into(),
                ready: [("http".to_owned(), ready.clone())].into(),
                not_ready: [("http".to_owned(), not_ready.clone())].into(),
                tls_ports: BTreeMap::new(),
                pod_names: BTreeMap::new(),
            },
        );
        r.private_services.insert(
            key("ns", "a-2"),
            ServiceInfo {
                revision: "a-2".into(),
                cluster_ip: "10.96.0.9".parse().unwrap(),
                ports: [("http".to_owned(), 80)].into(),
            },
        );
        let rev = r.revisions[&key("ns", "a-2")].clone();
        let auto = r.backends(&rev);
        assert_eq!((auto.probed.len(), auto.trusted.len()), (3, 0), "auto: every pod is probed");
        assert_eq!(auto.cluster_ip, Some(ClusterIp { addr: addr("10.96.0.9:80"), always: false, ready_pods: 2 }));
        r.network.mesh = MeshMode::Disabled;
        let disabled = r.backends(&rev);
        assert_eq!((disabled.trusted, disabled.probed, disabled.cluster_ip), (ready.clone(), not_ready, None));
        r.network.mesh = MeshMode::Enabled;
        assert!(r.backends(&rev).cluster_ip.is_some_and(|c| c.always));
        let strict = RevisionInfo { probe_optimisation: false, ..rev.clone() };
        r.network.mesh = MeshMode::Disabled;
        assert!(r.backends(&strict).probed.is_empty(), "without the optimisation only Kubernetes-ready pods count");
        r.network = NetworkConfig { mesh: MeshMode::Auto, passthrough: true, internal_tls: false };
        assert_eq!(r.backends(&rev).cluster_ip, None, "passthrough never falls back to the Service");
        let spec = r.revision_spec(&rev);
        assert_eq!(spec.host, HostRewrite::Passthrough("a-2-private.ns".into()));
        let h2c = RevisionInfo { h2c: true, ..rev };
        assert!(r.backends(&h2c).probed.is_empty(), "an h2c revision's pods are on the port named http2");
    }

    #[test]
    fn the_subset_is_this_pods_place_among_the_activators() {
        let mut r = reflection();
        let activators: Vec<IpAddr> = ["10.1.0.9", "10.1.0.10", "10.1.0.2"].map(|ip| ip.parse().unwrap()).to_vec();
        r.public_endpoints.insert(key("ns", "a-2"), [("http".to_owned(), activators)].into());
        let rev = r.revisions[&key("ns", "a-2")].clone();
        assert_eq!(r.backends(&rev).subset, None, "no POD_IP: every pod");
        r.pod_ip = Some("10.1.0.2".parse().unwrap());
        // Sorted as strings: 10.1.0.10, 10.1.0.2, 10.1.0.9.
        assert_eq!(r.backends(&rev).subset, Some(Subset { index: 1, count: 3 }));
        r.pod_ip = Some("10.1.0.77".parse().unwrap());
        assert_eq!(r.backends(&rev).subset, None, "not in this revision's path: every pod");
    }
}
