//! One partition of a topic: its log, the task that owns it, and the high watermark readers
//! may see.
//!
//! Writes (produce, delete-records, reconfiguration) go through the owner task, where producer
//! sequence checks and appends happen in one order. Reads go straight to the log files through
//! a [`LogReader`], bounded by the high watermark.
//!
//! The high watermark is the log end offset, except under `fsync = always`, where it is the
//! offset up to which the log is on disk: a consumer never sees a record that a crash could
//! take back.
//!
//! Directory: `<data>/logs/<topic>-<partition>/`, holding the log's files, the producer state
//! snapshot, and `topic-id`, which ties the directory to one incarnation of the topic.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sluice_storage::batch::{self, BatchHeader};
use sluice_storage::{
    CheckedBatches, Clock, Handled, Log, LogHandler, LogReader, OwnerHandle, OwnerOptions,
    OwnerTask, ReadBatches, StorageError, TimestampHit,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::BrokerError;
use crate::producer::{ProducerStates, SequenceCheck};
use crate::replication::{FollowerView, PendingProduce, ProduceOptions, ReplicatedLog};
use crate::topic_config::{EffectiveTopicConfig, TimestampType};

const TOPIC_ID_FILE: &str = "topic-id";

/// Largest decompressed batch body read when looking inside batches (timestamp lookups,
/// peeks). A batch that expands further is treated as opaque.
pub const DECOMPRESSED_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Traffic through one partition since the broker started.
#[derive(Debug, Default)]
pub struct PartitionStats {
    /// Records appended (duplicates of earlier batches are not counted again).
    pub records_in: sluice_metrics::Counter,
    pub bytes_in: sluice_metrics::Counter,
    /// Records handed to readers (a record read twice counts twice).
    pub records_out: sluice_metrics::Counter,
    pub bytes_out: sluice_metrics::Counter,
    /// Produce requests refused.
    pub produce_errors: sluice_metrics::Counter,
}

/// Limits of the producer state kept per partition.
#[derive(Debug, Clone, Copy)]
pub struct ProducerLimits {
    pub expiration_ms: i64,
    pub max_producer_count: usize,
}

/// Where a produce landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceOutcome {
    pub base_offset: u64,
    pub last_offset: u64,
    /// The broker's timestamp, for topics with `message.timestamp.type = LogAppendTime`.
    pub log_append_time_ms: Option<i64>,
    pub log_start_offset: u64,
    /// True if the batch was a retry of one already appended.
    pub duplicate: bool,
}

