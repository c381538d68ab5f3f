//! Byte fixtures for every pgoutput v1 message, plus malformed input.

use super::*;

/// Builds message bytes the way the walsender lays them out.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn tag(t: u8) -> Self {
        Bytes(vec![t])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn cstr(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    fn text(self, s: &str) -> Self {
        let mut b = self.u8(b't').i32(s.len() as i32);
        b.0.extend_from_slice(s.as_bytes());
        b
    }
}

fn users_relation() -> Vec<u8> {
    Bytes::tag(b'R')
        .u32(16384)
        .cstr("public")
        .cstr("users")
        .u8(b'd')
        .i16(2)
        .u8(1)
        .cstr("id")
        .u32(23)
        .i32(-1)
        .u8(0)
        .cstr("email")
        .u32(25)
        .i32(-1)
        .0
}

#[test]
fn begin() {
    let bytes = Bytes::tag(b'B').u64(0x1_0000_0010).u64(42).u32(777).0;
    assert_eq!(
        decode(&bytes).unwrap(),
        Message::Begin(Begin { final_lsn: Lsn(0x1_0000_0010), commit_time: 42, xid: 777 })
    );
}

#[test]
fn commit() {
    let bytes = Bytes::tag(b'C').u8(0).u64(0x10).u64(0x40).u64(42).0;
    assert_eq!(
        decode(&bytes).unwrap(),
        Message::Commit(Commit { commit_lsn: Lsn(0x10), end_lsn: Lsn(0x40), commit_time: 42 })
    );
}

#[test]
fn origin_and_type() {
    let origin = Bytes::tag(b'O').u64(0x99).cstr("node_a").0;
    assert_eq!(decode(&origin).unwrap(), Message::Origin { commit_lsn: Lsn(0x99), name: "node_a" });
    let ty = Bytes::tag(b'Y').u32(16500).cstr("public").cstr("mood").0;
    assert_eq!(decode(&ty).unwrap(), Message::Type { oid: 16500, namespace: "public", name: "mood" });
}

#[test]
fn relation_with_key_column() {
    let Message::Relation(rel) = decode(&users_relation()).unwrap() else { panic!("not a relation") };
    assert_eq!(rel.id, 16384);
    assert_eq!((rel.namespace.as_str(), rel.name.as_str()), ("public", "users"));
    assert_eq!(rel.replica_identity, b'd');
    assert_eq!(rel.columns.len(), 2);
    assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
    assert_eq!((rel.columns[1].name.as_str(), rel.columns[1].type_oid), ("email", 25));
}

#[test]
fn relation_cache_replaces_on_resend() {
    let mut cache = RelationCache::default();
    let Message::Relation(rel) = decode(&users_relation()).unwrap() else { panic!() };
    cache.insert(rel.clone());
    let mut altered = rel;
    altered.columns.push(Column { name: "age".into(), type_oid: 23, type_modifier: -1, is_key: false });
    cache.insert(altered);
    assert_eq!(cache.get(16384).unwrap().columns.len(), 3);
    assert!(cache.get(1).is_none());
}

#[test]
fn insert_with_null_text_and_toast() {
    let bytes = Bytes::tag(b'I').u32(16384).u8(b'N').i16(3).text("1").u8(b'n').u8(b'u').0;
    assert_eq!(
        decode(&bytes).unwrap(),
        Message::Insert {
            relation_id: 16384,
            new: TupleData { values: vec![Value::Text(b"1"), Value::Null, Value::UnchangedToast] }
        }
    );
}

#[test]
fn update_without_old_with_key_and_with_full_old() {
    let new_only = Bytes::tag(b'U').u32(1).u8(b'N').i16(1).text("a").0;
    assert!(matches!(decode(&new_only).unwrap(), Message::Update { old: None, .. }));

    let with_key = Bytes::tag(b'U').u32(1).u8(b'K').i16(1).text("old").u8(b'N').i16(1).text("new").0;
    let Message::Update { old: Some(OldTuple::Key(old)), new, .. } = decode(&with_key).unwrap() else {
        panic!()
    };
    assert_eq!(old.values, vec![Value::Text(b"old")]);
    assert_eq!(new.values, vec![Value::Text(b"new")]);

    let full = Bytes::tag(b'U').u32(1).u8(b'O').i16(1).text("o").u8(b'N').i16(1).text("n").0;
    assert!(matches!(decode(&full).unwrap(), Message::Update { old: Some(OldTuple::Full(_)), .. }));
}

