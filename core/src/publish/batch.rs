//! `publish_mode = transaction`: whole transactions as JetStream atomic
//! batches (ADR-50: headers `Nats-Batch-Id`, `Nats-Batch-Sequence`, and
//! `Nats-Batch-Commit` on the last; the stream needs `allow_atomic`). A
//! batch is stored whole or not at all, so a consumer never sees part of a
//! transaction. The events are held until their commit, then sent back to
//! back, so the server holds at most one open batch of ours at a time.
//!
//! One batch may carry several consecutive transactions: the server syncs
//! its store once per batch (about 3 ms on a common disk), so one batch per
//! single-row transaction would cap the stream at a few hundred events per
//! second. While earlier batches await their PubAcks, the transactions that
//! commit meanwhile join the next batch (group commit).
//!
//! A transaction the server cannot take as one batch (more events than its
//! limit, more bytes than the in-flight cap, an event over `max_payload`,
//! events for streams that differ or do not allow atomic batches) falls
//! back to one event at a time, in order.
//!
//! Each held event already has its publish sequence, taken from the
//! [`AckTracker`](crate::ack_tracker::AckTracker) when it was held, so the
//! confirm rule sees commits in stream order whether or not they are sent.

use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;

use crate::Lsn;

/// Most messages the server takes in one atomic batch (its default, 1,000).
pub const MAX_BATCH_MESSAGES: usize = 1000;
/// Room for the headers a batched message gets on top of its own
/// (`Nats-Msg-Id`, `Nats-Batch-Id`, `-Sequence`, `-Commit`: 153 bytes at
/// most, a test in `headers` checks): `max_payload` counts headers too.
pub(crate) const BATCH_HEADER_BYTES: usize = 160;

/// One event held for the batch.
#[derive(Debug)]
pub struct Held<R> {
    pub route: R,
    pub id: String,
    pub headers: async_nats::HeaderMap,
    pub body: Bytes,
}

/// Why a transaction is not sent as one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    TooManyEvents,
    TooManyBytes,
    EventOverMaxPayload,
    SeveralStreams,
    StreamNotAtomic,
}

impl Fallback {
    pub fn reason(self) -> &'static str {
        match self {
            Fallback::TooManyEvents => {
                "more events than an atomic batch may hold (1,000, or fewer than wal_listener.max_in_flight)"
            }
            Fallback::TooManyBytes => "more bytes than wal_listener.max_in_flight_bytes",
            Fallback::EventOverMaxPayload => "an event larger than the NATS server's max_payload",
            Fallback::SeveralStreams => "events for more than one stream (a batch goes to one stream)",
            Fallback::StreamNotAtomic => {
                "events for a stream that does not allow atomic batches (allow_atomic)"
            }
        }
    }
}

/// Why an event was not held.
#[derive(Debug)]
pub enum NotHeld<R> {
    /// Its transaction cannot be one batch: send the held events of the
    /// committed transactions as a batch, then the transaction's events
    /// one by one ([`take_open`](TransactionBatch::take_open)), then this one.
    Fallback(Fallback, Held<R>),
    /// The batch is full with committed transactions: send them
    /// ([`take_committed`](TransactionBatch::take_committed)) and hold it again.
    Full(Held<R>),
}

/// Limits that decide whether a transaction fits one batch. A held event
/// counts as in flight, so a transaction must stay below the in-flight
/// caps, or its commit could never be read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_payload: usize,
}

impl Limits {
    pub fn new(max_in_flight: usize, max_in_flight_bytes: usize, max_payload: usize) -> Self {
        Limits {
            max_events: MAX_BATCH_MESSAGES.min(max_in_flight.saturating_sub(1)),
            max_bytes: max_in_flight_bytes,
            max_payload,
        }
    }
}

/// Committed transactions ready to be sent as one batch.
#[derive(Debug)]
pub struct Ready<R> {
    pub events: Vec<Held<R>>,
    /// The publish sequence of `events[0]`; the others follow without a gap.
    pub first_sequence: u64,
    /// The commit of the newest transaction in it: names the batch.
    pub last_commit: Lsn,
}

