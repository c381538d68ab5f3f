//! The confirm rule of DESIGN.md section 2.4 in one place: which WAL
//! position may be reported to the walsender as flushed, given what was
//! received, published and acked. Pure: the pipeline feeds it events and
//! sends what it returns.
//!
//! Invariant (property-tested below): the confirmed position never passes
//! the commit of a transaction with an unacked event, and never moves back.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Lsn;

/// Publishes awaiting their PubAck and commits awaiting those publishes;
/// `T` is what the caller keeps per publish (where it went).
#[derive(Debug)]
pub struct AckTracker<T> {
    /// Sequence of `pending[0]`; every publish before it is acked.
    first: u64,
    /// Each publish since `first`, in publish order; acks may come out of order.
    pending: VecDeque<Pending<T>>,
    /// Payload bytes of the unacked publishes.
    unacked_bytes: usize,
    /// Commits not yet confirmable: (publishes before it, i.e. the sequence
    /// of the first publish after it, end LSN). Consecutive commits with no
    /// publish between them share one entry: the queue never outgrows `pending`.
    commits: VecDeque<(u64, Lsn)>,
    in_transaction: bool,
    confirmed: Lsn,
}

#[derive(Debug)]
struct Pending<T> {
    /// When it was sent; `None` while it is held for an atomic batch.
    sent: Option<Instant>,
    tag: T,
    bytes: usize,
    acked: bool,
}

/// The oldest unacked publish, when it is late.
#[derive(Debug, PartialEq)]
pub struct Overdue<'t, T> {
    pub tag: &'t T,
    pub waited: Duration,
    pub unacked: usize,
}

impl<T> AckTracker<T> {
    /// Starts at the slot's confirmed position; sequences start at 0.
    pub fn new(start: Lsn) -> Self {
        AckTracker {
            first: 0,
            pending: VecDeque::new(),
            unacked_bytes: 0,
            commits: VecDeque::new(),
            in_transaction: false,
            confirmed: start,
        }
    }

    /// The highest position that may be reported as flushed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Publishes not acked yet.
    pub fn unacked(&self) -> usize {
        self.pending.len()
    }

    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// A transaction starts (its changes follow, then its commit).
    pub fn begin(&mut self) {
        self.in_transaction = true;
    }

    /// Every publish before this sequence is acked.
    pub fn next_unacked(&self) -> u64 {
        self.first
    }

    /// The sequence the next publish gets.
    pub fn next_sequence(&self) -> u64 {
        self.first + self.pending.len() as u64
    }

    /// Records a publish of the open transaction; returns its sequence,
    /// which its PubAck must carry.
    pub fn published(&mut self, tag: T, bytes: usize, now: Instant) -> u64 {
        self.push(tag, bytes, Some(now))
    }

    /// Records a publish of the open transaction that is held to be sent
    /// later ([`sent`](Self::sent)): it counts as unacked from now on,
    /// but its PubAck timeout starts when it is sent.
    pub fn held(&mut self, tag: T, bytes: usize) -> u64 {
        self.push(tag, bytes, None)
    }

    /// The held publishes `sequences` went out at `now`.
    pub fn sent(&mut self, sequences: std::ops::RangeInclusive<u64>, now: Instant) {
        for sequence in sequences {
            if let Some(index) = sequence.checked_sub(self.first) {
                if let Some(pending) = self.pending.get_mut(index as usize) {
                    pending.sent.get_or_insert(now);
                }
            }
        }
    }

    fn push(&mut self, tag: T, bytes: usize, sent: Option<Instant>) -> u64 {
        let sequence = self.next_sequence();
        self.pending.push_back(Pending { sent, tag, bytes, acked: false });
        self.unacked_bytes += bytes;
        sequence
    }

    /// What the caller kept for a publish not yet counted as acked.
    pub fn tag(&self, sequence: u64) -> Option<&T> {
        self.pending_entry(sequence).map(|p| &p.tag)
    }

    /// Whether `sequence` was published and is still awaiting its PubAck.
    pub fn awaits(&self, sequence: u64) -> bool {
        self.pending_entry(sequence).is_some_and(|p| !p.acked)
    }

    fn pending_entry(&self, sequence: u64) -> Option<&Pending<T>> {
        let index = sequence.checked_sub(self.first)?;
        self.pending.get(usize::try_from(index).ok()?)
    }

    /// The transaction ending at `end_lsn` committed. Returns the position
    /// to confirm when that changed (its events, if any, are all acked).
    pub fn commit(&mut self, end_lsn: Lsn) -> Option<Lsn> {
        self.in_transaction = false;
        if self.pending.is_empty() {
            // Nothing of it, or before it, awaits a PubAck.
            return self.advance(end_lsn);
        }
        let boundary = self.first + self.pending.len() as u64;
        match self.commits.back_mut() {
            Some(last) if last.0 == boundary => last.1 = last.1.max(end_lsn),
            _ => self.commits.push_back((boundary, end_lsn)),
        }
        None
    }

