//! A log: an ordered run of segments in one directory, with one writer and many readers.
//!
//! The [`Log`] value is the writer. It is owned by exactly one task (see [`crate::owner`]),
//! which is why its mutating methods take `&mut self`. Readers hold a [`LogReader`], a cheap
//! clone that shares the segment list and reads with positioned I/O, never waiting for the
//! writer except for the instant it takes to clone the segment list's entries.
//!
//! Files in a log directory:
//! - `<base offset, 20 digits>.log`, `.index`, `.timeindex`: segments (see [`crate::segment`]).
//! - `log-start-offset`: the first offset readers may see, as decimal text. It moves forward
//!   only, and is made durable before any segment below it is deleted.
//! - `leader-epoch-checkpoint`: see [`crate::epoch`].
//!
//! Invariants:
//! - Segments are contiguous: each segment's base offset is the previous one's next offset.
//! - `log_start_offset <= log_end_offset`, and the first segment holds `log_start_offset`
//!   (or the log is empty at that offset).
//! - Every offset below `flushed_offset` is on disk (fsynced), directory entries included.
//! - After a failed write or fsync the log refuses writes; it never retries silently.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

use crate::batch::{self, BatchHeader};
use crate::checkpoint;
use crate::config::{FsyncPolicy, LogConfig};
use crate::epoch::EpochCache;
use crate::error::StorageError;
use crate::repair::Damage;
use crate::segment::{self, AppendPart, OpenMode, Segment};

pub(crate) const LOG_START_FILE: &str = "log-start-offset";

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    pub last_offset: u64,
    pub batch_count: usize,
    pub bytes: usize,
    pub log_start_offset: u64,
}

/// Whole batches returned by a read, with the log's bounds at the time of the read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadBatches {
    pub bytes: Bytes,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
}

/// The batch found by a timestamp lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampHit {
    pub header: BatchHeader,
    pub batch: Bytes,
}

/// What opening a log found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    pub segment_count: usize,
    pub rebuilt_index_count: usize,
    pub truncated_bytes: u64,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
}

/// What a retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub deleted_segment_count: usize,
    pub deleted_bytes: u64,
    pub log_start_offset: u64,
}

/// A summary of one segment, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub base_offset: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    pub max_timestamp_ms: Option<i64>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    segments: RwLock<Vec<Arc<Segment>>>,
    log_start_offset: AtomicU64,
    log_end_offset: AtomicU64,
    flushed_offset: AtomicU64,
    /// Completed flush jobs: one fsync round each, however many appends it covered.
    flush_count: AtomicU64,
}

/// The writing side of a log.
#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
    config: LogConfig,
    epochs: EpochCache,
    failure: Option<String>,
    /// True when a segment file was created or deleted since the directory was last fsynced.
    dir_dirty: bool,
    /// Bumped by every truncation, so a flush that started before one cannot claim durability
    /// for offsets that were rewritten after it.
    truncation_count: u64,
    /// Appends taken by [`Log::append_deferred`] and not written yet.
    deferred: Deferred,
}

/// Appends with offsets assigned but not yet written, all bound for the active segment, in
/// order. The owner task writes them with one system call at the end of a drain
/// ([`Log::write_deferred`]); every other change to the log writes them first.
#[derive(Debug, Default)]
struct Deferred {
    parts: Vec<CheckedBatches>,
    bytes: u64,
    /// The log end offset once they are written.
    end_offset: u64,
}

/// Deferred appends are written once they add up to this many bytes, whether or not the drain
/// is over, and an append that would take them past it is written apart. It bounds what one
/// write holds back; the write itself goes to the kernel in calls of at most 256 KiB (see
/// `segment::WRITE_BYTES_MAX`). On the development machine 64 appenders of 16 KiB batches
/// reached 2.1–2.3 GB/s with groups of up to 1 MiB against 1.5–2.1 GB/s with 256 KiB.
const DEFERRED_BYTES_MAX: u64 = 1024 * 1024;

/// Work to make a log durable up to an offset, runnable on a blocking thread while the writer
/// carries on appending.
#[derive(Debug)]
pub struct FlushJob {
    segments: Vec<Arc<Segment>>,
    sync_dir: Option<PathBuf>,
    up_to_offset: u64,
    truncation_count: u64,
}

impl FlushJob {
    /// The offset below which everything is durable once the job succeeds.
    pub fn up_to_offset(&self) -> u64 {
        self.up_to_offset
    }

    /// Fsyncs the segments (and the directory, if segments came or went).
    pub fn run(&self) -> Result<(), StorageError> {
        for segment in &self.segments {
            segment.sync()?;
        }
        if let Some(dir) = &self.sync_dir {
            checkpoint::sync_dir(dir)?;
        }
        Ok(())
    }
}

