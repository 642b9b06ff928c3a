//! Knative mode's source of the world view: cluster-wide watches (kube-rs watchers) of Revisions,
//! revisions' private and public Endpoints and private Services, the ConfigMaps of the system
//! namespace, and, for affinity, Routes and Knative Services, which upstream never reads. One task
//! joins them into a `WorldSpec` for the `Publisher`; an Endpoints or private Service change only
//! updates that revision's pods, without rebuilding the world.
//!
//! The request path never waits on the API server. Until every watch has listed once the
//! activator reports unready. Watches that drop, expire (410 Gone) or fail are listed again with
//! back-off by kube-rs while the last good world keeps serving; an object that does not read is
//! skipped with a log line and a metric. If Routes or Knative Services are forbidden (the stock
//! RBAC), requests are still served as upstream serves them, each revision on its own: one log
//! line says which rule is missing, and a gauge stays 1 until it is granted.

pub(crate) mod objects;
mod world;

pub(crate) use super::kube_metrics::KubeMetrics;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::health::Health;
use crate::spec::{self, WorldSpec};
use crate::stats::knative::KnativeMetrics;
use crate::telemetry::{LogLevel, ObservabilityConfig, Telemetry, level_from_config_logging};
use crate::tls::{InternalTls, TRUST_BUNDLE_LABEL};
use crate::world::Publisher;
use objects::{EndpointsInfo, Key};
use world::Reflection;

/// A resource Knative mode lists and watches, and so the RBAC it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Only in the system namespace (a Role there), rather than cluster-wide (a ClusterRole).
    pub in_system_namespace: bool,
    pub label_selector: Option<&'static str>,
    pub field_selector: Option<&'static str>,
    /// What upstream's activator does not watch, so the stock RBAC lacks.
    pub beyond_upstream: bool,
}

const SERVING: &str = "serving.knative.dev";
const PRIVATE: &str = "serving.knative.dev/revisionUID,networking.internal.knative.dev/serviceType=Private";
const PUBLIC: &str = "serving.knative.dev/revision,networking.internal.knative.dev/serviceType=Public";

/// What Knative mode watches; the manifests' RBAC is checked against this list.
pub const WATCHED: [Resource; 8] = [
    watched(SERVING, "Revision", "revisions", false, None, false),
    watched(SERVING, "Route", "routes", false, None, true),
    watched(SERVING, "Service", "services", false, None, true),
    watched("", "Endpoints", "endpoints", false, Some(PRIVATE), false),
    watched("", "Endpoints", "endpoints", false, Some(PUBLIC), false),
    watched("", "Service", "services", false, Some(PRIVATE), false),
    watched("", "ConfigMap", "configmaps", true, None, false),
    // The certificate of system-internal TLS, as upstream's CertCache reads it.
    Resource { field_selector: Some(TLS_SECRET), ..watched("", "Secret", "secrets", true, None, false) },
];

const TLS_SECRET: &str = "metadata.name=routing-serving-certs";

const fn watched(
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    in_system_namespace: bool,
    label_selector: Option<&'static str>,
    beyond_upstream: bool,
) -> Resource {
    Resource {
        group,
        version: "v1",
        kind,
        plural,
        in_system_namespace,
        label_selector,
        field_selector: None,
        beyond_upstream,
    }
}

/// Which of the watches an object or an event came from, in `WATCHED`'s order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Revisions,
    Routes,
    KnativeServices,
    PrivateEndpoints,
    PublicEndpoints,
    PrivateServices,
    ConfigMaps,
    Secrets,
}

impl Kind {
    const ALL: [Kind; WATCHED.len()] = [
        Kind::Revisions,
        Kind::Routes,
        Kind::KnativeServices,
        Kind::PrivateEndpoints,
        Kind::PublicEndpoints,
        Kind::PrivateServices,
        Kind::ConfigMaps,
        Kind::Secrets,
    ];

    fn watched(self) -> &'static Resource {
        &WATCHED[self as usize]
    }
}

