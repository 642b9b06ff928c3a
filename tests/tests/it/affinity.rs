//! Revision and session affinity through one activator with the in-memory pin store, end to end
//! with real demo-service processes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, addrs, metric, wait_until};

const P: &str = "activator.knative.dev/";

/// Sends `requests` and asserts the counter reads 1, 2, 3, … on one pod.
async fn assert_counts_up(client: &Client, requests: &[(&str, Vec<(&str, &str)>)], session: &str) -> String {
    let mut pod = None;
    for (n, (path, headers)) in requests.iter().enumerate() {
        let reply = client.get_with("counter.test", path, headers).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, format!("session={session}, count={}\n", n + 1), "request {} of {path}", n + 1);
        let landed = pod.get_or_insert_with(|| reply.pod().to_owned());
        assert_eq!(landed, reply.pod());
    }
    pod.unwrap_or_default()
}

fn repeat<'a>(path: &'a str, headers: &[(&'a str, &'a str)], n: usize) -> Vec<(&'a str, Vec<(&'a str, &'a str)>)> {
    (0..n).map(|_| (path, headers.to_vec())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_header_keeps_a_session_on_one_pod() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods))]));
    let activator = env.activator(&["--debug-headers"]).await;
    let client = Client::new(activator.addr("proxy"));
    // Every pod passes its first probe before sessions start, or the first ready pod gets them
    // all on a loaded machine.
    let seen = std::sync::Mutex::new(HashSet::new());
    wait_until(Duration::from_secs(20), "every pod takes requests", || async {
        let pod = client.get("counter.test", "/healthz").await.pod().to_owned();
        let mut seen = seen.lock().unwrap();
        seen.insert(pod);
        seen.len() == 3
    })
    .await;

    let mut landed = HashSet::new();
    for session in ["abc", "def", "ghi", "jkl", "mno", "pqr"] {
        let path = format!("/incr?session_id={session}");
        landed.insert(assert_counts_up(&client, &repeat(&path, &[("K-Session", session)], 3), session).await);
    }
    assert!(landed.len() > 1, "sessions are still balanced across pods: {landed:?}");
    let again = client.get_with("counter.test", "/incr?session_id=abc", &[("K-Session", "abc")]).await;
    assert_eq!(again.header("x-activator-decision"), "session-pin");
    let fresh = client.get_with("counter.test", "/incr", &[("K-Session", "new")]).await;
    assert_eq!(fresh.header("x-activator-decision"), "new-pin");
    assert_eq!(client.get("counter.test", "/incr").await.header("x-activator-decision"), "split");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_from_query_path_and_cookie_annotations() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    let by = |annotation: &str, value: &str| {
        yaml(&[Service::new("counter")
            .revision("counter-1", 100, &addrs(&pods))
            .with(|r| r.annotations.push((format!("{P}{annotation}"), value.to_owned())))])
    };
    env.write_topology(&by("sticky-session-query-parameter", "session_id"));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    assert_counts_up(&client, &repeat("/incr?session_id=q1", &[], 3), "q1").await;

    env.reload(&activator, &by("sticky-session-path-segment", "2")).await;
    assert_counts_up(&client, &repeat("/incr/p1", &[], 3), "p1").await;

    env.reload(&activator, &by("sticky-session-cookie-name", "sid")).await;
    let first = client.get("counter.test", "/incr?session_id=c1").await;
    assert_eq!(first.body, "session=c1, count=1\n");
    let set_cookie = first.header("set-cookie").to_owned();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Max-Age"), "a session cookie, which an active session cannot outlive: {set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("sid=") && cookie.len() == "sid=".len() + 32, "{cookie}");
    for n in 2..=3 {
        let reply = client.get_with("counter.test", "/incr?session_id=c1", &[("Cookie", &cookie)]).await;
        assert_eq!(reply.body, format!("session=c1, count={n}\n"));
        assert_eq!(reply.pod(), first.pod());
        assert!(reply.header("set-cookie").is_empty(), "a client with the cookie gets no new one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_ids_keep_a_flow_on_one_revision_of_a_split() {
    // By the default header, then by a query parameter named in an annotation; each on fresh pods
    // so the counters start at 1.
    for (annotation, path, headers) in
        [(None, "/incr", vec![("K-Revision", "abc")]), (Some("flow_id"), "/incr?flow_id=abc", vec![])]
    {
        let env = Env::new();
        let (one, two) = (env.demo("blue", "counter-1").await, env.demo("green", "counter-2").await);
        let svc = Service::halves("counter", ("counter-1", one.addr("http")), ("counter-2", two.addr("http")));
        let svc = match annotation {
            Some(param) => svc.annotation(&format!("{P}sticky-revision-query-parameter"), param),
            None => svc,
        };
        env.write_topology(&yaml(&[svc]));
        let activator = env.activator(&[]).await;
        let client = Client::new(activator.addr("proxy"));
        // With a 50/50 split, twenty requests on one revision by chance would be one in half a million.
        assert_counts_up(&client, &repeat(path, &headers, 20), "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_percent_drains_pinned_sessions_and_removal_moves_them() {
    let env = Env::new();
    let (old, new) = (env.demo("old-pod", "app-1").await, env.demo("new-pod", "app-2").await);
    let split = |a: u32, b: Option<u32>| {
        let svc = Service::new("counter").revision("app-2", a, &[new.addr("http")]);
        yaml(&[match b {
            Some(b) => svc.revision("app-1", b, &[old.addr("http")]),
            None => svc,
        }])
    };
    env.write_topology(&split(50, Some(50)));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));

    // Find a session the split sent to the old revision.
    let mut on_old = None;
    for i in 0..200 {
        let id = format!("s{i}");
        let reply = client.get_with("counter.test", &format!("/incr?session_id={id}"), &[("K-Session", &id)]).await;
        if reply.revision() == "app-1" {
            on_old = Some(id);
            break;
        }
    }
    let id = on_old.expect("the 50/50 split sends some session to app-1");
    let path = format!("/incr?session_id={id}");
    let session = [("K-Session", id.as_str())];

    env.reload(&activator, &split(100, Some(0))).await;
    for n in 2..=4 {
        let reply = client.get_with("counter.test", &path, &session).await;
        assert_eq!((reply.revision(), reply.body.as_str()), ("app-1", format!("session={id}, count={n}\n").as_str()));
    }
    for i in 0..30 {
        let fresh = format!("fresh{i}");
        let reply = client.get_with("counter.test", "/incr", &[("K-Session", &fresh)]).await;
        assert_eq!(reply.revision(), "app-2", "new sessions never land on a 0 % revision");
    }
    let flow = client.get_with("counter.test", "/incr", &[("K-Revision", "new-flow")]).await;
    assert_eq!(flow.revision(), "app-2");

    env.reload(&activator, &split(100, None)).await;
    let moved = client.get_with("counter.test", &path, &session).await;
    assert_eq!((moved.revision(), moved.body.as_str()), ("app-2", format!("session={id}, count=1\n").as_str()));
    let stays = client.get_with("counter.test", &path, &session).await;
    assert_eq!((stays.revision(), stays.body.as_str()), ("app-2", format!("session={id}, count=2\n").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_inside_its_revision_when_its_pod_leaves() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    let with_pods = |pods: &[SocketAddr]| yaml(&[Service::new("counter").revision("counter-1", 100, pods)]);
    env.write_topology(&with_pods(&addrs(&pods)));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    let session = [("K-Session", "abc")];
    let pinned = assert_counts_up(&client, &repeat("/incr?session_id=abc", &session, 2), "abc").await;

    let others: Vec<SocketAddr> = (pods.iter().enumerate())
        .filter(|(i, _)| format!("counter-1-pod-{i}") != pinned)
        .map(|(_, p)| p.addr("http"))
        .collect();
    assert_eq!(others.len(), 2);
    env.reload(&activator, &with_pods(&others)).await;

    let moved = assert_counts_up(&client, &repeat("/incr?session_id=abc", &session, 3), "abc").await;
    assert_ne!(moved, pinned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_pins_are_balanced_anew() {
    let env = Env::new();
    let pods = env.pods("counter-1", 2).await;
    // Longer than two of the store's once-a-second size reports, so the pin is seen before it
    // expires even on a busy machine.
    env.write_topology(&yaml(&[Service::new("counter").annotation(&format!("{P}sticky-ttl"), "3s").revision(
        "counter-1",
        100,
        &addrs(&pods),
    )]));
    let activator = env.activator(&["--debug-headers"]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let first = client.get_with("counter.test", "/incr", &[("K-Session", "short")]).await;
    assert_eq!(first.header("x-activator-decision"), "new-pin");
    assert_eq!(
        client.get_with("counter.test", "/incr", &[("K-Session", "short")]).await.header("x-activator-decision"),
        "session-pin"
    );

    let entries = || async { metric(admin, "activator_pin_entries", &[]).await };
    wait_until(Duration::from_secs(10), "the pin is counted", || async { entries().await == Some(1.0) }).await;
    wait_until(Duration::from_secs(15), "the idle pin expires", || async { entries().await == Some(0.0) }).await;
    let after = client.get_with("counter.test", "/incr", &[("K-Session", "short")]).await;
    assert_eq!(after.header("x-activator-decision"), "new-pin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distinct_ids_keep_the_store_at_its_bound() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("counter", &["--max-pins", "100"]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    for i in 0..600 {
        let id = format!("flood-{i}");
        assert_eq!(client.get_with("counter.test", "/incr", &[("K-Session", &id)]).await.status, 200);
    }
    let entries = || async { metric(admin, "activator_pin_entries", &[]).await.unwrap_or(-1.0) };
    wait_until(Duration::from_secs(10), "the store reports its size", || async { entries().await > 0.0 }).await;
    let held = entries().await;
    assert!(held <= 100.0, "{held} pins held with a bound of 100");
    assert_eq!(
        metric(admin, "activator_pin_writes_total", &[("kind", "session"), ("result", "new")]).await,
        Some(600.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_and_annotations_get_clear_answers() {
    let env = Env::new();
    let pod = env.demo("pod", "counter-1").await;
    env.write_topology(&yaml(&[Service::new("counter")
        .annotation(&format!("{P}sticky-session-path-segment"), "zero")
        .annotation(&format!("{P}sticky-ttl"), "forever")
        .revision("counter-1", 100, &[pod.addr("http")])]));
    let activator = env.activator(&[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));

    let long = "x".repeat(1025);
    let refused = client.get_with("counter.test", "/incr", &[("K-Session", &long)]).await;
    assert_eq!((refused.status, refused.body.as_str()), (400, "session id is longer than 1024 bytes\n"));
    let ok = client.get_with("counter.test", "/incr", &[("K-Session", &long[1..])]).await;
    assert_eq!(ok.status, 200, "1 KiB exactly is fine");

    let text = Metrics::scrape(admin).await;
    for annotation in ["sticky-session-path-segment", "sticky-ttl"] {
        let labels = [("annotation", format!("{P}{annotation}"))];
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(text.value("activator_annotation_errors_total", &labels), Some(1.0), "{annotation}");
    }
    let logs = activator.logs();
    assert_eq!(logs.matches("ignoring annotation").count(), 2, "one line each:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_requests_wait_for_their_pods_capacity() {
    let env = Env::new();
    let pods = env.pods("counter-1", 2).await;
    env.write_topology(&yaml(&[Service::new("counter")
        .revision("counter-1", 100, &addrs(&pods))
        .with(|r| r.container_concurrency = 1)]));
    let activator = env.activator(&[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let session = [("K-Session", "busy")];
    let pinned = client.get_with("counter.test", "/incr", &session).await.pod().to_owned();

    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.get_with("counter.test", "/slow?delay=1s", &[("K-Session", "busy")]).await })
    };
    wait_until(Duration::from_secs(10), "the slow request holds the pinned pod", || async {
        metric(admin, "activator_in_flight_requests", &[("revision", "counter-1")]).await == Some(1.0)
    })
    .await;
    let waited = client.get_with("counter.test", "/incr", &session).await;
    assert_eq!(waited.pod(), pinned, "waited for its pod instead of bypassing to the free one");
    assert_eq!(slow.await.unwrap().pod(), pinned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_of_a_session_share_one_pod() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods))]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    for i in 0..50 {
        let id = format!("race-{i}");
        let session = [("K-Session", id.as_str())];
        let (a, b) = tokio::join!(
            client.get_with("counter.test", "/incr", &session),
            client.get_with("counter.test", "/incr", &session)
        );
        assert_eq!(a.pod(), b.pod(), "session {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_pin_lifetimes_are_clamped_not_a_crash() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    env.write_topology(&yaml(&[Service::new("counter")
        .annotation(&format!("{P}sticky-ttl"), "200000000000000d")
        .annotation(&format!("{P}sticky-max-age"), "200000000000000d")
        .revision("counter-1", 100, &addrs(&pods))]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    assert_counts_up(&client, &repeat("/incr?session_id=forever", &[("K-Session", "forever")], 3), "forever").await;
    let text = Metrics::scrape(activator.addr("admin")).await;
    for annotation in ["sticky-ttl", "sticky-max-age"] {
        let errors = text.value("activator_annotation_errors_total", &[("annotation", &format!("{P}{annotation}"))]);
        assert_eq!(errors, Some(1.0), "{annotation}:\n{text}");
    }
}
