//! Affinity: which ids a request carries under its service's policy (`keys`), and where those
//! ids and their pins send it (`decide`, a pure function). Must not do I/O: pins are looked up
//! and written by the handler through `pins`.

mod decide;
mod keys;

pub use decide::{Decision, Lookup, Origin, PinWrite, decide, follow_flow_winner};
pub use keys::{KeyError, Keys, MAX_ID_BYTES, extract};
