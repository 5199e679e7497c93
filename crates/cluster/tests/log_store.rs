//! Crash and recovery tests of the Raft log file: what was written is read back; a tail a crash
//! cut is cut off at every byte boundary; damage anywhere else is an error naming the file and
//! the offset; truncation and compaction survive a reopen.

mod common;

use std::path::Path;

use common::{MapTypes, Set};
use openraft::RaftLogReader;
use openraft::alias::{LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::vote::RaftLeaderIdExt;
use sluice_cluster::log_store::LogStore;

type Entry = <MapTypes as openraft::RaftTypeConfig>::Entry;
type LeaderId = <MapTypes as openraft::RaftTypeConfig>::LeaderId;

fn log_id(term: u64, index: u64) -> LogIdOf<MapTypes> {
    LogIdOf::<MapTypes>::new(LeaderId::new_committed(term, 1), index)
}

fn entry(term: u64, index: u64, value_bytes: usize) -> Entry {
    Entry::new_normal(
        log_id(term, index),
        Set {
            key: format!("k{index}"),
            value: "v".repeat(value_bytes),
        },
    )
}

async fn append(log: &mut LogStore<MapTypes>, entries: Vec<Entry>) {
    log.append(entries, IOFlushed::noop())
        .await
        .expect("append");
}

async fn indexes(log: &mut LogStore<MapTypes>) -> Vec<u64> {
    log.try_get_log_entries(..)
        .await
        .expect("read")
        .iter()
        .map(|e| e.index())
        .collect()
}

fn log_file(dir: &Path) -> std::path::PathBuf {
    dir.join("log")
}

#[tokio::test]
async fn a_reopened_log_has_its_entries_vote_and_marks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut log = LogStore::<MapTypes>::open(dir.path())?;
        append(&mut log, (1..=10).map(|i| entry(1, i, 10)).collect()).await;
        log.save_vote(&VoteOf::<MapTypes>::new(3, 2)).await?;
        log.save_committed(Some(log_id(1, 7))).await?;
        log.purge(log_id(1, 3)).await?;
    }
    let mut log = LogStore::<MapTypes>::open(dir.path())?;
    assert_eq!(indexes(&mut log).await, (4..=10).collect::<Vec<_>>());
    let state = log.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(1, 10)));
    assert_eq!(log.read_committed().await?, Some(log_id(1, 7)));
    assert_eq!(log.read_vote().await?, Some(VoteOf::<MapTypes>::new(3, 2)));
    Ok(())
}

#[tokio::test]
async fn a_tail_cut_at_any_byte_is_cut_off() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut log = LogStore::<MapTypes>::open(dir.path())?;
        append(&mut log, (1..=3).map(|i| entry(1, i, 20)).collect()).await;
    }
    let whole = std::fs::read(log_file(dir.path()))?;
    // Where each record ends, from a log holding one, two and three entries.
    let mut ends = vec![8u64];
    for count in 1..=3u64 {
        let scratch = tempfile::tempdir()?;
        let mut log = LogStore::<MapTypes>::open(scratch.path())?;
        append(&mut log, (1..=count).map(|i| entry(1, i, 20)).collect()).await;
        ends.push(std::fs::metadata(log_file(scratch.path()))?.len());
    }
    assert_eq!(*ends.last().expect("ends"), whole.len() as u64);
    for cut in 8..whole.len() {
        let case = tempfile::tempdir()?;
        std::fs::write(log_file(case.path()), &whole[..cut])?;
        let mut log = LogStore::<MapTypes>::open(case.path())
            .map_err(|e| anyhow::anyhow!("cut at {cut}: {e}"))?;
        let whole_records = ends.iter().filter(|&&end| end <= cut as u64).count() as u64 - 1;
        assert_eq!(
            indexes(&mut log).await,
            (1..=whole_records).collect::<Vec<_>>(),
            "cut at {cut}"
        );
        let kept = std::fs::metadata(log_file(case.path()))?.len();
        assert_eq!(kept, ends[whole_records as usize], "cut at {cut}");
        // The log goes on from there.
        append(&mut log, vec![entry(2, whole_records + 1, 5)]).await;
        drop(log);
        let mut log = LogStore::<MapTypes>::open(case.path())?;
        assert_eq!(indexes(&mut log).await.len() as u64, whole_records + 1);
    }
    Ok(())
}

