//! Damage to a closed log, and what reopening it must do: keep exactly the batches before the
//! damage when it is in the tail, and refuse (naming the file and byte) when it is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sluice_storage::{BatchHeader, Log, StorageError};

/// A closed log with several segments, and what it held.
struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Every file of the pristine log.
    files: BTreeMap<PathBuf, Vec<u8>>,
    /// (base offset, bytes) of every batch, in order.
    batches: Vec<(u64, Vec<u8>)>,
    tail_file: PathBuf,
    /// Position of the last batch inside the tail file.
    last_batch_at: usize,
}

fn build() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut log = Log::open(&path, common::small_config(), 0).unwrap();
    for seed in 0..24u64 {
        let batch = common::batch(
            1 + (seed % 3) as usize,
            150 + (seed as usize * 7) % 200,
            seed as i64,
            seed,
        );
        log.append(&batch, 0).unwrap();
    }
    let segments = log.reader().segments();
    assert!(
        segments.len() >= 4,
        "fixture needs several segments, has {}",
        segments.len()
    );
    let batches = read_all(&log);
    log.close().unwrap();

    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&path).unwrap() {
        let entry = entry.unwrap();
        files.insert(entry.path(), std::fs::read(entry.path()).unwrap());
    }
    let tail = segments.last().unwrap();
    let tail_file = path.join(format!("{:020}.log", tail.base_offset));
    let tail_bytes = &files[&tail_file];
    let mut at = 0;
    let mut last_batch_at = 0;
    while at < tail_bytes.len() {
        last_batch_at = at;
        at += BatchHeader::parse(&tail_bytes[at..]).unwrap().total_bytes();
    }
    assert!(
        last_batch_at > 0,
        "tail segment should hold more than one batch"
    );
    Fixture {
        _dir: dir,
        path,
        files,
        batches,
        tail_file,
        last_batch_at,
    }
}

fn read_all(log: &Log) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.log_end_offset() {
        let read = log.read(offset, 1 << 20, true).unwrap();
        let batches = common::split(&read.bytes);
        assert!(!batches.is_empty());
        for (base, bytes) in batches {
            offset = BatchHeader::parse(&bytes).unwrap().next_offset() as u64;
            out.push((base, bytes));
        }
    }
    out
}

impl Fixture {
    fn restore(&self) {
        std::fs::remove_dir_all(&self.path).unwrap();
        std::fs::create_dir_all(&self.path).unwrap();
        for (path, bytes) in &self.files {
            std::fs::write(path, bytes).unwrap();
        }
    }

    fn tail(&self) -> Vec<u8> {
        self.files[&self.tail_file].clone()
    }

    /// Reopens and checks the log holds exactly the first `keep` batches, and still takes
    /// appends afterwards.
    fn expect_recovers(&self, keep: usize, what: &str) {
        let mut log = Log::open(&self.path, common::small_config(), 0)
            .unwrap_or_else(|error| panic!("{what}: reopen failed: {error}"));
        let got = read_all(&log);
        assert_eq!(got.len(), keep, "{what}: batch count");
        assert!(got == self.batches[..keep], "{what}: batch bytes differ");
        let expected_end = self.batches[keep - 1].0
            + BatchHeader::parse(&self.batches[keep - 1].1)
                .unwrap()
                .last_offset_delta as u64
            + 1;
        assert_eq!(log.log_end_offset(), expected_end, "{what}: log end");
        let more = common::batch(2, 10, 99, 99);
        let info = log.append(&more, 0).unwrap();
        assert_eq!(info.base_offset, expected_end, "{what}: next append offset");
        drop(log);
        // And the repaired log reopens cleanly with the new batch.
        let log = Log::open(&self.path, common::small_config(), 0).unwrap();
        assert_eq!(
            read_all(&log).len(),
            keep + 1,
            "{what}: after second reopen"
        );
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn cut_anywhere_in_the_last_batch_keeps_the_batches_before_it() {
    let fixture = build();
    let all = fixture.batches.len();
    let tail = fixture.tail();
    for cut in fixture.last_batch_at..tail.len() {
        fixture.restore();
        write(&fixture.tail_file, &tail[..cut]);
        fixture.expect_recovers(all - 1, &format!("cut at byte {cut}"));
    }
}

#[test]
fn garbage_after_the_last_batch_is_dropped() {
    let fixture = build();
    let all = fixture.batches.len();
    let tail = fixture.tail();
    let last = fixture.batches.last().unwrap().1.clone();
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("zeros", vec![0; 4096]),
        ("ones", vec![0xff; 100]),
        ("one byte", vec![7]),
        ("pseudo-random", common::value_for(3, 0, 777)),
        // A valid batch, but with the wrong offset: a stale write from before a truncation.
        ("replayed batch", last.clone()),
        ("short header", last[..40].to_vec()),
    ];
    for (what, extra) in garbage {
        fixture.restore();
        let mut damaged = tail.clone();
        damaged.extend_from_slice(&extra);
        write(&fixture.tail_file, &damaged);
        fixture.expect_recovers(all, what);
    }
}

#[test]
fn any_flipped_byte_in_the_last_batch_is_cut() {
    let fixture = build();
    let all = fixture.batches.len();
    let tail = fixture.tail();
    for at in fixture.last_batch_at..tail.len() {
        for mask in [0x01u8, 0x80] {
            fixture.restore();
            let mut damaged = tail.clone();
            damaged[at] ^= mask;
            write(&fixture.tail_file, &damaged);
            fixture.expect_recovers(all - 1, &format!("flip {mask:#x} at byte {at}"));
        }
    }
}

#[test]
fn lost_or_damaged_indexes_are_rebuilt() {
    let fixture = build();
    let all = fixture.batches.len();
    let indexes: Vec<PathBuf> = fixture
        .files
        .keys()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "index" || e == "timeindex")
        })
        .cloned()
        .collect();
    // Every index file deleted.
    fixture.restore();
    for path in &indexes {
        std::fs::remove_file(path).unwrap();
    }
    fixture.expect_recovers(all, "indexes deleted");
    // Every index file replaced by garbage or cut short.
    for (what, damage) in [
        ("garbage", common::value_for(1, 1, 64)),
        ("empty", Vec::new()),
        ("zeros", vec![0; 48]),
    ] {
        fixture.restore();
        for path in &indexes {
            write(path, &damage);
        }
        fixture.expect_recovers(all, what);
    }
    // Index entries that point at the wrong place.
    fixture.restore();
    for path in indexes.iter().filter(|p| p.extension().unwrap() == "index") {
        let mut raw = std::fs::read(path).unwrap();
        if raw.len() >= 8 {
            let at = raw.len() - 4;
            raw[at] ^= 0x01;
        }
        write(path, &raw);
    }
    fixture.expect_recovers(all, "shifted index positions");
}