#[derive(Debug)]
pub enum PartitionRequest {
    /// Batches checked on the producer's connection task ([`PartitionHandle::produce`]).
    Produce(CheckedBatches),
    DeleteRecords(u64),
    Reconfigure(EffectiveTopicConfig),
    BeginLeaderEpoch(i32),
    EndOffsetForEpoch(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionReply {
    Produced(ProduceOutcome),
    LogStart(u64),
    EpochEnd(Option<(i32, u64)>),
    Done,
}

type Reply = Result<PartitionReply, BrokerError>;

struct PartitionHandler {
    dir: PathBuf,
    stats: Arc<PartitionStats>,
    producers: ProducerStates,
    high_watermark: watch::Sender<u64>,
    config: EffectiveTopicConfig,
}

impl PartitionHandler {
    fn fsync_always(&self) -> bool {
        self.config.log.fsync == sluice_storage::FsyncPolicy::Always
    }

    /// Moves the high watermark to what is written (fsync = always: what is durable, see
    /// `on_durable`), so fetches never wait on or look past an unwritten append.
    fn publish_end(&self, log: &Log) {
        if !self.fsync_always() {
            let end = log.written_end_offset();
            // Called after every drain: wake fetches only when there is more to read.
            self.high_watermark.send_if_modified(|high_watermark| {
                let moved = *high_watermark != end;
                *high_watermark = end;
                moved
            });
        }
    }

    fn produce(&mut self, log: &mut Log, checked: CheckedBatches, now_ms: i64) -> Handled<Reply> {
        // Structure and CRC were checked by the caller; here the batches meet the state.
        let headers: Vec<BatchHeader> = checked.headers().copied().collect();
        if let Err(error) = refuse_unsupported(&headers) {
            return Handled::now(Err(error));
        }
        if let Some(first) = headers.first() {
            match self.producers.check(first) {
                Ok(SequenceCheck::Append) => {}
                Ok(SequenceCheck::Duplicate {
                    base_offset,
                    last_offset,
                }) => {
                    tracing::debug!(
                        dir = %self.dir.display(),
                        producer_id = first.producer_id,
                        base_sequence = first.base_sequence,
                        base_offset,
                        "duplicate batch acknowledged with its original offsets"
                    );
                    let outcome = ProduceOutcome {
                        base_offset,
                        last_offset,
                        log_append_time_ms: None,
                        log_start_offset: log.log_start_offset(),
                        duplicate: true,
                    };
                    return Handled::after_append(
                        log,
                        Ok(PartitionReply::Produced(outcome)),
                        last_offset + 1,
                    );
                }
                Err(error) => return Handled::now(Err(error)),
            }
            // Kafka's producers send one batch per partition per request when idempotent; a
            // request mixing producers cannot be checked batch by batch atomically.
            if first.producer_id >= 0
                && headers
                    .iter()
                    .skip(1)
                    .any(|h| h.producer_id != first.producer_id)
            {
                return Handled::now(Err(BrokerError::InvalidProducerBatch {
                    producer_id: first.producer_id,
                }));
            }
        }
        // Only LogAppendTime topics rewrite the producer's bytes (and so need a copy of them).
        // Others are deferred: the owner writes every produce of a drain with one system call,
        // then replies and moves the high watermark (`on_written`).
        let appended = match self.config.timestamp_type {
            TimestampType::CreateTime => log.append_deferred(checked, now_ms).map(|i| (i, None)),
            TimestampType::LogAppendTime => {
                let mut stamped = BytesMut::from(&checked.bytes()[..]);
                stamp_append_time(&mut stamped, &headers, now_ms);
                log.append(&stamped, now_ms).map(|i| (i, Some(now_ms)))
            }
        };
        let (info, log_append_time_ms) = match appended {
            Ok(appended) => appended,
            Err(error) => return Handled::now(Err(error.into())),
        };
        self.stats
            .records_in
            .add(info.last_offset + 1 - info.base_offset);
        self.stats.bytes_in.add(info.bytes as u64);
        // Record producer state from the headers as stored (with assigned offsets).
        let mut position = 0;
        for header in &headers {
            if header.producer_id >= 0 {
                let mut stored = *header;
                stored.base_offset = (info.base_offset + (position as u64)) as i64;
                self.producers.record(&stored, now_ms);
            }
            position += i64::from(header.last_offset_delta) + 1;
        }
        let outcome = ProduceOutcome {
            base_offset: info.base_offset,
            last_offset: info.last_offset,
            log_append_time_ms,
            log_start_offset: info.log_start_offset,
            duplicate: false,
        };
        Handled::after_append(
            log,
            Ok(PartitionReply::Produced(outcome)),
            info.last_offset + 1,
        )
    }
}

/// Refuses batches the broker cannot take from a producer: an unknown compression, and
/// transactional or control batches (transactions are not supported yet; control batches are
/// the broker's own).
fn refuse_unsupported<'a>(
    headers: impl IntoIterator<Item = &'a BatchHeader>,
) -> Result<(), BrokerError> {
    for header in headers {
        if let batch::Compression::Unknown(id) = header.compression() {
            return Err(BrokerError::UnsupportedCompression(id));
        }
        if header.is_transactional() || header.is_control() {
            return Err(BrokerError::TransactionsUnsupported);
        }
    }
    Ok(())
}

/// Sets the log-append-time attribute and max timestamp of every batch, recomputing the CRC.
/// The batches were checked (CRC included) before, so damaged input is never given a fresh
/// checksum.
fn stamp_append_time(batches: &mut [u8], headers: &[BatchHeader], now_ms: i64) {
    let mut position = 0;
    for header in headers {
        let end = position + header.total_bytes();
        if end > batches.len() {
            break;
        }
        let bytes = &mut batches[position..end];
        let attributes = header.attributes | 0x08;
        bytes[21..23].copy_from_slice(&attributes.to_be_bytes());
        bytes[35..43].copy_from_slice(&now_ms.to_be_bytes());
        let crc = batch::compute_crc(bytes);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        position = end;
    }
}

impl LogHandler for PartitionHandler {
    type Request = PartitionRequest;
    type Reply = Reply;

