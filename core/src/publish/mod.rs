//! Publishing events to NATS JetStream: connect, make sure the stream
//! exists, learn which stream stores which subject, publish with
//! `Nats-Msg-Id`, and collect the PubAcks.
//!
//! PubAcks come back on one wildcard subscription (`<inbox>.<sequence>`)
//! instead of async-nats' request/reply per message, which would cost a
//! oneshot channel, a multiplexer entry, a timer and a boxed future for
//! every event. [`crate::ack_tracker::AckTracker`] tracks what is unacked.

pub mod batch;
pub mod headers;
pub mod pub_ack;
pub mod streams;
pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, Subject, Subscriber};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use crate::config::{redact_url, server_urls, url_credentials, PublishConfig, UrlCredentials};
use crate::park_linger::PARK_LINGER;
use crate::status::{LogLevel, StatusBoard};
use crate::Error;
pub use pub_ack::Reply;
use streams::{StreamInfo, StreamMap};

/// How long to wait for a connection, and for one PubAck.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before the n-th seed of the first connect (none before the first).
const INITIAL_RETRY: Duration = Duration::from_millis(100);
/// A reconnect's delay: longer than any worker lives.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub struct Publisher {
    client: async_nats::Client,
    /// Set at the first disconnect: the session ends there (see `next_ack`).
    lost: Arc<tokio::sync::Notify>,
    js: jetstream::Context,
    /// PubAcks, on `<reply_prefix><sequence>`.
    acks: Subscriber,
    reply_prefix: String,
    streams: StreamMap,
}

/// Where a message goes in an atomic batch.
pub struct BatchPlace<'a> {
    pub id: &'a str,
    /// From 1.
    pub number: usize,
    /// On the last message: the publish sequence its PubAck answers.
    pub commit_sequence: Option<u64>,
}

/// What became of one publish.
pub enum Sent {
    /// On its way; its PubAck will carry the sequence given to `publish`.
    Published,
    /// Larger than the server's `max_payload`; says by how much. Nothing was sent.
    TooLarge(String),
}

impl Publisher {
    /// Connects, ensures the stream `<topic>` exists (creating it when
    /// allowed) and reads which stream stores which subject.
    pub async fn connect(cfg: &PublishConfig, board: &Arc<StatusBoard>) -> Result<Self, Error> {
        let events_board = board.clone();
        let lost = Arc::new(tokio::sync::Notify::new());
        let on_lost = lost.clone();
        let seeds = server_urls(&cfg.nats_url);
        let connected = Arc::new(AtomicBool::new(false));
        let once_connected = connected.clone();
        let client = connect_options(cfg)
            .await?
            .connection_timeout(CONNECT_TIMEOUT)
            // The session ends at a disconnect (publishes lost in the broken
            // connection go again from the slot, in order); a client that
            // reconnected would send what it still queues after the replay
            // of earlier events. So once connected it never reconnects: its
            // next attempt waits for ever. That client keeps its queue (at
            // most the events that were in flight) until the worker exits.
            .reconnect_delay_callback(move |attempt| {
                if once_connected.load(Ordering::Relaxed) {
                    NEVER
                } else {
                    INITIAL_RETRY * attempt.saturating_sub(1) as u32
                }
            })
            .max_reconnects(seeds.len().max(1))
            // Room for every PubAck in flight: a full buffer drops messages.
            .subscription_capacity(cfg.max_in_flight.max(1024))
            .name("wal_listener")
            .event_callback(move |event| {
                let (board, lost) = (events_board.clone(), on_lost.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => board.set_nats_connected(true),
                        async_nats::Event::Disconnected => {
                            board.set_nats_connected(false);
                            lost.notify_one();
                        }
                        _ => {}
                    }
                }
            })
            .connect(seeds)
            .await
            .map_err(|e| connect_error(cfg, e))?;
        connected.store(true, Ordering::Relaxed);
        board.set_nats_connected(true);
        let js = jetstream::context::ContextBuilder::new().timeout(ACK_TIMEOUT).build(client.clone());
        ensure_stream(&js, cfg, board).await?;
        let streams = list_streams(&js).await?;
        if let Some(refusal) =
            streams.refusal([streams::default_subject_probe(&cfg.subject_root(), &cfg.topic_prefix).as_str()])
        {
            return Err(Error::Nats(refusal));
        }
        let reply_prefix = format!("{}.", client.new_inbox());
        let acks = client
            .subscribe(format!("{reply_prefix}*"))
            .await
            .map_err(|e| Error::Nats(format!("subscribing to PubAcks: {e}")))?;
        Ok(Publisher { client, lost, js, acks, reply_prefix, streams })
    }

    /// Reads the streams again (after a filter change brought new subjects).
    pub async fn refresh_streams(&mut self) -> Result<(), Error> {
        let _no_linger = PARK_LINGER.hold(); // NATS round trips
        self.streams = list_streams(&self.js).await?;
        Ok(())
    }

    /// The stream that stores `subject`, as read at connect or the last refresh.
    pub fn stream_for(&self, subject: &str) -> Option<Arc<str>> {
        self.streams.stream_for(subject)
    }

    pub fn streams(&self) -> &StreamMap {
        &self.streams
    }

    /// Sends one event with `headers` (see [`headers`]) and `message_id`;
    /// its PubAck arrives through [`next_ack`](Self::next_ack) with
    /// `sequence`, which the caller chooses (one per publish).
    pub async fn publish(
        &self,
        subject: &Subject,
        message_id: &str,
        mut headers: HeaderMap,
        payload: Bytes,
        sequence: u64,
    ) -> Result<Sent, Error> {
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

    /// The NATS server's version and largest message.
    pub fn server(&self) -> (String, usize) {
        let info = self.client.server_info();
        (info.version, info.max_payload)
    }

    /// Sends message `place.number` (from 1) of atomic batch `place.id`;
    /// the last one commits it and carries the reply subject of its
    /// `commit_sequence`, where the batch's PubAck arrives (the others get no reply).
    pub async fn publish_in_batch(
        &self,
        subject: &Subject,
        message_id: &str,
        mut headers: HeaderMap,
        payload: Bytes,
        place: BatchPlace<'_>,
    ) -> Result<(), Error> {
        headers::add_batch(&mut headers, message_id, &place);
        let published = match place.commit_sequence {
            Some(sequence) => {
                let reply = Subject::from(format!("{}{sequence}", self.reply_prefix));
                self.client.publish_with_reply_and_headers(subject.clone(), reply, headers, payload).await
            }
            None => self.client.publish_with_headers(subject.clone(), headers, payload).await,
        };
        published.map_err(|e| Error::Nats(format!("publishing to {subject} failed: {e}")))
    }

    /// Sends what the client has buffered.
    pub async fn flush(&self) -> Result<(), Error> {
        self.client.flush().await.map_err(|e| Error::Nats(format!("flushing publishes: {e}")))
    }

    /// Waits for the next reply on the PubAck inbox: the sequence it
    /// answers and what it says. Cancellation-safe.
    pub async fn next_ack(&mut self) -> Result<(u64, Reply), Error> {
        let message = tokio::select! {
            biased;
            _ = self.lost.notified() => {
                return Err(Error::Nats(
                    "the connection to NATS broke; what it had not acked goes again from the slot".into(),
                ));
            }
            message = self.acks.next() => {
                message.ok_or_else(|| Error::Nats("PubAck subscription closed".into()))?
            }
        };
        let sequence = message
            .subject
            .strip_prefix(self.reply_prefix.as_str())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Nats(format!("PubAck on unexpected subject {}", message.subject)))?;
        Ok((sequence, pub_ack::parse(message.status, &message.payload)))
    }
}

