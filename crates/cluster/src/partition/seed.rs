//! Sending a replica the retained log when the entries it lacks were trimmed away.
//!
//! A replica that lacks entries every other replica has deleted (it lost its copy after a
//! trim, or it is a new replica a reassignment adds to a trimmed partition) cannot catch up
//! from the log: the leader's openraft offers it a snapshot instead. A partition's snapshot
//! holds only the machine (producer states, log start), not the records, so before the
//! snapshot is installed the replica copies the leader's retained log up to the snapshot's
//! entry into a *seed* (`raft-seed/` in the partition's directory: a storage log and an entry
//! index, the same files as the partition's own), entry by entry through
//! [`method::READ_ENTRIES`](crate::network::method::READ_ENTRIES), each entry's batches checked
//! and written at the offsets the leader's entry record gives. Kafka does the same: a new
//! follower fetches from the leader's log start offset, and is in sync only once it caught up.
//!
//! - The copy is made while the leader's snapshot offer waits, at most [`COPY_TIME_MAX`] per
//!   offer; the offer is then refused (the leader offers again) and the next one continues
//!   where the seed ends, after checking that the leader's entry there is the seed's last
//!   (Raft's log matching: same index and term, same entries before). A seed of another
//!   history is discarded and copied again.
//! - Once the seed holds the snapshot's entry it is synced, the snapshot is given to openraft,
//!   which installs the machine and then purges the log up to the snapshot's entry: that purge
//!   puts the seed in place of the replica's log ([`install`]), cut after the snapshot's
//!   entry, and the leader goes on from the next entry. The install is crash-safe: a phase file
//!   (`raft-seed-installing`) says whether the old log's files are being deleted or the seed's
//!   moved in, and opening the log finishes what a crash interrupted ([`finish_install`]).
//! - The first entry copied is the leader's first readable one (the one after its purge
//!   mark), so the seed starts at that entry's base offset: records a DeleteRecords left
//!   readable inside the entry before it are not copied.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_storage::batch::BatchHeader;
use sluice_storage::{Log, LogConfig};

use super::LogId;
use super::entries::{EntryIndex, EntryLoc};
use super::log_store::ENTRIES_FILE;
use super::repair::Range;
use crate::files::{context, replace_atomically, sync_dir};

/// The seed's directory, inside the partition's.
pub(crate) const SEED_DIR: &str = "raft-seed";
/// The phase of a seed's install, in the partition's directory while it runs.
const INSTALLING_FILE: &str = "raft-seed-installing";
/// How long one snapshot offer may wait for the copy before it is refused (and offered again
/// by the leader, continuing the copy): well under the leader's snapshot timeout.
pub(crate) const COPY_TIME_MAX: Duration = Duration::from_secs(20);

