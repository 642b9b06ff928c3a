//! gRPC session affinity: a tonic client through the activator to demo-service's
//! `demo.v1.Counter`, the session id in gRPC metadata (`k-session`, an HTTP/2 header), over h2c
//! on real sockets. Unary calls and a bidirectional stream keep one pod; `grpc-status` trailers
//! arrive; a call to a revision at zero waits for its pod and succeeds.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use demo_service::pb::counter_client::CounterClient;
use demo_service::pb::{Count, IncrRequest};
use integration_tests::topology::{Service, yaml};
use integration_tests::{Env, addrs, demo_command};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// A client of the activator's data port, with the `Host` of service `host`.
async fn client(proxy: SocketAddr, host: &str) -> CounterClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .expect("a valid URI")
        .origin(format!("http://{host}").parse().expect("a valid origin"))
        .connect()
        .await
        .expect("connecting to the activator");
    CounterClient::new(channel)
}

fn with_session<T>(message: T, session: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("k-session", MetadataValue::try_from(session).expect("an ASCII id"));
    req
}

async fn incr(client: &mut CounterClient<Channel>, session: &str) -> Count {
    let req = with_session(IncrRequest { session: session.to_owned() }, session);
    client.incr(req).await.expect("the call succeeds").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_and_a_stream_of_one_session_keep_one_pod() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    let topology = |n: usize| yaml(&[Service::new("counter").revision("counter-1", 100, &addrs(&pods[..n]))]);
    env.write_topology(&topology(2));
    let activator = env.activator(&[]).await;
    let mut client = client(activator.addr("proxy"), "counter.test").await;

    // Unary: one pod counts 1, 2, 3; sessions spread over the pods.
    let first = incr(&mut client, "alice").await;
    for n in 2..=3 {
        let again = incr(&mut client, "alice").await;
        assert_eq!((again.count, &again.pod), (n, &first.pod), "call {n}");
    }
    let spread: HashSet<String> = futures_util::future::join_all((0..20).map(|i| {
        let mut client = client.clone();
        async move { incr(&mut client, &format!("user-{i}")).await.pod }
    }))
    .await
    .into_iter()
    .collect();
    assert_eq!(spread.len(), 2, "new sessions are balanced: {spread:?}");

    // A status set by the pod arrives in the `grpc-status` trailer.
    let empty = client.incr(with_session(IncrRequest::default(), "bob")).await.expect_err("an empty session");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument, "{empty:?}");

    // A bidirectional stream stays on its pod, and open across a topology reload.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tokio_stream_from(rx);
    let mut inbound = client.stream(with_session(outbound, "carol")).await.expect("the stream opens").into_inner();
    let mut pods_seen = HashSet::new();
    for n in 1..=5u64 {
        if n == 3 {
            env.reload(&activator, &topology(3)).await;
        }
        tx.send(IncrRequest { session: "carol".into() }).await.expect("the stream is open");
        let count = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("an answer in time")
            .expect("no error")
            .expect("a message");
        assert_eq!(count.count, n);
        pods_seen.insert(count.pod);
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.expect("the stream ends");
    assert!(matches!(end, Ok(None)), "ends with grpc-status 0: {end:?}");
    assert_eq!(pods_seen.len(), 1);
    // The session's next unary call goes where its stream went.
    let after = incr(&mut client, "carol").await;
    assert_eq!((after.count, pods_seen.contains(&after.pod)), (6, true));
}

/// A `Stream` of what the channel receives, for tonic's streaming request.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<IncrRequest>,
) -> impl futures_util::Stream<Item = IncrRequest> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_to_a_revision_at_zero_waits_and_succeeds() {
    let env = Env::new();
    env.write_topology(&yaml(&[Service::new("cold").revision("cold-1", 100, &[])]));
    let command = demo_command("--startup-delay 500ms");
    let shim = env.shim(&["--command", &command, "--scale-to-zero-grace", "60s"]).await;
    let activator = env.activator_with_shim(&shim, &[]).await;
    let mut client = client(activator.addr("proxy"), "cold.test").await;
    let first = tokio::time::timeout(Duration::from_secs(30), incr(&mut client, "dave")).await.expect("answered");
    assert_eq!((first.count, first.revision.as_str()), (1, "cold-1"));
    assert_eq!(incr(&mut client, "dave").await.count, 2);
}

/// A burst of gRPC calls (no content-length, so each could send a whole stream window) to a
/// revision at zero: they wait on a handful of connections, each charged what its connection's
/// window lets arrive, not a window per call, so the 2,000 fit the queue's byte budget and all
/// succeed once the pod comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_grpc_calls_wait_for_a_cold_revision_and_all_succeed() {
    integration_tests::raise_open_files_limit();
    let env = Env::new();
    env.write_topology(&yaml(&[Service::new("cold").revision("cold-1", 100, &[])]));
    let command = demo_command("--startup-delay 1s");
    let shim = env.shim(&["--command", &command, "--scale-to-zero-grace", "60s"]).await;
    let activator = env.activator_with_shim(&shim, &[]).await;
    // The activator allows 250 streams a connection, as Go's server: eight clients hold 2,000.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(client(activator.addr("proxy"), "cold.test").await);
    }
    let calls = (0..2_000).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        async move { client.incr(with_session(IncrRequest { session: format!("s{i}") }, &format!("s{i}"))).await }
    });
    let answers = tokio::time::timeout(Duration::from_secs(120), futures_util::future::join_all(calls))
        .await
        .expect("answered in time");
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of 2,000 failed, e.g. {:?}", failed.len(), failed.first());
    assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|c| c.get_ref().count == 1)));
}

/// As Go's transport: a pod that allows 10 concurrent streams a connection gets a second
/// connection while 20 calls are open, rather than 10 of them waiting in the activator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_at_its_stream_limit_gets_a_second_connection() {
    let env = Env::new();
    let pod = env.demo_with("narrow", "narrow-1", &["--h2-max-streams", "10"]).await;
    env.write_topology(&yaml(&[Service::new("narrow").revision("narrow-1", 100, &[pod.addr("http")])]));
    let activator = env.activator(&[]).await;
    let client = client(activator.addr("proxy"), "narrow.test").await;
    let mut open = Vec::new();
    let mut peers = HashSet::new();
    for i in 0..20 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut client = client.clone();
        let session = format!("open-{i}");
        let stream =
            tokio::time::timeout(Duration::from_secs(10), client.stream(with_session(tokio_stream_from(rx), &session)))
                .await
                .unwrap_or_else(|_| panic!("stream {i} opened: its headers did not wait for another to end"))
                .expect("the stream opens");
        let peer = stream.metadata().get("x-demo-peer").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        peers.insert(peer);
        open.push((tx, stream));
    }
    assert_eq!(peers.len(), 2, "twenty open streams, ten a connection: {peers:?}");
    // Each stream still works.
    for (i, (tx, stream)) in open.iter_mut().enumerate() {
        tx.send(IncrRequest { session: format!("open-{i}") }).await.unwrap();
        let count = stream.get_mut().message().await.expect("no error").expect("a message");
        assert_eq!(count.count, 1);
    }
}
