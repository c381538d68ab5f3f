//! The utility hook: where capture starts and ends in each database.
//!
//! Nothing committed after `CREATE EXTENSION wal_listener` returns may be
//! lost, so the slot must exist before that transaction commits. In
//! `wal_listener.database` the static worker creates it as soon as the
//! database exists; in any other database CREATE EXTENSION first checks
//! that the cluster has room (a slot, three walsenders, a worker) and starts
//! that database's worker. Either way it then waits (bounded) until the
//! worker has the slot. Creating a slot waits for every transaction that
//! has an xid, so the wait happens before CREATE EXTENSION writes anything,
//! and only when its transaction has written nothing yet.
//!
//! DROP EXTENSION in another database writes a transactional marker: its
//! worker publishes everything before it, nothing after, then drops the
//! slot and publication and exits for good. DROP DATABASE first stops the
//! database's worker, which would otherwise keep it in use.

use std::ffi::CStr;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use wal_listener_core::replication::connection::{quote_literal, STREAM_APPLICATION_NAME};

use crate::shmem::Stop;
use crate::{gucs, shmem, worker};

/// How long CREATE EXTENSION waits for the worker's slot at most.
const SLOT_WAIT: Duration = Duration::from_secs(30);
const POLL_MS: i64 = 100;
/// How long a worker just registered may take to start.
const WORKER_START_WAIT: Duration = Duration::from_secs(5);

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook in every backend (the library is preloaded).
pub fn install() {
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let mut dropped_database = None;
    // Only for whoever may run the statement: Postgres checks later, and a
    // refused role must not get as far as starting or stopping a worker.
    // Asked only here: a catalog lookup for every statement would also run
    // for ROLLBACK in an aborted transaction, where it must not.
    let superuser = || unsafe { pg_sys::superuser() };
    match unsafe { statement_kind(pstmt) } {
        Statement::CreateExtension if superuser() => {
            let database = this_database();
            if worker::is_static_database(database) {
                wait_for_slot(None);
            } else {
                start_worker(database);
                wait_for_slot(Some(database));
            }
            commit_without_waiting_for_the_worker();
        }
        Statement::DropExtension if superuser() => {
            let database = this_database();
            if !worker::is_static_database(database) {
                mark_the_drop(database);
            }
        }
        Statement::DropDatabase(name) => dropped_database = captured_database_owned_by_caller(&name),
        _ => {}
    }
    let run = || unsafe {
        match PREVIOUS_HOOK {
            // An ERROR under an earlier hook (pg_stat_statements, say) must
            // not longjmp across this Rust frame: the guard turns it into a
            // panic that unwinds to #[pg_guard], which raises it again.
            Some(previous) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                previous(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc)
            }),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    };
    match dropped_database {
        None => run(),
        // DROP DATABASE failed (another session in it, say), or was
        // cancelled while the worker stopped: the database and its slot
        // stay, so its worker must too.
        Some((database, entry)) => PgTryBuilder::new(|| {
            stop_worker(database, entry);
            run()
        })
        .catch_others(|error| {
            // The worker exited 1 on the stop request: the postmaster starts
            // it again, and without the request it streams on.
            shmem::clear_stop(entry, Stop::DatabaseDropped);
            error.rethrow()
        })
        .execute(),
    }
}

enum Statement {
    CreateExtension,
    DropExtension,
    DropDatabase(String),
    Other,
}

