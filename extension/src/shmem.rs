//! The worker's status in shared memory, so `status()` can read it from any
//! backend. Written only by the worker's main thread.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use wal_listener_core::status::{State, StatusSnapshot};

/// Longest last-error text kept; longer messages are cut at a char boundary.
const ERROR_CAPACITY: usize = 1024;

#[derive(Clone, Copy)]
pub struct WorkerStatus {
    /// `State as u8`; `NOT_STARTED` until a worker has run.
    state: u8,
    pid: i32,
    nats_connected: bool,
    events_published: u64,
    events_filtered: u64,
    events_skipped: u64,
    confirmed_lsn: u64,
    /// Unix microseconds, 0 = never.
    last_event_at: i64,
    last_error_at: i64,
    started_at: i64,
    /// Bumped by `restart()`; the worker restarts when it sees a new value.
    restart_requests: u64,
    last_error_len: usize,
    last_error: [u8; ERROR_CAPACITY],
}

const NOT_STARTED: u8 = u8::MAX;

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            state: NOT_STARTED,
            pid: 0,
            nats_connected: false,
            events_published: 0,
            events_filtered: 0,
            events_skipped: 0,
            confirmed_lsn: 0,
            last_event_at: 0,
            last_error_at: 0,
            started_at: 0,
            restart_requests: 0,
            last_error_len: 0,
            last_error: [0; ERROR_CAPACITY],
        }
    }
}

unsafe impl PGRXSharedMemory for WorkerStatus {}

static STATUS: PgLwLock<WorkerStatus> = unsafe { PgLwLock::new(c"wal_listener_status") };

/// Set in the postmaster when preloaded; backends inherit it through fork.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(STATUS);
    PRELOADED.store(true, Ordering::Relaxed);
}

/// A new worker process starts: counters restart from zero. Returns the
/// restart-request count to compare later ones against.
pub fn worker_started(pid: i32, started_at: i64) -> u64 {
    let mut status = STATUS.exclusive();
    let restart_requests = status.restart_requests;
    *status = WorkerStatus {
        pid,
        started_at,
        state: State::Connecting as u8,
        restart_requests,
        ..WorkerStatus::default()
    };
    restart_requests
}

/// Counts a restart request and wakes the worker (SIGUSR1 sets its latch).
/// Returns false when no worker runs.
pub fn request_restart() -> bool {
    if !PRELOADED.load(Ordering::Relaxed) {
        return false;
    }
    let pid = {
        let mut status = STATUS.exclusive();
        status.restart_requests += 1;
        status.pid
    };
    pid != 0 && unsafe { libc::kill(pid, libc::SIGUSR1) } == 0
}

/// Copies the pipeline's status in; returns the restart-request count,
/// read under the same lock.
pub fn publish(snapshot: &StatusSnapshot) -> u64 {
    let mut status = STATUS.exclusive();
    status.state = snapshot.state as u8;
    status.nats_connected = snapshot.nats_connected;
    status.events_published = snapshot.events_published;
    status.events_filtered = snapshot.events_filtered;
    status.events_skipped = snapshot.events_skipped;
    status.confirmed_lsn = snapshot.confirmed_lsn.0;
    status.last_event_at = snapshot.last_event_at;
    status.last_error_at = snapshot.last_error_at;
    let error = snapshot.last_error.as_deref().unwrap_or("");
    let mut len = error.len().min(ERROR_CAPACITY);
    while !error.is_char_boundary(len) {
        len -= 1;
    }
    status.last_error[..len].copy_from_slice(&error.as_bytes()[..len]);
    status.last_error_len = len;
    status.restart_requests
}

pub fn worker_stopped() {
    let mut status = STATUS.exclusive();
    status.state = State::Stopped as u8;
    status.pid = 0;
    status.nats_connected = false;
}

/// What `status()` shows.
pub struct StatusRow {
    pub state: &'static str,
    pub pid: Option<i32>,
    pub nats_connected: bool,
    pub events_published: i64,
    pub events_filtered: i64,
    pub events_skipped: i64,
    pub confirmed_lsn: u64,
    pub last_event_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    pub started_at: Option<i64>,
}

/// Reads the status; `None` when the library was not preloaded.
pub fn read() -> Option<StatusRow> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    let s = *STATUS.share();
    let nonzero = |v: i64| Some(v).filter(|&v| v != 0);
    Some(StatusRow {
        state: if s.state == NOT_STARTED { "waiting" } else { State::from_u8(s.state).as_str() },
        pid: Some(s.pid).filter(|&p| p != 0),
        nats_connected: s.nats_connected,
        events_published: s.events_published as i64,
        events_filtered: s.events_filtered as i64,
        events_skipped: s.events_skipped as i64,
        confirmed_lsn: s.confirmed_lsn,
        last_event_at: nonzero(s.last_event_at),
        last_error: Some(String::from_utf8_lossy(&s.last_error[..s.last_error_len]).into_owned())
            .filter(|e| !e.is_empty()),
        last_error_at: nonzero(s.last_error_at),
        started_at: nonzero(s.started_at),
    })
}
