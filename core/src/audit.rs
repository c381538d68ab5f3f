//! The setup audit: settings that are legal but make the worker unsafe or
//! costly, reported in `status().warnings` and the log with what to change.
//! Pure checks; the pipeline feeds them the values it read.

/// Whether `synchronous_standby_names` makes a walsender with
/// `application_name` a synchronous standby candidate. The grammar is
/// `[FIRST | ANY] n (name, ...)` or `name, ...`; `*` matches any name and
/// names compare case-insensitively, as in Postgres' syncrep.c.
pub fn sync_standby_names_match(setting: &str, application_name: &str) -> bool {
    let setting = setting.trim();
    if setting.is_empty() {
        return false;
    }
    // The list is inside parentheses when a method or count is given.
    let list = match (setting.find('('), setting.rfind(')')) {
        (Some(open), Some(close)) if open < close => &setting[open + 1..close],
        _ => setting,
    };
    split_names(list).iter().any(|name| name == "*" || name.eq_ignore_ascii_case(application_name))
}

/// The names of a comma-separated list, as Postgres reads identifiers:
/// double quotes group and `""` escapes one; unquoted letters are folded
/// to lower case (`S1` names slot `s1`).
fn split_names(list: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                current.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => names.push(std::mem::take(&mut current).trim().to_owned()),
            c if quoted => current.push(c),
            c => current.push(c.to_ascii_lowercase()),
        }
    }
    names.push(current.trim().to_owned());
    names
}

