//! What the activator tells the outside: OTLP spans carrying the routing decision, received by
//! our own OTLP receiver over real HTTP and gRPC; trace context passed on to the pod; upstream's
//! metric names on `/metrics`; the request log; and series counts that client input cannot grow.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use integration_tests::otlp::{Receiver, Span};
use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, Process, addrs, wait_pin_store_up, wait_until};

const SPANS_WITHIN: Duration = Duration::from_secs(20);

/// Exports every span at once rather than after the SDK's default five seconds.
fn otlp_env(endpoint: String, protocol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
    ]
}

/// The server span of the request whose pod saw `traceparent` with `trace_id`.
async fn handle_span(receiver: &Receiver, trace_id: &str) -> Span {
    receiver
        .wait_for(SPANS_WITHIN, &format!("the span of trace {trace_id}"), |s| {
            s.name == "handle" && s.trace_id == trace_id
        })
        .await
}

/// A W3C `traceparent` the client starts its trace with, sampled.
fn traceparent(n: u8) -> (String, String, String) {
    let trace_id = format!("{:032x}", 0xabc0_0000_u128 + u128::from(n));
    let parent = format!("{:016x}", 0x1000_u64 + u64::from(n));
    (format!("00-{trace_id}-{parent}-01"), trace_id, parent)
}

