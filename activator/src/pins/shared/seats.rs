//! Seats in Redis: a session claims a seat on a pod and is pinned there in one script, so
//! claims racing through any replicas never put more sessions on a pod than its cap; the count
//! of live seats per pod, for the autoscaler and the scale-down order; and a lease naming the one
//! replica that reports and writes what all replicas share (`lead`); and every replica's live
//! sessions per pod of a service, for the pods' deletion cost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::RedisResult;

use super::admin::pin_targets;
use super::{INVALIDATIONS, Op, Purpose, SharedPins};
use crate::pins::redis::RedisConnection;
use crate::pins::seats::{Claim, SeatClaim, seat_set_key};
use crate::pins::{Pin, millis};

/// Seat sets outlive every pin in them by this much after their last claim or count: a set of a
/// pod that left goes by itself.
const SEAT_SET_TTL: Duration = Duration::from_secs(24 * 3600);

/// Counts a seat set's live members, pruning the others: a member counts while its pin names the
/// set's target (`<revision> <pod>`). `skip` (the claiming key) is neither counted nor pruned.
const COUNT_SEATS: &str = r"
local function live_seats(set, target, skip)
  local live = 0
  for _, member in ipairs(redis.call('SMEMBERS', set)) do
    if member ~= skip then
      local value = redis.call('GET', member)
      if value and string.match(value, '^(%S+ %S+) ') == target then
        live = live + 1
      else
        redis.call('SREM', set, member)
      end
    end
  end
  return live
end
";

/// KEYS: the session's pin, then the seat set of each candidate pod in order. ARGV: the target the
/// pin must still name ('' for none), the cap, the pin's TTL in ms, the revision, the written
/// time in ms, the seat sets' TTL in ms, the invalidation channel, this replica, then the
/// candidate pods. Returns `{0, value}` when it pinned the session, `{1, value}` with the pin
/// that holds instead, `{2, false}` when every candidate is full.
const CLAIM_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
-- A value no activator wrote reads as no pin, and is replaced.
if current and not string.match(current, '^%S+ %S+ %d+$') then current = false end
if current and (ARGV[1] == '' or string.match(current, '^(%S+ %S+) ') ~= ARGV[1]) then
  return {1, current}
end
local cap = tonumber(ARGV[2])
for i = 2, #KEYS do
  local target = ARGV[4] .. ' ' .. ARGV[7 + i]
  if live_seats(KEYS[i], target, KEYS[1]) < cap then
    local value = target .. ' ' .. ARGV[5]
    redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
    redis.call('SADD', KEYS[i], KEYS[1])
    redis.call('PEXPIRE', KEYS[i], ARGV[6])
    if current then redis.call('PUBLISH', ARGV[7], KEYS[1] .. ' ' .. ARGV[8]) end
    return {0, value}
  end
end
return {2, false}
";

/// KEYS: the seat sets of a revision's pods. ARGV: the revision, the sets' TTL in ms, the pods.
/// Returns each pod's live seats.
const HELD_SCRIPT: &str = r"
local held = {}
for i = 1, #KEYS do
  held[i] = live_seats(KEYS[i], ARGV[1] .. ' ' .. ARGV[2 + i], '')
  if held[i] > 0 then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return held
";

/// Takes the lease `KEYS[1]` for `ARGV[1]` for `ARGV[2]` ms if it is free or already its own.
/// 1 if held now.
const LEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Every live session pin of the service `scope`, with its key and pod: its keys scanned (one
/// slot), then read a thousand at a time in pipelines.
async fn session_pins(conn: &mut RedisConnection, scope: &str) -> RedisResult<Vec<(String, Pin, SocketAddr)>> {
    let keys = conn.scan_one_slot(&format!("aa:{{{scope}}}:s:*")).await?;
    let mut pins = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        for (key, found) in chunk.iter().zip(pin_targets(conn, chunk).await?) {
            if let Some((pin, _)) = found
                && let Some(pod) = pin.pod
            {
                pins.push((key.clone(), pin, pod));
            }
        }
    }
    Ok(pins)
}

/// The scripts, built once.
#[derive(Clone)]
pub(super) struct SeatScripts {
    claim: redis::Script,
    held: redis::Script,
    lease: redis::Script,
}

impl Default for SeatScripts {
    fn default() -> Self {
        SeatScripts {
            claim: redis::Script::new(&format!("{COUNT_SEATS}{CLAIM_SCRIPT}")),
            held: redis::Script::new(&format!("{COUNT_SEATS}{HELD_SCRIPT}")),
            lease: redis::Script::new(LEASE_SCRIPT),
        }
    }
}

