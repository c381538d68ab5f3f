//! Row changes as wal-listener JSON events (DESIGN.md section 5): the body,
//! the deterministic id and the subject.

pub mod arrays;
pub mod json;
pub mod time;
pub mod values;

pub use values::{TypeCatalog, TypeRow, ValueKind};

use std::fmt;

use uuid::Uuid;

use crate::pgoutput::{OldTuple, PgTimestamp, Relation, TupleData, Value};
use crate::Lsn;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Insert,
    Update,
    Delete,
    Truncate,
    /// An existing row, sent by a backfill: shaped like an INSERT.
    Read,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Insert => "INSERT",
            Action::Update => "UPDATE",
            Action::Delete => "DELETE",
            Action::Truncate => "TRUNCATE",
            Action::Read => "READ",
        }
    }
}

/// Why a change could not become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The tuple does not match the relation pgoutput described.
    ColumnCountMismatch { table: String, columns: usize, values: usize },
    /// A text value was not UTF-8 although the session asks for UTF-8.
    InvalidUtf8 { table: String, column: String },
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::ColumnCountMismatch { table, columns, values } => write!(
                f,
                "row of {table} has {values} values but its relation message described {columns} columns"
            ),
            EventError::InvalidUtf8 { table, column } => {
                write!(f, "value of {table}.{column} is not valid UTF-8")
            }
        }
    }
}

impl std::error::Error for EventError {}

/// Derives the deterministic event ids of one replication slot: the same
/// change always gets the same id, also when replayed after a crash.
#[derive(Debug, Clone)]
pub struct EventIds {
    /// system identifier and slot name, the part of the UUIDv5 name shared by all events.
    name_prefix: Vec<u8>,
}

/// UUIDv5 namespace of wal_listener event ids (fixed forever).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b8e_51d4_4c57_9a0e_3c7d_2f4b_8a19);

impl EventIds {
    pub fn new(system_identifier: u64, slot: &str) -> Self {
        let mut name_prefix = system_identifier.to_be_bytes().to_vec();
        name_prefix.extend_from_slice(slot.as_bytes());
        name_prefix.push(0);
        EventIds { name_prefix }
    }

    /// The id of the `ordinal`-th change (0-based, before filtering) of the
    /// transaction whose commit record is at `commit_lsn`.
    pub fn id(&self, commit_lsn: Lsn, ordinal: u32) -> Uuid {
        let mut name = [0u8; 128];
        let prefix_len = self.name_prefix.len();
        if prefix_len + 12 <= name.len() {
            name[..prefix_len].copy_from_slice(&self.name_prefix);
            name[prefix_len..prefix_len + 8].copy_from_slice(&commit_lsn.0.to_be_bytes());
            name[prefix_len + 8..prefix_len + 12].copy_from_slice(&ordinal.to_be_bytes());
            Uuid::new_v5(&EVENT_ID_NAMESPACE, &name[..prefix_len + 12])
        } else {
            let mut name = self.name_prefix.clone();
            name.extend_from_slice(&commit_lsn.0.to_be_bytes());
            name.extend_from_slice(&ordinal.to_be_bytes());
            Uuid::new_v5(&EVENT_ID_NAMESPACE, &name)
        }
    }

    /// The id of the row with key `key` (its key columns' text, see
    /// [`crate::backfill`]) sent by backfill `backfill`: the same row of the
    /// same backfill always gets the same id, so a replayed chunk is dropped
    /// by JetStream's dedupe. No commit position: the chunk size adapts, so
    /// a replay may cut chunks differently.
    pub fn backfill_id(&self, backfill: i64, key: &[u8]) -> Uuid {
        let mut name = self.name_prefix.clone();
        name.extend_from_slice(b"backfill\0");
        name.extend_from_slice(&backfill.to_be_bytes());
        name.extend_from_slice(key);
        Uuid::new_v5(&EVENT_ID_NAMESPACE, &name)
    }

    /// [`id`](Self::id) as lower-case hyphenated text, written into `buf`.
    pub fn id_text<'b>(&self, commit_lsn: Lsn, ordinal: u32, buf: &'b mut [u8; 36]) -> &'b str {
        self.id(commit_lsn, ordinal).hyphenated().encode_lower(buf)
    }
}

/// One row change, ready to encode.
pub struct RowChange<'r, 'a> {
    pub relation: &'r Relation,
    /// How each column's values map to JSON, in column order.
    pub kinds: &'r [ValueKind],
    pub action: Action,
    /// New row: INSERT and UPDATE.
    pub new: Option<&'r TupleData<'a>>,
    /// Old row or its key: UPDATE and DELETE, when REPLICA IDENTITY sends it.
    pub old: Option<&'r OldTuple<'a>>,
}

/// Where a change sits in the WAL: the event's position keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// LSN of the transaction's commit record.
    pub commit_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
    /// Index of the change in its transaction, counted before filtering.
    pub ordinal: u32,
}

