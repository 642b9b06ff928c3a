//! demo-service: a stateful per-session counter that stands in for a user's revision pod.
//!
//! It owns nothing but its own counters: each process counts requests per session id, so a test
//! or a person can see from `session=abc, count=N` whether a session kept reaching the same pod.
//! Every response names the pod and revision that answered (`X-Demo-Pod`, `X-Demo-Revision`) and
//! the HTTP version it was reached with (`X-Demo-Http-Version`). The gRPC service
//! `demo.v1.Counter` (`grpc`) counts the same sessions on the same port.

mod grpc;
mod serve;
mod session_end;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt, stream};
use http_body::Frame;
use http_body_util::StreamBody;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

#[derive(Parser, Debug)]
#[command(version, about = "Stateful per-session counter used by the affinity-activator demo and tests")]
struct Args {
    /// Address to listen on; port 0 picks a free port. The bound address is printed on stdout
    /// as `listening http <ip:port>`.
    #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Pod name reported in `X-Demo-Pod`. Default: the host name, which in Kubernetes is the
    /// pod's name.
    #[arg(long, env = "DEMO_POD")]
    pod: Option<String>,
    /// Revision name reported in `X-Demo-Revision`. Default: `K_REVISION`, which Knative sets.
    #[arg(long, env = "DEMO_REVISION")]
    revision: Option<String>,
    /// How long after start `/healthz` and the queue probe keep answering 503 (a cold start).
    #[arg(long, env = "DEMO_STARTUP_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    startup_delay: Duration,
    /// A TLS listener with the same service, standing in for queue-proxy's 8112 under Knative's
    /// system-internal TLS; printed as `listening https <ip:port>`. Needs `--tls-cert` and
    /// `--tls-key` (PEM).
    #[arg(long, env = "DEMO_TLS_LISTEN", requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<SocketAddr>,
    #[arg(long, env = "DEMO_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "DEMO_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`);
    /// default hyper's.
    #[arg(long, env = "DEMO_H2_MAX_STREAMS")]
    h2_max_streams: Option<u32>,
    /// The activator's `--session-end-keys`: session ends not signed with one of them are
    /// refused with 401, as a service that checks them would.
    #[arg(long, env = "DEMO_SESSION_END_KEYS")]
    session_end_keys: Option<std::path::PathBuf>,
}

struct Demo {
    pod: HeaderValue,
    revision: HeaderValue,
    ready: AtomicBool,
    counts: Mutex<HashMap<String, u64>>,
    /// `<session> <reason>` for each session the activator said ended, in order.
    ended: Mutex<Vec<String>>,
    /// Checks that a session end came from the activator, with `--session-end-keys`.
    end_verifier: Option<session_end::Verifier>,
    /// Requests `/slow` has started, and those still waiting.
    slow_started: AtomicUsize,
    slow_waiting: AtomicUsize,
}

