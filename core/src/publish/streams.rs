//! Which JetStream stream stores which subject: read at connect and after
//! each filter change, so that a PubAck can be checked against the stream
//! that must have sent it, and `status()` can say when a subject the worker
//! publishes to is stored by no stream (DESIGN.md section 3).

use std::sync::Arc;
use std::time::Duration;

/// A replay after a failure the worker recovers from by itself arrives
/// within the PubAck timeout (10 s) plus the longest backoff (30 s) plus a
/// reconnect: a shorter duplicate window lets replays through as duplicates.
pub const REPLAY_BOUND: Duration = Duration::from_secs(60);

/// What the audit looks at in one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: Arc<str>,
    pub subjects: Vec<String>,
    pub replicas: usize,
    pub duplicate_window: Duration,
    /// Takes atomic batches (`allow_atomic`, NATS 2.12+).
    pub allow_atomic: bool,
    /// `persist_mode: async`: PubAcks before the data is on disk.
    pub async_persist: bool,
}

impl StreamInfo {
    pub fn new(name: &str, subjects: Vec<String>, replicas: usize, duplicate_window: Duration) -> Self {
        StreamInfo {
            name: Arc::from(name),
            subjects,
            replicas,
            duplicate_window,
            allow_atomic: true,
            async_persist: false,
        }
    }
}

/// The streams of the account and the subjects each stores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamMap {
    streams: Vec<StreamInfo>,
}

impl StreamMap {
    pub fn new(streams: impl IntoIterator<Item = StreamInfo>) -> Self {
        StreamMap { streams: streams.into_iter().collect() }
    }

    fn info_for(&self, subject: &str) -> Option<&StreamInfo> {
        self.streams.iter().find(|info| info.subjects.iter().any(|p| subject_matches(p, subject)))
    }

    /// The stream that stores `subject`; JetStream refuses overlapping
    /// streams, so there is at most one.
    pub fn stream_for(&self, subject: &str) -> Option<Arc<str>> {
        self.info_for(subject).map(|info| info.name.clone())
    }

    /// Whether the stream named `stream` takes atomic batches.
    pub fn allows_atomic(&self, stream: &str) -> bool {
        self.streams.iter().any(|info| &*info.name == stream && info.allow_atomic)
    }

    /// A stream for `subjects` the worker must not publish to: one that acks
    /// before the data is on disk, which would break "never confirm what is
    /// not stored".
    pub fn refusal<'s>(&self, subjects: impl IntoIterator<Item = &'s str>) -> Option<String> {
        subjects.into_iter().filter_map(|subject| self.info_for(subject)).find(|info| info.async_persist).map(
            |info| {
                format!(
                "stream {} has persist_mode async: its PubAck comes before the data is on disk, so an event \
                 the worker confirms could be lost; set persist_mode to default (nats stream edit {})",
                info.name, info.name
            )
            },
        )
    }

    /// The setup audit of the streams for `subjects`, (subject, what
    /// publishes to it) pairs: a subject no stream stores, and a stream
    /// with fewer replicas than `wanted_replicas` or a duplicate window
    /// shorter than [`REPLAY_BOUND`].
    pub fn audit<'s>(
        &self,
        subjects: impl IntoIterator<Item = (&'s str, &'s str)>,
        wanted_replicas: usize,
        atomic_wanted: bool,
    ) -> Vec<String> {
        let mut findings = Vec::new();
        let mut streams: Vec<&StreamInfo> = Vec::new();
        for (subject, what) in subjects {
            match self.info_for(subject) {
                Some(info) if !streams.iter().any(|seen| seen.name == info.name) => streams.push(info),
                Some(_) => {}
                None => findings.push(format!(
                    "no JetStream stream stores subject {subject} ({what}): its events are held, and the \
                     worker backs off, until a stream with a matching subject exists"
                )),
            }
        }
        for info in streams {
            if info.replicas < wanted_replicas {
                findings.push(format!(
                    "stream {} has {} replica(s), fewer than wal_listener.stream_replicas = {wanted_replicas}: \
                     losing a NATS node may lose stored events; raise its replicas (nats stream edit {} \
                     --replicas {wanted_replicas})",
                    info.name, info.replicas, info.name
                ));
            }
            if atomic_wanted && !info.allow_atomic {
                findings.push(format!(
                    "stream {} does not allow atomic batches (allow_atomic, NATS 2.12+): with \
                     wal_listener.publish_mode = transaction every transaction goes out one event at a time; \
                     set allow_atomic on it",
                    info.name
                ));
            }
            if info.duplicate_window < REPLAY_BOUND {
                findings.push(format!(
                    "stream {} drops duplicates for {} s only; replays after a failure can come later (up to \
                     {} s, longer after an outage), so consumers may see events twice: raise its \
                     duplicate_window (see the README, \"Duplicate window\")",
                    info.name,
                    info.duplicate_window.as_secs(),
                    REPLAY_BOUND.as_secs()
                ));
            }
        }
        findings
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
    fn finds_the_stream_of_a_subject_and_audits_the_streams_in_use() {
        let two_minutes = Duration::from_secs(120);
        let map = StreamMap::new([
            StreamInfo::new("wal_listener", vec!["wal_listener.>".into()], 3, two_minutes),
            StreamInfo::new(
                "audit",
                vec!["audit.deletes".into(), "audit.updates".into()],
                1,
                Duration::from_secs(5),
            ),
            StreamInfo::new("unused", vec!["other.>".into()], 1, Duration::ZERO),
        ]);
        assert_eq!(map.stream_for("wal_listener.public_t").as_deref(), Some("wal_listener"));
        assert_eq!(map.stream_for("audit.deletes").as_deref(), Some("audit"));
        assert_eq!(map.stream_for("audit.inserts"), None);
        let probe = default_subject_probe("wal_listener", "");
        let subjects = [(probe.as_str(), "default"), ("audit.inserts", "public.t"), ("audit.updates", "x")];
        let findings = map.audit(subjects, 1, false);
        assert_eq!(findings.len(), 2, "{findings:?}");
        assert!(
            findings[0].starts_with("no JetStream stream stores subject audit.inserts (public.t)"),
            "{}",
            findings[0]
        );
        assert!(findings[1].starts_with("stream audit drops duplicates for 5 s only"), "{}", findings[1]);
        assert!(map.audit([(probe.as_str(), "default")], 3, true).is_empty());
        let findings = map.audit([("audit.updates", "x")], 3, false);
        assert!(findings[0]
            .starts_with("stream audit has 1 replica(s), fewer than wal_listener.stream_replicas = 3"));
    }
}