/// Appends the JSON body of `change` to `out`: the seven wal-listener keys,
/// then `primaryKey`, `lsn`, `xid`, `ordinal` and, when not empty,
/// `unchangedToast`. `id` is the event id as text (see [`EventIds::id_text`]).
pub fn encode_event(
    out: &mut Vec<u8>,
    id: &str,
    change: &RowChange<'_, '_>,
    position: &Position,
) -> Result<(), EventError> {
    encode_event_with(out, id, change, position, None)
}

/// [`encode_event`], plus `"backfill": <id>` for a row sent by a backfill.
pub fn encode_event_with(
    out: &mut Vec<u8>,
    id: &str,
    change: &RowChange<'_, '_>,
    position: &Position,
    backfill: Option<i64>,
) -> Result<(), EventError> {
    let relation = change.relation;
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"schema\":");
    json::write_str(out, &relation.namespace);
    out.extend_from_slice(b",\"table\":");
    json::write_str(out, &relation.name);
    out.extend_from_slice(b",\"action\":\"");
    out.extend_from_slice(change.action.as_str().as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    let (old, key_only) = match change.old {
        Some(OldTuple::Key(key)) => (Some(key), true),
        Some(OldTuple::Full(row)) => (Some(row), false),
        None => (None, false),
    };
    // A full old row (REPLICA IDENTITY FULL) carries the values an UPDATE
    // reports as unchanged TOAST.
    let toast_source = if key_only { None } else { old };
    let mut unchanged_toast = Vec::new();
    write_row(out, relation, change.kinds, change.new, RowKind::New { toast_source }, &mut unchanged_toast)?;
    out.extend_from_slice(b",\"dataOld\":");
    write_row(out, relation, change.kinds, old, RowKind::Old { key_only }, &mut unchanged_toast)?;
    out.extend_from_slice(b",\"commitTime\":\"");
    time::write_rfc3339_utc(out, position.commit_time);
    out.extend_from_slice(b"\",\"primaryKey\":");
    write_names(out, relation.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()));
    out.extend_from_slice(b",\"lsn\":\"");
    write_lsn(out, position.commit_lsn);
    out.extend_from_slice(b"\",\"xid\":");
    json::write_decimal(out, u64::from(position.xid), 0);
    out.extend_from_slice(b",\"ordinal\":");
    json::write_decimal(out, u64::from(position.ordinal), 0);
    if !unchanged_toast.is_empty() {
        out.extend_from_slice(b",\"unchangedToast\":");
        write_names(out, unchanged_toast.into_iter());
    }
    if let Some(backfill) = backfill {
        out.extend_from_slice(b",\"backfill\":");
        json::write_decimal(out, backfill.unsigned_abs(), 0);
    }
    out.push(b'}');
    Ok(())
}

fn write_names<'n>(out: &mut Vec<u8>, names: impl Iterator<Item = &'n str>) {
    out.push(b'[');
    for (i, name) in names.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json::write_str(out, name);
    }
    out.push(b']');
}

/// Which row `write_row` writes, and what that changes.
#[derive(Clone, Copy)]
enum RowKind<'t, 'a> {
    /// `data`; unchanged TOAST values are taken from `toast_source` when it has them.
    New { toast_source: Option<&'t TupleData<'a>> },
    /// `dataOld`; with `key_only`, only the replica identity columns
    /// (pgoutput sends the others as null).
    Old { key_only: bool },
}

/// Writes a row as a JSON object; `None` is `{}`. Unchanged TOAST columns
/// without a value are left out (never faked as null); the names of those
/// left out of `data` are collected.
fn write_row<'r>(
    out: &mut Vec<u8>,
    relation: &'r Relation,
    kinds: &[ValueKind],
    row: Option<&TupleData<'_>>,
    kind: RowKind<'_, '_>,
    unchanged_toast: &mut Vec<&'r str>,
) -> Result<(), EventError> {
    out.push(b'{');
    if let Some(row) = row {
        check_width(relation, row)?;
        let (toast_source, key_only) = match kind {
            RowKind::New { toast_source } => (toast_source, false),
            RowKind::Old { key_only } => (None, key_only),
        };
        if let Some(source) = toast_source {
            check_width(relation, source)?;
        }
        let mut first = true;
        for (index, (column, value)) in relation.columns.iter().zip(&row.values).enumerate() {
            if key_only && !column.is_key {
                continue;
            }
            let value = match (value, toast_source) {
                (Value::UnchangedToast, Some(source)) => &source.values[index],
                _ => value,
            };
            let text = match value {
                Value::UnchangedToast => {
                    if matches!(kind, RowKind::New { .. }) {
                        unchanged_toast.push(&column.name);
                    }
                    continue;
                }
                Value::Null => None,
                Value::Text(bytes) | Value::Binary(bytes) => {
                    Some(std::str::from_utf8(bytes).map_err(|_| EventError::InvalidUtf8 {
                        table: qualified_name(relation),
                        column: column.name.clone(),
                    })?)
                }
            };
            if !first {
                out.push(b',');
            }
            first = false;
            json::write_key(out, &column.name);
            match text {
                None => out.extend_from_slice(b"null"),
                Some(text) => values::write_value(out, kinds.get(index).unwrap_or(&ValueKind::Text), text),
            }
        }
    }
    out.push(b'}');
    Ok(())
}