impl Resource {
    /// `routes.serving.knative.dev`, as RBAC errors and the logs name it.
    pub fn resource(&self) -> String {
        if self.group.is_empty() { self.plural.to_owned() } else { format!("{}.{}", self.plural, self.group) }
    }

    fn api_resource(&self) -> ApiResource {
        let api_version =
            if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) };
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version,
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct KnativeConfig {
    /// Where Knative's ConfigMaps live (`SYSTEM_NAMESPACE`).
    pub system_namespace: String,
    /// This pod's IP (`POD_IP`), which places it among a revision's activators.
    pub pod_ip: Option<IpAddr>,
    /// What applies where `config-observability` says nothing (flags and `OTEL_*` variables).
    pub observability: ObservabilityConfig,
    pub config_maps: ConfigMapNames,
    /// Follows `config-logging`.
    pub log_level: LogLevel,
    /// Follows Secret `routing-serving-certs` and the trust-bundle ConfigMaps.
    pub internal_tls: Arc<InternalTls>,
    /// Objects per page when listing.
    pub page_size: u32,
    /// `--default-ids`: what applies while `config-affinity-activator` does not say.
    pub default_ids: bool,
}

/// The names of the ConfigMaps upstream lets the Deployment rename (`CONFIG_LOGGING_NAME`,
/// `CONFIG_OBSERVABILITY_NAME`).
#[derive(Clone, Debug)]
pub(crate) struct ConfigMapNames {
    pub logging: String,
    pub observability: String,
}

/// Upstream's network configuration, whose name is fixed.
const CONFIG_NETWORK: &str = "config-network";

/// Ours, in the system namespace beside upstream's: `default-ids` (Go's booleans) says whether
/// services that do not say read `K-Session` and `K-Revision`.
const CONFIG_AFFINITY: &str = "config-affinity-activator";

/// One watch's progress.
#[derive(Default)]
struct Feed {
    /// Listed once (or found forbidden, which is as far as it gets).
    synced: bool,
    forbidden: bool,
    /// Keys seen since a relist began; the others are gone at its end.
    relisting: Option<BTreeSet<Key>>,
}

/// What changed since the last publish.
#[derive(Default)]
struct Dirty {
    world: bool,
    revisions: BTreeSet<Key>,
    reprobe: BTreeMap<Key, Vec<SocketAddr>>,
}

pub(crate) struct KnativeSource {
    client: kube::Client,
    config: KnativeConfig,
    publisher: Arc<Publisher>,
    health: Arc<Health>,
    metrics: KubeMetrics,
    telemetry: Telemetry,
    feeds: [Feed; WATCHED.len()],
    reflection: Reflection,
    config_maps: BTreeMap<Key, BTreeMap<String, String>>,
    /// The ConfigMaps labelled as trust bundles, by key.
    trust_bundles: BTreeMap<Key, BTreeMap<String, String>>,
    /// Why each required watch that RBAC forbids keeps the activator unready.
    blocked: BTreeMap<Kind, String>,
    dirty: Dirty,
    published: bool,
}

impl KnativeSource {
    /// Connects with the pod's service account in a cluster, or `KUBECONFIG` outside one. The
    /// caller has made `health` require a sync before anything listens; this source reports it
    /// once the watches have listed once.
    pub(crate) async fn connect(
        config: KnativeConfig,
        publisher: Arc<Publisher>,
        health: Arc<Health>,
        (metrics, knative): (KubeMetrics, KnativeMetrics),
        telemetry: Telemetry,
    ) -> anyhow::Result<Self> {
        let client = super::kube_client::connect(knative).await?;
        let reflection = Reflection { pod_ip: config.pod_ip, ..Reflection::default() };
        Ok(KnativeSource {
            client,
            config,
            publisher,
            health,
            metrics,
            telemetry,
            feeds: Default::default(),
            reflection,
            config_maps: BTreeMap::new(),
            trust_bundles: BTreeMap::new(),
            blocked: BTreeMap::new(),
            dirty: Dirty::default(),
            published: false,
        })
    }

