//! Filters and per-table subjects (DESIGN.md section 6): which changes are
//! published, and where. Also the validation rules the SQL functions apply,
//! so that the worker and `add_filter` agree on them.

use std::collections::HashMap;

use crate::event::Action;

/// Longest subject NATS accepts in practice (and our limit).
pub const MAX_SUBJECT_BYTES: usize = 255;

/// Actions a filter may list, in their canonical order.
pub const ACTION_NAMES: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// The rule for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFilter {
    /// Bit `1 << action index` for each published action.
    actions: u8,
    /// Replaces the default subject when set.
    pub subject: Option<String>,
    /// The table's name, for messages (as the config store printed it).
    pub table: Option<String>,
}

impl TableFilter {
    pub fn publishes(&self, action: Action) -> bool {
        self.actions & action_bit(action) != 0
    }
}

fn action_bit(action: Action) -> u8 {
    match action {
        Action::Insert => 1,
        Action::Update => 2,
        Action::Delete => 4,
        Action::Truncate => 8,
        // A backfilled row passes where an INSERT of it would.
        Action::Read => 1,
    }
}

/// The filter set in force. With no rows every table is published; once any
/// row exists, only listed tables with their listed actions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    by_relation: HashMap<u32, TableFilter>,
}

/// What to do with one change.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'f> {
    Skip,
    /// Publish, to this subject instead of the default when `Some`.
    Publish(Option<&'f str>),
}

impl Filters {
    pub fn decide(&self, relation_id: u32, action: Action) -> Decision<'_> {
        if self.by_relation.is_empty() {
            return Decision::Publish(None);
        }
        match self.by_relation.get(&relation_id) {
            Some(rule) if rule.publishes(action) => Decision::Publish(rule.subject.as_deref()),
            _ => Decision::Skip,
        }
    }

    pub fn len(&self) -> usize {
        self.by_relation.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_relation.is_empty()
    }

    /// The per-table subjects, each with the table it is set for.
    pub fn subjects(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_relation.values().filter_map(|rule| {
            Some((rule.subject.as_deref()?, rule.table.as_deref().unwrap_or("a filtered table")))
        })
    }

    /// Parses the rules of one version as the config store reads them:
    /// `[{"relid": 16384, "table": "public.t", "actions": ["insert"], "subject": null}, ...]`.
    pub fn from_json(text: &str) -> Result<Filters, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("filters are not valid JSON: {e}"))?;
        let rows = value.as_array().ok_or("filters must be a JSON array")?;
        let mut by_relation = HashMap::with_capacity(rows.len());
        for row in rows {
            let relid = row
                .get("relid")
                .and_then(serde_json::Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| format!("filter {row} has no valid relid"))?;
            let names: Vec<&str> = row
                .get("actions")
                .and_then(serde_json::Value::as_array)
                .ok_or_else(|| format!("filter {row} has no actions array"))?
                .iter()
                .map(|a| a.as_str().ok_or_else(|| format!("filter {row} has a non-text action")))
                .collect::<Result<_, _>>()?;
            let actions = parse_actions(&names)?;
            let subject = match row.get("subject") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => {
                    validate_subject(s)?;
                    Some(s.clone())
                }
                Some(other) => return Err(format!("filter subject {other} is not text")),
            };
            let table = row.get("table").and_then(serde_json::Value::as_str).map(str::to_owned);
            by_relation.insert(relid, TableFilter { actions, subject, table });
        }
        Ok(Filters { by_relation })
    }

    /// The rules as [`from_json`](Self::from_json) reads them, by relid.
    pub fn to_json(&self) -> String {
        let mut relids: Vec<&u32> = self.by_relation.keys().collect();
        relids.sort();
        let rows: Vec<serde_json::Value> = relids
            .into_iter()
            .map(|relid| {
                let rule = &self.by_relation[relid];
                serde_json::json!({
                    "relid": relid,
                    "table": rule.table,
                    "actions": action_names(rule.actions),
                    "subject": rule.subject,
                })
            })
            .collect();
        serde_json::Value::from(rows).to_string()
    }

    /// These rules with `more` added, a table's rule in `more` replacing
    /// its rule here: one version written by several transactions.
    pub fn with(mut self, more: Filters) -> Filters {
        self.by_relation.extend(more.by_relation);
        self
    }
}

