//! This replica's pins: a bounded store with LRU eviction, sliding idle lifetimes and an
//! optional absolute cap. With a shared store it is also the near cache: it remembers when the
//! shared store last confirmed each pin and which pins were used since the last batched refresh.
//!
//! No global lock: the table is split into shards by the id hash, each a compact `Table` (slab,
//! index and LRU list of `table`) behind its own mutex, held for one map operation.
//!
//! Session pins of services that want to hear when a session ends carry a `Watch` (the raw id,
//! which lives only here, never in the shared store). Whenever such a pin leaves the table or
//! is replaced by another, the shard records it as `Ended` under the lock it already holds, for
//! `session_end` to act on off the request path.

mod table;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use table::{Meta, Table, UNVERIFIED};

use super::{Ended, Lifetime, LifetimeOf, Pin, PinKey, Watch, Written, millis, unix_millis};

/// Shards at the default bound; small bounds get fewer so the bound stays close to exact.
const MAX_SHARDS: usize = 64;
const MIN_ENTRIES_PER_SHARD: u64 = 1024;
/// Expired entries one maintenance pass may drop from one shard, so the shard's lock is held
/// briefly.
const SWEEP_PER_SHARD: usize = 4096;

/// This process's clock in milliseconds from its first reading: pins keep their times in 8
/// bytes rather than an `Instant`'s 16.
fn clock(at: Instant) -> i64 {
    static ZERO: OnceLock<Instant> = OnceLock::new();
    let zero = *ZERO.get_or_init(Instant::now);
    match at.checked_duration_since(zero) {
        Some(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        None => -i64::try_from(zero.duration_since(at).as_millis()).unwrap_or(i64::MAX),
    }
}

/// `d` in milliseconds on the pin clock, saturating.
fn span(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn duration(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Meta {
    fn new(lifetime: Lifetime, written: SystemTime, now: Instant) -> Self {
        let age = SystemTime::now().duration_since(written).unwrap_or_default();
        let mut meta = Meta {
            ttl_ms: 0,
            verified_epoch: UNVERIFIED,
            max_age_ms: u64::MAX,
            written_ms: unix_millis(written),
            born: clock(now).saturating_sub(span(age)),
            expires: 0,
            verified_at: 0,
            touched: false,
            watched: false,
        };
        meta.set_lifetime(lifetime);
        meta.extend(clock(now));
        meta
    }

    fn lifetime(&self) -> Lifetime {
        let max_age = (self.max_age_ms != u64::MAX).then(|| Duration::from_millis(self.max_age_ms));
        Lifetime { ttl: Duration::from_millis(u64::from(self.ttl_ms)), max_age }
    }

    fn set_lifetime(&mut self, lifetime: Lifetime) {
        // Lifetimes are clamped to 30 days where they are read; the u32 holds 49.
        self.ttl_ms = u32::try_from(lifetime.ttl.as_millis()).unwrap_or(u32::MAX);
        self.max_age_ms = lifetime.max_age.map_or(u64::MAX, millis);
    }

    fn written(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.written_ms)
    }

    /// Extends the idle lifetime from `now`, within the absolute cap.
    fn extend(&mut self, now: i64) {
        let remaining = self.lifetime().remaining(duration(now.saturating_sub(self.born)));
        self.expires = now.saturating_add(span(remaining));
    }

    fn is_live(&self, now: i64) -> bool {
        now < self.expires
    }

    fn verified(&self) -> bool {
        self.verified_epoch != UNVERIFIED
    }
}

/// What the near cache knows of a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Near {
    Fresh(Pin),
    /// Held, but not confirmed recently enough to use without asking.
    Stale,
    /// Written here while the shared store was out of reach, so never confirmed: it goes to the
    /// shared store first-writer-wins when next used.
    Local(Touched),
    Absent,
}

/// A pin used since the last refresh, for the shared store's batched TTL refresh.
#[derive(Debug, PartialEq, Eq)]
pub struct Touched {
    pub key: PinKey,
    pub pin: Pin,
    pub lifetime: Lifetime,
    pub written: SystemTime,
    /// How long the pin may still live, counted from now.
    pub remaining: Duration,
    /// Whether the shared store holds it; `false` for pins written during an outage.
    pub synced: bool,
}

/// One shard: its pins, and what it keeps beside them.
struct Pins {
    table: Table,
    /// Slots used since the last refresh (some may have been freed since).
    touched: Vec<u32>,
    /// The watches of the slots whose sessions are watched for their end.
    watches: HashMap<u32, Arc<Watch>>,
    /// Resource pins that left the table or were replaced, for `take_ended`.
    ended: Vec<Ended>,
}

impl Pins {
    fn touched(&self, slot: u32, now: i64) -> Touched {
        let meta = self.table.meta(slot);
        Touched {
            key: self.table.key(slot),
            pin: self.table.pin(slot).clone(),
            lifetime: meta.lifetime(),
            written: meta.written(),
            remaining: duration(meta.expires.saturating_sub(now)),
            synced: meta.verified(),
        }
    }

    /// Takes `slot`'s pin out of the table; if it was watched, its session ended (`moved`: the
    /// pin was replaced elsewhere while live, rather than expired or evicted).
    fn pop(&mut self, slot: u32, moved: bool) {
        let (key, pin, meta) = self.table.remove(slot);
        if meta.watched
            && let Some(watch) = self.watches.remove(&slot)
        {
            self.ended.push(Ended { key, pin, written: meta.written(), watch, moved });
        }
    }

    /// Puts `pin` (new, so unwatched) at `key`. The session a replaced pin was watched for goes
    /// on being watched under the new pin. A live session ended only if its target (revision,
    /// pod) changed: replicas converging on one pin after an outage write the same target at
    /// another time, and the session never moved. An expired one ended idle when pinned anew. An
    /// unwatched key costs the one map operation it did before watches existed.
    fn put(&mut self, key: &PinKey, pin: Pin, meta: Meta, now: i64) -> u32 {
        let (slot, old) = self.table.insert(key, pin, meta);
        let Some((old_pin, old)) = old else { return slot };
        // Still in the touched list: the refresh takes it as it would have the pin replaced.
        self.table.meta_mut(slot).touched |= old.touched;
        if !old.watched {
            return slot;
        }
        self.table.meta_mut(slot).watched = true;
        let new_pin = self.table.pin(slot);
        let ended = match old.is_live(now) {
            true => old_pin != *new_pin,
            false => old_pin != *new_pin || old.written_ms != meta.written_ms,
        };
        if ended && let Some(watch) = self.watches.get(&slot).cloned() {
            let written = old.written();
            self.ended.push(Ended { key: key.clone(), pin: old_pin, written, watch, moved: old.is_live(now) });
        }
        slot
    }

    /// Lists `slot` for the next refresh, once however often it is used meanwhile.
    fn touch(&mut self, slot: u32) {
        let meta = self.table.meta_mut(slot);
        if !meta.touched {
            meta.touched = true;
            self.touched.push(slot);
        }
    }

    /// Evicts the least recently used entry.
    fn evict(&mut self) {
        if let Some(slot) = self.table.lru() {
            self.pop(slot, false);
        }
    }
}

/// One shard on cache lines of its own, so threads working on neighbouring shards do not slow
/// each other down (128 bytes: adjacent-line prefetch pairs lines on x86).
#[repr(align(128))]
struct Shard(Mutex<Pins>);

pub struct MemoryPins {
    shards: Box<[Shard]>,
    per_shard: usize,
    /// Remember which pins were used, for a shared store's refresh.
    track_use: bool,
    /// Bumped when near-cache entries can no longer be trusted (missed invalidations).
    epoch: AtomicU64,
}

impl MemoryPins {
    /// A store holding at most `max_entries` pins.
    pub fn new(max_entries: u64) -> Self {
        Self::build(max_entries, false)
    }

    /// A store that is also the near cache of a shared store.
    pub fn near_cache(max_entries: u64) -> Self {
        Self::build(max_entries, true)
    }

    fn build(max_entries: u64, track_use: bool) -> Self {
        let shards = (max_entries / MIN_ENTRIES_PER_SHARD).clamp(1, MAX_SHARDS as u64);
        let per_shard = usize::try_from(max_entries / shards).unwrap_or(usize::MAX).max(1);
        // Tables grow with use, up to the bound, rather than holding their bound from the start.
        let shard = || {
            Shard(Mutex::new(Pins {
                table: Table::new(per_shard),
                touched: Vec::new(),
                watches: HashMap::new(),
                ended: Vec::new(),
            }))
        };
        MemoryPins { shards: (0..shards).map(|_| shard()).collect(), per_shard, track_use, epoch: AtomicU64::new(0) }
    }

    fn shard(&self, key: &PinKey) -> MutexGuard<'_, Pins> {
        // The low 64 bits of the hash are as uniform as all 128, and dividing them is a machine
        // instruction rather than a 128-bit software division.
        let shard = &self.shards[(key.id_hash as u64 % self.shards.len() as u64) as usize];
        lock(shard)
    }

    /// The epoch as slots keep it.
    fn epoch(&self) -> u32 {
        // Wraps after four billion distrusts; UNVERIFIED is skipped.
        (self.epoch.load(Ordering::Acquire) % u64::from(UNVERIFIED)) as u32
    }

    /// The pin for `key`, extending its idle lifetime. The lifetime is that of pins into the
    /// pinned revision as `lifetime_of` says now, whoever wrote the pin and with which lifetime:
    /// a provisional pin is promoted, and a pin won by another writer keeps its own revision's cap.
    pub fn get(&self, key: &PinKey, lifetime_of: LifetimeOf<'_>) -> Option<Pin> {
        self.lookup(key, lifetime_of, |_| true)
    }

    /// What the near cache knows of `key`: a pin the shared store confirmed less than
    /// `max_staleness` ago (and nothing invalidated since), a pin it holds without such a recent
    /// confirmation, or nothing.
    pub fn near(&self, key: &PinKey, max_staleness: Duration, lifetime_of: LifetimeOf<'_>) -> Near {
        let epoch = self.epoch();
        let now = clock(Instant::now());
        let (mut stale, mut local) = (false, false);
        let fresh = self.lookup(key, lifetime_of, |meta| {
            let usable = meta.verified_epoch == epoch && now.saturating_sub(meta.verified_at) < span(max_staleness);
            stale = !usable;
            local = !meta.verified();
            usable || local
        });
        match fresh {
            Some(pin) if local => {
                let pins = self.shard(key);
                match pins.table.find(key) {
                    Some(slot) => Near::Local(pins.touched(slot, now)),
                    None => Near::Fresh(pin),
                }
            }
            Some(pin) => Near::Fresh(pin),
            None if stale => Near::Stale,
            None => Near::Absent,
        }
    }

    fn lookup(&self, key: &PinKey, lifetime_of: LifetimeOf<'_>, mut usable: impl FnMut(&Meta) -> bool) -> Option<Pin> {
        let now = clock(Instant::now());
        let mut pins = self.shard(key);
        let slot = pins.table.find(key)?;
        if !pins.table.meta(slot).is_live(now) {
            pins.pop(slot, false);
            return None;
        }
        if !usable(pins.table.meta(slot)) {
            return None;
        }
        let lifetime = lifetime_of(&pins.table.pin(slot).revision);
        pins.table.promote(slot);
        let meta = pins.table.meta_mut(slot);
        meta.set_lifetime(lifetime);
        meta.extend(now);
        if self.track_use {
            pins.touch(slot);
        }
        Some(pins.table.pin(slot).clone())
    }

    /// The live pin at `key` as it is, without using it (its idle lifetime is not extended).
    pub fn peek(&self, key: &PinKey) -> Option<Pin> {
        let now = clock(Instant::now());
        let pins = self.shard(key);
        let slot = pins.table.find(key)?;
        pins.table.meta(slot).is_live(now).then(|| pins.table.pin(slot).clone())
    }

    /// Pins `key` unless it holds a live pin other than `expected` (`None`: unless it holds
    /// any): first writer wins, and re-pins are compare-and-set.
    pub fn write(&self, key: &PinKey, expected: Option<&Pin>, pin: Pin, lifetime: Lifetime) -> Written {
        let now = Instant::now();
        let mut pins = self.shard(key);
        if let Some(slot) = pins.table.find(key)
            && pins.table.meta(slot).is_live(clock(now))
            && Some(pins.table.pin(slot)) != expected
        {
            return Written { pin: pins.table.pin(slot).clone(), won: false };
        }
        let slot = self.insert(&mut pins, key, pin.clone(), Meta::new(lifetime, SystemTime::now(), now), now);
        if self.track_use {
            pins.touch(slot);
        }
        Written { pin, won: true }
    }

    /// Stores a pin the shared store just confirmed.
    pub fn put_verified(&self, key: &PinKey, pin: Pin, lifetime: Lifetime, written: SystemTime) {
        let now = Instant::now();
        let mut meta = Meta::new(lifetime, written, now);
        (meta.verified_epoch, meta.verified_at) = (self.epoch(), clock(now));
        let mut pins = self.shard(key);
        self.insert(&mut pins, key, pin, meta, now);
    }

    fn insert(&self, pins: &mut Pins, key: &PinKey, pin: Pin, meta: Meta, now: Instant) -> u32 {
        let slot = pins.put(key, pin, meta, clock(now));
        if pins.table.len() > self.per_shard {
            pins.evict();
        }
        slot
    }

    /// Forgets `key`'s pin: another replica replaced or deleted it.
    pub fn remove(&self, key: &PinKey) {
        let mut pins = self.shard(key);
        if let Some(slot) = pins.table.find(key) {
            pins.pop(slot, true);
        }
    }

    /// Watches `key`'s pin for the end of its session (`watch` names the session and what to
    /// call), unless it is watched already. Only services that ask for it pay for this.
    pub fn watch(&self, key: &PinKey, watch: impl FnOnce() -> Watch) {
        let mut pins = self.shard(key);
        if let Some(slot) = pins.table.find(key)
            && !pins.table.meta(slot).watched
        {
            pins.table.meta_mut(slot).watched = true;
            pins.watches.insert(slot, Arc::new(watch()));
        }
    }

    /// The watched pins that ended since the last call. Expired watched pins are found here
    /// wherever they sit in the LRU order, so an idle session's end is heard within a call.
    pub fn take_ended(&self) -> Vec<Ended> {
        let now = clock(Instant::now());
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut pins = lock(shard);
            if pins.watches.is_empty() && pins.ended.is_empty() {
                continue;
            }
            let expired: Vec<u32> =
                pins.watches.keys().copied().filter(|&slot| !pins.table.meta(slot).is_live(now)).collect();
            for slot in expired {
                pins.pop(slot, false);
            }
            out.append(&mut pins.ended);
        }
        out
    }

    /// Makes every entry unverified, so each is re-read from the shared store on next use.
    pub fn distrust_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks `keys` as used again, so the next `take_touched` reports them: a refresh that
    /// failed puts its keys back rather than letting their pins expire in the shared store.
    pub fn retouch(&self, keys: impl IntoIterator<Item = PinKey>) {
        for key in keys {
            let mut pins = self.shard(&key);
            if let Some(slot) = pins.table.find(&key) {
                pins.touch(slot);
            }
        }
    }

    /// The live pins used since the last call.
    pub fn take_touched(&self) -> Vec<Touched> {
        let now = clock(Instant::now());
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut pins = lock(shard);
            let touched = std::mem::take(&mut pins.touched);
            // A slot freed since, or listed twice, has its flag down.
            for &slot in &touched {
                if pins.table.holds(slot) && pins.table.meta(slot).touched {
                    pins.table.meta_mut(slot).touched = false;
                    if pins.table.meta(slot).is_live(now) {
                        out.push(pins.touched(slot, now));
                    }
                }
            }
            // The list's allocation is kept for the next round.
            pins.touched = touched;
            pins.touched.clear();
        }
        out
    }

    /// Every live pin held, for writing back to a shared store that lost its pins. Walks one
    /// shard at a time, so a request waits at most for one shard's walk.
    pub fn live(&self) -> Vec<Touched> {
        let now = clock(Instant::now());
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let pins = lock(shard);
            let live = pins.table.occupied().filter(|&slot| pins.table.meta(slot).is_live(now));
            out.extend(live.map(|slot| pins.touched(slot, now)));
        }
        out
    }

    /// Live session pins by service scope, revision and pod. Walks one shard at a time, so a
    /// request waits at most for one shard's walk.
    pub fn sessions_by_pod(&self) -> HashMap<(Arc<str>, Arc<str>, SocketAddr), u64> {
        let now = clock(Instant::now());
        let mut counts = HashMap::new();
        for shard in self.shards.iter() {
            let pins = lock(shard);
            for slot in pins.table.occupied().filter(|&slot| pins.table.meta(slot).is_live(now)) {
                let pin = pins.table.pin(slot);
                if let Some(pod) = pin.pod {
                    let at = (pins.table.scope(slot).clone(), pin.revision.clone(), pod);
                    *counts.entry(at).or_default() += 1;
                }
            }
        }
        counts
    }

    /// Drops expired pins from the cold end of each shard and returns the entries held.
    /// Pins that expired behind a live one are dropped when next looked up, or evicted.
    pub fn sweep(&self) -> u64 {
        let now = clock(Instant::now());
        let mut held = 0;
        for shard in self.shards.iter() {
            let mut pins = lock(shard);
            for _ in 0..SWEEP_PER_SHARD {
                match pins.table.lru() {
                    Some(slot) if !pins.table.meta(slot).is_live(now) => pins.evict(),
                    _ => break,
                };
            }
            held += pins.table.len() as u64;
        }
        held
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, Pins> {
    crate::sync::lock(&shard.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pins::PinKind;

    fn key(scope: &str, id: &str) -> PinKey {
        PinKey::new(&Arc::from(scope), PinKind::Session, id.as_bytes())
    }

    const LONG: Lifetime = Lifetime { ttl: Duration::from_secs(600), max_age: None };

    /// Every revision's pins live `lifetime`.
    fn all(lifetime: Lifetime) -> impl Fn(&str) -> Lifetime + Sync {
        move |_| lifetime
    }
    const POD_A: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
    const POD_B: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2);

    #[test]
    fn live_session_pins_are_counted_by_pod() {
        let pins = MemoryPins::new(1000);
        for (i, pod) in [POD_A, POD_A, POD_B].into_iter().enumerate() {
            pins.write(&key("ns/svc", &i.to_string()), None, Pin::session("rev", pod), LONG);
        }
        let flow = PinKey::new(&Arc::from("ns/svc"), PinKind::Flow, b"f");
        pins.write(&flow, None, Pin::flow("rev"), LONG);
        let short = Lifetime { ttl: Duration::ZERO, max_age: None };
        pins.write(&key("ns/svc", "expired"), None, Pin::session("rev", POD_B), short);
        let counts = pins.sessions_by_pod();
        let scope: Arc<str> = Arc::from("ns/svc");
        let rev: Arc<str> = Arc::from("rev");
        assert_eq!(counts.get(&(scope.clone(), rev.clone(), POD_A)), Some(&2));
        assert_eq!(counts.get(&(scope, rev, POD_B)), Some(&1), "flows and expired pins are not counted");
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn a_watched_pin_ends_once_when_it_expires_is_replaced_or_is_removed() {
        use crate::spec::SessionEnd;
        use http::{HeaderName, HeaderValue};

        let pins = MemoryPins::near_cache(100);
        let call = Arc::new(SessionEnd::new("/end".parse().unwrap(), HeaderName::from_static("k-session")));
        let watch = |id: &'static str| {
            let call = call.clone();
            move || Watch { id: HeaderValue::from_static(id), call }
        };
        let zero = Lifetime { ttl: Duration::ZERO, max_age: None };
        let (moving, idle, unwatched) = (key("ns/svc", "moving"), key("ns/svc", "idle"), key("ns/svc", "other"));
        pins.write(&moving, None, Pin::session("r1", POD_A), LONG);
        pins.watch(&moving, watch("moving"));
        pins.write(&idle, None, Pin::session("r1", POD_A), zero);
        pins.watch(&idle, watch("idle"));
        pins.write(&unwatched, None, Pin::session("r1", POD_A), zero);
        // The shared store confirming the same pin is no end.
        let touched = pins.take_touched().into_iter().find(|t| t.key == moving).unwrap();
        pins.put_verified(&moving, touched.pin, LONG, touched.written);

        // A re-pin is.
        assert!(pins.write(&moving, Some(&Pin::session("r1", POD_A)), Pin::session("r1", POD_B), LONG).won);

        let summary = |ended: Vec<Ended>| {
            let mut out: Vec<_> =
                ended.into_iter().map(|e| (e.watch.id.clone(), e.pin.pod.unwrap(), e.moved)).collect();
            out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out
        };
        assert_eq!(
            summary(pins.take_ended()),
            [(HeaderValue::from_static("idle"), POD_A, false), (HeaderValue::from_static("moving"), POD_A, true)]
        );
        assert!(pins.take_ended().is_empty(), "each end once; the moved session is watched on its new pod");
        pins.remove(&moving);
        assert_eq!(summary(pins.take_ended()), [(HeaderValue::from_static("moving"), POD_B, true)]);
    }

    /// Issue 25, item 1: replicas converging on one pin after a Redis outage write the same
    /// target (revision, pod) at different times; adopting the other's is no end of the session.
    #[test]
    fn a_session_that_never_moved_is_not_told_it_ended() {
        use crate::spec::SessionEnd;
        use http::{HeaderName, HeaderValue};

        let pins = MemoryPins::near_cache(100);
        let call = Arc::new(SessionEnd::new("/end".parse().unwrap(), HeaderName::from_static("k-session")));
        let session = key("ns/svc", "converging");
        pins.write(&session, None, Pin::session("r1", POD_A), LONG);
        pins.watch(&session, || Watch { id: HeaderValue::from_static("converging"), call });
        let ours = pins.take_touched().into_iter().find(|t| t.key == session).unwrap();
        // The other replica's pin, written 1.5 s later while Redis was away, wins the convergence.
        pins.put_verified(&session, Pin::session("r1", POD_A), LONG, ours.written + Duration::from_millis(1500));
        assert!(pins.take_ended().is_empty(), "same revision and pod: the session never moved");
        pins.put_verified(&session, Pin::session("r1", POD_B), LONG, ours.written + Duration::from_millis(3000));
        let ended = pins.take_ended();
        assert_eq!(
            ended.iter().map(|e| (e.pin.pod, e.moved)).collect::<Vec<_>>(),
            [(Some(POD_A), true)],
            "a new pod is"
        );
    }

    #[test]
    fn first_writer_wins_and_replace_is_compare_and_set() {
        let pins = MemoryPins::new(100);
        let k = key("ns/svc", "abc");
        assert!(pins.write(&k, None, Pin::session("r1", POD_A), LONG).won);
        let second = pins.write(&k, None, Pin::session("r1", POD_B), LONG);
        assert_eq!(second, Written { pin: Pin::session("r1", POD_A), won: false });

        let stale = pins.write(&k, Some(&Pin::session("r1", POD_B)), Pin::session("r2", POD_B), LONG);
        assert_eq!(stale, Written { pin: Pin::session("r1", POD_A), won: false });
        let fresh = pins.write(&k, Some(&Pin::session("r1", POD_A)), Pin::session("r1", POD_B), LONG);
        assert!(fresh.won);
        assert_eq!(pins.get(&k, &all(LONG)), Some(Pin::session("r1", POD_B)));
    }

    #[test]
    fn idle_pins_expire_and_use_extends_them() {
        let pins = MemoryPins::new(100);
        let short = Lifetime { ttl: Duration::from_millis(200), max_age: None };
        let (used, idle) = (key("ns/svc", "used"), key("ns/svc", "idle"));
        pins.write(&used, None, Pin::flow("r1"), short);
        pins.write(&idle, None, Pin::flow("r1"), short);
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            assert!(pins.get(&used, &all(short)).is_some(), "a pin in use stays");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(pins.get(&idle, &all(short)).is_none(), "an idle pin expires");
        assert_eq!(pins.sweep(), 1);
    }

    #[test]
    fn sweep_drops_expired_pins_nobody_asks_for() {
        let pins = MemoryPins::new(100);
        let short = Lifetime { ttl: Duration::from_millis(50), max_age: None };
        for i in 0..10 {
            pins.write(&key("ns/svc", &i.to_string()), None, Pin::flow("r1"), short);
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
        pins.write(&k, None, Pin::flow("r1"), capped);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pins.get(&k, &all(capped)).is_some() {
            assert!(Instant::now() < deadline, "max-age never expired the pin");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn entry_count_stays_at_the_bound() {
        let pins = MemoryPins::new(50);
        for i in 0..1000 {
            pins.write(&key("ns/svc", &i.to_string()), None, Pin::flow("r1"), LONG);
        }
        assert_eq!(pins.sweep(), 50);
        let big = MemoryPins::new(1_000_000);
        for i in 0..10_000 {
            big.write(&key("ns/svc", &i.to_string()), None, Pin::flow("r1"), LONG);
        }
        assert_eq!(big.shards.len(), MAX_SHARDS);
        assert_eq!(big.sweep(), 10_000);
    }

    #[test]
    fn near_cache_trusts_only_recent_verifications_of_this_epoch() {
        let pins = MemoryPins::near_cache(100);
        let k = key("ns/svc", "abc");
        pins.write(&k, None, Pin::flow("r1"), LONG);
        let other = key("ns/svc", "other");
        assert_eq!(pins.near(&other, Duration::from_secs(5), &all(LONG)), Near::Absent);
        let Near::Local(local) = pins.near(&k, Duration::from_secs(5), &all(LONG)) else {
            panic!("a local write is not verified")
        };
        assert_eq!((local.pin, local.synced), (Pin::flow("r1"), false));
        pins.put_verified(&k, Pin::flow("r1"), LONG, SystemTime::now());
        assert_eq!(pins.near(&k, Duration::from_secs(5), &all(LONG)), Near::Fresh(Pin::flow("r1")));
        assert_eq!(pins.near(&k, Duration::ZERO, &all(LONG)), Near::Stale, "too old");
        pins.distrust_all();
        assert_eq!(pins.near(&k, Duration::from_secs(5), &all(LONG)), Near::Stale, "distrusted");
        assert_eq!(pins.get(&k, &all(LONG)), Some(Pin::flow("r1")), "still usable as a local pin");
    }

    #[test]
    fn used_pins_are_reported_once_per_refresh() {
        let pins = MemoryPins::near_cache(100);
        let (a, b) = (key("ns/svc", "a"), key("ns/svc", "b"));
        pins.write(&a, None, Pin::flow("r1"), LONG);
        pins.put_verified(&b, Pin::flow("r2"), LONG, SystemTime::now());
        for _ in 0..3 {
            pins.get(&b, &all(LONG));
        }
        let mut touched = pins.take_touched();
        touched.sort_by_key(|t| t.pin.revision.clone());
        let summary: Vec<_> = touched.iter().map(|t| (&*t.pin.revision, t.synced)).collect();
        assert_eq!(summary, [("r1", false), ("r2", true)]);
        assert!(pins.take_touched().is_empty());
        assert!(MemoryPins::new(100).take_touched().is_empty(), "a local store tracks nothing");
    }

    #[test]
    fn a_failed_refresh_puts_its_keys_back() {
        let pins = MemoryPins::near_cache(100);
        let (a, b) = (key("ns/svc", "a"), key("ns/svc", "b"));
        pins.write(&a, None, Pin::flow("r1"), LONG);
        pins.write(&b, None, Pin::flow("r1"), LONG);
        let taken: Vec<PinKey> = pins.take_touched().into_iter().map(|t| t.key).collect();
        assert_eq!(taken.len(), 2);
        pins.retouch(taken.clone());
        pins.retouch(taken);
        assert_eq!(pins.take_touched().len(), 2, "each key once, however often it is put back");
    }

    #[test]
    fn use_applies_the_pinned_revisions_current_lifetime() {
        let pins = MemoryPins::new(100);
        let provisional = Lifetime { ttl: Duration::from_millis(100), max_age: None };
        let (promoted, left) = (key("ns/svc", "promoted"), key("ns/svc", "left"));
        pins.write(&promoted, None, Pin::flow("r1"), provisional);
        pins.write(&left, None, Pin::flow("r1"), provisional);
        assert!(pins.get(&promoted, &all(LONG)).is_some(), "used once with the revision's real lifetime");
        std::thread::sleep(Duration::from_millis(300));
        assert!(pins.get(&left, &all(LONG)).is_none(), "an unused provisional pin expired");
        assert!(pins.get(&promoted, &all(LONG)).is_some(), "a used pin took the revision's lifetime");
    }

    #[test]
    fn huge_lifetimes_do_not_overflow_the_clock() {
        let pins = MemoryPins::new(100);
        let forever = Lifetime { ttl: Duration::MAX, max_age: Some(Duration::MAX) };
        let k = key("ns/svc", "forever");
        assert!(pins.write(&k, None, Pin::flow("r1"), forever).won);
        assert!(pins.get(&k, &all(forever)).is_some());
        pins.put_verified(&k, Pin::flow("r1"), forever, SystemTime::UNIX_EPOCH);
        assert_eq!(pins.sweep(), 1);
    }
}