unsafe fn statement_kind(pstmt: *mut pg_sys::PlannedStmt) -> Statement {
    if !shmem::preloaded() {
        return Statement::Other;
    }
    let statement = unsafe { (*pstmt).utilityStmt };
    if statement.is_null() {
        return Statement::Other;
    }
    let ours = |name: *const std::ffi::c_char| {
        !name.is_null() && unsafe { CStr::from_ptr(name) }.to_bytes() == b"wal_listener"
    };
    match unsafe { (*statement).type_ } {
        pg_sys::NodeTag::T_CreateExtensionStmt => {
            let create = statement.cast::<pg_sys::CreateExtensionStmt>();
            if ours(unsafe { (*create).extname }) {
                Statement::CreateExtension
            } else {
                Statement::Other
            }
        }
        pg_sys::NodeTag::T_DropStmt => {
            let drop = statement.cast::<pg_sys::DropStmt>();
            // DROP SCHEMA wal_listener CASCADE drops the extension as well
            // (its schema is fixed: the control file makes it not relocatable).
            let kind = unsafe { (*drop).removeType };
            if kind != pg_sys::ObjectType::OBJECT_EXTENSION && kind != pg_sys::ObjectType::OBJECT_SCHEMA {
                return Statement::Other;
            }
            // Both name their objects as String nodes.
            let named = unsafe { list_items((*drop).objects) }.into_iter().any(|node| {
                !node.is_null()
                    && unsafe { (*node.cast::<pg_sys::Node>()).type_ } == pg_sys::NodeTag::T_String
                    && ours(unsafe { (*node.cast::<pg_sys::String>()).sval })
            });
            if named {
                Statement::DropExtension
            } else {
                Statement::Other
            }
        }
        pg_sys::NodeTag::T_DropdbStmt => {
            let drop = statement.cast::<pg_sys::DropdbStmt>();
            let name = unsafe { (*drop).dbname };
            if name.is_null() {
                return Statement::Other;
            }
            Statement::DropDatabase(unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned())
        }
        _ => Statement::Other,
    }
}

unsafe fn list_items(list: *mut pg_sys::List) -> Vec<*mut std::ffi::c_void> {
    if list.is_null() {
        return Vec::new();
    }
    let list = unsafe { &*list };
    (0..list.length as usize).map(|i| unsafe { (*list.elements.add(i)).ptr_value }).collect()
}

fn this_database() -> u32 {
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// How long CREATE EXTENSION waits for a dropped extension's worker to
/// leave, and DROP DATABASE for the worker of the database to stop.
const LEAVE_WAIT: Duration = Duration::from_secs(30);
/// The stream, the backfill poller's session and short side sessions.
const WALSENDERS_PER_DATABASE: i32 = 3;

/// Starts the worker of this database, unless one runs (a CREATE EXTENSION
/// rolled back earlier leaves it waiting), after checking that the cluster
/// has room for it: a clear error now, not a worker stuck in backoff.
fn start_worker(database: u32) {
    let name = unsafe { CStr::from_ptr(pg_sys::get_database_name(pg_sys::Oid::from(database))) }
        .to_string_lossy()
        .into_owned();
    if let Some(problem) = wal_listener_core::event::subject_token_problem(&name) {
        error!(
            "wal_listener: database name \"{name}\" cannot be the NATS subject token of its events \
             (<topic>.<database>.<schema>_<table>): {problem}; rename the database, or make it \
             wal_listener.database"
        );
    }
    let slot = worker::slot_for_database(Some(database));
    if slot.len() >= pg_sys::NAMEDATALEN as usize {
        error!(
            "wal_listener: the slot name \"{slot}\" is longer than 63 bytes; shorten wal_listener.slot_name"
        );
    }
    if let Some(entry) = shmem::entry_of(database) {
        if shmem::running_pid(entry).is_some() && !wait_until_stopped(entry) {
            return;
        }
    }
    check_capacity();
    if shmem::full() {
        error!(
            "wal_listener: {} databases are streamed already, the most one server can; \
             drop the extension in one of them first",
            shmem::MAX_WORKERS - 1
        );
    }
    if let Err(problem) = worker::start_for_database(database) {
        error!("wal_listener: cannot start the worker of database \"{name}\": {problem}");
    }
    // Rolled back: the worker has nothing to capture; it drops its slot and stops.
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, move || {
        if let Some(entry) = shmem::entry_of(database) {
            shmem::request_stop(entry, Stop::Abandoned);
        }
    });
}

/// Waits for a worker that is stopping for good; false when it is a
/// running worker this CREATE EXTENSION can use.
fn wait_until_stopped(entry: usize) -> bool {
    if !shmem::stopping(entry) {
        return false;
    }
    let started = Instant::now();
    while shmem::running_pid(entry).is_some() {
        if started.elapsed() > LEAVE_WAIT {
            error!(
                "wal_listener: the worker of the extension dropped here is still stopping; try again later"
            );
        }
        worker::sleep_on_latch(POLL_MS);
    }
    true
}

