//! Telling a service that a session ended (`sticky-session-end-path`), so a stateful pod can
//! free what it keeps for the session without a patched queue-proxy.
//!
//! Once a second the session pins this replica watched that went idle, were evicted or were
//! moved are taken from the pin table. For each that this replica claims (`claim`: with Redis,
//! the first replica to claim a pin's end, with a key of its own; a pin still in use through
//! another replica has not ended), one `POST` goes to the pod the session was pinned to, with the
//! session id in the service's session header and `idle` or `moved` in `K-Session-End`, if that
//! pod is still one of its revision's: an address that left may be another pod's by now. Best
//! effort and off the request path: at most `CONCURRENT_CALLS` at once, each within
//! `CALL_TIMEOUT`, never retried.
//!
//! With `--session-end-keys` each call is signed (`signature`), so a pod can tell the activator's
//! word from a client's: clients cannot reach the end path through the activator, but with
//! Knative's burst capacity they reach queue-proxy directly once the activator leaves the path.
//! Must not route requests nor change pins.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use ring::hmac;
use tokio::sync::Semaphore;

use crate::headers::{SESSION_END, SESSION_END_SIGNATURE, SESSION_END_TIME};
use crate::keys::KeyFile;
use crate::labelled::{Labelled, label_values};
use crate::metrics::Registrar;
use crate::pins::{Ended, Pins, Purpose, millis, unix_millis};
use crate::world::Snapshot;

/// How often ended pins are collected.
const INTERVAL: Duration = Duration::from_secs(1);
const CONCURRENT_CALLS: usize = 16;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a claim on a pin's end call is kept: far longer than replicas take to notice the
/// same end, each within a second or two.
const END_CLAIM_TTL: Duration = Duration::from_secs(3600);

label_values! {
    /// Why a session ended, as `activator_session_ends_total` labels it.
    enum Reason {
        Idle = "idle",
        Moved = "moved",
    }
}

label_values! {
    /// What this replica did about an ended session.
    enum Outcome {
        Sent = "sent",
        Failed = "failed",
        /// Another replica claimed the call, or the session lives on through another replica.
        Elsewhere = "elsewhere",
        /// The pod is no longer one of its revision's: its address may be another pod's by now, which
        /// must not hear of this session.
        Gone = "gone",
    }
}

/// Ended sessions by why they ended and what this replica did.
#[derive(Clone)]
pub(crate) struct SessionEndMetrics(Labelled<(Reason, Outcome), IntCounter>);

impl SessionEndMetrics {
    pub(crate) fn register(reg: &Registrar) -> Self {
        let family = reg.counter_vec(
            "activator_session_ends_total",
            "Resource sessions whose pin ended here (reason idle or moved), by what this replica did: \
             sent or failed the pod's end call, left it to another replica (elsewhere), or found the pod gone",
            &["reason", "result"],
        );
        SessionEndMetrics(Labelled::new(&family, &[]))
    }

    fn count(&self, ended: &Ended, outcome: Outcome) {
        let reason = if ended.moved { Reason::Moved } else { Reason::Idle };
        self.0.get((reason, outcome)).inc();
    }
}

/// Collects ended sessions from `pins` and makes the calls, forever, to pods `world` still lists
/// for their revision, signed with the first of `keys` when there are any.
pub(crate) async fn run(pins: &Pins, counters: SessionEndMetrics, world: &ArcSwap<Snapshot>, keys: KeyFile) {
    if !keys.enabled() {
        tracing::info!(
            "session ends are sent unsigned: a pod cannot tell them from a client's without --session-end-keys"
        );
    }
    let counters = Arc::new(counters);
    let client =
        reqwest::Client::builder().no_proxy().timeout(CALL_TIMEOUT).build().expect("a plain HTTP client builds");
    let slots = Arc::new(Semaphore::new(CONCURRENT_CALLS));
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        keys.reload();
        for ended in pins.take_ended() {
            if !still_listed(&world.load(), &ended) {
                tracing::debug!(session = %ended.key.short_hash(), "the session's pod left; nobody to tell of its end");
                counters.count(&ended, Outcome::Gone);
                continue;
            }
            if !claim(pins, &ended).await {
                counters.count(&ended, Outcome::Elsewhere);
                continue;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (client, counters) = (client.clone(), counters.clone());
            let key = keys.keys().first().map(|key| hmac::Key::new(hmac::HMAC_SHA256, key));
            tokio::spawn(async move {
                let outcome = if call(&client, &ended, key.as_ref()).await { Outcome::Sent } else { Outcome::Failed };
                counters.count(&ended, outcome);
                drop(slot);
            });
        }
    }
}

