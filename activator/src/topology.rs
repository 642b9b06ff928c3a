//! The world view: services, their traffic split, and their revisions with the endpoints that may
//! receive traffic, as one immutable [`Snapshot`] that the request path reads without locking.
//!
//! Owns the local topology file format: parsing, validation (errors name the line and column, or
//! the offending entry), and building snapshots that carry each revision's long-lived state
//! (throttler, metric handles) over from the previous snapshot. Must not do file or network I/O
//! and must not hold per-request state: in-flight counts and queues live in `throttle`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::affinity::{Annotated, Policy};
use crate::autoscaler::Concurrency;
use crate::pins::Lifetime;
use crate::readiness::Prober;
use crate::stats::{RevisionStats, Stats};
use crate::throttle::{Probe, QueueLimits, Throttler};

/// Knative's default `timeoutSeconds`.
const DEFAULT_TIMEOUT_SECONDS: u64 = 300;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub name: String,
    /// Host names (without port) that reach this service. Empty means
    /// `<name>.<namespace>.svc.cluster.local`.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub traffic: Vec<TrafficSpec>,
    pub revisions: Vec<RevisionSpec>,
    /// Service-level annotations; a revision's own annotations take precedence.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSpec {
    pub revision: String,
    pub percent: u32,
    #[serde(default)]
    pub tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevisionSpec {
    pub name: String,
    /// Requests a pod may hold at once; 0 means unlimited.
    #[serde(default)]
    pub container_concurrency: u32,
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// How a new endpoint proves it is ready: `http` (GET `probePath` answers 2xx), `queue`
    /// (Knative's queue-proxy probe on `probePath`) or `none` (trusted at once).
    #[serde(default)]
    pub probe: ProbeKind,
    #[serde(default = "default_probe_path")]
    pub probe_path: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Http,
    Queue,
    None,
}

impl RevisionSpec {
    fn probe(&self) -> Probe {
        match self.probe {
            ProbeKind::Http => Probe::Http { path: self.probe_path.clone() },
            ProbeKind::Queue => Probe::Queue { path: self.probe_path.clone() },
            ProbeKind::None => Probe::None,
        }
    }
}

/// Endpoints published apart from the topology (by `autoscaler-shim`'s process backend):
/// `<namespace>/<revision>: [ip:port, …]`, added to the revision's own.
pub type EndpointsFile = BTreeMap<String, Vec<SocketAddr>>;

/// Parses an endpoints file; an empty file means no extra endpoints.
pub fn parse_endpoints(text: &str) -> Result<EndpointsFile, TopologyError> {
    if text.trim().is_empty() {
        return Ok(EndpointsFile::new());
    }
    serde_yaml_ng::from_str(text)
        .map_err(|e| TopologyError { location: e.location().map(|l| (l.line(), l.column())), message: e.to_string() })
}

