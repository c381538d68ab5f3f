//! The SQL API of DESIGN.md section 6. Validation rules come from the core
//! (`wal_listener_core::filters`); storage, locking, `status()` and grants
//! are SQL, in `api.sql`.

use pgrx::prelude::*;
use wal_listener_core::{audit, filters};

use crate::shmem;

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

/// Checks that a backfill's `where_clause` is one condition on `table`
/// alone: parsed and analyzed by the server as `SELECT 1 FROM ONLY table
/// WHERE (clause)`, which must stay exactly that (no other table, no
/// subquery, nothing after the condition) and call no volatile function.
/// Raises an error saying what is wrong; the worker later puts the clause in
/// that same position, so it reads the same.
#[pg_extern(volatile)]
fn _check_where_clause(table: &str, clause: &str) {
    let query = format!("SELECT 1 FROM ONLY {table} WHERE ({clause})");
    let Ok(text) = std::ffi::CString::new(query) else {
        error!("where_clause must not contain a NUL character");
    };
    unsafe {
        let statements = pgrx::PgList::<pg_sys::RawStmt>::from_pg(pg_sys::pg_parse_query(text.as_ptr()));
        if statements.len() != 1 {
            error!("where_clause must be one condition, not several statements");
        }
        let raw = statements.get_ptr(0).unwrap_or_else(|| error!("where_clause is empty"));
        let analyzed =
            pg_sys::parse_analyze_fixedparams(raw, text.as_ptr(), std::ptr::null(), 0, std::ptr::null_mut());
        let q = &*analyzed;
        let tables = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable).len();
        if tables != 1 || q.hasSubLinks || !q.cteList.is_null() {
            error!("where_clause may refer only to the table's own columns (no other table, no subquery)");
        }
        if !q.setOperations.is_null()
            || !q.sortClause.is_null()
            || !q.limitCount.is_null()
            || !q.limitOffset.is_null()
            || !q.groupClause.is_null()
            || !q.havingQual.is_null()
            || !q.distinctClause.is_null()
            || pgrx::PgList::<pg_sys::TargetEntry>::from_pg(q.targetList).len() != 1
        {
            error!("where_clause must be one condition: nothing may follow it");
        }
        if pg_sys::contain_volatile_functions((*q.jointree).quals) {
            error!("where_clause must not call volatile functions (such as random()); stable ones (now()) are fine");
        }
    }
}

/// Asks the worker to reconnect and resume from the slot; returns at once.
#[pg_extern(volatile)]
fn _request_restart() -> bool {
    shmem::request_restart()
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
    let row = match shmem::read() {
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

extension_sql_file!("api.sql", finalize);
