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
    pub tls: NatsTls,
    pub oversize_policy: OversizePolicy,
}

/// What to do with an event larger than the NATS server's `max_payload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OversizePolicy {
    /// Stop before it and retry: nothing after it is published until an
    /// operator raises `max_payload` or chooses `Skip`.
    #[default]
    Error,
    /// Leave it out, log its table, key and LSN, and count it.
    Skip,
}

/// Faults the tests inject through `wal_listener.inject_fault`, to prove
/// that bad input and panics end in a restart from the slot, not a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// A Rust panic in the pipeline at the next row change.
    Panic,
    /// The next row change arrives with an unknown message tag.
    UnknownMessage,
    /// The next row change refers to a relation never described.
    UndescribedRelation,
}

/// NATS credentials; empty strings mean "not set". Files are read at
/// every connect, so a rotated file takes effect on the next reconnect.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    pub user: String,
    pub password: String,
    pub token: String,
    /// A `.creds` file: user JWT and NKey seed (decentralized auth).
    pub credentials_file: String,
    /// A file holding an NKey seed (`SU…`).
    pub nkey_seed_file: String,
}

/// TLS towards NATS; empty paths mean "not set".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM file of the CAs that sign the server's certificate.
    pub ca_file: String,
    /// PEM client certificate and key, for servers that verify clients.
    pub cert_file: String,
    pub key_file: String,
    /// Refuse to talk to a server that does not offer TLS.
    pub required: bool,
}

/// Never prints secrets, so a config can be logged.
impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &str| if s.is_empty() { "" } else { "<set>" };
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &set(&self.password))
            .field("token", &set(&self.token))
            .field("credentials_file", &self.credentials_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
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
    /// How often to write a heartbeat into the WAL while streaming; zero = never.
    pub heartbeat_interval: Duration,
    pub inject_fault: Option<InjectedFault>,
}

impl PipelineConfig {
    pub fn new(source: SourceConfig, publish: PublishConfig) -> Self {
        PipelineConfig {
            source,
            publish,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            inject_fault: None,
        }
    }
}
