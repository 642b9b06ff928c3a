//! `just demo`: a walk-through of the activator in local mode for a person at a terminal. It
//! starts demo-service replicas and an activator on free loopback ports, prints each request as
//! the curl command that would send it together with the answer and why it landed there, and
//! stops everything it started when done (the processes are killed when their handles drop).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process, wait_until};

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
        let flags: String = (headers.iter())
            .map(|(k, v)| match v.len() {
                // Long ids are all 'x' here; print a command that builds one rather than a kilobyte of x.
                n if n > 64 => format!(" -H \"{k}: $(head -c {n} /dev/zero | tr '\\0' x)\""),
                _ => format!(" -H '{k}: {v}'"),
            })
            .collect();
        println!("$ curl -H 'Host: {host}'{flags} 'http://{}{path}'", self.activator.addr("proxy"));
        let reply = self.client.get_with(host, path, headers).await;
        let landed = if reply.pod().is_empty() {
            "the activator itself".to_owned()
        } else {
            format!("{} ({})", reply.pod(), reply.header("x-activator-decision"))
        };
        let body = if reply.body.len() > 60 { format!("{}…", &reply.body[..60]) } else { reply.body.clone() };
        println!("  {} from {landed}: {}", reply.status, body.trim_end());
    }

    async fn reload(&self, topology: &str) {
        self.env.reload(&self.activator, topology).await;
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn topology(pods: &[SocketAddr], old_percent: u32) -> String {
    yaml(&[
        Service::new("counter")
            .annotation(&format!("{P}sticky-session-query-parameter"), "session_id")
            .revision("counter-00001", old_percent, &pods[..3])
            .revision("counter-00002", 100 - old_percent, &pods[3..]),
        Service::new("sleepy").revision("sleepy-00001", 100, &[]),
    ])
    .replace(".test]", ".localhost]")
}

#[tokio::main]
async fn main() {
    let env = Env::new();
    step("Starting three demo-service replicas of revision counter-00001 and one of counter-00002");
    let mut pods: Vec<Process> = Vec::new();
    for (pod, revision) in [
        ("counter-00001-a", "counter-00001"),
        ("counter-00001-b", "counter-00001"),
        ("counter-00001-c", "counter-00001"),
        ("counter-00002-a", "counter-00002"),
    ] {
        let process = env.demo(pod, revision).await;
        println!("  {pod} listening on {}", process.addr("http"));
        pods.push(process);
    }
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.addr("http")).collect();
    env.write_topology(&topology(&addrs, 50));
    step(&format!("Topology file {} (re-read when it changes)", env.topology_path().display()));
    print!("{}", std::fs::read_to_string(env.topology_path()).unwrap_or_default());

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
    for _ in 0..4 {
        demo.show("/incr", &[]).await;
    }

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
    println!("  {} now lists: {}", endpoints.display(), std::fs::read_to_string(&endpoints).unwrap_or_default().trim());
    println!("  … no requests for 3 s: the shim scales sleepy-00001 back to zero");
    let stopped = Instant::now();
    wait_until(Duration::from_secs(30), "the idle pod is stopped", || async {
        !std::fs::read_to_string(&endpoints).unwrap_or_default().contains("sleepy")
    })
    .await;
    println!("  pod stopped {:.1} s later; sleepy-00001 is at zero again", stopped.elapsed().as_secs_f64());

    step("What the activator answers by itself");
    demo.show("/incr", &[("K-Session", &"x".repeat(1025))]).await;
    demo.show("/", &[("K-Network-Probe", "activator")]).await;
    let unknown = demo.client.get("unknown.localhost", "/").await;
    println!("$ curl -H 'Host: unknown.localhost' 'http://{}/'", demo.activator.addr("proxy"));
    println!("  {} from the activator itself: {}", unknown.status, unknown.body.trim_end());

    step("Done: stopping the activator, autoscaler-shim and the demo-service replicas");
    drop((demo, shim));
}
