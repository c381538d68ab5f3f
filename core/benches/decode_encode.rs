//! Decode + encode cost per event, the worker's CPU work between the
//! walsender and NATS: `pgoutput::decode` of an Insert, then the event JSON
//! exactly as `pipeline.rs` builds it (id text, `encode_event`). Also prints
//! heap allocations per event, counted by a wrapping global allocator.
//!
//! `cargo bench -p wal_listener_core --bench decode_encode`

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wal_listener_core::event::{encode_event, Action, EventIds, Position, RowChange, TypeCatalog, ValueKind};
use wal_listener_core::pgoutput::{self, Message, RelationCache};
use wal_listener_core::Lsn;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RELATION_ID: u32 = 16384;

/// (name, type oid, text output) of the narrow row: what bench.py's
/// single-row workloads insert.
const NARROW: &[(&str, u32, &str)] =
    &[("id", 20, "123456"), ("n", 23, "42"), ("created", 1184, "2026-11-24 21:43:42.123456+00")];

/// The 30 columns of bench.py's wide table, with typical text output.
const WIDE: &[(&str, u32, &str)] = &[
    ("id", 20, "123456"),
    ("i2", 21, "12"),
    ("i4", 23, "123456"),
    ("i8", 20, "9007199254740993"),
    ("num1", 1700, "12345.6789"),
    ("num2", 1700, "0.000123"),
    ("txt1", 25, "a short text value"),
    ("txt2", 25, "another text, with \"quotes\" and a tab\t"),
    ("vc1", 1043, "varchar value"),
    ("vc2", 1043, "user@example.com"),
    ("flag1", 16, "t"),
    ("flag2", 16, "f"),
    ("ts1", 1184, "2026-11-24 21:43:42.123456+00"),
    ("ts2", 1184, "2026-01-01 00:00:00+00"),
    ("d1", 1082, "2026-11-24"),
    ("d2", 1082, "1999-12-31"),
    ("doc1", 3802, r#"{"a": 1, "b": [1, 2, 3], "c": "x"}"#),
    ("doc2", 3802, r#"{"nested": {"k": "v", "n": null}}"#),
    ("u1", 2950, "6f1c2b8e-51d4-4c57-9a0e-3c7d2f4b8a19"),
    ("u2", 2950, "0e4a8a1c-7c0d-4b43-8a2e-55a1d3c9b001"),
    ("f1", 701, "3.141592653589793"),
    ("f2", 701, "-0.5"),
    ("i4b", 23, "-7"),
    ("i8b", 20, "1700000000000"),
    ("num3", 1700, "99.95"),
    ("txt3", 25, "third text"),
    ("vc3", 1043, "v3"),
    ("flag3", 16, "t"),
    ("ts3", 1184, "2025-06-30 12:00:00.5+00"),
    ("big", 25, ""), // replaced by 2 kB of text in `wide_columns`
];

fn wide_columns() -> Vec<(&'static str, u32, String)> {
    let big = "0123456789abcdef".repeat(128);
    WIDE.iter()
        .map(|&(name, oid, text)| (name, oid, if name == "big" { big.clone() } else { text.to_owned() }))
        .collect()
}

/// pgoutput v1 Relation message; the first column is the replica identity key.
fn relation_message(columns: &[(&str, u32, String)]) -> Vec<u8> {
    let mut b = vec![b'R'];
    b.extend_from_slice(&RELATION_ID.to_be_bytes());
    for s in ["public", "bench_table"] {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    b.push(b'd');
    b.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for (i, (name, oid, _)) in columns.iter().enumerate() {
        b.push(u8::from(i == 0));
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(&oid.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
    }
    b
}

/// pgoutput v1 Insert message with every value as text.
fn insert_message(columns: &[(&str, u32, String)]) -> Vec<u8> {
    let mut b = vec![b'I'];
    b.extend_from_slice(&RELATION_ID.to_be_bytes());
    b.push(b'N');
    b.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for (_, _, text) in columns {
        b.push(b't');
        b.extend_from_slice(&(text.len() as i32).to_be_bytes());
        b.extend_from_slice(text.as_bytes());
    }
    b
}

/// The per-event state the pipeline keeps: relations, column kinds, ids.
struct Decoder {
    relations: RelationCache,
    kinds: HashMap<u32, Vec<ValueKind>>,
    ids: EventIds,
    last_event_len: usize,
}

impl Decoder {
    fn new(relation: &[u8]) -> Self {
        let Ok(Message::Relation(relation)) = pgoutput::decode(relation) else { panic!("not a relation") };
        let catalog = TypeCatalog::default();
        let kinds = relation.columns.iter().map(|c| catalog.kind(c.type_oid)).collect();
        let mut relations = RelationCache::default();
        relations.insert(relation);
        Decoder {
            relations,
            kinds: HashMap::from([(RELATION_ID, kinds)]),
            ids: EventIds::new(7_300_000_000_000_000_001, "wal_listener"),
            last_event_len: 256,
        }
    }

    /// Decodes one Insert and encodes its event, as `Streamer::on_change` does.
    fn event(&mut self, insert: &[u8], ordinal: u32) -> Vec<u8> {
        let Ok(Message::Insert { relation_id, new }) = pgoutput::decode(insert) else {
            panic!("not an insert")
        };
        let relation = self.relations.get(relation_id).expect("described");
        let kinds = self.kinds.get(&relation_id).map(Vec::as_slice).unwrap_or_default();
        let position =
            Position { commit_lsn: Lsn(0x1_6B37_4D48), commit_time: 817_000_000_000_000, xid: 7731, ordinal };
        let mut id_buf = [0u8; 36];
        let id = self.ids.id_text(position.commit_lsn, ordinal, &mut id_buf);
        let mut body = Vec::with_capacity(self.last_event_len + 64);
        let change = RowChange { relation, kinds, action: Action::Insert, new: Some(&new), old: None };
        encode_event(&mut body, id, &change, &position).expect("encodes");
        self.last_event_len = body.len();
        body
    }
}

fn bench(c: &mut Criterion) {
    let narrow: Vec<_> = NARROW.iter().map(|&(n, o, t)| (n, o, t.to_owned())).collect();
    for (name, columns) in [("narrow", narrow), ("wide", wide_columns())] {
        let insert = insert_message(&columns);
        let mut decoder = Decoder::new(&relation_message(&columns));
        let event_len = decoder.event(&insert, 0).len();

        const COUNTED: u64 = 10_000;
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for ordinal in 0..COUNTED {
            black_box(decoder.event(&insert, ordinal as u32));
        }
        let per_event = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / COUNTED as f64;
        println!(
            "{name}: {} columns, {} B pgoutput -> {event_len} B JSON, allocations/event: {per_event:.2}",
            columns.len(),
            insert.len()
        );

        let mut group = c.benchmark_group("decode_encode");
        group.throughput(Throughput::Elements(1));
        let mut ordinal = 0u32;
        group.bench_function(name, |b| {
            b.iter(|| {
                ordinal = ordinal.wrapping_add(1);
                black_box(decoder.event(black_box(&insert), ordinal))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
