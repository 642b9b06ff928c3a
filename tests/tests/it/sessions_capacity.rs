//! Sessions as capacity (issue 31): pods that hold a bounded number of sessions
//! (`sticky-sessions-per-pod`), sessions waiting for a seat while autoscaler-shim adds pods for
//! them, seats freed when pins end, across replicas sharing Redis, and the warm reserve.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, Reply, activator_pins, pin_store_round_trips, wait_until};

const PER_POD: &str = "activator.knative.dev/sticky-sessions-per-pod";
const RESERVE: &str = "activator.knative.dev/sticky-session-reserve";
const TTL: &str = "activator.knative.dev/sticky-ttl";

/// The service `kernels`, whose revision `kernels-1` autoscaler-shim runs: one session per pod,
/// between `min` and `max` pods, pins idle for `ttl`.
fn kernels(min: u32, max: u32, ttl: &str) -> Service {
    Service::new("kernels")
        .revision("kernels-1", 100, &[])
        .annotation(PER_POD, "1")
        .annotation(TTL, ttl)
        .annotation("autoscaling.knative.dev/min-scale", &min.to_string())
        .annotation("autoscaling.knative.dev/max-scale", &max.to_string())
}

/// autoscaler-shim running the topology's revisions without endpoints, by their annotations.
async fn shim(env: &Env, extra: &[&str]) -> integration_tests::Process {
    let topology = env.topology_path().display().to_string();
    let flags = ["--topology", topology.as_str(), "--scale-to-zero-grace", "60s"];
    env.shim(&[&flags[..], extra].concat()).await
}

async fn session(client: &Client, id: &str) -> Reply {
    client.get_with("kernels.test", &format!("/incr?session_id={id}"), &[("K-Session", id)]).await
}

/// The pods the activator lists for `kernels-1`, from the seats it counts on each.
async fn listed_pods(admin: SocketAddr) -> usize {
    let metrics = Metrics::scrape(admin).await;
    metrics.0.lines().filter(|l| l.starts_with("activator_sessions_held_by_pod{") && l.contains("kernels-1")).count()
}

async fn waiting(admin: SocketAddr) -> f64 {
    Metrics::scrape(admin).await.value("activator_sessions_waiting", &[("revision", "kernels-1")]).unwrap_or(0.0)
}

/// Five new sessions `<prefix>0` to `<prefix>4`, all at once, each one's first request through
/// every client at the same time, then two more requests each (through the clients in turn):
/// each session's pod and the counts it saw.
async fn five_sessions(clients: &[Client], prefix: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let first: Vec<_> = (0..5)
        .flat_map(|i| clients.iter().map(move |client| (format!("{prefix}{i}"), client.clone())))
        .map(|(id, client)| tokio::spawn(async move { (id.clone(), session(&client, &id).await) }))
        .collect();
    let mut seen: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for reply in first {
        let (id, reply) = reply.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        let (pod, bodies) = seen.entry(id.clone()).or_insert_with(|| (reply.pod().to_owned(), Vec::new()));
        assert_eq!(&reply.pod(), pod, "{id} has one pod through every replica");
        bodies.push(reply.body.trim().to_owned());
    }
    // Through several replicas at once, the first requests counted 1, 2, …: in either order.
    let firsts = clients.len();
    for (_, bodies) in seen.values_mut() {
        bodies.sort();
        bodies.truncate(1);
    }
    for round in 0..2 {
        for (i, (id, (pod, bodies))) in seen.iter_mut().enumerate() {
            let reply = session(&clients[(i + round + 1) % clients.len()], id).await;
            assert_eq!(&reply.pod(), pod, "{id} stays on its pod");
            bodies.push(reply.body.trim().to_owned());
        }
    }
    for (id, (_, bodies)) in &seen {
        let expected: Vec<String> = [1, firsts + 1, firsts + 2].map(|n| format!("session={id}, count={n}")).to_vec();
        assert_eq!(bodies, &expected, "{id} counts on one pod of its own");
    }
    let pods: BTreeSet<&String> = seen.values().map(|(pod, _)| pod).collect();
    assert_eq!(pods.len(), 5, "no two sessions share a pod: {seen:?}");
    seen
}