/// The warning for a `synchronous_standby_names` that names our walsender.
pub fn sync_standby_warning(setting: &str, application_name: &str) -> Option<String> {
    sync_standby_names_match(setting, application_name).then(|| {
        format!(
            "synchronous_standby_names = '{setting}' matches the worker's walsender (application_name \
             {application_name}): every commit of the cluster waits until its events are in NATS, and stops \
             while NATS is down; name your standbys instead of '*' (see the README, \"Synchronous standbys\")"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_form_of_the_setting() {
        for (setting, matches) in [
            ("", false),
            ("*", true),
            ("wal_listener", true),
            ("WAL_LISTENER", true),
            ("standby1, standby2", false),
            ("standby1, *", true),
            ("FIRST 1 (standby1, wal_listener)", true),
            ("ANY 2 (s1, s2, s3)", false),
            ("ANY 1 (*)", true),
            ("2 (s1, \"wal_listener\")", true),
            ("\"wal,listener\"", false),
            ("\"a\"\"b\", wal_listener", true),
            ("wal_listener_side", false),
            ("\"x,wal_listener\"", false),
            (")wal_listener(", false),
        ] {
            assert_eq!(sync_standby_names_match(setting, "wal_listener"), matches, "{setting:?}");
        }
        assert!(sync_standby_names_match("\"a\"\"b\"", "a\"b"), "\"\" is a quote inside a quoted name");
        assert!(sync_standby_warning("*", "wal_listener").unwrap().contains("name your standbys"));
        assert_eq!(sync_standby_warning("s1", "wal_listener"), None);
    }

    fn ready_standby() -> StandbySettings {
        StandbySettings {
            version_num: 180_006,
            sync_replication_slots: true,
            hot_standby_feedback: true,
            primary_slot_name: "standby1".into(),
            primary_conninfo: "host=/tmp port=5432 user=postgres dbname=app".into(),
            slot: Some(SyncedSlot { synced: true, temporary: false, invalidation_reason: None }),
        }
    }

    #[test]
    fn a_standby_ready_for_failover_has_no_findings_and_each_gap_is_named() {
        assert!(standby_findings(&ready_standby(), "s").is_empty());
        let mut gaps = ready_standby();
        gaps.sync_replication_slots = false;
        gaps.hot_standby_feedback = false;
        gaps.primary_slot_name.clear();
        gaps.primary_conninfo = "host=/tmp port=5432".into();
        gaps.slot = Some(SyncedSlot { synced: true, temporary: true, invalidation_reason: None });
        let findings = standby_findings(&gaps, "s").join("\n");
        for name in
            ["sync_replication_slots", "hot_standby_feedback", "primary_slot_name", "dbname", "not ready yet"]
        {
            assert!(findings.contains(name), "{name}: {findings}");
        }
        gaps.slot = None;
        assert!(standby_findings(&gaps, "s").join("\n").contains("not synced to this standby yet"));
        gaps.slot = Some(SyncedSlot { synced: false, temporary: false, invalidation_reason: None });
        assert!(standby_findings(&gaps, "s").join("\n").contains("was not synced from the primary"));
        let old = StandbySettings { version_num: 150_020, ..Default::default() };
        assert!(standby_findings(&old, "s")[0].starts_with("PostgreSQL 15 has no failover slots"));
        let first = StandbySettings { version_num: FAILOVER_SLOTS_VERSION, ..ready_standby() };
        assert!(standby_findings(&first, "s").is_empty(), "17.0 has failover slots");
    }

    #[test]
    fn conninfo_names_a_database_in_either_form() {
        assert!(conninfo_has_dbname("host=a dbname=app"));
        assert!(!conninfo_has_dbname("host=a dbname="));
        assert!(!conninfo_has_dbname("host=a user=b"));
        assert!(conninfo_has_dbname("postgresql://u@h:5432/app?sslmode=disable"));
        assert!(!conninfo_has_dbname("postgresql://u@h:5432"));
    }

    #[test]
    fn a_primary_with_standbys_needs_a_failover_slot_and_synchronized_standby_slots() {
        let safe = PrimarySettings {
            version_num: 180_006,
            failover_wanted: true,
            slot_is_failover: true,
            synchronized_standby_slots: "standby1".into(),
            has_standbys: true,
        };
        assert!(primary_findings(&safe, "s").is_empty());
        let unset = PrimarySettings { synchronized_standby_slots: String::new(), ..safe.clone() };
        assert!(primary_findings(&unset, "s")[0].starts_with("synchronized_standby_slots is empty"));
        let off = PrimarySettings { failover_wanted: false, ..safe.clone() };
        assert!(primary_findings(&off, "s")[0].contains("is not a failover slot"));
        assert!(primary_findings(&PrimarySettings { has_standbys: false, ..unset }, "s").is_empty());
        let first = PrimarySettings { version_num: FAILOVER_SLOTS_VERSION, ..safe.clone() };
        assert!(primary_findings(&first, "s").is_empty(), "17.0 has failover slots");
        let old = PrimarySettings { version_num: 150_000, ..safe };
        assert!(primary_findings(&old, "s")[0].contains("PostgreSQL 15 has no failover slots"));
    }

    fn slot(name: &str, physical: bool, active: bool, lost: bool) -> ServerSlot {
        ServerSlot { name: name.into(), physical, active, lost }
    }

    #[test]
    fn every_named_slot_must_be_a_physical_valid_slot_with_its_standby_on_it() {
        let slots = [
            slot("s1", true, true, false),
            slot("idle", true, false, false),
            slot("gone", true, false, true),
            slot("wal_listener", false, true, false),
        ];
        assert_eq!(held_by_standby_slots("", &slots), None);
        assert_eq!(held_by_standby_slots("s1", &slots), None);
        assert_eq!(held_by_standby_slots(" s1 , \"s1\"", &slots), None);
        assert_eq!(held_by_standby_slots("S1", &slots), None, "unquoted names are folded");
        assert!(held_by_standby_slots("\"S1\"", &slots).is_some_and(|h| h.certain), "quoted ones are not");
        let missing = held_by_standby_slots("standby1", &slots).unwrap();
        assert!(missing.certain);
        let missing = missing.reason;
        assert!(
            missing.starts_with("nothing is published: synchronized_standby_slots = 'standby1'"),
            "{missing}"
        );
        assert!(missing.contains("slot \"standby1\" does not exist on this server"), "{missing}");
        let idle = held_by_standby_slots("s1, idle", &slots).unwrap();
        assert!(
            !idle.certain && idle.reason.contains("no standby is connected to slot \"idle\""),
            "{idle:?}"
        );
        let all = held_by_standby_slots("s1,idle,gone,wal_listener", &slots).unwrap();
        assert!(all.certain);
        let all = all.reason;
        assert!(all.contains("no standby is connected to slot \"idle\""), "{all}");
        assert!(all.contains("slot \"gone\" was invalidated"), "{all}");
        assert!(all.contains("slot \"wal_listener\" is a logical slot"), "{all}");
        assert!(!all.contains("\"s1\""), "{all}");
    }
}

/// First PostgreSQL version with failover slots (`server_version_num`).
pub const FAILOVER_SLOTS_VERSION: u32 = 170_000;

/// What the audit reads on a standby.
#[derive(Debug, Clone, Default)]
pub struct StandbySettings {
    pub version_num: u32,
    pub sync_replication_slots: bool,
    pub hot_standby_feedback: bool,
    pub primary_slot_name: String,
    pub primary_conninfo: String,
    /// The worker's slot as synced from the primary, if it is there.
    pub slot: Option<SyncedSlot>,
}

#[derive(Debug, Clone, Default)]
pub struct SyncedSlot {
    pub synced: bool,
    /// A synced slot stays temporary until it has caught up with the primary's.
    pub temporary: bool,
    pub invalidation_reason: Option<String>,
}

/// What makes a promotion of this standby lose the worker's slot.
pub fn standby_findings(s: &StandbySettings, slot: &str) -> Vec<String> {
    let why = "a promotion would leave the worker without its slot (see the README, \"High availability\")";
    if s.version_num < FAILOVER_SLOTS_VERSION {
        return vec![format!(
            "PostgreSQL {} has no failover slots: slot \"{slot}\" lives on the primary only; after a promotion \
             the worker refuses to stream until SELECT wal_listener.reset_slot(), and changes since the old \
             slot's position are not published",
            s.version_num / 10_000
        )];
    }
    let mut findings = Vec::new();
    if !s.sync_replication_slots {
        findings.push(format!("sync_replication_slots is off on this standby: {why}; set it to on"));
    }
    if !s.hot_standby_feedback {
        findings.push(format!("hot_standby_feedback is off on this standby: {why}; set it to on"));
    }
    if s.primary_slot_name.is_empty() {
        findings.push(format!(
            "primary_slot_name is not set on this standby: {why}; give it a physical slot on the primary"
        ));
    }
    if !conninfo_has_dbname(&s.primary_conninfo) {
        findings.push(format!("primary_conninfo has no dbname: {why}; add dbname=<any database> to it"));
    }
    match &s.slot {
        None => findings.push(format!("slot \"{slot}\" is not synced to this standby yet: {why}")),
        Some(synced) if !synced.synced => findings.push(format!(
            "slot \"{slot}\" on this standby was not synced from the primary: {why}; drop it here"
        )),
        Some(SyncedSlot { invalidation_reason: Some(reason), .. }) => {
            findings.push(format!("the synced slot \"{slot}\" is invalidated ({reason}): {why}"))
        }
        Some(synced) if synced.temporary => findings.push(format!(
            "the synced slot \"{slot}\" is not ready yet (it has not caught up with the primary's): {why}"
        )),
        Some(_) => {}
    }
    findings
}

/// Whether a libpq connection string names a database.
fn conninfo_has_dbname(conninfo: &str) -> bool {
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        let path = conninfo.split_once("://").map_or("", |(_, rest)| rest);
        let after_host = path.split_once('/').map_or("", |(_, rest)| rest);
        let database = after_host.split('?').next().unwrap_or("");
        return !database.is_empty() || conninfo.contains("dbname=");
    }
    conninfo
        .split_whitespace()
        .any(|pair| pair.split_once('=').is_some_and(|(key, value)| key == "dbname" && !value.is_empty()))
}

/// What the audit reads on a primary.
#[derive(Debug, Clone, Default)]
pub struct PrimarySettings {
    pub version_num: u32,
    pub failover_wanted: bool,
    pub slot_is_failover: bool,
    pub synchronized_standby_slots: String,
    /// Physical slots exist: standbys (may) stream from this server.
    pub has_standbys: bool,
}

/// What makes a failover unsafe, seen from the primary.
pub fn primary_findings(s: &PrimarySettings, slot: &str) -> Vec<String> {
    if !s.has_standbys {
        return Vec::new();
    }
    if s.version_num < FAILOVER_SLOTS_VERSION {
        return vec![format!(
            "this server has standbys, but PostgreSQL {} has no failover slots: after a promotion the worker \
             refuses to stream until SELECT wal_listener.reset_slot() (see the README, \"High availability\")",
            s.version_num / 10_000
        )];
    }
    let mut findings = Vec::new();
    if !s.failover_wanted || !s.slot_is_failover {
        findings.push(format!(
            "slot \"{slot}\" is not a failover slot (wal_listener.failover_slot = {}): standbys do not get a \
             copy, and after a promotion the worker refuses to stream",
            if s.failover_wanted { "on, but the slot could not be switched yet" } else { "off" }
        ));
    } else if s.synchronized_standby_slots.trim().is_empty() {
        findings.push(
            "synchronized_standby_slots is empty: the worker may publish changes a standby never received, \
             and after a failover those events describe rows the new primary does not have; set it to the \
             standbys' physical slots"
                .to_owned(),
        );
    }
    findings
}

/// A replication slot of this server, as `synchronized_standby_slots`
/// needs the ones it names: physical, valid, and with a standby on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSlot {
    pub name: String,
    pub physical: bool,
    pub active: bool,
    /// `wal_status = 'lost'`: invalidated.
    pub lost: bool,
}

/// Why the slots `synchronized_standby_slots` names hold back every
/// change of a failover slot (PostgreSQL 17+ sends none until each named
/// slot received it), and whether that is certain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub reason: String,
    /// `false` when the only cause is a standby not connected right now:
    /// standbys reconnect, so that counts only when seen twice in a row.
    pub certain: bool,
}

