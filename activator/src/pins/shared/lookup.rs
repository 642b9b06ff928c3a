//! A request's read of its session and flow keys: fresh near-cache entries as they are, the
//! others in one round trip to Redis, and a new session's pin written in that same round trip.
//!
//! A session no replica is known to hold is not read and then written (two round trips): the
//! caller says where the session would be pinned if it has no pin, and the lookup sends that pin
//! with `SET … NX PX … GET`, which writes it only if the key is empty and otherwise answers the
//! pin already there. A session pinned through another replica is therefore still decided by its
//! pin from its first request here; a new one costs one round trip. On a single Redis the same
//! exchange (a script) first checks the store's generation, so a store that lost its pins is
//! noticed before anything is written to it, as the pipelined read notices it.
//!
//! Owns nothing but the lookup; the pin format, the near cache and the write paths stay where
//! they are.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::restore::GENERATION_KEY;
use super::{Op, SharedPins, push_cmd};
use crate::pins::memory::Near;
use crate::pins::redis::RedisConnection;
use crate::pins::{Lifetime, LifetimeOf, NewSession, Pin, PinKey, PinSource, millis};

/// Writes the session's pin unless the key holds one, after checking the store's generation.
/// KEYS: the session's key, the generation's key. ARGV: the pin, its TTL in milliseconds, the
/// generation this replica knows ('' before it knows one). Returns `{1, the pin already there
/// or nil}`, or `{0, nil}` without writing when the store's generation is another.
pub(super) const CREATE_SCRIPT: &str = r"
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then return {0, false} end
return {1, redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')}
";

/// What a lookup found: `[session, flow]`, and the session's pin if the lookup wrote it (the
/// session then reads as without a pin, as it was).
pub(crate) struct LookedUp {
    pub found: [(Option<Pin>, PinSource); 2],
    pub created: Option<Pin>,
}

/// What one pass of `lookup` found.
enum Looked {
    Found(LookedUp),
    /// The store lost its pins: they are being written back.
    StoreLost,
    /// Redis did not answer early in an outage, for a key this replica does not hold: what this
    /// replica's own pins say, if waiting for Redis is in vain.
    Unreachable([(Option<Pin>, PinSource); 2]),
}

/// A new session's pin, sent in the lookup's round trip.
struct Create<'k> {
    key: &'k PinKey,
    pin: Pin,
    lifetime: Lifetime,
}

/// What Redis answered to a creating lookup.
enum Answer {
    /// The pin already under the key (`None`: the key was empty, and holds ours now).
    Held(Option<Vec<u8>>),
    /// The store's generation is not the one this replica knows: nothing was written.
    OtherGeneration,
}

impl SharedPins {
    /// The pins of `[session, flow]`: fresh near-cache entries as they are, the others read from
    /// Redis in one pipelined round trip, or, for a session no replica is known to hold, pinned
    /// where `new_session` says in that round trip (first writer wins). Without Redis, this
    /// replica's own pins.
    pub(crate) async fn lookup(
        &self,
        keys: [Option<&PinKey>; 2],
        lifetime_of: LifetimeOf<'_>,
        new_session: NewSession<'_>,
    ) -> LookedUp {
        let (mut check_generation, mut hold) = (true, true);
        // Each of the two waits happens once, so this ends by the third pass.
        loop {
            match self.lookup_once(keys, lifetime_of, new_session, check_generation, hold).await {
                Looked::Found(found) => return found,
                // The store came back empty just now: its pins are written back first.
                Looked::StoreLost => {
                    self.wait_restored().await;
                    check_generation = false;
                }
                Looked::Unreachable(found) => {
                    hold = false;
                    if !self.wait_answer().await {
                        return LookedUp { found, created: None };
                    }
                }
            }
        }
    }

