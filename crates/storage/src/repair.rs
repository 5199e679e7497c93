//! Rebuilding a damaged part of a log from another copy of it.
//!
//! The copies of a replicated partition hold the same batches at the same offsets (followers
//! store the leader's bytes), so a sealed segment whose batches fail their checks, or offsets
//! that no segment holds any more, can be written again from another copy's batches:
//! - [`find_damage`] looks for such damage in a closed log's directory: every batch of every
//!   sealed segment is checked (structure, CRC, offset continuity), and so are the joins
//!   between segments and the log start. The tail segment is left to recovery, which cuts a
//!   damaged tail (what it held is caught up again like any missing tail).
//! - [`Rebuild`] writes the replacement beside the log (`<base>.rebuild.tmp`, which opening
//!   the log removes if a crash left it), checking every batch it is given.
//! - [`install`] puts it in place in a closed log; [`crate::Log::install_rebuilt`] in an open
//!   one, where readers that hold the old segment finish on the old file.
//!
//! Which copy the batches come from, and that they are the batches this copy lost (and not a
//! different history at the same offsets), is the caller's business: the storage engine
//! knows no replicas.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::batch::{self, BatchHeader, HEADER_BYTES};
use crate::checkpoint;
use crate::error::StorageError;
use crate::segment;

/// Largest batch a damage scan reads whole; a header claiming more is damage.
const SCAN_BATCH_MAX: usize = 64 << 20;

/// Damage found in a log's directory, and the offsets to write again to mend it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The damaged file (for offsets no segment holds: the segment after them).
    pub path: PathBuf,
    /// Where in the file (byte).
    pub position: u64,
    pub reason: String,
    /// The offsets to write again: `[from, to)`, `to` being where the next segment starts.
    pub from: u64,
    pub to: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at byte {}: {} (offsets {} to {} need rebuilding)",
            self.path.display(),
            self.position,
            self.reason,
            self.from,
            self.to
        )
    }
}

