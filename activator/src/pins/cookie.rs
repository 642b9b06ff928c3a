//! Session pins that need no store (`sticky-session-mode: signed-cookie`): the pin (revision and
//! pod) travels in a cookie signed with HMAC-SHA256 over the service's scope, so any replica can
//! verify it without Redis, and a cookie of another service, a changed one or an expired one is
//! refused. Keys come from a file (a mounted Secret) of one key per line: the first signs, every
//! one verifies, so a key is rotated by putting the new one first, then removing the old.
//!
//! Owns the cookie's format and its keys; where the request goes stays with `affinity`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ring::hmac;

use super::Pin;

/// The format's version, first in every cookie: 2 carries when the pin was first made, for
/// `sticky-max-age`; 1, which did not, is still read.
const VERSION: &str = "2";
const VERSION_WITHOUT_WRITTEN: &str = "1";
/// The shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// The keys of a key file; empty until one is read.
pub struct CookieKeys {
    path: Option<PathBuf>,
    keys: ArcSwap<Vec<hmac::Key>>,
    /// The file's content last applied, so an unchanged file is not re-applied.
    applied: std::sync::Mutex<Option<String>>,
}

impl CookieKeys {
    /// Keys read from `path` (re-read by `reload`); without a path, signed cookies are off.
    pub fn from_file(path: Option<PathBuf>) -> anyhow::Result<Self> {
        let keys = CookieKeys { path, keys: ArcSwap::default(), applied: Default::default() };
        if let Some(path) = &keys.path {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading --pin-cookie-keys {}: {e}", path.display()))?;
            keys.apply(&text)?;
        }
        Ok(keys)
    }

    pub fn enabled(&self) -> bool {
        !self.keys.load().is_empty()
    }

    /// Re-reads the key file if it changed (a rotated Secret); a file that does not read keeps
    /// the keys in force, with one log line.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        match std::fs::read_to_string(path).map_err(anyhow::Error::from).and_then(|text| self.apply(&text)) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cookie keys not reloaded; the previous keys stay")
            }
        }
    }

    fn apply(&self, text: &str) -> anyhow::Result<()> {
        let mut applied = crate::sync::lock(&self.applied);
        if applied.as_deref() == Some(text) {
            return Ok(());
        }
        let keys: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if keys.is_empty() {
            anyhow::bail!("no key in the file");
        }
        if let Some(short) = keys.iter().position(|k| k.len() < MIN_KEY_BYTES) {
            anyhow::bail!("key {} is shorter than {MIN_KEY_BYTES} bytes", short + 1);
        }
        self.keys.store(Arc::new(keys.iter().map(|k| hmac::Key::new(hmac::HMAC_SHA256, k.as_bytes())).collect()));
        if applied.is_some() {
            tracing::info!(keys = keys.len(), "cookie keys reloaded");
        }
        *applied = Some(text.to_owned());
        Ok(())
    }

    /// The cookie value carrying `pin` for `scope`, first made at `written`, until `expires`.
    pub fn sign(&self, scope: &str, pin: &Pin, written: SystemTime, expires: SystemTime) -> Option<String> {
        let pod = pin.pod?;
        let keys = self.keys.load();
        let key = keys.first()?;
        let secs = |at: SystemTime| at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let body = format!("{VERSION}|{}|{}|{}|{pod}", secs(expires), secs(written), pin.revision);
        let tag = hmac::sign(key, signed(scope, &body).as_bytes());
        Some(format!("{body}|{}", hex(tag.as_ref())))
    }

    /// What a cookie value carries for `scope`, if a key in force signed it for this scope and it
    /// has not expired.
    pub fn verify(&self, scope: &str, value: &str, now: SystemTime) -> Option<SignedPin> {
        let (body, tag) = value.rsplit_once('|')?;
        let tag = unhex(tag)?;
        let message = signed(scope, body);
        // `hmac::verify` compares in constant time.
        let genuine = self.keys.load().iter().any(|key| hmac::verify(key, message.as_bytes(), &tag).is_ok());
        if !genuine {
            return None;
        }
        let at = |secs: &str| secs.parse().ok().map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
        let mut fields = body.split('|');
        let (version, expires) = (fields.next()?, at(fields.next()?)?);
        let written = match version {
            VERSION => Some(at(fields.next()?)?),
            VERSION_WITHOUT_WRITTEN => None,
            _ => return None,
        };
        let (revision, pod) = (fields.next()?, fields.next()?);
        let pod: SocketAddr = pod.parse().ok()?;
        (fields.next().is_none() && expires > now && !revision.is_empty()).then(|| SignedPin {
            pin: Pin::session(revision, pod),
            expires,
            written,
        })
    }
}