    /// One pass of `lookup`. For a key this replica does not hold: `StoreLost` if
    /// `check_generation` and the round trip found a store that lost its pins (or that is still
    /// being written back); `Unreachable` if `hold` and Redis did not answer early in an outage.
    async fn lookup_once(
        &self,
        keys: [Option<&PinKey>; 2],
        lifetime_of: LifetimeOf<'_>,
        new_session: NewSession<'_>,
        check_generation: bool,
        hold: bool,
    ) -> Looked {
        let mut found: [(Option<Pin>, PinSource); 2] = std::array::from_fn(|_| (None, PinSource::NearCache));
        let mut ask = Vec::new();
        // While the store may lack pins replicas hold, this replica's own stand until it has
        // written them back, and a key it does not hold waits for the writing back to end.
        let restoring = self.restoring.load(Ordering::Acquire);
        let mut absent = false;
        for (i, key) in keys.iter().enumerate() {
            let Some(key) = key else { continue };
            match self.memory.near(key, self.config.revalidate_after, lifetime_of) {
                Near::Fresh(pin) => found[i].0 = Some(pin),
                Near::Stale if restoring => found[i] = (self.memory.get(key, lifetime_of), PinSource::Fallback),
                Near::Stale => ask.push((i, *key, None)),
                Near::Absent => {
                    absent = true;
                    ask.push((i, *key, None));
                }
                Near::Local(local) => ask.push((i, *key, Some(local))),
            }
        }
        if ask.is_empty() {
            return Looked::Found(LookedUp { found, created: None });
        }
        if absent && restoring {
            self.wait_restored().await;
        }
        // A key this replica does not hold is read with the store's generation, in the same
        // round trip: a store restarted empty is seen by the first request that would otherwise
        // pin anew what another replica still holds. A cluster pipeline takes one slot only.
        let generation = check_generation && absent && !self.is_cluster();
        // Only the session is asked, and no replica is known to hold it: it is pinned in this
        // round trip where it would go without a pin (its flow's pin, if any, is known here).
        let create = match (ask.as_slice(), new_session) {
            ([(0, key, None)], Some(new_session)) if absent => {
                new_session(found[1].0.as_ref()).map(|(pin, lifetime)| Create { key, pin, lifetime })
            }
            _ => None,
        };
        if let Some(create) = create {
            return self.create_once(create, found, lifetime_of, generation, hold).await;
        }
        let replies = match self.available() {
            Some((mut conn, granted)) => {
                let mut pipe = redis::pipe();
                for (_, key, local) in &ask {
                    match local {
                        // Ours goes in unless another replica's is there; either way the reply
                        // says which holds, in this one round trip.
                        Some(local) => push_cmd(&mut pipe, local, true),
                        None => {
                            pipe.get(key.to_string());
                        }
                    }
                }
                if generation {
                    pipe.get(GENERATION_KEY);
                }
                let read = async move { pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await };
                let expected = ask.len() + usize::from(generation);
                self.call(Op::Get, granted, read).await.filter(|replies| replies.len() == expected)
            }
            None => None,
        };
        let Some(mut replies) = replies else {
            let keys = ask.iter().map(|(i, key, _)| (*i, *key));
            return self.unanswered(found, keys, lifetime_of, hold);
        };
        if generation && !self.is_current_generation(replies.pop().flatten().as_deref()) {
            return self.store_lost();
        }
        for ((i, key, local), reply) in ask.into_iter().zip(replies) {
            found[i].1 = PinSource::Redis;
            found[i].0 = match (reply, local) {
                (Some(value), _) => self.adopt(key, &value, lifetime_of),
                (None, Some(local)) => {
                    self.memory.put_verified(key, local.pin.clone(), local.lifetime, local.written);
                    Some(local.pin)
                }
                // Not in Redis: a pin this replica made during an outage, which this lookup
                // could not see yet, still holds here.
                (None, None) => self.memory.get(key, lifetime_of),
            };
        }
        Looked::Found(LookedUp { found, created: None })
    }

