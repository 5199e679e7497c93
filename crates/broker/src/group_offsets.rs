//! Committed offsets in a cluster: Kafka's `__consumer_offsets` design on replicated
//! partitions.
//!
//! A group's coordinator is the leader of partition [`partition_for`]`(group)` of the internal
//! topic [`OFFSETS_TOPIC`] (Java's `String.hashCode` modulo the partition count, as Kafka
//! computes it). The topic is replicated as any other (a Raft group per partition), so the
//! coordinators move with partition leadership: when a coordinator's node dies, another
//! replica of its partition is elected and becomes the coordinator.
//!
//! A commit is one record batch written to that partition with acks=all: it is answered once
//! a majority of the partition's replicas has it. Every replica folds the committed records
//! into an [`OffsetTable`] as its high watermark moves (a [`Tail`] task per replica), so the
//! table is a function of the committed log alone, the same on every replica. A new leader
//! serves a group only once its table holds everything before its own term's first entry —
//! everything its predecessors acknowledged — so committed offsets never go backwards across
//! a failover.
//!
//! Records are Kafka's own: the key is version 1 (`group`, `topic`, `partition`), the value
//! version 3 (`offset`, `leader_epoch`, `metadata`, `commit_timestamp`); a null value deletes
//! the key. Other key versions (Kafka's group metadata) are skipped.
//!
//! Group membership is not written: a new coordinator starts with none, and members rejoin
//! (their next request is answered UNKNOWN_MEMBER_ID), as after a Kafka coordinator moves
//! before the group's metadata was loaded.
//!
//! Alone (no cluster), the broker keeps committed offsets in its redb store instead
//! ([`crate::offsets`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use sluice_storage::batch::Batches;
use sluice_storage::record::{self, BatchBuilder};
use tokio::sync::watch;
use uuid::Uuid;

use crate::command::{CommittedOffset, OffsetEntry};
use crate::partition::Partition;

/// The internal topic that holds committed offsets (Kafka's name).
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Kafka's `OffsetCommitKey` version.
const KEY_VERSION: i16 = 1;
/// Kafka's `OffsetCommitValue` version.
const VALUE_VERSION: i16 = 3;
/// How much of the log a tail reads at once.
const READ_BYTES: usize = 1 << 20;
/// The largest batch a tail decompresses.
const DECOMPRESSED_MAX_BYTES: usize = 64 << 20;
/// How long a tail waits before it reads again after a failed read.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The partition of [`OFFSETS_TOPIC`] that holds `group`'s offsets: the absolute value of
/// Java's `String.hashCode` of the id (0 for `i32::MIN`), modulo the partition count (Kafka's
/// `Utils.abs(groupId.hashCode) % groupMetadataTopicPartitionCount`).
pub fn partition_for(group: &str, partitions: u32) -> u32 {
    let hash = group.encode_utf16().fold(0i32, |h, unit| {
        h.wrapping_mul(31).wrapping_add(i32::from(unit))
    });
    // Kafka's Utils.abs: Math.abs, except that i32::MIN (whose absolute value does not fit)
    // is 0.
    let absolute = if hash == i32::MIN {
        0
    } else {
        hash.unsigned_abs()
    };
    absolute % partitions.max(1)
}

/// The batch that commits `entries` for `group`: one record per partition, stamped `now_ms`.
pub fn commit_batch(group: &str, entries: &[OffsetEntry], now_ms: i64) -> Bytes {
    let mut builder = BatchBuilder::new(now_ms);
    for entry in entries {
        let key = encode_key(group, &entry.topic, entry.partition);
        let value = encode_value(&entry.committed);
        builder.push(now_ms, Some(&key), Some(&value), &[]);
    }
    builder.finish()
}

