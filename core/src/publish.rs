//! Publishing events to NATS JetStream: connect, make sure the stream
//! exists, publish with `Nats-Msg-Id`, and collect the PubAcks.
//!
//! PubAcks come back on one wildcard subscription (`<inbox>.<sequence>`)
//! instead of async-nats' request/reply per message, which would cost a
//! oneshot channel, a multiplexer entry, a timer and a boxed future for
//! every event. [`InFlight`] tracks what is still unacked.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, StatusCode, Subject, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::PublishConfig;
use crate::status::{LogLevel, StatusBoard};
use crate::Error;

/// How long to wait for a connection, and for one PubAck.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Publisher {
    client: async_nats::Client,
    /// PubAcks, on `<reply_prefix><sequence>`.
    acks: Subscriber,
    reply_prefix: String,
}

/// What became of one publish.
pub enum Sent {
    /// On its way; its PubAck will carry the sequence given to `publish`.
    Published,
    /// Larger than the server's `max_payload`; says by how much. Nothing was sent.
    TooLarge(String),
}

impl Publisher {
    /// Connects and ensures the stream `<topic>` exists (creating it when allowed).
    pub async fn connect(cfg: &PublishConfig, board: &Arc<StatusBoard>) -> Result<Self, Error> {
        let events_board = board.clone();
        let client = connect_options(cfg)
            .await?
            .connection_timeout(CONNECT_TIMEOUT)
            // Room for every PubAck in flight: a full buffer drops messages.
            .subscription_capacity(cfg.max_in_flight.max(1024))
            .name("wal_listener")
            .event_callback(move |event| {
                let board = events_board.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => board.set_nats_connected(true),
                        async_nats::Event::Disconnected => board.set_nats_connected(false),
                        _ => {}
                    }
                }
            })
            .connect(cfg.nats_url.as_str())
            .await
            .map_err(|e| connect_error(cfg, e))?;
        board.set_nats_connected(true);
        let js = jetstream::context::ContextBuilder::new().timeout(ACK_TIMEOUT).build(client.clone());
        ensure_stream(&js, cfg, board).await?;
        let reply_prefix = format!("{}.", client.new_inbox());
        let acks = client
            .subscribe(format!("{reply_prefix}*"))
            .await
            .map_err(|e| Error::Nats(format!("subscribing to PubAcks: {e}")))?;
        Ok(Publisher { client, acks, reply_prefix })
    }

    /// Sends one event; its PubAck arrives through [`next_ack`](Self::next_ack)
    /// with `sequence`, which the caller chooses (one per publish).
    pub async fn publish(
        &self,
        subject: &Subject,
        message_id: &str,
        payload: Bytes,
        sequence: u64,
    ) -> Result<Sent, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
        let reply = Subject::from(format!("{}{sequence}", self.reply_prefix));
        match self.client.publish_with_reply_and_headers(subject.clone(), reply, headers, payload).await {
            Ok(()) => Ok(Sent::Published),
            Err(e) if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                Ok(Sent::TooLarge(e.to_string()))
            }
            Err(e) => Err(Error::Nats(format!("publishing to {subject} failed: {e}"))),
        }
    }

    /// Waits for the next PubAck: the sequence it answers, and whether
    /// JetStream stored the event (else why not). Cancellation-safe.
    pub async fn next_ack(&mut self) -> Result<(u64, Result<(), String>), Error> {
        let message =
            self.acks.next().await.ok_or_else(|| Error::Nats("PubAck subscription closed".into()))?;
        let sequence = message
            .subject
            .strip_prefix(self.reply_prefix.as_str())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Nats(format!("PubAck on unexpected subject {}", message.subject)))?;
        Ok((sequence, check_pub_ack(message.status, &message.payload)))
    }
}

/// Whether a PubAck says the message is stored (or was a duplicate). Only
/// a failure is parsed: a success is `{"stream":…,"seq":…}`.
fn check_pub_ack(status: Option<StatusCode>, payload: &[u8]) -> Result<(), String> {
    if status == Some(StatusCode::NO_RESPONDERS) {
        return Err("no JetStream stream stores its subject: create one or set \
                    wal_listener.create_stream = on"
            .into());
    }
    if let Some(status) = status.filter(|s| !s.is_success()) {
        return Err(format!("NATS status {status}"));
    }
    if !payload.windows(8).any(|w| w == b"\"error\":") {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(answer) => {
            let error = &answer["error"];
            Err(format!("JetStream error {}: {}", error["code"], error["description"].as_str().unwrap_or("")))
        }
        Err(_) => Err(format!("JetStream answered {:?}", String::from_utf8_lossy(payload))),
    }
}

