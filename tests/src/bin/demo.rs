//! `just demo`: a walk-through of the activator in local mode for a person at a terminal. It
//! starts demo-service replicas and an activator on free loopback ports, prints each request as
//! the curl command that would send it together with the answer, and stops everything it
//! started when done (the processes are killed when their handles drop).

use std::net::SocketAddr;

use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process};

struct Demo {
    proxy: SocketAddr,
    client: Client,
}

impl Demo {
    async fn show(&self, host: &str, path: &str, headers: &[(&str, &str)]) {
        let flags: String = headers.iter().map(|(k, v)| format!(" -H '{k}: {v}'")).collect();
        println!("$ curl -H 'Host: {host}'{flags} 'http://{}{path}'", self.proxy);
        let reply = self.client.get_with(host, path, headers).await;
        let landed = if reply.pod().is_empty() {
            "the activator itself".to_owned()
        } else {
            format!("pod {} of {}", reply.pod(), reply.revision())
        };
        println!("  {} from {landed}: {}", reply.status, reply.body.trim_end());
    }
}

fn step(title: &str) {
    println!("\n== {title}");
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
    let topology = yaml(&[Service::new("counter").revision("counter-00001", 50, &addrs[..3]).revision(
        "counter-00002",
        50,
        &addrs[3..],
    )]);
    env.write_topology(&topology);
    step(&format!("Topology file {}", env.topology_path().display()));
    print!("{topology}");

    let activator = env.activator(&[]).await;
    let proxy = activator.addr("proxy");
    println!("\nactivator: proxy on {proxy}, admin on {}", activator.addr("admin"));
    let demo = Demo { proxy, client: Client::new(proxy) };

    step("No affinity key: the 50/50 split picks a revision, the load balancer a pod");
    for _ in 0..6 {
        demo.show("counter.test", "/incr?session_id=abc", &[]).await;
    }

    step("What the activator answers by itself");
    demo.show("unknown.test", "/incr", &[]).await;
    demo.show("counter.test", "/", &[("K-Network-Probe", "activator")]).await;

    step("Done: stopping the activator and the demo-service replicas");
}
