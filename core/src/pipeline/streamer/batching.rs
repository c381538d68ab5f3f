//! `publish_mode = transaction`: committed transactions held as atomic
//! batches, and how many batches may await their PubAck at once.

use std::sync::Arc;
use std::time::Instant;

use super::{Route, Streamer};
use crate::publish::batch::{batch_id, Held, NotHeld};
use crate::publish::{BatchPlace, Sent};
use crate::status::LogLevel;
use crate::Error;

/// Atomic batches sent and not yet acked before committed transactions
/// wait to join the next batch instead: few enough that transactions
/// group while the server syncs, enough to keep it busy.
const BATCHES_IN_FLIGHT: usize = 4;

impl Streamer {
    /// In `publish_mode = transaction`: holds the event for the next
    /// batch, or returns it to be sent on its own, after the events of its
    /// transaction held so far (the transaction falls back, once and for all).
    pub(super) async fn hold(
        &mut self,
        mut held: Held<Arc<Route>>,
    ) -> Result<Option<Held<Arc<Route>>>, Error> {
        let transaction = self.transaction.as_ref().expect("a change is inside a transaction");
        if transaction.unbatched.is_some() {
            // After the transactions held before it.
            self.send_batch().await?;
            self.settle_first_batch().await?;
            return Ok(Some(held));
        }
        let commit_lsn = transaction.begin.final_lsn;
        let stream = held.route.stream.clone();
        let atomic = stream.as_deref().is_some_and(|s| self.publisher.streams().allows_atomic(s));
        let fallback = loop {
            let (route, bytes) = (held.route.clone(), held.body.len());
            let sequence = self.tracker.next_sequence();
            match self.batch.hold(held, sequence, stream.as_ref(), atomic, self.batch_limits) {
                Ok(()) => {
                    // Counted as in flight from now: the confirm rule waits for its batch.
                    self.tracker.held(route, bytes);
                    return Ok(None);
                }
                Err(NotHeld::Full(event)) => {
                    self.send_batch().await?;
                    held = event;
                }
                Err(NotHeld::Fallback(fallback, event)) => {
                    held = event;
                    break fallback;
                }
            }
        };
        if let Some(transaction) = self.transaction.as_mut() {
            transaction.unbatched = Some(Some(fallback));
        }
        self.board.add_unbatched(1);
        self.board.log(
            LogLevel::Info,
            format!(
                "the transaction committed at {commit_lsn} goes one event at a time, not as one atomic batch: it \
                 has {}",
                fallback.reason()
            ),
        );
        self.send_batch().await?;
        self.settle_first_batch().await?;
        let (earlier, first_sequence) = self.batch.take_open();
        for (sequence, event) in (first_sequence..).zip(earlier) {
            // Each fitted max_payload when it was held.
            if let Sent::TooLarge(why) = self
                .publisher
                .publish(&event.route.subject, &event.id, event.headers, event.body, sequence)
                .await?
            {
                return Err(Error::Nats(format!("publishing event {} failed: {why}", event.id)));
            }
            self.tracker.sent(sequence..=sequence, Instant::now());
        }
        Ok(Some(held))
    }

    /// Until a batch of this session is stored, one batch at a time and
    /// nothing after it: a replay's first batches may hold events stored
    /// before (refused whole, error 10201, then sent again one event at a
    /// time), and what was sent after them must not be stored first.
    pub(super) async fn settle_first_batch(&mut self) -> Result<(), Error> {
        while !self.batch_stored && self.batches_in_flight() > 0 {
            self.take_reply().await?;
        }
        Ok(())
    }

    /// Sends the held events of committed transactions as one atomic
    /// batch when fewer batches than the limit await PubAcks; otherwise
    /// they wait for more transactions to join (the replies that free room
    /// come in the main loop).
    pub(super) async fn send_batch_when_due(&mut self) -> Result<(), Error> {
        if !self.batch.has_committed() {
            return Ok(());
        }
        if self.batches_in_flight() < self.batch_limit() {
            self.send_batch().await?;
        }
        Ok(())
    }

    /// Atomic batches allowed in flight: one until a batch of the session
    /// is stored, then [`BATCHES_IN_FLIGHT`] (the server refuses more than
    /// 50 open batches per stream, error 10210).
    pub(super) fn batch_limit(&self) -> usize {
        if self.batch_stored {
            BATCHES_IN_FLIGHT
        } else {
            1
        }
    }

    /// Atomic batches sent and still awaiting their PubAck.
    pub(super) fn batches_in_flight(&mut self) -> usize {
        let tracker = &self.tracker;
        self.batches_in_flight.retain(|&(_, last)| tracker.awaits(last));
        self.batches_in_flight.len()
    }

    /// Takes PubAcks until another atomic batch may be sent.
    pub(super) async fn wait_for_batch_room(&mut self) -> Result<(), Error> {
        while self.batches_in_flight() >= self.batch_limit() {
            self.take_reply().await?;
        }
        Ok(())
    }

    /// Sends the held events of committed transactions as one atomic
    /// batch; its PubAck acks them all. Their sequences were taken when
    /// they were held.
    pub(super) async fn send_batch(&mut self) -> Result<(), Error> {
        if !self.batch.has_committed() {
            return Ok(());
        }
        // Whoever sends (a full batch, a backfill, a fallback), the
        // limit holds: transactions alternating between two streams fill
        // one batch each, and the server refuses more than 50 open batches
        // per stream.
        self.wait_for_batch_room().await?;
        let Some(ready) = self.batch.take_committed() else { return Ok(()) };
        let batch_id = batch_id(self.token, ready.last_commit);
        let last = ready.first_sequence + ready.events.len() as u64 - 1;
        let count = ready.events.len();
        for (index, held) in ready.events.into_iter().enumerate() {
            let commit = (index + 1 == count).then_some(last);
            self.publisher
                .publish_in_batch(
                    &held.route.subject,
                    &held.id,
                    held.headers,
                    held.body,
                    BatchPlace { id: &batch_id, number: index + 1, commit_sequence: commit },
                )
                .await?;
        }
        self.tracker.sent(ready.first_sequence..=last, Instant::now());
        self.batches_in_flight.push_back((ready.first_sequence, last));
        Ok(())
    }
}
