//! `just bench`: the activator's figures against baselines measured in the same run (a direct
//! connection to the backend, nginx as a proxy), because these machines are noisy. Prints a table
//! with each figure's target and one `bench <name> <value> <unit>` line per figure. Never fails
//! on a missed target; a missing tool skips its figures with a note.
//!
//! Placement: the backend, nginx (1 worker) and the activator (1 worker thread) share CPU 1; the
//! load generators (wrk, h2load, this process's constant-rate and cold-start clients) run on CPU 0.
//! The latency distribution at a constant rate is also drawn into `docs/latency.svg`.
//!
//! Arguments name sections to run (`proxy`, `rate`, `affinity`, `cold`, `held`, `h2c`); none runs
//! them all. `rate` needs `proxy`, which measures nginx's saturation rate. `--summary <log>`
//! instead prints the targets table from a log of every part's figures (`just bench` keeps one).

mod plot;
mod rate;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process, metric, pin_store_round_trips, raise_open_files_limit, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Linux reports process CPU time in USER_HZ ticks, 100 per second.
const TICKS_PER_SECOND: f64 = 100.0;
const MODERATE: u32 = 4;
const SATURATING: u32 = 64;
const SECONDS: u32 = 5;

struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    target: &'static str,
}

#[derive(Default)]
struct Figures(Vec<Figure>);

