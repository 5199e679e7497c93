//! openraft's own conformance suite for log and state-machine storage, run against Sluice's
//! [`LogStore`] and [`StateMachineStore`] on real files.

mod common;

use common::{Map, MapTypes};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use sluice_cluster::log_store::LogStore;
use sluice_cluster::state_machine::StateMachineStore;
use tempfile::TempDir;

struct OnDisk;

impl StoreBuilder<MapTypes, LogStore<MapTypes>, StateMachineStore<MapTypes, Map>, TempDir>
    for OnDisk
{
    async fn build(
        &self,
    ) -> Result<
        (
            TempDir,
            LogStore<MapTypes>,
            StateMachineStore<MapTypes, Map>,
        ),
        StorageError<MapTypes>,
    > {
        let dir =
            tempfile::tempdir().map_err(|e| StorageError::read(MapTypes::err_from_error(&e)))?;
        let log = LogStore::open(&dir.path().join("log"))
            .map_err(|e| StorageError::read(MapTypes::err_from_error(&e)))?;
        let machine = StateMachineStore::open(&dir.path().join("machine"))
            .map_err(|e| StorageError::read(MapTypes::err_from_error(&e)))?;
        Ok((dir, log, machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_storage_passes_openraft_conformance_suite() -> Result<(), StorageError<MapTypes>> {
    Suite::test_all(OnDisk).await
}
