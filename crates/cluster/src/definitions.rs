//! The broker's definitions on the controller group: what this node proposes goes into the
//! group's log ([`BrokerLink`], which also tells the broker the nodes and where partitions and
//! groups are placed), and what the log commits comes back into the broker, in log order, on
//! every node ([`BrokerObserver`]).
//!
//! The broker keeps its own `meta.redb` with the index of the last command it applied, in the
//! same transaction. A command the controller's state refused is applied to the broker too: it
//! fails there in the same way (apply is deterministic), which gives its proposer the typed
//! error. A snapshot installed, and the cluster's first command (which carries the forming
//! node's definitions), replace the broker's definitions whole; what changed is then carried
//! out. Replays after a restart skip what the broker already has.

use std::sync::Arc;

use sluice_broker::error::BrokerError;
use std::time::Duration;

use bytes::Bytes;
use sluice_broker::replication::{
    ClusterLink, ClusterNode, Election, FollowerView, ForwardFuture, LogFuture, PendingProduce,
    ProduceOptions, QuorumView, ReplicaRequest, ReplicaView, ReplicatedLog,
};
use sluice_broker::{Broker, MetadataCommand, ProduceOutcome};
use uuid::Uuid;

use crate::cluster::PartitionTiming;
use crate::controller::{ControllerCommand, ControllerState};
use crate::liveness::Liveness;
use crate::network::{Answer, GroupHandler};
use crate::node::ControllerNode;
use crate::partition::quiet::{PeerView, QuietGroups};
use crate::partition::replica::{
    Acks, MayLead, PartitionReplica, PreferredElection, ReplicaError, ReplicaSettings, ReplicaSpec,
};
use crate::placement::{self, NodeId, PlacementKey};
use crate::state_machine::{Observer, ObserverFuture};

/// Carries committed controller entries into the broker.
#[derive(Debug)]
pub struct BrokerObserver {
    broker: Broker,
}

impl BrokerObserver {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    async fn install(&self, index: u64, state: &sluice_broker::MetadataState) {
        if index <= self.broker.replicated_index() {
            return;
        }
        if let Err(error) = self.broker.install_replicated(index, state.clone()).await {
            tracing::error!(index, %error, "serving the cluster's definitions failed on this node");
        }
    }
}

impl Observer<ControllerState> for BrokerObserver {
    fn applied<'a>(
        &'a self,
        index: u64,
        command: Option<&'a ControllerCommand>,
    ) -> ObserverFuture<'a> {
        Box::pin(async move {
            match command {
                Some(ControllerCommand::Metadata(command)) => {
                    self.broker
                        .apply_replicated(index, Some(command.clone()))
                        .await;
                }
                Some(ControllerCommand::Form { definitions, .. }) => {
                    self.install(index, definitions).await;
                }
                _ => self.broker.apply_replicated(index, None).await,
            }
        })
    }

    fn installed<'a>(&'a self, index: u64, machine: &'a ControllerState) -> ObserverFuture<'a> {
        Box::pin(self.install(index, &machine.metadata))
    }
}

/// The cluster as the broker uses it: the controller group for definition changes, the
/// registry and liveness for nodes, placement for partitions and groups.
#[derive(Debug)]
pub struct BrokerLink {
    node: Arc<ControllerNode>,
    liveness: Arc<Liveness>,
    timing: PartitionTiming,
    /// The node's quiet partition groups, if idle groups go quiet.
    quiet: Option<Arc<QuietGroups>>,
}

impl BrokerLink {
    pub fn new(
        node: Arc<ControllerNode>,
        liveness: Arc<Liveness>,
        timing: PartitionTiming,
    ) -> Self {
        let quiet = timing
            .quiesce
            .then(|| QuietGroups::start(Arc::clone(&liveness) as Arc<dyn PeerView>));
        Self {
            node,
            liveness,
            timing,
            quiet,
        }
    }

    /// The registered nodes' ids, in order.
    fn node_ids(&self) -> Vec<NodeId> {
        self.node.read_local(|s| s.nodes.keys().copied().collect())
    }

    /// The registered nodes that answer now (this one always does).
    fn live_nodes(&self) -> Vec<NodeId> {
        let me = self.node.id();
        let mut nodes: Vec<NodeId> = self
            .node_ids()
            .into_iter()
            .filter(|&id| id == me || self.liveness.is_live(id))
            .collect();
        if nodes.is_empty() {
            nodes.push(me);
        }
        nodes
    }
}

