//! openraft's log storage for a partition group over the partition's own segmented log.
//!
//! # Files (in the partition's directory, beside the segments)
//! - the segments, indexes, `log-start-offset` and `leader-epoch-checkpoint` of
//!   [`sluice_storage::Log`]: each entry's batches, stamped with the entry's term as their
//!   leader epoch;
//! - `raft-entries`: the entry index ([`super::entries`]);
//! - `raft-vote`: the vote, JSON, replaced atomically;
//! - `raft-purged`: the last purged log id, JSON, replaced atomically;
//! - `raft-seed/` and `raft-seed-installing`, while a copy of another replica's retained log is
//!   made and put in place ([`super::seed`]).
//!
//! # Rules
//! - An append writes each entry's batches to the segments, then its record to the entry
//!   index; both are readable at once. Under `fsync = always` the append is reported flushed
//!   (openraft's `IOFlushed`) only after one fsync round has covered both; one flusher task
//!   syncs for every append queued meanwhile (group commit) on the blocking pool. Under the
//!   other policies it is reported at once, as Kafka acknowledges from the page cache.
//! - The vote is durable before `save_vote` returns.
//! - Truncation cuts the segments at the first removed entry's base offset (which rolls the
//!   leader-epoch checkpoint back with them) and then the entry index, both synced.
//! - Trimming ([`PartitionLog::trim_to`], once a committed trim entry moved the machine's log
//!   start and a snapshot of the machine covers it) moves the log start offset: readers no
//!   longer see the records below it. The replica then has openraft purge up to the last
//!   entry starting below it; openraft does so once no replication stream is reading those
//!   entries, and the purge moves the purge mark and deletes the segments holding nothing but
//!   purged entries below the log start. So openraft never reads a deleted entry, and after a
//!   restart it neither reads nor re-applies one. Time and size retention are never applied
//!   by the log itself (replicas would delete by their own clocks); the leader proposes trims
//!   from them ([`PartitionLog::retention_point`]).
//! - A purge past the log's last entry (a snapshot installed in place of entries this replica
//!   lacks) puts the copy of the leader's retained log made for it in the log's place
//!   ([`super::seed`]).
//! - Opening reconciles the two files after a crash: index records whose batches did not
//!   survive are dropped, and batches the index does not describe (written, never reported
//!   durable) are cut off the segments.
//! - Every entry read back is checked: its first batch must start at the offset the index
//!   gives and carry the entry's term, or the read fails naming the file and offset.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use openraft::alias::VoteOf;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader};
use parking_lot::Mutex;
use sluice_storage::batch::BatchHeader;
use sluice_storage::{FsyncPolicy, Log, LogConfig, LogReader};
use tokio::sync::mpsc;

use super::entries::{EntryIndex, EntryLoc};
use super::repair::{Copies, Range, report_damage, report_rebuilt};
use super::seed::{self, Seed};
use super::{Entry, LogId, PartitionTypes, decode_entry, encode_entry};
use crate::files::{context, replace_atomically};
use crate::placement::NodeId;

pub(crate) const ENTRIES_FILE: &str = "raft-entries";
const VOTE_FILE: &str = "raft-vote";
pub(crate) const PURGED_FILE: &str = "raft-purged";
/// Appends waiting for their fsync; a full queue makes the next append wait.
const FLUSH_QUEUE_MAX: usize = 1024;

type Vote = VoteOf<PartitionTypes>;

/// A partition's Raft log. Cheap to clone; every clone is the same log.
#[derive(Clone)]
pub struct PartitionLog {
    shared: Arc<Shared>,
    flushes: Option<mpsc::Sender<IOFlushed<PartitionTypes>>>,
}

impl Debug for PartitionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLog")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

struct Shared {
    dir: PathBuf,
    reader: LogReader,
    state: Mutex<State>,
    /// How damaged segments are rebuilt from the other replicas, once the group runs.
    repair: std::sync::OnceLock<Repair>,
    /// The log's settings, for a seed (see [`super::seed`]).
    config: LogConfig,
    /// A copy of another replica's retained log being made, to take this log's place when
    /// a snapshot is installed (see [`super::seed`]). Locked after `state` when both are.
    seed: Mutex<Option<Seed>>,
    /// One snapshot offer is served at a time.
    seeding: tokio::sync::Mutex<()>,
}

/// What [`PartitionLog::repair_at`] needs: the other replicas, and one repair at a time.
struct Repair {
    copies: Copies,
    peers: Box<dyn Fn() -> Vec<NodeId> + Send + Sync>,
    busy: tokio::sync::Mutex<()>,
    /// A repair started by a reader is under way (readers that meet the damage meanwhile
    /// start none).
    pending: std::sync::atomic::AtomicBool,
}

