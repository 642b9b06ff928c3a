//! Local mode's source of the world view: a topology file, plus optionally an endpoints file
//! that `autoscaler-shim` rewrites as it starts and stops pods. Both are re-read and re-applied
//! whenever their content changes. A broken file is logged with its location and counted, and
//! the last good snapshot keeps serving.
//!
//! The files are polled rather than watched with inotify: editors and Kubernetes ConfigMap
//! mounts replace files by rename or symlink swap, which inotify watches on the file itself
//! miss, and re-reading a few kilobytes a few times a second costs nothing measurable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::readiness::Prober;
use crate::stats::Stats;
use crate::throttle::QueueLimits;
use crate::topology::{self, Builder, EndpointsFile, Snapshot, TopologyFile};

/// A watched file and the content last seen in it.
struct Watched {
    path: PathBuf,
    seen: String,
}

impl Watched {
    /// The file's content if it changed since last seen. A file that cannot be read (not
    /// written yet, or mid-replacement) counts as unchanged.
    async fn changed(&mut self) -> Option<String> {
        match tokio::fs::read_to_string(&self.path).await {
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

pub struct LocalSource {
    topology: Watched,
    endpoints: Option<Watched>,
    file: TopologyFile,
    published: EndpointsFile,
    stats: Stats,
    queue: QueueLimits,
    prober: Prober,
    current: Arc<ArcSwap<Snapshot>>,
}

impl LocalSource {
    /// Loads the topology once; a broken file at start is an error, not an empty topology. The
    /// endpoints file may not exist yet.
    pub fn open(
        path: &Path,
        endpoints: Option<&Path>,
        stats: Stats,
        queue: QueueLimits,
        prober: Prober,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading topology {}", path.display()))?;
        let file = topology::parse(&text).with_context(|| format!("topology {}", path.display()))?;
        let mut source = LocalSource {
            topology: Watched { path: path.to_owned(), seen: text },
            endpoints: endpoints.map(|p| Watched { path: p.to_owned(), seen: String::new() }),
            file,
            published: EndpointsFile::new(),
            stats,
            queue,
            prober,
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
        };
        if let Some(path) = endpoints
            && let Ok(text) = std::fs::read_to_string(path)
        {
            source.published =
                topology::parse_endpoints(&text).with_context(|| format!("endpoints {}", path.display()))?;
            source.endpoints = Some(Watched { path: path.to_owned(), seen: text });
        }
        source.rebuild();
        Ok(source)
    }

    pub fn snapshot(&self) -> Arc<ArcSwap<Snapshot>> {
        self.current.clone()
    }

    /// Polls the files forever.
    pub async fn watch(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let mut changed = false;
            if let Some(text) = self.topology.changed().await {
                changed |=
                    self.accept("topology", &self.topology.path.clone(), topology::parse(&text), |s, f| s.file = f);
            }
            if let Some(watched) = &mut self.endpoints
                && let Some(text) = watched.changed().await
            {
                let path = watched.path.clone();
                changed |= self.accept("endpoints", &path, topology::parse_endpoints(&text), |s, e| s.published = e);
            }
            if changed {
                self.rebuild();
            }
        }
    }

    /// Takes a parsed file, or logs and counts why it was rejected.
    fn accept<T>(
        &mut self,
        what: &str,
        path: &Path,
        parsed: Result<T, topology::TopologyError>,
        store: impl FnOnce(&mut Self, T),
    ) -> bool {
        match parsed {
            Ok(value) => {
                store(self, value);
                self.stats.topology_reload(true);
                tracing::info!(path = %path.display(), "{what} file reloaded");
                true
            }
            Err(e) => {
                self.stats.topology_reload(false);
                tracing::error!(path = %path.display(), error = %e, "{what} file rejected; the previous one keeps serving");
                false
            }
        }
    }

    fn rebuild(&mut self) {
        let with = Builder { stats: &self.stats, queue: self.queue.clone(), prober: &self.prober };
        let snapshot = Snapshot::build(&self.file, &self.published, &self.current.load(), &with);
        self.current.store(Arc::new(snapshot));
    }
}
