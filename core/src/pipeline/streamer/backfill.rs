//! The streamer's side of backfills: watch the chunk's table between its
//! watermarks, emit the chunk's rows at the high one (DBLog, see
//! [`crate::backfill`]), and tell the task when they are all acked.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::{route, send, Streamer};
use crate::backfill::store::Shape;
use crate::backfill::window::{key_of, ChunkId, Verdict, Watermark, Window};
use crate::backfill::{Chunk, ChunkDone, Outcome, ToStreamer};
use crate::event::{describe_row, encode_event_with, Action, Position, RowChange};
use crate::filters::Decision;
use crate::pgoutput::{OldTuple, Relation, TupleData, Value};
use crate::publish::headers;
use crate::publish::Sent;
use crate::{Error, Lsn};

/// Seconds from 1970-01-01 to 2000-01-01, Postgres' timestamp epoch.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// The channels between the streamer and the backfill task of one session.
pub struct BackfillLink {
    /// Names this session's watermarks; replayed ones of earlier sessions differ.
    pub run: u64,
    pub from_task: mpsc::Receiver<ToStreamer>,
    pub done: mpsc::UnboundedSender<ChunkDone>,
}

pub(super) struct BackfillState {
    link: BackfillLink,
    /// The chunk whose low watermark passed, with its table's shape.
    window: Option<(Window, Arc<Shape>)>,
    /// Chunks emitted, until their events are acked: (sequence after the
    /// chunk's last publish, chunk, events published).
    awaiting_acks: VecDeque<(u64, ChunkId, u64)>,
    /// Read from the task ahead of its watermark.
    received: VecDeque<ToStreamer>,
}

impl BackfillState {
    pub(super) fn new(link: BackfillLink) -> Self {
        BackfillState { link, window: None, awaiting_acks: VecDeque::new(), received: VecDeque::new() }
    }

    /// Takes what the task sent; an abandoned attempt's messages and window go.
    pub(super) fn drain(&mut self) {
        while let Ok(message) = self.link.from_task.try_recv() {
            match message {
                ToStreamer::Abandon(id) => {
                    self.received.retain(|m| match m {
                        ToStreamer::Watch { id: other, .. } | ToStreamer::Abandon(other) => *other != id,
                        ToStreamer::Rows(chunk) => chunk.id != id,
                    });
                    if self.window.as_ref().is_some_and(|(window, _)| window.id == id) {
                        self.window = None;
                    }
                }
                message => self.received.push_back(message),
            }
        }
    }

    /// Records the key a change of the watched table touches.
    pub(super) fn note_change<'a>(
        &mut self,
        relation: &Relation,
        action: Action,
        new: Option<&TupleData<'a>>,
        old: Option<&OldTuple<'a>>,
    ) {
        self.drain();
        let Some((window, shape)) = self.window.as_mut() else { return };
        if relation.id != window.table() {
            return;
        }
        if action == Action::Truncate {
            window.truncated(relation.id);
            return;
        }
        let positions: Option<Vec<usize>> = shape
            .key
            .iter()
            .map(|(index, _)| {
                let name = &shape.relation.columns[*index].name;
                relation.columns.iter().position(|c| &c.name == name)
            })
            .collect();
        // A key column the stream does not describe: the key is unknown.
        let Some(positions) = positions else {
            window.key_unknown(relation.id);
            return;
        };
        let old = match old {
            Some(OldTuple::Key(row) | OldTuple::Full(row)) => Some(key_values(row, &positions)),
            None => None,
        };
        let mut keys = Vec::with_capacity(2);
        if let Some(new) = new {
            // An UPDATE that leaves a TOASTed key as it was sends it as
            // unchanged; Postgres then logs the old key, which is the same.
            let mut key = key_values(new, &positions);
            for (value, old_value) in key.iter_mut().zip(old.iter().flatten()) {
                if value.is_none() {
                    *value = *old_value;
                }
            }
            keys.push(key);
        }
        keys.extend(old);
        for key in keys {
            // A value the stream did not send: the key is unknown.
            match key.into_iter().collect::<Option<Vec<&[u8]>>>() {
                Some(key) => window.changed(relation.id, key_of(key.into_iter().map(Some))),
                None => window.key_unknown(relation.id),
            }
        }
    }

    /// The task's message for chunk `id`: sent before its watermark was
    /// written, so it is in the channel when the watermark is in the stream.
    fn take(&mut self, id: ChunkId, rows: bool) -> Option<ToStreamer> {
        self.drain();
        let matches = |message: &ToStreamer| match message {
            ToStreamer::Watch { id: watched, .. } => !rows && *watched == id,
            ToStreamer::Rows(chunk) => rows && chunk.id == id,
            ToStreamer::Abandon(_) => false,
        };
        let index = self.received.iter().position(matches)?;
        // Anything older belongs to a chunk whose watermark will not come.
        let message = self.received.remove(index);
        self.received.drain(..index);
        message
    }

    /// A low watermark of this session: opens the window its Watch asked for.
    fn low(&mut self, id: ChunkId, table: u32) {
        if let Some(ToStreamer::Watch { shape, .. }) = self.take(id, false) {
            self.window = Some((Window::open(id, table), shape));
        }
    }

    /// A high watermark of this session: closes its window and returns it
    /// with the rows read inside it. Another attempt's window stays open (a
    /// high watermark written late, after the next low one, must not close
    /// it).
    fn high(&mut self, id: ChunkId) -> High {
        let rows = match self.take(id, true) {
            Some(ToStreamer::Rows(chunk)) => Some(chunk),
            _ => None,
        };
        match (self.window.take_if(|(window, _)| window.id == id), rows) {
            (Some((window, shape)), Some(chunk)) => High::Emit(window, shape, chunk),
            (_, Some(_)) => High::Lost,
            _ => High::Nothing,
        }
    }
}

