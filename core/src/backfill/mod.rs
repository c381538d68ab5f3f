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

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::SourceConfig;
use crate::replication::connection::Sql;
use crate::status::{LogLevel, StatusBoard};
use crate::Error;
use store::{Job, Shape};
use window::{ChunkId, Watermark};

/// How often the task looks for a new job while there is none.
const POLL: Duration = Duration::from_secs(1);
/// After a failure of the task's own session, before it tries again.
const RETRY: Duration = Duration::from_secs(5);
/// Chunk sizes: adapted so that one chunk's read takes about TARGET. A
/// chunk's rows go out at its high watermark, ahead of the live changes
/// after it: its size is the stall it adds to live events (20,000 rows
/// held them up to 0.3 s in bench/, 2,000 rows about 30 ms).
const FIRST_CHUNK: usize = 1_000;
const MIN_CHUNK: usize = 100;
const MAX_CHUNK: usize = 2_000;
const TARGET: Duration = Duration::from_millis(50);
/// A chunk never holds more than this much row text.
const MAX_CHUNK_BYTES: usize = 4 << 20;

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
}

/// The streamer's answer: every event of the chunk is acked.
#[derive(Debug)]
pub struct ChunkDone {
    pub id: ChunkId,
    pub published: u64,
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
    loop {
        match run_jobs(&cfg, &publication, &board, run, &to_streamer, &mut done).await {
            Ok(()) => return, // the streamer is gone
            Err(e) => {
                board.log(LogLevel::Warning, format!("backfill: {e}; retrying in {} s", RETRY.as_secs()));
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

async fn run_jobs(
    cfg: &SourceConfig,
    publication: &str,
    board: &StatusBoard,
    run: u64,
    to_streamer: &mpsc::Sender<ToStreamer>,
    done: &mut mpsc::UnboundedReceiver<ChunkDone>,
) -> Result<(), Error> {
    let mut sql = Sql::side(cfg).await?;
    loop {
        let Some(mut job) = store::next_job(&mut sql).await? else {
            board.set_backfill(None);
            tokio::time::sleep(POLL).await;
            continue;
        };
        store::start(&mut sql, &mut job).await?;
        let shape = match store::shape(&mut sql, &job, publication).await {
            Ok(shape) => Arc::new(shape),
            Err(e) => {
                fail(&mut sql, board, &job, &e).await?;
                continue;
            }
        };
        board.log(LogLevel::Info, format!("backfill {} of {} started", job.id, job.table_name));
        match run_job(&mut sql, board, run, &mut job, shape, to_streamer, done).await? {
            JobEnd::Done => {
                store::finish(&mut sql, job.id, "done", None).await?;
                board.log(
                    LogLevel::Info,
                    format!(
                        "backfill {} of {} done: {} rows in {} chunks",
                        job.id, job.table_name, job.rows_done, job.chunks_done
                    ),
                );
            }
            JobEnd::Cancelled => board.log(LogLevel::Info, format!("backfill {} cancelled", job.id)),
            JobEnd::Failed(e) => fail(&mut sql, board, &job, &e).await?,
            JobEnd::StreamerGone => return Ok(()),
        }
    }
}

enum JobEnd {
    Done,
    Cancelled,
    Failed(Error),
    StreamerGone,
}

async fn fail(sql: &mut Sql, board: &StatusBoard, job: &Job, e: &Error) -> Result<(), Error> {
    board.log(LogLevel::Warning, format!("backfill {} of {} failed: {e}", job.id, job.table_name));
    store::finish(sql, job.id, "failed", Some(&e.to_string())).await
}

async fn run_job(
    sql: &mut Sql,
    board: &StatusBoard,
    run: u64,
    job: &mut Job,
    shape: Arc<Shape>,
    to_streamer: &mpsc::Sender<ToStreamer>,
    done: &mut mpsc::UnboundedReceiver<ChunkDone>,
) -> Result<JobEnd, Error> {
    let mut limit = FIRST_CHUNK;
    loop {
        if store::state(sql, job.id).await? != "running" {
            return Ok(JobEnd::Cancelled);
        }
        board.set_backfill(Some(progress_text(job)));
        let id = ChunkId { backfill: job.id, chunk: job.chunks_done, run };
        if to_streamer.send(ToStreamer::Watch { id, shape: shape.clone() }).await.is_err() {
            return Ok(JobEnd::StreamerGone);
        }
        store::emit(sql, Watermark::Low { id, table: job.table }).await?;
        let started = Instant::now();
        let rows = match store::read_chunk(sql, job, &shape, limit).await {
            Ok(rows) => rows,
            // The table or the clause no longer reads: the job's fault, not the session's.
            Err(e @ Error::Replication(_)) if e.to_string().contains("SQLSTATE") => {
                return Ok(JobEnd::Failed(e))
            }
            Err(e) => return Err(e),
        };
        let took = started.elapsed();
        let last = rows.len() < limit;
        let next_key = rows.last().map(|row| {
            shape.key.iter().map(|(index, _)| row[*index].clone().unwrap_or_default()).collect::<Vec<_>>()
        });
        let bytes: usize = rows.iter().flatten().flatten().map(String::len).sum();
        if to_streamer.send(ToStreamer::Rows(Chunk { id, shape: shape.clone(), rows })).await.is_err() {
            return Ok(JobEnd::StreamerGone);
        }
        store::emit(sql, Watermark::High { id }).await?;
        let Some(ChunkDone { published, .. }) = wait_done(done, id).await else {
            return Ok(JobEnd::StreamerGone);
        };
        job.chunks_done += 1;
        job.rows_done += published as i64;
        if next_key.is_some() {
            job.last_key = next_key;
        }
        store::progress(sql, job).await?;
        if last {
            board.set_backfill(None);
            return Ok(JobEnd::Done);
        }
        limit = next_limit(limit, took, bytes);
    }
}

/// Waits for the streamer to report chunk `id` acked; older reports (of a
/// chunk whose wait was cut short) are skipped.
async fn wait_done(done: &mut mpsc::UnboundedReceiver<ChunkDone>, id: ChunkId) -> Option<ChunkDone> {
    loop {
        let report = done.recv().await?;
        if report.id == id {
            return Some(report);
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
    let by_bytes = if bytes > MAX_CHUNK_BYTES / 2 { limit / 2 } else { by_time };
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
    }
}
