//! The shared pin table in Redis, so every activator replica routes a session the same way.
//!
//! A known pin costs no round trip: this replica's `MemoryPins` is the near cache, trusted for
//! `revalidate_after` after Redis last confirmed an entry. The keys of a request that the near
//! cache cannot vouch for (never seen here, or not confirmed recently) are read in one pipelined
//! round trip before the request is decided, so a session pinned through another replica goes to
//! its pod from its first request here; a new session's pin is written in that same round trip
//! (`lookup`). A missing pin is written with `SET … NX PX … GET`, which returns the pin another
//! replica wrote meanwhile if there is one. Re-pins are a Lua compare-and-set that publishes an
//! invalidation in the same round trip.
//!
//! Pins in use get their idle TTL slid, and are revalidated, by a batch every `refresh_interval`,
//! sent in bounded pipelines on a connection of its own with a budget of its own: however many
//! pins are in use, the refresh never delays a request's Redis call nor trips the request path's
//! breaker, and keys of a failed batch are put back for the next one. Redis failing or slowing
//! down never fails a request: the request path's breaker stops asking for a back-off and this
//! replica routes with its own pins meanwhile.
//!
//! A re-pin reaches other replicas through pub/sub within milliseconds; if that message is lost,
//! a pin in use is corrected by the next refresh, and after a resubscribe every near-cache entry
//! is re-read on its next use.
//!
//! A store that lost its pins (restarted without persistence, failed over to an empty replica,
//! flushed) is told by its generation (`GENERATION_KEY`), checked every refresh interval and
//! often after an outage. Each replica that finds a generation it has not seen writes back every
//! pin it holds, first writer wins, and until then (and for a grace after, while the
//! other replicas write back theirs) a key it does not hold waits rather than being pinned anew,
//! so no session that any replica still knows changes pods.
//!
//! This file owns the store, its connections and a request's writes; the parts beside it:
//! `lookup` (a request's read of its keys, with a new session pinned in it), `breaker` (when the
//! request path stops asking Redis), `restore` (the generation and writing back pins a store
//! lost), `refresh` (sliding the TTLs of pins in use), `lent` (the background connection lent to
//! the split's counts and the session-end claims), `admin` (what the `activator pins` commands
//! read and change).

pub(super) mod admin;
mod breaker;
mod lent;
mod lookup;
mod refresh;
mod restore;
mod seats;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use prometheus::{Histogram, IntCounter, IntGauge};
use redis::{AsyncCommands, RedisError, RedisResult};
use tracing::Instrument as _;

use crate::backoff::Backoff;
use crate::labelled::{Labelled, label_values};
use crate::metrics::Registrar;
use crate::pins::memory::{MemoryPins, Touched};
use crate::pins::redis::{Deployment, RedisClient, RedisConnection, RedisTls};
use crate::pins::{Lifetime, LifetimeOf, Pin, PinKey, Written, millis};
use crate::telemetry::SPAN_TARGET;

use breaker::{Breaker, Granted};
pub(crate) use lent::Purpose;
use refresh::REFRESH_TIMEOUT;

/// Pub/sub channel carrying `<key> <replica>` for every re-pin or delete.
pub(super) const INVALIDATIONS: &str = "aa:invalidate";
/// Redis 7.0 brought `SET … NX … GET`.
const MIN_VERSION: (u32, u32) = (7, 0);
/// How long subscribing for invalidations may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Deletes a pin if it still names the target (`<revision> <pod>`) it was read with, and tells
/// every replica's near cache (`activator pins`' channel and format). 1 if it deleted.
const RELEASE_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local target = string.match(current, '^(%S+ %S+) ')
if target ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], KEYS[1] .. ' ' .. ARGV[3])
return 1
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
    /// What a `rediss://` connection trusts and presents beyond the public CAs.
    pub tls: RedisTls,
    /// One server, or a cluster whose seed nodes `url` lists.
    pub deployment: Deployment,
}

