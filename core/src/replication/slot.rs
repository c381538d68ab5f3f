//! The logical replication slot: created when missing (never silently after
//! it was lost), its confirmed position once the worker holds it, and the
//! WAL it retains.

use crate::config::SourceConfig;
use crate::replication::connection::{column, quote_ident, quote_literal, Sql};
use crate::replication::{HEARTBEAT_PREFIX, STREAMED_SLOTS_TABLE};
use crate::{Error, Lsn};

/// How long [`drop_for_good`] waits for the walsender that held the slot to leave.
const SLOT_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Drops the slot once the walsender that streamed from it has let it go,
/// and with `publication` (after DROP EXTENSION) the publication too.
pub async fn drop_for_good(cfg: &SourceConfig, publication: bool) -> Result<(), Error> {
    let mut sql = Sql::side(cfg).await?;
    if publication {
        sql.execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&cfg.publication))).await?;
    }
    let slot = quote_literal(&cfg.slot);
    let started = std::time::Instant::now();
    loop {
        let active = sql
            .one_value(&format!(
                "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot}"
            ))
            .await?;
        match active.as_deref() {
            None => return Ok(()),
            Some("f") => {
                match sql.execute(&format!("SELECT pg_catalog.pg_drop_replication_slot({slot})")).await {
                    Ok(()) => return Ok(()),
                    // Taken again meanwhile (a walsender starting): look again.
                    Err(_) if started.elapsed() < SLOT_RELEASE_WAIT => {}
                    Err(e) => return Err(e),
                }
            }
            _ if started.elapsed() > SLOT_RELEASE_WAIT => {
                return Err(Error::Replication(format!(
                    "replication slot \"{}\" is still in use after {} s; drop it by hand",
                    cfg.slot,
                    SLOT_RELEASE_WAIT.as_secs()
                )))
            }
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The slot as [`ensure`] left it.
pub struct Ensured {
    pub created: bool,
}

/// Makes sure the slot exists, as a failover slot when `failover`.
/// `extension_installed`: the extension's record of streamed slots exists,
/// so a slot that was streamed from and is gone now is refused.
pub async fn ensure(
    sql: &mut Sql,
    cfg: &SourceConfig,
    extension_installed: bool,
    failover: bool,
    version_num: u32,
) -> Result<Ensured, Error> {
    let has_failover = version_num >= crate::audit::FAILOVER_SLOTS_VERSION;
    let query = format!(
        "SELECT plugin, database, wal_status, {} FROM pg_replication_slots WHERE slot_name = {}",
        if has_failover { "failover::text" } else { "'false'" },
        quote_literal(&cfg.slot)
    );
    let mut rows = sql.rows(&query).await?;
    let created = rows.is_empty();
    if created && extension_installed && streamed_before(sql, &cfg.slot).await? {
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
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing'{})",
            quote_ident(&cfg.slot),
            if failover { ", FAILOVER" } else { "" }
        ))
        .await?;
        rows = sql.rows(&query).await?;
    }
    let row =
        rows.into_iter().next().ok_or_else(|| Error::Setup(format!("slot \"{}\" vanished", cfg.slot)))?;
    let [plugin, database, wal_status, is_failover] = <[Option<String>; 4]>::try_from(row)
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
    if has_failover && (is_failover.as_deref() == Some("true")) != failover {
        // Possible while no walsender holds the slot, as before START_REPLICATION.
        sql.execute(&format!("ALTER_REPLICATION_SLOT {} (FAILOVER {failover})", quote_ident(&cfg.slot)))
            .await?;
    }
    if extension_installed {
        sql.execute(&format!(
            "INSERT INTO {STREAMED_SLOTS_TABLE} (slot_name) VALUES ({}) ON CONFLICT DO NOTHING",
            quote_literal(&cfg.slot)
        ))
        .await?;
    }
    Ok(Ensured { created })
}

/// `<named>_<oid of this database>` if that slot exists, or if this
/// database's record says it was streamed from, else `named`. A role that
/// may not read the record (not a superuser) is refused later, with the
/// reason, by the session's checks.
pub async fn own_or_named(sql: &mut Sql, named: &str) -> Result<String, Error> {
    let row = sql
        .rows(&format!(
            "SELECT own, EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = own)::text, \
                    coalesce(pg_catalog.has_table_privilege(pg_catalog.to_regclass({}), 'SELECT'), false)::text \
               FROM (SELECT {} || '_' || oid AS own FROM pg_catalog.pg_database \
                      WHERE datname = pg_catalog.current_database()) d",
            quote_literal(STREAMED_SLOTS_TABLE),
            quote_literal(named)
        ))
        .await?
        .into_iter()
        .next()
        .unwrap_or_default();
    let Some(own) = column(&row, 0) else { return Ok(named.to_owned()) };
    let exists = column(&row, 1).as_deref() == Some("true");
    let recorded = column(&row, 2).as_deref() == Some("true");
    if exists || (recorded && streamed_before(sql, &own).await?) {
        Ok(own)
    } else {
        Ok(named.to_owned())
    }
}

/// Whether the worker streamed from `slot` before (the extension's record).
async fn streamed_before(sql: &mut Sql, slot: &str) -> Result<bool, Error> {
    let query = format!("SELECT 1 FROM {STREAMED_SLOTS_TABLE} WHERE slot_name = {}", quote_literal(slot));
    Ok(sql.one_value(&query).await?.is_some())
}

/// The slot's `confirmed_flush_lsn`. Read once our walsender holds the
/// slot: before that, the walsender of an earlier session may still move it.
pub async fn confirmed_flush(sql: &mut Sql, slot: &str) -> Result<Lsn, Error> {
    let query = format!(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(slot)
    );
    sql.one_value(&query)
        .await?
        .ok_or_else(|| Error::Setup(format!("replication slot \"{slot}\" has no confirmed_flush_lsn")))?
        .parse::<Lsn>()
        .map_err(Error::Replication)
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

/// What [`check`] found.
pub struct Checked {
    /// The slot looked at (see `SourceConfig::take_over_database_slot`).
    pub slot: String,
    /// `None` while the slot does not exist.
    pub retention: Option<SlotRetention>,
    /// The primary's setup audit.
    pub audit: crate::replication::PrimaryAudit,
}

/// Reads the slot's WAL retention and the setup audit and, with
/// `heartbeat`, first writes a heartbeat message into the WAL so that the
/// slot has something of this database to move past. One short session.
pub async fn check(cfg: &SourceConfig, heartbeat: bool) -> Result<Checked, Error> {
    let mut sql = Sql::side(cfg).await?;
    let slot =
        if cfg.take_over_database_slot { own_or_named(&mut sql, &cfg.slot).await? } else { cfg.slot.clone() };
    let cfg = &SourceConfig { slot, ..cfg.clone() };
    let audit = crate::replication::primary_audit(&mut sql, cfg).await?;
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
    let retention = sql.rows(&query).await?.into_iter().next().map(|row| {
        let number = |i: usize| column(&row, i).and_then(|v| v.parse::<i64>().ok());
        SlotRetention {
            // NULL once the slot is invalidated: nothing retained any more.
            retained_bytes: number(0).unwrap_or(0).max(0) as u64,
            limit_bytes: number(1).filter(|&limit| limit >= 0).map(|limit| limit as u64),
        }
    });
    Ok(Checked { slot: cfg.slot.clone(), retention, audit })
}