#[test]
fn damage_before_the_tail_is_an_error_naming_file_and_byte() {
    let fixture = build();
    let sealed = fixture
        .files
        .keys()
        .filter(|p| p.extension().is_some_and(|e| e == "log") && **p != fixture.tail_file)
        .nth(1)
        .unwrap()
        .clone();
    let mut damaged = fixture.files[&sealed].clone();
    let at = damaged.len() - 3;
    damaged[at] ^= 0xff;
    fixture.restore();
    write(&sealed, &damaged);
    let error = Log::open(&fixture.path, common::small_config(), 0).unwrap_err();
    match &error {
        StorageError::Corrupt { path, position, .. } => {
            assert_eq!(path, &sealed);
            assert!(*position < damaged.len() as u64);
        }
        other => panic!("expected a corruption error, got {other}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(sealed.file_name().unwrap().to_str().unwrap()),
        "{message}"
    );
    assert!(message.contains("at byte"), "{message}");
}

#[test]
fn damage_inside_a_sealed_segment_is_never_served() {
    let fixture = build();
    let sealed = fixture
        .files
        .keys()
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap()
        .clone();
    // Damage the first batch's value bytes; open does not scan this far back, reads must catch it.
    let mut damaged = fixture.files[&sealed].clone();
    damaged[70] ^= 0x20;
    fixture.restore();
    write(&sealed, &damaged);
    let log = Log::open(&fixture.path, common::small_config(), 0).unwrap();
    match log.read(0, 1 << 20, true) {
        Err(StorageError::Corrupt { path, position, .. }) => {
            assert_eq!(path, sealed);
            assert_eq!(position, 0);
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

#[test]
fn a_read_stops_before_damage_and_a_read_at_it_names_it() {
    let fixture = build();
    let sealed = fixture
        .files
        .keys()
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap()
        .clone();
    // Damage the value bytes of the third batch of the first segment.
    let original = &fixture.files[&sealed];
    let mut position = 0usize;
    let mut starts = Vec::new();
    while position < original.len() {
        starts.push(position);
        position += BatchHeader::parse(&original[position..])
            .unwrap()
            .total_bytes();
    }
    assert!(
        starts.len() >= 4,
        "the fixture's first segment has several batches"
    );
    let third = starts[2];
    let third_offset = BatchHeader::parse(&original[third..]).unwrap().base_offset as u64;
    let mut damaged = original.clone();
    damaged[starts[3] - 3] ^= 0x20;
    fixture.restore();
    write(&sealed, &damaged);
    let log = Log::open(&fixture.path, common::small_config(), 0).unwrap();
    // The two batches before the damage are served, and nothing from it on.
    let read = log.read(0, 1 << 20, true).unwrap();
    assert_eq!(&read.bytes[..], &original[..third]);
    match log.read(third_offset, 1 << 20, true) {
        Err(StorageError::Corrupt { path, position, .. }) => {
            assert_eq!(path, sealed);
            assert_eq!(position, third as u64);
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

#[test]
fn a_crash_right_after_a_roll_repairs_the_previous_segment() {
    let fixture = build();
    let all = fixture.batches.len();
    // A new, empty segment exists, and the segment before it lost part of its last batch.
    let tail = fixture.tail();
    let end = fixture.batches.last().unwrap();
    let next = end.0 + BatchHeader::parse(&end.1).unwrap().last_offset_delta as u64 + 1;
    fixture.restore();
    write(&fixture.tail_file, &tail[..tail.len() - 5]);
    write(&fixture.path.join(format!("{next:020}.log")), &[]);
    fixture.expect_recovers(all - 1, "torn segment before an empty one");
}
