//! Affinity: which ids a request carries under its service's policy (`keys`), where those ids
//! and their pins send it (`decide`, a pure function), and the one place that settles a
//! request's route with the pin store (`pinning`).

mod decide;
mod keys;
mod pinning;

pub mod chat;
pub mod share;

pub use decide::Origin;
pub use keys::{Keys, extract, names_its_conversation};
pub use pinning::{Pinning, Route};
