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
//! The rule, so that it never slows a drain:
//! - only while the walsender's stream is slow: under [`MAX_RATE`] bytes/s
//!   over the last [`WINDOW`], each message counted with [`MESSAGE_COST`].
//!   Faster, a sleep would let the socket fill and stall the walsender;
//!   and in a drain the thread parks for other reasons (NATS not yet
//!   writable, PubAcks awaited) after wake-ups that took little: a rule on
//!   one wake-up's work lingered there and cut wide-row throughput from
//!   62,000 to 20,000 events/s;
//! - never while someone holds a [`LingerHold`]: whoever waits on a round
//!   trip rather than on the walsender (a backfill job, a SQL query, the
//!   session start, a stream list refresh, a PubAck awaited alone, the
//!   streamer at its in-flight caps), as each round trip would wait out
//!   the sleep;
//! - wake-ups from other threads during the sleep are not lost: tokio
//!   checks its queues again before it parks.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgwire_replication::ReplicationEvent;

/// The sleep: at 2,000 tx/s about four transactions per wake-up (1 ms
/// took the worker from 62 to 35 µs per event, 2 ms to 25; p99 latency
/// at 1,000 tx/s went from 0.9 to 1.6 and 2.6 ms).
pub const LINGER: Duration = Duration::from_millis(2);
/// Above this rate no linger: a linger gathers at most 98 KiB, under half
/// a default socket buffer (212,992 bytes), counting [`MESSAGE_COST`] per
/// message. 2,000 single-row tx/s are about 8 MiB/s so counted (4
/// messages each: BEGIN, INSERT, COMMIT, keepalive), 2,000 rows of 3 kB
/// 14 MiB/s; drains run at 160–220 MiB/s. At 16 MiB/s the linger was off
/// from about 4,000 single-row tx/s, and at 5,000 the worker cost 44.8 µs
/// per event against 25 at 2,000.
pub const MAX_RATE: u64 = 48 << 20;
/// What a message costs the socket buffer besides its bytes: the kernel
/// charges about 1 KiB per small write (skb truesize), and the walsender
/// writes each message apart, so 200 small messages fill the buffer. By
/// bytes alone a single-row drain looked slow (8 MB/s), lingered, filled
/// the buffer and stalled the walsender: 28,000 events/s instead of 53,000.
pub const MESSAGE_COST: usize = 1024;
/// The rate is judged over this much time, so one quiet wake-up inside a
/// drain does not turn the linger on.
pub const WINDOW: Duration = Duration::from_millis(10);

/// The one instance the streamer, the backfill task and the runtime's
/// park hook share (one runtime thread per worker process).
pub static PARK_LINGER: ParkLinger = ParkLinger::new();

pub struct ParkLinger {
    /// Bytes of replication messages taken since the window started.
    taken: AtomicU64,
    /// Live [`LingerHold`]s.
    holds: AtomicU32,
    window: Mutex<Option<Window>>,
}

/// The current window and the verdict of the last one.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    slow: bool,
}

impl ParkLinger {
    pub const fn new() -> Self {
        ParkLinger { taken: AtomicU64::new(0), holds: AtomicU32::new(0), window: Mutex::new(None) }
    }

    /// Counts a replication message as it is received (every reader of
    /// the stream calls this, so the rate is the walsender's).
    pub fn took_event(&self, event: &ReplicationEvent) {
        self.took(match event {
            ReplicationEvent::XLogData { data, .. } => data.len(),
            ReplicationEvent::Message { content, .. } => content.len(),
            _ => 32, // BEGIN, COMMIT, keepalive: a few dozen bytes on the wire
        });
    }

    /// Counts a replication message of `bytes`.
    fn took(&self, bytes: usize) {
        // Relaxed: a count read by the same thread; no ordering needed.
        self.taken.fetch_add((bytes + MESSAGE_COST) as u64, Relaxed);
    }