impl Figures {
    /// Prints `bench <name> <value> <unit> [<target>]`, the line `--summary` reads back.
    fn add(&mut self, name: &str, value: f64, unit: &'static str, target: &'static str) {
        println!("bench {name} {value:.4} {unit} {target}");
        self.0.push(Figure { name: name.to_owned(), value, unit, target });
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Load {
    requests: f64,
    per_second: f64,
    median_us: f64,
    p99_us: f64,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, log] = args.as_slice()
        && flag == "--summary"
    {
        summary(Path::new(log));
        return;
    }
    raise_open_files_limit();
    // This process generates load too: it keeps to the load generators' CPU.
    let _ = Command::new("taskset").args(["-a", "-p", "-c", "0", &std::process::id().to_string()]).output();
    let mut figures = Figures::default();
    let env = Env::new();
    let backend = env.demo("bench-pod", "bench-1").await;
    pin_to_cpu(&backend, 1);
    let topology = |cold: &[(&str, &[SocketAddr])]| {
        let mut services = vec![Service::new("bench").revision("bench-1", 100, &[backend.addr("http")])];
        for (name, endpoints) in cold {
            services.push(Service::new(name).revision(&format!("{name}-1"), 100, endpoints));
        }
        let text = yaml(&services).replace("probe: http", "probe: none");
        text.replace("hosts: [bench.test]", "hosts: [bench.test, 127.0.0.1]")
    };
    env.write_topology(&topology(&[]));

    let tools = ["wrk", "h2load", "nginx", "redis-server"].map(|t| (t, which(t)));
    for (tool, found) in tools {
        if !found {
            println!("note: {tool} is not installed; its figures are skipped (`just bench` installs it)");
        }
    }
    let have = |tool: &str| tools.iter().any(|(t, found)| *t == tool && *found);
    let run = |section: &str| args.is_empty() || args.iter().any(|s| s == section);

    let activator = env.activator(&["--worker-threads", "1", "--topology-poll-interval", "2ms"]).await;
    pin_to_cpu(&activator, 1);
    let (idle_rss, _) = activator.memory_kib();
    figures.add("idle_rss", idle_rss as f64 / 1024.0, "MiB", "<= 8 MiB");

    if have("wrk") && run("proxy") {
        let nginx_saturation = proxy_overhead(&env, &backend, &activator, have("nginx"), &mut figures).await;
        if let Some(saturation) = nginx_saturation.filter(|_| run("rate")) {
            constant_rate(&env, &backend, &activator, saturation, &mut figures).await;
        }
    }
    if have("wrk") && run("affinity") {
        affinity_overhead(&env, &activator, have("redis-server"), &mut figures).await;
    }
    if run("cold") {
        cold_start(&env, &activator, &backend, &topology, &mut figures).await;
    }
    if run("held") {
        buffered_memory(&env, &activator, &backend, &topology, &mut figures).await;
    }
    if have("h2load") && run("h2c") {
        let direct = h2load(backend.addr("http"));
        let proxied = h2load(activator.addr("proxy"));
        figures.add("h2c_direct_rps", direct, "req/s", "");
        figures.add("h2c_activator_rps", proxied, "req/s", "");
        figures.add("ratio_h2c_rps_activator_vs_direct", proxied / direct, "x", ">= 0.8");
        // The proxy people compare with, on the same CPU as the backend: nginx takes h2c from
        // the client and keeps HTTP/1.1 to the backend (it proxies HTTP/2 only as gRPC).
        if have("nginx") {
            let nginx = Nginx::start(env.dir.path(), backend.addr("http"), Listen::H2c);
            let theirs = h2load(nginx.addr);
            figures.add("h2c_nginx_rps", theirs, "req/s", "");
            figures.add("ratio_h2c_rps_activator_vs_nginx", proxied / theirs, "x", ">= 1.0");
        }
    }
    print_table(&figures);
    let dir = env.dir.path().to_owned();
    drop((activator, backend, env));
    end_survivors(&dir);
}

/// Ends, and names, any process the bench started that is still running once the bench let go
/// of it: each one's command line names the bench's directory (its topology, config or data).
/// Processes dropped a moment ago get a few seconds to finish exiting. Nothing should be left.
fn end_survivors(dir: &Path) {
    let marker = dir.display().to_string();
    let running = || -> Vec<(i32, String)> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        let pids = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok());
        pids.filter(|pid| *pid != std::process::id() as i32)
            .filter_map(|pid| {
                // A zombie's command line is empty: it has exited.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline.contains(&marker).then_some((pid, cmdline))
            })
            .collect()
    };
    settles(Duration::from_secs(10), || running().is_empty());
    for (pid, cmdline) in running() {
        println!("note: {cmdline}(pid {pid}) outlived the bench; killed");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Figure 1: latency at moderate load and CPU per request at saturation, direct, nginx and
/// activator. Returns nginx's saturation rate, when nginx ran.
async fn proxy_overhead(
    env: &Env,
    backend: &Process,
    activator: &Process,
    nginx: bool,
    figures: &mut Figures,
) -> Option<f64> {
    let direct = measure(backend.addr("http"), &[], &[]);
    let proxy = activator.addr("proxy");
    let ours = measure(proxy, &[], &[activator.pid()]);
    figures.add("direct_median_latency", direct.0.median_us, "us", "");
    figures.add("direct_p99_latency", direct.0.p99_us, "us", "");
    figures.add("direct_saturation_rps", direct.1.per_second, "req/s", "");
    figures.add("activator_median_latency", ours.0.median_us, "us", "");
    figures.add("activator_p99_latency", ours.0.p99_us, "us", "");
    figures.add("activator_saturation_rps", ours.1.per_second, "req/s", "");
    figures.add("activator_cpu_per_request", ours.2 * 1e6, "us", "");
    if !nginx {
        return None;
    }
    let nginx = Nginx::start(env.dir.path(), backend.addr("http"), Listen::Http1);
    let theirs = measure(nginx.addr, &[], &nginx.pids());
    figures.add("nginx_median_latency", theirs.0.median_us, "us", "");
    figures.add("nginx_p99_latency", theirs.0.p99_us, "us", "");
    figures.add("nginx_saturation_rps", theirs.1.per_second, "req/s", "");
    figures.add("nginx_cpu_per_request", theirs.2 * 1e6, "us", "");
    let added = |p: &(Load, Load, f64)| (p.0.median_us - direct.0.median_us).max(0.1);
    figures.add("ratio_added_median_vs_nginx", added(&ours) / added(&theirs), "x", "<= 1.0");
    figures.add("ratio_cpu_per_request_vs_nginx", ours.2 / theirs.2, "x", "<= 1.0");
    figures.add("ratio_saturation_vs_nginx", ours.1.per_second / theirs.1.per_second, "x", ">= 1.0");
    Some(theirs.1.per_second)
}

/// Figure 1b: p50, p99 and p99.9 at a constant rate of 50 % and 90 % of nginx's saturation
/// rate, direct, nginx and activator; the 50 % run is drawn into `docs/latency.svg`.
async fn constant_rate(env: &Env, backend: &Process, activator: &Process, saturation: f64, figures: &mut Figures) {
    let nginx = Nginx::start(env.dir.path(), backend.addr("http"), Listen::Http1);
    let targets = [("direct", backend.addr("http")), ("nginx", nginx.addr), ("activator", activator.addr("proxy"))];
    for percent in [50u32, 90] {
        let rate = saturation * f64::from(percent) / 100.0;
        let mut runs = Vec::new();
        for (name, addr) in targets {
            let latencies = rate::run(addr, rate, Duration::from_secs(u64::from(SECONDS))).await;
            for (label, p) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
                let figure = format!("{name}_{label}_at_{percent}pct_of_nginx_saturation");
                figures.add(&figure, latencies.percentile(p), "us", "");
            }
            figures.add(&format!("{name}_failed_at_{percent}pct"), latencies.failed as f64, "requests", "0");
            runs.push((name, latencies));
        }
        let (theirs, ours) = (&runs[1].1, &runs[2].1);
        for (label, p) in [("p99", 0.99), ("p999", 0.999)] {
            let ratio = ours.percentile(p) / theirs.percentile(p);
            figures.add(&format!("ratio_{label}_at_{percent}pct_vs_nginx"), ratio, "x", "<= 1.0");
        }
        if percent == 50 {
            let title = format!("GET /incr at {rate:.0} req/s (50 % of nginx's saturation), 5 s");
            let named: Vec<(&str, &rate::Latencies)> = runs.iter().map(|(n, l)| (*n, l)).collect();
            match plot::latency_svg(&title, &named) {
                Ok(svg) => {
                    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/latency.svg");
                    match std::fs::write(&path, svg) {
                        Ok(()) => println!("note: wrote {}", path.display()),
                        Err(e) => println!("note: could not write {}: {e}", path.display()),
                    }
                }
                Err(e) => println!("note: the latency picture was not drawn: {e}"),
            }
        }
    }
}

