//! The pin table: which revision a flow is pinned to, and which revision and pod a session is
//! pinned to, with idle and absolute lifetimes.
//!
//! Owns pin keys (scoped by namespace and service, ids hashed, never stored raw), the value
//! format, and the first-writer-wins and compare-and-set rules, over two stores: `memory` (this
//! replica's pins; with Redis, also the near cache that keeps known pins off the network) and
//! `shared` (Redis, so every replica routes a session the same way; `redis` reaches one server or
//! a cluster). Must not decide where a
//! request goes; `affinity::decide` does.

mod memory;
mod metrics;
mod redis;
mod seats;
mod shared;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use memory::MemoryPins;
pub use metrics::PinMetrics;
pub(crate) use redis::RedisClient;
pub use redis::{Deployment, RedisTls};
pub use seats::{Claim, SeatClaim};
pub use shared::SharedConfig;
pub(crate) use shared::admin::{DRAINED_POD, delete_pin, drain_pod, key_report, pin_targets};
pub(crate) use shared::{Purpose, SharedPins};

use crate::spec::SessionEnd;

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

    fn tag(self) -> char {
        match self {
            PinKind::Session => 's',
            PinKind::Flow => 'r',
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
        // xxh3-128 is stable across processes and versions, so every replica derives the same
        // key for the same id.
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(scope.as_bytes());
        hasher.update(&[0]);
        hasher.update(id);
        PinKey { scope: scope.clone(), kind, id_hash: hasher.digest128() }
    }

    /// The first eight hex digits of the id's hash: enough to tell sessions apart in a log,
    /// nothing that gives the id away.
    /// 64 bits of the key's hash, the same in every replica: for placing the key by hash when
    /// no store can say where it goes.
    pub fn placement_hash(&self) -> u64 {
        self.id_hash as u64
    }

    pub fn short_hash(&self) -> String {
        format!("{:08x}", (self.id_hash >> 96) as u32)
    }

    /// The whole hash of the id, for keys of other owners that belong to this one.
    pub fn id_hash(&self) -> u128 {
        self.id_hash
    }

    /// `<namespace>/<service>`: the key's Redis Cluster hash tag, so keys of one scope share a slot.
    pub fn scope(&self) -> &Arc<str> {
        &self.scope
    }

    /// The Redis pattern matching every pin of one service.
    pub fn service_pattern(namespace: &str, service: &str) -> String {
        format!("aa:{{{namespace}/{service}}}:*")
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
        write!(f, "aa:{{{}}}:{}:{:032x}", self.scope, self.kind.tag(), self.id_hash)
    }
}

impl FromStr for PinKey {
    type Err = ();

    fn from_str(key: &str) -> Result<Self, ()> {
        let rest = key.strip_prefix("aa:{").ok_or(())?;
        let (scope, rest) = rest.split_once("}:").ok_or(())?;
        let (tag, hash) = rest.split_once(':').ok_or(())?;
        let kind = match tag {
            "s" => PinKind::Session,
            "r" => PinKind::Flow,
            _ => return Err(()),
        };
        if hash.len() != 32 {
            return Err(());
        }
        let id_hash = u128::from_str_radix(hash, 16).map_err(|_| ())?;
        Ok(PinKey { scope: scope.into(), kind, id_hash })
    }
}

/// What a key is pinned to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pin {
    pub revision: Arc<str>,
    /// Set for sessions: the pod inside `revision`.
    pub pod: Option<SocketAddr>,
}

impl Pin {
    /// A flow's pin. Given the revision's own `Arc`, the pin shares it rather than copying the
    /// name: a million pins into one revision hold one name.
    pub fn flow(revision: impl Into<Arc<str>>) -> Self {
        Pin { revision: revision.into(), pod: None }
    }

    /// A session's pin; shares the revision's name as `flow` does.
    pub fn session(revision: impl Into<Arc<str>>, pod: SocketAddr) -> Self {
        Pin { revision: revision.into(), pod: Some(pod) }
    }

    /// `<revision> <ip:port>` (`-` for a flow): the part of the stored value that names the target.
    fn target(&self) -> String {
        match self.pod {
            Some(pod) => format!("{} {pod}", self.revision),
            None => format!("{} -", self.revision),
        }
    }

    /// The stored value: the target and when the pin was first written (Unix milliseconds), which
    /// every replica needs to honour `sticky-max-age`.
    fn encode(&self, written: SystemTime) -> String {
        format!("{} {}", self.target(), unix_millis(written))
    }

