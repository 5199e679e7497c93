//! One replica of a replicated partition on this node: its Raft group, its log and machine,
//! the high watermark readers may see, and the write path of the leader.
//!
//! # Writes (on the leader)
//! A produce is served only by a *ready* leader: one that has applied an entry of its own term
//! (its blank entry), and so every entry committed before it. Batches of an idempotent producer
//! are sequenced here before they enter the log: against the committed producer state
//! ([`PartitionMachine::check`]) *and* the batches this leader has proposed and not yet seen
//! applied (Redpanda's split of replicated and in-flight state). A retry of a batch still in
//! flight waits for the first one's answer instead of entering the log twice; one that
//! continues the in-flight sequence is proposed behind it. Proposals are submitted in the order
//! they were sequenced.
//!
//! Errors say whether the batch may have been written: [`ReplicaError::NotLeader`] and
//! [`ReplicaError::NotReady`] only before the entry entered the log; once it has,
//! a lost leadership or a timeout is [`ReplicaError::Indeterminate`] (Kafka's
//! REQUEST_TIMED_OUT, which clients retry).
//!
//! # The high watermark
//! The end offset of the last applied entry, published on a watch channel and never moved
//! backwards. Readers must stop there.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::alias::{OneshotReceiverOf, WatchReceiverOf};
use openraft::errors::ClientWriteError;
use openraft::impls::ProgressResponder;
use openraft::raft::ClientWriteResult;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, Raft, RaftMetrics, SnapshotPolicy};
use sluice_broker::BrokerError;
use sluice_broker::producer::SequenceCheck;
use sluice_storage::batch::BatchHeader;
use sluice_storage::{LogConfig, LogReader, StorageError};
use tokio::sync::{Mutex, watch};

use super::log_store::PartitionLog;
use super::machine::PartitionMachine;
use super::{Appended, Batches, PartitionTypes};
use crate::network::{GroupNetwork, RaftServer, Router};
use crate::placement::NodeId;
use crate::state_machine::StateMachineStore;
use crate::transport::Transport;

pub type PartitionMachineStore = StateMachineStore<PartitionTypes, PartitionMachine>;
pub type PartitionRaft = Raft<PartitionTypes, PartitionMachineStore>;

/// How a partition group runs.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
        }
    }
}

/// Which replica to open, and where.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// This node.
    pub node: NodeId,
    /// The group's id on the transport.
    pub group: u32,
    /// The partition's directory.
    pub dir: PathBuf,
    pub log_config: LogConfig,
    /// Every replica's node and cluster address (the committed placement).
    pub members: BTreeMap<NodeId, BasicNode>,
}

/// Why a write was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    /// This replica does not lead; nothing was written. The leader, if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// This replica was just elected and has not applied its term's first entry; nothing was
    /// written.
    #[error("the leader is not ready yet")]
    NotReady,
    /// The batch may or may not be committed (leadership lost after it entered the log, or
    /// the wait timed out).
    #[error("the write may or may not have been committed: {0}")]
    Indeterminate(String),
    /// Refused (by the producer state: sequence or epoch; or a batch that does not parse);
    /// nothing was written.
    #[error("{0}")]
    Refused(Arc<BrokerError>),
    /// The replica stopped.
    #[error("the replica stopped: {0}")]
    Stopped(String),
}

/// What a produce got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub appended: Appended,
    /// A retry of a batch already written, answered with its original offsets.
    pub duplicate: bool,
    /// The leader epoch (Raft term) it was written in.
    pub epoch: u64,
}

type Outcome = Result<Produced, ReplicaError>;

/// A batch of an idempotent producer that is proposed and not yet answered.
struct InFlight {
    epoch: i16,
    first_sequence: i32,
    last_sequence: i32,
    outcome: watch::Receiver<Option<Outcome>>,
}

#[derive(Default)]
struct Sequencer {
    in_flight: HashMap<i64, VecDeque<InFlight>>,
}