type Shared = Arc<Demo>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let demo = Arc::new(Demo {
        pod: HeaderValue::from_str(&args.pod.unwrap_or_else(host_name))
            .context("--pod must be a valid header value")?,
        revision: HeaderValue::from_str(
            &args.revision.or_else(|| std::env::var("K_REVISION").ok()).unwrap_or_else(|| "demo-00001".into()),
        )
        .context("--revision must be a valid header value")?,
        ready: AtomicBool::new(args.startup_delay.is_zero()),
        counts: Mutex::new(HashMap::new()),
        ended: Mutex::new(Vec::new()),
        end_verifier: args.session_end_keys.as_deref().map(session_end::Verifier::from_file).transpose()?,
        slow_started: AtomicUsize::new(0),
        slow_waiting: AtomicUsize::new(0),
    });
    if !args.startup_delay.is_zero() {
        let demo = demo.clone();
        tokio::spawn(async move {
            tokio::time::sleep(args.startup_delay).await;
            demo.ready.store(true, Ordering::SeqCst);
            tracing::info!("ready");
        });
    }

    let app = Router::new()
        .route("/incr", get(incr_query))
        .route("/incr/{id}", get(incr_path))
        .route("/healthz", get(healthz))
        .route("/stream", get(stream_chunks))
        .route("/slow", any(slow))
        .route("/slow/stats", get(slow_stats))
        .route("/echo", any(echo))
        .route("/ws", get(websocket_echo))
        .route("/headers", any(headers))
        .route("/trailers", get(with_trailers))
        .route("/session/end", post(session_end))
        .route("/v1/chat/completions", post(chat_completion))
        .route("/session/ends", get(session_ends))
        .with_state(demo.clone())
        .merge(tonic::service::Routes::new(grpc::Grpc::server(demo.clone())).into_axum_router())
        // Every answer, gRPC's included, says where it landed.
        .layer(middleware::from_fn_with_state(demo, queue_probe_and_identity));

    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    println!("listening http {}", listener.local_addr()?);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopped = |mut stopping: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let mut servers = Vec::new();
    if let (Some(addr), Some(cert), Some(key)) = (args.tls_listen, &args.tls_cert, &args.tls_key) {
        let acceptor = serve::acceptor(cert, key)?;
        let tls_listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        println!("listening https {}", tls_listener.local_addr()?);
        let serving =
            serve::serve(tls_listener, Some(acceptor), app.clone(), args.h2_max_streams, stopped(stopping.clone()));
        servers.push(tokio::spawn(serving));
    }
    servers.push(tokio::spawn(serve::serve(listener, None, app, args.h2_max_streams, stopped(stopping))));
    shutdown_signal().await;
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on unix");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Answers Knative's queue-proxy readiness probe and stamps every response with where it landed.
async fn queue_probe_and_identity(State(demo): State<Shared>, req: Request, next: Next) -> Response {
    let version = format!("{:?}", req.version());
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| *addr);
    let mut resp = match req.headers().get("k-network-probe") {
        Some(v) if v == "queue" => {
            if demo.ready.load(Ordering::SeqCst) {
                (StatusCode::OK, "queue").into_response()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
            }
        }
        _ => next.run(req).await,
    };
    let headers = resp.headers_mut();
    headers.insert("x-demo-pod", demo.pod.clone());
    headers.insert("x-demo-revision", demo.revision.clone());
    if let Ok(v) = HeaderValue::from_str(&version) {
        headers.insert("x-demo-http-version", v);
    }
    // The client end of the connection the request came on: a proxy reusing connections shows
    // few distinct peers.
    if let Some(v) = peer.and_then(|p| HeaderValue::from_str(&p.to_string()).ok()) {
        headers.insert("x-demo-peer", v);
    }
    resp
}

/// The request's headers as `name: value` lines, to see what a proxy forwarded.
async fn headers(req: Request) -> String {
    req.headers().iter().map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()))).collect()
}

/// A chunked body followed by a trailer, announced in `Trailer` as HTTP/1.1 requires.
async fn with_trailers() -> Response {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
    let frames = stream::iter([
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"payload\n"))),
        Ok(Frame::trailers(trailers)),
    ]);
    Response::builder()
        .header(header::TRAILER, "x-checksum")
        .body(Body::new(StreamBody::new(frames)))
        .expect("static response parts are valid")
}

/// Counts one more request of session `id` on this pod.
fn bump(demo: &Demo, id: &str) -> u64 {
    let mut counts = demo.counts.lock().unwrap_or_else(|e| e.into_inner());
    let n = counts.entry(id.to_owned()).or_insert(0);
    *n += 1;
    *n
}

/// The activator's call when a session pinned here ended (`sticky-session-end-path`): the
/// session's count is dropped, as a stateful service frees what it keeps for a session. With
/// `--session-end-keys` an end the activator did not sign is refused and changes nothing.
async fn session_end(State(demo): State<Shared>, headers: axum::http::HeaderMap) -> (StatusCode, String) {
    let field = |name: &str| headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let (Some(session), reason) = (field("k-session"), field("k-session-end").unwrap_or_default()) else {
        return (StatusCode::BAD_REQUEST, "no k-session\n".into());
    };
    if let Some(verifier) = &demo.end_verifier
        && let Err(why) = verifier.check(&headers, &session, &reason)
    {
        tracing::warn!(%session, why, "a session end refused");
        return (StatusCode::UNAUTHORIZED, format!("not the activator's session end: {why}\n"));
    }
    demo.counts.lock().unwrap().remove(&session);
    demo.ended.lock().unwrap().push(format!("{session} {reason}"));
    (StatusCode::NO_CONTENT, String::new())
}

