//! The loopback replication session: connect to the server's own socket,
//! make sure the publication and slot exist, and start pgoutput streaming.
//! The wire protocol and authentication are pgwire-replication's.

use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig};

use crate::config::SourceConfig;
use crate::event::TypeRow;
use crate::filters::Filters;
use crate::{Error, Lsn};

/// Pins every setting that shapes pgoutput's text values (DESIGN.md section 3).
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c TimeZone=UTC -c client_encoding=UTF8 -c bytea_output=hex";

/// How often the flush LSN is sent while it changes, and the longest silence
/// between two status updates: both far inside the default 60 s `wal_sender_timeout`.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
const IDLE_WAKEUP_INTERVAL: Duration = Duration::from_secs(5);

/// Schema of the extension (its control file fixes it); its tables are never published.
pub const EXTENSION_SCHEMA: &str = "wal_listener";
/// Where filter changes live (written by the SQL functions) and the
/// publication that streams them.
pub const CONFIG_TABLE_NAME: &str = "config_changes";
pub const CONFIG_TABLE: &str = "wal_listener.config_changes";
pub const CONFIG_PUBLICATION: &str = "wal_listener_config";
/// The slots the worker streamed from (see `reset_slot()` in api.sql).
const STREAMED_SLOTS_TABLE: &str = "wal_listener.streamed_slots";

/// Prefix of the heartbeat messages the worker writes with `pg_logical_emit_message`.
pub const HEARTBEAT_PREFIX: &str = "wal_listener.heartbeat";

/// Messages buffered between the socket reader and the pipeline; bounds memory.
const RECEIVE_BUFFER_MESSAGES: usize = 1024;

/// A checked replication session, ready to [`start`](Session::start).
pub struct Session {
    pub client: ReplicationClient,
    /// Filters in force at `start_lsn`; later changes arrive in the stream.
    pub filters: Filters,
    pub system_identifier: u64,
    /// The slot's `confirmed_flush_lsn` when streaming started.
    pub start_lsn: Lsn,
}

/// Why a session did not start.
pub enum OpenError {
    /// Nothing is wrong, but streaming cannot start yet.
    NotReady(String),
    Failed(Error),
}

impl From<Error> for OpenError {
    fn from(e: Error) -> Self {
        OpenError::Failed(e)
    }
}

/// Connects, checks the server and creates the publication and slot when missing.
pub async fn open(cfg: &SourceConfig) -> Result<Session, OpenError> {
    // The config table has a publication of its own, so that filter changes
    // reach the worker whatever the user's publication contains.
    let mut publications = vec![cfg.publication.clone()];
    if cfg.require_extension {
        publications.push(CONFIG_PUBLICATION.to_owned());
    }
    let mut client = connect_gated(cfg, publications).await?;
    let system = client.identify_system().await.map_err(|e| connect_error(cfg, e))?;
    let system_identifier = system.system_id.parse::<u64>().map_err(|_| {
        Error::Replication(format!("IDENTIFY_SYSTEM returned a bad system id {:?}", system.system_id))
    })?;

    let mut sql = Sql { client: &mut client };
    let wal_level = sql.one_value("SELECT current_setting('wal_level')").await?.unwrap_or_default();
    if wal_level != "logical" {
        return Err(Error::Setup(format!(
            "wal_level is {wal_level}; set wal_level = logical in postgresql.conf and restart the server"
        ))
        .into());
    }
    if cfg.require_extension {
        let installed =
            sql.one_value("SELECT extname FROM pg_extension WHERE extname = 'wal_listener'").await?;
        if installed.is_none() {
            return Err(OpenError::NotReady(format!(
                "waiting for CREATE EXTENSION wal_listener in database \"{}\"",
                cfg.database
            )));
        }
    }
    ensure_publication(&mut sql, &cfg.publication, "FOR ALL TABLES").await?;
    let mut filters = Filters::default();
    if cfg.require_extension {
        ensure_publication(&mut sql, CONFIG_PUBLICATION, &format!("FOR TABLE {CONFIG_TABLE}")).await?;
    }
    let (start_lsn, slot_created) = ensure_slot(&mut sql, cfg).await?;
    if cfg.require_extension {
        if slot_created {
            // Config committed before the slot existed is never streamed: it
            // is in force from the start.
            sql.execute(&format!("UPDATE {CONFIG_TABLE} SET commit_lsn = '0/0' WHERE commit_lsn IS NULL"))
                .await?;
        }
        filters = filters_in_force_at(&mut sql, start_lsn).await?;
    }
    Ok(Session { client, filters, system_identifier, start_lsn })
}

impl Session {
    /// Starts streaming from the slot's confirmed position.
    pub async fn start(&mut self) -> Result<(), Error> {
        let failed = |e| Error::Replication(format!("START_REPLICATION failed: {e}"));
        self.client.start().await.map_err(failed)?;
        self.client.wait_started().await.map_err(failed)
    }
}

