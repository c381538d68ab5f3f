//! The streamer's side of backfills: watch the chunk's table between its
//! watermarks, emit the chunk's rows at the high one (DBLog, see
//! [`crate::backfill`]), and tell the task when they are all acked.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::{route, send, Streamer};
use crate::backfill::store::Shape;
use crate::backfill::window::{key_of, ChunkId, Watermark, Window};
use crate::backfill::{Chunk, ChunkDone, ToStreamer};
use crate::event::{describe_row, encode_event_with, Action, Position, RowChange};
use crate::filters::Decision;
use crate::pgoutput::{OldTuple, Relation, TupleData, Value};
use crate::publish::Sent;
use crate::replication::catalog;
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

    /// Records the key a change of the watched table touches.
    pub(super) fn note_change(
        &mut self,
        relation: &Relation,
        action: Action,
        new: Option<&TupleData<'_>>,
        old: Option<&OldTuple<'_>>,
    ) {
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
        // A key column the stream does not carry: keep no row of this chunk.
        let Some(positions) = positions else {
            window.truncated(relation.id);
            return;
        };
        let old = match old {
            Some(OldTuple::Key(row) | OldTuple::Full(row)) => Some(row),
            None => None,
        };
        for row in [new, old].into_iter().flatten() {
            let values = positions.iter().map(|&i| match row.values.get(i) {
                Some(Value::Text(bytes) | Value::Binary(bytes)) => Some(*bytes),
                _ => None,
            });
            window.changed(relation.id, key_of(values));
        }
    }

    /// The task's message for chunk `id`: sent before its watermark was
    /// written, so it is in the channel when the watermark is in the stream.
    fn take(&mut self, id: ChunkId, rows: bool) -> Option<ToStreamer> {
        while let Ok(message) = self.link.from_task.try_recv() {
            self.received.push_back(message);
        }
        let matches = |message: &ToStreamer| match message {
            ToStreamer::Watch { id: watched, .. } => !rows && *watched == id,
            ToStreamer::Rows(chunk) => rows && chunk.id == id,
        };
        let index = self.received.iter().position(matches)?;
        // Anything older belongs to a chunk whose watermark will not come.
        let message = self.received.remove(index);
        self.received.drain(..index);
        message
    }
}

impl Streamer {
    /// A watermark message of a backfill.
    pub(super) async fn on_watermark(&mut self, content: &[u8], lsn: Lsn) -> Result<(), Error> {
        let Some(state) = self.backfill.as_mut() else { return Ok(()) };
        match Watermark::parse(content) {
            Some(Watermark::Low { id, table }) if id.run == state.link.run => {
                if let Some(ToStreamer::Watch { shape, .. }) = state.take(id, false) {
                    state.window = Some((Window::open(id, table), shape));
                }
                Ok(())
            }
            Some(Watermark::High { id }) if id.run == state.link.run => {
                let Some((window, shape)) = state.window.take().filter(|(window, _)| window.id == id) else {
                    return Ok(());
                };
                match state.take(id, true) {
                    Some(ToStreamer::Rows(chunk)) => self.emit_chunk(&window, &shape, chunk, lsn).await,
                    _ => Ok(()),
                }
            }
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
        let unknown = self.catalog.unknown(relation.columns.iter().map(|c| c.type_oid));
        if !unknown.is_empty() {
            let rows = catalog::lookup_types(&self.source, &unknown).await?;
            self.catalog.learn(&rows);
        }
        let kinds: Vec<_> = relation.columns.iter().map(|c| self.catalog.kind(c.type_oid)).collect();
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
            (&self.topic, &self.topic_prefix),
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
            let sent = send(&mut self.tracker, &self.publisher, route.clone(), id, body.into()).await?;
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
            let _ = state.link.done.send(ChunkDone { id, published });
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
