//! What `config-observability` (Knative mode) or the standard `OTEL_*` variables (any mode) ask
//! of metrics, traces and the request log, read into one value. Reading only: applying it is
//! `Telemetry`'s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::go;

/// Upstream's default `metrics-export-interval`.
pub(super) const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Where upstream's metric names go (`metrics-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum MetricsProtocol {
    /// Upstream's default: not exported.
    #[default]
    None,
    /// On `/metrics` of the admin port.
    Prometheus,
    /// Pushed over OTLP to `metrics-endpoint` every `metrics-export-interval`.
    Grpc,
    HttpProtobuf,
}

/// How spans leave the process (`tracing-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum TracingProtocol {
    #[default]
    None,
    Grpc,
    HttpProtobuf,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tracing {
    pub protocol: TracingProtocol,
    /// The collector; `None` leaves it to `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` and the
    /// exporter's default.
    pub endpoint: Option<String>,
    /// Parent-based: a request that arrives with a sampled (or unsampled) parent keeps that
    /// decision; a new trace is sampled at this ratio.
    pub sampling_rate: f64,
}

/// How an operator reads it in a log line: `off`, or the protocol, collector and sampling.
impl std::fmt::Display for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.protocol {
            TracingProtocol::None => return f.write_str("off"),
            TracingProtocol::Grpc => "grpc",
            TracingProtocol::HttpProtobuf => "http/protobuf",
        };
        let endpoint = self.endpoint.as_deref().unwrap_or("the OTEL_EXPORTER_OTLP_ENDPOINT default");
        write!(f, "{protocol} to {endpoint}, sampling {}% of new traces", self.sampling_rate * 100.0)
    }
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing { protocol: TracingProtocol::None, endpoint: None, sampling_rate: 1.0 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ObservabilityConfig {
    pub metrics_protocol: MetricsProtocol,
    /// Where pushed metrics go (`metrics-endpoint`).
    pub metrics_endpoint: Option<String>,
    pub metrics_export_interval: Duration,
    pub tracing: Tracing,
    /// One JSON line per request on stdout (`logging.enable-request-log`).
    pub request_log: bool,
    /// `OTEL_TRACES_SAMPLER_ARG`, which wins over `tracing-sampling-rate` as upstream's provider
    /// lets it.
    pub sampler_arg: Option<f64>,
    /// `logging.request-log-template`: lines in this Go template instead of our JSON.
    pub request_log_template: Option<String>,
    /// Where `metrics-endpoint` (with `metrics-protocol: prometheus`) moves upstream's Prometheus
    /// listener, `METRICS_PROMETHEUS_HOST` / `_PORT` overriding it as upstream's server does.
    pub prometheus_listen: Option<SocketAddr>,
    /// `METRICS_PROMETHEUS_HOST` and `METRICS_PROMETHEUS_PORT`.
    pub prometheus_env: (Option<String>, Option<String>),
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        ObservabilityConfig {
            metrics_protocol: MetricsProtocol::None,
            metrics_endpoint: None,
            metrics_export_interval: DEFAULT_EXPORT_INTERVAL,
            tracing: Tracing::default(),
            request_log: false,
            sampler_arg: None,
            request_log_template: None,
            prometheus_listen: None,
            prometheus_env: (None, None),
        }
    }
}

