//! The shared pin table at scale: twenty thousand sessions in use across two replicas. In a
//! file of its own so it runs alone: its rounds of requests must each take well under the TTL.

use std::time::Duration;

use futures_util::StreamExt;
use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, addrs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_live_sessions_outlive_their_ttl_without_moving() {
    const SESSIONS: usize = 20_000;
    // A session's requests are a round apart, so a round must take well under the TTL: 30 s
    // leaves room for rounds slowed down by the other test binaries on two cores.
    const TTL: Duration = Duration::from_secs(30);
    integration_tests::raise_open_files_limit();
    let env = Env::new();
    let redis = Redis::start(env.dir.path()).await;
    let pods = env.pods("counter-1", 3).await;
    env.write_topology(&yaml(&[Service::new("counter")
        .annotation("activator.knative.dev/sticky-ttl", "30s")
        .revision("counter-1", 100, &addrs(&pods))]));
    let url = redis.url();
    // A long refresh interval makes each batch large, as ten thousand pins in use per second do.
    let flags = ["--pin-store", "redis", "--redis-url", &url, "--pin-refresh-interval", "3s"];
    let (a, b) = (env.activator(&flags).await, env.activator(&flags).await);
    integration_tests::wait_pin_store_up(a.addr("admin")).await;
    integration_tests::wait_pin_store_up(b.addr("admin")).await;
    let replicas = [Client::new(a.addr("proxy")), Client::new(b.addr("proxy"))];

    // Each session lives on one replica; `via` picks the replica for a round.
    let round = |flip: bool| {
        let replicas = replicas.clone();
        async move {
            futures_util::stream::iter(0..SESSIONS)
                .map(|i| {
                    let client = replicas[(i % 2) ^ usize::from(flip)].clone();
                    async move {
                        let id = format!("live-{i}");
                        let req = client.request(reqwest::Method::GET, "counter.test", "/incr").header("K-Session", id);
                        client.try_send(req).await.map(|r| (r.status, r.pod().to_owned()))
                    }
                })
                .buffered(64)
                .collect::<Vec<_>>()
                .await
        }
    };
    let pinned = round(false).await;
    let started = tokio::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < TTL + Duration::from_secs(5) {
        let replies = round(false).await;
        for (i, (reply, first)) in replies.iter().zip(&pinned).enumerate() {
            assert_eq!(reply.as_ref().ok(), first.as_ref().ok(), "session live-{i} in round {rounds}");
        }
        rounds += 1;
    }
    let crossed = round(true).await;
    let moved = crossed.iter().zip(&pinned).filter(|(now, first)| now.as_ref().ok() != first.as_ref().ok()).count();
    eprintln!("{rounds} rounds of {SESSIONS} sessions over {:?}", started.elapsed());
    assert_eq!(moved, 0, "sessions that moved when asked through the other replica");
    assert!(pinned.iter().all(|r| r.as_ref().is_ok_and(|(status, _)| *status == 200)));
}
