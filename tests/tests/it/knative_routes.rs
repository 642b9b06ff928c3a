//! Knative's objects, trusted exactly as far as they deserve, end to end: each request is judged by
//! the Route whose host it came in on (else its revision's own Knative Service's Route), with its
//! revision's own annotations; pods come only from the Endpoints serving's controllers name after
//! the revision; a split by requests holds in Knative mode; and two namespaces with the same names
//! never steer each other. The in-process API server pages its lists and relists after a broken
//! watch as a real one does.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use integration_tests::knative::{
    Cluster, P, Revision, Target, knative_service, private_endpoints, public_endpoints, route,
};
use integration_tests::kube_api::Kind;
use integration_tests::{Client, Process, Reply, addrs, admin_get, metric, wait_until};

/// A request as Knative's ingress forwards it: at `host`, naming the revision it picked.
async fn ask(
    client: &Client,
    host: &str,
    namespace: &str,
    revision: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Reply {
    let mut req = client
        .request(reqwest::Method::GET, host, path)
        .header("Knative-Serving-Namespace", namespace)
        .header("Knative-Serving-Revision", revision);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    client.send(req).await
}

/// A Knative Service's own object, with `annotations` (prefixed).
fn ksvc(c: &Cluster, namespace: &str, name: &str, annotations: &[(&str, &str)]) {
    let annotations: BTreeMap<String, String> =
        annotations.iter().map(|(k, v)| (format!("{P}{k}"), (*v).to_owned())).collect();
    c.api.put(Kind::KnativeService, knative_service(namespace, name, &annotations));
}

fn revision_in(namespace: &str, service: &str, name: &str) -> Revision {
    Revision { namespace: namespace.into(), ..Revision::new(service, name) }
}

/// The case: service `shop` (sessions by `X-User`, two pods), service `other` (one pod),
/// and a standalone Route `a-preview` over both (named to sort first). Each request belongs to
/// the Route whose host it came in on; annotations are the revision's own Service's; a session
/// pinned in one Route is not pinned in another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_judged_by_the_route_it_came_in_on() {
    let c = Cluster::new().await;
    let (shop_pods, other_pods) = (c.env.pods("shop-00001", 2).await, c.env.pods("other-00001", 1).await);
    let (shop, other) = (Revision::new("shop", "shop-00001"), Revision::new("other", "other-00001"));
    c.revision(&shop, &addrs(&shop_pods));
    c.revision(&other, &addrs(&other_pods));
    c.api.put(Kind::Route, route("default", "shop", &[Target::new("shop-00001", 100)]));
    c.api.put(Kind::Route, route("default", "other", &[Target::new("other-00001", 100)]));
    ksvc(&c, "default", "shop", &[("sticky-session-header-name", "X-User")]);
    ksvc(&c, "default", "other", &[]);
    let mut preview = route("default", "a-preview", &[Target::new("shop-00001", 50), Target::new("other-00001", 50)]);
    preview["metadata"]["labels"] = serde_json::json!({});
    c.api.put(Kind::Route, preview);
    // A Route whose spec moved on before its status did: the ingress routes by its status.
    let mut lagging = route("default", "lagging", &[Target::new("shop-00001", 100)]);
    lagging["spec"]["traffic"] = serde_json::json!([{"revisionName": "other-00001", "percent": 100}]);
    lagging["metadata"]["labels"] = serde_json::json!({});
    c.api.put(Kind::Route, lagging);
    // And one with no traffic yet, whose host is nobody's.
    let mut empty = route("default", "empty", &[]);
    empty["metadata"]["labels"] = serde_json::json!({});
    c.api.put(Kind::Route, empty);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    let shop_names: Vec<String> = (0..2).map(|i| format!("shop-00001-pod-{i}")).collect();
    let (shop_host, preview_host) = ("shop.default.example.com", "a-preview.default.example.com");

    // The ingress sent these to shop-00001 at shop's host: shop's pods, whatever a-preview holds.
    for i in 0..3 {
        let reply = ask(&client, shop_host, "default", "shop-00001", "/incr", &[]).await;
        assert!(shop_names.contains(&reply.pod().to_owned()), "request {i} went to {}", reply.pod());
    }
    // A session pinned in a-preview to other's revision stays a-preview's.
    let pinned =
        ask(&client, preview_host, "default", "other-00001", "/incr?session_id=k", &[("K-Session", "k")]).await;
    assert_eq!(pinned.pod(), "other-00001-pod-0");
    let again = ask(&client, preview_host, "default", "shop-00001", "/incr?session_id=k", &[("K-Session", "k")]).await;
    assert_eq!((again.pod(), again.header("x-activator-decision")), ("other-00001-pod-0", "session-pin"));
    let at_shop = ask(&client, shop_host, "default", "shop-00001", "/incr?session_id=k", &[("K-Session", "k")]).await;
    assert!(shop_names.contains(&at_shop.pod().to_owned()), "not pinned in shop's Route: {}", at_shop.pod());
    assert_eq!(at_shop.header("x-activator-decision"), "new-pin");

    // shop's X-User sessions stay on one of shop's pods, at its host and at a host of no Route
    // (the revision's own Service's Route then judges).
    for host in [shop_host, "unknown.example.com", "empty.default.example.com"] {
        let mut seen = None;
        for n in 1..=3 {
            let reply =
                ask(&client, host, "default", "shop-00001", "/incr?session_id=alice", &[("X-User", "alice")]).await;
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(seen.get_or_insert_with(|| reply.pod().to_owned()), reply.pod(), "request {n} at {host}");
        }
    }
    // At a-preview's host, shop's revision keeps its annotations: X-User is still the session.
    let mut seen = None;
    for _ in 0..3 {
        let reply = ask(&client, preview_host, "default", "shop-00001", "/incr", &[("X-User", "bob")]).await;
        assert_eq!(seen.get_or_insert_with(|| reply.pod().to_owned()), reply.pod());
    }
    // The lagging Route lists shop-00001 (its status), not other-00001 (its spec).
    let lag_host = "lagging.default.example.com";
    let lagged = ask(&client, lag_host, "default", "shop-00001", "/incr", &[("K-Revision", "f")]).await;
    assert!(shop_names.contains(&lagged.pod().to_owned()));
    let steered = ask(&client, lag_host, "default", "other-00001", "/incr", &[("K-Revision", "f")]).await;
    assert_eq!(
        steered.pod(),
        "other-00001-pod-0",
        "other-00001 is not in the lagging Route's traffic: its own Route judges"
    );
}

