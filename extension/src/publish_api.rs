//! `wal_listener.publish()`: the checks of `wal_listener_core::sql_message`
//! at call time (each a clear error, nothing written), then the signed
//! frame as a transactional logical message, which the worker publishes at
//! the transaction's commit. The SQL overloads in `api.sql` turn the
//! payload into bytes and call `_publish` as the caller: who may is
//! granted there. The key is read, and the message written, as the
//! extension's owner (so publish() does not depend on
//! `pg_logical_emit_message` being granted to PUBLIC).

use std::cell::RefCell;

use pgrx::prelude::*;
use wal_listener_core::filters::message_mac;
use wal_listener_core::sql_message::{self, Refusal};

use crate::gucs;
use crate::user_switch::UserSwitch;

/// The message key and the role that owns it, as read from one table.
#[derive(Clone)]
struct Key {
    table: pg_sys::Oid,
    owner: pg_sys::Oid,
    key: Vec<u8>,
}

thread_local! {
    /// The key is written once, by CREATE EXTENSION, so a new extension (a
    /// new table OID) is the only way it changes. Saves two queries per call.
    static KEY: RefCell<Option<Key>> = const { RefCell::new(None) };
}

#[pg_extern(volatile)]
fn _publish(subject: Option<&str>, payload: Option<&[u8]>, headers: Option<pgrx::JsonB>) {
    let Some(subject) = subject else {
        refuse(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "subject must not be NULL".into())
    };
    let Some(payload) = payload else {
        refuse(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "payload must not be NULL; an empty message is ''".into(),
        )
    };
    let frame = checked_frame(subject, payload, headers.as_ref().map(|h| &h.0)).unwrap_or_else(|refusal| {
        let code = match refusal {
            Refusal::Invalid(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Refusal::NotAllowed(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            Refusal::TooLarge(_) => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        };
        refuse(code, refusal.to_string())
    });
    // Signed like the config messages: with the key, and bound to this
    // transaction's id (what pgoutput's BEGIN carries), so neither a
    // message written by hand nor a copy in another transaction is sent.
    let Key { owner, key, .. } = message_key();
    let xid = unsafe { pg_sys::GetTopTransactionId() }.into_inner();
    let mac = message_mac(&key, xid, &frame);
    let mut content = Vec::with_capacity(mac.len() + 1 + frame.len());
    content.extend_from_slice(mac.as_bytes());
    content.push(b' ');
    content.extend_from_slice(&frame);
    let _as_owner = UserSwitch::to(owner, pg_sys::SECURITY_RESTRICTED_OPERATION);
    if let Err(e) = Spi::run_with_args(
        "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)",
        &[sql_message::PREFIX.into(), content.into()],
    ) {
        error!("writing the publish() message failed: {e}");
    }
}

/// The key config and `publish()` messages are signed with, and its
/// owner; read as the owner (no other role may read the key) when the
/// cache does not hold this table's.
fn message_key() -> Key {
    let table = unsafe {
        let schema = pg_sys::get_namespace_oid(c"wal_listener".as_ptr(), true);
        pg_sys::get_relname_relid(c"message_key".as_ptr(), schema)
    };
    if table == pg_sys::InvalidOid {
        error!("wal_listener.message_key is missing: recreate the extension");
    }
    if let Some(key) = KEY.with_borrow(|cached| cached.as_ref().filter(|k| k.table == table).cloned()) {
        return key;
    }
    // Run as the caller: qualified throughout, so no search_path of theirs steers it.
    let owner = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT relowner FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) $1",
        &[table.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("wal_listener.message_key is missing: recreate the extension"));
    let key = {
        let _as_owner = UserSwitch::to(owner, pg_sys::SECURITY_RESTRICTED_OPERATION);
        Spi::get_one::<Vec<u8>>("SELECT key FROM wal_listener.message_key")
    }
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("wal_listener.message_key has no key: recreate the extension"));
    let key = Key { table, owner, key };
    KEY.set(Some(key.clone()));
    key
}

fn checked_frame(
    subject: &str,
    payload: &[u8],
    headers: Option<&serde_json::Value>,
) -> Result<Vec<u8>, Refusal> {
    let (max_bytes, allowed, topic) = gucs::publish_limits();
    let patterns = sql_message::allowed_patterns(&allowed, &topic)?;
    sql_message::check_subject(subject, &patterns)?;
    let headers = sql_message::parse_headers(headers)?;
    sql_message::encode(subject, &headers, payload, max_bytes)
}

fn refuse(code: PgSqlErrorCode, message: String) -> ! {
    ereport!(ERROR, code, message);
}
