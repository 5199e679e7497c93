//! A durable Raft log for small groups (the controller): openraft's [`RaftLogStorage`] over one
//! append-only file, with the vote in a file of its own.
//!
//! # Files (in the group's directory)
//! - `log`: the magic `SLRAFT01`, then records `[body length u32 LE][crc32c of body u32 LE]
//!   [body]`; a body is a kind byte and a JSON value: `1` an entry, `2` the committed log id,
//!   `3` the last purged log id. Entries are in index order; a committed or purged record
//!   replaces any earlier one.
//! - `vote`: one record of the same framing holding the vote, replaced atomically (written to
//!   `vote.tmp`, synced, renamed, directory synced).
//!
//! # Rules
//! - An append is readable at once and reported flushed (openraft's `IOFlushed`) only after
//!   an `fdatasync` of the file has covered it. One flusher task syncs for every append queued
//!   while the last sync ran (group commit) and reports them in order; fsyncs run on the
//!   blocking pool, never on a runtime worker.
//! - The vote is durable before [`RaftLogStorage::save_vote`] returns, as Raft requires a vote
//!   to be persisted before any entry of its term.
//! - Truncation cuts the file (it need not be synced: openraft re-sends what a follower lost);
//!   the committed and purged records cut with it are written again after the cut.
//! - Purged entries stay in the file until their bytes outweigh the live ones (and 1 MiB);
//!   then the file is rewritten beside the old one and renamed over it.
//! - Opening reads the whole file: a bad record (cut short, length out of range, CRC
//!   mismatch) with no whole record anywhere after it is a write a crash interrupted, and is
//!   cut off with a warning; one with a whole record after it is damage, an error naming the
//!   file and the offset, and nothing is changed.
//!
//! Every entry is also kept in memory, so reads never touch the disk; the controller's
//! snapshots purge the log every few thousand entries, which bounds both.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};

use crate::files::{context, sync_dir};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::alias::{LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, RaftTypeConfig};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

const MAGIC: &[u8; 8] = b"SLRAFT01";
const HEADER_BYTES: u64 = 8;
const KIND_ENTRY: u8 = 1;
const KIND_COMMITTED: u8 = 2;
const KIND_PURGED: u8 = 3;
/// Purged bytes are rewritten away only past this much (and past the live bytes).
const COMPACT_BYTES_MIN: u64 = 1 << 20;
/// Appends waiting for their fsync; a full queue makes the next append wait.
const FLUSH_QUEUE_MAX: usize = 1024;
/// The largest record the log will write or read: far above any controller command.
const RECORD_BYTES_MAX: u32 = 64 << 20;

/// What openraft needs of a type config for this store: entries, votes and log ids that
/// serde can write.
pub trait StoredTypes:
    RaftTypeConfig<Entry: Serialize + DeserializeOwned + Clone, Vote: Serialize + DeserializeOwned>
where
    LogIdOf<Self>: Serialize + DeserializeOwned,
{
}

impl<C> StoredTypes for C
where
    C: RaftTypeConfig<
            Entry: Serialize + DeserializeOwned + Clone,
            Vote: Serialize + DeserializeOwned,
        >,
    LogIdOf<C>: Serialize + DeserializeOwned,
{
}

/// A group's durable Raft log. Cheap to clone; every clone is the same log.
pub struct LogStore<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
    flushes: mpsc::Sender<IOFlushed<C>>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            flushes: self.flushes.clone(),
        }
    }
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

struct Shared<C: RaftTypeConfig> {
    dir: PathBuf,
    state: Mutex<State<C>>,
}

/// A value with the place of its record in the file.
#[derive(Clone)]
struct Located<T> {
    at: u64,
    bytes: u64,
    value: T,
}

