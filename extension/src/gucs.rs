//! The `wal_listener.*` settings of DESIGN.md section 4.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use wal_listener_core::config::PublishConfig;

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static SLOT_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"wal_listener"));
static PUBLICATION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"wal_listener"));
static ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"nats://127.0.0.1:4222"));
static TOPIC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"wal_listener"));
static TOPIC_PREFIX: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static CREATE_STREAM: GucSetting<bool> = GucSetting::<bool>::new(true);
static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(4096);

pub fn register() {
    let string = |name, short, setting, context| {
        GucRegistry::define_string_guc(name, short, c"", setting, context, GucFlags::default())
    };
    string(
        c"wal_listener.database",
        c"Database whose changes are streamed.",
        &DATABASE,
        GucContext::Postmaster,
    );
    string(
        c"wal_listener.slot_name",
        c"Logical replication slot of the worker.",
        &SLOT_NAME,
        GucContext::Postmaster,
    );
    string(
        c"wal_listener.publication",
        c"Publication given to pgoutput.",
        &PUBLICATION,
        GucContext::Postmaster,
    );
    string(
        c"wal_listener.role",
        c"Role of the worker's loopback replication connection (default: the bootstrap superuser).",
        &ROLE,
        GucContext::Postmaster,
    );
    string(c"wal_listener.nats_url", c"Comma-separated NATS server URLs.", &NATS_URL, GucContext::Sighup);
    string(
        c"wal_listener.topic",
        c"First subject token and JetStream stream name.",
        &TOPIC,
        GucContext::Sighup,
    );
    string(
        c"wal_listener.topic_prefix",
        c"Prepended to schema_table in subjects.",
        &TOPIC_PREFIX,
        GucContext::Sighup,
    );
    GucRegistry::define_bool_guc(
        c"wal_listener.create_stream",
        c"Create the JetStream stream <topic> (subjects <topic>.>) when it is missing.",
        c"",
        &CREATE_STREAM,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"wal_listener.max_in_flight",
        c"Cap on publishes awaiting their JetStream acknowledgement.",
        c"",
        &MAX_IN_FLIGHT,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // After the definitions: reserving drops placeholders of names not defined yet.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"wal_listener".as_ptr()) };
}

fn text(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn database() -> String {
    text(&DATABASE)
}

pub fn slot_name() -> String {
    text(&SLOT_NAME)
}

pub fn publication() -> String {
    text(&PUBLICATION)
}

/// `None` means the bootstrap superuser.
pub fn role() -> Option<String> {
    Some(text(&ROLE)).filter(|r| !r.is_empty())
}

/// The settings a SIGHUP may change.
pub fn publish_config() -> PublishConfig {
    PublishConfig {
        nats_url: text(&NATS_URL),
        topic: text(&TOPIC),
        topic_prefix: text(&TOPIC_PREFIX),
        create_stream: CREATE_STREAM.get(),
        max_in_flight: usize::try_from(MAX_IN_FLIGHT.get()).unwrap_or(1),
    }
}