/// Keeps `ids` in use (one request each, every half second) until `until` completes.
async fn keep_alive_until<T>(clients: &[Client], ids: &[String], until: tokio::task::JoinHandle<T>) -> T {
    tokio::pin!(until);
    loop {
        tokio::select! {
            done = &mut until => return done.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, id) in ids.iter().enumerate() {
                    assert_eq!(session(&clients[i % clients.len()], id).await.status, 200);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_sessions_get_a_pod_each_and_waiting_ones_bring_pods() {
    let env = Env::new();
    env.write_topology(&yaml(&[kernels(2, 5, "15s")]));
    let shim = shim(&env, &[]).await;
    let activator = env.activator_with_shim(&shim, &[]).await;
    let admin = activator.addr("admin");
    wait_until(Duration::from_secs(20), "min-scale's two pods are listed", || async { listed_pods(admin).await == 2 })
        .await;

    let clients = [Client::new(activator.addr("proxy"))];
    let seen = five_sessions(&clients, "k").await;
    // Listed in the metrics at the next count of seats.
    wait_until(Duration::from_secs(5), "the shim started three more, one per waiting session", || async {
        listed_pods(admin).await == 5
    })
    .await;

    // At max-scale: a sixth session waits for a seat, and gets the pod of the session that ends
    // (k0 goes idle past its TTL while the others stay in use).
    let sixth = {
        let client = clients[0].clone();
        tokio::spawn(async move { session(&client, "k5").await })
    };
    wait_until(Duration::from_secs(10), "the sixth session waits", || async { waiting(admin).await == 1.0 }).await;
    let others: Vec<String> = (1..5).map(|i| format!("k{i}")).collect();
    let sixth = keep_alive_until(&clients, &others, sixth).await;
    assert_eq!((sixth.status, sixth.body.trim()), (200, "session=k5, count=1"));
    assert_eq!(sixth.pod(), seen["k0"].0, "the ended session's pod, and no other, had a free seat");
    assert_eq!(session(&clients[0], "k1").await.pod(), seen["k1"].0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_never_seat_racing_sessions_together() {
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    env.write_topology(&yaml(&[kernels(2, 5, "600s")]));
    let shim = shim(&env, &[]).await;
    let url = format!("ws://{}", shim.addr("stats"));
    let endpoints = env.endpoints_path().display().to_string();
    let flags = ["--autoscaler-url", url.as_str(), "--endpoints-file", endpoints.as_str()];
    let (a, b) = (env.shared_activator_with(&redis, &flags).await, env.shared_activator_with(&redis, &flags).await);
    let admins = [a.addr("admin"), b.addr("admin")];
    wait_until(Duration::from_secs(20), "both list min-scale's two pods", || async {
        listed_pods(admins[0]).await == 2 && listed_pods(admins[1]).await == 2
    })
    .await;

    // Each session's first request goes through both replicas at once.
    let clients = [Client::new(a.addr("proxy")), Client::new(b.addr("proxy"))];
    let seen = five_sessions(&clients, "r").await;

    // The operator's view of the service reads its pins alone, not the seats beside them.
    let (listed, out, err) =
        activator_pins(&["list", "--redis-url", &redis.url(), "--namespace", "default", "--service", "kernels"]).await;
    assert!(listed, "{out}{err}");
    assert!(out.contains("5 pins for default/kernels"), "{out}");
    assert_eq!(out.lines().filter(|l| l.ends_with(" 1 sessions")).count(), 5, "one session a pod: {out}");

    // The operator ends a session: a session waiting through the other replica gets its pod.
    let sixth = {
        let client = clients[1].clone();
        tokio::spawn(async move { session(&client, "r5").await })
    };
    wait_until(Duration::from_secs(10), "the sixth session waits", || async { waiting(admins[1]).await == 1.0 }).await;
    for admin in admins {
        wait_until(Duration::from_secs(5), "each replica counts every replica's seats", || async {
            Metrics::scrape(admin).await.value("activator_sessions_held", &[("revision", "kernels-1")]) == Some(5.0)
        })
        .await;
    }
    let (ended, out, err) = activator_pins(&[
        "delete",
        "--redis-url",
        &redis.url(),
        "--namespace",
        "default",
        "--service",
        "kernels",
        "--session",
        "r2",
    ])
    .await;
    assert!(ended, "{out}{err}");
    let sixth = sixth.await.unwrap();
    assert_eq!((sixth.status, sixth.body.trim()), (200, "session=r5, count=1"));
    assert_eq!(sixth.pod(), seen["r2"].0, "the ended session's pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_reserve_seats_a_new_session_on_a_pod_already_running() {
    let env = Env::new();
    env.write_topology(&yaml(&[kernels(0, 5, "600s").annotation(RESERVE, "1")]));
    // Pods take a second and a half to start: a session that waited for one would be seated on
    // a pod started after it arrived.
    let command = integration_tests::demo_command("--startup-delay 1500ms");
    let shim = shim(&env, &["--command", &command]).await;
    let activator = env.activator_with_shim(&shim, &[]).await;
    let (admin, client) = (activator.addr("admin"), Client::new(activator.addr("proxy")));

    wait_until(Duration::from_secs(20), "the reserve's pod runs before any session", || async {
        listed_pods(admin).await == 1
    })
    .await;
    for i in 0..3 {
        // The shim names its pods kernels-1-1, kernels-1-2, … in the order it starts them.
        let running: BTreeSet<String> = (1..=listed_pods(admin).await).map(|n| format!("kernels-1-{n}")).collect();
        let reply = session(&client, &format!("w{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(running.contains(reply.pod()), "session {i} took a warm pod ({}), one of {running:?}", reply.pod());
        let want = i + 2;
        wait_until(Duration::from_secs(20), "the shim restores the reserve", || async {
            listed_pods(admin).await == want
        })
        .await;
    }
    assert_eq!(waiting(admin).await, 0.0);
}

/// What Knative's autoscaler makes of a revision's concurrency: upstream's
/// `ResolveMetricTarget` (pkg/reconciler/autoscaling/resources/target.go) takes the
/// `autoscaling.knative.dev/target` annotation as the total (the smaller of it and
/// `containerConcurrency` when that is set) and targets `max(0.01, total × utilization)`; its
/// decider (pkg/autoscaler/scaling/autoscaler.go, `Scale`) wants
/// `ceil(observed concurrency / target)` pods, the observed concurrency being, per second, the sum
/// over the stats received of `average_concurrent_requests − average_proxied_concurrent_requests`
/// (pkg/autoscaler/metrics/collector.go, `record`).
fn kpa_desired(observed: f64, annotation_target: f64, container_concurrency: f64, utilization: f64) -> u32 {
    let total =
        if container_concurrency > 0.0 { annotation_target.min(container_concurrency) } else { annotation_target };
    let target = (total * utilization).max(0.01);
    (observed / target).ceil() as u32
}

/// The concurrency of each stat the autoscaler printed for `revision`, oldest first.
fn reported(autoscaler: &integration_tests::Process, revision: &str) -> Vec<f64> {
    let prefix = format!("stat default/{revision} ");
    autoscaler
        .stdout()
        .iter()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("concurrency=")))
        .filter_map(|value| value.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_knative_mode_the_stats_make_the_kpa_add_a_pod_per_waiting_session() {
    use integration_tests::knative::{Cluster, Revision, Target, private_endpoints};
    use integration_tests::kube_api::Kind;
    let c = Cluster::new().await;
    let mut revision = Revision::new("kernels", "kernels-00001");
    // What the README tells the user to set beside the cap: the target is the sessions a pod
    // holds, at full utilization.
    for (key, value) in
        [("autoscaling.knative.dev/target", "1"), ("autoscaling.knative.dev/target-utilization-percentage", "100")]
    {
        revision.annotations.insert(key.to_owned(), value.to_owned());
    }
    let mut pods = c.env.pods("kernels-00001", 2).await;
    c.revision(&revision, &integration_tests::addrs(&pods));
    c.service(
        "kernels",
        &[Target::new("kernels-00001", 100)],
        &[("sticky-sessions-per-pod", "1"), ("sticky-session-reserve", "1")],
    );
    let autoscaler = c.autoscaler().await;
    let activator = c.activator(&autoscaler, "10.0.0.1", &[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let kpa = |observed: f64| kpa_desired(observed, 1.0, f64::from(revision.container_concurrency), 1.0);

    let sessions: Vec<_> = (0..5)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { knative_session(&client, "kernels-00001", &format!("n{i}")).await })
        })
        .collect();
    let waiting_now = || async {
        Metrics::scrape(admin)
            .await
            .value("activator_sessions_waiting", &[("revision", "kernels-00001")])
            .unwrap_or(0.0)
    };
    wait_until(Duration::from_secs(10), "two sessions are seated and three wait", || async {
        waiting_now().await == 3.0
    })
    .await;
    // 2 seats held + 3 sessions waiting + a reserve of 1: six pods, four more than run.
    wait_until(Duration::from_secs(10), "a stat says so", || async {
        reported(&autoscaler, "kernels-00001").last() == Some(&6.0)
    })
    .await;
    assert_eq!(kpa(6.0), 2 + 3 + 1, "the KPA wants a pod per waiting session and the reserve");

    // The KPA's pods arrive (as the watch lists them): the waiting sessions take them, and the
    // stats keep exactly the reserve free.
    for i in 2..6 {
        pods.push(c.env.demo(&format!("kernels-00001-pod-{i}"), "kernels-00001").await);
    }
    c.api.put(Kind::Endpoints, private_endpoints(&revision, &integration_tests::addrs(&pods), &[]));
    let mut seated = BTreeSet::new();
    for session in sessions {
        let reply = session.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(seated.insert(reply.pod().to_owned()), "a pod of its own: {seated:?} {}", reply.pod());
    }
    let settled = reported(&autoscaler, "kernels-00001").len();
    wait_until(Duration::from_secs(10), "the stats settle on the held seats and the reserve", || async {
        let stats = reported(&autoscaler, "kernels-00001");
        stats.len() > settled + 1 && stats.last() == Some(&6.0)
    })
    .await;
    assert_eq!(kpa(6.0), 6, "five held and one free: the KPA keeps the six pods that run");
}

const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// A Pod object for each of `revision`'s pods, named as its private Endpoints' `targetRef`s name
/// them.
fn pod_objects(
    c: &integration_tests::knative::Cluster,
    revision: &integration_tests::knative::Revision,
    pods: &[SocketAddr],
) {
    for pod in pods {
        let name = format!("{}-deployment-{}", revision.name, pod.port());
        let object = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": revision.namespace, "labels": {"serving.knative.dev/revision": revision.name}}});
        c.api.put(integration_tests::kube_api::Kind::Pod, object);
    }
}

/// Each pod's deletion cost annotation as the API server holds it (absent: none).
fn deletion_costs(c: &integration_tests::knative::Cluster, revision: &str, pods: &[SocketAddr]) -> Vec<Option<String>> {
    pods.iter()
        .map(|pod| {
            let object = c.api.get(
                integration_tests::kube_api::Kind::Pod,
                "default",
                &format!("{revision}-deployment-{}", pod.port()),
            );
            object.and_then(|o| o["metadata"]["annotations"][DELETION_COST].as_str().map(str::to_owned))
        })
        .collect()
}

/// A session's request as Knative's ingress forwards it to `revision` (`<service>-<n>`), at its
/// service's host.
async fn knative_session(client: &Client, revision: &str, id: &str) -> Reply {
    let service = revision.rsplit_once('-').map_or(revision, |(service, _)| service);
    let host = format!("{service}.default.example.com");
    let mut req = client.request(reqwest::Method::GET, &host, &format!("/incr?session_id={id}"));
    for (k, v) in integration_tests::knative::ingress(revision).into_iter().chain([("K-Session", id.to_owned())]) {
        req = req.header(k, v);
    }
    client.send(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deletion_cost_follows_live_sessions_written_by_one_replica() {
    use integration_tests::knative::{Cluster, Revision, Target};
    use integration_tests::kube_api::Kind;
    let c = Cluster::new().await;
    let redis = Redis::start(c.env.dir.path()).await;
    let revision = Revision::new("scaled", "scaled-00001");
    let pods = c.env.pods("scaled-00001", 3).await;
    let addrs = integration_tests::addrs(&pods);
    c.revision(&revision, &addrs);
    pod_objects(&c, &revision, &addrs);
    c.service("scaled", &[Target::new("scaled-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let url = redis.url();
    let flags = [
        "--pin-store",
        "redis",
        "--redis-url",
        &url,
        "--pod-deletion-cost",
        "true",
        "--pod-deletion-cost-interval",
        "500ms",
    ];
    let (a, b) =
        (c.activator(&autoscaler, "10.0.0.1", &flags).await, c.activator(&autoscaler, "10.0.0.2", &flags).await);
    let clients = [Client::new(a.addr("proxy")), Client::new(b.addr("proxy"))];

    let mut by_pod: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..9 {
        let id = format!("d{i}");
        let reply = knative_session(&clients[i % 2], "scaled-00001", &id).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        by_pod.entry(reply.pod().to_owned()).or_default().push(id);
    }
    let expected = |by_pod: &BTreeMap<String, Vec<String>>| -> Vec<Option<String>> {
        (0..3).map(|i| Some(by_pod.get(&format!("scaled-00001-pod-{i}")).map_or(0, Vec::len).to_string())).collect()
    };
    let want = expected(&by_pod);
    wait_until(Duration::from_secs(10), "each pod's deletion cost is its sessions, zero included", || async {
        deletion_costs(&c, "scaled-00001", &addrs) == want
    })
    .await;

    // A session ends: its pod's cost follows.
    let (pod, ids) = by_pod.iter_mut().max_by_key(|(_, ids)| ids.len()).unwrap();
    let (pod, ended) = (pod.clone(), ids.pop().unwrap());
    let (deleted, out, err) = activator_pins(&[
        "delete",
        "--redis-url",
        &url,
        "--namespace",
        "default",
        "--service",
        "scaled",
        "--session",
        &ended,
    ])
    .await;
    assert!(deleted, "{out}{err}");
    let want = expected(&by_pod);
    wait_until(Duration::from_secs(10), &format!("{pod}'s cost drops by one"), || async {
        deletion_costs(&c, "scaled-00001", &addrs) == want
    })
    .await;

    // One writer, rate limited: every patch of a pod changes its value, one round apart at least.
    let patches = c.api.patches(Kind::Pod);
    assert!(!patches.is_empty());
    for pod in &addrs {
        let name = format!("scaled-00001-deployment-{}", pod.port());
        let mine: Vec<_> = patches.iter().filter(|p| p.name == name).collect();
        for pair in mine.windows(2) {
            let (before, after) = (
                &pair[0].patch["metadata"]["annotations"][DELETION_COST],
                &pair[1].patch["metadata"]["annotations"][DELETION_COST],
            );
            assert_ne!(before, after, "{name} written twice with the same value: two writers, or no change");
            assert!(pair[1].at - pair[0].at >= Duration::from_millis(250), "{name} written twice within a round");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_rbac_rule_pod_deletion_cost_says_so_once_and_changes_nothing_else() {
    use integration_tests::knative::{Cluster, Revision, Target};
    use integration_tests::kube_api::Kind;
    let c = Cluster::new().await;
    let revision = Revision::new("scaled", "scaled-00001");
    let pods = c.env.pods("scaled-00001", 2).await;
    let addrs = integration_tests::addrs(&pods);
    c.revision(&revision, &addrs);
    pod_objects(&c, &revision, &addrs);
    c.api.forbid(Kind::Pod);
    c.service("scaled", &[Target::new("scaled-00001", 100)], &[]);
    let autoscaler = c.autoscaler().await;
    let flags = ["--pod-deletion-cost", "true", "--pod-deletion-cost-interval", "200ms"];
    let activator = c.activator(&autoscaler, "10.0.0.1", &flags).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    for i in 0..4 {
        let id = format!("f{i}");
        for n in 1..=2 {
            let reply = knative_session(&client, "scaled-00001", &id).await;
            assert_eq!((reply.status, reply.body.trim()), (200, format!("session={id}, count={n}").as_str()));
        }
    }
    wait_until(Duration::from_secs(10), "the refusal is a metric", || async {
        Metrics::scrape(admin).await.value("activator_pod_deletion_cost_forbidden", &[]) == Some(1.0)
    })
    .await;
    // Rounds later: still one line, one refused write, no patch applied.
    wait_until(Duration::from_secs(10), "three rounds pass paused", || async {
        let rounds =
            Metrics::scrape(admin).await.value("activator_pod_deletion_cost_rounds_total", &[("role", "paused")]);
        rounds.unwrap_or(0.0) >= 3.0
    })
    .await;
    let said = activator.logs().matches("may not patch pods").count();
    assert_eq!(said, 1, "{}", activator.logs());
    let refused =
        Metrics::scrape(admin).await.value("activator_pod_deletion_cost_writes_total", &[("result", "forbidden")]);
    assert_eq!(refused, Some(1.0), "paused after the refusal, not hammering the API server");
    assert!(c.api.patches(Kind::Pod).is_empty());
    assert_eq!(knative_session(&client, "scaled-00001", "f0").await.body.trim(), "session=f0, count=3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_moved_without_a_claim_take_their_seats_on_their_new_pod() {
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    let pods = env.pods("kernels-1", 2).await;
    let addrs = integration_tests::addrs(&pods);
    let service = Service::new("kernels").revision("kernels-1", 100, &addrs).annotation(PER_POD, "2");
    env.write_topology(&yaml(&[service]));
    let activator = env.shared_activator(&redis).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let url = redis.url();

    // Two sessions, one a pod; then the operator moves the first pod's session onto the second,
    // which fills it (2 of 2) without any claim.
    let before = pin_store_round_trips(admin).await;
    let a = session(&client, "a").await;
    let seated = pin_store_round_trips(admin).await;
    assert_eq!(seated - before, 2.0, "a new capped session: the lookup, then the claim");
    assert_eq!(session(&client, "a").await.body.trim(), "session=a, count=2");
    assert_eq!(pin_store_round_trips(admin).await, seated, "a known pin costs no round trip");
    let b = session(&client, "b").await;
    assert_ne!(a.pod(), b.pod(), "the pod with fewer sessions first");
    let (from, to) = if a.pod() == "kernels-1-pod-0" { (addrs[0], addrs[1]) } else { (addrs[1], addrs[0]) };
    let (from, to) = (from.to_string(), to.to_string());
    let (drained, out, err) = activator_pins(&[
        "drain",
        "--redis-url",
        &url,
        "--namespace",
        "default",
        "--service",
        "kernels",
        "--pod",
        &from,
        "--to",
        &to,
    ])
    .await;
    assert!(drained, "{out}{err}");
    let held_by = |pod: String| async move {
        let metrics = Metrics::scrape(admin).await;
        metrics.value("activator_sessions_held_by_pod", &[("pod", pod.as_str())]).unwrap_or(-1.0)
    };
    wait_until(Duration::from_secs(20), "the moved pin is counted on its new pod", || async {
        held_by(to.clone()).await == 2.0 && held_by(from.clone()).await == 0.0
    })
    .await;

    // The emptied pod takes the next two; the fifth waits, though the full pod's seat set held
    // one session before the moved pin was counted.
    for id in ["c", "d"] {
        assert_eq!(session(&client, id).await.pod(), a.pod(), "{id} on the emptied pod");
    }
    let fifth = {
        let client = client.clone();
        tokio::spawn(async move { session(&client, "e").await })
    };
    wait_until(Duration::from_secs(10), "the fifth session waits for a seat", || async {
        Metrics::scrape(admin).await.value("activator_sessions_waiting", &[("revision", "kernels-1")]) == Some(1.0)
    })
    .await;
    assert!(!fifth.is_finished(), "no pod has a free seat");
    fifth.abort();
}
