//! Session semantics stateful services ask for (issue 30): strict sessions, which are told when
//! their pod is gone instead of moving silently, and the `K-Session-Moved` header that tells a
//! non-strict session's client it moved.

use std::net::SocketAddr;

use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process, Reply, addrs};

const STRICT: &str = "activator.knative.dev/sticky-session-strict";

/// Two pods of revision `<name>-1` behind the service `<name>`, strict or not, and an activator.
async fn two_pods(name: &str, strict: bool) -> (Env, Vec<Process>, Process, impl Fn(&[SocketAddr]) -> String) {
    let env = Env::new();
    let pods = env.pods(&format!("{name}-1"), 2).await;
    let (service, revision) = (name.to_owned(), format!("{name}-1"));
    let topology = move |pods: &[SocketAddr]| {
        let svc = Service::new(&service).revision(&revision, 100, pods);
        yaml(&[if strict { svc.annotation(STRICT, "true") } else { svc }])
    };
    env.write_topology(&topology(&addrs(&pods)));
    let activator = env.activator(&[]).await;
    (env, pods, activator, topology)
}

async fn kernel(client: &Client, host: &str) -> Reply {
    client.get_with(host, "/incr?session_id=kernel", &[("K-Session", "kernel")]).await
}

/// The address of the pod of the pair that is not `name`.
fn other(pods: &[Process], revision: &str, name: &str) -> (SocketAddr, String) {
    let index = usize::from(name.ends_with('0'));
    (pods[index].addr("http"), format!("{revision}-pod-{index}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_sessions_lost_pod_is_told_once_and_the_next_request_starts_over() {
    let (env, pods, activator, topology) = two_pods("strict", true).await;
    let client = Client::new(activator.addr("proxy"));
    let first = kernel(&client, "strict.test").await;
    let home = first.pod().to_owned();
    assert_eq!(kernel(&client, "strict.test").await.body.trim(), "session=kernel, count=2");

    let (staying, stayer) = other(&pods, "strict-1", &home);
    env.reload(&activator, &topology(&[staying])).await;
    let lost = kernel(&client, "strict.test").await;
    assert_eq!((lost.status, lost.header("k-session-lost")), (503, "pod-gone"), "{}", lost.body);
    assert!(lost.pod().is_empty(), "answered by the activator, not sent to another pod");

    let fresh = kernel(&client, "strict.test").await;
    assert_eq!((fresh.status, fresh.pod()), (200, stayer.as_str()));
    assert_eq!(fresh.body.trim(), "session=kernel, count=1", "a new session, on the pod that stayed");
    assert_eq!((fresh.header("k-session-lost"), fresh.header("k-session-moved")), ("", ""));
    let again = kernel(&client, "strict.test").await;
    assert_eq!((again.pod(), again.body.trim()), (stayer.as_str(), "session=kernel, count=2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_session_says_so_on_the_first_response_from_its_new_pod_only() {
    let (env, pods, activator, topology) = two_pods("loose", false).await;
    let client = Client::new(activator.addr("proxy"));
    let home = kernel(&client, "loose.test").await.pod().to_owned();
    assert_eq!(kernel(&client, "loose.test").await.header("k-session-moved"), "", "not moved");

    let (staying, stayer) = other(&pods, "loose-1", &home);
    env.reload(&activator, &topology(&[staying])).await;
    let moved = kernel(&client, "loose.test").await;
    assert_eq!((moved.status, moved.pod(), moved.header("k-session-moved")), (200, stayer.as_str(), "pod-gone"));
    assert_eq!(moved.body.trim(), "session=kernel, count=1");
    let next = kernel(&client, "loose.test").await;
    assert_eq!((next.pod(), next.header("k-session-moved")), (stayer.as_str(), ""));
    assert_eq!(next.body.trim(), "session=kernel, count=2");
}

/// Across replicas sharing Redis: the replica that tells a strict session it is lost releases its
/// pin everywhere, so the other replica starts the new session rather than losing it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_strict_session_is_released_for_every_replica() {
    let topology = |pods: &[SocketAddr]| {
        yaml(&[Service::new("kernel").annotation(STRICT, "true").revision("kernel-1", 100, pods)])
    };
    // Near caches trusted for long: only Redis's word can take a pin out of A's.
    let trusted = ["--pin-revalidate-after", "10m"];
    let c = integration_tests::replicas::Replicas::start("kernel-1", 2, topology, &trusted).await;
    let home = kernel(&c.via_a, "kernel.test").await.pod().to_owned();
    assert_eq!(kernel(&c.via_b, "kernel.test").await.body.trim(), "session=kernel, count=2", "shared");

    let (staying, stayer) = other(&c.pods, "kernel-1", &home);
    c.env.reload_all(&[&c.a, &c.b], &topology(&[staying])).await;
    let lost = kernel(&c.via_b, "kernel.test").await;
    assert_eq!((lost.status, lost.header("k-session-lost")), (503, "pod-gone"));
    // A still holds the lost pin in its near cache until Redis tells it. Invalidations reach a
    // replica in the order Redis published them, so once A has dropped a marker pin deleted after
    // the release, it has heard of the release too.
    let marker = |client: &Client| {
        let client = client.clone();
        async move {
            let reply = client.get_with("kernel.test", "/incr?session_id=marker", &[("K-Session", "marker")]).await;
            reply.header("x-activator-decision").to_owned()
        }
    };
    assert_eq!(marker(&c.via_a).await, "new-pin");
    let (ok, out) = c.pins(&["delete", "--service", "kernel", "--session", "marker"]).await;
    assert!(ok, "{out}");
    integration_tests::wait_until(std::time::Duration::from_secs(10), "A hears of the deletion", || async {
        marker(&c.via_a).await == "new-pin"
    })
    .await;
    let fresh = kernel(&c.via_a, "kernel.test").await;
    assert_eq!((fresh.status, fresh.pod()), (200, stayer.as_str()), "A was told: {}", fresh.body);
    assert_eq!(fresh.body.trim(), "session=kernel, count=1", "a new session, not the lost one again");
    assert_eq!(kernel(&c.via_b, "kernel.test").await.body.trim(), "session=kernel, count=2");
}

/// knative/serving#8160: a browser given a revision cookie stays on one revision of a 50/50
/// split for 20 requests, stays through that revision's drain to 0 %, and moves when it leaves
/// the traffic; a client without the cookie gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_cookie_keeps_a_browser_on_one_revision_through_a_rollout() {
    let env = Env::new();
    let (one, two) = (env.pods("rollout-1", 1).await, env.pods("rollout-2", 1).await);
    let pods = [one[0].addr("http"), two[0].addr("http")];
    let topology = |first: Option<u32>| {
        let svc = Service::new("rollout").annotation("activator.knative.dev/sticky-revision-cookie-name", "rev");
        let svc = match first {
            Some(percent) => {
                svc.revision("rollout-1", percent, &pods[..1]).revision("rollout-2", 100 - percent, &pods[1..])
            }
            None => svc.revision("rollout-2", 100, &pods[1..]),
        };
        yaml(&[svc])
    };
    env.write_topology(&topology(Some(50)));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));

    // New browsers until both halves of the split have some (each lands on a half by its id's
    // hash: 40 on one half alone would be a one-in-a-trillion roll).
    let mut browsers: Vec<(String, String)> = Vec::new();
    let both = |browsers: &[(String, String)]| {
        browsers.iter().map(|(_, r)| r.as_str()).collect::<std::collections::HashSet<_>>().len() == 2
    };
    while browsers.len() < 4 || !both(&browsers) && browsers.len() < 40 {
        let first = client.get("rollout.test", "/incr").await;
        let set = first.header("set-cookie").to_owned();
        let cookie = set.split(';').next().unwrap_or_default().to_owned();
        assert!(cookie.starts_with("rev=") && cookie.len() == 4 + 32, "{set}");
        browsers.push((cookie, first.revision().to_owned()));
    }
    assert!(both(&browsers), "browsers land on both halves of the split: {browsers:?}");
    let send = |cookie: &str| {
        let request = client.request(reqwest::Method::GET, "rollout.test", "/incr").header("cookie", cookie);
        client.send(request)
    };
    for (cookie, revision) in &browsers {
        for _ in 0..20 {
            let reply = send(cookie).await;
            assert_eq!(reply.revision(), revision, "{cookie}");
            assert_eq!(reply.header("set-cookie"), "", "a browser with the cookie is not given another");
        }
    }

    let (on_one, _) = browsers.iter().find(|(_, r)| r == "rollout-1").expect("a browser on rollout-1");
    env.reload(&activator, &topology(Some(0))).await;
    assert_eq!(send(on_one).await.revision(), "rollout-1", "drained to 0 %, its browsers stay");
    assert_eq!(client.get("rollout.test", "/incr").await.revision(), "rollout-2", "new browsers do not");
    env.reload(&activator, &topology(None)).await;
    assert_eq!(send(on_one).await.revision(), "rollout-2", "out of the traffic, its browsers move");
    assert_eq!(send(on_one).await.revision(), "rollout-2");
}

