//! `publish_mode = transaction`: a transaction's events as one JetStream
//! atomic batch (ADR-50: headers `Nats-Batch-Id`, `Nats-Batch-Sequence`,
//! and `Nats-Batch-Commit` on the last; the stream needs `allow_atomic`).
//! The batch is stored whole or not at all, so a consumer never sees part
//! of a transaction. The events are held until the commit, then sent back
//! to back, so the server holds at most one open batch of ours at a time.
//!
//! A transaction the server cannot take as one batch (more events than its
//! limit, more bytes than `max_in_flight_bytes`, an event over
//! `max_payload`, events for streams that differ or do not allow atomic
//! batches) falls back to one event at a time, in order.

use std::sync::Arc;

use bytes::Bytes;

/// Most messages the server takes in one atomic batch (its default, 1,000).
pub const MAX_BATCH_MESSAGES: usize = 1000;

/// One event held for the batch.
#[derive(Debug)]
pub struct Held<R> {
    pub route: R,
    pub id: String,
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
            Fallback::TooManyEvents => "more events than an atomic batch may hold (1,000)",
            Fallback::TooManyBytes => "more bytes than wal_listener.max_in_flight_bytes",
            Fallback::EventOverMaxPayload => "an event larger than the NATS server's max_payload",
            Fallback::SeveralStreams => "events for more than one stream (a batch goes to one stream)",
            Fallback::StreamNotAtomic => "its stream does not allow atomic batches (allow_atomic)",
        }
    }
}

/// The events of the open transaction, until its commit or a fallback.
#[derive(Debug)]
pub struct TransactionBatch<R> {
    held: Vec<Held<R>>,
    bytes: usize,
    stream: Option<Arc<str>>,
}

impl<R> Default for TransactionBatch<R> {
    fn default() -> Self {
        TransactionBatch { held: Vec::new(), bytes: 0, stream: None }
    }
}

/// Limits that decide whether a transaction fits one batch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_payload: usize,
}

impl<R> TransactionBatch<R> {
    /// Holds one more event for `stream` (`None`: no stream stores it;
    /// `atomic`: that stream allows atomic batches). On `Err` the caller
    /// publishes what [`take`](Self::take) returns one by one, and the rest
    /// of the transaction too.
    pub fn hold(
        &mut self,
        event: Held<R>,
        stream: Option<&Arc<str>>,
        atomic: bool,
        limits: Limits,
    ) -> Result<(), (Fallback, Held<R>)> {
        let fallback = if !atomic || stream.is_none() {
            Some(Fallback::StreamNotAtomic)
        } else if self.stream.as_ref().is_some_and(|s| Some(s) != stream) {
            Some(Fallback::SeveralStreams)
        } else if self.held.len() >= MAX_BATCH_MESSAGES {
            Some(Fallback::TooManyEvents)
        } else if event.body.len() > limits.max_payload {
            Some(Fallback::EventOverMaxPayload)
        } else if self.bytes + event.body.len() > limits.max_bytes && !self.held.is_empty() {
            Some(Fallback::TooManyBytes)
        } else {
            None
        };
        if let Some(fallback) = fallback {
            return Err((fallback, event));
        }
        self.stream = stream.cloned();
        self.bytes += event.body.len();
        self.held.push(event);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The events held, in order; the batch is empty again.
    pub fn take(&mut self) -> Vec<Held<R>> {
        self.bytes = 0;
        self.stream = None;
        std::mem::take(&mut self.held)
    }
}

/// The batch id of a transaction: unique among our open batches (one at a
/// time) and at most 64 characters, as the server requires.
pub fn batch_id(session: u64, commit_lsn: crate::Lsn) -> String {
    format!("wl-{session:x}-{:x}", commit_lsn.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;

    fn held(len: usize) -> Held<()> {
        Held { route: (), id: "id".into(), body: Bytes::from(vec![b'x'; len]) }
    }

    const LIMITS: Limits = Limits { max_bytes: 1000, max_payload: 600 };

    #[test]
    fn holds_a_transaction_that_fits_and_says_why_one_does_not() {
        let stream: Arc<str> = Arc::from("wal_listener");
        let other: Arc<str> = Arc::from("audit");
        let mut batch = TransactionBatch::default();
        assert!(batch.hold(held(300), Some(&stream), true, LIMITS).is_ok());
        assert!(batch.hold(held(300), Some(&stream), true, LIMITS).is_ok());
        assert_eq!(batch.hold(held(500), Some(&stream), true, LIMITS).unwrap_err().0, Fallback::TooManyBytes);
        assert_eq!(batch.hold(held(10), Some(&other), true, LIMITS).unwrap_err().0, Fallback::SeveralStreams);
        assert_eq!(
            batch.hold(held(700), Some(&stream), true, LIMITS).unwrap_err().0,
            Fallback::EventOverMaxPayload
        );
        assert_eq!(
            batch.hold(held(1), Some(&stream), false, LIMITS).unwrap_err().0,
            Fallback::StreamNotAtomic
        );
        assert_eq!(batch.hold(held(1), None, true, LIMITS).unwrap_err().0, Fallback::StreamNotAtomic);
        assert_eq!((batch.take().len(), batch.bytes()), (2, 0));
        assert!(batch.is_empty());
    }

    #[test]
    fn a_thousand_events_fit_one_more_does_not() {
        let stream: Arc<str> = Arc::from("s");
        let roomy = Limits { max_bytes: usize::MAX, max_payload: usize::MAX };
        let mut batch = TransactionBatch::default();
        for _ in 0..MAX_BATCH_MESSAGES {
            assert!(batch.hold(held(1), Some(&stream), true, roomy).is_ok());
        }
        assert_eq!(batch.hold(held(1), Some(&stream), true, roomy).unwrap_err().0, Fallback::TooManyEvents);
    }

    #[test]
    fn one_event_larger_than_the_byte_cap_still_fits_alone() {
        let stream: Arc<str> = Arc::from("s");
        let mut batch = TransactionBatch::default();
        let tight = Limits { max_bytes: 10, max_payload: 100 };
        assert!(batch.hold(held(50), Some(&stream), true, tight).is_ok());
    }

    #[test]
    fn batch_ids_are_short_and_differ_per_transaction() {
        let id = batch_id(u64::MAX >> 1, Lsn(u64::MAX));
        assert!(id.len() <= 64, "{id}");
        assert_ne!(batch_id(1, Lsn(2)), batch_id(1, Lsn(3)));
    }
}