struct State {
    log: Log,
    /// The topic's retention (`retention.ms`, `retention.bytes`), which the leader turns into
    /// trim entries; the log itself is opened without any.
    retention: (Option<i64>, Option<u64>),
    entries: EntryIndex,
    vote: Option<Vote>,
    purged: Option<LogId>,
    /// Who waits to hear where a proposal was appended (acks=1), by its payload's buffer.
    append_watches: HashMap<(usize, usize), AppendWatch>,
}

/// Told the base offset an entry's batches were appended at.
pub type OnAppend = Box<dyn FnOnce(u64) + Send>;

struct AppendWatch {
    /// Keeps the buffer, so its address names no other payload while watched.
    _payload: Bytes,
    on_append: OnAppend,
}

fn payload_key(payload: &Bytes) -> (usize, usize) {
    (payload.as_ptr() as usize, payload.len())
}

impl State {
    fn last_log_id(&self) -> io::Result<Option<LogId>> {
        Ok(match self.entries.last()? {
            Some((index, loc)) if self.purged.as_ref().is_none_or(|p| p.index < index) => {
                Some(LogId::new_term_index(loc.term, index))
            }
            _ => self.purged,
        })
    }

    /// The first index still readable: after the purge mark, and held by the entry index.
    fn first_readable(&self) -> u64 {
        let after_purge = self.purged.as_ref().map_or(0, |p| p.index + 1);
        after_purge.max(self.entries.first_index())
    }
}

