//! The state machine store: entries applied in order, snapshots that survive a reopen and move
//! to another store, and a damaged snapshot refused with the file named.

mod common;

use std::io::Cursor;

use common::{Map, MapTypes, Set};
use futures_util::stream;
use openraft::alias::LogIdOf;
use openraft::entry::RaftEntry;
use openraft::storage::RaftStateMachine;
use openraft::vote::RaftLeaderIdExt;
use openraft::{RaftSnapshotBuilder, RaftTypeConfig};
use sluice_cluster::state_machine::StateMachineStore;

type Entry = <MapTypes as RaftTypeConfig>::Entry;
type LeaderId = <MapTypes as RaftTypeConfig>::LeaderId;

fn log_id(index: u64) -> LogIdOf<MapTypes> {
    LogIdOf::<MapTypes>::new(LeaderId::new_committed(1, 1), index)
}

fn set(index: u64, key: &str, value: &str) -> Entry {
    Entry::new_normal(
        log_id(index),
        Set {
            key: key.into(),
            value: value.into(),
        },
    )
}

async fn apply(store: &mut StateMachineStore<MapTypes, Map>, entries: Vec<Entry>) {
    let items: Vec<Result<_, std::io::Error>> =
        entries.into_iter().map(|e| Ok((e, None))).collect();
    store.apply(stream::iter(items)).await.expect("apply");
}

#[tokio::test]
async fn a_snapshot_survives_a_reopen_and_installs_elsewhere() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = StateMachineStore::<MapTypes, Map>::open(dir.path())?;
    apply(
        &mut store,
        vec![set(1, "a", "1"), set(2, "b", "2"), set(3, "a", "3")],
    )
    .await;
    assert_eq!(store.read(|m| m.values.get("a").cloned()), Some("3".into()));
    let snapshot = store.build_snapshot().await?;
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(3)));
    // Applied after the snapshot: not in it, so gone on reopen (the log replays it).
    apply(&mut store, vec![set(4, "c", "4")]).await;
    let applied = store.read(Map::clone);
    drop(store);

    let mut reopened = StateMachineStore::<MapTypes, Map>::open(dir.path())?;
    assert_eq!(reopened.applied_state().await?.0, Some(log_id(3)));
    assert_eq!(reopened.read(|m| m.values.len()), 2);
    apply(&mut reopened, vec![set(4, "c", "4")]).await;
    assert_eq!(reopened.read(Map::clone), applied);

    let other = tempfile::tempdir()?;
    let mut follower = StateMachineStore::<MapTypes, Map>::open(other.path())?;
    let current = reopened.get_current_snapshot().await?.expect("a snapshot");
    follower
        .install_snapshot(&current.meta, Cursor::new(current.snapshot.into_inner()))
        .await?;
    assert_eq!(follower.applied_state().await?.0, Some(log_id(3)));
    assert_eq!(
        follower.read(|m| m.values.get("b").cloned()),
        Some("2".into())
    );
    Ok(())
}

#[tokio::test]
async fn a_damaged_snapshot_is_refused_naming_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = StateMachineStore::<MapTypes, Map>::open(dir.path())?;
    apply(&mut store, vec![set(1, "a", "1")]).await;
    store.build_snapshot().await?;
    drop(store);
    let path = dir.path().join("snapshot");
    let mut bytes = std::fs::read(&path)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes)?;
    let err = StateMachineStore::<MapTypes, Map>::open(dir.path()).expect_err("refused");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("CRC"), "{err}");
    Ok(())
}
