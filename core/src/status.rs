//! What the pipeline tells its host: state, counters, errors and log lines.
//! Written from async tasks with atomics and short mutexes; the host copies
//! it into shared memory on its own thread (tasks never call Postgres).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::audit::Held;
use crate::Lsn;

/// The pipeline's state, as `status()` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Not ready to stream yet (extension not created, standby); says why in `last_error`.
    Waiting = 0,
    Connecting = 1,
    Streaming = 2,
    /// Failed; retrying after a delay.
    Backoff = 3,
    Stopped = 4,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Connecting => "connecting",
            State::Streaming => "streaming",
            State::Backoff => "backoff",
            State::Stopped => "stopped",
        }
    }

    pub fn from_u8(v: u8) -> State {
        match v {
            0 => State::Waiting,
            1 => State::Connecting,
            2 => State::Streaming,
            3 => State::Backoff,
            _ => State::Stopped,
        }
    }
}

/// Severity of a log line the host should write to the server log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// Which check a warning comes from: each check replaces its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarningSource {
    /// Server settings read at connect (e.g. `synchronous_standby_names`).
    Postgres,
    /// Which JetStream stream stores the subjects the worker publishes to.
    Streams,
}

/// A copy of the status at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    pub state: State,
    pub nats_connected: bool,
    pub events_published: u64,
    pub events_filtered: u64,
    /// Left out by `oversize_policy = skip`.
    pub events_skipped: u64,
    /// Transactions sent one event at a time in `publish_mode = transaction`.
    pub transactions_unbatched: u64,
    /// Highest LSN reported to the walsender as flushed.
    pub confirmed_lsn: Lsn,
    /// Unix microseconds; 0 = never.
    pub last_event_at: i64,
    pub last_error: Option<String>,
    /// Unix microseconds; 0 = never.
    pub last_error_at: i64,
    /// The setup audit's findings: what to change, one line each.
    pub warnings: Vec<String>,
    /// The running backfill's progress, if one runs.
    pub backfill: Option<String>,
}

/// Keeps at most this many unread log lines: a host that stops reading
/// must not make the pipeline grow without bound.
const MAX_PENDING_LOG_LINES: usize = 256;

/// Progress (events published) wakes the host at most this often.
const PROGRESS_WAKE_INTERVAL_US: i64 = 100_000;

/// Shared between the pipeline (writer) and its host (reader).
pub struct StatusBoard {
    state: AtomicU8,
    nats_connected: AtomicBool,
    events_published: AtomicU64,
    events_filtered: AtomicU64,
    events_skipped: AtomicU64,
    transactions_unbatched: AtomicU64,
    /// Kept across sessions: transactions committed up to this position are
    /// sent one event at a time (after an atomic batch was refused as a
    /// duplicate, see the streamer).
    per_event_until: AtomicU64,
    confirmed_lsn: AtomicU64,
    last_event_at: AtomicI64,
    /// When progress last woke the host (unix microseconds).
    last_progress_wake: AtomicI64,
    last_error: Mutex<Option<(String, i64)>>,
    /// Whether `last_error` says why the worker waits (not an error): a
    /// session that streams clears it.
    last_error_is_waiting: AtomicBool,
    /// Why the server sends no change although a session streams (see
    /// `audit::held_by_standby_slots`): `status()` then says `waiting`.
    held: Mutex<Option<(String, i64)>>,
    /// An uncertain reason seen once, shown when seen again next time.
    held_once: Mutex<Option<String>>,
    warnings: Mutex<Vec<(WarningSource, Vec<String>)>>,
    backfill: Mutex<Option<String>>,
    /// Whether a session holds the slot and streams (publishing or not).
    slot_active: AtomicBool,
    /// The stream reached the DROP EXTENSION of this database (see `DROPPED_MARKER_PREFIX`).
    extension_dropped: AtomicBool,
    log: Mutex<VecDeque<LogLine>>,
    /// Wakes the host (an eventfd write in the extension); must not block.
    wake_host: Box<dyn Fn() + Send + Sync>,
}