    fn handle(&mut self, log: &mut Log, request: PartitionRequest, now_ms: i64) -> Handled<Reply> {
        match request {
            PartitionRequest::Produce(batches) => self.produce(log, batches, now_ms),
            PartitionRequest::DeleteRecords(offset) => Handled::now(
                log.advance_log_start(offset, now_ms)
                    .map(PartitionReply::LogStart)
                    .map_err(Into::into),
            ),
            PartitionRequest::Reconfigure(config) => {
                let result = log.set_config(config.log.clone());
                if result.is_ok() {
                    self.config = config;
                }
                Handled::now(result.map(|()| PartitionReply::Done).map_err(Into::into))
            }
            PartitionRequest::BeginLeaderEpoch(epoch) => Handled::now(
                log.begin_leader_epoch(epoch)
                    .map(|()| PartitionReply::Done)
                    .map_err(Into::into),
            ),
            PartitionRequest::EndOffsetForEpoch(epoch) => Handled::now(Ok(
                PartitionReply::EpochEnd(log.end_offset_for_epoch(epoch)),
            )),
        }
    }

    fn flush_failed(&mut self, _reply: Reply, error: &StorageError) -> Reply {
        Err(BrokerError::Storage(StorageError::Failed {
            dir: self.dir.clone(),
            reason: error.to_string(),
        }))
    }

    fn on_durable(&mut self, _log: &Log, flushed_offset: u64) {
        if self.fsync_always() {
            self.high_watermark.send_replace(flushed_offset);
        }
    }

    fn on_written(&mut self, log: &Log) {
        self.publish_end(log);
    }

    fn on_close(&mut self, log: &mut Log) {
        if let Err(error) = self.producers.save(&self.dir, log.log_end_offset()) {
            tracing::warn!(dir = %self.dir.display(), %error, "cannot save producer state");
        }
    }

    fn tick(&mut self, log: &mut Log, now_ms: i64) {
        if let Err(error) = log.apply_retention(now_ms) {
            tracing::warn!(dir = %self.dir.display(), %error, "retention failed");
        }
        self.producers.expire(now_ms);
        if let Err(error) = self.producers.save(&self.dir, log.log_end_offset()) {
            tracing::warn!(dir = %self.dir.display(), %error, "cannot save producer state");
        }
    }
}

/// Names partition `index` of `topic` in a replica's "not the leader" errors.
fn name_partition(topic: &str, index: u32, error: BrokerError) -> BrokerError {
    match error {
        BrokerError::NotLeader { leader, .. } => BrokerError::NotLeader {
            topic: topic.to_string(),
            partition: index as i32,
            leader,
        },
        BrokerError::LeaderNotReady { .. } => BrokerError::LeaderNotReady {
            topic: topic.to_string(),
            partition: index as i32,
        },
        BrokerError::NotEnoughReplicas {
            in_sync, required, ..
        } => BrokerError::NotEnoughReplicas {
            topic: topic.to_string(),
            partition: index as i32,
            in_sync,
            required,
        },
        other => other,
    }
}

/// A live partition.
#[derive(Debug)]
pub struct Partition {
    stats: Arc<PartitionStats>,
    topic: Arc<str>,
    topic_id: Uuid,
    index: u32,
    reader: LogReader,
    backend: Backend,
    high_watermark: watch::Receiver<u64>,
}

/// Who writes the partition's log.
#[derive(Debug)]
enum Backend {
    /// This node's owner task: the partition's only copy.
    Owner(OwnerHandle<PartitionRequest, Reply>),
    /// A Raft group of the cluster, of which this node holds a replica.
    Replicated(Arc<dyn ReplicatedLog>, ReplicationSettings),
}

/// How a replicated partition acknowledges writes: the topic's `min.insync.replicas` (which
/// a configuration change updates) and the broker's `replica.lag.time.max.ms`.
#[derive(Debug)]
pub struct ReplicationSettings {
    min_insync_replicas: AtomicU32,
    replica_lag: Duration,
}

impl ReplicationSettings {
    pub fn new(min_insync_replicas: u32, replica_lag: Duration) -> Self {
        Self {
            min_insync_replicas: AtomicU32::new(min_insync_replicas),
            replica_lag,
        }
    }
}

/// A checksum of a copy's log ([`Partition::checksum`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogChecksum {
    pub log_start_offset: u64,
    /// The offset after the last batch covered.
    pub end_offset: u64,
    pub bytes: u64,
    pub crc32c: u32,
}

/// How long a replicated acks=all produce waits for its commit when the request names no
/// time.
pub const PRODUCE_COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Everything needed to open a partition.
#[derive(Debug, Clone)]
pub struct PartitionSpec {
    pub topic: Arc<str>,
    pub topic_id: Uuid,
    pub index: u32,
    pub leader_epoch: i32,
    pub dir: PathBuf,
    pub config: EffectiveTopicConfig,
    pub producer_limits: ProducerLimits,
}

