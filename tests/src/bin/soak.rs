//! `just soak`: a bounded run (`SOAK_SECONDS`, default 600) of everything at once on loopback.
//! Two activators sharing pins through Redis behind HAProxy take steady load at about 70 % of
//! what they can serve, with sessions starting and ending all the time, while the topology's
//! split changes every few seconds, pods are killed and new ones added, Redis is restarted and
//! one activator is restarted. One request in `POST_EVERY` is a `POST`, which the activator
//! never sends twice; the rest are `GET`s, which it sends again when their pod dies under them.
//! Once a minute it prints the requests that failed (the `GET`s, then the `POST`s apart), each
//! activator's memory and open files against the first minute's, and the pins lost: sessions
//! that changed pods although their pod was still there (`SOAK_VERBOSE=1` prints each, with the
//! decision that moved it). Not part of CI.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::haproxy::{Backend, Haproxy};
use integration_tests::redis::Redis;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Metrics, Process, raise_open_files_limit, wait_pin_store_up};
use nix::sys::signal::Signal;

/// Sessions live this long, so new ones keep starting and old ones keep ending.
const SESSION_EPOCH: Duration = Duration::from_secs(10);
const SESSIONS_PER_EPOCH: usize = 200;
/// Requests the generator may have open at once; beyond that it counts the requests it could not
/// send (it has fallen behind) rather than queueing them.
const MAX_OPEN: usize = 512;
const REVISIONS: [&str; 2] = ["soak-a", "soak-b"];
/// One request in this many is a `POST`: not safe to send twice, so a pod dying under it fails it.
const POST_EVERY: u64 = 10;

/// What the load has seen so far.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Failed `GET`s, by status (0: no answer); the activator retries these.
    failed: Mutex<HashMap<u16, u64>>,
    /// Failed `POST`s, which nobody may retry.
    failed_posts: Mutex<HashMap<u16, u64>>,
    /// The pod each session was last answered by.
    homes: Mutex<HashMap<String, String>>,
    /// Sessions that changed pods although the pod they left was still serving (counted once
    /// however often they flip between two pods).
    lost: Mutex<HashSet<String>>,
    /// Sessions that changed pods because theirs was killed or removed: expected.
    moved: Mutex<HashSet<String>>,
    skipped: AtomicU64,
}

/// The names of the pods now in the topology.
type Live = Arc<Mutex<HashSet<String>>>;

