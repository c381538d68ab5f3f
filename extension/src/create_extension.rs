//! Nothing committed after `CREATE EXTENSION wal_listener` returns may be
//! lost, so the slot must exist before that transaction commits. The worker
//! creates it as soon as the database exists; this hook covers a database
//! created moments before: CREATE EXTENSION waits (bounded) until the
//! worker has the slot. Creating a slot waits for every transaction that
//! has an xid, so the wait happens before CREATE EXTENSION writes anything,
//! and only when its transaction has written nothing yet.

use std::ffi::CStr;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use wal_listener_core::replication::connection::{quote_literal, STREAM_APPLICATION_NAME};

use crate::{gucs, shmem};

/// How long CREATE EXTENSION waits for the worker's slot at most.
const SLOT_WAIT: Duration = Duration::from_secs(30);
const POLL_MS: i64 = 100;

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
    if unsafe { creates_this_extension(pstmt) } {
        wait_for_slot();
        commit_without_waiting_for_the_worker();
    }
    unsafe {
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
    }
}

/// `CREATE EXTENSION wal_listener` in the database the worker streams.
unsafe fn creates_this_extension(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    let statement = unsafe { (*pstmt).utilityStmt };
    if statement.is_null() || unsafe { (*statement).type_ } != pg_sys::NodeTag::T_CreateExtensionStmt {
        return false;
    }
    let create = statement.cast::<pg_sys::CreateExtensionStmt>();
    let name = unsafe { CStr::from_ptr((*create).extname) };
    if name.to_bytes() != b"wal_listener" || !shmem::preloaded() {
        return false;
    }
    let database = unsafe { pg_sys::get_database_name(pg_sys::MyDatabaseId) };
    !database.is_null() && unsafe { CStr::from_ptr(database) }.to_string_lossy() == gucs::database()
}

fn wait_for_slot() {
    let slot = gucs::slot_name();
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
        if let Some(reason) = worker_cannot_create_it() {
            warning!(
                "wal_listener: the worker cannot create replication slot \"{slot}\" now ({reason}); changes \
                 committed before it exists are not published"
            );
            return;
        }
        shmem::request_slot();
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                POLL_MS,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
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
fn worker_cannot_create_it() -> Option<String> {
    let status = shmem::read()?;
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