fn storage(e: sluice_storage::StorageError) -> io::Error {
    match e {
        sluice_storage::StorageError::Corrupt { .. } => {
            io::Error::new(io::ErrorKind::InvalidData, e.to_string())
        }
        other => io::Error::other(other.to_string()),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl PartitionLog {
    /// Opens (or creates) the partition log in `dir` and starts its flusher. Blocking: call it
    /// from the blocking pool or before the runtime serves anything (it needs a runtime for
    /// the flusher).
    pub fn open(dir: &Path, mut config: LogConfig) -> io::Result<Self> {
        let fsync = config.fsync;
        let retention = (config.retention_ms.take(), config.retention_bytes.take());
        seed::finish_install(dir)?;
        let seed = match Seed::open(dir, &config) {
            Ok(seed) => seed,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "discarding a copy of another replica's log that does not open");
                seed::remove(dir)?;
                None
            }
        };
        let mut log = Log::open(dir, config.clone(), now_ms()).map_err(storage)?;
        let mut entries = EntryIndex::open(&dir.join(ENTRIES_FILE), log.log_end_offset())?;
        // Index records whose batches a crash took are dropped; batches past the last record
        // were never reported durable and are cut off.
        while let Some((_, last)) = entries.last()? {
            if last.end_offset() <= log.log_end_offset() {
                break;
            }
            entries.pop()?;
        }
        let described_end = entries.end_offset()?;
        if log.log_end_offset() > described_end {
            tracing::warn!(
                dir = %dir.display(),
                from = described_end,
                to = log.log_end_offset(),
                "cutting off batches no Raft entry describes (written before a crash, never acknowledged)",
            );
            log.truncate_to(described_end, now_ms()).map_err(storage)?;
        }
        let vote = read_json(&dir.join(VOTE_FILE))?;
        let purged = read_json(&dir.join(PURGED_FILE))?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            reader: log.reader(),
            state: Mutex::new(State {
                log,
                retention,
                entries,
                vote,
                purged,
                append_watches: HashMap::new(),
            }),
            repair: std::sync::OnceLock::new(),
            config,
            seed: Mutex::new(seed),
            seeding: tokio::sync::Mutex::new(()),
        });
        let flushes = (fsync == FsyncPolicy::Always).then(|| {
            let (flushes, queue) = mpsc::channel(FLUSH_QUEUE_MAX);
            tokio::spawn(flush_loop(Arc::clone(&shared), queue));
            flushes
        });
        Ok(Self { shared, flushes })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The partition's data as Kafka readers see it (whole batches, Raft's own included).
    pub fn reader(&self) -> LogReader {
        self.shared.reader.clone()
    }

    /// Calls `on_append` with the base offset the entry whose payload is `payload` (this very
    /// buffer, as proposed on this node) is appended at here: a leader's acks=1 answer. Call
    /// [`Self::unwatch_append`] once the proposal is answered, appended or not.
    pub fn watch_append(&self, payload: &Bytes, on_append: OnAppend) {
        self.shared.state.lock().append_watches.insert(
            payload_key(payload),
            AppendWatch {
                _payload: payload.clone(),
                on_append,
            },
        );
    }

    pub fn unwatch_append(&self, payload: &Bytes) {
        self.shared
            .state
            .lock()
            .append_watches
            .remove(&payload_key(payload));
    }

    /// Where the entry at `index` is (or was, if a trim deleted it), if the entry index
    /// holds its record.
    pub fn entry_loc(&self, index: u64) -> io::Result<Option<EntryLoc>> {
        self.shared.state.lock().entries.get(index)
    }

    /// Serves a snapshot offer from `from` (the leader) whose last entry is `target`: unless
    /// this log holds that entry, copies the leader's retained log up to it into the seed
    /// (see [`super::seed`]), for at most [`seed::COPY_TIME_MAX`]. `Ok` with a guard to hold
    /// while the snapshot is installed when it may be; otherwise why not yet (the leader
    /// offers again, and the copy goes on from where it stopped).
    pub async fn admit_snapshot(
        &self,
        from: NodeId,
        target: LogId,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, String> {
        let serving = self.shared.seeding.lock().await;
        let copies = self
            .shared
            .repair
            .get()
            .map(|repair| repair.copies.clone())
            .ok_or("the replica is not running yet")?;
        let deadline = tokio::time::Instant::now() + seed::COPY_TIME_MAX;
        let blocking = |job: SeedJob| {
            let shared = Arc::clone(&self.shared);
            async move {
                tokio::task::spawn_blocking(move || job(&shared))
                    .await
                    .map_err(|e| e.to_string())?
            }
        };
        loop {
            let step = blocking(Box::new(move |shared| {
                seed_step(shared, &target).map_err(|e| e.to_string())
            }))
            .await?;
            let (start, last) = match step {
                SeedStep::Held => return Ok(serving),
                SeedStep::From { start, last } => (start, last),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "copying node {from}'s retained log: {} of the entries up to {target} copied so far",
                    last.map_or_else(
                        || "none".to_owned(),
                        |(index, _)| format!("up to entry {index}")
                    )
                ));
            }
            if last.is_none() {
                tracing::info!(dir = %self.shared.dir.display(), from, %target, "copying another replica's retained log: this replica lacks entries the others deleted");
            }
            let range = copies.read_entries(from, start, target.index).await?;
            if range.entries.is_empty() {
                if last.is_none() {
                    return Err(format!(
                        "node {from} holds none of the entries up to {target}"
                    ));
                }
                // The leader no longer holds the seed's last entry (a trim since): afresh.
                blocking(Box::new(|shared| {
                    discard_seed(shared).map_err(|e| e.to_string())?;
                    Ok(SeedStep::Held)
                }))
                .await?;
                continue;
            }
            let appended = blocking(Box::new(move |shared| {
                seed_append(shared, range, last).map(|()| SeedStep::Held)
            }))
            .await;
            if let Err(error) = appended {
                tracing::warn!(dir = %self.shared.dir.display(), from, %error, "discarding a copy of another replica's log");
                blocking(Box::new(|shared| {
                    discard_seed(shared).map_err(|e| e.to_string())?;
                    Ok(SeedStep::Held)
                }))
                .await?;
            }
        }
    }

    /// The largest epoch at or below `epoch` and the offset where it ended.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        self.shared.state.lock().log.end_offset_for_epoch(epoch)
    }

    /// Closes the log: syncs the segments (whatever the fsync policy, as a clean shutdown
    /// should) and then the entry index.
    /// Takes a topic's changed log settings at once (segment size and age, index interval,
    /// batch size), except the fsync policy, which the log keeps until it is opened again (its
    /// flusher is set up at open).
    pub fn set_config(&self, mut config: LogConfig) -> io::Result<()> {
        let mut state = self.shared.state.lock();
        config.fsync = state.log.config().fsync;
        state.retention = (config.retention_ms.take(), config.retention_bytes.take());
        state.log.set_config(config).map_err(storage)
    }

    /// Where time and size retention would start the log at `now_ms` (the leader's clock):
    /// the end of the last segment that is due, or the log end when the active segment has
    /// expired too. `None` when nothing is due. Whole segments, as Kafka's retention.
    pub fn retention_point(&self, now_ms: i64) -> Option<u64> {
        let (ms, bytes) = self.shared.state.lock().retention;
        if ms.is_none() && bytes.is_none() {
            return None;
        }
        // Segments a trim hid and Raft still holds do not count.
        let start = self.shared.reader.log_start_offset();
        let mut segments = self.shared.reader.segments();
        segments.retain(|segment| segment.next_offset > start || segment.base_offset >= start);
        retention_point(&segments, ms, bytes, now_ms)
    }

    /// Whether any record in `[from, to)` is data (not one of Raft's own control batches):
    /// a trim that would remove only control batches is not worth an entry.
    pub fn holds_data(&self, from: u64, to: u64) -> io::Result<bool> {
        let mut at = from;
        while at < to {
            let read = match self.shared.reader.read_until(at, to, 64 * 1024, true) {
                Ok(read) => read,
                // Trimmed meanwhile: what is left is another trim's business.
                Err(sluice_storage::StorageError::OffsetOutOfRange { .. }) => return Ok(false),
                Err(e) => return Err(storage(e)),
            };
            if read.bytes.is_empty() {
                return Ok(false);
            }
            let mut pos = 0;
            while pos < read.bytes.len() {
                let header = BatchHeader::parse(&read.bytes[pos..]).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} near offset {at}: {e}", self.shared.dir.display()),
                    )
                })?;
                if !header.is_control() && header.last_offset() as u64 >= from {
                    return Ok(true);
                }
                at = header.last_offset() as u64 + 1;
                pos += header.total_bytes();
            }
        }
        Ok(false)
    }

    /// Moves the log start offset to `offset` (a committed trim entry asked for it): readers
    /// no longer see the records below it. Their segments stay until openraft purges the
    /// entries they hold (a replication stream may still be reading them; see [`purge`]):
    /// returns the log start offset and the last entry starting below it, for the caller to
    /// have openraft purge up to it. Call it only once a snapshot of the machine covers the
    /// trim entry. Blocking.
    pub fn trim_to(&self, offset: u64) -> io::Result<(u64, Option<u64>)> {
        let mut guard = self.shared.state.lock();
        let state = &mut *guard;
        let before = state.log.log_start_offset();
        let start = state.log.move_log_start(offset).map_err(storage)?;
        let purge_to = state.entries.last_below(start)?.map(|(index, _)| index);
        if start != before {
            tracing::info!(
                dir = %self.shared.dir.display(),
                from = before,
                to = start,
                "log start offset moved (retention or DeleteRecords); its segments go once Raft no longer needs them",
            );
        }
        delete_purged(&self.shared.dir, state)?;
        Ok((start, purge_to))
    }

    /// Lets reads that meet damage rebuild it from the other replicas: `peers` names them
    /// (the group's members but this node) when asked.
    pub fn set_repair(&self, copies: Copies, peers: Box<dyn Fn() -> Vec<NodeId> + Send + Sync>) {
        let _ = self.shared.repair.set(Repair {
            copies,
            peers,
            busy: tokio::sync::Mutex::new(()),
            pending: std::sync::atomic::AtomicBool::new(false),
        });
    }

    /// A reader met damage at `offset` (a fetch, a checksum): rebuilds it in the background
    /// ([`Self::repair_at`]) unless a repair is under way.
    pub fn repair_in_background(&self, offset: u64) {
        use std::sync::atomic::Ordering;
        let Some(repair) = self.shared.repair.get() else {
            return;
        };
        if repair.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            if let Err(error) = repair_at(&shared, offset).await {
                tracing::error!(dir = %shared.dir.display(), offset, %error, "damaged partition data could not be rebuilt from another replica");
            }
            if let Some(repair) = shared.repair.get() {
                repair.pending.store(false, Ordering::Release);
            }
        });
    }

    /// Rebuilds the sealed segment holding `offset` from another replica if it is damaged
    /// (see [`super::repair`]); whether it was. One repair runs at a time; a read that meets
    /// the damage meanwhile fails, naming it.
    pub async fn repair_at(&self, offset: u64) -> io::Result<bool> {
        repair_at(&self.shared, offset).await
    }

    /// This log's entries from the one holding offset `from`, and their batches, up to
    /// `max_bytes` (at least one entry) and no entry starting at or after `to`: what another
    /// replica rebuilding those offsets asks for. Empty if the log does not hold `from`.
    /// Blocking.
    pub fn read_range(&self, from: u64, to: u64, max_bytes: usize) -> io::Result<Range> {
        let state = self.shared.state.lock();
        let Some((index, loc)) = state.entries.last_below(from.saturating_add(1))? else {
            return Ok(Range::default());
        };
        if index < state.first_readable() || loc.end_offset() <= from {
            return Ok(Range::default());
        }
        self.collect_range(&state, index, loc, max_bytes, |_, next| {
            next.base_offset < to
        })
    }

    /// This log's entries from `from` (its first readable one when `from` is 0) to `to`
    /// inclusive, and their batches, up to `max_bytes` (at least one entry): what a replica
    /// copying this log asks for (see [`super::seed`]). Empty if the log does not hold `from`.
    /// Blocking.
    pub fn read_entries_from(&self, from: u64, to: u64, max_bytes: usize) -> io::Result<Range> {
        let state = self.shared.state.lock();
        let first = state.first_readable();
        let from = if from == 0 { first } else { from };
        if from < first || from > to {
            return Ok(Range::default());
        }
        let Some(loc) = state.entries.get(from)? else {
            return Ok(Range::default());
        };
        self.collect_range(&state, from, loc, max_bytes, |index, _| index <= to)
    }

    /// The entries from `index` (at `loc`) on while `more` says so of the next one and they
    /// fit `max_bytes`, with their batches.
    fn collect_range(
        &self,
        state: &State,
        mut index: u64,
        mut loc: EntryLoc,
        max_bytes: usize,
        more: impl Fn(u64, &EntryLoc) -> bool,
    ) -> io::Result<Range> {
        let end_index = state.entries.end_index();
        let mut entries = Vec::new();
        let mut total = 0usize;
        loop {
            entries.push((index, loc));
            total += loc.bytes as usize;
            index += 1;
            if index >= end_index {
                break;
            }
            match state.entries.get(index)? {
                Some(next) if more(index, &next) && total + next.bytes as usize <= max_bytes => {
                    loc = next;
                }
                _ => break,
            }
        }
        let start = entries[0].1.base_offset;
        let end = loc.end_offset();
        let mut bytes = bytes::BytesMut::with_capacity(total);
        let mut at = start;
        while at < end && bytes.len() < total {
            let read = self
                .shared
                .reader
                .read_retained(at, end, total - bytes.len(), true)
                .map_err(storage)?;
            let mut pos = 0;
            while pos < read.bytes.len() {
                let header = BatchHeader::parse(&read.bytes[pos..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                at = header.next_offset() as u64;
                pos += header.total_bytes();
            }
            if read.bytes.is_empty() {
                break;
            }
            bytes.extend_from_slice(&read.bytes);
        }
        if bytes.len() != total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: entries from offset {start} to {end} should be {total} bytes, {} were read",
                    self.shared.dir.display(),
                    bytes.len()
                ),
            ));
        }
        Ok(Range {
            entries,
            bytes: bytes.freeze(),
        })
    }

    pub fn close(&self) -> io::Result<()> {
        let mut state = self.shared.state.lock();
        state.log.flush().map_err(storage)?;
        state.entries.sync()
    }
}

