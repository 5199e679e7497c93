//! Sparse per-segment indexes: offset → file position, and timestamp → offset.
//!
//! Both are arrays of fixed-size big-endian entries, kept whole in memory (one entry per
//! `index_interval_bytes` of log, so about 0.2% of the log's size for the offset index) and
//! mirrored in a file beside the segment. The file is only a cache: it is written lazily (on
//! flush points, roll and close), validated on open, and rebuilt from the log when it does not
//! agree with it. Entries are strictly increasing in both fields; a file that breaks that rule is
//! cut at the first entry that does.
//!
//! | file          | entry bytes | fields                                         |
//! |---------------|-------------|------------------------------------------------|
//! | `.index`      | 8           | relative offset: u32, position: u32            |
//! | `.timeindex`  | 12          | max timestamp so far: i64, relative offset: u32 |
//!
//! Concurrency: the log's single writer pushes entries; readers look entries up under a short
//! read lock. No lock is held during I/O on the log file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock};

/// A fixed-size index entry.
pub(crate) trait IndexEntry: Copy + Send + Sync + 'static {
    const BYTES: usize;
    fn encode(&self, out: &mut [u8]);
    fn decode(raw: &[u8]) -> Self;
    /// True if `self` may follow `previous` in a valid index.
    fn follows(&self, previous: &Self) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

impl IndexEntry for OffsetEntry {
    const BYTES: usize = 8;

    fn encode(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.relative_offset.to_be_bytes());
        out[4..8].copy_from_slice(&self.position.to_be_bytes());
    }

    fn decode(raw: &[u8]) -> Self {
        Self {
            relative_offset: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
            position: u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]),
        }
    }

    fn follows(&self, previous: &Self) -> bool {
        self.relative_offset > previous.relative_offset && self.position > previous.position
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    /// The largest batch max-timestamp seen in the segment up to and including the batch at
    /// `relative_offset`.
    pub timestamp_ms: i64,
    pub relative_offset: u32,
}

impl IndexEntry for TimeEntry {
    const BYTES: usize = 12;

    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        out[8..12].copy_from_slice(&self.relative_offset.to_be_bytes());
    }

    fn decode(raw: &[u8]) -> Self {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        Self {
            timestamp_ms: i64::from_be_bytes(ts),
            relative_offset: u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]),
        }
    }

    fn follows(&self, previous: &Self) -> bool {
        self.timestamp_ms > previous.timestamp_ms && self.relative_offset > previous.relative_offset
    }
}

/// An index in memory plus the file that caches it.
#[derive(Debug)]
pub(crate) struct SparseIndex<E> {
    path: PathBuf,
    file: File,
    entries: RwLock<Vec<E>>,
    /// How many leading entries the file already holds. Touched only by the writer.
    persisted_count: Mutex<usize>,
}

/// What was found when loading an index file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loaded {
    /// The file did not exist (and has now been created empty).
    Missing,
    /// Every entry was well-formed.
    Clean,
    /// The file was cut at the first malformed entry.
    Cut {
        kept_count: usize,
        file_count: usize,
    },
}

