//! What replicas exchange through the store beside pins, on its connections and with its
//! breaker: the split's request counts (`sticky-split-mode: requests`) and the claims that let one
//! replica alone tell a pod of a session's end.

use std::time::{Duration, SystemTime};

use crate::pins::{Ended, Pin, millis, unix_millis};
use crate::served::COUNT_PERIOD_SECONDS;

use super::refresh::REFRESH_TIMEOUT;
use super::{Op, SharedPins};

/// Adds this replica's request counts to the service's per-period hashes and reads the window's
/// back, in one step. KEYS: the window's period hashes, oldest first. ARGV: the TTL, the most a
/// period may plausibly count, the number of revisions, the revisions, then (key index, revision
/// index, count) triples. A count already there that is not a plausible one (written by no
/// activator) is replaced rather than added to, where `HINCRBY` would fail the whole exchange.
/// Returns the number replaced and, per period, each revision's count as stored.
pub(super) const COUNT_SCRIPT: &str = r"
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

/// How long a claim on a pin's end call is kept: far longer than replicas take to notice the
/// same end, each within a second or two.
const END_CLAIM_TTL: Duration = Duration::from_secs(3600);
/// More requests in one period than every activator could route (a hundred million a second):
/// a value in Redis above it was not written by one, and is left out.
const MAX_PERIOD_COUNT: u64 = 100_000_000 * COUNT_PERIOD_SECONDS;

impl SharedPins {
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
                    self.metrics.errors.get(Op::Decode).inc_by(replaced);
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
                self.metrics.errors.get(Op::Decode).inc();
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
}
