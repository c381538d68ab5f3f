//! Messages published from SQL with `wal_listener.publish()`: the checks
//! made when it is called, and the frame that carries subject, headers and
//! payload through the WAL as a transactional logical message (prefix
//! [`PREFIX`]), signed like the config messages
//! ([`crate::filters::verified_payload`]), so the worker publishes it at
//! its transaction's commit and never when it rolls back.
//!
//! Frame: `1` (version), subject length (u16 BE) and subject, header count
//! (u16 BE) and per header its name length (u16 BE), name, value length
//! (u32 BE) and value; the rest is the payload, sent as is.

use std::fmt;

use crate::filters::validate_subject;
use crate::publish::streams::subject_matches;

/// The logical message prefix of `publish()`.
pub const PREFIX: &str = "wal_listener.publish";
const VERSION: u8 = 1;
/// Room for the headers the worker adds (`Nats-Msg-Id`, `WL-Commit-LSN`,
/// `WL-Commit-Time`, about 150 bytes with NATS' framing), counted against
/// the cap: NATS' `max_payload` counts headers too, so a payload of exactly
/// `max_payload` would pass the check and then be refused by the server.
pub const ADDED_HEADER_BYTES: usize = 256;

/// Header name prefixes the caller may not set: `Nats-*` steer JetStream
/// (`Nats-Expected-*` would make the stream refuse the message and stall
/// everything after it, `Nats-Rollup` purges, `Nats-Msg-Id` must stay the
/// one derived from the WAL so a replay is dropped), `WL-*` are ours.
const RESERVED_HEADER_PREFIXES: [&str; 2] = ["nats-", "wl-"];
/// Header names the caller may not set: NATS clients take a message with a
/// `Status` header (and `Description`) for a control message of the server
/// (nats.go drops an empty one, and "404" ends a fetch).
const RESERVED_HEADER_NAMES: [&str; 2] = ["status", "description"];

/// Why a call is refused; each kind has its own SQLSTATE in the extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A subject, pattern or header that is not well formed (22023).
    Invalid(String),
    /// A subject outside `wal_listener.publish_subjects` (42501).
    NotAllowed(String),
    /// Payload and headers over `wal_listener.max_publish_bytes` (54000).
    TooLarge(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Invalid(m) | Refusal::NotAllowed(m) | Refusal::TooLarge(m) => f.write_str(m),
        }
    }
}

/// The subject patterns `publish()` may use: `wal_listener.publish_subjects`
/// as a comma-separated list, or `<topic>.>` when it is empty.
pub fn allowed_patterns(setting: &str, topic: &str) -> Result<Vec<String>, Refusal> {
    if setting.trim().is_empty() {
        return Ok(vec![format!("{topic}.>")]);
    }
    setting
        .split(',')
        .map(str::trim)
        .map(|pattern| {
            let tokens_ok = !pattern.is_empty()
                && pattern.split('.').enumerate().all(|(i, token)| {
                    let last = i == pattern.split('.').count() - 1;
                    !token.is_empty()
                        && !token.contains(char::is_whitespace)
                        && (token == "*" || (token == ">" && last) || !token.contains(['*', '>']))
                });
            if tokens_ok {
                Ok(pattern.to_owned())
            } else {
                Err(Refusal::Invalid(format!(
                    "wal_listener.publish_subjects has the pattern \"{pattern}\", which is not a NATS subject \
                     pattern (dot-separated tokens; * matches one token, > the rest); fix the setting"
                )))
            }
        })
        .collect()
}

/// Checks a subject's syntax and that one of `patterns` allows it.
pub fn check_subject(subject: &str, patterns: &[String]) -> Result<(), Refusal> {
    validate_subject(subject).map_err(Refusal::Invalid)?;
    if patterns.iter().any(|pattern| subject_matches(pattern, subject)) {
        return Ok(());
    }
    Err(Refusal::NotAllowed(format!(
        "subject \"{subject}\" is outside wal_listener.publish_subjects ({}); an administrator may add it there",
        patterns.join(", ")
    )))
}

