//! The `wal_listener.*` settings of DESIGN.md section 4.

use std::ffi::{c_char, CString};

use pgrx::pg_guard;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use wal_listener_core::config::{NatsAuth, PublishConfig};

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
static NATS_USER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_PASSWORD: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

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
    string(
        c"wal_listener.nats_user",
        c"NATS user name (with nats_password).",
        &NATS_USER,
        GucContext::Sighup,
    );
    // Secrets: SUPERUSER_ONLY refuses SHOW and hides pg_settings rows from
    // other roles; the show hook masks the value even for superusers and
    // pg_read_all_settings members.
    let secret = |name, short, setting, show: unsafe extern "C-unwind" fn() -> *const c_char| unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            short,
            c"",
            setting,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            None,
            None,
            Some(show),
        )
    };
    secret(c"wal_listener.nats_password", c"NATS password (secret).", &NATS_PASSWORD, show_password);
    secret(c"wal_listener.nats_token", c"NATS authentication token (secret).", &NATS_TOKEN, show_token);
    // After the definitions: reserving drops placeholders of names not defined yet.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"wal_listener".as_ptr()) };
}

/// What SHOW and pg_settings print for a secret: whether it is set, never its value.
fn masked(setting: &GucSetting<Option<CString>>) -> *const c_char {
    if setting.get().is_some_and(|v| !v.is_empty()) {
        c"********".as_ptr()
    } else {
        c"".as_ptr()
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn show_password() -> *const c_char {
    masked(&NATS_PASSWORD)
}

#[pg_guard]
unsafe extern "C-unwind" fn show_token() -> *const c_char {
    masked(&NATS_TOKEN)
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
        auth: NatsAuth { user: text(&NATS_USER), password: text(&NATS_PASSWORD), token: text(&NATS_TOKEN) },
    }
}
