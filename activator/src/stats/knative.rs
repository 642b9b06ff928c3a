//! Upstream's metric names (`knative.dev/serving/pkg/activator`, serving ≥ 1.19), as its
//! Prometheus exporter writes them, so dashboards and alerts built on the stock activator keep
//! working when the image is swapped: names, types, units and label names are upstream's.
//!
//! Label values come from the world (namespaces, services, configurations, revisions) and from a
//! closed set (methods, protocol versions, status codes), never from what a client sends: an
//! unknown method is `_OTHER` and the `Host` of an unknown service is not recorded at all. Owns
//! these series only; when they are exported is `telemetry`'s to say.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Version};
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// `http.server.request.duration`'s boundaries as OpenTelemetry's HTTP semantic conventions
/// advise, which otelhttp uses.
const DURATION_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// The semantic conventions' well-known methods; any other is recorded as `_OTHER`.
const METHODS: [Method; 9] = [
    Method::CONNECT,
    Method::DELETE,
    Method::GET,
    Method::HEAD,
    Method::OPTIONS,
    Method::PATCH,
    Method::POST,
    Method::PUT,
    Method::TRACE,
];
const OTHER_METHOD: &str = "_OTHER";
const VERSIONS: [&str; 3] = ["1.0", "1.1", "2"];
/// Distinct (method, protocol version) pairs a request can be recorded under.
pub const PROTOCOLS: usize = (METHODS.len() + 1) * VERSIONS.len();

/// The closed-set attributes of a request: its method and HTTP version, as one small index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocol(u8);

impl Protocol {
    pub fn of(method: &Method, version: Version) -> Self {
        let m = METHODS.iter().position(|m| m == method).unwrap_or(METHODS.len());
        let v = match version {
            Version::HTTP_10 | Version::HTTP_09 => 0,
            Version::HTTP_11 => 1,
            _ => 2,
        };
        Protocol(u8::try_from(m * VERSIONS.len() + v).expect("fewer than 256 pairs"))
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    pub fn from_index(index: usize) -> Self {
        Protocol(u8::try_from(index % PROTOCOLS).expect("fewer than 256 pairs"))
    }

    pub fn method(self) -> &'static str {
        METHODS.get(self.index() / VERSIONS.len()).map_or(OTHER_METHOD, Method::as_str)
    }

    pub fn version(self) -> &'static str {
        VERSIONS[self.index() % VERSIONS.len()]
    }
}

/// Upstream's instruments, in a registry of their own so they can be left out of `/metrics`
/// (`metrics-protocol: none`) or pushed instead.
#[derive(Clone)]
pub struct KnativeMetrics {
    registry: Registry,
    /// The names of the families registered, series or not.
    families: Arc<Vec<String>>,
    exported: Arc<AtomicBool>,
    concurrency: GaugeVec,
    queued: IntGaugeVec,
    active: IntGaugeVec,
    duration: HistogramVec,
    pub stats_conn_reachable: IntGauge,
    pub stats_conn_errors: IntCounter,
}

/// The labels upstream's `MetricAttributeHandler` puts on a revision's series.
pub const REVISION_LABELS: [&str; 4] =
    ["kn_service_name", "kn_configuration_name", "kn_revision_name", "k8s_namespace_name"];
const DURATION_LABELS: [&str; 9] = [
    "http_request_method",
    "http_response_status_code",
    "network_protocol_name",
    "network_protocol_version",
    "url_scheme",
    "kn_service_name",
    "kn_configuration_name",
    "kn_revision_name",
    "k8s_namespace_name",
];