label_values! {
    enum Op {
        Get = "get",
        Create = "create",
        Replace = "replace",
        Refresh = "refresh",
        Decode = "decode",
        Connect = "connect",
        Ping = "ping",
        /// Exchanging request counts for `sticky-split-mode: requests`.
        Split = "split",
        /// Claiming the call that tells a pod a session ended.
        End = "end",
        /// Checking the store's generation, and writing pins back to a store that lost them.
        Restore = "restore",
        /// Releasing a strict session's pin whose pod is gone.
        Release = "release",
        /// Pinning a session to a pod with a free seat (`sticky-sessions-per-pod`).
        Claim = "claim",
        /// Counting seats, and the lease of the replica that reports them.
        Seats = "seats",
    }
}

#[derive(Clone)]
pub(crate) struct StoreMetrics {
    errors: Labelled<Op, IntCounter>,
    latency: Labelled<Op, Histogram>,
    up: IntGauge,
    /// Times the store was found without its pins, and the pins written back to it.
    restores: IntCounter,
    restored_pins: IntCounter,
}

impl StoreMetrics {
    pub(crate) fn register(reg: &Registrar) -> Self {
        let errors = reg.counter_vec(
            "activator_pin_store_errors_total",
            "Redis pin-store failures and malformed values, by operation; each one fell back to local pins",
            &["op"],
        );
        let latency = reg.histogram_vec(
            "activator_pin_store_duration_seconds",
            "Redis pin-store call latency, by operation",
            &["op"],
        );
        StoreMetrics {
            errors: Labelled::new(&errors, &[]),
            latency: Labelled::new(&latency, &[]),
            up: reg.gauge(
                "activator_pin_store_up",
                "1 while the shared pin store answers, 0 while this replica routes with its own pins",
            ),
            restores: reg.counter(
                "activator_pin_store_restores_total",
                "Times the shared pin store was found without its pins (restarted empty, failed over, flushed)",
            ),
            restored_pins: reg.counter(
                "activator_pin_store_restored_pins_total",
                "Pins this replica wrote back to the shared store because the store lacked them",
            ),
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.get() == 1
    }
}

/// The two connections to Redis: one for the request path, one for the batched refresh, so a
/// large batch never queues a request's call behind it.
struct Connections {
    requests: RedisConnection,
    background: RedisConnection,
}

pub(crate) struct SharedPins {
    memory: Arc<MemoryPins>,
    conn: OnceLock<Connections>,
    breaker: Breaker,
    config: SharedConfig,
    /// Tags this replica's invalidations so it does not drop its own fresh entries.
    replica: String,
    repin: redis::Script,
    create: redis::Script,
    release: redis::Script,
    seat_scripts: seats::SeatScripts,
    metrics: StoreMetrics,
    /// Set once the first connection attempt ended, however it ended.
    tried: tokio::sync::watch::Sender<bool>,
    /// The store's generation as this replica last saw it; `None` before the first check.
    generation: ArcSwapOption<String>,
    /// Set from an outage (and from the start) until a generation check passes: meanwhile the
    /// store may lack pins that replicas hold, so a key this replica does not hold waits.
    restoring: AtomicBool,
    /// When a generation check last passed.
    checked: std::sync::Mutex<Option<Instant>>,
    /// Asks the guard loop to check the generation now.
    check_now: tokio::sync::Notify,
    restored: tokio::sync::Notify,
    /// When the request path's current outage began, in the breaker's milliseconds; 0 when none.
    outage_since_ms: AtomicU64,
    /// Woken whenever a generation check gets an answer from Redis.
    answered: tokio::sync::Notify,
}

impl SharedPins {
    /// Starts connecting in the background: until Redis answers, pins stay local to this
    /// replica. Only a malformed URL is an error.
    pub(crate) fn start(
        config: SharedConfig,
        memory: Arc<MemoryPins>,
        metrics: StoreMetrics,
    ) -> anyhow::Result<Arc<Self>> {
        let client = RedisClient::new(&config.url, &config.deployment, &config.tls)?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("reading OS randomness: {e}"))?;
        let shared = Arc::new(SharedPins {
            memory,
            conn: OnceLock::new(),
            breaker: Breaker::new(),
            replica: format!("{:016x}", u64::from_ne_bytes(id)),
            repin: redis::Script::new(REPIN_SCRIPT),
            create: redis::Script::new(lookup::CREATE_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            seat_scripts: seats::SeatScripts::default(),
            config,
            metrics,
            tried: tokio::sync::watch::Sender::new(false),
            generation: ArcSwapOption::empty(),
            restoring: AtomicBool::new(true),
            checked: std::sync::Mutex::new(None),
            check_now: tokio::sync::Notify::new(),
            restored: tokio::sync::Notify::new(),
            outage_since_ms: AtomicU64::new(0),
            answered: tokio::sync::Notify::new(),
        });
        tokio::spawn(shared.clone().connect(client.clone()));
        tokio::spawn(shared.clone().follow_invalidations(client));
        tokio::spawn(shared.clone().refresh_loop());
        tokio::spawn(shared.clone().guard_loop());
        Ok(shared)
    }