    /// The PubAck of `sequence` arrived. Returns how many publishes are now
    /// acked without a gap (for counters) and the position to confirm when
    /// that changed. Unknown and repeated sequences change nothing.
    pub fn acked(&mut self, sequence: u64) -> (u64, Option<Lsn>) {
        let Some(index) = sequence.checked_sub(self.first) else { return (0, None) };
        match self.pending.get_mut(index as usize) {
            Some(pending) if !pending.acked => {
                pending.acked = true;
                self.unacked_bytes -= pending.bytes;
            }
            _ => return (0, None),
        }
        let mut done = 0;
        while self.pending.front().is_some_and(|p| p.acked) {
            self.pending.pop_front();
            done += 1;
        }
        self.first += done;
        let mut newest = None;
        while let Some(&(boundary, end_lsn)) = self.commits.front() {
            if boundary > self.first {
                break;
            }
            self.commits.pop_front();
            newest = Some(end_lsn);
        }
        (done, newest.and_then(|lsn| self.advance(lsn)))
    }

    /// A keepalive reported the server's WAL end. It is safe to confirm only
    /// when nothing received is open or unacked: then the walsender has
    /// nothing before `wal_end` that we still owe (an idle or fully filtered
    /// database must not pin WAL).
    pub fn keepalive(&mut self, wal_end: Lsn) -> Option<Lsn> {
        if self.in_transaction || !self.pending.is_empty() || !self.commits.is_empty() {
            return None;
        }
        self.advance(wal_end)
    }

