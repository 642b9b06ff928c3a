//! Knative mode end to end: the activator as a real process watching an in-process API server
//! loaded with Knative-shaped objects, demo-service pods standing in for queue-proxy (they answer
//! its probe), autoscaler-shim standing in for the autoscaler, and requests carrying the headers
//! Knative's ingress sets.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use integration_tests::knative::{
    Cluster, Revision, Target, and_wait_applied, config_map, counts_up, ingress, private_endpoints, public_endpoints,
    route, send,
};
use integration_tests::kube_api::Kind;
use integration_tests::redis::Redis;
use integration_tests::{Client, Reply, addrs, admin_get, metric, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_knative_service_spreads_unkeyed_requests_and_keeps_sessions() {
    let c = Cluster::new().await;
    let pods = c.env.pods("counter-00001", 3).await;
    let revision = Revision::new("counter", "counter-00001");
    c.revision(&revision, &addrs(&pods));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));

    let mut seen = HashSet::new();
    for _ in 0..30 {
        seen.insert(send(&client, "/incr", "counter-00001", &[]).await.pod().to_owned());
    }
    assert_eq!(seen.len(), 3, "unkeyed requests reach every pod: {seen:?}");
    counts_up(&client, "/incr?session_id=abc", "counter-00001", &[("K-Session", "abc")], 3, "abc").await;

    and_wait_applied(&activator, || c.annotate("counter", &[("sticky-session-query-parameter", "session_id")])).await;
    counts_up(&client, "/incr?session_id=q1", "counter-00001", &[], 3, "q1").await;
    and_wait_applied(&activator, || c.annotate("counter", &[("sticky-session-path-segment", "2")])).await;
    counts_up(&client, "/incr/p1", "counter-00001", &[], 3, "p1").await;

    // What queue-proxy sees, as upstream's activator sends it.
    let headers =
        send(&client, "/headers", "counter-00001", &[("K-Original-Host", "")]).await.body.to_ascii_lowercase();
    assert!(headers.contains("k-proxy-request: activator"), "{headers}");
    assert!(!headers.contains("knative-serving-revision"), "{headers}");
    let fresh = send(&client, "/headers", "counter-00001", &[]).await.body.to_ascii_lowercase();
    assert!(fresh.contains("k-original-host: counter.default.example.com"), "{fresh}");
    assert!(fresh.contains("host: 127.0.0.1:"), "queue-proxy is addressed by the pod's address: {fresh}");

    // The h2c listener (Knative's 8013) serves the same, with HTTP/2 prior knowledge.
    let h2c = activator.addr("h2c");
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    let mut req = h2.get(format!("http://{h2c}/incr"));
    for (k, v) in ingress("counter-00001") {
        req = req.header(k, v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_keeps_its_revision_across_a_split_until_it_leaves_the_route() {
    let c = Cluster::new().await;
    let (one, two) = (c.env.pods("counter-00001", 1).await, c.env.pods("counter-00002", 1).await);
    c.revision(&Revision::new("counter", "counter-00001"), &addrs(&one));
    c.revision(&Revision::new("counter", "counter-00002"), &addrs(&two));
    c.service("counter", &[Target::new("counter-00001", 50), Target::new("counter-00002", 50)], &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    // The ingress picks a revision by the split on every request; the flow's pin overrides it.
    let by_ingress = || if fastrand::bool() { "counter-00001" } else { "counter-00002" };
    let flow = [("K-Revision", "abc")];
    let mut pinned = String::new();
    for n in 1..=3 {
        let reply = send(&client, "/incr?session_id=abc", by_ingress(), &flow).await;
        assert_eq!(reply.body, format!("session=abc, count={n}\n"));
        if n == 1 {
            pinned = reply.revision().to_owned();
        }
        assert_eq!(reply.revision(), pinned);
    }
    let other = if pinned == "counter-00001" { "counter-00002" } else { "counter-00001" };
    // At 0 % the revision still takes the flows pinned to it.
    and_wait_applied(&activator, || c.reroute("counter", &[Target::new(&pinned, 0), Target::new(other, 100)])).await;
    for n in 4..=5 {
        let reply = send(&client, "/incr?session_id=abc", other, &flow).await;
        assert_eq!(
            (reply.revision(), reply.body.as_str()),
            (pinned.as_str(), format!("session=abc, count={n}\n").as_str())
        );
    }
    // A tag asks for its revision: by its host or by the tag header, the flow's pin neither
    // overrides it nor is moved by it.
    and_wait_applied(&activator, || {
        c.reroute("counter", &[Target::new(&pinned, 0), Target::new(other, 100).tagged("canary")])
    })
    .await;
    let tagged_host = client.request(reqwest::Method::GET, "canary-counter.default.example.com", "/incr?session_id=t");
    let header = client
        .request(reqwest::Method::GET, "counter.default.example.com", "/incr?session_id=t")
        .header("Knative-Serving-Tag", "canary");
    let revision_host = client.request(reqwest::Method::GET, &format!("{other}.default.svc.cluster.local"), "/incr");
    for req in [tagged_host, header] {
        let mut req = req.header("K-Revision", "abc");
        for (k, v) in ingress(other) {
            req = req.header(k, v);
        }
        assert_eq!(client.send(req).await.revision(), other);
    }
    assert_eq!(client.send(revision_host.header("K-Revision", "abc")).await.revision(), other);
    let still = send(&client, "/incr?session_id=abc", other, &flow).await;
    assert_eq!((still.revision(), still.body.as_str()), (pinned.as_str(), "session=abc, count=6\n"));

    // Out of the Route, it is no valid target: the flow moves.
    and_wait_applied(&activator, || c.reroute("counter", &[Target::new(other, 100)])).await;
    let moved = send(&client, "/incr?session_id=abc", other, &flow).await;
    assert_eq!((moved.revision(), moved.body.as_str()), (other, "session=abc, count=1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_zero_waits_for_a_pod_the_watch_brings() {
    let c = Cluster::new().await;
    let revision = Revision::new("cold", "cold-00001");
    c.revision(&revision, &[]);
    c.api.put(Kind::Route, route("default", "cold", &[Target::new("cold-00001", 100)]));
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let burst: Vec<_> = (0..50)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { send(&client, "/incr", "cold-00001", &[]).await })
        })
        .collect();
    wait_until(Duration::from_secs(10), "fifty requests wait and the autoscaler is poked", || async {
        let poked = autoscaler
            .stdout()
            .iter()
            .any(|l| l.starts_with("stat default/cold-00001 ") && l.contains("concurrency=1"));
        metric(admin, "activator_queued_requests", &[("revision", "cold-00001")]).await == Some(50.0) && poked
    })
    .await;
    // The pod appears as Kubernetes first lists it: not ready yet. It passes the activator's
    // queue probe, and takes the waiting requests.
    let pod = c.env.demo("cold-pod", "cold-00001").await;
    c.api.put(Kind::Endpoints, private_endpoints(&revision, &[], &[pod.addr("http")]));
    for request in burst {
        assert_eq!(request.await.unwrap().pod(), "cold-pod");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activators_split_the_pods_and_a_pinned_session_reaches_its_pod_through_either() {
    let c = Cluster::new().await;
    let redis = Redis::start(c.env.dir.path()).await;
    let pods = c.env.pods("counter-00001", 4).await;
    let mut revision = Revision::new("counter", "counter-00001");
    revision.container_concurrency = 1;
    c.revision(&revision, &addrs(&pods));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let (a_ip, b_ip) = ("10.0.0.1", "10.0.0.2");
    c.api.put(Kind::Endpoints, public_endpoints(&revision, &[a_ip.parse().unwrap(), b_ip.parse().unwrap()]));
    let autoscaler = c.autoscaler().await;
    let url = redis.url();
    let shared = ["--pin-store", "redis", "--redis-url", &url];
    let (a, b) = (c.activator(&autoscaler, a_ip, &shared).await, c.activator(&autoscaler, b_ip, &shared).await);
    integration_tests::wait_pin_store_up(a.addr("admin")).await;
    integration_tests::wait_pin_store_up(b.addr("admin")).await;
    // The harness names pods `<revision>-pod-<i>` in the order it starts them.
    let names: BTreeMap<String, String> =
        pods.iter().enumerate().map(|(i, p)| (p.addr("http").to_string(), format!("counter-00001-pod-{i}"))).collect();
    // Upstream's assignment: pods in `ip:port` string order, the first half to the first activator.
    let order: Vec<&String> = names.values().collect();
    let sorted = |mut pods: Vec<String>| {
        pods.sort();
        pods
    };
    let subsets = [sorted(vec![order[0].clone(), order[1].clone()]), sorted(vec![order[2].clone(), order[3].clone()])];
    for (activator, subset) in [(&a, &subsets[0]), (&b, &subsets[1])] {
        let client = Client::new(activator.addr("proxy"));
        let held =
            futures_util::future::join_all((0..2).map(|_| send(&client, "/slow?delay=500ms", "counter-00001", &[])))
                .await;
        let mut used: Vec<String> = held.iter().map(|r| r.pod().to_owned()).collect();
        used.sort();
        assert_eq!(&used, subset, "with one slot a pod, two requests fill this activator's subset");
    }
    let pinned =
        send(&Client::new(a.addr("proxy")), "/incr?session_id=s1", "counter-00001", &[("K-Session", "s1")]).await;
    assert!(subsets[0].contains(&pinned.pod().to_owned()));
    let through_b =
        send(&Client::new(b.addr("proxy")), "/incr?session_id=s1", "counter-00001", &[("K-Session", "s1")]).await;
    assert_eq!(
        (through_b.pod(), through_b.body.as_str()),
        (pinned.pod(), "session=s1, count=2\n"),
        "B reaches A's pod"
    );
    let outside =
        metric(b.addr("admin"), "activator_pinned_outside_subset_total", &[("revision", "counter-00001")]).await;
    assert_eq!(outside, Some(1.0));

    // The SKS switches to Serve: the public Endpoints list pods, not activators. Upstream keeps
    // each activator's last index rather than letting it use every pod.
    c.api.put(Kind::Endpoints, public_endpoints(&revision, &["10.9.0.1".parse().unwrap()]));
    wait_until(Duration::from_secs(10), "B saw the update", || async {
        b.logs().contains("no longer list this activator")
    })
    .await;
    let client = Client::new(b.addr("proxy"));
    let held =
        futures_util::future::join_all((0..2).map(|_| send(&client, "/slow?delay=500ms", "counter-00001", &[]))).await;
    let mut used: Vec<String> = held.iter().map(|r| r.pod().to_owned()).collect();
    used.sort();
    assert_eq!(&used, &subsets[1], "B keeps its share, not the first pods of all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_sync_and_the_autoscaler_and_probes_are_answered() {
    let c = Cluster::new().await;
    c.api.hold();
    let (refusing, nobody) = integration_tests::refusing_addr();
    let url = format!("ws://{nobody}");
    let activator = c.env.knative_activator(&c.api, "10.0.0.1", &["--autoscaler-url", &url]).await;
    let client = Client::new(activator.addr("proxy"));
    let kubelet = || async { client.get_with("", "/", &[("User-Agent", "kube-probe/1.33")]).await };
    let unsynced = kubelet().await;
    assert_eq!(
        (unsynced.status, unsynced.body.as_str()),
        (500, "the view of revisions and endpoints has not synced yet\n")
    );
    c.api.release();
    wait_until(Duration::from_secs(30), "synced, still waiting for the autoscaler", || async {
        kubelet().await.body == "connection has not yet been established\n"
    })
    .await;
    assert_eq!(kubelet().await.status, 500);
    // The autoscaler arrives at the address the activator keeps trying.
    drop(refusing);
    let listen = nobody.to_string();
    let _autoscaler = c.env.shim(&["--listen", &listen, "--command", "false"]).await;
    wait_until(Duration::from_secs(30), "ready", || async { kubelet().await.status == 200 }).await;

    let echo = client.get_with("", "/", &[("K-Network-Probe", "probe"), ("K-Network-Hash", "0123abc")]).await;
    assert_eq!((echo.status, echo.header("k-network-hash")), (200, "0123abc"));
    let activator_probe = client
        .get_with("", "/healthz", &[("K-Network-Probe", "activator"), ("User-Agent", "Knative-Autoscaling-Probe")])
        .await;
    // The KPA lets a revision scale to zero only once this body is exactly `activator`
    // (`pkg/reconciler/autoscaling/kpa/scaler.go` `activatorProbe` compares the bytes).
    assert_eq!((activator_probe.status, activator_probe.body.as_bytes()), (200, &b"activator"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_api_server_fails_no_request() {
    let c = Cluster::new().await;
    let pods = c.env.pods("counter-00001", 2).await;
    let revision = Revision::new("counter", "counter-00001");
    c.revision(&revision, &addrs(&pods)[..1]);
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    let (stop, sent, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (client, stop, sent, failed) = (client.clone(), stop.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut req = client.request(reqwest::Method::GET, "counter.default.example.com", "/incr");
                for (k, v) in ingress("counter-00001") {
                    req = req.header(k, v);
                }
                if !client.try_send(req).await.is_ok_and(|r| r.status == 200) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let some_more = |n| {
        let sent = sent.clone();
        async move {
            let target = sent.load(Ordering::Relaxed) + n;
            wait_until(Duration::from_secs(10), "requests go on", || async { sent.load(Ordering::Relaxed) >= target })
                .await;
        }
    };
    some_more(20).await;
    c.api.close_watches();
    some_more(20).await;
    c.api.compact();
    some_more(20).await;
    let mut garbage = revision.to_json();
    garbage["spec"]["containerConcurrency"] = serde_json::json!("lots");
    c.api.put(Kind::Revision, garbage);
    let mut endpoints = private_endpoints(&revision, &[], &[]);
    endpoints["subsets"] =
        serde_json::json!([{"addresses": [{"ip": "not-an-ip"}], "ports": [{"name": "http", "port": 1}]}]);
    c.api.put(Kind::Endpoints, endpoints);
    let admin = activator.addr("admin");
    wait_until(Duration::from_secs(10), "both objects are skipped", || async {
        let text = integration_tests::Metrics::scrape(admin).await;
        text.sum("activator_kube_objects_rejected_total") >= 2.0
    })
    .await;
    some_more(20).await;
    // The next valid state applies: the second pod joins.
    c.api.put(Kind::Endpoints, private_endpoints(&revision, &addrs(&pods), &[]));
    wait_until(Duration::from_secs(10), "the second pod takes traffic", || async {
        send(&client, "/incr", "counter-00001", &[]).await.pod() == "counter-00001-pod-1"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "of {} requests", sent.load(Ordering::Relaxed));
    assert!(!activator.logs().contains("panicked"), "{}", activator.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_stock_rbac_requests_are_served_and_the_missing_rule_is_named() {
    let c = Cluster::new().await;
    c.api.forbid(Kind::Route);
    c.api.forbid(Kind::KnativeService);
    let (one, two) = (c.env.pods("counter-00001", 2).await, c.env.pods("counter-00002", 1).await);
    c.revision(&Revision::new("counter", "counter-00001"), &addrs(&one));
    c.revision(&Revision::new("counter", "counter-00002"), &addrs(&two));
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    // Sessions stay on one pod inside the revision the ingress picked.
    counts_up(&client, "/incr?session_id=abc", "counter-00001", &[("K-Session", "abc")], 3, "abc").await;
    assert_eq!(send(&client, "/incr", "counter-00002", &[]).await.revision(), "counter-00002");
    let admin = activator.addr("admin");
    let forbidden =
        metric(admin, "activator_kube_watch_forbidden", &[("resource", "routes.serving.knative.dev")]).await;
    assert_eq!(forbidden, Some(1.0));
    // Listing goes on being retried; the missing rule is logged once.
    wait_until(Duration::from_secs(60), "the list of Routes is retried", || async {
        metric(admin, "activator_kube_watch_errors_total", &[("resource", "routes.serving.knative.dev")]).await
            >= Some(2.0)
    })
    .await;
    let logs = activator.logs();
    let named: Vec<&str> = logs.lines().filter(|l| l.contains("cannot list routes.serving.knative.dev")).collect();
    assert_eq!(named.len(), 1, "{named:?}");
    assert!(named[0].contains(r#"resources: [\"routes\"], verbs: [\"get\", \"list\", \"watch\"]"#), "{}", named[0]);
}

/// Upstream's activator never gets ready without its informers of Revisions and Endpoints: a
/// 403 there keeps ours unready too, saying which rule is missing, until the rule is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_list_of_endpoints_keeps_it_unready_and_names_the_rule() {
    let c = Cluster::new().await;
    c.api.forbid(Kind::Endpoints);
    let pods = c.env.pods("counter-00001", 1).await;
    c.revision(&Revision::new("counter", "counter-00001"), &addrs(&pods));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let url = format!("ws://{}", autoscaler.addr("stats"));
    let activator = c.env.knative_activator(&c.api, "10.0.0.1", &["--autoscaler-url", &url]).await;
    let admin = activator.addr("admin");
    wait_until(Duration::from_secs(20), "readiness names the missing rule", || async {
        let (status, body) = admin_get(admin, "/readyz").await;
        status == 503 && body.contains("forbidden to list endpoints") && body.contains(r#"resources: ["endpoints"]"#)
    })
    .await;
    let kubelet = Client::new(activator.addr("proxy")).get_with("", "/", &[("User-Agent", "kube-probe/1.33")]).await;
    assert_eq!(kubelet.status, 500);
    assert!(kubelet.body.contains("forbidden to list endpoints"), "{kubelet:?}");
    assert_eq!(metric(admin, "activator_kube_watch_forbidden", &[("resource", "endpoints")]).await, Some(1.0));
    c.api.permit(Kind::Endpoints);
    wait_until(Duration::from_secs(60), "ready once the rule is granted", || async {
        admin_get(admin, "/readyz").await.0 == 200
    })
    .await;
    send(&Client::new(activator.addr("proxy")), "/incr", "counter-00001", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_revisions_get_upstreams_404() {
    let c = Cluster::new().await;
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    let mut req = client.request(reqwest::Method::GET, "x", "/");
    for (k, v) in ingress("nope-00001") {
        req = req.header(k, v);
    }
    let reply = client.send(req).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (404, "Error getting active endpoint: revision.serving.knative.dev \"nope-00001\" not found\n")
    );
}

/// `config-observability` switches what is exported while the activator runs: upstream's metric
/// names on `/metrics` with `metrics-protocol: prometheus` only, traces over the protocol and to
/// the endpoint it names, sampled at its rate unless the request's parent decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_observability_changes_exports_live() {
    use integration_tests::otlp::Receiver;
    let c = Cluster::new().await;
    let receiver = Receiver::start().await;
    let pods = c.env.pods("counter-00001", 1).await;
    c.revision(&Revision::new("counter", "counter-00001"), &addrs(&pods));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let upstream_names =
        || async { admin_get(admin, "/metrics").await.1.contains("http_server_request_duration_seconds") };
    send(&client, "/incr", "counter-00001", &[]).await;
    assert!(!upstream_names().await, "upstream's default metrics-protocol is none");

    let observe = |pairs: &[(&str, &str)]| c.api.put(Kind::ConfigMap, config_map("config-observability", pairs));
    let grpc = receiver.grpc_endpoint();
    observe(&[
        ("metrics-protocol", "prometheus"),
        ("tracing-protocol", "grpc"),
        ("tracing-endpoint", &grpc),
        ("tracing-sampling-rate", "0"),
    ]);
    wait_until(Duration::from_secs(10), "upstream's names are exported", || async {
        send(&client, "/incr", "counter-00001", &[]).await;
        upstream_names().await
    })
    .await;
    // Rate 0: a new trace is not sampled, but a sampled parent's decision holds.
    let unsampled = send(&client, "/headers", "counter-00001", &[]).await.body;
    let forwarded = unsampled
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("a trace context: {unsampled}\n{}", activator.logs()));
    assert!(forwarded.ends_with("-00"), "not sampled: {forwarded}");
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    send(&client, "/incr", "counter-00001", &[("traceparent", parent)]).await;
    let span = receiver
        .wait_for(Duration::from_secs(20), "the span of the sampled request", |s| {
            s.trace_id == "0af7651916cd43dd8448eb211c80319c"
        })
        .await;
    assert_eq!(span.attr("activator.decision"), Some("ingress"), "{span:?}");
    assert!(receiver.requests("grpc") > 0 && receiver.requests("http") == 0);
    let unsampled_trace = forwarded.split('-').nth(1).expect("a trace id").to_owned();
    assert!(receiver.spans().iter().all(|s| s.trace_id != unsampled_trace), "rate 0 samples no new trace");

    let http = receiver.http_endpoint();
    observe(&[("tracing-protocol", "http/protobuf"), ("tracing-endpoint", &http), ("tracing-sampling-rate", "1")]);
    wait_until(Duration::from_secs(10), "upstream's names are no longer exported", || async {
        !upstream_names().await
    })
    .await;
    wait_until(Duration::from_secs(20), "spans arrive over HTTP", || async {
        send(&client, "/incr", "counter-00001", &[]).await;
        receiver.requests("http") > 0
    })
    .await;
    assert!(
        metric(admin, "activator_requests_total", &[("revision", "counter-00001"), ("code", "200")]).await.is_some(),
        "ours stay whatever metrics-protocol says"
    );

    // Pushed over OTLP, under upstream's instrument names and attribute keys, by either protocol.
    for (protocol, endpoint) in [("http/protobuf", receiver.base_url()), ("grpc", receiver.grpc_endpoint())] {
        let before = receiver.requests(if protocol == "grpc" { "grpc" } else { "http" });
        observe(&[
            ("metrics-protocol", protocol),
            ("metrics-endpoint", &endpoint),
            ("metrics-export-interval", "100ms"),
        ]);
        wait_until(Duration::from_secs(10), &format!("metrics arrive over {protocol}"), || async {
            receiver.requests(if protocol == "grpc" { "grpc" } else { "http" }) > before + 1
        })
        .await;
    }
    let pushed = receiver.metrics();
    let duration = pushed.iter().rfind(|m| m.name == "http.server.request.duration").expect("the duration histogram");
    assert_eq!(duration.unit, "s");
    assert!(
        duration.points.iter().any(|p| p.get("kn.revision.name").map(String::as_str) == Some("counter-00001")
            && p.get("k8s.namespace.name").map(String::as_str) == Some("default")),
        "{duration:?}"
    );
    let names: HashSet<&str> = pushed.iter().map(|m| m.name.as_str()).collect();
    for name in [
        "kn.revision.request.concurrency",
        "kn.activator.stats.conn.reachable",
        "kn.revision.request.active",
        "http.server.request.body.size",
        "http.server.response.body.size",
        "http.client.request.duration",
        "http.client.request.body.size",
        "kn.k8s.client.http.response.status_code",
    ] {
        assert!(names.contains(name), "{name} not pushed: {names:?}");
    }
    assert!(!upstream_names().await, "pushed, not scraped");
}

/// An IPv6-only cluster: the activator listens on IPv6, its kubelet probe passes, the pod's
/// address from the Endpoints is an IPv6 one, and a session stays on its pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_cluster_is_served() {
    let c = Cluster::new().await;
    let v6: std::net::SocketAddr = "[::1]:0".parse().unwrap();
    let pods =
        [c.env.demo_at("v6-pod-0", "counter-00001", v6).await, c.env.demo_at("v6-pod-1", "counter-00001", v6).await];
    let revision = Revision::new("counter", "counter-00001");
    c.revision(&revision, &addrs(&pods));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let listen = ["--listen", "[::1]:0", "--listen-h2c", "[::1]:0", "--admin-listen", "[::1]:0"];
    let activator = c.activator(&autoscaler, "fd00::1", &listen).await;
    assert!(activator.addr("proxy").is_ipv6());
    let client = Client::new(activator.addr("proxy"));

    let kubelet = client.get_with("", "/", &[("User-Agent", "kube-probe/1.33")]).await;
    assert_eq!((kubelet.status, kubelet.body.as_str()), (200, ""));
    let headers = send(&client, "/headers", "counter-00001", &[]).await;
    assert!(headers.body.contains("x-forwarded-for: ::1\n"), "the client's IPv6 address: {}", headers.body);
    let pod = counts_up(&client, "/incr?session_id=v6", "counter-00001", &[("K-Session", "v6")], 3, "v6").await;
    assert!(pod.starts_with("v6-pod-"), "{pod}");
    // Pod addresses are written `[ip]:port` wherever they appear, metric labels included.
    let admin = activator.addr("admin");
    wait_until(Duration::from_secs(10), "the pin is counted per pod", || async {
        integration_tests::Metrics::scrape(admin).await.0.contains("pod=\"[::1]:")
    })
    .await;
}

/// As in local mode: upstream's timeout handler takes 0 as off for the response-start and idle
/// timeouts (`pkg/http/handler/timeout.go` `ServeHTTP` starts them only when `> 0`), and a
/// `timeoutSeconds` at the int64 limit is clamped rather than overflowing the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_huge_revision_timeouts_serve_normally() {
    let c = Cluster::new().await;
    let pods = c.env.pods("limits-00001", 1).await;
    let mut revision = Revision::new("limits", "limits-00001");
    revision.timeout_seconds = i64::MAX as u64;
    (revision.response_start_timeout_seconds, revision.idle_timeout_seconds) = (Some(0), Some(0));
    c.revision(&revision, &addrs(&pods));
    c.service("limits", &[Target::new("limits-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    counts_up(&client, "/incr?session_id=t", "limits-00001", &[("K-Session", "t")], 3, "t").await;
}

/// The ConfigMaps upstream's activator reads, read as it reads them and applied live: their names
/// from `CONFIG_LOGGING_NAME` / `CONFIG_OBSERVABILITY_NAME`, booleans as Go's `strconv.ParseBool`
/// (`cmd/activator/request_log.go` `updateRequestLogFromConfigMap` via `configmap.As`),
/// `loglevel.activator` (`knative.dev/pkg/logging` `UpdateLevelFromConfigMap`), the request-log
/// template (`pkg/http/request_log.go`; one that does not parse keeps the previous one), and
/// `metrics-endpoint` moving the Prometheus listener (`knative.dev/pkg/observability/metrics/
/// prometheus` `NewServer`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_config_maps_are_read_as_upstream_reads_them_live() {
    let c = Cluster::new().await;
    let pods = c.env.pods("counter-00001", 1).await;
    c.revision(&Revision::new("counter", "counter-00001"), &addrs(&pods));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let url = format!("ws://{}", autoscaler.addr("stats"));
    let env = [
        ("CONFIG_LOGGING_NAME", "team-logging".to_owned()),
        ("CONFIG_OBSERVABILITY_NAME", "team-observability".to_owned()),
    ];
    let activator = c.env.knative_activator_with_env(&c.api, "10.0.0.1", &["--autoscaler-url", &url], &env).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    wait_until(Duration::from_secs(30), "ready", || async { admin_get(admin, "/readyz").await.0 == 200 }).await;
    let observe = |pairs: &[(&str, &str)]| c.api.put(Kind::ConfigMap, config_map("team-observability", pairs));
    let logging = |pairs: &[(&str, &str)]| c.api.put(Kind::ConfigMap, config_map("team-logging", pairs));
    let lines = |process: &integration_tests::Process| {
        process.stdout().into_iter().filter(|l| l.starts_with("line ")).collect::<Vec<_>>()
    };

    // The stock name is not ours to read any more; the renamed one is.
    c.api.put(Kind::ConfigMap, config_map("config-observability", &[("logging.enable-request-log", "true")]));
    let template =
        "line {{.Request.Method}} {{.Revision.Name}} {{.Revision.Namespace}} {{.Response.Code}} {{.Response.Size}}";
    observe(&[("logging.enable-request-log", "T"), ("logging.request-log-template", template)]);
    wait_until(Duration::from_secs(10), "the renamed ConfigMap's template writes lines", || async {
        send(&client, "/incr?session_id=log", "counter-00001", &[]).await;
        !lines(&activator).is_empty()
    })
    .await;
    // Written once the response has ended, with its size: `session=log, count=N` and a newline.
    let first = lines(&activator)[0].clone();
    assert!(first.starts_with("line GET counter-00001 default 200 "), "{first}");
    let size: usize = first.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(size, "session=log, count=1\n".len(), "{first}");

    // A template this cannot render is refused, and the previous one keeps writing.
    observe(&[("logging.enable-request-log", "1"), ("logging.request-log-template", "{{if .TraceID}}x{{end}}")]);
    wait_until(Duration::from_secs(10), "the refusal is logged", || async {
        activator.logs().contains("refusing logging.request-log-template")
    })
    .await;
    let before = lines(&activator).len();
    send(&client, "/incr?session_id=log", "counter-00001", &[]).await;
    wait_until(Duration::from_secs(10), "the previous template wrote the line", || async {
        lines(&activator).len() > before
    })
    .await;

    // loglevel.activator: debug lines appear once asked for, and stop at error.
    let debug_lines = || activator.logs().matches("a ConfigMap of the system namespace changed").count();
    assert_eq!(debug_lines(), 0, "info by default");
    logging(&[("loglevel.activator", "DEBUG")]);
    observe(&[("logging.enable-request-log", "false")]);
    wait_until(Duration::from_secs(10), "debug lines are written", || async { debug_lines() > 0 }).await;
    let before_error = debug_lines();
    assert_eq!(before_error, 1, "the level change's own line was written at info, so not at all");
    logging(&[("loglevel.activator", "error")]);
    // One watch delivers the system namespace's ConfigMaps in order: once this one's template
    // writes, the level change before it was applied too.
    observe(&[("logging.enable-request-log", "t"), ("logging.request-log-template", "line {{.Response.Code}}")]);
    wait_until(Duration::from_secs(10), "the request log is on again", || async {
        send(&client, "/incr", "counter-00001", &[]).await;
        lines(&activator).iter().any(|l| l == "line 200")
    })
    .await;
    assert_eq!(
        debug_lines(),
        before_error + 1,
        "the level change's own line (written at debug, before it applied), none after"
    );
    // A level zap does not know refuses the ConfigMap.
    logging(&[("loglevel.activator", "chatty")]);
    wait_until(Duration::from_secs(10), "the refusal is counted", || async {
        metric(admin, "activator_kube_objects_rejected_total", &[("resource", "configmaps")]).await == Some(1.0)
    })
    .await;

    // metrics-endpoint moves upstream's Prometheus listener, which answers /metrics alone.
    let moved = integration_tests::free_port();
    observe(&[("metrics-protocol", "prometheus"), ("metrics-endpoint", &format!("127.0.0.1:{moved}"))]);
    let moved: std::net::SocketAddr = format!("127.0.0.1:{moved}").parse().unwrap();
    wait_until(Duration::from_secs(10), "the moved listener serves upstream's names", || async {
        send(&client, "/incr", "counter-00001", &[]).await;
        // Refused until the listener is up: that is not an answer yet.
        let Ok(resp) = reqwest::get(format!("http://{moved}/metrics")).await else { return false };
        let text = resp.text().await.unwrap_or_default();
        text.contains("http_server_response_body_size_bytes_bucket")
            && text.contains("server_address=\"counter.default.example.com\"")
            && text.contains("http_client_request_duration_seconds_bucket")
            && text.contains("kn_k8s_client_http_response_status_code_total")
    })
    .await;
    assert_eq!(admin_get(moved, "/readyz").await.0, 404, "the moved listener is /metrics only");
}

/// A pod standing in for queue-proxy under system-internal TLS: plain HTTP (probes) and TLS
/// with `leaf`, returned with the TLS port.
async fn tls_pod(
    c: &Cluster,
    name: &str,
    revision: &str,
    leaf: &integration_tests::pki::Leaf,
) -> (integration_tests::Process, u16) {
    let dir = c.env.dir.path();
    let (cert, key) = (dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&cert, &leaf.cert).unwrap();
    std::fs::write(&key, &leaf.key).unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let flags = ["--tls-listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &key];
    let pod = c.env.demo_with(name, revision, &flags).await;
    wait_until(Duration::from_secs(10), "the pod's TLS listener", || async {
        pod.stdout().iter().any(|l| l.starts_with("listening https "))
    })
    .await;
    let port = pod
        .stdout()
        .iter()
        .find_map(|l| l.strip_prefix("listening https ")?.parse::<std::net::SocketAddr>().ok())
        .expect("a TLS listener")
        .port();
    (pod, port)
}

/// `system-internal-tls: enabled` (upstream's `cmd/activator/main.go`, `pkg/activator/
/// certificate`): the activator serves its TLS port with Secret `routing-serving-certs`,
/// rotated live; it reaches pods over TLS on their `https` port, trusting that Secret's `ca.crt`
/// and the trust-bundle ConfigMaps, for `data-plane.knative.dev` and `kn-user-<namespace>`
/// (`tls_context.go` `verifySAN`); a pod whose certificate is not trusted or names another
/// namespace gets nothing, and the client a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_internal_tls_serves_and_verifies_pods() {
    use integration_tests::knative::{private_endpoints_tls, secret, trust_bundle};
    use integration_tests::pki::{self, Authority};
    let c = Cluster::new().await;
    let (routing, pods_ca, stranger) =
        (Authority::new("routing CA"), Authority::new("pods CA"), Authority::new("stranger"));
    let served = routing.issue(&["kn-routing", "data-plane.knative.dev"]);
    c.api.put(
        Kind::Secret,
        secret(
            "routing-serving-certs",
            &[("tls.crt", &served.cert), ("tls.key", &served.key), ("ca.crt", &routing.pem())],
        ),
    );
    c.api.put(Kind::ConfigMap, trust_bundle("pods-trust", &[("cert.pem", &pods_ca.pem())]));
    c.api.put(Kind::ConfigMap, config_map("config-network", &[("system-internal-tls", "Enabled")]));

    let good = pods_ca.issue(&["kn-user-default", "data-plane.knative.dev"]);
    let (pod, tls_port) = tls_pod(&c, "tls-pod", "counter-00001", &good).await;
    let revision = Revision::new("counter", "counter-00001");
    c.api.put(Kind::Revision, revision.to_json());
    c.api.put(Kind::Endpoints, private_endpoints_tls(&revision, &[(pod.addr("http"), tls_port)]));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    // Two that must never be sent a request: an untrusted CA, and another namespace's name.
    let mut bad = Vec::new();
    for (name, leaf) in [
        ("untrusted-00001", stranger.issue(&["kn-user-default", "data-plane.knative.dev"])),
        ("elsewhere-00001", pods_ca.issue(&["kn-user-other", "data-plane.knative.dev"])),
    ] {
        let (pod, port) = tls_pod(&c, name, name, &leaf).await;
        let revision = Revision::new(name, name);
        c.api.put(Kind::Revision, revision.to_json());
        c.api.put(Kind::Endpoints, private_endpoints_tls(&revision, &[(pod.addr("http"), port)]));
        c.service(name, &[Target::new(name, 100)], &[]);
        bad.push((name, pod));
    }
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let (tls_addr, admin) = (activator.addr("tls"), activator.addr("admin"));

    // Client → activator's TLS port → pod's TLS port.
    let ingress: Vec<(&str, String)> = ingress("counter-00001");
    let headers: Vec<(&str, &str)> = ingress.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let reply = std::sync::Mutex::new(None);
    wait_until(Duration::from_secs(20), "the TLS port serves", || async {
        let got = pki::get(tls_addr, &routing.pem(), "kn-routing", "/incr?session_id=t", &headers).await.ok();
        let served = got.as_ref().is_some_and(|r| r.status == 200);
        *reply.lock().unwrap() = got;
        served
    })
    .await;
    let first = reply.into_inner().unwrap().unwrap();
    assert_eq!(first.body, "session=t, count=1\n");
    assert_eq!(first.headers["x-demo-tls"], "1", "the activator reached the pod over TLS");
    assert_eq!(first.headers["x-demo-pod"], "tls-pod");

    // Rotation: the next handshake shows the new certificate, no restart.
    let rotated = routing.issue(&["kn-routing", "data-plane.knative.dev"]);
    c.api.put(
        Kind::Secret,
        secret(
            "routing-serving-certs",
            &[("tls.crt", &rotated.cert), ("tls.key", &rotated.key), ("ca.crt", &routing.pem())],
        ),
    );
    wait_until(Duration::from_secs(10), "the rotated certificate is served", || async {
        let reply = pki::get(tls_addr, &routing.pem(), "kn-routing", "/incr?session_id=r", &headers).await;
        reply.is_ok_and(|r| r.served != first.served && r.status == 200)
    })
    .await;

    // Refused pods: 502, counted, logged, and the pod saw nothing.
    let client = Client::new(activator.addr("proxy"));
    for (name, pod) in &bad {
        let reply = send_status(&client, "/incr?session_id=never", name).await;
        assert_eq!(reply.status, 502, "{name}: {reply:?}");
        let direct = Client::new(pod.addr("http")).get("x", "/incr?session_id=never").await;
        assert_eq!(direct.body, "session=never, count=1\n", "{name} was never sent the request");
    }
    let refused = metric(admin, "activator_tls_handshakes_failed_total", &[("peer", "pod")]).await.unwrap_or(0.0);
    assert!(refused >= 2.0, "{refused}");
    assert!(activator.logs().contains("tls: invalid peer certificate"), "{}", activator.logs());

    // Plain 8012 keeps serving, as upstream's.
    let plain = send(&client, "/incr?session_id=t", "counter-00001", &[]).await;
    assert_eq!((plain.body.as_str(), plain.header("x-demo-tls")), ("session=t, count=2\n", "1"));
}

/// A request through the ingress's headers, whatever its status.
async fn send_status(client: &Client, path: &str, revision: &str) -> Reply {
    let mut req = client.request(reqwest::Method::GET, "counter.default.example.com", path);
    for (k, v) in ingress(revision) {
        req = req.header(k, v);
    }
    client.send(req).await
}
