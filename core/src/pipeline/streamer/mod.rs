//! One publishing session: receive pgoutput, decode, filter, encode,
//! publish, collect PubAcks, and confirm what [`AckTracker`] allows.
//! Atomic batches are in `batching`, PubAck handling in `pub_acks`, the
//! backfill windows in `backfill`.

mod backfill;
mod batching;
mod confirm_hold;
mod pub_acks;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use pgwire_replication::{ReplicationClient, ReplicationEvent};

use super::read_ahead::ReadAhead;
use crate::ack_tracker::AckTracker;
use crate::config::PublishMode;
use crate::config::{OversizePolicy, PipelineConfig, SourceConfig};
use crate::event::{
    default_subject, describe_row, encode_end, encode_event, end_subject, Action, EventIds, Position,
    RowChange, TypeCatalog, ValueKind, END_ORDINAL,
};
use crate::filters::{Decision, FilterChange, Filters};
use crate::park_linger::{LingerHold, PARK_LINGER};
use crate::pgoutput::{self, Begin, Message, OldTuple, Relation, RelationCache, TupleData};
use crate::publish::batch::{Held, Limits, TransactionBatch};
use crate::publish::headers;
use crate::publish::streams::default_subject_probe;
use crate::publish::{Publisher, Sent};
use crate::replication::config_store::{self, FilterVersion};
use crate::replication::{self, catalog};
use crate::sql_message;
use crate::status::{LogLevel, StatusBoard, WarningSource};
use crate::{Error, Lsn};
pub use backfill::BackfillLink;
use backfill::BackfillState;
use confirm_hold::ConfirmHold;

/// How often the oldest unacked publish is checked against ACK_TIMEOUT.
const ACK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The ordinal in a `publish()` message's id, which is derived from the
/// message's own LSN: no row change has it (END has `u32::MAX`).
const MESSAGE_ORDINAL: u32 = u32::MAX - 1;
/// Routes of `publish()` subjects kept at most; then they are read anew.
const MAX_MESSAGE_ROUTES: usize = 1024;

/// Where the events of one table go: the subject, and the stream that
/// stores it as read at connect (its PubAcks must name that stream).
#[derive(Debug)]
pub struct Route {
    pub subject: Subject,
    pub stream: Option<Arc<str>>,
}

/// Where a publishing session starts.
pub struct Start {
    pub client: ReplicationClient,
    pub system_identifier: u64,
    /// The slot's confirmed position.
    pub confirmed: Lsn,
    /// Transactions committed before this position are never published.
    pub capture_from: Lsn,
    /// The filters in force at `confirmed`.
    pub filters: FilterVersion,
    /// The channels to this session's backfill task, if one runs.
    pub backfill: Option<BackfillLink>,
    /// Differs between sessions: part of atomic batch ids.
    pub token: u64,
}

/// The transaction being received.
struct Transaction {
    begin: Begin,
    /// Index of the next change, counted before any filtering.
    next_ordinal: u32,
    /// Committed before CREATE EXTENSION: not published.
    before_capture: bool,
    /// Its config messages as decoded, checked at the commit: filter
    /// versions it wrote, the newest in force from the commit on.
    config_messages: Vec<Vec<u8>>,
    /// `publish_mode = transaction`, and this transaction goes one event at a
    /// time: why (logged once), or a replay after a refused batch (`None`).
    unbatched: Option<Option<crate::publish::batch::Fallback>>,
    /// Events published (or held for a batch) per route, for its END event.
    published: Vec<(Arc<Route>, u32)>,
}

