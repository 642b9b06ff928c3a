//! Where the world view comes from. Each source is a module of its own that turns what it
//! watches into a `spec::WorldSpec` and hands it to the `world::Publisher`; nothing
//! downstream knows which one ran. Only `source` modules may talk to the outside world
//! (files, the Kubernetes API).

pub mod knative;
pub mod local;