impl Log {
    /// Opens the log in `dir`, creating it if needed, and recovers it (see the module docs of
    /// [`crate::segment`]).
    pub fn open(
        dir: impl AsRef<Path>,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<Self, StorageError> {
        Self::open_with_report(dir, config, now_ms).map(|(log, _)| log)
    }

    pub fn open_with_report(
        dir: impl AsRef<Path>,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<(Self, OpenReport), StorageError> {
        config.validate()?;
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(|source| StorageError::io("create", &dir, source))?;
        let mut report = OpenReport::default();

        let bases = list_segments(&dir)?;
        let stored_start = checkpoint::read_u64(&dir.join(LOG_START_FILE))?;
        let loaded_epochs = EpochCache::load(&dir)?;

        // The tail region is the last non-empty segment and any empty ones after it: a crash
        // right after a roll leaves the previous segment as the one that may be torn.
        let mut tail_from = 0;
        for (index, base) in bases.iter().enumerate() {
            let path = dir.join(segment::file_name(*base, "log"));
            let len = std::fs::metadata(&path)
                .map_err(|source| StorageError::io("stat", &path, source))?
                .len();
            if len > 0 {
                tail_from = index;
            }
        }

        let no_epochs = |_| None;
        let expected_epoch = |offset| loaded_epochs.as_ref().and_then(|c| c.expected_for(offset));
        let expected_epoch: &dyn Fn(u64) -> Option<i32> = if loaded_epochs.is_some() {
            &expected_epoch
        } else {
            &no_epochs
        };
        let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
        for (index, base) in bases.iter().enumerate() {
            if let Some(previous) = segments.last() {
                let expected = previous.next_offset();
                if *base != expected {
                    if index > tail_from {
                        // An empty segment left after a cut tail: nothing to keep.
                        delete_segment_files(&dir, *base)?;
                        continue;
                    }
                    return Err(StorageError::Corrupt {
                        path: dir.join(segment::file_name(*base, "log")),
                        position: 0,
                        reason: format!(
                            "segment starts at offset {base} but the previous segment ends at {expected}"
                        ),
                    });
                }
            }
            let mode = OpenMode {
                is_tail: index >= tail_from,
                index_interval_bytes: config.index_interval_bytes,
                expected_epoch,
                now_ms,
            };
            let (segment, recovery) = Segment::open(&dir, *base, mode)?;
            if recovery.rebuilt_indexes {
                report.rebuilt_index_count += 1;
            }
            if let Some((bytes, _)) = recovery.truncated {
                report.truncated_bytes += bytes;
            }
            segments.push(Arc::new(segment));
        }

        let log_end_offset = segments.last().map_or(0, |s| s.next_offset());
        let first_base = segments.first().map(|s| s.base_offset());
        let mut log_start_offset = stored_start.unwrap_or(0).max(first_base.unwrap_or(0));
        if log_start_offset > log_end_offset {
            // Retention removed every segment, or the tail was cut below the checkpoint.
            if segments.is_empty() {
                // Start an empty log at the checkpoint.
            } else {
                log_start_offset = log_end_offset;
            }
        }
        let mut dir_dirty = false;
        if segments.is_empty() {
            segments.push(Arc::new(Segment::create(&dir, log_start_offset, now_ms)?));
            dir_dirty = true;
        }
        let log_end_offset = segments.last().map_or(0, |s| s.next_offset());

        let epochs = match loaded_epochs {
            Some(mut cache) => {
                cache.clamp_to(log_end_offset)?;
                cache
            }
            None => {
                if log_end_offset > log_start_offset {
                    tracing::warn!(dir = %dir.display(), "leader epoch checkpoint is missing; older batches will not be checked against it");
                }
                let current = segments
                    .last()
                    .and_then(|s| s.read(s.base_offset(), u64::MAX, 0, true).ok().flatten())
                    .and_then(|bytes| BatchHeader::parse(&bytes).ok())
                    .map_or(0, |header| header.partition_leader_epoch.max(0));
                EpochCache::create(&dir, current, log_end_offset)?
            }
        };
        if stored_start != Some(log_start_offset) && log_start_offset > 0 {
            checkpoint::write_atomically(
                &dir.join(LOG_START_FILE),
                log_start_offset.to_string().as_bytes(),
            )?;
        }

        report.segment_count = segments.len();
        report.log_start_offset = log_start_offset;
        report.log_end_offset = log_end_offset;
        let shared = Arc::new(Shared {
            dir,
            segments: RwLock::new(segments),
            log_start_offset: AtomicU64::new(log_start_offset),
            log_end_offset: AtomicU64::new(log_end_offset),
            // Whatever survived recovery was on disk when the log was opened.
            flushed_offset: AtomicU64::new(log_end_offset),
            flush_count: AtomicU64::new(0),
        });
        Ok((
            Self {
                shared,
                config,
                epochs,
                failure: None,
                dir_dirty,
                truncation_count: 0,
                deferred: Deferred::default(),
            },
            report,
        ))
    }

    pub fn reader(&self) -> LogReader {
        LogReader {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Creates an empty log in `dir`, which must hold no log, whose first offset is
    /// `base_offset`: a copy of another log's records from there on (see [`Self::reload`]).
    pub fn create_at(
        dir: impl AsRef<Path>,
        config: LogConfig,
        base_offset: u64,
        now_ms: i64,
    ) -> Result<Self, StorageError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StorageError::io("create", dir, source))?;
        if !list_segments(dir)?.is_empty() {
            return Err(StorageError::io(
                "create",
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the directory already holds a log",
                ),
            ));
        }
        checkpoint::write_atomically(
            &dir.join(LOG_START_FILE),
            base_offset.to_string().as_bytes(),
        )?;
        Self::open(dir, config, now_ms)
    }

    /// Takes up what the log's directory holds now, after another log's files were moved in
    /// place of this one's: its segments, log start and epochs replace this log's, and every
    /// [`LogReader`] made before reads them. A read under way on a replaced segment finishes
    /// on the old file. Appends not yet written are dropped. Blocking.
    pub fn reload(&mut self, now_ms: i64) -> Result<(), StorageError> {
        let fresh = Self::open(&self.shared.dir, self.config.clone(), now_ms)?;
        let segments = std::mem::take(&mut *fresh.shared.segments.write());
        let load = |value: &AtomicU64| value.load(Ordering::Acquire);
        {
            let mut mine = self.shared.segments.write();
            *mine = segments;
            self.shared
                .log_start_offset
                .store(load(&fresh.shared.log_start_offset), Ordering::Release);
            self.shared
                .log_end_offset
                .store(load(&fresh.shared.log_end_offset), Ordering::Release);
            self.shared
                .flushed_offset
                .store(load(&fresh.shared.flushed_offset), Ordering::Release);
        }
        self.epochs = fresh.epochs;
        self.failure = None;
        self.dir_dirty = true;
        self.truncation_count += 1;
        self.deferred = Deferred::default();
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Replaces the configuration (for example after a topic config change).
    pub fn set_config(&mut self, config: LogConfig) -> Result<(), StorageError> {
        config.validate()?;
        self.write_deferred()?;
        self.config = config;
        Ok(())
    }

    pub fn log_start_offset(&self) -> u64 {
        self.shared.log_start_offset.load(Ordering::Acquire)
    }

    /// The offset the next append gets: deferred appends included.
    pub fn log_end_offset(&self) -> u64 {
        if self.deferred.parts.is_empty() {
            self.written_end_offset()
        } else {
            self.deferred.end_offset
        }
    }

    /// The end of what is written to the files and visible to readers: deferred appends
    /// excluded.
    pub fn written_end_offset(&self) -> u64 {
        self.shared.log_end_offset.load(Ordering::Acquire)
    }

    /// Every offset below this one is on disk.
    pub fn flushed_offset(&self) -> u64 {
        self.shared.flushed_offset.load(Ordering::Acquire)
    }

    /// The reason the log stopped accepting writes, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Reads written batches, as a [`LogReader`] does: deferred appends are not seen until
    /// [`Self::write_deferred`].
    pub fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<ReadBatches, StorageError> {
        self.reader().read(offset, max_bytes, min_one_batch)
    }

    fn active(&self) -> Arc<Segment> {
        let segments = self.shared.segments.read();
        Arc::clone(segments.last().expect("a log always has an active segment"))
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        match &self.failure {
            Some(reason) => Err(StorageError::Failed {
                dir: self.shared.dir.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Records a write-path failure: from now on the log refuses writes and says why.
    fn fail(&mut self, error: &StorageError) {
        if self.failure.is_none() {
            tracing::error!(dir = %self.shared.dir.display(), %error, "log stopped accepting writes");
            self.failure = Some(error.to_string());
        }
    }

    /// Validates and appends one or more batches laid end to end in `batches`, assigning their
    /// offsets and leader epoch (the CRC does not cover those fields: they are written from the
    /// assigned values, while `batches` itself is left as it is). Nothing is appended unless
    /// every batch is valid.
    pub fn append(&mut self, batches: &[u8], now_ms: i64) -> Result<AppendInfo, StorageError> {
        self.check_writable()?;
        let (headers, record_total) = check_batches(batches, self.config.max_batch_bytes)?;
        self.write_deferred()?;
        self.append_headers(batches, headers, record_total, now_ms)
    }

    /// Appends batches checked beforehand ([`CheckedBatches::check`], typically on the
    /// caller's task so that the owner task does not spend a CRC pass on them); only the size
    /// limit, which a config change may have lowered since, is checked again. The batches may
    /// stay in memory, with their offsets assigned, until [`Self::write_deferred`] writes every
    /// deferred append at once (or until they add up to 1 MiB, or another change to the log
    /// needs them written): several small appends then cost the kernel one large write.
    ///
    /// Until then they are not visible to readers, and a caller must not acknowledge them: a
    /// failed write fails them all. The owner task holds such replies back until its drain's
    /// deferred appends are written (see [`crate::Handled::after_append`]).
    pub fn append_deferred(
        &mut self,
        mut checked: CheckedBatches,
        now_ms: i64,
    ) -> Result<AppendInfo, StorageError> {
        self.check_writable()?;
        self.check_size(&checked)?;
        let bytes = checked.bytes.len() as u64;
        if self.needs_roll(bytes, checked.record_total, now_ms) {
            // Rolling writes what is deferred first, into the segment it belongs to.
            self.roll(now_ms)?;
        } else if self.deferred.bytes + bytes > DEFERRED_BYTES_MAX {
            self.write_deferred()?;
        }
        let base_offset = self.log_end_offset();
        let next = self.assign_offsets(&mut checked.headers, base_offset);
        let info = AppendInfo {
            base_offset,
            last_offset: next - 1,
            batch_count: checked.headers.len(),
            bytes: checked.bytes.len(),
            log_start_offset: self.log_start_offset(),
        };
        self.deferred.parts.push(checked);
        self.deferred.bytes += bytes;
        self.deferred.end_offset = next;
        if self.deferred.bytes >= DEFERRED_BYTES_MAX {
            self.write_deferred()?;
        }
        Ok(info)
    }

    /// Writes every deferred append (see [`Self::append_deferred`]) and makes it visible to
    /// readers. On failure none of them is in the log, and the log refuses writes from then
    /// on.
    pub fn write_deferred(&mut self) -> Result<(), StorageError> {
        if self.deferred.parts.is_empty() {
            return Ok(());
        }
        let deferred = std::mem::take(&mut self.deferred);
        let parts: Vec<AppendPart<'_>> = deferred
            .parts
            .iter()
            .map(|part| (&part.bytes[..], &part.headers[..]))
            .collect();
        let active = self.active();
        if let Err(error) = active.append_parts(&parts, self.config.index_interval_bytes) {
            self.fail(&error);
            return Err(error);
        }
        self.shared
            .log_end_offset
            .store(deferred.end_offset, Ordering::Release);
        Ok(())
    }

    /// Whether appends are deferred and not written yet.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.parts.is_empty()
    }

    fn check_size(&self, checked: &CheckedBatches) -> Result<(), StorageError> {
        for (header, position) in &checked.headers {
            let batch_bytes = header.total_bytes();
            if batch_bytes > self.config.max_batch_bytes {
                return Err(StorageError::InvalidBatch {
                    position: *position,
                    source: batch::BatchError::TooLarge {
                        batch_bytes,
                        limit_bytes: self.config.max_batch_bytes,
                    },
                });
            }
        }
        Ok(())
    }

    /// Stamps the offsets from `base_offset` on and the current leader epoch on `headers`;
    /// returns the offset after the last one.
    fn assign_offsets(&self, headers: &mut [(BatchHeader, usize)], base_offset: u64) -> u64 {
        let epoch = self.epochs.current();
        let mut next = base_offset;
        for (header, _) in headers {
            header.base_offset = next as i64;
            header.partition_leader_epoch = epoch;
            next = header.next_offset() as u64;
        }
        next
    }

    fn append_headers(
        &mut self,
        batches: &[u8],
        mut headers: Vec<(BatchHeader, usize)>,
        record_total: u64,
        now_ms: i64,
    ) -> Result<AppendInfo, StorageError> {
        self.maybe_roll(batches.len() as u64, record_total, now_ms)?;
        let base_offset = self.log_end_offset();
        let next = self.assign_offsets(&mut headers, base_offset);
        let active = self.active();
        if let Err(error) = active.append(batches, &headers, self.config.index_interval_bytes) {
            self.fail(&error);
            return Err(error);
        }
        self.shared.log_end_offset.store(next, Ordering::Release);
        Ok(AppendInfo {
            base_offset,
            last_offset: next - 1,
            batch_count: headers.len(),
            bytes: batches.len(),
            log_start_offset: self.log_start_offset(),
        })
    }

    fn maybe_roll(&mut self, bytes: u64, records: u64, now_ms: i64) -> Result<(), StorageError> {
        if self.needs_roll(bytes, records, now_ms) {
            self.roll(now_ms)?;
        }
        Ok(())
    }

    /// Whether `bytes` holding `records` more records must go to a new segment, deferred
    /// appends counted.
    fn needs_roll(&self, bytes: u64, records: u64, now_ms: i64) -> bool {
        let active = self.active();
        if active.is_empty() && self.deferred.parts.is_empty() {
            return false;
        }
        let full = active.size_bytes() + self.deferred.bytes + bytes > self.config.segment_bytes;
        let old = now_ms - active.created_ms() >= self.config.segment_ms;
        let offsets_overflow =
            self.log_end_offset() + records - active.base_offset() > u64::from(u32::MAX);
        full || old || offsets_overflow
    }

    /// Seals the active segment and starts a new one at the log end offset. Does nothing if
    /// the active segment is empty.
    pub fn roll(&mut self, now_ms: i64) -> Result<(), StorageError> {
        self.check_writable()?;
        self.write_deferred()?;
        let active = self.active();
        if active.is_empty() {
            return Ok(());
        }
        let durable = self.config.fsync != FsyncPolicy::Never;
        let sealed = (|| {
            active.persist_indexes(durable)?;
            if durable {
                // A sealed segment is never repaired on open, so it must not be torn: it goes
                // to disk before the next one exists.
                active.sync()?;
            }
            Segment::create(&self.shared.dir, self.log_end_offset(), now_ms)
        })();
        let segment = match sealed {
            Ok(segment) => segment,
            Err(error) => {
                self.fail(&error);
                return Err(error);
            }
        };
        if durable {
            self.note_flushed(active.next_offset(), self.truncation_count);
        }
        self.shared.segments.write().push(Arc::new(segment));
        self.dir_dirty = true;
        Ok(())
    }

    fn note_flushed(&mut self, offset: u64, truncation_count: u64) {
        if truncation_count != self.truncation_count {
            return;
        }
        let offset = offset.min(self.log_end_offset());
        self.shared
            .flushed_offset
            .fetch_max(offset, Ordering::AcqRel);
    }

    /// The fsync work needed to make everything appended so far durable, or `None` if it
    /// already is. Run it with [`FlushJob::run`] (on any thread), then hand the result to
    /// [`Self::complete_flush`].
    pub fn flush_job(&mut self) -> Option<FlushJob> {
        if self.failure.is_some() || self.write_deferred().is_err() {
            return None;
        }
        let end = self.log_end_offset();
        let flushed = self.flushed_offset();
        if end <= flushed && !self.dir_dirty {
            return None;
        }
        // Index entries are a cache, but writing them here bounds how much of the tail a
        // restart after a crash must rescan. It is a small positioned write, not an fsync.
        if let Err(error) = self.persist_indexes() {
            self.fail(&error);
            return None;
        }
        let segments: Vec<Arc<Segment>> = {
            let all = self.shared.segments.read();
            all.iter()
                .rev()
                .take_while(|s| s.next_offset() > flushed || s.is_empty())
                .cloned()
                .collect()
        };
        let sync_dir = std::mem::take(&mut self.dir_dirty).then(|| self.shared.dir.clone());
        Some(FlushJob {
            segments,
            sync_dir,
            up_to_offset: end,
            truncation_count: self.truncation_count,
        })
    }

    /// Writes the active segment's pending index entries to its index files (no fsync).
    pub fn persist_indexes(&self) -> Result<(), StorageError> {
        self.active().persist_indexes(false)
    }

    /// Records the outcome of a flush job. On failure the log stops accepting writes.
    pub fn complete_flush(
        &mut self,
        job: &FlushJob,
        result: Result<(), StorageError>,
    ) -> Result<u64, StorageError> {
        match result {
            Ok(()) => {
                self.shared.flush_count.fetch_add(1, Ordering::Relaxed);
                self.note_flushed(job.up_to_offset, job.truncation_count);
                Ok(self.flushed_offset())
            }
            Err(error) => {
                if job.sync_dir.is_some() {
                    self.dir_dirty = true;
                }
                self.fail(&error);
                Err(error)
            }
        }
    }

    /// Flushes on the calling thread. Returns the flushed offset.
    pub fn flush(&mut self) -> Result<u64, StorageError> {
        match self.flush_job() {
            Some(job) => {
                let result = job.run();
                self.complete_flush(&job, result)
            }
            None => {
                self.check_writable()?;
                Ok(self.flushed_offset())
            }
        }
    }

    /// Deletes whole sealed segments that fall outside the retention limits (time, size) or
    /// entirely below the log start offset. The log start offset moves to the first remaining
    /// segment, durably, before any file is deleted.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<RetentionOutcome, StorageError> {
        self.write_deferred()?;
        if let Some(retention_ms) = self.config.retention_ms {
            let active = self.active();
            if !active.is_empty() && active.max_timestamp() < now_ms.saturating_sub(retention_ms) {
                // Everything has expired: roll so the active segment can go too.
                self.roll(now_ms)?;
            }
        }
        let segments: Vec<Arc<Segment>> = self.shared.segments.read().clone();
        let log_start = self.log_start_offset();
        let mut total: u64 = segments.iter().map(|s| s.size_bytes()).sum();
        let mut doomed = 0;
        for segment in &segments[..segments.len() - 1] {
            let expired = self
                .config
                .retention_ms
                .is_some_and(|ms| segment.max_timestamp() < now_ms.saturating_sub(ms));
            let oversized = self
                .config
                .retention_bytes
                .is_some_and(|limit| total - segment.size_bytes() >= limit);
            let below_start = segment.next_offset() <= log_start;
            if !(expired || oversized || below_start) {
                break;
            }
            total -= segment.size_bytes();
            doomed += 1;
        }
        if doomed == 0 {
            return Ok(RetentionOutcome {
                log_start_offset: log_start,
                ..RetentionOutcome::default()
            });
        }
        let new_start = log_start.max(segments[doomed].base_offset());
        self.store_log_start(new_start)?;
        let deleted_bytes = self.remove_first_segments(doomed)?;
        tracing::debug!(dir = %self.shared.dir.display(), segments = doomed, deleted_bytes, new_start, "retention deleted segments");
        Ok(RetentionOutcome {
            deleted_segment_count: doomed,
            deleted_bytes,
            log_start_offset: new_start,
        })
    }

    fn store_log_start(&mut self, offset: u64) -> Result<(), StorageError> {
        if offset == self.log_start_offset() {
            return Ok(());
        }
        if let Err(error) = checkpoint::write_atomically(
            &self.shared.dir.join(LOG_START_FILE),
            offset.to_string().as_bytes(),
        ) {
            self.fail(&error);
            return Err(error);
        }
        self.shared
            .log_start_offset
            .store(offset, Ordering::Release);
        Ok(())
    }

    /// Moves the log start offset forward to `offset` (records below it become invisible to
    /// [`LogReader::read`]) and keeps the segments below it, for a caller that deletes them
    /// later ([`Self::delete_below`]) and may still read them ([`LogReader::read_retained`]).
    /// Returns the log start offset.
    pub fn move_log_start(&mut self, offset: u64) -> Result<u64, StorageError> {
        self.check_writable()?;
        self.write_deferred()?;
        let (start, end) = (self.log_start_offset(), self.log_end_offset());
        if offset > end {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start_offset: start,
                log_end_offset: end,
            });
        }
        if offset > start {
            self.store_log_start(offset)?;
        }
        Ok(self.log_start_offset())
    }

    /// Deletes the sealed segments that end at or below both `offset` and the log start
    /// offset. Returns how many bytes went.
    pub fn delete_below(&mut self, offset: u64) -> Result<u64, StorageError> {
        let limit = offset.min(self.log_start_offset());
        let doomed = {
            let segments = self.shared.segments.read();
            segments[..segments.len() - 1]
                .iter()
                .take_while(|segment| segment.next_offset() <= limit)
                .count()
        };
        self.remove_first_segments(doomed)
    }

    /// Deletes the first `count` segments (never the active one); the bytes they held.
    fn remove_first_segments(&mut self, count: usize) -> Result<u64, StorageError> {
        if count == 0 {
            return Ok(0);
        }
        let removed: Vec<Arc<Segment>> = self.shared.segments.write().drain(..count).collect();
        let mut deleted_bytes = 0;
        for segment in &removed {
            deleted_bytes += segment.size_bytes();
            if let Err(error) = segment.delete_files() {
                self.fail(&error);
                return Err(error);
            }
        }
        self.dir_dirty = true;
        Ok(deleted_bytes)
    }

    /// Moves the log start offset forward to `offset` (records below it become invisible) and
    /// deletes segments that lie wholly below it. Returns the new log start offset.
    pub fn advance_log_start(&mut self, offset: u64, now_ms: i64) -> Result<u64, StorageError> {
        self.check_writable()?;
        self.write_deferred()?;
        let end = self.log_end_offset();
        let start = self.log_start_offset();
        if offset > end {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start_offset: start,
                log_end_offset: end,
            });
        }
        if offset <= start {
            return Ok(start);
        }
        self.store_log_start(offset)?;
        // Only the "below start" rule can fire here beyond what retention would do anyway.
        self.apply_retention(now_ms)?;
        Ok(self.log_start_offset())
    }

