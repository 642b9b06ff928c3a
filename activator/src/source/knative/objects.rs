//! Reading Knative's and Kubernetes' objects, one pure function per kind: what the activator
//! needs of a Revision, a Route, a Knative Service, a revision's private or public Endpoints, its
//! private Service, and the `config-network` ConfigMap. Field and label names are upstream's.
//!
//! An object whose fields have the wrong types (or that lacks what identifies it) is an error
//! naming the field; the caller skips it. Must not decide anything about the world.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kube::api::DynamicObject;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::go;
use crate::spec::{self, DEFAULT_TIMEOUT, RevisionConfig, TagSpec};

pub(crate) const SERVICE_LABEL: &str = "serving.knative.dev/service";
pub(crate) const CONFIGURATION_LABEL: &str = "serving.knative.dev/configuration";
pub(crate) const REVISION_LABEL: &str = "serving.knative.dev/revision";

/// Namespace and name.
pub(crate) type Key = (String, String);

pub(crate) type Annotations = BTreeMap<String, String>;

/// What the activator needs of a Revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RevisionInfo {
    pub namespace: String,
    pub name: String,
    /// The Knative Service and Configuration it belongs to, from its labels.
    pub service: Option<String>,
    pub configuration: Option<String>,
    pub config: RevisionConfig,
    pub annotations: Annotations,
    /// Its first container port is named `h2c`: its pods are reached on the port named `http2`.
    pub h2c: bool,
    /// A pod may take traffic once it passes the activator's probe, before Kubernetes reports it
    /// ready; not so with an exec readiness probe or a startup probe, which only the kubelet runs.
    pub probe_optimisation: bool,
}

impl RevisionInfo {
    /// The port name its pods and its Services are reached on.
    pub(crate) fn port_name(&self) -> &'static str {
        if self.h2c { "http2" } else { "http" }
    }
}

/// What the activator needs of a Route: the traffic its controller reports, one entry per
/// revision (entries for one revision, as tags make, add up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RouteInfo {
    pub namespace: String,
    pub name: String,
    pub service: Option<String>,
    pub traffic: Vec<(String, u32)>,
    pub tags: Vec<TagSpec>,
    /// The hosts the ingress routes by this Route (lower case): its URL's, its cluster-local
    /// address's with the short forms Knative's ingress also answers (`<name>.<namespace>`,
    /// `<name>.<namespace>.svc`), and each tag's, public and cluster-local.
    pub hosts: Vec<String>,
}

/// Pod addresses by port name.
pub(crate) type Ports<T> = BTreeMap<String, Vec<T>>;

/// A revision's private Endpoints: its pods, ready or not, by port name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EndpointsInfo {
    pub revision: String,
    pub ready: Ports<SocketAddr>,
    pub not_ready: Ports<SocketAddr>,
    /// Each pod's TLS port (the port named `https`, queue-proxy's 8112), by every other address
    /// of the pod in the same subset.
    pub tls_ports: BTreeMap<SocketAddr, u16>,
    /// The Pod behind each address, from its `targetRef`.
    pub pod_names: BTreeMap<SocketAddr, String>,
}

/// A revision's private Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceInfo {
    pub revision: String,
    pub cluster_ip: IpAddr,
    pub ports: BTreeMap<String, u16>,
}

/// How `config-network` says pods are reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum MeshMode {
    /// Pods are probed directly; the private Service is used if only it answers.
    #[default]
    Auto,
    /// Always through the private Service.
    Enabled,
    /// Always pods directly; ready ones are trusted without a probe.
    Disabled,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NetworkConfig {
    pub mesh: MeshMode,
    /// `enable-mesh-pod-addressability`: pods are addressed through the mesh by a passthrough host.
    pub passthrough: bool,
    /// `system-internal-tls` asked for; not served here.
    pub internal_tls: bool,
}

/// An object's namespace and name.
pub(crate) fn identity(obj: &DynamicObject) -> Result<Key, String> {
    let namespace = obj.metadata.namespace.clone().filter(|n| !n.is_empty()).ok_or("metadata.namespace is missing")?;
    let name = obj.metadata.name.clone().filter(|n| !n.is_empty()).ok_or("metadata.name is missing")?;
    Ok((namespace, name))
}