    /// Watches forever, publishing the world as it changes.
    pub(crate) async fn run(mut self) {
        let streams = Kind::ALL.into_iter().map(|kind| {
            let w = kind.watched();
            let resource = w.api_resource();
            let api: Api<DynamicObject> = if w.in_system_namespace {
                Api::namespaced_with(self.client.clone(), &self.config.system_namespace, &resource)
            } else {
                Api::all_with(self.client.clone(), &resource)
            };
            let mut config = watcher::Config::default().page_size(self.config.page_size.max(1));
            if let Some(selector) = w.label_selector {
                config = config.labels(selector);
            }
            if let Some(selector) = w.field_selector {
                config = config.fields(selector);
            }
            watcher::watcher(api, config).default_backoff().map(move |item| (kind, item)).boxed()
        });
        let mut all = futures_util::stream::select_all(streams);
        while let Some((kind, item)) = all.next().await {
            self.handle(kind, item);
            // Take whatever else has arrived too, so a burst is published once.
            while let Some(Some((kind, item))) = all.next().now_or_never() {
                self.handle(kind, item);
            }
            self.publish();
        }
    }

    fn handle(&mut self, kind: Kind, item: Result<Event<DynamicObject>, watcher::Error>) {
        let watched = kind.watched();
        let event = match item {
            Ok(event) => event,
            Err(error) => return self.failed(kind, error),
        };
        let feed = &mut self.feeds[kind as usize];
        let (object, deleted) = match event {
            Event::Init => {
                feed.relisting = Some(BTreeSet::new());
                return;
            }
            Event::InitDone => {
                let seen = feed.relisting.take().unwrap_or_default();
                feed.synced = true;
                if self.blocked.remove(&kind).is_some() {
                    self.health.set_sync_blocked(self.blocked.values().next().cloned());
                }
                let feed = &mut self.feeds[kind as usize];
                if std::mem::take(&mut feed.forbidden) {
                    self.metrics.forbidden.with_label_values(&[&watched.resource()]).set(0);
                    tracing::info!(resource = %watched.resource(), "can list {} now; affinity across a Route's revisions is on", watched.resource());
                }
                self.sweep(kind, &seen);
                self.dirty.world = true;
                return;
            }
            Event::InitApply(object) | Event::Apply(object) => (object, false),
            Event::Delete(object) => (object, true),
        };
        if let Some(expected) = Self::impostor(kind, &object) {
            self.metrics.ignored.with_label_values(&[&watched.resource()]).inc();
            let (ns, name) =
                (object.metadata.namespace.as_deref().unwrap_or(""), object.metadata.name.as_deref().unwrap_or(""));
            return tracing::warn!(
                resource = %watched.resource(), object = %format!("{ns}/{name}"),
                "ignoring an object labelled for a revision whose own is named {expected}: only that one says where its pods are"
            );
        }
        let read = Self::key_of(kind, &object).and_then(|key| {
            // A relisted object that does not read is still there: it keeps its last good version.
            if let Some(seen) = &mut self.feeds[kind as usize].relisting {
                seen.insert(key.clone());
            }
            if deleted {
                self.forget(kind, key);
                Ok(())
            } else {
                self.take(kind, &object, key)
            }
        });
        if let Err(reason) = read {
            self.metrics.rejected.with_label_values(&[&watched.resource()]).inc();
            let (ns, name) =
                (object.metadata.namespace.as_deref().unwrap_or(""), object.metadata.name.as_deref().unwrap_or(""));
            tracing::warn!(resource = %watched.resource(), object = %format!("{ns}/{name}"), %reason, "skipping an object that does not read; its last good version stays");
        }
    }

    /// A revision's Endpoints or private Service not named as serving's controllers name them
    /// (`<revision>-private`, the public Endpoints `<revision>`), with the name its own has: any
    /// Endpoints a tenant can write may carry a revision's labels, and must not say where the
    /// activator connects. `None` for anything else.
    fn impostor(kind: Kind, object: &DynamicObject) -> Option<String> {
        let revision = object.metadata.labels.as_ref()?.get(objects::REVISION_LABEL)?;
        let expected = match kind {
            Kind::PrivateEndpoints | Kind::PrivateServices => format!("{revision}-private"),
            Kind::PublicEndpoints => revision.clone(),
            _ => return None,
        };
        (object.metadata.name.as_deref() != Some(expected.as_str())).then_some(expected)
    }

