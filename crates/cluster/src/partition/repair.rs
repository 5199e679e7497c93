//! Rebuilding a replica's damaged data from the other replicas.
//!
//! Every replica of a partition holds the same batches at the same offsets, and Raft's log
//! matching makes that checkable: two replicas whose entry records agree on an entry's index
//! and term hold the same entry, so the same bytes. A replica that finds damage in its
//! segments (a batch failing its CRC or structure checks, a segment missing) therefore asks
//! another replica for the batches of the damaged offsets ([`method::READ_RANGE`], served by
//! [`RangeServer`] from the other replica's log, with that replica's entry records for them),
//! takes them only if every entry record equals its own (its entry index is a separate file,
//! checked record by record), checks every batch again and writes the segment anew
//! ([`sluice_storage::repair`]). Nothing of Raft's state changes: the entries are the ones the
//! replica had, now readable again.
//!
//! - When a replica opens and its log refuses to (a segment missing, damage where opening
//!   looks), [`rebuild_closed`] mends every damage [`sluice_storage::repair::find_damage`]
//!   finds before the replica starts; if no replica can provide the bytes, opening fails with
//!   the error naming the file and byte, as before.
//! - While it runs, a read that meets damage (openraft reading entries to replicate or apply,
//!   a Kafka fetch, a checksum) starts [`super::log_store::PartitionLog::repair_at`]: the
//!   damaged sealed segment is rebuilt and swapped in while the log stays open. Until then
//!   the damaged offsets are never served: every read checks every batch's CRC and fails,
//!   naming the file and byte, rather than hand out damaged data.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sluice_storage::repair::{Damage, Rebuild, Rebuilt};

use super::entries::{EntryIndex, EntryLoc};
use super::log_store::PartitionLog;
use super::{LogId, PartitionTypes};
use crate::network::{Answer, GroupHandler, from_json, method, to_json};
use crate::placement::NodeId;
use crate::transport::Transport;
use openraft::alias::SnapshotMetaOf;

/// The most one answer carries (well under the transport's frame limit).
pub const RANGE_BYTES_MAX: usize = 4 << 20;
/// How long one read of another replica may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Entry records as they travel: `(index, term, base offset, records, bytes)`.
type WireEntry = (u64, u64, u64, u32, u32);

/// Part of a replica's log: its entry records, and their batches laid end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    pub entries: Vec<(u64, EntryLoc)>,
    pub bytes: Bytes,
}

impl Range {
    fn encode(&self) -> Result<Bytes, String> {
        let entries: Vec<WireEntry> = self
            .entries
            .iter()
            .map(|(i, l)| (*i, l.term, l.base_offset, l.records, l.bytes))
            .collect();
        let head = to_json(&entries)?;
        let mut body = BytesMut::with_capacity(4 + head.len() + self.bytes.len());
        body.put_u32(head.len() as u32);
        body.put_slice(&head);
        body.put_slice(&self.bytes);
        Ok(body.freeze())
    }

    fn decode(mut body: Bytes) -> Result<Self, String> {
        let cut = || "range answer cut short".to_owned();
        if body.len() < 4 {
            return Err(cut());
        }
        let head_len = body.get_u32() as usize;
        if body.len() < head_len {
            return Err(cut());
        }
        let entries: Vec<WireEntry> = from_json(&body.split_to(head_len))?;
        let entries = entries
            .into_iter()
            .map(|(index, term, base_offset, records, bytes)| {
                (
                    index,
                    EntryLoc {
                        term,
                        base_offset,
                        records,
                        bytes,
                    },
                )
            })
            .collect();
        Ok(Self {
            entries,
            bytes: body,
        })
    }
}

/// Serves [`method::READ_RANGE`] and [`method::READ_ENTRIES`] from a replica's log, and has a
/// snapshot offer wait until this replica holds (or has copied) the log up to the snapshot's
/// entry (see [`super::seed`]); everything else goes to `inner`.
pub struct RangeServer {
    inner: Arc<dyn GroupHandler>,
    log: PartitionLog,
}

impl std::fmt::Debug for RangeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeServer")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl RangeServer {
    pub fn new(inner: Arc<dyn GroupHandler>, log: PartitionLog) -> Self {
        Self { inner, log }
    }
}

