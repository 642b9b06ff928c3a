//! Standalone mode's source of the world view, for clusters without Knative: cluster-wide
//! watches (kube-rs watchers) of Services, Deployments and EndpointSlices, read by `objects` into
//! one `WorldSpec` for the `Publisher` whenever they change. Scaling is autoscaler-shim's
//! (`--backend kubernetes`, the Deployments' scale subresource), told through the same stat
//! protocol as in the other modes.
//!
//! The request path never waits on the API server. Until every watch has listed once the
//! activator reports unready. Watches that drop or fail are listed again with back-off by kube-rs
//! while the last good world keeps serving; an object that does not read is skipped with a log
//! line and a metric, and keeps its last good version.

mod objects;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use super::kube_metrics::KubeMetrics;
use crate::health::Health;
use crate::stats::knative::KnativeMetrics;
use crate::world::Publisher;
use objects::{Key, ServiceInfo, SliceInfo};

/// What standalone mode lists and watches (all namespaces, read only): its RBAC.
pub const WATCHED: [(&str, &str); 3] =
    [("", "services"), ("apps", "deployments"), ("discovery.k8s.io", "endpointslices")];

/// One watched kind's objects: the live view, and the one a relist is building.
struct Reflected<T> {
    live: BTreeMap<Key, T>,
    relisting: Option<BTreeMap<Key, T>>,
    /// Listed once.
    synced: bool,
    resource: &'static str,
}

impl<T> Reflected<T> {
    fn new(resource: &'static str) -> Self {
        Reflected { live: BTreeMap::new(), relisting: None, synced: false, resource }
    }

    /// Applies one watch event whose object `read` reads (`Ok(None)`: not one of ours). Returns
    /// whether the live view changed.
    fn apply<K>(
        &mut self,
        event: Event<K>,
        read: impl Fn(&K) -> Result<Option<(Key, T)>, String>,
        key: impl Fn(&K) -> Option<Key>,
        metrics: &KubeMetrics,
    ) -> bool {
        let read_or_report = |object: &K| match read(object) {
            Ok(read) => Ok(read),
            Err(reason) => {
                metrics.rejected.with_label_values(&[self.resource]).inc();
                let name = key(object).map(|(ns, name)| format!("{ns}/{name}")).unwrap_or_default();
                tracing::warn!(resource = self.resource, object = %name, %reason, "skipping an object that does not read; its last good version stays");
                Err(())
            }
        };
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let Some(relisting) = &mut self.relisting else { return false };
                match read_or_report(&object) {
                    Ok(Some((key, value))) => {
                        relisting.insert(key, value);
                    }
                    Ok(None) => {}
                    // Keeps its last good version through the relist.
                    Err(()) => {
                        if let Some((key, value)) = key(&object).and_then(|k| self.live.remove_entry(&k)) {
                            relisting.insert(key, value);
                        }
                    }
                }
                false
            }
            Event::InitDone => {
                self.live = self.relisting.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply(object) => match read_or_report(&object) {
                Ok(Some((key, value))) => {
                    self.live.insert(key, value);
                    true
                }
                // No longer ours (an annotation or label removed).
                Ok(None) => key(&object).is_some_and(|k| self.live.remove(&k).is_some()),
                Err(()) => false,
            },
            Event::Delete(object) => key(&object).is_some_and(|k| self.live.remove(&k).is_some()),
        }
    }
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

/// An event of one of the three watches (boxed: a Deployment is large).
enum Update {
    Service(Box<Result<Event<Service>, watcher::Error>>),
    Deployment(Box<Result<Event<Deployment>, watcher::Error>>),
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
}

pub(crate) struct StandaloneSource {
    client: kube::Client,
    publisher: Arc<Publisher>,
    health: Arc<Health>,
    metrics: KubeMetrics,
    cluster_domain: String,
    page_size: u32,
    services: Reflected<ServiceInfo>,
    deployments: Reflected<BTreeMap<String, String>>,
    slices: Reflected<SliceInfo>,
    /// Resources RBAC forbids, each said once.
    forbidden: BTreeSet<&'static str>,
    /// What was said about the objects, each once.
    noted: BTreeSet<String>,
}