/// A copy of another replica's log being made in `raft-seed/`.
pub(crate) struct Seed {
    dir: PathBuf,
    log: Log,
    entries: EntryIndex,
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn storage(e: sluice_storage::StorageError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Seed {
    /// The seed a partition's directory holds, if any. Blocking.
    pub fn open(partition_dir: &Path, config: &LogConfig) -> io::Result<Option<Self>> {
        let dir = partition_dir.join(SEED_DIR);
        if !dir.exists() {
            return Ok(None);
        }
        let log = Log::open(&dir, config.clone(), now_ms()).map_err(storage)?;
        let mut entries = EntryIndex::open(&dir.join(ENTRIES_FILE), log.log_end_offset())?;
        // Records whose batches did not survive a crash are dropped, batches no record
        // describes cut off, as the partition's own log does when it opens.
        while let Some((_, last)) = entries.last()? {
            if last.end_offset() <= log.log_end_offset() {
                break;
            }
            entries.pop()?;
        }
        let mut seed = Self { dir, log, entries };
        let described = seed.entries.end_offset()?;
        if seed.log.log_end_offset() > described {
            seed.log.truncate_to(described, now_ms()).map_err(storage)?;
        }
        Ok(Some(seed))
    }

    /// A new, empty seed whose first entry starts at `base_offset`, in place of any other.
    /// Blocking.
    pub fn create(partition_dir: &Path, config: &LogConfig, base_offset: u64) -> io::Result<Self> {
        remove(partition_dir)?;
        let dir = partition_dir.join(SEED_DIR);
        let log = Log::create_at(&dir, config.clone(), base_offset, now_ms()).map_err(storage)?;
        let entries = EntryIndex::open(&dir.join(ENTRIES_FILE), base_offset)?;
        sync_dir(partition_dir)?;
        Ok(Self { dir, log, entries })
    }

    /// The seed's last entry.
    pub fn last(&self) -> io::Result<Option<(u64, EntryLoc)>> {
        self.entries.last()
    }

    /// The seed's record of entry `index`.
    pub fn get(&self, index: u64) -> io::Result<Option<EntryLoc>> {
        self.entries.get(index)
    }

    /// Appends `range`, which must continue the seed (its first entry the one after the
    /// seed's last, or any when the seed is empty). Every entry's batches are checked and must
    /// land at the offsets its record gives. Blocking.
    pub fn append(&mut self, range: &Range) -> Result<(), String> {
        let mut at = 0usize;
        let now = now_ms();
        for (index, loc) in &range.entries {
            if let Some((last, last_loc)) = self.last().map_err(|e| e.to_string())?
                && (last + 1 != *index || last_loc.end_offset() != loc.base_offset)
            {
                return Err(format!(
                    "entry {index} at offset {} does not follow entry {last} ending at {}",
                    loc.base_offset,
                    last_loc.end_offset()
                ));
            }
            let bytes = range
                .bytes
                .get(at..at + loc.bytes as usize)
                .ok_or_else(|| format!("entry {index}: its batches were cut short"))?;
            at += loc.bytes as usize;
            let header = BatchHeader::parse(bytes).map_err(|e| format!("entry {index}: {e}"))?;
            if header.base_offset != loc.base_offset as i64
                || i64::from(header.partition_leader_epoch) != loc.term as i64
            {
                return Err(format!(
                    "entry {index}: its batch starts at {} in epoch {}, its record says {} in \
                     term {}",
                    header.base_offset, header.partition_leader_epoch, loc.base_offset, loc.term
                ));
            }
            let epoch = i32::try_from(loc.term)
                .map_err(|_| format!("entry {index}: term {} is no leader epoch", loc.term))?;
            let info = self
                .log
                .append_in_epoch(bytes, epoch, now)
                .map_err(|e| format!("entry {index}: {e}"))?;
            if info.base_offset != loc.base_offset || info.last_offset + 1 != loc.end_offset() {
                return Err(format!(
                    "entry {index} landed at offsets {} to {}, its record says {} to {}",
                    info.base_offset,
                    info.last_offset + 1,
                    loc.base_offset,
                    loc.end_offset()
                ));
            }
            self.entries
                .push(*index, *loc)
                .map_err(|e| format!("entry {index}: {e}"))?;
        }
        if at != range.bytes.len() {
            return Err(format!(
                "{} bytes sent for entries of {at} bytes",
                range.bytes.len()
            ));
        }
        Ok(())
    }

    /// Makes everything appended durable. Blocking.
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.flush().map_err(storage)?;
        self.entries.sync()
    }

    /// Drops the entries after `index` (the snapshot's entry). Blocking.
    fn cut_after(&mut self, index: u64) -> io::Result<()> {
        let Some(next) = self.entries.get(index + 1)? else {
            return Ok(());
        };
        self.log
            .truncate_to(next.base_offset, now_ms())
            .map_err(storage)?;
        self.entries.truncate_from(index + 1)
    }
}

/// Removes a partition's seed, if it has one. Blocking.
pub(crate) fn remove(partition_dir: &Path) -> io::Result<()> {
    let dir = partition_dir.join(SEED_DIR);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => sync_dir(partition_dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(context(e, "remove", &dir)),
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Phase {
    /// The old log's files are being deleted; the purge mark is to become `purged`.
    Deleting { purged: LogId },
    /// The seed's files are being moved in.
    Moving,
}

/// Puts `seed`, cut after `purged` (the snapshot's entry, which it must hold), in place of the
/// log in `partition_dir`: the old log's files (segments, indexes, log start, epochs, entry
/// index) are deleted, the purge mark becomes `purged`, and the seed's files are moved in.
/// The caller reopens the log. Blocking.
pub(crate) fn install(partition_dir: &Path, mut seed: Seed, purged: &LogId) -> io::Result<()> {
    match seed.get(purged.index)? {
        Some(loc) if loc.term == purged.leader_id.term => {}
        other => {
            return Err(io::Error::other(format!(
                "the seed in {} does not hold entry {purged} (it holds {other:?})",
                seed.dir.display()
            )));
        }
    }
    seed.cut_after(purged.index)?;
    seed.sync()?;
    let Seed { dir, log, entries } = seed;
    log.close().map_err(storage)?;
    drop(entries);
    sync_dir(&dir)?;
    let deleting =
        serde_json::to_vec(&Phase::Deleting { purged: *purged }).map_err(io::Error::other)?;
    replace_atomically(partition_dir, INSTALLING_FILE, &deleting)?;
    finish_install(partition_dir)
}

/// Finishes a seed's install that a crash interrupted (see [`install`]); nothing when none
/// was under way. Blocking: call it before the log is opened.
pub(crate) fn finish_install(partition_dir: &Path) -> io::Result<()> {
    let phase_path = partition_dir.join(INSTALLING_FILE);
    let phase: Phase = match std::fs::read(&phase_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt {}: {e}", phase_path.display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(context(e, "read", &phase_path)),
    };
    let seed_dir = partition_dir.join(SEED_DIR);
    if let Phase::Deleting { purged } = phase {
        for entry in
            std::fs::read_dir(partition_dir).map_err(|e| context(e, "list", partition_dir))?
        {
            let entry = entry.map_err(|e| context(e, "list", partition_dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if sluice_storage::log::is_log_file(name) || name == ENTRIES_FILE {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| context(e, "delete", &path))?;
            }
        }
        sync_dir(partition_dir)?;
        let bytes = serde_json::to_vec(&purged).map_err(io::Error::other)?;
        replace_atomically(partition_dir, super::log_store::PURGED_FILE, &bytes)?;
        let moving = serde_json::to_vec(&Phase::Moving).map_err(io::Error::other)?;
        replace_atomically(partition_dir, INSTALLING_FILE, &moving)?;
    }
    if seed_dir.exists() {
        for entry in std::fs::read_dir(&seed_dir).map_err(|e| context(e, "list", &seed_dir))? {
            let entry = entry.map_err(|e| context(e, "list", &seed_dir))?;
            let to = partition_dir.join(entry.file_name());
            std::fs::rename(entry.path(), &to).map_err(|e| context(e, "move", &to))?;
        }
        sync_dir(partition_dir)?;
        std::fs::remove_dir(&seed_dir).map_err(|e| context(e, "remove", &seed_dir))?;
    }
    std::fs::remove_file(&phase_path).map_err(|e| context(e, "remove", &phase_path))?;
    sync_dir(partition_dir)?;
    tracing::info!(dir = %partition_dir.display(), "a copy of another replica's retained log took this replica's log's place");
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use sluice_storage::record::BatchBuilder;

    use super::*;

    fn config() -> LogConfig {
        LogConfig {
            segment_bytes: 4096,
            ..LogConfig::default()
        }
    }

    /// `count` one-record entries of term 3 from entry 7, stored in a log starting at offset
    /// 500 in `dir`: the range another replica would send.
    fn source_range(dir: &Path, count: usize) -> Range {
        let mut log = Log::create_at(dir, config(), 500, 0).unwrap();
        let mut entries = Vec::new();
        for i in 0..count {
            let mut builder = BatchBuilder::new(0);
            builder.push(0, None, Some(&[i as u8; 300]), &[]);
            let batch = builder.finish();
            let info = log.append_in_epoch(&batch, 3, 0).unwrap();
            let loc = EntryLoc {
                term: 3,
                base_offset: info.base_offset,
                records: 1,
                bytes: batch.len() as u32,
            };
            entries.push((7 + i as u64, loc));
        }
        let mut bytes = Vec::new();
        let mut at = 500;
        while at < log.log_end_offset() {
            let read = log.read(at, 1 << 20, true).unwrap();
            at = sluice_storage::batch::Batches::new(&read.bytes)
                .map(|batch| batch.unwrap().0.next_offset() as u64)
                .last()
                .unwrap();
            bytes.extend_from_slice(&read.bytes);
        }
        Range {
            entries,
            bytes: Bytes::from(bytes),
        }
    }

    /// A partition directory holding an old log (offsets 0 to 20) and its entry index.
    fn old_log(dir: &Path) {
        let mut log = Log::open(dir, config(), 0).unwrap();
        let mut entries = EntryIndex::open(&dir.join(ENTRIES_FILE), 0).unwrap();
        for index in 1..=20 {
            let mut builder = BatchBuilder::new(0);
            builder.push(0, None, Some(b"old"), &[]);
            let info = log.append_in_epoch(&builder.finish(), 1, 0).unwrap();
            let loc = EntryLoc {
                term: 1,
                base_offset: info.base_offset,
                records: 1,
                bytes: 0,
            };
            entries.push(index, loc).unwrap();
        }
        log.close().unwrap();
    }

    fn purged(term: u64, index: u64) -> LogId {
        LogId::new_term_index(term, index)
    }

    /// What the partition directory holds after an install: its log's start and end, its
    /// entry index's first and last entry, and the purge mark.
    fn installed(dir: &Path) -> (u64, u64, u64, u64, LogId) {
        let log = Log::open(dir, config(), 0).unwrap();
        let entries = EntryIndex::open(&dir.join(ENTRIES_FILE), log.log_end_offset()).unwrap();
        let mark: LogId = serde_json::from_slice(
            &std::fs::read(dir.join(super::super::log_store::PURGED_FILE)).unwrap(),
        )
        .unwrap();
        assert!(!dir.join(SEED_DIR).exists() && !dir.join(INSTALLING_FILE).exists());
        let last = entries.last().unwrap().unwrap().0;
        (
            log.log_start_offset(),
            log.log_end_offset(),
            entries.first_index(),
            last,
            mark,
        )
    }

    #[test]
    fn a_seed_takes_the_log_s_place_cut_after_the_snapshot_s_entry() {
        let dir = tempfile::tempdir().unwrap();
        let range = source_range(&dir.path().join("source"), 30);
        old_log(dir.path());
        let mut seed = Seed::create(dir.path(), &config(), 500).unwrap();
        // A range that does not start where the seed ends is refused.
        let mut late = range.clone();
        late.entries[0].1.base_offset += 1;
        assert!(seed.append(&late).is_err());
        seed.append(&range).unwrap();
        assert_eq!(seed.last().unwrap().map(|(i, _)| i), Some(36));
        // The next range must follow entry 36.
        assert!(seed.append(&range).unwrap_err().contains("does not follow"));
        // A snapshot of another term at entry 30 is not this seed's.
        let seed = Seed::open(dir.path(), &config()).unwrap().unwrap();
        assert!(install(dir.path(), seed, &purged(4, 30)).is_err());
        let seed = Seed::open(dir.path(), &config()).unwrap().unwrap();
        install(dir.path(), seed, &purged(3, 30)).unwrap();
        // Entries 7 to 30 (offsets 500 to 524) are the log now; the old one is gone.
        assert_eq!(installed(dir.path()), (500, 524, 7, 30, purged(3, 30)));
    }

    #[test]
    fn an_install_a_crash_interrupted_is_finished_when_the_log_opens() {
        for moved_before_crash in [None, Some(0), Some(2)] {
            let dir = tempfile::tempdir().unwrap();
            let range = source_range(&dir.path().join("source"), 10);
            old_log(dir.path());
            let mut seed = Seed::create(dir.path(), &config(), 500).unwrap();
            seed.append(&range).unwrap();
            seed.sync().unwrap();
            let Seed { log, .. } = seed;
            log.close().unwrap();
            let phase = match moved_before_crash {
                // Crashed while deleting the old log's files.
                None => Phase::Deleting {
                    purged: purged(3, 16),
                },
                // Crashed after the deletes, with some of the seed's files moved in.
                Some(moved) => {
                    for entry in std::fs::read_dir(dir.path()).unwrap() {
                        let entry = entry.unwrap();
                        let name = entry.file_name().into_string().unwrap();
                        if sluice_storage::log::is_log_file(&name) || name == ENTRIES_FILE {
                            std::fs::remove_file(entry.path()).unwrap();
                        }
                    }
                    let mark = serde_json::to_vec(&purged(3, 16)).unwrap();
                    replace_atomically(dir.path(), super::super::log_store::PURGED_FILE, &mark)
                        .unwrap();
                    let seed_dir = dir.path().join(SEED_DIR);
                    let mut names: Vec<_> = std::fs::read_dir(&seed_dir)
                        .unwrap()
                        .map(|e| e.unwrap().file_name())
                        .collect();
                    names.sort();
                    for name in names.iter().take(moved) {
                        std::fs::rename(seed_dir.join(name), dir.path().join(name)).unwrap();
                    }
                    Phase::Moving
                }
            };
            let bytes = serde_json::to_vec(&phase).unwrap();
            replace_atomically(dir.path(), INSTALLING_FILE, &bytes).unwrap();
            finish_install(dir.path()).unwrap();
            // The whole seed (an install cuts it after the snapshot's entry before the phase
            // file is written; here it was not cut) and the mark.
            assert_eq!(
                installed(dir.path()),
                (500, 510, 7, 16, purged(3, 16)),
                "{moved_before_crash:?}"
            );
            // Nothing left to finish.
            finish_install(dir.path()).unwrap();
        }
    }
}