/// One replica of a partition on this node.
pub struct PartitionReplica {
    id: NodeId,
    group: u32,
    raft: PartitionRaft,
    log: PartitionLog,
    machine: PartitionMachineStore,
    router: Arc<Router>,
    high_watermark: watch::Sender<u64>,
    sequencer: Mutex<Sequencer>,
    watcher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PartitionReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReplica")
            .field("id", &self.id)
            .field("group", &self.group)
            .field("dir", &self.log.dir())
            .finish_non_exhaustive()
    }
}

fn stopped(e: &impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("partition group: {e}"))
}

impl PartitionReplica {
    /// Opens the replica `spec` describes (log in its directory, machine in
    /// `raft-machine` there), starts its Raft and serves it on the transport as its group. A
    /// replica that was never initialized is initialized with the spec's members: every
    /// replica is given the same members (the committed placement), so initializing on each is
    /// safe.
    pub async fn open(
        spec: ReplicaSpec,
        transport: Transport,
        router: Arc<Router>,
        settings: &ReplicaSettings,
    ) -> io::Result<Arc<Self>> {
        let ReplicaSpec {
            node: id,
            group,
            dir,
            log_config,
            members,
        } = spec;
        let (log, machine) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                let log = PartitionLog::open(&dir, log_config)?;
                let machine = PartitionMachineStore::open(&dir.join("raft-machine"))?;
                Ok::<_, io::Error>((log, machine))
            })
            .await
            .map_err(io::Error::other)??
        };
        let config = Config {
            cluster_name: format!("sluice-partition-{group}"),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_min_ms,
            election_timeout_max: settings.election_max_ms,
            // The log is the partition's data: never snapshotted away, and a follower that
            // fell behind catches up from the log, however far behind.
            snapshot_policy: SnapshotPolicy::Never,
            replication_lag_threshold: u64::MAX,
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| stopped(&e))?;
        let raft = Raft::new(
            id,
            Arc::new(config),
            GroupNetwork::new(transport, group),
            log.clone(),
            machine.clone(),
        )
        .await
        .map_err(|e| stopped(&e))?;
        router.register(group, Arc::new(RaftServer::new(raft.clone())));
        if !raft.is_initialized().await.map_err(|e| stopped(&e))? {
            match raft.initialize(members).await {
                Ok(()) => {}
                // Another replica's vote or entries reached this one first: it is a member.
                Err(e) if e.api_error().is_some() => {}
                Err(e) => return Err(stopped(&e)),
            }
        }
        let (high_watermark, _) = watch::channel(0);
        let watcher = tokio::spawn(watch_applied(
            raft.metrics(),
            log.clone(),
            high_watermark.clone(),
        ));
        Ok(Arc::new(Self {
            id,
            group,
            raft,
            log,
            machine,
            router,
            high_watermark,
            sequencer: Mutex::new(Sequencer::default()),
            watcher,
        }))
    }

    pub fn group(&self) -> u32 {
        self.group
    }

    /// The node this replica is on.
    pub fn node(&self) -> NodeId {
        self.id
    }

    /// Kafka's OffsetForLeaderEpoch: the largest epoch at or below `epoch` in this replica's
    /// log and where it ended.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        self.log.end_offset_for_epoch(epoch)
    }

    pub fn raft(&self) -> &PartitionRaft {
        &self.raft
    }

    /// The partition's data as readers see it; stop at [`Self::high_watermark`].
    pub fn reader(&self) -> LogReader {
        self.log.reader()
    }

    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    fn metrics(&self) -> RaftMetrics<PartitionTypes> {
        self.raft.metrics().borrow_watched().clone()
    }

    /// The leader this replica knows of, and the current term (the Kafka leader epoch).
    pub fn leader(&self) -> (Option<NodeId>, u64) {
        let metrics = self.metrics();
        (metrics.current_leader, metrics.current_term)
    }

    /// The term, if this replica leads and is ready to serve (it applied an entry of its own
    /// term, so everything committed before it).
    pub fn ready_epoch(&self) -> Option<u64> {
        let metrics = self.metrics();
        (metrics.current_leader == Some(self.id)
            && metrics
                .last_applied
                .is_some_and(|id| id.leader_id.term == metrics.current_term))
        .then_some(metrics.current_term)
    }

    fn not_serving(&self) -> ReplicaError {
        let metrics = self.metrics();
        if metrics.current_leader == Some(self.id) {
            ReplicaError::NotReady
        } else {
            ReplicaError::NotLeader {
                leader: metrics.current_leader,
            }
        }
    }

    /// Writes `batches` (checked: structure and CRC) and answers once they are committed, or
    /// after `timeout` with [`ReplicaError::Indeterminate`].
    pub async fn produce(&self, batches: Bytes, timeout: Duration) -> Outcome {
        let Some(epoch) = self.ready_epoch() else {
            return Err(self.not_serving());
        };
        let first = BatchHeader::parse(&batches).map_err(|source| {
            ReplicaError::Refused(Arc::new(BrokerError::Storage(StorageError::InvalidBatch {
                position: 0,
                source,
            })))
        })?;
        let mut outcome = if first.producer_id >= 0 {
            self.sequenced(first, batches, epoch).await?
        } else {
            let (responder, receiver) = ProgressResponder::complete_only();
            self.submit(Batches(batches), responder).await?;
            answer(receiver, epoch, self.high_watermark.clone())
        };
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if let Some(outcome) = outcome.borrow_and_update().clone() {
                    return outcome;
                }
                if outcome.changed().await.is_err() {
                    return Err(ReplicaError::Indeterminate("the answer was lost".into()));
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            Err(ReplicaError::Indeterminate(format!(
                "not committed within {} ms",
                timeout.as_millis()
            )))
        })
    }

    async fn submit(
        &self,
        batches: Batches,
        responder: ProgressResponder<PartitionTypes, ClientWriteResult<PartitionTypes>>,
    ) -> Result<(), ReplicaError> {
        self.raft
            .client_write_ff(batches, Some(responder))
            .await
            .map_err(|e| ReplicaError::Stopped(e.to_string()))
    }

    /// Sequences an idempotent producer's batches and proposes them; answers the watch its
    /// outcome will arrive on.
    async fn sequenced(
        &self,
        first: BatchHeader,
        batches: Bytes,
        epoch: u64,
    ) -> Result<watch::Receiver<Option<Outcome>>, ReplicaError> {
        let producer = first.producer_id;
        let last_sequence = first.last_sequence();
        let mut sequencer = self.sequencer.lock().await;
        // Answered proposals are done (the machine knows what they wrote), and a producer with
        // none in flight is forgotten: the map holds only what is in flight.
        sequencer.in_flight.retain(|_, in_flight| {
            in_flight.retain(|f| f.outcome.borrow().is_none());
            !in_flight.is_empty()
        });
        let in_flight = sequencer.in_flight.entry(producer).or_default();
        // A retry of a batch in flight waits for the first one's answer.
        if let Some(same) = in_flight.iter().find(|f| {
            f.epoch == first.producer_epoch
                && f.first_sequence == first.base_sequence
                && f.last_sequence == last_sequence
        }) {
            return Ok(same.outcome.clone());
        }
        let continues = in_flight.back().is_some_and(|last| {
            last.epoch == first.producer_epoch
                && first.base_sequence == next_sequence(last.last_sequence)
        });
        if !continues {
            match self.machine.read(|m| m.check(&first)) {
                Ok(SequenceCheck::Duplicate {
                    base_offset,
                    last_offset,
                }) => {
                    let (_, rx) = watch::channel(Some(Ok(Produced {
                        appended: Appended {
                            base_offset,
                            last_offset,
                        },
                        duplicate: true,
                        epoch,
                    })));
                    return Ok(rx);
                }
                Ok(SequenceCheck::Append) if in_flight.is_empty() => {}
                Ok(SequenceCheck::Append) => {
                    let expected = in_flight
                        .back()
                        .map_or(0, |last| next_sequence(last.last_sequence));
                    return Err(ReplicaError::Refused(Arc::new(
                        BrokerError::OutOfOrderSequence {
                            producer_id: producer,
                            expected,
                            received: first.base_sequence,
                        },
                    )));
                }
                Err(e) => return Err(ReplicaError::Refused(Arc::new(e))),
            }
        }
        let (responder, receiver) = ProgressResponder::complete_only();
        let outcome = answer(receiver, epoch, self.high_watermark.clone());
        in_flight.push_back(InFlight {
            epoch: first.producer_epoch,
            first_sequence: first.base_sequence,
            last_sequence,
            outcome: outcome.clone(),
        });
        // Submitted under the lock: batches enter the log in the order they were sequenced.
        self.submit(Batches(batches), responder).await?;
        Ok(outcome)
    }

    /// Stops the replica: Raft, the high-watermark watcher, and its route.
    pub async fn shutdown(&self) {
        self.router.unregister(self.group);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = self.group, error = %e, "partition group did not stop cleanly");
        }
        self.watcher.abort();
        if let Err(e) = self.log.close() {
            tracing::warn!(group = self.group, error = %e, "partition log did not close cleanly");
        }
    }
}

