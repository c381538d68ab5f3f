//! SQL functions. `status()` itself is SQL over `_worker_status()`, so the
//! catalog reads (slot position, WAL lag) stay in SQL.

use pgrx::prelude::*;

use crate::shmem;

/// The worker's shared-memory status; wrapped by `wal_listener.status()`.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn _worker_status() -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(pid, Option<i32>),
        name!(nats_connected, bool),
        name!(events_published, i64),
        name!(events_filtered, i64),
        name!(worker_confirmed_lsn, String),
        name!(last_event_at_us, Option<i64>),
        name!(last_error, Option<String>),
        name!(last_error_at_us, Option<i64>),
        name!(started_at_us, Option<i64>),
    ),
> {
    let row = match shmem::read() {
        Some(s) => (
            s.state.to_string(),
            s.pid,
            s.nats_connected,
            s.events_published,
            s.events_filtered,
            wal_listener_core::Lsn(s.confirmed_lsn).to_string(),
            s.last_event_at,
            s.last_error,
            s.last_error_at,
            s.started_at,
        ),
        None => (
            "stopped".to_string(),
            None,
            false,
            0,
            0,
            "0/0".to_string(),
            None,
            Some(
                "wal_listener is not in shared_preload_libraries; add it and restart the server".to_string(),
            ),
            None,
            None,
        ),
    };
    TableIterator::once(row)
}

extension_sql!(
    r#"
CREATE FUNCTION status(
    OUT state text,
    OUT pid integer,
    OUT slot text,
    OUT publication text,
    OUT confirmed_flush_lsn pg_lsn,
    OUT lag_bytes bigint,
    OUT events_published bigint,
    OUT events_filtered bigint,
    OUT nats_connected boolean,
    OUT last_error text,
    OUT last_error_time timestamptz,
    OUT last_event_time timestamptz,
    OUT started_at timestamptz)
LANGUAGE sql STABLE
AS $$
    SELECT w.state,
           w.pid,
           current_setting('wal_listener.slot_name'),
           current_setting('wal_listener.publication'),
           coalesce(s.confirmed_flush_lsn, nullif(w.worker_confirmed_lsn, '0/0')::pg_lsn),
           pg_wal_lsn_diff(
               CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END,
               coalesce(s.confirmed_flush_lsn, nullif(w.worker_confirmed_lsn, '0/0')::pg_lsn))::bigint,
           w.events_published,
           w.events_filtered,
           w.nats_connected,
           CASE WHEN w.pid IS NULL AND pg_is_in_recovery()
                THEN 'server is a standby: the worker starts streaming after promotion'
                ELSE w.last_error END,
           to_timestamp(w.last_error_at_us / 1e6),
           to_timestamp(w.last_event_at_us / 1e6),
           to_timestamp(w.started_at_us / 1e6)
      FROM @extschema@._worker_status() w
      LEFT JOIN pg_catalog.pg_replication_slots s
        ON s.slot_name = current_setting('wal_listener.slot_name')
$$;
COMMENT ON FUNCTION status() IS 'State of the wal_listener worker: one row.';
"#,
    name = "status",
    requires = [_worker_status],
);
