//! The SQL of backfills: jobs in `wal_listener.backfill_jobs` (written by
//! `backfill()` and `cancel_backfill()`), the table's shape, chunk reads
//! and the watermarks around them.

use crate::backfill::window::Watermark;
use crate::pgoutput::{Column, Relation};
use crate::replication::connection::{quote_ident, quote_literal, Sql};
use crate::Error;

pub const JOBS_TABLE: &str = "wal_listener.backfill_jobs";
/// Prefix of the watermark messages.
pub const WATERMARK_PREFIX: &str = "wal_listener.backfill";

/// A backfill to run, as its row says.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub table: u32,
    pub table_name: String,
    pub where_clause: Option<String>,
    /// The key of the last row of the last finished chunk: resume after it.
    pub last_key: Option<Vec<String>>,
    pub chunks_done: i64,
    pub rows_done: i64,
    pub rows_estimated: i64,
}

/// How a table's rows are read and sent.
#[derive(Debug)]
pub struct Shape {
    /// Columns as pgoutput would describe them (the publication's column
    /// list; `is_key`: the replica identity, as in `primaryKey`).
    pub relation: Relation,
    /// The columns chunks are ordered and resumed by (primary key, replica
    /// identity index or a unique index on NOT NULL columns), as positions
    /// in `relation.columns`, with their SQL types.
    pub key: Vec<(usize, String)>,
    /// The publication's row filter, if any.
    pub row_filter: Option<String>,
}