/// An OpenAI-compatible chat completion that reads the request as it streams in, holding none
/// of it, and answers which pod heard how many bytes.
async fn chat_completion(State(demo): State<Shared>, req: Request) -> Response {
    let mut body = req.into_body().into_data_stream();
    let mut bytes = 0usize;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => bytes += chunk.len(),
            Err(e) => return (StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")).into_response(),
        }
    }
    let pod = String::from_utf8_lossy(demo.pod.as_bytes()).into_owned();
    let answer = serde_json::json!({
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("{pod} read {bytes} bytes")}, "finish_reason": "stop"}],
    });
    ([(header::CONTENT_TYPE, "application/json")], answer.to_string()).into_response()
}

/// Every session end heard, one `<session> <reason>` line each.
async fn session_ends(State(demo): State<Shared>) -> String {
    demo.ended.lock().unwrap().iter().map(|line| format!("{line}\n")).collect()
}

fn count(demo: &Demo, id: String) -> String {
    let n = bump(demo, &id);
    format!("session={id}, count={n}\n")
}

#[derive(serde::Deserialize)]
struct SessionQuery {
    session_id: Option<String>,
}

async fn incr_query(State(demo): State<Shared>, Query(q): Query<SessionQuery>) -> String {
    count(&demo, q.session_id.unwrap_or_default())
}

async fn incr_path(State(demo): State<Shared>, Path(id): Path<String>) -> String {
    count(&demo, id)
}

async fn healthz(State(demo): State<Shared>) -> Response {
    if demo.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

#[derive(serde::Deserialize)]
struct StreamQuery {
    chunks: Option<u32>,
    interval: Option<String>,
}

/// A chunked response of `chunks` lines, one every `interval`, so a test can tell whether a proxy
/// forwards each chunk as it comes or holds the body back.
async fn stream_chunks(Query(q): Query<StreamQuery>) -> Response {
    let chunks = q.chunks.unwrap_or(5);
    let interval = match q.interval.as_deref().map(humantime::parse_duration).transpose() {
        Ok(d) => d.unwrap_or(Duration::from_millis(100)),
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad interval: {e}\n")).into_response(),
    };
    let body = stream::unfold(0u32, move |i| async move {
        if i >= chunks {
            return None;
        }
        // A zero interval streams as fast as the connection takes it (a timer would still tick).
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(format!("chunk {i}\n"))), i + 1))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(body))
        .expect("static response parts are valid")
}

#[derive(serde::Deserialize)]
struct SlowQuery {
    delay: Option<String>,
}

/// Waits before sending headers, whatever the method: a backend that is slower than a
/// revision's timeout, or one a test kills while it holds a request.
async fn slow(State(demo): State<Shared>, Query(q): Query<SlowQuery>) -> Response {
    match q.delay.as_deref().map(humantime::parse_duration).transpose() {
        Ok(d) => {
            demo.slow_started.fetch_add(1, Ordering::SeqCst);
            demo.slow_waiting.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(d.unwrap_or(Duration::from_secs(1))).await;
            demo.slow_waiting.fetch_sub(1, Ordering::SeqCst);
            "slow done\n".into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("bad delay: {e}\n")).into_response(),
    }
}

/// `started <n> waiting <m>`: the `/slow` requests this pod took, and those it still holds.
async fn slow_stats(State(demo): State<Shared>) -> String {
    let (started, waiting) = (demo.slow_started.load(Ordering::SeqCst), demo.slow_waiting.load(Ordering::SeqCst));
    format!("started {started} waiting {waiting}\n")
}

/// Streams the request body back as it arrives.
async fn echo(req: Request) -> Response {
    Response::new(req.into_body())
}

async fn websocket_echo(req: Request) -> Response {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return (StatusCode::BAD_REQUEST, "not a websocket handshake\n").into_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("static response parts are valid")
}

/// This machine's host name, as Kubernetes sets it to the pod's name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "demo-pod".into())
}
