//! The pipeline: slot → decode → event → JetStream, with the flush LSN
//! confirmed only for transactions whose every event is acked (DESIGN.md
//! rules 3–5), and a supervisor that restarts it from the slot after failures.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{watch, Notify};

use crate::config::{InjectedFault, OversizePolicy, PipelineConfig, SourceConfig};
use crate::event::{
    default_subject, describe_row, encode_event, Action, EventIds, Position, RowChange, TypeCatalog,
    ValueKind,
};
use crate::filters::{Decision, Filters};
use crate::pgoutput::{self, Begin, Message, OldTuple, Relation, RelationCache, TupleData, Value};
use crate::publish::{InFlight, Publisher, Sent, ACK_TIMEOUT};
use crate::replication::{self, OpenError, Session};
use crate::slot_watch;
use crate::status::{LogLevel, State, StatusBoard};
use crate::{Error, Lsn};

/// How often the oldest unacked publish is checked against ACK_TIMEOUT.
const ACK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long to wait before checking again when streaming cannot start yet.
const NOT_READY_RETRY: Duration = Duration::from_secs(2);

/// Runs the pipeline until `shutdown` becomes true. Every failure is
/// reported on `board`, followed by a growing delay and a restart from the
/// slot's confirmed position; a new config restarts it at once.
/// `restart` drops the connections and starts over from the slot at once.
pub async fn run_supervised(
    mut config: watch::Receiver<PipelineConfig>,
    board: Arc<StatusBoard>,
    restart: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slot_watch = tokio::spawn(slot_watch::run(config.clone(), board.clone()));
    let mut delay: Option<Duration> = None;
    let mut waiting_reason: Option<String> = None;
    while !*shutdown.borrow() {
        let cfg = config.borrow_and_update().clone();
        if waiting_reason.is_none() {
            board.set_state(State::Connecting);
        }
        let started = Instant::now();
        // A task of its own, so that a panic anywhere in it is caught here and
        // reported, and so that shutdown or a new config can abort it.
        let mut attempt = tokio::spawn(run_once(cfg.clone(), board.clone()));
        let outcome = tokio::select! {
            joined = &mut attempt => match joined {
                Ok(outcome) => outcome,
                Err(e) => Err(OpenError::Failed(Error::Replication(format!("internal error: pipeline task {e}")))),
            },
            _ = config_changed(&mut config) => {
                attempt.abort();
                board.log(LogLevel::Info, "configuration changed; reconnecting".into());
                delay = None;
                continue;
            }
            _ = restart.notified() => {
                attempt.abort();
                board.log(LogLevel::Info, "restart requested; reconnecting".into());
                delay = None;
                continue;
            }
            _ = stop_requested(&mut shutdown) => {
                attempt.abort();
                break;
            }
        };
        let pause = match outcome {
            Ok(()) => continue,
            Err(OpenError::NotReady(reason)) => {
                board.set_state(State::Waiting);
                if waiting_reason.as_ref() != Some(&reason) {
                    board.report_waiting(reason.clone());
                    waiting_reason = Some(reason);
                }
                NOT_READY_RETRY
            }
            Err(OpenError::Failed(error)) => {
                waiting_reason = None;
                // A session that streamed for a while earns a fresh, short delay.
                let next = match delay {
                    Some(d) if started.elapsed() < cfg.max_backoff => (d * 2).min(cfg.max_backoff),
                    _ => cfg.min_backoff,
                };
                delay = Some(next);
                board.set_state(State::Backoff);
                board.report_error(format!("{error}; retrying in {} s", next.as_secs_f64()));
                next
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = config_changed(&mut config) => { delay = None; }
            _ = restart.notified() => { delay = None; }
            _ = stop_requested(&mut shutdown) => {}
        }
    }
    slot_watch.abort();
    board.set_nats_connected(false);
    board.set_state(State::Stopped);
}

/// Resolves when the host asks to stop, or is gone.
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves when the host sends a new config; never once it dropped the sender.
async fn config_changed(config: &mut watch::Receiver<PipelineConfig>) {
    if config.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One session: connect, stream until something fails.
async fn run_once(cfg: PipelineConfig, board: Arc<StatusBoard>) -> Result<(), OpenError> {
    let mut session = replication::open(&cfg.source).await?;
    let publisher = Publisher::connect(&cfg.publish, &board).await?;
    session.start().await?;
    board.set_confirmed_lsn(session.start_lsn);
    board.set_state(State::Streaming);
    board.log(
        LogLevel::Info,
        format!(
            "streaming slot \"{}\" from {} to NATS {}",
            cfg.source.slot, session.start_lsn, cfg.publish.nats_url
        ),
    );
    let mut streamer = Streamer::new(session, publisher, &cfg, board);
    Err(OpenError::Failed(streamer.run().await))
}

/// The transaction being received.
struct Transaction {
    begin: Begin,
    /// Index of the next change, counted before any filtering.
    next_ordinal: u32,
}

struct Streamer {
    client: ReplicationClient,
    publisher: Publisher,
    board: Arc<StatusBoard>,
    source: SourceConfig,
    ids: EventIds,
    topic: String,
    topic_prefix: String,
    max_in_flight: usize,
    oversize_policy: OversizePolicy,
    inject_fault: Option<InjectedFault>,
    relations: RelationCache,
    /// How each relation's columns map to JSON, by relation id.
    kinds: HashMap<u32, Vec<ValueKind>>,
    catalog: TypeCatalog,
    /// Subject per relation id, after filters; cleared when either changes.
    subjects: HashMap<u32, Subject>,
    filters: Filters,
    /// A filter version met in the current transaction, in force from its commit.
    pending_filters: Option<(i64, Filters)>,
    transaction: Option<Transaction>,
    /// Publishes awaiting their PubAck; sequences count every publish of the session.
    in_flight: InFlight,
    /// Received commits not yet confirmable: (sequence of the first publish after it, end LSN).
    commits: VecDeque<(u64, Lsn)>,
    confirmed: Lsn,
    /// Size of the last event, to allocate the next one once.
    last_event_len: usize,
}

impl Streamer {
    fn new(session: Session, publisher: Publisher, cfg: &PipelineConfig, board: Arc<StatusBoard>) -> Self {
        let mut streamer = Streamer {
            ids: EventIds::new(session.system_identifier, &cfg.source.slot),
            client: session.client,
            publisher,
            board,
            source: cfg.source.clone(),
            topic: cfg.publish.topic.clone(),
            topic_prefix: cfg.publish.topic_prefix.clone(),
            max_in_flight: cfg.publish.max_in_flight.max(1),
            oversize_policy: cfg.publish.oversize_policy,
            inject_fault: cfg.inject_fault,
            relations: RelationCache::default(),
            kinds: HashMap::new(),
            catalog: TypeCatalog::default(),
            subjects: HashMap::new(),
            filters: session.filters,
            pending_filters: None,
            transaction: None,
            in_flight: InFlight::new(0),
            commits: VecDeque::new(),
            confirmed: Lsn(0),
            last_event_len: 256,
        };
        streamer.confirm(session.start_lsn);
        streamer
    }

    /// Streams until an error; it never ends otherwise.
    async fn run(&mut self) -> Error {
        let mut ack_check = tokio::time::interval(ACK_CHECK_INTERVAL);
        loop {
            let step = tokio::select! {
                biased;
                ack = self.publisher.next_ack(), if !self.in_flight.is_empty() => {
                    ack.and_then(|(sequence, stored)| self.on_ack(sequence, stored))
                }
                _ = ack_check.tick() => self.check_acks_in_time(),
                received = self.client.recv(), if self.in_flight.len() < self.max_in_flight => {
                    match received {
                        Ok(Some(event)) => self.on_replication_event(event).await,
                        Ok(None) => Err(Error::Replication("the server ended the replication stream".into())),
                        Err(e) => Err(Error::Replication(format!("replication stream broke: {e}"))),
                    }
                }
            };
            if let Err(e) = step {
                return e;
            }
        }
    }

    fn on_ack(&mut self, sequence: u64, stored: Result<(), String>) -> Result<(), Error> {
        if let Err(why) = stored {
            let subject = self.in_flight.subject(sequence).map_or("?", |s| s.as_str());
            return Err(Error::Nats(format!("publishing to {subject} failed: {why}")));
        }
        let newly_acked = self.in_flight.acked(sequence);
        if newly_acked == 0 {
            return Ok(());
        }
        self.board.add_published(newly_acked);
        let acked_before = self.in_flight.next_unacked();
        let mut newest = None;
        while let Some(&(published_before, end_lsn)) = self.commits.front() {
            if published_before > acked_before {
                break;
            }
            self.commits.pop_front();
            newest = Some(end_lsn);
        }
        if let Some(lsn) = newest {
            self.confirm(lsn);
        }
        Ok(())
    }

    /// A PubAck that takes longer than [`ACK_TIMEOUT`] fails the session:
    /// the publish may be lost, and the replay from the slot resends it.
    fn check_acks_in_time(&self) -> Result<(), Error> {
        match self.in_flight.oldest() {
            Some((sent, subject)) if sent.elapsed() > ACK_TIMEOUT => Err(Error::Nats(format!(
                "publishing to {subject} failed: no PubAck within {} s ({} publishes unacked; \
                 NATS overloaded or JetStream unavailable)",
                ACK_TIMEOUT.as_secs(),
                self.in_flight.len()
            ))),
            _ => Ok(()),
        }
    }

    /// Reports `lsn` as flushed; callers guarantee everything before it is acked.
    fn confirm(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.client.update_applied_lsn(lsn.into());
            self.board.set_confirmed_lsn(lsn);
        }
    }

    async fn on_replication_event(&mut self, event: ReplicationEvent) -> Result<(), Error> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.begin(Begin { final_lsn: final_lsn.into(), commit_time: commit_time_micros, xid });
                Ok(())
            }
            ReplicationEvent::Commit { end_lsn, .. } => self.commit(end_lsn.into()).await,
            ReplicationEvent::XLogData { data, .. } => match self.inject_fault {
                Some(fault) if matches!(data.first(), Some(b'I' | b'U' | b'D')) => {
                    self.on_row_change_with_fault(fault, &data).await
                }
                _ => self.on_pgoutput(&data).await,
            },
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Nothing received is unacked: the server's position is safe to confirm,
                // so an idle or fully filtered database does not pin WAL.
                if self.transaction.is_none() && self.commits.is_empty() && self.in_flight.is_empty() {
                    self.confirm(wal_end.into());
                }
                Ok(())
            }
            ReplicationEvent::Message { .. } => Ok(()),
            ReplicationEvent::StoppedAt { reached } => {
                Err(Error::Replication(format!("replication stopped at {reached} unexpectedly")))
            }
        }
    }

    fn begin(&mut self, begin: Begin) {
        self.transaction = Some(Transaction { begin, next_ordinal: 0 });
    }

    async fn commit(&mut self, end_lsn: Lsn) -> Result<(), Error> {
        let transaction = self.transaction.take();
        if let (Some((version, filters)), Some(transaction)) = (self.pending_filters.take(), transaction) {
            // Persist where this version took effect before any LSN past it
            // can be confirmed: a restart then starts with the right filters.
            let commit_lsn = transaction.begin.final_lsn;
            replication::record_config_commit(&self.source, version, commit_lsn).await?;
            self.board.log(
                LogLevel::Info,
                format!(
                    "filters version {version} in force from {commit_lsn} ({} tables listed)",
                    filters.len()
                ),
            );
            self.filters = filters;
            self.subjects.clear();
        }
        if self.in_flight.is_empty() && self.commits.is_empty() {
            self.confirm(end_lsn);
        } else {
            self.commits.push_back((self.in_flight.next_sequence(), end_lsn));
        }
        Ok(())
    }

    /// Handles a row change the way `fault` says (tests only, see [`InjectedFault`]).
    async fn on_row_change_with_fault(&mut self, fault: InjectedFault, data: &[u8]) -> Result<(), Error> {
        match fault {
            InjectedFault::Panic => panic!("injected by wal_listener.inject_fault = panic"),
            InjectedFault::UnknownMessage => {
                let mut unknown = data.to_vec();
                unknown[0] = b'?';
                self.on_pgoutput(&unknown).await
            }
            InjectedFault::UndescribedRelation => {
                self.relations = RelationCache::default();
                self.on_pgoutput(data).await
            }
        }
    }

    async fn on_pgoutput(&mut self, data: &[u8]) -> Result<(), Error> {
        match pgoutput::decode(data)? {
            Message::Begin(begin) => self.begin(begin),
            Message::Commit(commit) => self.commit(commit.end_lsn).await?,
            Message::Relation(relation) => {
                let unknown = self.catalog.unknown(relation.columns.iter().map(|c| c.type_oid));
                if !unknown.is_empty() {
                    let rows = replication::lookup_types(&self.source, &unknown).await?;
                    self.catalog.learn(&rows);
                }
                let kinds = relation.columns.iter().map(|c| self.catalog.kind(c.type_oid)).collect();
                self.kinds.insert(relation.id, kinds);
                self.subjects.remove(&relation.id);
                self.relations.insert(relation);
            }
            Message::Insert { relation_id, new } => {
                self.on_change(relation_id, Action::Insert, Some(&new), None).await?;
            }
            Message::Update { relation_id, old, new } => {
                self.on_change(relation_id, Action::Update, Some(&new), old.as_ref()).await?;
            }
            Message::Delete { relation_id, old } => {
                self.on_change(relation_id, Action::Delete, None, Some(&old)).await?;
            }
            Message::Truncate { relation_ids, .. } => {
                for relation_id in relation_ids {
                    self.on_change(relation_id, Action::Truncate, None, None).await?;
                }
            }
            Message::Origin { .. } | Message::Type { .. } | Message::Message { .. } => {}
        }
        Ok(())
    }

    /// Filters, encodes and publishes one change (one truncated table).
    async fn on_change(
        &mut self,
        relation_id: u32,
        action: Action,
        new: Option<&TupleData<'_>>,
        old: Option<&OldTuple<'_>>,
    ) -> Result<(), Error> {
        let transaction = self.transaction.as_mut().ok_or_else(|| {
            Error::Replication(format!("protocol: {} outside a transaction", action.as_str()))
        })?;
        let ordinal = transaction.next_ordinal;
        transaction.next_ordinal += 1;
        let begin = &transaction.begin;
        let position =
            Position { commit_lsn: begin.final_lsn, commit_time: begin.commit_time, xid: begin.xid, ordinal };

        let relation = self.relations.get(relation_id).ok_or_else(|| {
            Error::Replication(format!(
                "protocol: change for relation id {relation_id}, which was never described"
            ))
        })?;
        // The extension's own tables are configuration, never events.
        if relation.namespace == replication::EXTENSION_SCHEMA {
            if relation.name == replication::CONFIG_TABLE_NAME && action == Action::Insert {
                self.pending_filters = Some(parse_config_row(relation, new)?);
            }
            return Ok(());
        }
        let subject_override = match self.filters.decide(relation_id, action) {
            Decision::Skip => {
                self.board.add_filtered(1);
                return Ok(());
            }
            Decision::Publish(subject) => subject,
        };

        let mut id_buf = [0u8; 36];
        let id = self.ids.id_text(position.commit_lsn, ordinal, &mut id_buf);
        let mut body = Vec::with_capacity(self.last_event_len + 64);
        let kinds = self.kinds.get(&relation_id).map(Vec::as_slice).unwrap_or_default();
        let change = RowChange { relation, kinds, action, new, old };
        encode_event(&mut body, id, &change, &position)?;
        self.last_event_len = body.len();
        let subject = self
            .subjects
            .entry(relation_id)
            .or_insert_with(|| {
                Subject::from(match subject_override {
                    Some(subject) => subject.to_owned(),
                    None => {
                        default_subject(&self.topic, &self.topic_prefix, &relation.namespace, &relation.name)
                    }
                })
            })
            .clone();

        let sequence = self.in_flight.next_sequence();
        match self.publisher.publish(&subject, id, Bytes::from(body), sequence).await? {
            Sent::Published => self.in_flight.sent(subject, Instant::now()),
            Sent::TooLarge(why) => {
                let what = format!(
                    "event {id} for {} in the transaction committed at {}",
                    describe_row(&change),
                    position.commit_lsn
                );
                match self.oversize_policy {
                    OversizePolicy::Error => {
                        return Err(Error::Nats(format!(
                            "{what} is larger than the NATS server's max_payload ({why}); nothing after it \
                             is published until max_payload is raised or wal_listener.oversize_policy = skip"
                        )))
                    }
                    OversizePolicy::Skip => {
                        self.board.add_skipped(1);
                        self.board.log(
                            LogLevel::Warning,
                            format!("skipped {what}: larger than the NATS server's max_payload ({why})"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads (version, filters) from a new row of `wal_listener.config_changes`.
fn parse_config_row(relation: &Relation, row: Option<&TupleData<'_>>) -> Result<(i64, Filters), Error> {
    let text_of = |column: &str| -> Option<&str> {
        let index = relation.columns.iter().position(|c| c.name == column)?;
        match row?.values.get(index)? {
            Value::Text(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    };
    let bad = |what: String| Error::Setup(format!("invalid row in {}: {what}", replication::CONFIG_TABLE));
    let version = text_of("version").and_then(|v| v.parse().ok()).ok_or_else(|| bad("no version".into()))?;
    let filters =
        Filters::from_json(text_of("filters").ok_or_else(|| bad("no filters".into()))?).map_err(bad)?;
    Ok((version, filters))
}
