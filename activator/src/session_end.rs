//! Telling a service that a session ended (`sticky-session-end-path`), so a stateful pod can
//! free what it keeps for the session without a patched queue-proxy.
//!
//! Once a second the session pins this replica watched that went idle, were evicted or were
//! moved are taken from the pin table. For each that this replica claims (`Pins::claim_end`: with
//! Redis, the first replica to claim a pin's end; a pin still in use through another replica has
//! not ended), one `POST` goes to the pod the session was pinned to, with the session id in the
//! service's session header and `idle` or `moved` in `K-Session-End`, if that pod is still one
//! of its revision's: an address that left may be another pod's by now. Best effort and off the
//! request path: at most `CONCURRENT_CALLS` at once, each within `CALL_TIMEOUT`, never retried.
//! Must not route requests nor change pins.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use tokio::sync::Semaphore;

use crate::pins::{Ended, Pins};
use crate::stats::Stats;
use crate::world::Snapshot;

/// The header naming why a session ended: `idle` or `moved`.
pub const REASON: &str = "k-session-end";
/// How often ended pins are collected.
const INTERVAL: Duration = Duration::from_secs(1);
const CONCURRENT_CALLS: usize = 16;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What this replica did about an ended session.
#[derive(Clone, Copy)]
enum Outcome {
    Sent,
    Failed,
    /// Another replica claimed the call, or the session lives on through another replica.
    Elsewhere,
    /// The pod is no longer one of its revision's: its address may be another pod's by now, which
    /// must not hear of this session.
    Gone,
}

/// `[idle, moved][Outcome]`.
struct Counters([[IntCounter; 4]; 2]);

impl Counters {
    fn new(stats: &Stats) -> Self {
        Counters(["idle", "moved"].map(|reason| {
            ["sent", "failed", "elsewhere", "gone"].map(|r| stats.session_ends.with_label_values(&[reason, r]))
        }))
    }

    fn count(&self, ended: &Ended, outcome: Outcome) {
        self.0[usize::from(ended.moved)][outcome as usize].inc();
    }
}

/// Collects ended sessions from `pins` and makes the calls, forever, to pods `world` still lists
/// for their revision.
pub async fn run(pins: &Pins, stats: &Stats, world: &ArcSwap<Snapshot>) {
    let counters = Arc::new(Counters::new(stats));
    let client =
        reqwest::Client::builder().no_proxy().timeout(CALL_TIMEOUT).build().expect("a plain HTTP client builds");
    let slots = Arc::new(Semaphore::new(CONCURRENT_CALLS));
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for ended in pins.take_ended() {
            if !still_listed(&world.load(), &ended) {
                tracing::debug!(session = %ended.key.short_hash(), "the session's pod left; nobody to tell of its end");
                counters.count(&ended, Outcome::Gone);
                continue;
            }
            if !pins.claim_end(&ended).await {
                counters.count(&ended, Outcome::Elsewhere);
                continue;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (client, counters) = (client.clone(), counters.clone());
            tokio::spawn(async move {
                let outcome = if call(&client, &ended).await { Outcome::Sent } else { Outcome::Failed };
                counters.count(&ended, outcome);
                drop(slot);
            });
        }
    }
}

/// Whether the pod `ended` was pinned to is still one of its revision's (ready, or waiting for a
/// probe): only such a pod is told, never an address that left and may serve another by now.
fn still_listed(world: &Snapshot, ended: &Ended) -> bool {
    let (Some(pod), Some((namespace, _))) = (ended.pin.pod, ended.key.scope().split_once('/')) else { return false };
    world.revision(namespace, &ended.pin.revision).is_some_and(|(_, revision)| revision.throttler.lists(pod))
}

/// One `POST` to the pod `ended` was pinned to; whether the pod answered with a success.
async fn call(client: &reqwest::Client, ended: &Ended) -> bool {
    let Some(pod) = ended.pin.pod else { return false };
    let watch = &ended.watch;
    let url = format!("http://{pod}{}", watch.call.path);
    let reason = if ended.moved { "moved" } else { "idle" };
    let sent = client.post(&url).header(&watch.call.header, watch.id.clone()).header(REASON, reason).send().await;
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