    /// The creating lookup's one exchange: the session's pin written unless one is there,
    /// after the store's generation is checked when `generation`.
    async fn create_once(
        &self,
        create: Create<'_>,
        mut found: [(Option<Pin>, PinSource); 2],
        lifetime_of: LifetimeOf<'_>,
        generation: bool,
        hold: bool,
    ) -> Looked {
        let Create { key, pin, lifetime } = create;
        let written = SystemTime::now();
        let value = pin.encode(written);
        let ttl_ms = millis(lifetime.remaining(Duration::ZERO));
        let answer = match self.available() {
            Some((mut conn, granted)) if generation => {
                let known = self.generation.load_full();
                let mut script = self.create.prepare_invoke();
                script.key(key.to_string()).key(GENERATION_KEY).arg(&value).arg(ttl_ms);
                script.arg(known.as_deref().map_or("", String::as_str));
                let exchange = async move { script.invoke_async::<(bool, Option<Vec<u8>>)>(&mut conn).await };
                let answer = self.call(Op::Create, granted, exchange).await;
                answer.map(|(current, held)| if current { Answer::Held(held) } else { Answer::OtherGeneration })
            }
            Some((mut conn, granted)) => {
                let mut set = redis::cmd("SET");
                set.arg(key.to_string()).arg(&value).arg("NX").arg("PX").arg(ttl_ms).arg("GET");
                let exchange = async move { set.query_async::<Option<Vec<u8>>>(&mut conn).await };
                self.call(Op::Create, granted, exchange).await.map(Answer::Held)
            }
            None => None,
        };
        let created = match answer {
            None => return self.unanswered(found, [(0, key)].into_iter(), lifetime_of, hold),
            Some(Answer::OtherGeneration) => return self.store_lost(),
            Some(Answer::Held(None)) => {
                self.memory.put_verified(key, pin.clone(), lifetime, written);
                Some(pin)
            }
            Some(Answer::Held(Some(value))) => {
                found[0].0 = self.adopt(key, &value, lifetime_of);
                None
            }
        };
        found[0].1 = PinSource::Redis;
        Looked::Found(LookedUp { found, created })
    }

    /// Redis did not answer for `keys`: this replica's own pins, or `Unreachable` while the
    /// outage is young and `hold`, if one of them is not held here.
    fn unanswered<'k>(
        &self,
        mut found: [(Option<Pin>, PinSource); 2],
        keys: impl Iterator<Item = (usize, &'k PinKey)>,
        lifetime_of: LifetimeOf<'_>,
        hold: bool,
    ) -> Looked {
        let mut held_here = true;
        for (i, key) in keys {
            found[i] = (self.memory.get(key, lifetime_of), PinSource::Fallback);
            held_here &= found[i].0.is_some();
        }
        match hold && !held_here && self.outage_is_young() {
            true => Looked::Unreachable(found),
            false => Looked::Found(LookedUp { found, created: None }),
        }
    }

    /// The store's generation is one this replica has not seen: its pins are written back before
    /// any key this replica does not hold is decided.
    fn store_lost(&self) -> Looked {
        self.restoring.store(true, Ordering::Release);
        self.check_now.notify_one();
        Looked::StoreLost
    }

    /// Another replica's pin, read from Redis, goes into the near cache as confirmed.
    fn adopt(&self, key: &PinKey, value: &[u8], lifetime_of: LifetimeOf<'_>) -> Option<Pin> {
        self.decode(key, value).map(|(pin, written)| {
            self.memory.put_verified(key, pin.clone(), lifetime_of(&pin.revision), written);
            pin
        })
    }

    fn is_cluster(&self) -> bool {
        self.conn.get().is_some_and(|c| matches!(c.requests, RedisConnection::Cluster(_)))
    }

    /// Whether `generation` (as read from the store) is the one this replica last saw; any value
    /// is, before it has seen one.
    fn is_current_generation(&self, generation: Option<&[u8]>) -> bool {
        let known = self.generation.load();
        known.as_deref().is_none_or(|known| generation == Some(known.as_bytes()))
    }
}
