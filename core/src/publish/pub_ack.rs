//! Replies on the PubAck inbox. Only a JetStream PubAck from the stream that
//! stores the subject confirms an event; a core NATS subscriber that answers
//! requests on our subjects (`respond()`) also replies there, and its reply
//! must never count as "stored" (DESIGN.md section 7).

use async_nats::StatusCode;
use serde::Deserialize;

/// What one reply on the PubAck inbox says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// JetStream stored the message in `stream` (or had it already: a replay
    /// inside the duplicate window); for an atomic batch, `batch_count`
    /// messages ending with this one.
    Stored { stream: String, duplicate: bool, batch_count: Option<u64> },
    /// JetStream, or the server, refused it: its error code (`err_code`,
    /// when JetStream gave one) and why.
    Refused { code: Option<u32>, why: String },
    /// Not a PubAck: some other subscriber answered. Confirms nothing.
    Foreign(String),
}

#[derive(Deserialize)]
struct PubAck {
    stream: Option<String>,
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    code: Option<u16>,
    err_code: Option<u32>,
    description: Option<String>,
}

/// Reads one reply: `status` is the NATS status header, if any.
pub fn parse(status: Option<StatusCode>, payload: &[u8]) -> Reply {
    if status == Some(StatusCode::NO_RESPONDERS) {
        return refused(
            "no responders: no JetStream stream stores this subject (create one that does, or set \
             wal_listener.create_stream = on for the default subjects), or its stream has no leader now \
             (a NATS cluster that lost its quorum)",
        );
    }
    if let Some(status) = status.filter(|s| !s.is_success()) {
        return refused(format!("NATS status {status}"));
    }
    match serde_json::from_slice::<PubAck>(payload) {
        Ok(PubAck { error: Some(error), .. }) => Reply::Refused {
            code: error.err_code,
            why: format!(
                "JetStream error {} ({}): {}",
                error.code.map_or("?".into(), |c| c.to_string()),
                error.err_code.map_or("?".into(), |c| c.to_string()),
                error.description.as_deref().unwrap_or("no description")
            ),
        },
        Ok(PubAck { stream: Some(stream), seq: Some(_), duplicate, count, error: None })
            if !stream.is_empty() =>
        {
            Reply::Stored { stream, duplicate, batch_count: count }
        }
        _ => Reply::Foreign(preview(payload)),
    }
}

fn refused(why: impl Into<String>) -> Reply {
    Reply::Refused { code: None, why: why.into() }
}

/// JetStream's answer to an atomic batch with a `Nats-Msg-Id` it stored
/// before: the whole batch is refused, also when only one message is a
/// duplicate (seen against nats-server 2.15), so it does not say that the
/// batch is stored.
pub const BATCH_HAS_DUPLICATE: u32 = 10201;
/// Too many open atomic batches on the stream (50 by default).
pub const TOO_MANY_BATCHES: u32 = 10210;

/// The start of a foreign reply, for a log line.
fn preview(payload: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(&payload[..payload.len().min(MAX)]).into_owned();
    if payload.len() > MAX {
        format!("{text:?}…")
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pub_acks_name_their_stream() {
        assert_eq!(
            parse(None, br#"{"stream":"wal_listener","seq":7}"#),
            Reply::Stored { stream: "wal_listener".into(), duplicate: false, batch_count: None }
        );
        assert_eq!(
            parse(None, br#"{"stream":"orders","seq":7,"duplicate":true,"domain":"hub"}"#),
            Reply::Stored { stream: "orders".into(), duplicate: true, batch_count: None }
        );
        // An atomic batch's commit (nats-server 2.15).
        assert_eq!(
            parse(None, br#"{"stream":"S","seq":3,"batch":"b1","count":3}"#),
            Reply::Stored { stream: "S".into(), duplicate: false, batch_count: Some(3) }
        );
    }

    #[test]
    fn errors_and_status_codes_are_refusals() {
        let full = br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
        assert_eq!(
            parse(None, full),
            Reply::Refused {
                code: Some(10077),
                why: "JetStream error 503 (10077): maximum messages exceeded".into()
            }
        );
        let Reply::Refused { why: no_stream, .. } = parse(Some(StatusCode::NO_RESPONDERS), b"") else {
            panic!()
        };
        assert!(no_stream.contains("no JetStream stream stores this subject"), "{no_stream}");
        assert!(matches!(parse(Some(StatusCode::TIMEOUT), b""), Reply::Refused { code: None, .. }));
        let duplicate = br#"{"error":{"code":400,"err_code":10201,"description":"atomic publish batch contains duplicate message id"},"stream":"S","seq":0}"#;
        assert!(matches!(parse(None, duplicate), Reply::Refused { code: Some(BATCH_HAS_DUPLICATE), .. }));
    }

    #[test]
    fn anything_else_is_foreign_and_confirms_nothing() {
        for reply in [
            &b"ok"[..],
            b"",
            b"{}",
            br#"{"stream":"wal_listener"}"#,
            br#"{"seq":1}"#,
            br#"{"stream":"","seq":1}"#,
            br#"{"error_text":"an \"error\": field of another shape"}"#,
            br#"[1,2]"#,
        ] {
            assert!(matches!(parse(None, reply), Reply::Foreign(_)), "{}", String::from_utf8_lossy(reply));
        }
        assert_eq!(parse(None, &[b'x'; 100]), Reply::Foreign(format!("{:?}…", "x".repeat(80))));
    }
}