/// The `traceparent` the pod received, from demo-service's `/headers` echo.
fn forwarded_traceparent(body: &str) -> String {
    body.lines().find_map(|l| l.strip_prefix("traceparent: ")).unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_decision_and_the_pod_continues_the_trace() {
    let env = Env::new();
    let receiver = Receiver::start().await;
    let pods = env.pods("counter-1", 2).await;
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods))]));
    let activator = env.activator_with_env(&[], &otlp_env(receiver.base_url(), "http/protobuf")).await;
    let client = Client::new(activator.addr("proxy"));

    let mut decided = BTreeMap::new();
    let requests: [(&str, Vec<(&str, &str)>); 4] = [
        ("new-pin", vec![("K-Session", "alice")]),
        ("session-pin", vec![("K-Session", "alice")]),
        ("new-pin", vec![("K-Revision", "flow-1")]),
        ("revision-pin", vec![("K-Revision", "flow-1")]),
    ];
    for (n, (expected, ids)) in requests.iter().enumerate() {
        let (header, trace_id, parent) = traceparent(n as u8);
        let mut headers = ids.clone();
        headers.push(("traceparent", &header));
        headers.push(("baggage", "tenant=blue"));
        let reply = client.get_with("counter.test", "/headers", &headers).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let forwarded = forwarded_traceparent(&reply.body);
        let span = handle_span(&receiver, &trace_id).await;
        assert_eq!(span.attr("activator.decision"), Some(*expected), "{ids:?}: {span:?}");
        assert_eq!(span.attr("activator.pin.source"), Some("memory"), "{span:?}");
        assert_eq!(span.parent_span_id, parent, "the client's span is the parent");
        assert_eq!(
            forwarded,
            format!("00-{trace_id}-{}-01", span.span_id),
            "the pod continues the trace from the activator's span"
        );
        assert!(reply.body.contains("baggage: tenant=blue"), "baggage reaches the pod: {}", reply.body);
        assert_eq!(span.attr("kn.revision.name"), Some("counter-1"));
        assert_eq!(span.attr("http.response.status_code"), Some("200"));
        assert!(span.attr("activator.pod").is_some_and(|p| p.starts_with("127.0.0.1:")), "{span:?}");
        assert!(span.attr("activator.queued_seconds").is_some(), "{span:?}");
        assert_eq!(span.service_name, "activator");
        for (_, id) in ids {
            let hashed = span.attr("activator.session").or(span.attr("activator.flow")).unwrap_or_default();
            assert!(!hashed.contains(id) && hashed.len() == 8, "ids are hashed: {hashed:?}");
        }
        decided.insert(n, span.span_id.clone());
    }
    // Alice's pod leaves: her next request is re-pinned in the same revision.
    let alice = client.get_with("counter.test", "/incr", &[("K-Session", "alice")]).await.pod().to_owned();
    let other = if alice == "counter-1-pod-0" { &pods[1] } else { &pods[0] };
    let only = [other.addr("http")];
    env.reload(&activator, &yaml(&[Service::new("counter").revision("counter-1", 100, &only)])).await;
    let (header, trace_id, _) = traceparent(9);
    let moved = client.get_with("counter.test", "/incr", &[("K-Session", "alice"), ("traceparent", &header)]).await;
    assert_ne!(moved.pod(), alice);
    let repin = handle_span(&receiver, &trace_id).await;
    assert_eq!(repin.attr("activator.decision"), Some("re-pin"), "{repin:?}");

    let split = client.get("counter.test", "/incr").await;
    assert_eq!(split.status, 200);
    receiver
        .wait_for(SPANS_WITHIN, "the span of a request without ids", |s| s.attr("activator.decision") == Some("split"))
        .await;
    assert!(receiver.requests("http") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_say_where_the_pin_came_from_with_redis_and_without_it() {
    let env = Env::new();
    let receiver = Receiver::start().await;
    let mut redis = Redis::start(env.dir.path()).await;
    let pods = env.pods("counter-1", 2).await;
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods))]));
    let activator = env
        .activator_with_env(
            &["--pin-store", "redis", "--redis-url", &redis.url(), "--redis-timeout", "200ms"],
            &otlp_env(receiver.grpc_endpoint(), "grpc"),
        )
        .await;
    wait_pin_store_up(activator.addr("admin")).await;
    let client = Client::new(activator.addr("proxy"));

    let request = |n: u8, session: &'static str| {
        let client = client.clone();
        async move {
            let (header, trace_id, _) = traceparent(n);
            let reply =
                client.get_with("counter.test", "/incr", &[("K-Session", session), ("traceparent", &header)]).await;
            assert_eq!(reply.status, 200, "{reply:?}");
            trace_id
        }
    };
    let fresh = handle_span(&receiver, &request(1, "bob").await).await;
    assert_eq!(
        (fresh.attr("activator.decision"), fresh.attr("activator.pin.source")),
        (Some("new-pin"), Some("redis"))
    );
    let store_calls: Vec<Span> =
        receiver.spans().into_iter().filter(|s| s.name == "pin-store" && s.parent_span_id == fresh.span_id).collect();
    let operations: BTreeSet<&str> = store_calls.iter().filter_map(|s| s.attr("db.operation.name")).collect();
    assert_eq!(
        operations,
        BTreeSet::from(["create"]),
        "a new session's lookup writes its pin, one call: {store_calls:?}"
    );
    assert!(store_calls.iter().all(|s| s.trace_id == fresh.trace_id && s.attr("db.system.name") == Some("redis")));

    let known = handle_span(&receiver, &request(2, "bob").await).await;
    assert_eq!(
        (known.attr("activator.decision"), known.attr("activator.pin.source")),
        (Some("session-pin"), Some("near-cache"))
    );

    redis.kill().await;
    let outage = handle_span(&receiver, &request(3, "carol").await).await;
    assert_eq!(
        (outage.attr("activator.decision"), outage.attr("activator.pin.source")),
        (Some("new-pin"), Some("fallback")),
        "{outage:?}"
    );
    assert!(receiver.requests("grpc") > 0, "exported over gRPC");
}

/// Each upstream name with its type and label names, as upstream's Prometheus exporter writes them.
/// otelhttp's server attributes, with `server.address` (the service's host) and the revision's.
const SERVER: &[&str] = &[
    "http_request_method",
    "http_response_status_code",
    "k8s_namespace_name",
    "kn_configuration_name",
    "kn_revision_name",
    "kn_service_name",
    "network_protocol_name",
    "network_protocol_version",
    "server_address",
    "url_scheme",
];
/// otelhttp's client attributes (the exchange with the pod) and the revision's.
const CLIENT: &[&str] = &[
    "http_request_method",
    "http_response_status_code",
    "error_type",
    "k8s_namespace_name",
    "kn_configuration_name",
    "kn_revision_name",
    "kn_service_name",
    "network_protocol_name",
    "network_protocol_version",
    "url_scheme",
];