/// The segments' base offsets in `dir`, sorted (nothing is removed).
fn segment_bases(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut bases = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| StorageError::io("list", dir, source))?;
    for entry in entries {
        let entry = entry.map_err(|source| StorageError::io("list", dir, source))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(|name| segment::parse_file_name(name, "log"))
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Checks every batch of the log in `dir` that recovery would not cut: the sealed segments
/// (all but the last non-empty one and any empty ones after it), that each ends where the next
/// begins, and that the first begins at or below the log start offset. Blocking: it reads
/// every sealed segment whole. Call it on a closed log (or one whose sealed segments nothing
/// rewrites meanwhile).
pub fn find_damage(dir: &Path) -> Result<Vec<Damage>, StorageError> {
    let bases = segment_bases(dir)?;
    let mut found = Vec::new();
    let path_of = |base: u64| dir.join(segment::file_name(base, "log"));
    let mut tail_from = 0;
    for (index, base) in bases.iter().enumerate() {
        let path = path_of(*base);
        let len = std::fs::metadata(&path)
            .map_err(|source| StorageError::io("stat", &path, source))?
            .len();
        if len > 0 {
            tail_from = index;
        }
    }
    let stored_start = checkpoint::read_u64(&dir.join(crate::log::LOG_START_FILE))?;
    if let (Some(start), Some(&first)) = (stored_start, bases.first())
        && first > start
    {
        found.push(Damage {
            path: path_of(first),
            position: 0,
            reason: format!(
                "the log starts at offset {start} but its first segment at {first}: the \
                 segments before it are missing"
            ),
            from: start,
            to: first,
        });
    }
    for (index, pair) in bases.windows(2).enumerate() {
        if index >= tail_from {
            break;
        }
        let (base, next) = (pair[0], pair[1]);
        let path = path_of(base);
        let (end, damage) = check_segment(&path, base)?;
        if let Some((position, reason)) = damage {
            found.push(Damage {
                path,
                position,
                reason,
                from: base,
                to: next,
            });
        } else if end != next {
            found.push(Damage {
                path: path_of(next),
                position: 0,
                reason: format!(
                    "the segment before it ends at offset {end} but this one starts at {next}: \
                     a segment is missing"
                ),
                from: end,
                to: next,
            });
        }
    }
    Ok(found)
}

/// Walks the batches of the segment file at `path`: where they end (the next offset) and the
/// first damage, if any (its byte position and why).
pub(crate) fn check_segment(
    path: &Path,
    base: u64,
) -> Result<(u64, Option<(u64, String)>), StorageError> {
    let file = File::open(path).map_err(|source| StorageError::io("open", path, source))?;
    let len = file
        .metadata()
        .map_err(|source| StorageError::io("stat", path, source))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut position = 0u64;
    let mut expected = base;
    let mut batch = Vec::new();
    while position < len {
        let remaining = len - position;
        if remaining < HEADER_BYTES as u64 {
            return Ok((
                expected,
                Some((
                    position,
                    format!("{remaining} trailing bytes are shorter than a batch header"),
                )),
            ));
        }
        batch.resize(HEADER_BYTES, 0);
        reader
            .read_exact(&mut batch)
            .map_err(|source| StorageError::io("read", path, source))?;
        let header = match BatchHeader::parse(&batch) {
            Ok(header) => header,
            Err(e) => return Ok((expected, Some((position, e.to_string())))),
        };
        let total = header.total_bytes();
        if total as u64 > remaining || total > SCAN_BATCH_MAX {
            return Ok((
                expected,
                Some((
                    position,
                    format!("batch claims {total} bytes but only {remaining} remain"),
                )),
            ));
        }
        if header.base_offset != expected as i64 {
            return Ok((
                expected,
                Some((
                    position,
                    format!(
                        "batch base offset {} where {expected} was expected",
                        header.base_offset
                    ),
                )),
            ));
        }
        batch.resize(total, 0);
        reader
            .read_exact(&mut batch[HEADER_BYTES..])
            .map_err(|source| StorageError::io("read", path, source))?;
        if let Err(e) = batch::verify(&batch) {
            return Ok((expected, Some((position, e.to_string()))));
        }
        position += total as u64;
        expected = header.next_offset() as u64;
    }
    Ok((expected, None))
}

/// A segment being written again from another copy's batches, beside the log.
#[derive(Debug)]
pub struct Rebuild {
    dir: PathBuf,
    from: u64,
    to: u64,
    /// The first batch's base offset (at or below `from`), once one was taken.
    base: Option<u64>,
    /// The next offset wanted.
    next: u64,
    tmp: PathBuf,
    file: BufWriter<File>,
}

impl Rebuild {
    /// Starts rebuilding offsets `[from, to)` of the log in `dir`. Blocking.
    pub fn create(dir: &Path, from: u64, to: u64) -> Result<Self, StorageError> {
        let tmp = dir.join(format!("{from:020}.rebuild.tmp"));
        let file = File::create(&tmp).map_err(|source| StorageError::io("create", &tmp, source))?;
        Ok(Self {
            dir: dir.to_owned(),
            from,
            to,
            base: None,
            next: from,
            tmp,
            file: BufWriter::with_capacity(1 << 20, file),
        })
    }

    /// The next offset wanted: ask the other copy for batches from here.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    pub fn is_complete(&self) -> bool {
        self.next >= self.to
    }

    /// Takes whole batches laid end to end, as another copy read them: each is checked
    /// (structure, CRC); those wholly before the next offset wanted are skipped, as are those
    /// from `to` on; the others must follow one another with no gap. Blocking.
    pub fn append(&mut self, mut batches: &[u8]) -> Result<(), StorageError> {
        let mut position = 0;
        while !batches.is_empty() && !self.is_complete() {
            let invalid = |source| StorageError::InvalidBatch { position, source };
            let (_, total) = BatchHeader::peek_extent(batches).map_err(invalid)?;
            let bytes = batches.get(..total).ok_or(StorageError::InvalidBatch {
                position,
                source: batch::BatchError::Truncated {
                    needed: total,
                    available: batches.len(),
                },
            })?;
            let header = batch::verify(bytes).map_err(invalid)?;
            let base = header.base_offset as u64;
            let next = header.next_offset() as u64;
            let fits = if self.base.is_none() {
                base <= self.next && self.next < next
            } else {
                base == self.next
            };
            if next <= self.next {
                // Before what is wanted (another copy's read starts at the batch holding it).
            } else if !fits {
                return Err(StorageError::Corrupt {
                    path: self.tmp.clone(),
                    position: 0,
                    reason: format!(
                        "the other copy's batch at offset {base} does not follow offset {} \
                         (rebuilding {} to {})",
                        self.next, self.from, self.to
                    ),
                });
            } else {
                self.file
                    .write_all(bytes)
                    .map_err(|source| StorageError::io("write", &self.tmp, source))?;
                self.base.get_or_insert(base);
                self.next = next;
            }
            batches = &batches[total..];
            position += total;
        }
        Ok(())
    }

    /// Syncs the complete replacement. Blocking.
    pub fn finish(self) -> Result<Rebuilt, StorageError> {
        let Self {
            dir,
            from,
            to,
            base,
            next,
            tmp,
            file,
        } = self;
        if next != to {
            return Err(StorageError::Corrupt {
                path: tmp,
                position: 0,
                reason: format!(
                    "the rebuilt batches end at offset {next}, not at {to} where the next segment starts"
                ),
            });
        }
        let file = file
            .into_inner()
            .map_err(|e| StorageError::io("write", &tmp, e.into_error()))?;
        crate::sync::all(&file).map_err(|source| StorageError::io("sync", &tmp, source))?;
        Ok(Rebuilt {
            dir,
            base: base.unwrap_or(from),
            to,
            tmp,
        })
    }
}

