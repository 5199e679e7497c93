//! The acknowledgement journal of a queue: which offsets of its log are settled.
//!
//! File `acks` in the queue's directory: a run of 20-byte entries, each `start: u64, end: u64,
//! crc32c(start, end): u32` (big-endian), meaning every offset in `start..end` is settled
//! (acknowledged, dropped, expired or dead-lettered). Entries are appended with one write per
//! batch of settlements, so an acknowledgement survives the process being killed as soon as
//! the queue has handled it; the file is fsynced on housekeeping ticks and at close.
//!
//! Recovery reads every whole entry whose checksum holds and cuts the file after the last one
//! (a torn tail). The journal is rewritten atomically, holding only the settled ranges above the
//! log start offset, whenever it grows past a bound; the log start offset itself advances past
//! fully settled prefixes, which lets the log delete whole segments.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use sluice_storage::StorageError;
use sluice_storage::checkpoint;

use super::ranges::RangeSet;

pub const FILE_NAME: &str = "acks";
const ENTRY_BYTES: usize = 20;

/// Rewrite the journal once it holds this many entries.
pub const COMPACT_AFTER_ENTRIES: u64 = 16_384;

#[derive(Debug)]
pub struct AckJournal {
    path: PathBuf,
    file: File,
    entry_count: u64,
    pending: Vec<u8>,
    /// The last range recorded but not yet encoded, so consecutive settlements merge.
    open_range: Option<Range<u64>>,
    dirty: bool,
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> StorageError {
    StorageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn encode(range: &Range<u64>, out: &mut Vec<u8>) {
    let mut entry = [0u8; ENTRY_BYTES];
    entry[..8].copy_from_slice(&range.start.to_be_bytes());
    entry[8..16].copy_from_slice(&range.end.to_be_bytes());
    let crc = crc32c::crc32c(&entry[..16]);
    entry[16..].copy_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&entry);
}

impl AckJournal {
    /// Opens (or creates) the journal in `dir` and returns the settled offsets it records.
    pub fn open(dir: &Path) -> Result<(Self, RangeSet), StorageError> {
        let path = dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(io("read", &path, source)),
        };
        let mut settled = RangeSet::new();
        let mut valid = 0;
        for entry in bytes.chunks_exact(ENTRY_BYTES) {
            let crc = u32::from_be_bytes([entry[16], entry[17], entry[18], entry[19]]);
            if crc32c::crc32c(&entry[..16]) != crc {
                break;
            }
            let mut start = [0u8; 8];
            start.copy_from_slice(&entry[..8]);
            let mut end = [0u8; 8];
            end.copy_from_slice(&entry[8..16]);
            let (start, end) = (u64::from_be_bytes(start), u64::from_be_bytes(end));
            if start >= end {
                break;
            }
            settled.insert_range(start..end);
            valid += ENTRY_BYTES;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| io("open", &path, source))?;
        if valid < bytes.len() {
            tracing::warn!(path = %path.display(), cut_bytes = bytes.len() - valid, "cutting a torn acknowledgement journal tail");
            file.set_len(valid as u64)
                .map_err(|source| io("truncate", &path, source))?;
        }
        Ok((
            Self {
                path,
                file,
                entry_count: (valid / ENTRY_BYTES) as u64,
                pending: Vec::new(),
                open_range: None,
                dirty: false,
            },
            settled,
        ))
    }

    pub fn entry_count(&self) -> u64 {
        self.entry_count
    }

    /// Notes that `range` is settled; written by the next [`Self::flush`].
    pub fn record(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        match &mut self.open_range {
            Some(open) if open.end == range.start => open.end = range.end,
            Some(open) if range.end == open.start => open.start = range.start,
            open => {
                if let Some(previous) = open.take() {
                    encode(&previous, &mut self.pending);
                    self.entry_count += 1;
                }
                *open = Some(range);
            }
        }
    }

    /// Writes what was recorded (no fsync).
    pub fn flush(&mut self) -> Result<(), StorageError> {
        if let Some(open) = self.open_range.take() {
            encode(&open, &mut self.pending);
            self.entry_count += 1;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.pending)
            .map_err(|source| io("write", &self.path, source))?;
        self.pending.clear();
        self.dirty = true;
        Ok(())
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.flush()?;
        if self.dirty {
            sluice_storage::sync::data(&self.file)
                .map_err(|source| io("sync", &self.path, source))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Replaces the journal with exactly `settled`, atomically.
    pub fn rewrite(&mut self, settled: &RangeSet) -> Result<(), StorageError> {
        self.flush()?;
        let mut bytes = Vec::with_capacity(settled.range_count() * ENTRY_BYTES);
        for range in settled.ranges() {
            encode(&range, &mut bytes);
        }
        checkpoint::write_atomically(&self.path, &bytes)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|source| io("open", &self.path, source))?;
        self.entry_count = settled.range_count() as u64;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, settled) = AckJournal::open(dir.path()).unwrap();
        assert!(settled.is_empty());
        journal.record(0..1);
        journal.record(1..2);
        journal.record(5..6);
        journal.flush().unwrap();
        assert_eq!(journal.entry_count(), 2);
        drop(journal);
        // A torn entry at the end.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &bytes).unwrap();
        let (mut journal, settled) = AckJournal::open(dir.path()).unwrap();
        assert_eq!(settled.iter().collect::<Vec<_>>(), vec![0, 1, 5]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 40);
        let mut compact = RangeSet::new();
        compact.insert(5);
        journal.rewrite(&compact).unwrap();
        journal.record(6..7);
        journal.sync().unwrap();
        drop(journal);
        let (_, settled) = AckJournal::open(dir.path()).unwrap();
        assert_eq!(settled.iter().collect::<Vec<_>>(), vec![5, 6]);
    }
}