/// The headers of a `publish()` call: a JSON object whose values are
/// strings, or arrays of strings for a repeated header. SQL NULL (`None`)
/// and JSON `null` are no headers.
pub fn parse_headers(headers: Option<&serde_json::Value>) -> Result<Vec<(String, String)>, Refusal> {
    let invalid = |m: String| Refusal::Invalid(m);
    let Some(headers) = headers.filter(|h| !h.is_null()) else { return Ok(Vec::new()) };
    let object = headers.as_object().ok_or_else(|| {
        invalid(format!("headers must be a JSON object of names and string values, not {headers}"))
    })?;
    let mut parsed = Vec::new();
    for (name, value) in object {
        check_header_name(name).map_err(invalid)?;
        let values: Vec<&str> = match value {
            serde_json::Value::String(s) => vec![s.as_str()],
            serde_json::Value::Array(items) => {
                items.iter().map(serde_json::Value::as_str).collect::<Option<_>>().ok_or_else(|| {
                    invalid(format!("header \"{name}\": an array must hold strings only, not {value}"))
                })?
            }
            other => {
                return Err(invalid(format!(
                    "header \"{name}\" has the value {other}; a value is a string (or an array of strings)"
                )))
            }
        };
        for value in values {
            if value.contains(['\r', '\n']) {
                return Err(invalid(format!(
                    "header \"{name}\" has a line break in its value, which NATS cannot carry"
                )));
            }
            parsed.push((name.clone(), value.to_owned()));
        }
    }
    Ok(parsed)
}

fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > u16::MAX as usize {
        return Err(format!("header name \"{name}\" must be 1 to 65535 bytes long"));
    }
    if let Some(c) = name.chars().find(|&c| !c.is_ascii_graphic() || c == ':') {
        return Err(format!(
            "header name \"{name}\" contains {c:?}; a name is printable ASCII without spaces or ':'"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADER_NAMES.contains(&lower.as_str()) {
        return Err(format!(
            "header name \"{name}\" is reserved: NATS clients take a message with it for one of the server's"
        ));
    }
    if let Some(prefix) = RESERVED_HEADER_PREFIXES.iter().find(|p| lower.starts_with(*p)) {
        return Err(format!(
            "header name \"{name}\" is reserved: names starting with \"{prefix}\" (any case) are set by \
             wal_listener or steer JetStream"
        ));
    }
    Ok(())
}

/// The frame of one checked message, within `max_bytes` for its payload
/// and headers together, the worker's own included.
pub fn encode(
    subject: &str,
    headers: &[(String, String)],
    payload: &[u8],
    max_bytes: usize,
) -> Result<Vec<u8>, Refusal> {
    let header_bytes: usize = headers.iter().map(|(name, value)| name.len() + value.len() + 4).sum();
    let size = payload.len() + header_bytes + ADDED_HEADER_BYTES;
    if size > max_bytes {
        return Err(Refusal::TooLarge(format!(
            "the message is {size} bytes (payload {}, headers {header_bytes}, and {ADDED_HEADER_BYTES} for the \
             headers wal_listener adds); wal_listener.max_publish_bytes is {max_bytes}",
            payload.len()
        )));
    }
    // A value's u32 length needs no check: max_bytes (an i32 setting) bounds it.
    if headers.len() > u16::MAX as usize {
        return Err(Refusal::TooLarge(format!("{} headers; at most 65535 are allowed", headers.len())));
    }
    let mut frame = Vec::with_capacity(5 + subject.len() + header_bytes + headers.len() * 2 + payload.len());
    frame.push(VERSION);
    // validate_subject bounds a subject far below u16::MAX.
    frame.extend_from_slice(&(subject.len() as u16).to_be_bytes());
    frame.extend_from_slice(subject.as_bytes());
    frame.extend_from_slice(&(headers.len() as u16).to_be_bytes());
    for (name, value) in headers {
        frame.extend_from_slice(&(name.len() as u16).to_be_bytes());
        frame.extend_from_slice(name.as_bytes());
        frame.extend_from_slice(&(value.len() as u32).to_be_bytes());
        frame.extend_from_slice(value.as_bytes());
    }
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// One message as the worker publishes it.
#[derive(Debug, PartialEq, Eq)]
pub struct Published<'a> {
    pub subject: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub payload: &'a [u8],
}

/// Reads a frame written by [`encode`] (after its signature was verified).
pub fn decode(frame: &[u8]) -> Result<Published<'_>, String> {
    let mut r = FrameReader { rest: frame, len: frame.len() };
    let version = r.take(1)?[0];
    if version != VERSION {
        return Err(format!(
            "a publish() message of frame version {version}, which this build does not know"
        ));
    }
    let subject_len = r.u16()?;
    let subject = r.text(subject_len)?;
    let count = r.u16()?;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name_len = r.u16()?;
        let name = r.text(name_len)?;
        let value_len = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
        headers.push((name, r.text(value_len)?));
    }
    Ok(Published { subject, headers, payload: r.rest })
}