impl ObservabilityConfig {
    /// The defaults outside Knative: upstream's metric names on `/metrics`, traces when
    /// `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is set (protocol from
    /// `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`, ratio from `OTEL_TRACES_SAMPLER_ARG`).
    pub(crate) fn from_env(
        var: impl Fn(&str) -> Option<String>,
        request_log: bool,
        warn: &mut dyn FnMut(String),
    ) -> Self {
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL")) {
            _ if endpoint.is_none() => TracingProtocol::None,
            Some(p) if p == "grpc" => TracingProtocol::Grpc,
            Some(p) if p == "http/protobuf" => TracingProtocol::HttpProtobuf,
            None => TracingProtocol::HttpProtobuf,
            Some(other) => {
                warn(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not grpc or http/protobuf; using http/protobuf"
                ));
                TracingProtocol::HttpProtobuf
            }
        };
        let sampler_arg = var("OTEL_TRACES_SAMPLER_ARG").map(|arg| ratio(&arg, "OTEL_TRACES_SAMPLER_ARG", warn));
        ObservabilityConfig {
            metrics_protocol: MetricsProtocol::Prometheus,
            metrics_endpoint: None,
            metrics_export_interval: DEFAULT_EXPORT_INTERVAL,
            // The exporter reads the endpoint variables itself, adding `/v1/traces` where the
            // standard says to.
            tracing: Tracing { protocol, endpoint: None, sampling_rate: sampler_arg.unwrap_or(1.0) },
            request_log,
            sampler_arg,
            request_log_template: None,
            prometheus_listen: None,
            prometheus_env: (var("METRICS_PROMETHEUS_HOST"), var("METRICS_PROMETHEUS_PORT")),
        }
    }

    /// `config-observability`'s data, with `fallback` for what it leaves unset; values that do
    /// not read are reported through `warn` and leave the fallback in place.
    pub(crate) fn from_config_map(
        data: &BTreeMap<String, String>,
        fallback: &Self,
        warn: &mut dyn FnMut(String),
    ) -> Self {
        let get = |key: &str| data.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
        let metrics_protocol = match get("metrics-protocol") {
            None => MetricsProtocol::None,
            Some("none") => MetricsProtocol::None,
            Some("prometheus") => MetricsProtocol::Prometheus,
            Some("grpc") => MetricsProtocol::Grpc,
            Some("http/protobuf") => MetricsProtocol::HttpProtobuf,
            Some(other) => {
                warn(format!("metrics-protocol {other:?} is not none, prometheus, grpc or http/protobuf; ignored"));
                fallback.metrics_protocol
            }
        };
        // Upstream reads it with Go's `time.ParseDuration`: `1m30s` and `2.5s` are durations.
        let metrics_export_interval = match get("metrics-export-interval").map(go::parse_duration) {
            None => fallback.metrics_export_interval,
            Some(Some(interval)) if interval >= Duration::from_millis(10) => interval,
            Some(_) => {
                warn(format!(
                    "metrics-export-interval {:?} is not a duration of 10ms or more; using {:?}",
                    data["metrics-export-interval"], fallback.metrics_export_interval
                ));
                fallback.metrics_export_interval
            }
        };
        let metrics_endpoint = get("metrics-endpoint").map(str::to_owned).or_else(|| fallback.metrics_endpoint.clone());
        let mut tracing = fallback.tracing.clone();
        match get("tracing-protocol") {
            None => {}
            Some("none") => tracing.protocol = TracingProtocol::None,
            Some("grpc") => tracing.protocol = TracingProtocol::Grpc,
            Some("http/protobuf") => tracing.protocol = TracingProtocol::HttpProtobuf,
            Some(other) => warn(format!("tracing-protocol {other:?} is not none, grpc or http/protobuf; ignored")),
        }
        if let Some(endpoint) = get("tracing-endpoint") {
            tracing.endpoint = Some(endpoint.to_owned());
        }
        // Upstream's default rate is 0: with a protocol but no rate, new traces are not sampled.
        let configured = get("tracing-sampling-rate").map(|rate| ratio(rate, "tracing-sampling-rate", warn));
        tracing.sampling_rate = fallback.sampler_arg.or(configured).unwrap_or(0.0);
        let request_log = match data.get("logging.enable-request-log") {
            None => fallback.request_log,
            Some(v) => go::parse_bool(v).unwrap_or_else(|| {
                warn(format!("logging.enable-request-log {v:?} is not a boolean (true, false, 1, 0, …); ignored"));
                fallback.request_log
            }),
        };
        let prometheus_listen = match metrics_protocol {
            MetricsProtocol::Prometheus => {
                prometheus_listen(metrics_endpoint.as_deref(), &fallback.prometheus_env, warn)
            }
            _ => None,
        };
        ObservabilityConfig {
            prometheus_listen,
            prometheus_env: fallback.prometheus_env.clone(),
            metrics_protocol,
            metrics_endpoint,
            metrics_export_interval,
            tracing,
            request_log,
            sampler_arg: fallback.sampler_arg,
            request_log_template: get("logging.request-log-template").map(str::to_owned),
        }
    }
}

/// Upstream's Prometheus server address (`knative.dev/pkg/observability/metrics/prometheus`
/// `NewServer`): `metrics-endpoint` as `host:port`, each part overridden by its variable; an empty
/// host is every address; the port must be 1024 to 65535. `None`: the admin port's `/metrics`.
fn prometheus_listen(
    endpoint: Option<&str>,
    env: &(Option<String>, Option<String>),
    warn: &mut dyn FnMut(String),
) -> Option<SocketAddr> {
    let (mut host, mut port) = match endpoint {
        Some(endpoint) => match endpoint.rsplit_once(':') {
            Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']').to_owned(), port.to_owned()),
            None => {
                warn(format!("metrics-endpoint {endpoint:?} for prometheus should be \"host:port\"; ignored"));
                return None;
            }
        },
        None => (String::new(), String::new()),
    };
    if let Some(h) = &env.0 {
        host = h.clone();
    }
    if let Some(p) = &env.1 {
        port = p.clone();
    }
    if endpoint.is_none() && env.0.is_none() && env.1.is_none() {
        return None;
    }
    let port = if port.is_empty() { "9090" } else { port.as_str() };
    let Some(port) = port.parse::<u16>().ok().filter(|p| *p >= 1024) else {
        warn(format!("the Prometheus port {port:?} is not 1024 to 65535; ignored"));
        return None;
    };
    let ip = if host.is_empty() {
        std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        match host.parse() {
            Ok(ip) => ip,
            Err(_) => {
                warn(format!("the Prometheus host {host:?} is not an IP address; ignored"));
                return None;
            }
        }
    };
    Some(SocketAddr::new(ip, port))
}

