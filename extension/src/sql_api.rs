//! The SQL API of DESIGN.md section 6. Validation rules come from the core
//! (`wal_listener_core::filters`); storage, locking, `status()` and grants
//! are SQL, in `api.sql`.

use pgrx::prelude::*;
use wal_listener_core::{audit, filters};

use crate::{shmem, worker};

/// Checks a filter's action list; returns it in canonical form.
#[pg_extern(immutable, parallel_safe)]
fn _normalize_actions(actions: Option<Vec<Option<String>>>) -> Vec<String> {
    let allowed = filters::ACTION_NAMES.join(", ");
    let Some(actions) = actions else {
        error!("actions must not be NULL; allowed: {allowed}");
    };
    let Some(names) = actions.iter().map(Option::as_deref).collect::<Option<Vec<&str>>>() else {
        error!("actions must not contain NULL; allowed: {allowed}");
    };
    match filters::parse_actions(&names) {
        Ok(bits) => filters::action_names(bits).into_iter().map(String::from).collect(),
        Err(problem) => error!("{problem}"),
    }
}

/// Checks a per-table subject; NULL (the default subject) is fine.
#[pg_extern(immutable, parallel_safe)]
fn _check_subject(subject: Option<&str>) {
    if let Err(problem) = subject.map(filters::validate_subject).unwrap_or(Ok(())) {
        error!("{problem}");
    }
}

/// The setup audit's warning when `synchronous_standby_names` (the value
/// given) makes the worker's walsender a synchronous standby; NULL otherwise.
#[pg_extern(immutable, parallel_safe)]
fn _sync_standby_warning(setting: &str) -> Option<String> {
    audit::sync_standby_warning(setting, wal_listener_core::replication::connection::STREAM_APPLICATION_NAME)
}

/// Asks the worker to reconnect and resume from the slot; returns at once.
#[pg_extern(volatile)]
fn _request_restart() -> bool {
    shmem::entry_of_this_database().is_some_and(shmem::request_restart)
}

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
        name!(events_skipped, i64),
        name!(worker_confirmed_lsn, String),
        name!(last_event_at_us, Option<i64>),
        name!(last_error, Option<String>),
        name!(last_error_at_us, Option<i64>),
        name!(started_at_us, Option<i64>),
        name!(warnings, Vec<String>),
        name!(backfill, Option<String>),
        name!(transactions_unbatched, i64),
    ),
> {
    let row = match shmem::read(shmem::entry_of_this_database()) {
        Some(s) => (
            s.state.to_string(),
            s.pid,
            s.nats_connected,
            s.events_published,
            s.events_filtered,
            s.events_skipped,
            wal_listener_core::Lsn(s.confirmed_lsn).to_string(),
            s.last_event_at,
            s.last_error,
            s.last_error_at,
            s.started_at,
            s.warnings,
            s.backfill,
            s.transactions_unbatched,
        ),
        None => (
            "stopped".to_string(),
            None,
            false,
            0,
            0,
            0,
            "0/0".to_string(),
            None,
            Some(
                "wal_listener is not in shared_preload_libraries; add it and restart the server".to_string(),
            ),
            None,
            None,
            Vec::new(),
            None,
            0,
        ),
    };
    TableIterator::once(row)
}

/// This database's replication slot (see `worker::slot_for_database`).
#[pg_extern(stable, parallel_safe)]
fn _slot_name() -> String {
    let this = unsafe { pg_sys::MyDatabaseId }.to_u32();
    worker::slot_for_database(Some(this).filter(|&oid| !worker::is_static_database(oid)))
}

/// Every worker's shared-memory status; wrapped by `wal_listener.cluster_status()`.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn _cluster_status() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(slot_name, String),
        name!(state, String),
        name!(pid, Option<i32>),
        name!(events_published, i64),
        name!(worker_confirmed_lsn, String),
        name!(last_error, Option<String>),
    ),
> {
    let rows: Vec<_> = shmem::read_all()
        .into_iter()
        .map(|(oid, database, s)| {
            (
                database,
                worker::slot_for_database(oid),
                s.state.to_string(),
                s.pid,
                s.events_published,
                wal_listener_core::Lsn(s.confirmed_lsn).to_string(),
                s.last_error,
            )
        })
        .collect();
    TableIterator::new(rows)
}

extension_sql_file!("api.sql", finalize);
