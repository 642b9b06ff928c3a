//! Pin-aware scale-down (`--pod-deletion-cost`): keeps each pod's
//! `controller.kubernetes.io/pod-deletion-cost` annotation at the live sessions pinned to it, so a
//! ReplicaSet scaling down removes the pod holding the fewest sessions first.
//!
//! One replica writes for all (the `deletion-cost` lease in Redis; without Redis, the only
//! replica), every `--pod-deletion-cost-interval`, only annotations whose value changed since it
//! wrote them (each pod once when it begins to lead, whatever another writer left), and at most
//! `MAX_WRITES` of them per round. Sessions are counted from the pin store for every replica.
//! A pod is named by its Endpoints' (or EndpointSlice's) `targetRef`; pods the platform does not
//! name are left alone. Without RBAC to patch pods: one log line, `activator_pod_deletion_cost_forbidden`
//! at 1, and nothing else changes; it tries again after `FORBIDDEN_PAUSE`.
//!
//! Must not route, nor change pins: it reads both.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use prometheus::{IntCounter, IntGauge};

use crate::labelled::{Labelled, label_values};
use crate::metrics::Registrar;
use crate::pins::Pins;
use crate::world::Snapshot;

/// The annotation the ReplicaSet controller orders scale-down by (lower goes first).
pub(crate) const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Patches one round may send; the rest wait for the next round.
const MAX_WRITES: usize = 50;
/// How long to wait before trying again once the API server refused to let us patch pods.
const FORBIDDEN_PAUSE: Duration = Duration::from_secs(300);

label_values! {
    /// What became of one annotation write.
    pub(crate) enum Wrote {
        Written = "written",
        /// The pod is gone.
        Gone = "gone",
        /// RBAC does not let the activator patch pods.
        Forbidden = "forbidden",
        Failed = "failed",
    }
}

label_values! {
    /// What one round was.
    pub(crate) enum Round {
        /// This replica wrote (or had nothing to write).
        Writer = "writer",
        /// Another replica holds the lease, or Redis could not say.
        Follower = "follower",
        /// Waiting after the API server refused a patch.
        Paused = "paused",
    }
}

#[derive(Clone)]
pub(crate) struct DeletionCostMetrics {
    writes: Labelled<Wrote, IntCounter>,
    rounds: Labelled<Round, IntCounter>,
    forbidden: IntGauge,
}

impl DeletionCostMetrics {
    pub(crate) fn register(reg: &Registrar) -> Self {
        DeletionCostMetrics {
            writes: Labelled::new(
                &reg.counter_vec(
                    "activator_pod_deletion_cost_writes_total",
                    "Writes of pods' controller.kubernetes.io/pod-deletion-cost (--pod-deletion-cost), by result: \
                     written, gone, forbidden, failed",
                    &["result"],
                ),
                &[],
            ),
            rounds: Labelled::new(
                &reg.counter_vec(
                    "activator_pod_deletion_cost_rounds_total",
                    "Rounds of --pod-deletion-cost, by this replica's part: writer, follower (another replica \
                     writes), paused (after the API server refused a patch)",
                    &["role"],
                ),
                &[],
            ),
            forbidden: reg.gauge(
                "activator_pod_deletion_cost_forbidden",
                "1 while the activator may not patch pods, so --pod-deletion-cost writes nothing (add the optional \
                 pod-deletion-cost RBAC rule)",
            ),
        }
    }
}

/// The writer, once `--pod-deletion-cost` turned it on.
pub(crate) struct DeletionCost {
    pub client: kube::Client,
    pub interval: Duration,
    pub metrics: DeletionCostMetrics,
}

/// A Pod, by namespace and name.
type PodName = (String, String);