    /// Reads a stored value; anything else is garbage and reads as no pin.
    fn decode(value: &[u8]) -> Option<(Pin, SystemTime)> {
        let text = std::str::from_utf8(value).ok()?;
        let mut fields = text.split(' ');
        let revision = fields.next().filter(|r| !r.is_empty() && r.len() <= 253)?;
        let pod = match fields.next()? {
            "-" => None,
            pod => Some(pod.parse().ok()?),
        };
        let written = UNIX_EPOCH + Duration::from_millis(fields.next()?.parse().ok()?);
        fields.next().is_none().then(|| (Pin { revision: revision.into(), pod }, written))
    }
}

pub(crate) fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// Whole milliseconds, saturating: what Redis takes for expiries and what stored times are in.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The longest `sticky-ttl` or `sticky-max-age` honoured; longer annotations are clamped to it, so
/// no tenant's annotation can push an expiry past what Redis or the clock can represent.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The lifetime of pins into a revision, as the current topology says.
pub type LifetimeOf<'a> = &'a (dyn Fn(&str) -> Lifetime + Sync);

/// How long a pin lives: `ttl` after its last use, and never longer than `max_age` after it
/// was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub ttl: Duration,
    pub max_age: Option<Duration>,
}

/// The idle lifetime of a pin for an id the activator made up (a new session cookie) until the
/// client sends the id back: long enough for a browser's next request, short enough that clients
/// that never return the cookie cannot fill the pin table.
pub const PROVISIONAL_TTL: Duration = Duration::from_secs(60);

impl Lifetime {
    /// This lifetime for a pin on probation: at most `PROVISIONAL_TTL` idle.
    pub fn provisional(self) -> Self {
        Lifetime { ttl: self.ttl.min(PROVISIONAL_TTL), max_age: self.max_age }
    }

    /// How long a pin written at `written` may live from `now` on.
    pub fn remaining(&self, age: Duration) -> Duration {
        match self.max_age {
            Some(max) => self.ttl.min(max.saturating_sub(age)),
            None => self.ttl,
        }
    }
}

/// Where a lookup found a key's pin, or found there is none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PinSource {
    /// This replica's pins, the only store there is.
    #[default]
    Memory,
    /// The near cache, trusted without asking Redis.
    NearCache,
    /// Redis, in this lookup's round trip.
    Redis,
    /// Redis could not be asked (down, slow, breaker open): this replica's own pins.
    Fallback,
    /// The request's signed pin cookie (`sticky-session-mode: signed-cookie`).
    Cookie,
}

impl PinSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PinSource::Memory => "memory",
            PinSource::NearCache => "near-cache",
            PinSource::Redis => "redis",
            PinSource::Fallback => "fallback",
            PinSource::Cookie => "cookie",
        }
    }
}

/// The pins of a request's session and flow keys, and where each was looked up.
#[derive(Clone, Debug, Default)]
pub struct Found {
    pub session: Option<Pin>,
    pub flow: Option<Pin>,
    /// `[session, flow]`.
    pub sources: [PinSource; 2],
    /// The session's pin, when the lookup wrote it (`NewSession`); `session` is then `None`, as
    /// the session had no pin.
    pub created: Option<Pin>,
}

/// Where a session without a pin would be pinned, and for how long, given its flow's pin as this
/// replica knows it (`None` when there is no flow pin, or none known here). With the shared store,
/// a session no replica is known to hold is pinned there in the lookup's own round trip, first
/// writer wins, so a new session costs one round trip. `None` from the function (or no function):
/// the session is only read.
pub type NewSession<'a> = Option<&'a (dyn Fn(Option<&Pin>) -> Option<(Pin, Lifetime)> + Sync)>;

/// A session whose service wants to hear when it ends (`sticky-session-end-path`): its raw id,
/// kept in this replica's memory only, and what to call.
#[derive(Debug)]
pub struct Watch {
    pub id: http::HeaderValue,
    pub call: Arc<SessionEnd>,
}

/// A watched session pin that left this replica's table (`moved`: replaced while live, by a
/// re-pin here or elsewhere; else expired or evicted).
#[derive(Debug)]
pub struct Ended {
    pub key: PinKey,
    pub pin: Pin,
    pub written: SystemTime,
    pub watch: Arc<Watch>,
    pub moved: bool,
}

/// The outcome of a conditional write: the pin that holds now, and whether it is ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub pin: Pin,
    pub won: bool,
}

