//! A store that lost its pins (restarted without persistence, failed over to an empty replica,
//! flushed), told by its generation (`GENERATION_KEY`): every pin this replica holds is written
//! back, first writer wins, and keys it does not hold wait for that, and early in an outage for
//! Redis to answer again, before they are pinned anew.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::pins::memory::Touched;
use crate::pins::millis;
use crate::pins::redis::RedisConnection;

use super::refresh::{REFRESH_TIMEOUT, chunks};
use super::{Op, SharedPins};

/// The key whose value names what the store holds: set (`SET … NX`) by the first replica to find
/// it missing. A value other than the one last seen, or none, means the store lost its data.
pub(super) const GENERATION_KEY: &str = "aa:generation";
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

impl SharedPins {
    /// Whether the request path's outage began less than `OUTAGE_HOLD` ago.
    pub(super) fn outage_is_young(&self) -> bool {
        let since = self.outage_since_ms.load(Ordering::Acquire);
        since != 0 && self.breaker.now_ms().saturating_sub(since) < millis(OUTAGE_HOLD)
    }

    /// Waits, until `OUTAGE_HOLD` into the outage, for Redis to answer a generation check, then
    /// for the pins it lost to be written back. Whether Redis answered.
    pub(super) async fn wait_answer(&self) -> bool {
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

    /// Checks the store's generation every refresh interval, and every `RESTORE_POLL` from an
    /// outage until a check passes.
    pub(super) async fn guard_loop(self: Arc<Self>) {
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
    pub(super) async fn check_store(&self) -> Result<(), String> {
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
        let previous = self.generation.load_full();
        if previous.as_deref() != Some(&current) {
            let lost = previous.is_some();
            // Keys this replica does not hold wait from now until the pins are back.
            self.restoring.store(true, Ordering::Release);
            let pins: Vec<Touched> = self.memory.live().into_iter().map(|t| Touched { synced: false, ..t }).collect();
            let count = pins.len() as u64;
            if lost {
                self.metrics.restores.inc();
                tracing::warn!(
                    pins = count,
                    previous = previous.as_deref().map_or("", String::as_str),
                    current = current.as_str(),
                    "the pin store lost its pins; writing back this replica's"
                );
            }
            self.write_back(pins).await?;
            if lost {
                self.metrics.restored_pins.inc_by(count);
                tokio::time::sleep(self.config.refresh_interval * RESTORE_GRACE_INTERVALS).await;
            }
            // Current only once the others had their grace: until then a request's read of the
            // new store (one queued across the reconnection included) finds it lost and waits.
            self.generation.store(Some(Arc::new(current)));
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
    pub(super) async fn wait_restored(&self) {
        let restored = self.restored.notified();
        tokio::pin!(restored);
        restored.as_mut().enable();
        if !self.restoring.load(Ordering::Acquire) || !self.breaker.is_closed() {
            return;
        }
        let wait = self.config.refresh_interval * RESTORE_GRACE_INTERVALS + RESTORE_WAIT_BEYOND_GRACE;
        let _ = tokio::time::timeout(wait, restored).await;
    }
}