#[tokio::main]
async fn main() {
    raise_open_files_limit();
    let seconds = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600u64);
    let run = Duration::from_secs(seconds);
    if !Haproxy::installed() {
        eprintln!("just soak needs haproxy in front of the activators: run `just deps` (apt-get install haproxy)");
        std::process::exit(1);
    }
    let env = Env::new();
    let mut redis = Redis::start(env.dir.path()).await;
    let mut pods: Vec<Pod> = Vec::new();
    let mut next_pod = 0;
    for i in 0..4 {
        pods.push(Pod::start(&env, &mut next_pod, REVISIONS[i % 2]).await);
    }
    let live: Live = Arc::default();
    let mut split = 50;
    publish(&env, &pods, split, &live);
    let mut activators = [start_activator(&env, &redis, None).await, start_activator(&env, &redis, None).await];
    let backends: Vec<Backend> =
        activators.iter().map(|a| Backend { proxy: a.addr("proxy"), admin: a.addr("admin") }).collect();
    let haproxy = Haproxy::start(env.dir.path(), &backends).await;
    let client = Client::new(haproxy.addr);

    let saturation = saturation(&client).await;
    let rate = (saturation * 0.7).max(1.0);
    println!("saturation {saturation:.0} requests/s; soaking at {rate:.0}/s for {seconds} s");

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let generator = tokio::spawn(generate(client.clone(), rate, tally.clone(), live.clone(), stop.clone()));

    let started = Instant::now();
    let mut baseline: Option<Vec<(u64, usize)>> = None;
    let (mut redis_restarted, mut activator_restarted) = (false, false);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let mut ticks = 0u64;
    while started.elapsed() < run {
        tick.tick().await;
        ticks += 1;
        // Every 5 s the split moves; every 20 s a pod dies and a new one joins.
        split = if split == 50 { 80 } else { 50 };
        if ticks.is_multiple_of(4) {
            // The replacement joins the same revision, so neither revision is ever left empty.
            let victim = pods.remove(fastrand::usize(..pods.len()));
            if std::env::var_os("SOAK_VERBOSE").is_some() {
                println!("{:>7.1} s  killing {}", started.elapsed().as_secs_f32(), victim.name);
            }
            live.lock().unwrap().remove(&victim.name);
            victim.process.signal(Signal::SIGKILL);
            pods.push(Pod::start(&env, &mut next_pod, victim.revision).await);
        }
        publish(&env, &pods, split, &live);
        let elapsed = started.elapsed();
        if !redis_restarted && elapsed >= run / 3 {
            redis_restarted = true;
            println!("{:>5} s  restarting Redis (empty)", elapsed.as_secs());
            redis.kill().await;
            redis.restart().await;
        }
        if !activator_restarted && elapsed >= run * 2 / 3 {
            activator_restarted = true;
            println!("{:>5} s  restarting activator 0", elapsed.as_secs());
            let ports = (activators[0].addr("proxy"), activators[0].addr("admin"));
            activators[0].signal(Signal::SIGTERM);
            activators[0].wait_exit(Duration::from_secs(60)).await;
            activators[0] = start_activator(&env, &redis, Some(ports)).await;
        }
        if ticks.is_multiple_of(12) {
            let now = sample(&activators);
            let first = baseline.get_or_insert_with(|| now.clone()).clone();
            report(elapsed, &tally, &first, &now, &activators).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    generator.await.expect("the load generator");
    let now = sample(&activators);
    let first = baseline.unwrap_or_else(|| now.clone());
    println!("final");
    report(started.elapsed(), &tally, &first, &now, &activators).await;
    drop(haproxy);
}

/// A demo-service pod of one of the two revisions.
struct Pod {
    name: String,
    revision: &'static str,
    process: Process,
}

impl Pod {
    async fn start(env: &Env, next: &mut usize, revision: &'static str) -> Pod {
        let name = format!("soak-pod-{next}");
        *next += 1;
        let process = env.demo(&name, revision).await;
        Pod { name, revision, process }
    }
}

/// Writes the topology: the two revisions split `percent` / the rest.
fn publish(env: &Env, pods: &[Pod], percent: u32, live: &Live) {
    let of = |revision: &str| -> Vec<SocketAddr> {
        pods.iter().filter(|p| p.revision == revision).map(|p| p.process.addr("http")).collect()
    };
    let service = Service::new("soak").revision(REVISIONS[0], percent, &of(REVISIONS[0])).revision(
        REVISIONS[1],
        100 - percent,
        &of(REVISIONS[1]),
    );
    env.write_topology(&yaml(&[service]));
    *live.lock().unwrap() = pods.iter().map(|p| p.name.clone()).collect();
}

async fn start_activator(env: &Env, redis: &Redis, ports: Option<(SocketAddr, SocketAddr)>) -> Process {
    let (proxy, admin) =
        ports.map_or(("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()), |(p, a)| (p.to_string(), a.to_string()));
    let url = redis.url();
    let flags =
        ["--pin-store", "redis", "--redis-url", &url, "--listen", &proxy, "--admin-listen", &admin, "--debug-headers"];
    let activator = env.activator(&[&flags[..], &["--drain-period", "2s", "--log-format", "json"]].concat()).await;
    wait_pin_store_up(activator.addr("admin")).await;
    activator
}

/// Requests a second that 64 closed-loop clients get through in 5 s: what the activators (and
/// everything behind them) can serve on this machine.
async fn saturation(client: &Client) -> f64 {
    let (done, until) = (Arc::new(AtomicUsize::new(0)), Instant::now() + Duration::from_secs(5));
    let workers: Vec<_> = (0..64)
        .map(|w| {
            let (client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < until {
                    let session = format!("warm-{w}-{}", n % 8);
                    let req = client.request(reqwest::Method::GET, "soak.test", "/incr").header("K-Session", session);
                    if client.try_send(req).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    done.load(Ordering::Relaxed) as f64 / 5.0
}

/// Sends requests at `rate` a second (open loop) until stopped, each with a session of the
/// current epoch, and tallies what came back.
async fn generate(client: Client, rate: f64, tally: Arc<Tally>, live: Live, stop: Arc<AtomicBool>) {
    let verbose = std::env::var_os("SOAK_VERBOSE").is_some();
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        let Ok(slot) = open.clone().try_acquire_owned() else {
            tally.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let epoch = started.elapsed().as_secs() / SESSION_EPOCH.as_secs();
        let session = format!("s-{epoch}-{}", fastrand::usize(..SESSIONS_PER_EPOCH));
        let (client, tally, live) = (client.clone(), tally.clone(), live.clone());
        sent += 1;
        let post = sent.is_multiple_of(POST_EVERY);
        tasks.spawn(async move {
            let req = match post {
                true => client.request(reqwest::Method::POST, "soak.test", "/echo").body("order"),
                false => client.request(reqwest::Method::GET, "soak.test", "/incr"),
            };
            let req = req.header("K-Session", &session);
            let status = match client.try_send(req).await {
                Ok(reply) if reply.status == 200 => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    if let Some(left) = record_home(&tally, &live, session.clone(), reply.pod().to_owned())
                        && verbose
                    {
                        let decision = reply.header("x-activator-decision");
                        let at = started.elapsed().as_secs_f32();
                        println!(
                            "{at:>7.1} s  pin lost: session {session} left {left} for {} ({decision})",
                            reply.pod()
                        );
                    }
                    200
                }
                Ok(reply) => reply.status,
                Err(_) => 0,
            };
            if status != 200 {
                let failed = if post { &tally.failed_posts } else { &tally.failed };
                *failed.lock().unwrap().entry(status).or_default() += 1;
            }
            drop(slot);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Notes the pod that answered a session; a change of pod is a lost pin if the pod it left is
/// still in the topology. Returns the pod left if the session lost its pin just now, the first
/// time.
fn record_home(tally: &Tally, live: &Live, session: String, pod: String) -> Option<String> {
    let previous = tally.homes.lock().unwrap().insert(session.clone(), pod.clone());
    match previous {
        Some(previous) if previous != pod => {
            if live.lock().unwrap().contains(&previous) {
                return tally.lost.lock().unwrap().insert(session).then_some(previous);
            }
            tally.moved.lock().unwrap().insert(session);
            None
        }
        _ => None,
    }
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Each activator's resident KiB and open files now.
fn sample(activators: &[Process]) -> Vec<(u64, usize)> {
    activators.iter().map(|a| (a.memory_kib().0, open_files(a.pid()))).collect()
}

async fn report(
    elapsed: Duration,
    tally: &Tally,
    first: &[(u64, usize)],
    now: &[(u64, usize)],
    activators: &[Process],
) {
    // Redis calls that failed or missed their budget: each one routed with that replica's own
    // pins, which is how new sessions come to be pinned twice.
    let mut redis_errors = 0.0;
    for activator in activators {
        redis_errors += Metrics::scrape(activator.addr("admin")).await.sum("activator_pin_store_errors_total");
    }
    let failed: HashMap<u16, u64> = tally.failed.lock().unwrap().clone();
    let failed_total: u64 = failed.values().sum();
    let failed_posts: HashMap<u16, u64> = tally.failed_posts.lock().unwrap().clone();
    let failed_posts_total: u64 = failed_posts.values().sum();
    let drift: Vec<String> = first
        .iter()
        .zip(now)
        .enumerate()
        .map(|(i, ((rss0, fd0), (rss, fd)))| {
            format!(
                "activator {i}: RSS {} MiB ({:+} MiB), fds {fd} ({:+})",
                rss / 1024,
                (*rss as i64 - *rss0 as i64) / 1024,
                *fd as i64 - *fd0 as i64
            )
        })
        .collect();
    println!(
        "{:>5} s  ok {}  failed {failed_total} {failed:?}  POSTs failed (not retryable) {failed_posts_total} \
         {failed_posts:?}  sessions that lost their pin {}  moved with their pod {}  Redis calls failed {redis_errors}  \
         not sent (generator behind) {}  |  {}",
        elapsed.as_secs(),
        tally.ok.load(Ordering::Relaxed),
        tally.lost.lock().unwrap().len(),
        tally.moved.lock().unwrap().len(),
        tally.skipped.load(Ordering::Relaxed),
        drift.join("; ")
    );
}