/// Why the slots `synchronized_standby_slots` names hold back every logical
/// change of a failover slot: a slot missing, logical, invalidated, or
/// with no standby on it. `None` when they do not. The common case is a
/// promoted standby that kept the old primary's setting, which names its
/// own slot.
pub fn held_by_standby_slots(setting: &str, slots: &[ServerSlot]) -> Option<Held> {
    let mut certain = false;
    let problems: Vec<String> = split_names(setting)
        .into_iter()
        .filter(|name| !name.is_empty())
        .filter_map(|name| {
            let problem = match slots.iter().find(|s| s.name == name) {
                None => format!("slot \"{name}\" does not exist on this server"),
                Some(s) if !s.physical => format!("slot \"{name}\" is a logical slot, not a standby's"),
                Some(s) if s.lost => format!("slot \"{name}\" was invalidated"),
                Some(s) if !s.active => return Some(format!("no standby is connected to slot \"{name}\"")),
                Some(_) => return None,
            };
            certain = true;
            Some(problem)
        })
        .collect();
    (!problems.is_empty()).then(|| Held {
        reason: format!(
            "nothing is published: synchronized_standby_slots = '{setting}' holds every logical change until \
             each slot it names has received it, and {}. Set it to this server's standby slots, or to '' \
             (after a promotion, the old primary's list names slots this server does not have)",
            problems.join(", ")
        ),
        certain,
    })
}
