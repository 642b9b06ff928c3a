//! affinity-activator's data plane. `main.rs` wires these modules; each module's doc says what it
//! owns.

pub mod admin;
pub mod affinity;
pub mod autoscaler;
pub mod backoff;
pub mod config;
pub mod go;
pub mod handler;
pub mod headers;
pub mod health;
pub mod inspect;
pub mod instruments;
pub mod keys;
pub mod labelled;
pub mod metrics;
pub mod pins;
pub mod pool;
pub mod probe_answers;
pub mod proxy;
pub mod readiness;
pub mod request_body;
pub mod respond;
pub mod response_body;
pub mod retry;
pub mod served;
pub mod server;
pub mod session_end;
pub mod socket;
pub mod source;
pub mod stats;
pub mod sync;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod trim;
pub mod world;

/// The world spec every source produces, shared with `autoscaler-shim`.
pub use contract::spec;