const GENERATE: &str = "activator.knative.dev/sticky-session-generate-id";

/// A service that gives clients without a session id one in `X-Session`, over three pods, with
/// the activator's pins in Redis (so a pin's TTL can be read).
async fn generated_ids(name: &str) -> (Env, integration_tests::redis::Redis, Vec<Process>, Process) {
    let env = Env::new();
    let redis = integration_tests::redis::Redis::start(env.dir.path()).await;
    let pods = env.pods(&format!("{name}-1"), 3).await;
    env.write_topology(&yaml(&[Service::new(name)
        .annotation("activator.knative.dev/sticky-session-header-name", "X-Session")
        .annotation(GENERATE, "true")
        .revision(&format!("{name}-1"), 100, &addrs(&pods))]));
    let activator = env.shared_activator_with(&redis, &["--listen-h2c", "127.0.0.1:0"]).await;
    (env, redis, pods, activator)
}

/// GEP-1619's Header type over HTTP/1.1 and h2c: the first answer gives the id in `X-Session`,
/// the client sends it back and counts 1, 2, 3 on one pod; a client that never echoes it leaves
/// only a provisional pin, which the full TTL replaces once the id comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_header_id_keeps_an_api_client_on_its_pod_over_http1_and_h2c() {
    let (_env, redis, _pods, activator) = generated_ids("api").await;
    let pin_ttl = |id: String| {
        let url = redis.url();
        async move {
            let args = ["get", "--service", "api", "--session", &id, "--redis-url", &url];
            let (_, report, _) = integration_tests::activator_pins(&args).await;
            let ttl = report.lines().find_map(|l| l.strip_prefix("ttl")).and_then(|t| t.trim().strip_suffix('s'));
            ttl.and_then(|t| t.parse::<f64>().ok()).unwrap_or_else(|| panic!("no pin for {id}: {report}"))
        }
    };
    // The service's name resolves to the listener, so HTTP/2's :authority names it too.
    let at = |listener: &str| reqwest::Client::builder().no_proxy().resolve("api.test", activator.addr(listener));
    let http1 = at("proxy").http1_only().build().unwrap();
    let h2c = at("h2c").http2_prior_knowledge().build().unwrap();
    for (client, listener) in [(&http1, "proxy"), (&h2c, "h2c")] {
        let url = format!("http://api.test:{}/incr?session_id={listener}", activator.addr(listener).port());
        let first = client.get(&url).send().await.unwrap();
        assert_eq!(first.status(), 200, "{listener}: {:?}", first.headers());
        let id = first.headers()["x-session"].to_str().unwrap().to_owned();
        let pod = first.headers()["x-demo-pod"].clone();
        assert_eq!(id.len(), 32, "{listener}");
        assert!(pin_ttl(id.clone()).await <= 60.0, "{listener}: not sent back yet, pinned for a minute");
        for n in 2..=3 {
            let again = client.get(&url).header("x-session", &id).send().await.unwrap();
            assert!(again.headers().get("x-session").is_none(), "{listener}: no new id for a client that has one");
            assert_eq!(again.headers()["x-demo-pod"], pod, "{listener}");
            assert_eq!(again.text().await.unwrap(), format!("session={listener}, count={n}\n"));
        }
        integration_tests::wait_until(
            std::time::Duration::from_secs(10),
            "the echoed id's pin has the full TTL",
            || async { pin_ttl(id.clone()).await > 500.0 },
        )
        .await;
    }
}

