//! Scale from zero: the activator holding requests for a revision with no ready pod, the stat
//! protocol to the autoscaler, and autoscaler-shim starting pods, all as real processes.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Reply, admin_get, metric, raise_open_files_limit, wait_until};

async fn queued(admin: SocketAddr, revision: &str) -> Option<f64> {
    metric(admin, "activator_queued_requests", &[("revision", revision)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_zero_is_held_and_released_when_a_pod_is_ready() {
    raise_open_files_limit();
    let env = Env::new();
    env.write_topology(&yaml(&[Service::new("cold").revision("cold-1", 100, &[])]));
    let command = integration_tests::demo_command("--startup-delay 1s");
    let shim = env.shim(&["--command", &command, "--scale-to-zero-grace", "60s"]).await;
    let activator = env.activator_with_shim(&shim, &[]).await;
    let client = Client::new(activator.addr("proxy"));
    let (_, idle_peak) = activator.memory_kib();

    let burst = futures_util::stream::iter(0..1000)
        .map(|i| {
            let client = client.clone();
            async move {
                let req = client.request(reqwest::Method::GET, "cold.test", &format!("/incr?session_id=u{i}"));
                client.try_send(req).await
            }
        })
        .buffer_unordered(1000)
        .collect::<Vec<reqwest::Result<Reply>>>()
        .await;
    let (_, burst_peak) = activator.memory_kib();
    eprintln!("activator peak RSS: {} KiB idle, {} KiB after 1000 held requests", idle_peak, burst_peak);

    let mut statuses = std::collections::BTreeMap::new();
    for reply in &burst {
        let status = reply.as_ref().map_or(0, |r| r.status);
        *statuses.entry(status).or_insert(0) += 1;
    }
    let failures: Vec<_> = burst.iter().flatten().filter(|r| r.status != 200).map(|r| r.body.clone()).take(3).collect();
    assert_eq!(statuses, [(200, 1000)].into(), "status → count (0: no answer): {failures:?}");
    assert!(burst.iter().flatten().all(|r| r.body.ends_with("count=1\n") && r.revision() == "cold-1"));
    assert_eq!(queued(activator.addr("admin"), "cold-1").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_queue_bound_requests_get_503_at_once() {
    let env = Env::new();
    env.write_topology(&yaml(&[Service::new("cold").revision("cold-1", 100, &[])]));
    let activator = env.activator(&["--max-queue", "5"]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));

    let requests: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get("cold.test", "/incr").await })
        })
        .collect();
    // The excess is answered while no pod exists at all.
    wait_until(Duration::from_secs(10), "five wait and fifteen are refused", || async {
        queued(admin, "cold-1").await == Some(5.0) && requests.iter().filter(|r| r.is_finished()).count() == 15
    })
    .await;
    let pod = env.demo("pod", "cold-1").await;
    env.write_topology(&yaml(&[Service::new("cold").revision("cold-1", 100, &[pod.addr("http")])]));

    let mut answers = std::collections::BTreeMap::new();
    for request in requests {
        let reply = request.await.unwrap();
        if reply.status == 503 {
            assert_eq!(reply.header("retry-after"), "1");
            assert_eq!(reply.body, "pending request queue full\n", "upstream's breaker's text");
        }
        *answers.entry(reply.status).or_insert(0) += 1;
    }
    assert_eq!(answers, [(200, 5), (503, 15)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_never_becomes_ready_ends_in_504_and_an_empty_queue() {
    let env = Env::new();
    let pod = env.demo_with("never", "stuck-1", &["--startup-delay", "1h"]).await;
    env.write_topology(&yaml(&[Service::new("stuck")
        .revision("stuck-1", 100, &[pod.addr("http")])
        .with(|r| r.timeout_seconds = 1)]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    let reply = client.get("stuck.test", "/incr").await;
    assert_eq!((reply.status, reply.body.as_str()), (504, "activator request timeout"));
    assert_eq!(queued(activator.addr("admin"), "stuck-1").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_decodes_a_poke_then_reports_with_the_first_report_adjustment() {
    let env = Env::new();
    let pod = env.demo("pod", "warm-1").await;
    env.write_topology(&yaml(&[Service::new("warm").revision("warm-1", 100, &[pod.addr("http")])]));
    // The revision has its own pod, so the shim's attempt to start one is refused on purpose.
    let shim = env.shim(&["--print-stats", "--command", "false"]).await;
    let activator = env.activator_with_shim(&shim, &["--pod-name", "activator-7"]).await;
    let client = Client::new(activator.addr("proxy"));
    let stats = || shim.stdout().into_iter().filter(|l| l.starts_with("stat ")).collect::<Vec<_>>();

    assert_eq!(client.get("warm.test", "/incr").await.status, 200);
    // Poke; first report (the poked request subtracted); final zero report, after which the idle
    // revision is no longer tracked.
    wait_until(Duration::from_secs(10), "the poke and two reports arrive", || async {
        stats().iter().filter(|l| l.ends_with("concurrency=0 requests=0")).count() >= 2
    })
    .await;
    let seen = stats();
    assert_eq!(seen[0], "stat default/warm-1 pod=activator-7 concurrency=1 requests=1", "a poke first: {seen:?}");
    assert!(
        seen[1].starts_with("stat default/warm-1 pod=activator-7 concurrency=0 requests=0"),
        "the first report subtracts the poked request: {seen:?}"
    );

    // Idle: the revision is no longer tracked, so the next request pokes again.
    let before = stats().len();
    assert_eq!(client.get("warm.test", "/incr").await.status, 200);
    wait_until(Duration::from_secs(10), "a new poke", || async {
        stats()[before..].iter().any(|l| l.ends_with("concurrency=1 requests=1"))
    })
    .await;
    assert_eq!(metric(activator.addr("admin"), "activator_autoscaler_pokes_total", &[]).await, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_autoscaler_does_not_stop_ready_pods_serving() {
    let env = Env::new();
    let pod = env.demo("pod", "app-1").await;
    env.write_topology(&yaml(&[Service::new("app").revision("app-1", 100, &[pod.addr("http")])]));
    let (refusing, nobody) = integration_tests::refusing_addr();
    let url = format!("ws://{nobody}");
    let activator = env.activator(&["--autoscaler-url", &url]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));

    for _ in 0..10 {
        assert_eq!(client.get("app.test", "/incr").await.status, 200);
    }
    let (status, body) = admin_get(admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "connection has not yet been established\n"));

    // The autoscaler arrives at the address the activator keeps trying.
    drop(refusing);
    let listen = nobody.to_string();
    let _shim = env.shim(&["--listen", &listen, "--command", "false"]).await;
    wait_until(Duration::from_secs(15), "the activator reconnects", || async {
        metric(admin, "activator_autoscaler_connected", &[]).await == Some(1.0)
            && admin_get(admin, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(client.get("app.test", "/incr").await.status, 200);
}
