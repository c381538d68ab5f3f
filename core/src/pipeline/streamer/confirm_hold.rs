//! Holds confirms below a filter change until its record is on the standbys.
//!
//! A filter version takes effect at the commit of the transaction that wrote
//! it (L1); the worker records that in `applied_versions` with an insert of
//! its own, committed later (at L2). A promoted standby reads its filters
//! from that table, and its synced slot may already be past L1 while it
//! lacks L2: it would stream on with the version before. So nothing at or
//! past L1 is confirmed until the stream has passed L2: with
//! `synchronized_standby_slots`, the server sends nothing past L2 before
//! the standbys have it. A restart meanwhile replays L1 and applies its
//! messages again.

use crate::Lsn;

#[derive(Debug, Default)]
pub struct ConfirmHold {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    /// The commit LSN of the first filter change held: confirms stay below it.
    below: Lsn,
    /// Where its record (the latest one's, when several) ends.
    until: Lsn,
    /// The newest confirm asked for meanwhile.
    wanted: Option<Lsn>,
}

impl ConfirmHold {
    /// A filter version took effect at `commit_lsn` and was recorded by a
    /// transaction that ends at or before `recorded_until`.
    pub fn filter_change(&mut self, commit_lsn: Lsn, recorded_until: Lsn) {
        match &mut self.held {
            Some(held) => held.until = held.until.max(recorded_until),
            None => self.held = Some(Held { below: commit_lsn, until: recorded_until, wanted: None }),
        }
    }

    /// What may be confirmed of `lsn` now: `None` while it is held.
    pub fn confirm(&mut self, lsn: Lsn) -> Option<Lsn> {
        match &mut self.held {
            Some(held) if lsn >= held.below => {
                held.wanted = held.wanted.max(Some(lsn));
                None
            }
            _ => Some(lsn),
        }
    }

    /// The stream reached `lsn`: past the record, the hold ends and the
    /// newest confirm asked for meanwhile is returned.
    pub fn reached(&mut self, lsn: Lsn) -> Option<Lsn> {
        match &self.held {
            Some(held) if lsn >= held.until => self.held.take().and_then(|held| held.wanted),
            _ => None,
        }
    }

    pub fn is_holding(&self) -> bool {
        self.held.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_at_or_past_the_change_wait_until_the_stream_passes_its_record() {
        let mut hold = ConfirmHold::default();
        assert_eq!(hold.confirm(Lsn(50)), Some(Lsn(50)));
        hold.filter_change(Lsn(100), Lsn(200));
        assert_eq!(hold.confirm(Lsn(99)), Some(Lsn(99)), "before the change");
        assert_eq!(hold.confirm(Lsn(100)), None);
        assert_eq!(hold.confirm(Lsn(180)), None);
        assert_eq!(hold.confirm(Lsn(150)), None);
        assert_eq!(hold.reached(Lsn(199)), None);
        assert!(hold.is_holding());
        assert_eq!(hold.reached(Lsn(200)), Some(Lsn(180)), "the newest asked for");
        assert!(!hold.is_holding());
        assert_eq!(hold.confirm(Lsn(300)), Some(Lsn(300)));
    }

    #[test]
    fn a_second_change_extends_the_hold_from_the_first() {
        let mut hold = ConfirmHold::default();
        hold.filter_change(Lsn(100), Lsn(200));
        hold.filter_change(Lsn(300), Lsn(400));
        assert_eq!(hold.confirm(Lsn(250)), None);
        assert_eq!(hold.reached(Lsn(300)), None);
        assert_eq!(hold.reached(Lsn(400)), Some(Lsn(250)));
        let mut idle = ConfirmHold::default();
        idle.filter_change(Lsn(100), Lsn(200));
        assert_eq!(idle.reached(Lsn(500)), None, "nothing asked for");
        assert!(!idle.is_holding());
    }
}