/// One slot and three walsenders (the stream, the backfill poller's
/// session, and short side sessions) per streamed database, beside what
/// other clients use.
fn check_capacity() {
    let query = "SELECT ARRAY[(SELECT count(*) FROM pg_catalog.pg_replication_slots)::int, \
                        pg_catalog.current_setting('max_replication_slots')::int, \
                        (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'walsender' \
                            AND application_name NOT IN ('wal_listener', 'wal_listener_side'))::int, \
                        pg_catalog.current_setting('max_wal_senders')::int]";
    // Read-only (`select`): an xid here would keep the worker from creating the slot.
    let row = Spi::connect(|client| client.select(query, Some(1), &[])?.first().get_one::<Vec<i32>>());
    let Ok(Some([slots, max_slots, foreign_senders, max_senders])) =
        row.as_ref().map(|r| r.as_deref().and_then(|v| <[i32; 4]>::try_from(v).ok()))
    else {
        error!("wal_listener: cannot read the replication capacity: {row:?}");
    };
    if slots >= max_slots {
        error!(
            "wal_listener: max_replication_slots ({max_slots}) are all in use; capturing this database takes one \
             more: raise max_replication_slots and restart the server"
        );
    }
    // This one, the others and the static one (none with wal_listener.database = '').
    let databases =
        (1 + shmem::other_streamed_databases() + usize::from(!gucs::database().is_empty())) as i32;
    let needed = WALSENDERS_PER_DATABASE * databases + foreign_senders;
    if needed > max_senders {
        error!(
            "wal_listener: max_wal_senders ({max_senders}) is too low for {databases} streamed databases \
             ({WALSENDERS_PER_DATABASE} walsenders each) beside {foreign_senders} other replication connections; raise max_wal_senders to \
             {needed} and restart the server"
        );
    }
}

/// DROP EXTENSION: the marker tells the worker where to stop publishing
/// (rolled back, it never reaches the worker); the commit tells it to stop.
fn mark_the_drop(database: u32) {
    if let Err(e) = Spi::run(&format!(
        "SELECT pg_catalog.pg_logical_emit_message(true, {}, '')",
        quote_literal(wal_listener_core::replication::DROPPED_MARKER_PREFIX)
    )) {
        error!("wal_listener: cannot mark DROP EXTENSION in the WAL: {e}");
    }
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        if let Some(entry) = shmem::entry_of(database) {
            shmem::request_stop(entry, Stop::ExtensionDropped(unsafe { pg_sys::XactLastCommitEnd }));
        }
    });
    // The worker never confirms this transaction, as it stops before it.
    commit_without_waiting_for_the_worker();
}

/// The OID and worker entry of the database DROP DATABASE names, when it
/// is captured and the caller may drop it (superuser or owner).
fn captured_database_owned_by_caller(name: &str) -> Option<(u32, usize)> {
    let cname = std::ffi::CString::new(name).ok()?;
    let oid = unsafe { pg_sys::get_database_oid(cname.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return None;
    }
    let user = unsafe { pg_sys::GetUserId() };
    #[cfg(feature = "pg15")]
    let owner = unsafe { pg_sys::pg_database_ownercheck(oid, user) };
    #[cfg(not(feature = "pg15"))]
    let owner = unsafe { pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, oid, user) };
    if !owner {
        return None;
    }
    shmem::entry_of(oid.to_u32()).map(|entry| (oid.to_u32(), entry))
}

/// DROP DATABASE fails while a worker or its walsender uses the database:
/// the worker stops for good first (its slot goes with the database).
fn stop_worker(oid: u32, entry: usize) {
    shmem::request_stop(entry, Stop::DatabaseDropped);
    let started = Instant::now();
    while shmem::running_pid(entry).is_some() || active_slots(oid) > 0 {
        if started.elapsed() > LEAVE_WAIT {
            warning!(
                "wal_listener: the worker of database {oid} did not stop within {} s",
                LEAVE_WAIT.as_secs()
            );
            break;
        }
        worker::sleep_on_latch(POLL_MS);
    }
}

