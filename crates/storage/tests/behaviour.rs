//! Time-index lookups, retention, truncation, the log start offset, read limits, input
//! validation and group commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use sluice_storage::{
    BatchHeader, CheckedBatches, FsyncPolicy, Log, LogConfig, LogHandle, OwnerOptions, StorageError,
};

fn open(dir: &std::path::Path, config: LogConfig) -> Log {
    Log::open(dir, config, 0).unwrap()
}

/// Appends one-record batches with the given timestamps; returns each batch's offset.
fn append_at(log: &mut Log, timestamps: &[i64]) -> Vec<u64> {
    timestamps
        .iter()
        .enumerate()
        .map(|(i, ts)| {
            let batch = common::batch(1, 100, *ts, i as u64);
            log.append(&batch, 0).unwrap().base_offset
        })
        .collect()
}

#[test]
fn timestamp_lookup_finds_first_batch_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), common::small_config());
    // Not monotonic: producers' clocks disagree.
    let timestamps: Vec<i64> = (0..60)
        .map(|i| 1_000 + (i * 37 % 23) * 10 + i * 5)
        .collect();
    let offsets = append_at(&mut log, &timestamps);
    assert!(log.reader().segments().len() > 3);
    let check = |log: &Log| {
        for target in [
            0, 999, 1_000, 1_001, 1_100, 1_150, 1_250, 1_300, 1_400, 1_600, 5_000,
        ] {
            let expected = timestamps
                .iter()
                .position(|ts| *ts >= target)
                .map(|i| offsets[i]);
            let hit = log.reader().find_by_timestamp(target).unwrap();
            assert_eq!(
                hit.as_ref().map(|hit| hit.header.base_offset as u64),
                expected,
                "target {target}"
            );
            if let Some(hit) = hit {
                assert_eq!(hit.batch.len(), hit.header.total_bytes());
            }
        }
    };
    check(&log);
    log.close().unwrap();
    check(&open(dir.path(), common::small_config()));
    // The lookup skips what lies below the log start offset.
    let mut log = open(dir.path(), common::small_config());
    log.advance_log_start(offsets[10], 0).unwrap();
    let hit = log.reader().find_by_timestamp(0).unwrap().unwrap();
    assert_eq!(hit.header.base_offset as u64, offsets[10]);
}

#[test]
fn time_retention_deletes_expired_segments_and_moves_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_ms: Some(1_000),
        ..common::small_config()
    };
    let mut log = open(dir.path(), config.clone());
    let old: Vec<i64> = vec![1_000; 30];
    let offsets = append_at(&mut log, &old);
    log.roll(0).unwrap();
    let new = append_at(&mut log, &[9_000, 9_000]);
    let before = log.reader().segments().len();
    // Nothing has expired at t=1_500.
    assert_eq!(log.apply_retention(1_500).unwrap().deleted_segment_count, 0);
    let outcome = log.apply_retention(5_000).unwrap();
    assert_eq!(outcome.deleted_segment_count, before - 1);
    assert_eq!(log.log_start_offset(), new[0]);
    assert!(matches!(
        log.read(offsets[0], 100, true),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert_eq!(
        common::split(&log.read(new[0], 10_000, true).unwrap().bytes).len(),
        2
    );
    log.close().unwrap();
    let log = open(dir.path(), config.clone());
    assert_eq!(log.log_start_offset(), new[0]);
    // When everything has expired, the active segment is rolled and deleted too.
    let mut log = log;
    let outcome = log.apply_retention(20_000).unwrap();
    assert_eq!(outcome.deleted_segment_count, 1);
    assert_eq!(log.log_start_offset(), log.log_end_offset());
    assert_eq!(log.reader().size_bytes(), 0);
    let batch = common::batch(1, 5, 20_000, 1);
    assert_eq!(log.append(&batch, 0).unwrap().base_offset, new[1] + 1);
}

#[test]
fn size_retention_keeps_the_newest_segments_under_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(5_000),
        ..common::small_config()
    };
    let mut log = open(dir.path(), config);
    append_at(&mut log, &[0; 80]);
    let total_before = log.reader().size_bytes();
    assert!(total_before > 10_000);
    log.apply_retention(0).unwrap();
    let segments = log.reader().segments();
    let total: u64 = segments.iter().map(|s| s.size_bytes).sum();
    assert!(total < 5_000 + 2_000, "kept {total} bytes");
    // Removing the oldest remaining segment would go below the limit.
    assert!(total - segments[0].size_bytes < 5_000);
    assert_eq!(log.log_start_offset(), segments[0].base_offset);
}