/// A verified pin cookie's content.
#[derive(Debug, PartialEq, Eq)]
pub struct SignedPin {
    pub pin: Pin,
    pub expires: SystemTime,
    /// When the pin was first made; `None` in cookies of the first version.
    pub written: Option<SystemTime>,
}

/// What is signed: the scope (not sent, so a cookie of one service means nothing to another) and
/// the cookie's body.
fn signed(scope: &str, body: &str) -> String {
    format!("{scope}|{body}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "first-key-of-at-least-thirty-two-bytes";
    const K2: &str = "second-key-of-at-least-thirty-two-bytes";

    fn keys(lines: &[&str]) -> CookieKeys {
        let keys = CookieKeys { path: None, keys: ArcSwap::default(), applied: Default::default() };
        keys.apply(&lines.join("\n")).unwrap();
        keys
    }

    #[test]
    fn a_signed_pin_verifies_for_its_scope_until_it_expires() {
        let (k, now) = (keys(&[K1]), SystemTime::now());
        let pin = Pin::session("counter-1", "10.0.0.7:8012".parse().unwrap());
        let value = k.sign("ns/svc", &pin, now, now + Duration::from_secs(60)).unwrap();
        assert!(value.starts_with("2|") && !value.contains(';') && !value.contains(' '), "{value}");
        let verified = k.verify("ns/svc", &value, now).unwrap();
        assert_eq!(verified.pin, pin);
        let secs = |at: SystemTime| at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(verified.written.map(secs), Some(secs(now)), "when the pin was made travels along");
        assert_eq!(k.verify("ns/other", &value, now), None, "another service's cookie");
        assert_eq!(k.verify("ns/svc", &value, now + Duration::from_secs(61)), None, "expired");
        let tampered = value.replace("10.0.0.7", "10.0.0.8");
        assert_eq!(k.verify("ns/svc", &tampered, now), None, "changed");
        for garbage in ["", "|", "1|x|r|p|zz", "no-separator", "1|1|r|10.0.0.7:1|0123"] {
            assert_eq!(k.verify("ns/svc", garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn a_cookie_of_the_first_version_still_verifies() {
        let k = keys(&[K1]);
        let expires = (SystemTime::now() + Duration::from_secs(60)).duration_since(UNIX_EPOCH).unwrap().as_secs();
        let body = format!("1|{expires}|r|10.0.0.7:8012");
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, K1.as_bytes()), signed("s", &body).as_bytes());
        let verified = k.verify("s", &format!("{body}|{}", hex(tag.as_ref())), SystemTime::now()).unwrap();
        assert_eq!((verified.pin, verified.written), (Pin::session("r", "10.0.0.7:8012".parse().unwrap()), None));
    }

    #[test]
    fn rotation_signs_with_the_first_key_and_verifies_with_every_one() {
        let now = SystemTime::now();
        let pin = Pin::session("r", "10.0.0.7:8012".parse().unwrap());
        let old = keys(&[K1]).sign("s", &pin, now, now + Duration::from_secs(60)).unwrap();
        let rotating = keys(&[K2, K1]);
        assert!(rotating.verify("s", &old, now).is_some(), "the old key still verifies");
        let new = rotating.sign("s", &pin, now, now + Duration::from_secs(60)).unwrap();
        assert!(keys(&[K2]).verify("s", &new, now).is_some(), "signed with the new key");
        assert!(keys(&[K2]).verify("s", &old, now).is_none(), "the old key retired");
        let refused = CookieKeys { path: None, keys: ArcSwap::default(), applied: Default::default() };
        assert!(refused.apply("short").is_err() && refused.apply("\n\n").is_err());
    }
}