/// Every stream of the account with the subjects it stores.
async fn list_streams(js: &jetstream::Context) -> Result<StreamMap, Error> {
    let infos: Vec<stream::Info> = js
        .streams()
        .try_collect()
        .await
        .map_err(|e| Error::Nats(format!("listing JetStream streams: {e}")))?;
    Ok(StreamMap::new(infos.into_iter().map(|info| {
        let config = info.config;
        let mut stream =
            StreamInfo::new(&config.name, config.subjects, config.num_replicas, config.duplicate_window);
        stream.allow_atomic = config.allow_atomic_publish;
        stream.async_persist = config.persist_mode == Some(stream::PersistenceMode::Async);
        stream
    })))
}

/// Authentication and TLS from the config; reads the key files now.
async fn connect_options(cfg: &PublishConfig) -> Result<async_nats::ConnectOptions, Error> {
    let (auth, tls) = (&cfg.auth, &cfg.tls);
    let mut options = async_nats::ConnectOptions::new();
    // Settings win over credentials in the URL.
    match url_credentials(&cfg.nats_url) {
        Some(UrlCredentials::UserPassword(user, password)) if auth.user.is_empty() => {
            options = options.user_and_password(user, password);
        }
        Some(UrlCredentials::Token(token)) if auth.token.is_empty() && auth.user.is_empty() => {
            options = options.token(token);
        }
        _ => {}
    }
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
        tls::check_ca_file(&tls.ca_file).map_err(Error::Nats)?;
        options = options.add_root_certificates(tls.ca_file.clone().into());
    }
    match (tls.cert_file.is_empty(), tls.key_file.is_empty()) {
        (true, true) => {}
        (false, false) => {
            tls::check_client_certificate(&tls.cert_file, &tls.key_file).map_err(Error::Nats)?;
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
    Error::Nats(format!("cannot connect to {}: {text}{hint}", redact_url(&cfg.nats_url)))
}

async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &PublishConfig,
    board: &StatusBoard,
) -> Result<(), Error> {
    let our_subjects = format!("{}.>", cfg.topic);
    match js.get_stream(&cfg.topic).await {
        Ok(_) => Ok(()),
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
                num_replicas: cfg.stream_replicas.max(1),
                duplicate_window: Duration::from_secs(120),
                // Atomic batches for publish_mode = transaction (ignored before NATS 2.12).
                allow_atomic_publish: true,
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