/// A partition replica as the broker sees it.
#[derive(Debug)]
struct BrokerReplica {
    replica: Arc<PartitionReplica>,
    /// The controller, where the end of a reassignment is committed.
    node: Arc<ControllerNode>,
    /// The task carrying out a reassignment in progress (see [`crate::reassign`]).
    reassigning: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn epoch(term: u64) -> i32 {
    i32::try_from(term).unwrap_or(i32::MAX)
}

/// What a replica's refusal of a write (a produce, a trim) is to the broker.
fn replica_error(error: ReplicaError) -> BrokerError {
    match error {
        ReplicaError::NotLeader { leader } => BrokerError::NotLeader {
            topic: String::new(),
            partition: -1,
            leader: leader.map(broker_id),
        },
        ReplicaError::NotReady => BrokerError::LeaderNotReady {
            topic: String::new(),
            partition: -1,
        },
        ReplicaError::NotEnoughReplicas { in_sync, required } => BrokerError::NotEnoughReplicas {
            topic: String::new(),
            partition: -1,
            in_sync,
            required,
        },
        ReplicaError::Refused(error) => match error.as_ref() {
            BrokerError::OutOfOrderSequence {
                producer_id,
                expected,
                received,
            } => BrokerError::OutOfOrderSequence {
                producer_id: *producer_id,
                expected: *expected,
                received: *received,
            },
            BrokerError::InvalidProducerEpoch {
                producer_id,
                current,
                received,
            } => BrokerError::InvalidProducerEpoch {
                producer_id: *producer_id,
                current: *current,
                received: *received,
            },
            // A batch whose header does not parse; the broker checked every batch before, so
            // this does not happen.
            _ => BrokerError::InvalidProducerBatch { producer_id: -1 },
        },
        error @ (ReplicaError::Indeterminate(_) | ReplicaError::Stopped(_)) => {
            BrokerError::WriteIndeterminate(error.to_string())
        }
    }
}

impl ReplicatedLog for BrokerReplica {
    fn reader(&self) -> sluice_storage::LogReader {
        self.replica.reader()
    }

    fn watch_high_watermark(&self) -> tokio::sync::watch::Receiver<u64> {
        self.replica.watch_high_watermark()
    }

    fn submit(&self, batches: Bytes, options: ProduceOptions) -> LogFuture<'_, PendingProduce> {
        Box::pin(async move {
            let acks = if options.leader_only {
                Acks::Leader
            } else {
                Acks::All {
                    min_insync: options.min_insync_replicas,
                    lag: options.replica_lag,
                }
            };
            let pending = self
                .replica
                .submit(batches, acks, options.timeout)
                .await
                .map_err(replica_error)?;
            let reader = self.replica.reader();
            Ok(Box::pin(async move {
                let produced = pending.await.map_err(replica_error)?;
                Ok(ProduceOutcome {
                    base_offset: produced.appended.base_offset,
                    last_offset: produced.appended.last_offset,
                    log_append_time_ms: None,
                    log_start_offset: reader.log_start_offset(),
                    duplicate: produced.duplicate,
                })
            }) as PendingProduce)
        })
    }

    fn ready_epoch(&self) -> Option<i32> {
        self.replica.ready_epoch().map(epoch)
    }

    fn leader(&self) -> (Option<sluice_broker::NodeId>, i32) {
        let (leader, term) = self.replica.leader();
        (leader.map(broker_id), epoch(term))
    }

    fn node(&self) -> sluice_broker::NodeId {
        broker_id(self.replica.node())
    }

    fn is_quiet(&self) -> bool {
        self.replica.is_quiet()
    }

    fn followers(&self) -> Vec<FollowerView> {
        self.replica
            .followers()
            .into_iter()
            .map(|f| FollowerView {
                node: broker_id(f.node),
                matched_offset: f.matched_offset,
                last_contact_ms: f.last_contact_ms,
                voter: f.voter,
            })
            .collect()
    }

    fn elect_preferred(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Election> + Send + '_>> {
        Box::pin(async move {
            match self.replica.elect_preferred().await {
                PreferredElection::Started => Election::Started,
                PreferredElection::NotNeeded => Election::NotNeeded,
                PreferredElection::Unavailable(why) => Election::PreferredNotAvailable(why),
                PreferredElection::NotLeader(leader) => Election::NotLeader(leader.map(broker_id)),
            }
        })
    }

    fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        self.replica.end_offset_for_epoch(epoch)
    }

    fn delete_records(&self, offset: u64, timeout: std::time::Duration) -> LogFuture<'_, u64> {
        Box::pin(async move {
            self.replica
                .delete_records(offset, timeout)
                .await
                .map_err(replica_error)
        })
    }

    fn reconfigure(&self, log: sluice_storage::LogConfig) -> Result<(), BrokerError> {
        self.replica
            .set_log_config(log)
            .map_err(|e| BrokerError::metadata("reconfigure a partition replica", e))
    }

    fn hand_over(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.replica.hand_over())
    }

    fn reassign(&self, reassignment: sluice_broker::replication::Reassignment) {
        self.replica
            .set_preferred(reassignment.preferred().map(NodeId::from));
        let reassignment_replicas = reassignment.replicas.clone();
        let driver = reassignment.target.is_some().then(|| {
            tokio::spawn(crate::reassign::drive(
                Arc::clone(&self.replica),
                Arc::clone(&self.node),
                reassignment,
            ))
        });
        let ended = driver.is_none();
        if let Some(previous) = std::mem::replace(&mut *self.reassigning.lock(), driver) {
            previous.abort();
            if ended {
                tracing::info!(group = self.replica.group(), replicas = ?reassignment_replicas, "the partition's reassignment is done");
            }
        }
    }

    fn found_damage(&self, offset: u64) {
        self.replica.found_damage(offset);
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        if let Some(driver) = self.reassigning.lock().take() {
            driver.abort();
        }
        Box::pin(self.replica.shutdown())
    }
}

