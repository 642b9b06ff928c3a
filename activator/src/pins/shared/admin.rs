//! What the operator's `activator pins` commands read and change in the store: pins by key,
//! deleted, or a pod's sessions drained to others, each change told to every replica as the
//! store's invalidation protocol says. Runs in the command's process, never on the request path.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use redis::RedisResult;

use crate::pins::Pin;

use super::{INVALIDATIONS, REPIN_SCRIPT};

/// Where a drained session pin points: no pod is ever ready there, so the session's next request
/// is re-pinned to another pod of its revision, as when its pod leaves.
pub(crate) const DRAINED_POD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Deletes the pin at `key` (`activator pins delete`) and tells every replica's near cache to
/// drop it. Whether there was one.
pub(crate) async fn delete_pin(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> RedisResult<bool> {
    let (deleted, _): (u32, u32) = redis::pipe()
        .cmd("DEL")
        .arg(key)
        .cmd("PUBLISH")
        .arg(INVALIDATIONS)
        .arg(format!("{key} operator"))
        .query_async(conn)
        .await?;
    Ok(deleted > 0)
}

/// What one pin of `keys` says, for `activator pins list`: its revision and pod.
pub(crate) async fn pin_targets(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &[String],
) -> RedisResult<Vec<Option<(Pin, SystemTime)>>> {
    let mut get = redis::pipe();
    keys.iter().for_each(|key| {
        get.get(key);
    });
    let values: Vec<Option<Vec<u8>>> = get.query_async(conn).await?;
    Ok(values.into_iter().map(|value| value.and_then(|v| Pin::decode(&v))).collect())
}

/// Moves every session pin of `keys` that names `pod` off it (`activator pins drain`), keeping
/// its revision, written time and TTL, and tells every replica's near cache. Each goes to the pod
/// of `to`, or else of its revision's other pinned pods, holding the fewest sessions; with no other
/// pod known, to `DRAINED_POD`, so the next request picks one. Compare-and-set, so a pin re-pinned
/// meanwhile is left as it is. Returns where they went.
pub(crate) async fn drain_pod(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &[String],
    pod: SocketAddr,
    to: &[SocketAddr],
) -> RedisResult<Drained> {
    let found = pin_targets(conn, keys).await?;
    // Sessions per pod of each revision, the pod being drained left out.
    let mut load: HashMap<(Arc<str>, SocketAddr), usize> = HashMap::new();
    for (pin, _) in found.iter().flatten() {
        if let Some(other) = pin.pod.filter(|p| *p != pod && *p != DRAINED_POD && (to.is_empty() || to.contains(p))) {
            *load.entry((pin.revision.clone(), other)).or_default() += 1;
        }
    }
    for target in to {
        for (pin, _) in found.iter().flatten() {
            load.entry((pin.revision.clone(), *target)).or_default();
        }
    }
    let script = redis::Script::new(REPIN_SCRIPT);
    let mut drained = Drained::default();
    for (key, found) in keys.iter().zip(found) {
        let Some((pin, written)) = found.filter(|(pin, _)| pin.pod == Some(pod)) else { continue };
        let ttl_ms: i64 = redis::cmd("PTTL").arg(key).query_async(conn).await?;
        if ttl_ms <= 0 {
            continue;
        }
        let least = load.iter_mut().filter(|((revision, _), _)| *revision == pin.revision).min_by_key(|(_, n)| **n);
        let next = match least {
            Some(((_, next), n)) => {
                *n += 1;
                *next
            }
            None => DRAINED_POD,
        };
        let moved = Pin { revision: pin.revision.clone(), pod: Some(next) };
        let mut repin = script.prepare_invoke();
        repin.key(key).arg(pin.target()).arg(moved.encode(written)).arg(ttl_ms).arg(INVALIDATIONS).arg("operator");
        let lost: Option<Vec<u8>> = repin.invoke_async(conn).await?;
        if lost.is_none() {
            match next {
                DRAINED_POD => drained.released += 1,
                next => *drained.moved.entry(next).or_default() += 1,
            }
        }
    }
    Ok(drained)
}

/// Where `drain_pod` sent a pod's sessions.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Sessions moved, per pod they now name.
    pub moved: std::collections::BTreeMap<SocketAddr, usize>,
    /// Sessions released to be placed anew on their next request: no other pod was known.
    pub released: usize,
}

/// A pin as the operator sees it: key, raw value, decoded target, remaining TTL.
pub(crate) async fn key_report(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> RedisResult<Option<String>> {
    let (value, ttl_ms): (Option<Vec<u8>>, i64) =
        redis::pipe().cmd("GET").arg(key).cmd("PTTL").arg(key).query_async(conn).await?;
    Ok(value.map(|value| {
        let raw = String::from_utf8_lossy(&value);
        let decoded = match Pin::decode(&value) {
            Some((pin, written)) => {
                let age = SystemTime::now().duration_since(written).unwrap_or_default();
                let pod = pin.pod.map_or("-".to_owned(), |p| p.to_string());
                format!("revision {} pod {pod}, written {}s ago", pin.revision, age.as_secs())
            }
            None => "not a pin: requests treat it as missing and overwrite it".to_owned(),
        };
        let ttl = if ttl_ms >= 0 { format!("{:.1}s", ttl_ms as f64 / 1000.0) } else { "none".to_owned() };
        format!("key    {key}\nvalue  {raw}\n       ({decoded})\nttl    {ttl}")
    }))
}
