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
};

use crate::metrics::Registrar;

/// `http.server.request.duration`'s boundaries as OpenTelemetry's HTTP semantic conventions
/// advise, which otelhttp uses.
const DURATION_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// The OpenTelemetry SDK's default boundaries, which otelhttp's body sizes get.
const SIZE_BUCKETS: [f64; 15] =
    [0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 7500.0, 10000.0];

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
pub(crate) const PROTOCOLS: usize = (METHODS.len() + 1) * VERSIONS.len();

/// The closed-set attributes of a request: its method and HTTP version, as one small index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Protocol(u8);

impl Protocol {
    pub(crate) fn of(method: &Method, version: Version) -> Self {
        let m = METHODS.iter().position(|m| m == method).unwrap_or(METHODS.len());
        let v = match version {
            Version::HTTP_10 | Version::HTTP_09 => 0,
            Version::HTTP_11 => 1,
            _ => 2,
        };
        Protocol(u8::try_from(m * VERSIONS.len() + v).expect("fewer than 256 pairs"))
    }

    pub(crate) fn index(self) -> usize {
        usize::from(self.0)
    }

    pub(crate) fn from_index(index: usize) -> Self {
        Protocol(u8::try_from(index % PROTOCOLS).expect("fewer than 256 pairs"))
    }

    pub(crate) fn method(self) -> &'static str {
        METHODS.get(self.index() / VERSIONS.len()).map_or(OTHER_METHOD, Method::as_str)
    }

    pub(crate) fn version(self) -> &'static str {
        VERSIONS[self.index() % VERSIONS.len()]
    }

    /// The version as Go's `Request.Proto` spells it.
    pub(crate) fn proto(self) -> &'static str {
        ["HTTP/1.0", "HTTP/1.1", "HTTP/2.0"][self.index() % VERSIONS.len()]
    }
}

/// Upstream's instruments, in a registry of their own so they can be left out of `/metrics`
/// (`metrics-protocol: none`) or pushed instead.
#[derive(Clone)]
pub(crate) struct KnativeMetrics {
    /// Upstream's own registry, exposed only while exported.
    registry: Registrar,
    exported: Arc<AtomicBool>,
    concurrency: GaugeVec,
    queued: IntGaugeVec,
    active: IntGaugeVec,
    duration: HistogramVec,
    request_size: HistogramVec,
    response_size: HistogramVec,
    client_duration: HistogramVec,
    client_request_size: HistogramVec,
    kube_requests: IntCounterVec,
    pub stats_conn_reachable: IntGauge,
    pub stats_conn_errors: IntCounter,
}

/// otelhttp's server instruments for one series: recorded once the response has ended.
#[derive(Clone)]
pub(crate) struct ServerSeries {
    pub duration: Histogram,
    pub request_size: Histogram,
    pub response_size: Histogram,
}

impl ServerSeries {
    pub(crate) fn record(&self, elapsed: std::time::Duration, request_bytes: u64, response_bytes: u64) {
        self.duration.observe(elapsed.as_secs_f64());
        self.request_size.observe(request_bytes as f64);
        self.response_size.observe(response_bytes as f64);
    }
}

/// otelhttp's client instruments (the exchange with the pod) for one series.
#[derive(Clone)]
pub(crate) struct ClientSeries {
    /// From sending the request to the pod's response headers (or the failure).
    pub duration: Histogram,
    pub request_size: Histogram,
}

/// How a request reached the pod, for the client series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The labels upstream's `MetricAttributeHandler` puts on a revision's series.
pub(crate) const REVISION_LABELS: [&str; 4] =
    ["kn_service_name", "kn_configuration_name", "kn_revision_name", "k8s_namespace_name"];