async fn repair_at(shared: &Arc<Shared>, offset: u64) -> io::Result<bool> {
    let Some(repair) = shared.repair.get() else {
        return Ok(false);
    };
    let _one = repair.busy.lock().await;
    let Some((base, _)) = shared.reader.sealed_segment_of(offset) else {
        return Ok(false);
    };
    let damage = {
        let reader = shared.reader.clone();
        tokio::task::spawn_blocking(move || reader.check_sealed_segment(base))
            .await
            .map_err(io::Error::other)?
            .map_err(storage)?
    };
    let Some(damage) = damage else {
        return Ok(false);
    };
    report_damage(
        &damage,
        "damaged partition data: those offsets are not served until they are rebuilt from another replica",
    );
    let local = |index: u64| {
        let state = shared.state.lock();
        if index < state.first_readable() {
            return Ok(None);
        }
        state.entries.get(index)
    };
    let peers = (repair.peers)();
    let (rebuilt, from) = repair
        .copies
        .rebuild(&shared.dir, &damage, &peers, &local)
        .await?;
    {
        let shared = Arc::clone(shared);
        tokio::task::spawn_blocking(move || {
            shared
                .state
                .lock()
                .log
                .install_rebuilt(rebuilt, now_ms())
                .map_err(storage)
        })
        .await
        .map_err(io::Error::other)??;
    }
    report_rebuilt(&shared.dir, &damage, from);
    Ok(true)
}

