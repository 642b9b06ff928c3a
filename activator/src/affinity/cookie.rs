//! Session pins that need no store (`sticky-session-mode: signed-cookie`): the pin (revision and
//! pod) travels in a cookie sealed with an AEAD (ChaCha20-Poly1305) under a key of the key file,
//! bound to the service's scope, so any replica can open it without Redis, the client learns
//! nothing of the cluster from it, and a cookie of another service, a changed one or an expired
//! one is refused. Keys rotate as `keys::KeyFile` says. Cookies of the earlier, signed-only
//! formats are still read, so sessions keep their pods across an upgrade.
//!
//! Owns the cookie's format and its keys; what the pin in it means stays with `pinning`, and the
//! pin's value format with `pins`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::{aead, digest, hmac};

use crate::keys::KeyFile;
use crate::pins::Pin;

/// The sealed format's marker, first in every cookie made now.
const SEALED: &str = "3.";
/// Earlier, signed-only formats: 2 carries when the pin was first made, 1 did not.
const VERSION_WITH_WRITTEN: &str = "2";
const VERSION_WITHOUT_WRITTEN: &str = "1";
const NONCE_BYTES: usize = 12;

/// The keys of `--pin-cookie-keys`; empty until one is read.
pub(crate) struct CookieKeys {
    file: KeyFile,
}

impl CookieKeys {
    /// Keys read from `path` (re-read by `reload`); without a path, signed cookies are off.
    pub(crate) fn from_file(path: Option<PathBuf>) -> anyhow::Result<Self> {
        Ok(CookieKeys { file: KeyFile::from_file("--pin-cookie-keys", path)? })
    }

    pub(crate) fn reload(&self) {
        self.file.reload();
    }

    /// The cookie value carrying `pin` for `scope`, first made at `written`, until `expires`:
    /// sealed, so it reads as random bytes.
    pub(crate) fn sign(&self, scope: &str, pin: &Pin, written: SystemTime, expires: SystemTime) -> Option<String> {
        let pod = pin.pod?;
        let keys = self.file.keys();
        let key = sealing_key(keys.first()?);
        let secs = |at: SystemTime| at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut sealed = format!("{}|{}|{}|{pod}", secs(expires), secs(written), pin.revision).into_bytes();
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).ok()?;
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(scope.as_bytes()),
            &mut sealed,
        )
        .ok()?;
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&sealed);
        Some(format!("{SEALED}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)))
    }

    /// What a cookie value carries for `scope`, if a key in force sealed (or, for a cookie of
    /// the earlier format, signed) it for this scope and it has not expired.
    pub(crate) fn verify(&self, scope: &str, value: &str, now: SystemTime) -> Option<SignedPin> {
        let keys = self.file.keys();
        let body = match value.strip_prefix(SEALED) {
            Some(sealed) => {
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sealed).ok()?;
                if raw.len() < NONCE_BYTES + aead::CHACHA20_POLY1305.tag_len() {
                    return None;
                }
                let (nonce, sealed) = raw.split_at(NONCE_BYTES);
                let nonce: [u8; NONCE_BYTES] = nonce.try_into().ok()?;
                keys.iter().find_map(|key| {
                    let mut opened = sealed.to_vec();
                    let aad = aead::Aad::from(scope.as_bytes());
                    let plain = sealing_key(key)
                        .open_in_place(aead::Nonce::assume_unique_for_key(nonce), aad, &mut opened)
                        .ok()?;
                    String::from_utf8(plain.to_vec()).ok().map(|body| format!("{VERSION_WITH_WRITTEN}|{body}"))
                })?
            }
            None => verify_signed(&keys, scope, value)?,
        };
        read_body(&body, now)
    }
}

/// The AEAD key a key of the file makes: SHA-256 of it, with a label so the same line used for
/// something else makes another key.
fn sealing_key(key: &[u8]) -> aead::LessSafeKey {
    let mut material = digest::Context::new(&digest::SHA256);
    material.update(b"affinity-activator pin cookie\0");
    material.update(key);
    let bytes = material.finish();
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::CHACHA20_POLY1305, bytes.as_ref()).expect("32 bytes"))
}

/// The body of a cookie of the earlier format, if a key in force signed it for `scope`.
fn verify_signed(keys: &[std::sync::Arc<[u8]>], scope: &str, value: &str) -> Option<String> {
    let (body, tag) = value.rsplit_once('|')?;
    let tag = hex::decode(tag).ok()?;
    let message = format!("{scope}|{body}");
    // `hmac::verify` compares in constant time.
    let genuine =
        keys.iter().any(|key| hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), message.as_bytes(), &tag).is_ok());
    genuine.then(|| body.to_owned())
}

