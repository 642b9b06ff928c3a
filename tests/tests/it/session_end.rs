//! Telling a service that a session ended (`sticky-session-end-path`): two activators share pins
//! through a real Redis, and demo pods record each end call they get. A session's idle expiry and
//! its re-pin each reach the pod it was pinned to exactly once, whichever replicas served it.

use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::replicas::Replicas;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, Process, addrs, admin_get, wait_until};

const P: &str = "activator.knative.dev/";

fn service(pods: &[SocketAddr]) -> String {
    yaml(&[Service::new("counter")
        .annotation(&format!("{P}sticky-session-end-path"), "/session/end")
        .annotation(&format!("{P}sticky-ttl"), "3s")
        .revision("counter-1", 100, pods)])
}

/// Two replicas sharing pins, in front of two pods of `counter-1`.
async fn start() -> Replicas {
    Replicas::start("counter-1", 2, service, &[]).await
}

/// Sends `requests` for `session`, alternating between the replicas, and returns the pod
/// that served them all.
async fn use_session(r: &Replicas, session: &str, requests: usize) -> String {
    let clients = [&r.via_a, &r.via_b];
    let mut pods = Vec::new();
    for i in 0..requests {
        let reply = clients[i % 2].get_with("counter.test", "/incr", &[("K-Session", session)]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        pods.push(reply.pod().to_owned());
    }
    pods.dedup();
    assert_eq!(pods.len(), 1, "{session} stayed on one pod: {pods:?}");
    pods.remove(0)
}

/// What both replicas did about ended sessions for `reason`: calls sent, and ends seen.
async fn ends_handled(r: &Replicas, reason: &str) -> (f64, f64) {
    let (mut sent, mut seen) = (0.0, 0.0);
    for replica in [&r.a, &r.b] {
        let metrics = Metrics::scrape(replica.addr("admin")).await;
        for result in ["sent", "failed", "elsewhere"] {
            let n = metrics.value("activator_session_ends_total", &[("reason", reason), ("result", result)]);
            seen += n.unwrap_or(0.0);
            sent += if result == "sent" { n.unwrap_or(0.0) } else { 0.0 };
        }
    }
    (sent, seen)
}

/// The pods with the names they answer with.
fn named_pods(r: &Replicas) -> impl Iterator<Item = (String, &Process)> {
    r.pods.iter().enumerate().map(|(i, pod)| (format!("counter-1-pod-{i}"), pod))
}

/// The end calls each pod got, by pod name.
async fn calls(r: &Replicas) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (name, pod) in named_pods(r) {
        let (status, body) = admin_get(pod.addr("http"), "/session/ends").await;
        assert_eq!(status, 200);
        out.push((name, body.lines().map(str::to_owned).collect()));
    }
    out
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_ended_once_on_its_pod_across_two_replicas() {
    let r = start().await;
    let pod = use_session(&r, "idle-1", 4).await;
    // Through B alone for longer than the TTL: A's copy of the pin goes idle, but the session
    // lives on, so nobody calls.
    let via_b = Client::new(r.b.addr("proxy"));
    let mut pace = tokio::time::interval(Duration::from_millis(500));
    for _ in 0..10 {
        pace.tick().await;
        assert_eq!(via_b.get_with("counter.test", "/incr", &[("K-Session", "idle-1")]).await.pod(), pod);
    }
    assert!(calls(&r).await.iter().all(|(_, calls)| calls.is_empty()), "no end while the session is in use");
    // Both replicas watched the session; each sees its pin go idle, and one of them calls.
    wait_until(Duration::from_secs(20), "both replicas saw the idle session end", || async {
        ends_handled(&r, "idle").await.1 >= 2.0
    })
    .await;
    assert_eq!(ends_handled(&r, "idle").await, (1.0, 2.0), "one call for the two replicas");
    for (name, calls) in calls(&r).await {
        let expected: &[&str] = if name == pod { &["idle-1 idle"] } else { &[] };
        assert_eq!(calls, expected, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_session_is_ended_once_on_the_pod_it_left() {
    let r = start().await;
    let left = use_session(&r, "moving-1", 4).await;
    // Its pod leaves the revision (the process keeps running, as a pod does while it drains).
    let staying: Vec<SocketAddr> =
        named_pods(&r).filter(|(name, _)| *name != left).map(|(_, p)| p.addr("http")).collect();
    let topology = service(&staying);
    r.env.reload_all(&[&r.a, &r.b], &topology).await;
    let now = use_session(&r, "moving-1", 2).await;
    assert_ne!(now, left, "the session moved");
    wait_until(Duration::from_secs(20), "both replicas saw the session move", || async {
        ends_handled(&r, "moved").await.1 >= 2.0
    })
    .await;
    assert_eq!(ends_handled(&r, "moved").await, (1.0, 2.0), "one call for the two replicas");
    for (name, calls) in calls(&r).await {
        if name == left {
            assert_eq!(calls, ["moving-1 moved"], "{name}");
        } else {
            assert!(calls.iter().all(|c| c != "moving-1 moved"), "{name}: {calls:?}");
        }
    }
}

/// Issue 25, item 8: a session whose pod left its revision is not told it ended once the pod has
/// been gone longer than the grace (5 s): that address may be another pod's by then, which must
/// not learn the session's id. The end is counted as `gone`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_end_goes_only_to_a_pod_still_listed() {
    let env = Env::new();
    let pods = env.pods("counter-1", 2).await;
    let topology = |pods: &[SocketAddr]| {
        yaml(&[Service::new("counter")
            .annotation(&format!("{P}sticky-session-end-path"), "/session/end")
            .annotation(&format!("{P}sticky-ttl"), "8s")
            .revision("counter-1", 100, pods)])
    };
    env.write_topology(&topology(&addrs(&pods)));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    let pinned = client.get_with("counter.test", "/incr", &[("K-Session", "left-behind")]).await.pod().to_owned();
    let named = |i: usize| format!("counter-1-pod-{i}") == pinned;
    let (left, stays) = if named(0) { (&pods[0], &pods[1]) } else { (&pods[1], &pods[0]) };
    env.reload(&activator, &topology(&[stays.addr("http")])).await;
    let admin = activator.addr("admin");
    wait_until(Duration::from_secs(30), "the idle session's end is counted as gone", || async {
        let metrics = Metrics::scrape(admin).await;
        metrics.value("activator_session_ends_total", &[("reason", "idle"), ("result", "gone")]) == Some(1.0)
    })
    .await;
    let (status, heard) = admin_get(left.addr("http"), "/session/ends").await;
    assert_eq!((status, heard.as_str()), (200, ""), "the pod that left heard nothing");
}

/// Issue 25, item 2: no client can end another's session. Through the activator the end path
/// is refused however it is spelled, and the headers of an end never reach a pod from a client.
/// Straight to the pod (as clients reach queue-proxy once Knative's burst capacity takes the
/// activator off the path), an unsigned end is refused by a pod that checks signatures, while
/// the activator's own signed end is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_another_clients_session_end() {
    let env = Env::new();
    let keys = env.dir.path().join("session-end.keys");
    std::fs::write(&keys, "a-session-end-key-of-at-least-32-bytes\n").unwrap();
    let keys = keys.display().to_string();
    let pod = env.demo_with("counter-1-pod-0", "counter-1", &["--session-end-keys", &keys]).await;
    env.write_topology(&service(&[pod.addr("http")]));
    let activator = env.activator(&["--session-end-keys", &keys]).await;
    let client = Client::new(activator.addr("proxy"));
    let victim = [("K-Session", "victim")];
    for _ in 0..3 {
        assert_eq!(client.get_with("counter.test", "/incr", &victim).await.status, 200);
    }

    let forged = [("K-Session", "victim"), ("K-Session-End", "idle")];
    for path in ["/session/end", "//session/end", "/session/./end", "/session%2Fend", "/session/end?x=1"] {
        let req = client.request(reqwest::Method::POST, "counter.test", path);
        let reply = client.send(forged.iter().fold(req, |req, (k, v)| req.header(*k, *v))).await;
        assert_eq!(reply.status, 403, "{path}: {reply:?}");
    }
    let sneaked = [("K-Session-End", "idle"), ("K-Session-End-Time", "1"), ("K-Session-End-Signature", "v1=00")];
    let seen = client.get_with("counter.test", "/headers", &sneaked).await;
    assert_eq!(seen.status, 200);
    assert!(
        !seen.body.to_ascii_lowercase().contains("k-session-end"),
        "a client's end headers reached the pod: {}",
        seen.body
    );

    let direct = reqwest::Client::new();
    let unsigned = direct
        .post(format!("http://{}/session/end", pod.addr("http")))
        .header("K-Session", "victim")
        .header("K-Session-End", "idle")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401, "the pod refuses an end the activator did not sign");

    let next = client.get_with("counter.test", "/incr", &victim).await;
    assert!(next.body.contains("count=4"), "the victim's session lived on: {}", next.body);
    let (_, heard) = admin_get(pod.addr("http"), "/session/ends").await;
    assert_eq!(heard, "", "no forged end was heard");

    // The activator's own end, signed, is heard once the session goes idle (`sticky-ttl: 3s`).
    wait_until(Duration::from_secs(30), "the pod heard the activator's signed end", || async {
        admin_get(pod.addr("http"), "/session/ends").await.1 == "victim idle\n"
    })
    .await;
}
