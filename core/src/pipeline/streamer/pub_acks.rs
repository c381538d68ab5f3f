//! PubAcks: what each reply acks, what it lets the slot confirm, and
//! when a missing one fails the session.

use std::time::Instant;

use super::Streamer;
use crate::park_linger::PARK_LINGER;
use crate::publish::batch::answered;
use crate::publish::pub_ack::{BATCH_HAS_DUPLICATE, TOO_MANY_BATCHES};
use crate::publish::{Reply, ACK_TIMEOUT};
use crate::status::LogLevel;
use crate::{Error, Lsn};

impl Streamer {
    pub(super) fn on_reply(&mut self, sequence: u64, reply: Reply) -> Result<(), Error> {
        if let Reply::Foreign(body) = reply {
            // Also when it trails the PubAck: someone answers on our subjects.
            self.foreign_replies += 1;
            if self.foreign_replies == 1 {
                let subject = self
                    .tracker
                    .tag(sequence)
                    .map_or("a subject of ours".to_owned(), |r| r.subject.to_string());
                self.board.log(
                    LogLevel::Warning,
                    format!(
                        "a reply that is not a JetStream PubAck arrived for an event on {subject}: {body}; a core \
                         NATS subscriber on that subject answers requests. It confirms nothing: only a PubAck \
                         from the stream does"
                    ),
                );
            }
            return Ok(());
        }
        let Some(route) = self.tracker.tag(sequence).cloned() else {
            return Ok(()); // acked already
        };
        match reply {
            Reply::Stored { stream, batch_count, .. } if route.stream.as_deref() == Some(stream.as_str()) => {
                self.batch_stored |= batch_count.is_some();
                // An atomic batch's PubAck answers all its messages, ending with this one.
                let answered = answered(sequence, batch_count, self.batches_in_flight.iter().copied())
                    .map_err(|why| Error::Nats(format!("publishing to {}: {why}", route.subject)))?;
                let mut newest = None;
                for acked in answered {
                    let (newly_acked, confirm) = self.tracker.acked(acked);
                    if newly_acked > 0 {
                        self.board.add_published(newly_acked);
                    }
                    newest = confirm.or(newest);
                }
                if let Some(lsn) = newest {
                    self.confirm(lsn);
                }
                self.report_acked_chunks();
                Ok(())
            }
            Reply::Stored { stream, .. } => Err(Error::Nats(format!(
                "publishing to {}: the PubAck came from stream {stream}, but {} stored that subject when the \
                 worker connected; reconnecting to read the streams again",
                route.subject,
                route.stream.as_deref().map_or("no stream".to_owned(), |s| format!("stream {s}"))
            ))),
            Reply::Refused { code: Some(BATCH_HAS_DUPLICATE), .. } => {
                // A replay after a restart (or a transaction partly stored one
                // event at a time before): JetStream refuses the whole batch,
                // whichever of its messages it has. Send what this session sent
                // again one event at a time: per-message dedupe drops what is
                // stored and stores what is not.
                self.board.set_per_event_until(self.published_through);
                Err(Error::Restart(format!(
                    "an atomic batch on {} holds an event JetStream stored before (error {BATCH_HAS_DUPLICATE}); \
                     transactions up to {} go again one event at a time",
                    route.subject, self.published_through
                )))
            }
            Reply::Refused { code: Some(TOO_MANY_BATCHES), why } => Err(Error::Nats(format!(
                "publishing to {}: {why}; other publishers hold the stream's open atomic batches",
                route.subject
            ))),
            Reply::Refused { why, .. } if self.tracker.awaits(sequence) => {
                Err(Error::Nats(format!("publishing to {} failed: {why}", route.subject)))
            }
            Reply::Refused { .. } | Reply::Foreign(_) => Ok(()),
        }
    }

    /// Takes the next reply on the PubAck inbox, waiting at most
    /// [`ACK_TIMEOUT`]; `false` when none came and none is overdue yet.
    pub(super) async fn take_reply(&mut self) -> Result<bool, Error> {
        let _no_linger = PARK_LINGER.hold(); // a round trip, not the walsender
        match tokio::time::timeout(ACK_TIMEOUT, self.publisher.next_ack()).await {
            Ok(reply) => {
                let (sequence, reply) = reply?;
                self.on_reply(sequence, reply)?;
                Ok(true)
            }
            Err(_) => self.check_acks_in_time().map(|()| false),
        }
    }

    /// Waits until every publish so far is acked (or the PubAck timeout
    /// passes), confirming what the acks allow.
    pub(super) async fn settle(&mut self) -> Result<(), Error> {
        self.send_batch().await?;
        self.publisher.flush().await?;
        while !self.tracker.is_empty() {
            if !self.take_reply().await? {
                break;
            }
        }
        Ok(())
    }

    /// A PubAck that takes longer than [`ACK_TIMEOUT`] fails the session:
    /// the publish may be lost, and the replay from the slot resends it.
    pub(super) fn check_acks_in_time(&self) -> Result<(), Error> {
        let Some(late) = self.tracker.overdue(Instant::now(), ACK_TIMEOUT) else { return Ok(()) };
        let foreign = match self.foreign_replies {
            0 => String::new(),
            n => format!("; {n} replies came from a core NATS subscriber instead, which confirm nothing"),
        };
        Err(Error::Nats(format!(
            "publishing to {} failed: no PubAck within {} s ({} publishes unacked; NATS overloaded or \
             JetStream unavailable){foreign}",
            late.tag.subject,
            ACK_TIMEOUT.as_secs(),
            late.unacked
        )))
    }

    /// Reports `lsn` as flushed; the tracker guarantees everything before
    /// it is acked. Held below a filter change until its record is on the
    /// standbys (see `confirm_hold`).
    pub(super) fn confirm(&mut self, lsn: Lsn) {
        let Some(lsn) = self.confirm_hold.confirm(lsn) else { return };
        self.client.update_applied_lsn(lsn.into());
        self.board.set_confirmed_lsn(lsn);
    }
}
