//! Affinity: which ids a request carries under its service's policy (`keys`, with a chat
//! request's conversation from `chat`), where those ids and their pins send it (`decide`, a pure
//! function), the pin cookies that need no store (`cookie`), the one place that settles a
//! request's route with the pin store (`pinning`), the split by requests that new pins follow
//! (`share`), and the count of each decision (`Decisions`).

mod cookie;
mod decide;
mod keys;
mod pinning;

pub(crate) mod chat;
pub(crate) mod share;

pub(crate) use cookie::CookieKeys;
pub(crate) use decide::{Departure, Origin};
pub(crate) use keys::{Keys, extract, names_its_conversation};
pub(crate) use pinning::{Admitted, Failed, Pinning, Resend, Route, SessionLeft};

use prometheus::IntCounter;

use crate::labelled::Labelled;
use crate::metrics::Registrar;

/// Requests by the decision that sent them where they went.
#[derive(Clone)]
pub(crate) struct Decisions(Labelled<Origin, IntCounter>);

impl Decisions {
    pub(crate) fn register(reg: &Registrar) -> Self {
        let family = reg.counter_vec(
            "activator_decisions_total",
            "Requests by routing decision: session-pin, revision-pin, split, ingress, new-pin, re-pin",
            &["decision"],
        );
        Decisions(Labelled::new(&family, &[]))
    }

    pub(crate) fn count(&self, origin: Origin) {
        self.0.get(origin).inc();
    }
}
