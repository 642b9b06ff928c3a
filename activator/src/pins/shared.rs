//! The shared pin table in Redis, so every activator replica routes a session the same way.
//!
//! A known pin costs no round trip: this replica's `MemoryPins` is the near cache, trusted for
//! `revalidate_after` after Redis last confirmed an entry; an entry older than that is re-read.
//! A key the near cache has never seen is not looked up at all: the request is routed as new and
//! its pin written with `SET … NX PX … GET`, which returns the pin another replica already holds
//! if there is one, so a new session costs one round trip, and a session new to this replica too.
//! Re-pins are a Lua compare-and-set that publishes an invalidation in the same round trip. Pins in use get their idle TTL slid, and are revalidated,
//! by one pipelined batch every `refresh_interval`. Redis failing or slowing down never fails a
//! request: after an error the store backs off and this replica routes with its own pins.
//!
//! A re-pin reaches other replicas through pub/sub within milliseconds; if that message is lost,
//! a pin in use is corrected by the next refresh, and after a resubscribe every near-cache entry
//! is re-read on its next use.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use prometheus::{Histogram, IntCounter, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, RedisResult};

use super::memory::{MemoryPins, Near, Touched};
use super::{Lifetime, Pin, PinKey, Written};
use crate::stats::Stats;

/// Pub/sub channel carrying `<key> <replica>` for every re-pin or delete.
pub const INVALIDATIONS: &str = "aa:invalidate";
/// Redis 7.0 brought `SET … NX … GET`.
const MIN_VERSION: (u32, u32) = (7, 0);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Back-off after a failed Redis call, doubling while failures go on. The cap bounds how long
/// sharing takes to resume after Redis returns.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Compare-and-set on the target part (`<revision> <pod>`) of the stored value. Returns nothing
/// when it wrote, else the value that won.
const REPIN_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local target = string.match(current, '^(%S+ %S+) ')
  if target ~= ARGV[1] then return current end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], KEYS[1] .. ' ' .. ARGV[5])
return false
";

#[derive(Clone, Debug)]
pub struct SharedConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://` for TLS.
    pub url: String,
    /// Budget for one Redis answer on the request path.
    pub timeout: Duration,
    /// How long a near-cache entry is trusted without asking Redis.
    pub revalidate_after: Duration,
    /// How often pins in use get their TTL slid (one pipelined batch).
    pub refresh_interval: Duration,
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    Create,
    Replace,
    Refresh,
    Decode,
    Connect,
    Ping,
}

const OPS: [&str; 7] = ["get", "create", "replace", "refresh", "decode", "connect", "ping"];

/// Stops asking Redis for a while after a failure, doubling the pause while failures go on.
struct Breaker {
    origin: Instant,
    open_until_ms: AtomicU64,
    failures: AtomicU32,
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn allows(&self) -> bool {
        self.now_ms() >= self.open_until_ms.load(Ordering::Relaxed)
    }

    /// Returns whether this success ended an outage.
    fn success(&self) -> bool {
        // Read first: on the happy path nobody writes the shared cache line.
        self.failures.load(Ordering::Relaxed) != 0 && self.failures.swap(0, Ordering::Relaxed) != 0
    }

    /// Opens the breaker; returns the back-off and whether this failure started an outage.
    fn failure(&self) -> (Duration, bool) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let backoff = MIN_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF);
        let until = self.now_ms().saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX));
        self.open_until_ms.store(until, Ordering::Relaxed);
        (backoff, failures == 1)
    }
}

struct StoreMetrics {
    errors: [IntCounter; OPS.len()],
    latency: [Histogram; OPS.len()],
    up: IntGauge,
}

pub struct SharedPins {
    memory: Arc<MemoryPins>,
    conn: OnceLock<ConnectionManager>,
    breaker: Breaker,
    config: SharedConfig,
    /// Tags this replica's invalidations so it does not drop its own fresh entries.
    replica: String,
    repin: redis::Script,
    metrics: StoreMetrics,
}