/// Moderate-load latency, saturation throughput, and CPU seconds per request of `pids`.
fn measure(addr: SocketAddr, headers: &[(&str, &str)], pids: &[u32]) -> (Load, Load, f64) {
    let moderate = wrk(addr, MODERATE, headers, None);
    let before = cpu_ticks(pids);
    let saturated = wrk(addr, SATURATING, headers, None);
    let cpu = (cpu_ticks(pids) - before) as f64 / TICKS_PER_SECOND / saturated.requests.max(1.0);
    (moderate, saturated, cpu)
}

/// Figures 2 and 3: a known session pin against no key, with the memory and the Redis store;
/// round trips and added latency of new sessions with Redis.
async fn affinity_overhead(env: &Env, activator: &Process, redis: bool, figures: &mut Figures) {
    let pinned = [("K-Session", "bench-session")];
    let unpinned = wrk(activator.addr("proxy"), MODERATE, &[], None);
    let known = wrk(activator.addr("proxy"), MODERATE, &pinned, None);
    figures.add("ratio_pinned_vs_unpinned_memory", known.median_us / unpinned.median_us, "x", "<= 1.05");
    if !redis {
        return;
    }
    let server = Redis::start(env.dir.path()).await;
    let shared = env.shared_activator(&server).await;
    pin_to_cpu(&shared, 1);
    let proxy = shared.addr("proxy");
    let unpinned = wrk(proxy, MODERATE, &[], None);
    wrk_once(proxy, &pinned);
    // Round trips as the activator counts its request-path calls to Redis (the refresh and the
    // generation check run apart, on a connection of their own); commands as Redis counts them,
    // a script's own included.
    let admin = shared.addr("admin");
    let data = ["get", "getex", "set", "evalsha"];
    let commands = |stats: &std::collections::HashMap<String, u64>| {
        data.iter().map(|c| stats.get(*c).copied().unwrap_or(0)).sum::<u64>()
    };
    // Per request the activator looked up, which wrk's count misses for the requests in flight
    // when it stops.
    let counts = || async { (pin_store_round_trips(admin).await, session_lookups(admin).await) };
    let before = counts().await;
    let known = wrk(proxy, MODERATE, &pinned, None);
    let after = counts().await;
    figures.add("ratio_pinned_vs_unpinned_redis", known.median_us / unpinned.median_us, "x", "<= 1.05");
    figures.add("redis_round_trips_known_pin", (after.0 - before.0) / (after.1 - before.1), "rtt", "0");

    let script = env.dir.path().join("new-sessions.lua");
    std::fs::write(
        &script,
        "local n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(nil, nil, {[\"K-Session\"] = \"new-\" .. n .. \"-\" .. math.random(1000000000)})\nend\n",
    )
    .expect("writing the wrk script");
    let (before, commands_before) = (counts().await, server.command_calls().await);
    let fresh = wrk(proxy, MODERATE, &[], Some(&script));
    let after = counts().await;
    let fresh_commands = commands(&server.command_calls().await) - commands(&commands_before);
    let looked_up = after.1 - before.1;
    figures.add("redis_round_trips_new_session", (after.0 - before.0) / looked_up, "rtt", "<= 1");
    figures.add("redis_commands_new_session", fresh_commands as f64 / looked_up, "commands", "");
    figures.add("redis_new_session_added_median", fresh.median_us - unpinned.median_us, "us", "");

    // Under load: every request a new session, at saturation, against requests without one.
    let pids = [shared.pid()];
    let saturated = |script: Option<&Path>| {
        let before = cpu_ticks(&pids);
        let load = wrk(proxy, SATURATING, &[], script);
        (load, (cpu_ticks(&pids) - before) as f64 / TICKS_PER_SECOND / load.requests.max(1.0))
    };
    let (plain, plain_cpu) = saturated(None);
    let (new, new_cpu) = saturated(Some(&script));
    figures.add("redis_new_session_saturation_rps", new.per_second, "req/s", "");
    figures.add("ratio_redis_new_session_rps_vs_no_session", new.per_second / plain.per_second, "x", "");
    figures.add("redis_new_session_cpu_per_request", new_cpu * 1e6, "us", "");
    figures.add("ratio_redis_new_session_cpu_vs_no_session", new_cpu / plain_cpu, "x", "");
}