/// Publishes awaiting their PubAck, by sequence; the oldest decides
/// whether the acks are late. Acks may arrive out of order (streams differ).
#[derive(Debug, Default)]
pub struct InFlight {
    /// Sequence of `pending[0]`; everything before it is acked.
    first: u64,
    /// Each publish: when it was sent, its subject, whether it is acked.
    pending: VecDeque<Pending>,
}

#[derive(Debug)]
struct Pending {
    sent: Instant,
    subject: Subject,
    acked: bool,
}

impl InFlight {
    /// Starts counting at `first`: the sequence of the next publish.
    pub fn new(first: u64) -> Self {
        InFlight { first, pending: VecDeque::new() }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The oldest sequence not acked yet: every publish before it is.
    pub fn next_unacked(&self) -> u64 {
        self.first
    }

    /// The sequence the next publish gets.
    pub fn next_sequence(&self) -> u64 {
        self.first + self.pending.len() as u64
    }

    pub fn sent(&mut self, subject: Subject, now: Instant) {
        self.pending.push_back(Pending { sent: now, subject, acked: false });
    }

    /// Subject of an unacked publish.
    pub fn subject(&self, sequence: u64) -> Option<&Subject> {
        let index = sequence.checked_sub(self.first)?;
        self.pending.get(usize::try_from(index).ok()?).map(|p| &p.subject)
    }

    /// Records the ack of `sequence`; returns how many publishes, counted
    /// from the oldest, are now acked without a gap (0 when this ack fills
    /// no gap at the front). Unknown and repeated sequences change nothing.
    pub fn acked(&mut self, sequence: u64) -> u64 {
        let Some(index) = sequence.checked_sub(self.first) else { return 0 };
        match self.pending.get_mut(index as usize) {
            Some(pending) => pending.acked = true,
            None => return 0,
        }
        let mut done = 0;
        while self.pending.front().is_some_and(|pending| pending.acked) {
            self.pending.pop_front();
            done += 1;
        }
        self.first += done;
        done
    }

    /// When the oldest unacked publish was sent, and its subject.
    pub fn oldest(&self) -> Option<(Instant, &Subject)> {
        self.pending.front().map(|pending| (pending.sent, &pending.subject))
    }
}

/// Authentication and TLS from the config; reads the key files now.
async fn connect_options(cfg: &PublishConfig) -> Result<async_nats::ConnectOptions, Error> {
    let (auth, tls) = (&cfg.auth, &cfg.tls);
    let mut options = async_nats::ConnectOptions::new();
    if !auth.token.is_empty() {
        options = options.token(auth.token.clone());
    }
    if !auth.user.is_empty() {
        options = options.user_and_password(auth.user.clone(), auth.password.clone());
    }
    if !auth.credentials_file.is_empty() {
        options = options
            .credentials_file(&auth.credentials_file)
            .await
            .map_err(|e| file_error("nats_credentials_file", &auth.credentials_file, e))?;
    }
    if !auth.nkey_seed_file.is_empty() {
        let seed = std::fs::read_to_string(&auth.nkey_seed_file)
            .map_err(|e| file_error("nats_nkey_seed_file", &auth.nkey_seed_file, e))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if !tls.ca_file.is_empty() {
        options = options.add_root_certificates(tls.ca_file.clone().into());
    }
    match (tls.cert_file.is_empty(), tls.key_file.is_empty()) {
        (true, true) => {}
        (false, false) => {
            options =
                options.add_client_certificate(tls.cert_file.clone().into(), tls.key_file.clone().into())
        }
        _ => {
            return Err(Error::Nats(
                "wal_listener.nats_tls_cert_file and nats_tls_key_file must be set together".into(),
            ))
        }
    }
    Ok(options.require_tls(tls.required))
}

fn file_error(setting: &str, path: &str, e: std::io::Error) -> Error {
    Error::Nats(format!("cannot read wal_listener.{setting} {path:?} (as the server's OS user): {e}"))
}

/// Names the setting to look at for the usual causes.
fn connect_error(cfg: &PublishConfig, e: async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind;
    let text = e.to_string();
    let hint = match e.kind() {
        // The server ended the TLS handshake: it wants a client certificate it trusts.
        _ if text.contains("received fatal alert") => {
            "; the server refused the TLS handshake: it does not trust our client certificate \
             (wal_listener.nats_tls_cert_file, nats_tls_key_file) or requires one"
        }
        ConnectErrorKind::AuthorizationViolation => {
            "; the server refused our credentials: check wal_listener.nats_user/nats_password, \
             nats_token, nats_credentials_file or nats_nkey_seed_file"
        }
        _ if e.kind() == ConnectErrorKind::Tls || text.contains("certificate") => {
            "; TLS failed: check wal_listener.nats_tls_ca_file (the CA of the server's certificate), \
             nats_tls_cert_file/nats_tls_key_file (a client certificate the server trusts) and the URL's host name"
        }
        ConnectErrorKind::TimedOut | ConnectErrorKind::Io => "; is nats-server running and reachable?",
        _ => "",
    };
    Error::Nats(format!("cannot connect to {}: {text}{hint}", cfg.nats_url))
}

async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &PublishConfig,
    board: &StatusBoard,
) -> Result<(), Error> {
    let our_subjects = format!("{}.>", cfg.topic);
    match js.get_stream(&cfg.topic).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| Error::Nats(format!("reading stream {}: {e}", cfg.topic)))?;
            let subjects = &info.config.subjects;
            if !subjects.iter().any(|s| s == &our_subjects || s == ">") {
                board.log(
                    LogLevel::Warning,
                    format!(
                        "stream {} has subjects {subjects:?}, which may not cover {our_subjects}; \
                         events on uncovered subjects will fail to publish",
                        cfg.topic
                    ),
                );
            }
            Ok(())
        }
        Err(e) if is_stream_not_found(&e) => {
            if !cfg.create_stream {
                return Err(Error::Nats(format!(
                    "stream {} does not exist and wal_listener.create_stream is off: create it with subjects {our_subjects}",
                    cfg.topic
                )));
            }
            js.create_stream(stream::Config {
                name: cfg.topic.clone(),
                subjects: vec![our_subjects],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Nats(format!("creating stream {}: {e}", cfg.topic)))?;
            board.log(LogLevel::Info, format!("created JetStream stream {}", cfg.topic));
            Ok(())
        }
        Err(e) => Err(Error::Nats(format!("looking up stream {}: {e}", cfg.topic))),
    }
}

fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_acks_without_gaps_from_the_oldest() {
        let now = Instant::now();
        let mut in_flight = InFlight::new(10);
        for table in ["a", "b", "c", "d"] {
            in_flight.sent(Subject::from(format!("wal_listener.public_{table}")), now);
        }
        assert_eq!(in_flight.subject(11).map(|s| s.as_str()), Some("wal_listener.public_b"));
        assert_eq!(in_flight.next_sequence(), 14);
        assert_eq!(in_flight.acked(11), 0, "10 is still missing");
        assert_eq!(in_flight.acked(11), 0, "repeats change nothing");
        assert_eq!(in_flight.acked(10), 2);
        assert_eq!(in_flight.acked(9), 0, "already counted");
        assert_eq!(in_flight.acked(99), 0, "never sent");
        assert_eq!((in_flight.len(), in_flight.next_sequence()), (2, 14));
        assert_eq!(in_flight.acked(13), 0);
        assert_eq!(in_flight.acked(12), 2);
        assert!(in_flight.is_empty() && in_flight.oldest().is_none());
    }

    #[test]
    fn pub_acks_succeed_unless_they_carry_an_error() {
        assert_eq!(check_pub_ack(None, br#"{"stream":"wal_listener","seq":7}"#), Ok(()));
        assert_eq!(check_pub_ack(None, br#"{"stream":"wal_listener","seq":7,"duplicate":true}"#), Ok(()));
        let failure = br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
        assert_eq!(
            check_pub_ack(None, failure),
            Err("JetStream error 503: maximum messages exceeded".into())
        );
        let no_stream = check_pub_ack(Some(StatusCode::NO_RESPONDERS), b"").unwrap_err();
        assert!(no_stream.contains("no JetStream stream"), "{no_stream}");
    }
}