impl ClusterLink for BrokerLink {
    fn commit(&self, command: MetadataCommand) -> LogFuture<'_, u64> {
        Box::pin(async move {
            self.node
                .propose_at(ControllerCommand::Metadata(command))
                .await
                .map(|(index, _reply)| index)
                .map_err(|e| BrokerError::Metadata {
                    op: "commit through the cluster's controller",
                    reason: e.to_string(),
                })
        })
    }

    fn nodes(&self) -> Vec<ClusterNode> {
        let me = self.node.id();
        let registered: Vec<_> = self
            .node
            .read_local(|s| s.nodes.values().cloned().collect());
        let mut nodes: Vec<ClusterNode> = registered
            .into_iter()
            .map(|record| ClusterNode {
                id: broker_id(record.id),
                kafka_addr: record.kafka_addr,
                live: record.id == me || self.liveness.is_live(record.id),
            })
            .collect();
        if !nodes.iter().any(|n| u64::from(n.id) == me) {
            // Not registered yet (it registers once it belongs): still itself.
            nodes.push(ClusterNode {
                id: broker_id(me),
                kafka_addr: None,
                live: true,
            });
        }
        nodes
    }

    fn controller(&self) -> Option<sluice_broker::NodeId> {
        self.node.metrics().current_leader.map(broker_id)
    }

    fn cluster_id(&self) -> Option<String> {
        self.node.read_local(|s| s.cluster_id.clone())
    }

    fn place_partitions(
        &self,
        topic_id: Uuid,
        from: u32,
        to: u32,
        replication_factor: usize,
    ) -> Result<Vec<Vec<sluice_broker::NodeId>>, BrokerError> {
        // New partitions go to the nodes that answer now, as Kafka places them on live brokers.
        let nodes = self.live_nodes();
        let keys: Vec<PlacementKey> = (from..to)
            .map(|index| PlacementKey::partition(&topic_id, index))
            .collect();
        match placement::assign(&keys, &nodes, replication_factor) {
            Ok(assigned) => Ok(assigned
                .into_iter()
                .map(|replicas| replicas.into_iter().map(broker_id).collect())
                .collect()),
            Err(error) if replication_factor == 1 => {
                tracing::warn!(%error, "cannot place partitions; placing them on this node");
                Ok(vec![vec![broker_id(self.node.id())]; (to - from) as usize])
            }
            Err(error) => Err(BrokerError::InvalidReplicationFactor(error.to_string())),
        }
    }

    fn live_node_count(&self) -> usize {
        self.live_nodes().len()
    }

    fn open_replica(&self, request: ReplicaRequest) -> LogFuture<'_, Arc<dyn ReplicatedLog>> {
        Box::pin(async move {
            let addresses: std::collections::BTreeMap<NodeId, String> = self.node.read_local(|s| {
                s.nodes
                    .values()
                    .map(|n| (n.id, n.cluster_addr.clone()))
                    .collect()
            });
            let mut members = std::collections::BTreeMap::new();
            // Only a replica that may initialize the group needs its members.
            for replica in request.replicas.iter().filter(|_| request.initialize) {
                let id = NodeId::from(*replica);
                let address = addresses.get(&id).cloned().ok_or_else(|| {
                    BrokerError::metadata(
                        "open a partition replica",
                        format!("replica node {id} is not registered"),
                    )
                })?;
                members.insert(id, openraft::BasicNode::new(address));
            }
            let spec = ReplicaSpec {
                node: self.node.id(),
                group: request.group,
                dir: request.dir.clone(),
                log_config: request.log,
                members,
                preferred: request.replicas.first().map(|r| NodeId::from(*r)),
                initialize: request.initialize,
            };
            let replica = PartitionReplica::open(
                spec,
                self.node.transport().clone(),
                Arc::clone(self.node.router()),
                &ReplicaSettings {
                    heartbeat_ms: self.timing.heartbeat_ms,
                    election_min_ms: self.timing.election_min_ms,
                    election_max_ms: self.timing.election_max_ms,
                    auto_balance: request.auto_leader_rebalance,
                    may_lead: {
                        let node = Arc::clone(&self.node);
                        let liveness = Arc::clone(&self.liveness);
                        MayLead::new(move |id| {
                            if id == node.id() {
                                !node.is_stopping()
                            } else {
                                !liveness.is_stopping(id)
                            }
                        })
                    },
                    housekeeping_every: request.housekeeping_interval,
                    replica_lag: request.replica_lag,
                    quiesce: self.quiet.clone(),
                    ..ReplicaSettings::default()
                },
            )
            .await
            .map_err(|e| {
                BrokerError::metadata(
                    "open a partition replica",
                    format!("{}: {e}", request.dir.display()),
                )
            })?;
            Ok(Arc::new(BrokerReplica {
                replica,
                node: Arc::clone(&self.node),
                reassigning: parking_lot::Mutex::new(None),
            }) as Arc<dyn ReplicatedLog>)
        })
    }

    fn leader_elsewhere(&self, group: u32) -> Option<(sluice_broker::NodeId, i32)> {
        self.liveness
            .leader_of(group)
            .map(|(node, term)| (broker_id(node), i32::try_from(term).unwrap_or(i32::MAX)))
    }

    fn place_queue(&self, queue_id: Uuid) -> sluice_broker::NodeId {
        // Like partitions: on the nodes that answer now.
        let me = self.node.id();
        let nodes: Vec<NodeId> = self
            .node_ids()
            .into_iter()
            .filter(|&id| id == me || self.liveness.is_live(id))
            .collect();
        broker_id(placement::owner(PlacementKey::queue(&queue_id), &nodes).unwrap_or(me))
    }

    fn forward(
        &self,
        node: sluice_broker::NodeId,
        body: Bytes,
        timeout: Duration,
    ) -> ForwardFuture<'_> {
        Box::pin(async move {
            self.node
                .transport()
                .call(NodeId::from(node), FORWARD_GROUP, FORWARD, body, timeout)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn quorum(&self) -> LogFuture<'_, QuorumView> {
        Box::pin(async move {
            let status = crate::status::current(&self.node, QUORUM_WAIT).await;
            let replica = |node: &crate::status::NodeStatus| ReplicaView {
                id: broker_id(node.id),
                matched_index: node.matched_index,
                last_contact_ms: node.last_contact_ms,
                lag: node.lag,
            };
            Ok(QuorumView {
                leader: status.leader.map(broker_id),
                term: status.term,
                commit_index: status.commit_index.unwrap_or(0),
                voters: status
                    .nodes
                    .iter()
                    .filter(|n| n.role == "leader" || n.role == "voter")
                    .map(replica)
                    .collect(),
                observers: status
                    .nodes
                    .iter()
                    .filter(|n| n.role == "learner")
                    .map(replica)
                    .collect(),
            })
        })
    }
}

/// The transport group that carries requests for queues on other nodes.
pub const FORWARD_GROUP: u32 = u32::MAX - 1;
/// Its one method: the body says what is asked (see `sluice_broker::queue::remote`).
const FORWARD: u8 = 1;

/// Serves the queue requests other nodes forward to this one's broker.
#[derive(Debug)]
pub struct ForwardServer {
    pub broker: Broker,
}

impl GroupHandler for ForwardServer {
    fn handle(&self, from: NodeId, method: u8, body: Bytes) -> Answer {
        if method != FORWARD {
            return Box::pin(async move { Err(format!("unknown forwarding method {method}")) });
        }
        Box::pin(self.broker.serve_forwarded(broker_id(from), body))
    }
}

/// How long a quorum description waits for the leader's view.
const QUORUM_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A node id as the broker (and Kafka) knows it: node ids are 31 bits.
fn broker_id(id: NodeId) -> sluice_broker::NodeId {
    id as sluice_broker::NodeId
}