    /// No linger while the hold lives.
    #[must_use = "the hold ends when dropped"]
    pub fn hold(&'static self) -> LingerHold {
        self.holds.fetch_add(1, Relaxed);
        LingerHold(self)
    }

    /// Called just before the thread parks: how long to sleep first.
    pub fn before_park(&self) -> Option<Duration> {
        self.decide(Instant::now())
    }

    fn decide(&self, now: Instant) -> Option<Duration> {
        let mut window = self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The first window starts not slow: a drain at start-up (a
        // restart behind the slot) is the common case.
        let current = window.get_or_insert(Window { start: now, slow: false });
        let elapsed = now.saturating_duration_since(current.start);
        if elapsed >= WINDOW {
            let bytes = self.taken.swap(0, Relaxed);
            current.slow = (bytes as u128) * 1_000_000_000 < (MAX_RATE as u128) * elapsed.as_nanos();
            current.start = now;
        }
        (current.slow && self.holds.load(Relaxed) == 0).then_some(LINGER)
    }
}

impl Default for ParkLinger {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps the thread from lingering until dropped.
#[must_use = "the hold ends when dropped"]
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

    /// The fewest bytes that make MAX_RATE over one WINDOW.
    fn at_max_rate() -> usize {
        (MAX_RATE as u128 * WINDOW.as_nanos()).div_ceil(1_000_000_000) as usize
    }

    /// One message whose bytes and cost come to `total`.
    fn took_in_all(linger: &ParkLinger, total: usize) {
        linger.took(total - MESSAGE_COST);
    }

    #[test]
    fn no_linger_until_a_window_shows_a_slow_stream_then_every_park_lingers() {
        let linger = leaked();
        let t0 = Instant::now();
        assert_eq!(linger.decide(t0), None, "the first window starts not slow");
        assert_eq!(linger.decide(t0 + WINDOW / 2), None, "the window is not over");
        linger.took(1000);
        assert_eq!(linger.decide(t0 + WINDOW), Some(LINGER));
        assert_eq!(linger.decide(t0 + WINDOW + Duration::from_micros(1)), Some(LINGER));
    }

    #[test]
    fn the_rate_is_judged_at_its_bound_and_over_the_whole_window() {
        let linger = leaked();
        let t0 = Instant::now();
        linger.decide(t0);
        took_in_all(linger, at_max_rate() - 1);
        assert_eq!(linger.decide(t0 + WINDOW), Some(LINGER), "just under the rate");
        took_in_all(linger, at_max_rate());
        assert_eq!(linger.decide(t0 + 2 * WINDOW), None, "at the rate");
        // Just under twice the bytes over twice the time.
        took_in_all(linger, 2 * at_max_rate() - 2);
        assert_eq!(linger.decide(t0 + 4 * WINDOW), Some(LINGER));
    }

    #[test]
    fn a_quiet_park_inside_a_drain_keeps_the_drains_verdict() {
        let linger = leaked();
        let t0 = Instant::now();
        linger.decide(t0);
        took_in_all(linger, 10 * at_max_rate());
        assert_eq!(linger.decide(t0 + WINDOW), None);
        // Parks that took nothing, before the next window ends.
        assert_eq!(linger.decide(t0 + WINDOW + Duration::from_millis(3)), None);
        assert_eq!(linger.decide(t0 + WINDOW + Duration::from_millis(9)), None);
        // The drain ended: the next window is slow.
        assert_eq!(linger.decide(t0 + 2 * WINDOW), Some(LINGER));
        // The count started again with the window.
        took_in_all(linger, at_max_rate());
        assert_eq!(linger.decide(t0 + 3 * WINDOW), None);
    }

    #[test]
    fn small_messages_count_by_what_they_cost_the_socket_buffer() {
        let linger = leaked();
        let t0 = Instant::now();
        linger.decide(t0);
        // 48,000 small messages/s (about 12,000 single-row tx/s): 2.4 MB/s
        // of bytes, over the rate as counted.
        for _ in 0..480 {
            linger.took(50);
        }
        assert_eq!(linger.decide(t0 + WINDOW), None);
        // 2,000 single-row tx/s: about 80 messages per window.
        for _ in 0..80 {
            linger.took(50);
        }
        assert_eq!(linger.decide(t0 + 2 * WINDOW), Some(LINGER));
    }