/// The directory of a partition's log.
pub fn partition_dir(logs_dir: &Path, topic: &str, index: u32) -> PathBuf {
    logs_dir.join(format!("{topic}-{index}"))
}

impl Partition {
    /// Opens (recovering) or creates the partition's log and starts its owner task. Blocks on
    /// disk I/O: call it from a blocking context, then [`Self::start`] on the runtime.
    pub fn open_log(
        spec: &PartitionSpec,
        clock: &dyn Clock,
    ) -> Result<(Log, ProducerStates), BrokerError> {
        Self::prepare_dir(spec)?;
        let now_ms = clock.now_ms();
        let (mut log, report) = Log::open_with_report(&spec.dir, spec.config.log.clone(), now_ms)?;
        if report.truncated_bytes > 0 || report.rebuilt_index_count > 0 {
            tracing::warn!(
                topic = %spec.topic, partition = spec.index,
                truncated_bytes = report.truncated_bytes,
                rebuilt_indexes = report.rebuilt_index_count,
                "recovered partition log"
            );
        }
        log.begin_leader_epoch(spec.leader_epoch)?;
        let producers = ProducerStates::load(
            &spec.dir,
            &log.reader(),
            spec.producer_limits.expiration_ms,
            spec.producer_limits.max_producer_count,
            now_ms,
        )?;
        Ok((log, producers))
    }

    /// Makes the partition's directory this topic incarnation's: one left by a deleted topic
    /// of the same name is removed first. Blocking.
    pub fn prepare_dir(spec: &PartitionSpec) -> Result<(), BrokerError> {
        let id_path = spec.dir.join(TOPIC_ID_FILE);
        match std::fs::read_to_string(&id_path) {
            Ok(found) if found.trim() == spec.topic_id.to_string() => {}
            Ok(found) => {
                // Left over from a deleted topic of the same name: start afresh.
                tracing::warn!(dir = %spec.dir.display(), found = found.trim(), expected = %spec.topic_id, "removing a log directory that belongs to an older topic");
                std::fs::remove_dir_all(&spec.dir).map_err(|source| StorageError::Io {
                    op: "remove",
                    path: spec.dir.clone(),
                    source,
                })?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StorageError::Io {
                    op: "read",
                    path: id_path,
                    source,
                }
                .into());
            }
        }
        std::fs::create_dir_all(&spec.dir).map_err(|source| StorageError::Io {
            op: "create",
            path: spec.dir.clone(),
            source,
        })?;
        if !id_path.exists() {
            sluice_storage::checkpoint::write_atomically(
                &id_path,
                spec.topic_id.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// Starts the owner task of an opened log. Must run inside a tokio runtime.
    pub fn start(
        spec: &PartitionSpec,
        log: Log,
        producers: ProducerStates,
        options: OwnerOptions,
    ) -> (Arc<Self>, OwnerTask) {
        let reader = log.reader();
        let (high_watermark, receiver) = watch::channel(log.log_end_offset());
        let stats = Arc::new(PartitionStats::default());
        let handler = PartitionHandler {
            stats: Arc::clone(&stats),
            dir: spec.dir.clone(),
            producers,
            high_watermark,
            config: spec.config.clone(),
        };
        let (owner, task) = sluice_storage::owner::spawn(log, handler, options);
        let partition = Arc::new(Self {
            stats,
            topic: Arc::clone(&spec.topic),
            topic_id: spec.topic_id,
            index: spec.index,
            reader,
            backend: Backend::Owner(owner),
            high_watermark: receiver,
        });
        (partition, task)
    }

    /// A partition served by this node's replica of its Raft group.
    pub fn replicated(
        topic: Arc<str>,
        topic_id: Uuid,
        index: u32,
        log: Arc<dyn ReplicatedLog>,
        settings: ReplicationSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            stats: Arc::new(PartitionStats::default()),
            topic,
            topic_id,
            index,
            reader: log.reader(),
            high_watermark: log.watch_high_watermark(),
            backend: Backend::Replicated(log, settings),
        })
    }