/// A config message's payload, if `content` is `<mac> <payload>` with the
/// MAC that `wal_listener._signed` (api.sql) computes with `key` in
/// transaction `xid` (see [`message_mac`]). Any role may write a logical
/// message with our prefix (`pg_logical_emit_message` is PUBLIC); only the
/// extension's triggers can read the key.
pub fn verified_payload<'c>(key: &[u8], xid: u32, content: &'c [u8]) -> Option<&'c [u8]> {
    let space = content.iter().position(|&b| b == b' ')?;
    let (mac, payload) = (&content[..space], &content[space + 1..]);
    (mac == message_mac(key, xid, payload).as_bytes()).then_some(payload)
}

/// The hex MAC of `payload` written by transaction `xid` (its 32 bits, as
/// pgoutput's BEGIN gives it) under `key`: SHA-256(key || SHA-256(key ||
/// "<xid> " || payload)). The xid binds a message to its transaction, so a
/// copy replayed in another one does not verify.
pub fn message_mac(key: &[u8], xid: u32, payload: &[u8]) -> String {
    let sha256 = |parts: &[&[u8]]| {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        parts.iter().for_each(|part| context.update(part));
        context.finish()
    };
    let inner = sha256(&[key, format!("{xid} ").as_bytes(), payload]);
    sha256(&[key, inner.as_ref()]).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What one transaction writes to the config tables, as their triggers'
/// messages tell it: `{"version": n}` per new version and
/// `{"version": n, "relid": …, "table": …, "actions": […], "subject": …}`
/// per rule. The newest version is in force from the commit on.
#[derive(Debug, Default)]
pub struct FilterChange {
    newest: Option<i64>,
    rules: Vec<(i64, serde_json::Value)>,
}

impl FilterChange {
    pub fn add_message(&mut self, content: &[u8]) -> Result<(), String> {
        let mut message: serde_json::Value = serde_json::from_slice(content).map_err(|e| {
            format!("a filter message is not JSON ({e}): {:?}", String::from_utf8_lossy(content))
        })?;
        let version = message
            .get("version")
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| format!("a filter message has no version: {message}"))?;
        self.newest = Some(self.newest.map_or(version, |newest| newest.max(version)));
        if message.get("relid").is_some() {
            if let Some(object) = message.as_object_mut() {
                object.remove("version");
            }
            self.rules.push((version, message));
        }
        Ok(())
    }

    /// The newest version written and its rules as a JSON array (for
    /// [`Filters::from_json`]); `None` when the transaction wrote none.
    pub fn newest(&self) -> Option<(i64, String)> {
        let newest = self.newest?;
        let rules: Vec<&serde_json::Value> =
            self.rules.iter().filter(|(version, _)| *version == newest).map(|(_, rule)| rule).collect();
        Some((newest, serde_json::Value::from(rules.into_iter().cloned().collect::<Vec<_>>()).to_string()))
    }
}

/// Checks an action list and returns its bit set; the error says what is allowed.
pub fn parse_actions(names: &[&str]) -> Result<u8, String> {
    if names.is_empty() {
        return Err(format!("actions must not be empty; allowed: {}", ACTION_NAMES.join(", ")));
    }
    let mut bits = 0u8;
    for name in names {
        let index = ACTION_NAMES
            .iter()
            .position(|a| a.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("unknown action \"{name}\"; allowed: {}", ACTION_NAMES.join(", ")))?;
        let bit = 1 << index;
        if bits & bit != 0 {
            return Err(format!("action \"{}\" is listed twice", ACTION_NAMES[index]));
        }
        bits |= bit;
    }
    Ok(bits)
}

