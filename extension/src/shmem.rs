//! The worker's status in shared memory, so `status()` can read it from any
//! backend. Written only by the worker's main thread; other backends only
//! bump request counters and signal it.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use wal_listener_core::status::{State, StatusSnapshot};

/// Longest last-error text kept; longer messages are cut at a char boundary.
const ERROR_CAPACITY: usize = 1024;
/// Room for the setup audit's warnings, joined by newlines.
const WARNINGS_CAPACITY: usize = 2048;
/// Room for the running backfill's progress line.
const BACKFILL_CAPACITY: usize = 256;

#[derive(Clone, Copy)]
pub struct WorkerStatus {
    /// `State as u8`; `NOT_STARTED` until a worker has run.
    state: u8,
    nats_connected: bool,
    events_published: u64,
    events_filtered: u64,
    events_skipped: u64,
    transactions_unbatched: u64,
    confirmed_lsn: u64,
    /// Unix microseconds, 0 = never.
    last_event_at: i64,
    last_error_at: i64,
    started_at: i64,
    /// Bumped by `restart()`; the worker restarts when it sees a new value.
    restart_requests: u64,
    /// Bumped by CREATE EXTENSION when the slot is missing: retry at once.
    slot_requests: u64,
    last_error_len: usize,
    last_error: [u8; ERROR_CAPACITY],
    warnings_len: usize,
    warnings: [u8; WARNINGS_CAPACITY],
    backfill_len: usize,
    backfill: [u8; BACKFILL_CAPACITY],
}

const NOT_STARTED: u8 = u8::MAX;

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            state: NOT_STARTED,
            nats_connected: false,
            events_published: 0,
            events_filtered: 0,
            events_skipped: 0,
            transactions_unbatched: 0,
            confirmed_lsn: 0,
            last_event_at: 0,
            last_error_at: 0,
            started_at: 0,
            restart_requests: 0,
            slot_requests: 0,
            last_error_len: 0,
            last_error: [0; ERROR_CAPACITY],
            warnings_len: 0,
            warnings: [0; WARNINGS_CAPACITY],
            backfill_len: 0,
            backfill: [0; BACKFILL_CAPACITY],
        }
    }
}

unsafe impl PGRXSharedMemory for WorkerStatus {}

static STATUS: PgLwLock<WorkerStatus> = unsafe { PgLwLock::new(c"wal_listener_status") };
/// The running worker's pid, 0 when none: an atomic of its own, so that an
/// exit callback clears it without a lock, on every way out of the process.
static WORKER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"wal_listener_pid") };

/// Set in the postmaster when preloaded; backends inherit it through fork.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(STATUS);
    pg_shmem_init!(WORKER_PID);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// What the worker compares with its last look to see new requests.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Requests {
    pub restart: u64,
    pub slot: u64,
}

/// A new worker process starts: counters restart from zero, the pid is
/// published, and cleared again however the process ends.
pub fn worker_started(pid: i32, started_at: i64) -> Requests {
    let mut status = STATUS.exclusive();
    let requests = Requests { restart: status.restart_requests, slot: status.slot_requests };
    *status = WorkerStatus {
        started_at,
        state: State::Connecting as u8,
        restart_requests: requests.restart,
        slot_requests: requests.slot,
        ..WorkerStatus::default()
    };
    drop(status);
    WORKER_PID.get().store(pid, Ordering::Relaxed);
    unsafe { pg_sys::before_shmem_exit(Some(clear_pid), pg_sys::Datum::from(0)) };
    requests
}

#[pg_guard]
unsafe extern "C-unwind" fn clear_pid(_code: i32, _arg: pg_sys::Datum) {
    WORKER_PID.get().store(0, Ordering::Relaxed);
}

/// Counts a restart request and wakes the worker (SIGUSR1 sets its latch).
/// Returns false when no worker runs.
pub fn request_restart() -> bool {
    if !preloaded() {
        return false;
    }
    STATUS.exclusive().restart_requests += 1;
    wake_worker()
}

