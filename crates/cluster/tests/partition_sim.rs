//! A simulation of the replication core: three replicas of one partition group (the real
//! segmented log, machine and openraft) in one process, on a paused clock, talking through an
//! in-memory network that a seeded schedule disturbs — messages delayed and lost, nodes cut
//! off, replicas stopped and reopened from their files — while a client writes through
//! whichever replica leads. After every step the test checks Raft's safety properties:
//!
//! - at most one leader per term (every leader any replica ever reported);
//! - no acknowledged entry lost: a ready leader's log holds every entry acknowledged so far,
//!   byte for byte at its index;
//! - replicas agree on what is committed: any two logs hold the same entries up to the
//!   smaller of their applied indexes.
//!
//! The clock is tokio's paused clock (it jumps to the next timer when every task waits), so a
//! seed's minutes of faults run in moments. The seed decides the faults, the writes and every
//! message's delay and loss; openraft draws its election timeouts from its own generator, so a
//! seed does not replay exactly, but every run is checked step by step.
//!
//! `SLUICE_SIM_SEEDS` sets how many seeds run (default 50, a few seconds); `SLUICE_SIM_SEED`
//! runs one, and `SLUICE_SIM_TRACE` prints each step.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftLogReader;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, Raft, RaftNetworkV2, ServerState};
use parking_lot::Mutex;
use sluice_cluster::network::{GroupHandler, RaftServer, WireTypes, method};
use sluice_cluster::partition::log_store::PartitionLog;
use sluice_cluster::partition::machine::PartitionMachine;
use sluice_cluster::partition::replica::{ReplicaSettings, raft_config};
use sluice_cluster::partition::{Batches, LogId, PartitionTypes, encode_entry};
use sluice_cluster::state_machine::StateMachineStore;
use sluice_storage::record::BatchBuilder;
use sluice_storage::{FsyncPolicy, LogConfig};

type Machine = StateMachineStore<PartitionTypes, PartitionMachine>;
type PartitionRaft = Raft<PartitionTypes, Machine>;

const NODES: [u64; 3] = [1, 2, 3];
/// Steps per seed; each runs for [`STEP`] of simulated time.
const STEPS: usize = 60;
const STEP: Duration = Duration::from_millis(400);

/// A small deterministic generator (xorshift64*), so the test needs no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The network's state: which replicas are up (their request handlers), which links are
/// cut, and the generator that delays and drops messages.
struct Net {
    handlers: Mutex<BTreeMap<u64, Arc<dyn GroupHandler>>>,
    cut: Mutex<BTreeSet<(u64, u64)>>,
    rng: Mutex<Rng>,
    /// Percent of messages lost.
    loss: Mutex<u64>,
}

impl Net {
    fn connected(&self, from: u64, to: u64) -> bool {
        !self.cut.lock().contains(&(from.min(to), from.max(to)))
    }

    fn isolate(&self, node: u64) {
        let mut cut = self.cut.lock();
        for other in NODES {
            if other != node {
                cut.insert((node.min(other), node.max(other)));
            }
        }
    }

    fn heal(&self) {
        self.cut.lock().clear();
    }

    /// Carries one request from `from` to `to` and its answer back, each leg delayed and
    /// possibly lost.
    async fn deliver(&self, from: u64, to: u64, method: u8, body: Bytes) -> Result<Bytes, String> {
        let (delay, lost) = {
            let mut rng = self.rng.lock();
            let loss = *self.loss.lock();
            (Duration::from_micros(rng.below(4000)), rng.chance(loss))
        };
        tokio::time::sleep(delay).await;
        let handler = self.handlers.lock().get(&to).cloned();
        let Some(handler) = handler.filter(|_| self.connected(from, to) && !lost) else {
            return Err(format!("{to} unreachable from {from}"));
        };
        let answer = handler.handle(from, method, body).await;
        let (delay, lost) = {
            let mut rng = self.rng.lock();
            let loss = *self.loss.lock();
            (Duration::from_micros(rng.below(4000)), rng.chance(loss))
        };
        tokio::time::sleep(delay).await;
        if !self.connected(from, to) || lost {
            return Err(format!("the answer from {to} was lost"));
        }
        answer
    }
}

struct SimNetwork {
    id: u64,
    net: Arc<Net>,
}

struct SimClient {
    from: u64,
    to: u64,
    net: Arc<Net>,
}

impl RaftNetworkFactory<PartitionTypes> for SimNetwork {
    type Network = SimClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> SimClient {
        SimClient {
            from: self.id,
            to: target,
            net: Arc::clone(&self.net),
        }
    }
}

