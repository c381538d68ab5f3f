//! NATS-only limit for bench/bench.py: publishes recorded events to a
//! JetStream stream with the worker's own publisher (core/src/publish/mod.rs:
//! `Nats-Msg-Id` = event id, PubAcks on one subscription, up to 4096 in
//! flight) and prints the seconds from the first publish to the last PubAck.
//!
//! Usage: nats_baseline NATS_URL STREAM PAYLOAD_FILE
//! PAYLOAD_FILE: per message, u32 (big-endian) subject length, subject,
//! u32 body length, body. Creates STREAM (file storage, subjects STREAM.>).

use std::sync::Arc;
use std::time::Instant;

use async_nats::Subject;
use bytes::Bytes;
use wal_listener_core::ack_tracker::AckTracker;
use wal_listener_core::config::PublishConfig;
use wal_listener_core::event::Position;
use wal_listener_core::publish::{headers, Publisher, Reply, Sent};
use wal_listener_core::status::StatusBoard;
use wal_listener_core::Lsn;

const MAX_IN_FLIGHT: usize = 4096;

fn read_payloads(path: &str) -> Vec<(Subject, Bytes)> {
    let data = std::fs::read(path).expect("payload file readable");
    let mut messages = Vec::new();
    let mut at = 0;
    let field = |at: &mut usize| {
        let len = u32::from_be_bytes(data[*at..*at + 4].try_into().unwrap()) as usize;
        *at += 4 + len;
        &data[*at - len..*at]
    };
    while at < data.len() {
        let subject = Subject::from(std::str::from_utf8(field(&mut at)).expect("UTF-8 subject"));
        let body = Bytes::copy_from_slice(field(&mut at));
        messages.push((subject, body));
    }
    messages
}

/// The event id, `{"id":"<36 chars>"`: the worker's `Nats-Msg-Id`; copied
/// to the stack, so the body can move into the publish.
fn event_id(body: &[u8]) -> [u8; 36] {
    body[7..43].try_into().expect("event starts with its id")
}

async fn await_ack(publisher: &mut Publisher, in_flight: &mut AckTracker<()>) {
    let (sequence, reply) = publisher.next_ack().await.expect("PubAck");
    assert!(matches!(reply, Reply::Stored { .. }), "not stored by JetStream: {reply:?}");
    in_flight.acked(sequence);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, stream_name, path] = args.as_slice() else {
        eprintln!("usage: nats_baseline NATS_URL STREAM PAYLOAD_FILE");
        std::process::exit(2)
    };
    let messages = read_payloads(path);
    let config = PublishConfig {
        nats_url: url.clone(),
        topic: stream_name.clone(),
        topic_prefix: String::new(),
        subject_database: None,
        create_stream: true,
        max_in_flight: MAX_IN_FLIGHT,
        max_in_flight_bytes: usize::MAX,
        stream_replicas: 1,
        publish_mode: Default::default(),
        transaction_end_events: false,
        auth: Default::default(),
        tls: Default::default(),
        oversize_policy: Default::default(),
    };
    let board = Arc::new(StatusBoard::new(Box::new(|| {})));
    let mut publisher = Publisher::connect(&config, &board).await.expect("NATS reachable, stream created");

    let position =
        Position { commit_lsn: Lsn(0x1_6B37_4800), commit_time: 818_000_000_000_000, xid: 0, ordinal: 0 };
    let started = Instant::now();
    let mut in_flight = AckTracker::new(Lsn(0));
    for (subject, body) in messages {
        while in_flight.unacked() >= MAX_IN_FLIGHT {
            await_ack(&mut publisher, &mut in_flight).await;
        }
        let id = event_id(&body);
        let id = std::str::from_utf8(&id).expect("ASCII id");
        let bytes = body.len();
        // The headers the worker sends with a row event, so the baseline's messages are as large.
        let headers = headers::row_event("public", "bench_rows", "READ", &position);
        match publisher
            .publish(&subject, id, headers, body, in_flight.next_sequence())
            .await
            .expect("published")
        {
            Sent::Published => {
                in_flight.published((), bytes, Instant::now());
            }
            Sent::TooLarge(why) => panic!("event {id} too large: {why}"),
        }
    }
    while !in_flight.is_empty() {
        await_ack(&mut publisher, &mut in_flight).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("{elapsed:.6}");
    eprintln!("{} messages in {elapsed:.3} s", in_flight.next_sequence());
}