pub struct Streamer {
    client: ReplicationClient,
    publisher: Publisher,
    board: Arc<StatusBoard>,
    source: SourceConfig,
    ids: EventIds,
    /// `<topic>` or `<topic>.<database>`: see [`PublishConfig::subject_root`].
    subject_root: String,
    topic_prefix: String,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    stream_replicas: usize,
    oversize_policy: OversizePolicy,
    #[cfg(feature = "fault-injection")]
    inject_fault: Option<crate::failpoints::InjectedFault>,
    capture_from: Lsn,
    relations: RelationCache,
    /// How each relation's columns map to JSON, by relation id.
    kinds: HashMap<u32, Vec<ValueKind>>,
    catalog: TypeCatalog,
    /// Route per relation id, after filters; cleared when either changes.
    routes: HashMap<u32, Arc<Route>>,
    filters: Filters,
    /// Number of the filter version in force (0: none yet).
    filter_version: i64,
    transaction: Option<Transaction>,
    tracker: AckTracker<Arc<Route>>,
    read_ahead: ReadAhead,
    backfill: Option<BackfillState>,
    publish_mode: PublishMode,
    transaction_end_events: bool,
    /// Where END events go, as read at connect (cleared with `routes`).
    end_route: Option<Arc<Route>>,
    /// Route per `publish()` subject (cleared with `routes`).
    message_routes: HashMap<String, Arc<Route>>,
    /// Events held for the next atomic batch.
    batch: TransactionBatch<Arc<Route>>,
    batch_limits: Limits,
    /// The first and last sequence of each atomic batch sent and not yet acked.
    batches_in_flight: VecDeque<(u64, u64)>,
    /// Held while only PubAcks can move the stream on (see park_linger).
    pub_ack_hold: Option<LingerHold>,
    /// A batch of this session was stored: what follows was never sent before.
    batch_stored: bool,
    token: u64,
    /// The newest commit sent in this session.
    published_through: Lsn,
    /// Replies on the PubAck inbox that were not PubAcks (a core subscriber answered).
    foreign_replies: u64,
    /// Size of the last event, to allocate the next one once.
    last_event_len: usize,
    /// Confirms held below a filter change until its record is on the standbys.
    confirm_hold: ConfirmHold,
    /// The key config messages are signed with, read at the first one.
    message_key: Option<Vec<u8>>,
}

impl Streamer {
    pub fn new(start: Start, publisher: Publisher, cfg: &PipelineConfig, board: Arc<StatusBoard>) -> Self {
        let max_in_flight_bytes = cfg.publish.max_in_flight_bytes.max(1);
        let batch_limits_payload = publisher.server().1;
        start.client.update_applied_lsn(start.confirmed.into());
        board.set_confirmed_lsn(start.confirmed);
        Streamer {
            ids: EventIds::new(start.system_identifier, &cfg.source.slot),
            client: start.client,
            publisher,
            board,
            source: cfg.source.clone(),
            subject_root: cfg.publish.subject_root(),
            topic_prefix: cfg.publish.topic_prefix.clone(),
            max_in_flight: cfg.publish.max_in_flight.max(1),
            max_in_flight_bytes,
            stream_replicas: cfg.publish.stream_replicas.max(1),
            oversize_policy: cfg.publish.oversize_policy,
            #[cfg(feature = "fault-injection")]
            inject_fault: cfg.inject_fault,
            capture_from: start.capture_from,
            relations: RelationCache::default(),
            kinds: HashMap::new(),
            catalog: TypeCatalog::default(),
            routes: HashMap::new(),
            filters: start.filters.filters,
            filter_version: start.filters.version,
            transaction: None,
            tracker: AckTracker::new(start.confirmed),
            read_ahead: ReadAhead::new(max_in_flight_bytes / 4),
            backfill: start.backfill.map(BackfillState::new),
            publish_mode: cfg.publish.publish_mode,
            transaction_end_events: cfg.publish.transaction_end_events,
            end_route: None,
            message_routes: HashMap::new(),
            batch: TransactionBatch::default(),
            batch_limits: Limits::new(
                cfg.publish.max_in_flight.max(1),
                max_in_flight_bytes,
                batch_limits_payload,
            ),
            batches_in_flight: VecDeque::new(),
            pub_ack_hold: None,
            batch_stored: false,
            token: start.token,
            published_through: Lsn(0),
            foreign_replies: 0,
            last_event_len: 256,
            message_key: None,
            confirm_hold: ConfirmHold::default(),
        }
    }