/// The pin table the request path talks to, with its accounting.
pub struct Pins {
    memory: Arc<MemoryPins>,
    shared: Option<Arc<SharedPins>>,
    metrics: PinMetrics,
    /// The label sets `by_pod` has series for, so a pod's series goes when its last pin does.
    published: Mutex<HashSet<[String; 4]>>,
    maintained: AtomicU64,
    /// The seat index of this replica's pins, without Redis.
    seats: seats::LocalSeats,
}

/// Live session pins by service scope (`<namespace>/<service>`), revision and pod.
pub type SessionCounts = HashMap<(Arc<str>, Arc<str>, SocketAddr), u64>;

/// Live session pins per pod are counted every this many maintenance runs: the count walks the
/// whole table.
const COUNT_BY_POD_EVERY: u64 = 5;

impl Pins {
    /// Pins kept in this replica only.
    pub fn local(max_entries: u64, metrics: PinMetrics) -> Self {
        Self::with_memory(Arc::new(MemoryPins::new(max_entries)), None, metrics)
    }

    /// Pins shared through Redis, with this replica's pins as near cache and fallback.
    pub fn shared(max_entries: u64, config: SharedConfig, metrics: PinMetrics) -> anyhow::Result<Self> {
        let memory = Arc::new(MemoryPins::near_cache(max_entries));
        let shared = SharedPins::start(config, memory.clone(), metrics.store.clone())?;
        Ok(Self::with_memory(memory, Some(shared), metrics))
    }

    fn with_memory(memory: Arc<MemoryPins>, shared: Option<Arc<SharedPins>>, metrics: PinMetrics) -> Self {
        Pins {
            memory,
            shared,
            metrics,
            published: Mutex::default(),
            maintained: AtomicU64::new(0),
            seats: seats::LocalSeats::default(),
        }
    }

    /// The pins of a request's session and flow keys, found in one go: with the shared store, keys
    /// this replica cannot vouch for are read in one pipelined round trip, so the decision is made
    /// with every replica's pins, and a new session is pinned as `new_session` says in that round
    /// trip. `lifetime_of` gives the lifetime of pins into a revision.
    pub async fn lookup(
        &self,
        session: Option<&PinKey>,
        flow: Option<&PinKey>,
        lifetime_of: LifetimeOf<'_>,
        new_session: NewSession<'_>,
    ) -> Found {
        let (found, created) = match &self.shared {
            Some(shared) => {
                let looked = shared.lookup([session, flow], lifetime_of, new_session).await;
                (looked.found, looked.created)
            }
            None => {
                let found = [session, flow]
                    .map(|key| (key.and_then(|key| self.memory.get(key, lifetime_of)), PinSource::Memory));
                (found, None)
            }
        };
        if created.is_some() {
            self.metrics.writes.get((PinKind::Session, metrics::Wrote::New)).inc();
        }
        for (key, (pin, _)) in [session, flow].into_iter().zip(&found) {
            if let Some(key) = key {
                let looked = if pin.is_some() { metrics::Looked::Hit } else { metrics::Looked::Miss };
                self.metrics.lookups.get((key.kind, looked)).inc();
            }
        }
        let [(session, session_source), (flow, flow_source)] = found;
        Found { session, flow, sources: [session_source, flow_source], created }
    }

    /// Writes `pin` for `key` with `lifetime`: created if `expected` is `None`, else
    /// compare-and-set against `expected`. Returns the pin that holds afterwards, which is another
    /// writer's on a lost race; that one lives as `lifetime_of` says for its own revision.
    pub async fn write(
        &self,
        key: &PinKey,
        expected: Option<&Pin>,
        pin: Pin,
        lifetime: Lifetime,
        lifetime_of: LifetimeOf<'_>,
    ) -> Pin {
        let written = match &self.shared {
            Some(shared) => shared.write(key, expected, pin, lifetime, lifetime_of).await,
            None => self.memory.write(key, expected, pin, lifetime),
        };
        let wrote = match (written.won, expected) {
            (true, None) => metrics::Wrote::New,
            (true, Some(_)) => metrics::Wrote::Repin,
            (false, _) => metrics::Wrote::Conflict,
        };
        self.metrics.writes.get((key.kind, wrote)).inc();
        written.pin
    }

    /// Releases `key`'s pin if it is still `expected` (a strict session whose pod is gone): its
    /// next request starts a new session.
    pub async fn release(&self, key: &PinKey, expected: &Pin) {
        match &self.shared {
            Some(shared) => shared.release(key, expected).await,
            None => self.memory.remove(key),
        }
    }

