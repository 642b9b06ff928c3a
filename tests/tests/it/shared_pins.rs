//! The shared pin table: several activator replicas, one real `redis-server`, real demo pods.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use integration_tests::redis::{Redis, Security, Tls};
use integration_tests::replicas::Replicas;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, activator_pins, addrs, metric, pin_store_round_trips, wait_until};

/// Three pods of `counter-1`, all in the topology, behind two replicas with `flags`.
async fn three_pods(flags: &[&str]) -> Replicas {
    let topology = |pods: &[SocketAddr]| yaml(&[Service::new("counter").revision("counter-1", 100, pods)]);
    Replicas::start("counter-1", 3, topology, flags).await
}

/// Both replicas' clients.
fn clients(replicas: &Replicas) -> (Client, Client) {
    (replicas.via_a.clone(), replicas.via_b.clone())
}

async fn session(client: &Client, id: &str) -> integration_tests::Reply {
    let reply = client.get_with("counter.test", &format!("/incr?session_id={id}"), &[("K-Session", id)]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
}

/// A new session pinned through one activator is honoured through the other.
async fn shares_new_pins(from: &Client, to: &Client, id: &str) -> bool {
    let first = from.get_with("counter.test", "/incr", &[("K-Session", id)]).await;
    let second = to.get_with("counter.test", "/incr", &[("K-Session", id)]).await;
    first.status == 200 && second.status == 200 && first.pod() == second.pod()
}

/// Both replicas report the store up and three new sessions in a row are shared (one could agree
/// by chance: three pods).
async fn sharing_resumed(cluster: &Replicas, tag: String) -> bool {
    let (a, b) = clients(cluster);
    for admin in [cluster.a.addr("admin"), cluster.b.addr("admin")] {
        if metric(admin, "activator_pin_store_up", &[]).await != Some(1.0) {
            return false;
        }
    }
    for i in 0..3 {
        if !shares_new_pins(&a, &b, &format!("{tag}-{i}")).await {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_routes_a_session_to_the_same_pod() {
    let cluster = three_pods(&[]).await;
    let (a, b) = clients(&cluster);
    for id in ["s1", "s2", "s3", "s4", "s5", "s6"] {
        let mut pod = None;
        for (round, via) in [&a, &b, &a, &b].into_iter().enumerate() {
            let reply = session(via, id).await;
            assert_eq!(reply.body, format!("session={id}, count={}\n", round + 1), "round {} of {id}", round + 1);
            assert_eq!(pod.get_or_insert_with(|| reply.pod().to_owned()), reply.pod(), "round {} of {id}", round + 1);
        }
    }

    let (found, report) = cluster.pins(&["get", "--service", "counter", "--session", "s1"]).await;
    assert!(found, "{report}");
    assert!(
        report.contains("aa:{default/counter}:s:") && report.contains("revision counter-1 pod 127.0.0.1:"),
        "{report}"
    );
    let (listed, list) = cluster.pins(&["list", "--service", "counter"]).await;
    assert!(listed && list.contains("6 pins for default/counter"), "{list}");
    let (deleted, _) = cluster.pins(&["delete", "--service", "counter", "--session", "s1"]).await;
    assert!(deleted);
    let (found, report) = cluster.pins(&["get", "--service", "counter", "--session", "s1"]).await;
    assert!(!found && report.contains("no pin"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_requests_through_two_replicas_agree() {
    let cluster = three_pods(&[]).await;
    let (a, b) = clients(&cluster);
    for i in 0..100 {
        let id = format!("race-{i}");
        let headers = [("K-Session", id.as_str())];
        let (x, y) =
            tokio::join!(a.get_with("counter.test", "/incr", &headers), b.get_with("counter.test", "/incr", &headers));
        assert_eq!((x.status, y.status), (200, 200));
        assert_eq!(x.pod(), y.pod(), "session {id}");
    }
    let text = Metrics::scrape(cluster.a.addr("admin")).await;
    let lost = text.value("activator_pin_writes_total", &[("kind", "session"), ("result", "conflict")]);
    let lost_b =
        metric(cluster.b.addr("admin"), "activator_pin_writes_total", &[("kind", "session"), ("result", "conflict")])
            .await;
    eprintln!("lost races: A {lost:?}, B {lost_b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_no_request_and_sharing_resumes() {
    let mut cluster = three_pods(&[]).await;
    let (a, b) = clients(&cluster);
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(n, client)| {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("load-{n}-{}", i % 20);
                    let req = client.request(reqwest::Method::GET, "counter.test", "/incr").header("K-Session", id);
                    if !client.try_send(req).await.is_ok_and(|r| r.status == 200) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(10), "load flows", || async { sent.load(Ordering::Relaxed) > 100 }).await;

    cluster.redis.kill().await;
    let admin = cluster.a.addr("admin");
    wait_until(Duration::from_secs(10), "A notices the outage", || async {
        metric(admin, "activator_pin_store_up", &[]).await == Some(0.0)
    })
    .await;
    // Sessions stay on one pod per replica while Redis is away.
    for (via, id) in [(&a, "outage-a"), (&b, "outage-b")] {
        let pod = session(via, id).await.pod().to_owned();
        for _ in 0..5 {
            assert_eq!(session(via, id).await.pod(), pod, "{id} during the outage");
        }
    }
    // A session new to both replicas is placed by its hash, alike through either (issue 26).
    for i in 0..6 {
        let id = format!("new-in-outage-{i}");
        let (via_a, via_b) = (session(&a, &id).await, session(&b, &id).await);
        assert_eq!(via_a.pod(), via_b.pod(), "{id} through A and then B, with no store to agree through");
    }
    let during = sent.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "load goes on during the outage", || async {
        sent.load(Ordering::Relaxed) > during + 100
    })
    .await;

    cluster.redis.restart().await;
    let mut n = 0;
    wait_until(Duration::from_secs(30), "new sessions pinned via A are honoured via B", || {
        n += 1;
        sharing_resumed(&cluster, format!("after-{n}"))
    })
    .await;
    // A session pinned during the outage is pushed to Redis once it is used again, so the other
    // replica follows it.
    let pinned_during = session(&a, "outage-a").await.pod().to_owned();
    let (pushed, _) = cluster.pins(&["get", "--service", "counter", "--session", "outage-a"]).await;
    if !pushed {
        wait_until(Duration::from_secs(10), "the outage pin reaches Redis", || async {
            session(&a, "outage-a").await;
            cluster.pins(&["get", "--service", "counter", "--session", "outage-a"]).await.0
        })
        .await;
    }
    assert_eq!(session(&b, "outage-a").await.pod(), pinned_during);
    for i in 0..10 {
        let shared = shares_new_pins(&a, &b, &format!("shared-again-{i}")).await;
        assert!(shared, "round {i}\nA:\n{}\nB:\n{}", cluster.a.logs(), cluster.b.logs());
    }

    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed of {} requests", sent.load(Ordering::Relaxed));
    let text = Metrics::scrape(admin).await;
    assert!(text.sum("activator_pin_store_errors_total") >= 1.0, "errors are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_connections_recover_without_a_restart() {
    let cluster = three_pods(&[]).await;
    let (a, b) = clients(&cluster);
    assert!(shares_new_pins(&a, &b, "before").await);
    let killed = cluster.redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    assert!(killed.trim().parse::<u32>().unwrap_or(0) >= 2, "killed {killed}");
    let mut n = 0;
    wait_until(Duration::from_secs(30), "sharing works again", || {
        n += 1;
        sharing_resumed(&cluster, format!("after-kill-{n}"))
    })
    .await;
    for i in 0..10 {
        assert!(shares_new_pins(&a, &b, &format!("still-shared-{i}")).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_ids_never_steer_another() {
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    let pods = env.pods("counter-1", 3).await;
    let addrs = addrs(&pods);
    // Same service and revision names, same pods: only the namespace tells them apart.
    env.write_topology(&yaml(&[
        Service::new("counter").in_namespace("tenant-a").revision("counter-1", 100, &addrs),
        Service::new("counter").in_namespace("tenant-b").revision("counter-1", 100, &addrs),
    ]));
    let activator = env.shared_activator(&redis).await;
    let client = Client::new(activator.addr("proxy"));
    let mut same = 0;
    for i in 0..20 {
        let id = format!("user-{i}");
        let in_a = client.get_with("counter.tenant-a.test", "/incr", &[("K-Session", &id)]).await;
        let in_b = client.get_with("counter.tenant-b.test", "/incr", &[("K-Session", &id)]).await;
        assert_eq!(in_b.header("x-activator-decision"), "new-pin", "tenant-b's {id} is not pinned by tenant-a's");
        same += usize::from(in_a.pod() == in_b.pod());
    }
    assert!(same < 20, "tenant-b's sessions follow tenant-a's pins");
    let keys = redis.cli(&["--scan", "--pattern", "aa:*"]).await;
    assert_eq!(keys.lines().filter(|k| k.starts_with("aa:{tenant-a/counter}:s:")).count(), 20, "{keys}");
    assert_eq!(keys.lines().filter(|k| k.starts_with("aa:{tenant-b/counter}:s:")).count(), 20, "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_pin_key_is_a_miss_and_gets_overwritten() {
    let cluster = three_pods(&[]).await;
    let (a, _) = clients(&cluster);
    // A fresh id each round, so no near cache holds it and the request has to read Redis.
    for (i, garbage) in ["not a pin", "counter-1 999.1.1.1:80 1", "\u{1}\u{2}binary"].into_iter().enumerate() {
        let id = format!("victim-{i}");
        let (_, report) = cluster.pins(&["get", "--service", "counter", "--session", &id]).await;
        let key = report.lines().find_map(|l| l.strip_prefix("key")).expect("the key is printed").trim().to_owned();
        cluster.redis.cli(&["SET", &key, garbage]).await;
        let reply = a.get_with("counter.test", "/incr", &[("K-Session", &id)]).await;
        assert_eq!(reply.status, 200, "{garbage:?}: {reply:?}");
        let (found, report) = cluster.pins(&["get", "--service", "counter", "--session", &id]).await;
        assert!(found && report.contains(&format!("revision counter-1 pod {}", "127.0.0.1:")), "overwritten: {report}");
    }
    assert!(cluster.a.logs().contains("ignoring a malformed pin in Redis"));
    let text = Metrics::scrape(cluster.a.addr("admin")).await;
    assert!(text.value("activator_pin_store_errors_total", &[("op", "decode")]).unwrap_or(0.0) >= 3.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_fails_no_request() {
    let cluster = three_pods(&[]).await;
    let (a, b) = clients(&cluster);
    // Requests keep going for as long as Redis is frozen.
    let freeze = cluster.redis.cli(&["DEBUG", "SLEEP", "2"]);
    tokio::pin!(freeze);
    let mut sent = 0;
    loop {
        let id = format!("frozen-{sent}");
        let session = [("K-Session", id.as_str())];
        let via = if sent % 2 == 0 { &a } else { &b };
        tokio::select! {
            _ = &mut freeze => break,
            reply = via.get_with("counter.test", "/incr", &session) => {
                assert_eq!(reply.status, 200, "{reply:?}");
                sent += 1;
            }
        }
    }
    let text = Metrics::scrape(cluster.a.addr("admin")).await;
    assert!(text.sum("activator_pin_store_errors_total") >= 1.0, "timeouts are counted:\n{text}");
    assert!(sent > 10, "only {sent} requests while Redis was frozen");
    let mut n = 0;
    wait_until(Duration::from_secs(30), "sharing resumes after the freeze", || {
        n += 1;
        sharing_resumed(&cluster, format!("thawed-{n}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_round_trips_per_session_new_new_here_and_known() {
    // The once-a-second refresh (GETEX) and check of the store's generation (a SET) are not per
    // request: the refresh is left out, the check made rare.
    let cluster = three_pods(&["--pin-refresh-interval", "60s"]).await;
    let (a, b) = clients(&cluster);
    let (admin_a, admin_b) = (cluster.a.addr("admin"), cluster.b.addr("admin"));
    // What Redis ran (a script's own commands included), and the exchanges each replica had with
    // it on the request path: its calls, each timed once.
    let commands = || async {
        let mut n = 0;
        for command in ["get", "set", "evalsha"] {
            n += cluster.redis.calls(command).await;
        }
        n
    };
    let start = commands().await;
    let pod = session(&a, "counted").await.pod().to_owned();
    assert_eq!(pin_store_round_trips(admin_a).await, 1.0, "a new session: one round trip");
    assert_eq!(
        commands().await - start,
        3,
        "a new session: one script reading the store's generation and writing SET NX GET"
    );
    for _ in 0..5 {
        session(&a, "counted").await;
    }
    assert_eq!(pin_store_round_trips(admin_a).await, 1.0, "a known session: no round trip");
    assert_eq!(commands().await - start, 3, "a known session: no command");
    assert_eq!(session(&b, "counted").await.pod(), pod, "new to B: the SET NX GET answers A's pin, followed");
    assert_eq!(pin_store_round_trips(admin_b).await, 1.0, "new to B: one round trip");
    for _ in 0..5 {
        assert_eq!(session(&b, "counted").await.pod(), pod);
    }
    assert_eq!(pin_store_round_trips(admin_b).await, 1.0, "known to B now");
    assert_eq!(commands().await - start, 6, "known to B now: no command");
}

/// A new session is pinned by its lookup to the pod its hash prefers; when that pod has no room
/// the request is admitted to another, and the pin follows it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_admitted_elsewhere_than_its_lookup_pinned_it_is_pinned_where_it_went() {
    let topology = |pods: &[SocketAddr]| {
        yaml(&[Service::new("counter").revision("counter-1", 100, pods).with(|r| r.container_concurrency = 1)])
    };
    let cluster = Replicas::start("counter-1", 2, topology, &[]).await;
    let (a, _) = clients(&cluster);
    let admin = cluster.a.addr("admin");
    let busy = {
        let a = a.clone();
        tokio::spawn(async move { a.get_with("counter.test", "/slow?delay=6s", &[]).await })
    };
    wait_until(Duration::from_secs(10), "a request without a session holds one pod", || async {
        metric(admin, "activator_in_flight_requests", &[("revision", "counter-1")]).await == Some(1.0)
    })
    .await;
    // Half the sessions' hashes prefer the busy pod: their lookups pin them there, and they are
    // admitted to the free one.
    let mut first = Vec::new();
    for i in 0..16 {
        let id = format!("elsewhere-{i}");
        let pod = session(&a, &id).await.pod().to_owned();
        first.push((id, pod));
    }
    let busy_pod = busy.await.expect("the slow request").pod().to_owned();
    assert!(first.iter().all(|(_, pod)| *pod != busy_pod), "the busy pod had no room: {first:?}");
    let repins = metric(admin, "activator_pin_writes_total", &[("kind", "session"), ("result", "repin")]).await;
    assert!(repins.unwrap_or(0.0) >= 1.0, "some sessions were pinned to the busy pod by their lookup first");
    for (id, pod) in &first {
        assert_eq!(session(&a, id).await.pod(), pod, "session {id} stays where it was first admitted");
    }
}

/// Headers that name the revision as Knative's ingress does, so a test chooses where a new pin goes.
fn ingress(revision: &str) -> [(&'static str, &str); 2] {
    [("Knative-Serving-Namespace", "default"), ("Knative-Serving-Revision", revision)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_made_elsewhere_decides_the_first_request_here() {
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    let stable = env.pods("stable", 3).await;
    // The canary is at zero and nobody will start it: a request sent there waits until it times out.
    env.write_topology(&yaml(&[Service::new("counter")
        .revision("stable", 90, &addrs(&stable))
        .revision("canary", 10, &[])
        .with(|r| r.timeout_seconds = 3)]));
    let url = redis.url();
    let a = env.shared_activator(&redis).await;
    let shim = env.shim(&["--print-stats", "--command", "false"]).await;
    let b = env
        .activator_with_shim(
            &shim,
            &["--pin-store", "redis", "--redis-url", &url, "--debug-headers", "--pod-name", "b"],
        )
        .await;
    integration_tests::wait_pin_store_up(b.addr("admin")).await;
    let (via_a, via_b) = (Client::new(a.addr("proxy")), Client::new(b.addr("proxy")));

    let mut pinned = Vec::new();
    for i in 0..100 {
        let (session, flow) = (format!("s{i}"), format!("f{i}"));
        let mut headers = ingress("stable").to_vec();
        headers.extend([("K-Session", session.as_str())]);
        let by_session = via_a.get_with("counter.test", "/incr", &headers).await;
        let mut headers = ingress("stable").to_vec();
        headers.extend([("K-Revision", flow.as_str())]);
        let by_flow = via_a.get_with("counter.test", "/incr", &headers).await;
        assert_eq!((by_session.status, by_flow.status), (200, 200));
        pinned.push((session, by_session.pod().to_owned(), flow));
    }
    let replies = futures_util::future::join_all(pinned.iter().map(|(session, _, flow)| {
        let via_b = via_b.clone();
        async move {
            let by_session = via_b.get_with("counter.test", "/incr", &[("K-Session", session)]).await;
            let by_flow = via_b.get_with("counter.test", "/incr", &[("K-Revision", flow)]).await;
            (by_session, by_flow)
        }
    }))
    .await;
    for ((session, pod, flow), (by_session, by_flow)) in pinned.iter().zip(&replies) {
        assert_eq!((by_session.status, by_session.pod()), (200, pod.as_str()), "session {session}: {by_session:?}");
        assert_eq!(by_session.header("x-activator-decision"), "session-pin", "{session}");
        assert_eq!((by_flow.status, by_flow.revision()), (200, "stable"), "flow {flow}: {by_flow:?}");
        assert_eq!(by_flow.header("x-activator-decision"), "revision-pin", "{flow}");
    }
    // B reports the stable revision every second while it is busy; by then any poke for the
    // canary would have arrived first.
    let stats = || shim.stdout().into_iter().filter(|l| l.starts_with("stat ")).collect::<Vec<_>>();
    wait_until(Duration::from_secs(10), "B has reported the stable revision", || async {
        stats().iter().any(|l| l.starts_with("stat default/stable pod=b"))
    })
    .await;
    let canary: Vec<_> = stats().into_iter().filter(|l| l.contains("/canary ")).collect();
    assert!(canary.is_empty(), "the canary was poked for requests pinned to stable: {canary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_won_elsewhere_ends_at_its_own_revisions_max_age() {
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    let (capped, open) = (env.pods("capped", 1).await, env.pods("open", 1).await);
    env.write_topology(&yaml(&[Service::new("counter")
        .revision("capped", 50, &addrs(&capped))
        .with(|r| r.annotations.push(("activator.knative.dev/sticky-max-age".into(), "3s".into())))
        .revision("open", 50, &addrs(&open))]));
    let (a, b) = (env.shared_activator(&redis).await, env.shared_activator(&redis).await);
    let (via_a, via_b) = (Client::new(a.addr("proxy")), Client::new(b.addr("proxy")));

    let mut headers = ingress("capped").to_vec();
    headers.push(("K-Session", "capped-session"));
    assert_eq!(via_a.get_with("counter.test", "/incr", &headers).await.revision(), "capped");
    let pinned_at = tokio::time::Instant::now();
    // B's first request for the session has the ingress naming the other revision: the pin made
    // through A wins, with A's revision's max-age.
    let mut headers = ingress("open").to_vec();
    headers.push(("K-Session", "capped-session"));
    let first = via_b.get_with("counter.test", "/incr", &headers).await;
    assert_eq!(first.revision(), "capped", "{first:?}");
    // Kept in use through B, the session must still be re-pinned once its max-age has passed.
    wait_until(Duration::from_secs(15), "the session is pinned anew after its max-age", || async {
        let reply = via_b.get_with("counter.test", "/incr", &headers).await;
        assert_eq!(reply.status, 200);
        let renewed = reply.header("x-activator-decision") == "new-pin";
        assert!(!renewed || pinned_at.elapsed() >= Duration::from_secs(3), "re-pinned before the max-age");
        renewed
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_up_cookie_is_pinned_provisionally_until_the_client_returns_it() {
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    let pods = env.pods("counter-1", 3).await;
    env.write_topology(&yaml(&[Service::new("counter")
        .annotation("activator.knative.dev/sticky-session-cookie-name", "sid")
        .revision("counter-1", 100, &addrs(&pods))]));
    let activator = env.shared_activator(&redis).await;
    let client = Client::new(activator.addr("proxy"));
    let pin_ttl = |id: String| {
        let url = redis.url();
        async move {
            let (_, report, _) =
                activator_pins(&["get", "--service", "counter", "--session", &id, "--redis-url", &url]).await;
            let ttl = report.lines().find_map(|l| l.strip_prefix("ttl")).and_then(|t| t.trim().strip_suffix('s'));
            ttl.and_then(|t| t.parse::<f64>().ok()).unwrap_or_else(|| panic!("no pin for {id}: {report}"))
        }
    };

    let first = client.get("counter.test", "/incr?session_id=browser").await;
    let cookie = first.header("set-cookie").split(';').next().unwrap().to_owned();
    let id = cookie.strip_prefix("sid=").unwrap().to_owned();
    assert!(pin_ttl(id.clone()).await <= 60.0, "a cookie the client has not sent back yet is pinned for a minute");
    let again = client.get_with("counter.test", "/incr?session_id=browser", &[("Cookie", &cookie)]).await;
    assert_eq!((again.body.as_str(), again.pod()), ("session=browser, count=2\n", first.pod()));
    wait_until(Duration::from_secs(10), "the returned cookie's pin takes the full TTL", || async {
        pin_ttl(id.clone()).await > 500.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_sticky_ttl_is_clamped_and_pins_stay_shared() {
    let topology =
        |pods: &[SocketAddr]| {
            yaml(&[Service::new("counter")
                .annotation("activator.knative.dev/sticky-ttl", "200000000000000d")
                .revision("counter-1", 100, pods)])
        };
    let replicas = Replicas::start("counter-1", 3, topology, &[]).await;
    for i in 0..10 {
        let shared = shares_new_pins(&replicas.via_a, &replicas.via_b, &format!("forever-{i}")).await;
        assert!(shared, "session forever-{i}");
    }
    let text = Metrics::scrape(replicas.a.addr("admin")).await;
    assert_eq!(text.sum("activator_pin_store_errors_total"), 0.0, "Redis took every pin:\n{text}");
    let clamped =
        text.value("activator_annotation_errors_total", &[("annotation", "activator.knative.dev/sticky-ttl")]);
    assert_eq!(clamped, Some(1.0), "the clamp is reported once per topology change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_are_shared_through_a_redis_with_a_password_and_tls() {
    let env = Env::new();
    let tls = Tls::generate(env.dir.path());
    let security = Security { password: Some("s3cret pass".into()), tls: Some(tls.clone()) };
    let redis = Redis::start_secured(env.dir.path(), security).await;
    let pods = env.pods("counter-1", 3).await;
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods))]));
    let url = redis.url().replace("s3cret pass", "s3cret%20pass");
    let ca = tls.ca.display().to_string();
    let flags = ["--pin-store", "redis", "--redis-url", &url, "--redis-ca-file", &ca];
    let (a, b) = (env.activator(&flags).await, env.activator(&flags).await);
    for admin in [a.addr("admin"), b.addr("admin")] {
        integration_tests::wait_pin_store_up(admin).await;
    }
    let (a, b) = (Client::new(a.addr("proxy")), Client::new(b.addr("proxy")));
    for i in 0..3 {
        assert!(shares_new_pins(&a, &b, &format!("tls-{i}")).await, "session tls-{i} split across replicas");
    }
    let keys = redis.cli(&["KEYS", "aa:{*"]).await;
    assert_eq!(keys.lines().count(), 3, "the pins are in the secured Redis: {keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_an_untrusted_certificate_is_one_clear_line_and_pins_stay_local() {
    let env = Env::new();
    let tls = Tls::generate(env.dir.path());
    let redis =
        Redis::start_secured(env.dir.path(), Security { password: Some("right".into()), tls: Some(tls.clone()) }).await;
    let pod = env.demo("pod", "counter-1").await;
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &[pod.addr("http")])]));
    let ca = tls.ca.display().to_string();
    let wrong = redis.url_with_password(Some("wrong"));
    let wrong_password = env.activator(&["--pin-store", "redis", "--redis-url", &wrong, "--redis-ca-file", &ca]).await;
    let untrusted = env.activator(&["--pin-store", "redis", "--redis-url", &redis.url()]).await;
    let cases = [
        (&wrong_password, "Redis rejected the user name or password in --redis-url"),
        (&untrusted, "the Redis server's TLS certificate is not trusted: give its CA with --redis-ca-file"),
    ];
    for (activator, explanation) in cases {
        let admin = activator.addr("admin");
        wait_until(Duration::from_secs(20), "the activator has tried Redis three times", || async {
            metric(admin, "activator_pin_store_errors_total", &[("op", "connect")]).await >= Some(3.0)
        })
        .await;
        assert_eq!(activator.logs().matches(explanation).count(), 1, "said once:\n{}", activator.logs());
        assert_eq!(metric(admin, "activator_pin_store_up", &[]).await, Some(0.0));
        let client = Client::new(activator.addr("proxy"));
        let id = format!("local-{}", admin.port());
        for count in 1..=3 {
            let reply = session(&client, &id).await;
            assert_eq!(reply.body, format!("session={id}, count={count}\n"), "served with local pins");
        }
    }
}

/// A pod's sessions are visible before it goes (`activator_pins` per pod on each replica,
/// `activator pins list`), and `activator pins drain` moves them to the revision's other pods as
/// its leaving would, through every replica, while the pod still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_sessions_are_counted_and_drained_before_it_goes() {
    let c = three_pods(&[]).await;
    let (via_a, via_b) = clients(&c);
    let mut homes: Vec<(String, String)> = Vec::new();
    for i in 0..30 {
        let id = format!("drain-{i}");
        let reply = session(if i % 2 == 0 { &via_a } else { &via_b }, &id).await;
        homes.push((id, reply.pod().to_owned()));
    }
    let busiest = (0..c.pods.len())
        .map(|k| format!("counter-1-pod-{k}"))
        .max_by_key(|name| homes.iter().filter(|(_, pod)| pod == name).count())
        .expect("three pods");
    let on_busiest: Vec<&str> = homes.iter().filter(|(_, pod)| *pod == busiest).map(|(id, _)| id.as_str()).collect();
    let index: usize = busiest.rsplit('-').next().and_then(|k| k.parse().ok()).expect("a pod index");
    let addr = c.pods[index].addr("http").to_string();

    // Each replica counts the sessions it holds; between them, every session of the pod.
    let counted = || async {
        let mut sum = 0.0;
        for admin in [c.a.addr("admin"), c.b.addr("admin")] {
            sum += metric(admin, "activator_pins", &[("revision", "counter-1"), ("pod", &addr)]).await.unwrap_or(0.0);
        }
        sum
    };
    wait_until(Duration::from_secs(15), "the pod's sessions are counted", || async {
        counted().await == on_busiest.len() as f64
    })
    .await;
    let (ok, listed) = c.pins(&["list", "--service", "counter"]).await;
    assert!(ok && listed.contains(&format!("counter-1 {addr} {} sessions", on_busiest.len())), "{listed}");

    let (ok, out) = c.pins(&["drain", "--service", "counter", "--pod", &addr]).await;
    assert!(ok && out.contains(&format!("moved {} sessions", on_busiest.len())), "{out}");
    // The pod still serves, yet its sessions move once the replicas hear of the drain, and stay.
    wait_until(Duration::from_secs(10), "the first drained session has moved", || async {
        session(&via_b, on_busiest[0]).await.pod() != busiest
    })
    .await;
    for id in &on_busiest {
        let moved = session(&via_b, id).await.pod().to_owned();
        assert_ne!(moved, busiest, "{id}");
        assert_eq!(session(&via_a, id).await.pod(), moved, "{id} stays on its new pod through the other replica");
    }
    for (id, pod) in homes.iter().filter(|(_, pod)| *pod != busiest) {
        assert_eq!(session(&via_a, id).await.pod(), pod, "{id} was not on the drained pod and stays");
    }
    let (_, listed) = c.pins(&["list", "--service", "counter"]).await;
    assert!(!listed.contains(&addr), "{listed}");
    wait_until(Duration::from_secs(15), "the pod's count drops to zero", || async { counted().await == 0.0 }).await;
}

/// `activator pins drain` says what it did: with no other pod of the revision holding pins it
/// releases the sessions rather than claiming to move them, and names `--to`; `--to` a pod that
/// holds no pin yet (one just added) moves them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_nowhere_known_to_go_says_it_released_and_to_moves_them_to_a_new_pod() {
    let c = over_one_of_three_pods().await;
    let ids: Vec<String> = (0..4).map(|i| format!("lonely-{i}")).collect();
    for id in &ids {
        assert_eq!(session(&c.via_a, id).await.pod(), "counter-1-pod-0");
    }
    let first = c.pods[0].addr("http").to_string();
    let (ok, out) = c.pins(&["drain", "--service", "counter", "--pod", &first]).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("moved no session of default/counter off {first}")), "{out}");
    assert!(out.contains(&format!("released 4 sessions of default/counter off {first}")), "{out}");
    assert!(out.contains("with --to"), "{out}");

    // New sessions on the one pod there is; a second pod joins, holding no pin: `--to` moves
    // them there, and the replicas follow.
    let fresh: Vec<String> = (0..3).map(|i| format!("fresh-{i}")).collect();
    for id in &fresh {
        assert_eq!(session(&c.via_a, id).await.pod(), "counter-1-pod-0");
    }
    let two = yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&c.pods[..2]))]);
    c.env.reload_all(&[&c.a, &c.b], &two).await;
    let second = c.pods[1].addr("http").to_string();
    let (ok, out) = c.pins(&["drain", "--service", "counter", "--pod", &first, "--to", &second]).await;
    assert!(ok && out.contains(&format!("moved 3 sessions of default/counter off {first}: 3 to {second}")), "{out}");
    wait_until(Duration::from_secs(10), "the drained sessions are on the new pod", || async {
        session(&c.via_b, &fresh[0]).await.pod() == "counter-1-pod-1"
    })
    .await;
    assert!(!out.contains("released"), "{out}");
}

/// Two replicas sharing one Redis, serving revision `counter-1` with the first of its three pods
/// (the others start outside the topology).
async fn over_one_of_three_pods() -> Replicas {
    let topology = |pods: &[SocketAddr]| yaml(&[Service::new("counter").revision("counter-1", 100, &pods[..1])]);
    Replicas::start("counter-1", 3, topology, &[]).await
}

/// Issue 26: Redis restarted empty loses no session that a replica still holds. Sessions used
/// through A only, through B only, and through both keep their pods, each asked first through
/// the replica that never saw it: each replica writes back the pins it holds once it finds the
/// store's generation gone. The sessions are pinned while one pod is ready, then two more join:
/// a replica that did not know a session would place it by its hash over all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_keeps_every_session_a_replica_knows() {
    let Replicas { env, mut redis, pods, a, b, via_a, via_b } = over_one_of_three_pods().await;
    let topology = |n: usize| yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods[..n]))]);
    let mut homes = Vec::new();
    for i in 0..12 {
        let (id, first, then) = match i % 3 {
            0 => (format!("only-a-{i}"), &via_a, None),
            1 => (format!("only-b-{i}"), &via_b, None),
            _ => (format!("both-{i}"), &via_a, Some(&via_b)),
        };
        let pod = session(first, &id).await.pod().to_owned();
        if let Some(then) = then {
            assert_eq!(session(then, &id).await.pod(), pod);
        }
        homes.push((id, pod));
    }
    env.reload_all(&[&a, &b], &topology(3)).await;
    let mut n = 0;
    wait_until(Duration::from_secs(20), "new sessions are placed on the pods that joined", || {
        n += 1;
        let (a, b) = (via_a.clone(), via_b.clone());
        async move {
            let id = format!("placed-{n}");
            let pod = session(&a, &id).await.pod().to_owned();
            pod != "counter-1-pod-0" && session(&b, &format!("{id}-b")).await.pod() != "counter-1-pod-0"
        }
    })
    .await;

    redis.kill().await;
    redis.restart().await;
    for (name, replica) in [("A", &a), ("B", &b)] {
        let admin = replica.addr("admin");
        wait_until(Duration::from_secs(20), &format!("{name} wrote its pins back"), || async {
            metric(admin, "activator_pin_store_restores_total", &[]).await >= Some(1.0)
        })
        .await;
    }
    for (id, pod) in &homes {
        let (knew, other) = if id.starts_with("only-a") { (&via_a, &via_b) } else { (&via_b, &via_a) };
        let reply = session(other, id).await;
        assert_eq!(
            reply.pod(),
            pod,
            "{id} through the replica that did not know it\nA:\n{}\nB:\n{}",
            a.logs(),
            b.logs()
        );
        assert_eq!(session(knew, id).await.pod(), pod, "{id}");
    }
    let restored = metric(a.addr("admin"), "activator_pin_store_restored_pins_total", &[]).await;
    assert!(restored >= Some(8.0), "A wrote back its own and the shared sessions: {restored:?}");
}

/// A replica asked early in a Redis outage for a session it never saw waits for Redis to answer
/// again rather than place the session anew: another replica pinned it before the outage, on a
/// world that changed since (two more pods), and writes it back once Redis restarts empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_early_in_an_outage_waits_for_the_pins_another_holds() {
    let Replicas { env, mut redis, pods, a, b, via_a, via_b } = over_one_of_three_pods().await;
    let topology = |n: usize| yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods[..n]))]);
    let ids: Vec<String> = (0..6).map(|i| format!("before-the-outage-{i}")).collect();
    for id in &ids {
        assert_eq!(session(&via_a, id).await.pod(), "counter-1-pod-0");
    }
    env.reload_all(&[&a, &b], &topology(3)).await;

    redis.kill().await;
    let asked: Vec<_> = ids
        .iter()
        .map(|id| {
            let (via_b, id) = (via_b.clone(), id.clone());
            tokio::spawn(async move { session(&via_b, &id).await.pod().to_owned() })
        })
        .collect();
    let admin = b.addr("admin");
    wait_until(Duration::from_secs(5), "B finds Redis gone", || async {
        metric(admin, "activator_pin_store_up", &[]).await == Some(0.0)
    })
    .await;
    redis.restart().await;
    for (id, asked) in ids.iter().zip(asked) {
        assert_eq!(asked.await.unwrap(), "counter-1-pod-0", "{id} through B\nA:\n{}\nB:\n{}", a.logs(), b.logs());
    }
}