    /// Whether this node serves the partition's reads and writes now: always for a single
    /// copy; for a replicated one, while its replica leads and is ready.
    pub fn serving(&self) -> Result<(), BrokerError> {
        let Backend::Replicated(log, _) = &self.backend else {
            return Ok(());
        };
        if log.ready_epoch().is_some() {
            return Ok(());
        }
        let (leader, _) = log.leader();
        if leader == Some(log.node()) {
            Err(BrokerError::LeaderNotReady {
                topic: self.topic.to_string(),
                partition: self.index as i32,
            })
        } else {
            Err(BrokerError::NotLeader {
                topic: self.topic.to_string(),
                partition: self.index as i32,
                leader,
            })
        }
    }

    /// Names this partition in a replica's "not the leader" errors.
    fn name_partition(&self, error: BrokerError) -> BrokerError {
        name_partition(&self.topic, self.index, error)
    }

    /// The current leader epoch: 0 for a single copy (its leader never changes); a replicated
    /// partition's Raft term.
    pub fn leader_epoch(&self) -> i32 {
        match &self.backend {
            Backend::Owner(_) => 0,
            Backend::Replicated(log, _) => log.ready_epoch().unwrap_or_else(|| log.leader().1),
        }
    }

    /// Where leader epoch `epoch` began in this replica's log: the end of the epochs before
    /// it (0 when there were none, and for a single copy, whose epoch never changes).
    pub fn epoch_start(&self, epoch: i32) -> u64 {
        match &self.backend {
            Backend::Owner(_) => 0,
            Backend::Replicated(log, _) => log
                .end_offset_for_epoch(epoch.saturating_sub(1))
                .map_or(0, |(_, end)| end),
        }
    }

    /// Kafka's preferred leader election asked of this node's copy: a single copy needs none;
    /// a replicated partition's leader hands leadership to the preferred replica.
    pub async fn elect_preferred(&self) -> crate::replication::Election {
        match &self.backend {
            Backend::Owner(_) => crate::replication::Election::NotNeeded,
            Backend::Replicated(log, _) => log.elect_preferred().await,
        }
    }

    /// Before this node stops: a replicated partition led here hands leadership to a caught-up
    /// follower (Kafka's controlled shutdown). Whether this node led it.
    pub async fn hand_over(&self) -> bool {
        match &self.backend {
            Backend::Owner(_) => false,
            Backend::Replicated(log, _) => {
                let led = log.ready_epoch().is_some();
                log.hand_over().await;
                led
            }
        }
    }

    /// Tells a replicated partition's replica its placement (see
    /// [`ReplicatedLog::reassign`]); nothing for a single copy.
    pub fn reassign(&self, reassignment: crate::replication::Reassignment) {
        if let Backend::Replicated(log, _) = &self.backend {
            log.reassign(reassignment);
        }
    }

    /// The other replicas as this node's replica sees them while it leads; `None` for a
    /// single copy.
    /// Whether this node's replica of a replicated partition is quiet (idle: no heartbeats,
    /// no timers); `None` for a single copy.
    pub fn is_quiet(&self) -> Option<bool> {
        match &self.backend {
            Backend::Owner(_) => None,
            Backend::Replicated(log, _) => Some(log.is_quiet()),
        }
    }

    pub fn followers(&self) -> Option<Vec<FollowerView>> {
        match &self.backend {
            Backend::Owner(_) => None,
            Backend::Replicated(log, _) => Some(log.followers()),
        }
    }

    /// The in-sync replicas while this node's replica leads: itself and the followers that
    /// answered it within `replica.lag.time.max.ms`; `None` for a single copy or a follower.
    pub fn in_sync_replicas(&self) -> Option<Vec<crate::NodeId>> {
        let Backend::Replicated(log, settings) = &self.backend else {
            return None;
        };
        log.ready_epoch()?;
        let mut in_sync = vec![log.node()];
        in_sync.extend(
            log.followers()
                .into_iter()
                .filter(|f| f.in_sync(settings.replica_lag))
                .map(|f| f.node),
        );
        Some(in_sync)
    }

