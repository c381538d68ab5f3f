//! Streaming before `CREATE EXTENSION wal_listener`: the slot exists as soon
//! as the database does, so that a script running `CREATE EXTENSION;
//! CREATE TABLE t; INSERT INTO t` loses nothing. Until the extension's
//! transaction arrives, every change is confirmed unpublished, so the slot
//! pins no WAL while the extension is missing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgwire_replication::{ReplicationClient, ReplicationEvent};

use crate::ack_tracker::AckTracker;
use crate::config::SourceConfig;
use crate::park_linger::PARK_LINGER;
use crate::pgoutput::{self, Message};
use crate::replication::connection::Sql;
use crate::replication::{CONFIG_MESSAGE_PREFIX, CREATED_MARKER_PREFIX, EXTENSION_SCHEMA};
use crate::status::{LogLevel, StatusBoard};
use crate::{Error, Lsn};

/// The first and the longest pause between two looks at a marker's
/// transaction that has not ended yet.
const END_POLL_FIRST: Duration = Duration::from_millis(10);
const END_POLL_MAX: Duration = Duration::from_secs(1);

/// Confirms transactions until the one carrying the extension's marker
/// message; then returns `Ok` without confirming it, so that the next
/// session starts at or before that transaction and publishes it.
///
/// The marker's commit record is decoded before its transaction ends, and
/// any role may write a message with the marker's prefix
/// (`pg_logical_emit_message` is PUBLIC). So at the marker's commit this
/// session waits until the transaction has ended (it is then visible) and
/// looks at `pg_extension`: there, it returns; not there, the marker was
/// forged or the extension dropped since, and skipping goes on.
///
/// A transaction waiting for synchronous replication may wait for us: the
/// CREATE EXTENSION hook commits the extension's own transaction with
/// `synchronous_commit = local` when `synchronous_standby_names` names our
/// walsender, so that only a forged marker (or a transaction that set
/// `synchronous_commit` again after CREATE EXTENSION) waits here. Such a
/// transaction is confirmed at once when nothing of it would be published
/// (no user row, no filter change); that releases its commit.
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
    let mut publishes_something = false;
    loop {
        let event = match client.recv().await {
            Ok(Some(event)) => {
                PARK_LINGER.took_event(&event);
                event
            }
            Ok(None) => return Err(Error::Replication("the server ended the replication stream".into())),
            Err(e) => return Err(Error::Replication(format!("replication stream broke: {e}"))),
        };
        let confirm = match event {
            ReplicationEvent::Begin { xid: begin_xid, .. } => {
                tracker.begin();
                xid = begin_xid;
                created = false;
                publishes_something = false;
                None
            }
            ReplicationEvent::Message { transactional: true, prefix, .. }
                if prefix == CREATED_MARKER_PREFIX =>
            {
                created = true;
                None
            }
            ReplicationEvent::Message { transactional: true, prefix, .. }
                if prefix == CONFIG_MESSAGE_PREFIX =>
            {
                publishes_something = true;
                None
            }
            ReplicationEvent::Commit { end_lsn, .. } if created => {
                let end = Lsn::from(end_lsn);
                // What would be published must not be confirmed first.
                let mut released = publishes_something;
                wait_for_end(source, xid, board, || {
                    if !released {
                        released = true;
                        client.update_applied_lsn(end_lsn);
                        board.set_confirmed_lsn(end);
                    }
                })
                .await;
                if extension_exists(source).await {
                    return Ok(());
                }
                board.log(
                    LogLevel::Warning,
                    format!(
                        "ignored a \"{CREATED_MARKER_PREFIX}\" message of transaction {xid} at {end}: the \
                         extension does not exist (written with pg_logical_emit_message by a role, or the \
                         extension was dropped since)"
                    ),
                );
                tracker.commit(end)
            }
            ReplicationEvent::Commit { end_lsn, .. } => tracker.commit(end_lsn.into()),
            ReplicationEvent::KeepAlive { wal_end, .. } => tracker.keepalive(wal_end.into()),
            ReplicationEvent::StoppedAt { reached } => {
                return Err(Error::Replication(format!("replication stopped at {reached} unexpectedly")))
            }
            ReplicationEvent::XLogData { data, .. } => {
                publishes_something |= writes_a_user_row(&data, &mut extension_relations)?;
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

/// Waits until transaction `xid`, whose commit record was decoded, has
/// ended: no backend holds it and it is not a prepared transaction. It is
/// then visible to every new snapshot. While it waits for synchronous
/// replication (or COMMIT PREPARED), `release` is called at each look. Errors
/// of the side session are retried: leaving with a guess would either lose
/// the marker or skip the extension.
async fn wait_for_end(source: &SourceConfig, xid: u32, board: &StatusBoard, mut release: impl FnMut()) {
    // The 32-bit xid compares with the 32-bit columns: no epoch to guess.
    let query = format!(
        "SELECT coalesce((SELECT coalesce(wait_event, 'running') FROM pg_stat_activity \
                           WHERE backend_xid = '{xid}'::xid LIMIT 1), \
                         (SELECT 'prepared' FROM pg_prepared_xacts WHERE transaction = '{xid}'::xid LIMIT 1))"
    );
    let started = Instant::now();
    let mut pause = END_POLL_FIRST;
    let mut told = false;
    let mut sql = None;
    loop {
        if sql.is_none() {
            sql = Sql::side(source).await.ok();
        }
        if let Some(session) = sql.as_mut() {
            match session.one_value(&query).await {
                Ok(state) => match state {
                    None => return,
                    // A prepared transaction whose commit was decoded is in
                    // COMMIT PREPARED, which may wait for synchronous replication.
                    Some(state) if state == "SyncRep" || state == "prepared" => release(),
                    Some(_) => {}
                },
                Err(_) => sql = None,
            }
        }
        if !told && started.elapsed() > Duration::from_secs(5) {
            told = true;
            board.report_waiting(format!(
                "waiting for the end of transaction {xid}, which wrote the \"{CREATED_MARKER_PREFIX}\" marker \
                 of CREATE EXTENSION (pg_stat_activity.backend_xid). When it waits for synchronous replication \
                 (wait_event SyncRep) and synchronous_standby_names names the worker, nothing of the cluster \
                 commits meanwhile: end that transaction (pg_cancel_backend) or name your standbys"
            ));
        }
        tokio::time::sleep(if sql.is_some() { pause } else { END_POLL_MAX }).await;
        pause = (pause * 2).min(END_POLL_MAX);
    }
}

/// Whether the extension exists, read in a new snapshot; retried until a
/// side session answers.
pub async fn extension_exists(source: &SourceConfig) -> bool {
    loop {
        if let Ok(mut sql) = Sql::side(source).await {
            if let Ok(value) = sql
                .one_value("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'wal_listener')::text")
                .await
            {
                return value.as_deref() == Some("true");
            }
        }
        tokio::time::sleep(END_POLL_MAX).await;
    }
}