    /// Completes once the first connection attempt has ended.
    pub(crate) async fn first_attempt(&self) {
        // The sender lives as long as `self`, so this only ends when the flag is set.
        let _ = self.tried.subscribe().wait_for(|tried| *tried).await;
    }

    pub(crate) async fn write(
        &self,
        key: &PinKey,
        expected: Option<&Pin>,
        pin: Pin,
        lifetime: Lifetime,
        lifetime_of: LifetimeOf<'_>,
    ) -> Written {
        let Some((mut conn, granted)) = self.available() else {
            return self.memory.write(key, expected, pin, lifetime);
        };
        let written = SystemTime::now();
        let value = pin.encode(written);
        let ttl_ms = millis(lifetime.remaining(Duration::ZERO));
        let reply = match expected {
            None => {
                let mut set = redis::cmd("SET");
                set.arg(key.to_string()).arg(&value).arg("NX").arg("PX").arg(ttl_ms).arg("GET");
                self.call(Op::Create, granted, async move { set.query_async::<Option<Vec<u8>>>(&mut conn).await }).await
            }
            Some(expected) => {
                let mut repin = self.repin.prepare_invoke();
                repin.key(key.to_string()).arg(expected.target()).arg(&value).arg(ttl_ms);
                repin.arg(INVALIDATIONS).arg(&self.replica);
                self.call(Op::Replace, granted, async move { repin.invoke_async::<Option<Vec<u8>>>(&mut conn).await })
                    .await
            }
        };
        let Some(current) = reply else { return self.memory.write(key, expected, pin, lifetime) };
        match current.map(|value| self.decode(key, &value)) {
            None => {
                self.memory.put_verified(key, pin.clone(), lifetime, written);
                Written { pin, won: true }
            }
            Some(Some((winner, winner_written))) => {
                self.memory.put_verified(key, winner.clone(), lifetime_of(&winner.revision), winner_written);
                Written { pin: winner, won: false }
            }
            // Garbage under the key: ours replaces it.
            Some(None) => {
                let overwritten = match self.available() {
                    Some((mut conn, granted)) => {
                        let set = async move { conn.set_options::<_, _, ()>(key.to_string(), value, px(ttl_ms)).await };
                        self.call(Op::Create, granted, set).await.is_some()
                    }
                    None => false,
                };
                if overwritten {
                    self.memory.put_verified(key, pin.clone(), lifetime, written);
                    Written { pin, won: true }
                } else {
                    self.memory.write(key, expected, pin, lifetime)
                }
            }
        }
    }

