//! affinity-activator's data plane. `app` wires these modules into the process; each module's
//! doc says what it owns. Public are only `app` and what the integration tests and benches reach
//! (the pin table, metrics registration, the kinds the Knative source watches); everything else
//! is the crate's own.

#![warn(unreachable_pub)]

mod admin;
mod affinity;
pub mod app;
mod autoscaler;
mod backoff;
mod config;
mod deletion_cost;
mod go;
mod handler;
mod headers;
mod health;
mod inspect;
pub mod instruments;
mod keys;
mod labelled;
pub mod metrics;
pub mod pins;
mod pool;
mod probe_answers;
mod proxy;
mod readiness;
mod request_body;
mod respond;
mod response_body;
mod retry;
mod seats;
mod served;
mod server;
mod session_end;
mod socket;
pub mod source;
mod stats;
mod sync;
mod telemetry;
mod throttle;
mod tls;
mod trim;
mod world;

/// The world spec every source produces, shared with `autoscaler-shim`.
pub use contract::spec;
