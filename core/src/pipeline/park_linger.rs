//! How long the runtime thread lingers before it parks (issue 23).
//!
//! At a steady rate each transaction woke the thread 2–4 times (its
//! messages from the walsender, the keepalive after it, the PubAck), and
//! each wake-up cost more CPU than the event itself: 62 µs of worker CPU
//! per event at 2,000 tx/s against 8 µs in bulk. A short sleep before
//! parking lets what arrives meanwhile be taken in one wake-up, so the
//! sockets are read and written once for several transactions. It adds at
//! most [`LINGER`] to an event's latency.
//!
//! The rule, so that it costs nothing where it cannot gain:
//! - only after a wake-up that took few replication messages: in a bulk
//!   drain every wake-up is already large;
//! - never while someone holds a [`LingerHold`]: the backfill task, whose
//!   SQL round trips would each wait out the sleep;
//! - wake-ups from other threads during the sleep are not lost: tokio
//!   checks its queues again before it parks.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

/// The sleep: at 2,000 tx/s about four transactions per wake-up (1 ms
/// took the worker from 62 to 35 µs per event, 2 ms to 25; p99 latency
/// at 1,000 tx/s went from 0.9 to 1.6 and 2.6 ms).
pub const LINGER: Duration = Duration::from_millis(2);
/// A wake-up that took this many replication messages or more was bulk.
pub const BULK_WAKE: u32 = 64;

/// The one instance the streamer, the backfill task and the runtime's
/// park hook share (one runtime thread per worker process).
pub static PARK_LINGER: ParkLinger = ParkLinger::new();

pub struct ParkLinger {
    /// Replication messages taken since the thread last parked.
    taken: AtomicU32,
    /// Live [`LingerHold`]s.
    holds: AtomicU32,
}

impl ParkLinger {
    pub const fn new() -> Self {
        ParkLinger { taken: AtomicU32::new(0), holds: AtomicU32::new(0) }
    }

    /// Counts a replication message taken by the streamer.
    pub fn took_message(&self) {
        // Relaxed: one thread counts and reads; only a count, no ordering.
        self.taken.fetch_add(1, Relaxed);
    }

    /// No linger while the hold lives.
    pub fn hold(&'static self) -> LingerHold {
        self.holds.fetch_add(1, Relaxed);
        LingerHold(self)
    }

    /// Called just before the thread parks: how long to sleep first, and
    /// the count starts again for the next wake-up.
    pub fn before_park(&self) -> Option<Duration> {
        let taken = self.taken.swap(0, Relaxed);
        (taken < BULK_WAKE && self.holds.load(Relaxed) == 0).then_some(LINGER)
    }
}

impl Default for ParkLinger {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps the thread from lingering until dropped.
pub struct LingerHold(&'static ParkLinger);

impl Drop for LingerHold {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked() -> &'static ParkLinger {
        Box::leak(Box::new(ParkLinger::new()))
    }

    #[test]
    fn an_idle_or_small_wake_up_lingers() {
        let linger = leaked();
        assert_eq!(linger.before_park(), Some(LINGER));
        for _ in 0..BULK_WAKE - 1 {
            linger.took_message();
        }
        assert_eq!(linger.before_park(), Some(LINGER));
    }

    #[test]
    fn a_bulk_wake_up_does_not_and_the_count_starts_again() {
        let linger = leaked();
        for _ in 0..BULK_WAKE {
            linger.took_message();
        }
        assert_eq!(linger.before_park(), None);
        assert_eq!(linger.before_park(), Some(LINGER), "the count is per wake-up");
        for _ in 0..3 * BULK_WAKE {
            linger.took_message();
        }
        assert_eq!(linger.before_park(), None);
    }

    #[test]
    fn no_linger_while_any_hold_lives() {
        let linger = leaked();
        let first = linger.hold();
        let second = linger.hold();
        assert_eq!(linger.before_park(), None);
        drop(first);
        assert_eq!(linger.before_park(), None, "one hold is still alive");
        drop(second);
        assert_eq!(linger.before_park(), Some(LINGER));
    }
}
