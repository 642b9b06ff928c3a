//! The body of a request on its way to a pod: the client's as it arrives, after the frames the
//! activator read first to route the request, if it read any; with a copy kept as it passes
//! (`Kept`) where the request may have to be sent again.
//!
//! Must not decide anything about the request; it only keeps and lets go. Depends on nothing of
//! the activator's but `sync`, so the connection pool can take it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::sync::lock;

/// The body of a request on its way to a pod: the frames read to route it (`affinity::chat`),
/// then the rest of the client's body as it arrives, never gathered.
#[derive(Debug)]
pub(crate) struct RequestBody {
    read: VecDeque<Frame<Bytes>>,
    /// How reading the first frames failed: the pod gets the error where the client's body
    /// broke, never a body cut short that looks complete.
    broke: Option<hyper::Error>,
    /// The client's body still to come; `None` for a body sent again from what was kept.
    rest: Option<Incoming>,
    /// Data bytes handed on so far, where someone asked (`counted`).
    passed: Option<Arc<AtomicU64>>,
    /// A copy of what passes, where someone asked (`keep`).
    kept: Option<Arc<Kept>>,
}

impl RequestBody {
    /// The client's body as it arrives.
    pub(crate) fn new(rest: Incoming) -> Self {
        RequestBody { read: VecDeque::new(), broke: None, rest: Some(rest), passed: None, kept: None }
    }

    /// Counts the data bytes handed on from now, for the body-size metrics; `None` for a body
    /// that is over already (a GET), which costs nothing to count.
    pub(crate) fn counted(&mut self) -> Option<Arc<AtomicU64>> {
        if self.is_end_stream() {
            return None;
        }
        Some(self.passed.get_or_insert_with(Arc::default).clone())
    }

    /// Keeps a copy of what passes from now, up to `limit` bytes of data, so the request can be
    /// sent again; `None` for a body that is over already (a GET), which needs no copy.
    pub(crate) fn keep(&mut self, limit: usize) -> Option<Arc<Kept>> {
        if self.is_end_stream() {
            return None;
        }
        let kept = Arc::new(Kept { limit, copy: Mutex::new(Copy::default()) });
        self.kept = Some(kept.clone());
        Some(kept)
    }

    /// An empty body, as a request without one is sent again.
    pub(crate) fn empty() -> Self {
        RequestBody { read: VecDeque::new(), broke: None, rest: None, passed: None, kept: None }
    }

    /// Reads the client's body until `limit` bytes of data (or its end, its trailers, an error,
    /// or `within`), and returns them gathered; the body sends them first, then the rest as it
    /// arrives.
    pub(crate) async fn read_prefix(&mut self, limit: usize, within: std::time::Duration) -> Bytes {
        let mut gathered = bytes::BytesMut::new();
        let Some(rest) = self.rest.as_mut() else { return gathered.freeze() };
        let reading = async {
            while gathered.len() < limit && self.broke.is_none() {
                match std::future::poll_fn(|cx| Pin::new(&mut *rest).poll_frame(cx)).await {
                    Some(Ok(frame)) => {
                        let data = frame.data_ref().cloned();
                        self.read.push_back(frame);
                        match data {
                            Some(data) => gathered.extend_from_slice(&data[..data.len().min(limit - gathered.len())]),
                            None => break,
                        }
                    }
                    Some(Err(e)) => self.broke = Some(e),
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(within, reading).await;
        gathered.freeze()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = if let Some(frame) = this.read.pop_front() {
            Poll::Ready(Some(Ok(frame)))
        } else if let Some(broke) = this.broke.take() {
            return Poll::Ready(Some(Err(broke)));
        } else if let Some(rest) = &mut this.rest {
            Pin::new(rest).poll_frame(cx)
        } else {
            Poll::Ready(None)
        };
        if let (Some(passed), Poll::Ready(Some(Ok(frame)))) = (&this.passed, &polled)
            && let Some(data) = frame.data_ref()
        {
            passed.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        if let Some(kept) = &this.kept
            && let Poll::Ready(polled) = &polled
        {
            // hyper stops polling a body that reports its end, so the end is noted with the last
            // frame rather than at a final `None`.
            kept.passed(polled.as_ref().map(|frame| frame.as_ref().ok()), this.is_end_stream());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.broke.is_none() && self.rest.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.read.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as u64).sum();
        let Some(rest) = &self.rest else { return SizeHint::with_exact(read) };
        let rest = rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + read);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

/// A copy of a request body taken as it passed to a pod (`RequestBody::keep`), up to a bound.
/// Only the exchange that kept it touches it, so its lock is never contended.
#[derive(Debug)]
pub(crate) struct Kept {
    limit: usize,
    copy: Mutex<Copy>,
}

#[derive(Debug, Default)]
struct Copy {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    bytes: usize,
    /// The whole body passed.
    complete: bool,
    /// More than the bound passed, or the body broke: there is nothing to send again.
    spoilt: bool,
}

impl Kept {
    /// Notes what was polled from the body: a frame (`Some(Some)`), a broken body
    /// (`Some(None)`), or its end (`None`); and whether the body reports its end now.
    fn passed(&self, polled: Option<Option<&Frame<Bytes>>>, ended: bool) {
        let mut copy = lock(&self.copy);
        if copy.spoilt {
            return;
        }
        match polled {
            Some(Some(frame)) => {
                if let Some(data) = frame.data_ref() {
                    copy.bytes += data.len();
                    copy.spoilt = copy.bytes > self.limit;
                    if !copy.spoilt {
                        copy.data.push(data.clone());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                }
            }
            Some(None) => copy.spoilt = true,
            None => {}
        }
        copy.complete |= ended || polled.is_none();
        if copy.spoilt {
            (copy.data, copy.trailers) = (Vec::new(), None);
        }
    }

    /// The body again, if all of it passed and was kept.
    pub(crate) fn replay(&self) -> Option<RequestBody> {
        let copy = lock(&self.copy);
        if !copy.complete || copy.spoilt {
            return None;
        }
        let mut read: VecDeque<Frame<Bytes>> = copy.data.iter().cloned().map(Frame::data).collect();
        read.extend(copy.trailers.clone().map(Frame::trailers));
        Some(RequestBody { read, ..RequestBody::empty() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn kept(limit: usize) -> Kept {
        Kept { limit, copy: Mutex::new(Copy::default()) }
    }

    #[tokio::test]
    async fn a_body_kept_whole_plays_again_with_its_trailers() {
        let kept = kept(10);
        kept.passed(Some(Some(&Frame::data(Bytes::from_static(b"abc")))), false);
        assert!(kept.replay().is_none(), "not all of it passed yet");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        kept.passed(Some(Some(&Frame::data(Bytes::from_static(b"def")))), false);
        kept.passed(Some(Some(&Frame::trailers(trailers.clone()))), true);
        let again = kept.replay().expect("all of it passed").collect().await.unwrap();
        assert_eq!(again.trailers(), Some(&trailers));
        assert_eq!(again.to_bytes(), "abcdef");
    }

    #[test]
    fn a_body_past_the_bound_or_broken_is_not_kept() {
        let big = kept(4);
        big.passed(Some(Some(&Frame::data(Bytes::from_static(b"abcde")))), true);
        assert!(big.replay().is_none(), "larger than the bound");
        let broken = kept(10);
        broken.passed(Some(None), false);
        broken.passed(None, true);
        assert!(broken.replay().is_none(), "the client's body broke");
        let empty = kept(10);
        empty.passed(None, true);
        assert!(empty.replay().is_some_and(|body| body.is_end_stream()), "an empty body plays again as one");
    }
}
