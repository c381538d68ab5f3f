//! The background worker. Its main thread is the only one that talks to
//! Postgres: it handles signals and config reloads, copies the pipeline's
//! status into shared memory and writes its log lines. The pipeline runs on a
//! tokio runtime whose threads block every async signal (PGRX-NOTES.md).

use std::ffi::CStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use tokio::sync::{watch, Notify};
use wal_listener_core::config::SourceConfig;
use wal_listener_core::pipeline;
use wal_listener_core::replication::connection::quote_literal;
use wal_listener_core::status::{unix_micros_now, LogLevel, StatusBoard};

use crate::shmem::Stop;
use crate::{gucs, shmem};

/// The postmaster restarts a worker that failed after this long.
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// Status reaches shared memory at least this often.
const STATUS_REFRESH_MS: i64 = 1000;
/// How long the pipeline gets to stop cleanly on SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

pub fn register() {
    builder("wal_listener").load();
}

/// The worker of a database other than `wal_listener.database`: the same
/// main function, given the database's OID. The postmaster restarts it when
/// it fails, also after a crash reset; it exits 0, and is forgotten, once
/// its extension or database is dropped.
pub fn start_for_database(oid: u32) -> Result<(), String> {
    builder(&format!("wal_listener for database {oid}"))
        .set_argument(Some(pg_sys::Datum::from(oid)))
        .load_dynamic()
        .map(|_| ())
        .map_err(|_| {
            "no background worker slot is free; raise max_worker_processes (each database with the \
             extension takes one) and restart the server"
                .to_owned()
        })
}

fn builder(name: &str) -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(name)
        .set_type("wal_listener")
        .set_library("wal_listener")
        .set_function("wal_listener_worker_main")
        // Needed to look up the bootstrap superuser (shared catalogs only).
        .enable_spi_access()
        // Also on a hot standby: the worker waits there, writing nothing,
        // and streams from the synced slot once the server is promoted.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_DELAY))
}

/// The slot of a database: `wal_listener.slot_name` for `wal_listener.database`
/// (as before there were others; see [`static_slot`]), `<slot_name>_<oid>`
/// for the others, so slots, and the event ids derived from them, never
/// collide. Inside a transaction.
pub fn slot_for_database(oid: Option<u32>) -> String {
    match oid {
        None => static_slot(),
        Some(oid) => format!("{}_{oid}", gucs::slot_name()),
    }
}

/// The static worker's slot, as its pipeline chooses it at each session
/// start (`replication::slot::own_or_named`): its database's own
/// `<slot_name>_<oid>` if that exists (the database had a worker of its own
/// before it became `wal_listener.database`, as on the Docker image's first
/// start: taking it over loses nothing and publishes nothing twice) or, in
/// that database, if it was streamed from and is gone (so that
/// `reset_slot()` clears that one); else `wal_listener.slot_name`.
fn static_slot() -> String {
    let named = gucs::slot_name();
    let database = gucs::database();
    // By name, not OID: the static worker has no database to look it up in.
    let own = database_slots()
        .into_iter()
        .find(|(slot, oid)| database_name(*oid).as_deref() == Some(database.as_str()) && slot_exists(slot));
    if let Some((slot, _)) = own {
        return slot;
    }
    let this = unsafe { pg_sys::MyDatabaseId }.to_u32();
    if this != 0 && is_static_database(this) {
        let own = format!("{named}_{this}");
        if streamed_before(&own) {
            return own;
        }
    }
    named
}

/// The extension's record of the slots streamed from, read in this database.
fn streamed_before(slot: &str) -> bool {
    let one = |query: &str| {
        Spi::connect(|client| client.select(query, Some(1), &[])?.first().get_one::<bool>()).ok().flatten()
    };
    // Parsed only once the table is known to exist (in CREATE EXTENSION's hook it may not yet).
    one("SELECT pg_catalog.to_regclass('wal_listener.streamed_slots') IS NOT NULL") == Some(true)
        && one(&format!(
            "SELECT EXISTS (SELECT FROM wal_listener.streamed_slots WHERE slot_name = {})",
            quote_literal(slot)
        )) == Some(true)
}