/// Whether this replica is the one to tell the pod that `ended`'s session ended. Alone, it is.
/// With the shared store: a pin that only went idle here has ended only if no replica keeps it
/// alive, and then the first replica to claim the pin's end in Redis calls, so the pod hears of
/// each pin's end once; without an answer from Redis nobody does.
async fn claim(pins: &Pins, ended: &Ended) -> bool {
    let Some(store) = pins.store() else { return true };
    if !ended.moved && store.lives_on(ended).await != Some(false) {
        return false;
    }
    let key = ended.key.id_hash();
    let claim = format!("aa:end:{{{}}}:{key:032x}:{}", ended.key.scope(), unix_millis(ended.written));
    let ttl = millis(END_CLAIM_TTL);
    let claimed = store.lend(Purpose::End, |mut conn| async move {
        redis::cmd("SET").arg(&claim).arg(1).arg("NX").arg("PX").arg(ttl).query_async::<Option<String>>(&mut conn).await
    });
    claimed.await.is_ok_and(|claimed| claimed.is_some())
}

/// Whether the pod `ended` was pinned to is still one of its revision's (ready, or waiting for a
/// probe): only such a pod is told, never an address that left and may serve another by now.
fn still_listed(world: &Snapshot, ended: &Ended) -> bool {
    let (Some(pod), Some((namespace, _))) = (ended.pin.pod, ended.key.scope().split_once('/')) else { return false };
    world.revision(namespace, &ended.pin.revision).is_some_and(|(_, revision)| revision.throttler.lists(pod))
}

/// One `POST` to the pod `ended` was pinned to, signed with `key` if given; whether the pod
/// answered with a success.
async fn call(client: &reqwest::Client, ended: &Ended, key: Option<&hmac::Key>) -> bool {
    let Some(pod) = ended.pin.pod else { return false };
    let watch = &ended.watch;
    let url = format!("http://{pod}{}", watch.call.path);
    let reason = if ended.moved { "moved" } else { "idle" };
    let mut req = client.post(&url).header(&watch.call.header, watch.id.clone()).header(SESSION_END, reason);
    if let Some(key) = key {
        let time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        req = req.header(SESSION_END_TIME, time).header(SESSION_END_SIGNATURE, signature(key, time, reason, &watch.id));
    }
    let sent = req.send().await;
    match sent {
        Ok(resp) if resp.status().is_success() => true,
        Ok(resp) => {
            tracing::debug!(%pod, status = %resp.status(), session = %ended.key.short_hash(), "the pod refused a session end");
            false
        }
        Err(error) => {
            tracing::debug!(%pod, %error, session = %ended.key.short_hash(), "a session end did not reach its pod");
            false
        }
    }
}

/// `v1=` and the hex HMAC-SHA256 under `key` of `<time>\n<reason>\n<session id>`: what a pod
/// recomputes with its copy of the key to know the activator sent the end, and when.
fn signature(key: &hmac::Key, time: u64, reason: &str, id: &http::HeaderValue) -> String {
    let mut mac = hmac::Context::with_key(key);
    for part in [time.to_string().as_bytes(), b"\n", reason.as_bytes(), b"\n", id.as_bytes()] {
        mac.update(part);
    }
    format!("v1={}", hex::encode(mac.sign()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented construction, as Python's `hmac` computes it
    /// (`hmac.new(key, b"1700000000\nidle\nalice", hashlib.sha256).hexdigest()`): a service in
    /// any language that follows the README gets the same value.
    #[test]
    fn the_signature_is_the_documented_hmac() {
        let key = b"a-session-end-key-of-32-bytes-or-more";
        let id = http::HeaderValue::from_static("alice");
        let signed = signature(&hmac::Key::new(hmac::HMAC_SHA256, key), 1_700_000_000, "idle", &id);
        assert_eq!(signed, "v1=4bac2eeb341a5eae63c8779118b006757fc6e5ad0b0f0ebf3472617f27477a50");
        let other_reason = signature(&hmac::Key::new(hmac::HMAC_SHA256, key), 1_700_000_000, "moved", &id);
        assert_ne!(signed, other_reason);
    }
}