    /// What an object of watch `kind` is filed under: a revision's Endpoints and Services under the
    /// revision, everything else under its own name.
    fn key_of(kind: Kind, object: &DynamicObject) -> Result<Key, String> {
        match kind {
            Kind::PrivateEndpoints | Kind::PublicEndpoints | Kind::PrivateServices => objects::revision_key(object),
            _ => objects::identity(object),
        }
    }

    /// Reads one object into the reflection, and notes what that changes.
    fn take(&mut self, kind: Kind, object: &DynamicObject, key: Key) -> Result<(), String> {
        let r = &mut self.reflection;
        match kind {
            Kind::Revisions => {
                r.revisions.insert(key, objects::revision(object)?);
                self.dirty.world = true;
            }
            Kind::Routes => {
                r.routes.get_or_insert_default().insert(key, objects::route(object)?);
                self.dirty.world = true;
            }
            Kind::KnativeServices => {
                r.services.get_or_insert_default().insert(key, objects::knative_service(object)?.1);
                self.dirty.world = true;
            }
            Kind::PrivateEndpoints => {
                let (_, info) = objects::private_endpoints(object)?;
                if let Some(before) = r.private_endpoints.get(&key) {
                    let pods = became_not_ready(before, &info);
                    if !pods.is_empty() {
                        self.dirty.reprobe.entry(key.clone()).or_default().extend(pods);
                    }
                }
                r.private_endpoints.insert(key.clone(), info);
                self.dirty.revisions.insert(key);
            }
            Kind::PublicEndpoints => {
                let activators = objects::public_endpoints(object)?.1;
                // Upstream's revision backends ignore an update that no longer lists this
                // activator (the SKS switched to Serve): the last index stays.
                let listed =
                    |ips: &objects::Ports<IpAddr>| r.pod_ip.is_some_and(|me| ips.values().any(|ips| ips.contains(&me)));
                if listed(&activators) || !r.public_endpoints.get(&key).is_some_and(listed) {
                    r.public_endpoints.insert(key.clone(), activators);
                    self.dirty.revisions.insert(key);
                } else {
                    tracing::info!(
                        namespace = %key.0, revision = %key.1,
                        "the revision's public Endpoints no longer list this activator; its share of the pods stays"
                    );
                }
            }
            Kind::PrivateServices => {
                // A headless Service is no way in: as good as none.
                match objects::private_service(object)?.1 {
                    Some(service) => r.private_services.insert(key.clone(), service),
                    None => r.private_services.remove(&key),
                };
                self.dirty.revisions.insert(key);
            }
            Kind::ConfigMaps => {
                let (_, data) = objects::config_map(object)?;
                let bundle = object.metadata.labels.as_ref().is_some_and(|l| l.contains_key(TRUST_BUNDLE_LABEL));
                self.trust_bundle(&key, bundle.then_some(&data));
                self.config_map(key, Some(data));
            }
            Kind::Secrets => {
                let (_, data) = objects::secret(object)?;
                self.config.internal_tls.set_secret(&data)?;
                tracing::info!(secret = %key.1, "the certificate of system-internal TLS is (re)loaded");
            }
        }
        Ok(())
    }

    /// Drops a deleted object, which needs no more of it than its key.
    fn forget(&mut self, kind: Kind, key: Key) {
        let r = &mut self.reflection;
        match kind {
            Kind::Revisions => {
                // The subset a revision kept when it left the activators' path goes with it.
                r.public_endpoints.remove(&key);
                self.dirty.world |= r.revisions.remove(&key).is_some();
            }
            Kind::Routes => self.dirty.world |= r.routes.get_or_insert_default().remove(&key).is_some(),
            Kind::KnativeServices => self.dirty.world |= r.services.get_or_insert_default().remove(&key).is_some(),
            Kind::PrivateEndpoints => {
                r.private_endpoints.remove(&key);
                self.dirty.revisions.insert(key);
            }
            // As an update that no longer lists this activator: the last index stays.
            Kind::PublicEndpoints => {}
            Kind::PrivateServices => {
                r.private_services.remove(&key);
                self.dirty.revisions.insert(key);
            }
            Kind::ConfigMaps => {
                self.trust_bundle(&key, None);
                self.config_map(key, None);
            }
            // As upstream's CertCache, which has no delete handler: the last certificate stays.
            Kind::Secrets => {
                tracing::warn!(secret = %key.1, "the TLS Secret was deleted; its last certificate keeps serving")
            }
        }
    }