fn slot_exists(name: &str) -> bool {
    std::ffi::CString::new(name)
        .is_ok_and(|name| !unsafe { pg_sys::SearchNamedReplicationSlot(name.as_ptr(), true) }.is_null())
}

/// Whether the database of `oid` is the one the static worker streams.
pub fn is_static_database(oid: u32) -> bool {
    database_name(oid).is_some_and(|name| name == gucs::database())
}

/// The name of the database of `oid`; inside a transaction.
fn database_name(oid: u32) -> Option<String> {
    let name = unsafe { pg_sys::get_database_name(pg_sys::Oid::from(oid)) };
    (!name.is_null()).then(|| unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned())
}

/// What makes a worker stop for good, and by when it must.
struct Ending {
    stop: Stop,
    deadline: Instant,
}

/// How long a dropped extension's worker may take to publish what was
/// committed before the DROP (NATS down, say) before it gives up on it.
const DROP_DRAIN: Duration = Duration::from_secs(30);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn wal_listener_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: shared catalogs are enough to find the bootstrap superuser,
    // and the loopback connection does the rest.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let pid = unsafe { pg_sys::MyProcPid };
    let own_database = Some(arg.value() as u32).filter(|&oid| oid != 0);
    let database = match own_database {
        None if gucs::database().is_empty() => start_workers_only(),
        None => gucs::database(),
        Some(oid) => match BackgroundWorker::transaction(|| database_name(oid)) {
            // It became wal_listener.database: the static worker takes its slot over.
            Some(name) if name == gucs::database() => {
                log!("wal_listener: database \"{name}\" is wal_listener.database now; its static worker streams it");
                exit_process(0);
            }
            Some(name) => name,
            None => {
                log!("wal_listener: database {oid} no longer exists; its worker stops");
                shmem::forget_database(oid);
                exit_process(0);
            }
        },
    };
    let Some((entry, mut requests_seen)) =
        shmem::worker_started(own_database, &database, pid, unix_micros_now())
    else {
        // A second registration (the server start found the slot of a
        // database whose worker survived a crash reset) or no room.
        log!("wal_listener: another worker streams database \"{database}\", or none more may run; this one stops");
        exit_process(0);
    };
    if requests_seen.stop == Stop::DatabaseDropped {
        // DROP DATABASE is still under way: keep out of the database.
        exit_process(1);
    }
    // On a standby the slots of other databases may be synced later (17+):
    // the static worker looks again once the server is promoted.
    let mut look_after_promotion = own_database.is_none() && unsafe { pg_sys::RecoveryInProgress() };
    if own_database.is_none() {
        start_workers_of_other_databases();
    }

    let role = gucs::role().unwrap_or_else(bootstrap_superuser);
    let source = SourceConfig {
        socket_dir: server_socket_dir(),
        port: unsafe { pg_sys::PostPortNumber } as u16,
        user: role,
        database,
        // The static worker's choice is made at each session start, on its
        // database: see `take_over_database_slot` and `static_slot`.
        slot: match own_database {
            None => gucs::slot_name(),
            Some(oid) => slot_for_database(Some(oid)),
        },
        publication: gucs::publication(),
        require_extension: true,
        take_over_database_slot: own_database.is_none(),
        stop_at_drop: own_database.is_some(),
        failover_slot: gucs::failover_slot(),
    };
    let slot = match own_database {
        None => format!("\"{0}\" or \"{0}_<database oid>\" if that exists", source.slot),
        Some(_) => format!("\"{}\"", source.slot),
    };
    log!(
        "wal_listener: worker started (pid {pid}, database \"{}\", slot {slot}, role \"{}\")",
        source.database,
        source.user
    );
    let wake = EventFd::new();
    let board = {
        let fd = wake.fd;
        Arc::new(StatusBoard::new(Box::new(move || EventFd::signal(fd))))
    };
    let runtime = build_runtime();
    let (config_tx, config_rx) = watch::channel(gucs::pipeline_config(source.clone()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let restart = Arc::new(Notify::new());
    let retry_now = Arc::new(Notify::new());
    let mut ending: Option<Ending> = None;
    let supervisor = runtime.spawn(pipeline::run_supervised(
        config_rx,
        board.clone(),
        pipeline::Requests { restart: restart.clone(), retry_now: retry_now.clone() },
        shutdown_rx,
    ));

    loop {
        let events = unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET
                    | pg_sys::WL_SOCKET_READABLE
                    | pg_sys::WL_TIMEOUT
                    | pg_sys::WL_POSTMASTER_DEATH) as i32,
                wake.fd,
                STATUS_REFRESH_MS,
                pg_sys::PG_WAIT_EXTENSION,
            )
        };
        unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
        if events & pg_sys::WL_POSTMASTER_DEATH as i32 != 0 {
            // Nothing to save: the slot holds every unacked change.
            exit_process(1);
        }
        // Absorbs procsignal barriers: DROP DATABASE (of any database)
        // waits until every process has, and would wait forever for us.
        pg_sys::check_for_interrupts!();
        wake.drain();
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
            let fresh = gucs::pipeline_config(source.clone());
            config_tx.send_if_modified(|current| {
                let changed = *current != fresh;
                *current = fresh;
                changed
            });
        }
        #[cfg(feature = "fault-injection")]
        if gucs::host_panic_injected() {
            panic!("injected by wal_listener.inject_fault = host_panic");
        }
        write_log(&board);
        if look_after_promotion && !unsafe { pg_sys::RecoveryInProgress() } {
            look_after_promotion = false;
            start_workers_of_other_databases();
        }
        let requests = shmem::publish(entry, &board.snapshot());
        if requests.stop != Stop::No && ending.is_none() {
            // A DROP rolled back to a savepoint, or followed by CREATE
            // EXTENSION in its transaction, leaves the extension in place.
            let drops = matches!(requests.stop, Stop::ExtensionDropped(_) | Stop::Abandoned);
            match drops.then(|| extension_exists_now(&runtime, &source)) {
                Some(Some(true)) => withdraw_stop(entry, requests.stop, &source.database),
                // Not known yet: the request stays, and is looked at again.
                Some(None) => {}
                _ => ending = Some(Ending { stop: requests.stop, deadline: Instant::now() + DROP_DRAIN }),
            }
        }
        // The stream passed a committed DROP EXTENSION whose stop request
        // was lost (a crash reset right after its commit clears shared memory).
        if board.extension_dropped() && ending.is_none() {
            ending = Some(Ending { stop: Stop::ExtensionDropped(0), deadline: Instant::now() });
        }
        match ending {
            Some(Ending { stop: Stop::DatabaseDropped, .. }) => break,
            Some(Ending { stop, deadline }) => {
                if board.extension_dropped() {
                    break;
                }
                if stop == Stop::Abandoned || Instant::now() > deadline {
                    // Nothing of an extension that exists is ever dropped: a
                    // DROP rolled back to a savepoint, DROP and CREATE in one
                    // transaction, a CREATE that lost the race to another.
                    match extension_exists_now(&runtime, &source) {
                        Some(true) => {
                            withdraw_stop(entry, stop, &source.database);
                            ending = None;
                        }
                        Some(false) => {
                            if let Stop::ExtensionDropped(lsn) = stop {
                                warning!(
                                    "wal_listener: DROP EXTENSION at {}: changes committed before it and not \
                                     published within {} s are not published (from {} on)",
                                    wal_listener_core::Lsn(lsn),
                                    DROP_DRAIN.as_secs(),
                                    wal_listener_core::Lsn(board.snapshot().confirmed_lsn.0)
                                );
                            }
                            break;
                        }
                        None => {}
                    }
                }
            }
            None => {}
        }
        if requests.restart != requests_seen.restart {
            restart.notify_one();
        }
        if requests.slot != requests_seen.slot {
            retry_now.notify_one();
        }
        requests_seen = requests;
        if supervisor.is_finished() {
            // Never leave a status that no task updates any more.
            error!("wal_listener: the pipeline supervisor ended unexpectedly; restarting the worker");
        }
    }

    let _ = shutdown_tx.send(true);
    runtime.block_on(async {
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, supervisor).await;
    });
    // After DROP EXTENSION the slot and publication go; after a rolled-back
    // CREATE EXTENSION only the slot (the publication may be the user's).
    let publication = match ending {
        Some(Ending { stop: Stop::ExtensionDropped(_), .. }) => Some(true),
        Some(Ending { stop: Stop::Abandoned, .. }) => Some(false),
        _ => None,
    };
    if let Some(publication) = publication {
        match runtime.block_on(wal_listener_core::replication::slot::drop_for_good(&source, publication)) {
            Ok(()) => log!(
                "wal_listener: dropped slot \"{}\"{}",
                source.slot,
                if publication { " and the publication" } else { "" }
            ),
            Err(e) => warning!("wal_listener: could not drop slot \"{}\": {e}", source.slot),
        }
    }
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    write_log(&board);
    // After DROP DATABASE the worker exits 1: if the DROP failed, the
    // postmaster starts it again; if not, the new one finds no database.
    let for_good = matches!(ending, Some(Ending { stop: Stop::ExtensionDropped(_) | Stop::Abandoned, .. }));
    shmem::worker_stopped(entry, for_good);
    log!("wal_listener: worker stopped{}", if for_good { " for good" } else { "" });
    // Exit 1 unless stopped for good: after pg_terminate_backend the
    // postmaster restarts us after RESTART_DELAY; during a server shutdown
    // it restarts nothing anyway. Exit 0 makes it forget the worker.
    exit_process(if for_good { 0 } else { 1 });
}