fn unreachable(reason: String) -> RPCError<PartitionTypes> {
    RPCError::Unreachable(Unreachable::from_string(reason))
}

impl SimClient {
    async fn call<Resp: serde::de::DeserializeOwned>(
        &self,
        method: u8,
        body: Bytes,
    ) -> Result<Resp, RPCError<PartitionTypes>> {
        let answer = self
            .net
            .deliver(self.from, self.to, method, body)
            .await
            .map_err(unreachable)?;
        let answer: Result<Resp, String> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::from_string(e.to_string())))?;
        answer.map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }

    fn json(value: &impl serde::Serialize) -> Result<Bytes, RPCError<PartitionTypes>> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| RPCError::Network(NetworkError::from_string(e.to_string())))
    }
}

impl RaftNetworkV2<PartitionTypes> for SimClient {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionTypes>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionTypes>, RPCError<PartitionTypes>> {
        // The partition group's own framing (raw batches), as the transport carries it.
        let body = PartitionTypes::encode_append(&rpc)
            .map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        self.call(method::APPEND, body).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<PartitionTypes>,
        _option: RPCOption,
    ) -> Result<VoteResponse<PartitionTypes>, RPCError<PartitionTypes>> {
        self.call(method::VOTE, Self::json(&rpc)?).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<PartitionTypes>,
        _option: RPCOption,
    ) -> Result<VoteResponse<PartitionTypes>, RPCError<PartitionTypes>> {
        self.call(method::PRE_VOTE, Self::json(&rpc)?).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<PartitionTypes>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<PartitionTypes>, RPCError<PartitionTypes>> {
        self.call(method::TRANSFER_LEADER, Self::json(&req)?).await
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<PartitionTypes>,
        _snapshot: SnapshotOf<PartitionTypes, Self::SnapshotData>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<PartitionTypes>, StreamingError<PartitionTypes>> {
        // Partition groups never snapshot: a follower catches up from the log.
        Err(StreamingError::Network(NetworkError::from_string(
            "partition groups send no snapshots",
        )))
    }
}

struct Replica {
    raft: PartitionRaft,
    log: PartitionLog,
}

/// The partition groups' own configuration, as every node runs them.
fn config() -> Arc<Config> {
    Arc::new(raft_config(1, &ReplicaSettings::default()).expect("valid config"))
}

async fn open(id: u64, dir: &Path, net: &Arc<Net>) -> Replica {
    let log = PartitionLog::open(
        &dir.join("log"),
        LogConfig {
            fsync: FsyncPolicy::Never,
            segment_bytes: 32 * 1024,
            ..LogConfig::default()
        },
    )
    .expect("log opens");
    let machine = Machine::open(&dir.join("machine")).expect("machine opens");
    let raft = Raft::new(
        id,
        config(),
        SimNetwork {
            id,
            net: Arc::clone(net),
        },
        log.clone(),
        machine,
    )
    .await
    .expect("raft starts");
    net.handlers
        .lock()
        .insert(id, Arc::new(RaftServer::new(raft.clone())));
    Replica { raft, log }
}

async fn stop(net: &Net, id: u64, replica: Replica) {
    net.handlers.lock().remove(&id);
    replica.raft.shutdown().await.expect("raft stops");
    replica.log.close().expect("log closes");
}

fn batch(seed: u64, n: u64) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000);
    for i in 0..3 {
        let value = format!("seed {seed} write {n} record {i}");
        builder.push(1_700_000_000_000 + i, None, Some(value.as_bytes()), &[]);
    }
    builder.finish()
}

