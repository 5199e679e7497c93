//! The owner task of a queue: carries out what the delivery state machine decides.
//!
//! It appends published messages to the queue's log (a batch per request), keeps a bounded
//! cache of message bodies read ahead from the log, sends deliveries to consumers' connections,
//! writes settled offsets to the acknowledgement journal, hands dead letters to the forwarder,
//! and advances the log start past settled prefixes so segments are deleted.
//!
//! A failed write stops the queue: every later request gets an error naming the cause; the
//! broker does not retry silently. A message that cannot be read is never settled: the queue
//! keeps it, stops delivering where it stands, and reports it (an `error!` line, the queue's
//! [`UnreadableMessage`], which the API, console and metrics show); it tries the read again
//! on each housekeeping tick and goes on once it succeeds or the message is purged.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use foldhash::{HashMap, HashMapExt};
use sluice_storage::batch::BatchHeader;
use sluice_storage::record::BatchBuilder;
use sluice_storage::{
    Clock, Handled, Log, LogConfig, LogHandler, OwnerOptions, OwnerTask, StorageError,
};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::args::QueueArgs;
use super::deadletter::{DeadLetter, record_death};
use super::flow::Flow;
use super::journal::{AckJournal, COMPACT_AFTER_ENTRIES};
use super::ranges::RangeSet;
use super::state::{
    Admission, ConsumerId, DeathReason, Effect, Meta, QueueCore, QueueEnv, Unreadable,
};
use super::{
    Credit, Delivery, DeliverySink, Got, PublishOutcome, Queue, QueueCounters, QueueEvent,
    QueueRecord, QueueReply, QueueRequest, QueueStat, Reply, SettleOp, UnreadableMessage,
    message_priority,
};
use crate::error::{BrokerError, MessagingError, ResourceKind};
use crate::message::codec::{RecordEncoder, StoredMessage, decode_batch};
use crate::message::value::{self, FieldValue};
use crate::message::{Message, Properties};

/// Bytes read from the log at a time when the cache misses.
const READ_AHEAD_BYTES: usize = 256 * 1024;
/// Bound of the body cache of one queue.
const CACHE_MAX_BYTES: usize = 4 * 1024 * 1024;
const CACHE_MAX_ENTRIES: usize = 4096;
/// Messages appended per batch are cut at about this many bytes.
const BATCH_TARGET_BYTES: usize = 1024 * 1024;

/// Everything needed to open a queue.
#[derive(Debug, Clone)]
pub(crate) struct QueueSpec {
    pub record: QueueRecord,
    pub args: QueueArgs,
    pub dir: PathBuf,
    pub log_config: LogConfig,
    /// Ready messages above which publishers wait while consumers stream (see [`Flow`]).
    pub flow_ready_high: u64,
}

/// What a queue asks of the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QueueNotice {
    /// Delete this auto-delete queue if it still has no consumer.
    AutoDelete {
        vhost: String,
        name: String,
        id: Uuid,
    },
    /// Delete this queue: unused for longer than `x-expires`.
    Expired {
        vhost: String,
        name: String,
        id: Uuid,
    },
}

/// Channels to the rest of the broker.
#[derive(Debug, Clone)]
pub(crate) struct QueueServices {
    pub dead_letters: mpsc::Sender<DeadLetter>,
    pub notices: mpsc::UnboundedSender<QueueNotice>,
}

/// A queue's log and state after recovery, ready for its owner task.
#[derive(Debug)]
pub(crate) struct Opened {
    log: Log,
    core: QueueCore,
    journal: AckJournal,
}

fn storage(error: StorageError) -> BrokerError {
    BrokerError::Storage(error)
}

/// Opens (recovering) or creates a queue's log and journal. Blocking.
pub(crate) fn open(spec: &QueueSpec, clock: &dyn Clock) -> Result<Opened, BrokerError> {
    std::fs::create_dir_all(&spec.dir).map_err(|source| {
        storage(StorageError::Io {
            op: "create",
            path: spec.dir.clone(),
            source,
        })
    })?;
    let now_ms = clock.now_ms();
    let (log, report) = Log::open_with_report(&spec.dir, spec.log_config.clone(), now_ms)?;
    if report.truncated_bytes > 0 {
        tracing::warn!(queue = %spec.record.name, vhost = %spec.record.vhost, truncated_bytes = report.truncated_bytes, "recovered queue log");
    }
    let (mut journal, settled) = AckJournal::open(&spec.dir)?;
    let start = log.log_start_offset();
    let end = log.log_end_offset();
    // A transient queue starts empty every time; its settlements need no journal.
    let settled = if spec.record.is_persistent() {
        settled
    } else {
        RangeSet::new()
    };
    let ready = settled.complement(start..end);
    let mut core = QueueCore::new(spec.args.clone(), spec.record.auto_delete, now_ms);
    if !ready.is_empty() {
        // Recovered messages may carry per-message expiries; check deadlines from now on.
        core.note_expiry();
    }
    if core.needs_message_scan() {
        scan_ready(&log, &ready, &mut core)?;
    } else {
        for range in ready.ranges() {
            core.restore_ready(0, range, 0);
        }
    }
    // Start the journal afresh with exactly what is settled inside the log.
    journal.rewrite(&ready.complement(start..end))?;
    Ok(Opened { log, core, journal })
}

