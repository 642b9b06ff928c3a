//! Knative-shaped objects for the in-process API server, written from upstream's field names and
//! labels (the CRD schemas of knative-serving v1.23.0, which a test checks them against): Knative
//! Services, Routes and Revisions, the private and public Endpoints and the private Service that
//! serving's controllers create for each revision, and the `knative-serving` ConfigMaps.
//!
//! Pods are demo-service processes on loopback, so several share the IP 127.0.0.1: each gets an
//! Endpoints subset of its own with its port named `http` (or `http2`), which Kubernetes allows.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};

use crate::kube_api::{ApiServer, Kind};
use crate::{Client, Env, Process, Reply, admin_get, metric, wait_until};

pub const SYSTEM_NAMESPACE: &str = "knative-serving";

/// A Revision as serving's configuration controller creates it for a Knative Service.
pub struct Revision {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub container_concurrency: u32,
    pub timeout_seconds: u64,
    /// `spec.responseStartTimeoutSeconds` and `spec.idleTimeoutSeconds`, when set.
    pub response_start_timeout_seconds: Option<u64>,
    pub idle_timeout_seconds: Option<u64>,
    pub annotations: BTreeMap<String, String>,
    /// The first container port's name: `http1`, or `h2c` for a gRPC revision.
    pub port_name: &'static str,
}

impl Revision {
    pub fn new(service: &str, name: &str) -> Self {
        Revision {
            namespace: "default".into(),
            name: name.into(),
            service: service.into(),
            container_concurrency: 0,
            timeout_seconds: 300,
            response_start_timeout_seconds: None,
            idle_timeout_seconds: None,
            annotations: BTreeMap::new(),
            port_name: "http1",
        }
    }

    pub fn uid(&self) -> String {
        uid(&format!("revision/{}/{}", self.namespace, self.name))
    }

    pub fn to_json(&self) -> Value {
        let mut revision = json!({
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Revision",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid(),
                "generation": 1,
                "labels": {
                    "serving.knative.dev/configuration": self.service,
                    "serving.knative.dev/configurationGeneration": "1",
                    "serving.knative.dev/routingState": "active",
                    "serving.knative.dev/service": self.service,
                },
                "annotations": self.annotations,
                "ownerReferences": [{"apiVersion": "serving.knative.dev/v1", "kind": "Configuration",
                                     "name": self.service, "uid": uid(&self.service), "controller": true}],
            },
            "spec": {
                "containerConcurrency": self.container_concurrency,
                "timeoutSeconds": self.timeout_seconds,
                "enableServiceLinks": false,
                "containers": [{
                    "name": "user-container",
                    "image": "ghcr.io/example/counter@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                    "ports": [{"name": self.port_name, "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"successThreshold": 1, "tcpSocket": {"port": 0}},
                    "resources": {},
                }],
            },
            "status": {
                "observedGeneration": 1,
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-23T00:00:00Z"}],
                "containerStatuses": [{"name": "user-container", "imageDigest": "sha256:0"}],
                "actualReplicas": 1,
                "desiredReplicas": 1,
            },
        });
        for (field, value) in [
            ("responseStartTimeoutSeconds", self.response_start_timeout_seconds),
            ("idleTimeoutSeconds", self.idle_timeout_seconds),
        ] {
            if let Some(value) = value {
                revision["spec"][field] = json!(value);
            }
        }
        revision
    }
}

/// A Route's status traffic entry.
pub struct Target {
    pub revision: String,
    pub percent: Option<u32>,
    pub tag: Option<String>,
}

impl Target {
    pub fn new(revision: &str, percent: u32) -> Self {
        Target { revision: revision.into(), percent: Some(percent), tag: None }
    }

    /// The same target under a traffic tag.
    pub fn tagged(mut self, tag: &str) -> Self {
        self.tag = Some(tag.into());
        self
    }

    fn to_json(&self) -> Value {
        let mut target = json!({"revisionName": self.revision, "latestRevision": false});
        if let Some(percent) = self.percent {
            target["percent"] = json!(percent);
        }
        if let Some(tag) = &self.tag {
            target["tag"] = json!(tag);
        }
        target
    }
}

/// The Route of a Knative Service, named like it, with its traffic as the route controller
/// reports it in `status.traffic`: a tagged target with its own URL, by the default
/// `{{.Tag}}-{{.Name}}` template.
pub fn route(namespace: &str, service: &str, traffic: &[Target]) -> Value {
    let status: Vec<Value> = traffic
        .iter()
        .map(|t| {
            let mut target = t.to_json();
            if let Some(tag) = &t.tag {
                target["url"] = json!(format!("http://{tag}-{service}.{namespace}.example.com"));
            }
            target
        })
        .collect();
    let traffic: Vec<Value> = traffic.iter().map(Target::to_json).collect();
    json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Route",
        "metadata": {"name": service, "namespace": namespace, "uid": uid(&format!("route/{namespace}/{service}")),
                     "labels": {"serving.knative.dev/service": service}},
        "spec": {"traffic": traffic},
        "status": {
            "url": format!("http://{service}.{namespace}.example.com"),
            "address": {"url": format!("http://{service}.{namespace}.svc.cluster.local")},
            "traffic": status,
            "conditions": [{"type": "Ready", "status": "True"}],
            "observedGeneration": 1,
        },
    })
}