impl SharedPins {
    /// Starts connecting in the background: until Redis answers, pins stay local to this
    /// replica. Only a malformed URL is an error.
    pub fn start(config: SharedConfig, memory: Arc<MemoryPins>, stats: &Stats) -> anyhow::Result<Arc<Self>> {
        let client = Client::open(config.url.as_str()).context("--redis-url is not a valid Redis URL")?;
        let metrics = StoreMetrics {
            errors: OPS.map(|op| stats.pin_store_errors.with_label_values(&[op])),
            latency: OPS.map(|op| stats.pin_store_latency.with_label_values(&[op])),
            up: stats.pin_store_up.clone(),
        };
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("reading OS randomness: {e}"))?;
        let shared = Arc::new(SharedPins {
            memory,
            conn: OnceLock::new(),
            breaker: Breaker { origin: Instant::now(), open_until_ms: AtomicU64::new(0), failures: AtomicU32::new(0) },
            replica: format!("{:016x}", u64::from_ne_bytes(id)),
            repin: redis::Script::new(REPIN_SCRIPT),
            config,
            metrics,
        });
        tokio::spawn(shared.clone().connect(client.clone()));
        tokio::spawn(shared.clone().follow_invalidations(client));
        tokio::spawn(shared.clone().refresh_loop());
        Ok(shared)
    }

    pub async fn get(&self, key: &PinKey, lifetime_of: &(dyn Fn(&str) -> Lifetime + Sync)) -> Option<Pin> {
        match self.memory.near(key, self.config.revalidate_after) {
            Near::Fresh(pin) => return Some(pin),
            // Routed as new: the first-writer-wins write returns any pin Redis already holds.
            Near::Absent => return None,
            Near::Stale => {}
        }
        let Some(mut conn) = self.available() else { return self.memory.get(key) };
        let read = self.call(Op::Get, async move { conn.get::<_, Option<Vec<u8>>>(key.to_string()).await });
        match read.await {
            Some(Some(value)) => match self.decode(key, &value) {
                Some((pin, written)) => {
                    self.memory.put_verified(key, pin.clone(), lifetime_of(&pin.revision), written);
                    Some(pin)
                }
                None => None,
            },
            // Not in Redis (or Redis failed): a pin this replica made during an outage still
            // holds here; the refresh pushes it to Redis.
            Some(None) | None => self.memory.get(key),
        }
    }

    pub async fn write(&self, key: &PinKey, expected: Option<&Pin>, pin: Pin, lifetime: Lifetime) -> Written {
        let Some(mut conn) = self.available() else { return self.memory.write(key, expected, pin, lifetime) };
        let written = SystemTime::now();
        let value = pin.encode(written);
        let ttl_ms = millis(lifetime.remaining(Duration::ZERO));
        let reply = match expected {
            None => {
                let mut set = redis::cmd("SET");
                set.arg(key.to_string()).arg(&value).arg("NX").arg("PX").arg(ttl_ms).arg("GET");
                self.call(Op::Create, async move { set.query_async::<Option<Vec<u8>>>(&mut conn).await }).await
            }
            Some(expected) => {
                let mut repin = self.repin.prepare_invoke();
                repin.key(key.to_string()).arg(expected.target()).arg(&value).arg(ttl_ms);
                repin.arg(INVALIDATIONS).arg(&self.replica);
                self.call(Op::Replace, async move { repin.invoke_async::<Option<Vec<u8>>>(&mut conn).await }).await
            }
        };
        let Some(current) = reply else { return self.memory.write(key, expected, pin, lifetime) };
        match current.map(|value| self.decode(key, &value)) {
            None => {
                self.memory.put_verified(key, pin.clone(), lifetime, written);
                Written { pin, won: true }
            }
            Some(Some((winner, winner_written))) => {
                self.memory.put_verified(key, winner.clone(), lifetime, winner_written);
                Written { pin: winner, won: false }
            }
            // Garbage under the key: ours replaces it.
            Some(None) => {
                let mut overwrite = self.conn.get().cloned().expect("connected above");
                let set = async move { overwrite.set_options::<_, _, ()>(key.to_string(), value, px(ttl_ms)).await };
                if self.call(Op::Create, set).await.is_some() {
                    self.memory.put_verified(key, pin.clone(), lifetime, written);
                    Written { pin, won: true }
                } else {
                    self.memory.write(key, expected, pin, lifetime)
                }
            }
        }
    }

    fn available(&self) -> Option<ConnectionManager> {
        self.conn.get().filter(|_| self.breaker.allows()).cloned()
    }

    fn decode(&self, key: &PinKey, value: &[u8]) -> Option<(Pin, SystemTime)> {
        let decoded = Pin::decode(value);
        if decoded.is_none() {
            self.metrics.errors[Op::Decode as usize].inc();
            tracing::warn!(%key, value = %String::from_utf8_lossy(value), "ignoring a malformed pin in Redis; it will be overwritten");
        }
        decoded
    }

    /// Runs one Redis call within the budget; on failure counts it, backs off, and returns `None`
    /// so the caller falls back to this replica's pins.
    async fn call<T>(&self, op: Op, call: impl Future<Output = RedisResult<T>>) -> Option<T> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, call).await;
        self.metrics.latency[op as usize].observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(value)) => {
                // Set on every answer rather than on transitions, which concurrent calls race.
                self.metrics.up.set(1);
                if self.breaker.success() {
                    tracing::info!("Redis answers again; pins are shared");
                }
                return Some(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.config.timeout),
        };
        self.metrics.errors[op as usize].inc();
        self.metrics.up.set(0);
        let (backoff, outage_started) = self.breaker.failure();
        if outage_started {
            tracing::warn!(op = OPS[op as usize], %error, ?backoff, "Redis unavailable; routing with this replica's pins");
        }
        None
    }

    async fn connect(self: Arc<Self>, client: Client) {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let mut backoff = MIN_BACKOFF;
        loop {
            let connected = async {
                let mut conn = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
                let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await?;
                Ok::<_, redis::RedisError>((conn, info))
            };
            match connected.await {
                Ok((conn, info)) => {
                    let version = server_version(&info);
                    if version.is_none_or(|v| v < MIN_VERSION) {
                        let found = version.map_or("an unknown version".to_owned(), |(a, b)| format!("{a}.{b}"));
                        tracing::error!(
                            "Redis at --redis-url runs {found}; the shared pin table needs Redis 7.0 or newer \
                             (SET ... NX GET). Pins stay local to this replica."
                        );
                        return;
                    }
                    self.metrics.up.set(1);
                    tracing::info!(version = ?version, "connected to Redis; pins are shared");
                    let _ = self.conn.set(conn);
                    return;
                }
                Err(e) => {
                    self.metrics.errors[Op::Connect as usize].inc();
                    tracing::warn!(error = %e, ?backoff, "cannot reach Redis yet; pins stay local until it answers");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Drops near-cache entries other replicas re-pinned or deleted.
    async fn follow_invalidations(self: Arc<Self>, client: Client) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let subscribed = async {
                let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await.ok()?.ok()?;
                pubsub.subscribe(INVALIDATIONS).await.ok()?;
                Some(pubsub)
            };
            if let Some(mut pubsub) = subscribed.await {
                backoff = MIN_BACKOFF;
                // Whatever was published while unsubscribed is unknown: re-read on next use.
                self.memory.distrust_all();
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let payload = message.get_payload_bytes();
                    let text = String::from_utf8_lossy(payload);
                    let (key, from) = text.split_once(' ').unwrap_or((&text, ""));
                    if from != self.replica
                        && let Ok(key) = key.parse::<PinKey>()
                    {
                        self.memory.remove(&key);
                    }
                }
            }
            self.memory.distrust_all();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn refresh_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let touched = self.memory.take_touched();
            if !touched.is_empty() {
                self.refresh(touched).await;
            } else if let Some(mut conn) = self.available() {
                // With nothing to refresh, a ping keeps `up` true to the facts and ends a
                // back-off without waiting for request traffic.
                self.call(Op::Ping, async move { redis::cmd("PING").query_async::<()>(&mut conn).await }).await;
            }
        }
    }

    /// Slides the TTL of pins in use and revalidates them in one pipelined round trip; pushes pins
    /// made during an outage (first writer wins, so replicas converge on one answer).
    async fn refresh(&self, touched: Vec<Touched>) {
        let Some(mut conn) = self.available() else { return };
        let touched: Vec<Touched> = touched.into_iter().filter(|t| millis(t.remaining) > 0).collect();
        let mut batch = redis::pipe();
        for t in &touched {
            if t.synced {
                batch.cmd("GETEX").arg(t.key.to_string()).arg("PX").arg(millis(t.remaining));
            } else {
                push_cmd(&mut batch, t, true);
            }
        }
        let Some(replies) =
            self.call(Op::Refresh, async { batch.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await }).await
        else {
            return;
        };
        let mut pushes = redis::pipe();
        let mut pushed = Vec::new();
        for (t, reply) in touched.iter().zip(replies) {
            match reply.map(|value| self.decode(&t.key, &value)) {
                Some(Some((pin, written))) => self.memory.put_verified(&t.key, pin, t.lifetime, written),
                // Written by us just now, or gone from Redis (expired there, or Redis restarted
                // empty): ours goes back in, first writer wins.
                None if !t.synced => self.memory.put_verified(&t.key, t.pin.clone(), t.lifetime, t.written),
                None => {
                    push_cmd(&mut pushes, t, true);
                    pushed.push(t);
                }
                Some(None) => {
                    push_cmd(&mut pushes, t, false);
                    pushed.push(t);
                }
            }
        }
        if pushed.is_empty() {
            return;
        }
        let Some(replies) =
            self.call(Op::Refresh, async { pushes.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await }).await
        else {
            return;
        };
        for (t, reply) in pushed.into_iter().zip(replies) {
            match reply.and_then(|value| Pin::decode(&value)) {
                Some((pin, written)) => self.memory.put_verified(&t.key, pin, t.lifetime, written),
                None => self.memory.put_verified(&t.key, t.pin.clone(), t.lifetime, t.written),
            }
        }
    }
}