/// The batch that deletes `group`'s offsets of `keys` (topic, partition): tombstones.
pub fn delete_batch(group: &str, keys: &[(String, u32)], now_ms: i64) -> Bytes {
    let mut builder = BatchBuilder::new(now_ms);
    for (topic, partition) in keys {
        let key = encode_key(group, topic, *partition);
        builder.push(now_ms, Some(&key), None, &[]);
    }
    builder.finish()
}

fn put_string(out: &mut BytesMut, text: &str) {
    // Group, topic and metadata lengths are bounded far below i16::MAX by the protocol
    // (names) and by offset.metadata.max.bytes (metadata); longer ones are cut.
    let bytes = &text.as_bytes()[..text.len().min(i16::MAX as usize)];
    out.put_i16(bytes.len() as i16);
    out.put_slice(bytes);
}

fn encode_key(group: &str, topic: &str, partition: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(10 + group.len() + topic.len());
    out.put_i16(KEY_VERSION);
    put_string(&mut out, group);
    put_string(&mut out, topic);
    out.put_i32(partition as i32);
    out.freeze()
}

fn encode_value(committed: &CommittedOffset) -> Bytes {
    let mut out = BytesMut::with_capacity(24 + committed.metadata.len());
    out.put_i16(VALUE_VERSION);
    out.put_i64(committed.offset);
    out.put_i32(committed.leader_epoch);
    put_string(&mut out, &committed.metadata);
    out.put_i64(committed.commit_timestamp_ms);
    out.freeze()
}

fn get_string(input: &mut &[u8]) -> Option<String> {
    if input.remaining() < 2 {
        return None;
    }
    let length = usize::try_from(input.get_i16()).ok()?;
    if input.remaining() < length {
        return None;
    }
    let text = std::str::from_utf8(&input[..length]).ok()?.to_owned();
    input.advance(length);
    Some(text)
}

/// (group, topic, partition) of an offset key; `None` for other keys (Kafka's group metadata)
/// and for damaged ones.
fn decode_key(mut input: &[u8]) -> Option<(String, String, u32)> {
    if input.remaining() < 2 {
        return None;
    }
    match input.get_i16() {
        0 | 1 => {}
        _ => return None,
    }
    let group = get_string(&mut input)?;
    let topic = get_string(&mut input)?;
    if input.remaining() < 4 {
        return None;
    }
    let partition = u32::try_from(input.get_i32()).ok()?;
    Some((group, topic, partition))
}

/// An offset value of versions 1 to 3 (what Kafka has written since 0.10); `None` if damaged.
fn decode_value(mut input: &[u8]) -> Option<CommittedOffset> {
    if input.remaining() < 2 {
        return None;
    }
    let version = input.get_i16();
    if !(1..=3).contains(&version) || input.remaining() < 8 {
        return None;
    }
    let offset = input.get_i64();
    let leader_epoch = if version >= 3 {
        if input.remaining() < 4 {
            return None;
        }
        input.get_i32()
    } else {
        -1
    };
    let metadata = get_string(&mut input)?;
    if input.remaining() < 8 {
        return None;
    }
    let commit_timestamp_ms = input.get_i64();
    Some(CommittedOffset {
        offset,
        leader_epoch,
        metadata,
        commit_timestamp_ms,
    })
}

/// Committed offsets as one partition of [`OFFSETS_TOPIC`] says, folded from its log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetTable {
    groups: BTreeMap<String, BTreeMap<(String, u32), CommittedOffset>>,
    /// The offset after the last batch folded in.
    next_offset: u64,
}

impl OffsetTable {
    /// Folds in the batches of `bytes` (whole batches, as the log holds them) that start at
    /// or after [`Self::next_offset`]. Control batches only move the position; records that
    /// do not decode are skipped. Returns the records skipped.
    pub fn apply(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let mut skipped = 0;
        for item in Batches::new(bytes) {
            let (header, raw) =
                item.map_err(|(position, error)| format!("batch at byte {position}: {error}"))?;
            let next = header.next_offset() as u64;
            if next <= self.next_offset {
                continue;
            }
            if !header.is_control() {
                let (_, records) = record::decode_owned(raw, DECOMPRESSED_MAX_BYTES)
                    .map_err(|e| format!("batch at offset {}: {e}", header.base_offset))?;
                for found in records {
                    if !self.apply_record(found.key.as_deref(), found.value.as_deref()) {
                        skipped += 1;
                    }
                }
            }
            self.next_offset = next;
        }
        Ok(skipped)
    }