/// A Knative Service with `annotations` on itself and on its template, as `kn service create -a`
/// sets them.
pub fn knative_service(namespace: &str, name: &str, annotations: &BTreeMap<String, String>) -> Value {
    json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": uid(&format!("ksvc/{namespace}/{name}")),
                     "annotations": annotations, "generation": 1},
        "spec": {
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {"containers": [{"image": "ghcr.io/example/counter:latest"}]},
            },
            "traffic": [{"latestRevision": true, "percent": 100}],
        },
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "observedGeneration": 1},
    })
}

/// The private Endpoints of a revision: `ready` and `not_ready` pods, each on the port named
/// `port_name` (`http`, or `http2` for h2c revisions).
pub fn private_endpoints(revision: &Revision, ready: &[SocketAddr], not_ready: &[SocketAddr]) -> Value {
    let port_name = if revision.port_name == "h2c" { "http2" } else { "http" };
    let subset = |addr: &SocketAddr, ready: bool| {
        let address = json!({"ip": addr.ip().to_string(), "targetRef": {"kind": "Pod", "namespace": revision.namespace,
                             "name": format!("{}-deployment-{}", revision.name, addr.port())}});
        let key = if ready { "addresses" } else { "notReadyAddresses" };
        json!({key: [address], "ports": [
            {"name": port_name, "port": addr.port(), "protocol": "TCP"},
            {"name": "http-autometric", "port": 9090, "protocol": "TCP"},
        ]})
    };
    let subsets: Vec<Value> =
        ready.iter().map(|a| subset(a, true)).chain(not_ready.iter().map(|a| subset(a, false))).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": format!("{}-private", revision.name), "namespace": revision.namespace,
                     "labels": revision_labels(revision, "Private")},
        "subsets": subsets,
    })
}

/// The private Endpoints of a revision whose pods also take TLS (system-internal TLS): each
/// ready pod with its serving port and, in the same subset, its `https` port.
pub fn private_endpoints_tls(revision: &Revision, ready: &[(SocketAddr, u16)]) -> Value {
    let mut endpoints = private_endpoints(revision, &ready.iter().map(|(a, _)| *a).collect::<Vec<_>>(), &[]);
    for (subset, (_, https)) in endpoints["subsets"].as_array_mut().expect("subsets").iter_mut().zip(ready) {
        subset["ports"].as_array_mut().expect("ports").push(json!({"name": "https", "port": https, "protocol": "TCP"}));
    }
    endpoints
}

/// A Secret of the system namespace, its values base64-encoded as the API serves them.
pub fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine as _;
    let encode = |v: &str| base64::engine::general_purpose::STANDARD.encode(v.as_bytes());
    let data: BTreeMap<&str, String> = data.iter().map(|(k, v)| (*k, encode(v))).collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
           "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE}, "data": data})
}

/// A ConfigMap of the system namespace labelled as a trust bundle (`networking.knative.dev/
/// trust-bundle`), one CA bundle per key.
pub fn trust_bundle(name: &str, data: &[(&str, &str)]) -> Value {
    let mut map = config_map(name, data);
    map["metadata"]["labels"] = json!({"networking.knative.dev/trust-bundle": "true"});
    map
}

/// The public Endpoints of a revision in Proxy mode: the activators the SKS controller put in its
/// path, on the revision's port.
pub fn public_endpoints(revision: &Revision, activators: &[IpAddr]) -> Value {
    let port_name = if revision.port_name == "h2c" { "http2" } else { "http" };
    let addresses: Vec<Value> = activators.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": revision.name, "namespace": revision.namespace,
                     "labels": revision_labels(revision, "Public")},
        "subsets": [{"addresses": addresses, "ports": [{"name": port_name, "port": 8012, "protocol": "TCP"}]}],
    })
}

/// The private Service of a revision, whose ClusterIP is the way in when a mesh blocks pod IPs.
pub fn private_service(revision: &Revision, cluster_ip: SocketAddr) -> Value {
    let port_name = if revision.port_name == "h2c" { "http2" } else { "http" };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("{}-private", revision.name), "namespace": revision.namespace,
                     "labels": revision_labels(revision, "Private")},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip.ip().to_string(),
            "ports": [{"name": port_name, "port": cluster_ip.port(), "protocol": "TCP", "targetPort": 8012}],
            "selector": {"serving.knative.dev/revisionUID": revision.uid()},
        },
    })
}

pub fn config_map(name: &str, data: &[(&str, &str)]) -> Value {
    let data: BTreeMap<&str, &str> = data.iter().copied().collect();
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE}, "data": data})
}

