//! Runs the pipeline outside Postgres, against a server's Unix socket: the
//! core's own end-to-end check (tests/test_core_standalone.py) and a
//! debugging aid. Prints log lines and state changes to stderr.
//!
//! Usage: standalone --socket-dir DIR --port N --database DB --nats-url URL
//!                   [--user ROLE] [--slot NAME] [--publication NAME] [--topic NAME]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use wal_listener_core::config::{PipelineConfig, PublishConfig, SourceConfig};
use wal_listener_core::pipeline;
use wal_listener_core::status::StatusBoard;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options: HashMap<&str, &str> = args
        .chunks(2)
        .filter_map(|pair| Some((pair[0].strip_prefix("--")?, pair.get(1)?.as_str())))
        .collect();
    let option = |name: &str, default: Option<&str>| -> String {
        match options.get(name).copied().or(default) {
            Some(value) => value.to_owned(),
            None => {
                eprintln!("missing --{name}");
                std::process::exit(2)
            }
        }
    };
    let source = SourceConfig {
        socket_dir: option("socket-dir", None),
        port: option("port", None).parse().expect("--port must be a number"),
        user: option("user", Some("postgres")),
        database: option("database", None),
        slot: option("slot", Some("wal_listener")),
        publication: option("publication", Some("wal_listener")),
        require_extension: false,
        stop_at_drop: false,
        take_over_database_slot: false,
        failover_slot: false,
    };
    let publish = PublishConfig {
        nats_url: option("nats-url", None),
        topic: option("topic", Some("wal_listener")),
        topic_prefix: String::new(),
        subject_database: None,
        create_stream: true,
        max_in_flight: 4096,
        max_in_flight_bytes: 64 << 20,
        stream_replicas: 1,
        publish_mode: Default::default(),
        transaction_end_events: false,
        auth: Default::default(),
        tls: Default::default(),
        oversize_policy: Default::default(),
    };
    let board = Arc::new(StatusBoard::new(Box::new(|| {})));
    let (_config_tx, config_rx) = watch::channel(PipelineConfig::new(source, publish));
    let (_shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(pipeline::run_supervised(config_rx, board.clone(), Default::default(), shutdown_rx));

    let mut last_state = None;
    loop {
        for line in board.drain_log() {
            eprintln!("{:?}: {}", line.level, line.message);
        }
        let snapshot = board.snapshot();
        if last_state != Some(snapshot.state) {
            eprintln!("state: {}", snapshot.state.as_str());
            last_state = Some(snapshot.state);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