struct State<C: RaftTypeConfig> {
    /// The open `log` file; replaced when the file is compacted.
    file: Arc<File>,
    /// Where the next record goes: the end of the last whole record.
    end: u64,
    /// Every entry not purged, by index, with where its record is.
    entries: BTreeMap<u64, Located<C::Entry>>,
    committed: Option<Located<LogIdOf<C>>>,
    purged: Option<Located<LogIdOf<C>>>,
    vote: Option<VoteOf<C>>,
    /// Bytes of records that no longer count (purged entries, replaced marks).
    dead_bytes: u64,
}

impl<C: StoredTypes> LogStore<C>
where
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    /// Opens (or creates) the log in `dir` and starts its flusher. Blocking: call it from the
    /// blocking pool or before the runtime serves anything.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| context(e, "create", dir))?;
        let path = dir.join("log");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| context(e, "open", &path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| context(e, "read", &path))?;
        if bytes.is_empty() {
            file.write_all(MAGIC)
                .map_err(|e| context(e, "write", &path))?;
            file.sync_all().map_err(|e| context(e, "sync", &path))?;
            sync_dir(dir)?;
            bytes.extend_from_slice(MAGIC);
        }
        let mut state = State::<C>::load(&path, &bytes, Arc::new(file))?;
        if state.end < bytes.len() as u64 {
            tracing::warn!(
                file = %path.display(),
                offset = state.end,
                cut_bytes = bytes.len() as u64 - state.end,
                "cutting off the end of the Raft log: a record there was cut short by a crash",
            );
            state
                .file
                .set_len(state.end)
                .map_err(|e| context(e, "truncate", &path))?;
            state
                .file
                .sync_all()
                .map_err(|e| context(e, "sync", &path))?;
        }
        state.vote = read_vote::<C>(dir)?;

        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            state: Mutex::new(state),
        });
        let (flushes, queue) = mpsc::channel(FLUSH_QUEUE_MAX);
        tokio::spawn(flush_loop(Arc::clone(&shared), queue));
        Ok(Self { shared, flushes })
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl<C: StoredTypes> State<C>
where
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    fn load(path: &Path, bytes: &[u8], file: Arc<File>) -> io::Result<Self> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt(path, 0, "not a Sluice Raft log (bad magic)"));
        }
        let mut state = Self {
            file,
            end: HEADER_BYTES,
            entries: BTreeMap::new(),
            committed: None,
            purged: None,
            vote: None,
            dead_bytes: 0,
        };
        let mut at = HEADER_BYTES as usize;
        while at < bytes.len() {
            let record = match read_record(&bytes[at..]) {
                Ok(record) => record,
                Err(reason) => {
                    // A write a crash interrupted leaves a bad record with nothing whole after
                    // it; the caller cuts it off. A whole record anywhere after a bad one means
                    // the bad one is damage (a flipped length would otherwise pass for a cut
                    // tail and take good records with it): refuse, and change nothing.
                    if (at + 1..bytes.len()).any(|from| read_record(&bytes[from..]).is_ok()) {
                        return Err(corrupt(path, at as u64, reason));
                    }
                    break;
                }
            };
            let position = at as u64;
            let record_bytes = 8 + record.len() as u64;
            let (kind, json) = record
                .split_first()
                .ok_or_else(|| corrupt(path, position, "empty record"))?;
            let bad = |e: serde_json::Error| corrupt(path, position, &format!("undecodable: {e}"));
            match *kind {
                KIND_ENTRY => {
                    let entry: C::Entry = serde_json::from_slice(json).map_err(bad)?;
                    let index = entry.index();
                    // Truncation cuts the file, so a repeated index cannot be on disk; if it
                    // were, the later record is the one written last.
                    state.forget(index..);
                    state
                        .entries
                        .insert(index, located(position, record_bytes, entry));
                }
                KIND_COMMITTED => {
                    let id: LogIdOf<C> = serde_json::from_slice(json).map_err(bad)?;
                    state.set_committed(located(position, record_bytes, id));
                }
                KIND_PURGED => {
                    let id: LogIdOf<C> = serde_json::from_slice(json).map_err(bad)?;
                    let index = id.index();
                    state.set_purged(located(position, record_bytes, id));
                    state.forget(..=index);
                }
                other => {
                    return Err(corrupt(
                        path,
                        position,
                        &format!("unknown record kind {other}"),
                    ));
                }
            }
            at += record_bytes as usize;
            state.end = at as u64;
        }
        Ok(state)
    }
}