/// The bench topology plus services (name, endpoints) of one revision each.
type TopologyWith<'a> = &'a dyn Fn(&[(&str, &[SocketAddr])]) -> String;

/// Figure 4: from the moment a pod is published to the first and the last held response.
async fn cold_start(
    env: &Env,
    activator: &Process,
    backend: &Process,
    topology: TopologyWith<'_>,
    figures: &mut Figures,
) {
    let client = Client::new(activator.addr("proxy"));
    let admin = activator.addr("admin");
    for waiters in [1usize, 100, 1000] {
        let name = format!("cold{waiters}");
        env.reload(activator, &topology(&[(&name, &[])])).await;
        let host = format!("{name}.test");
        let requests: Vec<_> = (0..waiters)
            .map(|_| {
                let (client, host) = (client.clone(), host.clone());
                tokio::spawn(async move {
                    let reply = client.get(&host, "/incr").await;
                    (reply.status, Instant::now())
                })
            })
            .collect();
        let revision = format!("{name}-1");
        wait_until(Duration::from_secs(60), "the requests wait", || async {
            queued(admin, &revision).await == Some(waiters as f64)
        })
        .await;
        let published = Instant::now();
        env.write_topology(&topology(&[(&name, &[backend.addr("http")])]));
        let mut answered = Vec::with_capacity(waiters);
        for request in requests {
            let (status, at) = request.await.expect("request task");
            assert_eq!(status, 200, "a held request failed");
            answered.push(at.duration_since(published));
        }
        answered.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        figures.add(
            &format!("cold_start_first_response_{waiters}_waiters"),
            ms(answered[0]),
            "ms",
            "<= 5 ms (+ <= 2 ms poll)",
        );
        let last_target = if waiters == 1000 { "<= 100 ms" } else { "" };
        figures.add(
            &format!("cold_start_last_response_{waiters}_waiters"),
            ms(answered[waiters - 1]),
            "ms",
            last_target,
        );
    }
    env.reload(activator, &topology(&[])).await;
}