    /// A CRC-32C of this copy's log from its start up to `to` (whole batches: the last one
    /// read starts before `to`), to compare replicas byte for byte. Blocking: it reads the
    /// files.
    pub fn checksum(&self, to: u64) -> Result<LogChecksum, BrokerError> {
        let start = self.reader.log_start_offset();
        let end = self.reader.log_end_offset();
        if to > end {
            return Err(BrokerError::Storage(StorageError::OffsetOutOfRange {
                offset: to,
                log_start_offset: start,
                log_end_offset: end,
            }));
        }
        let mut checksum = LogChecksum {
            log_start_offset: start,
            end_offset: start,
            bytes: 0,
            crc32c: 0,
        };
        while checksum.end_offset < to {
            let read = self
                .reader
                .read_until(checksum.end_offset, to, 1 << 20, true)
                .inspect_err(|e| self.found_damage(e, checksum.end_offset))?;
            if read.bytes.is_empty() {
                break;
            }
            let mut at = 0;
            while at < read.bytes.len() {
                let header = BatchHeader::parse(&read.bytes[at..]).map_err(|source| {
                    BrokerError::Storage(StorageError::InvalidBatch {
                        position: at,
                        source,
                    })
                })?;
                checksum.end_offset = header.next_offset() as u64;
                at += header.total_bytes();
            }
            checksum.crc32c = crc32c::crc32c_append(checksum.crc32c, &read.bytes);
            checksum.bytes += read.bytes.len() as u64;
        }
        Ok(checksum)
    }

