//! The pin table's metrics: lookups and writes by kind and result, the entries held, live
//! session pins per pod, and the shared store's calls. Declares them; `Pins` and `SharedPins`
//! record them.

use prometheus::{IntCounter, IntGauge, IntGaugeVec};

use super::PinKind;
use super::shared::StoreMetrics;
use crate::labelled::{LabelValue, Labelled, label_values};
use crate::metrics::Registrar;

label_values! {
    /// What a lookup found.
    pub(super) enum Looked {
        Hit = "hit",
        Miss = "miss",
    }
}

label_values! {
    /// What a write did: made a new pin, replaced one (its pod or revision gone), or lost to the
    /// pin another writer made first.
    pub(super) enum Wrote {
        New = "new",
        Repin = "repin",
        Conflict = "conflict",
    }
}

impl LabelValue for PinKind {
    const ALL: &'static [PinKind] = &[PinKind::Session, PinKind::Flow];

    fn as_str(self) -> &'static str {
        self.as_str()
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone)]
pub struct PinMetrics {
    pub(super) lookups: Labelled<(PinKind, Looked), IntCounter>,
    pub(super) writes: Labelled<(PinKind, Wrote), IntCounter>,
    pub(super) entries: IntGauge,
    pub(super) by_pod: IntGaugeVec,
    pub(super) store: StoreMetrics,
}

impl PinMetrics {
    pub fn register(reg: &Registrar) -> Self {
        let lookups = reg.counter_vec(
            "activator_pin_lookups_total",
            "Pin lookups by kind (session, flow) and result (hit, miss)",
            &["kind", "result"],
        );
        let writes = reg.counter_vec(
            "activator_pin_writes_total",
            "Pin writes by kind and result: new, repin (pod or revision gone), conflict (another writer won)",
            &["kind", "result"],
        );
        PinMetrics {
            lookups: Labelled::new(&lookups, &[]),
            writes: Labelled::new(&writes, &[]),
            entries: reg.gauge("activator_pin_entries", "Pins held in this replica's memory store"),
            by_pod: reg.gauge_vec(
                "activator_pins",
                "Live session pins this replica holds, by the pod they pin to (counted every 5 s)",
                &["namespace", "service", "revision", "pod"],
            ),
            store: StoreMetrics::register(reg),
        }
    }

    /// Whether the shared store answered its last call.
    pub fn store_up(&self) -> bool {
        self.store.is_up()
    }
}