    /// Removes every batch whose last offset is at or above `offset`, so the log ends at the
    /// start of the batch that held `offset` (replicas truncate to their leader this way).
    /// Truncating below the log start offset empties the log and restarts it at `offset`.
    pub fn truncate_to(&mut self, offset: u64, now_ms: i64) -> Result<(), StorageError> {
        self.check_writable()?;
        self.write_deferred()?;
        if offset >= self.log_end_offset() {
            return Ok(());
        }
        self.truncation_count += 1;
        let result = self.truncate_inner(offset, now_ms);
        if let Err(error) = &result {
            self.fail(error);
        }
        result
    }

    fn truncate_inner(&mut self, offset: u64, now_ms: i64) -> Result<(), StorageError> {
        let segments: Vec<Arc<Segment>> = self.shared.segments.read().clone();
        let first_base = segments[0].base_offset();
        let keep_count = if offset < first_base || offset < self.log_start_offset() {
            0
        } else {
            segments.partition_point(|s| s.base_offset() <= offset)
        };
        // Later segments go first, newest first, so a crash part-way leaves a shorter but
        // contiguous log.
        for segment in segments[keep_count.max(1)..].iter().rev() {
            segment.delete_files()?;
            self.shared.segments.write().pop();
        }
        if keep_count == 0 {
            segments[0].delete_files()?;
            let fresh = Arc::new(Segment::create(&self.shared.dir, offset, now_ms)?);
            *self.shared.segments.write() = vec![fresh];
            self.shared
                .log_start_offset
                .store(offset, Ordering::Release);
            checkpoint::write_atomically(
                &self.shared.dir.join(LOG_START_FILE),
                offset.to_string().as_bytes(),
            )?;
        } else {
            let segment = &segments[keep_count - 1];
            segment.truncate_to(offset, self.config.index_interval_bytes)?;
            if self.config.fsync != FsyncPolicy::Never {
                segment.sync()?;
            }
        }
        self.dir_dirty = true;
        let new_end = self.active().next_offset();
        self.shared.log_end_offset.store(new_end, Ordering::Release);
        self.shared
            .flushed_offset
            .fetch_min(new_end, Ordering::AcqRel);
        if self.log_start_offset() > new_end {
            self.store_log_start(new_end)?;
        }
        self.epochs.clamp_to(new_end)?;
        Ok(())
    }

