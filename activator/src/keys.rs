//! Keys read from a file (typically a mounted Secret): one per line, at least `MIN_KEY_BYTES`
//! each; the first is the one to sign (or seal) with, every one is accepted, so a key is rotated
//! by putting a new one first, then removing the old. The file is re-read when it changes; one
//! that does not read keeps the keys in force. Owns the key material only; what it protects is
//! its users' (pin cookies, session-end signatures).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::sync::lock;

/// The shortest key accepted, in bytes.
pub(crate) const MIN_KEY_BYTES: usize = 32;

pub(crate) struct KeyFile {
    /// The flag that named the file, for messages.
    flag: &'static str,
    path: Option<PathBuf>,
    keys: ArcSwap<Vec<Arc<[u8]>>>,
    /// The file's content last applied, so an unchanged file is not re-applied.
    applied: Mutex<Option<String>>,
}

impl KeyFile {
    /// Keys read from `path` now (an error names `flag` and the file); none without a path.
    pub(crate) fn from_file(flag: &'static str, path: Option<PathBuf>) -> anyhow::Result<Self> {
        let keys = KeyFile { flag, path, keys: ArcSwap::default(), applied: Mutex::default() };
        if let Some(path) = &keys.path {
            let text =
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {flag} {}: {e}", path.display()))?;
            keys.apply(&text).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
        }
        Ok(keys)
    }

    /// Keys given as lines, for tests.
    #[cfg(test)]
    pub(crate) fn of(lines: &[&str]) -> Self {
        let keys = KeyFile { flag: "test keys", path: None, keys: ArcSwap::default(), applied: Mutex::default() };
        keys.apply(&lines.join("\n")).expect("valid test keys");
        keys
    }

    /// The keys in force, the signing one first; empty without a file.
    pub(crate) fn keys(&self) -> Arc<Vec<Arc<[u8]>>> {
        self.keys.load_full()
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.keys.load().is_empty()
    }

    /// Re-reads the file if it changed (a rotated Secret); a file that does not read keeps the
    /// keys in force, with one log line.
    pub(crate) fn reload(&self) {
        let Some(path) = &self.path else { return };
        match std::fs::read_to_string(path).map_err(anyhow::Error::from).and_then(|text| self.apply(&text)) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(flag = self.flag, path = %path.display(), error = %e, "keys not reloaded; the previous keys stay")
            }
        }
    }

    pub(crate) fn apply(&self, text: &str) -> anyhow::Result<()> {
        let mut applied = lock(&self.applied);
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
        self.keys.store(Arc::new(keys.iter().map(|k| Arc::from(k.as_bytes())).collect()));
        if applied.is_some() {
            tracing::info!(flag = self.flag, keys = keys.len(), "keys reloaded");
        }
        *applied = Some(text.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_missing_keys_are_refused_and_the_file_is_named() {
        let keys = KeyFile { flag: "--x", path: None, keys: ArcSwap::default(), applied: Mutex::default() };
        assert!(keys.apply("short").is_err() && keys.apply("\n\n").is_err());
        let missing = KeyFile::from_file("--session-end-keys", Some("/nonexistent/keys".into())).err().unwrap();
        assert!(missing.to_string().contains("--session-end-keys /nonexistent/keys"), "{missing}");
    }
}