/// Reads every ready message's priority and size (priority queues and byte limits need them).
fn scan_ready(log: &Log, ready: &RangeSet, core: &mut QueueCore) -> Result<(), BrokerError> {
    for range in ready.ranges() {
        let mut offset = range.start;
        while offset < range.end {
            let read = log.read(offset, READ_AHEAD_BYTES, true)?;
            if read.bytes.is_empty() {
                break;
            }
            let mut next = offset;
            for_each_batch(&read.bytes, |stored| {
                next = next.max(stored.offset + 1);
                if stored.offset >= offset && stored.offset < range.end {
                    let priority = message_priority(&stored.message.properties);
                    core.restore_ready(
                        priority,
                        stored.offset..stored.offset + 1,
                        stored.message.body.len() as u64,
                    );
                }
                ControlFlow::Continue(())
            })?;
            if next <= offset {
                break;
            }
            offset = next;
        }
    }
    Ok(())
}

/// Decodes each batch of `bytes` (whole batches, back to back), handing each message to `f`
/// until it returns [`ControlFlow::Break`]; the batches after that one are not decoded.
fn for_each_batch(
    bytes: &bytes::Bytes,
    mut f: impl FnMut(StoredMessage) -> ControlFlow<()>,
) -> Result<(), BrokerError> {
    let mut position = 0;
    while position < bytes.len() {
        let header = BatchHeader::parse(&bytes[position..])
            .map_err(|source| storage(StorageError::InvalidBatch { position, source }))?;
        let end = position + header.total_bytes();
        if end > bytes.len() {
            break;
        }
        let batch = bytes.slice(position..end);
        let messages = decode_batch(&batch).map_err(|error| BrokerError::Metadata {
            op: "decode a stored message",
            reason: error.to_string(),
        })?;
        for message in messages {
            if f(message).is_break() {
                return Ok(());
            }
        }
        position = end;
    }
    Ok(())
}

/// Starts the owner task of an opened queue and the timer that wakes it for expiries.
pub(crate) fn start(
    spec: &QueueSpec,
    opened: Opened,
    options: OwnerOptions,
    services: QueueServices,
) -> (Arc<Queue>, OwnerTask) {
    let counters = Arc::new(QueueCounters::default());
    let (timer, deadlines) = watch::channel(None);
    let clock = Arc::clone(&options.clock);
    let segment_hint = first_segment_end(&opened.log);
    let flow = Flow::new(spec.flow_ready_high);
    let flow_state = flow.subscribe();
    let unreadable = Arc::default();
    let handler = QueueHandler {
        vhost: Arc::from(spec.record.vhost.as_str()),
        name: Arc::from(spec.record.name.as_str()),
        id: spec.record.id,
        core: opened.core,
        cache: Cache::default(),
        journal: opened.journal,
        journaling: spec.record.is_persistent(),
        consumers: HashMap::new(),
        encoder: RecordEncoder::default(),
        services,
        timer,
        counters: Arc::clone(&counters),
        failed: None,
        fx: Vec::new(),
        segment_hint,
        handled_since_hint: 0,
        notified: false,
        deleting: false,
        flow,
        stuck_at: None,
        read_failure: None,
        unreadable: Arc::clone(&unreadable),
    };
    let (owner, task) = sluice_storage::owner::spawn(opened.log, handler, options);
    let queue = Arc::new(Queue {
        record: spec.record.clone(),
        args: spec.args.clone(),
        backend: super::Backend::Local(owner.clone()),
        counters,
        flow: flow_state,
        unreadable,
    });
    tokio::spawn(run_timer(owner, deadlines, clock));
    (queue, task)
}

