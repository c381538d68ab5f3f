//! Streaming before `CREATE EXTENSION wal_listener`: the slot exists as soon
//! as the database does, so that a script running `CREATE EXTENSION;
//! CREATE TABLE t; INSERT INTO t` loses nothing. Until the extension's
//! transaction arrives, every change is confirmed unpublished, so the slot
//! pins no WAL while the extension is missing.

use std::collections::HashMap;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationEvent};

use crate::ack_tracker::AckTracker;
use crate::config::SourceConfig;
use crate::pgoutput::{self, Message};
use crate::replication::connection::Sql;
use crate::replication::{CREATED_MARKER_PREFIX, EXTENSION_SCHEMA};
use crate::status::{LogLevel, StatusBoard};
use crate::{Error, Lsn};

/// How often the end of a confirmed CREATE EXTENSION transaction is polled.
const VISIBLE_POLL: Duration = Duration::from_millis(20);

/// Confirms transactions until the one carrying the extension's marker
/// message; then returns `Ok`, and the next session publishes from there.
///
/// At the marker's commit the extension is not visible yet: the commit
/// record is decoded before the transaction ends, and with a synchronous
/// standby the transaction ends only once its standbys confirmed it, which
/// may include our own walsender (`synchronous_standby_names = '*'`). So:
/// - a marker transaction that wrote no row outside the extension's own
///   tables (nothing of it would be published) is confirmed at once, which
///   releases a commit waiting for us;
/// - then this session waits until the transaction is visible and looks at
///   `pg_extension`: there, the next session publishes (from before the
///   marker's transaction when it was not confirmed); not there, the marker
///   was written by someone else with `pg_logical_emit_message` (any role
///   may) or the extension was dropped since, and skipping goes on.
///
/// A marker transaction with rows of its own that waits for synchronous
/// replication from us cannot be confirmed before it is published nor seen
/// before it is confirmed: the session ends and the next one meets it
/// again (the supervisor paces that), until the standbys are named.
pub async fn skip_until_created(
    mut client: ReplicationClient,
    start_lsn: Lsn,
    source: &SourceConfig,
    board: &StatusBoard,
) -> Result<(), Error> {
    // Nothing is ever published here: the tracker only applies the rule
    // for keepalives inside and between transactions.
    let mut tracker = AckTracker::<()>::new(start_lsn);
    client.update_applied_lsn(start_lsn.into());
    let mut extension_relations: HashMap<u32, bool> = HashMap::new();
    let mut xid = 0u32;
    let mut created = false;
    let mut user_rows = false;
    loop {
        let event = match client.recv().await {
            Ok(Some(event)) => event,
            Ok(None) => return Err(Error::Replication("the server ended the replication stream".into())),
            Err(e) => return Err(Error::Replication(format!("replication stream broke: {e}"))),
        };
        let confirm = match event {
            ReplicationEvent::Begin { xid: begin_xid, .. } => {
                tracker.begin();
                xid = begin_xid;
                created = false;
                user_rows = false;
                None
            }
            ReplicationEvent::Message { transactional: true, prefix, .. }
                if prefix == CREATED_MARKER_PREFIX =>
            {
                created = true;
                None
            }
            ReplicationEvent::Commit { end_lsn, .. } if created => {
                let end = Lsn::from(end_lsn);
                if !user_rows {
                    client.update_applied_lsn(end_lsn);
                    board.set_confirmed_lsn(end);
                }
                match wait_until_visible(source, xid, !user_rows, board).await? {
                    Visible::No => return Ok(()),
                    Visible::Yes { extension: true } => return Ok(()),
                    Visible::Yes { extension: false } => {
                        board.log(
                            LogLevel::Warning,
                            format!(
                                "ignored a \"{CREATED_MARKER_PREFIX}\" message of transaction {xid} at {end}: \
                                 the extension does not exist (written with pg_logical_emit_message by a \
                                 role, or the extension was dropped since)"
                            ),
                        );
                        tracker.commit(end)
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => tracker.commit(end_lsn.into()),
            ReplicationEvent::KeepAlive { wal_end, .. } => tracker.keepalive(wal_end.into()),
            ReplicationEvent::StoppedAt { reached } => {
                return Err(Error::Replication(format!("replication stopped at {reached} unexpectedly")))
            }
            ReplicationEvent::XLogData { data, .. } => {
                user_rows |= writes_a_user_row(&data, &mut extension_relations)?;
                None
            }
            ReplicationEvent::Message { .. } => None,
        };
        if let Some(lsn) = confirm {
            client.update_applied_lsn(lsn.into());
            board.set_confirmed_lsn(lsn);
        }
    }
}

/// Whether a pgoutput message changes rows of a table outside the
/// extension's schema; remembers each relation's schema as described.
fn writes_a_user_row(data: &[u8], extension_relations: &mut HashMap<u32, bool>) -> Result<bool, Error> {
    let message = pgoutput::decode(data).map_err(|e| Error::Replication(format!("protocol: {e}")))?;
    // A relation never described is counted as a user's: confirming too
    // little is safe, confirming a change unpublished is not.
    let user = |id: &u32| !extension_relations.get(id).copied().unwrap_or(false);
    Ok(match message {
        Message::Relation(relation) => {
            extension_relations.insert(relation.id, relation.namespace == EXTENSION_SCHEMA);
            false
        }
        Message::Insert { relation_id, .. }
        | Message::Update { relation_id, .. }
        | Message::Delete { relation_id, .. } => user(&relation_id),
        Message::Truncate { relation_ids, .. } => relation_ids.iter().any(user),
        _ => false,
    })
}

/// Whether the marker's transaction became visible, and the extension with it.
enum Visible {
    Yes {
        extension: bool,
    },
    /// It waits for synchronous replication and we may not confirm it.
    No,
}

/// Waits until transaction `xid` (committed: its commit record was
/// decoded) is visible to a new snapshot, then reads `pg_extension`. Only
/// a synchronous-replication wait holds a committed transaction back; when
/// it is not `confirmed` and waits for that, its standby may be us:
/// [`Visible::No`]. Side-session errors are retried: leaving with a guess
/// would either lose the marker or skip the extension.
async fn wait_until_visible(
    source: &SourceConfig,
    xid: u32,
    confirmed: bool,
    board: &StatusBoard,
) -> Result<Visible, Error> {
    // The 64-bit xid from the 32 bits pgoutput sends: the epoch of the
    // snapshot's xmax, one less when the xid is above xmax's low bits.
    let query = format!(
        "WITH s AS (SELECT pg_current_snapshot() AS snap, \
                           pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS xmax) \
         SELECT pg_visible_in_snapshot( \
                    ((div(xmax, 4294967296) - (({xid} > mod(xmax, 4294967296))::int)) * 4294967296 + {xid}) \
                        ::text::xid8, snap)::text, \
                EXISTS (SELECT FROM pg_extension WHERE extname = 'wal_listener')::text, \
                EXISTS (SELECT FROM pg_stat_activity WHERE wait_event = 'SyncRep')::text \
           FROM s"
    );
    let started = std::time::Instant::now();
    let mut told = false;
    let mut sql = None;
    loop {
        if sql.is_none() {
            sql = Sql::side(source).await.ok();
        }
        if let Some(session) = sql.as_mut() {
            match session.rows(&query).await {
                Ok(rows) => {
                    let row = rows.into_iter().next().unwrap_or_default();
                    let yes = |i: usize| row.get(i).cloned().flatten().as_deref() == Some("true");
                    if yes(0) {
                        return Ok(Visible::Yes { extension: yes(1) });
                    }
                    if yes(2) && !confirmed {
                        return Ok(Visible::No);
                    }
                }
                Err(_) => sql = None,
            }
        }
        if !told && started.elapsed() > Duration::from_secs(5) {
            told = true;
            board.report_waiting(format!(
                "waiting for the CREATE EXTENSION transaction {xid} to end (it waits for synchronous \
                 replication to the standbys synchronous_standby_names names)"
            ));
        }
        tokio::time::sleep(if sql.is_some() { VISIBLE_POLL } else { Duration::from_secs(1) }).await;
    }
}