/// The values of a row's key columns (at `positions`); `None` where the
/// row has no text for one (NULL, or an unchanged TOASTed value).
fn key_values<'a>(row: &TupleData<'a>, positions: &[usize]) -> Vec<Option<&'a [u8]>> {
    positions
        .iter()
        .map(|&i| match row.values.get(i) {
            Some(Value::Text(bytes) | Value::Binary(bytes)) => Some(*bytes),
            _ => None,
        })
        .collect()
}

/// What a high watermark does.
enum High {
    Emit(Window, Arc<Shape>, Chunk),
    /// Rows without their window: the task waits; it reads the chunk again.
    Lost,
    /// An abandoned attempt's, or not ours.
    Nothing,
}

impl Streamer {
    /// A watermark message of a backfill.
    pub(super) async fn on_watermark(&mut self, content: &[u8], lsn: Lsn) -> Result<(), Error> {
        let Some(state) = self.backfill.as_mut() else { return Ok(()) };
        match Watermark::parse(content) {
            Some(Watermark::Low { id, table }) if id.run == state.link.run => {
                state.low(id, table);
                Ok(())
            }
            Some(Watermark::High { id }) if id.run == state.link.run => match state.high(id) {
                High::Emit(window, shape, chunk) if window.verdict() != Verdict::ReadAgain => {
                    self.emit_chunk(&window, &shape, chunk, lsn).await
                }
                High::Emit(..) | High::Lost => {
                    let _ = state.link.done.send(ChunkDone { id, outcome: Outcome::ReadAgain });
                    Ok(())
                }
                High::Nothing => Ok(()),
            },
            _ => Ok(()), // an earlier session's, or not ours
        }
    }

    /// Publishes the rows of `chunk` that no change inside `window` touched.
    async fn emit_chunk(
        &mut self,
        window: &Window,
        shape: &Arc<Shape>,
        chunk: Chunk,
        lsn: Lsn,
    ) -> Result<(), Error> {
        let relation = &shape.relation;
        let kinds = self.kinds_of(relation).await?;
        let subject_override = match self.filters.decide(relation.id, Action::Read) {
            Decision::Skip => {
                self.board.add_filtered(chunk.rows.len() as u64);
                return self.chunk_emitted(chunk.id, 0);
            }
            Decision::Publish(subject) => subject.map(str::to_owned),
        };
        let route = route(
            &mut self.routes,
            &self.publisher,
            (&self.subject_root, &self.topic_prefix),
            relation,
            subject_override.as_deref(),
        );
        let commit_time = now_pg_micros();
        let mut published = 0;
        for (ordinal, row) in chunk.rows.iter().enumerate() {
            let key = key_of(shape.key.iter().map(|(i, _)| row[*i].as_deref().map(str::as_bytes)));
            if !window.keeps(&key) {
                continue;
            }
            self.wait_below_caps().await?;
            let new = TupleData {
                values: row
                    .iter()
                    .map(|v| v.as_deref().map_or(Value::Null, |t| Value::Text(t.as_bytes())))
                    .collect(),
            };
            let change =
                RowChange { relation, kinds: &kinds, action: Action::Read, new: Some(&new), old: None };
            let position = Position { commit_lsn: lsn, commit_time, xid: 0, ordinal: ordinal as u32 };
            let mut id_buf = [0u8; 36];
            let id = self.ids.backfill_id(chunk.id.backfill, &key).hyphenated().encode_lower(&mut id_buf);
            let mut body = Vec::with_capacity(self.last_event_len + 64);
            encode_event_with(&mut body, id, &change, &position, Some(chunk.id.backfill))?;
            let headers =
                headers::row_event(&relation.namespace, &relation.name, Action::Read.as_str(), &position);
            let sent =
                send(&mut self.tracker, &self.publisher, route.clone(), id, headers, body.into()).await?;
            let what = match sent {
                Sent::TooLarge(_) => {
                    format!("event {id} for {} sent by backfill {}", describe_row(&change), chunk.id.backfill)
                }
                Sent::Published => {
                    published += 1;
                    String::new()
                }
            };
            self.after_send(sent, what).await?;
        }
        self.chunk_emitted(chunk.id, published)
    }