/// A step of [`PartitionLog::admit_snapshot`], run on the blocking pool.
type SeedJob = Box<dyn FnOnce(&Shared) -> Result<SeedStep, String> + Send>;

/// What a snapshot offer needs next (see [`PartitionLog::admit_snapshot`]).
enum SeedStep {
    /// The log or the seed holds the snapshot's entry (the seed synced).
    Held,
    /// Entries from `start` are to be copied (0: from the leader's first); `last` is the
    /// seed's last entry, which the copy must start with.
    From {
        start: u64,
        last: Option<(u64, EntryLoc)>,
    },
}

fn seed_step(shared: &Shared, target: &LogId) -> io::Result<SeedStep> {
    let state = shared.state.lock();
    let term = target.leader_id.term;
    if state
        .entries
        .get(target.index)?
        .is_some_and(|loc| loc.term == term)
    {
        return Ok(SeedStep::Held);
    }
    let mut seed = shared.seed.lock();
    let Some(open) = seed.as_mut() else {
        return Ok(SeedStep::From {
            start: 0,
            last: None,
        });
    };
    match open.get(target.index)? {
        Some(loc) if loc.term == term => {
            open.sync()?;
            tracing::info!(dir = %shared.dir.display(), %target, "the copy of another replica's retained log is complete: installing the snapshot");
            return Ok(SeedStep::Held);
        }
        Some(_) => {
            // Another history at the snapshot's entry: copied again.
            drop(seed);
            discard_seed(shared)?;
            return Ok(SeedStep::From {
                start: 0,
                last: None,
            });
        }
        None => {}
    }
    Ok(match open.last()? {
        Some((index, loc)) => SeedStep::From {
            start: index,
            last: Some((index, loc)),
        },
        None => SeedStep::From {
            start: 0,
            last: None,
        },
    })
}

