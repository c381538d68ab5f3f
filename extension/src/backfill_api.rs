//! The server side of backfills (DESIGN.md section 6): `backfill()`, which
//! records the role that calls it; the check of its `where_clause`, which
//! returns the clause as the server re-prints it; and `_read_chunk`, which
//! the worker calls to read a chunk with that role's privileges. Storage,
//! the other checks and the chunk key rule are SQL, in `api.sql`.

use std::ffi::{CStr, CString};

use pgrx::prelude::*;
use pgrx::PgRelation;
use wal_listener_core::backfill::store;
use wal_listener_core::replication::connection::TEXT_SETTINGS;

use crate::user_switch::UserSwitch;

/// Enqueues a backfill of `tbl` (see `_enqueue_backfill` in api.sql) to be
/// read with the privileges of the role calling this function: the current
/// user here, so a SECURITY DEFINER wrapper lends its owner's rights, as
/// Postgres does everywhere else. Not SECURITY DEFINER itself, or that
/// role would be lost; the job is written as the extension's owner.
#[pg_extern(volatile)]
fn backfill(tbl: Option<PgRelation>, where_clause: default!(Option<&str>, "NULL")) -> i64 {
    let Some(tbl) = tbl else {
        error!("tbl must not be NULL; pass a table, e.g. 'public.orders'");
    };
    let caller = unsafe { pg_sys::GetUserId() };
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'wal_listener'",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("extension wal_listener is not installed in this database"));
    let _as_owner = UserSwitch::to(owner, 0);
    let id = Spi::get_one_with_args::<i64>(
        "SELECT wal_listener._enqueue_backfill($1, $2, $3)",
        &[tbl.oid().into(), where_clause.into(), caller.into()],
    );
    match id {
        Ok(Some(id)) => id,
        Ok(None) => error!("the backfill of {} was not recorded", tbl.name()),
        Err(e) => error!("{e}"),
    }
}

/// Checks that a backfill's `where_clause` is one condition on `table`
/// alone: parsed and analysed by the server as `SELECT 1 FROM ONLY table
/// WHERE (clause)`, which must stay exactly that (no other table, no
/// subquery, nothing after the condition) and call no volatile function.
/// Raises an error saying what is wrong. Returns the condition as the
/// server re-prints it from the analysed tree: one expression by
/// construction (a comment or a stray parenthesis in the text cannot
/// survive), with every name the current search_path does not show
/// qualified. The worker embeds that, never the text as given.
#[pg_extern(volatile)]
fn _check_where_clause(table: &str, clause: &str) -> String {
    let query = format!("SELECT 1 FROM ONLY {table} WHERE ({clause})");
    let Ok(text) = CString::new(query) else {
        error!("where_clause must not contain a NUL character");
    };
    unsafe {
        let statements = pgrx::PgList::<pg_sys::RawStmt>::from_pg(pg_sys::pg_parse_query(text.as_ptr()));
        if statements.len() != 1 {
            error!("where_clause must be one condition, not several statements");
        }
        let raw = statements.get_ptr(0).unwrap_or_else(|| error!("where_clause is empty"));
        let analyzed =
            pg_sys::parse_analyze_fixedparams(raw, text.as_ptr(), std::ptr::null(), 0, std::ptr::null_mut());
        let q = &*analyzed;
        let tables = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable);
        if tables.len() != 1 || q.hasSubLinks || !q.cteList.is_null() {
            error!("where_clause may refer only to the table's own columns (no other table, no subquery)");
        }
        if !q.setOperations.is_null()
            || !q.sortClause.is_null()
            || !q.limitCount.is_null()
            || !q.limitOffset.is_null()
            || !q.groupClause.is_null()
            || !q.havingQual.is_null()
            || !q.distinctClause.is_null()
            || pgrx::PgList::<pg_sys::TargetEntry>::from_pg(q.targetList).len() != 1
        {
            error!("where_clause must be one condition: nothing may follow it");
        }
        let condition = (*q.jointree).quals;
        if condition.is_null() {
            error!("where_clause is empty");
        }
        if pg_sys::contain_volatile_functions(condition) {
            error!("where_clause must not call volatile functions (such as random()); stable ones (now()) are fine");
        }
        let relid = (*tables.get_ptr(0).unwrap_or_else(|| error!("where_clause names no table"))).relid;
        let context = pg_sys::deparse_context_for(pg_sys::get_rel_name(relid), relid);
        // Constants print through output functions: in the worker's text
        // forms, which it reads them back in (a date under DateStyle
        // 'SQL, DMY' would print 01/02/2025 and read back as 2 January).
        let guc_level = pg_sys::NewGUCNestLevel();
        for (name, value) in TEXT_SETTINGS {
            set_setting(name, value);
        }
        let printed = pg_sys::deparse_expression(condition, context, false, false);
        pg_sys::AtEOXact_GUC(false, guc_level);
        CStr::from_ptr(printed).to_string_lossy().into_owned()
    }
}

