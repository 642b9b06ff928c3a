//! Round trips per pin operation, counted by Redis itself (`INFO commandstats`) on a
//! `redis-server` the test harness starts on a free loopback port:
//!
//! * a new pin written through deadpool-redis (the pool named for this project) and through
//!   redis-rs's `ConnectionManager` (what the activator uses);
//! * lookups of a known pin through the activator's shared pin store, whose near cache should
//!   keep them off the network;
//! * the memory of 1 000 000 pins held through the shared store: this process's (the near cache)
//!   and Redis's.
//!
//! Prints commands per operation; asserts nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use activator::metrics::Registrar;
use activator::pins::{Lifetime, Pin, PinKey, PinKind, PinMetrics, Pins, SharedConfig};
use futures_util::StreamExt;
use integration_tests::redis::Redis;

const WRITES: u64 = 1000;
const LOOKUPS: u64 = 10_000;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let server = Redis::start(dir.path()).await;
    let url = server.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let admin = &server;

    let pool = deadpool_redis::Config::from_url(&url).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    let before = stats(admin).await;
    for i in 0..WRITES {
        let mut conn = pool.get().await.unwrap();
        let _: Option<String> = set_nx_get(format!("deadpool:{i}")).query_async(&mut conn).await.unwrap();
    }
    let deadpool = stats(admin).await - before;

    let mut manager = redis::aio::ConnectionManager::new(client.clone()).await.unwrap();
    let before = stats(admin).await;
    for i in 0..WRITES {
        let _: Option<String> = set_nx_get(format!("manager:{i}")).query_async(&mut manager).await.unwrap();
    }
    let managed = stats(admin).await - before;

    let known = known_pin_lookups(&url, admin).await;

    // deadpool's recycle check (UNWATCH + PING) is one pipelined round trip before the command.
    println!("{:<44} {:>10} {:>10}", "commands Redis ran per operation", "all", "pin data");
    println!(
        "{:<44} {:>10.2} {:>10.2}",
        "new pin via deadpool-redis (get + SET)",
        deadpool.total(WRITES),
        deadpool.data(WRITES)
    );
    println!(
        "{:<44} {:>10.2} {:>10.2}",
        "new pin via ConnectionManager (SET)",
        managed.total(WRITES),
        managed.data(WRITES)
    );
    println!(
        "{:<44} {:>10.4} {:>10.4}",
        "known pin lookup via the activator's store",
        known.total(LOOKUPS),
        known.data(LOOKUPS)
    );
    println!("bench redis_commands_per_new_pin_deadpool {:.2} commands", deadpool.total(WRITES));
    println!("bench redis_commands_per_new_pin_connection_manager {:.2} commands", managed.total(WRITES));
    println!("bench redis_commands_per_known_pin_lookup {:.4} commands", known.total(LOOKUPS));

    let (near_cache, redis) = million_pins(&url, admin).await;
    println!("bench rss_growth_1000000_pins_redis_store {near_cache:.1} MiB");
    println!("bench redis_used_memory_1000000_pins {redis:.1} MiB");
}