    /// Streams until an error; it never ends otherwise.
    pub async fn run(&mut self) -> Error {
        if let Err(e) = self.audit_streams(false).await {
            return e;
        }
        let mut ack_check = tokio::time::interval(ACK_CHECK_INTERVAL);
        loop {
            if let Err(e) = self.send_batch_when_due().await {
                return e;
            }
            // What was read ahead goes first, as far as the caps allow.
            while self.below_caps() {
                let Some(event) = self.read_ahead.pop() else { break };
                if let Err(e) = self.on_replication_event(event).await {
                    return e;
                }
            }
            // At the in-flight caps only PubAcks can make room, each a round
            // trip a linger would add its sleep to. Committed events waiting
            // for batch room do not count: they join the next batch
            // meanwhile, which is transaction mode's saving (holding off the
            // linger there too cost 22 -> 33 µs per event).
            let waits = !self.below_caps();
            if waits != self.pub_ack_hold.is_some() {
                self.pub_ack_hold = waits.then(|| PARK_LINGER.hold());
            }
            let step = tokio::select! {
                biased;
                // Read also when nothing is unacked: a reply that trails its PubAck is noticed.
                reply = self.publisher.next_ack() => {
                    reply.and_then(|(sequence, reply)| self.on_reply(sequence, reply))
                }
                _ = ack_check.tick() => self.check_acks_in_time(),
                received = self.client.recv(), if self.read_ahead.has_room() => match received {
                    Ok(Some(event)) => {
                        PARK_LINGER.took_event(&event);
                        if self.below_caps() && self.read_ahead.is_empty() {
                            self.on_replication_event(event).await
                        } else {
                            self.read_ahead.push(event);
                            Ok(())
                        }
                    }
                    Ok(None) => Err(Error::Replication("the server ended the replication stream".into())),
                    Err(e) => Err(Error::Replication(format!("replication stream broke: {e}"))),
                },
            };
            if let Err(e) = step {
                return e;
            }
        }
    }

    /// A committed DROP EXTENSION marker counts only while the extension is
    /// absent: anyone may write such a message (pg_logical_emit_message is
    /// public), and a DROP followed by CREATE EXTENSION (in one transaction
    /// or before the worker got here) leaves one behind.
    async fn on_drop_marker(&mut self, lsn: Lsn) -> Result<(), Error> {
        if super::before_extension::extension_exists(&self.source).await {
            self.board.log(
                LogLevel::Warning,
                format!(
                    "ignored a \"{}\" message at {lsn}: the extension exists (created again since, or the \
                     message was not written by DROP EXTENSION)",
                    replication::DROPPED_MARKER_PREFIX
                ),
            );
            return Ok(());
        }
        self.stop_at_drop(lsn).await
    }

    /// The DROP EXTENSION of this database: waits for the PubAcks of what
    /// came before (which confirms it), reads nothing further, and ends the
    /// session. A new session stops here again, as its transaction is never
    /// confirmed; the host stops the worker for good meanwhile.
    async fn stop_at_drop(&mut self, lsn: Lsn) -> Result<(), Error> {
        let mut ack_check = tokio::time::interval(ACK_CHECK_INTERVAL);
        loop {
            // Atomic batches of committed transactions still waiting go out first.
            self.send_batch_when_due().await?;
            if self.tracker.unacked() == 0 && !self.batch.has_committed() {
                break;
            }
            tokio::select! {
                reply = self.publisher.next_ack() => {
                    reply.and_then(|(sequence, reply)| self.on_reply(sequence, reply))?
                }
                _ = ack_check.tick() => self.check_acks_in_time()?,
            }
        }
        self.board.set_extension_dropped();
        Err(Error::Setup(format!(
            "DROP EXTENSION wal_listener at {lsn}: everything before it is published, nothing after it will be"
        )))
    }

    /// Whether another change may be processed: unacked publishes are
    /// capped in count and in payload bytes (DESIGN.md rule 5).
    fn below_caps(&self) -> bool {
        self.tracker.unacked() < self.max_in_flight && self.tracker.unacked_bytes() < self.max_in_flight_bytes
    }