const UPSTREAM: [(&str, &str, &[&str]); 10] = [
    (
        "kn_revision_request_concurrency",
        "gauge",
        &["k8s_namespace_name", "kn_configuration_name", "kn_revision_name", "kn_service_name"],
    ),
    ("kn_revision_request_queued", "gauge", &["k8s_namespace_name", "kn_revision_name"]),
    ("kn_revision_request_active", "gauge", &["k8s_namespace_name", "kn_revision_name"]),
    ("kn_activator_stats_conn_reachable", "gauge", &["peer"]),
    ("kn_activator_stats_conn_errors_total", "counter", &["peer"]),
    ("http_server_request_duration_seconds", "histogram", SERVER),
    ("http_server_request_body_size_bytes", "histogram", SERVER),
    ("http_server_response_body_size_bytes", "histogram", SERVER),
    ("http_client_request_duration_seconds", "histogram", CLIENT),
    ("http_client_request_body_size_bytes", "histogram", CLIENT),
];

/// Each family's type and the label names of its samples.
fn families(metrics: &Metrics) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut found: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in metrics.0.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            found.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line.rsplit_once(' ').expect("a sample has a value").0;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| found.contains_key(*f)))
                .unwrap_or(name);
            let names = labels.trim_end_matches('}').split(',').filter_map(|l| l.split_once('=')).map(|(k, _)| k);
            found
                .get_mut(family)
                .expect("samples follow their TYPE")
                .1
                .extend(names.filter(|k| *k != "le").map(str::to_owned));
        }
    }
    found
}

