//! Where metrics are made: each module that owns metrics declares them through a `Registrar` in
//! a `register` function of its own (linkerd's `register(reg)` shape), which creates each family
//! and registers it in one step, so the registry lists every family from the start and nothing
//! keeps a list by hand. Owns the registry and its exposition; must not know which metrics exist.

use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::sync::lock;

/// Buckets of the latency histograms, in seconds: from a tenth of a millisecond (what the
/// activator adds to a request is about 0.2 ms, and a pin lookup in Redis less, so a median
/// below the first bucket would be an interpolation) to a minute.
pub const LATENCY_BUCKETS: [f64; 18] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The registry `/metrics` exposes, and the name of every family it can carry.
#[derive(Clone, Default)]
pub struct Registrar {
    registry: Registry,
    families: Arc<Mutex<Vec<String>>>,
}

impl Registrar {
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect("a valid metric definition"))
    }

    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition"))
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("a valid metric definition"))
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric definition"))
    }

    /// A latency histogram (`LATENCY_BUCKETS`).
    pub fn histogram_vec(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.register(HistogramVec::new(opts, labels).expect("a valid metric definition"))
    }

    /// Notes families exposed by another registry alongside this one (upstream's names).
    pub fn note_families(&self, names: &[String]) {
        lock(&self.families).extend_from_slice(names);
    }

    /// The name of every family `/metrics` can carry (histograms without their `_bucket`, `_sum`
    /// and `_count` suffixes), whether it has series yet or not.
    pub fn family_names(&self) -> Vec<String> {
        lock(&self.families).clone()
    }

    /// The text exposition format of this registry's families and `more`.
    pub fn encode(&self, more: Vec<MetricFamily>) -> Vec<u8> {
        let mut families = self.gather();
        families.extend(more);
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).expect("encoding into a Vec cannot fail");
        out
    }

    /// The families of this registry.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// Registers a collector made elsewhere (one with buckets of its own).
    pub fn register<C: Collector + Clone + 'static>(&self, collector: C) -> C {
        lock(&self.families).extend(collector.desc().iter().map(|d| d.fq_name.clone()));
        self.registry.register(Box::new(collector.clone())).expect("metric names are unique");
        collector
    }
}
