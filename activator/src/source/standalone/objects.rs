//! Standalone mode's objects, read into what the world needs, and the world made of them.
//!
//! A Kubernetes Service opts in with `activator.knative.dev/deployment: <name>`, naming the
//! Deployment (in its namespace) whose pods serve it. The service is reached at
//! `<service>.<namespace>`, `<service>.<namespace>.svc` and `<service>.<namespace>.svc.<domain>`;
//! its one revision is the Deployment, whose annotations override the Service's as a revision's
//! override its service's. Its pods are the ready endpoints of the EndpointSlices Kubernetes keeps
//! for the Service (labelled `kubernetes.io/service-name`, managed by the EndpointSlice
//! controller), on the Service's first port, each named by its `targetRef`.
//!
//! Trust: a Service names a Deployment only in its own namespace, and an EndpointSlice counts only
//! for the Service of its own namespace that its label names, and only its endpoints whose Pod is
//! in that namespace. What an EndpointSlice lists is as trustworthy as whoever may write
//! EndpointSlices: Kubernetes took that right from the `edit` and `admin` roles (CVE-2021-25740)
//! for this reason, leaving it to the EndpointSlice controller; a cluster that gives it back to
//! tenants lets them point any Service, ours or kube-proxy's, anywhere. A pod listed twice (a
//! dual-stack Service has a slice per family) is one pod. Pure functions, no I/O.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::spec::{
    self, Backends, HostRewrite, Owners, Probe, RevisionConfig, RevisionSpec, ServiceSpec, TrafficSpec, WorldSpec,
};

/// The annotation that opts a Service in, naming its Deployment.
pub(crate) const DEPLOYMENT: &str = "activator.knative.dev/deployment";
/// Requests one pod may take at once (Knative's `containerConcurrency`; 0, the default, for no
/// limit).
pub(crate) const CONTAINER_CONCURRENCY: &str = "activator.knative.dev/container-concurrency";
/// How long a request may take, waiting for a pod included (Knative's `timeoutSeconds`).
pub(crate) const TIMEOUT_SECONDS: &str = "activator.knative.dev/timeout-seconds";
/// The annotations autoscaler-shim scales by, which it reads from the Deployment.
const SCALING: [&str; 5] = [
    "autoscaling.knative.dev/min-scale",
    "autoscaling.knative.dev/max-scale",
    "autoscaling.knative.dev/target",
    "activator.knative.dev/sticky-sessions-per-pod",
    "activator.knative.dev/sticky-session-reserve",
];
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// An object's namespace and name.
pub(crate) type Key = (String, String);

/// A Service that opted in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceInfo {
    pub deployment: String,
    pub annotations: BTreeMap<String, String>,
    /// The name of its first port (what its EndpointSlices' port is named), if any.
    pub port_name: Option<String>,
}

/// An EndpointSlice of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SliceInfo {
    pub service: String,
    /// Port numbers by port name.
    pub ports: BTreeMap<Option<String>, u16>,
    /// Ready endpoints' addresses, each with its Pod's name where the slice names one.
    pub ready: Vec<(IpAddr, Option<String>)>,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Result<Key, String> {
    match (&meta.namespace, &meta.name) {
        (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok((namespace.clone(), name.clone()))
        }
        _ => Err("no namespace or name".to_owned()),
    }
}

/// A Service, if it opted in; an error if it did so with a name no Deployment can have.
pub(crate) fn service(svc: &Service) -> Result<Option<(Key, ServiceInfo)>, String> {
    let key = key_of(&svc.metadata)?;
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let Some(deployment) = annotations.get(DEPLOYMENT).map(|d| d.trim().to_owned()) else { return Ok(None) };
    if !is_dns_label(&deployment) {
        return Err(format!("{DEPLOYMENT}: {deployment:?} is not a Deployment's name"));
    }
    let port_name =
        svc.spec.as_ref().and_then(|s| s.ports.as_ref()).and_then(|p| p.first()).and_then(|p| p.name.clone());
    Ok(Some((key, ServiceInfo { deployment, annotations, port_name })))
}

/// A Deployment's annotations, which override its Service's.
pub(crate) fn deployment(deployment: &Deployment) -> Result<(Key, BTreeMap<String, String>), String> {
    Ok((key_of(&deployment.metadata)?, deployment.metadata.annotations.clone().unwrap_or_default()))
}