fn default_probe_path() -> String {
    "/healthz".to_owned()
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_timeout_seconds() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

/// Why a topology file was rejected.
#[derive(Debug, PartialEq, Eq)]
pub struct TopologyError {
    /// 1-based line and column, when the problem is at one place in the text.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) if !self.message.contains(&format!("line {line} column {column}")) => {
                write!(f, "line {line} column {column}: {}", self.message)
            }
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for TopologyError {}

impl TopologyError {
    fn semantic(service: &ServiceSpec, message: impl fmt::Display) -> Self {
        let message = format!("service {}/{}: {message}", service.namespace, service.name);
        TopologyError { location: None, message }
    }
}

/// Parses and validates a topology file.
pub fn parse(text: &str) -> Result<TopologyFile, TopologyError> {
    let file: TopologyFile = serde_yaml_ng::from_str(text).map_err(|e| TopologyError {
        location: e.location().map(|l| (l.line(), l.column())),
        message: e.to_string(),
    })?;
    validate(&file)?;
    Ok(file)
}

fn validate(file: &TopologyFile) -> Result<(), TopologyError> {
    let mut services = HashSet::new();
    let mut hosts = HashMap::new();
    let mut revisions = HashSet::new();
    for svc in &file.services {
        if svc.name.is_empty() || svc.namespace.is_empty() {
            return Err(TopologyError::semantic(svc, "name and namespace must not be empty"));
        }
        if !services.insert((&svc.namespace, &svc.name)) {
            return Err(TopologyError::semantic(svc, "defined twice"));
        }
        for host in service_hosts(svc) {
            if let Some(other) = hosts.insert(host.clone(), (&svc.namespace, &svc.name)) {
                let (ns, name) = other;
                return Err(TopologyError::semantic(svc, format!("host {host} is already used by {ns}/{name}")));
            }
        }
        let mut own = HashSet::new();
        for rev in &svc.revisions {
            if rev.name.is_empty() {
                return Err(TopologyError::semantic(svc, "a revision has an empty name"));
            }
            if !revisions.insert((&svc.namespace, &rev.name)) {
                return Err(TopologyError::semantic(
                    svc,
                    format!("revision {} is defined more than once in namespace {}", rev.name, svc.namespace),
                ));
            }
            own.insert(rev.name.as_str());
            if rev.timeout_seconds == 0 {
                return Err(TopologyError::semantic(svc, format!("revision {}: timeoutSeconds must be > 0", rev.name)));
            }
            if !rev.probe_path.starts_with('/') {
                return Err(TopologyError::semantic(
                    svc,
                    format!("revision {}: probePath must start with /", rev.name),
                ));
            }
            let unique: HashSet<_> = rev.endpoints.iter().collect();
            if unique.len() != rev.endpoints.len() {
                return Err(TopologyError::semantic(
                    svc,
                    format!("revision {}: an endpoint is listed twice", rev.name),
                ));
            }
        }
        if svc.traffic.is_empty() {
            return Err(TopologyError::semantic(svc, "traffic must list at least one revision"));
        }
        let mut total = 0u64;
        for target in &svc.traffic {
            if !own.contains(target.revision.as_str()) {
                return Err(TopologyError::semantic(
                    svc,
                    format!("traffic names revision {}, which is not in this service's revisions", target.revision),
                ));
            }
            total += u64::from(target.percent);
        }
        if total != 100 {
            return Err(TopologyError::semantic(svc, format!("traffic percents add up to {total}, not 100")));
        }
    }
    Ok(())
}

fn service_hosts(svc: &ServiceSpec) -> Vec<String> {
    if svc.hosts.is_empty() {
        vec![format!("{}.{}.svc.cluster.local", svc.name, svc.namespace)]
    } else {
        svc.hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
    }
}

/// A revision as the request path sees it.
pub struct Revision {
    pub namespace: String,
    pub service: String,
    pub name: String,
    pub container_concurrency: u32,
    pub timeout: Duration,
    /// The activator's annotations of the revision over those of its service.
    pub affinity: Annotated,
    pub throttler: Arc<Throttler>,
    pub stats: Arc<RevisionStats>,
    pub concurrency: Arc<Concurrency>,
}

pub struct TrafficTarget {
    pub revision: Arc<Revision>,
    pub percent: u32,
}

pub struct Service {
    pub namespace: String,
    pub name: String,
    pub traffic: Vec<TrafficTarget>,
    /// How requests to this service carry session and flow ids.
    pub affinity: Policy,
}

impl Service {
    /// The weighted split: `roll` is uniform in `0..100`. Targets at 0 % are never chosen.
    pub fn split(&self, roll: u32) -> &Arc<Revision> {
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

    /// Whether `revision` is listed in the traffic at any percent (a valid affinity target).
    pub fn routes_to(&self, revision: &str) -> Option<&Arc<Revision>> {
        self.traffic.iter().find(|t| t.revision.name == revision).map(|t| &t.revision)
    }

    /// How long pins into `revision` live; pins into a revision that left the traffic are
    /// replaced on their next use, so the default serves them.
    pub fn lifetime_of(&self, revision: &str) -> Lifetime {
        self.routes_to(revision).map_or_else(|| Annotated::default().lifetime(), |r| r.affinity.lifetime())
    }
}

/// What everything else needs to turn a validated file into a snapshot.
pub struct Builder<'a> {
    pub stats: &'a Stats,
    pub queue: QueueLimits,
    pub prober: &'a Prober,
}

/// One immutable view of the world, swapped whole on every change.
#[derive(Default)]
pub struct Snapshot {
    by_host: HashMap<String, Arc<Service>>,
    by_revision: HashMap<(String, String), (Arc<Service>, Arc<Revision>)>,
}

impl Snapshot {
    /// Builds a snapshot, keeping each surviving revision's throttler and metrics from `previous`
    /// so in-flight counts and queues outlive the reload.
    pub fn build(file: &TopologyFile, endpoints: &EndpointsFile, previous: &Snapshot, with: &Builder<'_>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for spec in &file.services {
            let rejected = |scope: String| {
                move |key: &str, reason: String| {
                    with.stats.annotation_error(key);
                    tracing::warn!(%scope, annotation = key, %reason, "ignoring annotation");
                }
            };
            let service_scope = format!("service {}/{}", spec.namespace, spec.name);
            let service_affinity = Annotated::parse(&spec.annotations, &mut rejected(service_scope));
            let mut revisions = HashMap::new();
            for rev in &spec.revisions {
                let key = (spec.namespace.clone(), rev.name.clone());
                let reused = previous.by_revision.get(&key).map(|(_, r)| r).filter(|r| r.service == spec.name);
                let (throttler, stats, concurrency) = match reused {
                    Some(r) => {
                        r.throttler.set_container_concurrency(rev.container_concurrency);
                        (r.throttler.clone(), r.stats.clone(), r.concurrency.clone())
                    }
                    None => {
                        let stats = with.stats.revision(&spec.namespace, &spec.name, &rev.name);
                        let throttler =
                            Throttler::new(rev.container_concurrency, with.queue.clone(), stats.queued.clone());
                        let concurrency = Concurrency::new(&spec.namespace, &rev.name, stats.in_flight.clone());
                        (Arc::new(throttler), stats, Arc::new(concurrency))
                    }
                };
                let mut candidates = rev.endpoints.clone();
                let published = endpoints.get(&format!("{}/{}", spec.namespace, rev.name));
                candidates.extend(published.into_iter().flatten().filter(|a| !rev.endpoints.contains(a)));
                if throttler.set_candidates(&candidates, rev.probe()) {
                    with.prober.watch(throttler.clone());
                }
                let revision_scope = format!("revision {}/{}", spec.namespace, rev.name);
                let affinity =
                    Annotated::parse(&rev.annotations, &mut rejected(revision_scope)).over(&service_affinity);
                let revision = Arc::new(Revision {
                    namespace: spec.namespace.clone(),
                    service: spec.name.clone(),
                    name: rev.name.clone(),
                    container_concurrency: rev.container_concurrency,
                    timeout: Duration::from_secs(rev.timeout_seconds),
                    affinity,
                    throttler,
                    stats,
                    concurrency,
                });
                revisions.insert(rev.name.as_str(), revision);
            }
            let traffic: Vec<TrafficTarget> = spec
                .traffic
                .iter()
                .map(|t| TrafficTarget { revision: revisions[t.revision.as_str()].clone(), percent: t.percent })
                .collect();
            let affinity = Policy::new(&spec.namespace, &spec.name, traffic.iter().map(|t| &t.revision.affinity));
            let service =
                Arc::new(Service { namespace: spec.namespace.clone(), name: spec.name.clone(), traffic, affinity });
            for host in service_hosts(spec) {
                snapshot.by_host.insert(host, service.clone());
            }
            for (name, revision) in revisions {
                snapshot.by_revision.insert((spec.namespace.clone(), name.to_owned()), (service.clone(), revision));
            }
        }
        snapshot
    }

    /// The service reached by a `Host` header or `:authority` (port and case ignored).
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        let name = strip_port(host);
        match self.by_host.get(name) {
            Some(svc) => Some(svc),
            None if name.bytes().any(|b| b.is_ascii_uppercase()) => self.by_host.get(&name.to_ascii_lowercase()),
            None => None,
        }
    }

    /// A revision named by the ingress (`Knative-Serving-Namespace` / `-Revision`) and its service.
    pub fn revision(&self, namespace: &str, name: &str) -> Option<&(Arc<Service>, Arc<Revision>)> {
        self.by_revision.get(&(namespace.to_owned(), name.to_owned()))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a trailing :port.
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_REVISIONS: &str = r#"
services:
  - name: counter
    hosts: [counter.example.com]
    traffic:
      - revision: counter-1
        percent: 30
      - revision: counter-2
        percent: 70
        tag: next
      - revision: counter-3
        percent: 0
    revisions:
      - name: counter-1
        endpoints: ["127.0.0.1:9001"]
      - name: counter-2
        containerConcurrency: 2
        timeoutSeconds: 5
        annotations: {a: b}
        endpoints: ["127.0.0.1:9002", "127.0.0.1:9003"]
      - name: counter-3
"#;

    fn snapshot(text: &str) -> Snapshot {
        let stats = Stats::new();
        let prober = Prober::idle();
        let with = Builder { stats: &stats, queue: QueueLimits::default(), prober: &prober };
        Snapshot::build(&parse(text).unwrap(), &EndpointsFile::new(), &Snapshot::default(), &with)
    }

    #[test]
    fn parses_a_full_file() {
        let file = parse(TWO_REVISIONS).unwrap();
        let svc = &file.services[0];
        assert_eq!(svc.namespace, "default");
        assert_eq!(svc.traffic[1].tag.as_deref(), Some("next"));
        assert_eq!(svc.revisions[1].container_concurrency, 2);
        assert_eq!(svc.revisions[0].timeout_seconds, DEFAULT_TIMEOUT_SECONDS);
        assert_eq!(svc.revisions[1].endpoints.len(), 2);
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let err = parse("services:\n  - name: x\n    traffic: [\n").unwrap_err();
        assert!(err.location.is_some(), "{err}");
        let err = parse("services:\n  - name: x\n    bogus: 1\n").unwrap_err();
        assert_eq!(err.location.map(|l| l.0), Some(3), "{err}");
        assert!(err.message.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_endpoints_are_located() {
        let text = TWO_REVISIONS.replace("127.0.0.1:9003", "not-an-address");
        let err = parse(&text).unwrap_err();
        let line = text.lines().position(|l| l.contains("not-an-address")).unwrap() + 1;
        assert_eq!(err.location.map(|l| l.0), Some(line), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_service() {
        let cases = [
            (TWO_REVISIONS.replace("percent: 70", "percent: 60"), "add up to 90"),
            (TWO_REVISIONS.replace("- revision: counter-3", "- revision: nope"), "nope"),
            (TWO_REVISIONS.replace("timeoutSeconds: 5", "timeoutSeconds: 0"), "timeoutSeconds"),
            (TWO_REVISIONS.replace("127.0.0.1:9003", "127.0.0.1:9002"), "listed twice"),
            (TWO_REVISIONS.replace("traffic:\n", "traffic: []\n    x:\n"), "unknown field"),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn duplicate_hosts_and_services_are_rejected() {
        let twice = format!("{TWO_REVISIONS}{}", TWO_REVISIONS.replace("services:\n", ""));
        assert!(parse(&twice).unwrap_err().to_string().contains("defined twice"));
        let other = TWO_REVISIONS.replace("services:\n", "").replace("name: counter\n", "name: other\n");
        let other = other.replace("counter-", "other-");
        let both = format!("{TWO_REVISIONS}{other}");
        assert!(parse(&both).unwrap_err().to_string().contains("already used"));
    }

    #[test]
    fn host_lookup_ignores_port_and_case() {
        let s = snapshot(TWO_REVISIONS);
        assert!(s.service_for_host("counter.example.com").is_some());
        assert!(s.service_for_host("Counter.Example.COM:8080").is_some());
        assert!(s.service_for_host("other.example.com").is_none());
        assert!(s.service_for_host("").is_none());
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn split_follows_percents_and_skips_zero() {
        let s = snapshot(TWO_REVISIONS);
        let svc = s.service_for_host("counter.example.com").unwrap();
        let picks: Vec<_> = (0..100).map(|r| svc.split(r).name.as_str()).collect();
        assert_eq!(picks.iter().filter(|n| **n == "counter-1").count(), 30);
        assert_eq!(picks.iter().filter(|n| **n == "counter-2").count(), 70);
        assert_eq!(svc.split(1000).name, "counter-2");
        assert!(svc.routes_to("counter-3").is_some(), "0 % is still a valid target");
    }

    #[test]
    fn published_endpoints_join_the_revisions_own() {
        let stats = Stats::new();
        let prober = Prober::idle();
        let with = Builder { stats: &stats, queue: QueueLimits::default(), prober: &prober };
        let text = TWO_REVISIONS.replace("      - name: counter-1\n", "      - name: counter-1\n        probe: none\n");
        let published = parse_endpoints("default/counter-1: [\"127.0.0.1:9005\", \"127.0.0.1:9001\"]\n").unwrap();
        let s = Snapshot::build(&parse(&text).unwrap(), &published, &Snapshot::default(), &with);
        let ready: Vec<_> =
            s.revision("default", "counter-1").unwrap().1.throttler.ready().iter().map(|p| p.addr).collect();
        assert_eq!(ready, ["127.0.0.1:9001".parse().unwrap(), "127.0.0.1:9005".parse().unwrap()]);
        let probed = &s.revision("default", "counter-2").unwrap().1.throttler;
        assert!(probed.ready().is_empty(), "endpoints wait for their probe by default");
        assert_eq!(probed.pending().1.len(), 2);
        assert!(parse_endpoints("").unwrap().is_empty());
        assert!(parse_endpoints("x: [nope]").unwrap_err().location.is_some());
    }

    #[test]
    fn revision_annotations_override_the_service() {
        let text = TWO_REVISIONS
            .replace("    hosts:", "    annotations: {activator.knative.dev/sticky-ttl: 60s}\n    hosts:")
            .replace("annotations: {a: b}", "annotations: {activator.knative.dev/sticky-ttl: 5s, x: y}");
        let s = snapshot(&text);
        let ttl = |rev: &str| s.revision("default", rev).unwrap().1.affinity.lifetime().ttl;
        assert_eq!(ttl("counter-2"), Duration::from_secs(5));
        assert_eq!(ttl("counter-1"), Duration::from_secs(60));
    }

    #[test]
    fn reload_keeps_revision_state() {
        let stats = Stats::new();
        let prober = Prober::idle();
        let with = Builder { stats: &stats, queue: QueueLimits::default(), prober: &prober };
        let none = EndpointsFile::new();
        let first = Snapshot::build(&parse(TWO_REVISIONS).unwrap(), &none, &Snapshot::default(), &with);
        let second = Snapshot::build(&parse(TWO_REVISIONS).unwrap(), &none, &first, &with);
        let a = &first.revision("default", "counter-2").unwrap().1;
        let b = &second.revision("default", "counter-2").unwrap().1;
        assert!(Arc::ptr_eq(&a.throttler, &b.throttler));
        let changed = TWO_REVISIONS.replace("containerConcurrency: 2", "containerConcurrency: 3");
        let third = Snapshot::build(&parse(&changed).unwrap(), &none, &second, &with);
        let c = &third.revision("default", "counter-2").unwrap().1;
        assert!(Arc::ptr_eq(&b.throttler, &c.throttler), "a new containerConcurrency keeps the throttler");
        assert_eq!(c.container_concurrency, 3);
    }
}