/// `<version>|<expires>|[<written>|]<revision>|<pod>`, if unexpired.
fn read_body(body: &str, now: SystemTime) -> Option<SignedPin> {
    let at = |secs: &str| UNIX_EPOCH.checked_add(Duration::from_secs(secs.parse().ok()?));
    let mut fields = body.split('|');
    let (version, expires) = (fields.next()?, at(fields.next()?)?);
    let written = match version {
        VERSION_WITH_WRITTEN => Some(at(fields.next()?)?),
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

/// A verified pin cookie's content.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SignedPin {
    pub pin: Pin,
    pub expires: SystemTime,
    /// When the pin was first made; `None` in cookies of the first version.
    pub written: Option<SystemTime>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K1: &str = "first-key-of-at-least-thirty-two-bytes";
    const K2: &str = "second-key-of-at-least-thirty-two-bytes";

    fn keys(lines: &[&str]) -> CookieKeys {
        CookieKeys { file: KeyFile::of(lines) }
    }

    #[test]
    fn a_sealed_pin_opens_for_its_scope_until_it_expires() {
        let (k, now) = (keys(&[K1]), SystemTime::now());
        let pin = Pin::session("counter-1", "10.0.0.7:8012".parse().unwrap());
        let value = k.sign("ns/svc", &pin, now, now + Duration::from_secs(60)).unwrap();
        assert!(value.starts_with("3.") && !value.contains(';') && !value.contains(' '), "{value}");
        let verified = k.verify("ns/svc", &value, now).unwrap();
        assert_eq!(verified.pin, pin);
        let secs = |at: SystemTime| at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(verified.written.map(secs), Some(secs(now)), "when the pin was made travels along");
        assert_eq!(k.verify("ns/other", &value, now), None, "another service's cookie");
        assert_eq!(k.verify("ns/svc", &value, now + Duration::from_secs(61)), None, "expired");
        let mut tampered = value.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(k.verify("ns/svc", std::str::from_utf8(&tampered).unwrap(), now), None, "changed");
        for garbage in ["", "|", "3.", "3.!!", "3.AAAA", "1|x|r|p|zz", "no-separator", "1|1|r|10.0.0.7:1|0123"] {
            assert_eq!(k.verify("ns/svc", garbage, now), None, "{garbage:?}");
        }
    }

    /// Issue 25, item 3: the cookie reveals nothing of the cluster (no revision, no pod address).
    #[test]
    fn a_pin_cookie_reveals_nothing_of_the_cluster() {
        let (k, now) = (keys(&[K1]), SystemTime::now());
        let pin = Pin::session("counter-00001", "10.0.0.7:8012".parse().unwrap());
        let one = k.sign("ns/svc", &pin, now, now + Duration::from_secs(60)).unwrap();
        let two = k.sign("ns/svc", &pin, now, now + Duration::from_secs(60)).unwrap();
        for value in [&one, &two] {
            for clear in ["10.0.0.7", "8012", "counter", "|"] {
                assert!(!value.contains(clear), "{value} shows {clear}");
            }
        }
        assert_ne!(one, two, "a fresh nonce each time: equal pins make unequal cookies");
    }

    #[test]
    fn cookies_of_the_signed_formats_still_verify() {
        let k = keys(&[K1]);
        let expires = (SystemTime::now() + Duration::from_secs(60)).duration_since(UNIX_EPOCH).unwrap().as_secs();
        let key = hmac::Key::new(hmac::HMAC_SHA256, K1.as_bytes());
        for (body, written) in
            [(format!("1|{expires}|r|10.0.0.7:8012"), false), (format!("2|{expires}|{expires}|r|10.0.0.7:8012"), true)]
        {
            let tag = hmac::sign(&key, format!("s|{body}").as_bytes());
            let verified = k.verify("s", &format!("{body}|{}", hex::encode(tag.as_ref())), SystemTime::now()).unwrap();
            assert_eq!(verified.pin, Pin::session("r", "10.0.0.7:8012".parse().unwrap()));
            assert_eq!(verified.written.is_some(), written);
        }
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_every_one() {
        let now = SystemTime::now();
        let pin = Pin::session("r", "10.0.0.7:8012".parse().unwrap());
        let old = keys(&[K1]).sign("s", &pin, now, now + Duration::from_secs(60)).unwrap();
        let rotating = keys(&[K2, K1]);
        assert!(rotating.verify("s", &old, now).is_some(), "the old key still opens");
        let new = rotating.sign("s", &pin, now, now + Duration::from_secs(60)).unwrap();
        assert!(keys(&[K2]).verify("s", &new, now).is_some(), "sealed with the new key");
        assert!(keys(&[K2]).verify("s", &old, now).is_none(), "the old key retired");
    }

    proptest! {
        #[test]
        fn any_cookie_value_verifies_or_is_refused_without_panicking(value in "\\PC{0,120}") {
            let k = keys(&[K1]);
            prop_assert!(k.verify("ns/svc", &value, SystemTime::now()).is_none());
            let sealed = format!("{SEALED}{value}");
            prop_assert!(k.verify("ns/svc", &sealed, SystemTime::now()).is_none());
        }

        #[test]
        fn any_sealed_content_reads_as_a_pin_or_nothing(
            body in "[0-9a-z|.:\\[\\]-]{0,60}",
            expires in any::<u64>(),
            written in any::<u64>(),
        ) {
            let _ = read_body(&format!("{VERSION_WITH_WRITTEN}|{body}"), SystemTime::now());
            let _ = read_body(&body, SystemTime::now());
            let _ = read_body(&format!("{VERSION_WITH_WRITTEN}|{expires}|{written}|r|10.0.0.1:80"), SystemTime::now());
        }

        #[test]
        fn a_genuine_cookie_changed_anywhere_is_refused(at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let (k, now) = (keys(&[K1]), SystemTime::now());
            let pin = Pin::session("counter-1", "10.0.0.7:8012".parse().unwrap());
            let genuine = k.sign("ns/svc", &pin, now, now + Duration::from_secs(60)).unwrap();
            let mut bytes = genuine.clone().into_bytes();
            let i = at.index(bytes.len());
            prop_assume!(bytes[i] != to);
            bytes[i] = to;
            let changed = String::from_utf8_lossy(&bytes);
            prop_assert!(k.verify("ns/svc", &changed, now).is_none(), "{changed} from {genuine}");
        }
    }
}
