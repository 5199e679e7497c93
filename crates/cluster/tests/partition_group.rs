//! Three replicas of one partition in one process, each with its own transport on loopback and
//! its own files: batches written through the leader are committed on all three, every
//! replica's segments hold the same bytes, and a replica stopped while the others go on
//! catches up from the log when it returns — also after the leader itself was the one stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use sluice_cluster::network::{GroupNetwork, RaftServer, Router};
use sluice_cluster::partition::log_store::PartitionLog;
use sluice_cluster::partition::machine::PartitionMachine;
use sluice_cluster::partition::{Batches, PartitionTypes};
use sluice_cluster::state_machine::StateMachineStore;
use sluice_cluster::transport::{Transport, TransportConfig};
use sluice_storage::record::BatchBuilder;
use sluice_storage::{FsyncPolicy, LogConfig};
use tokio::net::TcpListener;

const GROUP: u32 = 1000;

type Machine = StateMachineStore<PartitionTypes, PartitionMachine>;

struct Replica {
    raft: Raft<PartitionTypes, Machine>,
    log: PartitionLog,
    machine: Machine,
    transport: Transport,
    address: String,
}

fn raft_config() -> Arc<Config> {
    Arc::new(
        Config {
            cluster_name: "partition-test".into(),
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_policy: SnapshotPolicy::Never,
            replication_lag_threshold: u64::MAX,
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .expect("valid config"),
    )
}

async fn start(id: u64, dir: &Path, address: &str) -> Replica {
    let listener = loop {
        match TcpListener::bind(address).await {
            Ok(listener) => break listener,
            // A restarted replica takes its old port back once the old socket is gone.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let address = listener.local_addr().expect("address").to_string();
    let router = Arc::new(Router::default());
    let transport = Transport::start(
        TransportConfig::new(id, address.clone()),
        listener,
        router.clone(),
    );
    let log = PartitionLog::open(
        &dir.join("log"),
        LogConfig {
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 * 1024,
            ..LogConfig::default()
        },
    )
    .expect("log opens");
    let machine = Machine::open(&dir.join("machine")).expect("machine opens");
    let raft = Raft::new(
        id,
        raft_config(),
        GroupNetwork::new(transport.clone(), GROUP),
        log.clone(),
        machine.clone(),
    )
    .await
    .expect("raft starts");
    router.register(GROUP, Arc::new(RaftServer::new(raft.clone())));
    Replica {
        raft,
        log,
        machine,
        transport,
        address,
    }
}

async fn stop(replica: Replica) -> String {
    replica.raft.shutdown().await.expect("raft stops");
    replica.transport.shutdown();
    replica.log.close().expect("log closes");
    replica.address
}

fn batch(tag: u64) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000);
    for i in 0..5 {
        let value = format!("record {tag}-{i} {}", "x".repeat(100));
        builder.push(1_700_000_000_000 + i, None, Some(value.as_bytes()), &[]);
    }
    builder.finish()
}

async fn leader_of(replicas: &BTreeMap<u64, Replica>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for replica in replicas.values() {
            let metrics = replica.raft.metrics().borrow_watched().clone();
            if let Some(leader) = metrics.current_leader
                && replicas.contains_key(&leader)
                && replicas[&leader]
                    .raft
                    .metrics()
                    .borrow_watched()
                    .current_leader
                    == Some(leader)
            {
                return leader;
            }
        }
        assert!(Instant::now() < deadline, "no leader within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `count` batches through the leader, each answered once committed.
async fn write(replicas: &BTreeMap<u64, Replica>, from: u64, count: u64) {
    let leader = leader_of(replicas).await;
    let raft = &replicas[&leader].raft;
    let mut last_end = 0;
    for tag in from..from + count {
        let reply = raft
            .client_write(Batches(batch(tag)))
            .await
            .expect("committed");
        let appended = reply.data;
        assert_eq!(appended.last_offset - appended.base_offset, 4);
        assert!(appended.base_offset >= last_end, "offsets go up");
        last_end = appended.last_offset + 1;
    }
}

/// Every replica's bytes from offset 0 to its log end.
fn log_bytes(replica: &Replica) -> Vec<u8> {
    let reader = replica.log.reader();
    let mut out = Vec::new();
    let mut offset = reader.log_start_offset();
    while offset < reader.log_end_offset() {
        let read = reader.read(offset, 1 << 20, true).expect("read");
        let mut at = 0;
        while at < read.bytes.len() {
            let header =
                sluice_storage::BatchHeader::parse(&read.bytes[at..]).expect("a batch header");
            offset = header.next_offset() as u64;
            at += header.total_bytes();
        }
        out.extend_from_slice(&read.bytes);
    }
    out
}

/// Waits until every replica has applied what the leader has, then compares their logs.
async fn assert_identical(replicas: &BTreeMap<u64, Replica>) {
    let leader = leader_of(replicas).await;
    let target = replicas[&leader]
        .raft
        .metrics()
        .borrow_watched()
        .last_log_index;
    let deadline = Instant::now() + Duration::from_secs(20);
    for replica in replicas.values() {
        loop {
            let applied = replica
                .raft
                .metrics()
                .borrow_watched()
                .last_applied
                .map(|id| id.index);
            if applied >= target {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a replica did not catch up: {applied:?} < {target:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let reference = log_bytes(&replicas[&leader]);
    assert!(!reference.is_empty());
    for (id, replica) in replicas {
        let bytes = log_bytes(replica);
        assert_eq!(
            bytes.len(),
            reference.len(),
            "replica {id} holds another length"
        );
        assert!(
            bytes == reference,
            "replica {id} holds other bytes than the leader"
        );
        let end = replica.machine.read(|m| m.data_end_offset);
        assert!(end > 0 && end <= replica.log.reader().log_end_offset());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_the_same_bytes_and_a_stopped_one_catches_up_from_the_log() {
    let root = tempfile::tempdir().expect("tempdir");
    let dirs: BTreeMap<u64, PathBuf> = (1..=3)
        .map(|id| (id, root.path().join(format!("n{id}"))))
        .collect();
    let mut replicas = BTreeMap::new();
    for (id, dir) in &dirs {
        replicas.insert(*id, start(*id, dir, "127.0.0.1:0").await);
    }
    let members: BTreeMap<u64, BasicNode> = replicas
        .iter()
        .map(|(id, r)| (*id, BasicNode::new(r.address.clone())))
        .collect();
    replicas[&1]
        .raft
        .initialize(members)
        .await
        .expect("initialized");

    write(&replicas, 0, 200).await;
    assert_identical(&replicas).await;

    // A follower stops while 300 batches are written (several segments' worth), then returns.
    let leader = leader_of(&replicas).await;
    let follower = *replicas
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    let address = stop(replicas.remove(&follower).expect("follower")).await;
    write(&replicas, 200, 300).await;
    replicas.insert(follower, start(follower, &dirs[&follower], &address).await);
    assert_identical(&replicas).await;

    // The leader stops: another is elected, writes go on, and the old leader catches up.
    let leader = leader_of(&replicas).await;
    let address = stop(replicas.remove(&leader).expect("leader")).await;
    write(&replicas, 500, 100).await;
    replicas.insert(leader, start(leader, &dirs[&leader], &address).await);
    assert_identical(&replicas).await;

    for (_, replica) in std::mem::take(&mut replicas) {
        stop(replica).await;
    }
}
