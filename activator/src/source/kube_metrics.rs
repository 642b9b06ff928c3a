//! The cluster sources' metrics (Knative and standalone modes), by the resource they concern:
//! watches RBAC forbids, watch failures, and objects skipped for not reading or for claiming to be
//! what they are not.

use prometheus::{IntCounterVec, IntGaugeVec};

use crate::metrics::Registrar;

#[derive(Clone)]
pub(crate) struct KubeMetrics {
    pub(crate) forbidden: IntGaugeVec,
    pub(crate) rejected: IntCounterVec,
    pub(crate) errors: IntCounterVec,
    /// Objects that claim to be what they are not (a revision's Endpoints under another name).
    pub(crate) ignored: IntCounterVec,
}

impl KubeMetrics {
    pub(crate) fn register(reg: &Registrar) -> Self {
        KubeMetrics {
            forbidden: reg.gauge_vec(
                "activator_kube_watch_forbidden",
                "1 while RBAC forbids listing this resource (Knative and standalone modes)",
                &["resource"],
            ),
            rejected: reg.counter_vec(
                "activator_kube_objects_rejected_total",
                "Resource objects skipped because they do not read",
                &["resource"],
            ),
            errors: reg.counter_vec(
                "activator_kube_watch_errors_total",
                "Watch and list failures, each retried after a back-off",
                &["resource"],
            ),
            ignored: reg.counter_vec(
                "activator_kube_objects_ignored_total",
                "Resource objects ignored for claiming to be what they are not (a revision's Endpoints under another name)",
                &["resource"],
            ),
        }
    }
}
