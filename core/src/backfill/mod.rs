//! Backfills: the rows a table already has, as `READ` events consistent
//! with the live stream (DESIGN.md section 6, the DBLog algorithm). A task
//! beside the streamer reads the table in key chunks, each between a low
//! and a high watermark written into the WAL; the streamer emits the chunk
//! when the stream reaches its high watermark, without the rows that
//! changed in between ([`window`]). No table is written but the job's
//! progress, which is saved once a chunk's events are all acked, so a
//! restart resumes after the last finished chunk.

pub mod store;
pub mod window;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::SourceConfig;
use crate::park_linger::PARK_LINGER;
use crate::replication::connection::{is_transient, sqlstate, Sql};
use crate::status::{LogLevel, StatusBoard};
use crate::Error;
use store::{Job, Read, Shape, MAX_CHUNK_BYTES};
use window::{ChunkId, Watermark};

/// How often the task looks for a new job while there is none.
const POLL: Duration = Duration::from_secs(1);
/// After a failure of the task's own session, before it tries again.
const RETRY: Duration = Duration::from_secs(5);
/// After a chunk read that may pass when run again (a lock or statement
/// timeout, a deadlock): the first delay, doubled up to the last.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Chunks read again in a row (a change inside their window did not carry
/// the key, or the table's columns changed under the read) before the
/// job fails.
const MAX_READ_AGAIN: u32 = 20;
/// Transient failures in a row before the job fails with the last one.
const MAX_TRANSIENT: u32 = 30;
/// How often the job's state is read while the task waits for writers.
const CANCEL_CHECK: Duration = Duration::from_secs(1);
/// Chunk sizes: adapted so that one chunk's read takes about TARGET. A
/// chunk's rows go out at its high watermark, ahead of the live changes
/// after it: its size is the stall it adds to live events. In bench/,
/// 20,000 rows held them up to 0.3 s; 4,000 rows give 86,400 rows/s and a
/// live p99 of 28 ms (events committed while the backfill ran), 2,000 rows
/// 76,700 rows/s (issue 23 asks for 0.6 × the NATS-only rate, 0.69 here,
/// with a live p99 under 30 ms: a thin margin, from one run).
const FIRST_CHUNK: usize = 1_000;
const MIN_CHUNK: usize = 1;
const MAX_CHUNK: usize = 4_000;
const TARGET: Duration = Duration::from_millis(50);