impl GroupHandler for RangeServer {
    fn handle(&self, from: NodeId, method: u8, body: Bytes) -> Answer {
        let log = self.log.clone();
        match method {
            method::READ_RANGE => Box::pin(async move {
                let (start, end): (u64, u64) = from_json(&body)?;
                let read = move || log.read_range(start, end, RANGE_BYTES_MAX);
                let range = tokio::task::spawn_blocking(read)
                    .await
                    .map_err(|e| format!("reading offsets {start} to {end}: {e}"))?
                    .map_err(|e| format!("reading offsets {start} to {end}: {e}"))?;
                range.encode()
            }),
            method::READ_ENTRIES => Box::pin(async move {
                let (start, end): (u64, u64) = from_json(&body)?;
                let read = move || log.read_entries_from(start, end, RANGE_BYTES_MAX);
                let range = tokio::task::spawn_blocking(read)
                    .await
                    .map_err(|e| format!("reading entries {start} to {end}: {e}"))?
                    .map_err(|e| format!("reading entries {start} to {end}: {e}"))?;
                range.encode()
            }),
            method::SNAPSHOT => {
                let inner = Arc::clone(&self.inner);
                Box::pin(async move {
                    let Some(target) = snapshot_target(&body)? else {
                        return inner.handle(from, method, body).await;
                    };
                    let _copied = log.admit_snapshot(from, target).await.map_err(|e| {
                        tracing::info!(from, error = %e, "a snapshot waits for the retained log");
                        format!("snapshot refused for now: {e}")
                    })?;
                    inner.handle(from, method, body).await
                })
            }
            _ => self.inner.handle(from, method, body),
        }
    }
}

/// The last entry of the snapshot a snapshot request (as the network sends it) offers.
fn snapshot_target(body: &[u8]) -> Result<Option<LogId>, String> {
    let cut = || "snapshot request cut short".to_owned();
    let head_len = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(cut)?;
    let head = body.get(4..4 + head_len).ok_or_else(cut)?;
    let (_vote, meta): (serde_json::Value, SnapshotMetaOf<PartitionTypes>) = from_json(head)?;
    Ok(meta.last_log_id)
}

/// The other replicas of a group, asked over the transport.
#[derive(Clone)]
pub struct Copies {
    pub transport: Transport,
    pub group: u32,
}

impl std::fmt::Debug for Copies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copies")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Copies {
    /// `peer`'s entries from index `from` (its first readable one when 0) to `to`, as many as
    /// one answer carries.
    pub async fn read_entries(&self, peer: NodeId, from: u64, to: u64) -> Result<Range, String> {
        let body = to_json(&(from, to))?;
        let answer = self
            .transport
            .call(peer, self.group, method::READ_ENTRIES, body, READ_TIMEOUT)
            .await
            .map_err(|e| format!("node {peer} could not be read: {e}"))?;
        Range::decode(answer)
    }

    async fn read(&self, peer: NodeId, from: u64, to: u64) -> Result<Range, String> {
        let body = to_json(&(from, to))?;
        let answer = self
            .transport
            .call(peer, self.group, method::READ_RANGE, body, READ_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let answer: Result<Bytes, String> = Ok(answer);
        Range::decode(answer?)
    }

    /// Writes `damage`'s offsets again from the first of `peers` whose entries there are this
    /// replica's own (`local` gives this replica's record of an entry). Returns the rebuilt
    /// segment, not yet in place, and the node it came from.
    pub async fn rebuild(
        &self,
        dir: &Path,
        damage: &Damage,
        peers: &[NodeId],
        local: &(dyn Fn(u64) -> io::Result<Option<EntryLoc>> + Sync),
    ) -> io::Result<(Rebuilt, NodeId)> {
        let mut why = format!("no other replica to rebuild {damage} from");
        'peers: for &peer in peers {
            let mut rebuild = Rebuild::create(dir, damage.from, damage.to).map_err(storage)?;
            while !rebuild.is_complete() {
                let range = match self.read(peer, rebuild.next_offset(), damage.to).await {
                    Ok(range) => range,
                    Err(e) => {
                        why = format!("node {peer} could not be read: {e}");
                        continue 'peers;
                    }
                };
                if let Err(e) = check_range(&range, local) {
                    why = format!("node {peer}: {e}");
                    continue 'peers;
                }
                if let Err(e) = rebuild.append(&range.bytes) {
                    why = format!("node {peer} sent batches that do not fit: {e}");
                    continue 'peers;
                }
            }
            return Ok((rebuild.finish().map_err(storage)?, peer));
        }
        Err(io::Error::other(format!(
            "cannot rebuild {}: {why}",
            damage.path.display()
        )))
    }
}

