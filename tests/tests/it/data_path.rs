//! The activator's local-mode data path, end to end with real demo-service processes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, Process, admin_get, metric, wait_until};
use nix::sys::signal::Signal;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_keys_reach_every_replica() {
    let env = Env::new();
    let pods = [
        env.demo("pod-a", "counter-1").await,
        env.demo("pod-b", "counter-1").await,
        env.demo("pod-c", "counter-1").await,
    ];
    let endpoints: Vec<SocketAddr> = pods.iter().map(|p| p.addr("http")).collect();
    env.write_topology(&yaml(&[Service::new("counter").revision("counter-1", 100, &endpoints)]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));

    let mut seen = HashSet::new();
    for _ in 0..30 {
        let reply = client.get("counter.test", "/incr").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(reply.body.starts_with("session=, count="), "{reply:?}");
        seen.insert(reply.pod().to_owned());
    }
    assert_eq!(seen, HashSet::from(["pod-a".into(), "pod-b".into(), "pod-c".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_honoured() {
    let env = Env::new();
    let (one, two) = (env.demo("pod-1", "split-1").await, env.demo("pod-2", "split-2").await);
    env.write_topology(&yaml(&[Service::halves(
        "split",
        ("split-1", one.addr("http")),
        ("split-2", two.addr("http")),
    )]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));

    let mut counts: HashMap<String, usize> = HashMap::new();
    let replies = futures_util::stream::iter(0..1000)
        .map(|_| {
            let client = client.clone();
            async move { client.get("split.test", "/incr").await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for reply in replies {
        assert_eq!(reply.status, 200, "{reply:?}");
        *counts.entry(reply.revision().to_owned()).or_default() += 1;
    }
    for rev in ["split-1", "split-2"] {
        let n = counts.get(rev).copied().unwrap_or(0);
        assert!((400..=600).contains(&n), "{rev} got {n} of 1000: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_responses_stream_chunk_by_chunk() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("stream", &[]).await;
    let client = Client::new(activator.addr("proxy"));

    // The backend needs a minute to finish; the first chunk must arrive long before that.
    let resp =
        client.request(reqwest::Method::GET, "stream.test", "/stream?chunks=3&interval=30s").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("first chunk arrives while the backend is still streaming")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"chunk 0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_without_buffering() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 1024; // 64 MiB
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("echo", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    assert_eq!(client.get("echo.test", "/incr").await.status, 200);
    let (_, peak_before) = activator.memory_kib();

    let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
    let upload = futures_util::stream::iter((0..CHUNKS).map(move |i| Ok::<_, std::io::Error>(chunk(i))));
    let resp = client
        .request(reqwest::Method::POST, "echo.test", "/echo")
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut received = 0usize;
    let mut body = resp.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.expect("echo body streams back intact");
        for (offset, byte) in piece.iter().enumerate() {
            let expected = ((received + offset) / CHUNK % 251) as u8;
            assert_eq!(*byte, expected, "byte {} differs", received + offset);
        }
        received += piece.len();
    }
    assert_eq!(received, CHUNK * CHUNKS);
    let (_, peak_after) = activator.memory_kib();
    let growth_mib = (peak_after.saturating_sub(peak_before)) as f64 / 1024.0;
    eprintln!("activator peak RSS grew by {growth_mib:.1} MiB while echoing 64 MiB");
    assert!(growth_mib < 16.0, "activator peak RSS grew by {growth_mib:.1} MiB for a 64 MiB body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_kept_towards_the_backend() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("h2", &[]).await;
    let proxy = activator.addr("proxy");
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().resolve("h2.test", proxy).build().unwrap();
    let resp = h2.get(format!("http://h2.test:{}/incr/abc", proxy.port())).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-demo-http-version"], "HTTP/2.0");
    assert_eq!(resp.text().await.unwrap(), "session=abc, count=1\n");

    let http1 = Client::new(proxy).get("h2.test", "/incr/abc").await;
    assert_eq!(http1.header("x-demo-http-version"), "HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_round_trip() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("ws", &[]).await;

    let mut request = format!("ws://{}/ws", activator.addr("proxy")).into_client_request().unwrap();
    request.headers_mut().insert("host", "ws.test".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(request).await.expect("upgrade through the activator");
    assert_eq!(resp.headers()["x-demo-pod"], "pod");
    for text in ["hello", "second message"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activator_answers_for_itself_with_clear_status_codes() {
    let env = Env::new();
    let pod = env.demo("pod", "ok-1").await;
    let (_refusing, closed_port) = integration_tests::refusing_addr();
    env.write_topology(&yaml(&[
        Service::new("empty").revision("empty-1", 100, &[]).with(|r| r.timeout_seconds = 1),
        Service::new("dead").revision("dead-1", 100, &[closed_port]).with(|r| r.probe = "none"),
        Service::new("slow").revision("slow-1", 100, &[pod.addr("http")]).with(|r| r.timeout_seconds = 1),
    ]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));

    let unknown = client.get("nobody.test", "/").await;
    // Upstream's body for a request whose Host names no revision, byte for byte.
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (404, "Error getting active endpoint: revision.serving.knative.dev \"\" not found\n")
    );
    let empty = client.get("empty.test", "/").await;
    assert_eq!(
        (empty.status, empty.body.as_str()),
        (504, "activator request timeout"),
        "waits for a pod, then times out"
    );
    let dead = client.get("dead.test", "/").await;
    assert_eq!(dead.status, 502);
    assert_eq!(
        dead.body,
        format!("dial tcp {closed_port}: connect: connection refused\n"),
        "as Go's transport words it"
    );
    let slow = client.get("slow.test", "/slow?delay=20s").await;
    assert_eq!((slow.status, slow.body.as_str()), (504, "activator request timeout"));

    let metrics = Metrics::scrape(activator.addr("admin")).await;
    let count = |rev: &str, code: &str| metrics.value("activator_requests_total", &[("revision", rev), ("code", code)]);
    assert_eq!(count("empty-1", "504"), Some(1.0), "{metrics}");
    assert_eq!(count("dead-1", "502"), Some(1.0));
    assert_eq!(count("slow-1", "504"), Some(1.0));
    assert_eq!(count("", "404"), Some(1.0));
}

/// A topology replaced by rename (as editors and ConfigMap mounts do), or rewritten in place,
/// applies at once, long before the next poll: replicas reading one file change together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_changes_apply_without_waiting_for_the_poll() {
    let env = Env::new();
    let (blue, green) = (env.demo("blue", "app-1").await, env.demo("green", "app-2").await);
    let to = |revision: &str, pod: &Process| yaml(&[Service::new("app").revision(revision, 100, &[pod.addr("http")])]);
    env.write_topology(&to("app-1", &blue));
    let activator = env.activator(&["--topology-poll-interval", "1h"]).await;
    let client = Client::new(activator.addr("proxy"));
    assert_eq!(client.get("app.test", "/incr").await.revision(), "app-1");

    env.write_topology(&to("app-2", &green));
    wait_until(Duration::from_secs(5), "the renamed file applies", || async {
        client.get("app.test", "/incr").await.revision() == "app-2"
    })
    .await;

    std::fs::write(env.topology_path(), to("app-1", &blue)).expect("rewriting the topology in place");
    wait_until(Duration::from_secs(5), "the rewritten file applies", || async {
        client.get("app.test", "/incr").await.revision() == "app-1"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_reloads_while_serving_and_broken_files_are_rejected() {
    let env = Env::new();
    let (blue, green) = (env.demo("blue", "app-1").await, env.demo("green", "app-2").await);
    let split = |a: u32, b: u32| {
        yaml(&[Service::new("app").revision("app-1", a, &[blue.addr("http")]).revision(
            "app-2",
            b,
            &[green.addr("http")],
        )])
    };
    env.write_topology(&split(100, 0));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (client, stop, sent, failed) = (client.clone(), stop.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = client
                    .try_send(client.request(reqwest::Method::GET, "app.test", "/incr"))
                    .await
                    .is_ok_and(|r| r.status == 200);
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    wait_until(Duration::from_secs(5), "load is flowing", || async { sent.load(Ordering::Relaxed) > 20 }).await;
    assert_eq!(client.get("app.test", "/incr").await.revision(), "app-1");

    env.write_topology(&split(0, 100));
    wait_until(Duration::from_secs(1), "the new split applies", || async {
        client.get("app.test", "/incr").await.revision() == "app-2"
    })
    .await;
    for _ in 0..20 {
        assert_eq!(client.get("app.test", "/incr").await.revision(), "app-2");
    }

    env.write_topology("services:\n  - name: app\n    traffic: [\n");
    wait_until(Duration::from_secs(5), "the broken file is rejected", || async {
        activator.logs().contains("topology file rejected")
    })
    .await;
    let logs = activator.logs();
    let rejection = logs.lines().find(|l| l.contains("topology file rejected")).unwrap();
    assert!(rejection.contains("line 4 column 1"), "the log names the place: {rejection}");
    assert_eq!(
        metric(activator.addr("admin"), "activator_topology_reloads_total", &[("result", "rejected")]).await,
        Some(1.0)
    );
    for _ in 0..20 {
        assert_eq!(client.get("app.test", "/incr").await.revision(), "app-2", "the last good topology serves");
    }

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "of {} requests during reloads", sent.load(Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_new_requests_then_exits_zero() {
    let env = Env::new();
    let (_pod, mut activator) = env.one_pod_service("drain", &["--drain-period", "3s", "--grace-timeout", "30s"]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);

    // Outlives the drain period, so the exit has to wait for it.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.get("drain.test", "/slow?delay=4s").await })
    };
    wait_until(Duration::from_secs(10), "the slow request is in flight", || async {
        metric(admin, "activator_in_flight_requests", &[("revision", "drain-1")]).await == Some(1.0)
    })
    .await;

    activator.signal(Signal::SIGTERM);
    wait_until(Duration::from_secs(1), "readiness fails", || async { admin_get(admin, "/readyz").await.0 == 503 })
        .await;
    let kubelet = client.get_with("drain.test", "/", &[("user-agent", "kube-probe/1.33")]).await;
    assert_eq!(kubelet.status, 500, "{kubelet:?}");
    let during_drain = Client::new(activator.addr("proxy")).get("drain.test", "/incr").await;
    assert_eq!(during_drain.status, 200, "new requests are served during the drain period");

    let slow = slow.await.unwrap();
    assert_eq!((slow.status, slow.body.as_str()), (200, "slow done\n"));
    let status = activator.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}");
}

/// Without `--grace-timeout` the drain is unbounded, as upstream's `Shutdown`: a response still
/// streaming when the drain period ends is let finish, however long past it, and only then does
/// the activator exit (the pod's terminationGracePeriodSeconds is the bound that remains).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_at_sigterm_finishes_before_the_exit() {
    let env = Env::new();
    let (_pod, mut activator) = env.one_pod_service("stream", &["--drain-period", "500ms"]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let streaming = {
        let client = client.clone();
        tokio::spawn(async move { client.get("stream.test", "/stream?chunks=25&interval=120ms").await })
    };
    wait_until(Duration::from_secs(10), "the stream is in flight", || async {
        metric(admin, "activator_in_flight_requests", &[("revision", "stream-1")]).await == Some(1.0)
    })
    .await;
    activator.signal(Signal::SIGTERM);
    let streamed = streaming.await.unwrap();
    let expected: String = (0..25).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!((streamed.status, streamed.body), (200, expected), "every chunk, though the drain ended long before");
    let status = activator.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_frees_its_pods_slot() {
    let env = Env::new();
    let pod = env.demo("pod", "one-1").await;
    env.write_topology(&yaml(&[Service::new("one")
        .revision("one-1", 100, &[pod.addr("http")])
        .with(|r| (r.container_concurrency, r.timeout_seconds) = (1, 30))]));
    let activator = env.activator(&["--send-timeout", "1s"]).await;
    let proxy = activator.addr("proxy");

    // Asks for an endless response and never reads it: once the buffers between are full, the
    // activator cannot send, and the pod's only slot must not stay taken.
    let mut stalled = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let ask = "GET /stream?chunks=100000000&interval=0s HTTP/1.1\r\nHost: one.test\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stalled, ask.as_bytes()).await.unwrap();
    let admin = activator.addr("admin");
    wait_until(Duration::from_secs(10), "the stalled request holds the slot", || async {
        metric(admin, "activator_in_flight_requests", &[("revision", "one-1")]).await == Some(1.0)
    })
    .await;
    let next = Client::new(proxy).get("one.test", "/incr").await;
    assert_eq!((next.status, next.body.as_str()), (200, "session=, count=1\n"), "{next:?}");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_larger_than_the_queue_byte_bound_wait_for_a_pod() {
    const UPLOAD: usize = 1 << 20;
    let env = Env::new();
    env.write_topology(&yaml(&[Service::new("up").revision("up-1", 100, &[])]));
    let activator = env.activator(&["--max-queue-bytes", "131072"]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    // A declared 1 MiB body: the activator holds at most what the connection read ahead of it.
    let upload = {
        let client = client.clone();
        tokio::spawn(async move {
            let req = client.request(reqwest::Method::POST, "up.test", "/echo").body(vec![b'u'; UPLOAD]);
            client.send(req).await
        })
    };
    wait_until(Duration::from_secs(10), "the upload waits for a pod", || async {
        metric(admin, "activator_queued_requests", &[("revision", "up-1")]).await == Some(1.0) || upload.is_finished()
    })
    .await;
    assert!(!upload.is_finished(), "answered at once instead of waiting: {:?}", upload.await.unwrap());
    let pod = env.demo("pod", "up-1").await;
    env.write_topology(&yaml(&[Service::new("up").revision("up-1", 100, &[pod.addr("http")])]));
    let reply = upload.await.unwrap();
    assert_eq!((reply.status, reply.body.len()), (200, UPLOAD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_host_ports_reuse_one_pod_connection() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("reuse", &[]).await;
    let client = Client::new(activator.addr("proxy"));
    let mut peers = HashSet::new();
    for port in 1..=200 {
        let reply = client.get(&format!("reuse.test:{port}"), "/incr").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        peers.insert(reply.header("x-demo-peer").to_owned());
    }
    assert_eq!(peers.len(), 1, "200 requests one after another need one pod connection: {peers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_trailers_reach_the_client() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("tr", &[]).await;
    let request = "GET /trailers HTTP/1.1\r\nHost: tr.test\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    let raw = integration_tests::raw_exchange(activator.addr("proxy"), request, Duration::from_secs(10)).await;
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{raw}");
    assert!(body.contains("payload") && body.contains("0\r\nx-checksum: abc123\r\n"), "the trailer is sent: {raw:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_sees_clean_forwarded_headers() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("hd", &[]).await;
    // An h2c upgrade offer goes on as plain HTTP/1.1, and X-Forwarded-For keeps both lines.
    let request = "GET /headers HTTP/1.1\r\nHost: hd.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
                   Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nX-Forwarded-For: 1.1.1.1\r\n\
                   X-Forwarded-For: 2.2.2.2\r\nKnative-Serving-Namespace: default\r\nKnative-Serving-Revision: hd-1\r\n\r\n";
    let raw = integration_tests::raw_exchange(activator.addr("proxy"), request, Duration::from_secs(10)).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let seen = raw.split_once("\r\n\r\n").unwrap().1.to_ascii_lowercase();
    for gone in ["upgrade:", "http2-settings:", "knative-serving-revision:", "knative-serving-namespace:"] {
        assert!(!seen.contains(gone), "{gone} reached the pod:\n{seen}");
    }
    for kept in ["host: hd.test", "x-forwarded-for: 1.1.1.1, 2.2.2.2, 127.0.0.1", "k-proxy-request: activator"] {
        assert!(seen.contains(kept), "{kept} missing:\n{seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_switch_names_the_protocol_the_pod_chose() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("ws", &[]).await;
    let mut stream = tokio::net::TcpStream::connect(activator.addr("proxy")).await.unwrap();
    let offer = "GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: chat/2, websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stream, offer.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket\r\n"), "the pod's choice, not the offer: {head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_keep_going_through_the_drain_until_they_close() {
    let env = Env::new();
    let (_pod, mut activator) = env.one_pod_service("ws", &["--drain-period", "1s", "--grace-timeout", "30s"]).await;
    let proxy = activator.addr("proxy");
    let mut request = format!("ws://{proxy}/ws").into_client_request().unwrap();
    request.headers_mut().insert("host", "ws.test".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("upgrade through the activator");

    activator.signal(Signal::SIGTERM);
    wait_until(Duration::from_secs(10), "the activator stops accepting", || async {
        tokio::net::TcpStream::connect(proxy).await.is_err()
    })
    .await;
    for text in ["still", "here"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed, Message::text(text), "the websocket outlives the drain period");
    }
    ws.close(None).await.unwrap();
    drop(ws);
    let status = activator.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_limit_clients_wait_in_the_backlog() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("cap", &["--max-connections", "2"]).await;
    let proxy = activator.addr("proxy");
    let (first, second) = (Client::new(proxy), Client::new(proxy));
    assert_eq!(first.get("cap.test", "/incr").await.status, 200);
    assert_eq!(second.get("cap.test", "/incr").await.status, 200);
    let third = tokio::spawn(async move { Client::new(proxy).get("cap.test", "/incr").await });
    wait_until(Duration::from_secs(10), "the limit is reported", || async {
        activator.logs().contains("connection limit reached")
    })
    .await;
    let text = Metrics::scrape(activator.addr("admin")).await;
    assert_eq!(text.value("activator_connection_limit_reached_total", &[]), Some(1.0));
    assert_eq!(text.value("activator_open_connections", &[]), Some(2.0));
    assert!(!third.is_finished(), "a third connection was served beyond the limit");
    drop(first);
    assert_eq!(third.await.unwrap().status, 200, "served once a connection closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_container_concurrency_keeps_requests_in_flight_and_waiting() {
    let env = Env::new();
    let pod = env.demo("pod", "cc-1").await;
    let with_cc = |cc: u32| {
        yaml(&[Service::new("cc").revision("cc-1", 100, &[pod.addr("http")]).with(|r| {
            r.container_concurrency = cc;
            r.timeout_seconds = 30;
        })])
    };
    env.write_topology(&with_cc(1));
    let activator = env.activator(&[]).await;
    let (client, admin) = (Client::new(activator.addr("proxy")), activator.addr("admin"));
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.get("cc.test", "/slow?delay=3s").await })
    };
    let queued =
        |n: f64| async move { metric(admin, "activator_queued_requests", &[("revision", "cc-1")]).await == Some(n) };
    wait_until(Duration::from_secs(10), "the slow request holds the only slot", || async {
        metric(admin, "activator_in_flight_requests", &[("revision", "cc-1")]).await == Some(1.0)
    })
    .await;
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.get("cc.test", "/incr").await })
    };
    wait_until(Duration::from_secs(10), "the second request waits", || queued(1.0)).await;
    env.reload(&activator, &with_cc(2)).await;
    let second = waiting.await.unwrap();
    assert_eq!(second.status, 200, "the waiter is served by the room the change made: {second:?}");
    assert!(!in_flight.is_finished(), "served while the slow one was still in flight");
    assert_eq!(in_flight.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let env = Env::new();
    let (_pod, activator) = env.one_pod_service("idle", &["--idle-timeout", "1s"]).await;
    let proxy = activator.addr("proxy");
    // A connection that never says which protocol it speaks is closed.
    let answer = integration_tests::raw_exchange(proxy, "", Duration::from_secs(20)).await;
    assert!(answer.is_empty());
    // An HTTP/2 client that keeps its connection open with no stream is told to go away.
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (send_request, connection) = h2::client::handshake(tcp).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), connection).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection was not closed");
    drop(send_request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_byte_is_a_504_and_frees_the_slot() {
    let env = Env::new();
    let pod = env.demo("pod", "late-1").await;
    env.write_topology(&yaml(&[Service::new("late").revision("late-1", 100, &[pod.addr("http")]).with(|r| {
        (r.container_concurrency, r.timeout_seconds, r.response_start_timeout_seconds) = (1, 60, Some(1));
    })]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    let late = client.get("late.test", "/slow?delay=30s").await;
    assert_eq!((late.status, late.body.as_str()), (504, "activator request timeout"));
    assert_eq!(client.get("late.test", "/incr").await.status, 200, "the pod's only slot was given back");
}

/// Upstream's timeout handler (`pkg/http/handler/timeout.go` `ServeHTTP`) starts the
/// response-start and idle timers only when they are `> 0`: 0 is off. A timeout at the int64
/// limit is clamped, never added to the clock as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_huge_timeouts_serve_normally() {
    let env = Env::new();
    let pod = env.demo("pod", "limits-1").await;
    env.write_topology(&yaml(&[Service::new("limits").revision("limits-1", 100, &[pod.addr("http")]).with(|r| {
        r.timeout_seconds = i64::MAX as u64;
        (r.response_start_timeout_seconds, r.idle_timeout_seconds) = (Some(0), Some(0));
    })]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    for i in 1..=3 {
        let reply = client.get("limits.test", "/incr?session_id=z").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, format!("session=z, count={i}\n").as_str()));
    }
    let streamed = client.get("limits.test", "/stream?chunks=2&interval=50ms").await;
    assert_eq!((streamed.status, streamed.body.as_str()), (200, "chunk 0\nchunk 1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_pauses_too_long_is_cut() {
    let env = Env::new();
    let pod = env.demo("pod", "idle-1").await;
    env.write_topology(&yaml(&[Service::new("idle").revision("idle-1", 100, &[pod.addr("http")]).with(|r| {
        (r.container_concurrency, r.idle_timeout_seconds) = (1, Some(1));
    })]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    let resp = client.request(reqwest::Method::GET, "idle.test", "/stream?chunks=3&interval=5s").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    assert_eq!(&body.next().await.unwrap().unwrap()[..], b"chunk 0\n");
    let next = tokio::time::timeout(Duration::from_secs(20), body.next())
        .await
        .expect("the cut comes before the pod's next chunk");
    let cut = next.as_ref().is_none_or(|chunk| chunk.is_err());
    assert!(cut, "the body is cut, not continued: {next:?}");
    assert_eq!(client.get("idle.test", "/incr").await.status, 200, "the pod's only slot was given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revision_timeout_runs_from_arrival_cuts_streams_and_spares_websockets() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let env = Env::new();
    let pod = env.demo("pod", "capped-1").await;
    env.write_topology(&yaml(&[Service::new("capped").revision("capped-1", 100, &[pod.addr("http")]).with(|r| {
        (r.container_concurrency, r.timeout_seconds) = (1, TIMEOUT.as_secs());
    })]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));

    // A response still streaming when the timeout ends is cut, and its slot freed.
    let started = std::time::Instant::now();
    let resp = client.request(reqwest::Method::GET, "capped.test", "/stream?chunks=10&interval=500ms").send().await;
    let mut body = resp.unwrap().bytes_stream();
    let (mut chunks, mut cut) = (0, false);
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), body.next()).await.expect("cut, not stalled")
    {
        match chunk {
            Ok(_) => chunks += 1,
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(cut || chunks < 10, "the stream outlived the timeout: {chunks} chunks");
    assert!(started.elapsed() < Duration::from_secs(5), "cut at the timeout, not at the stream's end");
    assert_eq!(client.get("capped.test", "/incr").await.status, 200, "the pod's only slot was given back");

    // Time spent queued counts: the second request waits 1.5 s for the only slot, and its pod
    // would need 1 s more.
    let holder = tokio::spawn({
        let client = client.clone();
        async move { client.get("capped.test", "/slow?delay=1500ms").await }
    });
    wait_until(Duration::from_secs(10), "the slot is taken", || async {
        metric(activator.addr("admin"), "activator_in_flight_requests", &[("revision", "capped-1")]).await == Some(1.0)
    })
    .await;
    let queued = client.get("capped.test", "/slow?delay=1s").await;
    assert_eq!((queued.status, queued.body.as_str()), (504, "activator request timeout"));
    assert_eq!(holder.await.unwrap().status, 200);

    // A websocket is not cut: it echoes for longer than the timeout.
    let mut request = format!("ws://{}/ws", activator.addr("proxy")).into_client_request().unwrap();
    request.headers_mut().insert("host", "capped.test".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("upgrade through the activator");
    let opened = std::time::Instant::now();
    let mut sent = 0;
    while opened.elapsed() < TIMEOUT + Duration::from_secs(1) {
        let text = format!("message {sent}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed, Message::text(text), "the websocket outlives the revision timeout");
        sent += 1;
    }
}