/// Figure 5: the activator's resident memory with 10 000 requests held for a revision at zero,
/// as HTTP/2 streams over 40 connections (250 each, the most one connection may open) and each on
/// its own HTTP/1.1 connection.
async fn buffered_memory(
    env: &Env,
    activator: &Process,
    backend: &Process,
    topology: TopologyWith<'_>,
    figures: &mut Figures,
) {
    const HELD: usize = 10_000;
    const H2_CONNECTIONS: usize = 40;
    let proxy = activator.addr("proxy");
    let url = format!("http://held.test:{}/incr", proxy.port());
    let build = |h2: bool| {
        let builder =
            reqwest::Client::builder().no_proxy().resolve("held.test", proxy).timeout(Duration::from_secs(60));
        let builder = if h2 { builder.http2_prior_knowledge() } else { builder.http1_only() };
        builder.build().expect("building a bench client")
    };
    let http1 = vec![build(false)];
    let h2: Vec<reqwest::Client> = (0..H2_CONNECTIONS).map(|_| build(true)).collect();
    // Streams first: what they free, the connections' run would reuse.
    for (figure, clients) in [("rss_growth_10000_buffered_h2_streams", h2), ("rss_growth_10000_buffered", http1)] {
        env.reload(activator, &topology(&[("held", &[])])).await;
        let (before, _) = activator.memory_kib();
        let url = url.clone();
        let burst = tokio::spawn(async move {
            futures_util::stream::iter(0..HELD)
                .map(|i| {
                    let client = clients[i % clients.len()].clone();
                    let url = url.clone();
                    async move { client.get(url).send().await.is_ok_and(|r| r.status() == 200) }
                })
                .buffer_unordered(HELD)
                .filter(|ok| std::future::ready(*ok))
                .count()
                .await
        });
        wait_until(Duration::from_secs(120), "10 000 requests are held", || async {
            queued(activator.addr("admin"), "held-1").await == Some(HELD as f64)
        })
        .await;
        let (held, _) = activator.memory_kib();
        figures.add(figure, held.saturating_sub(before) as f64 / 1024.0, "MiB", "<= +50 MiB");
        env.write_topology(&topology(&[("held", &[backend.addr("http")])]));
        let answered = burst.await.expect("burst task");
        figures.add(&format!("{figure}_answered"), answered as f64, "requests", "10000");
    }
}

async fn queued(admin: SocketAddr, revision: &str) -> Option<f64> {
    metric(admin, "activator_queued_requests", &[("revision", revision)]).await
}

