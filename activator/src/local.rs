//! Local mode's source of the world view: a topology file, re-read and re-applied whenever its
//! content changes. A broken file is logged with its location and counted, and the last good
//! snapshot keeps serving.
//!
//! The file is polled rather than watched with inotify: editors and Kubernetes ConfigMap mounts
//! replace files by rename or symlink swap, which inotify watches on the file itself miss, and
//! re-reading a few kilobytes a few times a second costs nothing measurable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;

use crate::proxy::PodClient;
use crate::stats::Stats;
use crate::throttle::QueueLimits;
use crate::topology::{self, Builder, Snapshot};

pub struct LocalSource {
    path: PathBuf,
    stats: Stats,
    queue: QueueLimits,
    current: Arc<ArcSwap<Snapshot>>,
    last_text: String,
}

impl LocalSource {
    /// Loads the file once; a broken file at start is an error, not an empty topology.
    pub fn open(path: &Path, stats: Stats, queue: QueueLimits) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading topology {}", path.display()))?;
        let file = topology::parse(&text).with_context(|| format!("topology {}", path.display()))?;
        let snapshot = Snapshot::build(&file, &Snapshot::default(), &builder(&stats, queue));
        Ok(LocalSource {
            path: path.to_owned(),
            stats,
            queue,
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
            last_text: text,
        })
    }

    pub fn snapshot(&self) -> Arc<ArcSwap<Snapshot>> {
        self.current.clone()
    }

    /// Polls the file forever.
    pub async fn watch(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match tokio::fs::read_to_string(&self.path).await {
                Ok(text) if text != self.last_text => self.apply(text),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(path = %self.path.display(), error = %e, "topology file unreadable; keeping the last one")
                }
            }
        }
    }

    fn apply(&mut self, text: String) {
        match topology::parse(&text) {
            Ok(file) => {
                let snapshot = Snapshot::build(&file, &self.current.load(), &builder(&self.stats, self.queue));
                self.current.store(Arc::new(snapshot));
                self.stats.topology_reload(true);
                tracing::info!(path = %self.path.display(), services = file.services.len(), "topology reloaded");
            }
            Err(e) => {
                self.stats.topology_reload(false);
                tracing::error!(path = %self.path.display(), error = %e, "topology rejected; the previous one keeps serving");
            }
        }
        self.last_text = text;
    }
}

fn builder(stats: &Stats, queue: QueueLimits) -> Builder<'_> {
    Builder { stats, queue, new_client: &PodClient::new }
}