/// The record values of a batch: what a write carried, whatever offsets and epoch the leader
/// stamped on it.
fn values(batch: &[u8]) -> Vec<Vec<u8>> {
    sluice_storage::record::decode(batch)
        .map(|records| {
            records
                .iter()
                .map(|r| r.value.map(<[u8]>::to_vec).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// Every entry of a replica's log from index 1 on, as (log id, stored bytes).
async fn entries(replica: &Replica) -> Vec<(LogId, Bytes)> {
    let mut log = replica.log.clone();
    let found = log
        .try_get_log_entries(1..u64::MAX)
        .await
        .expect("the log reads");
    found
        .iter()
        .map(|entry| (entry.log_id, encode_entry(entry).expect("entry encodes")))
        .collect()
}

/// What the checks have seen so far.
#[derive(Default)]
struct Seen {
    /// Term → the replica that led it.
    leaders: BTreeMap<u64, u64>,
    /// Index → (term, payload) of every write the leader acknowledged.
    acknowledged: BTreeMap<u64, (u64, Bytes)>,
}

/// Checks the safety properties over the replicas that are up.
async fn check(seed: u64, step: usize, replicas: &BTreeMap<u64, Replica>, seen: &mut Seen) {
    let mut logs = BTreeMap::new();
    for (&id, replica) in replicas {
        let metrics = replica.raft.metrics().borrow_watched().clone();
        if metrics.state == ServerState::Leader {
            let earlier = *seen.leaders.entry(metrics.current_term).or_insert(id);
            assert_eq!(
                earlier, id,
                "seed {seed} step {step}: two leaders in term {}",
                metrics.current_term
            );
        }
        let applied = metrics.last_applied.map_or(0, |id| id.index);
        let ready = (metrics.state == ServerState::Leader
            && metrics
                .last_applied
                .is_some_and(|id| id.leader_id.term == metrics.current_term))
        .then_some(metrics.current_term);
        logs.insert(id, (applied, ready, entries(replica).await));
    }
    for (id, (_, ready, log)) in &logs {
        let Some(leader_term) = ready else {
            continue;
        };
        let by_index: BTreeMap<u64, &(LogId, Bytes)> =
            log.iter().map(|entry| (entry.0.index, entry)).collect();
        // Leader completeness: a leader holds everything committed in its term and before
        // (a deposed leader that does not know it yet may lack what later terms committed).
        for (index, (term, payload)) in seen
            .acknowledged
            .iter()
            .filter(|(_, (t, _))| t <= leader_term)
        {
            let held = by_index.get(index);
            assert!(
                held.is_some_and(|(log_id, bytes)| log_id.leader_id.term == *term
                    && values(bytes) == values(payload)),
                "seed {seed} step {step}: leader {id} lost the acknowledged entry {index} (term {term})"
            );
        }
    }
    let ids: Vec<u64> = logs.keys().copied().collect();
    for (position, a) in ids.iter().enumerate() {
        for b in &ids[position + 1..] {
            let (applied_a, _, log_a) = &logs[a];
            let (applied_b, _, log_b) = &logs[b];
            let upto = (*applied_a).min(*applied_b);
            let prefix = |log: &Vec<(LogId, Bytes)>| -> Vec<(LogId, Bytes)> {
                log.iter()
                    .filter(|(id, _)| id.index <= upto)
                    .cloned()
                    .collect()
            };
            assert!(
                prefix(log_a) == prefix(log_b),
                "seed {seed} step {step}: replicas {a} and {b} differ below their applied index {upto}"
            );
        }
    }
}

/// Runs one seed: faults and writes for [`STEPS`] steps, then heals everything and checks
/// that every replica ends with every acknowledged entry.
async fn run(seed: u64) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let dirs: BTreeMap<u64, PathBuf> = NODES
        .iter()
        .map(|id| (*id, dir.path().join(format!("replica-{id}"))))
        .collect();
    let net = Arc::new(Net {
        handlers: Mutex::new(BTreeMap::new()),
        cut: Mutex::new(BTreeSet::new()),
        rng: Mutex::new(Rng::new(seed ^ 0x5EED)),
        loss: Mutex::new(0),
    });
    let mut rng = Rng::new(seed);
    let mut replicas = BTreeMap::new();
    for (&id, path) in &dirs {
        replicas.insert(id, open(id, path, &net).await);
    }
    let members: BTreeMap<u64, BasicNode> = NODES
        .iter()
        .map(|id| (*id, BasicNode::new(format!("sim-{id}"))))
        .collect();
    replicas[&1]
        .raft
        .initialize(members)
        .await
        .expect("initialized");
    let mut seen = Seen::default();
    let mut writes = 0u64;
    let mut faults = 0u64;
    let mut in_flight = tokio::task::JoinSet::new();
    let acknowledged = Arc::new(Mutex::new(Vec::<(LogId, Bytes)>::new()));
    for step in 0..STEPS {
        // A fault, now and then; at most one replica down at a time.
        let fault = rng.below(12);
        faults += u64::from(fault <= 6);
        let leader = replicas
            .iter()
            .find(|(_, r)| r.raft.metrics().borrow_watched().state == ServerState::Leader)
            .map(|(id, _)| *id);
        match fault {
            // Cut one replica off (the leader, half the time) from the other two.
            0 | 1 => {
                let node = match leader {
                    Some(leader) if fault == 1 => leader,
                    _ => NODES[rng.below(3) as usize],
                };
                net.heal();
                net.isolate(node);
            }
            2 => net.heal(),
            // Stop one replica (the leader, half the time), at most one at a time.
            3 | 4 if replicas.len() == NODES.len() => {
                let node = match leader {
                    Some(leader) if fault == 4 => leader,
                    _ => NODES[rng.below(3) as usize],
                };
                let replica = replicas.remove(&node).expect("up");
                stop(&net, node, replica).await;
            }
            5 => {
                for (&id, path) in &dirs {
                    if let std::collections::btree_map::Entry::Vacant(slot) = replicas.entry(id) {
                        slot.insert(open(id, path, &net).await);
                    }
                }
            }
            6 => *net.loss.lock() = rng.below(30),
            _ => {}
        }
        // A few writes through whichever replica leads; each may be answered or not.
        for _ in 0..rng.below(4) {
            let leader = replicas
                .iter()
                .find(|(_, r)| r.raft.metrics().borrow_watched().state == ServerState::Leader);
            let Some((_, leader)) = leader else {
                break;
            };
            writes += 1;
            let raft = leader.raft.clone();
            let payload = batch(seed, writes);
            let acknowledged = Arc::clone(&acknowledged);
            in_flight.spawn(async move {
                let written = tokio::time::timeout(
                    Duration::from_secs(5),
                    raft.client_write(Batches(payload.clone())),
                )
                .await;
                if let Ok(Ok(response)) = written {
                    acknowledged.lock().push((response.log_id, payload));
                }
            });
        }
        tokio::time::sleep(STEP).await;
        for (log_id, payload) in acknowledged.lock().drain(..) {
            seen.acknowledged
                .insert(log_id.index, (log_id.leader_id.term, payload));
        }
        check(seed, step, &replicas, &mut seen).await;
        if std::env::var("SLUICE_SIM_TRACE").is_ok() {
            let states: Vec<String> = replicas
                .iter()
                .map(|(id, r)| {
                    let m = r.raft.metrics().borrow_watched().clone();
                    format!(
                        "{id}:{:?}/t{}/a{:?}",
                        m.state,
                        m.current_term,
                        m.last_applied.map(|l| l.index)
                    )
                })
                .collect();
            eprintln!(
                "step {step} fault {fault} cut {:?} loss {} {}",
                net.cut.lock(),
                net.loss.lock(),
                states.join(" ")
            );
        }
    }
    // Heal everything and let the group settle: every replica holds every acknowledged entry.
    net.heal();
    *net.loss.lock() = 0;
    for (&id, path) in &dirs {
        if let std::collections::btree_map::Entry::Vacant(slot) = replicas.entry(id) {
            slot.insert(open(id, path, &net).await);
        }
    }
    while in_flight.join_next().await.is_some() {}
    for (log_id, payload) in acknowledged.lock().drain(..) {
        seen.acknowledged
            .insert(log_id.index, (log_id.leader_id.term, payload));
    }
    let last = seen.acknowledged.keys().next_back().copied().unwrap_or(0);
    let mut settled = false;
    for _ in 0..100 {
        tokio::time::sleep(STEP).await;
        let mut all = true;
        for replica in replicas.values() {
            let metrics = replica.raft.metrics().borrow_watched().clone();
            all &= metrics.last_applied.is_some_and(|id| id.index >= last);
        }
        if all {
            settled = true;
            break;
        }
    }
    assert!(
        settled,
        "seed {seed}: the healed group did not apply up to {last}"
    );
    check(seed, STEPS, &replicas, &mut seen).await;
    for (id, replica) in &replicas {
        let log: BTreeMap<u64, (LogId, Bytes)> = entries(replica)
            .await
            .into_iter()
            .map(|(log_id, bytes)| (log_id.index, (log_id, bytes)))
            .collect();
        for (index, (term, payload)) in &seen.acknowledged {
            assert!(
                log.get(index)
                    .is_some_and(|(log_id, bytes)| log_id.leader_id.term == *term
                        && values(bytes) == values(payload)),
                "seed {seed}: replica {id} lacks the acknowledged entry {index}"
            );
        }
    }
    eprintln!(
        "seed {seed}: {writes} writes, {} acknowledged, {} terms with a leader, {faults} faults",
        seen.acknowledged.len(),
        seen.leaders.len()
    );
    for (id, replica) in replicas {
        stop(&net, id, replica).await;
    }
    seen.acknowledged.len()
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("SLUICE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("SLUICE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    (1..=count).collect()
}

#[test]
fn raft_safety_holds_under_seeded_faults() {
    let mut acknowledged = 0;
    for seed in seeds() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        acknowledged += runtime.block_on(run(seed));
    }
    // The faults leave room for work: a run that acknowledged nothing checked nothing.
    assert!(acknowledged > 0, "no write was acknowledged in any seed");
}