impl DeletionCost {
    /// Writes the pods' deletion costs every interval, for as long as the process runs.
    pub(crate) async fn run(self, world: Arc<ArcSwap<Snapshot>>, pins: &Pins) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What each pod's annotation was last set to here.
        let mut written: HashMap<PodName, u64> = HashMap::new();
        let mut paused_until: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            if paused_until.is_some_and(|until| tokio::time::Instant::now() < until) {
                self.metrics.rounds.get(Round::Paused).inc();
                continue;
            }
            // A replica that cannot tell whether it leads writes nothing: two writers would
            // undo each other's rounds.
            if pins.lead("deletion-cost", self.interval * 3).await != Some(true) {
                self.metrics.rounds.get(Round::Follower).inc();
                written.clear();
                continue;
            }
            self.metrics.rounds.get(Round::Writer).inc();
            let Some(costs) = costs(&world.load_full(), pins).await else { continue };
            written.retain(|pod, _| costs.contains_key(pod));
            let due: Vec<(&PodName, &u64)> = costs
                .iter()
                // A pod not written here (since this replica leads) may carry another writer's
                // value, so it is written once whatever its cost, zero included.
                .filter(|(pod, cost)| written.get(*pod) != Some(*cost))
                .take(MAX_WRITES)
                .collect();
            for ((namespace, name), cost) in due {
                match self.write(namespace, name, *cost).await {
                    Wrote::Written => {
                        written.insert((namespace.clone(), name.clone()), *cost);
                    }
                    Wrote::Forbidden => {
                        paused_until = Some(tokio::time::Instant::now() + FORBIDDEN_PAUSE);
                        break;
                    }
                    Wrote::Gone | Wrote::Failed => {}
                }
            }
        }
    }

    /// Sets one pod's annotation to `cost`.
    async fn write(&self, namespace: &str, name: &str, cost: u64) -> Wrote {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let cost = i32::try_from(cost).unwrap_or(i32::MAX).to_string();
        let patch = serde_json::json!({ "metadata": { "annotations": { ANNOTATION: cost } } });
        let wrote = match pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Wrote::Written,
            Err(kube::Error::Api(status)) if status.code == 404 => Wrote::Gone,
            Err(kube::Error::Api(status)) if status.code == 403 => {
                if self.metrics.forbidden.get() == 0 {
                    tracing::warn!(
                        %namespace,
                        pod = %name,
                        "--pod-deletion-cost: the activator may not patch pods ({}); add the optional \
                         pod-deletion-cost RBAC rule (manifests/knative/pod-deletion-cost). Scale-down order is \
                         left to the ReplicaSet; everything else works as before",
                        status.message
                    );
                }
                self.metrics.forbidden.set(1);
                Wrote::Forbidden
            }
            Err(e) => {
                tracing::warn!(%namespace, pod = %name, error = %e, "could not write a pod's deletion cost; next round");
                Wrote::Failed
            }
        };
        if wrote == Wrote::Written {
            self.metrics.forbidden.set(0);
        }
        self.metrics.writes.get(wrote).inc();
        wrote
    }
}

/// Each named pod's live sessions, over every service whose traffic lists its revision. `None`
/// if a service's sessions could not be counted (Redis did not answer): no round on half the
/// truth.
async fn costs(world: &Snapshot, pins: &Pins) -> Option<BTreeMap<PodName, u64>> {
    let mut costs = BTreeMap::new();
    for service in world.services() {
        let named: Vec<_> = service.traffic.iter().map(|t| (&t.revision, t.revision.throttler.named_pods())).collect();
        // A service whose pods the platform does not name has nothing to write: its sessions
        // are not counted.
        if named.iter().all(|(_, pods)| pods.is_empty()) {
            continue;
        }
        let counts = pins.sessions_by_pod(service.affinity.scope()).await?;
        for (revision, pods) in named {
            for (pod, name) in pods {
                let sessions = counts.get(&(revision.name.clone(), pod)).copied().unwrap_or(0);
                *costs.entry((revision.namespace.clone(), name)).or_default() += sessions;
            }
        }
    }
    Some(costs)
}