    /// The leader and epoch of a replicated partition as its replica here knows them.
    pub fn replica_leader(&self) -> Option<(Option<crate::NodeId>, i32)> {
        match &self.backend {
            Backend::Owner(_) => None,
            Backend::Replicated(log, _) => Some(log.leader()),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn topic_id(&self) -> Uuid {
        self.topic_id
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    pub fn stats(&self) -> &PartitionStats {
        &self.stats
    }

    /// The offset below which records are visible to consumers.
    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    pub fn log_start_offset(&self) -> u64 {
        self.reader.log_start_offset()
    }

    /// A receiver that changes whenever the high watermark moves (for long-polling fetches).
    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.clone()
    }

    async fn call(&self, request: PartitionRequest) -> Result<PartitionReply, BrokerError> {
        let owner = match &self.backend {
            Backend::Owner(owner) => owner,
            Backend::Replicated(..) => {
                return Err(BrokerError::PolicyViolation(format!(
                    "partition {} of topic {:?} is replicated, and this operation is not available for replicated partitions yet",
                    self.index, self.topic
                )));
            }
        };
        match owner.call(request).await {
            Ok(reply) => reply,
            Err(StorageError::OwnerGone) => Err(BrokerError::ShuttingDown),
            Err(other) => Err(other.into()),
        }
    }

    /// Appends the batches of a produce request (one or more v2 batches laid end to end).
    ///
    /// Structure and CRC are checked here, on the caller's task, so that producers to one
    /// partition check in parallel while its owner task only writes. The size limit is the
    /// topic's, which the owner applies.
    pub async fn produce(&self, batches: Bytes) -> Result<ProduceOutcome, BrokerError> {
        self.produce_acks(batches, -1, PRODUCE_COMMIT_WAIT).await
    }

    /// [`Self::produce`] with Kafka's `acks` and the request's `timeout`: a replicated
    /// partition answers acks=1 (and 0) once its leader has appended, acks=all once committed
    /// and only while `min.insync.replicas` replicas are in sync. A single copy answers every
    /// acks once appended (and synced, under `fsync = always`).
    pub async fn produce_acks(
        &self,
        batches: Bytes,
        acks: i16,
        timeout: Duration,
    ) -> Result<ProduceOutcome, BrokerError> {
        self.submit_produce(batches, acks, timeout).await?.await
    }

    /// [`Self::produce_acks`] in two steps: resolves once the write has its place in the
    /// partition's order (queued to the owner task, or sequenced on the replicated leader), so
    /// the next write submitted goes behind it; the answer is the pending future's. A Kafka
    /// connection submits its produce requests in the order it reads them and waits for the
    /// answers while it reads on.
    pub async fn submit_produce(
        &self,
        batches: Bytes,
        acks: i16,
        timeout: Duration,
    ) -> Result<PendingProduce, BrokerError> {
        let checked = match CheckedBatches::check(batches, usize::MAX) {
            Ok(checked) => checked,
            Err(error) => {
                self.stats.produce_errors.increment();
                return Err(error.into());
            }
        };
        let stats = Arc::clone(&self.stats);
        if let Backend::Replicated(log, settings) = &self.backend {
            if let Err(error) = refuse_unsupported(checked.headers()) {
                self.stats.produce_errors.increment();
                return Err(error);
            }
            let records = checked.record_count();
            let bytes = checked.bytes().len() as u64;
            let options = ProduceOptions {
                leader_only: acks != -1,
                min_insync_replicas: settings.min_insync_replicas.load(Ordering::Relaxed) as usize,
                replica_lag: settings.replica_lag,
                timeout,
            };
            let (topic, index) = (Arc::clone(&self.topic), self.index);
            let pending = match log.submit(checked.bytes().clone(), options).await {
                Ok(pending) => pending,
                Err(error) => {
                    self.stats.produce_errors.increment();
                    return Err(self.name_partition(error));
                }
            };
            return Ok(Box::pin(async move {
                match pending.await {
                    Ok(outcome) => {
                        if !outcome.duplicate {
                            stats.records_in.add(records);
                            stats.bytes_in.add(bytes);
                        }
                        Ok(outcome)
                    }
                    Err(error) => {
                        stats.produce_errors.increment();
                        Err(name_partition(&topic, index, error))
                    }
                }
            }));
        }
        let Backend::Owner(owner) = &self.backend else {
            unreachable!("a partition is replicated or has an owner");
        };
        let reply = match owner.submit(PartitionRequest::Produce(checked)).await {
            Ok(reply) => reply,
            Err(_) => {
                self.stats.produce_errors.increment();
                return Err(BrokerError::ShuttingDown);
            }
        };
        Ok(Box::pin(async move {
            match reply.await {
                Ok(Ok(PartitionReply::Produced(outcome))) => Ok(outcome),
                Ok(Ok(other)) => unreachable!("produce is answered with Produced, not {other:?}"),
                Ok(Err(error)) => {
                    stats.produce_errors.increment();
                    Err(error)
                }
                Err(_) => {
                    stats.produce_errors.increment();
                    Err(BrokerError::ShuttingDown)
                }
            }
        }))
    }

    /// Makes records below `offset` invisible (Kafka's DeleteRecords). Returns the new log
    /// start offset. A replicated partition deletes them on every replica, through its
    /// leader, within `timeout`.
    pub async fn delete_records(&self, offset: u64, timeout: Duration) -> Result<u64, BrokerError> {
        if let Backend::Replicated(log, _) = &self.backend {
            return log
                .delete_records(offset, timeout)
                .await
                .map_err(|error| self.name_partition(error));
        }
        match self.call(PartitionRequest::DeleteRecords(offset)).await? {
            PartitionReply::LogStart(start) => Ok(start),
            other => unreachable!("delete-records is answered with LogStart, not {other:?}"),
        }
    }

    pub async fn reconfigure(&self, config: EffectiveTopicConfig) -> Result<(), BrokerError> {
        if let Backend::Replicated(log, settings) = &self.backend {
            settings
                .min_insync_replicas
                .store(config.min_insync_replicas, Ordering::Relaxed);
            return log.reconfigure(config.log);
        }
        self.call(PartitionRequest::Reconfigure(config))
            .await
            .map(|_| ())
    }

    /// Kafka's OffsetForLeaderEpoch for this partition.
    pub async fn end_offset_for_epoch(
        &self,
        epoch: i32,
    ) -> Result<Option<(i32, u64)>, BrokerError> {
        if let Backend::Replicated(log, _) = &self.backend {
            return Ok(log.end_offset_for_epoch(epoch));
        }
        match self
            .call(PartitionRequest::EndOffsetForEpoch(epoch))
            .await?
        {
            PartitionReply::EpochEnd(end) => Ok(end),
            other => unreachable!("the epoch query is answered with EpochEnd, not {other:?}"),
        }
    }

    /// Whole batches from `offset`, never past the high watermark.
    pub fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<ReadBatches, BrokerError> {
        let high_watermark = self.high_watermark();
        let read = self
            .reader
            .read_until(offset, high_watermark, max_bytes, min_one_batch)
            .inspect_err(|e| self.found_damage(e, offset))?;
        self.count_out(&read.bytes);
        Ok(read)
    }

    /// A read at `offset` failed with `error`: damage in a replicated partition's data is
    /// rebuilt from the other replicas (in the background; the read fails meanwhile).
    fn found_damage(&self, error: &StorageError, offset: u64) {
        if let (StorageError::Corrupt { .. }, Backend::Replicated(log, _)) = (error, &self.backend)
        {
            log.found_damage(offset);
        }
    }

    /// Counts batches handed to a reader. Batches read together are contiguous, so their
    /// records run from the first base offset to the last batch's end.
    fn count_out(&self, bytes: &[u8]) {
        let Ok(first) = BatchHeader::parse(bytes) else {
            return;
        };
        let mut at = 0;
        let mut end = first.next_offset();
        while let Ok((_, total)) = BatchHeader::peek_extent(&bytes[at..]) {
            if let Ok(header) = BatchHeader::parse(&bytes[at..]) {
                end = header.next_offset();
            }
            at += total;
            if at >= bytes.len() {
                break;
            }
        }
        self.stats
            .records_out
            .add(end.saturating_sub(first.base_offset) as u64);
        self.stats.bytes_out.add(bytes.len() as u64);
    }

    /// The first visible batch whose max timestamp is at or after `timestamp_ms`.
    pub fn find_by_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<TimestampHit>, BrokerError> {
        let high_watermark = self.high_watermark();
        Ok(self
            .reader
            .find_by_timestamp(timestamp_ms)?
            .filter(|hit| (hit.header.base_offset as u64) < high_watermark))
    }

    /// The first visible record whose timestamp is at or after `timestamp_ms`, and its
    /// timestamp. Falls back to its batch's first offset if the batch cannot be decoded, which
    /// is at or before the exact answer.
    pub fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<(u64, i64)>, BrokerError> {
        let Some(hit) = self.find_by_timestamp(timestamp_ms)? else {
            return Ok(None);
        };
        let log_start = self.log_start_offset();
        let found = match sluice_storage::record::decode_owned(&hit.batch, DECOMPRESSED_MAX_BYTES) {
            Ok((_, records)) => records
                .iter()
                .find(|r| r.timestamp_ms >= timestamp_ms)
                .map(|r| (r.offset.max(0) as u64, r.timestamp_ms)),
            Err(error) => {
                tracing::warn!(topic = %self.topic, partition = self.index, %error, "cannot read a batch's records; answering with its first offset");
                Some((hit.header.base_offset as u64, hit.header.max_timestamp))
            }
        };
        // After DeleteRecords a batch's first records may lie below the log start.
        Ok(found.map(|(offset, ts)| (offset.max(log_start), ts)))
    }

    /// The visible record with the largest timestamp (Kafka's MAX_TIMESTAMP lookup).
    pub fn offset_of_max_timestamp(&self) -> Result<Option<(u64, i64)>, BrokerError> {
        let max = self
            .reader
            .segments()
            .iter()
            .filter_map(|segment| segment.max_timestamp_ms)
            .max();
        let Some(max) = max else { return Ok(None) };
        let Some(hit) = self.find_by_timestamp(max)? else {
            return Ok(None);
        };
        let exact = sluice_storage::record::decode_owned(&hit.batch, DECOMPRESSED_MAX_BYTES)
            .ok()
            .and_then(|(_, records)| records.into_iter().find(|r| r.timestamp_ms == max))
            .map(|r| (r.offset as u64, r.timestamp_ms));
        Ok(exact.or(Some((
            hit.header.last_offset() as u64,
            hit.header.max_timestamp,
        ))))
    }

    /// Up to `max_records` visible records from `offset`, decoded (for peeks and tools).
    pub fn read_records(
        &self,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<sluice_storage::record::Record>, BrokerError> {
        let mut records = Vec::new();
        let mut next = offset;
        while records.len() < max_records && next < self.high_watermark() {
            let read = self.read(next, max_bytes, true)?;
            if read.bytes.is_empty() {
                break;
            }
            for item in sluice_storage::batch::Batches::new(&read.bytes) {
                let (header, raw) = item.map_err(|(position, source)| {
                    BrokerError::Storage(StorageError::InvalidBatch { position, source })
                })?;
                next = header.next_offset() as u64;
                if header.is_control() {
                    continue;
                }
                let (_, decoded) =
                    sluice_storage::record::decode_owned(raw, DECOMPRESSED_MAX_BYTES).map_err(
                        |error| {
                            BrokerError::Storage(StorageError::Corrupt {
                                path: self.reader.dir().to_owned(),
                                position: 0,
                                reason: format!("batch at offset {}: {error}", header.base_offset),
                            })
                        },
                    )?;
                records.extend(decoded.into_iter().filter(|r| r.offset >= offset as i64));
                if records.len() >= max_records {
                    records.truncate(max_records);
                    break;
                }
            }
        }
        Ok(records)
    }

    /// Finishes pending work, saves producer state and closes the log.
    pub async fn close(&self) -> Result<(), BrokerError> {
        let owner = match &self.backend {
            Backend::Owner(owner) => owner,
            Backend::Replicated(log, _) => {
                log.close().await;
                return Ok(());
            }
        };
        match owner.close().await {
            Ok(()) | Err(StorageError::OwnerGone) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