/// At server start, after a crash reset and after promotion, the databases
/// other than `wal_listener.database` get their workers back: each has a slot named
/// `<slot_name>_<its oid>`, which survives restarts. A worker that already
/// runs makes the second one exit at once.
fn start_workers_of_other_databases() {
    let database = gucs::database();
    for (slot, oid) in database_slots() {
        // The static worker's own database: it streams that slot itself.
        let name = BackgroundWorker::transaction(|| database_name(oid));
        if name.is_none_or(|name| name == database) {
            continue;
        }
        // Read without the lock: look the slot up again, with it.
        let running = shmem::entry_of(oid).and_then(shmem::running_pid).is_some();
        if running || !slot_exists(&slot) {
            continue;
        }
        match start_for_database(oid) {
            Ok(()) => log!("wal_listener: started the worker of database {oid} (slot \"{slot}\")"),
            Err(e) => {
                warning!("wal_listener: cannot start the worker of database {oid} (slot \"{slot}\"): {e}")
            }
        }
    }
}

/// `wal_listener.database = ''`: no database is the static one, each is
/// captured where `CREATE EXTENSION` runs. The static worker only starts
/// the workers of the databases whose slots exist, at server start and
/// again after promotion.
fn start_workers_only() -> ! {
    log!(
        "wal_listener: wal_listener.database is empty: each database is captured where CREATE EXTENSION runs"
    );
    let mut look_after_promotion = unsafe { pg_sys::RecoveryInProgress() };
    start_workers_of_other_databases();
    loop {
        sleep_on_latch(STATUS_REFRESH_MS);
        if BackgroundWorker::sigterm_received() {
            // As the streaming worker does: the postmaster starts it again.
            exit_process(1);
        }
        if look_after_promotion && !unsafe { pg_sys::RecoveryInProgress() } {
            look_after_promotion = false;
            start_workers_of_other_databases();
        }
    }
}