/// Whether `range` holds this replica's own entries, whole: each record equals the local
/// one, and the bytes are exactly theirs.
fn check_range(
    range: &Range,
    local: &(dyn Fn(u64) -> io::Result<Option<EntryLoc>> + Sync),
) -> Result<(), String> {
    if range.entries.is_empty() {
        return Err("it holds none of the offsets".into());
    }
    let mut bytes = 0usize;
    let mut previous: Option<(u64, EntryLoc)> = None;
    for (index, loc) in &range.entries {
        match local(*index) {
            Ok(Some(own)) if own == *loc => {}
            Ok(own) => {
                return Err(format!(
                    "its entry {index} ({loc:?}) is not this replica's ({own:?}): another history"
                ));
            }
            Err(e) => return Err(format!("this replica's entry {index}: {e}")),
        }
        if let Some((before, before_loc)) = previous
            && (before + 1 != *index || before_loc.end_offset() != loc.base_offset)
        {
            return Err(format!(
                "entries {before} and {index} do not follow each other"
            ));
        }
        previous = Some((*index, *loc));
        bytes += loc.bytes as usize;
    }
    let first = range.entries[0].1;
    let starts = sluice_storage::BatchHeader::parse(&range.bytes)
        .map(|h| h.base_offset == first.base_offset as i64)
        .unwrap_or(false);
    if bytes != range.bytes.len() || !starts {
        return Err(format!(
            "{} bytes sent for entries of {bytes} bytes from offset {}",
            range.bytes.len(),
            first.base_offset
        ));
    }
    Ok(())
}

fn storage(e: sluice_storage::StorageError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Logs damage found (file, byte, why, the offsets to rebuild) and what it means now.
pub(crate) fn report_damage(damage: &Damage, meaning: &str) {
    tracing::error!(
        file = %damage.path.display(),
        byte = damage.position,
        reason = %damage.reason,
        from = damage.from,
        to = damage.to,
        "{meaning}",
    );
}

/// Logs that `damage` in the log in `dir` was rebuilt from node `from`.
pub(crate) fn report_rebuilt(dir: &Path, damage: &Damage, from: NodeId) {
    tracing::info!(
        dir = %dir.display(),
        from = damage.from,
        to = damage.to,
        node = from,
        "rebuilt damaged offsets from another replica",
    );
}

/// Mends every damage [`sluice_storage::repair::find_damage`] finds in the closed log in
/// `dir` from `peers`, checking what they send against the log's own entry index. Returns how
/// many damaged parts were rebuilt; fails (naming the damage) when one cannot be.
pub async fn rebuild_closed(dir: &Path, copies: &Copies, peers: &[NodeId]) -> io::Result<usize> {
    let found = {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || sluice_storage::repair::find_damage(&dir))
            .await
            .map_err(io::Error::other)?
            .map_err(storage)?
    };
    if found.is_empty() {
        return Ok(0);
    }
    let entries = {
        let path = dir.join(super::log_store::ENTRIES_FILE);
        tokio::task::spawn_blocking(move || EntryIndex::open(&path, 0))
            .await
            .map_err(io::Error::other)??
    };
    let entries = parking_lot::Mutex::new(entries);
    let local = |index: u64| entries.lock().get(index);
    for damage in &found {
        report_damage(
            damage,
            "damaged partition data: this replica does not open until the damaged offsets are rebuilt from another replica",
        );
        let (rebuilt, from) = copies.rebuild(dir, damage, peers, &local).await?;
        tokio::task::spawn_blocking(move || sluice_storage::repair::install(rebuilt))
            .await
            .map_err(io::Error::other)?
            .map_err(storage)?;
        report_rebuilt(dir, damage, from);
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(term: u64, base_offset: u64, records: u32, bytes: u32) -> EntryLoc {
        EntryLoc {
            term,
            base_offset,
            records,
            bytes,
        }
    }

    #[test]
    fn a_range_travels_whole() {
        let range = Range {
            entries: vec![(7, loc(2, 100, 3, 120)), (8, loc(3, 103, 1, 70))],
            bytes: Bytes::from_static(b"batches"),
        };
        assert_eq!(Range::decode(range.encode().unwrap()).unwrap(), range);
        assert!(Range::decode(Bytes::from_static(b"\0\0\0\x09[")).is_err());
    }

    #[test]
    fn entries_of_another_history_are_refused() {
        let own = [loc(2, 100, 3, 120), loc(3, 103, 1, 70)];
        let local = |index: u64| Ok(own.get((index - 7) as usize).copied());
        // Another term at the same index: another history, whatever the bytes.
        let other = Range {
            entries: vec![(7, loc(4, 100, 3, 120))],
            bytes: Bytes::from(vec![0; 120]),
        };
        assert!(
            check_range(&other, &local)
                .unwrap_err()
                .contains("another history")
        );
        let empty = Range::default();
        assert!(check_range(&empty, &local).is_err());
        // The right records, but bytes that are not theirs.
        let short = Range {
            entries: vec![(7, own[0])],
            bytes: Bytes::from(vec![0; 10]),
        };
        assert!(check_range(&short, &local).is_err());
    }
}
