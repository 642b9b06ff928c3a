//! The shared pin table in Redis, so every activator replica routes a session the same way.
//!
//! A known pin costs no round trip: this replica's `MemoryPins` is the near cache, trusted for
//! `revalidate_after` after Redis last confirmed an entry. The keys of a request that the near
//! cache cannot vouch for (never seen here, or not confirmed recently) are read in one pipelined
//! round trip before the request is decided, so a session pinned through another replica goes to
//! its pod from its first request here. A missing pin is written with `SET … NX PX … GET`, which
//! returns the pin another replica wrote meanwhile if there is one. Re-pins are a Lua
//! compare-and-set that publishes an invalidation in the same round trip.
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

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use prometheus::{Histogram, IntCounter, IntGauge};
use redis::{AsyncCommands, RedisError, RedisResult};

use tracing::Instrument as _;

use super::memory::{MemoryPins, Near, Touched};
use super::redis::{Deployment, RedisClient, RedisConnection, RedisTls};
use super::{Ended, Lifetime, LifetimeOf, Pin, PinKey, PinSource, Written, millis, unix_millis};
use crate::backoff::Backoff;
use crate::served::COUNT_PERIOD_SECONDS;
use crate::stats::Stats;
use crate::telemetry::SPAN_TARGET;

/// Pub/sub channel carrying `<key> <replica>` for every re-pin or delete.
pub const INVALIDATIONS: &str = "aa:invalidate";
/// Redis 7.0 brought `SET … NX … GET`.
const MIN_VERSION: (u32, u32) = (7, 0);
/// How long subscribing for invalidations may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The request path's pause after a failed Redis call, doubling for each pause that ends in a
/// failure. The cap bounds how long sharing takes to resume after Redis returns.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Pins refreshed per pipeline: a batch Redis answers in about a millisecond, so one pipeline
/// never holds the background connection long.
const REFRESH_CHUNK: usize = 500;
/// Budget for one refresh pipeline; off the request path, so it can afford to be generous.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// The key whose value names what the store holds: set (`SET … NX`) by the first replica to find
/// it missing. A value other than the one last seen, or none, means the store lost its data.
const GENERATION_KEY: &str = "aa:generation";
/// How often the generation is checked from an outage until a check passes.
const RESTORE_POLL: Duration = Duration::from_millis(100);
/// After writing back its pins to a store that lost them, a replica leaves the others this many
/// refresh intervals to write back theirs before it pins keys it does not hold: each checks the
/// generation every interval, and within a poll of an outage ending.
const RESTORE_GRACE_INTERVALS: u32 = 2;
/// The longest a request for a key this replica does not hold waits beyond the grace for the
/// store's pins to be written back; after it, the request is decided with the store as it is.
const RESTORE_WAIT_BEYOND_GRACE: Duration = Duration::from_secs(1);
/// How long into an outage that began with the connection lost a request for a key this replica
/// does not hold waits for Redis to answer again before it is decided without it. Another replica
/// may have pinned the key just before the outage, on a world that has changed since; a Redis
/// restarted in place answers within this, and the pin is then written back before the request
/// is decided. Later in an outage (a Redis that stays down), or in one that began with Redis slow
/// to answer (its pins are still there, and holding would add its slowness to every new session),
/// requests are decided at once.
const OUTAGE_HOLD: Duration = Duration::from_secs(1);

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

/// Adds this replica's request counts to the service's per-period hashes and reads the window's
/// back, in one step. KEYS: the window's period hashes, oldest first. ARGV: the TTL, the most a
/// period may plausibly count, the number of revisions, the revisions, then (key index, revision
/// index, count) triples. A count already there that is not a plausible one (written by no
/// activator) is replaced rather than added to, where `HINCRBY` would fail the whole exchange.
/// Returns the number replaced and, per period, each revision's count as stored.
const COUNT_SCRIPT: &str = r"
local ttl, most, revisions = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local replaced = 0
local i = 4 + revisions
while i + 2 <= #ARGV do
  local key, field, n = KEYS[tonumber(ARGV[i])], ARGV[3 + tonumber(ARGV[i + 1])], ARGV[i + 2]
  local held = tonumber(redis.call('HGET', key, field))
  if held and held >= 0 and held + tonumber(n) <= most then
    redis.call('HINCRBY', key, field, n)
  else
    if redis.call('HEXISTS', key, field) == 1 then replaced = replaced + 1 end
    redis.call('HSET', key, field, n)
  end
  redis.call('EXPIRE', key, ttl)
  i = i + 3
end
local fields = {}
for r = 1, revisions do fields[r] = ARGV[3 + r] end
local rows = {}
for k = 1, #KEYS do rows[k] = redis.call('HMGET', KEYS[k], unpack(fields)) end
return {replaced, rows}
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

#[derive(Clone, Copy)]
enum Op {
    Get,
    Create,
    Replace,
    Refresh,
    Decode,
    Connect,
    Ping,
    /// Exchanging request counts for `sticky-split-mode: requests`.
    Split,
    /// Claiming the call that tells a pod a session ended.
    End,
    /// Checking the store's generation, and writing pins back to a store that lost them.
    Restore,
}