/// The events held for the next batch: those of committed transactions
/// first, then those of the open one.
#[derive(Debug)]
pub struct TransactionBatch<R> {
    held: Vec<Held<R>>,
    first_sequence: u64,
    bytes: usize,
    committed: usize,
    committed_bytes: usize,
    last_commit: Lsn,
    stream: Option<Arc<str>>,
}

impl<R> Default for TransactionBatch<R> {
    fn default() -> Self {
        TransactionBatch {
            held: Vec::new(),
            first_sequence: 0,
            bytes: 0,
            committed: 0,
            committed_bytes: 0,
            last_commit: Lsn(0),
            stream: None,
        }
    }
}

impl<R> TransactionBatch<R> {
    /// Holds one more event of the open transaction, published as
    /// `sequence` (the one after the last held), for `stream` (`None`: no
    /// stream stores it; `atomic`: that stream allows atomic batches).
    pub fn hold(
        &mut self,
        event: Held<R>,
        sequence: u64,
        stream: Option<&Arc<str>>,
        atomic: bool,
        limits: Limits,
    ) -> Result<(), NotHeld<R>> {
        let own_events = self.held.len() - self.committed;
        let own_bytes = self.bytes - self.committed_bytes;
        let len = event.body.len();
        let on_the_wire = len + super::headers::wire_len(&event.headers) + BATCH_HEADER_BYTES;
        let fallback = if !atomic || stream.is_none() {
            Some(Fallback::StreamNotAtomic)
        } else if own_events > 0 && self.stream.as_ref() != stream {
            Some(Fallback::SeveralStreams)
        } else if own_events + 1 > limits.max_events {
            Some(Fallback::TooManyEvents)
        } else if on_the_wire > limits.max_payload {
            Some(Fallback::EventOverMaxPayload)
        } else if own_bytes + len >= limits.max_bytes {
            Some(Fallback::TooManyBytes)
        } else {
            None
        };
        if let Some(fallback) = fallback {
            return Err(NotHeld::Fallback(fallback, event));
        }
        let full = self.held.len() + 1 > limits.max_events
            || self.bytes + len >= limits.max_bytes
            || self.stream.as_ref().is_some_and(|s| Some(s) != stream);
        if full && self.committed > 0 {
            return Err(NotHeld::Full(event));
        }
        if self.held.is_empty() {
            self.first_sequence = sequence;
        }
        debug_assert_eq!(sequence, self.first_sequence + self.held.len() as u64, "held events have no gap");
        self.stream = stream.cloned();
        self.bytes += len;
        self.held.push(event);
        Ok(())
    }