fn sample_count(metrics: &Metrics) -> usize {
    metrics.0.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_upstreams_names_and_client_input_adds_no_series() {
    let env = Env::new();
    let pods = env.pods("counter-1", 2).await;
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods))]));
    // The shim reads the topology, so it leaves the revision's two pods alone: a pod it started
    // under load would add its own (bounded) series.
    let shim = env.shim(&["--topology", &env.topology_path().display().to_string()]).await;
    let activator: Process = env.activator_with_shim(&shim, &[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));

    // A first few of every kind of request, so each series that can exist does.
    let traffic = |n: usize, offset: usize| {
        let client = client.clone();
        futures_util::stream::iter(0..n)
            .map(move |i| {
                let client = client.clone();
                let i = i + offset;
                async move {
                    let session = format!("client-sid-{i}");
                    let reply = client.get_with("counter.test", "/incr", &[("K-Session", &session)]).await;
                    assert_eq!(reply.status, 200, "{reply:?}");
                    // One in ten goes to one of 1 000 hosts no service has.
                    if i.is_multiple_of(10) {
                        let unknown = client.get(&format!("unknown-{}.example.com", i / 10), "/").await;
                        assert_eq!(unknown.status, 404);
                    }
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
    };
    traffic(20, 0).await;
    // Pins per pod are counted every few seconds: their series (one per pod) must be there before
    // the count of series is taken. New sessions are placed by rendezvous over the pods ready for
    // two seconds, so on a loaded machine the first ones may all land on one pod: more sessions
    // (ids after the later traffic's) go until both pods hold some.
    let extra = std::sync::atomic::AtomicUsize::new(10_000);
    wait_until(
        Duration::from_secs(15),
        "the autoscaler connection, a concurrency report, pins on both pods",
        || async {
            let m = Metrics::scrape(admin).await;
            let pods_with_pins = m.0.lines().filter(|l| l.starts_with("activator_pins{")).count();
            if pods_with_pins < 2 {
                traffic(10, extra.fetch_add(10, std::sync::atomic::Ordering::Relaxed)).await;
            }
            m.value("kn_activator_stats_conn_reachable", &[("peer", "autoscaler")]) == Some(1.0)
                && m.value("kn_revision_request_concurrency", &[("kn_revision_name", "counter-1")]).is_some()
                && m.sum("activator_pins") >= 20.0
                && pods_with_pins == 2
        },
    )
    .await;
    let before = Metrics::scrape(admin).await;
    let found = families(&before);
    for (name, kind, labels) in UPSTREAM {
        let (found_kind, found_labels) = found.get(name).unwrap_or_else(|| panic!("{name} missing:\n{before}"));
        assert_eq!(found_kind, kind, "{name}");
        assert_eq!(found_labels, &labels.iter().map(|l| l.to_string()).collect::<BTreeSet<_>>(), "{name}");
    }
    assert!(
        before.value(
            "http_server_request_duration_seconds_count",
            &[
                ("kn_service_name", "counter"),
                ("kn_configuration_name", "counter"),
                ("http_response_status_code", "200")
            ]
        ) >= Some(20.0)
    );

    traffic(9_980, 20).await;
    let after = Metrics::scrape(admin).await;
    assert!(
        after.value("http_server_request_duration_seconds_count", &[("http_response_status_code", "404")])
            >= Some(1000.0),
        "{after}"
    );
    assert_eq!(
        sample_count(&after),
        sample_count(&before),
        "10 000 session ids and 1 000 unknown hosts added series:\n{after}"
    );
    let leaked: Vec<&str> = after.0.lines().filter(|l| l.contains("client-sid-") || l.contains("unknown-")).collect();
    assert!(leaked.is_empty(), "no label carries client input: {leaked:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_log_has_one_line_per_request_and_no_ids() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("counter", &["--request-log", "--debug-headers"]).await;
    let client = Client::new(activator.addr("proxy"));
    let reply = client.get_with("counter.test", "/incr", &[("K-Session", "secret-session-id")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(client.get("nowhere.test", "/").await.status, 404);
    let lines = || -> Vec<serde_json::Value> {
        activator.stdout().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    wait_until(Duration::from_secs(10), "two request-log lines", || async { lines().len() >= 2 }).await;
    let lines = lines();
    let routed = lines.iter().find(|l| l["status"] == 200).expect("the routed request's line");
    assert_eq!(routed["decision"], "new-pin");
    assert_eq!(routed["revision"], "counter-1");
    assert_eq!(routed["method"], "GET");
    assert_eq!(routed["session"].as_str().map(str::len), Some(8), "{routed}");
    let unrouted = lines.iter().find(|l| l["status"] == 404).expect("the unrouted request's line");
    assert!(unrouted.get("revision").is_none(), "{unrouted}");
    assert!(!activator.stdout().join("\n").contains("secret-session-id"), "no raw ids in the log");
}

/// Upstream's otelhttp records `http.server.request.duration` and the body sizes after the handler
/// returns, the response written: a streamed response counts in full, while our own
/// `activator_request_duration_seconds` stops at its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_server_series_are_recorded_when_the_response_ends() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("streamer", &[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let streamed = client.get("streamer.test", "/stream?chunks=5&interval=200ms").await;
    assert_eq!((streamed.status, streamed.body.len()), (200, 40));
    let revision = [("kn_revision_name", "streamer-1"), ("http_response_status_code", "200")];
    wait_until(Duration::from_secs(10), "the ended response is recorded", || async {
        Metrics::scrape(admin).await.value("http_server_response_body_size_bytes_count", &revision) == Some(1.0)
    })
    .await;
    let metrics = Metrics::scrape(admin).await;
    assert_eq!(metrics.value("http_server_response_body_size_bytes_sum", &revision), Some(40.0));
    assert_eq!(metrics.value("http_server_request_body_size_bytes_sum", &revision), Some(0.0));
    let upstreams = metrics.value("http_server_request_duration_seconds_sum", &revision).unwrap();
    let ours = metrics.value("activator_request_duration_seconds_sum", &[("revision", "streamer-1")]).unwrap();
    assert!(upstreams >= 0.8, "the whole stream, four pauses of 200 ms: {upstreams}");
    assert!(ours < upstreams, "ours ends at the headers: {ours}");
    assert!(
        metrics.value("http_server_request_duration_seconds_count", &[("server_address", "streamer.test")])
            == Some(1.0),
        "server.address is the service's host: {metrics}"
    );
    let client_count = metrics.value("http_client_request_duration_seconds_count", &revision);
    assert_eq!(client_count, Some(1.0), "the exchange with the pod: {metrics}");

    // A request body is counted as it passes to the pod.
    let echoed =
        client.send(client.request(reqwest::Method::POST, "streamer.test", "/echo").body(vec![b'x'; 3000])).await;
    assert_eq!(echoed.body.len(), 3000);
    wait_until(Duration::from_secs(10), "the upload is counted", || async {
        Metrics::scrape(admin)
            .await
            .value("http_server_request_body_size_bytes_sum", &[("http_request_method", "POST")])
            == Some(3000.0)
    })
    .await;
    let client_body =
        metric_sum(admin, "http_client_request_body_size_bytes_sum", &[("http_request_method", "POST")]).await;
    assert_eq!(client_body, 3000.0);
}

async fn metric_sum(admin: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    Metrics::scrape(admin).await.value(name, labels).unwrap_or(0.0)
}
