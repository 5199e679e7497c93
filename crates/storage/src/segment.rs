//! One segment: a log file of consecutive batches plus its offset and time indexes.
//!
//! A segment is named by the offset of its first batch, zero-padded to 20 digits
//! (`00000000000000001234.log`, `.index`, `.timeindex`). It owns the byte range `[0, size)` of
//! its log file; bytes past `size` are never read, whatever the file holds.
//!
//! Invariants:
//! - Batches are contiguous: each starts where the previous ended, and its base offset is the
//!   previous batch's last offset + 1 (the first one's is the segment's base offset).
//! - `size` and `next_offset` are published (release) only after the bytes they cover are
//!   written and indexed, so a reader that loads them (acquire) may read everything below.
//! - Only the log's single writer calls the mutating methods; readers use `&self` freely.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bytes::Bytes;

use crate::batch::{self, BatchError, BatchHeader, HEADER_BYTES};
use crate::error::StorageError;
use crate::index::{Loaded, OffsetEntry, SparseIndex, TimeEntry};

/// Marks an empty segment's max timestamp.
pub(crate) const NO_TIMESTAMP: i64 = i64::MIN;

/// Largest chunk read at once while scanning; larger batches are checksummed in pieces so a
/// corrupt length field cannot make recovery allocate more than this.
const SCAN_CHUNK_BYTES: usize = 256 * 1024;

/// Batches laid end to end in a buffer, with the header (offsets assigned) and position of
/// each inside it: one run of an append.
pub type AppendPart<'a> = (&'a [u8], &'a [(BatchHeader, usize)]);

pub(crate) fn file_name(base_offset: u64, extension: &str) -> String {
    format!("{base_offset:020}.{extension}")
}

/// Parses `00000000000000001234.log` into 1234.
pub(crate) fn parse_file_name(name: &str, extension: &str) -> Option<u64> {
    let stem = name.strip_suffix(extension)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

#[derive(Debug)]
pub(crate) struct Segment {
    base_offset: u64,
    path: PathBuf,
    file: File,
    size_bytes: AtomicU64,
    next_offset: AtomicU64,
    max_timestamp: AtomicI64,
    created_ms: i64,
    /// Bytes appended since the last offset index entry. Writer only.
    bytes_since_index: AtomicU64,
    offset_index: SparseIndex<OffsetEntry>,
    time_index: SparseIndex<TimeEntry>,
}

/// How recovery treats a segment.
#[derive(Clone, Copy)]
pub(crate) struct OpenMode<'a> {
    /// The tail segment may be cut at the first bad batch; any other segment must be intact.
    pub is_tail: bool,
    pub index_interval_bytes: u64,
    /// The leader epoch each batch must carry, by base offset, if known.
    pub expected_epoch: &'a dyn Fn(u64) -> Option<i32>,
    pub now_ms: i64,
}

impl std::fmt::Debug for OpenMode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenMode")
            .field("is_tail", &self.is_tail)
            .field("index_interval_bytes", &self.index_interval_bytes)
            .finish_non_exhaustive()
    }
}

/// What recovery did to a segment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Recovery {
    pub rebuilt_indexes: bool,
    /// Bytes cut from the tail, and why.
    pub truncated: Option<(u64, String)>,
}

/// Where a scan stopped.
struct ScanEnd {
    end_position: u64,
    next_offset: u64,
    max_timestamp: i64,
    bytes_since_index: u64,
    /// The first invalid batch: its position and why.
    damage: Option<(u64, String)>,
}

