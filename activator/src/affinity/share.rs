//! A split that holds although sessions stick (`sticky-split-mode: requests`): each revision
//! counts the requests routed to it over a sliding window (counted when routed, so requests
//! decided at the same moment see each other), and a new pin goes to the revision whose
//! share of those requests is furthest below its percent, so long or busy sessions on one side
//! are balanced by where new sessions go.
//!
//! With the Redis pin store the counts are every replica's: `exchange_loop` adds what this replica
//! routed since its last exchange to a per-service count in Redis and reads back the window's
//! totals, once per pin refresh interval in one script per service (on the store's background
//! connection, `SharedPins::lend`), never per request. So a replica
//! that mostly sees new sessions steers them against the traffic that sessions pinned elsewhere
//! carry through other replicas. Without Redis, or while it does not answer, each replica
//! balances its own share.
//!
//! Counting (`crate::served`), for the services that split by requests only, is two relaxed
//! atomic adds on the request path; choosing reads the window, only for requests that make a new
//! pin. Must not decide anything else.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::pins::{Pins, Purpose, SharedPins};
use crate::served::{COUNT_PERIOD_SECONDS, WINDOW_SECONDS};
use crate::world::{Revision, Service, Snapshot};

/// Totals from Redis older than this many exchange intervals are not trusted: the replica falls
/// back to its own counts.
const STALE_AFTER_INTERVALS: u32 = 3;

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

static COUNTS: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(COUNT_SCRIPT));

/// More requests in one period than every activator could route (a hundred million a second):
/// a value in Redis above it was not written by one, and is left out.
const MAX_PERIOD_COUNT: u64 = 100_000_000 * COUNT_PERIOD_SECONDS;

/// The revision of `service`'s traffic (at more than 0 %) whose share of the requests routed
/// within the window is furthest below its percent: before any, the one with the largest percent.
pub(crate) fn most_under_served(service: &Service) -> Option<&Arc<Revision>> {
    let served: Vec<(u64, &Arc<Revision>, u32)> = service
        .traffic
        .iter()
        .filter(|t| t.percent > 0)
        .map(|t| (t.revision.served.total(), &t.revision, t.percent))
        .collect();
    let total = served.iter().map(|(n, ..)| *n).fold(0u64, u64::saturating_add).max(1) as f64;
    let deficit = |(n, _, percent): &(u64, &Arc<Revision>, u32)| f64::from(*percent) / 100.0 - *n as f64 / total;
    served.iter().max_by(|a, b| deficit(a).total_cmp(&deficit(b))).map(|(_, revision, _)| *revision)
}

/// Exchanges the counts of every service that splits by requests with the other replicas
/// through the pin store, every `interval`. Runs only with the Redis store.
pub(crate) async fn exchange_loop(world: &ArcSwap<Snapshot>, pins: &Pins, interval: Duration) {
    let Some(store) = pins.store() else { return };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let fresh_for = interval * STALE_AFTER_INTERVALS;
    loop {
        tick.tick().await;
        let splitting: Vec<Arc<Service>> =
            world.load().services().filter(|s| s.affinity.split_by_requests()).cloned().collect();
        for service in splitting {
            let revisions: Vec<&Arc<Revision>> =
                service.traffic.iter().filter(|t| t.percent > 0).map(|t| &t.revision).collect();
            let taken: Vec<Vec<(u64, u64)>> = revisions.iter().map(|r| r.served.take_unsent()).collect();
            let counts: Vec<(&str, &[(u64, u64)])> =
                revisions.iter().map(|r| &*r.name).zip(taken.iter().map(Vec::as_slice)).collect();
            match exchange(store, service.affinity.scope(), &counts, WINDOW_SECONDS).await {
                Some(totals) => {
                    revisions.iter().zip(totals).for_each(|(r, total)| r.served.shared_total(total, fresh_for));
                }
                None => revisions.iter().zip(&taken).for_each(|(r, taken)| r.served.unsent_again(taken)),
            }
        }
    }
}

/// Adds `counts` (per revision, requests routed here since the last exchange, by period) to
/// the service's shared counts, and returns each revision's requests over the last
/// `window_seconds` through every replica: one script on the store's background connection, keys
/// under the service's hash tag so a cluster takes it whole. A period's count that no activator
/// could have made (above `MAX_PERIOD_COUNT`, or not a count at all) is left out (and replaced
/// where this replica adds to it), counted as a malformed value; sums saturate. `None` if Redis
/// did not answer.
async fn exchange(
    store: &SharedPins,
    scope: &str,
    counts: &[(&str, &[(u64, u64)])],
    window_seconds: u64,
) -> Option<Vec<u64>> {
    let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    let (now, periods) = (unix / COUNT_PERIOD_SECONDS, window_seconds.div_ceil(COUNT_PERIOD_SECONDS).max(1));
    let first = now + 1 - periods;
    let mut script = COUNTS.prepare_invoke();
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
    let sent = store.lend(Purpose::Split, |mut conn| async move {
        script.invoke_async::<(u64, Vec<Vec<Option<redis::Value>>>)>(&mut conn).await
    });
    match sent.await {
        Ok((replaced, periods)) => {
            if replaced > 0 {
                store.count_malformed(replaced);
                tracing::warn!(%scope, replaced, "replaced implausible request counts in Redis");
            }
            let plausible_count = |value: &redis::Value| {
                let count = plausible(value);
                if count.is_none() {
                    store.count_malformed(1);
                    tracing::warn!(%scope, ?value, "ignoring an implausible request count in Redis");
                }
                count
            };
            Some(
                (0..counts.len())
                    .map(|i| {
                        let values = periods.iter().filter_map(|p| p.get(i).cloned().flatten());
                        values.filter_map(|v| plausible_count(&v)).fold(0u64, u64::saturating_add)
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

/// A count Redis answered, if activators could have made it: a whole number from 0 to
/// `MAX_PERIOD_COUNT`, whatever else another client of Redis may have written there.
fn plausible(value: &redis::Value) -> Option<u64> {
    let count = redis::from_redis_value::<i64>(value.clone()).ok().and_then(|n| u64::try_from(n).ok());
    count.filter(|n| *n <= MAX_PERIOD_COUNT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use crate::spec::testing::service as spec;
    use crate::world::publisher::tests::world;
    use proptest::prelude::*;

    #[test]
    fn new_pins_go_where_the_request_share_is_furthest_below_the_percent() {
        let pod = SocketAddr::from(([127, 0, 0, 1], 9000));
        let svc = world(vec![spec("svc", &[(90, vec![pod]), (10, vec![pod]), (0, vec![pod])])])
            .service_for_host("svc.test")
            .unwrap()
            .clone();
        assert_eq!(most_under_served(&svc).map(|r| &*r.name), Some("svc-0"), "before any: the largest percent");
        let (stable, canary) = (&svc.traffic[0].revision, &svc.traffic[1].revision);
        (0..95).for_each(|_| stable.served.record());
        (0..5).for_each(|_| canary.served.record());
        assert_eq!(stable.served.total(), 95);
        assert_eq!(most_under_served(&svc).map(|r| &*r.name), Some("svc-1"), "5 % served of 10 %");
        (0..20).for_each(|_| canary.served.record());
        assert_eq!(most_under_served(&svc).map(|r| &*r.name), Some("svc-0"), "a revision at 0 % is never chosen");
    }

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
}
