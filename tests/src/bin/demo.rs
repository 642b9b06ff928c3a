//! `just demo`: a walk-through of the activator in local mode for a person at a terminal. It
//! starts demo-service replicas and an activator on free loopback ports, prints each request as
//! the curl command that would send it together with the answer and why it landed there, then
//! shows two more activators sharing pins through a Redis of its own (a pod leaving, Redis going
//! away), and stops everything it started when done (the processes are killed when their handles
//! drop). `just demo --keep` leaves everything running, the printed curls working, until Ctrl-C.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process, activator_pins, wait_until};

const P: &str = "activator.knative.dev/";

struct Demo {
    env: Env,
    activator: Process,
    client: Client,
}

impl Demo {
    async fn show(&self, path: &str, headers: &[(&str, &str)]) {
        self.show_at("counter.localhost", path, headers).await;
    }

    async fn show_at(&self, host: &str, path: &str, headers: &[(&str, &str)]) {
        show_via(&self.activator, host, path, headers).await;
    }

    async fn reload(&self, topology: &str) {
        self.env.reload(&self.activator, topology).await;
    }
}

/// Sends one request through `activator`, printed as the curl that sends it, with the answer and
/// the pod it came from; returns that pod.
async fn show_via(activator: &Process, host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    {
        let flags: String = (headers.iter())
            .map(|(k, v)| match v.len() {
                // Long ids are all 'x' here; print a command that builds one rather than a kilobyte of x.
                n if n > 64 => format!(" -H \"{k}: $(head -c {n} /dev/zero | tr '\\0' x)\""),
                _ => format!(" -H '{k}: {v}'"),
            })
            .collect();
        println!("$ curl -H 'Host: {host}'{flags} 'http://{}{path}'", activator.addr("proxy"));
        let reply = Client::new(activator.addr("proxy")).get_with(host, path, headers).await;
        let landed = if reply.pod().is_empty() {
            "the activator itself".to_owned()
        } else {
            format!("{} ({})", reply.pod(), reply.header("x-activator-decision"))
        };
        let body = if reply.body.len() > 60 { format!("{}…", &reply.body[..60]) } else { reply.body.clone() };
        println!("  {} from {landed}: {}", reply.status, body.trim_end());
        reply.pod().to_owned()
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn topology(pods: &[SocketAddr], old_percent: u32) -> String {
    topology_of(&pods[..3], &pods[3..], old_percent)
}

/// The demo's world: `counter` split between its two revisions over these pods, and `sleepy`,
/// which has none until the shim starts one.
fn topology_of(old: &[SocketAddr], new: &[SocketAddr], old_percent: u32) -> String {
    yaml(&[
        Service::new("counter")
            .annotation(&format!("{P}sticky-session-query-parameter"), "session_id")
            .revision("counter-00001", old_percent, old)
            .revision("counter-00002", 100 - old_percent, new),
        Service::new("sleepy").revision("sleepy-00001", 100, &[]),
    ])
    .replace(".test]", ".localhost]")
}

#[tokio::main]
async fn main() {
    let keep = std::env::args().skip(1).any(|a| a == "--keep");
    if let Some(other) = std::env::args().skip(1).find(|a| a != "--keep") {
        eprintln!("error: unknown argument {other:?}; `just demo` takes only --keep");
        std::process::exit(2);
    }
    let env = Env::new();
    step("Starting three demo-service replicas of revision counter-00001 and one of counter-00002");
    let mut pods: Vec<Process> = Vec::new();
    let replicas = [
        ("counter-00001-a", "counter-00001"),
        ("counter-00001-b", "counter-00001"),
        ("counter-00001-c", "counter-00001"),
        ("counter-00002-a", "counter-00002"),
    ];
    for (pod, revision) in replicas {
        let process = env.demo(pod, revision).await;
        println!("  {pod} listening on {}", process.addr("http"));
        pods.push(process);
    }
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.addr("http")).collect();
    env.write_topology(&topology(&addrs, 50));
    step(&format!("Topology file {} (re-read when it changes):", env.topology_path().display()));
    print_file(&env.topology_path());

    let command = integration_tests::demo_command("--startup-delay 1s");
    let topology_path = env.topology_path().display().to_string();
    let shim_flags =
        ["--command", &command, "--topology", &topology_path, "--scale-to-zero-grace", "3s", "--window", "2s"];
    let shim = env.shim(&shim_flags).await;
    println!("\nautoscaler-shim: stats on {}, starts pods with: {command}", shim.addr("stats"));
    let activator = env.activator_with_shim(&shim, &["--debug-headers"]).await;
    println!("\nactivator: proxy on {}, admin on {}", activator.addr("proxy"), activator.addr("admin"));
    println!("(--debug-headers: each answer says why it landed where it did)");
    let demo = Demo { client: Client::new(activator.addr("proxy")), env, activator };

    step("No affinity id: the 50/50 split picks a revision, the load balancer a pod");
    for _ in 0..3 {
        demo.show("/incr", &[]).await;
    }
    let mut to_old = 0;
    const SPLIT: usize = 40;
    for _ in 0..SPLIT {
        to_old += usize::from(demo.client.get("counter.localhost", "/incr").await.revision() == "counter-00001");
    }
    println!("  … {SPLIT} more like it: {to_old} went to counter-00001, {} to counter-00002", SPLIT - to_old);

    step("Session affinity with the default header K-Session: one session, one pod, counting 1, 2, 3");
    for _ in 0..3 {
        demo.show("/incr?session_id=abc", &[("K-Session", "abc")]).await;
    }

    step("The service's annotation sticky-session-query-parameter: session_id does the same without a header");
    for _ in 0..3 {
        demo.show("/incr?session_id=xyz", &[]).await;
    }

    step("Revision affinity with K-Revision: a flow stays on one revision; the balancer still picks the pod in it");
    for _ in 0..4 {
        demo.show("/incr", &[("K-Revision", "flow-1")]).await;
    }

    step("Draining counter-00001: set to 0 %, its pinned sessions stay, new sessions go to counter-00002");
    demo.reload(&topology(&addrs, 0)).await;
    demo.show("/incr?session_id=abc", &[("K-Session", "abc")]).await;
    demo.show("/incr?session_id=xyz", &[]).await;
    for id in ["new-1", "new-2"] {
        demo.show(&format!("/incr?session_id={id}"), &[]).await;
    }

    step("Scale from zero: sleepy-00001 has no pod; the shim starts one (1 s to become ready) on the first request");
    let started = Instant::now();
    demo.show_at("sleepy.localhost", "/incr?session_id=zzz", &[]).await;
    println!(
        "  (answered after {:.1} s: held until the new pod passed its readiness probe)",
        started.elapsed().as_secs_f64()
    );
    demo.show_at("sleepy.localhost", "/incr?session_id=zzz", &[]).await;
    let endpoints = demo.env.endpoints_path();
    println!("  {} now lists:", endpoints.display());
    print_file(&endpoints);
    println!("  … no requests for 3 s: the shim scales sleepy-00001 back to zero");
    let stopped = Instant::now();
    wait_until(Duration::from_secs(30), "the idle pod is stopped", || async {
        !std::fs::read_to_string(&endpoints).unwrap_or_default().contains("sleepy")
    })
    .await;
    println!("  pod stopped {:.1} s later; sleepy-00001 is at zero again", stopped.elapsed().as_secs_f64());

    let names: Vec<&str> = replicas.iter().map(|(pod, _)| *pod).collect();
    let shared = shared_pins(&demo, &pods, &names).await;

    step("What the activator answers by itself");
    demo.show("/incr", &[("K-Session", &"x".repeat(1025))]).await;
    demo.show("/", &[("K-Network-Probe", "activator")]).await;
    let unknown = demo.client.get("unknown.localhost", "/").await;
    println!("$ curl -H 'Host: unknown.localhost' 'http://{}/'", demo.activator.addr("proxy"));
    println!("  {} from the activator itself: {}", unknown.status, unknown.body.trim_end());

    if keep {
        step("Everything keeps running (--keep): the curl commands above work as printed; Ctrl-C stops it all");
        let _ = tokio::signal::ctrl_c().await;
    }
    step("Done: stopping the activators, Redis, autoscaler-shim and the demo-service replicas");
    drop((demo, shim, shared, pods));
}

/// A file's lines, indented under the line that names it.
fn print_file(path: &std::path::Path) {
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        println!("    {line}");
    }
}

