//! Local mode's source of the world view: a topology file, plus optionally an endpoints file
//! that `autoscaler-shim` rewrites as it starts and stops pods. Both are re-read and published
//! whenever their content changes. A broken file is logged with its location and counted, and
//! the last good world keeps serving.
//!
//! A change is seen through inotify on the files' folders, not on the files themselves: editors
//! and Kubernetes ConfigMap mounts replace files by rename or symlink swap, which a watch on the
//! file misses. Replicas reading the same file so take a change within moments of each other,
//! and place new sessions by the same split while the pin store cannot arbitrate. The
//! files are also polled, for file systems without inotify (some network and overlay mounts);
//! re-reading a few kilobytes a few times a second costs nothing measurable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::world::Publisher;
use contract::topology::{self as file, EndpointsFile, TopologyError, TopologyFile};
use contract::watched::WatchedFile;

/// How long after a change in a watched folder its files are read.
const WRITE_SETTLE: Duration = Duration::from_millis(10);

pub(crate) struct LocalSource {
    topology: WatchedFile,
    endpoints: Option<WatchedFile>,
    file: TopologyFile,
    published: EndpointsFile,
    publisher: Arc<Publisher>,
}

impl LocalSource {
    /// Loads and publishes the topology once; a broken file at start is an error, not an empty
    /// world. The endpoints file may not exist yet.
    pub(crate) fn open(path: &Path, endpoints: Option<&Path>, publisher: Arc<Publisher>) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading topology {}", path.display()))?;
        let file = file::parse(&text).with_context(|| format!("topology {}", path.display()))?;
        let topology = WatchedFile::read_as(path, text);
        let mut source = LocalSource {
            topology,
            endpoints: endpoints.map(WatchedFile::new),
            file,
            published: EndpointsFile::new(),
            publisher,
        };
        if let Some(watched) = &mut source.endpoints
            && let Some(text) = watched.changed()
        {
            source.published =
                file::parse_endpoints(&text).with_context(|| format!("endpoints {}", watched.path().display()))?;
        }
        source.publish();
        Ok(source)
    }

    /// Re-reads the files whenever their folders change, and every `interval`, forever.
    pub(crate) async fn watch(mut self, interval: Duration) {
        let folder_changed = Arc::new(tokio::sync::Notify::new());
        let folders = std::iter::once(&self.topology).chain(&self.endpoints).map(|w| w.path());
        // Dropping the watcher ends the watch: it lives as long as this loop.
        let _watcher = watch_folders(folders, folder_changed.clone());
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                // A file written in place raises an event per write: the rest of its writes land
                // before it is read.
                () = folder_changed.notified() => tokio::time::sleep(WRITE_SETTLE).await,
            }
            let mut changed = false;
            if let Some(text) = self.topology.changed() {
                let path = self.topology.path().to_owned();
                changed |= self.accept("topology", &path, file::parse(&text), |s, f| s.file = f);
            }
            if let Some(watched) = &mut self.endpoints
                && let Some(text) = watched.changed()
            {
                let path = watched.path().to_owned();
                changed |= self.accept("endpoints", &path, file::parse_endpoints(&text), |s, e| s.published = e);
            }
            if changed {
                self.publish();
            }
        }
    }

    /// Takes a parsed file, or logs and counts why it was rejected.
    fn accept<T>(
        &mut self,
        what: &str,
        path: &Path,
        parsed: Result<T, TopologyError>,
        store: impl FnOnce(&mut Self, T),
    ) -> bool {
        match parsed {
            Ok(value) => {
                store(self, value);
                tracing::info!(path = %path.display(), "{what} file reloaded");
                true
            }
            Err(e) => {
                self.publisher.rejected();
                tracing::error!(path = %path.display(), error = %e, "{what} file rejected; the previous one keeps serving");
                false
            }
        }
    }

    fn publish(&self) {
        self.publisher.apply(&self.file.to_spec(&self.published));
    }
}

/// Wakes `changed` on any change in the folders holding `files`; `None` (logged) where inotify is
/// not available, and polling alone sees changes.
fn watch_folders<'a>(
    files: impl Iterator<Item = &'a Path>,
    changed: Arc<tokio::sync::Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            changed.notify_one();
        }
    })
    .inspect_err(|error| tracing::warn!(%error, "file change notifications unavailable; polling only"))
    .ok()?;
    for file in files {
        let folder = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if let Err(error) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), %error, "cannot watch the folder for changes; polling it only");
        }
    }
    Some(watcher)
}