/// Only the Endpoints named after a revision's private Service give its pods: a stray object with
/// the same labels never receives traffic, and its deletion changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_endpoints_object_never_receives_traffic() {
    let c = Cluster::new().await;
    let pods = c.env.pods("other-00001", 1).await;
    let stray = c.env.demo("stray-0", "other-00001").await;
    let other = Revision::new("other", "other-00001");
    c.revision(&other, &addrs(&pods));
    c.service("other", &[Target::new("other-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let admin = activator.addr("admin");
    let mut leftover = private_endpoints(&other, &[stray.addr("http")], &[]);
    leftover["metadata"]["name"] = "leftover".into();
    c.api.put(Kind::Endpoints, leftover);
    let mut public = public_endpoints(&other, &["10.0.0.1".parse().unwrap()]);
    public["metadata"]["name"] = "leftover-public".into();
    c.api.put(Kind::Endpoints, public);
    wait_until(Duration::from_secs(10), "both are ignored", || async {
        metric(admin, "activator_kube_objects_ignored_total", &[("resource", "endpoints")]).await == Some(2.0)
    })
    .await;
    let client = Client::new(activator.addr("proxy"));
    for _ in 0..10 {
        let reply = ask(&client, "other.default.example.com", "default", "other-00001", "/incr", &[]).await;
        assert_eq!((reply.status, reply.pod()), (200, "other-00001-pod-0"));
    }
    c.api.delete(Kind::Endpoints, "default", "leftover");
    wait_until(Duration::from_secs(10), "the deletion is ignored too", || async {
        metric(admin, "activator_kube_objects_ignored_total", &[("resource", "endpoints")]).await == Some(3.0)
    })
    .await;
    let reply = ask(&client, "other.default.example.com", "default", "other-00001", "/incr", &[]).await;
    assert_eq!((reply.status, reply.pod()), (200, "other-00001-pod-0"), "the revision keeps its pods");
    assert!(activator.logs().contains("only that one says where its pods are"));
}

/// `sticky-split-mode: requests` in Knative mode: new sessions follow the Route's 90/10, though
/// the ingress (here, a client naming the revision itself) picks one revision every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_follow_the_routes_percents_when_splitting_by_requests() {
    let c = Cluster::new().await;
    let (one, two) = (c.env.pods("counter-00001", 1).await, c.env.pods("counter-00002", 1).await);
    c.revision(&Revision::new("counter", "counter-00001"), &addrs(&one));
    c.revision(&Revision::new("counter", "counter-00002"), &addrs(&two));
    c.service(
        "counter",
        &[Target::new("counter-00001", 90), Target::new("counter-00002", 10)],
        &[("sticky-split-mode", "requests")],
    );
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    const SESSIONS: usize = 200;
    let mut by_revision: HashMap<String, usize> = HashMap::new();
    for i in 0..SESSIONS {
        let session = format!("s{i}");
        let reply = ask(
            &client,
            "counter.default.example.com",
            "default",
            "counter-00001",
            "/incr",
            &[("K-Session", &session)],
        )
        .await;
        assert_eq!(reply.status, 200);
        *by_revision.entry(reply.revision().to_owned()).or_default() += 1;
    }
    // The steering is exact on one replica: within 2 % of 90/10 over 200 sessions.
    let two_share = by_revision.get("counter-00002").copied().unwrap_or(0);
    assert!((16..=24).contains(&two_share), "{by_revision:?}");
}

/// Two namespaces with services, revisions and sessions of the same names: nothing of one ever
/// steers the other (pins, split counts, annotations, Endpoints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_namespaces_with_the_same_names_never_steer_each_other() {
    let c = Cluster::new().await;
    let mut pods: HashMap<&str, Vec<Process>> = HashMap::new();
    for ns in ["alpha", "beta"] {
        let revision = revision_in(ns, "counter", "counter-00001");
        let own = c.env.pods(&format!("{ns}-counter-00001"), 2).await;
        c.api.put(Kind::Revision, revision.to_json());
        c.api.put(Kind::Endpoints, private_endpoints(&revision, &addrs(&own), &[]));
        let mut r = route(ns, "counter", &[Target::new("counter-00001", 100)]);
        r["metadata"]["namespace"] = ns.into();
        c.api.put(Kind::Route, r);
        pods.insert(ns, own);
    }
    ksvc(&c, "alpha", "counter", &[("sticky-session-header-name", "X-User"), ("sticky-split-mode", "requests")]);
    ksvc(&c, "beta", "counter", &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    let call = |ns: &'static str, extra: Vec<(&'static str, &'static str)>| {
        let client = client.clone();
        async move {
            let host = format!("counter.{ns}.example.com");
            ask(&client, &host, ns, "counter-00001", "/incr?session_id=same", &extra).await
        }
    };
    // The same session id counts up in each namespace on that namespace's pods alone.
    for n in 1..=3 {
        for ns in ["alpha", "beta"] {
            let reply = call(ns, vec![("K-Session", "same")]).await;
            assert_eq!(reply.body, format!("session=same, count={n}\n"), "{ns}");
            assert!(reply.pod().starts_with(ns), "{ns}'s request went to {}", reply.pod());
        }
    }
    // alpha's annotation makes X-User a session there only: beta spreads it over both pods.
    let mut beta_pods = std::collections::HashSet::new();
    for _ in 0..20 {
        let reply = call("beta", vec![("X-User", "carol")]).await;
        beta_pods.insert(reply.pod().to_owned());
    }
    assert_eq!(beta_pods.len(), 2, "X-User is no session in beta: {beta_pods:?}");
    let alpha = call("alpha", vec![("X-User", "carol")]).await;
    for _ in 0..5 {
        assert_eq!(call("alpha", vec![("X-User", "carol")]).await.pod(), alpha.pod(), "X-User is alpha's session");
    }
    drop(pods);
}