/// Writes 1 000 000 session pins through a shared store and returns how much this process's
/// resident memory (the near cache holding them) and Redis's data grew, in MiB.
async fn million_pins(url: &str, admin: &Redis) -> (f64, f64) {
    const PINS: u32 = 1_000_000;
    let metrics = PinMetrics::register(&Registrar::default());
    let pins = Pins::shared(u64::from(PINS), config(url), metrics.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics.store_up() {
        assert!(Instant::now() < deadline, "the shared store did not connect");
        let probe = PinKey::new(&Arc::from("default/probe"), PinKind::Session, b"probe");
        pins.lookup(Some(&probe), None, &|_| LIFETIME, None).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redis_before = used_memory(admin).await;
    let rss_before = rss_mib();
    let scope: Arc<str> = Arc::from("default/counter");
    let pod: std::net::SocketAddr = "10.0.0.7:8012".parse().unwrap();
    futures_util::stream::iter(0..PINS)
        .map(|i| {
            let (pins, scope) = (&pins, scope.clone());
            async move {
                let key = PinKey::new(&scope, PinKind::Session, format!("session-{i}").as_bytes());
                pins.write(&key, None, Pin::session("counter-00001", pod), LIFETIME, &|_| LIFETIME).await;
            }
        })
        .buffer_unordered(256)
        .collect::<()>()
        .await;
    (rss_mib() - rss_before, (used_memory(admin).await - redis_before) / 1024.0 / 1024.0)
}

const LIFETIME: Lifetime = Lifetime { ttl: Duration::from_secs(600), max_age: None };

fn config(url: &str) -> SharedConfig {
    SharedConfig {
        url: url.to_owned(),
        timeout: Duration::from_millis(25),
        revalidate_after: Duration::from_secs(5),
        refresh_interval: Duration::from_secs(1),
        tls: Default::default(),
        deployment: Default::default(),
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// Redis's `used_memory`, in bytes.
async fn used_memory(admin: &Redis) -> f64 {
    let info = admin.cli(&["INFO", "memory"]).await;
    info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(f64::NAN)
}

fn set_nx_get(key: String) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg("rev 127.0.0.1:1 0").arg("NX").arg("PX").arg(600_000).arg("GET");
    cmd
}

/// Pins one session through the shared store, then looks it up `LOOKUPS` times.
async fn known_pin_lookups(url: &str, admin: &Redis) -> Calls {
    let metrics = PinMetrics::register(&Registrar::default());
    let pins = Pins::shared(1_000_000, config(url), metrics.clone()).unwrap();
    let lifetime = LIFETIME;
    let key = PinKey::new(&Arc::from("default/counter"), PinKind::Session, b"known");
    let deadline = Instant::now() + Duration::from_secs(10);
    // The store connects in the background; until then writes stay local.
    let lifetime_of = |_: &str| lifetime;
    // The store connects in the background; a pin written until then is held locally, and the
    // first lookup once connected pushes it to Redis.
    while !found(&pins, &key, lifetime).await || !metrics.store_up() {
        assert!(Instant::now() < deadline, "the shared store did not connect");
        let pin = Pin::session("counter-00001", "127.0.0.1:8080".parse().unwrap());
        pins.write(&key, None, pin, lifetime, &lifetime_of).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // That first lookup after connecting may be the one that pushed the pin: start counting after it.
    assert!(found(&pins, &key, lifetime).await);
    let before = self::stats(admin).await;
    let started = Instant::now();
    for _ in 0..LOOKUPS {
        assert!(found(&pins, &key, lifetime).await);
    }
    let mut calls = self::stats(admin).await - before;
    // The once-a-second refresh batch is the only traffic a pin in use causes; it is not per request.
    calls.refresh_batches = started.elapsed().as_secs() + 1;
    calls
}

async fn found(pins: &Pins, key: &PinKey, lifetime: Lifetime) -> bool {
    pins.lookup(Some(key), None, &|_| lifetime, None).await.session.is_some()
}

#[derive(Clone, Copy, Default)]
struct Calls {
    ping: u64,
    unwatch: u64,
    data: u64,
    refresh_batches: u64,
}

impl Calls {
    fn total(&self, ops: u64) -> f64 {
        (self.ping + self.unwatch + self.data).saturating_sub(self.refresh_batches) as f64 / ops as f64
    }

    fn data(&self, ops: u64) -> f64 {
        self.data.saturating_sub(self.refresh_batches) as f64 / ops as f64
    }
}

impl std::ops::Sub for Calls {
    type Output = Calls;
    fn sub(self, o: Calls) -> Calls {
        Calls {
            ping: self.ping - o.ping,
            unwatch: self.unwatch - o.unwatch,
            data: self.data - o.data,
            refresh_batches: 0,
        }
    }
}

/// Cumulative calls of the commands a pin operation may cause (the INFO call itself is not one).
async fn stats(admin: &Redis) -> Calls {
    let calls = admin.command_calls().await;
    let count = |name: &str| calls.get(name).copied().unwrap_or(0);
    Calls {
        ping: count("ping"),
        unwatch: count("unwatch"),
        data: count("set") + count("get") + count("getex") + count("evalsha"),
        refresh_batches: 0,
    }
}