/// A complete, synced replacement segment, not yet in place.
#[derive(Debug)]
pub struct Rebuilt {
    dir: PathBuf,
    base: u64,
    to: u64,
    tmp: PathBuf,
}

impl Rebuilt {
    /// The segment's base offset.
    pub fn base_offset(&self) -> u64 {
        self.base
    }

    /// The offset after its last batch.
    pub fn next_offset(&self) -> u64 {
        self.to
    }

    /// Renames the replacement over the segment file of its base, drops that segment's
    /// indexes (rebuilt when the segment opens) and syncs the directory.
    pub(crate) fn put_in_place(&self) -> Result<PathBuf, StorageError> {
        let path = self.dir.join(segment::file_name(self.base, "log"));
        std::fs::rename(&self.tmp, &path)
            .map_err(|source| StorageError::io("rename", &self.tmp, source))?;
        for extension in ["index", "timeindex"] {
            let index = self.dir.join(segment::file_name(self.base, extension));
            match std::fs::remove_file(&index) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StorageError::io("delete", &index, source)),
            }
        }
        crate::sync::dir(&self.dir)?;
        Ok(path)
    }
}

/// Puts a rebuilt segment in place in a closed log. Blocking.
pub fn install(rebuilt: Rebuilt) -> Result<(), StorageError> {
    rebuilt.put_in_place().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::BatchBuilder;
    use crate::{Log, LogConfig};

    fn batch(values: usize) -> Vec<u8> {
        let mut builder = BatchBuilder::new(0);
        for i in 0..values {
            builder.push(0, None, Some(format!("value {i}").as_bytes()), &[]);
        }
        builder.finish().to_vec()
    }

    /// A closed log of four segments of ten batches (three records each).
    fn log_of_four_segments(dir: &Path) -> Vec<u64> {
        let config = LogConfig {
            segment_bytes: 10 * batch(3).len() as u64,
            ..LogConfig::default()
        };
        let mut log = Log::open(dir, config, 0).unwrap();
        for _ in 0..40 {
            log.append(&batch(3), 0).unwrap();
        }
        let bases = log
            .reader()
            .segments()
            .iter()
            .map(|s| s.base_offset)
            .collect();
        log.close().unwrap();
        bases
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }

    /// Rebuilds each damage of `damaged` from `good` and installs it.
    fn mend(damaged: &Path, good: &Path) {
        let reader = Log::open(good, LogConfig::default(), 0).unwrap().reader();
        for damage in find_damage(damaged).unwrap() {
            let mut rebuild = Rebuild::create(damaged, damage.from, damage.to).unwrap();
            while !rebuild.is_complete() {
                let read = reader.read(rebuild.next_offset(), 700, true).unwrap();
                rebuild.append(&read.bytes).unwrap();
            }
            install(rebuild.finish().unwrap()).unwrap();
        }
    }

    fn same_files(a: &Path, b: &Path, extension: &str) {
        let mut names: Vec<_> = std::fs::read_dir(a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_str().unwrap().ends_with(extension))
            .collect();
        names.sort();
        assert!(!names.is_empty());
        for name in names {
            assert_eq!(
                std::fs::read(a.join(&name)).unwrap(),
                std::fs::read(b.join(&name)).unwrap(),
                "{name:?} differs"
            );
        }
    }

    #[test]
    fn a_flipped_byte_and_a_missing_segment_are_found_and_rebuilt_from_another_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (good, damaged) = (tmp.path().join("good"), tmp.path().join("damaged"));
        let bases = log_of_four_segments(&good);
        assert!(bases.len() >= 4, "{bases:?}");
        copy_dir(&good, &damaged);
        assert_eq!(find_damage(&damaged).unwrap(), vec![]);

        // A flipped byte in the middle of the first segment, which opening does not read.
        let first = damaged.join(segment::file_name(bases[0], "log"));
        let mut bytes = std::fs::read(&first).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        std::fs::write(&first, &bytes).unwrap();
        // The third segment deleted.
        std::fs::remove_file(damaged.join(segment::file_name(bases[2], "log"))).unwrap();

        let found = find_damage(&damaged).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!((found[0].from, found[0].to), (bases[0], bases[1]));
        assert_eq!(found[0].path, first);
        assert!(found[0].position > 0 && found[0].position <= at as u64);
        assert_eq!((found[1].from, found[1].to), (bases[2], bases[3]));

        mend(&damaged, &good);
        assert_eq!(find_damage(&damaged).unwrap(), vec![]);
        same_files(&good, &damaged, ".log");
        let log = Log::open(&damaged, LogConfig::default(), 0).unwrap();
        assert_eq!(log.log_end_offset(), 120);
        let mut at = 0;
        while at < 120 {
            let read = log.reader().read(at, 1 << 20, true).unwrap();
            let mut bytes = &read.bytes[..];
            while !bytes.is_empty() {
                let header = batch::verify(bytes).unwrap();
                at = header.next_offset() as u64;
                bytes = &bytes[header.total_bytes()..];
            }
        }
    }

    #[test]
    fn a_damaged_sealed_segment_of_an_open_log_is_replaced_while_readers_go_on() {
        let tmp = tempfile::tempdir().unwrap();
        let (good, damaged) = (tmp.path().join("good"), tmp.path().join("damaged"));
        let bases = log_of_four_segments(&good);
        copy_dir(&good, &damaged);
        let mut log = Log::open(&damaged, LogConfig::default(), 0).unwrap();
        let reader = log.reader();
        let path = damaged.join(segment::file_name(bases[1], "log"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();

        assert!(matches!(
            reader.read(bases[1], 1 << 20, true),
            Err(StorageError::Corrupt { .. })
        ));
        assert_eq!(
            reader.sealed_segment_of(bases[1] + 1),
            Some((bases[1], bases[2]))
        );
        let damage = reader.check_sealed_segment(bases[1]).unwrap().unwrap();
        assert_eq!(
            (damage.from, damage.to, damage.path),
            (bases[1], bases[2], path)
        );
        // The active segment is not one a rebuild may replace.
        assert_eq!(reader.sealed_segment_of(bases[bases.len() - 1]), None);

        let copy = Log::open(&good, LogConfig::default(), 0).unwrap().reader();
        let mut rebuild = Rebuild::create(&damaged, damage.from, damage.to).unwrap();
        while !rebuild.is_complete() {
            let read = copy.read(rebuild.next_offset(), 1 << 20, true).unwrap();
            rebuild.append(&read.bytes).unwrap();
        }
        log.install_rebuilt(rebuild.finish().unwrap(), 0).unwrap();
        assert_eq!(reader.check_sealed_segment(bases[1]).unwrap(), None);
        assert_eq!(
            reader.read(bases[1], 1 << 20, true).unwrap().bytes,
            copy.read(bases[1], 1 << 20, true).unwrap().bytes
        );
        // The log takes appends after it as before.
        log.append(&batch(3), 0).unwrap();
        assert_eq!(log.log_end_offset(), 123);
    }

    #[test]
    fn batches_that_do_not_follow_on_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        let bases = log_of_four_segments(&good);
        let reader = Log::open(&good, LogConfig::default(), 0).unwrap().reader();
        let mut rebuild = Rebuild::create(tmp.path(), bases[1], bases[2]).unwrap();
        // Batches of the segment after the one wanted.
        let later = reader.read(bases[2], 1 << 20, true).unwrap();
        assert!(rebuild.append(&later.bytes).is_err());
        // A damaged batch.
        let mut wanted = reader.read(bases[1], 1 << 20, true).unwrap().bytes.to_vec();
        wanted[70] ^= 1;
        assert!(matches!(
            rebuild.append(&wanted),
            Err(StorageError::InvalidBatch { .. })
        ));
        // Too short.
        let mut rebuild = Rebuild::create(tmp.path(), bases[1], bases[2]).unwrap();
        let first = reader.read(bases[1], 1, true).unwrap();
        rebuild.append(&first.bytes).unwrap();
        assert!(rebuild.finish().is_err());
    }
}
