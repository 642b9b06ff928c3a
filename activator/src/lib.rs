//! affinity-activator's data plane. `main.rs` wires these modules; each module's doc says what it
//! owns.

pub mod admin;
pub mod affinity;
pub mod autoscaler;
mod backoff;
pub mod config;
mod go;
pub mod handler;
mod headers;
pub mod health;
pub mod inspect;
pub mod instruments;
pub mod keys;
mod labelled;
pub mod metrics;
pub mod pins;
mod pool;
mod probe_answers;
mod proxy;
pub mod readiness;
mod request_body;
mod respond;
mod response_body;
mod retry;
mod served;
pub mod server;
pub mod session_end;
pub mod socket;
pub mod source;
pub mod stats;
mod sync;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod trim;
pub mod world;

/// The world spec every source produces, shared with `autoscaler-shim`.
pub use contract::spec;