/// Canonical (lower-case, ordered) names of an action bit set.
pub fn action_names(bits: u8) -> Vec<&'static str> {
    ACTION_NAMES.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, name)| *name).collect()
}

/// Checks that `subject` is a valid NATS publish subject.
pub fn validate_subject(subject: &str) -> Result<(), String> {
    let problem = if subject.is_empty() {
        Some("is empty".to_string())
    } else if subject.len() > MAX_SUBJECT_BYTES {
        Some(format!("is {} bytes long; the limit is {MAX_SUBJECT_BYTES}", subject.len()))
    } else if let Some(c) = subject.chars().find(|c| c.is_whitespace() || c.is_control()) {
        Some(format!("contains {c:?}; whitespace and control characters are not allowed"))
    } else if subject.contains(['*', '>']) {
        Some("contains a wildcard (* or >); events need a concrete subject".to_string())
    } else if subject.split('.').any(str::is_empty) {
        Some("has an empty token (a leading, trailing or doubled '.')".to_string())
    } else {
        None
    };
    match problem {
        Some(p) => Err(format!(
            "subject \"{subject}\" {p}; a subject is dot-separated tokens of printable characters, such as \"orders.created\""
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_filters_publish_everything_to_the_default_subject() {
        let filters = Filters::default();
        assert_eq!(filters.decide(1, Action::Delete), Decision::Publish(None));
    }

    #[test]
    fn listed_tables_pass_with_their_actions_only() {
        let filters = Filters::from_json(
            r#"[{"relid": 10, "actions": ["insert", "update"], "subject": null},
                {"relid": 11, "actions": ["delete"], "subject": "audit.deletes"}]"#,
        )
        .unwrap();
        assert_eq!(filters.decide(10, Action::Insert), Decision::Publish(None));
        assert_eq!(filters.decide(10, Action::Delete), Decision::Skip);
        assert_eq!(filters.decide(11, Action::Delete), Decision::Publish(Some("audit.deletes")));
        assert_eq!(filters.decide(12, Action::Insert), Decision::Skip);
        assert_eq!(Filters::from_json("[]").unwrap(), Filters::default());
    }

    #[test]
    fn lists_per_table_subjects_with_their_tables() {
        let filters = Filters::from_json(
            r#"[{"relid": 10, "actions": ["insert"], "subject": null, "table": "public.a"},
                {"relid": 11, "actions": ["delete"], "subject": "audit.deletes", "table": "public.b"}]"#,
        )
        .unwrap();
        assert_eq!(filters.subjects().collect::<Vec<_>>(), vec![("audit.deletes", "public.b")]);
    }

    #[test]
    fn malformed_filter_json_is_an_error() {
        for bad in [
            "{",
            "{}",
            r#"[{"actions": ["insert"]}]"#,
            r#"[{"relid": 1}]"#,
            r#"[{"relid": 1, "actions": []}]"#,
            r#"[{"relid": 1, "actions": ["insert"], "subject": "a..b"}]"#,
            r#"[{"relid": 1, "actions": ["insert"], "subject": 5}]"#,
        ] {
            assert!(Filters::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_transaction_s_newest_version_is_in_force_with_its_own_rules() {
        let mut change = FilterChange::default();
        assert_eq!(change.newest(), None);
        // A restore writes every version, then every rule.
        for message in [
            r#"{"version": 1}"#,
            r#"{"version": 2}"#,
            r#"{"version": 1, "relid": 10, "table": "public.a", "actions": ["insert"], "subject": null}"#,
            r#"{"version": 2, "relid": 11, "table": "public.b", "actions": ["delete"], "subject": "x.y"}"#,
            r#"{"version": 2, "relid": 12, "table": "public.c", "actions": ["update"], "subject": null}"#,
        ] {
            change.add_message(message.as_bytes()).unwrap();
        }
        let (version, rules) = change.newest().unwrap();
        assert_eq!(version, 2);
        let filters = Filters::from_json(&rules).unwrap();
        assert_eq!((filters.len(), filters.decide(11, Action::Delete)), (2, Decision::Publish(Some("x.y"))));
        assert_eq!(filters.decide(10, Action::Insert), Decision::Skip);

        // remove_filter of the last table: a version with no rules.
        let mut emptied = FilterChange::default();
        emptied.add_message(br#"{"version": 3}"#).unwrap();
        assert_eq!(emptied.newest(), Some((3, "[]".to_string())));
        assert!(FilterChange::default().add_message(b"{}").unwrap_err().contains("no version"));
        assert!(FilterChange::default().add_message(b"7").unwrap_err().contains("no version"));
        assert!(FilterChange::default().add_message(b"x").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn actions_are_checked() {
        assert_eq!(parse_actions(&["insert", "TRUNCATE"]), Ok(0b1001));
        assert_eq!(action_names(0b1001), vec!["insert", "truncate"]);
        assert!(parse_actions(&[]).unwrap_err().contains("must not be empty"));
        assert!(parse_actions(&["upsert"])
            .unwrap_err()
            .contains("unknown action \"upsert\"; allowed: insert"));
        assert!(parse_actions(&["insert", "insert"]).unwrap_err().contains("listed twice"));
    }

    #[test]
    fn subjects_are_checked() {
        assert!(validate_subject("orders.created").is_ok());
        assert!(validate_subject("a").is_ok());
        for (bad, why) in [
            ("", "is empty"),
            ("a b", "whitespace"),
            ("a..b", "empty token"),
            (".a", "empty token"),
            ("a.", "empty token"),
            ("a.*", "wildcard"),
            ("a.>", "wildcard"),
            ("a\tb", "whitespace"),
        ] {
            assert!(validate_subject(bad).unwrap_err().contains(why), "{bad:?}");
        }
        assert!(validate_subject(&"a".repeat(256)).unwrap_err().contains("256 bytes"));
        assert!(validate_subject(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn only_messages_signed_with_the_key_are_taken() {
        let key = b"0123456789abcdef";
        let payload = br#"{"version": 2}"#;
        let signed = format!("{} {}", message_mac(key, 7, payload), std::str::from_utf8(payload).unwrap());
        assert_eq!(verified_payload(key, 7, signed.as_bytes()), Some(&payload[..]));
        assert_eq!(verified_payload(b"another key", 7, signed.as_bytes()), None);
        assert_eq!(verified_payload(key, 8, signed.as_bytes()), None, "a copy in another transaction");
        let forged = signed.replace("2}", "99}");
        assert_eq!(verified_payload(key, 7, forged.as_bytes()), None);
        assert_eq!(verified_payload(key, 7, payload), None, "unsigned");
        assert_eq!(verified_payload(key, 7, b""), None);
        // SHA-256 of "" is e3b0…: the MAC is nested, not that.
        assert_eq!(message_mac(b"", 0, b"").len(), 64);
        assert_ne!(
            message_mac(b"", 0, b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_version_written_in_parts_adds_up_and_round_trips() {
        let a = Filters::from_json(
            r#"[{"relid": 2, "table": "b", "actions": ["delete", "insert"], "subject": "x.b"}]"#,
        )
        .unwrap();
        let b = Filters::from_json(r#"[{"relid": 1, "table": "a", "actions": ["update"], "subject": null},
                                       {"relid": 2, "table": "b", "actions": ["truncate"], "subject": null}]"#)
            .unwrap();
        let both = a.clone().with(b);
        assert_eq!(both.len(), 2);
        assert_eq!(
            both.to_json(),
            r#"[{"actions":["update"],"relid":1,"subject":null,"table":"a"},{"actions":["truncate"],"relid":2,"subject":null,"table":"b"}]"#
        );
        assert_eq!(Filters::from_json(&both.to_json()).unwrap(), both);
        assert_eq!(Filters::from_json(&a.to_json()).unwrap(), a);
        assert_eq!(Filters::default().to_json(), "[]");
        assert!(Filters::default().is_empty() && !a.is_empty());
    }
}