/// Appends `range` to the seed (creating it when there is none); `last` is the seed's last
/// entry, which `range` must start with (the leader's entry there is the seed's own).
fn seed_append(
    shared: &Shared,
    mut range: Range,
    last: Option<(u64, EntryLoc)>,
) -> Result<(), String> {
    let mut seed = shared.seed.lock();
    if let Some(last) = last {
        let first = range.entries.first().copied();
        if first != Some(last) {
            return Err(format!(
                "the seed ends with entry {} ({:?}) where the leader holds {first:?}: another history",
                last.0, last.1
            ));
        }
        range.entries.remove(0);
        range.bytes = range
            .bytes
            .slice((last.1.bytes as usize).min(range.bytes.len())..);
        if seed.is_none() {
            return Err("the seed was discarded meanwhile".into());
        }
    }
    if seed.is_none() {
        let base = range.entries.first().map_or(0, |(_, loc)| loc.base_offset);
        *seed = Some(Seed::create(&shared.dir, &shared.config, base).map_err(|e| e.to_string())?);
    }
    match seed.as_mut() {
        Some(open) => open.append(&range),
        None => Err("no seed".into()),
    }
}

fn discard_seed(shared: &Shared) -> io::Result<()> {
    let mut seed = shared.seed.lock();
    if seed.take().is_some() || shared.dir.join(seed::SEED_DIR).exists() {
        seed::remove(&shared.dir)?;
    }
    Ok(())
}

/// Deletes the segments that hold nothing but records below the log start offset and entries
/// openraft has purged (it reads no purged entry again).
fn delete_purged(dir: &Path, state: &mut State) -> io::Result<()> {
    let Some(purged) = state.purged else {
        return Ok(());
    };
    let kept_from = match state.entries.get(purged.index + 1)? {
        Some(next) => next.base_offset,
        None => state.log.log_end_offset(),
    };
    let deleted = state.log.delete_below(kept_from).map_err(storage)?;
    if deleted > 0 {
        tracing::debug!(dir = %dir.display(), deleted, "deleted trimmed segments Raft no longer needs");
    }
    Ok(())
}

/// openraft's purge: moves the purge mark (and deletes what it trimmed and openraft no longer
/// needs), or, when this log does not hold the entry (a
/// snapshot was installed in place of entries this replica lacks), puts the seed in the log's
/// place (see [`super::seed`]).
fn purge(shared: &Shared, log_id: LogId) -> io::Result<()> {
    let mut guard = shared.state.lock();
    let state = &mut *guard;
    if state
        .purged
        .as_ref()
        .is_some_and(|p| p.index >= log_id.index)
    {
        return Ok(());
    }
    let held = state
        .entries
        .get(log_id.index)?
        .is_some_and(|loc| loc.term == log_id.leader_id.term)
        || (state.entries.count() > 0 && log_id.index < state.entries.first_index());
    if held {
        let bytes = serde_json::to_vec(&log_id).map_err(io::Error::other)?;
        replace_atomically(&shared.dir, PURGED_FILE, &bytes)?;
        state.purged = Some(log_id);
        delete_purged(&shared.dir, state)?;
        // A copy made for a snapshot this log no longer needs.
        drop(guard);
        return discard_seed(shared);
    }
    let Some(seed) = shared.seed.lock().take() else {
        if shared.repair.get().is_none() {
            // A log outside a running group (openraft's conformance suite): the mark moves
            // past the log, as openraft's own stores do.
            let bytes = serde_json::to_vec(&log_id).map_err(io::Error::other)?;
            replace_atomically(&shared.dir, PURGED_FILE, &bytes)?;
            state.purged = Some(log_id);
            return Ok(());
        }
        // Later entries would land at other offsets than on the other replicas: the group
        // stops here rather than store them.
        return Err(io::Error::other(format!(
            "{}: a snapshot up to entry {log_id} was installed, but neither the log nor a \
             copy of another replica's log holds that entry",
            shared.dir.display()
        )));
    };
    seed::install(&shared.dir, seed, &log_id)?;
    state.log.reload(now_ms()).map_err(storage)?;
    state.entries = EntryIndex::open(&shared.dir.join(ENTRIES_FILE), state.log.log_end_offset())?;
    state.purged = Some(log_id);
    tracing::info!(
        dir = %shared.dir.display(),
        purged = %log_id,
        log_start = state.log.log_start_offset(),
        log_end = state.log.log_end_offset(),
        "this replica's log is now the copy of the leader's retained log",
    );
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(context(e, "read", path)),
    };
    // Replaced by rename, so whole or absent: anything undecodable is damage.
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt {}: {e}", path.display()),
        )
    })
}

async fn write_json(
    dir: &Path,
    name: &'static str,
    value: &impl serde::Serialize,
) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || replace_atomically(&dir, name, &bytes))
        .await
        .map_err(io::Error::other)?
}

