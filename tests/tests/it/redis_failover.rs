//! The pin store when Redis itself fails over, with real processes: a Redis Cluster losing a
//! primary, and Sentinels promoting a replica, each under load through two activators.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use integration_tests::load::Load;
use integration_tests::redis::{RedisCluster, RedisSentinels};
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, activator_pins, addrs, metric, wait_pin_store_up, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_live_in_a_redis_cluster_and_a_lost_primary_fails_no_request() {
    let env = Env::new();
    let mut cluster = RedisCluster::start(env.dir.path()).await;
    // Services whose pins (one hash tag each) sit on every primary.
    let mut by_primary: BTreeMap<u16, String> = BTreeMap::new();
    for i in 0.. {
        let name = format!("svc-{i}");
        by_primary.entry(cluster.primary_of(&format!("{{default/{name}}}")).await).or_insert(name);
        if by_primary.len() == 3 {
            break;
        }
    }
    let services: Vec<&String> = by_primary.values().collect();
    let pods = env.pods("shared-1", 3).await;
    let topology: Vec<Service> =
        services.iter().map(|name| Service::new(name).revision(&format!("{name}-1"), 100, &addrs(&pods))).collect();
    env.write_topology(&yaml(&topology));
    let url = cluster.url();
    let flags = ["--pin-store", "redis", "--redis-cluster", "--redis-url", &url, "--debug-headers"];
    let (a, b) = (env.activator(&flags).await, env.activator(&flags).await);
    wait_pin_store_up(a.addr("admin")).await;
    wait_pin_store_up(b.addr("admin")).await;
    let (via_a, via_b) = (Client::new(a.addr("proxy")), Client::new(b.addr("proxy")));

    // Every session pinned through A is honoured through B, whichever primary holds it.
    let mut homes = Vec::new();
    for service in &services {
        let host = format!("{service}.test");
        for s in 0..4 {
            let id = format!("{service}-s{s}");
            let first = via_a.get_with(&host, "/incr", &[("K-Session", &id)]).await;
            let second = via_b.get_with(&host, "/incr", &[("K-Session", &id)]).await;
            assert_eq!((first.status, second.status), (200, 200));
            assert_eq!(first.pod(), second.pod(), "{id} split across replicas");
            homes.push((host.clone(), id, first.pod().to_owned()));
        }
    }

    // Steady load through both activators while one primary dies and its replica takes over.
    let load = Load::start(6, {
        let (clients, homes) = ([via_a.clone(), via_b.clone()], homes.clone());
        move |worker, n| {
            let (host, id, _) = &homes[(worker + n) % homes.len()];
            clients[worker % 2].request(reqwest::Method::GET, host, "/incr").header("K-Session", id)
        }
    });
    load.wait_for(200, Duration::from_secs(30)).await;
    let lost = *by_primary.keys().next().expect("three primaries");
    cluster.kill_primary(lost).await;
    load.wait_for(400, Duration::from_secs(60)).await;
    let failed = load.stop().await.into_iter().filter(|o| o.failed()).count();
    assert_eq!(failed, 0, "requests failed while a primary was lost");

    // Pins on the surviving primaries are still in Redis and still route.
    let survivors: HashSet<&String> = by_primary.iter().filter(|(port, _)| **port != lost).map(|(_, s)| s).collect();
    for (host, id, pod) in &homes {
        let service = host.trim_end_matches(".test");
        if !survivors.contains(&service.to_owned()) {
            continue;
        }
        let (found, report, problem) = activator_pins(&[
            "get",
            "--redis-cluster",
            "--redis-url",
            &url,
            "--namespace",
            "default",
            "--service",
            service,
            "--session",
            id,
        ])
        .await;
        // Pods are named `shared-1-pod-<index>`; the pin names the pod by its address.
        let index: usize = pod.rsplit('-').next().and_then(|i| i.parse().ok()).expect("a pod index");
        let addr = pods[index].addr("http").to_string();
        assert!(found && report.contains(&addr), "the pin of {id} is kept: {report}{problem}");
        for client in [&via_a, &via_b] {
            let reply = client.get_with(host, "/incr", &[("K-Session", id)]).await;
            assert_eq!((reply.status, reply.pod()), (200, pod.as_str()), "{id} stays on its pod");
        }
    }
    let service = survivors.iter().next().unwrap();
    let list = ["list", "--redis-cluster", "--redis-url", &url, "--namespace", "default", "--service", service];
    let (_, listed, _) = activator_pins(&list).await;
    assert!(listed.contains("4 pins for default/"), "pins list reads one slot's primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_follow_the_primary_sentinels_promote_and_no_request_fails() {
    let env = Env::new();
    let mut set = RedisSentinels::start(env.dir.path()).await;
    let pods = env.pods("sentinel-1", 3).await;
    env.write_topology(&yaml(&[Service::new("sentinel").revision("sentinel-1", 100, &addrs(&pods))]));
    let url = set.url();
    let flags = ["--pin-store", "redis", "--redis-sentinel-primary", RedisSentinels::PRIMARY, "--redis-url", &url];
    let (a, b) = (env.activator(&flags).await, env.activator(&flags).await);
    wait_pin_store_up(a.addr("admin")).await;
    wait_pin_store_up(b.addr("admin")).await;
    let (via_a, via_b) = (Client::new(a.addr("proxy")), Client::new(b.addr("proxy")));
    let agree = |tag: String| {
        let (via_a, via_b) = (via_a.clone(), via_b.clone());
        async move {
            let first = via_a.get_with("sentinel.test", "/incr", &[("K-Session", &tag)]).await;
            let second = via_b.get_with("sentinel.test", "/incr", &[("K-Session", &tag)]).await;
            (first.status, second.status) == (200, 200) && first.pod() == second.pod()
        }
    };
    for i in 0..5 {
        assert!(agree(format!("before-{i}")).await, "session before-{i} split across replicas");
    }
    assert_eq!(pins_on(&set.primary).await, 5, "the pins are on the primary");

    let load = Load::start(6, {
        let clients = [via_a.clone(), via_b.clone()];
        move |worker, n| {
            let session = format!("before-{}", (worker + n) % 5);
            clients[worker % 2].request(reqwest::Method::GET, "sentinel.test", "/incr").header("K-Session", session)
        }
    });
    load.wait_for(200, Duration::from_secs(30)).await;
    set.kill_primary().await;
    load.wait_for(400, Duration::from_secs(60)).await;
    let failed = load.stop().await.into_iter().filter(|o| o.failed()).count();
    assert_eq!(failed, 0, "requests failed while the primary was lost");

    // Both activators follow the promoted replica and share pins through it again.
    for activator in [&a, &b] {
        let admin = activator.addr("admin");
        wait_until(Duration::from_secs(30), "the activator follows the new primary", || async {
            activator.logs().contains("Sentinels failed the Redis primary over; following it")
                && metric(admin, "activator_pin_store_up", &[]).await == Some(1.0)
        })
        .await;
    }
    for i in 0..3 {
        assert!(agree(format!("after-{i}")).await, "session after-{i} split across replicas");
    }
    assert!(
        pins_on(&set.replica).await > 5,
        "new pins land on the promoted replica: {}",
        set.replica.cli(&["KEYS", "*"]).await
    );
}

/// The pins a server holds (beside them it holds the store's generation).
async fn pins_on(server: &integration_tests::redis::Redis) -> usize {
    server.cli(&["KEYS", "aa:{*"]).await.lines().filter(|l| !l.trim().is_empty()).count()
}

/// Issue 25, item 11: what a test's `redis-server` writes (a snapshot, a replica's copy) goes to a
/// directory of its own in the test's scratch space, never into the working tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_redis_writes_nothing_into_the_working_tree() {
    let env = Env::new();
    let redis = integration_tests::redis::Redis::start(env.dir.path()).await;
    let before = std::path::Path::new("dump.rdb").exists();
    assert_eq!(redis.cli(&["SAVE"]).await.trim(), "OK");
    let own = env.dir.path().join(format!("redis-{}.dir", redis.port())).join("dump.rdb");
    assert!(own.exists(), "the snapshot is in the server's own directory");
    assert!(before || !std::path::Path::new("dump.rdb").exists(), "nothing written where the test runs");
}