/// A sampling ratio in `[0, 1]`; anything else is reported and read as 1.
fn ratio(text: &str, name: &str, warn: &mut dyn FnMut(String)) -> f64 {
    match text.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => r,
        _ => {
            warn(format!("{name} {text:?} is not a ratio between 0 and 1; sampling every trace"));
            1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn config_observability_reads_as_upstream_documents_it() {
        let mut warnings = Vec::new();
        let fallback = ObservabilityConfig::default();
        let read = |pairs: &[(&str, &str)], warnings: &mut Vec<String>| {
            ObservabilityConfig::from_config_map(&map(pairs), &fallback, &mut |w| warnings.push(w))
        };
        let defaults = read(&[], &mut warnings);
        assert_eq!(defaults.tracing.sampling_rate, 0.0, "upstream's default rate");
        assert_eq!(
            defaults,
            ObservabilityConfig { tracing: Tracing { sampling_rate: 0.0, ..Tracing::default() }, ..fallback.clone() },
            "upstream's defaults: nothing exported"
        );
        let full = read(
            &[
                ("metrics-protocol", "http/protobuf"),
                ("metrics-endpoint", "http://collector:4318"),
                ("metrics-export-interval", "1m2.5s"),
                ("tracing-protocol", "grpc"),
                ("tracing-endpoint", "http://collector:4317"),
                ("tracing-sampling-rate", "0.25"),
                ("logging.enable-request-log", "true"),
            ],
            &mut warnings,
        );
        assert_eq!(full.metrics_protocol, MetricsProtocol::HttpProtobuf);
        assert_eq!(full.metrics_endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(full.metrics_export_interval, Duration::from_millis(62_500), "as Go spells durations");
        assert_eq!(full.tracing.protocol, TracingProtocol::Grpc);
        assert_eq!(full.tracing.endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(full.tracing.sampling_rate, 0.25);
        assert!(full.request_log);
        assert!(warnings.is_empty(), "{warnings:?}");
        let bad = read(
            &[
                ("metrics-protocol", "statsd"),
                ("metrics-export-interval", "soon"),
                ("tracing-protocol", "zipkin"),
                ("tracing-sampling-rate", "2"),
            ],
            &mut warnings,
        );
        assert_eq!(bad.metrics_protocol, MetricsProtocol::None);
        assert_eq!((bad.tracing.protocol, bad.tracing.sampling_rate), (TracingProtocol::None, 1.0));
        let go_bool = read(&[("logging.enable-request-log", "T")], &mut warnings);
        assert!(go_bool.request_log, "Go's strconv.ParseBool");
        let with_arg = ObservabilityConfig { sampler_arg: Some(0.5), ..fallback.clone() };
        let overridden =
            ObservabilityConfig::from_config_map(&map(&[("tracing-sampling-rate", "0.1")]), &with_arg, &mut |_| {});
        assert_eq!(overridden.tracing.sampling_rate, 0.5, "OTEL_TRACES_SAMPLER_ARG wins, as upstream's provider");
        assert_eq!(bad.metrics_export_interval, DEFAULT_EXPORT_INTERVAL);
        assert_eq!(warnings.len(), 4, "{warnings:?}");
    }

    /// Upstream's `NewServer` (`knative.dev/pkg/observability/metrics/prometheus/server.go`):
    /// `host:port`, the variables winning, the port 1024 to 65535.
    #[test]
    fn metrics_endpoint_moves_the_prometheus_listener() {
        let mut warnings = Vec::new();
        let none = (None, None);
        let at = |endpoint: Option<&str>, env: &(Option<String>, Option<String>), w: &mut Vec<String>| {
            prometheus_listen(endpoint, env, &mut |m| w.push(m))
        };
        assert_eq!(at(None, &none, &mut warnings), None, "unmoved: the admin port serves it");
        assert_eq!(at(Some(":9091"), &none, &mut warnings), Some("[::]:9091".parse().unwrap()));
        assert_eq!(at(Some("127.0.0.1:9092"), &none, &mut warnings), Some("127.0.0.1:9092".parse().unwrap()));
        let port = (None, Some("9093".to_owned()));
        assert_eq!(at(Some("127.0.0.1:9092"), &port, &mut warnings), Some("127.0.0.1:9093".parse().unwrap()));
        assert_eq!(at(Some(":80"), &none, &mut warnings), None);
        assert_eq!(at(Some("9091"), &none, &mut warnings), None);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    #[test]
    fn the_standard_variables_turn_traces_on() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let mut warn = |w: String| panic!("{w}");
        let off = ObservabilityConfig::from_env(env(&[]), false, &mut warn);
        assert_eq!(off.tracing.protocol, TracingProtocol::None);
        assert_eq!(off.metrics_protocol, MetricsProtocol::Prometheus);
        let on = ObservabilityConfig::from_env(
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
            ]),
            true,
            &mut warn,
        );
        assert_eq!((on.tracing.protocol, on.tracing.sampling_rate, on.request_log), (TracingProtocol::Grpc, 0.5, true));
    }
}
