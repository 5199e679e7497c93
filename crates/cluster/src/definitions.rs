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
    ClusterLink, ClusterNode, ForwardFuture, LogFuture, QuorumView, ReplicaView,
};
use sluice_broker::{Broker, MetadataCommand};
use uuid::Uuid;

use crate::controller::{ControllerCommand, ControllerState};
use crate::liveness::Liveness;
use crate::network::{Answer, GroupHandler};
use crate::node::ControllerNode;
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
}

impl BrokerLink {
    pub fn new(node: Arc<ControllerNode>, liveness: Arc<Liveness>) -> Self {
        Self { node, liveness }
    }

    /// The registered nodes' ids, in order.
    fn node_ids(&self) -> Vec<NodeId> {
        self.node.read_local(|s| s.nodes.keys().copied().collect())
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

    fn place_partitions(&self, topic_id: Uuid, from: u32, to: u32) -> Vec<sluice_broker::NodeId> {
        // New partitions go to the nodes that answer now, as Kafka places them on live brokers.
        let me = self.node.id();
        let mut nodes: Vec<NodeId> = self
            .node_ids()
            .into_iter()
            .filter(|&id| id == me || self.liveness.is_live(id))
            .collect();
        if nodes.is_empty() {
            nodes.push(me);
        }
        let keys: Vec<PlacementKey> = (from..to)
            .map(|index| PlacementKey::partition(&topic_id, index))
            .collect();
        match placement::assign(&keys, &nodes, 1) {
            Ok(assigned) => assigned
                .into_iter()
                .map(|replicas| broker_id(replicas.first().copied().unwrap_or(self.node.id())))
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot place partitions; placing them on this node");
                vec![broker_id(self.node.id()); (to - from) as usize]
            }
        }
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

    fn group_owner(&self, group: &str) -> Option<sluice_broker::NodeId> {
        placement::owner(PlacementKey::group(group), &self.node_ids()).map(broker_id)
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