fn active_slots(database: u32) -> i32 {
    let (mut slots, mut active) = (0, 0);
    unsafe { pg_sys::ReplicationSlotsCountDBSlots(pg_sys::Oid::from(database), &mut slots, &mut active) };
    active
}

/// `database`: the OID of a database other than `wal_listener.database`.
fn wait_for_slot(database: Option<u32>) {
    let slot = worker::slot_for_database(database);
    let entry = || match database {
        None => Some(0),
        Some(oid) => shmem::entry_of(oid),
    };
    let wrote_already = unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    if slot_ready(&slot) {
        return;
    }
    if wrote_already {
        warning!(
            "wal_listener: replication slot \"{slot}\" does not exist yet, and this transaction has written \
             already, which keeps the worker from creating it; changes committed before it exists are not \
             published. Run CREATE EXTENSION wal_listener first in its transaction to avoid this"
        );
        return;
    }
    let started = Instant::now();
    while started.elapsed() < SLOT_WAIT {
        if let Some(reason) = worker_cannot_create_it(entry(), started.elapsed()) {
            warning!(
                "wal_listener: the worker cannot create replication slot \"{slot}\" now ({reason}); changes \
                 committed before it exists are not published"
            );
            return;
        }
        if let Some(entry) = entry() {
            shmem::request_slot(entry);
        }
        worker::sleep_on_latch(POLL_MS);
        if slot_ready(&slot) {
            return;
        }
    }
    warning!(
        "wal_listener: the worker did not create replication slot \"{slot}\" within {} s (see \
         wal_listener.status() and the server log); changes committed before it exists are not published",
        SLOT_WAIT.as_secs()
    );
}

/// When `synchronous_standby_names` names the worker's walsender (`'*'`,
/// say), this transaction's commit would wait for the worker to confirm
/// it, and the worker confirms it only once it sees the extension, which
/// is after the commit: the transaction commits with `synchronous_commit =
/// local` instead (a later `SET LOCAL` in it still wins). Never raised:
/// `off` stays `off`.
fn commit_without_waiting_for_the_worker() {
    let names = current_setting("synchronous_standby_names");
    let waits =
        matches!(current_setting("synchronous_commit").as_str(), "on" | "remote_write" | "remote_apply");
    if !waits || !wal_listener_core::audit::sync_standby_names_match(&names, STREAM_APPLICATION_NAME) {
        return;
    }
    let set = Spi::get_one::<String>("SELECT pg_catalog.set_config('synchronous_commit', 'local', true)");
    match set {
        Ok(_) => notice!(
            "wal_listener: this transaction commits with synchronous_commit = local: synchronous_standby_names \
             = '{names}' names the worker's walsender, which cannot confirm it before the extension exists"
        ),
        Err(e) => warning!("wal_listener: could not set synchronous_commit = local for CREATE EXTENSION: {e}"),
    }
}

fn current_setting(name: &str) -> String {
    Spi::get_one::<String>(&format!("SELECT pg_catalog.current_setting({})", quote_literal(name)))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Why waiting is pointless: no worker runs, or it fails (e.g. wal_level).
/// A worker just started gets a moment to show up.
fn worker_cannot_create_it(entry: Option<usize>, waited: Duration) -> Option<String> {
    if entry.is_none() && waited < WORKER_START_WAIT {
        return None;
    }
    let status = shmem::read(entry)?;
    match (status.pid, status.state) {
        (None, _) => Some("no worker runs; see the server log".into()),
        (Some(_), "backoff" | "stopped") => Some(status.last_error.unwrap_or_else(|| status.state.into())),
        _ => None,
    }
}

/// Whether the slot exists in this database and has found its start
/// (a slot being created has no confirmed position yet). A read-only
/// query: this transaction must get no xid, or the slot would wait for it.
fn slot_ready(slot: &str) -> bool {
    let query = format!(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = {} \
            AND database = pg_catalog.current_database() AND confirmed_flush_lsn IS NOT NULL)",
        quote_literal(slot)
    );
    Spi::connect(|client| client.select(query.as_str(), Some(1), &[])?.first().get_one::<bool>())
        .ok()
        .flatten()
        .unwrap_or(false)
}