/// A watch broken and relisted (410 Gone, the list paged two at a time) while an object is
/// deleted: the relist does not list it, so its pods leave the view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_deleted_while_the_watch_relists_leaves_the_view() {
    let c = Cluster::new().await;
    let (kept, gone) = (c.env.pods("kept-00001", 1).await, c.env.pods("gone-00001", 1).await);
    let gone_revision = Revision { timeout_seconds: 2, ..Revision::new("gone", "gone-00001") };
    c.revision(&Revision::new("kept", "kept-00001"), &addrs(&kept));
    c.revision(&gone_revision, &addrs(&gone));
    c.service("kept", &[Target::new("kept-00001", 100)], &[]);
    c.service("gone", &[Target::new("gone-00001", 100)], &[]);
    // A third, so the lists of revisions and Endpoints take more than one page of two.
    c.revision(&Revision::new("third", "third-00001"), &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &["--kube-page-size", "2"]).await;
    let client = Client::new(activator.addr("proxy"));
    let gone_host = "gone.default.example.com";
    assert_eq!(ask(&client, gone_host, "default", "gone-00001", "/incr", &[]).await.status, 200);
    let admin = activator.addr("admin");
    // kube-rs retries what a held API server answers; its log says it was turned away.
    let refused = || activator.logs().matches("503 Service Unavailable").count();
    let before = refused();
    c.api.hold();
    c.api.compact();
    c.api.delete(Kind::Endpoints, "default", "gone-00001-private");
    wait_until(Duration::from_secs(20), "the relist is turned away while the API server is held", || async {
        refused() > before
    })
    .await;
    c.api.release();
    wait_until(Duration::from_secs(60), "the deleted Endpoints' pod leaves", || async {
        let reply = ask(&client, gone_host, "default", "gone-00001", "/incr", &[]).await;
        reply.status == 504
    })
    .await;
    assert_eq!(ask(&client, "kept.default.example.com", "default", "kept-00001", "/incr", &[]).await.status, 200);
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
}
