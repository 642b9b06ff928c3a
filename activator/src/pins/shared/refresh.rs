//! Pins in use get their idle TTL slid, and are revalidated, by a batch every refresh interval,
//! in bounded pipelines on a connection of their own with a budget of their own, so the refresh
//! never delays a request's call; keys of a failed batch go back for the next one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::RedisResult;

use crate::pins::memory::Touched;
use crate::pins::redis::RedisConnection;
use crate::pins::{Pin, millis};

use super::breaker::Permit;
use super::{Op, SharedPins, push_cmd};

/// Pins refreshed per pipeline: a batch Redis answers in about a millisecond, so one pipeline
/// never holds the background connection long.
const REFRESH_CHUNK: usize = 500;
/// Budget for one refresh pipeline; off the request path, so it can afford to be generous.
pub(super) const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

impl SharedPins {
    pub(super) async fn refresh_loop(self: Arc<Self>) {
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
    pub(super) async fn refresh(&self, touched: Vec<Touched>) {
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
    pub(super) async fn refresh_chunk(&self, mut conn: RedisConnection, touched: Vec<Touched>) -> Vec<Touched> {
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
                    self.metrics.errors.get(Op::Refresh).inc();
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
                    self.metrics.errors.get(Op::Refresh).inc();
                    retry.push(t);
                }
            }
        }
        retry
    }
}

/// Pins to refresh in pipelines of at most `REFRESH_CHUNK`. A cluster takes a pipeline only when
/// its keys share a slot, so there each chunk holds one service's pins (its keys' hash tag).
pub(super) fn chunks(touched: impl Iterator<Item = Touched>, by_slot: bool) -> Vec<Vec<Touched>> {
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
