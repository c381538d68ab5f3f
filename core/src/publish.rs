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
        let mut options = async_nats::ConnectOptions::new();
        if !cfg.auth.token.is_empty() {
            options = options.token(cfg.auth.token.clone());
        }
        if !cfg.auth.user.is_empty() {
            options = options.user_and_password(cfg.auth.user.clone(), cfg.auth.password.clone());
        }
        let client = options
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
            .map_err(|e| Error::Nats(format!("cannot connect to {}: {e}", cfg.nats_url)))?;
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
    pub async fn publish(
        &self,
        subject: Subject,
        message_id: &str,
        payload: Bytes,
    ) -> Result<AckFuture, Error> {
        let message = jetstream::message::PublishMessage::build().payload(payload).message_id(message_id);
        let ack =
            self.js.send_publish(subject.clone(), message).await.map_err(|e| publish_error(&subject, e))?;
        Ok(Box::pin(async move { ack.into_future().await.map(drop).map_err(|e| publish_error(&subject, e)) }))
    }
}

fn publish_error(subject: &str, e: jetstream::context::PublishError) -> Error {
    let hint = match e.kind() {
        PublishErrorKind::StreamNotFound => {
            "; no JetStream stream stores this subject: create one or set wal_listener.create_stream = on"
        }
        PublishErrorKind::TimedOut => "; no PubAck in time (NATS overloaded or JetStream unavailable)",
        PublishErrorKind::MaxPayloadExceeded => "; the event is larger than the server's max_payload",
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
