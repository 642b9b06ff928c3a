//! What the activator and `autoscaler-shim` agree on, apart from either: the source-neutral world
//! spec (`spec`), local mode's topology and endpoints files (`topology`), a file watched by its
//! content (`watched`), and Knative's stat protocol to the autoscaler (`wire`). Plain data and
//! parsers: no runtime, no network, no Kubernetes client, so the shim builds without the
//! activator's dependencies.

pub mod spec;
pub mod topology;
pub mod watched;

/// Knative's stat protocol (`proto/stat.proto`), generated with prost.
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/metrics.rs"));
}