/// `SET key value [NX] PX ttl GET` for a touched pin.
fn push_cmd(pipe: &mut redis::Pipeline, t: &Touched, only_if_absent: bool) {
    let set = pipe.cmd("SET").arg(t.key.to_string()).arg(t.pin.encode(t.written));
    if only_if_absent {
        set.arg("NX");
    }
    set.arg("PX").arg(millis(t.remaining)).arg("GET");
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn px(ttl_ms: u64) -> redis::SetOptions {
    redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl_ms))
}

/// `(major, minor)` from `INFO server`.
fn server_version(info: &str) -> Option<(u32, u32)> {
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:"))?.trim();
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

/// A pin as the operator sees it: key, raw value, decoded target, remaining TTL.
pub async fn key_report(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> RedisResult<Option<String>> {
    let (value, ttl_ms): (Option<Vec<u8>>, i64) =
        redis::pipe().cmd("GET").arg(key).cmd("PTTL").arg(key).query_async(conn).await?;
    Ok(value.map(|value| {
        let raw = String::from_utf8_lossy(&value);
        let decoded = match Pin::decode(&value) {
            Some((pin, written)) => {
                let age = SystemTime::now().duration_since(written).unwrap_or_default();
                let pod = pin.pod.map_or("-".to_owned(), |p| p.to_string());
                format!("revision {} pod {pod}, written {}s ago", pin.revision, age.as_secs())
            }
            None => "not a pin: requests treat it as missing and overwrite it".to_owned(),
        };
        let ttl = if ttl_ms >= 0 { format!("{:.1}s", ttl_ms as f64 / 1000.0) } else { "none".to_owned() };
        format!("key    {key}\nvalue  {raw}\n       ({decoded})\nttl    {ttl}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_server_version() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some((7, 0)));
        assert!(server_version("redis_version:6.2.14\r\n").is_some_and(|v| v < MIN_VERSION));
        assert_eq!(server_version("nothing"), None);
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let breaker = Breaker { origin: Instant::now(), open_until_ms: AtomicU64::new(0), failures: AtomicU32::new(0) };
        assert!(breaker.allows());
        assert_eq!(breaker.failure(), (MIN_BACKOFF, true));
        assert!(!breaker.allows());
        assert_eq!(breaker.failure(), (MIN_BACKOFF * 2, false));
        for _ in 0..20 {
            breaker.failure();
        }
        assert_eq!(breaker.failure().0, MAX_BACKOFF);
        assert!(breaker.success());
        assert!(!breaker.success());
    }
}