/// The namespace and revision an Endpoints or Service of a revision's is labelled with.
pub(crate) fn revision_key(obj: &DynamicObject) -> Result<Key, String> {
    let (namespace, _) = identity(obj)?;
    let revision = label(obj, REVISION_LABEL).ok_or(format!("label {REVISION_LABEL} is missing"))?;
    Ok((namespace, revision))
}

fn label(obj: &DynamicObject, key: &str) -> Option<String> {
    obj.metadata.labels.as_ref()?.get(key).filter(|v| !v.is_empty()).cloned()
}

/// One part of the object's body, in the shape `T` gives it.
fn part<T: DeserializeOwned + Default>(obj: &DynamicObject, field: &str) -> Result<T, String> {
    match obj.data.get(field) {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(value) => T::deserialize(value).map_err(|e| format!("{field}: {e}")),
    }
}

/// A timeout field: unset or 0 is off, longer than a year is clamped (`spec::timeout_seconds`).
fn seconds(value: Option<i64>, field: &str) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(None),
        Some(s) => u64::try_from(s).map(spec::timeout_seconds).map_err(|_| format!("spec.{field} is negative: {s}")),
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RevisionSpecFields {
    container_concurrency: Option<i64>,
    timeout_seconds: Option<i64>,
    response_start_timeout_seconds: Option<i64>,
    idle_timeout_seconds: Option<i64>,
    #[serde(default)]
    containers: Vec<ContainerFields>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerFields {
    #[serde(default)]
    ports: Vec<NamedPort>,
    readiness_probe: Option<ProbeFields>,
    startup_probe: Option<serde_json::Value>,
}

#[derive(Default, Deserialize)]
struct NamedPort {
    name: Option<String>,
}

#[derive(Default, Deserialize)]
struct ProbeFields {
    exec: Option<serde_json::Value>,
}

pub(crate) fn revision(obj: &DynamicObject) -> Result<RevisionInfo, String> {
    let (namespace, name) = identity(obj)?;
    let spec: RevisionSpecFields = part(obj, "spec")?;
    let container_concurrency = match spec.container_concurrency {
        None => 0,
        Some(cc) => u32::try_from(cc).map_err(|_| format!("spec.containerConcurrency is out of range: {cc}"))?,
    };
    let timeout = seconds(spec.timeout_seconds, "timeoutSeconds")?.unwrap_or(DEFAULT_TIMEOUT);
    // The serving container is the one that declares ports (upstream's GetContainer).
    let serving = spec.containers.iter().find(|c| !c.ports.is_empty()).or(spec.containers.first());
    let h2c = serving.and_then(|c| c.ports.first()).and_then(|p| p.name.as_deref()) == Some("h2c");
    let exec_readiness = serving.and_then(|c| c.readiness_probe.as_ref()).is_some_and(|p| p.exec.is_some());
    let startup_probe = spec.containers.iter().any(|c| c.startup_probe.is_some());
    Ok(RevisionInfo {
        service: label(obj, SERVICE_LABEL),
        configuration: label(obj, CONFIGURATION_LABEL),
        config: RevisionConfig {
            container_concurrency,
            timeout,
            response_start_timeout: seconds(spec.response_start_timeout_seconds, "responseStartTimeoutSeconds")?,
            idle_timeout: seconds(spec.idle_timeout_seconds, "idleTimeoutSeconds")?,
        },
        annotations: obj.metadata.annotations.clone().unwrap_or_default(),
        h2c,
        probe_optimisation: !exec_readiness && !startup_probe,
        namespace,
        name,
    })
}

#[derive(Default, Deserialize)]
struct RouteStatus {
    #[serde(default)]
    traffic: Vec<TrafficTarget>,
    url: Option<String>,
    address: Option<Addressable>,
}

#[derive(Default, Deserialize)]
struct Addressable {
    url: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrafficTarget {
    revision_name: Option<String>,
    percent: Option<i64>,
    tag: Option<String>,
    url: Option<String>,
}

/// A Route as its controller reports it in `status`, which is what the ingress has been
/// programmed with (a spec not reconciled yet routes nothing).
pub(crate) fn route(obj: &DynamicObject) -> Result<RouteInfo, String> {
    let (namespace, name) = identity(obj)?;
    let status: RouteStatus = part(obj, "status")?;
    let mut hosts = Vec::new();
    let cluster_local = status.address.as_ref().and_then(|a| a.url.as_deref()).and_then(url_host);
    // The cluster's domain, as the Route's own cluster-local address spells it.
    let domain = cluster_local.as_deref().and_then(|h| h.strip_prefix(&format!("{name}.{namespace}.svc.")));
    let local_forms = |label: &str, hosts: &mut Vec<String>| {
        hosts.push(format!("{label}.{namespace}"));
        hosts.push(format!("{label}.{namespace}.svc"));
        if let Some(domain) = domain {
            hosts.push(format!("{label}.{namespace}.svc.{domain}"));
        }
    };
    hosts.extend(status.url.as_deref().and_then(url_host));
    hosts.extend(cluster_local.clone());
    local_forms(&name, &mut hosts);
    let mut traffic: Vec<(String, u32)> = Vec::new();
    let mut tags = Vec::new();
    for target in status.traffic {
        let Some(revision) = target.revision_name.filter(|r| !r.is_empty()) else { continue };
        if let Some(tag) = target.tag.filter(|t| !t.is_empty()) {
            let host_label = target.url.as_deref().and_then(host_label);
            hosts.extend(target.url.as_deref().and_then(url_host));
            if let Some(label) = &host_label {
                local_forms(label, &mut hosts);
            }
            tags.push(TagSpec { tag, revision: revision.clone(), host_label });
        }
        let percent = match target.percent {
            None => 0,
            Some(p) => u32::try_from(p)
                .ok()
                .filter(|p| *p <= 100)
                .ok_or(format!("status.traffic percent {p} is not 0 to 100"))?,
        };
        match traffic.iter_mut().find(|(r, _)| *r == revision) {
            Some((_, total)) => *total += percent,
            None => traffic.push((revision, percent)),
        }
    }
    // The Route's URL first: the host it is known by (`server.address`).
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    Ok(RouteInfo { service: label(obj, SERVICE_LABEL), namespace, name, traffic, tags, hosts })
}

/// The host of a URL, lower case, without its port.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => format!("[{}]", v6.split(']').next()?),
        None => authority.split(':').next()?.to_owned(),
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// The first DNS label of a URL's host: `canary-counter` of `http://canary-counter.ns.example.com`.
fn host_label(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let label = rest.split(['.', ':', '/']).next()?;
    (!label.is_empty()).then(|| label.to_ascii_lowercase())
}

/// A Knative Service's annotations, which its revisions' own override.
pub(crate) fn knative_service(obj: &DynamicObject) -> Result<(Key, Annotations), String> {
    Ok((identity(obj)?, obj.metadata.annotations.clone().unwrap_or_default()))
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Subset {
    #[serde(default)]
    addresses: Vec<Address>,
    #[serde(default)]
    not_ready_addresses: Vec<Address>,
    #[serde(default)]
    ports: Vec<EndpointPort>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Address {
    ip: String,
    target_ref: Option<TargetRef>,
}

#[derive(Default, Deserialize)]
struct TargetRef {
    kind: Option<String>,
    name: Option<String>,
}

#[derive(Default, Deserialize)]
struct EndpointPort {
    name: Option<String>,
    port: u16,
}

fn subsets(obj: &DynamicObject) -> Result<Vec<Subset>, String> {
    part(obj, "subsets")
}

fn ip(address: &Address) -> Result<IpAddr, String> {
    address.ip.parse().map_err(|_| format!("subsets: {:?} is not an IP address", address.ip))
}

/// A revision's private Endpoints (labelled with the revision).
pub(crate) fn private_endpoints(obj: &DynamicObject) -> Result<(Key, EndpointsInfo), String> {
    let key = revision_key(obj)?;
    let mut info = EndpointsInfo { revision: key.1.clone(), ..EndpointsInfo::default() };
    for subset in subsets(obj)? {
        let https = subset.ports.iter().find(|p| p.name.as_deref() == Some("https")).map(|p| p.port);
        for port in subset.ports.iter().filter_map(|p| Some((p.name.clone()?, p.port))) {
            for (addresses, into) in
                [(&subset.addresses, &mut info.ready), (&subset.not_ready_addresses, &mut info.not_ready)]
            {
                for address in addresses {
                    let addr = SocketAddr::new(ip(address)?, port.1);
                    into.entry(port.0.clone()).or_default().push(addr);
                    if let Some(TargetRef { kind: Some(kind), name: Some(name) }) = &address.target_ref
                        && kind == "Pod"
                    {
                        info.pod_names.insert(addr, name.clone());
                    }
                    if let Some(https) = https {
                        info.tls_ports.insert(addr, https);
                    }
                }
            }
        }
    }
    Ok((key, info))
}

/// A revision's public Endpoints: the activators in its path, by port name.
pub(crate) fn public_endpoints(obj: &DynamicObject) -> Result<(Key, Ports<IpAddr>), String> {
    let key = revision_key(obj)?;
    let mut activators: Ports<IpAddr> = BTreeMap::new();
    for subset in subsets(obj)? {
        for name in subset.ports.iter().filter_map(|p| p.name.clone()) {
            for address in &subset.addresses {
                activators.entry(name.clone()).or_default().push(ip(address)?);
            }
        }
    }
    Ok((key, activators))
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpecFields {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<EndpointPort>,
}

/// A revision's private Service; a headless one (no ClusterIP) is no way in and reads as none.
pub(crate) fn private_service(obj: &DynamicObject) -> Result<(Key, Option<ServiceInfo>), String> {
    let key = revision_key(obj)?;
    let spec: ServiceSpecFields = part(obj, "spec")?;
    let Some(cluster_ip) = spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None") else { return Ok((key, None)) };
    let cluster_ip = cluster_ip.parse().map_err(|_| format!("spec.clusterIP {cluster_ip:?} is not an IP address"))?;
    let ports = spec.ports.into_iter().filter_map(|p| Some((p.name?, p.port))).collect();
    Ok((key.clone(), Some(ServiceInfo { revision: key.1, cluster_ip, ports })))
}

/// A Secret's data, decoded from the base64 the API serves it in.
pub(crate) fn secret(obj: &DynamicObject) -> Result<(Key, BTreeMap<String, Vec<u8>>), String> {
    use base64::Engine as _;
    let encoded: BTreeMap<String, String> = part(obj, "data")?;
    let mut data = BTreeMap::new();
    for (key, value) in encoded {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.as_bytes())
            .map_err(|e| format!("data.{key} is not base64: {e}"))?;
        data.insert(key, decoded);
    }
    Ok((identity(obj)?, data))
}

/// A ConfigMap's data.
pub(crate) fn config_map(obj: &DynamicObject) -> Result<(Key, BTreeMap<String, String>), String> {
    Ok((identity(obj)?, part(obj, "data")?))
}

/// `config-network`, as upstream's `NewConfigFromMap` reads the keys the activator uses: a value
/// that does not parse fails the whole ConfigMap (the caller keeps the last good one), except
/// `mesh-compatibility-mode`, whose unknown values upstream ignores (reported through `warn`).
pub(crate) fn network_config(
    data: &BTreeMap<String, String>,
    warn: &mut dyn FnMut(String),
) -> Result<NetworkConfig, String> {
    let mesh = match data.get("mesh-compatibility-mode") {
        None => MeshMode::Auto,
        Some(v) if v.eq_ignore_ascii_case("auto") => MeshMode::Auto,
        Some(v) if v.eq_ignore_ascii_case("enabled") => MeshMode::Enabled,
        Some(v) if v.eq_ignore_ascii_case("disabled") => MeshMode::Disabled,
        Some(other) => {
            warn(format!("mesh-compatibility-mode {other:?} is not auto, enabled or disabled; using auto"));
            MeshMode::Auto
        }
    };
    let flag = |key: &str| match data.get(key) {
        None => Ok(false),
        Some(v) => go::parse_bool(v).ok_or_else(|| format!("{key} {v:?} is not a boolean (true, false, 1, 0, …)")),
    };
    let legacy = flag("internal-encryption")?;
    let internal_tls = match data.get("system-internal-tls").map(|v| v.to_ascii_lowercase()).as_deref() {
        // The deprecated key still turns it on while the new one says nothing or "disabled".
        None | Some("" | "disabled") => legacy,
        Some("enabled") => true,
        Some(_) => {
            return Err(format!("system-internal-tls {:?} is not enabled or disabled", data["system-internal-tls"]));
        }
    };
    Ok(NetworkConfig { mesh, passthrough: flag("enable-mesh-pod-addressability")?, internal_tls })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    fn revision_json(spec: serde_json::Value) -> DynamicObject {
        object(json!({
            "apiVersion": "serving.knative.dev/v1", "kind": "Revision",
            "metadata": {"name": "counter-00001", "namespace": "shop",
                         "labels": {SERVICE_LABEL: "counter", CONFIGURATION_LABEL: "counter"},
                         "annotations": {"activator.knative.dev/sticky-ttl": "60s"}},
            "spec": spec,
        }))
    }

    #[test]
    fn a_revision_gives_its_concurrency_timeouts_protocol_and_probing() {
        let rev = revision(&revision_json(json!({
            "containerConcurrency": 3, "timeoutSeconds": 30, "responseStartTimeoutSeconds": 10, "idleTimeoutSeconds": 0,
            "containers": [{"name": "sidecar"}, {"name": "app", "ports": [{"name": "h2c", "containerPort": 8080}]}],
        })))
        .unwrap();
        assert_eq!((rev.namespace.as_str(), rev.name.as_str()), ("shop", "counter-00001"));
        assert_eq!((rev.service.as_deref(), rev.configuration.as_deref()), (Some("counter"), Some("counter")));
        assert_eq!(rev.config.container_concurrency, 3);
        assert_eq!(
            (rev.config.timeout, rev.config.response_start_timeout, rev.config.idle_timeout),
            (Duration::from_secs(30), Some(Duration::from_secs(10)), None)
        );
        assert!(rev.h2c, "the serving container's first port is h2c");
        assert_eq!(rev.port_name(), "http2");
        assert!(rev.probe_optimisation);
        assert_eq!(rev.annotations["activator.knative.dev/sticky-ttl"], "60s");

        let defaults = revision(&revision_json(json!({"containers": [{"image": "x"}]}))).unwrap();
        assert_eq!(
            (defaults.config.container_concurrency, defaults.config.timeout, defaults.h2c),
            (0, DEFAULT_TIMEOUT, false)
        );
        let exec = revision(&revision_json(
            json!({"containers": [{"ports": [{"name": "http1"}], "readinessProbe": {"exec": {"command": ["true"]}}}]}),
        ));
        assert!(!exec.unwrap().probe_optimisation, "an exec readiness probe: only the kubelet knows");
        let startup = revision(&revision_json(
            json!({"containers": [{"ports": [{}]}, {"startupProbe": {"tcpSocket": {"port": 1}}}]}),
        ));
        assert!(!startup.unwrap().probe_optimisation, "a startup probe on any container");
    }

    #[test]
    fn zero_timeouts_are_off_and_huge_ones_clamped() {
        let rev = revision(&revision_json(json!({
            "timeoutSeconds": i64::MAX, "responseStartTimeoutSeconds": 0, "idleTimeoutSeconds": i64::MAX,
        })))
        .unwrap();
        assert_eq!((rev.config.timeout, rev.config.response_start_timeout), (spec::MAX_TIMEOUT, None));
        assert_eq!(rev.config.idle_timeout, Some(spec::MAX_TIMEOUT));
        let zero = revision(&revision_json(json!({"timeoutSeconds": 0}))).unwrap();
        assert_eq!(zero.config.timeout, DEFAULT_TIMEOUT, "no timeout at all is the default one");
    }

    #[test]
    fn wrong_types_and_missing_names_are_errors_naming_the_field() {
        for (spec, field) in [
            (json!({"containerConcurrency": "many"}), "spec"),
            (json!({"containerConcurrency": -1}), "containerConcurrency"),
            (json!({"timeoutSeconds": -5}), "timeoutSeconds"),
            (json!({"containers": "none"}), "spec"),
        ] {
            let error = revision(&revision_json(spec.clone())).unwrap_err();
            assert!(error.contains(field), "{spec}: {error}");
        }
        let nameless = object(json!({"apiVersion": "v1", "kind": "Revision", "metadata": {"namespace": "x"}}));
        assert_eq!(revision(&nameless).unwrap_err(), "metadata.name is missing");
    }

    #[test]
    fn a_route_gives_its_traffic_per_revision() {
        let route_json = |traffic: serde_json::Value| {
            object(json!({"apiVersion": "serving.knative.dev/v1", "kind": "Route",
                          "metadata": {"name": "counter", "namespace": "shop", "labels": {SERVICE_LABEL: "counter"}},
                          "status": {"traffic": traffic}}))
        };
        let info = route(&route_json(json!([
            {"revisionName": "counter-00001", "percent": 90},
            {"revisionName": "counter-00002", "percent": 10, "tag": "canary",
             "url": "http://canary-counter.shop.example.com"},
            {"revisionName": "counter-00002", "tag": "latest"},
            {"revisionName": "counter-00003", "percent": 0},
            {"configurationName": "counter", "percent": 0},
        ])))
        .unwrap();
        assert_eq!(info.service.as_deref(), Some("counter"));
        let expected =
            [("counter-00001", 90), ("counter-00002", 10), ("counter-00003", 0)].map(|(r, p)| (r.to_owned(), p));
        assert_eq!(info.traffic, expected, "tags add up; a target without a revision is not one");
        let tag = |tag: &str, label: Option<&str>| TagSpec {
            tag: tag.to_owned(),
            revision: "counter-00002".to_owned(),
            host_label: label.map(str::to_owned),
        };
        assert_eq!(info.tags, [tag("canary", Some("canary-counter")), tag("latest", None)]);
        assert!(route(&route_json(json!([{"revisionName": "x", "percent": 150}]))).is_err());
        assert!(route(&route_json(json!({"revisionName": "x"}))).is_err());
    }

    /// The hosts Knative's ingress routes by a Route: `status.url`, `status.address.url` with its
    /// short forms, and each tag's (`pkg/reconciler/route/resources/ingress.go` builds the
    /// KIngress rules from the same status).
    #[test]
    fn a_route_gives_the_hosts_the_ingress_routes_by() {
        let info = route(&object(json!({"apiVersion": "serving.knative.dev/v1", "kind": "Route",
            "metadata": {"name": "counter", "namespace": "shop"},
            "status": {"url": "https://Counter.shop.example.com", "address": {"url": "http://counter.shop.svc.corp.local"},
                       "traffic": [{"revisionName": "counter-00002", "percent": 100, "tag": "canary",
                                    "url": "https://canary-counter.shop.example.com"}]}})))
        .unwrap();
        let expected = [
            "counter.shop.example.com",
            "counter.shop.svc.corp.local",
            "counter.shop",
            "counter.shop.svc",
            "canary-counter.shop.example.com",
            "canary-counter.shop",
            "canary-counter.shop.svc",
            "canary-counter.shop.svc.corp.local",
        ];
        assert_eq!(info.hosts, expected);
    }

    #[test]
    fn endpoints_give_pods_by_port_name_ready_or_not() {
        let obj = object(json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "counter-00001-private", "namespace": "shop", "labels": {REVISION_LABEL: "counter-00001"}},
            "subsets": [
                {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "notReadyAddresses": [{"ip": "10.0.0.3"}],
                 "ports": [{"name": "http", "port": 8012}, {"name": "http2", "port": 8013}, {"port": 9}]},
                {"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "http", "port": 40001}]},
            ],
        }));
        let (key, info) = private_endpoints(&obj).unwrap();
        assert_eq!(key, ("shop".to_owned(), "counter-00001".to_owned()), "keyed by the revision it serves");
        assert_eq!(info.revision, "counter-00001");
        let addrs = |v: &[&str]| v.iter().map(|a| a.parse().unwrap()).collect::<Vec<SocketAddr>>();
        assert_eq!(info.ready["http"], addrs(&["10.0.0.1:8012", "10.0.0.2:8012", "127.0.0.1:40001"]));
        assert_eq!(info.ready["http2"], addrs(&["10.0.0.1:8013", "10.0.0.2:8013"]));
        assert_eq!(info.not_ready["http"], addrs(&["10.0.0.3:8012"]));
        let (key, activators) = public_endpoints(&obj).unwrap();
        assert_eq!((key.1.as_str(), activators["http"].len()), ("counter-00001", 3));

        let mut bad = obj.clone();
        bad.data["subsets"][0]["addresses"][0]["ip"] = json!("not-an-ip");
        assert!(private_endpoints(&bad).unwrap_err().contains("not-an-ip"));
        let mut unlabelled = obj;
        unlabelled.metadata.labels = None;
        assert!(private_endpoints(&unlabelled).is_err());
    }

    #[test]
    fn a_private_service_gives_its_cluster_ip_unless_headless() {
        let service = |ip: &str| {
            object(json!({"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": "r-private", "namespace": "shop", "labels": {REVISION_LABEL: "r"}},
                          "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}, {"name": "http2", "port": 81}]}}))
        };
        let (_, info) = private_service(&service("10.96.0.7")).unwrap();
        let info = info.unwrap();
        assert_eq!((info.cluster_ip.to_string(), info.ports["http2"]), ("10.96.0.7".to_owned(), 81));
        assert_eq!(private_service(&service("None")).unwrap().1, None);
        assert!(private_service(&service("bogus")).is_err());
    }

    #[test]
    fn config_network_reads_mesh_mode_and_passthrough() {
        let data = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut warnings = Vec::new();
        let mut read = |pairs: &[(&str, &str)]| network_config(&data(pairs), &mut |w| warnings.push(w));
        let config = read(&[("mesh-compatibility-mode", "Enabled"), ("enable-mesh-pod-addressability", "T")]);
        assert_eq!(config, Ok(NetworkConfig { mesh: MeshMode::Enabled, passthrough: true, internal_tls: false }));
        let config = read(&[("mesh-compatibility-mode", "sometimes"), ("system-internal-tls", "Enabled")]).unwrap();
        assert_eq!((config.mesh, config.internal_tls), (MeshMode::Auto, true));
        assert_eq!(read(&[]), Ok(NetworkConfig::default()));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    /// Upstream's `NewConfigFromMap` (vendored `knative.dev/networking/pkg/config/config.go`):
    /// booleans through `strconv.ParseBool`, `system-internal-tls` lower-cased, and the deprecated
    /// `internal-encryption` still enabling TLS while the new key is unset or `disabled`.
    #[test]
    fn config_network_parses_as_upstream() {
        let data = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let read = |pairs: &[(&str, &str)]| network_config(&data(pairs), &mut |_| {});
        let tls = |pairs: &[(&str, &str)]| read(pairs).map(|c| c.internal_tls);
        assert_eq!(tls(&[("internal-encryption", "1")]), Ok(true));
        assert_eq!(tls(&[("internal-encryption", "TRUE"), ("system-internal-tls", "Disabled")]), Ok(true));
        assert_eq!(tls(&[("internal-encryption", "f"), ("system-internal-tls", "ENABLED")]), Ok(true));
        assert_eq!(tls(&[("system-internal-tls", "")]), Ok(false));
        assert!(tls(&[("system-internal-tls", "on")]).is_err());
        assert!(tls(&[("internal-encryption", "yes")]).is_err(), "not a Go boolean");
        assert!(read(&[("enable-mesh-pod-addressability", " true")]).is_err(), "Go does not trim");
    }

    /// Any JSON a tenant or a broken controller could put in a field.
    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            "\\PC{0,16}".prop_map(serde_json::Value::from),
            prop_oneof![Just("10.0.0.1"), Just("::1"), Just("http://x.y"), Just("None"), Just("")]
                .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// One object of each kind the activator watches, every field it reads set.
    fn watched_objects() -> Vec<serde_json::Value> {
        let meta = json!({"name": "counter-00001", "namespace": "shop",
                          "labels": {SERVICE_LABEL: "counter", CONFIGURATION_LABEL: "counter", REVISION_LABEL: "counter-00001"},
                          "annotations": {"activator.knative.dev/sticky-ttl": "60s"}});
        vec![
            json!({"apiVersion": "serving.knative.dev/v1", "kind": "Revision", "metadata": meta,
                   "spec": {"containerConcurrency": 3, "timeoutSeconds": 30, "responseStartTimeoutSeconds": 10,
                            "containers": [{"ports": [{"name": "h2c", "containerPort": 8080}],
                                            "readinessProbe": {"httpGet": {"path": "/"}}}]}}),
            json!({"apiVersion": "serving.knative.dev/v1", "kind": "Route", "metadata": meta,
                   "status": {"url": "http://counter.shop.example.com", "address": {"url": "http://counter.shop.svc.cluster.local"},
                              "traffic": [{"revisionName": "counter-00001", "percent": 100, "tag": "t", "url": "http://t-counter.shop"}]}}),
            json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": meta, "spec": {}}),
            json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
                   "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "notReadyAddresses": [{"ip": "10.0.0.2"}],
                                "ports": [{"name": "http", "port": 8012}]}]}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                   "spec": {"clusterIP": "10.96.0.7", "ports": [{"name": "http", "port": 80}]}}),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": {"ca.crt": "AAAA"}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"system-internal-tls": "enabled"}}),
        ]
    }

    /// Where `watched_objects` carry what the activator reads.
    const READ_FIELDS: &[&str] = &[
        "/metadata/name",
        "/metadata/namespace",
        "/metadata/labels",
        "/metadata/annotations",
        "/spec",
        "/spec/containerConcurrency",
        "/spec/timeoutSeconds",
        "/spec/responseStartTimeoutSeconds",
        "/spec/idleTimeoutSeconds",
        "/spec/containers",
        "/spec/containers/0/ports",
        "/spec/containers/0/ports/0/name",
        "/spec/containers/0/readinessProbe",
        "/status",
        "/status/url",
        "/status/address",
        "/status/address/url",
        "/status/traffic",
        "/status/traffic/0",
        "/status/traffic/0/percent",
        "/status/traffic/0/revisionName",
        "/status/traffic/0/url",
        "/subsets",
        "/subsets/0/addresses",
        "/subsets/0/addresses/0/ip",
        "/subsets/0/ports",
        "/subsets/0/ports/0/port",
        "/subsets/0/ports/0/name",
        "/spec/clusterIP",
        "/spec/ports",
        "/spec/ports/0/port",
        "/data",
        "/data/ca.crt",
        "/data/system-internal-tls",
    ];

    proptest::proptest! {
        /// Each watched object with any one field replaced by anything, read as every kind: a
        /// value or an error naming what is wrong, never a panic.
        #[test]
        fn any_field_of_a_watched_object_reads_or_is_refused(
            which in proptest::sample::select((0..7).collect::<Vec<usize>>()),
            field in proptest::sample::select(READ_FIELDS.to_vec()),
            value in any_json(),
        ) {
            let mut obj = watched_objects().swap_remove(which);
            let (parent, last) = field.rsplit_once('/').expect("a pointer");
            match obj.pointer_mut(parent) {
                Some(serde_json::Value::Object(map)) => {
                    map.insert(last.to_owned(), value);
                }
                Some(serde_json::Value::Array(items)) => {
                    if let Some(item) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                        *item = value;
                    }
                }
                _ => {}
            }
            // What does not deserialise as an object at all is refused by the watch itself.
            let Ok(obj) = serde_json::from_value::<DynamicObject>(obj) else { return Ok(()) };
            let _ = (identity(&obj), revision_key(&obj), revision(&obj), route(&obj), knative_service(&obj));
            let _ = (private_endpoints(&obj), public_endpoints(&obj), private_service(&obj), secret(&obj));
            if let Ok((_, data)) = config_map(&obj) {
                let _ = network_config(&data, &mut |_| {});
            }
        }
    }
}