fn which(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

fn pin_to_cpu(process: &Process, cpu: u32) {
    let _ = Command::new("taskset").args(["-a", "-p", "-c", &cpu.to_string(), &process.pid().to_string()]).output();
}

/// User plus system CPU ticks of processes (all their threads).
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

fn wrk(addr: SocketAddr, connections: u32, headers: &[(&str, &str)], script: Option<&Path>) -> Load {
    let mut args = vec![
        "-c".to_owned(),
        "0".to_owned(),
        "wrk".to_owned(),
        "-t1".to_owned(),
        format!("-c{connections}"),
        format!("-d{SECONDS}s"),
        "--latency".to_owned(),
    ];
    for (k, v) in headers {
        args.extend(["-H".to_owned(), format!("{k}: {v}")]);
    }
    if let Some(script) = script {
        args.extend(["-s".to_owned(), script.display().to_string()]);
    }
    args.push(format!("http://{addr}/incr"));
    let out = Command::new("taskset").args(&args).output().expect("running wrk");
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn wrk_once(addr: SocketAddr, headers: &[(&str, &str)]) {
    let mut curl = Command::new("curl");
    curl.args(["-s", "-o", "/dev/null"]);
    for (k, v) in headers {
        curl.args(["-H", &format!("{k}: {v}")]);
    }
    let _ = curl.arg(format!("http://{addr}/incr")).output();
}

fn parse_wrk(out: &str) -> Load {
    let duration_us = |text: &str| {
        let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number.parse().unwrap_or(f64::NAN);
        value
            * match unit {
                "us" => 1.0,
                "ms" => 1e3,
                "s" => 1e6,
                _ => f64::NAN,
            }
    };
    let mut load = Load::default();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => load.median_us = duration_us(value),
            ["99%", value] => load.p99_us = duration_us(value),
            ["Requests/sec:", value] => load.per_second = value.parse().unwrap_or(f64::NAN),
            [count, "requests", "in", ..] => load.requests = count.parse().unwrap_or(f64::NAN),
            _ => {}
        }
    }
    load
}

/// Session lookups an activator made, pinned or not: one per request with a session id.
async fn session_lookups(admin: SocketAddr) -> f64 {
    let text = integration_tests::Metrics::scrape(admin).await;
    let looked = |result| text.value("activator_pin_lookups_total", &[("kind", "session"), ("result", result)]);
    looked("hit").unwrap_or(0.0) + looked("miss").unwrap_or(0.0)
}