/// Opens a gated session: authenticated, able to run SQL, not streaming yet.
async fn connect_gated(cfg: &SourceConfig, publications: Vec<String>) -> Result<ReplicationClient, Error> {
    let repl_cfg = ReplicationConfig::unix(
        cfg.socket_dir.clone(),
        cfg.port,
        cfg.user.clone(),
        String::new(),
        cfg.database.clone(),
        cfg.slot.clone(),
        publications,
    )
    .with_options(SESSION_OPTIONS)
    .with_application_name("wal_listener")
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(IDLE_WAKEUP_INTERVAL)
    .with_buffer_size(RECEIVE_BUFFER_MESSAGES);
    ReplicationClient::connect_gated(repl_cfg).await.map_err(|e| connect_error(cfg, e))
}

/// The newest filter set whose commit the slot will not replay.
async fn filters_in_force_at(sql: &mut Sql<'_>, start_lsn: Lsn) -> Result<Filters, Error> {
    let query = format!(
        "SELECT filters::text FROM {CONFIG_TABLE} WHERE commit_lsn < '{start_lsn}' ORDER BY version DESC LIMIT 1"
    );
    match sql.one_value(&query).await? {
        Some(json) => Filters::from_json(&json).map_err(Error::Setup),
        None => Ok(Filters::default()),
    }
}

/// Records where a config version was committed, on a short session of its
/// own (the streaming one cannot run SQL). Called before any LSN past that
/// commit is confirmed, so a restart knows which filters were in force.
pub async fn record_config_commit(cfg: &SourceConfig, version: i64, commit_lsn: Lsn) -> Result<(), Error> {
    let mut client = connect_gated(cfg, vec![cfg.publication.clone()]).await?;
    let mut sql = Sql { client: &mut client };
    sql.execute(&format!(
        "UPDATE {CONFIG_TABLE} SET commit_lsn = '{commit_lsn}' WHERE version = {version} AND commit_lsn IS NULL"
    ))
    .await
}

