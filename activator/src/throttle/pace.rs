//! How fast waiters are let go when many could go at once (a pod turned ready under a queue, as
//! at scale from zero): a first batch at once, then more as exchanges end, like TCP's slow start,
//! so the first requests are not slowed by a thousand others starting on the same CPUs (Knative
//! #9888, the thundering herd).
//!
//! Must not choose pods or waiters: `queue` does, within the pace set here.

use std::sync::atomic::Ordering;

use super::Throttler;

/// Waiters taking any pod that are let go at once. When more could go together (a pod turned
/// ready under a queue, as at scale from zero), the rest are paced like TCP's slow start: each
/// exchange that ends lets `RELEASE_GROWTH` more go, so requests leave the queue as fast as the
/// pod and the activator finish them, and the first ones are not slowed by a thousand others
/// starting at once on the same CPUs (Knative #9888, the thundering herd).
pub(super) const RELEASE_BATCH: usize = 8;
pub(super) const RELEASE_GROWTH: usize = 2;

/// Requests on one pod past which an ending exchange lets only one more go: the window stops
/// growing once it is large enough to keep the pod busy, so a burst reuses connections rather
/// than opening one per waiter.
pub(super) const RELEASE_WINDOW: usize = 32;

/// While paced, a batch also goes whenever this passes with no exchange ending, so long requests
/// (streams, long polls) do not hold the rest of the queue.
const RELEASE_STALL: std::time::Duration = std::time::Duration::from_millis(2);

impl Throttler {
    /// Requests waiting for pods that just left take any pod now; when more could go than a
    /// batch, the rest go at a pace.
    pub(super) fn dispatch_if_waiting(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 && self.dispatch_all() {
            self.pace_release();
        }
    }

    /// Paces the release of the waiters that could go: ending exchanges let more go (`serve`),
    /// and a task lets a batch go whenever none ended for `RELEASE_STALL`, until the queue of
    /// waiters taking any pod is empty or no pod has room. Without a runtime (never the case
    /// in the activator) they all go at once.
    fn pace_release(&self) {
        let (Some(me), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current()) else {
            while self.dispatch_all() {}
            return;
        };
        if self.releasing.swap(true, Ordering::SeqCst) {
            return;
        }
        runtime.spawn(async move {
            let mut seen = me.released.load(Ordering::SeqCst);
            loop {
                tokio::time::sleep(RELEASE_STALL).await;
                let released = me.released.load(Ordering::SeqCst);
                if released == seen && !me.dispatch_all() {
                    break;
                }
                seen = me.released.load(Ordering::SeqCst);
                if me.waiting_any.load(Ordering::SeqCst) == 0 {
                    break;
                }
            }
            me.releasing.store(false, Ordering::SeqCst);
            // Slots freed while the pace ended may have been left to it.
            me.dispatch_if_waiting();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::throttle::*;
    use std::collections::VecDeque;

    /// Lets every task that can run do so, without letting (paused) time pass.
    async fn settle() {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_at_a_pod_turning_ready_goes_at_the_pace_exchanges_end() {
        let t = Throttler::new(0, limits(1000, 1 << 30, 100_000), gauge());
        let mut waiters: VecDeque<_> = (0..100).map(|_| spawn_acquire(&t, Want::Any)).collect();
        settle().await;
        assert_eq!(t.waiting(), 100);
        set(&t, &addrs(1), Probe::None);
        settle().await;
        assert_eq!(t.waiting(), 100 - RELEASE_BATCH, "a first batch goes at once");
        assert!(waiters.iter().take(RELEASE_BATCH).all(|w| w.is_finished()), "the oldest go first");

        let mut leases = Vec::new();
        for _ in 0..RELEASE_BATCH {
            leases.push(waiters.pop_front().unwrap().await.unwrap().unwrap());
        }
        leases.pop();
        settle().await;
        assert_eq!(t.waiting(), 100 - RELEASE_BATCH - RELEASE_GROWTH, "an ended exchange lets two more go");

        tokio::time::advance(RELEASE_STALL).await;
        settle().await;
        assert_eq!(t.waiting(), 100 - RELEASE_BATCH - RELEASE_GROWTH, "an exchange ended in that period");
        tokio::time::advance(RELEASE_STALL).await;
        settle().await;
        let stalled = 100 - 2 * RELEASE_BATCH - RELEASE_GROWTH;
        assert_eq!(t.waiting(), stalled, "with no exchange ending for a period, a batch goes");

        while t.ready()[0].in_flight() < RELEASE_WINDOW {
            tokio::time::advance(RELEASE_STALL).await;
            settle().await;
        }
        let before = t.waiting();
        let granted = waiters.iter().position(|w| !w.is_finished()).unwrap();
        waiters
            .drain(..granted)
            .for_each(|w| leases.push(futures_util::FutureExt::now_or_never(w).unwrap().unwrap().unwrap()));
        leases.pop();
        settle().await;
        assert_eq!(t.waiting(), before - 1, "past the window an ended exchange lets one go");

        tokio::time::advance(RELEASE_STALL * 50).await;
        wait_for(|| t.waiting() == 0).await;
        wait_for(|| !t.releasing.load(Ordering::SeqCst)).await;
        let slow = spawn_acquire(&t, Want::Any);
        assert!(slow.await.unwrap().is_ok(), "after the burst, requests go at once");
    }
}
