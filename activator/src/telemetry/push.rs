//! Pushing upstream's metrics over OTLP (`metrics-protocol: grpc | http/protobuf`), as upstream's
//! OpenTelemetry SDK does: every `metrics-export-interval`, the series of `stats::knative` are read
//! and sent as one `ExportMetricsServiceRequest` under upstream's instrument names, units and
//! attribute keys, cumulative since the process started.
//!
//! The request path keeps recording into Prometheus handles (atomics only); this module reads
//! them off the request path. A collector that is down costs one failed export per interval,
//! logged once until it answers again.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::proto::{MetricFamily, MetricType};
use prost::Message as _;

use crate::stats::knative::KnativeMetrics;

/// How the pushed data goes out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Destination {
    /// `POST` of the protobuf message to this URL (`.../v1/metrics`).
    Http(String),
    /// `MetricsService/Export` on this endpoint (`http://host:4317`).
    Grpc(String),
}

impl Destination {
    /// `metrics-endpoint` for `protocol`; a URL without a path gets OTLP's `/v1/metrics`.
    pub(super) fn http(endpoint: &str) -> Self {
        let endpoint = endpoint.trim_end_matches('/');
        let has_path = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest).contains('/');
        Destination::Http(if has_path { endpoint.to_owned() } else { format!("{endpoint}/v1/metrics") })
    }
}

/// When the process started: the start of every cumulative series.
static STARTED: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

/// Pushes every `interval` until the task is aborted.
pub(super) async fn run(metrics: KnativeMetrics, destination: Destination, interval: Duration) {
    LazyLock::force(&STARTED);
    let http = reqwest::Client::builder().no_proxy().timeout(interval.min(Duration::from_secs(30))).build();
    let mut grpc = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let request = export_request(&metrics.gather(), SystemTime::now());
        let sent = match &destination {
            Destination::Http(url) => match &http {
                Ok(client) => send_http(client, url, request).await,
                Err(e) => Err(e.to_string()),
            },
            Destination::Grpc(endpoint) => send_grpc(&mut grpc, endpoint, request).await,
        };
        match sent {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(?destination, "metrics export works again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(?destination, %error, "metrics export failed; retrying every interval");
            }
            Err(_) => {}
        }
    }
}

async fn send_http(client: &reqwest::Client, url: &str, request: ExportMetricsServiceRequest) -> Result<(), String> {
    let resp = client
        .post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match resp.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("the collector answered {status}")),
    }
}

async fn send_grpc(
    client: &mut Option<MetricsServiceClient<tonic::transport::Channel>>,
    endpoint: &str,
    request: ExportMetricsServiceRequest,
) -> Result<(), String> {
    if client.is_none() {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).map_err(|e| e.to_string())?;
        *client = Some(MetricsServiceClient::new(channel.connect_lazy()));
    }
    let sent = client.as_mut().expect("set above").export(request).await;
    sent.map(drop).map_err(|status| status.to_string())
}

/// Upstream's instrument for each of our Prometheus names: its OTLP name and unit.
const INSTRUMENTS: [(&str, &str, &str); 11] = [
    ("kn_revision_request_concurrency", "kn.revision.request.concurrency", "{request}"),
    ("kn_revision_request_queued", "kn.revision.request.queued", "{request}"),
    ("kn_revision_request_active", "kn.revision.request.active", "{request}"),
    ("kn_activator_stats_conn_reachable", "kn.activator.stats.conn.reachable", "{reachable}"),
    ("kn_activator_stats_conn_errors_total", "kn.activator.stats.conn.errors", "{error}"),
    ("http_server_request_duration_seconds", "http.server.request.duration", "s"),
    ("http_server_request_body_size_bytes", "http.server.request.body.size", "By"),
    ("http_server_response_body_size_bytes", "http.server.response.body.size", "By"),
    ("http_client_request_duration_seconds", "http.client.request.duration", "s"),
    ("http_client_request_body_size_bytes", "http.client.request.body.size", "By"),
    ("kn_k8s_client_http_response_status_code_total", "kn.k8s.client.http.response.status_code", "{item}"),
];

/// Upstream's attribute key for each of our label names: dots for underscores, except inside
/// `status_code`, the one key whose own name has one.
fn attribute_key(label: &str) -> String {
    match label {
        "http_response_status_code" => "http.response.status_code".to_owned(),
        other => other.replace('_', "."),
    }
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn text(key: String, value: &str) -> KeyValue {
    let value = Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) });
    KeyValue { key, value, ..Default::default() }
}