    /// A ConfigMap of the system namespace changed: `config-network` shapes the world,
    /// `config-observability` what is exported about it, `config-logging` the log level. One
    /// that does not read is refused with a log line and a metric, and the last good one stays
    /// (upstream's watchers keep the previous config too); a deleted one leaves the defaults.
    fn config_map(&mut self, key: Key, data: Option<BTreeMap<String, String>>) {
        let empty = BTreeMap::new();
        let read = data.as_ref().unwrap_or(&empty);
        let name = key.1.as_str();
        tracing::debug!(configmap = name, deleted = data.is_none(), "a ConfigMap of the system namespace changed");
        let refused = |metrics: &KubeMetrics, problem: String| {
            metrics.rejected.with_label_values(&["configmaps"]).inc();
            tracing::warn!(configmap = name, %problem, "refusing the ConfigMap; the last good one stays");
        };
        if name == self.config.config_maps.observability {
            let observability = ObservabilityConfig::from_config_map(read, &self.config.observability, &mut |w| {
                tracing::warn!(configmap = name, "{w}")
            });
            self.telemetry.apply(&observability);
        }
        if name == self.config.config_maps.logging {
            match level_from_config_logging(read, "activator") {
                Ok(level) => self.config.log_level.set(level),
                Err(problem) => refused(&self.metrics, problem),
            }
        }
        if name == CONFIG_NETWORK {
            match objects::network_config(read, &mut |w| tracing::warn!(configmap = name, "{w}")) {
                Ok(network) => {
                    if network.internal_tls != self.reflection.network.internal_tls {
                        tracing::info!(
                            enabled = network.internal_tls,
                            "system-internal-tls changes: pods are reached accordingly, and the TLS port serves while enabled"
                        );
                        self.config.internal_tls.set_enabled(network.internal_tls);
                    }
                    self.reflection.network = network;
                    self.dirty.world = true;
                }
                Err(problem) => refused(&self.metrics, problem),
            }
        }
        if name == CONFIG_AFFINITY {
            let default_ids = match read.get("default-ids") {
                None => Some(self.config.default_ids),
                Some(value) => crate::go::parse_bool(value).or_else(|| {
                    refused(&self.metrics, format!("default-ids: {value:?} is neither true nor false"));
                    None
                }),
            };
            if let Some(on) = default_ids
                && self.publisher.set_default_ids(on)
            {
                tracing::info!(
                    default_ids = on,
                    "config-affinity-activator changes whether services read K-Session and K-Revision"
                );
                self.dirty.world = true;
            }
        }
        match data {
            Some(data) => self.config_maps.insert(key, data),
            None => self.config_maps.remove(&key),
        };
    }

    /// At the end of a relist: drops what it did not see again.
    fn sweep(&mut self, kind: Kind, seen: &BTreeSet<Key>) {
        let r = &mut self.reflection;
        match kind {
            Kind::Revisions => r.revisions.retain(|k, _| seen.contains(k)),
            Kind::Routes => r.routes.get_or_insert_default().retain(|k, _| seen.contains(k)),
            Kind::KnativeServices => r.services.get_or_insert_default().retain(|k, _| seen.contains(k)),
            Kind::PrivateEndpoints => r.private_endpoints.retain(|k, _| seen.contains(k)),
            Kind::PublicEndpoints => {
                let revisions = &r.revisions;
                r.public_endpoints.retain(|k, _| seen.contains(k) || revisions.contains_key(k));
            }
            Kind::PrivateServices => r.private_services.retain(|k, _| seen.contains(k)),
            Kind::ConfigMaps => {
                self.config_maps.retain(|k, _| seen.contains(k));
                let gone: Vec<Key> = self.trust_bundles.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                for key in gone {
                    self.trust_bundle(&key, None);
                }
            }
            _ => {}
        }
    }