const OPS: [&str; 10] = ["get", "create", "replace", "refresh", "decode", "connect", "ping", "split", "end", "restore"];
/// How long a claim on a pin's end call is kept: far longer than replicas take to notice the
/// same end, each within a second or two.
const END_CLAIM_TTL: Duration = Duration::from_secs(3600);
/// More requests in one period than every activator could route (a hundred million a second):
/// a value in Redis above it was not written by one, and is left out.
const MAX_PERIOD_COUNT: u64 = 100_000_000 * COUNT_PERIOD_SECONDS;

/// Whether the request path may ask Redis now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permit {
    /// Closed: every call may go.
    Call,
    /// The one call allowed after a back-off: its outcome closes or reopens the breaker.
    Probe,
}

/// Stops the request path asking Redis after a failure. Failures are counted per back-off
/// window: however many calls in flight fail together, the back-off grows once, and when it ends
/// a single call probes Redis while the others keep routing with local pins.
struct Breaker {
    origin: Instant,
    /// 0 while closed, else the end of the back-off in milliseconds since `origin`.
    open_until_ms: AtomicU64,
    /// Back-off windows in a row that ended in a failure.
    failures: AtomicU32,
    /// Set while the half-open probe is out.
    probing: AtomicBool,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            origin: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means closed.
        millis(self.origin.elapsed()).max(1)
    }

    /// Whether calls go through now (no back-off), without claiming anything.
    fn is_closed(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) == 0
    }

    fn permit(&self) -> Option<Permit> {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Some(Permit::Call);
        }
        if self.now_ms() < until {
            return None;
        }
        let claimed = self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        claimed.then_some(Permit::Probe)
    }

    /// Returns whether this success ended an outage.
    fn success(&self, permit: Permit) -> bool {
        if permit != Permit::Probe {
            // Read only: on the happy path nobody writes the shared cache line.
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.open_until_ms.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        true
    }

    /// Closes the breaker: Redis answered a call off the request path. Returns whether it was
    /// open.
    fn reset(&self) -> bool {
        let was_open = self.open_until_ms.swap(0, Ordering::AcqRel) != 0;
        self.failures.store(0, Ordering::Relaxed);
        was_open
    }

    /// Opens the breaker unless a failure of this window already did; returns the back-off and
    /// whether this failure started an outage.
    fn failure(&self, permit: Permit) -> Option<(Duration, bool)> {
        match permit {
            Permit::Probe => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                let backoff = backoff(failures);
                self.open_until_ms.store(self.now_ms().saturating_add(millis(backoff)), Ordering::Release);
                self.probing.store(false, Ordering::Release);
                Some((backoff, false))
            }
            Permit::Call => {
                let backoff = backoff(1);
                let until = self.now_ms().saturating_add(millis(backoff));
                // Only the first failure of a closed breaker opens it; calls that were already in
                // flight and fail afterwards belong to the same window.
                let opened = self.open_until_ms.compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed).is_ok();
                opened.then(|| {
                    self.failures.store(1, Ordering::Relaxed);
                    (backoff, true)
                })
            }
        }
    }
}

/// A permit to call Redis. A probe whose call never completes (its request went away) hands the
/// probe on to the next caller instead of leaving the breaker waiting for it.
struct Granted<'a> {
    breaker: &'a Breaker,
    permit: Permit,
    settled: bool,
}

impl Granted<'_> {
    /// Records the outcome; returns whether a success ended an outage, or the back-off a failure
    /// started and whether it started an outage.
    fn settle<T, E>(mut self, result: &Result<T, E>) -> Result<bool, Option<(Duration, bool)>> {
        self.settled = true;
        match result {
            Ok(_) => Ok(self.breaker.success(self.permit)),
            Err(_) => Err(self.breaker.failure(self.permit)),
        }
    }
}