/// h2c prior-knowledge throughput: requests per second.
fn h2load(addr: SocketAddr) -> f64 {
    let url = format!("http://{addr}/incr");
    let out = Command::new("taskset")
        .args(["-c", "0", "h2load", "-n", "50000", "-c", "4", "-m", "16", "-t", "1", &url])
        .output()
        .expect("running h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|rps| rps.trim().strip_suffix("req/s"))
        .and_then(|rps| rps.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// nginx as a reverse proxy with one worker and keep-alive to the backend, on CPU 1.
struct Nginx {
    addr: SocketAddr,
    child: std::process::Child,
}

/// What nginx's listener speaks to clients.
#[derive(Clone, Copy, PartialEq)]
enum Listen {
    Http1,
    /// HTTP/2 with prior knowledge, as h2load sends it.
    H2c,
}

impl Nginx {
    fn start(dir: &Path, backend: SocketAddr, listen: Listen) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut conf = String::new();
        let _ = write!(
            conf,
            "worker_processes 1;\nworker_cpu_affinity 10;\npid {dir}/nginx-{port}.pid;\nerror_log {dir}/nginx-error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  upstream backend {{ server {backend}; keepalive 128; }}\n\
             server {{\n    listen 127.0.0.1:{port}{h2};\n    location / {{\n      proxy_pass http://backend;\n\
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
            dir = dir.display(),
            h2 = if listen == Listen::H2c { " http2" } else { "" },
        );
        let path = dir.join(format!("nginx-{port}.conf"));
        std::fs::write(&path, conf).expect("writing nginx.conf");
        let child = Command::new("taskset")
            .args(["-c", "1", "nginx", "-c", &path.display().to_string(), "-g", "daemon off;"])
            .spawn()
            .expect("starting nginx");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { addr, child }
    }

    /// The master and its worker.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let workers =
            Command::new("pgrep").args(["-P", &master.to_string()]).output().map(|o| o.stdout).unwrap_or_default();
        std::iter::once(master)
            .chain(String::from_utf8_lossy(&workers).lines().filter_map(|l| l.trim().parse().ok()))
            .collect()
    }
}

impl Drop for Nginx {
    /// Stops nginx as nginx expects: `QUIT` to the master, which ends its workers once they are
    /// idle; `TERM` if that takes too long, `KILL` last. A worker that outlives its master would
    /// keep the bench's port open after the bench, so each one is checked for and ended.
    fn drop(&mut self) {
        let workers = self.pids().split_off(1);
        let master = Pid::from_raw(self.child.id() as i32);
        for signal in [Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGKILL] {
            let _ = kill(master, signal);
            if settles(Duration::from_secs(5), || self.child.try_wait().ok().flatten().is_some()) {
                break;
            }
        }
        let _ = self.child.wait();
        for worker in workers {
            let pid = Pid::from_raw(worker as i32);
            if !settles(Duration::from_secs(5), || kill(pid, None).is_err()) {
                println!("note: nginx worker {worker} outlived its master; killed");
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Whether `done` holds within `within`, asked every 20 ms: for what happens outside this process
/// (other processes exiting), where there is nothing to await.
fn settles(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn print_table(figures: &Figures) {
    println!("\n{:<52} {:>14} {:<8} {:<12} met", "figure", "value", "unit", "target");
    for f in &figures.0 {
        let met = match meets(f.value, f.target) {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        println!("{:<52} {:>14.3} {:<8} {:<12} {met}", f.name, f.value, f.unit, f.target);
    }
}

/// Whether `value` meets `target` (`<= 1.0`, `>= 0.8`, `<= +50 MiB`, or a value it must equal);
/// `None` for a figure without a target, or one that was not measured.
fn meets(value: f64, target: &str) -> Option<bool> {
    let (compare, rest): (fn(f64, f64) -> bool, &str) = if let Some(rest) = target.strip_prefix("<=") {
        (|v, t| v <= t, rest)
    } else if let Some(rest) = target.strip_prefix(">=") {
        (|v, t| v >= t, rest)
    } else {
        (|v, t| v == t, target)
    };
    let bound: f64 = rest.split_whitespace().next()?.trim_start_matches('+').parse().ok()?;
    (!value.is_nan()).then(|| compare(value, bound))
}

/// The figures `just bench` answers to: the table, gathered from every part's
/// `bench <name> <value> <unit> <target>` lines in `log` (the in-process pin store's, the Redis
/// round trips', and this binary's), each with the target its part gave it.
fn summary(log: &Path) {
    const TABLE: [(&str, &str); 10] = [
        ("CPU per proxied request, activator / nginx", "ratio_cpu_per_request_vs_nginx"),
        ("added median latency, activator / nginx", "ratio_added_median_vs_nginx"),
        ("saturation, activator / nginx", "ratio_saturation_vs_nginx"),
        ("p99 at 50 % of nginx's saturation, activator / nginx", "ratio_p99_at_50pct_vs_nginx"),
        ("h2c throughput, activator / direct", "ratio_h2c_rps_activator_vs_direct"),
        ("h2c throughput, activator / nginx", "ratio_h2c_rps_activator_vs_nginx"),
        ("10,000 held HTTP/1.1 requests", "rss_growth_10000_buffered"),
        ("idle RSS", "idle_rss"),
        ("1,000,000 pins in memory", "rss_growth_1000000_pins"),
        ("Redis round trips for a new session", "redis_round_trips_new_session"),
    ];
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let measured = |name: &str| {
        text.lines().filter_map(|l| l.strip_prefix("bench ")).find_map(|l| {
            let mut parts = l.splitn(4, ' ');
            if parts.next() != Some(name) {
                return None;
            }
            let value = parts.next()?.parse::<f64>().ok()?;
            let unit = parts.next().unwrap_or("");
            Some((value, unit.to_owned(), parts.next().unwrap_or("").trim().to_owned()))
        })
    };
    println!("\n{:<54} {:>10} {:<6} {:<12} met", "the targets", "value", "unit", "target");
    for (what, name) in TABLE {
        let Some((value, unit, target)) = measured(name) else {
            println!("{what:<54} {:>10} {:<6} {:<12} not measured", "-", "", "");
            continue;
        };
        let met = match meets(value, &target) {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "no target",
        };
        println!("{what:<54} {value:>10.2} {unit:<6} {target:<12} {met}");
    }
}