    /// One record; `false` if it is not an offset record.
    fn apply_record(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> bool {
        let Some((group, topic, partition)) = key.and_then(decode_key) else {
            return false;
        };
        match value {
            None => {
                if let Some(offsets) = self.groups.get_mut(&group) {
                    offsets.remove(&(topic, partition));
                    if offsets.is_empty() {
                        self.groups.remove(&group);
                    }
                }
                true
            }
            Some(value) => match decode_value(value) {
                Some(committed) => {
                    self.groups
                        .entry(group)
                        .or_default()
                        .insert((topic, partition), committed);
                    true
                }
                None => false,
            },
        }
    }

    /// The offset after the last batch folded in.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn get(&self, group: &str, topic: &str, partition: u32) -> Option<CommittedOffset> {
        self.groups
            .get(group)?
            .get(&(topic.to_owned(), partition))
            .cloned()
    }

    /// Every committed offset of `group`.
    pub fn group(&self, group: &str) -> Vec<OffsetEntry> {
        self.groups
            .get(group)
            .map(|offsets| {
                offsets
                    .iter()
                    .map(|((topic, partition), committed)| OffsetEntry {
                        topic: topic.clone(),
                        partition: *partition,
                        committed: committed.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Groups with committed offsets.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    /// Every (group, partition) holding offsets of `topic`.
    pub fn of_topic(&self, topic: &str) -> Vec<(String, (String, u32))> {
        self.groups
            .iter()
            .flat_map(|(group, offsets)| {
                offsets
                    .keys()
                    .filter(|(t, _)| t == topic)
                    .map(move |key| (group.clone(), key.clone()))
            })
            .collect()
    }
}

/// One local replica of an [`OFFSETS_TOPIC`] partition and the table its tail task keeps.
#[derive(Debug)]
pub struct Tail {
    partition: Arc<Partition>,
    table: RwLock<OffsetTable>,
    /// [`OffsetTable::next_offset`], for waiters.
    folded: watch::Sender<u64>,
    /// The high watermark when the tail started: a single copy (whose epoch never changes)
    /// coordinates only once everything it had when it opened is folded in.
    opened_at: u64,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Tail {
    fn start(partition: Arc<Partition>) -> Arc<Self> {
        let tail = Arc::new(Self {
            partition: Arc::clone(&partition),
            table: RwLock::new(OffsetTable::default()),
            folded: watch::Sender::new(0),
            opened_at: partition.high_watermark(),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(Arc::clone(&tail).run());
        *tail.task.lock() = Some(task.abort_handle());
        tail
    }

    fn stop(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }

    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    pub fn table(&self) -> parking_lot::RwLockReadGuard<'_, OffsetTable> {
        self.table.read()
    }

    /// Folds the log in up to the high watermark, whenever it moves.
    async fn run(self: Arc<Self>) {
        let mut high_watermark = self.partition.watch_high_watermark();
        loop {
            let target = *high_watermark.borrow_and_update();
            if let Err(error) = self.catch_up(target) {
                tracing::warn!(
                    topic = OFFSETS_TOPIC,
                    partition = self.partition.index(),
                    %error,
                    "cannot read committed offsets; trying again"
                );
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
            if high_watermark.changed().await.is_err() {
                return;
            }
        }
    }

    fn catch_up(&self, target: u64) -> Result<(), String> {
        loop {
            let from = self.table.read().next_offset();
            if from >= target {
                return Ok(());
            }
            let from = from.max(self.partition.log_start_offset());
            let read = self
                .partition
                .read(from, READ_BYTES, true)
                .map_err(|e| e.to_string())?;
            if read.bytes.is_empty() {
                return Ok(());
            }
            let (skipped, next) = {
                let mut table = self.table.write();
                let skipped = table.apply(&read.bytes)?;
                self.folded.send_replace(table.next_offset());
                (skipped, table.next_offset())
            };
            if skipped > 0 {
                tracing::warn!(
                    topic = OFFSETS_TOPIC,
                    partition = self.partition.index(),
                    from,
                    skipped,
                    "skipped records that are not committed offsets"
                );
            }
            if next <= from {
                return Err(format!("the read at offset {from} did not move past it"));
            }
        }
    }

    /// Waits until the table holds everything before `offset`, at most `timeout`.
    pub async fn folded(&self, offset: u64, timeout: Duration) -> bool {
        let mut folded = self.folded.subscribe();
        tokio::time::timeout(timeout, folded.wait_for(|at| *at >= offset))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }

    /// Whether this replica coordinates now: it leads its partition, ready, and its table
    /// holds everything written before its term began (a single copy: everything it had when
    /// it opened).
    pub fn coordinating(&self) -> Coordinating {
        if self.partition.serving().is_err() {
            return Coordinating::No;
        }
        let epoch = self.partition.leader_epoch();
        let loaded_from = self.partition.epoch_start(epoch).max(self.opened_at);
        if self.table.read().next_offset() >= loaded_from {
            Coordinating::Yes
        } else {
            Coordinating::Loading
        }
    }
}

/// Whether a node coordinates a group now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coordinating {
    Yes,
    /// It leads, but has not read its partition up to its term's start yet.
    Loading,
    No,
}

/// This node's tails, by partition of the [`OFFSETS_TOPIC`] incarnation they belong to.
#[derive(Debug, Default)]
pub struct Tails {
    tails: Mutex<HashMap<u32, (Uuid, Arc<Tail>)>>,
}

impl Tails {
    /// Starts folding `partition` (a local replica of the topic incarnation `topic_id`),
    /// replacing what folded an older replica of it.
    pub fn attach(&self, topic_id: Uuid, partition: Arc<Partition>) {
        let index = partition.index();
        let tail = Tail::start(partition);
        if let Some((_, old)) = self.tails.lock().insert(index, (topic_id, tail)) {
            old.stop();
        }
    }

    /// Stops folding partition `index` (its replica moved off this node).
    pub fn detach(&self, topic_id: Uuid, index: u32) {
        let mut tails = self.tails.lock();
        if tails.get(&index).is_some_and(|(id, _)| *id == topic_id)
            && let Some((_, tail)) = tails.remove(&index)
        {
            tail.stop();
        }
    }

    /// Stops folding the partitions of a deleted topic incarnation.
    pub fn detach_topic(&self, topic_id: Uuid) {
        self.tails.lock().retain(|_, (id, tail)| {
            let keep = *id != topic_id;
            if !keep {
                tail.stop();
            }
            keep
        });
    }

    pub fn get(&self, topic_id: Uuid, index: u32) -> Option<Arc<Tail>> {
        self.tails
            .lock()
            .get(&index)
            .filter(|(id, _)| *id == topic_id)
            .map(|(_, tail)| Arc::clone(tail))
    }

    /// Every tail of `topic_id`.
    pub fn all(&self, topic_id: Uuid) -> Vec<Arc<Tail>> {
        self.tails
            .lock()
            .values()
            .filter(|(id, _)| *id == topic_id)
            .map(|(_, tail)| Arc::clone(tail))
            .collect()
    }

    pub fn stop_all(&self) {
        for (_, (_, tail)) in self.tails.lock().drain() {
            tail.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(offset: i64) -> CommittedOffset {
        CommittedOffset {
            offset,
            leader_epoch: 4,
            metadata: "m".into(),
            commit_timestamp_ms: 1_700_000_000_000,
        }
    }

    /// Batches with offsets assigned, as the log would hold them.
    fn at(offset: i64, batch: Bytes) -> Bytes {
        let mut bytes = BytesMut::from(&batch[..]);
        bytes[..8].copy_from_slice(&offset.to_be_bytes());
        bytes.freeze()
    }

    #[test]
    fn partition_matches_kafka() {
        // From Java: "my-group".hashCode() is -1906497762, Math.abs of it % 50 is 12;
        // "workers".hashCode() is 1525161141; "groupé".hashCode() is -1237460406 (UTF-16).
        assert_eq!(partition_for("my-group", 50), 12);
        assert_eq!(partition_for("workers", 1 << 31), 1525161141);
        assert_eq!(partition_for("groupé", 1 << 31), 1237460406);
        assert_eq!(partition_for("", 10), 0);
        assert_eq!(partition_for("anything", 0), 0);
    }

    #[test]
    fn commits_and_tombstones_fold_in_order() {
        let entry = |topic: &str, partition, offset| OffsetEntry {
            topic: topic.into(),
            partition,
            committed: committed(offset),
        };
        let first = at(
            0,
            commit_batch("g", &[entry("t", 0, 10), entry("t", 1, 20)], 5),
        );
        let second = at(2, commit_batch("g", &[entry("t", 0, 15)], 6));
        let third = at(3, delete_batch("g", &[("t".into(), 1)], 7));
        let mut table = OffsetTable::default();
        let mut log = BytesMut::new();
        for batch in [&first, &second, &third] {
            log.extend_from_slice(batch);
        }
        assert_eq!(table.apply(&log), Ok(0));
        assert_eq!(table.next_offset(), 4);
        assert_eq!(table.get("g", "t", 0), Some(committed(15)));
        assert_eq!(table.get("g", "t", 1), None);
        // What was folded in already is skipped when read again.
        assert_eq!(table.apply(&second), Ok(0));
        assert_eq!(table.get("g", "t", 0), Some(committed(15)));
        assert_eq!(table.groups().collect::<Vec<_>>(), vec!["g"]);
        let gone = at(4, delete_batch("g", &[("t".into(), 0)], 8));
        table.apply(&gone).unwrap();
        assert_eq!(table.groups().count(), 0);
    }

    #[test]
    fn foreign_and_damaged_records_are_skipped() {
        let mut builder = BatchBuilder::new(0);
        builder.push(0, Some(&[0, 2, 0, 1, b'g']), Some(b"group metadata"), &[]);
        builder.push(0, Some(&[0, 1, 0, 9]), Some(b"short"), &[]);
        builder.push(0, None, Some(b"no key"), &[]);
        let key = encode_key("g", "t", 0);
        builder.push(0, Some(&key), Some(&[0, 3, 1]), &[]);
        let mut table = OffsetTable::default();
        assert_eq!(table.apply(&builder.finish()), Ok(4));
        assert_eq!(table.groups().count(), 0);
        assert!(table.apply(&[1, 2, 3]).is_err());
    }

    #[test]
    fn values_round_trip_across_versions() {
        let value = encode_value(&committed(42));
        assert_eq!(decode_value(&value), Some(committed(42)));
        // Version 1 (Kafka 0.10): offset, metadata, commit and expire timestamps.
        let mut v1 = BytesMut::new();
        v1.put_i16(1);
        v1.put_i64(7);
        put_string(&mut v1, "x");
        v1.put_i64(99);
        v1.put_i64(100);
        assert_eq!(
            decode_value(&v1),
            Some(CommittedOffset {
                offset: 7,
                leader_epoch: -1,
                metadata: "x".into(),
                commit_timestamp_ms: 99,
            })
        );
        assert_eq!(
            decode_key(&encode_key("g", "t", 3)),
            Some(("g".into(), "t".into(), 3))
        );
    }
}