impl Drop for Granted<'_> {
    fn drop(&mut self) {
        if !self.settled && self.permit == Permit::Probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

/// The back-off after `failures` windows in a row ended in a failure.
fn backoff(failures: u32) -> Duration {
    MIN_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

struct StoreMetrics {
    errors: [IntCounter; OPS.len()],
    latency: [Histogram; OPS.len()],
    up: IntGauge,
    restores: IntCounter,
    restored_pins: IntCounter,
}

/// The two connections to Redis: one for the request path, one for the batched refresh, so a
/// large batch never queues a request's call behind it.
struct Connections {
    requests: RedisConnection,
    background: RedisConnection,
}

pub struct SharedPins {
    memory: Arc<MemoryPins>,
    conn: OnceLock<Connections>,
    breaker: Breaker,
    config: SharedConfig,
    /// Tags this replica's invalidations so it does not drop its own fresh entries.
    replica: String,
    repin: redis::Script,
    counts: redis::Script,
    metrics: StoreMetrics,
    /// Set once the first connection attempt ended, however it ended.
    tried: tokio::sync::watch::Sender<bool>,
    /// The store's generation as this replica last saw it; `None` before the first check.
    generation: std::sync::Mutex<Option<String>>,
    /// Set from an outage (and from the start) until a generation check passes: meanwhile the
    /// store may lack pins that replicas hold, so a key this replica does not hold waits.
    restoring: AtomicBool,
    /// When a generation check last passed.
    checked: std::sync::Mutex<Option<Instant>>,
    /// The hash of `generation`, for the request path to compare without a lock; 0 before the
    /// first check.
    generation_hash: AtomicU64,
    /// Asks the guard loop to check the generation now.
    check_now: tokio::sync::Notify,
    restored: tokio::sync::Notify,
    /// When the request path's current outage began, in the breaker's milliseconds; 0 when none.
    outage_since_ms: AtomicU64,
    /// Woken whenever a generation check gets an answer from Redis.
    answered: tokio::sync::Notify,
}

/// What one pass of `lookup` found.
enum Looked<const N: usize> {
    Found([(Option<Pin>, PinSource); N]),
    /// The store lost its pins: they are being written back.
    StoreLost,
    /// Redis did not answer early in an outage, for a key this replica does not hold: what this
    /// replica's own pins say, if waiting for Redis is in vain.
    Unreachable([(Option<Pin>, PinSource); N]),
}

impl SharedPins {
    /// Starts connecting in the background: until Redis answers, pins stay local to this
    /// replica. Only a malformed URL is an error.
    pub fn start(config: SharedConfig, memory: Arc<MemoryPins>, stats: &Stats) -> anyhow::Result<Arc<Self>> {
        let client = RedisClient::new(&config.url, &config.deployment, &config.tls)?;
        let metrics = StoreMetrics {
            errors: OPS.map(|op| stats.pin_store_errors.with_label_values(&[op])),
            latency: OPS.map(|op| stats.pin_store_latency.with_label_values(&[op])),
            up: stats.pin_store_up.clone(),
            restores: stats.pin_store_restores.clone(),
            restored_pins: stats.pin_store_restored_pins.clone(),
        };
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("reading OS randomness: {e}"))?;
        let shared = Arc::new(SharedPins {
            memory,
            conn: OnceLock::new(),
            breaker: Breaker::new(),
            replica: format!("{:016x}", u64::from_ne_bytes(id)),
            repin: redis::Script::new(REPIN_SCRIPT),
            counts: redis::Script::new(COUNT_SCRIPT),
            config,
            metrics,
            tried: tokio::sync::watch::Sender::new(false),
            generation: std::sync::Mutex::new(None),
            restoring: AtomicBool::new(true),
            checked: std::sync::Mutex::new(None),
            generation_hash: AtomicU64::new(0),
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
    pub async fn first_attempt(&self) {
        // The sender lives as long as `self`, so this only ends when the flag is set.
        let _ = self.tried.subscribe().wait_for(|tried| *tried).await;
    }

    /// The pins of `keys`: fresh near-cache entries as they are, the others read from Redis in
    /// one pipelined round trip. Without Redis, this replica's own pins.
    pub async fn lookup<const N: usize>(
        &self,
        keys: [Option<&PinKey>; N],
        lifetime_of: LifetimeOf<'_>,
    ) -> [(Option<Pin>, PinSource); N] {
        let (mut check_generation, mut hold) = (true, true);
        // Each of the two waits happens once, so this ends by the third pass.
        loop {
            match self.lookup_once(keys, lifetime_of, check_generation, hold).await {
                Looked::Found(found) => return found,
                // The store came back empty just now: its pins are written back first.
                Looked::StoreLost => {
                    self.wait_restored().await;
                    check_generation = false;
                }
                Looked::Unreachable(found) => {
                    hold = false;
                    if !self.wait_answer().await {
                        return found;
                    }
                }
            }
        }
    }

    /// One pass of `lookup`. For a key this replica does not hold: `StoreLost` if
    /// `check_generation` and the round trip found a store that lost its pins; `Unreachable` if
    /// `hold` and Redis did not answer early in an outage.
    async fn lookup_once<const N: usize>(
        &self,
        keys: [Option<&PinKey>; N],
        lifetime_of: LifetimeOf<'_>,
        check_generation: bool,
        hold: bool,
    ) -> Looked<N> {
        let mut found: [(Option<Pin>, PinSource); N] = std::array::from_fn(|_| (None, PinSource::NearCache));
        let mut ask = Vec::new();
        // While the store may lack pins replicas hold, this replica's own stand until it has
        // written them back, and a key it does not hold waits for the writing back to end.
        let restoring = self.restoring.load(Ordering::Acquire);
        let mut absent = false;
        for (i, key) in keys.iter().enumerate() {
            let Some(key) = key else { continue };
            match self.memory.near(key, self.config.revalidate_after, lifetime_of) {
                Near::Fresh(pin) => found[i].0 = Some(pin),
                Near::Stale if restoring => found[i] = (self.memory.get(key, lifetime_of), PinSource::Fallback),
                Near::Stale => ask.push((i, *key, None)),
                Near::Absent => {
                    absent = true;
                    ask.push((i, *key, None));
                }
                Near::Local(local) => ask.push((i, *key, Some(local))),
            }
        }
        if ask.is_empty() {
            return Looked::Found(found);
        }
        if absent && restoring {
            self.wait_restored().await;
        }
        // A key this replica does not hold is read with the store's generation, in the same
        // round trip: a store restarted empty is seen by the first request that would otherwise
        // pin anew what another replica still holds. A cluster pipeline takes one slot only.
        let generation = check_generation && absent && !self.is_cluster();
        let replies = match self.available() {
            Some((mut conn, granted)) => {
                let mut pipe = redis::pipe();
                for (_, key, local) in &ask {
                    match local {
                        // Ours goes in unless another replica's is there; either way the reply
                        // says which holds, in this one round trip.
                        Some(local) => push_cmd(&mut pipe, local, true),
                        None => {
                            pipe.get(key.to_string());
                        }
                    }
                }
                if generation {
                    pipe.get(GENERATION_KEY);
                }
                let read = async move { pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await };
                let expected = ask.len() + usize::from(generation);
                self.call(Op::Get, granted, read).await.filter(|replies| replies.len() == expected)
            }
            None => None,
        };
        let Some(mut replies) = replies else {
            let mut held_here = true;
            for (i, key, _) in ask {
                found[i] = (self.memory.get(key, lifetime_of), PinSource::Fallback);
                held_here &= found[i].0.is_some();
            }
            return match hold && !held_here && self.outage_is_young() {
                true => Looked::Unreachable(found),
                false => Looked::Found(found),
            };
        };
        if generation && !self.is_current_generation(replies.pop().flatten().as_deref()) {
            self.restoring.store(true, Ordering::Release);
            self.check_now.notify_one();
            return Looked::StoreLost;
        }
        for ((i, key, local), reply) in ask.into_iter().zip(replies) {
            found[i].1 = PinSource::Redis;
            found[i].0 = match (reply, local) {
                (Some(value), _) => self.decode(key, &value).map(|(pin, written)| {
                    self.memory.put_verified(key, pin.clone(), lifetime_of(&pin.revision), written);
                    pin
                }),
                (None, Some(local)) => {
                    self.memory.put_verified(key, local.pin.clone(), local.lifetime, local.written);
                    Some(local.pin)
                }
                // Not in Redis: a pin this replica made during an outage, which this lookup
                // could not see yet, still holds here.
                (None, None) => self.memory.get(key, lifetime_of),
            };
        }
        Looked::Found(found)
    }

    /// Whether the request path's outage began less than `OUTAGE_HOLD` ago.
    fn outage_is_young(&self) -> bool {
        let since = self.outage_since_ms.load(Ordering::Acquire);
        since != 0 && self.breaker.now_ms().saturating_sub(since) < millis(OUTAGE_HOLD)
    }

    /// Waits, until `OUTAGE_HOLD` into the outage, for Redis to answer a generation check, then
    /// for the pins it lost to be written back. Whether Redis answered.
    async fn wait_answer(&self) -> bool {
        let answered = self.answered.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        if self.breaker.is_closed() {
            return true;
        }
        let since = self.outage_since_ms.load(Ordering::Acquire);
        let left = (since + millis(OUTAGE_HOLD)).saturating_sub(self.breaker.now_ms());
        self.check_now.notify_one();
        if tokio::time::timeout(Duration::from_millis(left), answered).await.is_err() {
            return false;
        }
        self.wait_restored().await;
        true
    }

    fn is_cluster(&self) -> bool {
        self.conn.get().is_some_and(|c| matches!(c.requests, RedisConnection::Cluster(_)))
    }

    /// Whether `generation` (as read from the store) is the one this replica last saw; any value
    /// is, before it has seen one.
    fn is_current_generation(&self, generation: Option<&[u8]>) -> bool {
        let known = self.generation_hash.load(Ordering::Acquire);
        known == 0 || generation.is_some_and(|g| xxhash_rust::xxh3::xxh3_64(g).max(1) == known)
    }

    pub async fn write(
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

    /// Adds `counts` (per revision, requests routed here since the last exchange, by period) to
    /// the service's shared counts, and returns each revision's requests over the last
    /// `window_seconds` through every replica: one script on the background connection, keys
    /// under the service's hash tag so a cluster takes it whole. A period's count that no
    /// activator could have made (above `MAX_PERIOD_COUNT`, or not a count at all) is left out
    /// (and replaced where this replica adds to it), counted as a malformed value; sums
    /// saturate. `None` if Redis did not answer.
    pub async fn exchange_counts(
        &self,
        scope: &str,
        counts: &[(&str, &[(u64, u64)])],
        window_seconds: u64,
    ) -> Option<Vec<u64>> {
        let mut conn = self.conn.get()?.background.clone();
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
        let (now, periods) = (unix / COUNT_PERIOD_SECONDS, window_seconds.div_ceil(COUNT_PERIOD_SECONDS).max(1));
        let first = now + 1 - periods;
        let mut script = self.counts.prepare_invoke();
        for period in first..=now {
            script.key(format!("aa:split:{{{scope}}}:{period}"));
        }
        script.arg((periods + 1) * COUNT_PERIOD_SECONDS).arg(MAX_PERIOD_COUNT).arg(counts.len());
        for (revision, _) in counts {
            script.arg(*revision);
        }
        for (r, (_, by_period)) in counts.iter().enumerate() {
            for &(period, n) in by_period.iter().filter(|(period, n)| *n > 0 && *period >= first && *period <= now) {
                script.arg(period - first + 1).arg(r + 1).arg(n.min(MAX_PERIOD_COUNT));
            }
        }
        let sent = script.invoke_async::<(u64, Vec<Vec<Option<redis::Value>>>)>(&mut conn);
        match self.timed(Op::Split, REFRESH_TIMEOUT, sent).await {
            Ok((replaced, periods)) => {
                if replaced > 0 {
                    self.metrics.errors[Op::Decode as usize].inc_by(replaced);
                    tracing::warn!(%scope, replaced, "replaced implausible request counts in Redis");
                }
                Some(
                    (0..counts.len())
                        .map(|i| {
                            let values = periods.iter().filter_map(|p| p.get(i).cloned().flatten());
                            values.filter_map(|v| self.plausible_count(scope, &v)).fold(0u64, u64::saturating_add)
                        })
                        .collect(),
                )
            }
            Err(error) => {
                tracing::debug!(%scope, %error, "exchanging request counts failed; this replica's counts decide");
                None
            }
        }
    }

    /// A period's shared count, if it is one activators could have made.
    fn plausible_count(&self, scope: &str, value: &redis::Value) -> Option<u64> {
        match plausible(value) {
            Some(n) => Some(n),
            None => {
                self.metrics.errors[Op::Decode as usize].inc();
                tracing::warn!(%scope, ?value, "ignoring an implausible request count in Redis");
                None
            }
        }
    }

    /// Whether this replica calls the pod about `ended` (see `Pins::claim_end`); `None` if Redis
    /// did not answer. A pin that went idle here still lives if Redis holds it with more time
    /// left than one refresh takes to arrive: another replica used it since.
    pub async fn claim_end(&self, ended: &Ended) -> Option<bool> {
        let mut conn = self.conn.get()?.background.clone();
        let key = ended.key.to_string();
        let written = unix_millis(ended.written);
        let claim = format!("aa:end:{{{}}}:{:032x}:{written}", ended.key.scope, ended.key.id_hash);
        let grace = millis(self.config.refresh_interval) + 500;
        let call = async move {
            if !ended.moved {
                let (value, ttl): (Option<Vec<u8>>, i64) =
                    redis::pipe().cmd("GET").arg(&key).cmd("PTTL").arg(&key).query_async(&mut conn).await?;
                let same = value
                    .as_deref()
                    .and_then(Pin::decode)
                    .is_some_and(|(pin, at)| pin == ended.pin && unix_millis(at) == written);
                if same && u64::try_from(ttl).is_ok_and(|ttl| ttl > grace) {
                    return Ok(false);
                }
            }
            let claimed: Option<String> = redis::cmd("SET")
                .arg(&claim)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(millis(END_CLAIM_TTL))
                .query_async(&mut conn)
                .await?;
            Ok(claimed.is_some())
        };
        self.timed(Op::End, REFRESH_TIMEOUT, call).await.ok()
    }

    /// The request path's connection, if the breaker lets a call through.
    fn available(&self) -> Option<(RedisConnection, Granted<'_>)> {
        let conn = self.conn.get()?;
        let permit = self.breaker.permit()?;
        Some((conn.requests.clone(), Granted { breaker: &self.breaker, permit, settled: false }))
    }

    fn decode(&self, key: &PinKey, value: &[u8]) -> Option<(Pin, SystemTime)> {
        let decoded = Pin::decode(value);
        if decoded.is_none() {
            self.metrics.errors[Op::Decode as usize].inc();
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
            db.operation.name = OPS[op as usize],
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
        match (granted.settle(&result), result) {
            (Ok(outage_ended), Ok(value)) => {
                if outage_ended {
                    self.outage_since_ms.store(0, Ordering::Release);
                    tracing::info!("Redis answers again; pins are shared");
                }
                Some(value)
            }
            (Err(Some((backoff, true))), Err(error)) => {
                tracing::warn!(op = OPS[op as usize], %error, ?backoff, "Redis unavailable; routing with this replica's pins");
                // Only a lost connection (a restart, a failover) is worth holding new keys for.
                let since = if connection_lost { self.breaker.now_ms() } else { 0 };
                self.outage_since_ms.store(since, Ordering::Release);
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
        self.metrics.latency[op as usize].observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {budget:?}"),
        };
        self.metrics.errors[op as usize].inc();
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
                    // Before this replica is ready: pins it made while connecting go in, and it
                    // learns the store's generation.
                    if let Err(error) = self.check_store().await {
                        tracing::warn!(%error, "reading the pin store's generation failed; retried shortly");
                    }
                    self.tried.send_replace(true);
                    return;
                }
                Err(e) => {
                    self.metrics.errors[Op::Connect as usize].inc();
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

    /// Checks the store's generation every refresh interval, and every `RESTORE_POLL` from an
    /// outage until a check passes.
    async fn guard_loop(self: Arc<Self>) {
        loop {
            let restoring = self.restoring.load(Ordering::Acquire);
            let pause = if restoring { RESTORE_POLL } else { self.config.refresh_interval };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.check_now.notified() => {}
            }
            let recent = crate::sync::lock(&self.checked).is_some_and(|at| at.elapsed() < self.config.refresh_interval);
            if recent && !self.restoring.load(Ordering::Acquire) {
                continue;
            }
            if self.conn.get().is_some()
                && let Err(error) = self.check_store().await
            {
                // The store may have restarted: until a check passes, what it holds is in doubt.
                self.restoring.store(true, Ordering::Release);
                tracing::debug!(%error, "checking the pin store's generation failed; retried shortly");
            }
        }
    }

    /// Reads the store's generation (making one if there is none). One this replica has not
    /// seen means the store lost its pins: every pin held here goes back in, first writer wins
    /// (a pin another replica wrote back first is adopted), and keys this replica does not hold
    /// wait a grace more while the others write back theirs. Ends `restoring` unless Redis
    /// failed.
    async fn check_store(&self) -> Result<(), String> {
        let mut conn = self.conn.get().ok_or("not connected")?.background.clone();
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| e.to_string())?;
        let candidate = hex::encode(id);
        let mut set = redis::cmd("SET");
        set.arg(GENERATION_KEY).arg(&candidate).arg("NX").arg("GET");
        let read = async move { set.query_async::<Option<Vec<u8>>>(&mut conn).await };
        let held = self.timed(Op::Restore, REFRESH_TIMEOUT, read).await?;
        // Redis answers: the request path need not wait for its back-off to end to ask it again.
        if self.breaker.reset() {
            self.metrics.up.set(1);
            tracing::info!("Redis answers again; pins are shared");
        }
        self.outage_since_ms.store(0, Ordering::Release);
        self.answered.notify_waiters();
        let current = held.map_or(candidate, |held| String::from_utf8_lossy(&held).into_owned());
        let previous = crate::sync::lock(&self.generation).clone();
        if previous.as_deref() != Some(current.as_str()) {
            let lost = previous.is_some();
            // Keys this replica does not hold wait from now until the pins are back.
            self.restoring.store(true, Ordering::Release);
            let pins: Vec<Touched> = self.memory.live().into_iter().map(|t| Touched { synced: false, ..t }).collect();
            let count = pins.len() as u64;
            if lost {
                self.metrics.restores.inc();
                tracing::warn!(
                    pins = count,
                    previous = previous.as_deref().unwrap_or_default(),
                    current = current.as_str(),
                    "the pin store lost its pins; writing back this replica's"
                );
            }
            self.write_back(pins).await?;
            self.generation_hash.store(xxhash_rust::xxh3::xxh3_64(current.as_bytes()).max(1), Ordering::Release);
            *crate::sync::lock(&self.generation) = Some(current);
            if lost {
                self.metrics.restored_pins.inc_by(count);
                tokio::time::sleep(self.config.refresh_interval * RESTORE_GRACE_INTERVALS).await;
            }
        }
        *crate::sync::lock(&self.checked) = Some(Instant::now());
        if self.restoring.swap(false, Ordering::AcqRel) {
            self.restored.notify_waiters();
        }
        Ok(())
    }

    /// Puts `pins` into the store where it has none for their keys, in the refresh's pipelines.
    async fn write_back(&self, pins: Vec<Touched>) -> Result<(), String> {
        let conn = self.conn.get().ok_or("not connected")?.background.clone();
        let pins = pins.into_iter().filter(|t| millis(t.remaining) > 0);
        for chunk in chunks(pins, matches!(conn, RedisConnection::Cluster(_))) {
            let failed = self.refresh_chunk(conn.clone(), chunk).await;
            if !failed.is_empty() {
                return Err(format!("{} pins not written back", failed.len()));
            }
        }
        Ok(())
    }

    /// Waits, at most the grace and `RESTORE_WAIT_BEYOND_GRACE`, for the store's pins to be
    /// written back, unless Redis is out of reach (the request then routes with this replica's
    /// pins at once).
    async fn wait_restored(&self) {
        let restored = self.restored.notified();
        tokio::pin!(restored);
        restored.as_mut().enable();
        if !self.restoring.load(Ordering::Acquire) || !self.breaker.is_closed() {
            return;
        }
        let wait = self.config.refresh_interval * RESTORE_GRACE_INTERVALS + RESTORE_WAIT_BEYOND_GRACE;
        let _ = tokio::time::timeout(wait, restored).await;
    }

    async fn refresh_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let touched = self.memory.take_touched();
            let idle = touched.is_empty();
            if !idle {
                self.refresh(touched).await;
            }
            // With no request traffic to Redis, a ping keeps `up` true to the facts and ends a
            // back-off (as the half-open probe) without waiting for a request.
            if let Some((mut conn, granted)) = self.available()
                && (idle || granted.permit == Permit::Probe)
            {
                self.call(Op::Ping, granted, async move { redis::cmd("PING").query_async::<()>(&mut conn).await })
                    .await;
            }
        }
    }

    /// Slides the TTL of pins in use and revalidates them, in pipelines of `REFRESH_CHUNK` on the
    /// background connection; pushes pins made during an outage (first writer wins, so replicas
    /// converge on one answer). Keys whose refresh failed are put back for the next tick.
    async fn refresh(&self, touched: Vec<Touched>) {
        let Some(conn) = self.conn.get().map(|c| c.background.clone()) else {
            self.memory.retouch(touched.into_iter().map(|t| t.key));
            return;
        };
        let touched = touched.into_iter().filter(|t| millis(t.remaining) > 0);
        let mut chunks = chunks(touched, matches!(conn, RedisConnection::Cluster(_))).into_iter();
        while let Some(chunk) = chunks.next() {
            let failed = self.refresh_chunk(conn.clone(), chunk).await;
            if !failed.is_empty() {
                // Redis is failing: keep every key not yet refreshed for the next tick.
                self.memory.retouch(failed.into_iter().chain(chunks.flatten()).map(|t| t.key));
                return;
            }
        }
    }

    /// Refreshes one chunk; returns the pins that must be tried again (all of them if the
    /// pipeline failed, else those whose own command failed).
    async fn refresh_chunk(&self, mut conn: RedisConnection, touched: Vec<Touched>) -> Vec<Touched> {
        let mut batch = redis::pipe();
        batch.ignore_errors();
        for t in &touched {
            if t.synced {
                batch.cmd("GETEX").arg(t.key.to_string()).arg("PX").arg(millis(t.remaining));
            } else {
                push_cmd(&mut batch, t, true);
            }
        }
        let sent = batch.query_async::<Vec<RedisResult<Option<Vec<u8>>>>>(&mut conn);
        let replies = match self.timed(Op::Refresh, REFRESH_TIMEOUT, sent).await {
            Ok(replies) if replies.len() == touched.len() => replies,
            Ok(_) | Err(_) => return touched,
        };
        let mut retry = Vec::new();
        let mut pushes = redis::pipe();
        pushes.ignore_errors();
        let mut pushed = Vec::new();
        for (t, reply) in touched.into_iter().zip(replies) {
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    self.metrics.errors[Op::Refresh as usize].inc();
                    tracing::debug!(key = %t.key, error = %e, "refreshing one pin failed; retried next tick");
                    retry.push(t);
                    continue;
                }
            };
            match reply.map(|value| self.decode(&t.key, &value)) {
                Some(Some((pin, written))) => self.memory.put_verified(&t.key, pin, t.lifetime, written),
                // Written by us just now, or gone from Redis (expired there, or Redis restarted
                // empty): ours goes back in, first writer wins.
                None if !t.synced => self.memory.put_verified(&t.key, t.pin.clone(), t.lifetime, t.written),
                None => {
                    push_cmd(&mut pushes, &t, true);
                    pushed.push(t);
                }
                Some(None) => {
                    push_cmd(&mut pushes, &t, false);
                    pushed.push(t);
                }
            }
        }
        if pushed.is_empty() {
            return retry;
        }
        let sent = pushes.query_async::<Vec<RedisResult<Option<Vec<u8>>>>>(&mut conn);
        let replies = match self.timed(Op::Refresh, REFRESH_TIMEOUT, sent).await {
            Ok(replies) if replies.len() == pushed.len() => replies,
            Ok(_) | Err(_) => {
                retry.extend(pushed);
                return retry;
            }
        };
        for (t, reply) in pushed.into_iter().zip(replies) {
            match reply {
                Ok(reply) => match reply.and_then(|value| Pin::decode(&value)) {
                    Some((pin, written)) => self.memory.put_verified(&t.key, pin, t.lifetime, written),
                    None => self.memory.put_verified(&t.key, t.pin.clone(), t.lifetime, t.written),
                },
                Err(_) => {
                    self.metrics.errors[Op::Refresh as usize].inc();
                    retry.push(t);
                }
            }
        }
        retry
    }
}

/// Pins to refresh in pipelines of at most `REFRESH_CHUNK`. A cluster takes a pipeline only when
/// its keys share a slot, so there each chunk holds one service's pins (its keys' hash tag).
fn chunks(touched: impl Iterator<Item = Touched>, by_slot: bool) -> Vec<Vec<Touched>> {
    let groups: Vec<Vec<Touched>> = if by_slot {
        let mut by_service: HashMap<Arc<str>, Vec<Touched>> = HashMap::new();
        for t in touched {
            by_service.entry(t.key.scope().clone()).or_default().push(t);
        }
        by_service.into_values().collect()
    } else {
        vec![touched.collect()]
    };
    let mut chunks = Vec::new();
    for mut group in groups {
        while !group.is_empty() {
            let rest = group.split_off(group.len().min(REFRESH_CHUNK));
            chunks.push(std::mem::replace(&mut group, rest));
        }
    }
    chunks
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

/// Where a drained session pin points: no pod is ever ready there, so the session's next request
/// is re-pinned to another pod of its revision, as when its pod leaves.
pub const DRAINED_POD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// What one pin of `keys` says, for `activator pins list`: its revision and pod.
pub async fn pin_targets(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &[String],
) -> RedisResult<Vec<Option<(Pin, SystemTime)>>> {
    let mut get = redis::pipe();
    keys.iter().for_each(|key| {
        get.get(key);
    });
    let values: Vec<Option<Vec<u8>>> = get.query_async(conn).await?;
    Ok(values.into_iter().map(|value| value.and_then(|v| Pin::decode(&v))).collect())
}

/// Moves every session pin of `keys` that names `pod` off it (`activator pins drain`), keeping
/// its revision, written time and TTL, and tells every replica's near cache. Each goes to the pod
/// of `to`, or else of its revision's other pinned pods, holding the fewest sessions; with no other
/// pod known, to `DRAINED_POD`, so the next request picks one. Compare-and-set, so a pin re-pinned
/// meanwhile is left as it is. Returns how many were moved.
pub async fn drain_pod(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &[String],
    pod: SocketAddr,
    to: &[SocketAddr],
) -> RedisResult<usize> {
    let found = pin_targets(conn, keys).await?;
    // Sessions per pod of each revision, the pod being drained left out.
    let mut load: HashMap<(Arc<str>, SocketAddr), usize> = HashMap::new();
    for (pin, _) in found.iter().flatten() {
        if let Some(other) = pin.pod.filter(|p| *p != pod && *p != DRAINED_POD && (to.is_empty() || to.contains(p))) {
            *load.entry((pin.revision.clone(), other)).or_default() += 1;
        }
    }
    for target in to {
        for (pin, _) in found.iter().flatten() {
            load.entry((pin.revision.clone(), *target)).or_default();
        }
    }
    let script = redis::Script::new(REPIN_SCRIPT);
    let mut drained = 0;
    for (key, found) in keys.iter().zip(found) {
        let Some((pin, written)) = found.filter(|(pin, _)| pin.pod == Some(pod)) else { continue };
        let ttl_ms: i64 = redis::cmd("PTTL").arg(key).query_async(conn).await?;
        if ttl_ms <= 0 {
            continue;
        }
        let least = load.iter_mut().filter(|((revision, _), _)| *revision == pin.revision).min_by_key(|(_, n)| **n);
        let next = match least {
            Some(((_, next), n)) => {
                *n += 1;
                *next
            }
            None => DRAINED_POD,
        };
        let moved = Pin { revision: pin.revision.clone(), pod: Some(next) };
        let mut repin = script.prepare_invoke();
        repin.key(key).arg(pin.target()).arg(moved.encode(written)).arg(ttl_ms).arg(INVALIDATIONS).arg("operator");
        let lost: Option<Vec<u8>> = repin.invoke_async(conn).await?;
        drained += usize::from(lost.is_none());
    }
    Ok(drained)
}

/// A count Redis answered, if activators could have made it: a whole number from 0 to
/// `MAX_PERIOD_COUNT`, whatever else another client of Redis may have written there.
fn plausible(value: &redis::Value) -> Option<u64> {
    let count = redis::from_redis_value::<i64>(value.clone()).ok().and_then(|n| u64::try_from(n).ok());
    count.filter(|n| *n <= MAX_PERIOD_COUNT)
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
    use proptest::prelude::*;

    /// Any reply a Redis server (or whatever answers on its port) could give.
    fn any_reply() -> impl Strategy<Value = redis::Value> {
        let leaf = prop_oneof![
            Just(redis::Value::Nil),
            Just(redis::Value::Okay),
            any::<i64>().prop_map(redis::Value::Int),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(redis::Value::BulkString),
            "[0-9 .+-]{0,24}".prop_map(|s| redis::Value::BulkString(s.into_bytes())),
            "\\PC{0,24}".prop_map(redis::Value::SimpleString),
            any::<f64>().prop_map(redis::Value::Double),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| proptest::collection::vec(inner, 0..4).prop_map(redis::Value::Array))
    }

    proptest! {
        #[test]
        fn any_count_reply_is_plausible_or_ignored_without_panicking(value in any_reply()) {
            if let Some(n) = plausible(&value) {
                prop_assert!(n <= MAX_PERIOD_COUNT);
            }
        }
    }

    #[test]
    fn implausible_counts_are_refused() {
        let counts = [("12", Some(12)), ("-1", None), ("x", None), ("99999999999999999999", None)];
        for (text, want) in counts {
            assert_eq!(plausible(&redis::Value::BulkString(text.into())), want, "{text}");
        }
        assert_eq!(plausible(&redis::Value::Int(i64::try_from(MAX_PERIOD_COUNT).unwrap() + 1)), None);
        assert_eq!(plausible(&redis::Value::Nil), None);
    }

    #[test]
    fn reads_the_server_version() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some((7, 0)));
        assert!(server_version("redis_version:6.2.14\r\n").is_some_and(|v| v < MIN_VERSION));
        assert_eq!(server_version("nothing"), None);
    }

    #[test]
    fn failures_count_once_per_window_and_one_probe_ends_it() {
        let breaker = Breaker::new();
        assert_eq!(breaker.permit(), Some(Permit::Call));
        // 200 calls in flight fail together: one window, the shortest back-off.
        let opened: Vec<_> = (0..200).filter_map(|_| breaker.failure(Permit::Call)).collect();
        assert_eq!(opened, [(MIN_BACKOFF, true)]);
        assert_eq!(breaker.permit(), None, "open");
        breaker.open_until_ms.store(1, Ordering::Release);
        assert_eq!(breaker.permit(), Some(Permit::Probe), "the back-off is over: one probe");
        assert_eq!(breaker.permit(), None, "everyone else waits for the probe");
        assert!(!breaker.success(Permit::Call), "a call from before the outage does not close it");
        assert_eq!(breaker.failure(Permit::Probe), Some((MIN_BACKOFF * 2, false)), "a failed probe doubles");
        for expected in [MIN_BACKOFF * 4, MIN_BACKOFF * 8, MIN_BACKOFF * 16, MAX_BACKOFF, MAX_BACKOFF] {
            breaker.open_until_ms.store(1, Ordering::Release);
            assert_eq!(breaker.permit(), Some(Permit::Probe));
            assert_eq!(breaker.failure(Permit::Probe), Some((expected, false)));
        }
        breaker.open_until_ms.store(1, Ordering::Release);
        let abandoned = Granted { breaker: &breaker, permit: breaker.permit().unwrap(), settled: false };
        drop(abandoned);
        assert_eq!(breaker.permit(), Some(Permit::Probe), "an abandoned probe passes the probe on");
        assert!(breaker.success(Permit::Probe), "the probe closes it");
        assert_eq!(breaker.permit(), Some(Permit::Call));
        assert_eq!(breaker.failure(Permit::Call), Some((MIN_BACKOFF, true)), "a new outage starts short");
    }
}