/// An EndpointSlice the EndpointSlice controller keeps for a Service; `None` for any other.
pub(crate) fn endpoint_slice(slice: &EndpointSlice) -> Result<Option<(Key, SliceInfo)>, String> {
    let key = key_of(&slice.metadata)?;
    let labels = slice.metadata.labels.clone().unwrap_or_default();
    let (Some(service), Some(ENDPOINTSLICE_CONTROLLER)) =
        (labels.get(SERVICE_NAME), labels.get(MANAGED_BY).map(String::as_str))
    else {
        return Ok(None);
    };
    let mut ports = BTreeMap::new();
    for port in slice.ports.iter().flatten() {
        let number = port.port.and_then(|p| u16::try_from(p).ok()).ok_or("a port without a number")?;
        ports.insert(port.name.clone().filter(|n| !n.is_empty()), number);
    }
    let mut ready = Vec::new();
    for endpoint in &slice.endpoints {
        // Kubernetes: a missing `ready` condition means ready.
        if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let pod = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod"));
        // A Pod of another namespace is never this Service's.
        if pod.is_some_and(|r| r.namespace.as_ref().is_some_and(|ns| *ns != key.0)) {
            continue;
        }
        let pod = pod.and_then(|r| r.name.clone());
        for address in &endpoint.addresses {
            let ip = address.parse().map_err(|_| format!("{address:?} is not an IP address"))?;
            ready.push((ip, pod.clone()));
        }
    }
    Ok(Some((key, SliceInfo { service: service.clone(), ports, ready })))
}

