//! Changes received while the in-flight caps are reached, bounded in bytes:
//! the walsender keeps sending into this buffer until it is full, then
//! waits (DESIGN.md rule 5).

use std::collections::VecDeque;

use pgwire_replication::ReplicationEvent;

/// Counted per event besides its payload: the event itself and the channel slot.
const EVENT_OVERHEAD: usize = 64;

pub struct ReadAhead {
    events: VecDeque<ReplicationEvent>,
    bytes: usize,
    capacity_bytes: usize,
}

impl ReadAhead {
    pub fn new(capacity_bytes: usize) -> Self {
        ReadAhead { events: VecDeque::new(), bytes: 0, capacity_bytes }
    }

    /// Whether another event may be taken in; one event larger than the
    /// whole capacity still fits into an empty buffer.
    pub fn has_room(&self) -> bool {
        self.bytes < self.capacity_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn push(&mut self, event: ReplicationEvent) {
        self.bytes += size_of(&event);
        self.events.push_back(event);
    }

    pub fn pop(&mut self) -> Option<ReplicationEvent> {
        let event = self.events.pop_front()?;
        self.bytes -= size_of(&event);
        Some(event)
    }
}

/// The memory an event holds, near enough.
pub fn size_of(event: &ReplicationEvent) -> usize {
    EVENT_OVERHEAD
        + match event {
            ReplicationEvent::XLogData { data, .. } => data.len(),
            ReplicationEvent::Message { prefix, content, .. } => prefix.len() + content.len(),
            _ => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn change(len: usize) -> ReplicationEvent {
        ReplicationEvent::XLogData {
            wal_start: Default::default(),
            wal_end: Default::default(),
            server_time_micros: 0,
            data: Bytes::from(vec![b'I'; len]),
        }
    }

    #[test]
    fn bounded_in_bytes_and_first_in_first_out() {
        let mut read_ahead = ReadAhead::new(1000);
        assert!(read_ahead.has_room());
        read_ahead.push(change(5000));
        assert!(!read_ahead.has_room(), "one oversized event fills it");
        assert!(
            matches!(read_ahead.pop(), Some(ReplicationEvent::XLogData { data, .. }) if data.len() == 5000)
        );
        let mut taken = 0;
        while read_ahead.has_room() {
            read_ahead.push(change(100));
            taken += 1;
        }
        assert_eq!(taken, 1000 / (100 + EVENT_OVERHEAD) + 1);
        read_ahead.pop();
        assert!(read_ahead.has_room());
        while read_ahead.pop().is_some() {}
        assert!(read_ahead.is_empty() && read_ahead.bytes == 0);
    }
}