    /// Pins a session of a revision with a cap on sessions per pod to the first candidate pod
    /// with a free seat, atomically with every other claim (through Redis, every replica's):
    /// or says whose pin holds instead, or that every candidate is full.
    ///
    /// While Redis cannot be asked, no new session is seated (it waits): a pod holds its cap in
    /// every replica's view or in none, and two replicas seating alone would share pods.
    pub async fn claim_seat(&self, claim: &SeatClaim<'_>) -> Claim {
        let claimed = match &self.shared {
            Some(shared) => shared.claim_seat(claim).await.unwrap_or(Claim::Full),
            None => self.seats.claim(&self.memory, claim),
        };
        match &claimed {
            Claim::Seated(_) => {
                let wrote = if claim.expected.is_some() { metrics::Wrote::Repin } else { metrics::Wrote::New };
                self.metrics.writes.get((PinKind::Session, wrote)).inc();
            }
            Claim::Taken(_) => self.metrics.writes.get((PinKind::Session, metrics::Wrote::Conflict)).inc(),
            Claim::Full => {}
        }
        claimed
    }

    /// Live seats of each of `pods` of `revision` in `scope`: for every replica through Redis,
    /// else (or while Redis does not answer) as this replica's pins say.
    pub async fn seats_held(&self, scope: &Arc<str>, revision: &Arc<str>, pods: &[SocketAddr]) -> Vec<u64> {
        if let Some(shared) = &self.shared
            && let Ok(held) = shared.seats_held(scope, revision, pods).await
        {
            return held;
        }
        self.seats.held(&self.memory, scope, revision, pods)
    }

    /// Live session pins of the service `scope` per revision and pod: for every replica through
    /// Redis, else (or while Redis does not answer, `None`) as this replica's pins say.
    pub async fn sessions_by_pod(&self, scope: &Arc<str>) -> Option<HashMap<(Arc<str>, SocketAddr), u64>> {
        if let Some(shared) = &self.shared {
            return shared.sessions_by_pod(scope).await.ok();
        }
        let counts = self.memory.sessions_by_pod().into_iter();
        Some(counts.filter(|((s, _, _), _)| s == scope).map(|((_, revision, pod), n)| ((revision, pod), n)).collect())
    }

    /// Brings the seat sets of the service `scope`'s `revisions` up to date with its pins (see
    /// `SharedPins::reindex_seats`); nothing to do without Redis. Whether it was done.
    pub async fn reindex_seats(&self, scope: &Arc<str>, revisions: &[Arc<str>]) -> bool {
        match &self.shared {
            Some(shared) => shared.reindex_seats(scope, revisions).await.is_ok(),
            None => true,
        }
    }

    /// Whether this replica is the one that does `what` for all (a lease in Redis renewed every
    /// `period`); without Redis, the only replica is. `None` while Redis does not answer.
    pub async fn lead(&self, what: &str, period: Duration) -> Option<bool> {
        match &self.shared {
            Some(shared) => shared.lead(what, period).await.ok(),
            None => Some(true),
        }
    }

    /// Watches the session pin at `key` for its end (`sticky-session-end-path`).
    pub fn watch_end(&self, key: &PinKey, watch: impl FnOnce() -> Watch) {
        self.memory.watch(key, watch);
    }

    /// Resource session pins that ended here since the last call.
    pub fn take_ended(&self) -> Vec<Ended> {
        self.memory.take_ended()
    }

    /// The shared store, for what other owners exchange through it (`SharedPins::lend`); `None`
    /// with pins kept in this replica only.
    pub(crate) fn store(&self) -> Option<&SharedPins> {
        self.shared.as_deref()
    }

    /// Completes once the shared store has tried Redis once, whether Redis answered or not; at
    /// once without a shared store. A replica that takes traffic before it could ask Redis would
    /// pin sessions of its own that other replicas have pinned elsewhere.
    pub async fn first_attempt(&self) {
        if let Some(shared) = &self.shared {
            shared.first_attempt().await;
        }
    }

    /// Drops expired pins and publishes the entry count, and every few runs the live session
    /// pins per pod, which it then returns (for placement by sessions); run once a second.
    pub fn maintain(&self) -> Option<SessionCounts> {
        self.metrics.entries.set(i64::try_from(self.memory.sweep()).unwrap_or(i64::MAX));
        if !self.maintained.fetch_add(1, Ordering::Relaxed).is_multiple_of(COUNT_BY_POD_EVERY) {
            return None;
        }
        let counts = self.memory.sessions_by_pod();
        self.publish_by_pod(&counts);
        Some(counts)
    }

