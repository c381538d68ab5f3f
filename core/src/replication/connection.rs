//! Loopback connections to the server's own socket, all replication
//! connections (`replication=database`): the one that streams, and short
//! side sessions for SQL while it streams. The wire protocol and
//! authentication are pgwire-replication's.

use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig};

use crate::config::SourceConfig;
use crate::park_linger::PARK_LINGER;
use crate::Error;

/// The settings that shape a value's text (DESIGN.md section 3): pinned in
/// every session, so events never depend on server defaults, and wherever
/// the server writes a value as text that the worker reads back.
pub const TEXT_SETTINGS: [(&str, &str); 7] = [
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
    ("standard_conforming_strings", "on"),
];

/// Besides those: UTF-8 on the wire; never waiting for a synchronous
/// standby (the worker's own walsender may be one, and would wait for
/// itself), nor long for a lock or a statement.
const SESSION_SETTINGS: [(&str, &str); 4] = [
    ("client_encoding", "UTF8"),
    ("synchronous_commit", "local"),
    ("lock_timeout", "5s"),
    ("statement_timeout", "30s"),
];
pub const LOCK_TIMEOUT: &str = "5 s";

/// The startup options of every session: `-c name=value` for each setting.
fn session_options() -> String {
    TEXT_SETTINGS
        .iter()
        .chain(&SESSION_SETTINGS)
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A query on a side session fails after this long even if the server
/// never answers (statement_timeout covers a server that does).
const QUERY_TIMEOUT: Duration = Duration::from_secs(40);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the flush LSN is sent while it changes, and the longest silence
/// between two status updates: both far inside the default 60 s `wal_sender_timeout`.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
const IDLE_WAKEUP_INTERVAL: Duration = Duration::from_secs(5);

/// Changes buffered by the replication client before the pipeline takes
/// them. Counted in messages, so kept small: the pipeline's own read-ahead
/// is the one bounded in bytes.
const RECEIVE_BUFFER_MESSAGES: usize = 16;

/// `application_name` of the streaming session, as `pg_stat_replication`
/// and `synchronous_standby_names` see it.
pub const STREAM_APPLICATION_NAME: &str = "wal_listener";
const SIDE_APPLICATION_NAME: &str = "wal_listener_side";

/// A gated replication session (authenticated, not streaming) that runs SQL.
pub struct Sql {
    client: ReplicationClient,
}

impl Sql {
    /// A short session for SQL beside the stream.
    pub async fn side(cfg: &SourceConfig) -> Result<Sql, Error> {
        Sql::connect(cfg, vec![cfg.publication.clone()], SIDE_APPLICATION_NAME).await
    }

    /// The session that will stream `publications` once started.
    pub async fn for_stream(cfg: &SourceConfig, publications: Vec<String>) -> Result<Sql, Error> {
        Sql::connect(cfg, publications, STREAM_APPLICATION_NAME).await
    }

    async fn connect(cfg: &SourceConfig, publications: Vec<String>, name: &str) -> Result<Sql, Error> {
        let _no_linger = PARK_LINGER.hold(); // round trips, as in every query below
        let repl_cfg = ReplicationConfig::unix(
            cfg.socket_dir.clone(),
            cfg.port,
            cfg.user.clone(),
            String::new(),
            cfg.database.clone(),
            cfg.slot.clone(),
            publications,
        )
        .with_options(session_options())
        .with_application_name(name)
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(IDLE_WAKEUP_INTERVAL)
        .with_buffer_size(RECEIVE_BUFFER_MESSAGES);
        let connect = ReplicationClient::connect_gated(repl_cfg);
        let mut client = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(connected) => connected.map_err(|e| connect_error(cfg, e))?,
            Err(_) => return Err(connect_error(cfg, PgWireError::Internal("timed out".into()))),
        };
        // The gate answers only once authentication is done: an error here is a connect error.
        match tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(Sql { client }),
            Ok(Err(e)) => Err(connect_error(cfg, e)),
            Err(_) => Err(connect_error(cfg, PgWireError::Internal("timed out".into()))),
        }
    }

    /// The client, to start streaming.
    pub fn into_client(self) -> ReplicationClient {
        self.client
    }

    pub async fn identify_system(&mut self) -> Result<u64, Error> {
        let _no_linger = PARK_LINGER.hold();
        let system = self
            .client
            .identify_system()
            .await
            .map_err(|e| Error::Replication(format!("IDENTIFY_SYSTEM failed: {e}")))?;
        system.system_id.parse::<u64>().map_err(|_| {
            Error::Replication(format!("IDENTIFY_SYSTEM returned a bad system id {:?}", system.system_id))
        })
    }

    pub async fn rows(&mut self, query: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
        let _no_linger = PARK_LINGER.hold();
        let rows = match tokio::time::timeout(QUERY_TIMEOUT, self.client.simple_query(query)).await {
            Ok(result) => result.map_err(|e| Error::Replication(format!("query {query:?} failed: {e}")))?,
            Err(_) => {
                return Err(Error::Replication(format!("query {query:?} got no answer in {QUERY_TIMEOUT:?}")))
            }
        };
        Ok(rows
            .into_iter()
            .map(|row| row.into_iter().map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned())).collect())
            .collect())
    }

    /// First column of the first row; `None` when there is no row or it is NULL.
    pub async fn one_value(&mut self, query: &str) -> Result<Option<String>, Error> {
        Ok(self.rows(query).await?.into_iter().next().and_then(|row| row.into_iter().next().flatten()))
    }

    pub async fn execute(&mut self, statement: &str) -> Result<(), Error> {
        let _no_linger = PARK_LINGER.hold();
        match tokio::time::timeout(QUERY_TIMEOUT, self.client.simple_query(statement)).await {
            Ok(result) => result.map(drop).map_err(|e| Error::Setup(format!("{statement:?} failed: {e}"))),
            Err(_) => Err(Error::Setup(format!("{statement:?} got no answer in {QUERY_TIMEOUT:?}"))),
        }
    }
}

