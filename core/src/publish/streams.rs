//! Which JetStream stream stores which subject: read at connect and after
//! each filter change, so that a PubAck can be checked against the stream
//! that must have sent it, and `status()` can say when a subject the worker
//! publishes to is stored by no stream (DESIGN.md section 3).

use std::sync::Arc;

/// The streams of the account and the subjects each stores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamMap {
    streams: Vec<(Arc<str>, Vec<String>)>,
}

impl StreamMap {
    pub fn new(streams: impl IntoIterator<Item = (String, Vec<String>)>) -> Self {
        StreamMap {
            streams: streams.into_iter().map(|(name, subjects)| (Arc::from(name), subjects)).collect(),
        }
    }

    /// The stream that stores `subject`; JetStream refuses overlapping
    /// streams, so there is at most one.
    pub fn stream_for(&self, subject: &str) -> Option<Arc<str>> {
        self.streams
            .iter()
            .find(|(_, patterns)| patterns.iter().any(|p| subject_matches(p, subject)))
            .map(|(name, _)| name.clone())
    }

    pub fn subjects_of(&self, stream: &str) -> Option<&[String]> {
        self.streams.iter().find(|(name, _)| &**name == stream).map(|(_, subjects)| subjects.as_slice())
    }

    /// One line per subject that no stream stores. `subjects` are
    /// (subject, what publishes to it) pairs.
    pub fn uncovered<'s>(&self, subjects: impl IntoIterator<Item = (&'s str, &'s str)>) -> Vec<String> {
        subjects
            .into_iter()
            .filter(|(subject, _)| self.stream_for(subject).is_none())
            .map(|(subject, what)| {
                format!(
                    "no JetStream stream stores subject {subject} ({what}): its events are held, and the \
                     worker backs off, until a stream with a matching subject exists"
                )
            })
            .collect()
    }
}

/// Whether the NATS subject `pattern` (with `*` for one token and a final
/// `>` for one or more) matches the concrete `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for wanted in pattern.split('.') {
        match (wanted, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(token)) if literal == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// A subject standing for every default subject `<topic>.<topic_prefix><schema>_<table>`:
/// its last token is made up, so only a wildcard can match it.
pub fn default_subject_probe(topic: &str, topic_prefix: &str) -> String {
    format!("{topic}.{topic_prefix}any_table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        for (pattern, subject, matches) in [
            ("wal_listener.>", "wal_listener.public_t", true),
            ("wal_listener.>", "wal_listener.a.b", true),
            ("wal_listener.>", "wal_listener", false),
            ("wal_listener.*", "wal_listener.public_t", true),
            ("wal_listener.*", "wal_listener.a.b", false),
            ("*.public_t", "wal_listener.public_t", true),
            (">", "anything.at.all", true),
            ("wal_listener.public_t", "wal_listener.public_t", true),
            ("wal_listener.public_t", "wal_listener.public_u", false),
            ("orders.*.created", "orders.eu.created", true),
            ("orders.*.created", "orders.eu.deleted", false),
            ("a.b", "a", false),
        ] {
            assert_eq!(subject_matches(pattern, subject), matches, "{pattern} ~ {subject}");
        }
    }

    #[test]
    fn finds_the_stream_of_a_subject_and_lists_uncovered_ones() {
        let map = StreamMap::new([
            ("wal_listener".to_string(), vec!["wal_listener.>".to_string()]),
            ("audit".to_string(), vec!["audit.deletes".to_string(), "audit.updates".to_string()]),
        ]);
        assert_eq!(map.stream_for("wal_listener.public_t").as_deref(), Some("wal_listener"));
        assert_eq!(map.stream_for("audit.deletes").as_deref(), Some("audit"));
        assert_eq!(map.stream_for("audit.inserts"), None);
        let probe = default_subject_probe("wal_listener", "");
        let findings = map.uncovered([
            (probe.as_str(), "default"),
            ("audit.inserts", "public.t"),
            ("audit.updates", "x"),
        ]);
        assert_eq!(findings.len(), 1);
        assert!(
            findings[0].starts_with("no JetStream stream stores subject audit.inserts (public.t)"),
            "{}",
            findings[0]
        );
        assert_eq!(map.subjects_of("audit").map(<[String]>::len), Some(2));
    }
}
