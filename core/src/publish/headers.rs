//! The NATS headers of what the worker publishes: an event's routing facts
//! (so consumers and stream subject transforms filter without parsing the
//! body; the body is unchanged), and a `publish()` message's own headers.
//! `Nats-Msg-Id` is added by [`super::Publisher`].

use async_nats::header::{HeaderMap, HeaderName};

use async_nats::header::HeaderValue;

use super::BatchPlace;
use crate::event::time::write_rfc3339_utc;
use crate::event::Position;
use crate::Lsn;

pub const ACTION: HeaderName = HeaderName::from_static("WL-Action");
pub const SCHEMA: HeaderName = HeaderName::from_static("WL-Schema");
pub const TABLE: HeaderName = HeaderName::from_static("WL-Table");
/// The commit's LSN as Postgres writes it: the body's `lsn`.
pub const COMMIT_LSN: HeaderName = HeaderName::from_static("WL-Commit-LSN");
/// RFC 3339, UTC, microseconds: the body's `commitTime`.
pub const COMMIT_TIME: HeaderName = HeaderName::from_static("WL-Commit-Time");

/// A row event's headers; `action` as in the body (`INSERT` … `READ`).
pub fn row_event(schema: &str, table: &str, action: &str, position: &Position) -> HeaderMap {
    let mut headers = commit(position.commit_lsn, position.commit_time);
    headers.insert(ACTION, action);
    headers.insert(SCHEMA, name_value(schema));
    headers.insert(TABLE, name_value(table));
    headers
}

/// A schema or table name as a header value: a line break (which a quoted
/// name may hold) cannot be in one, and async-nats panics on it; it
/// becomes `_`, as in subjects. The body keeps the name as it is.
fn name_value(name: &str) -> String {
    name.replace(['\r', '\n'], "_")
}

/// Bytes `headers` take in a message (`NATS/1.0` line, `name: value` lines,
/// blank line): NATS' `max_payload` counts them with the body.
pub fn wire_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            values.iter().map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4).sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// An END event's headers.
pub fn end_event(position: &Position) -> HeaderMap {
    let mut headers = commit(position.commit_lsn, position.commit_time);
    headers.insert(ACTION, "END");
    headers
}

/// A `publish()` message's headers: the caller's (checked when it was
/// called) and where its transaction committed. A name NATS would refuse
/// is an error, not a panic.
pub fn published_message(
    given: &[(&str, &str)],
    commit_lsn: Lsn,
    commit_time: i64,
) -> Result<HeaderMap, String> {
    let mut headers = commit(commit_lsn, commit_time);
    for (name, value) in given {
        let name: HeaderName = name.parse().map_err(|e| format!("header name {name:?}: {e}"))?;
        let value: HeaderValue = value.parse().map_err(|e| format!("header {name}: {e}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The headers of a message in an atomic batch (ADR-50), added to its own.
pub fn add_batch(headers: &mut HeaderMap, message_id: &str, place: &BatchPlace<'_>) {
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
    headers.insert("Nats-Batch-Id", place.id);
    headers.insert("Nats-Batch-Sequence", place.number.to_string().as_str());
    if place.commit_sequence.is_some() {
        headers.insert("Nats-Batch-Commit", "1");
    }
}

fn commit(commit_lsn: Lsn, commit_time: i64) -> HeaderMap {
    let mut time = Vec::with_capacity(32);
    write_rfc3339_utc(&mut time, commit_time);
    let mut headers = HeaderMap::new();
    headers.insert(COMMIT_LSN, commit_lsn.to_string());
    headers.insert(COMMIT_TIME, String::from_utf8(time).expect("RFC 3339 is ASCII"));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_event_headers_name_the_row_and_its_commit_as_the_body_does() {
        let position = Position { commit_lsn: Lsn(0x1_0000_00AB), commit_time: 0, xid: 7, ordinal: 3 };
        let headers = row_event("public", "orders", "INSERT", &position);
        assert_eq!(headers.get(ACTION).unwrap().as_str(), "INSERT");
        assert_eq!(headers.get(SCHEMA).unwrap().as_str(), "public");
        assert_eq!(headers.get(TABLE).unwrap().as_str(), "orders");
        assert_eq!(headers.get(COMMIT_LSN).unwrap().as_str(), "1/AB");
        assert_eq!(headers.get(COMMIT_TIME).unwrap().as_str(), "2000-01-01T00:00:00.000000Z");
        assert_eq!(end_event(&position).get(ACTION).unwrap().as_str(), "END");
        assert!(end_event(&position).get(TABLE).is_none());
    }

    #[test]
    fn a_line_break_in_a_name_becomes_an_underscore_not_a_panic() {
        let position = Position { commit_lsn: Lsn(1), commit_time: 0, xid: 7, ordinal: 0 };
        let headers = row_event("we\rird", "a\nb", "INSERT", &position);
        assert_eq!(headers.get(SCHEMA).unwrap().as_str(), "we_ird");
        assert_eq!(headers.get(TABLE).unwrap().as_str(), "a_b");
    }

    /// The room `publish()` and `hold` leave for headers covers the
    /// largest the worker adds: commit headers at the largest LSN, a
    /// committing batch message at the largest batch id and sequence.
    #[test]
    fn the_room_left_for_headers_holds_the_largest_the_worker_adds() {
        let place = BatchPlace {
            id: &crate::publish::batch::batch_id(u64::MAX, Lsn(u64::MAX)),
            number: crate::publish::batch::MAX_BATCH_MESSAGES,
            commit_sequence: Some(u64::MAX),
        };
        let id = "00000000-0000-0000-0000-000000000000";
        let own = published_message(&[], Lsn(u64::MAX), i64::MAX / 2).unwrap();
        let mut batched = own.clone();
        add_batch(&mut batched, id, &place);
        assert!(wire_len(&batched) <= crate::sql_message::ADDED_HEADER_BYTES, "{}", wire_len(&batched));
        assert!(
            wire_len(&batched) - wire_len(&own) <= crate::publish::batch::BATCH_HEADER_BYTES,
            "{}",
            wire_len(&batched) - wire_len(&own)
        );
    }

    #[test]
    fn wire_len_counts_every_line_of_the_header_block() {
        let mut headers = HeaderMap::new();
        assert_eq!(wire_len(&headers), 12);
        headers.insert("Ab", "cd");
        headers.append("Ab", "e");
        // "NATS/1.0\r\n" + "Ab: cd\r\n" + "Ab: e\r\n" + "\r\n"
        assert_eq!(wire_len(&headers), 10 + 8 + 7 + 2);
    }

    #[test]
    fn published_message_headers_keep_repeated_names_and_refuse_bad_ones() {
        let headers = published_message(&[("Tag", "a"), ("Tag", "b"), ("Type", "x")], Lsn(16), 0).unwrap();
        let tags: Vec<&str> = headers.get_all("Tag").map(|v| v.as_str()).collect();
        assert_eq!(tags, ["a", "b"]);
        assert_eq!(headers.get(COMMIT_LSN).unwrap().as_str(), "0/10");
        assert!(published_message(&[("a:b", "x")], Lsn(16), 0).is_err());
    }
}