    /// The epoch stamped on new batches.
    pub fn leader_epoch(&self) -> i32 {
        self.epochs.current()
    }

    /// Starts a new leader epoch at the log end offset (durably). Ignored unless `epoch` is
    /// newer than the current one.
    pub fn begin_leader_epoch(&mut self, epoch: i32) -> Result<(), StorageError> {
        self.write_deferred()?;
        let end = self.log_end_offset();
        self.epochs.begin(epoch, end)
    }

    /// Appends batches (validated as [`Self::append`] does) stamped with `epoch` rather than the
    /// current one, starting that epoch at the log end if it is not the current one (see
    /// [`crate::epoch`]): a replicated log's batches carry the term of the entry they belong
    /// to, older or newer. The batches go to one segment, so the whole append can be read back
    /// with one read.
    pub fn append_in_epoch(
        &mut self,
        batches: &[u8],
        epoch: i32,
        now_ms: i64,
    ) -> Result<AppendInfo, StorageError> {
        self.check_writable()?;
        let (headers, record_total) = check_batches(batches, self.config.max_batch_bytes)?;
        self.write_deferred()?;
        let end = self.log_end_offset();
        if let Err(error) = self.epochs.set_from(epoch, end) {
            self.fail(&error);
            return Err(error);
        }
        self.append_headers(batches, headers, record_total, now_ms)
    }

