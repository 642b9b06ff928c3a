//! Affinity: which ids a request carries under its service's policy (`keys`, with a chat
//! request's conversation from `chat`), where those ids and their pins send it (`decide`, a pure
//! function), the one place that settles a request's route with the pin store (`pinning`), and
//! the split by requests that new pins follow (`share`).

mod decide;
mod keys;
mod pinning;

pub mod chat;
pub mod share;

pub use decide::Origin;
pub use keys::{Keys, extract, names_its_conversation};
pub use pinning::{Admitted, Failed, Pinning, Resend, Route};