    /// A trust-bundle ConfigMap changed (`None`: gone, or no longer labelled): pods are verified
    /// against every bundle there is now.
    fn trust_bundle(&mut self, key: &Key, data: Option<&BTreeMap<String, String>>) {
        let changed = match data {
            Some(data) => self.trust_bundles.insert(key.clone(), data.clone()).as_ref() != Some(data),
            None => self.trust_bundles.remove(key).is_some(),
        };
        if !changed {
            return;
        }
        let values = self
            .trust_bundles
            .iter()
            .flat_map(|((_, name), data)| data.iter().map(move |(k, v)| (format!("{name}/{k}"), v.as_str())));
        let values: Vec<(String, &str)> = values.collect();
        for problem in self.config.internal_tls.set_bundles(values.iter().map(|(n, v)| (n.as_str(), *v))) {
            self.metrics.rejected.with_label_values(&["configmaps"]).inc();
            tracing::warn!(%problem, "a trust bundle that does not read is skipped");
        }
    }

    fn failed(&mut self, kind: Kind, error: watcher::Error) {
        let watched = kind.watched();
        let resource = watched.resource();
        self.metrics.errors.with_label_values(&[&resource]).inc();
        if !super::kube_client::forbidden(&error) {
            tracing::warn!(%resource, error = %error, "watch failed; listing again after a back-off, the last view keeps serving");
            return;
        }
        // What upstream's activator watches it cannot do without: it stays unready, as upstream
        // never gets ready without its informers; what is ours (or only for TLS) it serves without.
        let required = !matches!(kind, Kind::Routes | Kind::KnativeServices | Kind::Secrets);
        let feed = &mut self.feeds[kind as usize];
        feed.synced |= !required;
        if std::mem::replace(&mut feed.forbidden, true) {
            return;
        }
        self.metrics.forbidden.with_label_values(&[&resource]).set(1);
        let scope = if watched.in_system_namespace {
            format!("a Role in {}", self.config.system_namespace)
        } else {
            "a ClusterRole".to_owned()
        };
        let effect = match kind {
            Kind::Routes => {
                "revision affinity across a Route's revisions is off, and each revision is served on its own \
                       with session affinity inside the revision the ingress chose"
            }
            Kind::KnativeServices => {
                "annotations on Knative Services are not read; revisions' own annotations still are"
            }
            Kind::Secrets => "system-internal TLS has no certificate to serve",
            _ => "the activator stays unready, as upstream's does without it",
        };
        let rule = format!(
            "{scope} rule `apiGroups: [\"{}\"], resources: [\"{}\"], verbs: [\"get\", \"list\", \"watch\"]`",
            watched.group, watched.plural
        );
        tracing::error!(%resource, "cannot list {resource} (forbidden by RBAC): {effect}. Grant it with {rule}");
        if required {
            self.blocked.insert(kind, format!("forbidden to list {resource}: grant it with {rule}"));
            self.health.set_sync_blocked(self.blocked.values().next().cloned());
        }
        match kind {
            Kind::Routes => self.reflection.routes = None,
            Kind::KnativeServices => self.reflection.services = None,
            _ => {}
        }
        self.dirty.world = true;
    }

    /// Publishes what changed, once every watch has listed once.
    fn publish(&mut self) {
        if !self.feeds.iter().all(|f| f.synced) {
            return;
        }
        let first = !self.published;
        if first {
            self.published = true;
            self.dirty.world = true;
        }
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.world {
            self.publisher.apply(&valid(self.reflection.world(), &self.publisher));
            // Ready once the first world is published, not before: a request the kubelet's
            // probe lets in finds its revision.
            if first {
                self.health.set_synced();
                tracing::info!(
                    revisions = self.reflection.revisions.len(),
                    "the view of Knative's objects is complete; ready"
                );
            }
        } else {
            for key in &dirty.revisions {
                if let Some(rev) = self.reflection.revisions.get(key) {
                    self.publisher.set_backends(&key.0, &key.1, &self.reflection.backends(rev));
                }
            }
        }
        for ((namespace, revision), pods) in &dirty.reprobe {
            self.publisher.reprobe(namespace, revision, pods);
        }
    }
}