    /// Kafka's OffsetForLeaderEpoch: the largest epoch at or below `epoch` and the offset where
    /// it ended.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        self.epochs.end_offset_for(epoch, self.log_end_offset())
    }

    /// Puts a segment rebuilt from another copy ([`crate::repair::Rebuild`]) in place of the
    /// sealed segment with the same offsets. Readers that hold the old segment finish their
    /// reads on the old file. Blocking.
    pub fn install_rebuilt(
        &mut self,
        rebuilt: crate::repair::Rebuilt,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let (base, next) = (rebuilt.base_offset(), rebuilt.next_offset());
        if self.reader().sealed_segment_of(base) != Some((base, next)) {
            return Err(StorageError::Corrupt {
                path: self.shared.dir.join(segment::file_name(base, "log")),
                position: 0,
                reason: format!(
                    "a rebuilt segment of offsets {base} to {next} matches no sealed segment of \
                     the log"
                ),
            });
        }
        rebuilt.put_in_place()?;
        let no_epoch_check = |_| None;
        let mode = OpenMode {
            is_tail: false,
            index_interval_bytes: self.config.index_interval_bytes,
            expected_epoch: &no_epoch_check,
            now_ms,
        };
        let (segment, _) = Segment::open(&self.shared.dir, base, mode)?;
        if segment.next_offset() != next {
            return Err(StorageError::Corrupt {
                path: self.shared.dir.join(segment::file_name(base, "log")),
                position: 0,
                reason: format!(
                    "the rebuilt segment ends at offset {} where {next} was expected",
                    segment.next_offset()
                ),
            });
        }
        let mut segments = self.shared.segments.write();
        if let Some(slot) = segments.iter_mut().find(|s| s.base_offset() == base) {
            *slot = Arc::new(segment);
        }
        Ok(())
    }

    /// Persists indexes and fsyncs everything. The log is closed when this returns.
    pub fn close(mut self) -> Result<(), StorageError> {
        self.write_deferred()?;
        let active = self.active();
        active.persist_indexes(true)?;
        self.dir_dirty = true;
        self.flush()?;
        Ok(())
    }
}

