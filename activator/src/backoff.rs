//! The pause between attempts to reconnect (to the autoscaler, to Redis): upstream's websocket
//! schedule, 100 ms growing by 1.3 per failure up to 5 s, each pause stretched by up to half at
//! random so replicas that lost the same peer do not all come back at once.

use std::time::Duration;

const MIN: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);
const FACTOR: f32 = 1.3;

pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: MIN }
    }
}

impl Backoff {
    /// The pause before the next attempt; each call makes the following one longer.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let base = self.next;
        self.next = self.next.mul_f32(FACTOR).min(MAX);
        base + Duration::from_millis(fastrand::u64(..=base.as_millis() as u64 / 2))
    }

    /// An attempt succeeded: the next failure starts over.
    pub(crate) fn reset(&mut self) {
        self.next = MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_starts_over() {
        let mut backoff = Backoff::default();
        let first = backoff.next_pause();
        assert!((MIN..=MIN + MIN / 2).contains(&first), "{first:?}");
        let pauses: Vec<Duration> = (0..30).map(|_| backoff.next_pause()).collect();
        assert!(pauses.iter().all(|p| *p <= MAX + MAX / 2));
        assert!(pauses.last().unwrap() >= &MAX, "reaches the cap");
        backoff.reset();
        assert!(backoff.next_pause() <= MIN + MIN / 2);
    }
}