    /// The oldest unacked publish, when it has waited longer than `timeout`.
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Option<Overdue<'_, T>> {
        // The front is never acked: acked publishes leave from the front.
        // Held publishes come after every sent one: a held front means none is sent.
        let oldest = self.pending.front()?;
        let waited = now.saturating_duration_since(oldest.sent?);
        (waited > timeout).then_some(Overdue {
            tag: &oldest.tag,
            waited,
            unacked: self.pending.iter().filter(|p| !p.acked).count(),
        })
    }

    fn advance(&mut self, lsn: Lsn) -> Option<Lsn> {
        (lsn > self.confirmed).then(|| {
            self.confirmed = lsn;
            lsn
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::Subject;
    use proptest::prelude::*;

    fn subject() -> Subject {
        Subject::from_static("wal_listener.public_t")
    }

    #[test]
    fn a_commit_confirms_once_its_events_are_acked_in_any_order() {
        let now = Instant::now();
        let mut tracker = AckTracker::<Subject>::new(Lsn(100));
        tracker.begin();
        let a = tracker.published(subject(), 10, now);
        let b = tracker.published(subject(), 20, now);
        assert_eq!(tracker.commit(Lsn(200)), None);
        assert_eq!(tracker.unacked_bytes(), 30);
        assert_eq!(tracker.acked(b), (0, None), "a is still missing");
        assert_eq!(tracker.acked(b), (0, None), "repeats change nothing");
        assert_eq!(tracker.acked(a), (2, Some(Lsn(200))));
        assert_eq!((tracker.unacked(), tracker.unacked_bytes(), tracker.confirmed()), (0, 0, Lsn(200)));
        assert_eq!(tracker.acked(99), (0, None), "never sent");
    }

    #[test]
    fn filtered_and_empty_commits_merge_while_acks_are_pending() {
        let now = Instant::now();
        let mut tracker = AckTracker::<Subject>::new(Lsn(0));
        tracker.begin();
        let a = tracker.published(subject(), 1, now);
        assert_eq!(tracker.commit(Lsn(10)), None);
        for end in 11..1000 {
            tracker.begin();
            assert_eq!(tracker.commit(Lsn(end)), None);
        }
        assert_eq!(tracker.commits.len(), 1, "commits with no publish between them share an entry");
        assert_eq!(tracker.acked(a), (1, Some(Lsn(999))));
        tracker.begin();
        assert_eq!(tracker.commit(Lsn(1000)), Some(Lsn(1000)), "nothing pending: confirmed at once");
    }

    #[test]
    fn keepalives_confirm_only_when_nothing_is_owed() {
        let now = Instant::now();
        let mut tracker = AckTracker::<Subject>::new(Lsn(50));
        assert_eq!(tracker.keepalive(Lsn(60)), Some(Lsn(60)));
        tracker.begin();
        assert_eq!(tracker.keepalive(Lsn(70)), None, "inside a transaction");
        let a = tracker.published(subject(), 1, now);
        tracker.commit(Lsn(80));
        assert_eq!(tracker.keepalive(Lsn(90)), None, "an ack is pending");
        tracker.acked(a);
        assert_eq!(tracker.confirmed(), Lsn(80));
        assert_eq!(tracker.keepalive(Lsn(90)), Some(Lsn(90)));
        assert_eq!(tracker.keepalive(Lsn(85)), None, "never back");
    }

    #[test]
    fn the_oldest_unacked_publish_decides_whether_acks_are_late() {
        let start = Instant::now();
        let mut tracker = AckTracker::<Subject>::new(Lsn(0));
        tracker.begin();
        let a = tracker.published(subject(), 1, start);
        tracker.published(subject(), 1, start + Duration::from_secs(5));
        let timeout = Duration::from_secs(10);
        assert_eq!(tracker.overdue(start + Duration::from_secs(9), timeout), None);
        let late = tracker.overdue(start + Duration::from_secs(11), timeout).unwrap();
        assert_eq!((late.waited, late.unacked), (Duration::from_secs(11), 2));
        tracker.acked(a);
        assert_eq!(tracker.overdue(start + Duration::from_secs(11), timeout), None);
        assert!(tracker.overdue(start + Duration::from_secs(16), timeout).is_some());
    }

    #[test]
    fn a_held_publish_is_late_only_counting_from_when_it_is_sent() {
        let start = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut tracker = AckTracker::<Subject>::new(Lsn(0));
        tracker.begin();
        let first = tracker.held(subject(), 1);
        let last = tracker.held(subject(), 1);
        assert_eq!(tracker.unacked(), 2);
        assert_eq!(tracker.commit(Lsn(10)), None, "a held publish holds its commit back");
        assert_eq!(tracker.overdue(start + Duration::from_secs(60), timeout), None);
        tracker.sent(first..=last, start + Duration::from_secs(60));
        assert_eq!(tracker.overdue(start + Duration::from_secs(65), timeout), None);
        assert!(tracker.overdue(start + Duration::from_secs(71), timeout).is_some());
        tracker.acked(first);
        assert_eq!(tracker.acked(last), (1, Some(Lsn(10))));
    }

    /// What the pipeline can do, in any order the protocol allows.
    #[derive(Debug, Clone)]
    enum Step {
        /// A transaction with this many events (0: filtered or empty).
        Transaction(u8),
        /// The PubAck of the n-th unacked publish (modulo their count).
        Ack(usize),
        Keepalive,
        /// A keepalive in the middle of the next transaction.
        KeepaliveMidTransaction(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..4).prop_map(Step::Transaction),
            any::<usize>().prop_map(Step::Ack),
            Just(Step::Keepalive),
            (1u8..3).prop_map(Step::KeepaliveMidTransaction),
        ]
    }

    proptest! {
        #[test]
        fn never_confirms_past_an_unacked_event_nor_moves_back(steps in prop::collection::vec(step(), 0..200)) {
            let now = Instant::now();
            let mut tracker = AckTracker::<Subject>::new(Lsn(1));
            let mut wal = 1u64;
            // Model: (sequence, end LSN of its transaction) of every unacked publish.
            let mut unacked: Vec<(u64, Lsn)> = Vec::new();
            let mut reported = Lsn(1);
            let mut check = |tracker: &AckTracker<Subject>, confirmed: Option<Lsn>, unacked: &[(u64, Lsn)]| {
                if let Some(lsn) = confirmed {
                    prop_assert!(lsn > reported, "moved back or repeated: {lsn} after {reported}");
                    reported = lsn;
                }
                prop_assert_eq!(tracker.confirmed(), reported);
                for &(_, end) in unacked {
                    prop_assert!(reported < end, "confirmed {reported} passes an unacked event of the commit ending at {end}");
                }
                Ok(())
            };
            for step in steps {
                match step {
                    Step::Transaction(events) | Step::KeepaliveMidTransaction(events) => {
                        tracker.begin();
                        let mut sequences = Vec::new();
                        for i in 0..events {
                            wal += 10;
                            sequences.push(tracker.published(subject(), 1, now));
                            if i == 0 && matches!(step, Step::KeepaliveMidTransaction(_)) {
                                // The server may already be past the whole transaction.
                                let confirmed = tracker.keepalive(Lsn(wal + 1000));
                                check(&tracker, confirmed, &unacked)?;
                            }
                        }
                        wal += 10;
                        let end = Lsn(wal);
                        unacked.extend(sequences.into_iter().map(|s| (s, end)));
                        let confirmed = tracker.commit(end);
                        check(&tracker, confirmed, &unacked)?;
                    }
                    Step::Ack(n) if !unacked.is_empty() => {
                        let (sequence, _) = unacked.remove(n % unacked.len());
                        let (_, confirmed) = tracker.acked(sequence);
                        check(&tracker, confirmed, &unacked)?;
                    }
                    Step::Ack(_) => {}
                    Step::Keepalive => {
                        wal += 1;
                        let confirmed = tracker.keepalive(Lsn(wal));
                        check(&tracker, confirmed, &unacked)?;
                    }
                }
            }
            // Once everything is acked, the last commit is confirmed.
            for (sequence, _) in std::mem::take(&mut unacked) {
                let (_, confirmed) = tracker.acked(sequence);
                check(&tracker, confirmed, &unacked)?;
            }
            prop_assert!(tracker.is_empty() && tracker.commits.is_empty());
        }
    }
}
