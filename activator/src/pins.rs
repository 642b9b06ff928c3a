//! The pin table: which revision a flow is pinned to, and which revision and pod a session is
//! pinned to, with idle and absolute lifetimes.
//!
//! Owns pin keys (scoped by namespace and service, ids hashed, never stored raw) and the
//! first-writer-wins and compare-and-set rules. The in-memory store is bounded with LRU
//! eviction and has no global lock: it is split into shards by the id hash, each an LRU behind
//! its own mutex, held for one map operation. Must not decide where a request goes;
//! `affinity::decide` does.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use prometheus::{IntCounter, IntGauge};

use crate::stats::Stats;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinKind {
    /// A session id: pins a revision and a pod.
    Session,
    /// A flow id: pins a revision.
    Flow,
}

impl PinKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PinKind::Session => "session",
            PinKind::Flow => "flow",
        }
    }
}

/// Where one id of one service is pinned. The service scope is part of the key, so one
/// tenant's ids can never read or write another tenant's pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinKey {
    /// `<namespace>/<service>`.
    scope: Arc<str>,
    kind: PinKind,
    id_hash: u128,
}

impl PinKey {
    pub fn new(scope: &Arc<str>, kind: PinKind, id: &[u8]) -> Self {
        // xxh3-128 is stable across processes and versions, so every replica (and the Redis
        // store) derives the same key for the same id.
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(scope.as_bytes());
        hasher.update(&[0]);
        hasher.update(id);
        PinKey { scope: scope.clone(), kind, id_hash: hasher.digest128() }
    }

    pub fn kind(&self) -> PinKind {
        self.kind
    }
}

impl Hash for PinKey {
    /// The id hash is already uniform and covers the scope; equality still compares the scope.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(self.id_hash);
    }
}

impl fmt::Display for PinKey {
    /// The shared-store key: `aa:{<ns>/<svc>}:<s|r>:<hash>`; the braces are a Redis Cluster hash
    /// tag that keeps one service's pins in one slot.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PinKind::Session => 's',
            PinKind::Flow => 'r',
        };
        write!(f, "aa:{{{}}}:{kind}:{:032x}", self.scope, self.id_hash)
    }
}

/// What a key is pinned to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub revision: Arc<str>,
    /// Set for sessions: the pod inside `revision`.
    pub pod: Option<SocketAddr>,
}

impl Pin {
    pub fn flow(revision: &str) -> Self {
        Pin { revision: revision.into(), pod: None }
    }

    pub fn session(revision: &str, pod: SocketAddr) -> Self {
        Pin { revision: revision.into(), pod: Some(pod) }
    }
}

/// How long a pin lives: `ttl` after its last use, and never longer than `max_age` after it
/// was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub ttl: Duration,
    pub max_age: Option<Duration>,
}

struct Entry {
    pin: Pin,
    lifetime: Lifetime,
    written: Instant,
    expires: Instant,
}

impl Entry {
    fn new(pin: Pin, lifetime: Lifetime, now: Instant) -> Self {
        let mut entry = Entry { pin, lifetime, written: now, expires: now };
        entry.touch(now);
        entry
    }

    /// Extends the idle lifetime from `now`, within the absolute cap.
    fn touch(&mut self, now: Instant) {
        let idle = self.lifetime.ttl;
        let left = match self.lifetime.max_age {
            Some(max) => idle.min(max.saturating_sub(now.saturating_duration_since(self.written))),
            None => idle,
        };
        self.expires = now + left;
    }

    fn is_live(&self, now: Instant) -> bool {
        now < self.expires
    }
}

/// The outcome of a conditional write: the pin that holds now, and whether it is ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub pin: Pin,
    pub won: bool,
}

/// Shards at the default bound; small bounds get fewer so the bound stays close to exact.
const MAX_SHARDS: usize = 64;
const MIN_ENTRIES_PER_SHARD: u64 = 1024;
/// Expired entries one maintenance pass may drop from one shard, so the shard's lock is held
/// briefly.
const SWEEP_PER_SHARD: usize = 4096;

/// One shard on cache lines of its own, so threads working on neighbouring shards do not slow
/// each other down (128 bytes: adjacent-line prefetch pairs lines on x86).
#[repr(align(128))]
struct Shard(Mutex<LruCache<PinKey, Entry>>);

/// The pin table of this replica.
pub struct MemoryPins {
    shards: Box<[Shard]>,
    per_shard: usize,
}