/// Sleeps until the queue's next deadline (a message or the queue itself expiring) and wakes
/// the owner. Ends when the owner task ends.
async fn run_timer(
    owner: sluice_storage::OwnerHandle<QueueRequest, Reply>,
    mut deadlines: watch::Receiver<Option<i64>>,
    clock: Arc<dyn Clock>,
) {
    loop {
        let deadline = *deadlines.borrow_and_update();
        match deadline {
            None => {
                if deadlines.changed().await.is_err() {
                    return;
                }
            }
            Some(at) => {
                let wait = (at - clock.now_ms()).max(0) as u64;
                tokio::select! {
                    changed = deadlines.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {
                        if owner.call(QueueRequest::Timer).await.is_err() {
                            return;
                        }
                        // The owner publishes the next deadline; avoid spinning on a stale one.
                        if *deadlines.borrow() == Some(at) && deadlines.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn first_segment_end(log: &Log) -> u64 {
    let segments = log.reader().segments();
    if segments.len() >= 2 {
        segments[0].next_offset
    } else {
        u64::MAX
    }
}

#[derive(Debug)]
struct Cached {
    message: Arc<Message>,
    meta: Meta,
}

/// Message bodies read ahead of delivery, and recent publishes waiting for a consumer.
#[derive(Debug, Default)]
struct Cache {
    entries: BTreeMap<u64, Cached>,
    bytes: usize,
}

impl Cache {
    fn has_room(&self) -> bool {
        self.bytes < CACHE_MAX_BYTES && self.entries.len() < CACHE_MAX_ENTRIES
    }

    fn insert(&mut self, offset: u64, message: Arc<Message>, meta: Meta) {
        self.bytes += message.body.len();
        if let Some(old) = self.entries.insert(offset, Cached { message, meta }) {
            self.bytes -= old.message.body.len();
        }
    }

    fn take(&mut self, offset: u64) -> Option<Cached> {
        let cached = self.entries.remove(&offset)?;
        self.bytes -= cached.message.body.len();
        Some(cached)
    }

    fn remove_range(&mut self, range: std::ops::Range<u64>) {
        if range.end - range.start == 1 {
            self.take(range.start);
            return;
        }
        let doomed: Vec<u64> = self.entries.range(range).map(|(o, _)| *o).collect();
        for offset in doomed {
            self.take(offset);
        }
    }

    fn remove_below(&mut self, offset: u64) {
        while let Some((&first, _)) = self.entries.first_key_value() {
            if first >= offset {
                break;
            }
            self.take(first);
        }
    }

    /// Makes room for an entry at `offset` by dropping newer entries that the log already
    /// holds (below `logged_end`). False if the cache stays full.
    fn make_room_below(&mut self, offset: u64, logged_end: u64) -> bool {
        while !self.has_room() {
            match self.entries.last_key_value() {
                Some((&last, _)) if last > offset && last < logged_end => {
                    self.take(last);
                }
                _ => return false,
            }
        }
        true
    }

    /// Drops the newest entries until the cache fits its bounds again.
    fn shrink(&mut self) {
        while !self.entries.is_empty()
            && (self.bytes > CACHE_MAX_BYTES || self.entries.len() > CACHE_MAX_ENTRIES)
        {
            if let Some((&last, _)) = self.entries.last_key_value() {
                self.take(last);
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

fn meta_of(stored: &StoredMessage) -> Meta {
    Meta {
        bytes: stored.message.body.len() as u32,
        expires_at_ms: stored.expires_at_ms,
        priority: message_priority(&stored.message.properties),
    }
}

/// Why the message at `offset` could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadFailure {
    offset: u64,
    file: String,
    position: Option<u64>,
    reason: String,
}

impl ReadFailure {
    fn new(log: &Log, offset: u64, error: &dyn std::fmt::Display) -> Self {
        Self {
            offset,
            file: log.dir().display().to_string(),
            position: None,
            reason: error.to_string(),
        }
    }

    fn from_storage(log: &Log, offset: u64, error: &StorageError) -> Self {
        let mut failure = Self::new(log, offset, error);
        match error {
            StorageError::Io { path, source, .. } => {
                failure.file = path.display().to_string();
                failure.reason = source.to_string();
            }
            StorageError::Corrupt {
                path,
                position,
                reason,
            } => {
                failure.file = path.display().to_string();
                failure.position = Some(*position);
                failure.reason.clone_from(reason);
            }
            _ => {}
        }
        failure
    }
}

/// Reads the batch holding `offset` and what follows it into the cache. Returns the message
/// at `offset`, or why it could not be read.
///
/// Messages nearer the head are wanted sooner, so when the cache is full, read-ahead pushes
/// out the newest entries that are already in the log (recent publishes cached while the
/// consumers were behind; they are read again when their turn comes). Without that, a cache
/// full of the tail would make every delivery from the head read and decode a whole
/// read-ahead window for one message. Decoding stops once nothing more fits.
fn read_into_cache(
    log: &Log,
    cache: &mut Cache,
    offset: u64,
) -> Result<(Arc<Message>, Meta), ReadFailure> {
    let read = log
        .read(offset, READ_AHEAD_BYTES, true)
        .map_err(|error| ReadFailure::from_storage(log, offset, &error))?;
    let logged_end = log.log_end_offset();
    let mut found = None;
    let result = for_each_batch(&read.bytes, |stored| {
        if stored.offset < offset {
            return ControlFlow::Continue(());
        }
        let meta = meta_of(&stored);
        if stored.offset == offset {
            found = Some((Arc::clone(&stored.message), meta));
            return ControlFlow::Continue(());
        }
        if cache.entries.contains_key(&stored.offset) {
            return ControlFlow::Continue(());
        }
        if !cache.make_room_below(stored.offset, logged_end) {
            return ControlFlow::Break(());
        }
        cache.insert(stored.offset, stored.message, meta);
        ControlFlow::Continue(())
    });
    match (found, result) {
        (Some(found), _) => Ok(found),
        (None, Err(error)) => Err(ReadFailure::new(log, offset, &error)),
        (None, Ok(())) => Err(ReadFailure::new(
            log,
            offset,
            &"no message at this offset in the log",
        )),
    }
}

#[derive(Debug)]
struct ConsumerEntry {
    credit: Arc<Credit>,
    sink: DeliverySink,
}

/// The state machine's environment: message metadata from the cache or the log, credit from
/// the consumers' counters.
struct Env<'a> {
    log: &'a Log,
    cache: &'a mut Cache,
    consumers: &'a HashMap<ConsumerId, ConsumerEntry>,
    /// The message known to be unreadable: not read again until the next housekeeping tick.
    stuck_at: Option<u64>,
    /// Where a failed read is recorded, for the owner to report.
    failure: &'a mut Option<ReadFailure>,
}

impl QueueEnv for Env<'_> {
    fn meta(&mut self, offset: u64) -> Result<Meta, Unreadable> {
        if let Some(cached) = self.cache.entries.get(&offset) {
            return Ok(cached.meta);
        }
        if self.stuck_at == Some(offset) {
            return Err(Unreadable);
        }
        match read_into_cache(self.log, self.cache, offset) {
            Ok((message, meta)) => {
                self.cache.insert(offset, message, meta);
                Ok(meta)
            }
            Err(failure) => {
                *self.failure = Some(failure);
                Err(Unreadable)
            }
        }
    }

    fn take_credit(&mut self, consumer: ConsumerId, bytes: u32) -> bool {
        self.consumers
            .get(&consumer)
            .is_some_and(|entry| entry.credit.take(bytes))
    }
}

struct QueueHandler {
    vhost: Arc<str>,
    name: Arc<str>,
    id: Uuid,
    core: QueueCore,
    cache: Cache,
    journal: AckJournal,
    /// Only durable queues keep their settlements on disk; transient ones start empty.
    journaling: bool,
    consumers: HashMap<ConsumerId, ConsumerEntry>,
    encoder: RecordEncoder,
    services: QueueServices,
    timer: watch::Sender<Option<i64>>,
    counters: Arc<QueueCounters>,
    failed: Option<String>,
    fx: Vec<Effect>,
    /// Offset at which the first segment ends (`u64::MAX` while there is one segment): once
    /// everything below it is settled, the segment can go.
    segment_hint: u64,
    handled_since_hint: u32,
    notified: bool,
    deleting: bool,
    flow: Flow,
    /// The offset of the message found unreadable, while the queue holds it.
    stuck_at: Option<u64>,
    /// A read that failed while handling the current request, not reported yet.
    read_failure: Option<ReadFailure>,
    /// What readers of the queue (the API, metrics) see of an unreadable message.
    unreadable: Arc<parking_lot::Mutex<Option<UnreadableMessage>>>,
}

macro_rules! env {
    ($self:ident, $log:expr) => {
        Env {
            log: $log,
            cache: &mut $self.cache,
            consumers: &$self.consumers,
            stuck_at: $self.stuck_at,
            failure: &mut $self.read_failure,
        }
    };
}

impl QueueHandler {
    fn queue_error(&self, reason: String) -> BrokerError {
        MessagingError::QueueFailed {
            vhost: self.vhost.to_string(),
            name: self.name.to_string(),
            reason,
        }
        .into()
    }

    fn fail(&mut self, error: &dyn std::fmt::Display) {
        if self.failed.is_none() {
            tracing::error!(queue = %self.name, vhost = %self.vhost, %error, "queue stopped accepting work");
            self.failed = Some(error.to_string());
            self.flow.release();
        }
    }

    fn expiry(&self, properties: &Properties, now_ms: i64) -> Option<i64> {
        let queue_ttl = self.core.args().message_ttl_ms;
        let message_ttl = properties.ttl_ms();
        let ttl = match (queue_ttl, message_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(now_ms.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)))
    }

    fn publish(
        &mut self,
        log: &mut Log,
        messages: Vec<Arc<Message>>,
        now_ms: i64,
    ) -> Result<PublishOutcome, BrokerError> {
        let mut outcome = PublishOutcome::default();
        let mut builder = BatchBuilder::new(now_ms);
        let mut next = log.log_end_offset();
        let log_end_before = next;
        for (index, message) in messages.into_iter().enumerate() {
            match self.core.admit() {
                Admission::Accept => {}
                Admission::Reject => {
                    outcome.rejected.push(index);
                    continue;
                }
                Admission::RejectDeadLetter => {
                    outcome.rejected.push(index);
                    self.dead_letter(&message, DeathReason::MaxLen, now_ms);
                    continue;
                }
            }
            let expires_at_ms = self.expiry(&message.properties, now_ms);
            let meta = Meta {
                bytes: message.body.len() as u32,
                expires_at_ms,
                priority: message_priority(&message.properties),
            };
            self.encoder
                .push(&mut builder, now_ms, expires_at_ms, &message);
            let offset = next;
            next += 1;
            // The state machine may look at this message before it is in the log.
            self.cache.insert(offset, message, meta);
            let mut env = env!(self, log);
            self.core
                .enqueue(offset, meta, now_ms, &mut env, &mut self.fx);
            if builder.len_bytes() >= BATCH_TARGET_BYTES {
                let full = std::mem::replace(&mut builder, BatchBuilder::new(now_ms));
                self.append(log, full, now_ms)?;
            }
        }
        if builder.record_count() > 0 {
            self.append(log, builder, now_ms)?;
        }
        self.counters
            .published
            .fetch_add(next - log_end_before, Ordering::Relaxed);
        outcome.end_offset = next;
        Ok(outcome)
    }

    fn append(
        &mut self,
        log: &mut Log,
        builder: BatchBuilder,
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        // The builder's buffer is ours alone: take it back without copying.
        let batch = builder
            .finish()
            .try_into_mut()
            .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
        if let Err(error) = log.append(&batch, now_ms) {
            self.fail(&error);
            self.fx.clear();
            return Err(self.queue_error(error.to_string()));
        }
        Ok(())
    }

    fn load(&mut self, log: &Log, offset: u64) -> Result<Arc<Message>, ReadFailure> {
        if let Some(cached) = self.cache.take(offset) {
            return Ok(cached.message);
        }
        read_into_cache(log, &mut self.cache, offset).map(|(message, _)| message)
    }

    /// A message could not be loaded to deliver or dead-letter it: it stays in the queue.
    fn keep_unreadable(&mut self, failure: ReadFailure, meta: Meta, delivery_count: u32) {
        self.core
            .keep_unreadable(failure.offset, meta, delivery_count);
        self.read_failure = Some(failure);
    }

    /// Reports a read that failed (once per message: an `error!` line and the queue's
    /// [`UnreadableMessage`]), or clears the report once the message is gone from the queue.
    fn report_unreadable(&mut self, now_ms: i64) {
        if let Some(failure) = self.read_failure.take() {
            if self.stuck_at == Some(failure.offset) {
                return;
            }
            tracing::error!(
                queue = %self.name,
                vhost = %self.vhost,
                offset = failure.offset,
                file = %failure.file,
                position = ?failure.position,
                reason = %failure.reason,
                "queue cannot read a message; it keeps it and delivers nothing past it until it can"
            );
            self.stuck_at = Some(failure.offset);
            *self.unreadable.lock() = Some(UnreadableMessage {
                offset: failure.offset,
                file: failure.file,
                position: failure.position,
                reason: failure.reason,
                since_ms: now_ms,
            });
        } else if let Some(offset) = self.stuck_at
            && !self.core.holds(offset)
        {
            tracing::warn!(queue = %self.name, vhost = %self.vhost, offset, "the unreadable message left the queue");
            self.clear_unreadable();
        }
    }

    fn clear_unreadable(&mut self) {
        self.stuck_at = None;
        *self.unreadable.lock() = None;
    }

    /// Reads the unreadable message again (on housekeeping ticks): if it reads now, delivery
    /// goes on from it.
    fn retry_unreadable(&mut self, log: &Log) {
        let Some(offset) = self.stuck_at else {
            return;
        };
        match read_into_cache(log, &mut self.cache, offset) {
            Ok((message, meta)) => {
                self.cache.insert(offset, message, meta);
                tracing::warn!(queue = %self.name, vhost = %self.vhost, offset, "queue can read its message again");
                self.clear_unreadable();
            }
            Err(failure) => self.read_failure = Some(failure),
        }
    }

    fn dead_letter(&mut self, message: &Message, reason: DeathReason, now_ms: i64) {
        let args = self.core.args();
        let Some(exchange) = args.dead_letter_exchange.as_deref() else {
            return;
        };
        let dead = record_death(
            message,
            &self.name,
            reason,
            exchange,
            args.dead_letter_routing_key.as_deref(),
            now_ms,
        );
        let letter = DeadLetter {
            vhost: Arc::clone(&self.vhost),
            message: Arc::new(dead),
        };
        if self.services.dead_letters.try_send(letter).is_err() {
            tracing::warn!(queue = %self.name, vhost = %self.vhost, "dead-letter forwarder is saturated; message dropped");
        }
    }

    fn settled(&mut self, range: std::ops::Range<u64>) {
        if self.journaling {
            self.journal.record(range);
        }
    }

    fn notify(&mut self, notice: QueueNotice) {
        if !self.notified && !self.deleting {
            self.notified = true;
            let _ = self.services.notices.send(notice);
        }
    }

    /// Carries out the state machine's effects, then flushes the journal, advances the log
    /// start, and publishes counters and the next deadline.
    fn settle_effects(&mut self, log: &mut Log, now_ms: i64) {
        let mut gone: Vec<ConsumerId> = Vec::new();
        let mut delivered = 0;
        loop {
            let effects = std::mem::take(&mut self.fx);
            if effects.is_empty() && gone.is_empty() {
                break;
            }
            for effect in effects {
                match effect {
                    Effect::Deliver {
                        consumer,
                        offset,
                        meta,
                        redelivered,
                        delivery_count,
                        settled,
                    } => {
                        let mut message = match self.load(log, offset) {
                            Ok(message) => message,
                            Err(failure) => {
                                // Never sent: the message stays, and so does the credit.
                                if let Some(entry) = self.consumers.get(&consumer) {
                                    entry.credit.grant(1, Credit::window_cost(meta.bytes));
                                }
                                self.keep_unreadable(failure, meta, delivery_count);
                                continue;
                            }
                        };
                        if delivery_count > 0 && self.core.args().delivery_limit.is_some() {
                            message = Arc::new(with_delivery_count(&message, delivery_count));
                        }
                        if settled {
                            self.settled(offset..offset + 1);
                        }
                        let delivery = Delivery {
                            consumer,
                            offset,
                            redelivered,
                            delivery_count,
                            message,
                        };
                        let sent = self
                            .consumers
                            .get(&consumer)
                            .is_some_and(|c| c.sink.send(QueueEvent::Deliver(delivery)).is_ok());
                        if sent {
                            delivered += 1;
                            self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                        } else if !gone.contains(&consumer) {
                            gone.push(consumer);
                        }
                    }
                    Effect::DeadLetter {
                        offset,
                        meta,
                        reason,
                    } => match self.load(log, offset) {
                        Ok(message) => {
                            self.dead_letter(&message, reason, now_ms);
                            self.settled(offset..offset + 1);
                        }
                        Err(failure) => self.keep_unreadable(failure, meta, 0),
                    },
                    Effect::Settle(range) => {
                        self.cache.remove_range(range.clone());
                        self.settled(range);
                    }
                    Effect::AutoDelete => self.notify(QueueNotice::AutoDelete {
                        vhost: self.vhost.to_string(),
                        name: self.name.to_string(),
                        id: self.id,
                    }),
                    Effect::Expire => self.notify(QueueNotice::Expired {
                        vhost: self.vhost.to_string(),
                        name: self.name.to_string(),
                        id: self.id,
                    }),
                }
            }
            for consumer in gone.drain(..) {
                self.consumers.remove(&consumer);
                let mut env = env!(self, log);
                self.core
                    .consumer_gone(consumer, now_ms, &mut env, &mut self.fx);
            }
        }
        self.report_unreadable(now_ms);
        if self.journaling
            && let Err(error) = self.journal.flush()
        {
            self.fail(&error);
        }
        let min_unsettled = self
            .core
            .min_unsettled()
            .unwrap_or_else(|| log.log_end_offset());
        self.cache.remove_below(min_unsettled);
        self.cache.shrink();
        self.handled_since_hint += 1;
        if self.handled_since_hint >= 1024 {
            self.handled_since_hint = 0;
            self.segment_hint = first_segment_end(log);
        }
        if min_unsettled >= self.segment_hint {
            self.advance_log_start(log, min_unsettled, now_ms);
        }
        self.counters
            .ready
            .store(self.core.ready_count(), Ordering::Relaxed);
        self.counters
            .unacked
            .store(self.core.unacked_count() as u64, Ordering::Relaxed);
        self.counters
            .consumers
            .store(self.core.consumer_count() as u64, Ordering::Relaxed);
        self.flow.delivered(delivered, now_ms);
        let recheck = self
            .flow
            .update(self.core.ready_count(), self.core.consumer_count(), now_ms);
        let expiry = if self.core.may_expire() {
            let mut env = env!(self, log);
            self.core.next_deadline(&mut env)
        } else {
            None
        };
        let deadline = match (expiry, recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.timer.send_if_modified(|current| {
            let changed = *current != deadline;
            *current = deadline;
            changed
        });
    }

    fn advance_log_start(&mut self, log: &mut Log, offset: u64, now_ms: i64) {
        if offset <= log.log_start_offset() || self.failed.is_some() {
            return;
        }
        if let Err(error) = log.advance_log_start(offset, now_ms) {
            self.fail(&error);
        }
        self.segment_hint = first_segment_end(log);
    }

    fn get(&mut self, log: &Log, no_ack: bool, now_ms: i64) -> Reply {
        let mut env = env!(self, log);
        let Ok(got) = self.core.get(no_ack, now_ms, &mut env, &mut self.fx) else {
            return Err(self.unreadable_error());
        };
        let Some(got) = got else {
            return Ok(QueueReply::Got(None));
        };
        let mut message = match self.load(log, got.offset) {
            Ok(message) => message,
            Err(failure) => {
                // The state machine settled a no-ack get already: take that back.
                let taken = got.offset..got.offset + 1;
                self.fx
                    .retain(|effect| !matches!(effect, Effect::Settle(range) if *range == taken));
                self.keep_unreadable(failure, got.meta, got.delivery_count);
                return Err(self.unreadable_error());
            }
        };
        if got.delivery_count > 0 && self.core.args().delivery_limit.is_some() {
            message = Arc::new(with_delivery_count(&message, got.delivery_count));
        }
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        Ok(QueueReply::Got(Some(Got {
            delivery: Delivery {
                consumer: 0,
                offset: got.offset,
                redelivered: got.redelivered,
                delivery_count: got.delivery_count,
                message,
            },
            message_count: self.core.ready_count(),
        })))
    }

    fn unreadable_error(&self) -> BrokerError {
        let offset = self
            .read_failure
            .as_ref()
            .map(|failure| failure.offset)
            .or(self.stuck_at)
            .unwrap_or_default();
        MessagingError::Unreadable {
            vhost: self.vhost.to_string(),
            name: self.name.to_string(),
            offset,
        }
        .into()
    }

    fn handle_request(
        &mut self,
        log: &mut Log,
        request: QueueRequest,
        now_ms: i64,
    ) -> Handled<Reply> {
        if let Some(reason) = &self.failed
            && !matches!(request, QueueRequest::Deleting | QueueRequest::Stat { .. })
        {
            return Handled::now(Err(self.queue_error(reason.clone())));
        }
        let reply = match request {
            QueueRequest::Publish(messages) => self
                .publish(log, messages, now_ms)
                .map(QueueReply::Published),
            QueueRequest::AwaitDurable(end_offset) => {
                if end_offset > log.flushed_offset() {
                    return Handled::when_durable(Ok(QueueReply::Done), end_offset);
                }
                Ok(QueueReply::Done)
            }
            QueueRequest::Consume(consumer) => {
                let added = self.core.add_consumer(
                    consumer.id,
                    consumer.no_ack,
                    consumer.exclusive,
                    consumer.priority,
                    now_ms,
                );
                match added {
                    Ok(()) => {
                        self.consumers.insert(
                            consumer.id,
                            ConsumerEntry {
                                credit: consumer.credit,
                                sink: consumer.sink,
                            },
                        );
                        Ok(QueueReply::Done)
                    }
                    Err(_) => Err(MessagingError::ExclusiveConsume {
                        vhost: self.vhost.to_string(),
                        name: self.name.to_string(),
                    }
                    .into()),
                }
            }
            QueueRequest::Cancel(consumer) => {
                self.consumers.remove(&consumer);
                self.core.remove_consumer(consumer, now_ms, &mut self.fx);
                Ok(QueueReply::Done)
            }
            QueueRequest::Settle(offsets, op) => {
                if op == SettleOp::Ack {
                    self.counters
                        .acked
                        .fetch_add(offsets.len() as u64, Ordering::Relaxed);
                }
                let mut env = env!(self, log);
                self.core
                    .settle(&offsets, op, now_ms, &mut env, &mut self.fx);
                Ok(QueueReply::Done)
            }
            QueueRequest::ConsumersGone(consumers) => {
                for consumer in consumers {
                    self.consumers.remove(&consumer);
                    let mut env = env!(self, log);
                    self.core
                        .consumer_gone(consumer, now_ms, &mut env, &mut self.fx);
                }
                Ok(QueueReply::Done)
            }
            QueueRequest::Wake => Ok(QueueReply::Done),
            QueueRequest::Get { no_ack } => self.get(log, no_ack, now_ms),
            QueueRequest::Purge => {
                let count = self.core.purge(&mut self.fx);
                self.cache.clear();
                Ok(QueueReply::Count(count))
            }
            QueueRequest::Stat { touch } => {
                if touch {
                    self.core.touch(now_ms);
                }
                Ok(QueueReply::Stat(QueueStat {
                    message_count: self.core.ready_count(),
                    consumer_count: self.core.consumer_count() as u32,
                }))
            }
            QueueRequest::CheckDelete {
                if_unused,
                if_empty,
            } => {
                if if_unused && self.core.consumer_count() > 0 {
                    Err(MessagingError::InUse {
                        kind: ResourceKind::Queue,
                        vhost: self.vhost.to_string(),
                        name: self.name.to_string(),
                    }
                    .into())
                } else if if_empty && self.core.ready_count() > 0 {
                    Err(MessagingError::NotEmpty {
                        vhost: self.vhost.to_string(),
                        name: self.name.to_string(),
                    }
                    .into())
                } else {
                    Ok(QueueReply::Count(self.core.ready_count()))
                }
            }
            QueueRequest::Deleting => {
                self.deleting = true;
                self.flow.release();
                for (consumer, entry) in self.consumers.drain() {
                    let _ = entry.sink.send(QueueEvent::Cancelled { consumer });
                    let mut ignored = Vec::new();
                    self.core.remove_consumer(consumer, now_ms, &mut ignored);
                }
                return Handled::now(Ok(QueueReply::Count(self.core.ready_count())));
            }
            QueueRequest::Timer => {
                let mut env = env!(self, log);
                self.core.tick(now_ms, &mut env, &mut self.fx);
                Ok(QueueReply::Done)
            }
        };
        if reply.is_ok() {
            let mut env = env!(self, log);
            self.core.dispatch(now_ms, &mut env, &mut self.fx);
        }
        self.settle_effects(log, now_ms);
        Handled::now(reply)
    }
}

/// A copy of `message` carrying `x-delivery-count`, as quorum queues add on redeliveries.
fn with_delivery_count(message: &Message, count: u32) -> Message {
    let mut copy = message.clone();
    let headers = copy.properties.headers.get_or_insert_with(Vec::new);
    value::set(
        headers,
        "x-delivery-count",
        FieldValue::I64(i64::from(count)),
    );
    copy
}

impl LogHandler for QueueHandler {
    type Request = QueueRequest;
    type Reply = Reply;

    fn handle(&mut self, log: &mut Log, request: QueueRequest, now_ms: i64) -> Handled<Reply> {
        self.handle_request(log, request, now_ms)
    }

    fn flush_failed(&mut self, _reply: Reply, error: &StorageError) -> Reply {
        self.fail(error);
        Err(self.queue_error(error.to_string()))
    }

    fn on_close(&mut self, log: &mut Log) {
        self.flow.release();
        if self.deleting {
            return;
        }
        if self.journaling
            && let Err(error) = self.journal.sync()
        {
            tracing::warn!(queue = %self.name, %error, "cannot sync the acknowledgement journal");
        }
        // Leave the log as short as it can be, so the next start recovers less. Queue logs
        // have no time-based retention, so the time passed here does not matter.
        let min_unsettled = self
            .core
            .min_unsettled()
            .unwrap_or_else(|| log.log_end_offset());
        if min_unsettled > log.log_start_offset()
            && let Err(error) = log.advance_log_start(min_unsettled, 0)
        {
            tracing::warn!(queue = %self.name, %error, "cannot advance the log start at close");
        }
    }

    fn tick(&mut self, log: &mut Log, now_ms: i64) {
        if self.failed.is_some() || self.deleting {
            return;
        }
        // Consumers whose connection is gone without telling (a crashed connection task).
        let dead: Vec<ConsumerId> = self
            .consumers
            .iter()
            .filter(|(_, entry)| entry.sink.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for consumer in dead {
            self.consumers.remove(&consumer);
            let mut env = env!(self, log);
            self.core
                .consumer_gone(consumer, now_ms, &mut env, &mut self.fx);
        }
        self.retry_unreadable(log);
        let mut env = env!(self, log);
        self.core.tick(now_ms, &mut env, &mut self.fx);
        self.segment_hint = first_segment_end(log);
        self.settle_effects(log, now_ms);
        if !self.journaling {
            return;
        }
        if let Err(error) = self.journal.sync() {
            self.fail(&error);
            return;
        }
        if self.journal.entry_count() > COMPACT_AFTER_ENTRIES {
            let start = log.log_start_offset();
            let end = log.log_end_offset();
            let settled = self.core.unsettled().complement(start..end);
            if let Err(error) = self.journal.rewrite(&settled) {
                self.fail(&error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::value::lookup;

    /// Appends `count` small messages to `log` in batches of 100.
    fn append_messages(log: &mut Log, count: u64) {
        let mut encoder = RecordEncoder::default();
        let mut builder = BatchBuilder::new(0);
        for n in 0..count {
            let message = Message {
                exchange: "".into(),
                routing_key: "q".into(),
                properties: Properties::default().into(),
                body: bytes::Bytes::from(n.to_be_bytes().to_vec()),
            };
            encoder.push(&mut builder, 0, None, &message);
            if builder.record_count() == 100 {
                let full = std::mem::replace(&mut builder, BatchBuilder::new(0));
                log.append(&full.finish(), 0).unwrap();
            }
        }
        if builder.record_count() > 0 {
            log.append(&builder.finish(), 0).unwrap();
        }
    }

    #[test]
    fn read_ahead_from_the_head_displaces_a_cached_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), sluice_storage::LogConfig::default(), 0).unwrap();
        let total = 3 * CACHE_MAX_ENTRIES as u64;
        append_messages(&mut log, total);
        // The cache is full of the newest messages, as after publishes to a queue whose
        // consumer is far behind.
        let mut cache = Cache::default();
        let tail_start = total - CACHE_MAX_ENTRIES as u64;
        for offset in tail_start..total {
            let (message, meta) = read_into_cache(&log, &mut Cache::default(), offset).unwrap();
            cache.insert(offset, message, meta);
        }
        assert!(!cache.has_room());
        // Reading the head brings in what follows it, in place of the tail.
        let (message, _) = read_into_cache(&log, &mut cache, 0).unwrap();
        assert_eq!(&message.body[..], &0u64.to_be_bytes());
        assert!(cache.entries.contains_key(&1));
        assert!(cache.entries.contains_key(&500));
        assert!(cache.entries.len() <= CACHE_MAX_ENTRIES);
        assert!(!cache.entries.contains_key(&(total - 1)));
        // Each cached message is the one at its offset.
        let cached = &cache.entries[&500].message;
        assert_eq!(&cached.body[..], &500u64.to_be_bytes());
    }

    #[test]
    fn read_ahead_never_displaces_messages_not_yet_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), sluice_storage::LogConfig::default(), 0).unwrap();
        append_messages(&mut log, 1000);
        let end = log.log_end_offset();
        let mut cache = Cache::default();
        let (message, meta) = read_into_cache(&log, &mut Cache::default(), 0).unwrap();
        // Entries past the log's end stand for messages being published right now.
        for offset in end..end + CACHE_MAX_ENTRIES as u64 {
            cache.insert(offset, Arc::clone(&message), meta);
        }
        read_into_cache(&log, &mut cache, 0).unwrap();
        assert_eq!(cache.entries.len(), CACHE_MAX_ENTRIES);
        assert!(cache.entries.keys().all(|offset| *offset >= end));
    }

    #[test]
    fn delivery_count_header_is_added() {
        let message = Message {
            exchange: "".into(),
            routing_key: "q".into(),
            properties: Properties::default().into(),
            body: bytes::Bytes::new(),
        };
        let counted = with_delivery_count(&message, 2);
        assert_eq!(
            lookup(
                counted.properties.headers.as_ref().unwrap(),
                "x-delivery-count"
            ),
            Some(&FieldValue::I64(2))
        );
    }
}
