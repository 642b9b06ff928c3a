//! The store's background connection, lent to the owners of what replicas exchange through Redis
//! beside pins: the split's request counts (`affinity::share`) and the claims on a session's end
//! call (`session_end`). Their calls run on the connection the refresh uses, within its budget,
//! and are counted under their own operation in the store's metrics; a failure never opens the
//! request path's breaker. Also answers the one pin-table question a session's end needs: whether
//! a pin that went idle here still lives in the store. Owns no key of theirs.

use std::future::Future;

use redis::RedisResult;

use crate::pins::redis::RedisConnection;
use crate::pins::{Ended, Pin, millis, unix_millis};

use super::refresh::REFRESH_TIMEOUT;
use super::{Op, SharedPins};

/// What a lent call is for, as the store's metrics label it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Purpose {
    /// Exchanging request counts for `sticky-split-mode: requests`.
    Split,
    /// Claiming the call that tells a pod a session ended.
    End,
    /// Counting seats (`sticky-sessions-per-pod`) and holding the lease of the replica that
    /// reports them.
    Seats,
}

impl SharedPins {
    /// Runs `call` on the background connection within the refresh's budget, recording its
    /// latency and failure under `purpose`. An error if Redis was never reached or did not answer.
    pub(crate) async fn lend<T, F, Fut>(&self, purpose: Purpose, call: F) -> Result<T, String>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self.conn.get().ok_or("Redis not reached yet")?.background.clone();
        let op = match purpose {
            Purpose::Split => Op::Split,
            Purpose::End => Op::End,
            Purpose::Seats => Op::Seats,
        };
        self.timed(op, REFRESH_TIMEOUT, call(conn)).await
    }

    /// Counts `n` values a lent call found in Redis that no activator wrote (and left out).
    pub(crate) fn count_malformed(&self, n: u64) {
        self.metrics.errors.get(Op::Decode).inc_by(n);
    }

    /// Whether the pin `ended` went idle here but still lives in Redis as this replica knew it,
    /// with more time left than one refresh takes to arrive: another replica used it since, so
    /// the session has not ended. `None` if Redis did not answer.
    pub(crate) async fn lives_on(&self, ended: &Ended) -> Option<bool> {
        let key = ended.key.to_string();
        let written = unix_millis(ended.written);
        let grace = millis(self.config.refresh_interval) + 500;
        let read = |mut conn: RedisConnection| async move {
            let (value, ttl): (Option<Vec<u8>>, i64) =
                redis::pipe().cmd("GET").arg(&key).cmd("PTTL").arg(&key).query_async(&mut conn).await?;
            let same = value
                .as_deref()
                .and_then(Pin::decode)
                .is_some_and(|(pin, at)| pin == ended.pin && unix_millis(at) == written);
            Ok(same && u64::try_from(ttl).is_ok_and(|ttl| ttl > grace))
        };
        self.lend(Purpose::End, read).await.ok()
    }
}