    /// `activator_pins{namespace, service, revision, pod}`: the session pins this replica holds,
    /// so a pod's sessions are visible before it is scaled down. Bounded by pods, never ids.
    fn publish_by_pod(&self, counts: &SessionCounts) {
        let mut now_published = HashSet::with_capacity(counts.len());
        for ((scope, revision, pod), &n) in counts {
            let (namespace, service) = scope.split_once('/').unwrap_or(("", scope));
            let labels = [namespace.to_owned(), service.to_owned(), revision.to_string(), pod.to_string()];
            self.metrics.by_pod.with_label_values(&labels).set(i64::try_from(n).unwrap_or(i64::MAX));
            now_published.insert(labels);
        }
        let mut published = crate::sync::lock(&self.published);
        for gone in published.difference(&now_published) {
            let _ = self.metrics.by_pod.remove_label_values(&gone.each_ref().map(String::as_str));
        }
        *published = now_published;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_are_scoped_hashed_stable_and_parse_back() {
        let scope: Arc<str> = Arc::from("ns/svc");
        let a = PinKey::new(&scope, PinKind::Session, b"abc");
        assert_eq!(a, PinKey::new(&scope, PinKind::Session, b"abc"));
        assert_ne!(a, PinKey::new(&Arc::from("ns/other"), PinKind::Session, b"abc"));
        assert_ne!(a, PinKey::new(&scope, PinKind::Session, b"abd"));
        let text = a.to_string();
        assert!(text.starts_with("aa:{ns/svc}:s:"), "{text}");
        assert!(!text.contains("abc"), "ids are never stored raw: {text}");
        assert_eq!(text.len(), "aa:{ns/svc}:s:".len() + 32);
        assert_eq!(text.parse::<PinKey>(), Ok(a));
        let flow = PinKey::new(&scope, PinKind::Flow, b"abc");
        assert_eq!(flow.to_string().parse::<PinKey>(), Ok(flow));
        for bad in ["", "aa:{ns/svc}:x:00", "aa:ns/svc:s:00", "aa:{ns/svc}:s:zz", "bogus"] {
            assert!(bad.parse::<PinKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn values_round_trip_and_garbage_is_refused() {
        let written = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let pod: SocketAddr = "10.0.0.7:8012".parse().unwrap();
        let session = Pin::session("counter-00001", pod);
        assert_eq!(session.encode(written), "counter-00001 10.0.0.7:8012 1700000000123");
        assert_eq!(Pin::decode(session.encode(written).as_bytes()), Some((session, written)));
        let flow = Pin::flow("counter-00002");
        assert_eq!(Pin::decode(flow.encode(written).as_bytes()), Some((flow, written)));
        for garbage in [&b""[..], b"rev", b"rev notapod 1", b"rev - x", b"rev - 1 extra", b"\xff\xfe - 1", b" - 1"] {
            assert_eq!(Pin::decode(garbage), None, "{:?}", String::from_utf8_lossy(garbage));
        }
    }

    #[test]
    fn max_age_shortens_the_remaining_lifetime() {
        let capped = Lifetime { ttl: Duration::from_secs(600), max_age: Some(Duration::from_secs(700)) };
        assert_eq!(capped.remaining(Duration::from_secs(0)), Duration::from_secs(600));
        assert_eq!(capped.remaining(Duration::from_secs(500)), Duration::from_secs(200));
        assert_eq!(capped.remaining(Duration::from_secs(800)), Duration::ZERO);
    }

    proptest! {
        /// Redis holds what any client of it wrote: a value reads as a pin or as garbage.
        #[test]
        fn any_stored_value_reads_as_a_pin_or_nothing(value in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Pin::decode(&value);
        }

        #[test]
        fn any_stored_text_reads_as_a_pin_or_nothing(value in "[0-9a-z. :\\[\\]-]{0,80}") {
            let _ = Pin::decode(value.as_bytes());
        }

        #[test]
        fn a_stored_pin_reads_back(
            revision in "[a-z][a-z0-9-]{0,40}",
            pod in proptest::option::of(any::<(std::net::IpAddr, u16)>().prop_map(SocketAddr::from)),
            written_ms in 0u64..(1 << 45),
        ) {
            let pin = Pin { revision: revision.into(), pod };
            let written = UNIX_EPOCH + Duration::from_millis(written_ms);
            prop_assert_eq!(Pin::decode(pin.encode(written).as_bytes()), Some((pin, written)));
        }

        #[test]
        fn any_key_name_parses_or_is_refused_without_panicking(key in "(aa:\\{)?\\PC{0,60}") {
            if let Ok(parsed) = key.parse::<PinKey>() {
                prop_assert_eq!(parsed.to_string(), key);
            }
        }
    }
}
