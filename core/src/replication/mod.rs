//! The loopback side of the pipeline: check the server, make sure the
//! publication and slot exist, start pgoutput streaming, and the SQL the
//! worker runs beside the stream (slot, catalog, config store).

pub mod catalog;
pub mod config_store;
pub mod connection;
pub mod slot;

use pgwire_replication::ReplicationClient;

use crate::audit;
use crate::config::SourceConfig;
use crate::{Error, Lsn};
use config_store::FilterVersion;
use connection::{
    column, column_text, is_missing_database, quote_ident, quote_literal, Sql, STREAM_APPLICATION_NAME,
};

/// Schema of the extension (its control file fixes it); its tables are never published.
pub const EXTENSION_SCHEMA: &str = "wal_listener";
/// Filter versions (written by the SQL functions) and their rules.
pub const CONFIG_TABLE: &str = "wal_listener.config_changes";
pub const FILTER_RULES_TABLE: &str = "wal_listener.filter_rules";
/// Where each filter version took effect (written by the worker).
const APPLIED_VERSIONS_TABLE: &str = "wal_listener.applied_versions";
/// The slots the worker streamed from (see `reset_slot()` in api.sql).
const STREAMED_SLOTS_TABLE: &str = "wal_listener.streamed_slots";
/// Where capture starts: the WAL position of CREATE EXTENSION.
const CAPTURE_START_TABLE: &str = "wal_listener.capture_start";

/// Prefix of the heartbeat messages the worker writes with `pg_logical_emit_message`.
pub const HEARTBEAT_PREFIX: &str = "wal_listener.heartbeat";
/// Prefix of the transactional message the extension script writes: the
/// stream's mark of the CREATE EXTENSION transaction.
pub const CREATED_MARKER_PREFIX: &str = "wal_listener.created";
/// Prefix of the transactional message that DROP EXTENSION writes in a
/// database other than `wal_listener.database`: its worker publishes what
/// came before and nothing after, then stops for good.
pub const DROPPED_MARKER_PREFIX: &str = "wal_listener.dropped";
/// Prefix of the transactional messages that the config tables' triggers
/// write, one per new version and per rule (JSON): the stream's copy of a
/// filter change. A message reaches the worker whatever the user's
/// publication contains (pgoutput sends every message), also for the rows
/// a restored dump writes.
pub const CONFIG_MESSAGE_PREFIX: &str = "wal_listener.config";

/// A started replication session.
pub struct Session {
    pub client: ReplicationClient,
    /// The configuration with the slot this session streams.
    pub source: SourceConfig,
    pub system_identifier: u64,
    /// The slot's `confirmed_flush_lsn`, read once our walsender held the slot.
    pub start_lsn: Lsn,
    pub capture: Capture,
    /// Setup findings for `status().warnings` (see [`crate::audit`]).
    pub warnings: Vec<String>,
    /// Why the server holds back every change, if it does.
    pub held: Option<audit::Held>,
}

/// What the session does with the changes it receives.
pub enum Capture {
    /// The extension does not exist yet: publish nothing, confirm
    /// everything, until the CREATE EXTENSION transaction arrives (its
    /// marker message); then a new session publishes.
    BeforeExtension,
    /// Publish transactions committed at or after `from` (the WAL position
    /// of CREATE EXTENSION) with `filters` in force at the start.
    Publishing { from: Lsn, filters: FilterVersion },
}

/// Why a session did not start.
pub enum OpenError {
    /// Nothing is wrong, but streaming cannot start yet; `warnings` are the
    /// setup audit's findings meanwhile (e.g. on a standby).
    NotReady {
        reason: String,
        warnings: Vec<String>,
    },
    Failed(Error),
}

impl OpenError {
    fn not_ready(reason: String) -> Self {
        OpenError::NotReady { reason, warnings: Vec::new() }
    }
}

impl From<Error> for OpenError {
    fn from(e: Error) -> Self {
        OpenError::Failed(e)
    }
}