    async fn on_replication_event(&mut self, event: ReplicationEvent) -> Result<(), Error> {
        if self.confirm_hold.is_holding() {
            let reached = match &event {
                ReplicationEvent::Begin { final_lsn, .. } => Some(*final_lsn),
                ReplicationEvent::Commit { end_lsn, .. } => Some(*end_lsn),
                ReplicationEvent::Message { lsn, .. } => Some(*lsn),
                _ => None,
            };
            if let Some(lsn) = reached.and_then(|lsn| self.confirm_hold.reached(lsn.into())) {
                self.confirm(lsn);
            }
        }
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.begin(Begin { final_lsn: final_lsn.into(), commit_time: commit_time_micros, xid });
                Ok(())
            }
            ReplicationEvent::Commit { end_lsn, .. } => self.commit(end_lsn.into()).await,
            ReplicationEvent::XLogData { data, .. } => self.on_xlog_data(&data).await,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if let Some(lsn) = self.tracker.keepalive(wal_end.into()) {
                    self.confirm(lsn);
                }
                // A quiet database still takes the backfill task's messages.
                if let Some(backfill) = self.backfill.as_mut() {
                    backfill.drain();
                }
                Ok(())
            }
            ReplicationEvent::Message { transactional: true, prefix, content, .. }
                if prefix == replication::CONFIG_MESSAGE_PREFIX =>
            {
                self.on_config_message(&content)
            }
            ReplicationEvent::Message { transactional: true, prefix, content, lsn }
                if prefix == sql_message::PREFIX =>
            {
                self.on_published_message(&content, lsn.into()).await
            }
            ReplicationEvent::Message { transactional: false, prefix, lsn, .. }
                if prefix == sql_message::PREFIX =>
            {
                // publish() writes transactional messages only.
                self.board.log(
                    LogLevel::Warning,
                    format!(
                        "ignored a non-transactional \"{}\" message at {}: not written by wal_listener.publish()",
                        sql_message::PREFIX,
                        Lsn::from(lsn)
                    ),
                );
                Ok(())
            }
            ReplicationEvent::Message { transactional: true, prefix, lsn, .. }
                if prefix == replication::DROPPED_MARKER_PREFIX && self.source.stop_at_drop =>
            {
                self.on_drop_marker(lsn.into()).await
            }
            ReplicationEvent::Message { transactional: false, prefix, content, lsn }
                if prefix == crate::backfill::store::WATERMARK_PREFIX =>
            {
                self.on_watermark(&content, lsn.into()).await
            }
            ReplicationEvent::Message { .. } => Ok(()),
            ReplicationEvent::StoppedAt { reached } => {
                Err(Error::Replication(format!("replication stopped at {reached} unexpectedly")))
            }
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    async fn on_xlog_data(&mut self, data: &[u8]) -> Result<(), Error> {
        self.on_pgoutput(data).await
    }

    #[cfg(feature = "fault-injection")]
    async fn on_xlog_data(&mut self, data: &[u8]) -> Result<(), Error> {
        use crate::failpoints::{inject, Injected};
        match self.inject_fault.map(|fault| inject(fault, data)) {
            Some(Injected::Replace(bytes)) => self.on_pgoutput(&bytes).await,
            Some(Injected::ForgetRelations) => {
                self.relations = RelationCache::default();
                self.on_pgoutput(data).await
            }
            Some(Injected::Nothing) | None => self.on_pgoutput(data).await,
        }
    }

    fn begin(&mut self, begin: Begin) {
        self.tracker.begin();
        let before_capture = begin.final_lsn < self.capture_from;
        let unbatched = (self.publish_mode == PublishMode::Transaction
            && begin.final_lsn <= self.board.per_event_until())
        .then_some(None);
        self.transaction = Some(Transaction {
            begin,
            next_ordinal: 0,
            before_capture,
            config_messages: Vec::new(),
            published: Vec::new(),
            unbatched,
        });
    }

    async fn commit(&mut self, end_lsn: Lsn) -> Result<(), Error> {
        if self.transaction_end_events {
            self.publish_end().await?;
        }
        let transaction = self.transaction.take();
        if let Some(transaction) = &transaction {
            self.batch.commit(transaction.begin.final_lsn);
            self.published_through = self.published_through.max(transaction.begin.final_lsn);
        }
        if let Some(Transaction { begin, config_messages, .. }) = transaction {
            if !config_messages.is_empty() {
                if let Some(change) =
                    self.verified_filter_change(&config_messages, begin.xid, begin.final_lsn).await?
                {
                    self.apply_filter_change(&change, begin.final_lsn).await?;
                }
            }
        }
        if let Some(lsn) = self.tracker.commit(end_lsn) {
            self.confirm(lsn);
        }
        self.send_batch_when_due().await
    }

    /// A trigger of the config tables says what this transaction writes: a
    /// filter version or one of its rules. In force from the commit on.
    fn on_config_message(&mut self, content: &[u8]) -> Result<(), Error> {
        let transaction = self.transaction.as_mut().ok_or_else(|| {
            Error::Replication("protocol: a transactional message outside a transaction".into())
        })?;
        transaction.config_messages.push(content.to_vec());
        Ok(())
    }

    /// A `publish()` call of the transaction being received: sent in its
    /// place among the transaction's events (in its atomic batch in
    /// `publish_mode = transaction`), its payload as is, with an id derived
    /// from the message's LSN, so a replay is dropped as a duplicate.
    async fn on_published_message(&mut self, content: &[u8], lsn: Lsn) -> Result<(), Error> {
        let transaction = self.transaction.as_ref().ok_or_else(|| {
            Error::Replication("protocol: a transactional message outside a transaction".into())
        })?;
        if transaction.before_capture {
            return Ok(());
        }
        let begin = transaction.begin;
        let Some(frame) = self.verified(begin.xid, content).await? else {
            // Only publish() signs: anyone may call pg_logical_emit_message.
            self.board.log(
                LogLevel::Warning,
                format!(
                    "ignored a \"{}\" message at {lsn}: not written by wal_listener.publish() in the transaction \
                     committed at {} (a pg_logical_emit_message with that prefix, or a copy of one)",
                    sql_message::PREFIX,
                    begin.final_lsn
                ),
            );
            return Ok(());
        };
        let bad = |e: String| Error::Replication(format!("the publish() message at {lsn}: {e}"));
        let message = sql_message::decode(frame).map_err(bad)?;
        let headers =
            headers::published_message(&message.headers, begin.final_lsn, begin.commit_time).map_err(bad)?;
        let route = self.message_route(message.subject, lsn).await?;
        let body = message.payload.to_vec();
        let mut id_buf = [0u8; 36];
        let id = self.ids.id_text(lsn, MESSAGE_ORDINAL, &mut id_buf).to_owned();
        let what = self
            .may_be_too_large(body.len())
            .then(|| format!("the publish() message at {lsn} to {}", route.subject));
        self.publish_one(route, id, headers, body, what, begin.final_lsn).await
    }

    /// Where a `publish()` message goes. A subject no stream stores holds
    /// the session here (it ends with the error, and the next one tries
    /// again): skipping would lose the message, and sending it would leave
    /// a PubAck that never comes.
    async fn message_route(&mut self, subject: &str, lsn: Lsn) -> Result<Arc<Route>, Error> {
        if let Some(route) = self.message_routes.get(subject) {
            return Ok(route.clone());
        }
        if self.publisher.stream_for(subject).is_none() {
            // Created since the session started?
            self.publisher.refresh_streams().await?;
        }
        let Some(stream) = self.publisher.stream_for(subject) else {
            return Err(Error::Nats(format!(
                "the publish() message at {lsn} goes to {subject}, which no JetStream stream stores: it and \
                 everything after it wait until a stream stores that subject"
            )));
        };
        if let Some(refusal) = self.publisher.streams().refusal([subject]) {
            return Err(Error::Nats(refusal));
        }
        if self.message_routes.len() >= MAX_MESSAGE_ROUTES {
            self.message_routes.clear();
        }
        let route = Arc::new(Route { subject: Subject::from(subject), stream: Some(stream) });
        self.message_routes.insert(subject.to_owned(), route.clone());
        Ok(route)
    }

    /// The payload of a message the extension signed (its config triggers,
    /// publish()) in transaction `xid`; `None` for one anyone else wrote.
    /// The key is read at the first use.
    async fn verified<'c>(&mut self, xid: u32, content: &'c [u8]) -> Result<Option<&'c [u8]>, Error> {
        if self.message_key.is_none() {
            self.message_key = Some(config_store::message_key(&self.source).await?);
        }
        let key = self.message_key.as_deref().unwrap_or_default();
        Ok(crate::filters::verified_payload(key, xid, content))
    }

    /// The filter change a transaction's config messages describe, taking
    /// only those the extension's triggers signed: any role may write a
    /// message with our prefix, and one did replace every filter.
    async fn verified_filter_change(
        &mut self,
        messages: &[Vec<u8>],
        xid: u32,
        commit_lsn: Lsn,
    ) -> Result<Option<FilterChange>, Error> {
        let mut change = FilterChange::default();
        let mut forged = 0;
        for content in messages {
            match self.verified(xid, content).await? {
                Some(payload) => change.add_message(payload).map_err(|e| {
                    Error::Setup(format!(
                        "{e}; the extension's tables or triggers were altered, recreate the extension"
                    ))
                })?,
                None => forged += 1,
            }
        }
        if forged > 0 {
            self.board.log(
                LogLevel::Warning,
                format!(
                    "ignored {forged} config message(s) in the transaction committed at {commit_lsn}: not \
                     written by wal_listener's triggers in that transaction (a pg_logical_emit_message \
                     with prefix {} from another role, or a copy of one)",
                    replication::CONFIG_MESSAGE_PREFIX
                ),
            );
        }
        Ok(change.newest().is_some().then_some(change))
    }

    /// Applies the newest filter version a transaction wrote, after
    /// recording where it took effect: nothing past this commit is
    /// confirmed before, so a restart starts with the right filters.
    async fn apply_filter_change(&mut self, change: &FilterChange, commit_lsn: Lsn) -> Result<(), Error> {
        let Some((version, mut rules)) = change.newest() else { return Ok(()) };
        if version < self.filter_version {
            // Only hand-written rows of an old version; the API never writes those.
            self.board.log(
                LogLevel::Warning,
                format!(
                    "ignored rows of filters version {version} written at {commit_lsn}: version {} is newer",
                    self.filter_version
                ),
            );
            return Ok(());
        }
        let mut filters = Filters::from_json(&rules)
            .map_err(|e| Error::Setup(format!("filters version {version}: {e}")))?;
        if version == self.filter_version {
            // A restore writes one version in several transactions (the
            // header, then its rules: one COPY, or one INSERT each with
            // --inserts, in any order with pg_restore -j): each adds to it.
            if filters.is_empty() {
                return Ok(());
            }
            filters = self.filters.clone().with(filters);
            rules = filters.to_json();
        }
        #[cfg(feature = "fault-injection")]
        if self.inject_fault == Some(crate::failpoints::InjectedFault::SlowFilterRecord) {
            self.board.log(
                LogLevel::Info,
                format!("injected: pausing 5 s before recording filters version {version}"),
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let recorded_until = config_store::record(&self.source, version, commit_lsn, &rules).await?;
        self.confirm_hold.filter_change(commit_lsn, recorded_until);
        self.filters = filters;
        self.filter_version = version;
        self.routes.clear();
        self.end_route = None;
        self.message_routes.clear();
        self.board.log(
            LogLevel::Info,
            format!(
                "filters version {version} in force from {commit_lsn} ({} tables listed)",
                self.filters.len()
            ),
        );
        self.audit_streams(true).await
    }

    /// Puts the streams' audit in `status().warnings`: every subject the
    /// worker publishes to (the default subjects and each filter's) that no
    /// stream stores, and the streams' replicas and duplicate windows.
    async fn audit_streams(&mut self, refresh: bool) -> Result<(), Error> {
        if refresh {
            self.publisher.refresh_streams().await?;
        }
        let probe = default_subject_probe(&self.subject_root, &self.topic_prefix);
        let default =
            format!("the default subjects {}.{}<schema>_<table>", self.subject_root, self.topic_prefix);
        let end = end_subject(&self.subject_root, &self.topic_prefix);
        let end_events = self.transaction_end_events.then_some((end.as_str(), "the END events"));
        let subjects = std::iter::once((probe.as_str(), default.as_str()))
            .chain(end_events)
            .chain(self.filters.subjects());
        let streams = self.publisher.streams();
        let subjects: Vec<(&str, &str)> = subjects.collect();
        if let Some(refusal) = streams.refusal(subjects.iter().map(|(subject, _)| *subject)) {
            return Err(Error::Nats(refusal));
        }
        let findings =
            streams.audit(subjects, self.stream_replicas, self.publish_mode == PublishMode::Transaction);
        self.board.set_warnings(WarningSource::Streams, findings);
        Ok(())
    }

    async fn on_pgoutput(&mut self, data: &[u8]) -> Result<(), Error> {
        match pgoutput::decode(data)? {
            Message::Begin(begin) => self.begin(begin),
            Message::Commit(commit) => self.commit(commit.end_lsn).await?,
            Message::Relation(relation) => {
                let kinds = self.kinds_of(&relation).await?;
                self.kinds.insert(relation.id, kinds);
                self.routes.remove(&relation.id);
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

    /// How each column of `relation` maps to JSON, from the catalog (read
    /// once per session and set of new types): the same for a live row and
    /// a backfilled one.
    async fn kinds_of(&mut self, relation: &Relation) -> Result<Vec<ValueKind>, Error> {
        let unknown = self.catalog.unknown(relation.columns.iter().map(|c| c.type_oid));
        if !unknown.is_empty() {
            let rows = catalog::lookup_types(&self.source, &unknown).await?;
            self.catalog.learn(&rows);
        }
        Ok(relation.columns.iter().map(|c| self.catalog.kind(c.type_oid)).collect())
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
        if transaction.before_capture {
            return Ok(());
        }
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
            return Ok(());
        }
        if let Some(backfill) = self.backfill.as_mut() {
            backfill.note_change(relation, action, new, old);
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
        let headers = headers::row_event(&relation.namespace, &relation.name, action.as_str(), &position);
        self.last_event_len = body.len();
        let route = route(
            &mut self.routes,
            &self.publisher,
            (&self.subject_root, &self.topic_prefix),
            relation,
            subject_override,
        );
        // The row is named now, while it is at hand, in case it is too large.
        let row = self.may_be_too_large(body.len()).then(|| describe_row(&change));
        let id = id.to_owned();
        self.publish_one(route, id, headers, body, row, position.commit_lsn).await
    }

    /// Whether an event body of `len` bytes may, with its headers, exceed the
    /// NATS server's `max_payload`: then it is named for the error now.
    fn may_be_too_large(&self, len: usize) -> bool {
        len + 1024 > self.batch_limits.max_payload
    }

    /// Publishes an event of the current transaction (held for its batch in
    /// `publish_mode = transaction`) and counts it for the END event;
    /// `row` names its row for the error when it is too large.
    async fn publish_one(
        &mut self,
        route: Arc<Route>,
        id: String,
        headers: HeaderMap,
        body: Vec<u8>,
        row: Option<String>,
        commit_lsn: Lsn,
    ) -> Result<(), Error> {
        let counted = route.clone();
        if self.publish_mode == PublishMode::Transaction {
            let held = Held { route, id, headers, body: Bytes::from(body) };
            let Some(held) = self.hold(held).await? else {
                self.count_for_end(counted);
                return Ok(());
            };
            let sent =
                send(&mut self.tracker, &self.publisher, held.route, &held.id, held.headers, held.body)
                    .await?;
            return self.sent_one(sent, counted, &held.id, row, commit_lsn).await;
        }
        let sent = send(&mut self.tracker, &self.publisher, route, &id, headers, Bytes::from(body)).await?;
        self.sent_one(sent, counted, &id, row, commit_lsn).await
    }

    /// Counts a sent event for its transaction's END, or handles one too large.
    async fn sent_one(
        &mut self,
        sent: Sent,
        route: Arc<Route>,
        id: &str,
        row: Option<String>,
        commit_lsn: Lsn,
    ) -> Result<(), Error> {
        if let Sent::Published = sent {
            self.count_for_end(route);
            return Ok(());
        }
        let what = match row {
            Some(row) => format!("event {id} for {row} in the transaction committed at {commit_lsn}"),
            None => format!("event {id} in the transaction committed at {commit_lsn}"),
        };
        self.after_send(sent, what).await
    }

    fn count_for_end(&mut self, route: Arc<Route>) {
        if !self.transaction_end_events {
            return;
        }
        if let Some(transaction) = self.transaction.as_mut() {
            match transaction.published.iter_mut().find(|(r, _)| r.subject == route.subject) {
                Some((_, n)) => *n += 1,
                None => transaction.published.push((route, 1)),
            }
        }
    }

    /// The END event of the transaction being committed: after its last
    /// event, in the same batch in `publish_mode = transaction`.
    async fn publish_end(&mut self) -> Result<(), Error> {
        let Some(transaction) = self.transaction.as_mut() else { return Ok(()) };
        if transaction.published.is_empty() {
            return Ok(());
        }
        let mut published = std::mem::take(&mut transaction.published);
        published.sort_by(|(a, _), (b, _)| a.subject.as_str().cmp(b.subject.as_str()));
        let begin = &transaction.begin;
        let position = Position {
            commit_lsn: begin.final_lsn,
            commit_time: begin.commit_time,
            xid: begin.xid,
            ordinal: END_ORDINAL,
        };
        let mut id_buf = [0u8; 36];
        let id = self.ids.id_text(position.commit_lsn, END_ORDINAL, &mut id_buf).to_owned();
        let counts: Vec<(&str, u32)> = published.iter().map(|(r, n)| (r.subject.as_str(), *n)).collect();
        let mut body = Vec::with_capacity(160 + 48 * counts.len());
        encode_end(&mut body, &id, &position, &counts);
        let route = self.end_route();
        let headers = headers::end_event(&position);
        self.publish_one(route, id, headers, body, Some("the END event".to_owned()), position.commit_lsn)
            .await
    }

    fn end_route(&mut self) -> Arc<Route> {
        if let Some(route) = &self.end_route {
            return route.clone();
        }
        let subject = end_subject(&self.subject_root, &self.topic_prefix);
        let stream = self.publisher.stream_for(&subject);
        let route = Arc::new(Route { subject: Subject::from(subject), stream });
        self.end_route = Some(route.clone());
        route
    }

    /// Counts an event too large for NATS, as `oversize_policy` says:
    /// `what` names it.
    async fn after_send(&mut self, sent: Sent, what: String) -> Result<(), Error> {
        let Sent::TooLarge(why) = sent else { return Ok(()) };
        match self.oversize_policy {
            OversizePolicy::Error => {
                // The events before it are sent: let them be stored and confirmed.
                self.settle().await?;
                Err(Error::Nats(format!(
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
                Ok(())
            }
        }
    }
}

/// The route of a table's events, cached per relation id.
fn route(
    routes: &mut HashMap<u32, Arc<Route>>,
    publisher: &Publisher,
    (subject_root, topic_prefix): (&str, &str),
    relation: &Relation,
    subject_override: Option<&str>,
) -> Arc<Route> {
    routes
        .entry(relation.id)
        .or_insert_with(|| {
            let subject = match subject_override {
                Some(subject) => subject.to_owned(),
                None => default_subject(subject_root, topic_prefix, &relation.namespace, &relation.name),
            };
            let stream = publisher.stream_for(&subject);
            Arc::new(Route { subject: Subject::from(subject), stream })
        })
        .clone()
}

/// Publishes one event and tracks it for its PubAck.
async fn send(
    tracker: &mut AckTracker<Arc<Route>>,
    publisher: &Publisher,
    route: Arc<Route>,
    id: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Sent, Error> {
    let bytes = body.len();
    let sequence = tracker.next_sequence();
    let sent = publisher.publish(&route.subject, id, headers, body, sequence).await?;
    if let Sent::Published = sent {
        tracker.published(route, bytes, Instant::now());
    }
    Ok(sent)
}
