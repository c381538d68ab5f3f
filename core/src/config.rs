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
    /// Make the slot a failover slot, synced to standbys (PostgreSQL 17+).
    pub failover_slot: bool,
    /// Stream the database's own slot `<slot>_<database oid>` instead of
    /// `slot` when it exists or was streamed from (the static worker: its
    /// database was captured by a worker of its own before it became
    /// `wal_listener.database`). Decided at each session start, so a slot
    /// synced to a standby after the worker started is the one streamed
    /// once it is promoted. See [`crate::replication::slot::own_or_named`].
    pub take_over_database_slot: bool,
    /// Stop at DROP EXTENSION's marker (the worker of a database other than
    /// `wal_listener.database`): publish everything before it, nothing after.
    pub stop_at_drop: bool,
}

/// Where the events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishConfig {
    /// Comma-separated NATS server URLs.
    pub nats_url: String,
    /// First subject token and JetStream stream name.
    pub topic: String,
    pub topic_prefix: String,
    /// The database's token between topic and table in default subjects,
    /// `<topic>.<database>.<topic_prefix><schema>_<table>`: set for every
    /// database but `wal_listener.database`, whose subjects stay as they were.
    pub subject_database: Option<String>,
    pub create_stream: bool,
    /// Cap on un-acked publishes.
    pub max_in_flight: usize,
    /// Cap on the payload bytes of un-acked publishes; the read-ahead of
    /// received changes is a quarter of it.
    pub max_in_flight_bytes: usize,
    /// Replicas of the stream the worker creates (3 on a NATS cluster).
    pub stream_replicas: usize,
    pub publish_mode: PublishMode,
    /// After each transaction's events, an END event on
    /// `<topic>.<topic_prefix>_transaction` with their counts.
    pub transaction_end_events: bool,
    pub auth: NatsAuth,
    pub tls: NatsTls,
    pub oversize_policy: OversizePolicy,
}

impl PublishConfig {
    /// What default and END subjects start with: the topic, then the
    /// database token when there is one. Still inside the stream's `<topic>.>`.
    pub fn subject_root(&self) -> String {
        crate::event::subject_root(&self.topic, self.subject_database.as_deref())
    }
}

/// How a transaction's events go to JetStream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PublishMode {
    /// One message at a time, pipelined.
    #[default]
    Event,
    /// Each transaction as one atomic batch (NATS 2.12+), so consumers
    /// never see part of one; larger ones fall back to `Event`.
    Transaction,
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
    #[cfg(feature = "fault-injection")]
    pub inject_fault: Option<crate::failpoints::InjectedFault>,
}

impl PipelineConfig {
    pub fn new(source: SourceConfig, publish: PublishConfig) -> Self {
        PipelineConfig {
            source,
            publish,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            #[cfg(feature = "fault-injection")]
            inject_fault: None,
        }
    }
}

/// The servers of `nats_url`, a comma-separated list (the NATS client
/// takes a list, not one string with commas).
pub fn server_urls(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
}

/// `nats_url` as it may be logged or shown: the password of
/// `user:password@` and a `token@` are replaced by `****`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let (scheme, rest) = match url.find("://") {
                Some(i) => url.split_at(i + 3),
                None => ("", url),
            };
            match rest.rfind('@') {
                Some(at) => {
                    let userinfo = &rest[..at];
                    let redacted = match userinfo.split_once(':') {
                        Some((user, _password)) => format!("{user}:****"),
                        None => "****".to_owned(),
                    };
                    format!("{scheme}{redacted}{}", &rest[at..])
                }
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Credentials written into `nats_url` (`user:password@` or `token@`), as
/// wal-listener's users are used to; the NATS client ignores them, so the
/// publisher passes them on. The first URL that has any decides.
#[derive(Debug, PartialEq, Eq)]
pub enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

pub fn url_credentials(urls: &str) -> Option<UrlCredentials> {
    urls.split(',').find_map(|url| {
        let rest = url.trim().split_once("://").map_or(url.trim(), |(_, rest)| rest);
        let userinfo = &rest[..rest.rfind('@')?];
        Some(match userinfo.split_once(':') {
            Some((user, password)) => UrlCredentials::UserPassword(user.to_owned(), password.to_owned()),
            None => UrlCredentials::Token(userinfo.to_owned()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets_only() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("nats://app:s3cret@nats:4222"), "nats://app:****@nats:4222");
        assert_eq!(redact_url("nats://t0ken@nats:4222"), "nats://****@nats:4222");
        assert_eq!(redact_url("tls://a:p@x:1, nats://y:2"), "tls://a:****@x:1, nats://y:2");
        assert_eq!(redact_url("a:b:c@host"), "a:****@host");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn several_seeds_are_a_list() {
        assert_eq!(
            server_urls("nats://a:1, nats://b:2,,nats://c:3 "),
            vec!["nats://a:1", "nats://b:2", "nats://c:3"]
        );
        assert_eq!(server_urls("nats://a:1"), vec!["nats://a:1"]);
    }

    #[test]
    fn urls_may_carry_credentials() {
        assert_eq!(url_credentials("nats://127.0.0.1:4222"), None);
        assert_eq!(
            url_credentials("nats://a:4222, nats://app:s3cret@b:4222"),
            Some(UrlCredentials::UserPassword("app".into(), "s3cret".into()))
        );
        assert_eq!(url_credentials("t0ken@host"), Some(UrlCredentials::Token("t0ken".into())));
    }

    #[test]
    fn a_config_prints_without_secrets() {
        let auth = NatsAuth {
            user: "app".into(),
            password: "s3cret".into(),
            token: "t0k3n".into(),
            ..Default::default()
        };
        let printed = format!("{auth:?}");
        assert!(
            printed.contains("app") && !printed.contains("s3cret") && !printed.contains("t0k3n"),
            "{printed}"
        );
    }
}