fn located<T>(at: u64, bytes: u64, value: T) -> Located<T> {
    Located { at, bytes, value }
}

impl<C: RaftTypeConfig> State<C> {
    /// Forgets the entries in `range`, counting their bytes as dead.
    fn forget(&mut self, range: impl RangeBounds<u64>) {
        let gone: Vec<u64> = self.entries.range(range).map(|(&i, _)| i).collect();
        for i in gone {
            if let Some(entry) = self.entries.remove(&i) {
                self.dead_bytes += entry.bytes;
            }
        }
    }

    fn set_committed(&mut self, committed: Located<LogIdOf<C>>) {
        if let Some(old) = self.committed.replace(committed) {
            self.dead_bytes += old.bytes;
        }
    }

    fn set_purged(&mut self, purged: Located<LogIdOf<C>>) {
        if let Some(old) = self.purged.replace(purged) {
            self.dead_bytes += old.bytes;
        }
    }

    fn last_log_id(&self) -> Option<LogIdOf<C>> {
        self.entries
            .values()
            .next_back()
            .map(|entry| entry.value.log_id())
            .or_else(|| self.purged.as_ref().map(|p| p.value.clone()))
    }

    /// Writes one record at the end, returning where it is. The caller syncs (or lets the
    /// flusher sync).
    fn append_record<T>(&mut self, kind: u8, json: &[u8], value: T) -> io::Result<Located<T>> {
        let frame = frame(kind, json)?;
        let at = self.end;
        self.file.write_all_at(&frame, at)?;
        self.end += frame.len() as u64;
        Ok(located(at, frame.len() as u64, value))
    }
}

fn frame(kind: u8, json: &[u8]) -> io::Result<Vec<u8>> {
    let body_len = json.len() + 1;
    if body_len > RECORD_BYTES_MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a Raft log record of {body_len} bytes is over the limit of {RECORD_BYTES_MAX}"
            ),
        ));
    }
    let mut frame = Vec::with_capacity(8 + body_len);
    frame.extend_from_slice(&(body_len as u32).to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.push(kind);
    frame.extend_from_slice(json);
    let crc = crc32c::crc32c(&frame[8..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

/// The body of the record at the start of `bytes`, or why there is none.
fn read_record(bytes: &[u8]) -> Result<&[u8], &'static str> {
    let header = bytes.get(..8).ok_or("record header cut short")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > RECORD_BYTES_MAX {
        return Err("record length out of range");
    }
    let body = bytes
        .get(8..8 + len as usize)
        .ok_or("record body cut short")?;
    if crc32c::crc32c(body) != crc {
        return Err("record CRC mismatch");
    }
    Ok(body)
}

fn read_vote<C: StoredTypes>(dir: &Path) -> io::Result<Option<VoteOf<C>>>
where
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    let path = dir.join("vote");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(context(e, "read", &path)),
    };
    // The vote file is replaced by rename, so it is whole or absent: any damage is real.
    let body = read_record(&bytes).map_err(|reason| corrupt(&path, 0, reason))?;
    let json = body.get(1..).unwrap_or_default();
    let vote = serde_json::from_slice(json)
        .map_err(|e| corrupt(&path, 0, &format!("undecodable vote: {e}")))?;
    Ok(Some(vote))
}

fn corrupt(path: &Path, offset: u64, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "corrupt Raft log {} at offset {offset}: {reason}",
            path.display()
        ),
    )
}

