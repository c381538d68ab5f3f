//! NATS-only limit for bench/bench.py: publishes recorded events to a
//! JetStream stream the way the worker does (same context settings, up to
//! 4096 PubAcks in flight awaited in publish order, `Nats-Msg-Id` = event id)
//! and prints the seconds from the first publish to the last PubAck.
//!
//! Usage: nats_baseline NATS_URL STREAM PAYLOAD_FILE
//! PAYLOAD_FILE: per message, u32 (big-endian) subject length, subject,
//! u32 body length, body. Creates STREAM (file storage, subjects STREAM.>).

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;

const MAX_IN_FLIGHT: usize = 4096;

fn read_payloads(path: &str) -> Vec<(String, Bytes)> {
    let data = std::fs::read(path).expect("payload file readable");
    let mut messages = Vec::new();
    let mut at = 0;
    let field = |at: &mut usize| {
        let len = u32::from_be_bytes(data[*at..*at + 4].try_into().unwrap()) as usize;
        *at += 4 + len;
        &data[*at - len..*at]
    };
    while at < data.len() {
        let subject = String::from_utf8(field(&mut at).to_vec()).expect("UTF-8 subject");
        let body = Bytes::copy_from_slice(field(&mut at));
        messages.push((subject, body));
    }
    messages
}

/// The event id, `{"id":"<36 chars>"`: the worker's `Nats-Msg-Id`.
fn event_id(body: &[u8]) -> &str {
    std::str::from_utf8(&body[7..43]).expect("event starts with its id")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, stream_name, path] = args.as_slice() else {
        eprintln!("usage: nats_baseline NATS_URL STREAM PAYLOAD_FILE");
        std::process::exit(2)
    };
    let messages = read_payloads(path);
    let client = async_nats::connect(url.as_str()).await.expect("NATS reachable");
    // As in core/src/publish.rs.
    let js = jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(MAX_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client);
    js.get_or_create_stream(stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{stream_name}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("stream created");

    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(MAX_IN_FLIGHT);
    for (subject, body) in messages.iter() {
        if in_flight.len() == MAX_IN_FLIGHT {
            let ack: jetstream::context::PublishAckFuture = in_flight.pop_front().unwrap();
            ack.into_future().await.expect("PubAck");
        }
        let message =
            jetstream::message::PublishMessage::build().payload(body.clone()).message_id(event_id(body));
        in_flight.push_back(js.send_publish(subject.clone(), message).await.expect("published"));
    }
    for ack in in_flight {
        ack.into_future().await.expect("PubAck");
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("{elapsed:.6}");
    eprintln!("{} messages in {elapsed:.3} s: {:.0} msg/s", messages.len(), messages.len() as f64 / elapsed);
}
