//! A partition's Raft log is its segmented log: openraft's conformance suite against it, and
//! what the files hold after appends, truncations, restarts and crashes.

use std::collections::BTreeSet;
use std::path::Path;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::{BasicNode, EntryPayload, Membership, RaftLogReader, StorageError};
use sluice_cluster::partition::log_store::PartitionLog;
use sluice_cluster::partition::machine::PartitionMachine;
use sluice_cluster::partition::{Batches, Entry, LogId, PartitionTypes};
use sluice_cluster::state_machine::{Machine, StateMachineStore};
use sluice_storage::batch::BatchHeader;
use sluice_storage::record::BatchBuilder;
use sluice_storage::{FsyncPolicy, LogConfig};
use tempfile::TempDir;

fn config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

struct OnDisk;

impl
    StoreBuilder<
        PartitionTypes,
        PartitionLog,
        StateMachineStore<PartitionTypes, PartitionMachine>,
        TempDir,
    > for OnDisk
{
    async fn build(
        &self,
    ) -> Result<
        (
            TempDir,
            PartitionLog,
            StateMachineStore<PartitionTypes, PartitionMachine>,
        ),
        StorageError<PartitionTypes>,
    > {
        let fail = |e: std::io::Error| StorageError::read(PartitionTypes::err_from_error(&e));
        let dir = tempfile::tempdir().map_err(fail)?;
        let log = PartitionLog::open(&dir.path().join("log"), config()).map_err(fail)?;
        let machine = StateMachineStore::open(&dir.path().join("machine")).map_err(fail)?;
        Ok((dir, log, machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_log_passes_openraft_conformance_suite()
-> Result<(), StorageError<PartitionTypes>> {
    Suite::test_all(OnDisk).await
}

fn batch(records: usize, tag: &str) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000);
    for i in 0..records {
        let value = format!("{tag}-{i}");
        builder.push(
            1_700_000_000_000 + i as i64,
            None,
            Some(value.as_bytes()),
            &[],
        );
    }
    builder.finish()
}

fn normal(term: u64, index: u64, bytes: Bytes) -> Entry {
    Entry {
        log_id: LogId::new_term_index(term, index),
        payload: EntryPayload::Normal(Batches(bytes)),
    }
}

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new_term_index(term, index),
        payload: EntryPayload::Blank,
    }
}

fn membership(term: u64, index: u64, voters: &[u64]) -> Entry {
    let voters: BTreeSet<u64> = voters.iter().copied().collect();
    let nodes = voters
        .iter()
        .map(|id| (*id, BasicNode::new(format!("127.0.0.{id}:1"))));
    Entry {
        log_id: LogId::new_term_index(term, index),
        payload: EntryPayload::Membership(
            Membership::new(
                vec![voters.clone()],
                nodes.collect::<std::collections::BTreeMap<_, _>>(),
            )
            .expect("membership"),
        ),
    }
}

async fn append(log: &mut PartitionLog, entries: Vec<Entry>) {
    let (tx, rx) = PartitionTypes::oneshot();
    let callback = IOFlushed::<PartitionTypes>::signal(tx);
    log.append(entries, callback).await.expect("append");
    rx.await.expect("flushed").expect("flush succeeded");
}

async fn all_entries(log: &mut PartitionLog) -> Vec<Entry> {
    log.try_get_log_entries(0..u64::MAX).await.expect("read")
}

/// Every batch in the segments, as (base offset, leader epoch, control?).
fn batches_in(dir: &Path) -> Vec<(i64, i32, bool)> {
    let log = sluice_storage::Log::open(dir, config(), 0).expect("open as a plain log");
    let mut out = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.log_end_offset() {
        let read = log.read(offset, 1 << 20, true).expect("read");
        let mut at = 0;
        while at < read.bytes.len() {
            let header = BatchHeader::parse(&read.bytes[at..]).expect("header");
            out.push((
                header.base_offset,
                header.partition_leader_epoch,
                header.is_control(),
            ));
            offset = header.next_offset() as u64;
            at += header.total_bytes();
        }
    }
    out
}

/// The batches with their base offsets and leader epochs cleared.
fn unstamped(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let mut at = 0;
    while at < out.len() {
        let header = BatchHeader::parse(&out[at..]).expect("header");
        sluice_storage::batch::set_base_offset(&mut out[at..], 0);
        sluice_storage::batch::set_partition_leader_epoch(&mut out[at..], -1);
        at += header.total_bytes();
    }
    out
}

fn sample() -> Vec<Entry> {
    vec![
        membership(1, 0, &[1, 2, 3]),
        blank(1, 1),
        normal(1, 2, batch(3, "a")),
        normal(1, 3, {
            // Two batches in one entry, as merged produce requests are.
            let mut both = batch(2, "b").to_vec();
            both.extend_from_slice(&batch(4, "c"));
            Bytes::from(both)
        }),
        blank(2, 4),
        normal(2, 5, batch(1, "d")),
    ]
}

