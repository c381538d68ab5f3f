//! The extension's configuration as the worker reads and records it:
//! filter versions arrive in the change stream as messages written by the
//! config tables' triggers; where each took effect is recorded in
//! `applied_versions`; where capture starts is in `capture_start`.

use crate::config::SourceConfig;
use crate::filters::Filters;
use crate::replication::connection::{column_text, is_lock_timeout, quote_literal, Sql, LOCK_TIMEOUT};
use crate::replication::{APPLIED_VERSIONS_TABLE, CAPTURE_START_TABLE, CONFIG_TABLE, FILTER_RULES_TABLE};
use crate::{Error, Lsn};

/// A filter version in force: its number (0 before any) and its rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterVersion {
    pub version: i64,
    pub filters: Filters,
}

/// The version in force for a stream starting at `start_lsn`: the newest
/// one recorded at a commit the slot will not replay.
pub async fn in_force_at(sql: &mut Sql, start_lsn: Lsn) -> Result<FilterVersion, Error> {
    let query = format!(
        "SELECT version, rules::text FROM {APPLIED_VERSIONS_TABLE} WHERE commit_lsn < '{start_lsn}' \
          ORDER BY version DESC LIMIT 1"
    );
    let Some(row) = sql.rows(&query).await?.into_iter().next() else { return Ok(FilterVersion::default()) };
    let text = |i: usize| column_text(&row, i);
    let version =
        text(0).parse().map_err(|_| Error::Replication(format!("bad filters version {:?}", text(0))))?;
    let filters =
        Filters::from_json(&text(1)).map_err(|e| Error::Setup(format!("filters version {version}: {e}")))?;
    Ok(FilterVersion { version, filters })
}

/// Records that `version`, with `rules` (the JSON array its messages
/// carried), took effect at the commit at `commit_lsn`; a version written
/// in parts keeps its first part's position (a restart after it replays
/// the later parts, which add nothing new to the rules recorded). Called
/// before any LSN past that commit is confirmed. An insert, not an update of the
/// version's own row: that row is not visible yet while its commit waits
/// for a synchronous standby, which may be the worker's own walsender.
/// Returns a WAL position at or past the end of the inserting transaction.
pub async fn record(cfg: &SourceConfig, version: i64, commit_lsn: Lsn, rules: &str) -> Result<Lsn, Error> {
    let recorded = async {
        let mut sql = Sql::side(cfg).await?;
        sql.execute(&format!(
            "INSERT INTO {APPLIED_VERSIONS_TABLE} (version, commit_lsn, rules) \
             VALUES ({version}, '{commit_lsn}', {}::jsonb) \
             ON CONFLICT (version) DO UPDATE \
               SET commit_lsn = LEAST({APPLIED_VERSIONS_TABLE}.commit_lsn, EXCLUDED.commit_lsn), \
                   rules = EXCLUDED.rules",
            quote_literal(rules)
        ))
        .await?;
        let after = sql.one_value("SELECT pg_current_wal_insert_lsn()").await?.unwrap_or_default();
        after
            .parse::<Lsn>()
            .map_err(|e| Error::Replication(format!("pg_current_wal_insert_lsn() gave {after:?}: {e}")))
    };
    recorded.await.map_err(|e| {
        let cause = if is_lock_timeout(&e) {
            format!(
                "another session holds a lock on {APPLIED_VERSIONS_TABLE} that the worker could not get \
                 within lock_timeout ({LOCK_TIMEOUT}); find it in pg_locks and end it"
            )
        } else {
            e.to_string()
        };
        Error::Setup(format!(
            "cannot record where filters version {version} took effect ({commit_lsn}): {cause}; nothing past \
             it is confirmed until it is recorded"
        ))
    })
}

/// The key the extension's triggers sign config messages with (table
/// `wal_listener.message_key`, readable by its owner only). Asked when
/// the first config message of a session is decoded: the key was
/// committed with CREATE EXTENSION, normally long visible by then; a few
/// tries cover CREATE EXTENSION and add_filter in one transaction.
pub async fn message_key(cfg: &SourceConfig) -> Result<Vec<u8>, Error> {
    let mut sql = Sql::side(cfg).await?;
    for attempt in 0..20 {
        if let Some(hex) = sql.one_value("SELECT encode(key, 'hex') FROM wal_listener.message_key").await? {
            return (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16).ok())
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| {
                    Error::Setup("wal_listener.message_key holds no key; recreate the extension".into())
                });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100 * (attempt + 1))).await;
    }
    Err(Error::Setup("wal_listener.message_key is empty; recreate the extension".into()))
}

/// A new slot starts after every version written so far: the newest is in
/// force from its start, and positions of an earlier slot mean nothing.
pub async fn reset_for_new_slot(sql: &mut Sql) -> Result<(), Error> {
    sql.execute(&format!(
        "DELETE FROM {APPLIED_VERSIONS_TABLE}; \
         INSERT INTO {APPLIED_VERSIONS_TABLE} (version, commit_lsn, rules) \
         SELECT c.version, '0/0', \
                coalesce((SELECT jsonb_agg(jsonb_build_object('relid', r.tbl::oid::bigint, 'table', r.tbl::text, \
                                                              'actions', r.actions, 'subject', r.subject)) \
                            FROM {FILTER_RULES_TABLE} r WHERE r.version = c.version), '[]') \
           FROM {CONFIG_TABLE} c ORDER BY c.version DESC LIMIT 1"
    ))
    .await
}

/// The WAL position of CREATE EXTENSION: changes committed before it are
/// never published.
pub async fn capture_from(sql: &mut Sql) -> Result<Lsn, Error> {
    sql.one_value(&format!("SELECT lsn::text FROM {CAPTURE_START_TABLE}"))
        .await?
        .ok_or_else(|| Error::Setup(format!("{CAPTURE_START_TABLE} is empty; recreate the extension")))?
        .parse::<Lsn>()
        .map_err(Error::Replication)
}