impl StandaloneSource {
    /// Connects with the pod's service account in a cluster, or `KUBECONFIG` outside one. The
    /// caller has made `health` require a sync.
    pub(crate) async fn connect(
        publisher: Arc<Publisher>,
        health: Arc<Health>,
        (metrics, knative): (KubeMetrics, KnativeMetrics),
        cluster_domain: String,
        page_size: u32,
    ) -> anyhow::Result<Self> {
        let client = super::kube_client::connect(knative).await?;
        Ok(StandaloneSource {
            client,
            publisher,
            health,
            metrics,
            cluster_domain,
            page_size,
            services: Reflected::new("services"),
            deployments: Reflected::new("deployments.apps"),
            slices: Reflected::new("endpointslices.discovery.k8s.io"),
            forbidden: BTreeSet::new(),
            noted: BTreeSet::new(),
        })
    }

    /// Watches forever, publishing the world as it changes.
    pub(crate) async fn run(mut self) {
        let config = watcher::Config::default().page_size(self.page_size.max(1));
        let services = watcher::watcher(Api::<Service>::all(self.client.clone()), config.clone())
            .default_backoff()
            .map(|e| Update::Service(Box::new(e)))
            .boxed();
        let deployments = watcher::watcher(Api::<Deployment>::all(self.client.clone()), config.clone())
            .default_backoff()
            .map(|e| Update::Deployment(Box::new(e)))
            .boxed();
        // Only slices Kubernetes keeps for a Service.
        let slices_config = config.labels("kubernetes.io/service-name");
        let slices = watcher::watcher(Api::<EndpointSlice>::all(self.client.clone()), slices_config)
            .default_backoff()
            .map(|e| Update::Slice(Box::new(e)))
            .boxed();
        let mut all = futures_util::stream::select_all([services, deployments, slices]);
        while let Some(update) = all.next().await {
            let mut changed = self.handle(update);
            // Take whatever else has arrived too, so a burst is published once.
            while let Some(Some(update)) = all.next().now_or_never() {
                changed |= self.handle(update);
            }
            if changed {
                self.publish();
            }
        }
    }

    fn handle(&mut self, update: Update) -> bool {
        let metrics = &self.metrics;
        match update {
            Update::Service(update) => match *update {
                Ok(event) => self.services.apply(event, objects::service, |s: &Service| key_of(&s.metadata), metrics),
                Err(e) => self.failed(self.services.resource, &e),
            },
            Update::Deployment(update) => match *update {
                Ok(event) => self.deployments.apply(
                    event,
                    |d: &Deployment| objects::deployment(d).map(Some),
                    |d: &Deployment| key_of(&d.metadata),
                    metrics,
                ),
                Err(e) => self.failed(self.deployments.resource, &e),
            },
            Update::Slice(update) => match *update {
                Ok(event) => {
                    self.slices.apply(event, objects::endpoint_slice, |s: &EndpointSlice| key_of(&s.metadata), metrics)
                }
                Err(e) => self.failed(self.slices.resource, &e),
            },
        }
    }

    /// A watch failed: kube-rs lists again after a back-off. Forbidden is said once, with the
    /// rule that grants it; the activator stays unready until every watch has listed.
    fn failed(&mut self, resource: &'static str, error: &watcher::Error) -> bool {
        self.metrics.errors.with_label_values(&[resource]).inc();
        if !super::kube_client::forbidden(error) {
            tracing::warn!(%resource, %error, "watch failed; listing again after a back-off, the last view keeps serving");
        } else if self.forbidden.insert(resource) {
            self.metrics.forbidden.with_label_values(&[resource]).set(1);
            let reason = format!(
                "cannot list {resource} (forbidden by RBAC): grant the ClusterRole of manifests/standalone \
                 (get, list, watch on services, deployments.apps and endpointslices.discovery.k8s.io)"
            );
            tracing::error!(%resource, "{reason}");
            self.health.set_sync_blocked(Some(reason));
        }
        false
    }

    fn publish(&mut self) {
        if !(self.services.synced && self.deployments.synced && self.slices.synced) {
            return;
        }
        for resource in std::mem::take(&mut self.forbidden) {
            self.metrics.forbidden.with_label_values(&[resource]).set(0);
        }
        let metrics = &self.metrics;
        let publisher = &self.publisher;
        let world = objects::world(
            &self.services.live,
            &self.deployments.live,
            &self.slices.live,
            &self.cluster_domain,
            &mut |(namespace, name), reason| {
                metrics.rejected.with_label_values(&["services"]).inc();
                publisher.rejected();
                tracing::warn!(service = %format!("{namespace}/{name}"), %reason, "not serving a service that does not validate");
            },
            &mut |(namespace, name), note| {
                if self.noted.insert(format!("{namespace}/{name}: {note}")) {
                    tracing::warn!(service = %format!("{namespace}/{name}"), "{note}");
                }
            },
        );
        self.publisher.apply(&world);
        self.health.set_sync_blocked(None);
        self.health.set_synced();
    }
}