#[test]
fn truncation_cuts_mid_segment_across_segments_and_below_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_config();
    let mut log = open(dir.path(), config.clone());
    let mut bases = Vec::new();
    for i in 0..40u64 {
        // Three records per batch so truncation can land inside a batch.
        let batch = common::batch(3, 80, i as i64, i);
        bases.push(log.append(&batch, 0).unwrap().base_offset);
    }
    let segments_before = log.reader().segments().len();
    // Inside batch 30: the whole batch goes.
    log.truncate_to(bases[30] + 1, 0).unwrap();
    assert_eq!(log.log_end_offset(), bases[30]);
    assert!(log.reader().segments().len() < segments_before);
    log.close().unwrap();
    let mut log = open(dir.path(), config.clone());
    assert_eq!(log.log_end_offset(), bases[30]);
    // Appends continue from the cut, and the time index forgot the cut batches.
    let batch = common::batch(1, 10, 1_000, 1);
    assert_eq!(log.append(&batch, 0).unwrap().base_offset, bases[30]);
    let hit = log.reader().find_by_timestamp(31).unwrap().unwrap();
    assert_eq!(hit.header.base_offset as u64, bases[30]);
    // Below the log start offset: the log restarts empty at the given offset.
    log.advance_log_start(bases[20], 0).unwrap();
    log.truncate_to(bases[5], 0).unwrap();
    assert_eq!(log.log_start_offset(), bases[5]);
    assert_eq!(log.log_end_offset(), bases[5]);
    assert_eq!(log.reader().segments().len(), 1);
    drop(log);
    let log = open(dir.path(), config);
    assert_eq!(
        (log.log_start_offset(), log.log_end_offset()),
        (bases[5], bases[5])
    );
}

#[test]
fn log_start_offset_is_durable_and_bounds_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), common::small_config());
    let offsets = append_at(&mut log, &[0; 30]);
    assert_eq!(log.advance_log_start(offsets[12], 0).unwrap(), offsets[12]);
    // Moving backwards is a no-op; past the end is an error.
    assert_eq!(log.advance_log_start(offsets[3], 0).unwrap(), offsets[12]);
    assert!(log.advance_log_start(log.log_end_offset() + 1, 0).is_err());
    drop(log); // no clean close
    let log = open(dir.path(), common::small_config());
    assert_eq!(log.log_start_offset(), offsets[12]);
    assert!(matches!(
        log.read(offsets[11], 1_000, true),
        Err(StorageError::OffsetOutOfRange { offset, log_start_offset, .. })
            if offset == offsets[11] && log_start_offset == offsets[12]
    ));
    assert!(log.reader().segments()[0].base_offset <= offsets[12]);
    assert!(log.reader().segments()[0].next_offset > offsets[12]);
}