/// The slots named `<slot_name>_<oid>` whose database is that OID, read
/// from shared memory without the lock.
fn database_slots() -> Vec<(String, u32)> {
    let prefix = format!("{}_", gucs::slot_name());
    let mut found = Vec::new();
    unsafe {
        let control = pg_sys::ReplicationSlotCtl;
        if control.is_null() {
            return found;
        }
        let slots = (*control).replication_slots.as_ptr();
        for i in 0..pg_sys::max_replication_slots.max(0) as usize {
            let slot = &*slots.add(i);
            if !slot.in_use {
                continue;
            }
            // Bounded by the 64 bytes of NameData even if a concurrent write tore it.
            let bytes = std::slice::from_raw_parts(
                slot.data.name.data.as_ptr().cast::<u8>(),
                slot.data.name.data.len(),
            );
            let Ok(name) = CStr::from_bytes_until_nul(bytes) else { continue };
            let name = name.to_string_lossy();
            let database = slot.data.database.to_u32();
            if name.strip_prefix(&prefix) == Some(database.to_string().as_str()) {
                found.push((name.into_owned(), database));
            }
        }
    }
    found
}

/// The extension a stop request was about exists (again): the worker goes
/// on, and the request is withdrawn unless a newer one replaced it.
fn withdraw_stop(entry: usize, stop: Stop, database: &str) {
    log!("wal_listener: the extension exists in database \"{database}\"; the worker goes on");
    shmem::clear_stop(entry, stop);
}

