//! Where the world view comes from. Each source is a module of its own that turns what it
//! watches into a `spec::WorldSpec` and hands it to the `world::Publisher`; nothing
//! downstream knows which one ran. Only `source` modules read what describes the world (the
//! topology files, the Kubernetes API); other parts read only their own configuration (key
//! files, certificates) and talk to the pods and the pin store.

pub mod knative;
mod kube_client;
mod kube_metrics;
pub(crate) mod local;
pub mod standalone;