/// The same for a gRPC client: tonic reads the id from the response's initial metadata and sends
/// it back as metadata; the counts go 1, 2, 3 on one pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_header_id_reaches_a_grpc_client_as_metadata() {
    use demo_service::pb::IncrRequest;
    use demo_service::pb::counter_client::CounterClient;
    let (_env, _redis, _pods, activator) = generated_ids("grpc").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", activator.addr("proxy")))
        .unwrap()
        .origin("http://grpc.test".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = CounterClient::new(channel);
    let first = client.incr(IncrRequest { session: "grpc".into() }).await.expect("the first call");
    let id = first.metadata().get("x-session").expect("the id in initial metadata").clone();
    let pod = first.into_inner().pod;
    for n in 2..=3u64 {
        let mut call = tonic::Request::new(IncrRequest { session: "grpc".into() });
        call.metadata_mut().insert("x-session", id.clone());
        let count = client.incr(call).await.expect("a call with the id").into_inner();
        assert_eq!((count.count, &count.pod), (n, &pod));
    }
}

/// Defaults off, local mode: with `--default-ids false` a service that does not say ignores
/// `K-Session` and `K-Revision`, and one annotated `sticky-default-ids: "true"` reads them (the
/// service's word wins over the cluster's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_ids_off_for_the_cluster_and_on_for_the_service_that_asks() {
    let env = Env::new();
    let pods = env.pods("quiet-1", 1).await;
    let loud = env.pods("loud-1", 1).await;
    env.write_topology(&yaml(&[
        Service::new("quiet").revision("quiet-1", 100, &addrs(&pods)),
        Service::new("loud").annotation("activator.knative.dev/sticky-default-ids", "true").revision(
            "loud-1",
            100,
            &addrs(&loud),
        ),
    ]));
    let activator = env.activator(&["--default-ids", "false", "--debug-headers"]).await;
    let client = Client::new(activator.addr("proxy"));
    let decided = |host: &'static str, header: &'static str| {
        let client = client.clone();
        async move { client.get_with(host, "/incr", &[(header, "abc")]).await.header("x-activator-decision").to_owned() }
    };
    assert_eq!(decided("quiet.test", "K-Session").await, "split", "K-Session is no id here");
    assert_eq!(decided("quiet.test", "K-Revision").await, "split", "nor K-Revision");
    assert_eq!(decided("loud.test", "K-Session").await, "new-pin", "the service's annotation wins");
    assert_eq!(decided("loud.test", "K-Session").await, "session-pin");
}

