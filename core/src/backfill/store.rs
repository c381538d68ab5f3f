//! The SQL of backfills: jobs in `wal_listener.backfill_jobs` (written by
//! `backfill()` and `cancel_backfill()`), the table's shape, chunk reads
//! and the watermarks around them.

use crate::backfill::window::Watermark;
use crate::pgoutput::{Column, Relation};
use crate::replication::connection::{column, column_text, quote_ident, quote_literal, Sql};
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
    /// The condition as the server re-printed it from the analysed clause:
    /// one expression, whatever was passed.
    pub where_clause: Option<String>,
    /// The role that called backfill(): rows are read with its privileges.
    pub run_as: u32,
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
    /// The columns chunks are ordered and resumed by, the ones a change's
    /// old tuple carries (`wal_listener._chunk_key`, the one rule), as
    /// positions in `relation.columns`, with their SQL types.
    pub key: Vec<(usize, String)>,
    /// The publication's row filter, if any.
    pub row_filter: Option<String>,
}

impl Shape {
    /// The key columns' names and SQL types: a backfill keeps one key.
    pub fn key_columns(&self) -> Vec<(String, String)> {
        self.key
            .iter()
            .map(|(i, sql_type)| (self.relation.columns[*i].name.clone(), sql_type.clone()))
            .collect()
    }
}