#[tokio::test]
async fn damage_before_the_tail_is_an_error_naming_file_and_offset() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut log = LogStore::<MapTypes>::open(dir.path())?;
        append(&mut log, (1..=3).map(|i| entry(1, i, 20)).collect()).await;
    }
    let path = log_file(dir.path());
    let mut bytes = std::fs::read(&path)?;
    // A bit in the first record's body (the header is 8 bytes, the record header 8 more).
    bytes[8 + 8 + 5] ^= 0x10;
    std::fs::write(&path, &bytes)?;
    let err = LogStore::<MapTypes>::open(dir.path()).expect_err("damage is refused");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("at offset 8"), "{text}");
    assert!(text.contains("CRC"), "{text}");
    // Nothing was changed.
    assert_eq!(std::fs::read(&path)?, bytes);

    // A flipped length (the first record claims more bytes than the file has) is damage too,
    // not a cut tail: the records after it are whole.
    let mut bytes = std::fs::read(&path)?;
    bytes[8 + 5] ^= 0x10;
    bytes[8 + 8 + 5] ^= 0x10;
    std::fs::write(&path, &bytes)?;
    let err = LogStore::<MapTypes>::open(dir.path()).expect_err("damage is refused");
    assert!(err.to_string().contains("at offset 8"), "{err}");
    assert_eq!(std::fs::read(&path)?, bytes);

    std::fs::write(&path, b"NOTALOG!")?;
    let err = LogStore::<MapTypes>::open(dir.path()).expect_err("not a log");
    assert!(err.to_string().contains("bad magic"), "{err}");
    Ok(())
}

#[tokio::test]
async fn truncation_survives_a_reopen_and_keeps_the_marks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let mut log = LogStore::<MapTypes>::open(dir.path())?;
        append(&mut log, (1..=5).map(|i| entry(1, i, 10)).collect()).await;
        log.purge(log_id(1, 1)).await?;
        append(&mut log, (6..=8).map(|i| entry(1, i, 10)).collect()).await;
        log.save_committed(Some(log_id(1, 4))).await?;
        // Both marks sit after entry 5 in the file; cutting after 4 must keep them.
        log.truncate_after(Some(log_id(1, 4))).await?;
        append(&mut log, vec![entry(2, 5, 10), entry(2, 6, 10)]).await;
    }
    let mut log = LogStore::<MapTypes>::open(dir.path())?;
    assert_eq!(indexes(&mut log).await, vec![2, 3, 4, 5, 6]);
    let entries = log.try_get_log_entries(5..).await?;
    assert!(
        entries
            .iter()
            .all(|e| e.log_id().committed_leader_id().term == 2)
    );
    assert_eq!(log.read_committed().await?, Some(log_id(1, 4)));
    assert_eq!(
        log.get_log_state().await?.last_purged_log_id,
        Some(log_id(1, 1))
    );
    Ok(())
}

#[tokio::test]
async fn purging_most_of_a_large_log_rewrites_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = log_file(dir.path());
    {
        let mut log = LogStore::<MapTypes>::open(dir.path())?;
        append(&mut log, (1..=600).map(|i| entry(1, i, 4096)).collect()).await;
        log.save_committed(Some(log_id(1, 600))).await?;
        let before = std::fs::metadata(&path)?.len();
        log.purge(log_id(1, 590)).await?;
        let after = std::fs::metadata(&path)?.len();
        assert!(after * 20 < before, "{before} bytes became {after}");
        append(&mut log, vec![entry(1, 601, 10)]).await;
        assert_eq!(indexes(&mut log).await, (591..=601).collect::<Vec<_>>());
    }
    let mut log = LogStore::<MapTypes>::open(dir.path())?;
    assert_eq!(indexes(&mut log).await, (591..=601).collect::<Vec<_>>());
    assert_eq!(log.read_committed().await?, Some(log_id(1, 600)));
    assert_eq!(
        log.get_log_state().await?.last_purged_log_id,
        Some(log_id(1, 590))
    );
    Ok(())
}