/// What the activator exists for: replicas that share their pins through Redis, so a session
/// keeps its pod whichever replica a request reaches; what a pod leaving and Redis going away do.
/// Returns what it started, to keep it running.
async fn shared_pins(demo: &Demo, pods: &[Process], names: &[&str]) -> (Redis, Process, Process) {
    step("Two more activators, A and B, sharing their pins through a Redis of their own");
    let redis_dir = demo.env.dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir).expect("a directory for Redis");
    let mut redis = Redis::start(&redis_dir).await;
    let a = demo.env.shared_activator(&redis).await;
    let b = demo.env.shared_activator(&redis).await;
    println!("  redis-server on {}", redis.url());
    println!("  A: activator --redis-url {} on {}", redis.url(), a.addr("proxy"));
    println!("  B: activator --redis-url {} on {}", redis.url(), b.addr("proxy"));
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.addr("http")).collect();
    let everyone = [&demo.activator, &a, &b];
    demo.env.reload_all(&everyone, &topology_of(&addrs[..3], &addrs[3..], 100)).await;
    println!("  (all of counter's traffic on counter-00001 and its three pods again)");

    step("A session started through A continues through B on the same pod: counting 1, 2, 3, 4");
    let home = show_via(&a, "counter.localhost", "/incr?session_id=shared", &[]).await;
    show_via(&a, "counter.localhost", "/incr?session_id=shared", &[]).await;
    show_via(&b, "counter.localhost", "/incr?session_id=shared", &[]).await;
    show_via(&b, "counter.localhost", "/incr?session_id=shared", &[]).await;
    let url = redis.url();
    let args = ["get", "--redis-url", &url, "--service", "counter", "--session", "shared"];
    println!("$ activator pins {}", args.join(" "));
    let (_, printed, said) = activator_pins(&args).await;
    for line in printed.lines().chain(said.lines()) {
        println!("  {line}");
    }

    step(&format!(
        "The session's pod {home} leaves the topology: its next request is re-pinned, and both replicas follow"
    ));
    let staying: Vec<SocketAddr> =
        pods[..3].iter().zip(names).filter(|(_, name)| **name != home).map(|(p, _)| p.addr("http")).collect();
    demo.env.reload_all(&everyone, &topology_of(&staying, &addrs[3..], 100)).await;
    show_via(&b, "counter.localhost", "/incr?session_id=shared", &[]).await;
    show_via(&a, "counter.localhost", "/incr?session_id=shared", &[]).await;

    step("Redis goes away: known sessions keep their pods from each replica's near cache, new ones still work");
    redis.kill().await;
    show_via(&a, "counter.localhost", "/incr?session_id=shared", &[]).await;
    show_via(&b, "counter.localhost", "/incr?session_id=shared", &[]).await;
    show_via(&a, "counter.localhost", "/incr?session_id=while-redis-is-away", &[]).await;
    show_via(&a, "counter.localhost", "/incr?session_id=while-redis-is-away", &[]).await;
    redis.restart().await;
    println!("  Redis is back, empty: each replica writes back the pins it holds, so nothing is lost");
    let restored =
        wait_until(Duration::from_secs(15), "the pins are written back", || async { activator_pins(&args).await.0 });
    restored.await;
    show_via(&b, "counter.localhost", "/incr?session_id=shared", &[]).await;
    (redis, a, b)
}
