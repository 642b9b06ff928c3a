//! Every metric the activator exposes, registered once at start in one registry: each module's
//! own set, declared by that module and handed back to it by `app`. Composes only: imports the
//! modules whose metrics it gathers, and nothing but `app` (and tests that list every family)
//! imports it.

use prometheus::IntCounter;

use crate::affinity::Decisions;
use crate::autoscaler::ReporterMetrics;
use crate::deletion_cost::DeletionCostMetrics;
use crate::metrics::Registrar;
use crate::pins::PinMetrics;
use crate::seats::SeatMetrics;
use crate::server::ConnectionMetrics;
use crate::session_end::SessionEndMetrics;
use crate::source::knative::KubeMetrics;
use crate::stats::Stats;
use crate::telemetry::Telemetry;
use crate::tls::HandshakeFailures;
use crate::world::WorldMetrics;

pub struct Instruments {
    pub registrar: Registrar,
    /// Per-revision series, ours and upstream's.
    pub(crate) stats: Stats,
    pub(crate) decisions: Decisions,
    pub(crate) pins: PinMetrics,
    pub(crate) seats: SeatMetrics,
    pub(crate) deletion_cost: DeletionCostMetrics,
    pub(crate) session_ends: SessionEndMetrics,
    pub(crate) reporter: ReporterMetrics,
    pub(crate) kube: KubeMetrics,
    pub(crate) world: WorldMetrics,
    pub(crate) connections: ConnectionMetrics,
    pub(crate) handshakes_failed: HandshakeFailures,
    pub(crate) request_log_dropped: IntCounter,
}

impl Instruments {
    pub fn register() -> Self {
        let reg = Registrar::default();
        let stats = Stats::register(&reg);
        let handshakes_failed = HandshakeFailures::register(&reg);
        let knative = &stats.knative;
        Instruments {
            decisions: Decisions::register(&reg),
            pins: PinMetrics::register(&reg),
            seats: SeatMetrics::register(&reg),
            deletion_cost: DeletionCostMetrics::register(&reg),
            session_ends: SessionEndMetrics::register(&reg),
            reporter: ReporterMetrics::register(
                &reg,
                knative.stats_conn_reachable.clone(),
                knative.stats_conn_errors.clone(),
            ),
            kube: KubeMetrics::register(&reg),
            world: WorldMetrics::register(&reg),
            connections: ConnectionMetrics::register(&reg, handshakes_failed.clone()),
            handshakes_failed,
            request_log_dropped: Telemetry::register_dropped_lines(&reg),
            stats,
            registrar: reg,
        }
    }
}