/// Defaults off, Knative mode: `config-affinity-activator`'s `default-ids: "false"` turns them
/// off live for services that do not say; a service's annotation turns them back on for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knative_config_turns_the_default_ids_off_and_a_service_annotation_wins() {
    use integration_tests::knative::{Cluster, Revision, Target, and_wait_applied, config_map, send};
    use integration_tests::kube_api::Kind;
    let c = Cluster::new().await;
    let pods = c.env.pods("counter-00001", 1).await;
    c.revision(&Revision::new("counter", "counter-00001"), &addrs(&pods));
    c.service("counter", &[Target::new("counter-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    let decided = |id: &'static str| {
        let client = client.clone();
        async move {
            send(&client, "/incr", "counter-00001", &[("K-Session", id)])
                .await
                .header("x-activator-decision")
                .to_owned()
        }
    };
    assert_eq!(decided("a").await, "new-pin", "on by default");
    and_wait_applied(&activator, || {
        c.api.put(Kind::ConfigMap, config_map("config-affinity-activator", &[("default-ids", "false")]))
    })
    .await;
    assert_eq!(decided("b").await, "ingress", "off for the cluster: no id, the ingress's pick");
    and_wait_applied(&activator, || c.annotate("counter", &[("sticky-default-ids", "true")])).await;
    assert_eq!(decided("c").await, "new-pin", "the service's annotation wins");
}

/// Soft affinity (llm-d's session scorer beside its load scorers): with a spill threshold of 1
/// and one slot per pod, a session's pod busy and one of its requests already waiting for it, the
/// next request of the session goes to the idle pod; the pin stays, so once the pod is free the
/// session is back on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pinned_pod_spills_the_next_request_to_an_idle_pod_and_keeps_the_pin() {
    let env = Env::new();
    let pods = env.pods("llm-1", 2).await;
    env.write_topology(&yaml(&[Service::new("llm")
        .annotation("activator.knative.dev/sticky-session-spill-threshold", "1")
        .revision("llm-1", 100, &addrs(&pods))
        .with(|r| r.container_concurrency = 1)]));
    let activator = env.activator(&["--debug-headers"]).await;
    let client = Client::new(activator.addr("proxy"));
    let chat = [("K-Session", "chat")];
    let first = client.get_with("llm.test", "/incr?session_id=chat", &chat).await;
    let home = first.pod().to_owned();
    let index = usize::from(home.ends_with('1'));
    let home_stats = format!("http://{}/slow/stats", pods[index].addr("http"));

    // The pod's one slot held, and one of the session's requests waiting for it.
    let holding = tokio::spawn({
        let client = client.clone();
        async move { client.get_with("llm.test", "/slow?delay=3s", &[("K-Session", "chat")]).await }
    });
    integration_tests::wait_until(std::time::Duration::from_secs(10), "the pod holds the slow request", || async {
        reqwest::get(&home_stats).await.unwrap().text().await.unwrap().contains("waiting 1")
    })
    .await;
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.get_with("llm.test", "/incr?session_id=chat", &[("K-Session", "chat")]).await }
    });
    let admin = activator.addr("admin");
    integration_tests::wait_until(std::time::Duration::from_secs(10), "a request waits for the pod", || async {
        integration_tests::metric(admin, "activator_queued_requests", &[("revision", "llm-1")]).await == Some(1.0)
    })
    .await;

    let spilled = client.get_with("llm.test", "/incr?session_id=chat", &chat).await;
    assert_eq!(spilled.header("x-activator-decision"), "spill");
    assert_ne!(spilled.pod(), home, "the idle pod took it");
    assert_eq!(spilled.body.trim(), "session=chat, count=1", "a pod without the session's state");

    let (held, waited) = (holding.await.unwrap(), waiting.await.unwrap());
    assert_eq!((held.pod(), waited.pod()), (home.as_str(), home.as_str()));
    assert_eq!(waited.body.trim(), "session=chat, count=2", "the waiting one kept its place on the pod");
    let back = client.get_with("llm.test", "/incr?session_id=chat", &chat).await;
    assert_eq!((back.pod(), back.header("x-activator-decision")), (home.as_str(), "session-pin"), "the pin stayed");
    assert_eq!(back.body.trim(), "session=chat, count=3");
}