/// Column `i` of a row that [`Sql::rows`] returned; `None` when NULL or absent.
pub fn column(row: &[Option<String>], i: usize) -> Option<String> {
    row.get(i).cloned().flatten()
}

/// Column `i` of a row that [`Sql::rows`] returned; `""` when NULL or absent.
pub fn column_text(row: &[Option<String>], i: usize) -> String {
    column(row, i).unwrap_or_default()
}

/// The SQLSTATE of a server error, as the replication client ends its
/// message ("... (SQLSTATE 55P03)"); `None` when the server sent
/// no error (the connection broke, a timeout, a protocol fault).
pub fn sqlstate(e: &Error) -> Option<String> {
    let text = e.to_string();
    let code = text.strip_suffix(')')?.rsplit_once("(SQLSTATE ")?.1;
    (code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| code.to_owned())
}

/// Whether `e` is a lock_timeout cancellation (SQLSTATE 55P03).
pub fn is_lock_timeout(e: &Error) -> bool {
    sqlstate(e).as_deref() == Some("55P03")
}

/// Whether connecting failed because the database does not exist (yet).
pub fn is_missing_database(e: &Error) -> bool {
    sqlstate(e).as_deref() == Some("3D000")
}

/// Whether a statement that failed with `e` may succeed when run again
/// unchanged: a serialization failure or deadlock, a shortage of memory,
/// disk or connections, a lost connection, a lock held past lock_timeout,
/// an object in use, a statement timeout or an administrator's cancel, an
/// I/O error. Every other server error (syntax, permissions, a missing
/// object, bad data, an error a function raises) fails again the same way.
pub fn is_transient(e: &Error) -> bool {
    sqlstate(e).is_some_and(|code| {
        matches!(&code[..2], "40" | "53" | "08")
            || matches!(code.as_str(), "55P03" | "55006" | "57014" | "57P01" | "57P02" | "57P03" | "58030")
    })
}

fn connect_error(cfg: &SourceConfig, e: PgWireError) -> Error {
    let socket = format!("{}/.s.PGSQL.{}", cfg.socket_dir, cfg.port);
    let hint = match &e {
        PgWireError::Auth(_) => format!(
            "; pg_hba.conf needs a line admitting the loopback connection, e.g. \
             \"local {} {} peer\" (or trust), or set wal_listener.role",
            cfg.database, cfg.user
        ),
        PgWireError::Server(msg) if msg.contains("pg_hba.conf") || msg.contains("authentication") => {
            format!(
                "; add a pg_hba.conf line such as \"local {} {} peer\" (or trust) and reload",
                cfg.database, cfg.user
            )
        }
        _ => String::new(),
    };
    Error::Replication(format!(
        "cannot open replication connection to {socket} as role \"{}\" in database \"{}\": {e}{hint}",
        cfg.user, cfg.database
    ))
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_ident("wal_listener"), "\"wal_listener\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn sqlstates_are_read_from_the_message_and_classified() {
        let server = |m: &str| Error::Replication(format!("query \"SELECT 1\" failed: {m}"));
        let lock = server("canceling statement due to lock timeout (SQLSTATE 55P03)");
        assert_eq!(sqlstate(&lock).as_deref(), Some("55P03"));
        assert!(is_lock_timeout(&lock) && is_transient(&lock) && !is_missing_database(&lock));
        let missing = server("database \"app\" does not exist (SQLSTATE 3D000)");
        assert!(is_missing_database(&missing) && !is_transient(&missing));
        for code in ["57014", "40001", "40P01", "53200", "58030", "08006"] {
            assert!(is_transient(&server(&format!("x (SQLSTATE {code})"))), "{code}");
        }
        for code in ["42501", "42P01", "22012", "P0001", "XX000", "0A000", "55000", "57P04", "58P01"] {
            assert!(!is_transient(&server(&format!("x (SQLSTATE {code})"))), "{code}");
        }
        // A clause may quote "SQLSTATE": only the server's own suffix counts.
        assert_eq!(sqlstate(&server("it says (SQLSTATE 55P03) in a literal")), None);
        assert_eq!(sqlstate(&Error::Replication("the connection broke".into())), None);
        assert!(!is_transient(&Error::Replication("query got no answer in 40s".into())));
    }

    #[test]
    fn sessions_never_wait_for_a_synchronous_standby_or_a_lock_for_long() {
        let options = session_options();
        for pinned in
            ["-c synchronous_commit=local", "-c lock_timeout=5s", "-c statement_timeout=", "-c lc_monetary=C"]
        {
            assert!(options.contains(pinned), "{pinned}");
        }
        assert!(options.contains(&format!("lock_timeout={}", LOCK_TIMEOUT.replace(' ', ""))));
        assert!(options.starts_with("-c DateStyle=ISO -c IntervalStyle=postgres"));
    }
}
