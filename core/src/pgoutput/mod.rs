//! Decoding of the pgoutput logical replication protocol, version 1
//! (<https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>).
//!
//! `decode` turns the bytes of one XLogData payload into a [`Message`] that
//! borrows from them: column values are slices of the input, not copies.
//! Malformed input yields a [`DecodeError`], never a panic.

mod reader;
mod relations;

use std::fmt;

use crate::Lsn;
use reader::Reader;
pub use relations::{Column, Relation, RelationCache};

/// Microseconds since 2000-01-01 00:00:00 UTC, Postgres' timestamp epoch.
pub type PgTimestamp = i64;

/// One pgoutput message.
#[derive(Debug, PartialEq)]
pub enum Message<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin { commit_lsn: Lsn, name: &'a str },
    Relation(Relation),
    Type { oid: u32, namespace: &'a str, name: &'a str },
    Insert { relation_id: u32, new: TupleData<'a> },
    Update { relation_id: u32, old: Option<OldTuple<'a>>, new: TupleData<'a> },
    Delete { relation_id: u32, old: OldTuple<'a> },
    Truncate { relation_ids: Vec<u32>, cascade: bool, restart_identity: bool },
    Message { transactional: bool, lsn: Lsn, prefix: &'a str, content: &'a [u8] },
}

/// Start of a committed transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Begin {
    /// LSN of the commit record: with the ordinal it identifies each change.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

/// End of a transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Commit {
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once acked.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// The old row of an UPDATE or DELETE, as far as REPLICA IDENTITY provides it.
#[derive(Debug, PartialEq)]
pub enum OldTuple<'a> {
    /// Only the replica identity key columns ('K'); others are null.
    Key(TupleData<'a>),
    /// The whole old row ('O', REPLICA IDENTITY FULL).
    Full(TupleData<'a>),
}

/// Column values of one row, in the relation's column order.
#[derive(Debug, PartialEq, Default)]
pub struct TupleData<'a> {
    pub values: Vec<Value<'a>>,
}

/// One column value as pgoutput sends it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value that did not change; Postgres does not resend it.
    UnchangedToast,
    /// The type's text output (the loopback session asks for text format).
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownMessage { tag: u8 },
    Truncated { needed: usize, at: usize, len: usize },
    UnterminatedString { at: usize },
    InvalidUtf8 { at: usize },
    NegativeLength { at: usize, len: i64 },
    UnknownTupleKind { kind: u8, at: usize },
    UnexpectedSubmessage { expected: &'static str, found: u8, at: usize },
    TrailingBytes { tag: u8, extra: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty pgoutput message"),
            DecodeError::UnknownMessage { tag } => {
                write!(f, "unknown pgoutput message type {:?} (0x{tag:02x})", char::from(*tag))
            }
            DecodeError::Truncated { needed, at, len } => {
                write!(f, "truncated pgoutput message: needed {needed} bytes at offset {at} of {len}")
            }
            DecodeError::UnterminatedString { at } => {
                write!(f, "unterminated string at offset {at}")
            }
            DecodeError::InvalidUtf8 { at } => write!(f, "name at offset {at} is not valid UTF-8"),
            DecodeError::NegativeLength { at, len } => {
                write!(f, "negative length {len} at offset {at}")
            }
            DecodeError::UnknownTupleKind { kind, at } => {
                write!(f, "unknown column kind {:?} at offset {at}", char::from(*kind))
            }
            DecodeError::UnexpectedSubmessage { expected, found, at } => {
                write!(f, "expected {expected} at offset {at}, found {:?}", char::from(*found))
            }
            DecodeError::TrailingBytes { tag, extra } => {
                write!(f, "{extra} unexpected bytes after pgoutput message {:?}", char::from(*tag))
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one pgoutput (protocol version 1) message.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8().map_err(|_| DecodeError::Empty)?;
    let message = match tag {
        b'B' => Message::Begin(Begin { final_lsn: Lsn(r.u64()?), commit_time: r.i64()?, xid: r.u32()? }),
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit(Commit {
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: r.i64()?,
            })
        }
        b'O' => Message::Origin { commit_lsn: Lsn(r.u64()?), name: r.cstr()? },
        b'R' => Message::Relation(relations::decode_relation(&mut r)?),
        b'Y' => Message::Type { oid: r.u32()?, namespace: r.cstr()?, name: r.cstr()? },
        b'I' => {
            let relation_id = r.u32()?;
            expect_submessage(&mut r, b'N', "'N' (new tuple)")?;
            Message::Insert { relation_id, new: tuple_data(&mut r)? }
        }
        b'U' => {
            let relation_id = r.u32()?;
            let at = r.position();
            let old = match r.u8()? {
                b'K' => Some(OldTuple::Key(tuple_data(&mut r)?)),
                b'O' => Some(OldTuple::Full(tuple_data(&mut r)?)),
                b'N' => None,
                found => {
                    return Err(DecodeError::UnexpectedSubmessage { expected: "'K', 'O' or 'N'", found, at })
                }
            };
            if old.is_some() {
                expect_submessage(&mut r, b'N', "'N' (new tuple)")?;
            }
            Message::Update { relation_id, old, new: tuple_data(&mut r)? }
        }
        b'D' => {
            let relation_id = r.u32()?;
            let at = r.position();
            let old = match r.u8()? {
                b'K' => OldTuple::Key(tuple_data(&mut r)?),
                b'O' => OldTuple::Full(tuple_data(&mut r)?),
                found => return Err(DecodeError::UnexpectedSubmessage { expected: "'K' or 'O'", found, at }),
            };
            Message::Delete { relation_id, old }
        }
        b'T' => {
            let count = r.u32()?;
            let options = r.u8()?;
            // Each id is 4 bytes: check before allocating so a corrupt count cannot.
            let needed = usize::try_from(count).unwrap_or(usize::MAX).saturating_mul(4);
            if needed > r.remaining() {
                return Err(DecodeError::Truncated { needed, at: r.position(), len: buf.len() });
            }
            let relation_ids = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { relation_ids, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstr()?;
            let content = r.sized_bytes()?;
            Message::Message { transactional: flags & 1 != 0, lsn, prefix, content }
        }
        tag => return Err(DecodeError::UnknownMessage { tag }),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes { tag, extra: r.remaining() });
    }
    Ok(message)
}

fn expect_submessage(r: &mut Reader<'_>, want: u8, expected: &'static str) -> Result<(), DecodeError> {
    let at = r.position();
    let found = r.u8()?;
    if found != want {
        return Err(DecodeError::UnexpectedSubmessage { expected, found, at });
    }
    Ok(())
}

fn tuple_data<'a>(r: &mut Reader<'a>) -> Result<TupleData<'a>, DecodeError> {
    let count = r.count()?;
    let mut values = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        let at = r.position();
        let value = match r.u8()? {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' => Value::Text(r.sized_bytes()?),
            b'b' => Value::Binary(r.sized_bytes()?),
            kind => return Err(DecodeError::UnknownTupleKind { kind, at }),
        };
        values.push(value);
    }
    Ok(TupleData { values })
}

#[cfg(test)]
mod tests;