struct FrameReader<'a> {
    rest: &'a [u8],
    len: usize,
}

impl<'a> FrameReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!("a publish() message of {} bytes is cut short", self.len));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<usize, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }

    fn text(&mut self, n: usize) -> Result<&'a str, String> {
        std::str::from_utf8(self.take(n)?).map_err(|e| format!("a publish() message: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patterns(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_default_pattern_is_the_topic_and_everything_under_it() {
        assert_eq!(allowed_patterns("", "wl").unwrap(), patterns(&["wl.>"]));
        assert_eq!(allowed_patterns("  ", "wl").unwrap(), patterns(&["wl.>"]));
        assert_eq!(allowed_patterns("orders.>, audit.*", "wl").unwrap(), patterns(&["orders.>", "audit.*"]));
    }

    #[test]
    fn a_malformed_pattern_in_the_setting_is_named() {
        for bad in ["orders..x", "orders.>.x", "a,", "or*ders.x", "a b", "x.>y"] {
            let err = allowed_patterns(bad, "wl").unwrap_err();
            assert!(
                matches!(err, Refusal::Invalid(ref m) if m.contains("publish_subjects")),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn subjects_are_checked_for_syntax_then_against_the_patterns() {
        let allowed = patterns(&["wl.>", "audit.*"]);
        assert_eq!(check_subject("wl.orders.created", &allowed), Ok(()));
        assert_eq!(check_subject("audit.login", &allowed), Ok(()));
        assert!(matches!(check_subject("audit.login.failed", &allowed), Err(Refusal::NotAllowed(_))));
        assert!(matches!(check_subject("wl", &allowed), Err(Refusal::NotAllowed(_))));
        assert!(
            matches!(check_subject("other.x", &allowed), Err(Refusal::NotAllowed(m)) if m.contains("wl.>, audit.*"))
        );
        for bad in ["", "wl.*", "wl.>", "wl..x", "wl.a b", &format!("wl.{}", "x".repeat(300))] {
            assert!(matches!(check_subject(bad, &allowed), Err(Refusal::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn headers_are_strings_or_arrays_of_strings_and_never_reserved() {
        let parsed = parse_headers(Some(&json!({"Type": "order", "Tag": ["a", "b"]}))).unwrap();
        assert_eq!(
            parsed,
            vec![("Tag".into(), "a".into()), ("Tag".into(), "b".into()), ("Type".into(), "order".into())]
        );
        assert_eq!(parse_headers(None).unwrap(), vec![]);
        assert_eq!(parse_headers(Some(&json!(null))).unwrap(), vec![]);
        assert_eq!(parse_headers(Some(&json!({}))).unwrap(), vec![]);
        let invalid = |v: serde_json::Value| matches!(parse_headers(Some(&v)), Err(Refusal::Invalid(_)));
        assert!(invalid(json!(["a"])));
        assert!(invalid(json!("a")));
        assert!(invalid(json!({"n": 1})));
        assert!(invalid(json!({"n": null})));
        assert!(invalid(json!({"n": ["a", 1]})));
        assert!(invalid(json!({"a b": "x"})));
        assert!(invalid(json!({"a:b": "x"})));
        assert!(invalid(json!({"": "x"})));
        assert!(invalid(json!({"é": "x"})));
        assert!(invalid(json!({"n": "a\nb"})));
        assert!(invalid(json!({"n": "a\rb"})));
        for reserved in [
            "Nats-Msg-Id",
            "nats-expected-stream",
            "NATS-ROLLUP",
            "WL-Action",
            "wl-x",
            "Status",
            "description",
        ] {
            let err = parse_headers(Some(&json!({reserved: "x"}))).unwrap_err();
            assert!(err.to_string().contains("reserved"), "{reserved}");
        }
        assert_eq!(parse_headers(Some(&json!({"Natsy": "x", "Status-Text": "y"}))).unwrap().len(), 2);
    }

    #[test]
    fn a_frame_carries_subject_headers_and_payload_unchanged() {
        let headers = vec![("Type".to_string(), "order".to_string()), ("Tag".into(), "".into())];
        let payload = [0u8, 255, b'{', 0, b'\n'];
        let frame = encode("orders.created", &headers, &payload, 1024).unwrap();
        assert!(frame.len() < 1024);
        let published = decode(&frame).unwrap();
        assert_eq!(published.subject, "orders.created");
        assert_eq!(published.headers, vec![("Type", "order"), ("Tag", "")]);
        assert_eq!(published.payload, payload);
        let empty = encode("a", &[], b"", ADDED_HEADER_BYTES).unwrap();
        assert_eq!(decode(&empty).unwrap(), Published { subject: "a", headers: vec![], payload: b"" });
    }

    #[test]
    fn the_size_cap_counts_payload_and_headers() {
        // "abc: de\r\n" on the wire: 9 bytes.
        let headers = vec![("abc".to_string(), "de".to_string())];
        let cap = 100 + ADDED_HEADER_BYTES;
        assert!(encode("a", &headers, &[0; 91], cap).is_ok());
        let err = encode("a", &headers, &[0; 92], cap).unwrap_err();
        let size = format!("{} bytes", cap + 1);
        assert!(
            matches!(err, Refusal::TooLarge(ref m) if m.contains(&size) && m.contains("max_publish_bytes"))
        );
    }

    #[test]
    fn header_names_and_counts_fit_the_frame() {
        let name = |len| json!({ "x".repeat(len): "v" });
        assert!(parse_headers(Some(&name(65535))).is_ok());
        assert!(matches!(parse_headers(Some(&name(65536))), Err(Refusal::Invalid(_))));
        let many = |n| vec![("a".to_string(), String::new()); n];
        let frame = encode("a", &many(65535), b"", usize::MAX).unwrap();
        assert_eq!(decode(&frame).unwrap().headers.len(), 65535);
        assert!(
            matches!(encode("a", &many(65536), b"", usize::MAX), Err(Refusal::TooLarge(m)) if m.contains("65536 headers"))
        );
    }

    #[test]
    fn a_cut_or_unknown_frame_is_an_error_not_a_panic() {
        let frame = encode("orders.created", &[("A".into(), "b".into())], b"xyz", 1000).unwrap();
        // Each cut inside the subject and headers fails; past them it is a shorter payload.
        let payload_start = frame.len() - 3;
        for cut in 0..payload_start {
            assert!(decode(&frame[..cut]).is_err(), "cut at {cut}");
        }
        let mut other_version = frame.clone();
        other_version[0] = 2;
        assert!(decode(&other_version).unwrap_err().contains("version 2"));
        let mut not_utf8 = frame;
        not_utf8[3] = 0xff;
        assert!(decode(&not_utf8).is_err());
    }
}
