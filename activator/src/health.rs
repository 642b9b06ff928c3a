//! Whether this replica should receive traffic: not while draining after SIGTERM, not before its
//! world view has synced once (when its source needs a sync), not before its shared pin store has
//! tried Redis once (when there is one), and not while the autoscaler's websocket is down (when an
//! autoscaler is configured), as upstream.
//!
//! Owns the readiness state only; the probes that report it are answered in `probe_answers` and `admin`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwapOption;

#[derive(Default)]
pub(crate) struct Health {
    draining: AtomicBool,
    needs_sync: AtomicBool,
    synced: AtomicBool,
    /// Why the sync cannot complete (a watch RBAC forbids), while it cannot.
    sync_blocked: ArcSwapOption<String>,
    needs_pin_store: AtomicBool,
    pin_store_tried: AtomicBool,
    needs_autoscaler: AtomicBool,
    autoscaler_connected: AtomicBool,
}

impl Health {
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The world view comes from a source that must sync before the replica is ready.
    pub(crate) fn require_sync(&self) {
        self.needs_sync.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    /// What keeps the sync from completing, said by readiness until it clears.
    pub(crate) fn set_sync_blocked(&self, reason: Option<String>) {
        self.sync_blocked.store(reason.map(std::sync::Arc::new));
    }

    /// A shared pin store must try Redis once before the replica is ready; Redis being down
    /// afterwards never makes it unready (the store fails open).
    pub(crate) fn require_pin_store(&self) {
        self.needs_pin_store.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_pin_store_tried(&self) {
        self.pin_store_tried.store(true, Ordering::SeqCst);
    }

    pub(crate) fn require_autoscaler(&self) {
        self.needs_autoscaler.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_autoscaler_connected(&self, connected: bool) {
        self.autoscaler_connected.store(connected, Ordering::SeqCst);
    }

    /// `Ok` when this replica should receive traffic, else the reason.
    pub(crate) fn check(&self) -> Result<(), Cow<'static, str>> {
        if self.is_draining() {
            Err("received SIGTERM from kubelet".into())
        } else if self.needs_sync.load(Ordering::SeqCst) && !self.synced.load(Ordering::SeqCst) {
            match self.sync_blocked.load().as_deref() {
                Some(reason) => Err(reason.clone().into()),
                None => Err("the view of revisions and endpoints has not synced yet".into()),
            }
        } else if self.needs_pin_store.load(Ordering::SeqCst) && !self.pin_store_tried.load(Ordering::SeqCst) {
            Err("the shared pin store has not tried Redis yet".into())
        } else if self.needs_autoscaler.load(Ordering::SeqCst) && !self.autoscaler_connected.load(Ordering::SeqCst) {
            Err("connection has not yet been established".into())
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_draining_sync_the_pin_store_and_the_autoscaler_when_required() {
        let health = Health::default();
        assert!(health.check().is_ok(), "nothing required");
        health.require_sync();
        assert_eq!(health.check(), Err("the view of revisions and endpoints has not synced yet".into()));
        health.set_sync_blocked(Some("forbidden".into()));
        assert_eq!(health.check(), Err("forbidden".into()));
        health.set_synced();
        health.require_pin_store();
        assert_eq!(health.check(), Err("the shared pin store has not tried Redis yet".into()));
        health.set_pin_store_tried();
        health.require_autoscaler();
        assert_eq!(health.check(), Err("connection has not yet been established".into()));
        health.set_autoscaler_connected(true);
        assert!(health.check().is_ok());
        health.start_draining();
        assert_eq!(health.check(), Err("received SIGTERM from kubelet".into()));
    }
}