fn revision_labels(revision: &Revision, service_type: &str) -> Value {
    json!({
        "app": revision.name,
        "serving.knative.dev/configuration": revision.service,
        "serving.knative.dev/revision": revision.name,
        "serving.knative.dev/revisionUID": revision.uid(),
        "serving.knative.dev/service": revision.service,
        "networking.internal.knative.dev/serviceType": service_type,
    })
}

/// A stable, UUID-shaped id for a name.
fn uid(name: &str) -> String {
    let mut hash: u128 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash = (hash ^ u128::from(b)).wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let hex = format!("{hash:032x}");
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The prefix of the activator's annotations.
pub const P: &str = "activator.knative.dev/";

/// An API server with knative-serving's ConfigMaps, and the processes of one test.
pub struct Cluster {
    pub env: Env,
    pub api: ApiServer,
}

impl Cluster {
    pub async fn new() -> Cluster {
        let api = ApiServer::start().await;
        api.put(Kind::ConfigMap, config_map("config-network", &[("mesh-compatibility-mode", "auto")]));
        api.put(Kind::ConfigMap, config_map("config-observability", &[]));
        Cluster { env: Env::new(), api }
    }

    /// A revision and its private Endpoints with `ready` pods.
    pub fn revision(&self, revision: &Revision, ready: &[SocketAddr]) {
        self.api.put(Kind::Revision, revision.to_json());
        self.api.put(Kind::Endpoints, private_endpoints(revision, ready, &[]));
    }

    /// A Knative Service named `name` with its Route over `traffic`.
    pub fn service(&self, name: &str, traffic: &[Target], annotations: &[(&str, &str)]) {
        self.reroute(name, traffic);
        self.annotate(name, annotations);
    }

    /// Replaces the Knative Service's `activator.knative.dev/` annotations: one watch event.
    pub fn annotate(&self, name: &str, annotations: &[(&str, &str)]) {
        let annotations: BTreeMap<String, String> =
            annotations.iter().map(|(k, v)| (format!("{P}{k}"), (*v).to_owned())).collect();
        self.api.put(Kind::KnativeService, knative_service("default", name, &annotations));
    }

    /// Replaces the Route's traffic: one watch event.
    pub fn reroute(&self, name: &str, traffic: &[Target]) {
        self.api.put(Kind::Route, route("default", name, traffic));
    }

    /// An autoscaler-shim that prints the stats it gets and starts no pods.
    pub async fn autoscaler(&self) -> Process {
        self.env.shim(&["--print-stats", "--command", "false"]).await
    }

    /// An activator in knative mode reporting to `autoscaler`, once ready.
    pub async fn activator(&self, autoscaler: &Process, pod_ip: &str, extra: &[&str]) -> Process {
        let url = format!("ws://{}", autoscaler.addr("stats"));
        let mut flags = vec!["--autoscaler-url", url.as_str(), "--debug-headers"];
        flags.extend_from_slice(extra);
        let activator = self.env.knative_activator(&self.api, pod_ip, &flags).await;
        let admin = activator.addr("admin");
        wait_until(Duration::from_secs(30), "the activator is ready", || async {
            admin_get(admin, "/readyz").await.0 == 200
        })
        .await;
        activator
    }
}

/// The headers Knative's ingress adds, naming the revision it picked.
pub fn ingress(revision: &str) -> Vec<(&'static str, String)> {
    vec![("Knative-Serving-Namespace", "default".into()), ("Knative-Serving-Revision", revision.to_owned())]
}

pub async fn send(client: &Client, path: &str, revision: &str, extra: &[(&str, &str)]) -> Reply {
    let mut req = client.request(reqwest::Method::GET, "counter.default.example.com", path);
    for (k, v) in ingress(revision) {
        req = req.header(k, v);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let reply = client.send(req).await;
    assert_eq!(reply.status, 200, "{path} via {revision}: {reply:?}");
    reply
}

pub async fn applied(admin: SocketAddr) -> f64 {
    metric(admin, "activator_topology_reloads_total", &[("result", "applied")]).await.unwrap_or(0.0)
}

/// Runs `change`, then waits until the activator has published a new world.
pub async fn and_wait_applied(activator: &Process, change: impl FnOnce()) {
    let admin = activator.addr("admin");
    let before = applied(admin).await;
    change();
    wait_until(Duration::from_secs(10), "the change is applied", || async { applied(admin).await > before }).await;
}

/// Sends `n` requests and asserts the counter reads 1, 2, … on one pod; returns the pod.
pub async fn counts_up(
    client: &Client,
    path: &str,
    revision: &str,
    extra: &[(&str, &str)],
    n: usize,
    id: &str,
) -> String {
    let mut pod = None;
    for i in 1..=n {
        let reply = send(client, path, revision, extra).await;
        assert_eq!(reply.body, format!("session={id}, count={i}\n"), "request {i} of {path}");
        assert_eq!(pod.get_or_insert_with(|| reply.pod().to_owned()), reply.pod(), "request {i} of {path}");
    }
    pod.unwrap_or_default()
}