/// Asks the worker to retry creating its slot now; false when no worker runs.
pub fn request_slot() -> bool {
    if !preloaded() {
        return false;
    }
    STATUS.exclusive().slot_requests += 1;
    wake_worker()
}

fn wake_worker() -> bool {
    let pid = WORKER_PID.get().load(Ordering::Relaxed);
    pid != 0 && unsafe { libc::kill(pid, libc::SIGUSR1) } == 0
}

/// Copies the pipeline's status in; returns the request counters, read
/// under the same lock.
pub fn publish(snapshot: &StatusSnapshot) -> Requests {
    let mut status = STATUS.exclusive();
    status.state = snapshot.state as u8;
    status.nats_connected = snapshot.nats_connected;
    status.events_published = snapshot.events_published;
    status.events_filtered = snapshot.events_filtered;
    status.events_skipped = snapshot.events_skipped;
    status.transactions_unbatched = snapshot.transactions_unbatched;
    status.confirmed_lsn = snapshot.confirmed_lsn.0;
    status.last_event_at = snapshot.last_event_at;
    status.last_error_at = snapshot.last_error_at;
    status.last_error_len = copy_text(snapshot.last_error.as_deref().unwrap_or(""), &mut status.last_error);
    status.warnings_len = copy_text(&snapshot.warnings.join("\n"), &mut status.warnings);
    status.backfill_len = copy_text(snapshot.backfill.as_deref().unwrap_or(""), &mut status.backfill);
    Requests { restart: status.restart_requests, slot: status.slot_requests }
}

/// Copies as much of `text` as fits, cut at a char boundary; returns its length.
fn copy_text(text: &str, into: &mut [u8]) -> usize {
    let mut len = text.len().min(into.len());
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    into[..len].copy_from_slice(&text.as_bytes()[..len]);
    len
}

pub fn worker_stopped() {
    let mut status = STATUS.exclusive();
    status.state = State::Stopped as u8;
    status.nats_connected = false;
    drop(status);
    WORKER_PID.get().store(0, Ordering::Relaxed);
}

/// What `status()` shows.
pub struct StatusRow {
    pub state: &'static str,
    pub pid: Option<i32>,
    pub nats_connected: bool,
    pub events_published: i64,
    pub events_filtered: i64,
    pub events_skipped: i64,
    pub transactions_unbatched: i64,
    pub confirmed_lsn: u64,
    pub last_event_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    pub started_at: Option<i64>,
    pub warnings: Vec<String>,
    pub backfill: Option<String>,
}

/// Reads the status; `None` when the library was not preloaded.
pub fn read() -> Option<StatusRow> {
    if !preloaded() {
        return None;
    }
    let s = *STATUS.share();
    let pid = WORKER_PID.get().load(Ordering::Relaxed);
    let nonzero = |v: i64| Some(v).filter(|&v| v != 0);
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let state = match s.state {
        NOT_STARTED => "waiting",
        // The worker is gone (its exit callback cleared the pid), whatever it last wrote.
        _ if pid == 0 => State::Stopped.as_str(),
        state => State::from_u8(state).as_str(),
    };
    Some(StatusRow {
        state,
        pid: Some(pid).filter(|&p| p != 0),
        nats_connected: s.nats_connected,
        events_published: s.events_published as i64,
        events_filtered: s.events_filtered as i64,
        events_skipped: s.events_skipped as i64,
        transactions_unbatched: s.transactions_unbatched as i64,
        confirmed_lsn: s.confirmed_lsn,
        last_event_at: nonzero(s.last_event_at),
        last_error: Some(text(&s.last_error[..s.last_error_len])).filter(|e| !e.is_empty()),
        last_error_at: nonzero(s.last_error_at),
        started_at: nonzero(s.started_at),
        warnings: text(&s.warnings[..s.warnings_len]).lines().map(str::to_owned).collect(),
        backfill: Some(text(&s.backfill[..s.backfill_len])).filter(|b| !b.is_empty()),
    })
}
