//! The workers' status in shared memory, one entry per streamed database,
//! so `status()` and `cluster_status()` can read it from any backend. An
//! entry is written by its worker's main thread; other backends only bump
//! request counters, ask it to stop, and signal it.

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

/// Workers at most: entry 0 is the static worker's (`wal_listener.database`),
/// the others belong to the dynamic workers of further databases.
pub const MAX_WORKERS: usize = 32;
/// Room for a database name (NAMEDATALEN).
const NAME_CAPACITY: usize = 64;

/// Why a worker stops: after DROP EXTENSION or a rolled-back CREATE it exits
/// 0 for good (the postmaster forgets it); after DROP DATABASE it exits 1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stop {
    No,
    /// DROP EXTENSION committed at this LSN: publish up to it, then drop the slot.
    ExtensionDropped(u64),
    /// DROP DATABASE is waiting for the worker to leave.
    DatabaseDropped,
    /// Its CREATE EXTENSION rolled back: drop the slot and publication.
    Abandoned,
}

#[derive(Clone, Copy)]
struct Entry {
    /// OID of the database a dynamic worker streams; 0 = free (entry 0: the static worker).
    database: u32,
    stop: Stop,
    name_len: usize,
    name: [u8; NAME_CAPACITY],
    status: WorkerStatus,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            database: 0,
            stop: Stop::No,
            name_len: 0,
            name: [0; NAME_CAPACITY],
            status: WorkerStatus::default(),
        }
    }
}

#[derive(Clone, Copy)]
pub struct Table {
    entries: [Entry; MAX_WORKERS],
}

impl Default for Table {
    fn default() -> Self {
        Table { entries: [Entry::default(); MAX_WORKERS] }
    }
}

unsafe impl PGRXSharedMemory for Table {}

/// Each entry's running worker pid, 0 when none: atomics of their own, so
/// that an exit callback clears them without a lock, on every way out.
pub struct Pids([AtomicI32; MAX_WORKERS]);

impl Default for Pids {
    fn default() -> Self {
        Pids(std::array::from_fn(|_| AtomicI32::new(0)))
    }
}

unsafe impl PGRXSharedMemory for Pids {}

static TABLE: PgLwLock<Table> = unsafe { PgLwLock::new(c"wal_listener_workers") };
static PIDS: PgAtomic<Pids> = unsafe { PgAtomic::new(c"wal_listener_pids") };

/// Set in the postmaster when preloaded; backends inherit it through fork.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(TABLE);
    pg_shmem_init!(PIDS);
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
    pub stop: Stop,
}

fn pid_of(index: usize) -> i32 {
    PIDS.get().0[index].load(Ordering::Relaxed)
}

