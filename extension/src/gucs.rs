//! The `wal_listener.*` settings of DESIGN.md section 4.

use std::ffi::{c_char, CString};
use std::time::Duration;

use pgrx::pg_guard;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use wal_listener_core::config::{
    redact_url, NatsAuth, NatsTls, OversizePolicy, PipelineConfig, PublishConfig, PublishMode, SourceConfig,
};

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static SLOT_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"wal_listener"));
static PUBLICATION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"wal_listener"));
static ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"nats://127.0.0.1:4222"));
static TOPIC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"wal_listener"));
static TOPIC_PREFIX: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static CREATE_STREAM: GucSetting<bool> = GucSetting::<bool>::new(true);
static STREAM_REPLICAS: GucSetting<i32> = GucSetting::<i32>::new(1);
static FAILOVER_SLOT: GucSetting<bool> = GucSetting::<bool>::new(true);
static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(4096);
/// In kB (the GUC unit), so that values up to 2 TB fit an int GUC.
static MAX_IN_FLIGHT_BYTES_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
static NATS_USER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_PASSWORD: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_CREDENTIALS_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_NKEY_SEED_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_TLS_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_TLS_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_TLS_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NATS_TLS_REQUIRED: GucSetting<bool> = GucSetting::<bool>::new(false);
static OVERSIZE_POLICY: GucSetting<OversizeSetting> =
    GucSetting::<OversizeSetting>::new(OversizeSetting::Error);
static PUBLISH_MODE: GucSetting<PublishModeSetting> =
    GucSetting::<PublishModeSetting>::new(PublishModeSetting::Event);
static TRANSACTION_END_EVENTS: GucSetting<bool> = GucSetting::<bool>::new(false);
static HEARTBEAT_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(10);
static MAX_PUBLISH_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
static PUBLISH_SUBJECTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
#[cfg(feature = "fault-injection")]
static INJECT_FAULT: GucSetting<FaultSetting> = GucSetting::<FaultSetting>::new(FaultSetting::None);

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Debug)]
enum PublishModeSetting {
    #[name = c"event"]
    Event,
    #[name = c"transaction"]
    Transaction,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Debug)]
enum OversizeSetting {
    #[name = c"error"]
    Error,
    #[name = c"skip"]
    Skip,
}

/// For tests only: built with the `fault-injection` feature, hidden from SHOW ALL.
#[cfg(feature = "fault-injection")]
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Debug)]
enum FaultSetting {
    #[name = c"none"]
    None,
    #[name = c"panic"]
    Panic,
    #[name = c"unknown_message"]
    UnknownMessage,
    #[name = c"undescribed_relation"]
    UndescribedRelation,
    #[name = c"supervisor_panic"]
    SupervisorPanic,
    #[name = c"slow_filter_record"]
    SlowFilterRecord,
    /// A panic on the worker's main thread, the one that calls Postgres.
    #[name = c"host_panic"]
    HostPanic,
}