    /// The verdict after one window of `tx_per_s` transactions of
    /// `messages` replication messages of `bytes` each.
    fn verdict_at(tx_per_s: u64, messages: u64, bytes: usize) -> Option<Duration> {
        let linger = leaked();
        let t0 = Instant::now();
        linger.decide(t0);
        let per_window = tx_per_s * messages * WINDOW.as_millis() as u64 / 1000;
        for _ in 0..per_window {
            linger.took(bytes);
        }
        linger.decide(t0 + WINDOW)
    }

    #[test]
    fn steady_rates_linger_and_drains_never_do_as_measured_in_bench() {
        // Single-row transactions: BEGIN, INSERT, COMMIT and a keepalive.
        for steady in [500, 2_000, 5_000, 10_000] {
            assert_eq!(verdict_at(steady, 4, 40), Some(LINGER), "{steady} single-row tx/s");
        }
        // The slowest drain in bench/: 28,000 single-row tx/s.
        assert_eq!(verdict_at(28_000, 3, 40), None);
        // 2,000 rows of 3 kB a second, and a wide-row drain of 20,000.
        assert_eq!(verdict_at(2_000, 1, 3_000), Some(LINGER));
        assert_eq!(verdict_at(20_000, 1, 3_000), None);
    }

    #[test]
    fn exactly_at_the_rate_is_not_slow() {
        let linger = leaked();
        let t0 = Instant::now();
        linger.decide(t0);
        // MAX_RATE over 15.625 ms is a whole number of bytes.
        let elapsed = Duration::from_micros(15_625);
        let bytes = (MAX_RATE as u128 * elapsed.as_nanos() / 1_000_000_000) as usize;
        assert_eq!(bytes as u128 * 1_000_000_000, MAX_RATE as u128 * elapsed.as_nanos());
        took_in_all(linger, bytes);
        assert_eq!(linger.decide(t0 + elapsed), None);
    }

    #[test]
    fn every_kind_of_replication_message_counts() {
        use pgwire_replication::{Lsn, ReplicationEvent};
        let linger = leaked();
        let data = ReplicationEvent::XLogData {
            wal_start: Lsn(1),
            wal_end: Lsn(1),
            server_time_micros: 0,
            data: vec![0u8; 100].into(),
        };
        linger.took_event(&data);
        assert_eq!(linger.taken.load(Relaxed), (100 + MESSAGE_COST) as u64);
        let message = ReplicationEvent::Message {
            transactional: true,
            lsn: Lsn(1),
            prefix: "p".into(),
            content: vec![0u8; 7].into(),
        };
        linger.took_event(&message);
        linger.took_event(&ReplicationEvent::Commit { lsn: Lsn(1), end_lsn: Lsn(2), commit_time_micros: 0 });
        assert_eq!(linger.taken.load(Relaxed), (100 + 7 + 32 + 3 * MESSAGE_COST) as u64);
    }

    #[test]
    fn before_park_judges_by_the_clock() {
        let linger = leaked();
        assert_eq!(linger.before_park(), None, "the first window starts not slow");
        std::thread::sleep(WINDOW + Duration::from_millis(1));
        assert_eq!(linger.before_park(), Some(LINGER), "a window without messages is slow");
    }

    #[test]
    fn no_linger_while_any_hold_lives() {
        let linger = leaked();
        let t0 = Instant::now();
        linger.decide(t0);
        let first = linger.hold();
        let second = linger.hold();
        assert_eq!(linger.decide(t0 + WINDOW), None);
        drop(first);
        assert_eq!(linger.decide(t0 + WINDOW), None, "one hold is still alive");
        drop(second);
        assert_eq!(linger.decide(t0 + WINDOW), Some(LINGER));
    }
}