impl KnativeMetrics {
    pub fn new() -> Self {
        let concurrency = GaugeVec::new(
            Opts::new(
                "kn_revision_request_concurrency",
                "Concurrent requests per revision, the adjusted average of each report to the autoscaler",
            ),
            &REVISION_LABELS,
        )
        .expect("static metric definition");
        let queued = IntGaugeVec::new(
            Opts::new("kn_revision_request_queued", "Requests waiting for capacity"),
            &["k8s_namespace_name", "kn_revision_name"],
        )
        .expect("static metric definition");
        let active = IntGaugeVec::new(
            Opts::new("kn_revision_request_active", "Requests being proxied"),
            &["k8s_namespace_name", "kn_revision_name"],
        )
        .expect("static metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new("http_server_request_duration_seconds", "Duration of HTTP server requests.")
                .buckets(DURATION_BUCKETS.to_vec()),
            &DURATION_LABELS,
        )
        .expect("static metric definition");
        let reachable = IntGaugeVec::new(
            Opts::new("kn_activator_stats_conn_reachable", "Whether the autoscaler is reachable (1) or not (0)"),
            &["peer"],
        )
        .expect("static metric definition");
        let errors = IntCounterVec::new(
            Opts::new("kn_activator_stats_conn_errors_total", "Errors connecting or sending stats to the autoscaler"),
            &["peer"],
        )
        .expect("static metric definition");
        let registry = Registry::new();
        let families = super::register(
            &registry,
            [
                Box::new(concurrency.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(queued.clone()),
                Box::new(active.clone()),
                Box::new(duration.clone()),
                Box::new(reachable.clone()),
                Box::new(errors.clone()),
            ],
        );
        KnativeMetrics {
            registry,
            families: Arc::new(families),
            exported: Arc::new(AtomicBool::new(true)),
            concurrency,
            queued,
            active,
            duration,
            stats_conn_reachable: reachable.with_label_values(&["autoscaler"]),
            stats_conn_errors: errors.with_label_values(&["autoscaler"]),
        }
    }

    /// Whether `/metrics` carries these series (`metrics-protocol: prometheus`).
    pub fn set_exported(&self, exported: bool) {
        self.exported.store(exported, Ordering::Relaxed);
    }

    pub fn exported(&self) -> bool {
        self.exported.load(Ordering::Relaxed)
    }

    pub fn family_names(&self) -> &[String] {
        &self.families
    }

    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// One revision's gauges.
    pub fn revision(&self, names: &RevisionNames) -> KnativeRevision {
        let short = [names.namespace.as_str(), &names.revision];
        KnativeRevision {
            concurrency: self.concurrency.with_label_values(&names.labels()),
            queued: self.queued.with_label_values(&short),
            active: self.active.with_label_values(&short),
        }
    }

    /// A request's duration series; `names` is `None` for a request no revision took.
    pub fn duration(&self, names: Option<&RevisionNames>, protocol: Protocol, code: u16) -> Histogram {
        let code = code.to_string();
        let [svc, config, rev, ns] = names.map_or(["", "", "", ""], RevisionNames::labels);
        self.duration.with_label_values(&[
            protocol.method(),
            &code,
            "http",
            protocol.version(),
            "http",
            svc,
            config,
            rev,
            ns,
        ])
    }

    /// Removes a revision's series once it is gone; `recorded` lists the (protocol, code) pairs
    /// its requests were recorded under.
    pub fn forget(&self, names: &RevisionNames, recorded: impl Iterator<Item = (Protocol, u16)>) {
        let [svc, config, rev, ns] = names.labels();
        let _ = self.concurrency.remove_label_values(&[svc, config, rev, ns]);
        let _ = self.queued.remove_label_values(&[ns, rev]);
        let _ = self.active.remove_label_values(&[ns, rev]);
        for (protocol, code) in recorded {
            let code = code.to_string();
            let labels = [protocol.method(), &code, "http", protocol.version(), "http", svc, config, rev, ns];
            let _ = self.duration.remove_label_values(&labels);
        }
    }
}

impl Default for KnativeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Who a revision belongs to, as upstream labels it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RevisionNames {
    pub namespace: String,
    pub service: String,
    pub configuration: String,
    pub revision: String,
}

impl RevisionNames {
    fn labels(&self) -> [&str; 4] {
        [&self.service, &self.configuration, &self.revision, &self.namespace]
    }
}

/// A revision's upstream gauges, resolved once.
pub struct KnativeRevision {
    /// Set by the autoscaler reporter on each report.
    pub concurrency: Gauge,
    pub queued: IntGauge,
    pub active: IntGauge,
}