#[test]
fn delete_with_key_and_full() {
    let key = Bytes::tag(b'D').u32(7).u8(b'K').i16(1).text("5").0;
    let Message::Delete { relation_id: 7, old } = decode(&key).unwrap() else { panic!() };
    assert_eq!(old, OldTuple::Key(TupleData { values: vec![Value::Text(b"5")] }));
    let full = Bytes::tag(b'D').u32(7).u8(b'O').i16(0).0;
    assert!(matches!(decode(&full).unwrap(), Message::Delete { old: OldTuple::Full(_), .. }));
}

#[test]
fn truncate_with_options() {
    let bytes = Bytes::tag(b'T').u32(2).u8(3).u32(10).u32(11).0;
    assert_eq!(
        decode(&bytes).unwrap(),
        Message::Truncate { relation_ids: vec![10, 11], cascade: true, restart_identity: true }
    );
}

#[test]
fn logical_message() {
    let bytes = Bytes::tag(b'M').u8(1).u64(0x20).cstr("app").i32(2).u8(b'h').u8(b'i').0;
    assert_eq!(
        decode(&bytes).unwrap(),
        Message::Message { transactional: true, lsn: Lsn(0x20), prefix: "app", content: b"hi" }
    );
}

#[test]
fn binary_values_are_kept_apart() {
    let mut b = Bytes::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'b').i32(2);
    b.0.extend_from_slice(&[0xde, 0xad]);
    let Message::Insert { new, .. } = decode(&b.0).unwrap() else { panic!() };
    assert_eq!(new.values, vec![Value::Binary(&[0xde, 0xad])]);
}

#[test]
fn empty_and_unknown_messages_are_errors() {
    assert_eq!(decode(&[]), Err(DecodeError::Empty));
    assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage { tag: b'Z' }));
    // Streaming messages belong to protocol v2+, which we never ask for.
    assert_eq!(decode(b"S\0\0\0\x01\0"), Err(DecodeError::UnknownMessage { tag: b'S' }));
}

#[test]
fn every_truncation_of_every_fixture_is_an_error_not_a_panic() {
    let fixtures = [
        Bytes::tag(b'B').u64(1).u64(2).u32(3).0,
        Bytes::tag(b'C').u8(0).u64(1).u64(2).u64(3).0,
        Bytes::tag(b'O').u64(1).cstr("o").0,
        users_relation(),
        Bytes::tag(b'Y').u32(1).cstr("s").cstr("t").0,
        Bytes::tag(b'I').u32(1).u8(b'N').i16(2).text("abc").u8(b'n').0,
        Bytes::tag(b'U').u32(1).u8(b'O').i16(1).text("o").u8(b'N').i16(1).text("n").0,
        Bytes::tag(b'D').u32(1).u8(b'K').i16(1).text("k").0,
        Bytes::tag(b'T').u32(1).u8(0).u32(9).0,
        Bytes::tag(b'M').u8(0).u64(1).cstr("p").i32(1).u8(b'x').0,
    ];
    for full in &fixtures {
        assert!(decode(full).is_ok(), "fixture {:?} must decode", full[0] as char);
        for cut in 0..full.len() {
            assert!(decode(&full[..cut]).is_err(), "{:?} cut at {cut} must fail", full[0] as char);
        }
        let mut longer = full.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(DecodeError::TrailingBytes { .. })));
    }
}

#[test]
fn corrupt_lengths_and_kinds_are_errors() {
    let negative_len = Bytes::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-5).0;
    assert!(matches!(decode(&negative_len), Err(DecodeError::NegativeLength { .. })));
    let negative_count = Bytes::tag(b'I').u32(1).u8(b'N').i16(-1).0;
    assert!(matches!(decode(&negative_count), Err(DecodeError::NegativeLength { .. })));
    let huge_len = Bytes::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(i32::MAX).0;
    assert!(matches!(decode(&huge_len), Err(DecodeError::Truncated { .. })));
    let bad_kind = Bytes::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x').0;
    assert!(matches!(decode(&bad_kind), Err(DecodeError::UnknownTupleKind { kind: b'x', .. })));
    let bad_sub = Bytes::tag(b'I').u32(1).u8(b'K').i16(0).0;
    assert!(matches!(decode(&bad_sub), Err(DecodeError::UnexpectedSubmessage { .. })));
    let huge_truncate = Bytes::tag(b'T').u32(u32::MAX).u8(0).0;
    assert!(matches!(decode(&huge_truncate), Err(DecodeError::Truncated { .. })));
    let bad_utf8 = Bytes::tag(b'Y').u32(1).u8(0xff).u8(0).cstr("t").0;
    assert!(matches!(decode(&bad_utf8), Err(DecodeError::InvalidUtf8 { .. })));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: every tag followed by pseudo-random tails.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for tag in 0..=255u8 {
        for len in 0..64 {
            let mut buf = vec![tag];
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                buf.push(state as u8);
            }
            let _ = decode(&buf);
        }
    }
}