/// Checks the server, creates the publication and slot when missing and
/// starts streaming from the slot's confirmed position.
pub async fn open(cfg: &SourceConfig) -> Result<Session, OpenError> {
    let mut stream = connect_stream(cfg).await?;
    // The slot this session streams (see `SourceConfig::take_over_database_slot`).
    let mut cfg = cfg.clone();
    if cfg.take_over_database_slot {
        let slot = slot::own_or_named(&mut stream, &cfg.slot).await?;
        if slot != cfg.slot {
            // The stream session names its slot when it connects.
            drop(stream);
            cfg.slot = slot;
            stream = connect_stream(&cfg).await?;
        }
    }
    let cfg = &cfg;
    let prepared = prepare(&mut stream, cfg).await?;
    let installed = prepared.extension_installed || !cfg.require_extension;
    let mut client = stream.into_client();
    let failed = |e| Error::Replication(format!("START_REPLICATION failed: {e}"));
    client.start().await.map_err(failed)?;
    client.wait_started().await.map_err(failed)?;

    // Our walsender holds the slot now: its position moves only when we confirm.
    let mut sql = Sql::side(cfg).await?;
    let start_lsn = slot::confirmed_flush(&mut sql, &cfg.slot).await?;
    let capture = if !installed {
        Capture::BeforeExtension
    } else if cfg.require_extension {
        Capture::Publishing {
            from: config_store::capture_from(&mut sql).await?,
            filters: config_store::in_force_at(&mut sql, start_lsn).await?,
        }
    } else {
        Capture::Publishing { from: Lsn(0), filters: FilterVersion::default() }
    };
    Ok(Session {
        client,
        source: cfg.clone(),
        system_identifier: prepared.system_identifier,
        start_lsn,
        capture,
        warnings: prepared.warnings,
        held: prepared.held,
    })
}

async fn connect_stream(cfg: &SourceConfig) -> Result<Sql, OpenError> {
    match Sql::for_stream(cfg, vec![cfg.publication.clone()]).await {
        Err(e) if is_missing_database(&e) => Err(OpenError::not_ready(format!(
            "waiting for database \"{}\" (wal_listener.database) to be created",
            cfg.database
        ))),
        connected => Ok(connected?),
    }
}

/// What [`prepare`] found and made sure of.
struct Prepared {
    system_identifier: u64,
    extension_installed: bool,
    warnings: Vec<String>,
    held: Option<audit::Held>,
}

/// Checks the server and creates what is missing, on the session that then streams.
async fn prepare(sql: &mut Sql, cfg: &SourceConfig) -> Result<Prepared, OpenError> {
    let system_identifier = sql.identify_system().await?;
    let settings = sql
        .rows(
            "SELECT current_setting('wal_level'), pg_is_in_recovery()::text, \
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)::text, \
                    current_setting('synchronous_standby_names'), \
                    (SELECT extname FROM pg_extension WHERE extname = 'wal_listener'), \
                    current_setting('server_version_num')",
        )
        .await?;
    let row = settings.into_iter().next().unwrap_or_default();
    let text = |i: usize| column_text(&row, i);
    let version_num: u32 = text(5).parse().unwrap_or(0);
    if text(1) == "true" {
        return Err(OpenError::NotReady {
            reason: "server is a standby (in recovery): the worker waits, writes nothing, and streams from \
                     the synced slot once the server is promoted"
                .into(),
            warnings: standby_audit(sql, cfg, version_num).await?,
        });
    }
    if text(0) != "logical" {
        return Err(Error::Setup(format!(
            "wal_level is {}; set wal_level = logical in postgresql.conf and restart the server",
            text(0)
        ))
        .into());
    }
    if text(2) != "true" {
        return Err(Error::Setup(format!(
            "wal_listener.role \"{}\" is not a superuser; the worker needs one: it creates the publication \
             FOR ALL TABLES and its slot, writes heartbeats with pg_logical_emit_message and records its \
             progress in wal_listener's tables. Set wal_listener.role to a superuser with a local pg_hba.conf \
             line, or leave it empty for the bootstrap superuser",
            cfg.user
        ))
        .into());
    }
    let extension_installed = cfg.require_extension && column(&row, 4).is_some();

    // Before the slot: decoding a change older than the publication it is
    // asked for fails (PostgreSQL before 18).
    ensure_publication(sql, &cfg.publication, "FOR ALL TABLES").await?;
    let failover = cfg.failover_slot && version_num >= audit::FAILOVER_SLOTS_VERSION;
    let ensured = slot::ensure(sql, cfg, extension_installed, failover, version_num).await?;
    if ensured.created && extension_installed {
        config_store::reset_for_new_slot(sql).await?;
    }
    let PrimaryAudit { warnings, held } = primary_audit(sql, cfg).await?;
    Ok(Prepared { system_identifier, extension_installed, warnings, held })
}