fn to_json(value: &impl Serialize) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Syncs the log for every queued append, many at a time, and reports them in order.
async fn flush_loop<C: RaftTypeConfig>(
    shared: Arc<Shared<C>>,
    mut queue: mpsc::Receiver<IOFlushed<C>>,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, FLUSH_QUEUE_MAX).await > 0 {
        // Sync the file as it is now: a compaction that replaced it synced the new one whole.
        let file = Arc::clone(&shared.state.lock().file);
        let path = shared.dir.join("log");
        let synced = tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        match synced {
            Ok(()) => {
                for callback in batch.drain(..) {
                    callback.io_completed(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "fsync of the Raft log failed");
                for callback in batch.drain(..) {
                    callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
}

impl<C: StoredTypes> RaftLogReader<C> for LogStore<C>
where
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        let state = self.shared.state.lock();
        Ok(state
            .entries
            .range(range)
            .map(|(_, entry)| entry.value.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(self.shared.state.lock().vote.clone())
    }
}

impl<C: StoredTypes> RaftLogStorage<C> for LogStore<C>
where
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let state = self.shared.state.lock();
        Ok(LogState {
            last_purged_log_id: state.purged.as_ref().map(|p| p.value.clone()),
            last_log_id: state.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        let frame = frame(0, &to_json(vote)?)?;
        let dir = self.shared.dir.clone();
        tokio::task::spawn_blocking(move || crate::files::replace_atomically(&dir, "vote", &frame))
            .await
            .map_err(io::Error::other)??;
        self.shared.state.lock().vote = Some(vote.clone());
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let Some(committed) = committed else {
            return Ok(());
        };
        // Not synced on its own: a committed mark lost in a crash only means re-applying from
        // an earlier point, and the next append's sync covers it.
        let json = to_json(&committed)?;
        let mut state = self.shared.state.lock();
        let record = state.append_record(KIND_COMMITTED, &json, committed)?;
        state.set_committed(record);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        let state = self.shared.state.lock();
        // Never report more than the log holds (a crash may have cut entries the mark
        // followed; committed entries are synced before the mark can be, but be safe).
        let last = state.last_log_id();
        Ok(state
            .committed
            .as_ref()
            .map(|c| c.value.clone())
            .filter(|id| Some(id) <= last.as_ref()))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + Send,
        I::IntoIter: Send,
    {
        {
            let mut state = self.shared.state.lock();
            for entry in entries {
                let index = entry.index();
                if let Some(last) = state.last_log_id() {
                    assert_eq!(
                        index,
                        last.index() + 1,
                        "Raft appends must follow the last entry without a hole",
                    );
                }
                let json = to_json(&entry)?;
                let record = state.append_record(KIND_ENTRY, &json, entry)?;
                state.entries.insert(index, record);
            }
        }
        self.flushes
            .send(callback)
            .await
            .map_err(|_| io::Error::other("the Raft log's flusher has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.as_ref().map_or(0, |id| id.index() + 1);
        let (cut, file) = {
            let mut state = self.shared.state.lock();
            let Some(cut) = state.entries.range(from..).next().map(|(_, e)| e.at) else {
                return Ok(());
            };
            state.forget(from..);
            (cut, Arc::clone(&state.file))
        };
        let path = self.shared.dir.join("log");
        // Cut and synced on the blocking pool (openraft issues no other log write meanwhile):
        // a crash cannot leave a later record over a tail the cut removed, which a reopen
        // would take for damage. Truncations are rare.
        tokio::task::spawn_blocking(move || {
            file.set_len(cut)
                .map_err(|e| context(e, "truncate", &path))?;
            file.sync_data().map_err(|e| context(e, "sync", &path))
        })
        .await
        .map_err(io::Error::other)??;
        let mut state = self.shared.state.lock();
        // The cut bytes are gone from the file, not dead in it.
        state.dead_bytes = state.dead_bytes.saturating_sub(state.end - cut);
        state.end = cut;
        // Marks written after the cut went with it: write them again.
        if let Some(purged) = state.purged.clone()
            && purged.at >= cut
        {
            let json = to_json(&purged.value)?;
            state.purged = Some(state.append_record(KIND_PURGED, &json, purged.value)?);
        }
        if let Some(committed) = state.committed.clone()
            && committed.at >= cut
        {
            let json = to_json(&committed.value)?;
            state.committed = Some(state.append_record(KIND_COMMITTED, &json, committed.value)?);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let rewrite = {
            let mut state = self.shared.state.lock();
            if let Some(purged) = &state.purged {
                assert!(purged.value <= log_id, "purge never goes back");
            }
            let index = log_id.index();
            let json = to_json(&log_id)?;
            let record = state.append_record(KIND_PURGED, &json, log_id)?;
            state.set_purged(record);
            state.forget(..=index);
            let live = state.end - HEADER_BYTES - state.dead_bytes.min(state.end - HEADER_BYTES);
            if state.dead_bytes > COMPACT_BYTES_MIN && state.dead_bytes > live {
                Some(compacted(&state)?)
            } else {
                None
            }
        };
        if let Some((bytes, positions)) = rewrite {
            let dir = self.shared.dir.clone();
            let file = tokio::task::spawn_blocking(move || write_compacted(&dir, &bytes))
                .await
                .map_err(io::Error::other)??;
            let mut state = self.shared.state.lock();
            state.file = Arc::new(file);
            state.end = positions.end;
            state.dead_bytes = 0;
            if let (Some(c), Some(at)) = (state.committed.as_mut(), positions.committed) {
                c.at = at.0;
                c.bytes = at.1;
            }
            if let (Some(p), Some(at)) = (state.purged.as_mut(), positions.purged) {
                p.at = at.0;
                p.bytes = at.1;
            }
            for (index, at, bytes) in positions.entries {
                if let Some(entry) = state.entries.get_mut(&index) {
                    entry.at = at;
                    entry.bytes = bytes;
                }
            }
        }
        Ok(())
    }
}

/// Where each record landed in a compacted file: (start, length), entries with their index.
struct Positions {
    end: u64,
    committed: Option<(u64, u64)>,
    purged: Option<(u64, u64)>,
    entries: Vec<(u64, u64, u64)>,
}

/// The bytes of a fresh log file holding what `state` still needs, and where each record is.
fn compacted<C: StoredTypes>(state: &State<C>) -> io::Result<(Vec<u8>, Positions)>
where
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    let mut bytes = MAGIC.to_vec();
    let place = |bytes: &mut Vec<u8>, kind: u8, json: &[u8]| -> io::Result<(u64, u64)> {
        let at = bytes.len() as u64;
        let frame = frame(kind, json)?;
        bytes.extend_from_slice(&frame);
        Ok((at, frame.len() as u64))
    };
    let purged = match &state.purged {
        Some(p) => Some(place(&mut bytes, KIND_PURGED, &to_json(&p.value)?)?),
        None => None,
    };
    let mut entries = Vec::with_capacity(state.entries.len());
    for (&index, entry) in &state.entries {
        let (at, len) = place(&mut bytes, KIND_ENTRY, &to_json(&entry.value)?)?;
        entries.push((index, at, len));
    }
    let committed = match &state.committed {
        Some(c) => Some(place(&mut bytes, KIND_COMMITTED, &to_json(&c.value)?)?),
        None => None,
    };
    let end = bytes.len() as u64;
    Ok((
        bytes,
        Positions {
            end,
            committed,
            purged,
            entries,
        },
    ))
}

fn write_compacted(dir: &Path, bytes: &[u8]) -> io::Result<File> {
    let tmp = dir.join("log.compact");
    let path = dir.join("log");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| context(e, "create", &tmp))?;
    file.write_all(bytes)
        .map_err(|e| context(e, "write", &tmp))?;
    file.sync_all().map_err(|e| context(e, "sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(|e| context(e, "rename", &tmp))?;
    sync_dir(dir)?;
    Ok(file)
}