/// The oldest job that is pending or running (one at a time).
pub async fn next_job(sql: &mut Sql) -> Result<Option<Job>, Error> {
    let rows = sql
        .rows(&format!(
            "SELECT id, tbl::oid, tbl::text, where_clause, last_key::text, chunks_done, rows_done, \
                    coalesce(rows_estimated, -1), run_as::oid \
               FROM {JOBS_TABLE} WHERE state IN ('pending', 'running') ORDER BY id LIMIT 1"
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else { return Ok(None) };
    let text = |i: usize| column(&row, i);
    let number = |i: usize| text(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    Ok(Some(Job {
        id: number(0),
        table: number(1) as u32,
        table_name: text(2).unwrap_or_default(),
        where_clause: text(3),
        // Key columns are NOT NULL.
        last_key: text(4).and_then(|array| text_array(&array)).map(|key| key.into_iter().flatten().collect()),
        chunks_done: number(5),
        rows_done: number(6),
        rows_estimated: number(7),
        run_as: number(8) as u32,
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

/// Reads the columns, key and publication settings of the job's table:
/// the columns pgoutput sends (`pg_publication_tables.attnames`, which
/// follows column lists and, on PostgreSQL 18, published generated
/// columns), flagged as the key as pgoutput flags them.
pub async fn shape(sql: &mut Sql, job: &Job, publication: &str) -> Result<Shape, Error> {
    let rows = sql
        .rows(&format!(
            "WITH rel AS (SELECT c.oid, c.relreplident, n.nspname, c.relname \
                            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {table}), \
                  pub AS (SELECT to_jsonb(t) ->> 'attnames' AS attnames, to_jsonb(t) ->> 'rowfilter' AS rowfilter \
                            FROM pg_publication_tables t, rel \
                           WHERE t.pubname = {publication} AND t.schemaname = rel.nspname AND t.tablename = rel.relname), \
                  keys AS (SELECT wal_listener._replica_identity_key(rel.oid) AS replica_identity, \
                                  wal_listener._chunk_key(rel.oid) AS chunk FROM rel) \
             SELECT rel.nspname, rel.relname, rel.relreplident::text, a.attname, a.atttypid, a.atttypmod, \
                    format_type(a.atttypid, a.atttypmod), \
                    coalesce(rel.relreplident = 'f' OR a.attnum = ANY ((SELECT replica_identity FROM keys)::int2[]), false)::text, \
                    array_position((SELECT chunk FROM keys), a.attnum), \
                    (SELECT rowfilter FROM pub), (SELECT count(*) FROM pub), \
                    coalesce(array_length((SELECT chunk FROM keys), 1), 0) \
               FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid \
              WHERE a.attnum > 0 AND NOT a.attisdropped \
                AND a.attname::text IN (SELECT jsonb_array_elements_text(coalesce((SELECT attnames FROM pub), '[]')::jsonb)) \
              ORDER BY a.attnum",
            table = job.table,
            publication = quote_literal(publication)
        ))
        .await?;
    let gone = || Error::Setup(format!("backfill {}: table {} no longer exists", job.id, job.table_name));
    let first = rows.first().ok_or_else(gone)?;
    let text = |row: &Vec<Option<String>>, i: usize| column_text(row, i);
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
            "backfill {}: table {} has no primary key or unique index on NOT NULL columns any more",
            job.id, job.table_name
        )));
    }
    if text(first, 11).parse::<usize>().ok() != Some(key.len()) {
        return Err(Error::Setup(format!(
            "backfill {}: publication {publication} leaves a column of table {}'s key out of its column \
             list, so a change's key cannot be matched against the rows read",
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

/// The largest chunk a read returns, in the bytes of its rows' values
/// plus [`VALUE_COST`] per column of each row (at least one row): rows are
/// fetched in parts and the read stops past it.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
/// What each value of a chunk costs the worker besides its bytes (an
/// `Option<String>` and its allocation): a sparse table of 1,600 columns
/// has rows of a few hundred bytes that are 40 kB once read.
pub const VALUE_COST: usize = 32;

/// A read chunk's size as [`MAX_CHUNK_BYTES`] counts it.
pub fn chunk_bytes(rows: &[Vec<Option<String>>]) -> usize {
    rows.iter().map(|row| row.len() * VALUE_COST + row.iter().flatten().map(String::len).sum::<usize>()).sum()
}

/// A chunk's rows, in key order.
pub struct Read {
    pub rows: Vec<Vec<Option<String>>>,
    /// The read stopped at [`MAX_CHUNK_BYTES`]: rows of the range may follow the last one.
    pub cut: bool,
}

/// The key `limit` keys after the job's last one: a chunk reads the range
/// up to it, so its scan is bounded whatever the clause selects (a clause
/// that matches nothing no longer reads the rest of the table per chunk).
/// `None`: fewer keys remain; the chunk reads to the end. Read by the
/// worker itself, key columns only: no clause, no row security.
pub async fn range_end(
    sql: &mut Sql,
    job: &Job,
    shape: &Shape,
    limit: usize,
) -> Result<Option<Vec<String>>, Error> {
    let names = Names::of(shape);
    let after = after_last(job, shape, &names).map_or(String::new(), |c| format!("WHERE {c}"));
    let query = format!(
        "SELECT {keys} FROM ONLY {table} {after} ORDER BY {keys} OFFSET {} LIMIT 1",
        limit.max(1) - 1,
        keys = names.key,
        table = names.table
    );
    Ok(sql
        .rows(&query)
        .await?
        .into_iter()
        .next()
        .map(|row| row.into_iter().map(Option::unwrap_or_default).collect()))
}

/// Reads the next chunk: the rows after the job's last key up to `upto`
/// (the end of the table when `None`) that the clause and the
/// publication's row filter select, in key order and at most
/// [`MAX_CHUNK_BYTES`], each column as its type's output function writes
/// it (what pgoutput sends for a live row). The server runs the query as
/// the job's role (`_read_chunk`), with the column types of `shape`.
pub async fn read_chunk(
    sql: &mut Sql,
    job: &Job,
    shape: &Shape,
    upto: Option<&[String]>,
) -> Result<Read, Error> {
    let query = chunk_query(job, shape, upto);
    let types = shape.relation.columns.iter().map(|c| c.type_oid.to_string()).collect::<Vec<_>>().join(",");
    let rows = sql
        .rows(&format!(
            "SELECT wal_listener._read_chunk({}, {}, {MAX_CHUNK_BYTES}, '{{{types}}}')",
            job.run_as,
            quote_literal(&query)
        ))
        .await?;
    let mut read = Read { rows: Vec::with_capacity(rows.len()), cut: false };
    for row in rows {
        match row.into_iter().next().flatten() {
            Some(text) => read.rows.push(
                text_array(&text)
                    .ok_or_else(|| Error::Replication(format!("a chunk row is not a text[]: {text:.80}")))?,
            ),
            None => read.cut = true,
        }
    }
    Ok(read)
}

/// The table and key columns as a chunk's queries name them: qualified
/// (the server reads with `search_path = pg_catalog, pg_temp`), columns
/// with the table, since an unqualified ORDER BY name would sort by an
/// output column of that name. No alias, so the clause reads as it was
/// checked (`FROM ONLY table WHERE (...)`).
struct Names {
    table: String,
    /// `"s"."t"."k1", "s"."t"."k2"`
    key: String,
}

impl Names {
    fn of(shape: &Shape) -> Self {
        let table =
            format!("{}.{}", quote_ident(&shape.relation.namespace), quote_ident(&shape.relation.name));
        let key = shape
            .key
            .iter()
            .map(|(i, _)| format!("{table}.{}", quote_ident(&shape.relation.columns[*i].name)))
            .collect::<Vec<_>>()
            .join(", ");
        Names { table, key }
    }

    fn column(&self, name: &str) -> String {
        format!("{}.{}", self.table, quote_ident(name))
    }
}

/// `(key) <op> (values)`, each value cast to its key column's type.
fn key_condition(shape: &Shape, names: &Names, op: &str, values: &[String]) -> String {
    let values = shape
        .key
        .iter()
        .zip(values)
        .map(|((_, sql_type), value)| format!("{}::{sql_type}", quote_literal(value)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("({}) {op} ({values})", names.key)
}

fn after_last(job: &Job, shape: &Shape, names: &Names) -> Option<String> {
    job.last_key.as_ref().map(|last| key_condition(shape, names, ">", last))
}

/// The one shape of a chunk's query. The clause is the server's re-print
/// of an analysed expression and sits in parentheses of its own, so it
/// cannot reach the key conditions.
fn chunk_query(job: &Job, shape: &Shape, upto: Option<&[String]>) -> String {
    let names = Names::of(shape);
    let select = shape.relation.columns.iter().map(|c| names.column(&c.name)).collect::<Vec<_>>().join(", ");
    let mut conditions = Vec::new();
    if let Some(clause) = &job.where_clause {
        conditions.push(format!("({clause})"));
    }
    if let Some(filter) = &shape.row_filter {
        conditions.push(format!("({filter})"));
    }
    conditions.extend(after_last(job, shape, &names));
    if let Some(end) = upto {
        conditions.push(key_condition(shape, &names, "<=", end));
    }
    let filter =
        if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    format!("SELECT {select} FROM ONLY {} {filter} ORDER BY {}", names.table, names.key)
}

/// A transaction that writes the chunk's table and may be committing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub xid: String,
    /// `pid 123, waiting on SyncRep`, or `prepared transaction 'gid'`.
    pub what: String,
}

/// Transactions holding a write lock on `table` that may be committing:
/// every one that has an xid (a subtransaction's too), but those whose
/// session sits idle inside its transaction: COMMIT makes a session
/// active before its commit record is written, so an idle one is not
/// committing (and may idle for hours).
/// A commit is written to the WAL (and decoded) before the transaction
/// becomes visible, and its locks are released only after that: asked
/// after a low watermark, this lists every writer whose commit may precede
/// the watermark and that a chunk read now would not see. Prepared
/// transactions count: COMMIT PREPARED may be under way.
pub async fn committing_writers(sql: &mut Sql, table: u32) -> Result<Vec<Writer>, Error> {
    let rows = sql
        .rows(&format!(
            "WITH locks AS MATERIALIZED (SELECT * FROM pg_catalog.pg_locks) \
             SELECT DISTINCT x.transactionid::text, x.pid, a.wait_event_type, a.wait_event, g.gid \
               FROM locks r \
               JOIN locks x ON x.virtualtransaction = r.virtualtransaction AND x.locktype = 'transactionid' \
                           AND x.mode = 'ExclusiveLock' AND x.granted \
               LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = x.pid \
               LEFT JOIN pg_catalog.pg_prepared_xacts g ON g.transaction = x.transactionid \
              WHERE r.locktype = 'relation' AND r.relation = {table} AND r.granted \
                AND r.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) \
                AND r.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock') \
                AND (a.state IS NULL OR a.state NOT LIKE 'idle in transaction%') \
              ORDER BY 1"
        ))
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let text = |i: usize| column(&row, i);
            let what = match (text(4), text(1)) {
                (Some(gid), _) => format!("prepared transaction {}", quote_literal(&gid)),
                (None, Some(pid)) => match (text(2), text(3)) {
                    (Some(kind), Some(event)) => format!("pid {pid}, waiting on {kind} {event}"),
                    _ => format!("pid {pid}, running"),
                },
                (None, None) => "no session".to_owned(),
            };
            Writer { xid: text(0).unwrap_or_default(), what }
        })
        .collect())
}

/// Postgres' text form of a one-dimensional text[] (`{a,"b c",NULL}`).
fn text_array(text: &str) -> Option<Vec<Option<String>>> {
    crate::event::arrays::parse(text, b',')?
        .into_iter()
        .map(|element| match element {
            crate::event::arrays::Element::Text(value) => Some(Some(value.into_owned())),
            crate::event::arrays::Element::Null => Some(None),
            crate::event::arrays::Element::Array(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, Relation};

    fn shape() -> Shape {
        let column =
            |name: &str| Column { name: name.into(), type_oid: 25, type_modifier: -1, is_key: false };
        Shape {
            relation: Relation {
                id: 1,
                namespace: "app".into(),
                name: "or\"ders".into(),
                replica_identity: b'd',
                columns: vec![column("id"), column("region"), column("total")],
            },
            key: vec![(1, "text".into()), (0, "integer".into())],
            row_filter: Some("(total > 0)".into()),
        }
    }

    fn job(where_clause: Option<&str>, last_key: Option<Vec<&str>>) -> Job {
        Job {
            id: 1,
            table: 1,
            table_name: "app.orders".into(),
            where_clause: where_clause.map(str::to_owned),
            run_as: 10,
            last_key: last_key.map(|key| key.into_iter().map(str::to_owned).collect()),
            chunks_done: 0,
            rows_done: 0,
            rows_estimated: -1,
        }
    }

    #[test]
    fn a_chunks_size_counts_every_column_of_every_row_even_null() {
        let rows =
            vec![vec![Some("ab".to_owned()), None, None], vec![None, Some(String::new()), Some("c".into())]];
        assert_eq!(chunk_bytes(&rows), 6 * VALUE_COST + 3);
        assert_eq!(chunk_bytes(&[]), 0);
    }

    #[test]
    fn a_chunk_query_selects_raw_columns_of_its_key_range_in_key_order() {
        let t = r#""app"."or""ders""#;
        assert_eq!(
            chunk_query(&job(None, None), &shape(), None),
            format!(
                "SELECT {t}.\"id\", {t}.\"region\", {t}.\"total\" FROM ONLY {t} WHERE ((total > 0)) \
                 ORDER BY {t}.\"region\", {t}.\"id\""
            )
        );
        let end = ["us".to_owned(), "9".to_owned()];
        assert_eq!(
            chunk_query(&job(Some("(id > 0) OR (id < 0)"), Some(vec!["eu's", "7"])), &shape(), Some(&end)),
            format!(
                "SELECT {t}.\"id\", {t}.\"region\", {t}.\"total\" FROM ONLY {t} WHERE ((id > 0) OR (id < 0)) \
                 AND ((total > 0)) AND ({t}.\"region\", {t}.\"id\") > ('eu''s'::text, '7'::integer) \
                 AND ({t}.\"region\", {t}.\"id\") <= ('us'::text, '9'::integer) \
                 ORDER BY {t}.\"region\", {t}.\"id\""
            )
        );
    }

    #[test]
    fn rows_come_as_text_arrays_with_nulls_and_quoting() {
        assert_eq!(
            text_array(r#"{1,NULL,"NULL","a \"b\" \\c",""}"#),
            Some(vec![
                Some("1".into()),
                None,
                Some("NULL".into()),
                Some(r#"a "b" \c"#.into()),
                Some(String::new())
            ])
        );
        assert_eq!(text_array("{{1}}"), None, "rows are one-dimensional");
        assert_eq!(text_array("not an array"), None);
    }
}
