//! Checking that a session end came from the activator (`--session-end-keys`), as the README
//! tells a service to: recompute the HMAC-SHA256 of `<time>\n<reason>\n<session id>` with each
//! key it was given, compare in constant time, and refuse a time more than `MAX_SKEW` away.
//! A service in another language does the same with its standard HMAC.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::http::HeaderMap;
use ring::hmac;

/// How far a signed time may be from this pod's clock; it bounds how long a captured call could
/// be replayed.
const MAX_SKEW: Duration = Duration::from_secs(300);

pub struct Verifier {
    keys: Vec<hmac::Key>,
}

impl Verifier {
    /// The keys of `path`, one per line, as the activator's `--session-end-keys` reads them.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let keys: Vec<hmac::Key> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(|key| hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()))
            .collect();
        anyhow::ensure!(!keys.is_empty(), "no key in {}", path.display());
        Ok(Verifier { keys })
    }

    /// Why the end in `headers` for `session` is not the activator's, if it is not.
    pub fn check(&self, headers: &HeaderMap, session: &str, reason: &str) -> Result<(), &'static str> {
        let field = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let time: u64 = field("k-session-end-time").and_then(|t| t.parse().ok()).ok_or("no signed time")?;
        let tag = field("k-session-end-signature")
            .and_then(|s| s.strip_prefix("v1="))
            .and_then(|s| hex::decode(s).ok())
            .ok_or("no v1 signature")?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if now.abs_diff(time) > MAX_SKEW.as_secs() {
            return Err("signed too long ago, or in the future");
        }
        let message = format!("{time}\n{reason}\n{session}");
        // `hmac::verify` compares in constant time.
        let genuine = self.keys.iter().any(|key| hmac::verify(key, message.as_bytes(), &tag).is_ok());
        genuine.then_some(()).ok_or("the signature does not match")
    }
}
