//! The leader-epoch cache: which partition leader epoch started at which offset.
//!
//! Every batch carries the epoch of the leader that appended it, in a header field the CRC
//! does not cover. This cache, persisted in `leader-epoch-checkpoint`, is what recovery checks
//! that field against, and what answers "where did epoch E end" for replicas and clients.
//!
//! File format (text, like Kafka's): a version line `0`, a count line, then one
//! `<epoch> <start offset>` line per entry, epochs and offsets strictly increasing.

use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::error::StorageError;

pub(crate) const FILE_NAME: &str = "leader-epoch-checkpoint";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EpochEntry {
    pub epoch: i32,
    pub start_offset: u64,
}

#[derive(Debug)]
pub(crate) struct EpochCache {
    path: PathBuf,
    entries: Vec<EpochEntry>,
}

impl EpochCache {
    /// Loads the cache. `None` if the file does not exist.
    pub fn load(dir: &Path) -> Result<Option<Self>, StorageError> {
        let path = dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StorageError::io("read", &path, source)),
        };
        let corrupt = |reason: String| StorageError::Corrupt {
            path: path.clone(),
            position: 0,
            reason,
        };
        let mut lines = text.lines();
        if lines.next() != Some("0") {
            return Err(corrupt("unknown version line".into()));
        }
        let count: usize = lines
            .next()
            .and_then(|line| line.trim().parse().ok())
            .ok_or_else(|| corrupt("bad count line".into()))?;
        let mut entries: Vec<EpochEntry> = Vec::with_capacity(count.min(1024));
        for line in lines {
            let mut fields = line.split_whitespace();
            let (Some(epoch), Some(start), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(corrupt(format!("bad entry line {line:?}")));
            };
            let entry = EpochEntry {
                epoch: epoch
                    .parse()
                    .map_err(|_| corrupt(format!("bad epoch in {line:?}")))?,
                start_offset: start
                    .parse()
                    .map_err(|_| corrupt(format!("bad offset in {line:?}")))?,
            };
            if let Some(last) = entries.last()
                && (entry.epoch <= last.epoch || entry.start_offset < last.start_offset)
            {
                return Err(corrupt(format!(
                    "entry {line:?} does not follow the previous one"
                )));
            }
            entries.push(entry);
        }
        if entries.len() != count {
            return Err(corrupt(format!(
                "count line says {count} entries, file holds {}",
                entries.len()
            )));
        }
        Ok(Some(Self { path, entries }))
    }

    /// A cache whose first entry starts at `start_offset`.
    pub fn create(dir: &Path, epoch: i32, start_offset: u64) -> Result<Self, StorageError> {
        let cache = Self {
            path: dir.join(FILE_NAME),
            entries: vec![EpochEntry {
                epoch,
                start_offset,
            }],
        };
        cache.persist()?;
        Ok(cache)
    }

    fn persist(&self) -> Result<(), StorageError> {
        let mut text = format!("0\n{}\n", self.entries.len());
        for entry in &self.entries {
            text.push_str(&format!("{} {}\n", entry.epoch, entry.start_offset));
        }
        checkpoint::write_atomically(&self.path, text.as_bytes())
    }

    /// The epoch new batches are stamped with.
    pub fn current(&self) -> i32 {
        self.entries.last().map_or(0, |entry| entry.epoch)
    }

    /// The epoch a batch starting at `offset` must carry, if the cache covers it.
    pub fn expected_for(&self, offset: u64) -> Option<i32> {
        let after = self.entries.partition_point(|e| e.start_offset <= offset);
        after.checked_sub(1).map(|at| self.entries[at].epoch)
    }

    /// Starts `epoch` at `start_offset`. Epochs only move forward.
    pub fn begin(&mut self, epoch: i32, start_offset: u64) -> Result<(), StorageError> {
        if epoch <= self.current() && !self.entries.is_empty() {
            return Ok(());
        }
        // An earlier epoch that never got a batch is replaced rather than kept empty.
        while self
            .entries
            .last()
            .is_some_and(|last| last.start_offset >= start_offset)
        {
            self.entries.pop();
        }
        self.entries.push(EpochEntry {
            epoch,
            start_offset,
        });
        self.persist()
    }

    /// Makes `epoch` the one batches from `start_offset` (the log end) on carry, whether it is
    /// newer or older than the current one: a replicated log follows its leader, and after a
    /// divergent tail was truncated the next batches may belong to an epoch older than the one
    /// the removed tail had. Entries starting at or after `start_offset` are dropped first.
    /// Epochs before `start_offset` newer than `epoch` are an error: a log's epochs never go
    /// backwards.
    pub fn set_from(&mut self, epoch: i32, start_offset: u64) -> Result<(), StorageError> {
        let mut entries = self.entries.clone();
        while entries
            .last()
            .is_some_and(|last| last.start_offset >= start_offset)
        {
            entries.pop();
        }
        match entries.last() {
            Some(last) if last.epoch > epoch => {
                return Err(StorageError::Corrupt {
                    path: self.path.clone(),
                    position: 0,
                    reason: format!(
                        "epoch {epoch} at offset {start_offset} would follow epoch {} at offset {}",
                        last.epoch, last.start_offset
                    ),
                });
            }
            Some(last) if last.epoch == epoch => {}
            _ => entries.push(EpochEntry {
                epoch,
                start_offset,
            }),
        }
        if entries == self.entries {
            return Ok(());
        }
        self.entries = entries;
        self.persist()
    }

    /// After the log end moved back to `log_end_offset`, no epoch may start past it.
    pub fn clamp_to(&mut self, log_end_offset: u64) -> Result<(), StorageError> {
        if self
            .entries
            .last()
            .is_none_or(|last| last.start_offset <= log_end_offset)
        {
            return Ok(());
        }
        let current = self.current();
        self.entries.retain(|e| e.start_offset < log_end_offset);
        self.entries.push(EpochEntry {
            epoch: current,
            start_offset: log_end_offset,
        });
        self.persist()
    }

    /// The answer to "where did `epoch` end": the largest known epoch at or below it, and the
    /// start of the next epoch (or the log end offset if it is the latest). `None` if `epoch`
    /// is older than everything the cache knows.
    pub fn end_offset_for(&self, epoch: i32, log_end_offset: u64) -> Option<(i32, u64)> {
        let after = self.entries.partition_point(|e| e.epoch <= epoch);
        let found = self.entries.get(after.checked_sub(1)?)?;
        let end = self
            .entries
            .get(after)
            .map_or(log_end_offset, |next| next.start_offset);
        Some((found.epoch, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_clamp_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = EpochCache::create(dir.path(), 0, 0).unwrap();
        cache.begin(1, 10).unwrap();
        cache.begin(3, 25).unwrap();
        assert_eq!(cache.expected_for(9), Some(0));
        assert_eq!(cache.expected_for(10), Some(1));
        assert_eq!(cache.expected_for(99), Some(3));
        assert_eq!(cache.end_offset_for(0, 40), Some((0, 10)));
        assert_eq!(cache.end_offset_for(2, 40), Some((1, 25)));
        assert_eq!(cache.end_offset_for(3, 40), Some((3, 40)));
        cache.clamp_to(20).unwrap();
        assert_eq!(cache.current(), 3);
        assert_eq!(cache.expected_for(20), Some(3));
        let reloaded = EpochCache::load(dir.path()).unwrap().unwrap();
        assert_eq!(reloaded.entries, cache.entries);
    }

    #[test]
    fn damaged_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "0\n2\n1 5\n").unwrap();
        let error = EpochCache::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains(FILE_NAME), "{error}");
    }
}