/// otelhttp's server attributes and the revision's.
const SERVER_LABELS: [&str; 10] = [
    "http_request_method",
    "http_response_status_code",
    "network_protocol_name",
    "network_protocol_version",
    "url_scheme",
    "server_address",
    "kn_service_name",
    "kn_configuration_name",
    "kn_revision_name",
    "k8s_namespace_name",
];
/// otelhttp's client attributes (`error_type` only where the pod gave no status) and the
/// revision's. The pod's address is left out: it would add series with every pod that comes.
const CLIENT_LABELS: [&str; 10] = [
    "http_request_method",
    "http_response_status_code",
    "network_protocol_name",
    "network_protocol_version",
    "url_scheme",
    "error_type",
    "kn_service_name",
    "kn_configuration_name",
    "kn_revision_name",
    "k8s_namespace_name",
];
/// The value of `error_type` for an exchange the pod answered with no status.
const CLIENT_ERROR: &str = "_OTHER";

impl KnativeMetrics {
    pub(crate) fn new() -> Self {
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
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
                .expect("static metric definition")
        };
        let duration = histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests.",
            &DURATION_BUCKETS,
            &SERVER_LABELS,
        );
        let request_size = histogram(
            "http_server_request_body_size_bytes",
            "Size of HTTP server request bodies.",
            &SIZE_BUCKETS,
            &SERVER_LABELS,
        );
        let response_size = histogram(
            "http_server_response_body_size_bytes",
            "Size of HTTP server response bodies.",
            &SIZE_BUCKETS,
            &SERVER_LABELS,
        );
        let client_duration = histogram(
            "http_client_request_duration_seconds",
            "Duration of HTTP client requests.",
            &DURATION_BUCKETS,
            &CLIENT_LABELS,
        );
        let client_request_size = histogram(
            "http_client_request_body_size_bytes",
            "Size of HTTP client request bodies.",
            &SIZE_BUCKETS,
            &CLIENT_LABELS,
        );
        let kube_requests = IntCounterVec::new(
            Opts::new(
                "kn_k8s_client_http_response_status_code_total",
                "Count of response codes partitioned by method and host",
            ),
            &["server_address", "http_request_method", "http_response_status_code"],
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
        let registry = Registrar::default();
        registry.register(concurrency.clone());
        registry.register(queued.clone());
        registry.register(active.clone());
        registry.register(duration.clone());
        registry.register(request_size.clone());
        registry.register(response_size.clone());
        registry.register(client_duration.clone());
        registry.register(client_request_size.clone());
        registry.register(kube_requests.clone());
        registry.register(reachable.clone());
        registry.register(errors.clone());
        KnativeMetrics {
            registry,
            exported: Arc::new(AtomicBool::new(true)),
            concurrency,
            queued,
            active,
            duration,
            request_size,
            response_size,
            client_duration,
            client_request_size,
            kube_requests,
            stats_conn_reachable: reachable.with_label_values(&["autoscaler"]),
            stats_conn_errors: errors.with_label_values(&["autoscaler"]),
        }
    }

    /// Whether `/metrics` carries these series (`metrics-protocol: prometheus`).
    pub(crate) fn set_exported(&self, exported: bool) {
        self.exported.store(exported, Ordering::Relaxed);
    }

    pub(crate) fn exported(&self) -> bool {
        self.exported.load(Ordering::Relaxed)
    }

    pub(crate) fn family_names(&self) -> Vec<String> {
        self.registry.family_names()
    }

    pub(crate) fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// One revision's gauges.
    pub(crate) fn revision(&self, names: &RevisionNames) -> KnativeRevision {
        let short = [names.namespace.as_str(), &names.revision];
        KnativeRevision {
            concurrency: self.concurrency.with_label_values(&names.labels()),
            queued: self.queued.with_label_values(&short),
            active: self.active.with_label_values(&short),
        }
    }

    /// A request's server series; `names` is `None` for a request no revision took.
    pub(crate) fn server(&self, names: Option<&RevisionNames>, protocol: Protocol, code: u16) -> ServerSeries {
        let code = code.to_string();
        let labels = server_labels(names, protocol, &code);
        ServerSeries {
            duration: self.duration.with_label_values(&labels),
            request_size: self.request_size.with_label_values(&labels),
            response_size: self.response_size.with_label_values(&labels),
        }
    }

    /// The series of a revision's exchanges with its pods that ended with `code`, or with no
    /// status at all.
    pub(crate) fn client(
        &self,
        names: &RevisionNames,
        protocol: Protocol,
        code: Option<u16>,
        scheme: Scheme,
    ) -> ClientSeries {
        let code = code.map(|c| c.to_string());
        let labels = client_labels(names, protocol, code.as_deref(), scheme);
        ClientSeries {
            duration: self.client_duration.with_label_values(&labels),
            request_size: self.client_request_size.with_label_values(&labels),
        }
    }

    /// One answer of the Kubernetes API (`code` is `None` for a request that got none).
    pub(crate) fn kube_response(&self, host: &str, method: &str, code: Option<u16>) {
        // Upstream's recorder keeps 200 and requests that failed with no status (as 0); other
        // codes lose their label there, a bug not copied.
        let code = code.unwrap_or(0).to_string();
        self.kube_requests.with_label_values(&[host, &method.to_ascii_uppercase(), &code]).inc();
    }

    /// Removes a revision's series once it is gone; `recorded` lists the (protocol, code) pairs
    /// its requests were recorded under, `clients` the (protocol, code, scheme) of its exchanges.
    pub(crate) fn forget(
        &self,
        names: &RevisionNames,
        recorded: impl Iterator<Item = (Protocol, u16)>,
        clients: impl Iterator<Item = (Protocol, Option<u16>, Scheme)>,
    ) {
        let [svc, config, rev, ns] = names.labels();
        let _ = self.concurrency.remove_label_values(&[svc, config, rev, ns]);
        let _ = self.queued.remove_label_values(&[ns, rev]);
        let _ = self.active.remove_label_values(&[ns, rev]);
        for (protocol, code) in recorded {
            let code = code.to_string();
            let labels = server_labels(Some(names), protocol, &code);
            for vec in [&self.duration, &self.request_size, &self.response_size] {
                let _ = vec.remove_label_values(&labels);
            }
        }
        for (protocol, code, scheme) in clients {
            let code = code.map(|c| c.to_string());
            let labels = client_labels(names, protocol, code.as_deref(), scheme);
            for vec in [&self.client_duration, &self.client_request_size] {
                let _ = vec.remove_label_values(&labels);
            }
        }
    }
}