    fn chunk_emitted(&mut self, id: ChunkId, published: u64) -> Result<(), Error> {
        let boundary = self.tracker.next_sequence();
        if let Some(state) = self.backfill.as_mut() {
            state.awaiting_acks.push_back((boundary, id, published));
        }
        self.report_acked_chunks();
        Ok(())
    }

    /// Tells the task about every chunk whose events are all acked now.
    pub(super) fn report_acked_chunks(&mut self) {
        let acked_before = self.tracker.next_unacked();
        let Some(state) = self.backfill.as_mut() else { return };
        while let Some(&(boundary, id, published)) = state.awaiting_acks.front() {
            if boundary > acked_before {
                break;
            }
            state.awaiting_acks.pop_front();
            let _ = state.link.done.send(ChunkDone { id, outcome: Outcome::Acked { published } });
        }
    }

    /// Takes PubAcks until another publish fits the in-flight caps; held
    /// transactions go first (they are older, and they count as in flight).
    pub(super) async fn wait_below_caps(&mut self) -> Result<(), Error> {
        self.send_batch().await?;
        self.settle_first_batch().await?;
        while !self.below_caps() {
            self.take_reply().await?;
        }
        Ok(())
    }
}

/// Now as a Postgres timestamp: the time a backfilled row was read.
fn now_pg_micros() -> i64 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    unix - PG_EPOCH_UNIX_SECS * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::Column;

    const TABLE: u32 = 100;

    fn shape() -> Arc<Shape> {
        let column =
            |name: &str| Column { name: name.into(), type_oid: 25, type_modifier: -1, is_key: false };
        Arc::new(Shape {
            relation: Relation {
                id: TABLE,
                namespace: "public".into(),
                name: "t".into(),
                replica_identity: b'i',
                columns: vec![column("id"), column("code")],
            },
            key: vec![(1, "text".into())],
            row_filter: None,
        })
    }

    fn state() -> (BackfillState, mpsc::Sender<ToStreamer>, mpsc::UnboundedReceiver<ChunkDone>) {
        let (to_streamer, from_task) = mpsc::channel(64);
        let (done, answers) = mpsc::unbounded_channel();
        (BackfillState::new(BackfillLink { run: 9, from_task, done }), to_streamer, answers)
    }

    fn id(attempt: u64) -> ChunkId {
        ChunkId { backfill: 1, attempt, run: 9 }
    }

    /// A DELETE under `REPLICA IDENTITY USING INDEX (code)`: the old tuple carries `code` only.
    fn delete(state: &mut BackfillState, code: Option<&'static [u8]>) {
        let old = TupleData { values: vec![Value::Null, code.map_or(Value::UnchangedToast, Value::Text)] };
        state.note_change(&shape().relation, Action::Delete, None, Some(&OldTuple::Key(old)));
    }

    fn rows(id: ChunkId) -> ToStreamer {
        ToStreamer::Rows(Chunk { id, shape: shape(), rows: vec![vec![Some("1".into()), Some("a".into())]] })
    }

    #[test]
    fn a_delete_inside_the_window_hides_its_row_by_the_replica_identity_key() {
        let (mut state, task, _) = state();
        task.try_send(ToStreamer::Watch { id: id(1), shape: shape() }).unwrap();
        state.low(id(1), TABLE);
        delete(&mut state, Some(b"a"));
        task.try_send(rows(id(1))).unwrap();
        let High::Emit(window, _, chunk) = state.high(id(1)) else { panic!("the chunk") };
        assert_eq!(chunk.rows.len(), 1);
        assert!(!window.keeps(&key_of([Some(&b"a"[..])])));
        assert!(window.keeps(&key_of([Some(&b"b"[..])])));
    }

    #[test]
    fn an_abandoned_attempt_closes_its_window_and_collects_no_keys() {
        let (mut state, task, _) = state();
        task.try_send(ToStreamer::Watch { id: id(1), shape: shape() }).unwrap();
        state.low(id(1), TABLE);
        assert!(state.window.is_some());
        task.try_send(ToStreamer::Abandon(id(1))).unwrap();
        delete(&mut state, Some(b"a"));
        assert!(state.window.is_none(), "the window closed at the next change");
        // Abandoned before its low watermark was decoded: the window never opens.
        task.try_send(ToStreamer::Watch { id: id(2), shape: shape() }).unwrap();
        task.try_send(ToStreamer::Abandon(id(2))).unwrap();
        state.low(id(2), TABLE);
        assert!(state.window.is_none());
        assert!(state.received.is_empty());
        // The next attempt is watched as usual.
        task.try_send(ToStreamer::Watch { id: id(3), shape: shape() }).unwrap();
        state.low(id(3), TABLE);
        assert_eq!(state.window.as_ref().map(|(w, _)| w.id), Some(id(3)));
    }

    #[test]
    fn a_change_without_its_key_reads_the_chunk_again() {
        let (mut state, task, _) = state();
        task.try_send(ToStreamer::Watch { id: id(1), shape: shape() }).unwrap();
        state.low(id(1), TABLE);
        delete(&mut state, None); // an unchanged TOASTed key
        task.try_send(rows(id(1))).unwrap();
        let High::Emit(window, ..) = state.high(id(1)) else { panic!("the chunk") };
        assert_eq!(window.verdict(), Verdict::ReadAgain);
    }

    #[test]
    fn a_late_high_watermark_of_an_abandoned_attempt_leaves_the_next_window_open() {
        let (mut state, task, _) = state();
        task.try_send(ToStreamer::Watch { id: id(1), shape: shape() }).unwrap();
        state.low(id(1), TABLE);
        task.try_send(rows(id(1))).unwrap();
        // Writing the high watermark timed out on our side: abandoned, the next attempt starts...
        task.try_send(ToStreamer::Abandon(id(1))).unwrap();
        task.try_send(ToStreamer::Watch { id: id(2), shape: shape() }).unwrap();
        state.low(id(2), TABLE);
        // ...and the server wrote it after all, after the next low watermark.
        assert!(matches!(state.high(id(1)), High::Nothing));
        assert_eq!(state.window.as_ref().map(|(w, _)| w.id), Some(id(2)));
        delete(&mut state, Some(b"a"));
        task.try_send(rows(id(2))).unwrap();
        let High::Emit(window, ..) = state.high(id(2)) else { panic!("the chunk") };
        assert!(!window.keeps(&key_of([Some(&b"a"[..])])));
    }

    #[test]
    fn rows_without_their_window_are_answered_so_the_task_never_hangs() {
        let (mut state, task, _) = state();
        task.try_send(rows(id(1))).unwrap();
        assert!(matches!(state.high(id(1)), High::Lost));
    }

    #[test]
    fn an_update_with_an_unchanged_toasted_key_takes_the_logged_old_key() {
        let (mut state, task, _) = state();
        task.try_send(ToStreamer::Watch { id: id(1), shape: shape() }).unwrap();
        state.low(id(1), TABLE);
        let new = TupleData { values: vec![Value::Text(b"1"), Value::UnchangedToast] };
        let old = TupleData { values: vec![Value::Null, Value::Text(b"a")] };
        state.note_change(&shape().relation, Action::Update, Some(&new), Some(&OldTuple::Key(old)));
        task.try_send(rows(id(1))).unwrap();
        let High::Emit(window, ..) = state.high(id(1)) else { panic!("the chunk") };
        assert_eq!(window.verdict(), Verdict::Emit);
        assert!(!window.keeps(&key_of([Some(&b"a"[..])])));
    }
}