fn payload_eq(a: &Entry, b: &Entry) -> bool {
    a.log_id == b.log_id
        && match (&a.payload, &b.payload) {
            (EntryPayload::Blank, EntryPayload::Blank) => true,
            (EntryPayload::Membership(x), EntryPayload::Membership(y)) => x == y,
            // The log assigns offsets and the epoch: compare the rest.
            (EntryPayload::Normal(x), EntryPayload::Normal(y)) => {
                unstamped(&x.0) == unstamped(&y.0)
            }
            _ => false,
        }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_kafka_batches_stamped_with_their_term_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let written = sample();
    {
        let mut log = PartitionLog::open(&path, config()).unwrap();
        append(&mut log, written.clone()).await;
        let read = all_entries(&mut log).await;
        assert_eq!(read.len(), written.len());
        for (a, b) in read.iter().zip(&written) {
            assert!(payload_eq(a, b), "{a:?} != {b:?}");
        }
        log.close().unwrap();
    }
    // Offsets: membership 0, blank 1, 3 records 2..=4, 2 + 4 records 5..=10, blank 11, 12.
    assert_eq!(
        batches_in(&path),
        vec![
            (0, 1, true),
            (1, 1, true),
            (2, 1, false),
            (5, 1, false),
            (7, 1, false),
            (11, 2, true),
            (12, 2, false),
        ]
    );
    let mut log = PartitionLog::open(&path, config()).unwrap();
    let read = all_entries(&mut log).await;
    for (a, b) in read.iter().zip(&written) {
        assert!(payload_eq(a, b), "after a restart: {a:?} != {b:?}");
    }
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(LogId::new_term_index(2, 5)));
    let loc = log.entry_loc(3).unwrap().expect("entry 3");
    assert_eq!((loc.base_offset, loc.records, loc.term), (5, 6, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_tail_is_replaced_by_entries_of_an_older_term() {
    // A follower that appended entries of term 3 as a deposed leader takes the new leader's
    // entries of term 2 in their place: offsets and epochs are rolled back with the tail.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let mut log = PartitionLog::open(&path, config()).unwrap();
    append(
        &mut log,
        vec![
            blank(1, 1),
            normal(1, 2, batch(2, "a")),
            blank(3, 3),
            normal(3, 4, batch(5, "lost")),
        ],
    )
    .await;
    log.truncate_after(Some(LogId::new_term_index(1, 2)))
        .await
        .unwrap();
    append(&mut log, vec![normal(2, 3, batch(1, "kept")), blank(4, 4)]).await;
    log.close().unwrap();
    drop(log);
    assert_eq!(
        batches_in(&path),
        vec![(0, 1, true), (1, 1, false), (3, 2, false), (4, 4, true)]
    );
    let mut log = PartitionLog::open(&path, config()).unwrap();
    let read = all_entries(&mut log).await;
    let ids: Vec<_> = read.iter().map(|e| e.log_id()).collect();
    assert_eq!(
        ids,
        vec![
            LogId::new_term_index(1, 1),
            LogId::new_term_index(1, 2),
            LogId::new_term_index(2, 3),
            LogId::new_term_index(4, 4),
        ]
    );
}

/// Cuts `bytes` off the end of a file, as a crash before its last write reached the disk does.
fn cut_tail(path: &Path, bytes: u64) {
    let len = std::fs::metadata(path).expect("stat").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    file.set_len(len - bytes).expect("cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_two_files_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    {
        let mut log = PartitionLog::open(&path, config()).unwrap();
        append(&mut log, sample()).await;
        log.close().unwrap();
    }
    // The last entry's batches were written, its index record was not: the batches go.
    cut_tail(&path.join("raft-entries"), 25);
    {
        let mut log = PartitionLog::open(&path, config()).unwrap();
        let read = all_entries(&mut log).await;
        assert_eq!(read.len(), 5);
        assert_eq!(log.reader().log_end_offset(), 12);
        // The next entry lands where the lost one was.
        append(&mut log, vec![normal(2, 5, batch(2, "again"))]).await;
        assert_eq!(log.reader().log_end_offset(), 14);
        log.close().unwrap();
    }
    // The segment lost its tail, the index did not: the index records without data go.
    cut_tail(&path.join(format!("{:020}.log", 0)), 5);
    let mut log = PartitionLog::open(&path, config()).unwrap();
    let read = all_entries(&mut log).await;
    assert_eq!(read.len(), 5);
    assert_eq!(log.reader().log_end_offset(), 12);
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(LogId::new_term_index(2, 4))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_index_record_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    {
        let mut log = PartitionLog::open(&path, config()).unwrap();
        append(&mut log, sample()).await;
        log.close().unwrap();
    }
    let entries = path.join("raft-entries");
    let mut bytes = std::fs::read(&entries).unwrap();
    bytes[24 + 32 + 9] ^= 0x40;
    std::fs::write(&entries, &bytes).unwrap();
    let error = PartitionLog::open(&path, config()).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("raft-entries") && text.contains("byte 56"),
        "{text}"
    );
}

/// Batches of several producers, in several epochs, with duplicates' worth of sequences.
fn producer_entries(count: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut sequences = [0i32; 4];
    let mut offset = 0i64;
    for i in 0..count {
        let producer = (i * 7 % 4) as i64;
        let epoch = (i / 40) as i16;
        if i % 40 == 0 {
            sequences = [0; 4];
        }
        let records = 1 + i % 3;
        let mut builder = BatchBuilder::new(1_700_000_000_000 + i as i64).producer(
            100 + producer,
            epoch,
            sequences[producer as usize],
        );
        for r in 0..records {
            builder.push(1_700_000_000_000 + (i + r) as i64, None, Some(b"v"), &[]);
        }
        sequences[producer as usize] += records as i32;
        let mut bytes = builder.finish().to_vec();
        // As the log stores it: offsets assigned.
        sluice_storage::batch::set_base_offset(&mut bytes, offset);
        offset += records as i64;
        out.push(Bytes::from(bytes));
    }
    out
}

#[test]
fn one_log_replayed_into_two_machines_gives_the_same_state() {
    let entries = producer_entries(200);
    let mut straight = PartitionMachine::default();
    let mut restarted = PartitionMachine::default();
    let mut replies = (Vec::new(), Vec::new());
    for (index, bytes) in entries.iter().enumerate() {
        let batches = Batches(bytes.clone());
        replies.0.push(straight.apply(index as u64, &batches));
        replies.1.push(restarted.apply(index as u64, &batches));
        if index == 117 {
            // The second machine restarts from a snapshot part way.
            restarted = PartitionMachine::decode(&restarted.encode().unwrap()).unwrap();
        }
    }
    assert_eq!(replies.0, replies.1);
    assert_eq!(straight.encode().unwrap(), restarted.encode().unwrap());
    assert_eq!(straight.producer_count(), 4);
    assert_eq!(
        straight.data_end_offset,
        replies.0.last().unwrap().last_offset + 1
    );
}

/// `batch` as the log stores it at `offset`.
fn at_offset(batch: Bytes, offset: u64) -> Bytes {
    let mut bytes = batch.to_vec();
    sluice_storage::batch::set_base_offset(&mut bytes, offset as i64);
    Bytes::from(bytes)
}

#[test]
fn trim_entries_move_the_log_start_the_same_way_in_every_machine() {
    let trim = sluice_cluster::partition::trim_batch(40);
    let header = sluice_storage::BatchHeader::parse(&trim).unwrap();
    assert_eq!(
        sluice_cluster::partition::trim_offset(&header, &trim),
        Some(40)
    );
    // A producer's control batch (a transaction marker) is not a trim.
    let mut marker = BatchBuilder::new(0).producer(7, 0, 0).control();
    marker.push(0, Some(&[0, 0, 0, 102]), Some(&[0; 8]), &[]);
    let marker = marker.finish();
    let header = sluice_storage::BatchHeader::parse(&marker).unwrap();
    assert_eq!(
        sluice_cluster::partition::trim_offset(&header, &marker),
        None
    );

    let data = producer_entries(60);
    let mut entries: Vec<Bytes> = Vec::new();
    let mut end = 0u64;
    for (i, bytes) in data.iter().enumerate() {
        let header = sluice_storage::BatchHeader::parse(bytes).unwrap();
        let records = header.last_offset_delta as u64 + 1;
        entries.push(at_offset(bytes.clone(), end));
        end += records;
        if i == 20 {
            entries.push(at_offset(sluice_cluster::partition::trim_batch(15), end));
            end += 1;
        }
        if i == 30 {
            // Older than the last trim: the start never goes back.
            entries.push(at_offset(sluice_cluster::partition::trim_batch(5), end));
            end += 1;
        }
        if i == 40 {
            // Past the trim entry itself: only what was before it goes.
            entries.push(at_offset(
                sluice_cluster::partition::trim_batch(end + 100),
                end,
            ));
            end += 1;
        }
    }
    let mut straight = PartitionMachine::default();
    let mut restarted = PartitionMachine::default();
    let mut starts = Vec::new();
    for (index, bytes) in entries.iter().enumerate() {
        let batches = Batches(bytes.clone());
        straight.apply(index as u64, &batches);
        restarted.apply(index as u64, &batches);
        starts.push(straight.log_start_offset);
        if index == 33 {
            restarted = PartitionMachine::decode(&restarted.encode().unwrap()).unwrap();
        }
    }
    assert_eq!(straight.encode().unwrap(), restarted.encode().unwrap());
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
    assert!(starts.contains(&15));
    let trim_at = sluice_storage::BatchHeader::parse(&entries[43]).unwrap();
    assert!(trim_at.is_control());
    assert_eq!(straight.log_start_offset, trim_at.base_offset as u64);
    assert_eq!(straight.producer_count(), 4);
}
