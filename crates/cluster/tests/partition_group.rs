//! Three replicas of one partition in one process, each with its own transport on loopback and
//! its own files: batches written through the leader are committed on all three, every
//! replica's segments hold the same bytes, and a replica stopped while the others go on
//! catches up from the log when it returns — also after the leader itself was the one stopped.
//! A leader cut off from the others (every request between it and them refused) appends
//! writes it can never commit; once healed, that tail is truncated and replaced by what the
//! majority committed meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use sluice_broker::producer::SequenceCheck;
use sluice_cluster::network::{GroupNetwork, RaftServer, Router};
use sluice_cluster::partition::log_store::PartitionLog;
use sluice_cluster::partition::machine::PartitionMachine;
use sluice_cluster::partition::{Batches, PartitionTypes};
use sluice_cluster::state_machine::StateMachineStore;
use sluice_cluster::transport::{Service, Transport, TransportConfig};
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

/// Nodes cut off from every other: requests to or from them are refused.
type Cut = Arc<parking_lot::RwLock<BTreeSet<u64>>>;

/// The router behind a fault: refuses what crosses the cut.
struct Faulty {
    id: u64,
    cut: Cut,
    router: Arc<Router>,
}

impl Service for Faulty {
    fn handle(
        &self,
        from: u64,
        group: u32,
        method: u8,
        body: Bytes,
    ) -> sluice_cluster::network::Answer {
        let cut = self.cut.read();
        if from != self.id && (cut.contains(&from) || cut.contains(&self.id)) {
            return Box::pin(async { Err("cut off".to_owned()) });
        }
        drop(cut);
        self.router.handle(from, group, method, body)
    }
}

async fn start(id: u64, dir: &Path, address: &str) -> Replica {
    start_cut(id, dir, address, Cut::default()).await
}