/// A chunk read between its watermarks, for the streamer.
#[derive(Debug)]
pub struct Chunk {
    pub id: ChunkId,
    pub shape: Arc<Shape>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// What the task sends to the streamer.
#[derive(Debug)]
pub enum ToStreamer {
    /// Before the chunk's low watermark: which table and key to watch.
    Watch { id: ChunkId, shape: Arc<Shape> },
    /// Before its high watermark: the rows read.
    Rows(Chunk),
    /// The attempt failed after its Watch: stop watching (no high
    /// watermark will come).
    Abandon(ChunkId),
}

/// The streamer's answer at a chunk's high watermark.
#[derive(Debug)]
pub struct ChunkDone {
    pub id: ChunkId,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every event of the chunk is acked (`published` of them; the rest
    /// were left to live events or filtered out).
    Acked { published: u64 },
    /// A change inside the window did not carry its key: read it again.
    ReadAgain,
}

/// Runs backfill jobs, one at a time, until the session ends (the task is
/// aborted then). Never fails: errors are logged, a job's own errors end
/// the job as failed with the reason.
pub async fn run(
    cfg: SourceConfig,
    publication: String,
    board: Arc<StatusBoard>,
    run: u64,
    to_streamer: mpsc::Sender<ToStreamer>,
    mut done: mpsc::UnboundedReceiver<ChunkDone>,
) {
    let mut task = Task { board, run, attempts: 0, to_streamer };
    loop {
        match task.run_jobs(&cfg, &publication, &mut done).await {
            Ok(()) => return, // the streamer is gone
            Err(e) => {
                task.board
                    .log(LogLevel::Warning, format!("backfill: {e}; retrying in {} s", RETRY.as_secs()));
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

struct Task {
    board: Arc<StatusBoard>,
    run: u64,
    /// Chunk reads started in this session: each one's id.
    attempts: u64,
    to_streamer: mpsc::Sender<ToStreamer>,
}

/// Why a chunk is read again.
enum Retry {
    /// At once, with a fresh shape (the error, if one caused it).
    ReadAgain(Option<Error>),
    /// After a backoff.
    Transient(Error),
}

enum JobEnd {
    Done,
    Cancelled,
    Failed(Error),
    StreamerGone,
}

/// How one attempt at a chunk ended.
enum Attempt {
    /// Emitted and acked: `published` sent; the next chunk starts after
    /// `last_key`, or the table is `done`.
    Emitted {
        published: u64,
        took: Duration,
        bytes: usize,
        last_key: Option<Vec<String>>,
        done: bool,
    },
    ReadAgain,
    Cancelled,
    StreamerGone,
}

impl Task {
    async fn run_jobs(
        &mut self,
        cfg: &SourceConfig,
        publication: &str,
        done: &mut mpsc::UnboundedReceiver<ChunkDone>,
    ) -> Result<(), Error> {
        let mut sql = Sql::side(cfg).await?;
        // Type and table names come out qualified, as the server reads chunks.
        sql.execute("SET search_path = pg_catalog, pg_temp").await?;
        loop {
            let Some(mut job) = store::next_job(&mut sql).await? else {
                self.board.set_backfill(None);
                tokio::time::sleep(POLL).await;
                continue;
            };
            // Each chunk is a few SQL round trips: none may wait out a linger.
            let _no_linger = PARK_LINGER.hold();
            store::start(&mut sql, &mut job).await?;
            self.board.log(LogLevel::Info, format!("backfill {} of {} started", job.id, job.table_name));
            match self.run_job(&mut sql, &mut job, publication, done).await? {
                JobEnd::Done => {
                    store::finish(&mut sql, job.id, "done", None).await?;
                    self.board.log(
                        LogLevel::Info,
                        format!(
                            "backfill {} of {} done: {} rows in {} chunks",
                            job.id, job.table_name, job.rows_done, job.chunks_done
                        ),
                    );
                }
                JobEnd::Cancelled => self.board.log(LogLevel::Info, format!("backfill {} cancelled", job.id)),
                JobEnd::Failed(e) => fail(&mut sql, &self.board, &job, &e).await?,
                JobEnd::StreamerGone => return Ok(()),
            }
            self.board.set_backfill(None);
        }
    }

    async fn run_job(
        &mut self,
        sql: &mut Sql,
        job: &mut Job,
        publication: &str,
        done: &mut mpsc::UnboundedReceiver<ChunkDone>,
    ) -> Result<JobEnd, Error> {
        let mut limit = FIRST_CHUNK;
        let mut backoff = FIRST_BACKOFF;
        let (mut read_again, mut transient) = (0, 0);
        let mut first_key = None;
        loop {
            if store::state(sql, job.id).await? != "running" {
                return Ok(JobEnd::Cancelled);
            }
            // Read per chunk: columns added, dropped or retyped since show in the next one.
            let shape = match store::shape(sql, job, publication).await {
                Ok(shape) => Arc::new(shape),
                Err(e @ Error::Setup(_)) => return Ok(JobEnd::Failed(e)),
                Err(e) if sqlstate(&e).is_some() && !is_transient(&e) => return Ok(JobEnd::Failed(e)),
                Err(e) => return Err(e),
            };
            let key = shape.key_columns();
            if *first_key.get_or_insert_with(|| key.clone()) != key {
                return Ok(JobEnd::Failed(Error::Setup(format!(
                    "the key of {} changed during the backfill (now {key:?}); start it again",
                    job.table_name
                ))));
            }
            self.board.set_backfill(Some(progress_text(job)));
            self.attempts += 1;
            let id = ChunkId { backfill: job.id, attempt: self.attempts, run: self.run };
            if self.to_streamer.send(ToStreamer::Watch { id, shape: shape.clone() }).await.is_err() {
                return Ok(JobEnd::StreamerGone);
            }
            let attempt = self.chunk(sql, id, job, &shape, limit, done).await;
            if !matches!(attempt, Ok(Attempt::Emitted { .. })) {
                // Its window must not stay open, collecting every key the table's writers touch.
                let _ = self.to_streamer.send(ToStreamer::Abandon(id)).await;
            }
            let retry = match attempt {
                Ok(Attempt::Emitted { published, took, bytes, last_key, done }) => {
                    job.chunks_done += 1;
                    job.rows_done += published as i64;
                    if last_key.is_some() {
                        job.last_key = last_key;
                    }
                    store::progress(sql, job).await?;
                    if done {
                        return Ok(JobEnd::Done);
                    }
                    limit = next_limit(limit, took, bytes);
                    backoff = FIRST_BACKOFF;
                    (read_again, transient) = (0, 0);
                    continue;
                }
                Ok(Attempt::Cancelled) => return Ok(JobEnd::Cancelled),
                Ok(Attempt::StreamerGone) => return Ok(JobEnd::StreamerGone),
                Ok(Attempt::ReadAgain) => Retry::ReadAgain(None),
                // The columns changed between the shape and the read: read both again.
                Err(e) if matches!(sqlstate(&e).as_deref(), Some("42804" | "42703")) => {
                    Retry::ReadAgain(Some(e))
                }
                Err(e) if is_transient(&e) => Retry::Transient(e),
                // The table, the clause or the role's privileges no longer read: the job's fault.
                Err(e) if sqlstate(&e).is_some() => return Ok(JobEnd::Failed(e)),
                Err(e) => return Err(e),
            };
            match retry {
                Retry::ReadAgain(cause) => {
                    read_again += 1;
                    if read_again > MAX_READ_AGAIN {
                        return Ok(JobEnd::Failed(cause.unwrap_or_else(|| {
                            Error::Setup(format!(
                                "{MAX_READ_AGAIN} chunks in a row saw a change of {} whose key the change \
                                 stream did not carry (an unchanged TOASTed key); start the backfill again",
                                job.table_name
                            ))
                        })));
                    }
                }
                Retry::Transient(e) => {
                    transient += 1;
                    if transient > MAX_TRANSIENT {
                        return Ok(JobEnd::Failed(e));
                    }
                    // A slow read gets smaller chunks; a lock or a deadlock passes with time.
                    if sqlstate(&e).as_deref() == Some("57014") {
                        limit = (limit / 4).max(MIN_CHUNK);
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    self.board.set_backfill(Some(format!(
                        "{}; reading the chunk again in {} s: {e}",
                        progress_text(job),
                        wait.as_secs()
                    )));
                    self.board.log(
                        LogLevel::Info,
                        format!(
                            "backfill {}: a chunk read failed, again in {} s: {e}",
                            job.id,
                            wait.as_secs()
                        ),
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One attempt at one chunk, after its Watch: where its key range
    /// ends, the low watermark, the wait for writers that may be
    /// committing, the read, the high watermark, and the streamer's answer.
    async fn chunk(
        &mut self,
        sql: &mut Sql,
        id: ChunkId,
        job: &Job,
        shape: &Arc<Shape>,
        limit: usize,
        done: &mut mpsc::UnboundedReceiver<ChunkDone>,
    ) -> Result<Attempt, Error> {
        let end = store::range_end(sql, job, shape, limit).await?;
        store::emit(sql, Watermark::Low { id, table: job.table }).await?;
        if !self.wait_for_committing_writers(sql, job).await? {
            return Ok(Attempt::Cancelled);
        }
        let started = Instant::now();
        let Read { rows, cut } = store::read_chunk(sql, job, shape, end.as_deref()).await?;
        let took = started.elapsed();
        // Cut at the bytes bound: the range goes on after the last row read.
        let last_key = match (cut, rows.last()) {
            (true, Some(row)) => {
                Some(shape.key.iter().map(|(index, _)| row[*index].clone().unwrap_or_default()).collect())
            }
            _ => end.clone(),
        };
        let done_after = !cut && end.is_none();
        let bytes = store::chunk_bytes(&rows);
        if self.to_streamer.send(ToStreamer::Rows(Chunk { id, shape: shape.clone(), rows })).await.is_err() {
            return Ok(Attempt::StreamerGone);
        }
        store::emit(sql, Watermark::High { id }).await?;
        Ok(match wait_done(done, id).await {
            None => Attempt::StreamerGone,
            Some(Outcome::ReadAgain) => Attempt::ReadAgain,
            Some(Outcome::Acked { published }) => {
                Attempt::Emitted { published, took, bytes, last_key, done: done_after }
            }
        })
    }

    /// After a low watermark, waits until every transaction that writes
    /// the table and may be committing has ended: its commit may precede
    /// the watermark in the WAL (so its changes are not in the window)
    /// while a read now would not see it yet (a synchronous standby holds
    /// it between the two). Writers that start later commit after the
    /// watermark, inside the window. `false`: the job was cancelled.
    async fn wait_for_committing_writers(&self, sql: &mut Sql, job: &Job) -> Result<bool, Error> {
        let mut waiting: Option<BTreeSet<String>> = None;
        let mut delay = Duration::from_millis(2);
        let started = Instant::now();
        let mut checked = started;
        loop {
            let writers = store::committing_writers(sql, job.table).await?;
            let writers: Vec<_> = match &waiting {
                None => writers,
                Some(first) => writers.into_iter().filter(|w| first.contains(&w.xid)).collect(),
            };
            let Some(oldest) = writers.first() else { return Ok(true) };
            if waiting.is_none() {
                waiting = Some(writers.iter().map(|w| w.xid.clone()).collect());
            }
            if started.elapsed() >= CANCEL_CHECK {
                self.board.set_backfill(Some(format!(
                    "{}; waiting for {} transaction(s) writing the table that may be committing (xid {}, {}) \
                     to end before reading a chunk, so that the read sees every commit before it",
                    progress_text(job),
                    writers.len(),
                    oldest.xid,
                    oldest.what
                )));
                if checked.elapsed() >= CANCEL_CHECK {
                    checked = Instant::now();
                    if store::state(sql, job.id).await? != "running" {
                        return Ok(false);
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }
}

async fn fail(sql: &mut Sql, board: &StatusBoard, job: &Job, e: &Error) -> Result<(), Error> {
    board.log(LogLevel::Warning, format!("backfill {} of {} failed: {e}", job.id, job.table_name));
    store::finish(sql, job.id, "failed", Some(&e.to_string())).await
}

/// Waits for the streamer's answer for chunk `id`; answers for other
/// attempts (one whose wait was cut short) are skipped.
async fn wait_done(done: &mut mpsc::UnboundedReceiver<ChunkDone>, id: ChunkId) -> Option<Outcome> {
    loop {
        let report = done.recv().await?;
        if report.id == id {
            return Some(report.outcome);
        }
    }
}

/// The next chunk size: towards [`TARGET`] read time, within bounds.
fn next_limit(limit: usize, took: Duration, bytes: usize) -> usize {
    let by_time = if took < TARGET / 2 {
        limit * 2
    } else if took > TARGET * 2 {
        limit / 2
    } else {
        limit
    };
    let by_bytes = if bytes >= MAX_CHUNK_BYTES / 2 { limit / 2 } else { by_time };
    by_time.min(by_bytes).clamp(MIN_CHUNK, MAX_CHUNK)
}

fn progress_text(job: &Job) -> String {
    let estimate =
        if job.rows_estimated >= 0 { format!(" of ~{}", job.rows_estimated) } else { String::new() };
    format!(
        "backfill {} of {}: {} rows{estimate}, {} chunks",
        job.id, job.table_name, job.rows_done, job.chunks_done
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_follows_the_read_time_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(next_limit(500, ms(10), 0), 1000);
        assert_eq!(next_limit(1000, ms(50), 0), 1000);
        assert_eq!(next_limit(1000, ms(900), 0), 500);
        assert_eq!(next_limit(MAX_CHUNK, ms(1), 0), MAX_CHUNK);
        assert_eq!(next_limit(MIN_CHUNK, ms(5000), 0), MIN_CHUNK);
        assert_eq!(next_limit(1000, ms(10), MAX_CHUNK_BYTES), 500, "large rows keep chunks small");
        assert_eq!(next_limit(1000, ms(10), MAX_CHUNK_BYTES / 2 - 1), 2000);
    }

    #[tokio::test]
    async fn a_chunk_takes_only_its_own_answer() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let id = |attempt| ChunkId { backfill: 1, attempt, run: 9 };
        // The earlier attempt at the same chunk answered late.
        tx.send(ChunkDone { id: id(1), outcome: Outcome::Acked { published: 5 } }).unwrap();
        tx.send(ChunkDone { id: id(2), outcome: Outcome::Acked { published: 3 } }).unwrap();
        assert_eq!(wait_done(&mut rx, id(2)).await, Some(Outcome::Acked { published: 3 }));
        drop(tx);
        assert_eq!(wait_done(&mut rx, id(3)).await, None);
    }
}