impl MemoryPins {
    /// A store holding at most `max_entries` pins.
    pub fn new(max_entries: u64) -> Self {
        let shards = (max_entries / MIN_ENTRIES_PER_SHARD).clamp(1, MAX_SHARDS as u64);
        let per_shard = usize::try_from(max_entries / shards).unwrap_or(usize::MAX).max(1);
        // Unbounded maps that grow with use: a bounded `LruCache` allocates its whole capacity up
        // front, which costs memory at idle and cache misses on every lookup. The bound is kept
        // on insert instead.
        MemoryPins { shards: (0..shards).map(|_| Shard(Mutex::new(LruCache::unbounded()))).collect(), per_shard }
    }

    fn shard(&self, key: &PinKey) -> MutexGuard<'_, LruCache<PinKey, Entry>> {
        // The low 64 bits of the hash are as uniform as all 128, and dividing them is a machine
        // instruction rather than a 128-bit software division.
        let shard = &self.shards[(key.id_hash as u64 % self.shards.len() as u64) as usize];
        shard.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pin for `key`, extending its idle lifetime.
    pub fn get(&self, key: &PinKey) -> Option<Pin> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some(entry) if entry.is_live(now) => {
                entry.touch(now);
                Some(entry.pin.clone())
            }
            Some(_) => {
                shard.pop(key);
                None
            }
            None => None,
        }
    }

    /// Pins `key` unless it is pinned already; the first writer wins.
    pub fn create(&self, key: &PinKey, pin: Pin, lifetime: Lifetime) -> Written {
        self.write(key, None, pin, lifetime)
    }

    /// Re-pins `key` if it still holds `expected` (or nothing); otherwise the current pin wins.
    pub fn replace(&self, key: &PinKey, expected: &Pin, pin: Pin, lifetime: Lifetime) -> Written {
        self.write(key, Some(expected), pin, lifetime)
    }

    fn write(&self, key: &PinKey, expected: Option<&Pin>, pin: Pin, lifetime: Lifetime) -> Written {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if let Some(current) = shard.get(key).filter(|e| e.is_live(now))
            && Some(&current.pin) != expected
        {
            return Written { pin: current.pin.clone(), won: false };
        }
        shard.put(key.clone(), Entry::new(pin.clone(), lifetime, now));
        if shard.len() > self.per_shard {
            shard.pop_lru();
        }
        Written { pin, won: true }
    }

    /// Drops expired pins from the cold end of each shard and returns the entries held.
    /// Pins that expired behind a live one are dropped when next looked up, or evicted.
    pub fn sweep(&self) -> u64 {
        let now = Instant::now();
        let mut held = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for _ in 0..SWEEP_PER_SHARD {
                match shard.peek_lru() {
                    Some((_, entry)) if !entry.is_live(now) => shard.pop_lru(),
                    _ => break,
                };
            }
            held += shard.len() as u64;
        }
        held
    }
}

/// The pin table the request path talks to, with its accounting.
pub struct Pins {
    memory: MemoryPins,
    /// `[kind][hit, miss]`, resolved once so a lookup never hashes label strings.
    lookups: [[IntCounter; 2]; 2],
    /// `[kind][new, repin, conflict]`.
    writes: [[IntCounter; 3]; 2],
    entries: IntGauge,
}

const KINDS: [PinKind; 2] = [PinKind::Session, PinKind::Flow];

impl Pins {
    pub fn new(max_entries: u64, stats: &Stats) -> Self {
        let lookups = KINDS.map(|k| ["hit", "miss"].map(|r| stats.pin_lookups.with_label_values(&[k.as_str(), r])));
        let writes =
            KINDS.map(|k| ["new", "repin", "conflict"].map(|r| stats.pin_writes.with_label_values(&[k.as_str(), r])));
        Pins { memory: MemoryPins::new(max_entries), lookups, writes, entries: stats.pin_entries.clone() }
    }

    pub fn get(&self, key: &PinKey) -> Option<Pin> {
        let pin = self.memory.get(key);
        self.lookups[key.kind as usize][usize::from(pin.is_none())].inc();
        pin
    }