    /// Deletes `key`'s pin if it is still `expected`, here and in every replica's near cache.
    /// Without Redis, only here: the other replicas find the pod gone as this one did.
    pub(crate) async fn release(&self, key: &PinKey, expected: &Pin) {
        self.memory.remove(key);
        let Some((mut conn, granted)) = self.available() else { return };
        let mut release = self.release.prepare_invoke();
        release.key(key.to_string()).arg(expected.target()).arg(INVALIDATIONS).arg(&self.replica);
        self.call(Op::Release, granted, async move { release.invoke_async::<i64>(&mut conn).await }).await;
    }

    /// The request path's connection, if the breaker lets a call through.
    fn available(&self) -> Option<(RedisConnection, Granted<'_>)> {
        let conn = self.conn.get()?;
        let permit = self.breaker.permit()?;
        Some((conn.requests.clone(), Granted::new(&self.breaker, permit)))
    }

    fn decode(&self, key: &PinKey, value: &[u8]) -> Option<(Pin, SystemTime)> {
        let decoded = Pin::decode(value);
        if decoded.is_none() {
            self.metrics.errors.get(Op::Decode).inc();
            tracing::warn!(%key, value = %String::from_utf8_lossy(value), "ignoring a malformed pin in Redis; it will be overwritten");
        }
        decoded
    }

    /// Runs one request-path Redis call within the budget; on failure counts it, opens the
    /// breaker, and returns `None` so the caller falls back to this replica's pins.
    async fn call<T>(&self, op: Op, granted: Granted<'_>, call: impl Future<Output = RedisResult<T>>) -> Option<T> {
        // A child of the request's span while traces are on; no span otherwise.
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "pin-store",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system.name = "redis",
            db.operation.name = op.as_str(),
        );
        let mut connection_lost = false;
        let call = futures_util::TryFutureExt::inspect_err(call, |e: &redis::RedisError| {
            connection_lost =
                !e.is_timeout() && (e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error());
        });
        let result = self.timed(op, self.config.timeout, call).instrument(span.clone()).await;
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        // Set on every answer rather than on transitions, which concurrent calls race.
        self.metrics.up.set(i64::from(result.is_ok()));
        // An outage that begins with the connection lost (a restart, a failover) is worth holding
        // new keys for. Noted before the breaker opens, so a request that finds it open finds
        // this too; not once it is open, so an outage that began with timeouts holds nothing.
        if connection_lost && self.breaker.is_closed() {
            let now = self.breaker.now_ms();
            let _ = self.outage_since_ms.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        }
        match (granted.settle(&result), result) {
            (Ok(outage_ended), Ok(value)) => {
                if outage_ended {
                    self.outage_since_ms.store(0, Ordering::Release);
                    tracing::info!("Redis answers again; pins are shared");
                }
                Some(value)
            }
            (Err(Some((backoff, true))), Err(error)) => {
                tracing::warn!(op = op.as_str(), %error, ?backoff, "Redis unavailable; routing with this replica's pins");
                self.restoring.store(true, Ordering::Release);
                None
            }
            _ => None,
        }
    }

    /// Runs one Redis call within `budget`, recording its latency, and its failure if it fails.
    async fn timed<T>(
        &self,
        op: Op,
        budget: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, String> {
        let started = Instant::now();
        let result = tokio::time::timeout(budget, call).await;
        self.metrics.latency.get(op).observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {budget:?}"),
        };
        self.metrics.errors.get(op).inc();
        Err(error)
    }