/// The world the opted-in Services make. A service that does not validate is left out and
/// reported to `rejected`; the others are published. A Service's annotation that says how to
/// scale, which the Deployment does not repeat, is reported to `noted`: autoscaler-shim reads the
/// Deployment alone.
pub(crate) fn world(
    services: &BTreeMap<Key, ServiceInfo>,
    deployments: &BTreeMap<Key, BTreeMap<String, String>>,
    slices: &BTreeMap<Key, SliceInfo>,
    cluster_domain: &str,
    rejected: &mut dyn FnMut(&Key, String),
    noted: &mut dyn FnMut(&Key, String),
) -> WorldSpec {
    let mut world = WorldSpec::default();
    for ((namespace, name), svc) in services {
        let annotations = deployments.get(&(namespace.clone(), svc.deployment.clone())).cloned().unwrap_or_default();
        let mut backends = Backends::default();
        let own = slices.iter().filter(|((ns, _), slice)| ns == namespace && slice.service == *name);
        for (_, slice) in own {
            let Some(port) = slice.ports.get(&svc.port_name).or_else(|| slice.ports.values().next()) else { continue };
            for (ip, pod) in &slice.ready {
                let addr = SocketAddr::new(*ip, *port);
                let named_already = pod.as_ref().is_some_and(|pod| backends.pod_names.values().any(|p| p == pod));
                if backends.trusted.contains(&addr) || named_already {
                    continue;
                }
                backends.trusted.push(addr);
                if let Some(pod) = pod {
                    backends.pod_names.insert(addr, pod.clone());
                }
            }
        }
        for key in SCALING.iter().filter(|k| svc.annotations.contains_key(**k) && !annotations.contains_key(**k)) {
            noted(
                &(namespace.clone(), name.clone()),
                format!(
                    "{key} on the Service is not seen by autoscaler-shim, which reads the Deployment's: set it on Deployment {}",
                    svc.deployment
                ),
            );
        }
        let setting = |key: &str| {
            annotations.get(key).or_else(|| svc.annotations.get(key)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        let config = RevisionConfig {
            container_concurrency: setting(CONTAINER_CONCURRENCY).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
            timeout: setting(TIMEOUT_SECONDS).and_then(spec::timeout_seconds).unwrap_or(spec::DEFAULT_TIMEOUT),
            response_start_timeout: None,
            idle_timeout: None,
        };
        let revision = RevisionSpec {
            name: svc.deployment.clone(),
            config,
            annotations,
            backends,
            // Kubernetes' readiness is the pods' own probe: its ready endpoints take traffic.
            probe: Probe::None,
            host: HostRewrite::Keep,
            owners: Owners { service: Some(name.clone()), configuration: None },
        };
        let service = ServiceSpec {
            namespace: namespace.clone(),
            name: name.clone(),
            hosts: vec![
                format!("{name}.{namespace}"),
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.{cluster_domain}"),
            ],
            annotations: svc.annotations.clone(),
            traffic: vec![TrafficSpec { revision: svc.deployment.clone(), percent: 100 }],
            tags: Vec::new(),
            revisions: vec![revision],
        };
        match spec::validate_service(&service) {
            Ok(()) => world.services.push(service),
            Err(e) => rejected(&(namespace.clone(), name.clone()), e.to_string()),
        }
    }
    world
}

/// A DNS-1123 label: what a Deployment's name is.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(namespace: &str, name: &str, annotations: serde_json::Value) -> Service {
        serde_json::from_value(json!({"metadata": {"namespace": namespace, "name": name, "annotations": annotations},
                                      "spec": {"ports": [{"name": "http", "port": 80}]}}))
        .unwrap()
    }

    fn slice(namespace: &str, service: &str, managed: bool, ready: &[(&str, Option<bool>, &str)]) -> EndpointSlice {
        let endpoints: Vec<_> = ready
            .iter()
            .map(|(ip, ready, pod)| json!({"addresses": [ip], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod}}))
            .collect();
        let managed_by = if managed { ENDPOINTSLICE_CONTROLLER } else { "someone-else" };
        serde_json::from_value(json!({"metadata": {"namespace": namespace, "name": format!("{service}-abc"),
            "labels": {SERVICE_NAME: service, MANAGED_BY: managed_by}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints}))
        .unwrap()
    }

    #[test]
    fn an_annotated_service_serves_its_deployments_ready_pods_and_nothing_else() {
        let (key, info) = service(&svc("shop", "cart", json!({DEPLOYMENT: "cart-v1"}))).unwrap().unwrap();
        assert_eq!(service(&svc("shop", "other", json!({}))), Ok(None), "not opted in");
        assert!(service(&svc("shop", "bad", json!({DEPLOYMENT: "../x"}))).is_err());
        let services = BTreeMap::from([(key, info)]);
        let deployments = BTreeMap::from([(
            ("shop".to_owned(), "cart-v1".to_owned()),
            BTreeMap::from([(CONTAINER_CONCURRENCY.to_owned(), "2".to_owned())]),
        )]);
        let mut slices = BTreeMap::new();
        for s in [
            slice(
                "shop",
                "cart",
                true,
                &[
                    ("10.1.0.1", Some(true), "cart-v1-a"),
                    ("10.1.0.2", None, "cart-v1-b"),
                    ("10.1.0.3", Some(false), "cart-v1-c"),
                ],
            ),
            // Another namespace's slice naming this Service, and one nobody's controller keeps.
            slice("evil", "cart", true, &[("10.9.9.9", Some(true), "x")]),
            {
                let mut s = slice("shop", "cart", false, &[("10.9.9.8", Some(true), "y")]);
                s.metadata.name = Some("forged".into());
                s
            },
        ] {
            if let Some((key, info)) = endpoint_slice(&s).unwrap() {
                slices.insert(key, info);
            }
        }
        let (mut rejected, mut noted) = (Vec::new(), Vec::new());
        let world = world(
            &services,
            &deployments,
            &slices,
            "cluster.local",
            &mut |k, e| rejected.push((k.clone(), e)),
            &mut |k, e| noted.push((k.clone(), e)),
        );
        assert!(rejected.is_empty() && noted.is_empty(), "{rejected:?} {noted:?}");
        let [service] = world.services.as_slice() else { panic!("one service: {world:?}") };
        assert_eq!(service.hosts, ["cart.shop", "cart.shop.svc", "cart.shop.svc.cluster.local"]);
        let revision = &service.revisions[0];
        assert_eq!((revision.name.as_str(), revision.config.container_concurrency), ("cart-v1", 2));
        let addrs: Vec<String> = revision.backends.trusted.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.1.0.1:8080", "10.1.0.2:8080"], "ready pods of its own slices only");
        assert_eq!(revision.backends.pod_names.values().collect::<Vec<_>>(), ["cart-v1-a", "cart-v1-b"]);
    }

    #[test]
    fn a_pod_of_another_namespace_or_listed_twice_counts_once_or_not_at_all() {
        let mut foreign =
            slice("shop", "cart", true, &[("10.1.0.1", Some(true), "cart-a"), ("10.7.0.1", Some(true), "theirs")]);
        foreign.endpoints[1].target_ref.as_mut().unwrap().namespace = Some("bank".into());
        let (_, read) = endpoint_slice(&foreign).unwrap().unwrap();
        assert_eq!(read.ready, [("10.1.0.1".parse().unwrap(), Some("cart-a".to_owned()))]);
        // Dual stack: the same pod in an IPv4 and an IPv6 slice.
        let v6 = {
            let mut s = slice("shop", "cart", true, &[("fd00::1", Some(true), "cart-a")]);
            s.metadata.name = Some("cart-v6".into());
            s
        };
        let slices: BTreeMap<Key, SliceInfo> =
            [foreign, v6].iter().map(|s| endpoint_slice(s).unwrap().unwrap()).collect();
        let (key, info) = service(&svc("shop", "cart", json!({DEPLOYMENT: "cart"}))).unwrap().unwrap();
        let scaled = BTreeMap::from([(
            key,
            ServiceInfo {
                annotations: [
                    (DEPLOYMENT.to_owned(), "cart".to_owned()),
                    ("autoscaling.knative.dev/min-scale".to_owned(), "2".to_owned()),
                ]
                .into(),
                ..info
            },
        )]);
        let mut noted = Vec::new();
        let world =
            world(&scaled, &BTreeMap::new(), &slices, "cluster.local", &mut |_, _| {}, &mut |_, e| noted.push(e));
        assert_eq!(world.services[0].revisions[0].backends.trusted.len(), 1, "one pod, once");
        assert_eq!(noted.len(), 1, "min-scale on the Service alone is said: {noted:?}");
    }
}