impl SharedPins {
    /// Claims a seat in Redis and pins the session there (see `CLAIM_SCRIPT`); `None` if Redis
    /// cannot be asked now.
    pub(crate) async fn claim_seat(&self, claim: &SeatClaim<'_>) -> Option<Claim> {
        let (mut conn, granted) = self.available()?;
        let scope = claim.key.scope();
        let written = SystemTime::now();
        let mut invocation = self.seat_scripts.claim.prepare_invoke();
        invocation.key(claim.key.to_string());
        for &pod in claim.candidates {
            invocation.key(seat_set_key(scope, claim.revision, pod));
        }
        invocation
            .arg(claim.expected.map(Pin::target).unwrap_or_default())
            .arg(claim.per_pod)
            .arg(millis(claim.lifetime.remaining(Duration::ZERO)))
            .arg(&**claim.revision)
            .arg(crate::pins::unix_millis(written))
            .arg(millis(SEAT_SET_TTL))
            .arg(INVALIDATIONS)
            .arg(&self.replica);
        for pod in claim.candidates {
            invocation.arg(pod.to_string());
        }
        let call = async move { invocation.invoke_async::<(u8, Option<Vec<u8>>)>(&mut conn).await };
        let (outcome, value) = self.call(Op::Claim, granted, call).await?;
        let decoded = value.and_then(|value| self.decode(claim.key, &value));
        match (outcome, decoded) {
            (0, Some((pin, written))) => {
                self.memory.put_verified(claim.key, pin.clone(), claim.lifetime, written);
                Some(Claim::Seated(pin))
            }
            (1, Some((pin, written))) => {
                self.memory.put_verified(claim.key, pin.clone(), claim.lifetime, written);
                Some(Claim::Taken(pin))
            }
            // The script replaces what does not read as a pin; a pin this replica cannot read
            // (an address it cannot parse) is left alone, and the session waits.
            _ => Some(Claim::Full),
        }
    }

    /// Live seats of each of `pods` of `revision` in `scope`, as Redis counts them for every
    /// replica; an error if Redis did not answer.
    pub(crate) async fn seats_held(
        &self,
        scope: &Arc<str>,
        revision: &Arc<str>,
        pods: &[SocketAddr],
    ) -> Result<Vec<u64>, String> {
        let mut invocation = self.seat_scripts.held.prepare_invoke();
        for &pod in pods {
            invocation.key(seat_set_key(scope, revision, pod));
        }
        invocation.arg(&**revision).arg(millis(SEAT_SET_TTL));
        for pod in pods {
            invocation.arg(pod.to_string());
        }
        self.lend(Purpose::Seats, |mut conn: RedisConnection| async move {
            let held: RedisResult<Vec<u64>> = invocation.invoke_async(&mut conn).await;
            held
        })
        .await
    }

    /// Live session pins of the service `scope` per revision and pod, as Redis holds them for
    /// every replica: its keys scanned (one slot) and read in one pipeline. An error if Redis did
    /// not answer.
    pub(crate) async fn sessions_by_pod(
        &self,
        scope: &Arc<str>,
    ) -> Result<std::collections::HashMap<(Arc<str>, SocketAddr), u64>, String> {
        let scope = scope.clone();
        self.lend(Purpose::Seats, |mut conn: RedisConnection| async move {
            let mut counts = std::collections::HashMap::new();
            for (_, pin, pod) in session_pins(&mut conn, &scope).await? {
                *counts.entry((pin.revision, pod)).or_default() += 1;
            }
            Ok(counts)
        })
        .await
    }

    /// Puts every live session pin of the service `scope` into `revisions` in its pod's seat set:
    /// pins that reached Redis without a claim (written back after Redis lost its data, moved by
    /// `activator pins drain`, seated by a replica that could not reach Redis) count from now on.
    /// An error if Redis did not answer.
    pub(crate) async fn reindex_seats(&self, scope: &Arc<str>, revisions: &[Arc<str>]) -> Result<(), String> {
        let revisions = revisions.to_vec();
        let scope = scope.clone();
        self.lend(Purpose::Seats, |mut conn: RedisConnection| async move {
            let mut add = redis::pipe();
            for (key, pin, pod) in session_pins(&mut conn, &scope).await? {
                if revisions.contains(&pin.revision) {
                    let set = seat_set_key(&scope, &pin.revision, pod);
                    add.cmd("SADD").arg(&set).arg(key).ignore();
                    add.cmd("PEXPIRE").arg(&set).arg(millis(SEAT_SET_TTL)).ignore();
                }
            }
            add.query_async::<()>(&mut conn).await
        })
        .await
    }

    /// Whether this replica holds the lease `name` (taking or keeping it for `period`): the one
    /// replica that does what must be done once for all. An error if Redis did not answer.
    pub(crate) async fn lead(&self, name: &str, period: Duration) -> Result<bool, String> {
        let mut invocation = self.seat_scripts.lease.prepare_invoke();
        invocation.key(format!("aa:lease:{name}")).arg(&self.replica).arg(millis(period));
        self.lend(Purpose::Seats, |mut conn: RedisConnection| async move {
            invocation.invoke_async::<u8>(&mut conn).await.map(|held| held == 1)
        })
        .await
    }
}