/// Whether `name` is one of the files a log keeps in its directory: segments, their
/// indexes, the log start offset and the leader-epoch checkpoint (what [`Log::reload`] takes
/// up when another log's files replace them).
pub fn is_log_file(name: &str) -> bool {
    name == LOG_START_FILE
        || name == crate::epoch::FILE_NAME
        || ["log", "index", "timeindex"]
            .iter()
            .any(|extension| segment::parse_file_name(name, extension).is_some())
}

fn delete_segment_files(dir: &Path, base: u64) -> Result<(), StorageError> {
    for extension in ["log", "index", "timeindex"] {
        let path = dir.join(segment::file_name(base, extension));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::io("delete", &path, source)),
        }
    }
    Ok(())
}

/// Base offsets of the segments in `dir`, sorted. Removes leftovers: temporary files and index
/// files whose log file is gone.
fn list_segments(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut bases = Vec::new();
    let mut indexes = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| StorageError::io("list", dir, source))?;
    for entry in entries {
        let entry = entry.map_err(|source| StorageError::io("list", dir, source))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = segment::parse_file_name(name, "log") {
            bases.push(base);
        } else if let Some(base) = segment::parse_file_name(name, "index")
            .or_else(|| segment::parse_file_name(name, "timeindex"))
        {
            indexes.push((base, entry.path()));
        } else if name.ends_with(".tmp") {
            let path = entry.path();
            std::fs::remove_file(&path)
                .map_err(|source| StorageError::io("delete", &path, source))?;
        }
    }
    bases.sort_unstable();
    for (base, path) in indexes {
        if bases.binary_search(&base).is_err() {
            std::fs::remove_file(&path)
                .map_err(|source| StorageError::io("delete", &path, source))?;
        }
    }
    Ok(bases)
}