/// The row's identity for a log line, e.g. `public.orders (id)=(42)`: the
/// replica identity columns of the new row, else of the old row. Values
/// longer than 64 bytes are cut, so a huge key cannot flood the log.
pub fn describe_row(change: &RowChange<'_, '_>) -> String {
    const MAX_VALUE: usize = 64;
    let relation = change.relation;
    let row = change.new.or(match change.old {
        Some(OldTuple::Key(row) | OldTuple::Full(row)) => Some(row),
        None => None,
    });
    let mut names = Vec::new();
    let mut values = Vec::new();
    for (column, value) in relation.columns.iter().zip(row.map(|r| r.values.as_slice()).unwrap_or_default()) {
        if !column.is_key {
            continue;
        }
        names.push(column.name.as_str());
        values.push(match value {
            Value::Null => "NULL".to_owned(),
            Value::UnchangedToast => "(unchanged toast)".to_owned(),
            Value::Text(bytes) | Value::Binary(bytes) => {
                let text = String::from_utf8_lossy(bytes);
                match text.char_indices().nth(MAX_VALUE) {
                    Some((cut, _)) => format!("{}…", &text[..cut]),
                    None => text.into_owned(),
                }
            }
        });
    }
    if names.is_empty() {
        return format!("{} (no key)", qualified_name(relation));
    }
    format!("{} ({})=({})", qualified_name(relation), names.join(", "), values.join(", "))
}

fn check_width(relation: &Relation, row: &TupleData<'_>) -> Result<(), EventError> {
    if row.values.len() == relation.columns.len() {
        return Ok(());
    }
    Err(EventError::ColumnCountMismatch {
        table: qualified_name(relation),
        columns: relation.columns.len(),
        values: row.values.len(),
    })
}

fn qualified_name(relation: &Relation) -> String {
    format!("{}.{}", relation.namespace, relation.name)
}

/// The ordinal in the id of a transaction's END event: after any change
/// (no transaction has 2^32 - 1 of them), so a replay gives the same id.
pub const END_ORDINAL: u32 = u32::MAX;

/// The subject of END events, `<topic>.<topic_prefix>_transaction`: no
/// table's default subject, as a schema name is never empty.
pub fn end_subject(topic: &str, topic_prefix: &str) -> String {
    format!("{topic}.{topic_prefix}_transaction")
}

/// A transaction's END event (`wal_listener.transaction_end_events`): how
/// many events it published, in all and per subject, so that a consumer
/// knows when it holds all of them. `subjects` in the order to write.
pub fn encode_end(out: &mut Vec<u8>, id: &str, position: &Position, subjects: &[(&str, u32)]) {
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"action\":\"END\",\"commitTime\":\"");
    time::write_rfc3339_utc(out, position.commit_time);
    out.extend_from_slice(b"\",\"lsn\":\"");
    write_lsn(out, position.commit_lsn);
    out.extend_from_slice(b"\",\"xid\":");
    json::write_decimal(out, u64::from(position.xid), 0);
    out.extend_from_slice(b",\"events\":");
    json::write_decimal(out, subjects.iter().map(|(_, n)| u64::from(*n)).sum(), 0);
    out.extend_from_slice(b",\"subjects\":{");
    for (index, (subject, n)) in subjects.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        json::write_str(out, subject);
        out.push(b':');
        json::write_decimal(out, u64::from(*n), 0);
    }
    out.extend_from_slice(b"}}");
}

/// Why `name` cannot be one token of a NATS subject, if it cannot.
pub fn subject_token_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.contains(['.', '*', '>']) {
        Some("it contains '.', '*' or '>'")
    } else if name.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else {
        None
    }
}

/// `<topic>`, or `<topic>.<database>` for a database other than
/// `wal_listener.database`: what default and END subjects start with.
pub fn subject_root(topic: &str, database: Option<&str>) -> String {
    match database {
        Some(database) => format!("{topic}.{database}"),
        None => topic.to_owned(),
    }
}

/// Builds `<topic>.<topic_prefix><schema>_<table>`, as wal-listener does.
/// In schema and table names, characters that NATS does not allow inside a
/// subject token (`.`, `*`, `>`, whitespace) become `_`, so any table name
/// gives a publishable subject.
pub fn default_subject(topic: &str, topic_prefix: &str, schema: &str, table: &str) -> String {
    let mut subject =
        String::with_capacity(topic.len() + topic_prefix.len() + schema.len() + table.len() + 2);
    subject.push_str(topic);
    subject.push('.');
    subject.push_str(topic_prefix);
    let token_safe = |c: char| {
        if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
            '_'
        } else {
            c
        }
    };
    subject.extend(schema.chars().map(token_safe));
    subject.push('_');
    subject.extend(table.chars().map(token_safe));
    subject
}

/// An LSN as Postgres prints it: `XXX/XXXXXXXX`, upper-case hex.
fn write_lsn(out: &mut Vec<u8>, lsn: Lsn) {
    json::write_upper_hex(out, (lsn.0 >> 32) as u32);
    out.push(b'/');
    json::write_upper_hex(out, lsn.0 as u32);
}

#[cfg(test)]
mod tests;
