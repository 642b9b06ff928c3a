//! Giving memory back to the system after a burst. glibc's malloc keeps what was freed inside its
//! heaps (only memory at the top of a heap is returned by itself), so the buffers of thousands of
//! connections or queued requests would stay resident long after they closed. While malloc holds
//! a burst's worth of free memory, `malloc_trim` returns its free pages, at most every few
//! seconds.
//!
//! Owns that decision only; knows nothing of what the memory was for. A no-op where the C library
//! is not glibc.

use std::time::{Duration, Instant};

/// Free memory malloc may hold before a trim is worth its cost: a burst's worth, not the churn
/// of ordinary traffic, which would only be allocated again.
const BURST: usize = 16 << 20;
/// The least time between trims. Free memory stays counted after it was returned, so a trim
/// repeats while it is held; this keeps the repeats cheap.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Decides when to trim; call [`Trimmer::tick`] periodically, off the request path.
#[derive(Debug, Default)]
pub(crate) struct Trimmer {
    last: Option<Instant>,
}

impl Trimmer {
    /// Trims if a burst's worth of freed memory is held and no trim ran lately. Blocks for as
    /// long as the trim takes (milliseconds for a large heap).
    pub(crate) fn tick(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            use nix::libc;
            // SAFETY: mallinfo2 and malloc_trim only read or adjust malloc's own state, which
            // they lock.
            let held_free = unsafe { libc::mallinfo2() }.fordblks;
            if self.worth_trimming(held_free, Instant::now()) {
                unsafe { libc::malloc_trim(0) };
                self.last = Some(Instant::now());
                tracing::debug!(held_free, "returned free heap memory to the system");
            }
        }
    }

    fn worth_trimming(&self, held_free: usize, now: Instant) -> bool {
        held_free > BURST && self.last.is_none_or(|last| now.duration_since(last) >= TRIM_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn trims_after_a_burst_not_during_ordinary_churn_nor_in_a_row() {
        let now = Instant::now();
        let fresh = Trimmer::default();
        assert!(fresh.worth_trimming(40 * MIB, now), "a burst freed");
        assert!(!fresh.worth_trimming(4 * MIB, now), "little free memory: ordinary churn");
        let trimmed = Trimmer { last: Some(now) };
        assert!(!trimmed.worth_trimming(40 * MIB, now + Duration::from_secs(1)), "just trimmed");
        assert!(trimmed.worth_trimming(40 * MIB, now + TRIM_EVERY), "held on: trimmed again");
    }
}
