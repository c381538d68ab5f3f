//! The background worker. Its main thread is the only one that talks to
//! Postgres: it handles signals and config reloads, copies the pipeline's
//! status into shared memory and writes its log lines. The pipeline runs on a
//! tokio runtime whose threads block every async signal (PGRX-NOTES.md).

use std::ffi::CStr;
use std::sync::Arc;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use tokio::sync::{watch, Notify};
use wal_listener_core::config::SourceConfig;
use wal_listener_core::pipeline;
use wal_listener_core::status::{unix_micros_now, LogLevel, StatusBoard};

use crate::{gucs, shmem};

/// The postmaster restarts a worker that failed after this long.
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// Status reaches shared memory at least this often.
const STATUS_REFRESH_MS: i64 = 1000;
/// How long the pipeline gets to stop cleanly on SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

pub fn register() {
    BackgroundWorkerBuilder::new("wal_listener")
        .set_type("wal_listener")
        .set_library("wal_listener")
        .set_function("wal_listener_worker_main")
        // Needed to look up the bootstrap superuser (shared catalogs only).
        .enable_spi_access()
        // Also on a hot standby: the worker waits there, writing nothing,
        // and streams from the synced slot once the server is promoted.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn wal_listener_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: shared catalogs are enough to find the bootstrap superuser,
    // and the loopback connection does the rest.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let pid = unsafe { pg_sys::MyProcPid };
    let mut requests_seen = shmem::worker_started(pid, unix_micros_now());

    let role = gucs::role().unwrap_or_else(bootstrap_superuser);
    let source = SourceConfig {
        socket_dir: server_socket_dir(),
        port: unsafe { pg_sys::PostPortNumber } as u16,
        user: role,
        database: gucs::database(),
        slot: gucs::slot_name(),
        publication: gucs::publication(),
        require_extension: true,
        failover_slot: gucs::failover_slot(),
    };
    log!(
        "wal_listener: worker started (pid {pid}, database \"{}\", role \"{}\")",
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
            unsafe { pg_sys::proc_exit(1) };
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
        let requests = shmem::publish(&board.snapshot());
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
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    write_log(&board);
    shmem::worker_stopped();
    log!("wal_listener: worker stopped");
    // Exit 1, not 0: after pg_terminate_backend the postmaster restarts us
    // after RESTART_DELAY; during a server shutdown it restarts nothing anyway.
    unsafe { pg_sys::proc_exit(1) };
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
