//! Every metric the activator exposes, registered once at start in one registry: each module's
//! own set, declared by that module and handed back to it by `main`. Composes only: imports the
//! modules whose metrics it gathers, and nothing but `main` (and tests that list every family)
//! imports it.

use prometheus::IntCounter;

use crate::affinity::Decisions;
use crate::autoscaler::ReporterMetrics;
use crate::metrics::Registrar;
use crate::pins::PinMetrics;
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
    pub stats: Stats,
    pub decisions: Decisions,
    pub pins: PinMetrics,
    pub session_ends: SessionEndMetrics,
    pub reporter: ReporterMetrics,
    pub kube: KubeMetrics,
    pub world: WorldMetrics,
    pub connections: ConnectionMetrics,
    pub handshakes_failed: HandshakeFailures,
    pub request_log_dropped: IntCounter,
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