/// The setup audit of a primary: settings that make commits wait for NATS
/// or a failover unsafe. Run at each session start and by the slot watch,
/// so that a setting changed later shows up within seconds.
pub async fn primary_audit(sql: &mut Sql, cfg: &SourceConfig) -> Result<PrimaryAudit, Error> {
    let rows = sql
        .rows(&format!(
            "SELECT current_setting('server_version_num'), current_setting('synchronous_standby_names'), \
                    coalesce(current_setting('synchronized_standby_slots', true), ''), \
                    EXISTS (SELECT FROM pg_replication_slots WHERE slot_type = 'physical')::text, \
                    (SELECT to_jsonb(s) ->> 'failover' FROM pg_replication_slots s WHERE slot_name = {})",
            quote_literal(&cfg.slot)
        ))
        .await?;
    let row = rows.into_iter().next().unwrap_or_default();
    let text = |i: usize| column_text(&row, i);
    let mut findings: Vec<String> =
        audit::sync_standby_warning(&text(1), STREAM_APPLICATION_NAME).into_iter().collect();
    let settings = audit::PrimarySettings {
        version_num: text(0).parse().unwrap_or(0),
        failover_wanted: cfg.failover_slot,
        slot_is_failover: text(4) == "true",
        synchronized_standby_slots: text(2),
        has_standbys: text(3) == "true",
    };
    findings.extend(audit::primary_findings(&settings, &cfg.slot));
    // The setting holds back failover slots only.
    let held = if settings.version_num >= audit::FAILOVER_SLOTS_VERSION
        && settings.slot_is_failover
        && !settings.synchronized_standby_slots.trim().is_empty()
    {
        let slots = sql
            .rows(
                "SELECT slot_name, slot_type, active::text, coalesce(wal_status, '') FROM pg_replication_slots",
            )
            .await?
            .into_iter()
            .map(|row| {
                let text = |i: usize| column_text(&row, i);
                audit::ServerSlot {
                    name: text(0),
                    physical: text(1) == "physical",
                    active: text(2) == "true",
                    lost: text(3) == "lost",
                }
            })
            .collect::<Vec<_>>();
        audit::held_by_standby_slots(&settings.synchronized_standby_slots, &slots)
    } else {
        None
    };
    findings.extend(held.as_ref().map(|h| h.reason.clone()));
    Ok(PrimaryAudit { warnings: findings, held })
}

/// What [`primary_audit`] found.
pub struct PrimaryAudit {
    /// For `status().warnings`.
    pub warnings: Vec<String>,
    /// Why the server sends no logical change at all, when it holds them
    /// back (see [`audit::held_by_standby_slots`]).
    pub held: Option<audit::Held>,
}

/// What makes a promotion of this standby unsafe for the worker.
async fn standby_audit(sql: &mut Sql, cfg: &SourceConfig, version_num: u32) -> Result<Vec<String>, Error> {
    let mut settings = audit::StandbySettings { version_num, ..Default::default() };
    if version_num >= audit::FAILOVER_SLOTS_VERSION {
        let rows = sql
            .rows(&format!(
                "SELECT current_setting('sync_replication_slots'), current_setting('hot_standby_feedback'), \
                        current_setting('primary_slot_name'), current_setting('primary_conninfo'), \
                        s.synced::text, s.temporary::text, s.invalidation_reason \
                   FROM (SELECT 1) one \
                   LEFT JOIN pg_replication_slots s ON s.slot_name = {}",
                quote_literal(&cfg.slot)
            ))
            .await?;
        let row = rows.into_iter().next().unwrap_or_default();
        let text = |i: usize| column(&row, i);
        settings.sync_replication_slots = text(0).as_deref() == Some("on");
        settings.hot_standby_feedback = text(1).as_deref() == Some("on");
        settings.primary_slot_name = text(2).unwrap_or_default();
        settings.primary_conninfo = text(3).unwrap_or_default();
        settings.slot = text(4).map(|synced| audit::SyncedSlot {
            synced: synced == "true",
            temporary: text(5).as_deref() == Some("true"),
            invalidation_reason: text(6),
        });
    }
    Ok(audit::standby_findings(&settings, &cfg.slot))
}

/// Creates the publication with `what` (e.g. `FOR ALL TABLES`) when missing;
/// an existing one is left as its owner made it.
async fn ensure_publication(sql: &mut Sql, publication: &str, what: &str) -> Result<(), Error> {
    let query = format!("SELECT pubname FROM pg_publication WHERE pubname = {}", quote_literal(publication));
    if sql.one_value(&query).await?.is_none() {
        sql.execute(&format!("CREATE PUBLICATION {} {what}", quote_ident(publication))).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_tables_and_messages_are_the_extension_s() {
        for name in [
            CONFIG_TABLE,
            FILTER_RULES_TABLE,
            APPLIED_VERSIONS_TABLE,
            STREAMED_SLOTS_TABLE,
            CAPTURE_START_TABLE,
        ] {
            assert!(name.starts_with(&format!("{EXTENSION_SCHEMA}.")), "{name}");
        }
        for prefix in [HEARTBEAT_PREFIX, CREATED_MARKER_PREFIX, DROPPED_MARKER_PREFIX, CONFIG_MESSAGE_PREFIX]
        {
            assert!(prefix.starts_with(&format!("{EXTENSION_SCHEMA}.")), "{prefix}");
        }
    }
}
