//! Publishing events to NATS JetStream: connect, make sure the stream
//! exists, publish with `Nats-Msg-Id` and hand back the PubAck future.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::Subject;
use bytes::Bytes;

use crate::config::PublishConfig;
use crate::status::{LogLevel, StatusBoard};
use crate::Error;

/// Resolves when JetStream has stored (or deduplicated) one message.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// How long to wait for a connection, and for one PubAck.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Publisher {
    js: jetstream::Context,
}

impl Publisher {
    /// Connects and ensures the stream `<topic>` exists (creating it when allowed).
    pub async fn connect(cfg: &PublishConfig, board: &Arc<StatusBoard>) -> Result<Self, Error> {
        let events_board = board.clone();
        let client = connect_options(cfg)
            .await?
            .connection_timeout(CONNECT_TIMEOUT)
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
        let js = jetstream::context::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .max_ack_inflight(cfg.max_in_flight.max(1))
            .backpressure_on_inflight(true)
            .build(client);
        ensure_stream(&js, cfg, board).await?;
        Ok(Publisher { js })
    }

    /// Sends one event; the returned future resolves with its PubAck.
    pub async fn publish(&self, subject: Subject, message_id: &str, payload: Bytes) -> Result<Sent, Error> {
        let message = jetstream::message::PublishMessage::build().payload(payload).message_id(message_id);
        match self.js.send_publish(subject.clone(), message).await {
            Ok(ack) => Ok(Sent::Pending(Box::pin(async move {
                ack.into_future().await.map(drop).map_err(|e| publish_error(&subject, e))
            }))),
            // Checked before sending: nothing went out.
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => Ok(Sent::TooLarge(e.to_string())),
            Err(e) => Err(publish_error(&subject, e)),
        }
    }
}

/// What became of one publish.
pub enum Sent {
    Pending(AckFuture),
    /// Larger than the server's `max_payload`; says by how much.
    TooLarge(String),
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

fn publish_error(subject: &str, e: jetstream::context::PublishError) -> Error {
    let hint = match e.kind() {
        PublishErrorKind::StreamNotFound => {
            "; no JetStream stream stores this subject: create one or set wal_listener.create_stream = on"
        }
        PublishErrorKind::TimedOut => "; no PubAck in time (NATS overloaded or JetStream unavailable)",
        _ => "",
    };
    Error::Nats(format!("publishing to {subject} failed: {e}{hint}"))
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
