//! What the activator does when the things around it fail: pods that die under load, clients
//! that never finish their headers, its own replicas restarted one by one behind a load
//! balancer. Real processes throughout.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::haproxy::{Backend, Haproxy};
use integration_tests::load::{Load, Outcome};
use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, addrs, metric, raise_open_files_limit, wait_pin_store_up, wait_until};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_killed_under_load_fails_no_get() {
    const WORKERS: usize = 8;
    const SESSIONS: usize = 48;
    let env = Env::new();
    let mut pods = env.pods("dead-1", 3).await;
    env.write_topology(&yaml(&[Service::new("dead").revision("dead-1", 100, &addrs(&pods))]));
    let activator = env.activator(&[]).await;
    let admin = activator.addr("admin");
    let client = Client::new(activator.addr("proxy"));
    let session = |i: usize| format!("s-{i}");

    let mut homes = HashMap::new();
    for i in 0..SESSIONS {
        let reply = client.get_with("dead.test", "/incr", &[("k-session", &session(i))]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        homes.insert(i, reply.pod().to_owned());
    }
    let victim_name = "dead-1-pod-1";
    let orphans: Vec<usize> = homes.iter().filter(|(_, pod)| *pod == victim_name).map(|(i, _)| *i).collect();
    assert!(!orphans.is_empty(), "some sessions live on the pod that dies: {homes:?}");

    // Steady load: each worker alternates unpinned requests with its own sessions' requests.
    let session_of = |worker: usize, n: usize| {
        (n % 2 == 1).then(|| (worker..SESSIONS).step_by(WORKERS).nth((n / 2) % (SESSIONS / WORKERS)).unwrap())
    };
    let load = Load::start(WORKERS, {
        let client = client.clone();
        move |worker, n| {
            let req = client.request(reqwest::Method::GET, "dead.test", "/incr");
            match session_of(worker, n) {
                Some(s) => req.header("k-session", format!("s-{s}")),
                None => req,
            }
        }
    });
    load.wait_for(300, Duration::from_secs(30)).await;
    let victim = &mut pods[1];
    let victim_addr = victim.addr("http");
    victim.signal(Signal::SIGKILL);
    victim.wait_exit(Duration::from_secs(10)).await;
    let killed = Instant::now();
    load.wait_for(600, Duration::from_secs(60)).await;
    let outcomes = load.stop().await;

    // The GETs the pod had when it died went to another pod (issue 26).
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed()).collect();
    assert!(failed.is_empty(), "GETs failed: {failed:?}");
    let later: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= killed).collect();
    assert!(later.iter().all(|o| o.pod != victim_name), "nothing answered by a dead pod");
    // Every session that lived on the dead pod continues on one pod of the revision.
    let mut moved_to: HashMap<usize, HashSet<&str>> = HashMap::new();
    for o in &later {
        if let Some(s) = session_of(o.worker, o.n).filter(|s| orphans.contains(s)) {
            moved_to.entry(s).or_default().insert(&o.pod);
        }
    }
    for s in &orphans {
        let pods = moved_to.get(s).cloned().unwrap_or_default();
        let reply = client.get_with("dead.test", "/incr", &[("k-session", &session(*s))]).await;
        assert_eq!(reply.status, 200);
        assert!(
            pods.len() <= 1 && pods.iter().all(|p| *p == reply.pod()),
            "session {s} moved to {pods:?} then {}",
            reply.pod()
        );
        assert_ne!(reply.pod(), victim_name);
    }
    let labels = [("revision", "dead-1")];
    assert_eq!(
        metric(admin, "activator_pods_unreachable_total", &labels).await,
        Some(1.0),
        "the pod left rotation once"
    );
    // Requests it had went elsewhere: resent when none of their bytes had reached it, retried
    // when they had.
    let resent = metric(admin, "activator_requests_resent_total", &labels).await.unwrap_or(0.0);
    let retried = [("revision", "dead-1"), ("result", "retried")];
    let retried = metric(admin, "activator_requests_retried_total", &retried).await.unwrap_or(0.0);
    assert!(resent + retried >= 1.0, "resent {resent}, retried {retried}");

    // The pod comes back at its address (the topology never dropped it): it passes its probe
    // and takes requests again, while the moved sessions stay where they went.
    let _back = env.demo_at(victim_name, "dead-1", victim_addr).await;
    wait_until(Duration::from_secs(20), "the restarted pod takes requests again", || async {
        client.get("dead.test", "/incr").await.pod() == victim_name
    })
    .await;
    for s in &orphans {
        let reply = client.get_with("dead.test", "/incr", &[("k-session", &session(*s))]).await;
        assert_ne!(reply.pod(), victim_name, "session {s} stays on the pod it moved to");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_finish_their_headers_are_cut_at_the_header_timeout() {
    const HALF_OPEN: usize = 2000;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(6);
    raise_open_files_limit();
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if hard < 4 * HALF_OPEN as u64 {
        eprintln!("skipped: the open-files limit ({hard}) cannot hold {HALF_OPEN} connections on both ends");
        return;
    }
    let env = Env::new();
    let flags = ["--header-read-timeout", "6s", "--max-connections", "5000"];
    let (_pod, activator) = env.one_pod_service("loris", &flags).await;
    let proxy = activator.addr("proxy");
    let client = Client::new(proxy);
    for _ in 0..50 {
        assert_eq!(client.get("loris.test", "/incr").await.status, 200);
    }
    let (baseline, _) = activator.memory_kib();

    let opened = Instant::now();
    let mut half_open = Vec::with_capacity(HALF_OPEN);
    for _ in 0..HALF_OPEN {
        let mut conn = TcpStream::connect(proxy).await.expect("the activator accepts");
        conn.write_all(b"GET /incr HTTP/1.1\r\nHost: loris.test\r\nX-Never-Ends: ").await.unwrap();
        half_open.push(conn);
    }
    wait_until(Duration::from_secs(5), "the activator holds every half-open connection", || async {
        metric(activator.addr("admin"), "activator_open_connections", &[]).await >= Some(HALF_OPEN as f64)
    })
    .await;
    let (_, flooded_peak) = activator.memory_kib();
    // Everyone else is served meanwhile, each request without waiting for the flood to end.
    for _ in 0..50 {
        let asked = Instant::now();
        assert_eq!(client.get("loris.test", "/incr").await.status, 200);
        assert!(asked.elapsed() < Duration::from_secs(2), "a request waited {:?} behind the flood", asked.elapsed());
    }
    assert!(opened.elapsed() < HEADER_TIMEOUT, "served while the flood was still open");

    // Each half-open connection is closed at the header timeout, not before.
    let closed = futures_util::future::join_all(half_open.into_iter().map(|mut conn| async move {
        let mut buf = [0u8; 256];
        let ended = tokio::time::timeout(HEADER_TIMEOUT * 3, async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        ended.is_ok().then(|| opened.elapsed())
    }))
    .await;
    let never = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(never, 0, "{never} half-open connections were never closed");
    let earliest = closed.iter().flatten().min().unwrap();
    assert!(*earliest >= HEADER_TIMEOUT - Duration::from_millis(500), "closed before the header timeout: {earliest:?}");
    wait_until(Duration::from_secs(10), "the activator's connection count is back to the client's", || async {
        metric(activator.addr("admin"), "activator_open_connections", &[]).await <= Some(1.0)
    })
    .await;
    // What the flood held is given back (to within what the allocator keeps for reuse), as the
    // allocator returns freed memory to the system.
    eprintln!("RSS KiB: baseline {baseline}, flood peak {flooded_peak}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (now, _) = activator.memory_kib();
        if now <= baseline + 16 * 1024 {
            break;
        }
        assert!(Instant::now() < deadline, "RSS {now} KiB 30 s after the flood, {baseline} KiB before it");
        assert_eq!(client.get("loris.test", "/incr").await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client.get("loris.test", "/incr").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_held_to_stream_and_header_limits() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("h2limits", &[]).await;
    let tcp = TcpStream::connect(activator.addr("proxy")).await.unwrap();
    let (send_request, connection) = h2::client::handshake(tcp).await.unwrap();
    let mut connection = Box::pin(connection);
    let driven = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| connection.as_mut().poll(cx)).await;
    });
    let mut send_request = send_request.ready().await.unwrap();
    let get = |header: Option<String>| {
        let mut req = http::Request::get("http://h2limits.test/incr");
        if let Some(value) = header {
            req = req.header("x-large", value);
        }
        req.body(()).unwrap()
    };
    let (resp, _) = send_request.send_request(get(None), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let streams = send_request.current_max_send_streams();
    assert_eq!(streams, 250, "the server's SETTINGS_MAX_CONCURRENT_STREAMS");

    let mut send_request = send_request.ready().await.unwrap();
    let (resp, _) = send_request.send_request(get(Some("x".repeat(100 << 10))), true).unwrap();
    match resp.await {
        Ok(resp) => assert_eq!(resp.status(), 431, "headers beyond the header-list limit"),
        Err(e) => assert!(e.is_reset() || e.is_go_away(), "refused, not served: {e}"),
    }
    let client = Client::new(activator.addr("proxy"));
    assert_eq!(client.get("h2limits.test", "/incr").await.status, 200, "the activator serves on");
    driven.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_a_load_balancer_fails_nothing_and_moves_no_session() {
    if !Haproxy::installed() {
        eprintln!("skipped: haproxy is not installed (`just deps` installs it on Debian and Ubuntu)");
        return;
    }
    const SESSIONS: usize = 40;
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    let pods = env.pods("rolling-1", 3).await;
    env.write_topology(&yaml(&[Service::new("rolling").revision("rolling-1", 100, &addrs(&pods))]));
    let url = redis.url();
    let start = |ports: Option<(SocketAddr, SocketAddr)>| {
        let (env, url) = (&env, url.clone());
        async move {
            let (proxy, admin) =
                ports.map_or(("127.0.0.1:0".into(), "127.0.0.1:0".into()), |(p, a)| (p.to_string(), a.to_string()));
            let flags = ["--pin-store", "redis", "--redis-url", &url, "--drain-period", "2s", "--listen", &proxy];
            let activator =
                env.activator(&[&flags[..], &["--admin-listen", &admin, "--grace-timeout", "30s"]].concat()).await;
            wait_pin_store_up(activator.addr("admin")).await;
            activator
        }
    };
    let mut activators = [start(None).await, start(None).await];
    let backends: Vec<Backend> =
        activators.iter().map(|a| Backend { proxy: a.addr("proxy"), admin: a.addr("admin") }).collect();
    let haproxy = Haproxy::start(env.dir.path(), &backends).await;
    let client = Client::new(haproxy.addr);
    wait_until(Duration::from_secs(10), "HAProxy sends requests to the activators", || async {
        client
            .try_send(client.request(reqwest::Method::GET, "rolling.test", "/incr"))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;

    let load = Load::start(8, move |worker, n| {
        let session = format!("s-{}", (worker * 7 + n) % SESSIONS);
        client.request(reqwest::Method::GET, "rolling.test", "/incr").header("K-Session", session)
    });
    load.wait_for(300, Duration::from_secs(30)).await;
    for activator in &mut activators {
        let ports = (activator.addr("proxy"), activator.addr("admin"));
        activator.signal(Signal::SIGTERM);
        let status = activator.wait_exit(Duration::from_secs(40)).await;
        assert!(status.success(), "the old activator exits cleanly: {status}");
        // Its replacement comes up where it was, as a restarted pod keeps its Service.
        *activator = start(Some(ports)).await;
        let admin = ports.1;
        wait_until(Duration::from_secs(20), "the load balancer sends to the new activator", || async {
            Metrics::scrape(admin).await.sum("activator_requests_total") > 0.0
        })
        .await;
        load.wait_for(200, Duration::from_secs(30)).await;
    }
    let outcomes = load.stop().await;

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {:?}", failed.len(), outcomes.len(), failed.first());
    let mut pods_of: HashMap<usize, HashSet<&str>> = HashMap::new();
    for o in &outcomes {
        pods_of.entry((o.worker * 7 + o.n) % SESSIONS).or_default().insert(&o.pod);
    }
    let moved: Vec<_> = pods_of.iter().filter(|(_, pods)| pods.len() > 1).collect();
    assert!(moved.is_empty(), "sessions that changed pods: {moved:?}");
}

/// The `/slow` requests `pod` took, and those it still holds.
async fn slow_stats(pod: &integration_tests::Process) -> Option<(u64, u64)> {
    let body = reqwest::get(format!("http://{}/slow/stats", pod.addr("http"))).await.ok()?.text().await.ok()?;
    let fields: Vec<&str> = body.split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

/// Sends `req` in the background, waits until one of `pods` holds it, and kills that pod:
/// returns the reply and the index of the pod killed.
async fn kill_the_pod_holding(
    pods: &mut [integration_tests::Process],
    client: &Client,
    req: reqwest::RequestBuilder,
) -> (integration_tests::Reply, usize) {
    let sending = tokio::spawn({
        let client = client.clone();
        async move { client.send(req).await }
    });
    let holder = std::sync::Arc::new(std::sync::Mutex::new(None));
    wait_until(Duration::from_secs(20), "a pod holds the request", || async {
        for (i, pod) in pods.iter().enumerate() {
            if slow_stats(pod).await.is_some_and(|(_, waiting)| waiting == 1) {
                *holder.lock().unwrap() = Some(i);
                return true;
            }
        }
        false
    })
    .await;
    let victim = holder.lock().unwrap().expect("found");
    pods[victim].signal(Signal::SIGKILL);
    pods[victim].wait_exit(Duration::from_secs(10)).await;
    (sending.await.expect("the request task"), victim)
}

/// Issue 26: a request its pod dies under before answering goes once more, to another pod of its
/// revision, when it is safe to repeat (a `GET`, or any request with an `Idempotency-Key`); a
/// `POST` is not sent twice and the client hears the failure. Counted by outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_safe_to_repeat_go_again_when_their_pod_dies_under_them() {
    let env = Env::new();
    let mut pods = env.pods("retry-1", 3).await;
    env.write_topology(&yaml(&[Service::new("retry").revision("retry-1", 100, &addrs(&pods))]));
    let activator = env.activator(&["--debug-headers"]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let slow = |method: reqwest::Method| client.request(method, "retry.test", "/slow?delay=2s");

    let (post, victim) = kill_the_pod_holding(&mut pods, &client, slow(reqwest::Method::POST).body("order")).await;
    assert_eq!(post.status, 502, "a POST is not sent twice: {post:?}");
    for (i, pod) in pods.iter().enumerate().filter(|(i, _)| *i != victim) {
        assert_eq!(slow_stats(pod).await, Some((0, 0)), "pod {i} never saw the POST");
    }

    let mut alive: Vec<_> = pods.into_iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, p)| p).collect();
    let keyed = slow(reqwest::Method::POST).header("Idempotency-Key", "order-7").body("order");
    let (repeated, _) = kill_the_pod_holding(&mut alive, &client, keyed).await;
    assert_eq!((repeated.status, repeated.body.as_str()), (200, "slow done\n"), "{repeated:?}");

    let labels = |result| [("revision", "retry-1"), ("result", result)];
    assert_eq!(metric(admin, "activator_requests_retried_total", &labels("retried")).await, Some(1.0));
    assert_eq!(metric(admin, "activator_requests_resent_total", &[("revision", "retry-1")]).await, Some(0.0));
}

/// Issue 26: a pinned session's `GET` whose pod dies before answering is answered by another pod,
/// and the session is re-pinned there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_get_whose_pod_dies_is_answered_by_another_pod_and_stays_there() {
    let env = Env::new();
    let mut pods = env.pods("retry-1", 2).await;
    env.write_topology(&yaml(&[Service::new("retry").revision("retry-1", 100, &addrs(&pods))]));
    let activator = env.activator(&["--debug-headers"]).await;
    let client = Client::new(activator.addr("proxy"));
    let session = [("k-session", "kept")];
    let home = client.get_with("retry.test", "/incr", &session).await.pod().to_owned();

    let req = client.request(reqwest::Method::GET, "retry.test", "/slow?delay=1s").header("k-session", "kept");
    let (reply, victim) = kill_the_pod_holding(&mut pods, &client, req).await;
    assert_eq!(victim, usize::from(home == "retry-1-pod-1"), "the session's pod held it");
    assert_eq!((reply.status, reply.body.as_str()), (200, "slow done\n"), "{reply:?}");
    assert_ne!(reply.pod(), home);
    let next = client.get_with("retry.test", "/incr", &session).await;
    assert_eq!((next.pod(), next.header("x-activator-decision")), (reply.pod(), "session-pin"));
}