/// Whether the extension exists in the worker's database, in a new
/// snapshot; `None` when no session answered in time.
fn extension_exists_now(runtime: &tokio::runtime::Runtime, source: &SourceConfig) -> Option<bool> {
    // The timer is made inside the runtime, which it needs.
    runtime
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), pipeline::extension_exists(source)).await
        })
        .ok()
}

/// Sleeps until the latch is set or `timeout_ms` passed, then handles
/// interrupts (a cancel, procsignal barriers); exits if the postmaster died.
pub fn sleep_on_latch(timeout_ms: i64) {
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout_ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

/// `proc_exit`, which not every version's bindings type as never returning.
#[allow(unreachable_code)]
fn exit_process(code: i32) -> ! {
    unsafe { pg_sys::proc_exit(code) };
    unreachable!("proc_exit returned")
}

fn write_log(board: &StatusBoard) {
    for line in board.drain_log() {
        match line.level {
            LogLevel::Info => log!("wal_listener: {}", line.message),
            LogLevel::Warning => warning!("wal_listener: {}", line.message),
        }
    }
}

/// Name of the role initdb created (OID 10), read from the shared catalog.
fn bootstrap_superuser() -> String {
    BackgroundWorker::transaction(|| unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    })
}

/// First directory of `unix_socket_directories`, where the server listens.
fn server_socket_dir() -> String {
    let dirs = unsafe { CStr::from_ptr(pg_sys::Unix_socket_directories) }.to_string_lossy().into_owned();
    dirs.split(',').map(|d| d.trim().trim_matches('"')).find(|d| !d.is_empty()).unwrap_or("/tmp").to_owned()
}

/// A runtime whose threads never run Postgres' signal handlers: a handler on
/// a foreign thread panics in pgrx and aborts the whole cluster.
fn build_runtime() -> tokio::runtime::Runtime {
    // Threads inherit the creating thread's mask: block here too, so there is
    // no window before `on_thread_start` runs.
    let previous = block_async_signals();
    // One thread: the replication reader, the pipeline and the NATS
    // connection hand every event to each other, and on one thread they do
    // so without cross-thread wake-ups (a third less CPU per event than two
    // threads, measured); the worker never needs more than a core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("wal_listener-io")
        .on_thread_start(|| {
            block_async_signals();
        })
        // Take what arrives meanwhile in one wake-up (see park_linger).
        .on_thread_park(|| {
            if let Some(linger) = wal_listener_core::park_linger::PARK_LINGER.before_park() {
                std::thread::sleep(linger);
            }
        })
        .enable_all()
        .build();
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    match runtime {
        Ok(runtime) => runtime,
        Err(e) => error!("wal_listener: cannot start the async runtime: {e}"),
    }
}

/// Blocks every signal except the synchronous ones; returns the old mask.
fn block_async_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sync_signal in [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL, libc::SIGTRAP] {
            libc::sigdelset(&mut set, sync_signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
        previous
    }
}

/// Lets async tasks wake the main thread's `WaitLatchOrSocket`.
struct EventFd {
    fd: i32,
}

impl EventFd {
    fn new() -> Self {
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            error!("wal_listener: eventfd failed: {}", std::io::Error::last_os_error());
        }
        EventFd { fd }
    }

    /// Safe from any thread; never blocks (a full counter is awake anyway).
    fn signal(fd: i32) {
        let one: u64 = 1;
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut count: u64 = 0;
        unsafe { libc::read(self.fd, (&mut count as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}