impl StatusBoard {
    pub fn new(wake_host: Box<dyn Fn() + Send + Sync>) -> Self {
        StatusBoard {
            state: AtomicU8::new(State::Connecting as u8),
            nats_connected: AtomicBool::new(false),
            events_published: AtomicU64::new(0),
            events_filtered: AtomicU64::new(0),
            events_skipped: AtomicU64::new(0),
            transactions_unbatched: AtomicU64::new(0),
            per_event_until: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            last_event_at: AtomicI64::new(0),
            last_progress_wake: AtomicI64::new(0),
            last_error: Mutex::new(None),
            last_error_is_waiting: AtomicBool::new(false),
            held: Mutex::new(None),
            held_once: Mutex::new(None),
            warnings: Mutex::new(Vec::new()),
            backfill: Mutex::new(None),
            slot_active: AtomicBool::new(false),
            extension_dropped: AtomicBool::new(false),
            log: Mutex::new(VecDeque::new()),
            wake_host,
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// A session that starts streaming also ends the wait `last_error`
    /// told of (e.g. "server is a standby" after a promotion).
    pub fn set_state(&self, state: State) {
        if state == State::Streaming && self.last_error_is_waiting.swap(false, Ordering::Relaxed) {
            *lock(&self.last_error) = None;
        }
        if self.state.swap(state as u8, Ordering::Relaxed) != state as u8 {
            (self.wake_host)();
        }
    }

    /// Records (or clears, with `None`) why the server holds back every
    /// change; logged when it changes.
    pub fn set_held(&self, held: Option<Held>) {
        // Already holding for another reason: the new one replaces it at once.
        let holding = lock(&self.held).is_some();
        let reason = {
            let mut once = lock(&self.held_once);
            match held {
                Some(Held { reason, certain: false }) if !holding && once.as_ref() != Some(&reason) => {
                    *once = Some(reason);
                    return;
                }
                Some(Held { reason, .. }) => {
                    *once = None;
                    Some(reason)
                }
                None => {
                    *once = None;
                    None
                }
            }
        };
        let mut held = lock(&self.held);
        if held.as_ref().map(|(shown, _)| shown) == reason.as_ref() {
            return;
        }
        let line = match &reason {
            Some(why) => (LogLevel::Warning, why.clone()),
            None => {
                (LogLevel::Info, "the server sends changes again (synchronized_standby_slots)".to_owned())
            }
        };
        *held = reason.map(|why| (why, unix_micros_now()));
        drop(held);
        self.log(line.0, line.1);
    }

    pub fn set_nats_connected(&self, connected: bool) {
        self.nats_connected.store(connected, Ordering::Relaxed);
    }

    pub fn add_published(&self, count: u64) {
        self.events_published.fetch_add(count, Ordering::Relaxed);
        let now = unix_micros_now();
        self.last_event_at.store(now, Ordering::Relaxed);
        // Fresh counters in status() without waking the host per event.
        let last_wake = self.last_progress_wake.load(Ordering::Relaxed);
        if now - last_wake >= PROGRESS_WAKE_INTERVAL_US
            && self
                .last_progress_wake
                .compare_exchange(last_wake, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            (self.wake_host)();
        }
    }

    pub fn add_filtered(&self, count: u64) {
        self.events_filtered.fetch_add(count, Ordering::Relaxed);
    }

    pub fn add_skipped(&self, count: u64) {
        self.events_skipped.fetch_add(count, Ordering::Relaxed);
    }

    pub fn add_unbatched(&self, count: u64) {
        self.transactions_unbatched.fetch_add(count, Ordering::Relaxed);
    }

    pub fn per_event_until(&self) -> Lsn {
        Lsn(self.per_event_until.load(Ordering::Relaxed))
    }

    pub fn set_per_event_until(&self, lsn: Lsn) {
        self.per_event_until.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub fn set_confirmed_lsn(&self, lsn: Lsn) {
        self.confirmed_lsn.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub fn set_slot_active(&self, active: bool) {
        self.slot_active.store(active, Ordering::Relaxed);
    }

    pub fn slot_active(&self) -> bool {
        self.slot_active.load(Ordering::Relaxed)
    }

    /// Everything before the DROP EXTENSION is acked and nothing after it
    /// was published: the host may stop for good and drop the slot.
    pub fn set_extension_dropped(&self) {
        self.extension_dropped.store(true, Ordering::Relaxed);
        (self.wake_host)();
    }

    pub fn extension_dropped(&self) -> bool {
        self.extension_dropped.load(Ordering::Relaxed)
    }

    /// Replaces the findings of one check; a finding that is new is also
    /// logged as a WARNING (once, not at every reconnect).
    pub fn set_warnings(&self, source: WarningSource, findings: Vec<String>) {
        let mut warnings = lock(&self.warnings);
        let previous = match warnings.iter_mut().find(|(s, _)| *s == source) {
            Some((_, lines)) => std::mem::replace(lines, findings.clone()),
            None => {
                warnings.push((source, findings.clone()));
                Vec::new()
            }
        };
        drop(warnings);
        for line in findings.into_iter().filter(|line| !previous.contains(line)) {
            self.log(LogLevel::Warning, line);
        }
        (self.wake_host)();
    }

    pub fn set_backfill(&self, progress: Option<String>) {
        let mut backfill = lock(&self.backfill);
        if *backfill != progress {
            *backfill = progress;
            drop(backfill);
            (self.wake_host)();
        }
    }

    /// Records an error for `status()` and logs it as a warning.
    pub fn report_error(&self, message: String) {
        *lock(&self.last_error) = Some((message.clone(), unix_micros_now()));
        self.last_error_is_waiting.store(false, Ordering::Relaxed);
        self.log(LogLevel::Warning, message);
    }

    /// Shows why nothing flows; logged only when the reason changes, so a
    /// wait that retries in a loop logs once.
    pub fn report_waiting(&self, reason: String) {
        let mut last = lock(&self.last_error);
        if last.as_ref().is_some_and(|(shown, _)| *shown == reason) {
            return;
        }
        *last = Some((reason.clone(), unix_micros_now()));
        self.last_error_is_waiting.store(true, Ordering::Relaxed);
        drop(last);
        self.log(LogLevel::Info, reason);
    }

    pub fn log(&self, level: LogLevel, message: String) {
        let mut log = lock(&self.log);
        if log.len() == MAX_PENDING_LOG_LINES {
            log.pop_front();
        }
        log.push_back(LogLine { level, message });
        drop(log);
        (self.wake_host)();
    }

    /// Takes the log lines written since the last call.
    pub fn drain_log(&self) -> Vec<LogLine> {
        lock(&self.log).drain(..).collect()
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let mut state = self.state();
        let held = lock(&self.held).clone();
        let (last_error, last_error_at) = match (&held, &*lock(&self.last_error)) {
            (Some((why, at)), _) if state == State::Streaming => {
                state = State::Waiting;
                (Some(why.clone()), *at)
            }
            (_, Some((message, at))) => (Some(message.clone()), *at),
            (_, None) => (None, 0),
        };
        StatusSnapshot {
            state,
            nats_connected: self.nats_connected.load(Ordering::Relaxed),
            events_published: self.events_published.load(Ordering::Relaxed),
            events_filtered: self.events_filtered.load(Ordering::Relaxed),
            events_skipped: self.events_skipped.load(Ordering::Relaxed),
            transactions_unbatched: self.transactions_unbatched.load(Ordering::Relaxed),
            confirmed_lsn: Lsn(self.confirmed_lsn.load(Ordering::Relaxed)),
            last_event_at: self.last_event_at.load(Ordering::Relaxed),
            last_error,
            last_error_at,
            warnings: lock(&self.warnings).iter().flat_map(|(_, lines)| lines.iter().cloned()).collect(),
            backfill: lock(&self.backfill).clone(),
        }
    }
}

/// A poisoned lock only means a task panicked mid-update of plain data: keep going.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn unix_micros_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wakes_host_on_state_change_log_and_rate_limited_progress() {
        let wakes = Arc::new(AtomicU64::new(0));
        let counter = wakes.clone();
        let board = StatusBoard::new(Box::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        board.set_state(State::Streaming);
        board.set_state(State::Streaming);
        assert_eq!(wakes.load(Ordering::Relaxed), 1);
        board.add_published(2);
        board.add_published(1);
        assert_eq!(wakes.load(Ordering::Relaxed), 2, "progress wakes once per interval");
        board.report_error("boom".into());
        assert_eq!(wakes.load(Ordering::Relaxed), 3);
        let snap = board.snapshot();
        assert_eq!((snap.state, snap.events_published), (State::Streaming, 3));
        assert_eq!(snap.last_error.as_deref(), Some("boom"));
        assert_eq!(board.drain_log(), vec![LogLine { level: LogLevel::Warning, message: "boom".into() }]);
        assert!(board.drain_log().is_empty());
    }

    #[test]
    fn warnings_replace_their_source_and_are_logged_once() {
        let board = StatusBoard::new(Box::new(|| {}));
        board.set_warnings(WarningSource::Streams, vec!["a".into()]);
        board.set_warnings(WarningSource::Postgres, vec!["b".into()]);
        board.set_warnings(WarningSource::Streams, vec!["a".into(), "c".into()]);
        assert_eq!(board.snapshot().warnings, vec!["a", "c", "b"]);
        let logged: Vec<String> = board.drain_log().into_iter().map(|l| l.message).collect();
        assert_eq!(logged, vec!["a", "b", "c"]);
        board.set_warnings(WarningSource::Streams, vec![]);
        assert_eq!(board.snapshot().warnings, vec!["b"]);
    }

    #[test]
    fn log_is_bounded_and_lsn_never_moves_back() {
        let board = StatusBoard::new(Box::new(|| {}));
        for i in 0..1000 {
            board.log(LogLevel::Info, i.to_string());
        }
        let lines = board.drain_log();
        assert_eq!(lines.len(), MAX_PENDING_LOG_LINES);
        assert_eq!(lines.last().unwrap().message, "999");
        board.set_confirmed_lsn(Lsn(10));
        board.set_confirmed_lsn(Lsn(5));
        assert_eq!(board.snapshot().confirmed_lsn, Lsn(10));
    }

    #[test]
    fn a_wait_is_logged_once_and_ends_when_a_session_streams_but_an_error_stays() {
        let board = StatusBoard::new(Box::new(|| {}));
        for _ in 0..3 {
            board.report_waiting("server is a standby".into());
        }
        assert_eq!(board.drain_log().len(), 1);
        board.set_state(State::Waiting);
        board.set_state(State::Streaming);
        assert_eq!(board.snapshot().last_error, None);
        board.report_error("boom".into());
        board.set_state(State::Streaming);
        assert_eq!(board.snapshot().last_error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_server_that_holds_changes_shows_waiting_with_the_reason_while_streaming() {
        let board = StatusBoard::new(Box::new(|| {}));
        board.set_state(State::Streaming);
        let held = |certain| Some(Held { reason: "held".into(), certain });
        board.set_held(held(false));
        assert_eq!(board.snapshot().state, State::Streaming, "a standby may be reconnecting");
        board.set_held(None);
        board.set_held(held(false));
        assert_eq!(board.snapshot().state, State::Streaming, "not twice in a row");
        board.set_held(held(false));
        assert_eq!(board.snapshot().state, State::Waiting);
        board.set_held(Some(Held { reason: "other".into(), certain: false }));
        assert_eq!(board.snapshot().last_error.as_deref(), Some("other"), "still held: the reason follows");
        board.set_held(None);
        board.set_held(held(true));
        let snap = board.snapshot();
        assert_eq!((snap.state, snap.last_error.as_deref()), (State::Waiting, Some("held")));
        board.set_state(State::Backoff);
        assert_eq!(board.snapshot().state, State::Backoff);
        board.set_state(State::Streaming);
        board.set_held(None);
        assert_eq!((board.snapshot().state, board.snapshot().last_error), (State::Streaming, None));
        let levels: Vec<LogLevel> = board.drain_log().into_iter().map(|l| l.level).collect();
        assert_eq!(
            levels,
            vec![LogLevel::Warning, LogLevel::Warning, LogLevel::Info, LogLevel::Warning, LogLevel::Info]
        );
    }
}
