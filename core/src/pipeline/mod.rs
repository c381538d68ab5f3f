//! The pipeline: slot → decode → event → JetStream, with the flush LSN
//! confirmed only for transactions whose every event is acked (DESIGN.md
//! rules 3–5), and a supervisor that restarts it from the slot after failures.

mod before_extension;
pub use before_extension::extension_exists;
mod read_ahead;
mod streamer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use crate::backfill;
use crate::config::{redact_url, PipelineConfig};
use crate::park_linger::PARK_LINGER;
use crate::publish::Publisher;
use crate::replication::{self, Capture, OpenError};
use crate::slot_watch;
use crate::status::{LogLevel, State, StatusBoard, WarningSource};
use crate::Error;
use streamer::{BackfillLink, Start, Streamer};

/// How long to wait before checking again when streaming cannot start yet.
const NOT_READY_RETRY: Duration = Duration::from_secs(2);

/// What the host may ask of a running pipeline.
#[derive(Default, Clone)]
pub struct Requests {
    /// Drop the connections and start over from the slot at once.
    pub restart: Arc<Notify>,
    /// Cut a pause short (CREATE EXTENSION waits for the slot); a running
    /// session is left alone.
    pub retry_now: Arc<Notify>,
}

/// Runs the pipeline until `shutdown` becomes true. Every failure is
/// reported on `board`, followed by a growing delay and a restart from the
/// slot's confirmed position; a new config restarts it at once.
pub async fn run_supervised(
    mut config: watch::Receiver<PipelineConfig>,
    board: Arc<StatusBoard>,
    requests: Requests,
    mut shutdown: watch::Receiver<bool>,
) {
    let Requests { restart, retry_now } = requests;
    let slot_watch = tokio::spawn(slot_watch::run(config.clone(), board.clone()));
    let mut delay: Option<Duration> = None;
    let mut waiting_reason: Option<String> = None;
    while !*shutdown.borrow() {
        let cfg = config.borrow_and_update().clone();
        #[cfg(feature = "fault-injection")]
        if cfg.inject_fault == Some(crate::failpoints::InjectedFault::SupervisorPanic) {
            panic!("injected by wal_listener.inject_fault = supervisor_panic");
        }
        if waiting_reason.is_none() {
            board.set_state(State::Connecting);
        }
        let started = Instant::now();
        // A task of its own, so that a panic anywhere in it is caught here and
        // reported, and so that shutdown or a new config can abort it.
        let mut attempt = tokio::spawn(run_once(cfg.clone(), board.clone()));
        let outcome = tokio::select! {
            joined = &mut attempt => match joined {
                Ok(outcome) => outcome,
                Err(e) => Err(OpenError::Failed(Error::Replication(format!("internal error: pipeline task {e}")))),
            },
            _ = config_changed(&mut config) => {
                attempt.abort();
                board.log(LogLevel::Info, "configuration changed; reconnecting".into());
                delay = None;
                continue;
            }
            _ = restart.notified() => {
                attempt.abort();
                board.log(LogLevel::Info, "restart requested; reconnecting".into());
                delay = None;
                continue;
            }
            _ = stop_requested(&mut shutdown) => {
                attempt.abort();
                break;
            }
        };
        let pause = match outcome {
            // The extension's transaction arrived and is visible: publish.
            Ok(()) => continue,
            Err(OpenError::NotReady { reason, warnings }) => {
                board.set_warnings(WarningSource::Postgres, warnings);
                board.set_state(State::Waiting);
                if waiting_reason.as_ref() != Some(&reason) {
                    board.report_waiting(reason.clone());
                    waiting_reason = Some(reason);
                }
                NOT_READY_RETRY
            }
            Err(OpenError::Failed(Error::Restart(why))) => {
                board.log(LogLevel::Info, format!("restarting the session: {why}"));
                delay = None;
                continue;
            }
            Err(OpenError::Failed(error)) => {
                waiting_reason = None;
                // A session that streamed for a while earns a fresh, short delay.
                let next = match delay {
                    Some(d) if started.elapsed() < cfg.max_backoff => (d * 2).min(cfg.max_backoff),
                    _ => cfg.min_backoff,
                };
                delay = Some(next);
                board.set_state(State::Backoff);
                board.report_error(format!("{error}; retrying in {} s", next.as_secs_f64()));
                next
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = config_changed(&mut config) => { delay = None; }
            _ = restart.notified() => { delay = None; }
            _ = retry_now.notified() => {}
            _ = stop_requested(&mut shutdown) => {}
        }
    }
    slot_watch.abort();
    board.set_nats_connected(false);
    board.set_state(State::Stopped);
}

/// Resolves when the host asks to stop, or is gone.
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves when the host sends a new config; never once it dropped the sender.
async fn config_changed(config: &mut watch::Receiver<PipelineConfig>) {
    if config.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One session: connect, stream until something fails. Returns `Ok` when
/// a new session should start at once (the extension was created).
async fn run_once(cfg: PipelineConfig, board: Arc<StatusBoard>) -> Result<(), OpenError> {
    // Session start is round trips (SQL, NATS): no linger until it streams.
    let starting = PARK_LINGER.hold();
    let session = replication::open(&cfg.source).await?;
    let cfg = PipelineConfig { source: session.source.clone(), ..cfg };
    board.set_warnings(WarningSource::Postgres, session.warnings.clone());
    board.set_confirmed_lsn(session.start_lsn);
    let _slot_held = SlotHeld::new(&board);
    let ended = match session.capture {
        Capture::BeforeExtension => {
            board.set_state(State::Waiting);
            board.report_waiting(format!(
                "waiting for CREATE EXTENSION wal_listener in database \"{}\"; slot \"{}\" is ready, so \
                 every change committed from CREATE EXTENSION on will be published",
                cfg.source.database, cfg.source.slot
            ));
            drop(starting);
            return before_extension::skip_until_created(
                session.client,
                session.start_lsn,
                &cfg.source,
                &board,
            )
            .await
            .map_err(OpenError::Failed);
        }
        Capture::Publishing { from, filters } => {
            let publisher = Publisher::connect(&cfg.publish, &board).await?;
            board.set_held(session.held);
            board.set_state(State::Streaming);
            board.log(
                LogLevel::Info,
                format!(
                    "streaming slot \"{}\" from {} to NATS {}",
                    cfg.source.slot,
                    session.start_lsn,
                    redact_url(&cfg.publish.nats_url)
                ),
            );
            // Backfills run beside the streamer, and end with this session.
            let (backfill, _backfill_task) = if cfg.source.require_extension {
                // A few attempts' messages: the streamer takes them at every
                // change, watermark and keepalive.
                let (to_streamer, from_task) = mpsc::channel(64);
                let (done_tx, done_rx) = mpsc::unbounded_channel();
                let run = session_token();
                let task = tokio::spawn(backfill::run(
                    cfg.source.clone(),
                    cfg.source.publication.clone(),
                    board.clone(),
                    run,
                    to_streamer,
                    done_rx,
                ));
                (Some(BackfillLink { run, from_task, done: done_tx }), Some(AbortOnDrop(task)))
            } else {
                (None, None)
            };
            let start = Start {
                client: session.client,
                system_identifier: session.system_identifier,
                confirmed: session.start_lsn,
                capture_from: from,
                filters,
                backfill,
                token: session_token(),
            };
            drop(starting);
            Streamer::new(start, publisher, &cfg, board.clone()).run().await
        }
    };
    Err(OpenError::Failed(ended))
}

/// Aborts a task when the session that spawned it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A random number per session (63 bits, from the OS): it names the
/// session's backfill watermarks, which any role may imitate with
/// `pg_logical_emit_message` unless it cannot guess them, and it is part of
/// atomic batch ids.
fn session_token() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No OS randomness: still differs between sessions.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = (nanos ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    u64::from_le_bytes(bytes) & (i64::MAX as u64)
}

/// Marks the slot as held by a session for as long as it lives (heartbeats
/// are written only then).
struct SlotHeld<'b>(&'b StatusBoard);

impl<'b> SlotHeld<'b> {
    fn new(board: &'b StatusBoard) -> Self {
        board.set_slot_active(true);
        SlotHeld(board)
    }
}

impl Drop for SlotHeld<'_> {
    fn drop(&mut self) {
        self.0.set_slot_active(false);
    }
}