/// Syncs segments and entry index for every queued append, many at a time, and reports them
/// in order.
async fn flush_loop(shared: Arc<Shared>, mut queue: mpsc::Receiver<IOFlushed<PartitionTypes>>) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, FLUSH_QUEUE_MAX).await > 0 {
        let (job, file) = {
            let mut state = shared.state.lock();
            (state.log.flush_job(), state.entries.file())
        };
        let run = tokio::task::spawn_blocking(move || {
            let result = match &job {
                Some(job) => job.run(),
                None => Ok(()),
            };
            (job, result)
        })
        .await;
        let synced: io::Result<()> = match run {
            Ok((job, result)) => {
                let logged = match job {
                    Some(job) => shared
                        .state
                        .lock()
                        .log
                        .complete_flush(&job, result)
                        .map(|_| ())
                        .map_err(storage),
                    None => {
                        // No job: nothing to sync, or the log refuses writes (say why).
                        let state = shared.state.lock();
                        match state.log.failure() {
                            Some(reason) => Err(io::Error::other(reason.to_owned())),
                            None => Ok(()),
                        }
                    }
                };
                match logged {
                    Ok(()) => tokio::task::spawn_blocking(move || file.sync_data())
                        .await
                        .unwrap_or_else(|e| Err(io::Error::other(e))),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(io::Error::other(e)),
        };
        if let Err(e) = &synced {
            tracing::error!(dir = %shared.dir.display(), error = %e, "fsync of a partition's Raft log failed");
        }
        for callback in batch.drain(..) {
            callback.io_completed(match &synced {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

/// Reads entries without the writer's lock but for an instant.
#[derive(Clone)]
pub struct PartitionLogReader {
    shared: Arc<Shared>,
}

impl Debug for PartitionLogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLogReader")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl PartitionLogReader {
    /// [`Self::read_entries`], rebuilding damage it meets from another replica once (see
    /// [`super::repair`]).
    async fn read_entries_mending(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        match self.read_entries(start, end) {
            Err((error, Some(offset))) if error.kind() == io::ErrorKind::InvalidData => {
                match repair_at(&self.shared, offset).await {
                    Ok(true) => self.read_entries(start, end).map_err(|(e, _)| e),
                    Ok(false) => Err(error),
                    Err(repair) => {
                        tracing::error!(%error, %repair, "damaged Raft entries could not be rebuilt from another replica");
                        Err(error)
                    }
                }
            }
            other => other.map_err(|(e, _)| e),
        }
    }

    /// The entries `[start, end)`; a failure comes with the offset of the entry that could
    /// not be read, if it got that far.
    fn read_entries(&self, start: u64, end: u64) -> Result<Vec<Entry>, (io::Error, Option<u64>)> {
        let (first, last_end, index_reader, first_index) = {
            let state = self.shared.state.lock();
            (
                state.first_readable(),
                state.entries.end_index(),
                state.entries.reader(),
                state.entries.first_index(),
            )
        };
        let start = start.max(first);
        let end = end.min(last_end);
        let mut out = Vec::with_capacity(end.saturating_sub(start).min(4096) as usize);
        for index in start..end {
            let loc = index_reader
                .read(index - first_index)
                .map_err(|e| (e, None))?;
            out.push(
                self.read_entry(index, loc)
                    .map_err(|e| (e, Some(loc.base_offset)))?,
            );
        }
        Ok(out)
    }

    fn read_entry(&self, index: u64, loc: EntryLoc) -> io::Result<Entry> {
        let read = self
            .shared
            .reader
            .read_retained(loc.base_offset, loc.end_offset(), loc.bytes as usize, true)
            .map_err(storage)?;
        let damaged = |reason: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "Raft entry {index} in {} at offset {}: {reason}",
                    self.shared.dir.display(),
                    loc.base_offset
                ),
            )
        };
        if read.bytes.len() != loc.bytes as usize {
            return Err(damaged(format!(
                "{} bytes read, {} expected",
                read.bytes.len(),
                loc.bytes
            )));
        }
        let header = BatchHeader::parse(&read.bytes).map_err(|e| damaged(e.to_string()))?;
        if header.base_offset != loc.base_offset as i64
            || i64::from(header.partition_leader_epoch) != loc.term as i64
        {
            return Err(damaged(format!(
                "the batch there starts at {} in epoch {}, the entry index says {} in term {}",
                header.base_offset, header.partition_leader_epoch, loc.base_offset, loc.term
            )));
        }
        decode_entry(LogId::new_term_index(loc.term, index), read.bytes)
    }
}

/// [`PartitionLog::retention_point`] over `segments` (the last one active).
fn retention_point(
    segments: &[sluice_storage::SegmentInfo],
    ms: Option<i64>,
    bytes: Option<u64>,
    now_ms: i64,
) -> Option<u64> {
    let (active, sealed) = segments.split_last()?;
    let expired = |segment: &sluice_storage::SegmentInfo| {
        ms.is_some_and(|ms| {
            segment
                .max_timestamp_ms
                .is_some_and(|ts| ts < now_ms.saturating_sub(ms))
        })
    };
    let mut total: u64 = segments.iter().map(|s| s.size_bytes).sum();
    let mut point = None;
    for segment in sealed {
        let oversized = bytes.is_some_and(|limit| total - segment.size_bytes >= limit);
        if !(expired(segment) || oversized) {
            return point;
        }
        total -= segment.size_bytes;
        point = Some(segment.next_offset);
    }
    if active.next_offset > active.base_offset && expired(active) {
        point = Some(active.next_offset);
    }
    point
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<PartitionTypes> for PartitionLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        self.read_entries_mending(start, end).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.state.lock().vote)
    }
}