/// The oldest job that is pending or running (one at a time).
pub async fn next_job(sql: &mut Sql) -> Result<Option<Job>, Error> {
    let rows = sql
        .rows(&format!(
            "SELECT id, tbl::oid, tbl::text, where_clause, last_key::text, chunks_done, rows_done, \
                    coalesce(rows_estimated, -1) \
               FROM {JOBS_TABLE} WHERE state IN ('pending', 'running') ORDER BY id LIMIT 1"
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else { return Ok(None) };
    let text = |i: usize| row.get(i).cloned().flatten();
    let number = |i: usize| text(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    Ok(Some(Job {
        id: number(0),
        table: number(1) as u32,
        table_name: text(2).unwrap_or_default(),
        where_clause: text(3),
        last_key: text(4).map(|array| parse_text_array(&array)),
        chunks_done: number(5),
        rows_done: number(6),
        rows_estimated: number(7),
    }))
}

/// Marks a job running and estimates its rows (the planner's estimate: a
/// count would read the table once more).
pub async fn start(sql: &mut Sql, job: &mut Job) -> Result<(), Error> {
    let estimate = sql
        .one_value(&format!(
            "UPDATE {JOBS_TABLE} SET state = 'running', started_at = coalesce(started_at, now()), \
                    rows_estimated = coalesce(rows_estimated, \
                        (SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = {})) \
              WHERE id = {} RETURNING rows_estimated",
            job.table, job.id
        ))
        .await?;
    job.rows_estimated = estimate.and_then(|e| e.parse().ok()).unwrap_or(-1);
    Ok(())
}

/// The job's state now ('cancelled' when cancel_backfill() ran).
pub async fn state(sql: &mut Sql, id: i64) -> Result<String, Error> {
    Ok(sql.one_value(&format!("SELECT state FROM {JOBS_TABLE} WHERE id = {id}")).await?.unwrap_or_default())
}

pub async fn progress(sql: &mut Sql, job: &Job) -> Result<(), Error> {
    let last_key = match &job.last_key {
        Some(key) => {
            format!("ARRAY[{}]::text[]", key.iter().map(|v| quote_literal(v)).collect::<Vec<_>>().join(", "))
        }
        None => "NULL".into(),
    };
    sql.execute(&format!(
        "UPDATE {JOBS_TABLE} SET last_key = {last_key}, chunks_done = {}, rows_done = {} WHERE id = {}",
        job.chunks_done, job.rows_done, job.id
    ))
    .await
}

/// Ends a job: `state` done or failed (with `error`).
pub async fn finish(sql: &mut Sql, id: i64, state: &str, error: Option<&str>) -> Result<(), Error> {
    sql.execute(&format!(
        "UPDATE {JOBS_TABLE} SET state = {}, finished_at = now(), last_error = {} \
          WHERE id = {id} AND state IN ('pending', 'running')",
        quote_literal(state),
        error.map_or("NULL".into(), quote_literal)
    ))
    .await
}

pub async fn emit(sql: &mut Sql, watermark: Watermark) -> Result<(), Error> {
    sql.execute(&format!(
        "SELECT pg_logical_emit_message(false, '{WATERMARK_PREFIX}', {})",
        quote_literal(&watermark.content())
    ))
    .await
}

/// Reads the columns, key and publication settings of the job's table.
pub async fn shape(sql: &mut Sql, job: &Job, publication: &str) -> Result<Shape, Error> {
    let rows = sql
        .rows(&format!(
            "WITH rel AS (SELECT c.oid, c.relreplident, n.nspname, c.relname \
                            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {table}), \
                  pub AS (SELECT to_jsonb(t) ->> 'attnames' AS attnames, to_jsonb(t) ->> 'rowfilter' AS rowfilter \
                            FROM pg_publication_tables t, rel \
                           WHERE t.pubname = {publication} AND t.schemaname = rel.nspname AND t.tablename = rel.relname), \
                  ri AS (SELECT i.indkey FROM pg_index i, rel WHERE i.indrelid = rel.oid AND \
                           (CASE rel.relreplident WHEN 'i' THEN i.indisreplident WHEN 'd' THEN i.indisprimary ELSE false END)), \
                  chunk_key AS (SELECT i.indkey FROM pg_index i, rel WHERE i.indrelid = rel.oid AND i.indisunique \
                                   AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indisvalid \
                                   AND NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = rel.oid \
                                                     AND a.attnum = ANY (i.indkey) AND NOT a.attnotnull) \
                                 ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indexrelid LIMIT 1) \
             SELECT rel.nspname, rel.relname, rel.relreplident::text, a.attname, a.atttypid, a.atttypmod, \
                    format_type(a.atttypid, a.atttypmod), \
                    (rel.relreplident = 'f' OR a.attnum = ANY ((SELECT indkey FROM ri)::int2[]))::text, \
                    array_position((SELECT indkey FROM chunk_key)::int2[], a.attnum), \
                    (SELECT rowfilter FROM pub), (SELECT count(*) FROM pub) \
               FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid \
              WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                AND ((SELECT attnames FROM pub) IS NULL OR a.attname::text IN \
                     (SELECT jsonb_array_elements_text((SELECT attnames FROM pub)::jsonb))) \
              ORDER BY a.attnum",
            table = job.table,
            publication = quote_literal(publication)
        ))
        .await?;
    let gone = || Error::Setup(format!("backfill {}: table {} no longer exists", job.id, job.table_name));
    let first = rows.first().ok_or_else(gone)?;
    let text = |row: &Vec<Option<String>>, i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    if text(first, 10) == "0" {
        return Err(Error::Setup(format!(
            "backfill {}: table {} is not in publication {publication} any more",
            job.id, job.table_name
        )));
    }
    let mut relation = Relation {
        id: job.table,
        namespace: text(first, 0),
        name: text(first, 1),
        replica_identity: text(first, 2).bytes().next().unwrap_or(b'd'),
        columns: Vec::with_capacity(rows.len()),
    };
    let mut key = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        relation.columns.push(Column {
            name: text(row, 3),
            type_oid: text(row, 4).parse().unwrap_or(0),
            type_modifier: text(row, 5).parse().unwrap_or(-1),
            is_key: text(row, 7) == "true",
        });
        if let Ok(position) = text(row, 8).parse::<usize>() {
            key.push((position, index, text(row, 6)));
        }
    }
    key.sort();
    if key.is_empty() {
        return Err(Error::Setup(format!(
            "backfill {}: table {} has no primary key or unique index on NOT NULL columns (in the \
             publication's column list) any more",
            job.id, job.table_name
        )));
    }
    let row_filter = Some(text(first, 9)).filter(|f| !f.is_empty());
    Ok(Shape {
        relation,
        key: key.into_iter().map(|(_, index, sql_type)| (index, sql_type)).collect(),
        row_filter,
    })
}

/// Reads the next chunk: up to `limit` rows after the job's last key, in
/// key order, every column as text.
pub async fn read_chunk(
    sql: &mut Sql,
    job: &Job,
    shape: &Shape,
    limit: usize,
) -> Result<Vec<Vec<Option<String>>>, Error> {
    let columns = &shape.relation.columns;
    // Columns qualified with the table: an unqualified ORDER BY name would
    // sort by the text output column of that name. No alias, so that the
    // where_clause reads as it was checked (`FROM ONLY table WHERE (...)`).
    let table = format!("{}.{}", quote_ident(&shape.relation.namespace), quote_ident(&shape.relation.name));
    let column = |name: &str| format!("{table}.{}", quote_ident(name));
    let select = columns.iter().map(|c| format!("{}::text", column(&c.name))).collect::<Vec<_>>().join(", ");
    let key_names = shape.key.iter().map(|(i, _)| column(&columns[*i].name)).collect::<Vec<_>>().join(", ");
    let mut conditions = Vec::new();
    if let Some(clause) = &job.where_clause {
        conditions.push(format!("({clause})"));
    }
    if let Some(filter) = &shape.row_filter {
        conditions.push(format!("({filter})"));
    }
    if let Some(last) = &job.last_key {
        let values = shape
            .key
            .iter()
            .zip(last)
            .map(|((_, sql_type), value)| format!("{}::{sql_type}", quote_literal(value)))
            .collect::<Vec<_>>()
            .join(", ");
        conditions.push(format!("({key_names}) > ({values})"));
    }
    let filter =
        if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    sql.rows(&format!("SELECT {select} FROM ONLY {table} {filter} ORDER BY {key_names} LIMIT {limit}")).await
}

/// Postgres' text form of a one-dimensional text[] (`{a,"b c",NULL}`).
fn parse_text_array(text: &str) -> Vec<String> {
    crate::event::arrays::parse(text, b',')
        .unwrap_or_default()
        .into_iter()
        .map(|element| match element {
            crate::event::arrays::Element::Text(value) => value.into_owned(),
            _ => String::new(),
        })
        .collect()
}