/// The export request for what `families` hold at `now`.
pub(super) fn export_request(families: &[MetricFamily], now: SystemTime) -> ExportMetricsServiceRequest {
    let (start, now) = (nanos(*STARTED), nanos(now));
    let metrics = families
        .iter()
        .filter_map(|family| {
            let (_, name, unit) = INSTRUMENTS.iter().find(|(prom, ..)| *prom == family.name())?;
            let attributes = |m: &prometheus::proto::Metric| {
                // An empty label is an attribute upstream does not set (no status, no revision).
                let labels = m.get_label().iter().filter(|l| !l.value().is_empty());
                labels.map(|l| text(attribute_key(l.name()), l.value())).collect::<Vec<_>>()
            };
            let number = |m: &prometheus::proto::Metric, value: number_data_point::Value| NumberDataPoint {
                attributes: attributes(m),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(value),
                ..Default::default()
            };
            let cumulative = AggregationTemporality::Cumulative as i32;
            let points = |value: &dyn Fn(&prometheus::proto::Metric) -> number_data_point::Value| {
                family.get_metric().iter().map(|m| number(m, value(m))).collect::<Vec<_>>()
            };
            let int = |value: f64| number_data_point::Value::AsInt(value as i64);
            let sum = |is_monotonic: bool, value: fn(&prometheus::proto::Metric) -> f64| {
                let data_points = points(&|m| int(value(m)));
                metric::Data::Sum(Sum { data_points, aggregation_temporality: cumulative, is_monotonic })
            };
            let data = match family.get_field_type() {
                // Upstream's up-down counters are sums that are not monotonic.
                MetricType::GAUGE if family.name().ends_with("_queued") || family.name().ends_with("_active") => {
                    sum(false, |m| m.get_gauge().get_value())
                }
                MetricType::GAUGE if family.name().ends_with("_reachable") => {
                    metric::Data::Gauge(Gauge { data_points: points(&|m| int(m.get_gauge().get_value())) })
                }
                MetricType::GAUGE => metric::Data::Gauge(Gauge {
                    data_points: points(&|m| number_data_point::Value::AsDouble(m.get_gauge().get_value())),
                }),
                MetricType::COUNTER => sum(true, |m| m.get_counter().get_value()),
                MetricType::HISTOGRAM => metric::Data::Histogram(Histogram {
                    data_points: family
                        .get_metric()
                        .iter()
                        .map(|m| histogram_point(m, attributes(m), start, now))
                        .collect(),
                    aggregation_temporality: cumulative,
                }),
                _ => return None,
            };
            Some(Metric { name: (*name).to_owned(), unit: (*unit).to_owned(), data: Some(data), ..Default::default() })
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![text("service.name".into(), "activator")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "knative.dev/serving/pkg/activator".into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Prometheus keeps cumulative bucket counts; OTLP wants the count of each bucket, the last
/// one above the highest bound.
fn histogram_point(
    m: &prometheus::proto::Metric,
    attributes: Vec<KeyValue>,
    start: u64,
    now: u64,
) -> HistogramDataPoint {
    let h = m.get_histogram();
    let buckets = h.get_bucket();
    let explicit_bounds: Vec<f64> = buckets.iter().map(|b| b.upper_bound()).filter(|bound| bound.is_finite()).collect();
    let mut below = 0;
    let mut bucket_counts: Vec<u64> = buckets
        .iter()
        .take(explicit_bounds.len())
        .map(|b| {
            let count = b.cumulative_count().saturating_sub(below);
            below = b.cumulative_count();
            count
        })
        .collect();
    bucket_counts.push(h.get_sample_count().saturating_sub(below));
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: h.get_sample_count(),
        sum: Some(h.get_sample_sum()),
        bucket_counts,
        explicit_bounds,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;
    use crate::stats::knative::{Protocol, RevisionNames};

    #[test]
    fn upstreams_instruments_with_their_units_attributes_and_buckets() {
        let stats = Stats::new();
        let names = RevisionNames {
            namespace: "ns".into(),
            service: "svc".into(),
            configuration: "svc".into(),
            revision: "svc-1".into(),
            server_address: "svc.example.com".into(),
        };
        let rev = stats.revision(names);
        let get = Protocol::of(&http::Method::GET, http::Version::HTTP_11);
        for ms in [3, 3, 40, 20_000] {
            rev.record(200, get, Duration::from_millis(ms)).record(Duration::from_millis(ms), 0, 10);
        }
        rev.knative.queued.set(2);
        rev.knative.concurrency.set(1.5);
        stats.knative.stats_conn_errors.inc();
        let request = export_request(&stats.knative.gather(), SystemTime::now());
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let by_name = |name: &str| metrics.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name}"));

        let duration = by_name("http.server.request.duration");
        assert_eq!(duration.unit, "s");
        let Some(metric::Data::Histogram(h)) = &duration.data else { panic!("{duration:?}") };
        let point = &h.data_points[0];
        assert_eq!(point.count, 4);
        assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
        assert_eq!(point.bucket_counts.iter().sum::<u64>(), 4, "{point:?}");
        assert_eq!(point.bucket_counts[0], 2, "two of 3 ms fall below 5 ms");
        assert_eq!(*point.bucket_counts.last().unwrap(), 1, "20 s is above the highest bound");
        let keys: Vec<&str> = point.attributes.iter().map(|kv| kv.key.as_str()).collect();
        for key in ["kn.service.name", "k8s.namespace.name", "http.request.method", "http.response.status_code"] {
            assert!(keys.contains(&key), "{keys:?}");
        }

        let Some(metric::Data::Sum(queued)) = &by_name("kn.revision.request.queued").data else { panic!() };
        assert!(!queued.is_monotonic);
        assert_eq!(queued.data_points[0].value, Some(number_data_point::Value::AsInt(2)));
        let Some(metric::Data::Sum(errors)) = &by_name("kn.activator.stats.conn.errors").data else { panic!() };
        assert!(errors.is_monotonic);
        let Some(metric::Data::Gauge(concurrency)) = &by_name("kn.revision.request.concurrency").data else { panic!() };
        assert_eq!(concurrency.data_points[0].value, Some(number_data_point::Value::AsDouble(1.5)));
    }

    #[test]
    fn an_endpoint_without_a_path_gets_otlps() {
        assert_eq!(Destination::http("http://c:4318"), Destination::Http("http://c:4318/v1/metrics".into()));
        assert_eq!(Destination::http("http://c:4318/"), Destination::Http("http://c:4318/v1/metrics".into()));
        assert_eq!(Destination::http("http://c/otlp/v1/metrics"), Destination::Http("http://c/otlp/v1/metrics".into()));
    }
}