impl RaftLogReader<PartitionTypes> for PartitionLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let mut reader = PartitionLogReader {
            shared: Arc::clone(&self.shared),
        };
        reader.try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.state.lock().vote)
    }
}

impl RaftLogStorage<PartitionTypes> for PartitionLog {
    type LogReader = PartitionLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionTypes>, io::Error> {
        let state = self.shared.state.lock();
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: state.last_log_id()?,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        PartitionLogReader {
            shared: Arc::clone(&self.shared),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        write_json(&self.shared.dir, VOTE_FILE, vote).await?;
        self.shared.state.lock().vote = Some(*vote);
        Ok(())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<PartitionTypes>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        {
            let mut guard = self.shared.state.lock();
            let state = &mut *guard;
            let now = now_ms();
            for entry in entries {
                let index = entry.index();
                let term = entry.log_id.leader_id.term;
                let epoch = i32::try_from(term).map_err(|_| {
                    io::Error::other(format!(
                        "Raft term {term} does not fit a Kafka leader epoch"
                    ))
                })?;
                let bytes = encode_entry(&entry)?;
                let info = state
                    .log
                    .append_in_epoch(&bytes, epoch, now)
                    .map_err(storage)?;
                if !state.append_watches.is_empty()
                    && let Some(watch) = state.append_watches.remove(&payload_key(&bytes))
                {
                    (watch.on_append)(info.base_offset);
                }
                state.entries.push(
                    index,
                    EntryLoc {
                        term,
                        base_offset: info.base_offset,
                        records: (info.last_offset + 1 - info.base_offset) as u32,
                        bytes: bytes.len() as u32,
                    },
                )?;
            }
        }
        match &self.flushes {
            Some(flushes) => flushes
                .send(callback)
                .await
                .map_err(|_| io::Error::other("the partition log's flusher has stopped")),
            None => {
                callback.io_completed(Ok(()));
                Ok(())
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let mut guard = self.shared.state.lock();
        let state = &mut *guard;
        let from = match &last_log_id {
            Some(id) => id.index + 1,
            None => state.entries.first_index(),
        };
        let from = from.max(state.entries.first_index());
        let Some(first_removed) = state.entries.get(from)? else {
            return Ok(());
        };
        if state.purged.as_ref().is_some_and(|p| p.index >= from) {
            return Err(io::Error::other(format!(
                "cannot truncate purged Raft entry {from} of {}",
                self.shared.dir.display()
            )));
        }
        tracing::info!(
            dir = %self.shared.dir.display(),
            from_index = from,
            from_offset = first_removed.base_offset,
            to_offset = state.log.log_end_offset(),
            "truncating a divergent uncommitted tail",
        );
        state
            .log
            .truncate_to(first_removed.base_offset, now_ms())
            .map_err(storage)?;
        state.entries.truncate_from(from)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || purge(&shared, log_id))
            .await
            .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use sluice_storage::SegmentInfo;

    use super::retention_point;

    fn segment(base: u64, next: u64, size: u64, max_ts: i64) -> SegmentInfo {
        SegmentInfo {
            base_offset: base,
            next_offset: next,
            size_bytes: size,
            max_timestamp_ms: Some(max_ts),
        }
    }

    #[test]
    fn retention_takes_whole_segments_and_the_active_one_only_when_expired() {
        let segments = [
            segment(0, 10, 100, 1_000),
            segment(10, 20, 100, 2_000),
            segment(20, 30, 100, 3_000),
            segment(30, 35, 50, 4_000),
        ];
        // Nothing configured, or nothing due.
        assert_eq!(retention_point(&segments, None, None, 10_000), None);
        assert_eq!(
            retention_point(&segments, Some(10_000), Some(1_000), 10_000),
            None
        );
        // Time: the segments whose newest record is older than the limit.
        assert_eq!(
            retention_point(&segments, Some(7_500), None, 10_000),
            Some(20)
        );
        // Everything expired: the active segment's records go too.
        assert_eq!(
            retention_point(&segments, Some(1_000), None, 10_000),
            Some(35)
        );
        // Size: whole sealed segments while what stays is at least the limit.
        assert_eq!(
            retention_point(&segments, None, Some(150), 10_000),
            Some(20)
        );
        assert_eq!(retention_point(&segments, None, Some(1), 10_000), Some(30));
        // Either limit deletes.
        assert_eq!(
            retention_point(&segments, Some(8_500), Some(250), 10_000),
            Some(10)
        );
        // An empty active segment is never a reason.
        let idle = [segment(0, 10, 100, 1_000), segment(10, 10, 0, 0)];
        assert_eq!(retention_point(&idle, Some(1_000), None, 10_000), Some(10));
    }
}