/// Reads what decides the JSON form of user-defined types: `oids` and every
/// type they refer to (domain bases, array elements).
pub async fn lookup_types(cfg: &SourceConfig, oids: &[u32]) -> Result<Vec<TypeRow>, Error> {
    let list = oids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let query = format!(
        "WITH RECURSIVE wanted(oid) AS ( \
             SELECT unnest('{{{list}}}'::oid[]) \
             UNION \
             SELECT r.ref FROM pg_type p JOIN wanted w ON p.oid = w.oid, \
                    LATERAL (VALUES (p.typelem), (p.typbasetype)) r(ref) WHERE r.ref <> 0) \
         SELECT p.oid, p.typtype, CASE WHEN p.typcategory = 'A' THEN p.typelem ELSE 0 END, \
                p.typdelim, p.typbasetype \
           FROM pg_type p JOIN wanted w ON p.oid = w.oid"
    );
    let mut client = connect_gated(cfg, vec![cfg.publication.clone()]).await?;
    let rows = Sql { client: &mut client }.rows(&query).await?;
    rows.into_iter()
        .map(|row| {
            let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            let number = |i: usize| text(i).parse::<u32>().ok();
            let byte = |i: usize| text(i).bytes().next();
            Some(TypeRow {
                oid: number(0)?,
                typtype: byte(1)?,
                array_element: number(2)?,
                typdelim: byte(3)?,
                domain_base: number(4)?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Replication("unexpected pg_type row shape".into()))
}

/// How much WAL the slot holds back, against `max_slot_wal_keep_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRetention {
    /// WAL from the slot's `restart_lsn` to the current position.
    pub retained_bytes: u64,
    /// `max_slot_wal_keep_size` in bytes; `None` when unlimited.
    pub limit_bytes: Option<u64>,
}

impl SlotRetention {
    /// Share of the limit in use, in percent; `None` when unlimited.
    pub fn percent_of_limit(&self) -> Option<f64> {
        self.limit_bytes.map(|limit| self.retained_bytes as f64 * 100.0 / limit.max(1) as f64)
    }
}

/// Reads the slot's WAL retention (`None` while the slot does not exist)
/// and, with `heartbeat`, first writes a heartbeat message into the WAL so
/// that the slot has something of this database to move past. One short
/// session for both.
pub async fn check_slot(cfg: &SourceConfig, heartbeat: bool) -> Result<Option<SlotRetention>, Error> {
    let mut client = connect_gated(cfg, vec![cfg.publication.clone()]).await?;
    let mut sql = Sql { client: &mut client };
    if heartbeat {
        sql.execute(&format!(
            "SELECT pg_logical_emit_message(false, {}, '')",
            quote_literal(HEARTBEAT_PREFIX)
        ))
        .await?;
    }
    let query = format!(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                pg_size_bytes(current_setting('max_slot_wal_keep_size')) \
           FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(&cfg.slot)
    );
    let Some(row) = sql.rows(&query).await?.into_iter().next() else {
        return Ok(None);
    };
    let number = |i: usize| row.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
    Ok(Some(SlotRetention {
        // NULL once the slot is invalidated: nothing retained any more.
        retained_bytes: number(0).unwrap_or(0).max(0) as u64,
        limit_bytes: number(1).filter(|&limit| limit >= 0).map(|limit| limit as u64),
    }))
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

/// Creates the publication with `what` (e.g. `FOR ALL TABLES`) when missing;
/// an existing one is left as its owner made it.
async fn ensure_publication(sql: &mut Sql<'_>, publication: &str, what: &str) -> Result<(), Error> {
    let query = format!("SELECT pubname FROM pg_publication WHERE pubname = {}", quote_literal(publication));
    if sql.one_value(&query).await?.is_none() {
        sql.execute(&format!("CREATE PUBLICATION {} {what}", quote_ident(publication))).await?;
    }
    Ok(())
}

/// Returns the slot's `confirmed_flush_lsn` and whether the slot was created now.
async fn ensure_slot(sql: &mut Sql<'_>, cfg: &SourceConfig) -> Result<(Lsn, bool), Error> {
    let query = format!(
        "SELECT plugin, database, confirmed_flush_lsn::text, wal_status \
         FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(&cfg.slot)
    );
    let mut rows = sql.rows(&query).await?;
    let created = rows.is_empty();
    if created && cfg.require_extension && streamed_before(sql, &cfg.slot).await? {
        return Err(Error::Setup(format!(
            "replication slot \"{}\" is gone: it was dropped after the worker streamed from it, so \
             changes committed since its last confirmed position may never reach NATS; the worker will \
             not create a new slot silently. To stream again from the current WAL position, run \
             SELECT wal_listener.reset_slot() (see the README, \"A lost slot\")",
            cfg.slot
        )));
    }
    if created {
        sql.execute(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing')",
            quote_ident(&cfg.slot)
        ))
        .await?;
        rows = sql.rows(&query).await?;
    }
    let row =
        rows.into_iter().next().ok_or_else(|| Error::Setup(format!("slot \"{}\" vanished", cfg.slot)))?;
    let [plugin, database, confirmed, wal_status] = <[Option<String>; 4]>::try_from(row)
        .map_err(|_| Error::Replication("unexpected pg_replication_slots row shape".into()))?;
    if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(cfg.database.as_str()) {
        return Err(Error::Setup(format!(
            "replication slot \"{}\" exists but is not a pgoutput slot of database \"{}\" \
             (plugin {plugin:?}, database {database:?}); drop it or set wal_listener.slot_name",
            cfg.slot, cfg.database
        )));
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(Error::Setup(format!(
            "replication slot \"{}\" was invalidated (wal_status = lost): the server removed WAL it \
             still needed, past max_slot_wal_keep_size, so changes were lost. To stream again from the \
             current WAL position, run SELECT wal_listener.reset_slot() (see the README, \"A lost slot\")",
            cfg.slot
        )));
    }
    if cfg.require_extension {
        sql.execute(&format!(
            "INSERT INTO {STREAMED_SLOTS_TABLE} (slot_name) VALUES ({}) ON CONFLICT DO NOTHING",
            quote_literal(&cfg.slot)
        ))
        .await?;
    }
    let confirmed = confirmed
        .ok_or_else(|| Error::Setup(format!("replication slot \"{}\" has no confirmed_flush_lsn", cfg.slot)))?
        .parse::<Lsn>()
        .map_err(Error::Replication)?;
    Ok((confirmed, created))
}

/// Whether the worker streamed from `slot` before (the extension's record).
async fn streamed_before(sql: &mut Sql<'_>, slot: &str) -> Result<bool, Error> {
    let query = format!("SELECT 1 FROM {STREAMED_SLOTS_TABLE} WHERE slot_name = {}", quote_literal(slot));
    Ok(sql.one_value(&query).await?.is_some())
}

/// SQL on the gated replication session (simple query protocol, text results).
struct Sql<'c> {
    client: &'c mut ReplicationClient,
}

impl Sql<'_> {
    async fn rows(&mut self, query: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
        let rows = self
            .client
            .simple_query(query)
            .await
            .map_err(|e| Error::Replication(format!("query {query:?} failed: {e}")))?;
        Ok(rows
            .into_iter()
            .map(|row| row.into_iter().map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned())).collect())
            .collect())
    }

    /// First column of the first row; `None` when there is no row or it is NULL.
    async fn one_value(&mut self, query: &str) -> Result<Option<String>, Error> {
        Ok(self.rows(query).await?.into_iter().next().and_then(|row| row.into_iter().next().flatten()))
    }

    async fn execute(&mut self, statement: &str) -> Result<(), Error> {
        self.client
            .simple_query(statement)
            .await
            .map(drop)
            .map_err(|e| Error::Setup(format!("{statement:?} failed: {e}")))
    }
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
    fn config_table_is_in_the_extension_schema() {
        assert_eq!(CONFIG_TABLE, format!("{EXTENSION_SCHEMA}.{CONFIG_TABLE_NAME}"));
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_ident("wal_listener"), "\"wal_listener\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
