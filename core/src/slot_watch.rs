//! Watches the slot beside the pipeline, from short side sessions: warns
//! before `max_slot_wal_keep_size` invalidates it, refreshes the setup
//! audit of the server's settings, and writes heartbeats so
//! that a database whose own tables are quiet still moves the slot along
//! (DESIGN.md section 7). It runs while the pipeline backs off too: that is
//! when WAL piles up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::PipelineConfig;
use crate::replication::slot::{self, SlotRetention};
use crate::status::{LogLevel, State, StatusBoard, WarningSource};

/// How often retention is checked when heartbeats are off or rarer.
const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Share of `max_slot_wal_keep_size` past which the log gets a WARNING.
const WARN_PERCENT: f64 = 80.0;
/// While retention stays past the mark, the warning is repeated this often.
const REPEAT_WARNING: Duration = Duration::from_secs(300);

pub async fn run(config: watch::Receiver<PipelineConfig>, board: Arc<StatusBoard>) {
    let mut last_heartbeat = Instant::now();
    let mut warning = RetentionWarning::default();
    let mut last_failure = None;
    loop {
        let cfg = config.borrow().clone();
        let heartbeat_interval = cfg.heartbeat_interval;
        let tick = match heartbeat_interval {
            Duration::ZERO => CHECK_INTERVAL,
            interval => interval.min(CHECK_INTERVAL),
        };
        tokio::time::sleep(tick).await;
        // Until a session held the slot once, there may be no database or slot to look at.
        let slot_active = board.slot_active();
        if !slot_active && board.state() != State::Backoff {
            continue;
        }
        let heartbeat = slot_active
            && !heartbeat_interval.is_zero()
            && last_heartbeat.elapsed() + tick / 2 >= heartbeat_interval;
        match slot::check(&cfg.source, heartbeat).await {
            Ok(checked) => {
                if heartbeat {
                    last_heartbeat = Instant::now();
                }
                board.set_warnings(WarningSource::Postgres, checked.audit.warnings);
                board.set_held(checked.audit.held);
                if let Some(line) =
                    checked.retention.and_then(|r| warning.check(&r, &checked.slot, Instant::now()))
                {
                    board.log(line.0, line.1);
                }
                last_failure = None;
            }
            // The pipeline reports connection trouble; say once why checks fail.
            Err(e) => {
                let message = format!("checking slot retention failed: {e}");
                if last_failure.as_ref() != Some(&message) {
                    board.log(LogLevel::Warning, message.clone());
                    last_failure = Some(message);
                }
            }
        }
    }
}

/// Decides when retention deserves a log line: a WARNING when it passes
/// [`WARN_PERCENT`] and every [`REPEAT_WARNING`] while it stays there, and
/// one line when it is back under.
#[derive(Default)]
struct RetentionWarning {
    warned_at: Option<Instant>,
}

impl RetentionWarning {
    fn check(&mut self, retention: &SlotRetention, slot: &str, now: Instant) -> Option<(LogLevel, String)> {
        let percent = retention.percent_of_limit()?;
        if percent < WARN_PERCENT {
            return self.warned_at.take().map(|_| {
                (
                    LogLevel::Info,
                    format!(
                        "replication slot \"{slot}\" retains {percent:.0} % of max_slot_wal_keep_size again"
                    ),
                )
            });
        }
        if self.warned_at.is_some_and(|at| now.duration_since(at) < REPEAT_WARNING) {
            return None;
        }
        self.warned_at = Some(now);
        Some((
            LogLevel::Warning,
            format!(
                "replication slot \"{slot}\" retains {} MB of WAL, {percent:.0} % of max_slot_wal_keep_size \
                 ({} MB); at 100 % the server invalidates it and changes are lost: get the worker streaming \
                 (see wal_listener.status()) or raise max_slot_wal_keep_size",
                retention.retained_bytes >> 20,
                retention.limit_bytes.unwrap_or(0) >> 20,
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention(retained_mb: u64, limit_mb: Option<u64>) -> SlotRetention {
        SlotRetention { retained_bytes: retained_mb << 20, limit_bytes: limit_mb.map(|l| l << 20) }
    }

    #[test]
    fn warns_past_the_mark_then_repeats_rarely_and_says_when_it_is_back() {
        let mut warning = RetentionWarning::default();
        let start = Instant::now();
        assert_eq!(warning.check(&retention(100, None), "s", start), None, "no limit, no warning");
        assert_eq!(warning.check(&retention(79, Some(100)), "s", start), None);
        let (level, text) = warning.check(&retention(81, Some(100)), "s", start).unwrap();
        assert_eq!(level, LogLevel::Warning);
        assert!(text.contains("81 % of max_slot_wal_keep_size (100 MB)"), "{text}");
        assert_eq!(warning.check(&retention(90, Some(100)), "s", start + Duration::from_secs(60)), None);
        let again = warning.check(&retention(90, Some(100)), "s", start + REPEAT_WARNING);
        assert_eq!(again.map(|l| l.0), Some(LogLevel::Warning));
        let back = warning.check(&retention(10, Some(100)), "s", start + REPEAT_WARNING);
        assert_eq!(back.map(|l| l.0), Some(LogLevel::Info));
        assert_eq!(warning.check(&retention(10, Some(100)), "s", start + REPEAT_WARNING), None);
    }
}