async fn start_cut(id: u64, dir: &Path, address: &str, cut: Cut) -> Replica {
    let listener = loop {
        match TcpListener::bind(address).await {
            Ok(listener) => break listener,
            // A restarted replica takes its old port back once the old socket is gone.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let address = listener.local_addr().expect("address").to_string();
    let router = Arc::new(Router::default());
    let service = Arc::new(Faulty {
        id,
        cut,
        router: router.clone(),
    });
    let transport = Transport::start(TransportConfig::new(id, address.clone()), listener, service);
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

/// Starts a replica in each of `dirs` (by node id) and forms the group of all of them.
async fn start_group(dirs: &BTreeMap<u64, PathBuf>, cut: &Cut) -> BTreeMap<u64, Replica> {
    let mut replicas = BTreeMap::new();
    for (id, dir) in dirs {
        replicas.insert(*id, start_cut(*id, dir, "127.0.0.1:0", cut.clone()).await);
    }
    let members: BTreeMap<u64, BasicNode> = replicas
        .iter()
        .map(|(id, r)| (*id, BasicNode::new(r.address.clone())))
        .collect();
    let first = *replicas.keys().next().expect("a replica");
    replicas[&first]
        .raft
        .initialize(members)
        .await
        .expect("initialized");
    replicas
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

/// Waits until a leader has applied an entry of its own term (its blank entry): from then on
/// it has applied everything committed before it, as a leader must before it serves.
async fn wait_ready(leader: &Replica) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = leader.raft.metrics().borrow_watched().clone();
        if metrics
            .last_applied
            .is_some_and(|id| id.leader_id.term == metrics.current_term)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the leader applied nothing of its term"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Five records of producer 42, epoch 0, from `sequence` on.
fn idempotent_batch(sequence: i32) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000).producer(42, 0, sequence);
    for i in 0..5 {
        builder.push(1_700_000_000_000 + i, None, Some(b"idempotent"), &[]);
    }
    builder.finish()
}

async fn leader_of(replicas: &BTreeMap<u64, Replica>) -> u64 {
    let all: BTreeSet<u64> = replicas.keys().copied().collect();
    leader_among(replicas, &all).await
}

/// The leader that the replicas in `among` agree on.
async fn leader_among(replicas: &BTreeMap<u64, Replica>, among: &BTreeSet<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for replica in among.iter().map(|id| &replicas[id]) {
            let metrics = replica.raft.metrics().borrow_watched().clone();
            if let Some(leader) = metrics.current_leader
                && among.contains(&leader)
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
    write_to(&replicas[&leader], from, count).await;
}

/// Writes through `leader`; a write it refused before appending (its lease lapsed for a moment
/// on a busy machine: openraft's `ForwardToLeader`, nothing written) is sent again, as a
/// client would.
async fn write_to(leader: &Replica, from: u64, count: u64) {
    let raft = &leader.raft;
    let mut last_end = 0;
    for tag in from..from + count {
        let mut attempts = 0;
        let reply = loop {
            match raft.client_write(Batches(batch(tag))).await {
                Err(openraft::errors::RaftError::APIError(
                    openraft::errors::ClientWriteError::ForwardToLeader(_),
                )) if attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other.expect("committed"),
            }
        };
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
    let mut replicas = start_group(&dirs, &Cut::default()).await;

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

    // An idempotent producer writes three batches; then the leader stops. The new leader knows
    // the producer's sequences: a retry of the last batch is a duplicate with its original
    // offsets, and the next sequence is the one that follows.
    let leader = leader_of(&replicas).await;
    let mut acked = Vec::new();
    for sequence in [0, 5, 10] {
        let reply = replicas[&leader]
            .raft
            .client_write(Batches(idempotent_batch(sequence)))
            .await
            .expect("committed");
        acked.push(reply.data);
    }
    let address = stop(replicas.remove(&leader).expect("leader")).await;
    let new_leader = leader_of(&replicas).await;
    wait_ready(&replicas[&new_leader]).await;
    let retry = sluice_storage::BatchHeader::parse(&idempotent_batch(10)).expect("header");
    assert_eq!(
        replicas[&new_leader]
            .machine
            .read(|m| m.check(&retry))
            .expect("checked"),
        SequenceCheck::Duplicate {
            base_offset: acked[2].base_offset,
            last_offset: acked[2].last_offset,
        }
    );
    let next = sluice_storage::BatchHeader::parse(&idempotent_batch(15)).expect("header");
    assert_eq!(
        replicas[&new_leader]
            .machine
            .read(|m| m.check(&next))
            .expect("checked"),
        SequenceCheck::Append
    );
    let gap = sluice_storage::BatchHeader::parse(&idempotent_batch(20)).expect("header");
    assert!(
        replicas[&new_leader]
            .machine
            .read(|m| m.check(&gap))
            .is_err()
    );
    write(&replicas, 500, 100).await;
    replicas.insert(leader, start(leader, &dirs[&leader], &address).await);
    assert_identical(&replicas).await;

    for (_, replica) in std::mem::take(&mut replicas) {
        stop(replica).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_commits_nothing_and_its_tail_is_replaced_when_healed() {
    let root = tempfile::tempdir().expect("tempdir");
    let cut = Cut::default();
    let dirs: BTreeMap<u64, PathBuf> = (1..=3)
        .map(|id| (id, root.path().join(format!("n{id}"))))
        .collect();
    let mut replicas = start_group(&dirs, &cut).await;
    write(&replicas, 0, 50).await;
    assert_identical(&replicas).await;

    let old = leader_of(&replicas).await;
    let old_term = replicas[&old].raft.metrics().borrow_watched().current_term;
    let committed_before = replicas[&old].raft.metrics().borrow_watched().last_applied;
    cut.write().insert(old);
    // Writes to the cut-off leader: appended to its log while it still believes it leads, never
    // committed.
    let stranded: Vec<_> = (0..20)
        .map(|tag| {
            let raft = replicas[&old].raft.clone();
            tokio::spawn(async move { raft.client_write(Batches(batch(10_000 + tag))).await })
        })
        .collect();
    let others: BTreeSet<u64> = replicas.keys().copied().filter(|id| *id != old).collect();
    let new = leader_among(&replicas, &others).await;
    assert_ne!(new, old);
    write_to(&replicas[&new], 1_000, 50).await;
    let old_metrics = replicas[&old].raft.metrics().borrow_watched().clone();
    assert!(
        old_metrics.last_log_index > committed_before.map(|id| id.index),
        "the cut-off leader appended the stranded writes"
    );
    assert_eq!(
        old_metrics.last_applied, committed_before,
        "the cut-off leader committed nothing in term {old_term}"
    );

    cut.write().clear();
    assert_identical(&replicas).await;
    for task in stranded {
        let result = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("a stranded write is answered once healed")
            .expect("task");
        assert!(
            result.is_err(),
            "a write to the cut-off leader was acknowledged: {result:?}"
        );
    }
    for (id, replica) in &replicas {
        let applied = replica.machine.read(|m| m.applied_entries);
        assert_eq!(applied, 100, "replica {id} applied {applied} data entries");
    }
    for (_, replica) in std::mem::take(&mut replicas) {
        stop(replica).await;
    }
}
