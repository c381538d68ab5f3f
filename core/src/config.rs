//! What the pipeline needs to know, as plain values the host fills from GUCs.

use std::time::Duration;

/// Where the changes come from: the server's own replication slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Unix socket directory of the server (first of `unix_socket_directories`).
    pub socket_dir: String,
    pub port: u16,
    /// Role of the loopback replication connection.
    pub user: String,
    pub database: String,
    pub slot: String,
    pub publication: String,
    /// Wait until `CREATE EXTENSION wal_listener` has run in `database`.
    pub require_extension: bool,
}

/// Where the events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishConfig {
    /// Comma-separated NATS server URLs.
    pub nats_url: String,
    /// First subject token and JetStream stream name.
    pub topic: String,
    pub topic_prefix: String,
    pub create_stream: bool,
    /// Cap on un-acked publishes.
    pub max_in_flight: usize,
    pub auth: NatsAuth,
}

/// NATS credentials; empty strings mean "not set".
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    pub user: String,
    pub password: String,
    pub token: String,
}

/// Never prints secrets, so a config can be logged.
impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &str| if s.is_empty() { "" } else { "<set>" };
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &set(&self.password))
            .field("token", &set(&self.token))
            .finish()
    }
}

/// Everything the pipeline needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    pub source: SourceConfig,
    pub publish: PublishConfig,
    /// First delay after a failure; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl PipelineConfig {
    pub fn new(source: SourceConfig, publish: PublishConfig) -> Self {
        PipelineConfig {
            source,
            publish,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}