#[test]
fn reads_return_whole_batches_within_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 1 << 20,
        ..common::small_config()
    };
    let mut log = open(dir.path(), config);
    let mut sizes = Vec::new();
    for i in 0..10u64 {
        let batch = common::batch(2, 200, 0, i);
        sizes.push(batch.len());
        log.append(&batch, 0).unwrap();
    }
    let one = sizes[0];
    // An offset in the middle of a batch returns that whole batch.
    let read = log.read(1, one * 3 + 10, true).unwrap();
    let batches = common::split(&read.bytes);
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].0, 0);
    assert_eq!(read.log_end_offset, 20);
    // Smaller than one batch: one batch with min_one_batch, nothing without.
    assert_eq!(
        common::split(&log.read(4, 10, true).unwrap().bytes).len(),
        1
    );
    assert!(log.read(4, 10, false).unwrap().bytes.is_empty());
    // At the end: empty; past it: an error.
    assert!(log.read(20, 1_000, true).unwrap().bytes.is_empty());
    assert!(matches!(
        log.read(21, 1_000, true),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
}

#[test]
fn invalid_input_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        max_batch_bytes: 2_000,
        ..common::small_config()
    };
    let mut log = open(dir.path(), config);
    let good = common::batch(1, 10, 0, 1);
    let mut bad = common::batch(1, 10, 0, 2);
    let at = bad.len() - 1;
    bad[at] ^= 1;
    let mut input = BytesMut::new();
    input.extend_from_slice(&good);
    input.extend_from_slice(&bad);
    match log.append(&input, 0) {
        Err(StorageError::InvalidBatch { position, .. }) => assert_eq!(position, good.len()),
        other => panic!("expected an invalid batch error, got {other:?}"),
    }
    let too_big = common::batch(1, 3_000, 0, 3);
    assert!(matches!(
        log.append(&too_big, 0),
        Err(StorageError::InvalidBatch { .. })
    ));
    let truncated = BytesMut::from(&good[..good.len() - 3]);
    assert!(log.append(&truncated, 0).is_err());
    assert!(log.append(&BytesMut::new(), 0).is_err());
    assert_eq!(log.log_end_offset(), 0, "nothing was appended");
}

#[test]
fn batches_checked_elsewhere_are_appended_and_the_size_limit_is_checked_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        max_batch_bytes: 2_000,
        ..common::small_config()
    };
    let mut log = open(dir.path(), config);
    // A damaged batch never becomes a CheckedBatches.
    let mut bad = common::batch(1, 10, 0, 2);
    let at = bad.len() - 1;
    bad[at] ^= 1;
    assert!(matches!(
        CheckedBatches::check(bad.freeze(), usize::MAX),
        Err(StorageError::InvalidBatch { position: 0, .. })
    ));
    let good = CheckedBatches::check(common::batch(3, 10, 0, 1).freeze(), usize::MAX).unwrap();
    assert_eq!(good.record_count(), 3);
    let info = log.append_deferred(good.clone(), 0).unwrap();
    assert_eq!((info.base_offset, info.last_offset), (0, 2));
    // Checked without a limit, refused by the log's own.
    let big = CheckedBatches::check(common::batch(1, 3_000, 0, 3).freeze(), usize::MAX).unwrap();
    assert!(matches!(
        log.append_deferred(big, 0),
        Err(StorageError::InvalidBatch { .. })
    ));
    assert_eq!(log.log_end_offset(), 3);
    log.write_deferred().unwrap();
    let read = log.read(0, 1 << 20, true).unwrap();
    assert_eq!(
        &read.bytes[16..],
        &good.bytes()[16..],
        "stored as sent past the patched prefix"
    );
}

