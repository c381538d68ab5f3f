use super::*;
use crate::pgoutput::Column;

fn users() -> Relation {
    let column =
        |name: &str, type_oid, is_key| Column { name: name.into(), type_oid, type_modifier: -1, is_key };
    Relation {
        id: 1,
        namespace: "public".into(),
        name: "users".into(),
        replica_identity: b'd',
        columns: vec![column("id", 23, true), column("email", 25, false), column("bio", 25, false)],
    }
}

const POSITION: Position =
    Position { commit_lsn: Lsn(0x1_0000_00A8), commit_time: 848_871_822_123_456, xid: 731, ordinal: 2 };

fn kinds(relation: &Relation) -> Vec<ValueKind> {
    let catalog = TypeCatalog::default();
    relation.columns.iter().map(|c| catalog.kind(c.type_oid)).collect()
}

/// Encodes a change of `users()`.
fn encode_users(action: Action, new: Option<&TupleData<'_>>, old: Option<&OldTuple<'_>>) -> String {
    let relation = users();
    encode(&RowChange { relation: &relation, kinds: &kinds(&relation), action, new, old })
}

fn encode(change: &RowChange<'_, '_>) -> String {
    let mut out = Vec::new();
    encode_event(&mut out, "00000000-0000-0000-0000-000000000001", change, &POSITION).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn insert_has_the_wal_listener_keys_then_position_keys() {
    let new = TupleData { values: vec![Value::Text(b"1"), Value::Text(b"a@b.c"), Value::Null] };
    let json = encode_users(Action::Insert, Some(&new), None);
    assert_eq!(
        json,
        concat!(
            r#"{"id":"00000000-0000-0000-0000-000000000001","schema":"public","table":"users","action":"INSERT","#,
            r#""data":{"id":1,"email":"a@b.c","bio":null},"dataOld":{},"commitTime":"2026-11-24T21:43:42.123456Z","#,
            r#""primaryKey":["id"],"lsn":"1/A8","xid":731,"ordinal":2}"#
        )
    );
}

#[test]
fn delete_has_empty_data_and_only_the_key_in_data_old() {
    let old = OldTuple::Key(TupleData { values: vec![Value::Text(b"7"), Value::Null, Value::Null] });
    let json = encode_users(Action::Delete, None, Some(&old));
    assert!(json.contains(r#""action":"DELETE","data":{},"dataOld":{"id":7},"#), "{json}");
}

#[test]
fn full_old_row_keeps_every_column() {
    let old = OldTuple::Full(TupleData { values: vec![Value::Text(b"7"), Value::Text(b"e"), Value::Null] });
    let new = TupleData { values: vec![Value::Text(b"7"), Value::Text(b"f"), Value::Null] };
    let json = encode_users(Action::Update, Some(&new), Some(&old));
    assert!(json.contains(r#""dataOld":{"id":7,"email":"e","bio":null}"#), "{json}");
}

#[test]
fn unchanged_toast_is_left_out_and_named() {
    let new = TupleData { values: vec![Value::Text(b"1"), Value::Text(b"x"), Value::UnchangedToast] };
    let json = encode_users(Action::Update, Some(&new), None);
    assert!(json.contains(r#""data":{"id":1,"email":"x"}"#), "{json}");
    assert!(json.ends_with(r#","ordinal":2,"unchangedToast":["bio"]}"#), "{json}");
}

#[test]
fn unchanged_toast_takes_the_value_of_a_full_old_row() {
    let old = OldTuple::Full(TupleData {
        values: vec![Value::Text(b"1"), Value::Text(b"x"), Value::Text(b"long")],
    });
    let new = TupleData { values: vec![Value::Text(b"1"), Value::Text(b"y"), Value::UnchangedToast] };
    let json = encode_users(Action::Update, Some(&new), Some(&old));
    assert!(json.contains(r#""data":{"id":1,"email":"y","bio":"long"}"#), "{json}");
    assert!(!json.contains("unchangedToast"), "{json}");
}

#[test]
fn mismatched_tuple_is_an_error() {
    let relation = users();
    let new = TupleData { values: vec![Value::Text(b"1")] };
    let mut out = Vec::new();
    let err = encode_event(
        &mut out,
        "nil",
        &RowChange {
            relation: &relation,
            kinds: &kinds(&relation),
            action: Action::Insert,
            new: Some(&new),
            old: None,
        },
        &POSITION,
    )
    .unwrap_err();
    assert_eq!(err, EventError::ColumnCountMismatch { table: "public.users".into(), columns: 3, values: 1 });
}

#[test]
fn invalid_utf8_is_an_error() {
    let relation = users();
    let new = TupleData { values: vec![Value::Text(b"1"), Value::Text(b"\xff"), Value::Null] };
    let mut out = Vec::new();
    let change = RowChange {
        relation: &relation,
        kinds: &kinds(&relation),
        action: Action::Insert,
        new: Some(&new),
        old: None,
    };
    assert!(matches!(encode_event(&mut out, "nil", &change, &POSITION), Err(EventError::InvalidUtf8 { .. })));
}

#[test]
fn ids_are_deterministic_and_distinct() {
    let ids = EventIds::new(7_300_000_000_000_000_001, "wal_listener");
    assert_eq!(ids.id(Lsn(0x100), 0), ids.id(Lsn(0x100), 0));
    assert_eq!(ids.id(Lsn(0x100), 0).get_version_num(), 5);
    assert_ne!(ids.id(Lsn(0x100), 0), ids.id(Lsn(0x100), 1));
    assert_ne!(ids.id(Lsn(0x100), 0), ids.id(Lsn(0x101), 0));
    assert_ne!(
        ids.id(Lsn(0x100), 0),
        EventIds::new(7_300_000_000_000_000_002, "wal_listener").id(Lsn(0x100), 0)
    );
    assert_ne!(ids.id(Lsn(0x100), 0), EventIds::new(7_300_000_000_000_000_001, "other").id(Lsn(0x100), 0));
    // A slot name too long for the stack buffer still gives the same kind of id.
    let long = EventIds::new(1, &"s".repeat(200));
    assert_eq!(long.id(Lsn(1), 2), long.id(Lsn(1), 2));
    let mut buf = [0u8; 36];
    assert_eq!(ids.id_text(Lsn(0x100), 0, &mut buf), ids.id(Lsn(0x100), 0).to_string());
}

#[test]
fn subjects_follow_the_wal_listener_scheme() {
    assert_eq!(default_subject("wal_listener", "", "public", "users"), "wal_listener.public_users");
    assert_eq!(default_subject("events", "app.", "public", "users"), "events.app.public_users");
    assert_eq!(default_subject("t", "", "my schema", "a.b*c>"), "t.my_schema_a_b_c_");
}

#[test]
fn describe_row_names_the_key_of_the_new_or_old_row() {
    let relation = users();
    let kinds = kinds(&relation);
    let new = TupleData { values: vec![Value::Text(b"42"), Value::Text(b"e"), Value::Null] };
    let change =
        RowChange { relation: &relation, kinds: &kinds, action: Action::Insert, new: Some(&new), old: None };
    assert_eq!(describe_row(&change), "public.users (id)=(42)");

    let long = "x".repeat(100);
    let old =
        OldTuple::Key(TupleData { values: vec![Value::Text(long.as_bytes()), Value::Null, Value::Null] });
    let change =
        RowChange { relation: &relation, kinds: &kinds, action: Action::Delete, new: None, old: Some(&old) };
    assert_eq!(describe_row(&change), format!("public.users (id)=({}…)", "x".repeat(64)));

    let change =
        RowChange { relation: &relation, kinds: &kinds, action: Action::Truncate, new: None, old: None };
    assert_eq!(describe_row(&change), "public.users (no key)");
}

#[test]
fn end_event_counts_events_in_all_and_per_subject() {
    let position = Position { commit_lsn: Lsn(0x1_0000_00A0), commit_time: 0, xid: 7, ordinal: END_ORDINAL };
    let mut out = Vec::new();
    encode_end(&mut out, "i", &position, &[("wal_listener.public_a", 2), ("wal_listener.public_b\"", 1)]);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"id":"i","action":"END","commitTime":"2000-01-01T00:00:00.000000Z","lsn":"1/A0","xid":7,"events":3,"subjects":{"wal_listener.public_a":2,"wal_listener.public_b\"":1}}"#
    );
    assert_eq!(end_subject("wal_listener", ""), "wal_listener._transaction");
    assert_eq!(end_subject("t", "p_"), "t.p__transaction");
    let ids = EventIds::new(1, "wal_listener");
    assert_ne!(ids.id(Lsn(5), END_ORDINAL), ids.id(Lsn(5), 0));
}

#[test]
fn a_further_database_s_subjects_carry_its_name_after_the_topic() {
    let root = subject_root("wal_listener", Some("shop"));
    assert_eq!(default_subject(&root, "p_", "public", "orders"), "wal_listener.shop.p_public_orders");
    assert_eq!(end_subject(&root, "p_"), "wal_listener.shop.p__transaction");
    // wal_listener.database keeps the subjects it had.
    let root = subject_root("wal_listener", None);
    assert_eq!(default_subject(&root, "", "public", "orders"), "wal_listener.public_orders");
    assert_eq!(end_subject(&root, ""), "wal_listener._transaction");
}

#[test]
fn a_database_name_is_a_subject_token_or_is_refused() {
    for fine in ["shop", "my-db", "Ünïcode_1", "$x"] {
        assert_eq!(subject_token_problem(fine), None, "{fine}");
    }
    for bad in ["", "my.db", "a*", "b>", "my db", "tab\tdb", "line\n"] {
        assert!(subject_token_problem(bad).is_some(), "{bad:?}");
    }
}
