//! The entry index of a partition's Raft log: for each Raft index, the term and the offsets
//! and size of the batches that hold the entry.
//!
//! # The `raft-entries` file
//! A 24-byte header, `SLRENT01` then the Raft index of the first record and the Kafka offset
//! it starts at (u64 LE each), then one 32-byte record per entry in index order:
//! `[term u64][base offset u64][records u32][bytes u32][crc32c of the 24 bytes before u32]
//! [zero u32]`, all little-endian. Records are fixed-size, so entry `i` is at
//! `24 + 32 * (i - first index)` and nothing of the index is held in memory but its bounds.
//!
//! An entry's batches are written to the segments before its record is written here, and both
//! are synced before the append is reported durable. Opening checks every record's CRC: a bad
//! record with no good one after it is a write a crash interrupted and is cut off; one followed
//! by a good record is damage, an error naming the file and position.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::files::context;

const MAGIC: &[u8; 8] = b"SLRENT01";
const HEADER_BYTES: u64 = 24;
const RECORD_BYTES: u64 = 32;

/// Where one entry is in the segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryLoc {
    pub term: u64,
    pub base_offset: u64,
    pub records: u32,
    pub bytes: u32,
}

impl EntryLoc {
    /// The offset after the entry's last record.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.records)
    }

    fn encode(&self) -> [u8; RECORD_BYTES as usize] {
        let mut raw = [0u8; RECORD_BYTES as usize];
        raw[0..8].copy_from_slice(&self.term.to_le_bytes());
        raw[8..16].copy_from_slice(&self.base_offset.to_le_bytes());
        raw[16..20].copy_from_slice(&self.records.to_le_bytes());
        raw[20..24].copy_from_slice(&self.bytes.to_le_bytes());
        let crc = crc32c::crc32c(&raw[..24]);
        raw[24..28].copy_from_slice(&crc.to_le_bytes());
        raw
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
        if raw.len() < RECORD_BYTES as usize || crc32c::crc32c(&raw[..24]) != u32_at(24) {
            return None;
        }
        Some(Self {
            term: u64_at(0),
            base_offset: u64_at(8),
            records: u32_at(16),
            bytes: u32_at(20),
        })
    }
}

/// The open entry index. Reads take `&self` and may run beside writes from other threads
/// (through [`EntryIndex::reader`]).
#[derive(Debug)]
pub struct EntryIndex {
    path: PathBuf,
    file: Arc<File>,
    first_index: u64,
    first_base: u64,
    count: u64,
}

/// A handle that reads records without the writer's lock.
#[derive(Debug, Clone)]
pub struct EntryReader {
    path: PathBuf,
    file: Arc<File>,
}

impl EntryReader {
    /// The record at `position` (0-based from the first), checked.
    pub fn read(&self, position: u64) -> io::Result<EntryLoc> {
        read_record(&self.file, &self.path, position)
    }
}

fn read_record(file: &File, path: &Path, position: u64) -> io::Result<EntryLoc> {
    let mut raw = [0u8; RECORD_BYTES as usize];
    let at = HEADER_BYTES + RECORD_BYTES * position;
    file.read_exact_at(&mut raw, at)
        .map_err(|e| context(e, "read", path))?;
    EntryLoc::decode(&raw).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "damaged Raft entry record in {} at byte {at} (checksum mismatch)",
                path.display()
            ),
        )
    })
}