impl Segment {
    pub fn create(dir: &Path, base_offset: u64, now_ms: i64) -> Result<Self, StorageError> {
        let path = dir.join(file_name(base_offset, "log"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| StorageError::io("create", &path, source))?;
        let (offset_index, time_index) = Self::open_indexes(dir, base_offset)?;
        offset_index
            .clear()
            .map_err(|source| StorageError::io("reset", offset_index.path(), source))?;
        time_index
            .clear()
            .map_err(|source| StorageError::io("reset", time_index.path(), source))?;
        Ok(Self {
            base_offset,
            path,
            file,
            size_bytes: AtomicU64::new(0),
            next_offset: AtomicU64::new(base_offset),
            max_timestamp: AtomicI64::new(NO_TIMESTAMP),
            created_ms: now_ms,
            bytes_since_index: AtomicU64::new(0),
            offset_index,
            time_index,
        })
    }

    fn open_indexes(
        dir: &Path,
        base_offset: u64,
    ) -> Result<(SparseIndex<OffsetEntry>, SparseIndex<TimeEntry>), StorageError> {
        let index_path = dir.join(file_name(base_offset, "index"));
        let time_path = dir.join(file_name(base_offset, "timeindex"));
        let (offset_index, _) = SparseIndex::open(&index_path)
            .map_err(|source| StorageError::io("open", &index_path, source))?;
        let (time_index, _) = SparseIndex::open(&time_path)
            .map_err(|source| StorageError::io("open", &time_path, source))?;
        Ok((offset_index, time_index))
    }

    /// Opens an existing segment and recovers it: validates the indexes, scans from the last
    /// offset index entry to the end of the file, and cuts a damaged tail (tail segment only).
    pub fn open(
        dir: &Path,
        base_offset: u64,
        mode: OpenMode<'_>,
    ) -> Result<(Self, Recovery), StorageError> {
        let path = dir.join(file_name(base_offset, "log"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| StorageError::io("open", &path, source))?;
        let file_len = file
            .metadata()
            .map_err(|source| StorageError::io("stat", &path, source))?
            .len();
        let index_path = dir.join(file_name(base_offset, "index"));
        let time_path = dir.join(file_name(base_offset, "timeindex"));
        let (offset_index, offset_loaded) = SparseIndex::<OffsetEntry>::open(&index_path)
            .map_err(|source| StorageError::io("open", &index_path, source))?;
        let (time_index, time_loaded) = SparseIndex::<TimeEntry>::open(&time_path)
            .map_err(|source| StorageError::io("open", &time_path, source))?;
        let segment = Self {
            base_offset,
            path,
            file,
            size_bytes: AtomicU64::new(0),
            next_offset: AtomicU64::new(base_offset),
            max_timestamp: AtomicI64::new(NO_TIMESTAMP),
            created_ms: mode.now_ms,
            bytes_since_index: AtomicU64::new(0),
            offset_index,
            time_index,
        };
        let mut recovery = Recovery::default();

        // Entries pointing past the end of the file cannot be right.
        segment
            .offset_index
            .retain_prefix(|e| u64::from(e.position) < file_len)
            .map_err(|source| StorageError::io("cut", &index_path, source))?;
        let mut start = segment.offset_index.last().and_then(|entry| {
            let position = u64::from(entry.position);
            let expected = base_offset + u64::from(entry.relative_offset);
            match segment.read_header(position, file_len) {
                Ok(header) if header.base_offset == expected as i64 => Some((position, expected)),
                _ => None,
            }
        });
        let index_missing = offset_loaded == Loaded::Missing || time_loaded == Loaded::Missing;
        let index_nonempty_but_unanchored =
            start.is_none() && (segment.offset_index.len() > 0 || file_len > 0);
        if index_missing || index_nonempty_but_unanchored {
            if file_len > 0 {
                tracing::warn!(segment = %segment.path.display(), "rebuilding the segment's indexes");
                recovery.rebuilt_indexes = true;
            }
            segment
                .offset_index
                .clear()
                .map_err(|source| StorageError::io("reset", &index_path, source))?;
            segment
                .time_index
                .clear()
                .map_err(|source| StorageError::io("reset", &time_path, source))?;
            start = None;
        }
        let (start_position, expected_offset) = start.unwrap_or((0, base_offset));
        let scan = segment.scan(
            start_position,
            expected_offset,
            file_len,
            start.is_some(),
            &mode,
        )?;

        if let Some((position, reason)) = scan.damage {
            if !mode.is_tail {
                return Err(StorageError::Corrupt {
                    path: segment.path.clone(),
                    position,
                    reason,
                });
            }
            tracing::warn!(
                segment = %segment.path.display(),
                position,
                cut_bytes = file_len - position,
                %reason,
                "truncating a torn or corrupt tail"
            );
            segment
                .file
                .set_len(position)
                .map_err(|source| StorageError::io("truncate", &segment.path, source))?;
            crate::sync::all(&segment.file)
                .map_err(|source| StorageError::io("sync", &segment.path, source))?;
            recovery.truncated = Some((file_len - position, reason));
        }

        let next_relative = scan.next_offset - base_offset;
        segment
            .time_index
            .retain_prefix(|e| u64::from(e.relative_offset) < next_relative)
            .map_err(|source| StorageError::io("cut", &time_path, source))?;
        let indexed_max = segment
            .time_index
            .last()
            .map_or(NO_TIMESTAMP, |e| e.timestamp_ms);
        segment
            .max_timestamp
            .store(indexed_max.max(scan.max_timestamp), Ordering::Release);
        segment
            .bytes_since_index
            .store(scan.bytes_since_index, Ordering::Relaxed);
        segment
            .size_bytes
            .store(scan.end_position, Ordering::Release);
        segment
            .next_offset
            .store(scan.next_offset, Ordering::Release);
        Ok((segment, recovery))
    }

    /// Walks batches from `position`, checking each (structure, CRC, offset continuity, epoch)
    /// and indexing the ones past the last index entry. `first_is_indexed` says the batch at
    /// `position` already has its index entry.
    fn scan(
        &self,
        mut position: u64,
        mut expected_offset: u64,
        file_len: u64,
        first_is_indexed: bool,
        mode: &OpenMode<'_>,
    ) -> Result<ScanEnd, StorageError> {
        let mut buf = Vec::with_capacity(SCAN_CHUNK_BYTES);
        let mut max_timestamp = NO_TIMESTAMP;
        let mut bytes_since_index = 0u64;
        let mut first = true;
        let mut damage = None;
        while position < file_len {
            let header =
                match self.check_batch_at(position, file_len, expected_offset, mode, &mut buf)? {
                    Ok(header) => header,
                    Err(reason) => {
                        damage = Some((position, reason));
                        break;
                    }
                };
            if !(first && first_is_indexed) {
                self.index_batch(
                    &header,
                    position,
                    mode.index_interval_bytes,
                    &mut bytes_since_index,
                    &mut max_timestamp,
                );
            } else {
                max_timestamp = max_timestamp.max(header.max_timestamp);
            }
            bytes_since_index += header.total_bytes() as u64;
            first = false;
            position += header.total_bytes() as u64;
            expected_offset = header.next_offset() as u64;
        }
        Ok(ScanEnd {
            end_position: position,
            next_offset: expected_offset,
            max_timestamp,
            bytes_since_index,
            damage,
        })
    }

    /// Validates the batch at `position`. The outer error is an I/O failure; the inner one says
    /// why the bytes there are not the batch that should be there.
    fn check_batch_at(
        &self,
        position: u64,
        file_len: u64,
        expected_offset: u64,
        mode: &OpenMode<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<Result<BatchHeader, String>, StorageError> {
        let available = file_len - position;
        if available < HEADER_BYTES as u64 {
            return Ok(Err(format!(
                "{available} trailing bytes are shorter than a batch header"
            )));
        }
        let header = match self.read_header(position, file_len) {
            Ok(header) => header,
            Err(StorageError::Io { source, .. }) => {
                return Err(StorageError::io("read", &self.path, source));
            }
            Err(other) => return Ok(Err(other.to_string())),
        };
        let total = header.total_bytes() as u64;
        if total > available {
            return Ok(Err(format!(
                "batch claims {total} bytes but only {available} remain"
            )));
        }
        if header.base_offset != expected_offset as i64 {
            return Ok(Err(format!(
                "batch base offset {} where {expected_offset} was expected",
                header.base_offset
            )));
        }
        if header.last_offset_delta < 0 {
            return Ok(Err(format!(
                "negative last offset delta {}",
                header.last_offset_delta
            )));
        }
        if let Some(epoch) = (mode.expected_epoch)(expected_offset)
            && header.partition_leader_epoch != epoch
        {
            return Ok(Err(format!(
                "batch leader epoch {} where the epoch checkpoint says {epoch}",
                header.partition_leader_epoch
            )));
        }
        // CRC over attributes..end, read in bounded chunks.
        let mut crc = 0u32;
        let mut at = position + 21;
        let end = position + total;
        while at < end {
            let len = ((end - at) as usize).min(SCAN_CHUNK_BYTES);
            buf.resize(len, 0);
            self.file
                .read_exact_at(buf, at)
                .map_err(|source| StorageError::io("read", &self.path, source))?;
            crc = crc32c::crc32c_append(crc, buf);
            at += len as u64;
        }
        if crc != header.crc {
            return Ok(Err(BatchError::CrcMismatch {
                stored: header.crc,
                computed: crc,
            }
            .to_string()));
        }
        Ok(Ok(header))
    }

    /// Adds index entries for a batch at `position` if the interval calls for one.
    fn index_batch(
        &self,
        header: &BatchHeader,
        position: u64,
        interval_bytes: u64,
        bytes_since_index: &mut u64,
        max_timestamp: &mut i64,
    ) {
        *max_timestamp = (*max_timestamp).max(header.max_timestamp);
        if self.offset_index.len() == 0 || *bytes_since_index >= interval_bytes {
            let relative_offset = (header.base_offset as u64 - self.base_offset) as u32;
            self.offset_index.push(OffsetEntry {
                relative_offset,
                position: position as u32,
            });
            if self
                .time_index
                .last()
                .is_none_or(|last| *max_timestamp > last.timestamp_ms)
                && *max_timestamp != NO_TIMESTAMP
            {
                self.time_index.push(TimeEntry {
                    timestamp_ms: *max_timestamp,
                    relative_offset,
                });
            }
            *bytes_since_index = 0;
        }
    }

    fn read_header(&self, position: u64, end: u64) -> Result<BatchHeader, StorageError> {
        if end.saturating_sub(position) < HEADER_BYTES as u64 {
            return Err(StorageError::Corrupt {
                path: self.path.clone(),
                position,
                reason: "batch header runs past the end of the segment".into(),
            });
        }
        let mut raw = [0u8; HEADER_BYTES];
        self.file
            .read_exact_at(&mut raw, position)
            .map_err(|source| StorageError::io("read", &self.path, source))?;
        BatchHeader::parse(&raw).map_err(|error| StorageError::Corrupt {
            path: self.path.clone(),
            position,
            reason: error.to_string(),
        })
    }

    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.size_bytes() == 0
    }

    pub fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// Appends already-validated batches whose headers (with assigned offsets) are given with
    /// their positions inside `data`. Writer only.
    pub fn append(
        &self,
        data: &[u8],
        batches: &[(BatchHeader, usize)],
        index_interval_bytes: u64,
    ) -> Result<(), StorageError> {
        self.append_parts(&[(data, batches)], index_interval_bytes)
    }

    /// Appends several runs of already-validated batches, in order, with as few system calls
    /// as the kernel allows: each part is `data` with the headers (offsets assigned) and
    /// positions of the batches inside it. Writer only.
    pub fn append_parts(
        &self,
        parts: &[AppendPart<'_>],
        index_interval_bytes: u64,
    ) -> Result<(), StorageError> {
        let start = self.size_bytes.load(Ordering::Relaxed);
        self.write_patched(parts, start)
            .map_err(|source| StorageError::io("write", &self.path, source))?;
        let mut bytes_since_index = self.bytes_since_index.load(Ordering::Relaxed);
        let mut max_timestamp = self.max_timestamp.load(Ordering::Relaxed);
        let mut position = start;
        for (data, batches) in parts {
            for (header, at) in *batches {
                self.index_batch(
                    header,
                    position + *at as u64,
                    index_interval_bytes,
                    &mut bytes_since_index,
                    &mut max_timestamp,
                );
                bytes_since_index += header.total_bytes() as u64;
            }
            position += data.len() as u64;
        }
        self.bytes_since_index
            .store(bytes_since_index, Ordering::Relaxed);
        self.max_timestamp.store(max_timestamp, Ordering::Release);
        self.size_bytes.store(position, Ordering::Release);
        if let Some((last, _)) = parts.iter().rev().find_map(|(_, batches)| batches.last()) {
            self.next_offset
                .store(last.next_offset() as u64, Ordering::Release);
        }
        Ok(())
    }

    /// Writes the batches of every part at `position`, one part after the other, taking each
    /// batch's first 16 bytes (base offset, length, leader epoch) from its header instead of
    /// from the data: the producer's bytes go to the file without being copied to patch them.
    fn write_patched(&self, parts: &[AppendPart<'_>], position: u64) -> io::Result<()> {
        const PREFIX_BYTES: usize = 16;
        let batch_count: usize = parts.iter().map(|(_, batches)| batches.len()).sum();
        let prefixes: Vec<[u8; PREFIX_BYTES]> = parts
            .iter()
            .flat_map(|(_, batches)| batches.iter())
            .map(|(header, _)| {
                let mut prefix = [0u8; PREFIX_BYTES];
                prefix[..8].copy_from_slice(&header.base_offset.to_be_bytes());
                prefix[8..12].copy_from_slice(&header.batch_length.to_be_bytes());
                prefix[12..16].copy_from_slice(&header.partition_leader_epoch.to_be_bytes());
                prefix
            })
            .collect();
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(batch_count * 2);
        let mut prefix = prefixes.iter();
        for (data, batches) in parts {
            for (header, at) in *batches {
                pieces.push(prefix.next().expect("one prefix per batch"));
                pieces.push(&data[at + PREFIX_BYTES..at + header.total_bytes()]);
            }
        }
        write_all_at(&self.file, &pieces, position)
    }

    /// Finds the position of the batch that contains `offset`, or `None` if the segment ends
    /// before it. Only looks below `end`.
    fn locate(&self, offset: u64, end: u64) -> Result<Option<(u64, BatchHeader)>, StorageError> {
        let relative = offset
            .saturating_sub(self.base_offset)
            .min(u64::from(u32::MAX)) as u32;
        let mut position = self
            .offset_index
            .floor(relative)
            .map_or(0, |entry| u64::from(entry.position));
        while position < end {
            let header = self.read_header(position, end)?;
            if header.last_offset() >= offset as i64 {
                return Ok(Some((position, header)));
            }
            position += header.total_bytes() as u64;
        }
        Ok(None)
    }

    /// Reads whole batches starting with the one that contains `offset`, up to `max_bytes`,
    /// stopping before any batch that starts at or after `end_offset`. With `min_one_batch`, the
    /// first batch is returned even if it alone exceeds `max_bytes`. Returns `None` if no batch
    /// in this segment holds `offset`.
    pub fn read(
        &self,
        offset: u64,
        end_offset: u64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<Option<Bytes>, StorageError> {
        let end = self.size_bytes();
        let Some((start, first)) = self.locate(offset, end)? else {
            return Ok(None);
        };
        if first.base_offset as u64 >= end_offset {
            return Ok(Some(Bytes::new()));
        }
        let first_bytes = first.total_bytes();
        if first_bytes as u64 > end - start {
            return Err(StorageError::Corrupt {
                path: self.path.clone(),
                position: start,
                reason: "batch runs past the end of the segment".into(),
            });
        }
        let want = if first_bytes > max_bytes {
            if !min_one_batch {
                return Ok(Some(Bytes::new()));
            }
            first_bytes
        } else {
            (max_bytes as u64).min(end - start) as usize
        };
        // Read into spare capacity: zeroing the buffer first would cost a pass over every byte.
        let mut buf: Vec<u8> = Vec::with_capacity(want);
        while buf.len() < want {
            let at = start + buf.len() as u64;
            let read = rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buf), at)
                .map_err(|errno| StorageError::io("read", &self.path, io::Error::from(errno)))?;
            if read == 0 {
                return Err(StorageError::io(
                    "read",
                    &self.path,
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ));
            }
        }
        // Keep whole batches only, and check each one: nothing corrupt is served. A damaged
        // batch ends the read before it; only when it is the first one is the read an error,
        // so the batches before damage stay readable and the error names where it is.
        let mut keep = 0usize;
        while keep < buf.len() {
            let rest = &buf[keep..];
            let total = match BatchHeader::peek_extent(rest) {
                Ok((base, total)) if total <= rest.len() && (base as u64) < end_offset => total,
                _ => break,
            };
            if let Err(error) = batch::verify(&rest[..total]) {
                if keep > 0 {
                    break;
                }
                return Err(StorageError::Corrupt {
                    path: self.path.clone(),
                    position: start,
                    reason: error.to_string(),
                });
            }
            keep += total;
        }
        buf.truncate(keep);
        Ok(Some(Bytes::from(buf)))
    }

    /// The first batch whose max timestamp is at or after `timestamp_ms` and whose last offset
    /// is at or after `min_offset`, with its bytes.
    pub fn find_by_timestamp(
        &self,
        timestamp_ms: i64,
        min_offset: u64,
    ) -> Result<Option<(BatchHeader, Bytes)>, StorageError> {
        if self.max_timestamp() < timestamp_ms {
            return Ok(None);
        }
        let end = self.size_bytes();
        let relative = self
            .time_index
            .last_below(timestamp_ms)
            .map_or(0, |entry| entry.relative_offset);
        let mut position = self
            .offset_index
            .floor(relative)
            .map_or(0, |entry| u64::from(entry.position));
        while position < end {
            let header = self.read_header(position, end)?;
            if header.max_timestamp >= timestamp_ms && header.last_offset() >= min_offset as i64 {
                let batch = self
                    .read(
                        header.base_offset as u64,
                        u64::MAX,
                        header.total_bytes(),
                        true,
                    )?
                    .unwrap_or_default();
                return Ok(Some((header, batch)));
            }
            position += header.total_bytes() as u64;
        }
        Ok(None)
    }

    /// Removes every batch whose last offset is at or above `offset`. Returns the new next
    /// offset. Writer only.
    pub fn truncate_to(&self, offset: u64, index_interval_bytes: u64) -> Result<u64, StorageError> {
        let end = self.size_bytes();
        let Some((cut, header)) = self.locate(offset, end)? else {
            return Ok(self.next_offset());
        };
        let new_next = header.base_offset as u64;
        let cut_relative = (new_next - self.base_offset) as u32;
        self.offset_index
            .retain_prefix(|e| e.relative_offset < cut_relative)
            .map_err(|source| StorageError::io("cut", self.offset_index.path(), source))?;
        self.time_index
            .retain_prefix(|e| e.relative_offset < cut_relative)
            .map_err(|source| StorageError::io("cut", self.time_index.path(), source))?;
        self.file
            .set_len(cut)
            .map_err(|source| StorageError::io("truncate", &self.path, source))?;
        // Recompute the tail statistics from the last surviving index entry.
        let (position, expected) = self.offset_index.last().map_or((0, self.base_offset), |e| {
            (
                u64::from(e.position),
                self.base_offset + u64::from(e.relative_offset),
            )
        });
        let no_epoch_check = |_| None;
        let mode = OpenMode {
            is_tail: true,
            index_interval_bytes,
            expected_epoch: &no_epoch_check,
            now_ms: self.created_ms,
        };
        let scan = self.scan(position, expected, cut, self.offset_index.len() > 0, &mode)?;
        let indexed_max = self
            .time_index
            .last()
            .map_or(NO_TIMESTAMP, |e| e.timestamp_ms);
        self.max_timestamp
            .store(indexed_max.max(scan.max_timestamp), Ordering::Release);
        self.bytes_since_index
            .store(scan.bytes_since_index, Ordering::Relaxed);
        self.size_bytes.store(cut, Ordering::Release);
        self.next_offset.store(new_next, Ordering::Release);
        Ok(new_next)
    }

    pub fn sync(&self) -> Result<(), StorageError> {
        crate::sync::data(&self.file).map_err(|source| StorageError::io("sync", &self.path, source))
    }

    /// Writes pending index entries to the index files, and fsyncs them if asked.
    pub fn persist_indexes(&self, sync: bool) -> Result<(), StorageError> {
        // The time index goes first: recovery may then find time entries past the last offset
        // entry (harmless, they are checked against the data) but never fewer.
        self.time_index
            .persist()
            .map_err(|source| StorageError::io("write", self.time_index.path(), source))?;
        self.offset_index
            .persist()
            .map_err(|source| StorageError::io("write", self.offset_index.path(), source))?;
        if sync {
            self.time_index
                .sync()
                .map_err(|source| StorageError::io("sync", self.time_index.path(), source))?;
            self.offset_index
                .sync()
                .map_err(|source| StorageError::io("sync", self.offset_index.path(), source))?;
        }
        Ok(())
    }

    /// Deletes the segment's files. Readers holding the segment keep their open handle.
    pub fn delete_files(&self) -> Result<(), StorageError> {
        for path in [
            self.path.as_path(),
            self.offset_index.path(),
            self.time_index.path(),
        ] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(StorageError::io("delete", path, source)),
            }
        }
        Ok(())
    }
}

/// Bytes one write system call carries at most. Measured, not derived: on the development
/// machine (a virtual machine) the page cache took writes of 256 KiB at about 3 GB/s all day,
/// while single writes of 1 MiB or more ran at 4 GB/s at one time and 0.3–1.6 GB/s at another,
/// the kernel's copy into the larger page cache folios it allocates for larger writes being
/// several times slower then. Appends of 1 MiB batches are written in four calls.
const WRITE_BYTES_MAX: usize = 256 * 1024;
/// Slices per system call, within Linux's IOV_MAX.
const SLICES_PER_CALL: usize = 1024;

/// Writes `pieces` end to end at `position`, in calls of at most [`WRITE_BYTES_MAX`] bytes and
/// [`SLICES_PER_CALL`] slices, resuming after short writes.
fn write_all_at(file: &File, mut pieces: &[&[u8]], mut position: u64) -> io::Result<()> {
    // Bytes of `pieces[0]` already written.
    let mut skip = 0;
    let mut call: Vec<IoSlice<'_>> = Vec::with_capacity(SLICES_PER_CALL.min(pieces.len()));
    loop {
        while pieces.first().is_some_and(|piece| piece.len() == skip) {
            pieces = &pieces[1..];
            skip = 0;
        }
        if pieces.is_empty() {
            return Ok(());
        }
        call.clear();
        let mut call_bytes = 0;
        for (index, piece) in pieces.iter().enumerate() {
            if call.len() == SLICES_PER_CALL || call_bytes == WRITE_BYTES_MAX {
                break;
            }
            let piece = if index == 0 { &piece[skip..] } else { piece };
            let take = piece.len().min(WRITE_BYTES_MAX - call_bytes);
            call.push(IoSlice::new(&piece[..take]));
            call_bytes += take;
        }
        let mut written = rustix::io::pwritev(file, &call, position).map_err(io::Error::from)?;
        if written == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        position += written as u64;
        while written > 0 {
            let left = pieces[0].len() - skip;
            if written >= left {
                written -= left;
                pieces = &pieces[1..];
                skip = 0;
            } else {
                skip += written;
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Pieces of every size around the per-call limits land end to end, byte for byte.
    #[test]
    fn pieces_are_written_end_to_end_across_calls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pieces");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let sizes = [
            16,
            WRITE_BYTES_MAX - 16,
            WRITE_BYTES_MAX + 1,
            1,
            3 * WRITE_BYTES_MAX + 7,
            0,
            4096,
        ];
        let owned: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(index, size)| (0..*size).map(|i| (i * 7 + index) as u8).collect())
            .collect();
        // Many tiny pieces as well, past the slice limit of one call.
        let tiny: Vec<Vec<u8>> = (0..SLICES_PER_CALL + 10)
            .map(|i| vec![i as u8; 3])
            .collect();
        let pieces: Vec<&[u8]> = owned.iter().chain(&tiny).map(Vec::as_slice).collect();
        write_all_at(&file, &pieces, 5).unwrap();
        let written = std::fs::read(&path).unwrap();
        let mut expected = vec![0u8; 5];
        expected.extend(pieces.concat());
        assert_eq!(written.len(), expected.len());
        assert!(written == expected, "file content differs from the pieces");
    }
}
