//! `wal_listener.publish()`: the checks of `wal_listener_core::sql_message`
//! at call time (each a clear error, nothing written), then the signed
//! frame as a transactional logical message, which the worker publishes at
//! the transaction's commit. The SQL overloads in `api.sql` turn the
//! payload into bytes and call `_publish` as the caller: who may is
//! granted there. Only the key is read as the extension's owner.

use std::cell::RefCell;

use pgrx::prelude::*;
use wal_listener_core::filters::message_mac;
use wal_listener_core::sql_message::{self, Refusal};

use crate::gucs;
use crate::user_switch::UserSwitch;

thread_local! {
    /// The message key, with the OID of the table it was read from: the
    /// key is written once, by CREATE EXTENSION, so a new extension (a new
    /// table) is the only way it changes. Saves a query per call.
    static KEY: RefCell<Option<(pg_sys::Oid, Vec<u8>)>> = const { RefCell::new(None) };
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
    let key = message_key();
    let xid = unsafe { pg_sys::GetTopTransactionId() }.into_inner();
    let mac = message_mac(&key, xid, &frame);
    let mut content = Vec::with_capacity(mac.len() + 1 + frame.len());
    content.extend_from_slice(mac.as_bytes());
    content.push(b' ');
    content.extend_from_slice(&frame);
    if let Err(e) = Spi::run_with_args(
        "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)",
        &[sql_message::PREFIX.into(), content.into()],
    ) {
        error!("writing the publish() message failed: {e}");
    }
}

/// The key config and `publish()` messages are signed with, read as the
/// extension's owner (no other role may read it) when it is not cached.
fn message_key() -> Vec<u8> {
    let table = unsafe {
        let schema = pg_sys::get_namespace_oid(c"wal_listener".as_ptr(), true);
        pg_sys::get_relname_relid(c"message_key".as_ptr(), schema)
    };
    if table == pg_sys::InvalidOid {
        error!("wal_listener.message_key is missing: recreate the extension");
    }
    if let Some(key) =
        KEY.with_borrow(|cached| cached.as_ref().filter(|(oid, _)| *oid == table).map(|(_, k)| k.clone()))
    {
        return key;
    }
    let owner = Spi::get_one::<pg_sys::Oid>("SELECT relowner FROM pg_catalog.pg_class WHERE oid = 'wal_listener.message_key'::pg_catalog.regclass")
        .ok()
        .flatten()
        .unwrap_or_else(|| error!("wal_listener.message_key is missing: recreate the extension"));
    let key = {
        let _as_owner = UserSwitch::to(owner, 0);
        Spi::get_one::<Vec<u8>>("SELECT key FROM wal_listener.message_key")
    }
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("wal_listener.message_key has no key: recreate the extension"));
    KEY.set(Some((table, key.clone())));
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