    /// Writes `pin` for `key`: created if `expected` is `None`, else compare-and-set against
    /// `expected`. Returns the pin that holds afterwards, which is another writer's on a lost race.
    pub fn write(&self, key: &PinKey, expected: Option<&Pin>, pin: Pin, lifetime: Lifetime) -> Pin {
        let written = match expected {
            None => self.memory.create(key, pin, lifetime),
            Some(expected) => self.memory.replace(key, expected, pin, lifetime),
        };
        let outcome = match (written.won, expected) {
            (true, None) => 0,
            (true, Some(_)) => 1,
            (false, _) => 2,
        };
        self.writes[key.kind as usize][outcome].inc();
        written.pin
    }

    /// Drops expired pins and publishes the entry count; run periodically.
    pub fn maintain(&self) {
        self.entries.set(i64::try_from(self.memory.sweep()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scope: &str, id: &str) -> PinKey {
        PinKey::new(&Arc::from(scope), PinKind::Session, id.as_bytes())
    }

    const LONG: Lifetime = Lifetime { ttl: Duration::from_secs(600), max_age: None };
    const POD_A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
    const POD_B: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2);

    #[test]
    fn keys_are_scoped_hashed_and_stable() {
        let a = key("ns/svc", "abc");
        assert_eq!(a, key("ns/svc", "abc"));
        assert_ne!(a, key("ns/other", "abc"));
        assert_ne!(a, key("ns/svc", "abd"));
        let text = a.to_string();
        assert!(text.starts_with("aa:{ns/svc}:s:"), "{text}");
        assert!(!text.contains("abc"), "ids are never stored raw: {text}");
        assert_eq!(text.len(), "aa:{ns/svc}:s:".len() + 32);
    }

    #[test]
    fn first_writer_wins_and_replace_is_compare_and_set() {
        let pins = MemoryPins::new(100);
        let k = key("ns/svc", "abc");
        assert!(pins.create(&k, Pin::session("r1", POD_A), LONG).won);
        let second = pins.create(&k, Pin::session("r1", POD_B), LONG);
        assert_eq!(second, Written { pin: Pin::session("r1", POD_A), won: false });

        let stale = pins.replace(&k, &Pin::session("r1", POD_B), Pin::session("r2", POD_B), LONG);
        assert_eq!(stale, Written { pin: Pin::session("r1", POD_A), won: false });
        let fresh = pins.replace(&k, &Pin::session("r1", POD_A), Pin::session("r1", POD_B), LONG);
        assert!(fresh.won);
        assert_eq!(pins.get(&k), Some(Pin::session("r1", POD_B)));
    }

    #[test]
    fn idle_pins_expire_and_use_extends_them() {
        let pins = MemoryPins::new(100);
        let short = Lifetime { ttl: Duration::from_millis(200), max_age: None };
        let (used, idle) = (key("ns/svc", "used"), key("ns/svc", "idle"));
        pins.create(&used, Pin::flow("r1"), short);
        pins.create(&idle, Pin::flow("r1"), short);
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            assert!(pins.get(&used).is_some(), "a pin in use stays");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(pins.get(&idle).is_none(), "an idle pin expires");
        assert_eq!(pins.sweep(), 1);
    }

    #[test]
    fn sweep_drops_expired_pins_nobody_asks_for() {
        let pins = MemoryPins::new(100);
        let short = Lifetime { ttl: Duration::from_millis(50), max_age: None };
        for i in 0..10 {
            pins.create(&key("ns/svc", &i.to_string()), Pin::flow("r1"), short);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pins.sweep() > 0 {
            assert!(Instant::now() < deadline, "expired pins were never swept");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn max_age_caps_a_pin_in_use() {
        let pins = MemoryPins::new(100);
        let capped = Lifetime { ttl: Duration::from_secs(60), max_age: Some(Duration::from_millis(150)) };
        let k = key("ns/svc", "capped");
        pins.create(&k, Pin::flow("r1"), capped);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pins.get(&k).is_some() {
            assert!(Instant::now() < deadline, "max-age never expired the pin");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn entry_count_stays_at_the_bound() {
        let pins = MemoryPins::new(50);
        for i in 0..1000 {
            pins.create(&key("ns/svc", &i.to_string()), Pin::flow("r1"), LONG);
        }
        assert_eq!(pins.sweep(), 50);
        let big = MemoryPins::new(1_000_000);
        for i in 0..10_000 {
            big.create(&key("ns/svc", &i.to_string()), Pin::flow("r1"), LONG);
        }
        assert_eq!(big.shards.len(), MAX_SHARDS);
        assert_eq!(big.sweep(), 10_000);
    }
}