    async fn connect(self: Arc<Self>, client: RedisClient) {
        let mut backoff = Backoff::default();
        let mut last_error = String::new();
        loop {
            let connected = async {
                let mut requests = client.connect(self.config.timeout).await?;
                let background = client.connect(REFRESH_TIMEOUT).await?;
                let info = requests.server_info().await?;
                Ok::<_, redis::RedisError>((Connections { requests, background }, info))
            };
            let connected = connected.await;
            if connected.is_err() {
                self.tried.send_replace(true);
            }
            match connected {
                Ok((conn, info)) => {
                    let version = server_version(&info);
                    let found = version.map_or("an unknown version".to_owned(), |(a, b)| format!("{a}.{b}"));
                    if version.is_none_or(|v| v < MIN_VERSION) {
                        tracing::error!(
                            "Redis at --redis-url runs {found}; the shared pin table needs Redis 7.0 or newer \
                             (SET ... NX GET). Pins stay local to this replica."
                        );
                        return;
                    }
                    self.metrics.up.set(1);
                    tracing::info!("connected to Redis {found}; pins are shared");
                    // Loaded now, so the first request that runs a script does not pay for
                    // loading it; one that finds it gone (Redis restarted) loads it again.
                    for script in [&self.create, &self.repin, &self.release] {
                        let mut requests = conn.requests.clone();
                        let load = async move { script.prepare_invoke().load_async(&mut requests).await };
                        if let Err(error) = self.timed(Op::Connect, REFRESH_TIMEOUT, load).await {
                            tracing::debug!(%error, "loading a pin-store script failed; it loads on first use");
                        }
                    }
                    let _ = self.conn.set(conn);
                    // Before this replica is ready: pins it made while connecting go in, and it
                    // learns the store's generation.
                    if let Err(error) = self.check_store().await {
                        tracing::warn!(%error, "reading the pin store's generation failed; retried shortly");
                    }
                    self.tried.send_replace(true);
                    return;
                }
                Err(e) => {
                    self.metrics.errors.get(Op::Connect).inc();
                    // Said once per cause, not once per retry.
                    let error = e.to_string();
                    if error != last_error {
                        match misconfigured(&e) {
                            Some(fix) => tracing::error!(%error, "{fix}; pins stay local to this replica meanwhile"),
                            None => tracing::warn!(%error, "cannot reach Redis yet; pins stay local until it answers"),
                        }
                        last_error = error;
                    }
                }
            }
            tokio::time::sleep(backoff.next_pause()).await;
        }
    }

    /// Drops near-cache entries other replicas re-pinned or deleted.
    async fn follow_invalidations(self: Arc<Self>, client: RedisClient) {
        let mut backoff = Backoff::default();
        for attempt in 0.. {
            let subscribed = async {
                let mut pubsub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.pubsub(attempt)).await.ok()?.ok()?;
                pubsub.subscribe(INVALIDATIONS).await.ok()?;
                Some(pubsub)
            };
            if let Some(mut pubsub) = subscribed.await {
                backoff.reset();
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
            tokio::time::sleep(backoff.next_pause()).await;
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

fn px(ttl_ms: u64) -> redis::SetOptions {
    redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl_ms))
}

/// What to fix when Redis turns this activator away for a reason retrying alone will not cure.
fn misconfigured(error: &RedisError) -> Option<&'static str> {
    const CREDENTIALS: &str = "Redis rejected the user name or password in --redis-url (REDIS_URL)";
    match error.code() {
        Some("WRONGPASS") => return Some(CREDENTIALS),
        Some("NOAUTH") => {
            return Some("Redis requires a password: give it in --redis-url as redis://:<password>@<host>:<port>");
        }
        Some("NOPERM") => {
            return Some(
                "the Redis user in --redis-url may not run a command the pin store needs \
                 (GET, SET, GETEX, EVALSHA, EVAL, PUBLISH, SUBSCRIBE, INFO, PING)",
            );
        }
        _ => {}
    }
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return Some(CREDENTIALS);
    }
    let text = error.to_string();
    (text.contains("certificate") || text.contains("UnknownIssuer")).then_some(
        "the Redis server's TLS certificate is not trusted: give its CA with --redis-ca-file (REDIS_CA_FILE)",
    )
}

/// `(major, minor)` from `INFO server`.
fn server_version(info: &str) -> Option<(u32, u32)> {
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:"))?.trim();
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
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
}