impl EntryIndex {
    /// Opens `path`, creating it (its first entry to start at `log_end_offset`) if missing.
    /// Blocking.
    pub fn open(path: &Path, log_end_offset: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| context(e, "open", path))?;
        let len = file.metadata().map_err(|e| context(e, "stat", path))?.len();
        let mut index = Self {
            path: path.to_owned(),
            file: Arc::new(file),
            first_index: 0,
            first_base: log_end_offset,
            count: 0,
        };
        if len < HEADER_BYTES {
            // New, or a crash cut its header short before any record was written.
            index.write_header(0, log_end_offset)?;
            index.sync()?;
            return Ok(index);
        }
        let mut header = [0u8; HEADER_BYTES as usize];
        index
            .file
            .read_exact_at(&mut header, 0)
            .map_err(|e| context(e, "read", path))?;
        if &header[..8] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a Raft entry index (bad magic)", path.display()),
            ));
        }
        index.first_index = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        index.first_base = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        let whole = (len - HEADER_BYTES) / RECORD_BYTES;
        let mut bytes = vec![0u8; (whole * RECORD_BYTES) as usize];
        index
            .file
            .read_exact_at(&mut bytes, HEADER_BYTES)
            .map_err(|e| context(e, "read", path))?;
        let records: Vec<&[u8]> = bytes.chunks(RECORD_BYTES as usize).collect();
        let mut good = 0;
        for (position, raw) in records.iter().enumerate() {
            if EntryLoc::decode(raw).is_some() {
                good = position as u64 + 1;
                continue;
            }
            if records[position + 1..]
                .iter()
                .any(|later| EntryLoc::decode(later).is_some())
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "damaged Raft entry record in {} at byte {} (checksum mismatch)",
                        path.display(),
                        HEADER_BYTES + RECORD_BYTES * position as u64
                    ),
                ));
            }
            break;
        }
        index.count = good;
        if len != HEADER_BYTES + RECORD_BYTES * good {
            tracing::warn!(
                file = %path.display(),
                kept = good,
                cut_bytes = len - (HEADER_BYTES + RECORD_BYTES * good),
                "cutting off the end of a Raft entry index: a record there was cut short by a crash",
            );
            index.set_len()?;
        }
        Ok(index)
    }

    pub fn reader(&self) -> EntryReader {
        EntryReader {
            path: self.path.clone(),
            file: Arc::clone(&self.file),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The index of the first record (meaningful only when there is one).
    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// The offset the first record starts at, or the next entry will when there is none.
    pub fn first_base(&self) -> u64 {
        self.first_base
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The index after the last record.
    pub fn end_index(&self) -> u64 {
        self.first_index + self.count
    }

    /// The record of Raft index `index`, if the file holds one.
    pub fn get(&self, index: u64) -> io::Result<Option<EntryLoc>> {
        if index < self.first_index || index >= self.end_index() {
            return Ok(None);
        }
        read_record(&self.file, &self.path, index - self.first_index).map(Some)
    }

    /// The last record, if any.
    pub fn last(&self) -> io::Result<Option<(u64, EntryLoc)>> {
        if self.count == 0 {
            return Ok(None);
        }
        let index = self.end_index() - 1;
        Ok(self.get(index)?.map(|loc| (index, loc)))
    }

    /// The offset the next entry's batches start at.
    pub fn end_offset(&self) -> io::Result<u64> {
        Ok(self
            .last()?
            .map_or(self.first_base, |(_, loc)| loc.end_offset()))
    }

    /// The last entry whose batches start below `offset` (the records are in offset order),
    /// if any.
    pub fn last_below(&self, offset: u64) -> io::Result<Option<(u64, EntryLoc)>> {
        // The first position whose entry starts at or after `offset`.
        let (mut low, mut high) = (0, self.count);
        while low < high {
            let mid = low + (high - low) / 2;
            if read_record(&self.file, &self.path, mid)?.base_offset < offset {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        if low == 0 {
            return Ok(None);
        }
        let index = self.first_index + low - 1;
        Ok(self.get(index)?.map(|loc| (index, loc)))
    }

    /// Adds the record of entry `index`: the next one, or any index when there are none.
    pub fn push(&mut self, index: u64, loc: EntryLoc) -> io::Result<()> {
        if self.count == 0 {
            self.write_header(index, loc.base_offset)?;
        } else if index != self.end_index() {
            return Err(io::Error::other(format!(
                "Raft entry {index} appended after entry {} in {}",
                self.end_index() - 1,
                self.path.display()
            )));
        }
        let at = HEADER_BYTES + RECORD_BYTES * self.count;
        self.file
            .write_all_at(&loc.encode(), at)
            .map_err(|e| context(e, "write", &self.path))?;
        self.count += 1;
        Ok(())
    }

    /// Removes the records of `index` and every later entry, and syncs the cut.
    pub fn truncate_from(&mut self, index: u64) -> io::Result<()> {
        if index >= self.end_index() {
            return Ok(());
        }
        if index <= self.first_index {
            // Nothing is left: the next entry starts where the first removed one did.
            if let Some(first) = self.get(self.first_index)? {
                self.write_header(self.first_index, first.base_offset)?;
            }
        }
        self.count = index.saturating_sub(self.first_index);
        self.set_len()?;
        self.sync()
    }

    /// Makes the first record describe `first_base` again after the log below was replaced.
    fn write_header(&mut self, first_index: u64, first_base: u64) -> io::Result<()> {
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&first_index.to_le_bytes());
        header[16..24].copy_from_slice(&first_base.to_le_bytes());
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| context(e, "write", &self.path))?;
        self.first_index = first_index;
        self.first_base = first_base;
        Ok(())
    }

    /// Drops the last record (its batches did not survive a crash).
    pub fn pop(&mut self) -> io::Result<()> {
        if self.count > 0 {
            self.count -= 1;
            self.set_len()?;
        }
        Ok(())
    }

    fn set_len(&self) -> io::Result<()> {
        self.file
            .set_len(HEADER_BYTES + RECORD_BYTES * self.count)
            .map_err(|e| context(e, "truncate", &self.path))
    }

    /// A handle to sync the file from another thread.
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file
            .sync_data()
            .map_err(|e| context(e, "sync", &self.path))
    }
}