/// The reading side of a log: cheap to clone, safe to use from any thread while the writer
/// appends.
#[derive(Debug, Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogReader {
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn log_start_offset(&self) -> u64 {
        self.shared.log_start_offset.load(Ordering::Acquire)
    }

    pub fn log_end_offset(&self) -> u64 {
        self.shared.log_end_offset.load(Ordering::Acquire)
    }

    pub fn flushed_offset(&self) -> u64 {
        self.shared.flushed_offset.load(Ordering::Acquire)
    }

    /// Flush rounds completed since the log was opened.
    pub fn flush_count(&self) -> u64 {
        self.shared.flush_count.load(Ordering::Relaxed)
    }

    /// Total bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.shared
            .segments
            .read()
            .iter()
            .map(|s| s.size_bytes())
            .sum()
    }

    /// The sealed segment holding `offset`, as `[base, next)`, if it is a sealed one (not the
    /// active segment): the part of the log [`Log::install_rebuilt`] can replace.
    pub fn sealed_segment_of(&self, offset: u64) -> Option<(u64, u64)> {
        let segments = self.shared.segments.read();
        let (_, sealed) = segments.split_last()?;
        sealed
            .iter()
            .find(|s| s.base_offset() <= offset && offset < s.next_offset())
            .map(|s| (s.base_offset(), s.next_offset()))
    }

    /// Checks every batch of the sealed segment `[base, …)`: its first damage, if any (see
    /// [`crate::repair`]). Blocking: it reads the whole segment.
    pub fn check_sealed_segment(&self, base: u64) -> Result<Option<Damage>, StorageError> {
        let Some((base, next)) = self
            .sealed_segment_of(base)
            .filter(|(found, _)| *found == base)
        else {
            return Ok(None);
        };
        let path = self.shared.dir.join(segment::file_name(base, "log"));
        let (end, damage) = crate::repair::check_segment(&path, base)?;
        Ok(match damage {
            Some((position, reason)) => Some(Damage {
                path,
                position,
                reason,
                from: base,
                to: next,
            }),
            None if end != next => Some(Damage {
                path,
                position: 0,
                reason: format!("the segment's batches end at offset {end}, not {next}"),
                from: base,
                to: next,
            }),
            None => None,
        })
    }

    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared
            .segments
            .read()
            .iter()
            .map(|s| SegmentInfo {
                base_offset: s.base_offset(),
                next_offset: s.next_offset(),
                size_bytes: s.size_bytes(),
                max_timestamp_ms: Some(s.max_timestamp()).filter(|ts| *ts != segment::NO_TIMESTAMP),
            })
            .collect()
    }

    /// Whole batches starting with the one that contains `offset`, from one segment, up to
    /// `max_bytes` (or the first batch alone if it is larger and `min_one_batch` is set). An
    /// offset equal to the log end offset reads nothing; one outside
    /// `[log start, log end]` is an error.
    pub fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<ReadBatches, StorageError> {
        self.read_until(offset, u64::MAX, max_bytes, min_one_batch)
    }

    /// Like [`Self::read`], but returns no batch that starts at or after `end_offset` (a high
    /// watermark below the log end), and treats `end_offset` as the end of the log.
    pub fn read_until(
        &self,
        offset: u64,
        end_offset: u64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<ReadBatches, StorageError> {
        let from = self.log_start_offset();
        self.read_from(from, offset, end_offset, max_bytes, min_one_batch)
    }

    /// [`Self::read_until`] from any offset the segments still hold, below the log start
    /// offset too (the batches [`Log::move_log_start`] hid and kept).
    pub fn read_retained(
        &self,
        offset: u64,
        end_offset: u64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<ReadBatches, StorageError> {
        let first = self
            .shared
            .segments
            .read()
            .first()
            .map_or(0, |segment| segment.base_offset());
        self.read_from(first, offset, end_offset, max_bytes, min_one_batch)
    }

    /// A read of whole batches from `offset`, which must lie between `lowest` and the log end.
    fn read_from(
        &self,
        lowest: u64,
        offset: u64,
        end_offset: u64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<ReadBatches, StorageError> {
        let log_end_offset = self.log_end_offset().min(end_offset);
        let log_start_offset = self.log_start_offset();
        if offset < lowest || offset > log_end_offset {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start_offset: lowest,
                log_end_offset,
            });
        }
        let mut result = ReadBatches {
            bytes: Bytes::new(),
            log_start_offset,
            log_end_offset,
        };
        if offset == log_end_offset {
            return Ok(result);
        }
        for segment in self.candidates(offset) {
            if let Some(bytes) = segment.read(offset, log_end_offset, max_bytes, min_one_batch)? {
                result.bytes = bytes;
                break;
            }
        }
        Ok(result)
    }

    /// The segment that may hold `offset` and the ones after it.
    fn candidates(&self, offset: u64) -> Vec<Arc<Segment>> {
        let segments = self.shared.segments.read();
        let after = segments.partition_point(|s| s.base_offset() <= offset);
        segments[after.saturating_sub(1)..].to_vec()
    }

    /// The first batch, at or after the log start offset, whose max timestamp is at or after
    /// `timestamp_ms`. The caller finds the exact record inside it.
    pub fn find_by_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<TimestampHit>, StorageError> {
        let start = self.log_start_offset();
        for segment in self.candidates(start) {
            if let Some((header, batch)) = segment.find_by_timestamp(timestamp_ms, start)? {
                return Ok(Some(TimestampHit { header, batch }));
            }
        }
        Ok(None)
    }
}

