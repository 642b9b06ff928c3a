//! A file watched by its content: re-read on demand, reported only when what it holds changed.
//! Reads the file; when to look is the caller's.

use std::path::{Path, PathBuf};

/// A watched file and the content last seen in it.
pub struct WatchedFile {
    path: PathBuf,
    seen: String,
}

impl WatchedFile {
    /// A file not read yet: its first content counts as a change.
    pub fn new(path: &Path) -> Self {
        WatchedFile { path: path.to_owned(), seen: String::new() }
    }

    /// A file just read: `text` is its content, and only another counts as a change.
    pub fn read_as(path: &Path, text: String) -> Self {
        WatchedFile { path: path.to_owned(), seen: text }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's content if it changed since last seen. A file that cannot be read (not
    /// written yet, or mid-replacement) counts as unchanged.
    pub fn changed(&mut self) -> Option<String> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) if text != self.seen => {
                self.seen.clone_from(&text);
                Some(text)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "file unreadable; keeping the last one");
                None
            }
        }
    }
}
