//! Standalone mode's objects (a Service opted in with `activator.knative.dev/deployment`, its
//! Deployment, the EndpointSlices Kubernetes keeps for it) for the in-process API server, and a
//! stand-in for Kubernetes' Deployment and EndpointSlice controllers: it runs a Deployment's
//! `spec.replicas` as demo-service processes, with a Pod object and an EndpointSlice each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::Process;
use crate::kube_api::{ApiServer, Kind};

const P: &str = "activator.knative.dev/";

/// A Service in `namespace` opted in for `deployment`, with more `activator.knative.dev/`
/// annotations.
pub fn service(namespace: &str, name: &str, deployment: &str, annotations: &[(&str, &str)]) -> Value {
    let mut all: BTreeMap<String, String> =
        annotations.iter().map(|(k, v)| (format!("{P}{k}"), (*v).to_owned())).collect();
    all.insert(format!("{P}deployment"), deployment.to_owned());
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": namespace, "name": name, "annotations": all},
           "spec": {"selector": {"app": deployment}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

/// A Deployment at `replicas`, with `annotations` (full names).
pub fn deployment(namespace: &str, name: &str, replicas: u32, annotations: &[(&str, &str)]) -> Value {
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"namespace": namespace, "name": name, "annotations": annotations},
           "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}},
                                 "spec": {"containers": [{"name": "app", "image": "example/counter"}]}}}})
}

/// The EndpointSlice Kubernetes keeps for one pod of `service` (pods on one host differ by port,
/// and the controller puts endpoints with different ports in different slices).
pub fn endpoint_slice(namespace: &str, service: &str, pod: &str, addr: SocketAddr, ready: bool) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": namespace, "name": format!("{service}-{pod}"),
                        "labels": {"kubernetes.io/service-name": service,
                                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": addr.port(), "protocol": "TCP"}],
           "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": ready},
                          "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod}}]})
}

/// Runs a Deployment's replicas as demo-service processes, as Kubernetes' controllers would:
/// each pod gets a Pod object and an EndpointSlice, and leaves with both. Stops with its pods
/// when dropped.
pub struct Controller {
    task: tokio::task::JoinHandle<()>,
    pods: Arc<Mutex<Vec<(String, SocketAddr)>>>,
}

impl Controller {
    pub fn start(api: &ApiServer, dir: PathBuf, namespace: &str, deployment: &str, service: &str) -> Controller {
        let pods = Arc::new(Mutex::new(Vec::new()));
        let (api, namespace, deployment, service) =
            (api.clone(), namespace.to_owned(), deployment.to_owned(), service.to_owned());
        let listed = pods.clone();
        let task = tokio::spawn(async move {
            let mut running: Vec<(String, Process)> = Vec::new();
            let mut started = 0;
            loop {
                let want = api
                    .get(Kind::Deployment, &namespace, &deployment)
                    .and_then(|d| d["spec"]["replicas"].as_u64())
                    .unwrap_or(0) as usize;
                while running.len() < want {
                    started += 1;
                    let pod = format!("{deployment}-{started}");
                    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--pod", &pod, "--revision", &deployment]
                        .map(str::to_owned)
                        .to_vec();
                    let process = Process::start(&dir, "demo-service", &args, &["http"]).await.expect("a pod starts");
                    let addr = process.addr("http");
                    api.put(
                        Kind::Pod,
                        json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"namespace": namespace, "name": pod, "labels": {"app": deployment}}}),
                    );
                    api.put(Kind::EndpointSlice, endpoint_slice(&namespace, &service, &pod, addr, true));
                    running.push((pod, process));
                }
                while running.len() > want {
                    let (pod, process) = running.pop().expect("more than wanted");
                    api.delete(Kind::EndpointSlice, &namespace, &format!("{service}-{pod}"));
                    api.delete(Kind::Pod, &namespace, &pod);
                    drop(process);
                }
                *listed.lock().unwrap() = running.iter().map(|(pod, p)| (pod.clone(), p.addr("http"))).collect();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Controller { task, pods }
    }

    /// The pods running now, by name, with their addresses.
    pub fn pods(&self) -> Vec<(String, SocketAddr)> {
        self.pods.lock().unwrap().clone()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}
