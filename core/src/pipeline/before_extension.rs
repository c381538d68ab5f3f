//! Streaming before `CREATE EXTENSION wal_listener`: the slot exists as soon
//! as the database does, so that a script running `CREATE EXTENSION;
//! CREATE TABLE t; INSERT INTO t` loses nothing. Until the extension's
//! transaction arrives, every change is confirmed unpublished, so the slot
//! pins no WAL while the extension is missing.

use pgwire_replication::{ReplicationClient, ReplicationEvent};

use crate::ack_tracker::AckTracker;
use crate::replication::CREATED_MARKER_PREFIX;
use crate::status::StatusBoard;
use crate::{Error, Lsn};

/// Confirms transactions until the one carrying the extension's marker
/// message; returns `Ok` before confirming it, so that the next session
/// starts at or before that transaction and publishes it.
pub async fn skip_until_created(
    mut client: ReplicationClient,
    start_lsn: Lsn,
    board: &StatusBoard,
) -> Result<(), Error> {
    // Nothing is ever published here: the tracker only applies the rule
    // for keepalives inside and between transactions.
    let mut tracker = AckTracker::<()>::new(start_lsn);
    client.update_applied_lsn(start_lsn.into());
    let mut created = false;
    loop {
        let event = match client.recv().await {
            Ok(Some(event)) => event,
            Ok(None) => return Err(Error::Replication("the server ended the replication stream".into())),
            Err(e) => return Err(Error::Replication(format!("replication stream broke: {e}"))),
        };
        let confirm = match event {
            ReplicationEvent::Begin { .. } => {
                tracker.begin();
                None
            }
            ReplicationEvent::Message { transactional: true, prefix, .. }
                if prefix == CREATED_MARKER_PREFIX =>
            {
                created = true;
                None
            }
            ReplicationEvent::Commit { .. } if created => return Ok(()),
            ReplicationEvent::Commit { end_lsn, .. } => tracker.commit(end_lsn.into()),
            ReplicationEvent::KeepAlive { wal_end, .. } => tracker.keepalive(wal_end.into()),
            ReplicationEvent::StoppedAt { reached } => {
                return Err(Error::Replication(format!("replication stopped at {reached} unexpectedly")))
            }
            ReplicationEvent::XLogData { .. } | ReplicationEvent::Message { .. } => None,
        };
        if let Some(lsn) = confirm {
            client.update_applied_lsn(lsn.into());
            board.set_confirmed_lsn(lsn);
        }
    }
}