/// Sets `name` for the current GUC nest level (undone with it).
unsafe fn set_setting(name: &str, value: &str) {
    let (name, value) = (CString::new(name).expect("no NUL"), CString::new(value).expect("no NUL"));
    pg_sys::set_config_option(
        name.as_ptr(),
        value.as_ptr(),
        pg_sys::GucContext::PGC_USERSET,
        pg_sys::GucSource::PGC_S_SESSION,
        pg_sys::GucAction::GUC_ACTION_SAVE,
        true,
        0,
        false,
    );
}

/// Runs `query` (a backfill chunk's SELECT, built by the worker) as role
/// `run_as` and returns each row's columns as their types' output
/// functions write them, which is what pgoutput sends for a live row.
///
/// The query runs in a security-restricted operation, as VACUUM runs index
/// expressions as the table's owner: the role's privileges and row
/// security apply, and nothing it calls can change the role back to the
/// worker's superuser (`SET ROLE`, `RESET ROLE`, `SET SESSION
/// AUTHORIZATION` and `set_config` of either are refused), with
/// `search_path = pg_catalog, pg_temp` as the clause was checked. Settings
/// it changes are undone before the values are written as text, so each
/// row's text form depends only on the session's pinned settings.
///
/// The columns must have the types `column_types` (as the worker read the
/// table's shape; the table is locked against ALTER from planning on):
/// otherwise SQLSTATE 42804, and the worker reads the shape again.
///
/// Rows are fetched in parts and the read stops once they hold `max_bytes`
/// (at least one row), so a chunk of huge rows never sits whole in memory;
/// a NULL row last says it stopped there.
#[pg_extern(volatile)]
fn _read_chunk(
    run_as: pg_sys::Oid,
    query: &str,
    max_bytes: i64,
    column_types: Vec<pg_sys::Oid>,
) -> SetOfIterator<'static, Option<Vec<Option<String>>>> {
    if !unsafe { pg_sys::superuser() } {
        error!("_read_chunk is the wal_listener worker's own; superusers only");
    }
    let role_exists = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE oid = $1)",
        &[run_as.into()],
    );
    if !matches!(role_exists, Ok(Some(true))) {
        error!("the role that started this backfill (oid {run_as}) no longer exists");
    }
    let Ok(query) = CString::new(query) else {
        error!("a chunk query must not contain a NUL character");
    };
    let read = unsafe { fetch_as(run_as, &query, max_bytes.max(1) as usize, &column_types) };
    let mut rows: Vec<_> =
        unsafe { output_text(read.descriptor, &read.tuples) }.into_iter().map(Some).collect();
    if read.cut {
        rows.push(None);
    }
    SetOfIterator::new(rows)
}

/// The most rows one cursor fetch takes: the bytes bound is checked between fetches.
const FETCH_ROWS: usize = 256;

/// What [`fetch_as`] read: flattened tuples (TOAST fetched and
/// decompressed) in the caller's memory context, their descriptor, and
/// whether it stopped at the bytes bound.
struct Fetched {
    descriptor: pg_sys::TupleDesc,
    tuples: Vec<pg_sys::HeapTupleHeader>,
    cut: bool,
}