pub fn register() {
    let string = |name, short, setting, context| {
        GucRegistry::define_string_guc(name, short, c"", setting, context, GucFlags::default())
    };
    string(
        c"wal_listener.database",
        c"Database streamed by the static worker (slot wal_listener.slot_name); empty: none, every database is captured where CREATE EXTENSION runs.",
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
    // Shown with the password of user:password@ masked, as in the log.
    // pg_settings' reset_val and boot_val bypass the show hook, so it is
    // kept out of pg_settings and SHOW ALL (NO_SHOW_ALL); SHOW and
    // current_setting() still answer, masked.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"wal_listener.nats_url",
            c"Comma-separated NATS server URLs.",
            c"",
            &NATS_URL,
            GucContext::Sighup,
            GucFlags::NO_SHOW_ALL,
            None,
            None,
            Some(show_nats_url),
        )
    };
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
        c"wal_listener.stream_replicas",
        c"Replicas of the JetStream stream the worker creates (3 on a NATS cluster).",
        c"",
        &STREAM_REPLICAS,
        1,
        5,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"wal_listener.failover_slot",
        c"Make the slot a failover slot, synced to standbys (PostgreSQL 17 and later).",
        c"",
        &FAILOVER_SLOT,
        GucContext::Postmaster,
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
    GucRegistry::define_int_guc(
        c"wal_listener.max_in_flight_bytes",
        c"Cap on the payload bytes of publishes awaiting their JetStream acknowledgement.",
        c"The read-ahead of received changes is a quarter of it.",
        &MAX_IN_FLIGHT_BYTES_KB,
        1024,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    string(
        c"wal_listener.nats_user",
        c"NATS user name (with nats_password).",
        &NATS_USER,
        GucContext::Sighup,
    );
    // Secrets: SUPERUSER_ONLY refuses SHOW to other roles; NO_SHOW_ALL keeps
    // them out of pg_settings, whose reset_val and boot_val bypass the show
    // hook (pg_read_all_settings members, pg_monitor among them, read those);
    // the hook masks what SHOW prints, for superusers too.
    let secret = |name, short, setting, show: unsafe extern "C-unwind" fn() -> *const c_char| unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            short,
            c"",
            setting,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            None,
            Some(show),
        )
    };
    secret(c"wal_listener.nats_password", c"NATS password (secret).", &NATS_PASSWORD, show_password);
    secret(c"wal_listener.nats_token", c"NATS authentication token (secret).", &NATS_TOKEN, show_token);
    // Key files: the paths are not secret (like ssl_key_file); the files
    // must be readable by the server's OS user only.
    let file = |name, short, setting| string(name, short, setting, GucContext::Sighup);
    file(
        c"wal_listener.nats_credentials_file",
        c"NATS credentials file (user JWT and NKey seed).",
        &NATS_CREDENTIALS_FILE,
    );
    file(c"wal_listener.nats_nkey_seed_file", c"File holding a NATS NKey seed.", &NATS_NKEY_SEED_FILE);
    file(
        c"wal_listener.nats_tls_ca_file",
        c"PEM file of the CAs that sign the NATS server's certificate.",
        &NATS_TLS_CA_FILE,
    );
    file(
        c"wal_listener.nats_tls_cert_file",
        c"PEM client certificate for NATS (with nats_tls_key_file).",
        &NATS_TLS_CERT_FILE,
    );
    file(c"wal_listener.nats_tls_key_file", c"PEM key of the NATS client certificate.", &NATS_TLS_KEY_FILE);
    GucRegistry::define_bool_guc(
        c"wal_listener.nats_tls_required",
        c"Refuse NATS servers that do not offer TLS.",
        c"",
        &NATS_TLS_REQUIRED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"wal_listener.oversize_policy",
        c"What to do with an event larger than the NATS server's max_payload: error (stop before it) or skip (log and count it).",
        c"",
        &OVERSIZE_POLICY,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"wal_listener.publish_mode",
        c"event: one message at a time; transaction: each transaction as one JetStream atomic batch (NATS 2.12+).",
        c"A transaction larger than an atomic batch may be goes one event at a time.",
        &PUBLISH_MODE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"wal_listener.transaction_end_events",
        c"After each transaction's events, publish an END event with their counts on <topic>.<topic_prefix>_transaction.",
        c"A consumer that has every event an END counts holds the whole transaction.",
        &TRANSACTION_END_EVENTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"wal_listener.heartbeat_interval",
        c"How often the worker writes a heartbeat into the WAL so the slot advances in quiet databases; 0 turns it off.",
        c"",
        &HEARTBEAT_INTERVAL_S,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    // Sighup, so a session cannot SET its way past them.
    GucRegistry::define_int_guc(
        c"wal_listener.max_publish_bytes",
        c"Largest payload plus headers wal_listener.publish() accepts.",
        c"Checked when publish() is called; keep it within the NATS server's max_payload.",
        &MAX_PUBLISH_BYTES,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    string(
        c"wal_listener.publish_subjects",
        c"Comma-separated NATS subject patterns wal_listener.publish() may publish to; empty: <topic>.>.",
        &PUBLISH_SUBJECTS,
        GucContext::Sighup,
    );
    #[cfg(feature = "fault-injection")]
    GucRegistry::define_enum_guc(
        c"wal_listener.inject_fault",
        c"Injects a fault into the worker, for tests of its error handling. Never set it in production.",
        c"",
        &INJECT_FAULT,
        GucContext::Sighup,
        GucFlags::NO_SHOW_ALL,
    );
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

thread_local! {
    /// The text SHOW prints for nats_url; Postgres copies it right away.
    static SHOWN_NATS_URL: std::cell::RefCell<CString> = std::cell::RefCell::new(CString::default());
}

#[pg_guard]
unsafe extern "C-unwind" fn show_nats_url() -> *const c_char {
    let shown = CString::new(redact_url(&text(&NATS_URL))).unwrap_or_default();
    SHOWN_NATS_URL.with(|cell| {
        *cell.borrow_mut() = shown;
        cell.borrow().as_ptr()
    })
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

pub fn failover_slot() -> bool {
    FAILOVER_SLOT.get()
}

/// `wal_listener.publish()`'s limits: (max_publish_bytes, publish_subjects, topic).
pub fn publish_limits() -> (usize, String, String) {
    (usize::try_from(MAX_PUBLISH_BYTES.get()).unwrap_or(0), text(&PUBLISH_SUBJECTS), text(&TOPIC))
}

/// `None` means the bootstrap superuser.
pub fn role() -> Option<String> {
    Some(text(&ROLE)).filter(|r| !r.is_empty())
}

/// The NATS settings (a SIGHUP may change them) of the worker of `database`.
fn publish_config(database: &str) -> PublishConfig {
    PublishConfig {
        nats_url: text(&NATS_URL),
        topic: text(&TOPIC),
        topic_prefix: text(&TOPIC_PREFIX),
        // wal_listener.database keeps the subjects it had before there were others.
        subject_database: Some(database.to_owned()).filter(|d| *d != self::database()),
        create_stream: CREATE_STREAM.get(),
        max_in_flight: usize::try_from(MAX_IN_FLIGHT.get()).unwrap_or(1),
        max_in_flight_bytes: usize::try_from(MAX_IN_FLIGHT_BYTES_KB.get()).unwrap_or(1024) * 1024,
        stream_replicas: usize::try_from(STREAM_REPLICAS.get()).unwrap_or(1),
        publish_mode: match PUBLISH_MODE.get() {
            PublishModeSetting::Event => PublishMode::Event,
            PublishModeSetting::Transaction => PublishMode::Transaction,
        },
        transaction_end_events: TRANSACTION_END_EVENTS.get(),
        auth: NatsAuth {
            user: text(&NATS_USER),
            password: text(&NATS_PASSWORD),
            token: text(&NATS_TOKEN),
            credentials_file: text(&NATS_CREDENTIALS_FILE),
            nkey_seed_file: text(&NATS_NKEY_SEED_FILE),
        },
        tls: NatsTls {
            ca_file: text(&NATS_TLS_CA_FILE),
            cert_file: text(&NATS_TLS_CERT_FILE),
            key_file: text(&NATS_TLS_KEY_FILE),
            required: NATS_TLS_REQUIRED.get(),
        },
        oversize_policy: match OVERSIZE_POLICY.get() {
            OversizeSetting::Error => OversizePolicy::Error,
            OversizeSetting::Skip => OversizePolicy::Skip,
        },
    }
}

/// The pipeline's whole config: `source` (fixed at start) and the settings a SIGHUP may change.
pub fn pipeline_config(source: SourceConfig) -> PipelineConfig {
    let publish = publish_config(&source.database);
    let mut config = PipelineConfig::new(source, publish);
    config.heartbeat_interval = Duration::from_secs(HEARTBEAT_INTERVAL_S.get().max(0) as u64);
    #[cfg(feature = "fault-injection")]
    {
        use wal_listener_core::failpoints::InjectedFault;
        config.inject_fault = match INJECT_FAULT.get() {
            FaultSetting::Panic => Some(InjectedFault::Panic),
            FaultSetting::UnknownMessage => Some(InjectedFault::UnknownMessage),
            FaultSetting::UndescribedRelation => Some(InjectedFault::UndescribedRelation),
            FaultSetting::SupervisorPanic => Some(InjectedFault::SupervisorPanic),
            FaultSetting::SlowFilterRecord => Some(InjectedFault::SlowFilterRecord),
            FaultSetting::None | FaultSetting::HostPanic => None,
        };
    }
    config
}

/// `wal_listener.inject_fault = host_panic`: the worker's main thread should panic.
#[cfg(feature = "fault-injection")]
pub fn host_panic_injected() -> bool {
    INJECT_FAULT.get() == FaultSetting::HostPanic
}