    /// The open transaction committed at `commit_lsn`: its events may go.
    pub fn commit(&mut self, commit_lsn: Lsn) {
        if self.held.len() > self.committed {
            self.last_commit = commit_lsn;
        }
        self.committed = self.held.len();
        self.committed_bytes = self.bytes;
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether committed transactions wait to be sent.
    pub fn has_committed(&self) -> bool {
        self.committed > 0
    }

    /// The committed transactions' events, to be sent as one batch.
    pub fn take_committed(&mut self) -> Option<Ready<R>> {
        if self.committed == 0 {
            return None;
        }
        let events: Vec<_> = self.held.drain(..self.committed).collect();
        let ready = Ready { events, first_sequence: self.first_sequence, last_commit: self.last_commit };
        self.first_sequence += self.committed as u64;
        self.bytes -= self.committed_bytes;
        (self.committed, self.committed_bytes) = (0, 0);
        if self.held.is_empty() {
            self.stream = None;
        }
        Some(ready)
    }

    /// The open transaction's events with the sequence of the first, once
    /// the committed ones are taken; the batch is empty again.
    pub fn take_open(&mut self) -> (Vec<Held<R>>, u64) {
        debug_assert_eq!(self.committed, 0, "committed events go first");
        self.bytes = 0;
        self.stream = None;
        (std::mem::take(&mut self.held), self.first_sequence)
    }
}

/// The id of a batch that ends with the transaction committed at
/// `last_commit`: unique among our open batches (one at a time) and at
/// most 64 characters, as the server requires.
pub fn batch_id(session: u64, last_commit: Lsn) -> String {
    format!("wl-{session:x}-{:x}", last_commit.0)
}

/// The sequences a PubAck answers: the one it names, or, for an atomic
/// batch's PubAck (`count` given), the whole batch sent that ends there,
/// as `sent` (first and last sequence of each batch in flight) recorded
/// it. The server's count is checked, never used to reach back: a wrong
/// count must not ack events of another batch.
pub fn answered(
    sequence: u64,
    count: Option<u64>,
    sent: impl IntoIterator<Item = (u64, u64)>,
) -> Result<RangeInclusive<u64>, String> {
    let Some(count) = count else { return Ok(sequence..=sequence) };
    let Some((first, last)) = sent.into_iter().find(|(_, last)| *last == sequence) else {
        return Err(format!("a batch PubAck for sequence {sequence} answers no atomic batch in flight"));
    };
    if count != last - first + 1 {
        return Err(format!("a batch PubAck counts {count} messages for a batch of {}", last - first + 1));
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(len: usize) -> Held<()> {
        Held { route: (), id: "id".into(), headers: Default::default(), body: Bytes::from(vec![b'x'; len]) }
    }

    const LIMITS: Limits = Limits { max_events: 1000, max_bytes: 1000, max_payload: 900 };

    fn fallback<R>(refused: Result<(), NotHeld<R>>) -> Fallback {
        match refused {
            Err(NotHeld::Fallback(why, _)) => why,
            other => panic!("expected a fallback, got {:?}", other.map_err(|_| "full")),
        }
    }

    #[test]
    fn holds_a_transaction_that_fits_and_says_why_one_does_not() {
        let stream: Arc<str> = Arc::from("wal_listener");
        let other: Arc<str> = Arc::from("audit");
        let mut batch = TransactionBatch::default();
        assert!(batch.hold(held(300), 7, Some(&stream), true, LIMITS).is_ok());
        assert!(batch.hold(held(300), 8, Some(&stream), true, LIMITS).is_ok());
        assert_eq!(fallback(batch.hold(held(500), 9, Some(&stream), true, LIMITS)), Fallback::TooManyBytes);
        assert_eq!(fallback(batch.hold(held(10), 9, Some(&other), true, LIMITS)), Fallback::SeveralStreams);
        assert_eq!(
            fallback(batch.hold(held(800), 9, Some(&stream), true, LIMITS)),
            Fallback::EventOverMaxPayload
        );
        assert_eq!(fallback(batch.hold(held(1), 9, Some(&stream), false, LIMITS)), Fallback::StreamNotAtomic);
        assert_eq!(fallback(batch.hold(held(1), 9, None, true, LIMITS)), Fallback::StreamNotAtomic);
        let (open, first) = batch.take_open();
        assert_eq!((open.len(), first), (2, 7));
        assert!(batch.is_empty());
    }

    #[test]
    fn a_transaction_must_stay_below_the_event_limit() {
        let stream: Arc<str> = Arc::from("s");
        let limits = Limits::new(4096, usize::MAX, usize::MAX);
        let mut batch = TransactionBatch::default();
        for sequence in 0..MAX_BATCH_MESSAGES as u64 {
            assert!(batch.hold(held(1), sequence, Some(&stream), true, limits).is_ok());
        }
        assert_eq!(fallback(batch.hold(held(1), 1000, Some(&stream), true, limits)), Fallback::TooManyEvents);
        // A small max_in_flight: the commit must still be readable after the last event.
        let limits = Limits::new(3, usize::MAX, usize::MAX);
        let mut batch = TransactionBatch::default();
        assert!(batch.hold(held(1), 0, Some(&stream), true, limits).is_ok());
        assert!(batch.hold(held(1), 1, Some(&stream), true, limits).is_ok());
        assert_eq!(fallback(batch.hold(held(1), 2, Some(&stream), true, limits)), Fallback::TooManyEvents);
    }

    #[test]
    fn max_payload_counts_an_events_headers_and_the_batch_headers() {
        let stream: Arc<str> = Arc::from("wal_listener");
        let limits = Limits { max_events: 1000, max_bytes: 10_000, max_payload: 600 };
        // An empty header block is 12 bytes on the wire, "Ab: c" makes it 19.
        let body = 600 - BATCH_HEADER_BYTES - 12;
        let mut batch = TransactionBatch::default();
        assert!(batch.hold(held(body), 1, Some(&stream), true, limits).is_ok());
        let mut with_headers = held(body);
        with_headers.headers.insert("Ab", "c");
        assert_eq!(
            fallback(batch.hold(with_headers, 2, Some(&stream), true, limits)),
            Fallback::EventOverMaxPayload
        );
    }

    #[test]
    fn one_event_as_large_as_the_byte_cap_goes_alone() {
        let stream: Arc<str> = Arc::from("s");
        let mut batch = TransactionBatch::default();
        let tight = Limits { max_events: 1000, max_bytes: 10, max_payload: 1000 };
        assert_eq!(fallback(batch.hold(held(50), 0, Some(&stream), true, tight)), Fallback::TooManyBytes);
    }

    #[test]
    fn committed_transactions_share_a_batch_until_it_is_full() {
        let stream: Arc<str> = Arc::from("s");
        let limits = Limits { max_events: 3, max_bytes: 1000, max_payload: 1000 };
        let mut batch = TransactionBatch::default();
        // Two single-event transactions, then one of two events that no longer fits.
        batch.hold(held(1), 10, Some(&stream), true, limits).unwrap();
        batch.commit(Lsn(100));
        batch.hold(held(1), 11, Some(&stream), true, limits).unwrap();
        batch.commit(Lsn(200));
        batch.commit(Lsn(250)); // a filtered transaction: names nothing
        batch.hold(held(1), 12, Some(&stream), true, limits).unwrap();
        let Err(NotHeld::Full(event)) = batch.hold(held(1), 13, Some(&stream), true, limits) else {
            panic!("expected a full batch")
        };
        let ready = batch.take_committed().unwrap();
        assert_eq!((ready.events.len(), ready.first_sequence, ready.last_commit), (2, 10, Lsn(200)));
        assert!(batch.take_committed().is_none());
        batch.hold(event, 13, Some(&stream), true, limits).unwrap();
        batch.commit(Lsn(300));
        let ready = batch.take_committed().unwrap();
        assert_eq!((ready.events.len(), ready.first_sequence, ready.last_commit), (2, 12, Lsn(300)));
        assert!(batch.is_empty());
    }

    #[test]
    fn a_transaction_for_another_stream_waits_for_the_committed_ones() {
        let (s, t): (Arc<str>, Arc<str>) = (Arc::from("s"), Arc::from("t"));
        let mut batch = TransactionBatch::default();
        batch.hold(held(1), 0, Some(&s), true, LIMITS).unwrap();
        batch.commit(Lsn(1));
        assert!(matches!(batch.hold(held(1), 1, Some(&t), true, LIMITS), Err(NotHeld::Full(_))));
        batch.take_committed().unwrap();
        assert!(batch.hold(held(1), 1, Some(&t), true, LIMITS).is_ok());
    }

    #[test]
    fn batch_ids_are_short_and_differ_per_transaction() {
        let id = batch_id(u64::MAX >> 1, Lsn(u64::MAX));
        assert!(id.len() <= 64, "{id}");
        assert_ne!(batch_id(1, Lsn(2)), batch_id(1, Lsn(3)));
    }

    #[test]
    fn a_batch_pub_ack_answers_exactly_its_batch() {
        let sent = [(1, 3), (4, 4), (5, 9)];
        assert_eq!(answered(7, None, sent), Ok(7..=7));
        assert_eq!(answered(9, Some(5), sent), Ok(5..=9));
        assert_eq!(answered(4, Some(1), sent), Ok(4..=4));
        assert!(answered(9, Some(8), sent).unwrap_err().contains("counts 8 messages for a batch of 5"));
        assert!(answered(8, Some(4), sent).unwrap_err().contains("no atomic batch"));
    }
}