/// Runs `query` as `role` and fetches its rows until they hold `max_bytes`.
unsafe fn fetch_as(
    role: pg_sys::Oid,
    query: &CStr,
    max_bytes: usize,
    column_types: &[pg_sys::Oid],
) -> Fetched {
    let outer = pg_sys::CurrentMemoryContext;
    let guc_level = pg_sys::NewGUCNestLevel();
    set_setting("search_path", "pg_catalog, pg_temp");
    let switch = UserSwitch::to(role, pg_sys::SECURITY_RESTRICTED_OPERATION);
    if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
        error!("SPI_connect failed");
    }
    let plan = pg_sys::SPI_prepare(query.as_ptr(), 0, std::ptr::null_mut());
    if plan.is_null() {
        let code = pg_sys::SPI_result;
        error!("a chunk query did not prepare: SPI error {code}");
    }
    let portal =
        pg_sys::SPI_cursor_open(std::ptr::null(), plan, std::ptr::null_mut(), std::ptr::null(), true);
    let read_types: Vec<pg_sys::Oid> =
        pgrx::PgTupleDesc::from_pg_unchecked((*portal).tupDesc).iter().map(|a| a.atttypid).collect();
    if read_types != column_types {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "the table's columns changed since the backfill read its shape (types {read_types:?}, \
                 expected {column_types:?})"
            )
        );
    }
    let mut fetched = Fetched { descriptor: std::ptr::null_mut(), tuples: Vec::new(), cut: false };
    let mut bytes = 0;
    // One row first; then as many as the rows so far say fit the rest of the budget.
    let mut fetch = 1;
    loop {
        pg_sys::SPI_cursor_fetch(portal, true, fetch);
        let table = pg_sys::SPI_tuptable;
        if pg_sys::SPI_processed == 0 || table.is_null() {
            break;
        }
        let previous = pg_sys::MemoryContextSwitchTo(outer);
        if fetched.descriptor.is_null() {
            fetched.descriptor = pg_sys::CreateTupleDescCopy((*table).tupdesc);
        }
        for i in 0..pg_sys::SPI_processed as usize {
            let datum = pg_sys::heap_copy_tuple_as_datum(*(*table).vals.add(i), (*table).tupdesc);
            let header = datum.cast_mut_ptr::<pg_sys::HeapTupleHeaderData>();
            bytes += pgrx::heap_tuple_header_get_datum_length(header)
                + (*(*table).tupdesc).natts as usize * store::VALUE_COST;
            fetched.tuples.push(header);
        }
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::SPI_freetuptable(table);
        if bytes >= max_bytes {
            fetched.cut = true;
            break;
        }
        let average = bytes / fetched.tuples.len();
        fetch = ((max_bytes - bytes) / average.max(1)).clamp(1, FETCH_ROWS) as std::ffi::c_long;
    }
    pg_sys::SPI_cursor_close(portal);
    pg_sys::SPI_finish();
    drop(switch);
    // Undo whatever the query's functions set, before any value is written as text.
    pg_sys::AtEOXact_GUC(false, guc_level);
    fetched
}

/// Each tuple's columns through their types' output functions.
unsafe fn output_text(
    descriptor: pg_sys::TupleDesc,
    tuples: &[pg_sys::HeapTupleHeader],
) -> Vec<Vec<Option<String>>> {
    if descriptor.is_null() {
        return Vec::new();
    }
    let outputs: Vec<pg_sys::Oid> = pgrx::PgTupleDesc::from_pg_unchecked(descriptor)
        .iter()
        .map(|attribute| {
            let (mut function, mut varlena) = (pg_sys::Oid::INVALID, false);
            pg_sys::getTypeOutputInfo(attribute.atttypid, &mut function, &mut varlena);
            function
        })
        .collect();
    let columns = outputs.len();
    let mut values = vec![pg_sys::Datum::from(0); columns];
    let mut nulls = vec![false; columns];
    tuples
        .iter()
        .map(|&header| {
            let mut tuple = pg_sys::HeapTupleData {
                t_len: pgrx::heap_tuple_header_get_datum_length(header) as u32,
                t_data: header,
                ..Default::default()
            };
            pg_sys::heap_deform_tuple(&mut tuple, descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
            let row = (0..columns)
                .map(|i| {
                    (!nulls[i]).then(|| {
                        let text = pg_sys::OidOutputFunctionCall(outputs[i], values[i]);
                        let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
                        pg_sys::pfree(text.cast());
                        owned
                    })
                })
                .collect();
            pg_sys::pfree(header.cast());
            row
        })
        .collect()
}