fn server_labels<'a>(names: Option<&'a RevisionNames>, protocol: Protocol, code: &'a str) -> [&'a str; 10] {
    let [svc, config, rev, ns] = names.map_or(["", "", "", ""], RevisionNames::labels);
    let address = names.map_or("", |n| n.server_address.as_str());
    [protocol.method(), code, "http", protocol.version(), "http", address, svc, config, rev, ns]
}

fn client_labels<'a>(
    names: &'a RevisionNames,
    protocol: Protocol,
    code: Option<&'a str>,
    scheme: Scheme,
) -> [&'a str; 10] {
    let [svc, config, rev, ns] = names.labels();
    let (code, error) = match code {
        Some(code) => (code, ""),
        None => ("", CLIENT_ERROR),
    };
    [protocol.method(), code, "http", protocol.version(), scheme.as_str(), error, svc, config, rev, ns]
}

impl Default for KnativeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Who a revision belongs to, as upstream labels it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RevisionNames {
    pub namespace: String,
    pub service: String,
    pub configuration: String,
    pub revision: String,
    /// The host its service is known by (`server.address`): from the world, never from what a
    /// client sends, so the series stay bounded.
    pub server_address: String,
}

impl RevisionNames {
    fn labels(&self) -> [&str; 4] {
        [&self.service, &self.configuration, &self.revision, &self.namespace]
    }
}

/// A revision's upstream gauges, resolved once.
pub(crate) struct KnativeRevision {
    /// Set by the autoscaler reporter on each report.
    pub concurrency: Gauge,
    pub queued: IntGauge,
    pub active: IntGauge,
}