/// Checks the structure, size and CRC of every batch laid end to end in `batches`.
fn check_batches(
    batches: &[u8],
    max_batch_bytes: usize,
) -> Result<(Vec<(BatchHeader, usize)>, u64), StorageError> {
    if batches.is_empty() {
        return Err(StorageError::InvalidBatch {
            position: 0,
            source: batch::BatchError::Empty,
        });
    }
    let mut headers: Vec<(BatchHeader, usize)> = Vec::with_capacity(1);
    let mut position = 0;
    let mut record_total: u64 = 0;
    while position < batches.len() {
        let header = batch::verify_for_append(&batches[position..], max_batch_bytes)
            .map_err(|source| StorageError::InvalidBatch { position, source })?;
        record_total += header.last_offset_delta as u64 + 1;
        headers.push((header, position));
        position += header.total_bytes();
    }
    Ok((headers, record_total))
}

/// Record batches whose structure and CRC have been checked, ready for
/// [`Log::append_deferred`]. The CRC pass over every byte is the costly part of an append;
/// checking on the producer's or connection's task keeps it off the log's one owner task,
/// so several callers check in parallel while the owner only writes.
#[derive(Debug, Clone)]
pub struct CheckedBatches {
    bytes: Bytes,
    headers: Vec<(BatchHeader, usize)>,
    record_total: u64,
}

impl CheckedBatches {
    /// Checks `bytes` (one or more batches end to end), none larger than `max_batch_bytes`.
    pub fn check(bytes: Bytes, max_batch_bytes: usize) -> Result<Self, StorageError> {
        let (headers, record_total) = check_batches(&bytes, max_batch_bytes)?;
        Ok(Self {
            bytes,
            headers,
            record_total,
        })
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The header of each batch, in order.
    pub fn headers(&self) -> impl Iterator<Item = &BatchHeader> {
        self.headers.iter().map(|(header, _)| header)
    }

    pub fn record_count(&self) -> u64 {
        self.record_total
    }
}