impl<E: IndexEntry> SparseIndex<E> {
    /// Opens or creates the index file and loads the well-formed prefix of its entries.
    pub fn open(path: &Path) -> io::Result<(Self, Loaded)> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut entries = Vec::new();
        let mut loaded = if existed {
            Loaded::Clean
        } else {
            Loaded::Missing
        };
        if existed {
            let raw = std::fs::read(path)?;
            let file_count = raw.len() / E::BYTES;
            entries.reserve(file_count);
            for chunk in raw.chunks_exact(E::BYTES) {
                let entry = E::decode(chunk);
                if let Some(previous) = entries.last()
                    && !entry.follows(previous)
                {
                    break;
                }
                entries.push(entry);
            }
            if entries.len() != file_count || raw.len() % E::BYTES != 0 {
                loaded = Loaded::Cut {
                    kept_count: entries.len(),
                    file_count,
                };
                file.set_len((entries.len() * E::BYTES) as u64)?;
            }
        }
        let persisted = entries.len();
        Ok((
            Self {
                path: path.to_owned(),
                file,
                entries: RwLock::new(entries),
                persisted_count: Mutex::new(persisted),
            },
            loaded,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.read().len()
    }

    pub fn last(&self) -> Option<E> {
        self.entries.read().last().copied()
    }

    /// Appends an entry in memory; it reaches the file at the next [`Self::persist`].
    pub fn push(&self, entry: E) {
        let mut entries = self.entries.write();
        debug_assert!(entries.last().is_none_or(|last| entry.follows(last)));
        entries.push(entry);
    }

    /// Runs `f` over the entries under the read lock. `f` must not do I/O.
    pub fn with_entries<R>(&self, f: impl FnOnce(&[E]) -> R) -> R {
        f(&self.entries.read())
    }

    /// Keeps only the entries for which `keep` holds on a prefix basis: the first entry that
    /// fails and every later one are dropped, in memory and in the file.
    pub fn retain_prefix(&self, keep: impl Fn(&E) -> bool) -> io::Result<()> {
        let mut entries = self.entries.write();
        let kept = entries.iter().take_while(|entry| keep(entry)).count();
        if kept == entries.len() {
            return Ok(());
        }
        entries.truncate(kept);
        let mut persisted = self.persisted_count.lock();
        if *persisted > kept {
            *persisted = kept;
            self.file.set_len((kept * E::BYTES) as u64)?;
        }
        Ok(())
    }

    /// Drops every entry, in memory and in the file.
    pub fn clear(&self) -> io::Result<()> {
        self.retain_prefix(|_| false)
    }

    /// Writes the entries the file does not hold yet.
    pub fn persist(&self) -> io::Result<()> {
        let mut persisted = self.persisted_count.lock();
        let pending: Vec<u8> = {
            let entries = self.entries.read();
            if *persisted >= entries.len() {
                return Ok(());
            }
            let mut raw = vec![0u8; (entries.len() - *persisted) * E::BYTES];
            for (entry, out) in entries[*persisted..]
                .iter()
                .zip(raw.chunks_exact_mut(E::BYTES))
            {
                entry.encode(out);
            }
            raw
        };
        self.file
            .write_all_at(&pending, (*persisted * E::BYTES) as u64)?;
        *persisted += pending.len() / E::BYTES;
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        crate::sync::data(&self.file)
    }
}

impl SparseIndex<OffsetEntry> {
    /// The entry with the largest relative offset at or below `relative_offset`.
    pub fn floor(&self, relative_offset: u32) -> Option<OffsetEntry> {
        self.with_entries(|entries| {
            let after = entries.partition_point(|e| e.relative_offset <= relative_offset);
            after.checked_sub(1).map(|at| entries[at])
        })
    }
}

impl SparseIndex<TimeEntry> {
    /// The last entry whose timestamp is strictly below `timestamp_ms`: every batch up to and
    /// including that entry's batch has a max timestamp below the target.
    pub fn last_below(&self, timestamp_ms: i64) -> Option<TimeEntry> {
        self.with_entries(|entries| {
            let after = entries.partition_point(|e| e.timestamp_ms < timestamp_ms);
            after.checked_sub(1).map(|at| entries[at])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_persist_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.index");
        let (index, loaded) = SparseIndex::<OffsetEntry>::open(&path).unwrap();
        assert_eq!(loaded, Loaded::Missing);
        for i in 1..=10u32 {
            index.push(OffsetEntry {
                relative_offset: i * 10,
                position: i * 100,
            });
        }
        index.persist().unwrap();
        drop(index);
        let (index, loaded) = SparseIndex::<OffsetEntry>::open(&path).unwrap();
        assert_eq!(loaded, Loaded::Clean);
        assert_eq!(index.len(), 10);
        assert_eq!(index.floor(55).unwrap().relative_offset, 50);
        assert_eq!(index.floor(5), None);
    }

    #[test]
    fn garbage_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.timeindex");
        let (index, _) = SparseIndex::<TimeEntry>::open(&path).unwrap();
        index.push(TimeEntry {
            timestamp_ms: 5,
            relative_offset: 1,
        });
        index.push(TimeEntry {
            timestamp_ms: 9,
            relative_offset: 4,
        });
        index.persist().unwrap();
        drop(index);
        // Zeroes after a crash, plus a partial entry.
        let mut raw = std::fs::read(&path).unwrap();
        raw.extend_from_slice(&[0u8; 12 + 5]);
        std::fs::write(&path, raw).unwrap();
        let (index, loaded) = SparseIndex::<TimeEntry>::open(&path).unwrap();
        assert_eq!(
            loaded,
            Loaded::Cut {
                kept_count: 2,
                file_count: 3
            }
        );
        assert_eq!(index.last_below(9).unwrap().relative_offset, 1);
        assert_eq!(index.last_below(10).unwrap().relative_offset, 4);
        assert_eq!(index.last_below(5), None);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24);
    }

    #[test]
    fn retain_prefix_shrinks_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.index");
        let (index, _) = SparseIndex::<OffsetEntry>::open(&path).unwrap();
        for i in 1..=4u32 {
            index.push(OffsetEntry {
                relative_offset: i,
                position: i,
            });
        }
        index.persist().unwrap();
        index.retain_prefix(|e| e.relative_offset < 3).unwrap();
        assert_eq!(index.len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16);
    }
}