/// Pods Kubernetes reported ready before and not ready now, on any port.
fn became_not_ready(before: &EndpointsInfo, now: &EndpointsInfo) -> Vec<SocketAddr> {
    before
        .ready
        .iter()
        .flat_map(|(port, pods)| {
            let now_not_ready = now.not_ready.get(port);
            pods.iter().filter(move |p| now_not_ready.is_some_and(|n| n.contains(p)))
        })
        .copied()
        .collect()
}

/// The services of `spec` that are valid, each other one skipped with a log line.
fn valid(spec: WorldSpec, publisher: &Publisher) -> WorldSpec {
    let mut names = BTreeSet::new();
    let services = spec
        .services
        .into_iter()
        .filter(|svc| {
            let problem = spec::validate_service(svc).err().map(|e| e.message).or_else(|| {
                (!names.insert((svc.namespace.clone(), svc.name.clone())))
                    .then(|| format!("service {}/{} is defined twice", svc.namespace, svc.name))
            });
            if let Some(problem) = &problem {
                publisher.rejected();
                tracing::warn!(%problem, "leaving a service out of the world");
            }
            problem.is_none()
        })
        .collect();
    WorldSpec { services }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_reads_the_watch_it_names() {
        assert!(Kind::ALL.iter().enumerate().all(|(i, kind)| *kind as usize == i));
        let expected = [
            (Kind::Revisions, "Revision", None),
            (Kind::Routes, "Route", None),
            (Kind::KnativeServices, "Service", None),
            (Kind::PrivateEndpoints, "Endpoints", Some(PRIVATE)),
            (Kind::PublicEndpoints, "Endpoints", Some(PUBLIC)),
            (Kind::PrivateServices, "Service", Some(PRIVATE)),
            (Kind::ConfigMaps, "ConfigMap", None),
            (Kind::Secrets, "Secret", None),
        ];
        for (kind, name, selector) in expected {
            let watched = kind.watched();
            assert_eq!((watched.kind, watched.label_selector), (name, selector), "{kind:?}");
        }
        assert_eq!(Kind::KnativeServices.watched().group, SERVING);
        assert_eq!(Kind::PrivateServices.watched().group, "");
    }

    #[test]
    fn the_watched_resources_name_their_rbac() {
        let resources: Vec<String> = WATCHED.iter().map(Resource::resource).collect();
        assert_eq!(
            resources,
            [
                "revisions.serving.knative.dev",
                "routes.serving.knative.dev",
                "services.serving.knative.dev",
                "endpoints",
                "endpoints",
                "services",
                "configmaps",
                "secrets"
            ]
        );
        let beyond: Vec<&str> = WATCHED.iter().filter(|w| w.beyond_upstream).map(|w| w.plural).collect();
        assert_eq!(beyond, ["routes", "services"], "upstream's activator reads neither Routes nor Knative Services");
    }

    #[test]
    fn pods_that_became_not_ready_are_found_per_port() {
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let before = EndpointsInfo {
            revision: "r".into(),
            ready: [("http".to_owned(), vec![addr("10.0.0.1:8012"), addr("10.0.0.2:8012")])].into(),
            not_ready: BTreeMap::new(),
            tls_ports: BTreeMap::new(),
            pod_names: BTreeMap::new(),
        };
        let now = EndpointsInfo {
            revision: "r".into(),
            ready: [("http".to_owned(), vec![addr("10.0.0.2:8012")])].into(),
            not_ready: [("http".to_owned(), vec![addr("10.0.0.1:8012"), addr("10.0.0.3:8012")])].into(),
            tls_ports: BTreeMap::new(),
            pod_names: BTreeMap::new(),
        };
        assert_eq!(became_not_ready(&before, &now), [addr("10.0.0.1:8012")]);
    }
}
