//! Replicated partitions: one Raft group per partition, whose Raft log *is* the partition's
//! segmented log (the storage engine's [`sluice_storage::Log`]).
//!
//! - A Raft entry is one or more Kafka record batches, stored exactly as the leader appended
//!   them: followers write the same bytes at the same offsets. The entry's Raft term is the
//!   Kafka leader epoch stamped in each of its batches.
//! - Raft's own entries (the blank entry a new leader writes first, membership changes) are
//!   stored as Kafka *control* batches of one record whose key is `[version 0][type]` with a
//!   Sluice-private type ([`RAFT_BLANK`], [`RAFT_MEMBERSHIP`]). They take an offset as any
//!   batch does; Kafka clients skip control batches whose type they do not know.
//! - Retention and DeleteRecords are entries too: a *trim* control batch ([`RAFT_TRIM`])
//!   that the leader proposes moves the log start offset on every replica when it is applied,
//!   so every replica deletes the same records.
//! - Kafka offsets advance by records and Raft indexes by entries, so an entry index
//!   ([`entries`]) maps each Raft index to its batches' offsets.
//!
//! [`log_store`] is openraft's log storage over those files; [`machine`] the state derived from
//! the log (what apply computes on every replica alike); [`replica`] one replica's group on a
//! node, with the leader's write path and the high watermark. Entries travel between replicas
//! as raw bytes (`wire`).

pub mod entries;
pub mod log_store;
pub mod machine;
pub mod quiet;
pub mod repair;
pub mod replica;
pub mod seed;
mod wire;

use std::fmt;
use std::io;

use bytes::Bytes;
use openraft::Membership;
use openraft::alias::{EntryOf, LogIdOf};
use openraft::{BasicNode, EntryPayload};
use serde::{Deserialize, Serialize};
use sluice_storage::batch::BatchHeader;
use sluice_storage::record::{self, BatchBuilder};

use crate::placement::NodeId;

/// The control-record type of a Raft blank entry.
pub const RAFT_BLANK: i16 = 100;
/// The control-record type of a Raft membership entry; its value is the membership as JSON.
pub const RAFT_MEMBERSHIP: i16 = 101;
/// The control-record type of a trim entry (retention, DeleteRecords): its value is the new
/// log start offset, u64 big-endian. It travels and is applied as a normal entry.
pub const RAFT_TRIM: i16 = 102;

/// Record batches laid end to end: a partition entry's payload. Batches travel and are stored
/// as these bytes; they are never re-encoded.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Batches(pub Bytes);

impl fmt::Debug for Batches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Batches({} bytes)", self.0.len())
    }
}

impl fmt::Display for Batches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes of batches", self.0.len())
    }
}

impl Serialize for Batches {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Batches {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(deserializer)?;
        Ok(Self(Bytes::from(bytes)))
    }
}

/// Where a committed entry's records landed: apply's answer to the writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
}

openraft::declare_raft_types!(
    /// A partition group's Raft types: one leader per term (`leader_id_std`), so the term is
    /// the Kafka leader epoch.
    pub PartitionTypes:
        D = Batches,
        R = Appended,
        NodeId = NodeId,
        Node = BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
);

pub type Entry = EntryOf<PartitionTypes>;
pub type LogId = LogIdOf<PartitionTypes>;

/// The bytes an entry is stored as. Raft's own entries become control batches whose bytes
/// depend on nothing but the entry (timestamp 0), so every replica stores the same bytes.
pub fn encode_entry(entry: &Entry) -> io::Result<Bytes> {
    match &entry.payload {
        EntryPayload::Normal(batches) => Ok(batches.0.clone()),
        EntryPayload::Blank => Ok(control_batch(RAFT_BLANK, None)),
        EntryPayload::Membership(membership) => {
            let json = serde_json::to_vec(membership).map_err(io::Error::other)?;
            Ok(control_batch(RAFT_MEMBERSHIP, Some(&json)))
        }
    }
}

fn control_batch(kind: i16, value: Option<&[u8]>) -> Bytes {
    let mut key = [0u8; 4];
    key[2..].copy_from_slice(&kind.to_be_bytes());
    let mut builder = BatchBuilder::new(0).control();
    builder.push(0, Some(&key), value, &[]);
    builder.finish()
}

/// A trim entry's batch: records below `log_start` are to be deleted on every replica.
pub fn trim_batch(log_start: u64) -> Bytes {
    control_batch(RAFT_TRIM, Some(&log_start.to_be_bytes()))
}

/// The log start offset a trim batch asks for, if `bytes` (one batch) is one.
pub fn trim_offset(header: &BatchHeader, bytes: &[u8]) -> Option<u64> {
    if !header.is_control() || header.record_count != 1 || header.producer_id >= 0 {
        return None;
    }
    let records = record::decode(&bytes[..header.total_bytes().min(bytes.len())]).ok()?;
    let record = records.first()?;
    let key = record.key?;
    if key.len() != 4 || i16::from_be_bytes([key[2], key[3]]) != RAFT_TRIM {
        return None;
    }
    let value: [u8; 8] = record.value?.try_into().ok()?;
    Some(u64::from_be_bytes(value))
}

/// The entry stored as `bytes` (as read back from the log) under `log_id`.
pub fn decode_entry(log_id: LogId, bytes: Bytes) -> io::Result<Entry> {
    let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidData, reason);
    let header =
        BatchHeader::parse(&bytes).map_err(|e| invalid(format!("entry {}: {e}", log_id.index)))?;
    let payload = match raft_control_kind(&header, &bytes) {
        Some((RAFT_BLANK, _)) => EntryPayload::Blank,
        Some((RAFT_MEMBERSHIP, value)) => {
            let membership: Membership<NodeId, BasicNode> = serde_json::from_slice(&value)
                .map_err(|e| invalid(format!("entry {}: membership: {e}", log_id.index)))?;
            EntryPayload::Membership(membership)
        }
        _ => EntryPayload::Normal(Batches(bytes)),
    };
    Ok(Entry { log_id, payload })
}

/// The Raft control type and value of a batch, if it is one of Raft's own entries.
fn raft_control_kind(header: &BatchHeader, bytes: &[u8]) -> Option<(i16, Vec<u8>)> {
    if !header.is_control() || header.record_count != 1 {
        return None;
    }
    let records = record::decode(&bytes[..header.total_bytes().min(bytes.len())]).ok()?;
    let key = records.first()?.key?;
    if key.len() != 4 {
        return None;
    }
    let kind = i16::from_be_bytes([key[2], key[3]]);
    matches!(kind, RAFT_BLANK | RAFT_MEMBERSHIP)
        .then(|| (kind, records[0].value.unwrap_or_default().to_vec()))
}
