//! The DBLog watermark rule, pure: a chunk of rows read between a low and a
//! high watermark is emitted at the high one, without the rows whose key
//! the change stream touched between the two (the live event is newer, or
//! as new). A consumer that applies events in stream order then ends with
//! the table's current state.

use std::collections::HashSet;

/// Names one attempt at reading one chunk, in one worker session (`run`):
/// the watermarks of an earlier session, replayed after a restart, never
/// match, and a chunk read again after a failure never takes the earlier
/// attempt's answer for its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkId {
    pub backfill: i64,
    /// Counts every chunk read the backfill task starts in this session.
    pub attempt: u64,
    pub run: u64,
}

/// A watermark message (`pg_logical_emit_message`, non-transactional, so
/// it sits in the stream at its own WAL position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    /// Before the chunk's SELECT; names the table whose changes count.
    Low { id: ChunkId, table: u32 },
    /// After it: the chunk is emitted here.
    High { id: ChunkId },
}

impl Watermark {
    /// The message content: `low <backfill> <attempt> <run> <table>` or `high <backfill> <attempt> <run>`.
    pub fn content(&self) -> String {
        match self {
            Watermark::Low { id, table } => format!("low {} {} {} {table}", id.backfill, id.attempt, id.run),
            Watermark::High { id } => format!("high {} {} {}", id.backfill, id.attempt, id.run),
        }
    }

    pub fn parse(content: &[u8]) -> Option<Watermark> {
        let text = std::str::from_utf8(content).ok()?;
        let mut words = text.split(' ');
        let kind = words.next()?;
        let mut number = || words.next()?.parse::<i64>().ok();
        let id = ChunkId {
            backfill: number()?,
            attempt: u64::try_from(number()?).ok()?,
            run: u64::try_from(number()?).ok()?,
        };
        let watermark = match kind {
            "low" => Watermark::Low { id, table: u32::try_from(number()?).ok()? },
            "high" => Watermark::High { id },
            _ => return None,
        };
        words.next().is_none().then_some(watermark)
    }
}

/// What a window says about the chunk read inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Emit the rows no change touched.
    Emit,
    /// A TRUNCATE of the table inside the window: every row read is gone
    /// or has a live event after it; emit none and go on.
    Truncated,
    /// A change whose key the stream did not carry (an unchanged TOASTed
    /// key, a key column outside the published columns): any row may be
    /// stale. Emit none and read the chunk again.
    ReadAgain,
}

/// The keys of one table that changed between a chunk's watermarks.
#[derive(Debug)]
pub struct Window {
    pub id: ChunkId,
    table: u32,
    changed: HashSet<Vec<u8>>,
    verdict: Verdict,
}

impl Window {
    pub fn open(id: ChunkId, table: u32) -> Self {
        Window { id, table, changed: HashSet::new(), verdict: Verdict::Emit }
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    /// A change of `table` inside the window touched the row with `key`.
    pub fn changed(&mut self, table: u32, key: Vec<u8>) {
        if table == self.table {
            self.changed.insert(key);
        }
    }

    pub fn truncated(&mut self, table: u32) {
        if table == self.table && self.verdict == Verdict::Emit {
            self.verdict = Verdict::Truncated;
        }
    }

    /// A change of `table` touched a row whose key is unknown.
    pub fn key_unknown(&mut self, table: u32) {
        if table == self.table {
            self.verdict = Verdict::ReadAgain;
        }
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Whether a row read in the chunk is emitted at the high watermark.
    pub fn keeps(&self, key: &[u8]) -> bool {
        self.verdict == Verdict::Emit && !self.changed.contains(key)
    }
}

/// A row's key as the window compares it: its key columns' text, each
/// followed by a NUL (text values never hold one); NULL as a lone 0xFF.
pub fn key_of<'v>(values: impl IntoIterator<Item = Option<&'v [u8]>>) -> Vec<u8> {
    let mut key = Vec::new();
    for value in values {
        match value {
            Some(bytes) => key.extend_from_slice(bytes),
            None => key.push(0xFF),
        }
        key.push(0);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: ChunkId = ChunkId { backfill: 7, attempt: 3, run: 42 };

    #[test]
    fn watermarks_round_trip_and_reject_garbage() {
        for watermark in [Watermark::Low { id: ID, table: 16384 }, Watermark::High { id: ID }] {
            assert_eq!(Watermark::parse(watermark.content().as_bytes()), Some(watermark));
        }
        for bad in ["", "low 7 3 42", "high 7 3", "mid 7 3 42", "high 7 3 42 9", "low a b c d", "high 7 3 -1"]
        {
            assert_eq!(Watermark::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn rows_changed_inside_the_window_are_left_to_the_live_events() {
        let key = |id: &str| key_of([Some(id.as_bytes())]);
        let mut window = Window::open(ID, 100);
        window.changed(100, key("2"));
        window.changed(200, key("3")); // another table
        assert!(window.keeps(&key("1")));
        assert!(!window.keeps(&key("2")));
        assert!(window.keeps(&key("3")));
        window.truncated(200);
        assert!(window.keeps(&key("1")));
        assert_eq!(window.verdict(), Verdict::Emit);
        window.truncated(100);
        assert!(!window.keeps(&key("1")), "a truncate inside the window drops the whole chunk");
        assert_eq!(window.verdict(), Verdict::Truncated);
    }

    #[test]
    fn a_change_of_unknown_key_makes_the_chunk_read_again_whatever_came_before() {
        let key = |id: &str| key_of([Some(id.as_bytes())]);
        let mut window = Window::open(ID, 100);
        window.key_unknown(200); // another table
        assert_eq!(window.verdict(), Verdict::Emit);
        window.truncated(100);
        window.key_unknown(100);
        assert_eq!(window.verdict(), Verdict::ReadAgain);
        window.truncated(100);
        assert_eq!(window.verdict(), Verdict::ReadAgain, "a later truncate does not make the rows safe");
        assert!(!window.keeps(&key("1")));
    }

    #[test]
    fn composite_keys_do_not_collide() {
        assert_ne!(key_of([Some(&b"a"[..]), Some(&b"bc"[..])]), key_of([Some(&b"ab"[..]), Some(&b"c"[..])]));
        assert_ne!(key_of([None]), key_of([Some(&b""[..])]));
    }
}
