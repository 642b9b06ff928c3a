//! The body of a response: streamed from a pod, holding what the exchange holds (the pod's slot,
//! the request's place in its revision's concurrency, the pod connection to reuse) until the body
//! ends, and cut when the revision's timeout passes; or a short text the activator writes itself.
//!
//! Must not decide anything about the request; it only keeps and lets go.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::autoscaler::InFlight;
use crate::pool::Lent;
use crate::throttle::Lease;

pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// What an exchange holds until its response body ends (or its upgraded connection closes).
pub(crate) struct Held {
    pub lease: Lease,
    /// Counted in flight for the autoscaler until dropped with the rest.
    #[expect(dead_code, reason = "held for its drop, which ends the request's count")]
    pub in_flight: InFlight,
    /// The HTTP/1.1 connection the exchange used, given back to the pod's pool when the body ends
    /// cleanly.
    pub lent: Option<Lent>,
}

impl Held {
    /// The exchange ended cleanly: its connection may serve the next request to the pod.
    fn release(mut self) {
        if let Some(lent) = self.lent.take() {
            self.lease.pod().client.give_back(lent);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the revision's timeout ended the response")]
struct TimedOut;

/// Told once a response has ended (its last byte sent, the body cut, or the client gone), with
/// the body bytes handed to the client.
pub(crate) trait Finished: Send + 'static {
    fn finished(self: Box<Self>, sent: u64);
}

pub(crate) struct ResponseBody {
    kind: Kind,
    sent: u64,
    finished: Option<Box<dyn Finished>>,
}

enum Kind {
    Upstream { body: Incoming, held: Option<Held>, deadline: Option<Pin<Box<Sleep>>>, idle: Option<Idle> },
    Local(Full<Bytes>),
}

/// The longest pause allowed between two frames of a body, and when the current pause ends.
struct Idle {
    limit: std::time::Duration,
    until: Pin<Box<Sleep>>,
}

impl ResponseBody {
    /// A pod's body, kept with what its exchange holds.
    pub(crate) fn upstream(body: Incoming, held: Held) -> Self {
        let kind = Kind::Upstream { body, held: Some(held), deadline: None, idle: None };
        ResponseBody { kind, sent: 0, finished: None }
    }

    /// Cuts a pod's body at `deadline`, the end of the revision's timeout (as upstream does for a
    /// response that outlives it). A text of the activator's own is never cut.
    pub(crate) fn cut_at(&mut self, at: Pin<Box<Sleep>>) {
        if let Kind::Upstream { deadline, .. } = &mut self.kind {
            *deadline = Some(at);
        }
    }

    /// Cuts a pod's body when it pauses longer than `limit` between frames (the revision's
    /// `idleTimeoutSeconds`).
    pub(crate) fn cut_when_idle(&mut self, limit: std::time::Duration) {
        if let Kind::Upstream { idle, .. } = &mut self.kind {
            let until = Box::pin(tokio::time::sleep(limit));
            *idle = Some(Idle { limit, until });
        }
    }

    pub(crate) fn text(text: impl Into<Bytes>) -> Self {
        ResponseBody { kind: Kind::Local(Full::new(text.into())), sent: 0, finished: None }
    }

    pub(crate) fn empty() -> Self {
        Self::text(Bytes::new())
    }

    /// Calls `finished` once the response has ended.
    pub(crate) fn when_finished(&mut self, finished: Box<dyn Finished>) {
        self.finished = Some(finished);
    }

    fn finish(&mut self) {
        if let Some(finished) = self.finished.take() {
            finished.finished(self.sent);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = this.poll_kind(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => this.sent += frame.data_ref().map_or(0, |d| d.len() as u64),
            Poll::Ready(None | Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Local(full) => full.size_hint(),
        }
    }
}

impl ResponseBody {
    fn poll_kind(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.kind {
            Kind::Upstream { body, held, deadline, idle } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if polled.is_ready()
                    && let Some(idle) = idle
                {
                    idle.until.as_mut().reset(tokio::time::Instant::now() + idle.limit);
                }
                match polled {
                    Poll::Ready(None) => {
                        if let Some(held) = held.take() {
                            held.release();
                        }
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        held.take();
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                    Poll::Pending => {
                        let overall = deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                        let paused = idle.as_mut().is_some_and(|i| i.until.as_mut().poll(cx).is_ready());
                        if overall || paused {
                            held.take();
                            (*deadline, *idle) = (None, None);
                            return Poll::Ready(Some(Err(TimedOut.into())));
                        }
                        Poll::Pending
                    }
                }
            }
            Kind::Local(full) => Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
        }
    }
}

impl Drop for ResponseBody {
    /// hyper stops polling a body that reports its end, so a body read to its last byte is
    /// released here rather than at a final `None`.
    fn drop(&mut self) {
        if let Kind::Upstream { body, held, .. } = &mut self.kind
            && body.is_end_stream()
            && let Some(held) = held.take()
        {
            held.release();
        }
        self.finish();
    }
}