fn next_sequence(sequence: i32) -> i32 {
    if sequence == i32::MAX {
        0
    } else {
        sequence + 1
    }
}

/// The watch an answer from Raft will arrive on: `Some` once it has.
/// A committed answer moves the high watermark past the entry first, so a reader told of the
/// write can read it.
fn answer(
    receiver: OneshotReceiverOf<PartitionTypes, ClientWriteResult<PartitionTypes>>,
    epoch: u64,
    high_watermark: watch::Sender<u64>,
) -> watch::Receiver<Option<Outcome>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let outcome = match receiver.await {
            Ok(Ok(response)) => {
                // Applied, so every entry before it is: its end is a high watermark.
                let end = response.data.last_offset + 1;
                high_watermark.send_if_modified(|hw| {
                    let moved = end > *hw;
                    *hw = (*hw).max(end);
                    moved
                });
                Ok(Produced {
                    appended: response.data,
                    duplicate: false,
                    epoch,
                })
            }
            Ok(Err(ClientWriteError::ForwardToLeader(forward))) => Err(ReplicaError::NotLeader {
                leader: forward.leader_id,
            }),
            Ok(Err(e)) => Err(ReplicaError::Indeterminate(e.to_string())),
            Err(_) => Err(ReplicaError::Indeterminate(
                "the group stopped before answering".into(),
            )),
        };
        tx.send_replace(Some(outcome));
    });
    rx
}

/// Publishes the end offset of the last applied entry as the high watermark, never backwards.
async fn watch_applied(
    mut metrics: WatchReceiverOf<PartitionTypes, RaftMetrics<PartitionTypes>>,
    log: PartitionLog,
    high_watermark: watch::Sender<u64>,
) {
    let mut known_leader = None;
    loop {
        let (applied, leader, term) = {
            let metrics = metrics.borrow_watched();
            (
                metrics.last_applied,
                metrics.current_leader,
                metrics.current_term,
            )
        };
        if known_leader != Some((leader, term)) {
            if leader.is_some() {
                tracing::info!(dir = %log.dir().display(), leader, term, "partition leader");
            }
            known_leader = Some((leader, term));
        }
        if let Some(applied) = applied {
            match log.entry_loc(applied.index) {
                Ok(Some(loc)) => {
                    high_watermark.send_if_modified(|hw| {
                        let moved = loc.end_offset() > *hw;
                        *hw = (*hw).max(loc.end_offset());
                        moved
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot read the applied entry's place"),
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