/// Whether `pid` is a live process (an entry's pid is cleared at exit, but
/// not when the process is killed; the cluster then resets anyway).
fn alive(pid: i32) -> bool {
    pid != 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// A new worker process takes its entry: the static worker entry 0, a
/// dynamic worker the one of its database or a free one. Counters restart
/// from zero, the pid is published and cleared again however the process
/// ends. `None` when another live worker streams that database (a second
/// registration) or every entry is taken.
pub fn worker_started(
    database: Option<u32>,
    name: &str,
    pid: i32,
    started_at: i64,
) -> Option<(usize, Requests)> {
    let mut table = TABLE.exclusive();
    let index = match database {
        None => 0,
        Some(oid) => {
            let same = (1..MAX_WORKERS).find(|&i| table.entries[i].database == oid);
            match same {
                Some(i) if alive(pid_of(i)) => return None,
                Some(i) => i,
                None => (1..MAX_WORKERS).find(|&i| table.entries[i].database == 0 && !alive(pid_of(i)))?,
            }
        }
    };
    let entry = &mut table.entries[index];
    // A stop request outlives a restart of the worker it was meant for.
    let stop = if entry.database == database.unwrap_or(0) { entry.stop } else { Stop::No };
    let requests =
        Requests { restart: entry.status.restart_requests, slot: entry.status.slot_requests, stop };
    entry.database = database.unwrap_or(0);
    entry.stop = stop;
    entry.name_len = copy_text(name, &mut entry.name);
    entry.status = WorkerStatus {
        started_at,
        state: State::Connecting as u8,
        restart_requests: requests.restart,
        slot_requests: requests.slot,
        ..WorkerStatus::default()
    };
    // Under the lock: a second worker of the same database must see it.
    PIDS.get().0[index].store(pid, Ordering::Relaxed);
    drop(table);
    unsafe { pg_sys::before_shmem_exit(Some(clear_pid), pg_sys::Datum::from(index)) };
    Some((index, requests))
}

#[pg_guard]
unsafe extern "C-unwind" fn clear_pid(_code: i32, index: pg_sys::Datum) {
    release_pid(index.value());
}

/// Clears the entry's pid if it is still ours (a successor may hold it).
fn release_pid(index: usize) {
    let own = unsafe { pg_sys::MyProcPid };
    let _ = PIDS.get().0[index].compare_exchange(own, 0, Ordering::Relaxed, Ordering::Relaxed);
}

/// Frees the entry of a database that no longer exists, if no worker runs in it.
pub fn forget_database(oid: u32) {
    let mut table = TABLE.exclusive();
    if let Some(i) = (1..MAX_WORKERS).find(|&i| table.entries[i].database == oid && !alive(pid_of(i))) {
        table.entries[i] = Entry::default();
    }
}

/// The entry of the worker that streams the current database, if any.
pub fn entry_of_this_database() -> Option<usize> {
    if !preloaded() {
        return None;
    }
    let this = unsafe { pg_sys::MyDatabaseId }.to_u32();
    if crate::worker::is_static_database(this) {
        return Some(0);
    }
    entry_of(this)
}

/// The entry of the dynamic worker of database `oid`.
pub fn entry_of(oid: u32) -> Option<usize> {
    let table = TABLE.share();
    (1..MAX_WORKERS).find(|&i| table.entries[i].database == oid)
}

/// Whether every entry for a further database is taken by a live worker.
pub fn full() -> bool {
    let table = TABLE.share();
    (1..MAX_WORKERS).all(|i| table.entries[i].database != 0 || alive(pid_of(i)))
}

/// Withdraws stop request `stop` (the extension exists after all, DROP
/// DATABASE failed); a different request made meanwhile stays.
pub fn clear_stop(index: usize, stop: Stop) {
    let mut table = TABLE.exclusive();
    if table.entries[index].stop == stop {
        table.entries[index].stop = Stop::No;
    }
}

/// Whether the entry's worker was told to stop for good.
pub fn stopping(index: usize) -> bool {
    TABLE.share().entries[index].stop != Stop::No
}

/// Databases other than `wal_listener.database` with a worker entry.
pub fn other_streamed_databases() -> usize {
    let table = TABLE.share();
    (1..MAX_WORKERS).filter(|&i| table.entries[i].database != 0).count()
}

/// Counts a restart request and wakes the worker (SIGUSR1 sets its latch).
/// Returns false when no worker runs.
pub fn request_restart(index: usize) -> bool {
    TABLE.exclusive().entries[index].status.restart_requests += 1;
    wake_worker(index)
}

/// Asks the worker to retry creating its slot now; false when no worker runs.
pub fn request_slot(index: usize) -> bool {
    TABLE.exclusive().entries[index].status.slot_requests += 1;
    wake_worker(index)
}

/// Tells a dynamic worker to stop for good; returns its pid, 0 when none runs.
pub fn request_stop(index: usize, stop: Stop) -> i32 {
    TABLE.exclusive().entries[index].stop = stop;
    wake_worker(index);
    pid_of(index)
}

/// The live pid of an entry's worker, if one runs.
pub fn running_pid(index: usize) -> Option<i32> {
    Some(pid_of(index)).filter(|&pid| alive(pid))
}

fn wake_worker(index: usize) -> bool {
    let pid = pid_of(index);
    pid != 0 && unsafe { libc::kill(pid, libc::SIGUSR1) } == 0
}

/// Copies the pipeline's status in; returns the requests, read under the same lock.
pub fn publish(index: usize, snapshot: &StatusSnapshot) -> Requests {
    let mut table = TABLE.exclusive();
    let entry = &mut table.entries[index];
    let status = &mut entry.status;
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
    Requests { restart: status.restart_requests, slot: status.slot_requests, stop: entry.stop }
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

/// The worker leaves; `for_good` (it stopped after a DROP) frees its entry.
pub fn worker_stopped(index: usize, for_good: bool) {
    let mut table = TABLE.exclusive();
    let entry = &mut table.entries[index];
    entry.status.state = State::Stopped as u8;
    entry.status.nats_connected = false;
    if for_good {
        *entry = Entry::default();
    }
    release_pid(index);
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

/// Reads an entry's status; `None` when the library was not preloaded.
pub fn read(index: Option<usize>) -> Option<StatusRow> {
    if !preloaded() {
        return None;
    }
    Some(match index {
        Some(index) => row(&TABLE.share().entries[index].status, pid_of(index)),
        None => row(&WorkerStatus::default(), 0),
    })
}

/// Every entry in use: its database's OID (`None`: the static worker's),
/// name and status, for `cluster_status()`.
pub fn read_all() -> Vec<(Option<u32>, String, StatusRow)> {
    if !preloaded() {
        return Vec::new();
    }
    let table = *TABLE.share();
    (0..MAX_WORKERS)
        .filter(|&i| if i == 0 { table.entries[0].name_len > 0 } else { table.entries[i].database != 0 })
        .map(|i| {
            let entry = &table.entries[i];
            let name = String::from_utf8_lossy(&entry.name[..entry.name_len]).into_owned();
            (Some(entry.database).filter(|_| i > 0), name, row(&entry.status, pid_of(i)))
        })
        .collect()
}

fn row(s: &WorkerStatus, pid: i32) -> StatusRow {
    let nonzero = |v: i64| Some(v).filter(|&v| v != 0);
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let state = match s.state {
        NOT_STARTED => "waiting",
        // The worker is gone (its exit callback cleared the pid), whatever it last wrote.
        _ if pid == 0 => State::Stopped.as_str(),
        state => State::from_u8(state).as_str(),
    };
    StatusRow {
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
    }
}
