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

/// The names of a comma-separated list; double quotes group and `""` escapes one.
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
            c => current.push(c),
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
        ] {
            assert_eq!(sync_standby_names_match(setting, "wal_listener"), matches, "{setting:?}");
        }
        assert!(sync_standby_warning("*", "wal_listener").unwrap().contains("name your standbys"));
        assert_eq!(sync_standby_warning("s1", "wal_listener"), None);
    }
}