#[test]
fn offsets_and_epochs_are_patched_and_crc_stays_valid() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), common::small_config());
    append_at(&mut log, &[0, 0]);
    log.begin_leader_epoch(4).unwrap();
    append_at(&mut log, &[0]);
    let read = log.read(0, 100_000, true).unwrap();
    let headers: Vec<BatchHeader> = common::split(&read.bytes)
        .iter()
        .map(|(_, bytes)| sluice_storage::batch::verify(bytes).unwrap())
        .collect();
    let epochs: Vec<i32> = headers.iter().map(|h| h.partition_leader_epoch).collect();
    assert_eq!(epochs, vec![0, 0, 4]);
    assert_eq!(log.end_offset_for_epoch(0), Some((0, 2)));
    assert_eq!(log.end_offset_for_epoch(3), Some((0, 2)));
    assert_eq!(log.end_offset_for_epoch(4), Some((4, 3)));
    log.close().unwrap();
    let log = open(dir.path(), common::small_config());
    assert_eq!(log.leader_epoch(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 1 << 30,
        fsync: FsyncPolicy::Always,
        ..common::small_config()
    };
    let log = open(dir.path(), config);
    let (handle, task) = LogHandle::spawn(log, OwnerOptions::default());
    let appenders = 64;
    let per_appender = 20;
    let mut tasks = Vec::new();
    for writer in 0..appenders {
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_appender {
                let batch = common::batch(1, 512, 0, writer * 1_000 + i);
                let info = handle.append(batch).await.unwrap();
                // Acknowledged under fsync=always means durable.
                assert!(handle.reader().flushed_offset() > info.last_offset);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = appenders * per_appender;
    let flushes = handle.reader().flush_count();
    assert_eq!(handle.reader().log_end_offset(), total);
    assert!(
        flushes * 4 <= total,
        "{flushes} fsync rounds for {total} appends: appends are not sharing fsyncs"
    );
    handle.close().await.unwrap();
    task.await.unwrap().unwrap();
}

/// More concurrent requests than one drain takes: every one is applied and answered, none is
/// dropped between drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_one_drain_are_all_applied() {
    for fsync in [FsyncPolicy::Never, FsyncPolicy::Always] {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 1 << 30,
            fsync,
            ..common::small_config()
        };
        let log = open(dir.path(), config);
        let options = OwnerOptions {
            drain_max: 3,
            waiting_max: 5,
            channel_capacity: 8,
            ..OwnerOptions::default()
        };
        let (handle, task) = LogHandle::spawn(log, options);
        let mut tasks = Vec::new();
        for writer in 0..32u64 {
            let handle = handle.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25 {
                    handle
                        .append(common::batch(1, 16, 0, writer * 100 + i))
                        .await
                        .expect("every append is applied");
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(handle.reader().log_end_offset(), 32 * 25, "{fsync}");
        handle.close().await.unwrap();
        task.await.unwrap().unwrap();
    }
}

/// Appends through the owner are written a drain at a time (one write for several appenders'
/// batches), and an acknowledged append is already written: a reader finds it, intact, the
/// moment the ack arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_append_is_visible_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 256 * 1024,
        ..common::small_config()
    };
    let log = open(dir.path(), config);
    let (handle, task) = LogHandle::spawn(log, OwnerOptions::default());
    let mut tasks = Vec::new();
    for writer in 0..32u64 {
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let batch = common::batch(2, 700, 0, writer * 100 + i);
                let info = handle.append(batch.clone()).await.unwrap();
                let read = handle
                    .reader()
                    .read(info.base_offset, 1, true)
                    .expect("an acknowledged offset is readable");
                let found = common::split(&read.bytes);
                assert_eq!(found.len(), 1, "one whole batch at {}", info.base_offset);
                assert_eq!(found[0].0, info.base_offset);
                // Past the base offset, length and leader epoch, the bytes are the ones sent.
                assert_eq!(
                    found[0].1[16..],
                    batch[16..],
                    "batch at {}",
                    info.base_offset
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(handle.reader().log_end_offset(), 32 * 40 * 2);
    assert!(
        handle.reader().segments().len() > 1,
        "the test means to cross segment boundaries"
    );
    handle.close().await.unwrap();
    task.await.unwrap().unwrap();
}

#[test]
fn a_log_created_elsewhere_takes_the_place_of_another_and_old_readers_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), common::small_config());
    append_at(&mut log, &[0; 10]);
    let reader = log.reader();

    // A copy starting at offset 500, made in a directory of its own.
    let copy_dir = dir.path().join("copy");
    let mut copy = Log::create_at(&copy_dir, common::small_config(), 500, 0).unwrap();
    assert!(Log::create_at(&copy_dir, common::small_config(), 7, 0).is_err());
    let offsets = append_at(&mut copy, &[0; 30]);
    assert_eq!(offsets[0], 500);
    assert_eq!(copy.log_start_offset(), 500);
    copy.close().unwrap();

    // Its files replace the log's; the log takes them up without being reopened.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if sluice_storage::log::is_log_file(&name) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    for entry in std::fs::read_dir(&copy_dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::rename(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    log.reload(0).unwrap();
    assert_eq!(reader.log_start_offset(), 500);
    assert_eq!(reader.log_end_offset(), 530);
    assert!(matches!(
        reader.read(3, 1_000, true),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    let read = reader.read(500, 1 << 20, true).unwrap();
    assert_eq!(common::split(&read.bytes)[0].0, 500);
    // It appends after the copy's last offset, and opens the same way again.
    assert_eq!(append_at(&mut log, &[0])[0], 530);
    log.close().unwrap();
    let log = open(dir.path(), common::small_config());
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (500, 531));
    assert!(!sluice_storage::log::is_log_file("raft-entries"));
}