/// A strict session's pod dies while still listed: the request its pin sends there fails to
/// connect, and the client is told the session is lost (it is not resent to another pod, where
/// its state is not); the next request starts a new session on the pod that lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_sessions_pod_that_dies_while_listed_loses_it() {
    let (_env, mut pods, activator, _) = two_pods("dies", true).await;
    let client = Client::new(activator.addr("proxy"));
    let home = kernel(&client, "dies.test").await.pod().to_owned();
    let (_, stayer) = other(&pods, "dies-1", &home);
    let victim = usize::from(home.ends_with('1'));
    pods[victim].signal(nix::sys::signal::Signal::SIGKILL);
    pods[victim].wait_exit(std::time::Duration::from_secs(10)).await;

    let lost = kernel(&client, "dies.test").await;
    assert_eq!((lost.status, lost.header("k-session-lost")), (503, "pod-gone"), "{}", lost.body);
    let fresh = kernel(&client, "dies.test").await;
    assert_eq!((fresh.status, fresh.pod(), fresh.body.trim()), (200, stayer.as_str(), "session=kernel, count=1"));
}

/// `sticky-session-placement: least-sessions`: new sessions go to the ready pod holding the
/// fewest live sessions, so ten alternate over two pods, and a pod that joins takes the next
/// new sessions until it holds as many as the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_go_to_the_pod_with_the_fewest_sessions() {
    let env = Env::new();
    let pods = env.pods("seats-1", 3).await;
    let topology = |n: usize| {
        yaml(&[Service::new("seats")
            .annotation("activator.knative.dev/sticky-session-placement", "least-sessions")
            .revision("seats-1", 100, &addrs(&pods[..n]))
            .with(|r| r.probe = "none")])
    };
    env.write_topology(&topology(2));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    let place = |id: String| {
        let client = client.clone();
        async move { client.get_with("seats.test", "/incr", &[("K-Session", id.as_str())]).await.pod().to_owned() }
    };
    let mut placed = std::collections::HashMap::<String, usize>::new();
    for i in 0..10 {
        *placed.entry(place(format!("s{i}")).await).or_default() += 1;
    }
    assert_eq!(placed.values().copied().collect::<Vec<_>>(), [5, 5], "{placed:?}");

    env.reload(&activator, &topology(3)).await;
    for i in 10..15 {
        assert_eq!(place(format!("s{i}")).await, "seats-1-pod-2", "session {i} goes to the pod with none");
    }
    // Known sessions stay where they are.
    assert_ne!(place("s0".to_owned()).await, "seats-1-pod-2");
}
