//! The controller group's replicated state machine: every change of definitions and of the
//! cluster's membership is a [`ControllerCommand`] in its Raft log, applied in log order on
//! every node.
//!
//! Apply is deterministic: it reads nothing but the state and the command. Ids, timestamps
//! and defaults are decided by the node that proposes a command and travel inside it, so the
//! same log gives the same [`ControllerState`] on every node and after every restart; a test
//! replays one log into two machines and compares the encoded states. A command that does not
//! fit the state (a topic that exists already, a node id the cluster has had) changes nothing
//! and is answered with [`ControllerReply::Refused`] — on every node alike.
//!
//! Each node also carries every committed change of definitions into its broker (its own
//! `meta.redb`, then the change's local effects): see [`crate::definitions`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};
use sluice_broker::metadata::{MetadataCommand, MetadataState};

use crate::placement::NodeId;
use crate::state_machine::Machine;

/// A node as the cluster knows it: its id and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// The address other nodes reach its cluster listener at.
    pub cluster_addr: String,
    /// The addresses clients reach it at, as it advertises them.
    pub kafka_addr: Option<String>,
    pub amqp_addr: Option<String>,
    pub http_addr: Option<String>,
    /// When it joined, as the proposing node's clock read it.
    pub joined_ms: i64,
}

/// A change to the controller's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControllerCommand {
    /// The cluster's id, set once by the node that formed it, with the definitions it starts
    /// from: those the forming node had (a node that ran alone before it formed the cluster).
    Form {
        cluster_id: String,
        #[serde(default)]
        definitions: Box<MetadataState>,
    },
    /// A change of definitions (topics, queues, exchanges, bindings, virtual hosts, users,
    /// producer-id blocks).
    Metadata(MetadataCommand),
    /// A node joins. Refused if the id was ever in the cluster, or if another node already
    /// advertises its cluster address.
    AddNode(NodeRecord),
    /// A node's addresses change (it restarted with new settings).
    UpdateNode(NodeRecord),
    /// A node leaves. Its id is retired: never accepted again.
    RemoveNode { id: NodeId },
}

impl fmt::Display for ControllerCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Form { cluster_id, .. } => write!(f, "form cluster {cluster_id}"),
            Self::Metadata(command) => write!(f, "metadata {}", metadata_name(command)),
            Self::AddNode(node) => write!(f, "add node {} at {}", node.id, node.cluster_addr),
            Self::UpdateNode(node) => write!(f, "update node {} at {}", node.id, node.cluster_addr),
            Self::RemoveNode { id } => write!(f, "remove node {id}"),
        }
    }
}

fn metadata_name(command: &MetadataCommand) -> &'static str {
    match command {
        MetadataCommand::CreateTopic(_) => "create-topic",
        MetadataCommand::DeleteTopic { .. } => "delete-topic",
        MetadataCommand::AddPartitions { .. } => "add-partitions",
        MetadataCommand::SetTopicConfig { .. } => "set-topic-config",
        MetadataCommand::ReassignPartition { .. } => "reassign-partition",
        MetadataCommand::CompleteReassignment { .. } => "complete-reassignment",
        MetadataCommand::AllocateProducerIds { .. } => "allocate-producer-ids",
        MetadataCommand::Messaging(_) => "messaging",
    }
}

/// What applying a command gave, the same on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerReply {
    #[default]
    Applied,
    /// The command did not fit the state and changed nothing; the reason, for the client.
    Refused(String),
}

/// Everything the controller group agrees on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerState {
    /// Set by the first command of the log; every node of the cluster has the same.
    pub cluster_id: Option<String>,
    pub metadata: MetadataState,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Every id the cluster ever had and removed: never accepted again.
    pub retired: BTreeSet<NodeId>,
    /// The index of the last command applied.
    pub applied_index: u64,
}

impl ControllerState {
    /// Applies `command` at log `index`. Deterministic.
    pub fn apply(&mut self, index: u64, command: &ControllerCommand) -> ControllerReply {
        debug_assert!(
            index > self.applied_index,
            "commands are applied in log order"
        );
        self.applied_index = index;
        match self.try_apply(command) {
            Ok(()) => ControllerReply::Applied,
            Err(reason) => ControllerReply::Refused(reason),
        }
    }

    fn try_apply(&mut self, command: &ControllerCommand) -> Result<(), String> {
        match command {
            ControllerCommand::Form {
                cluster_id,
                definitions,
            } => {
                if let Some(existing) = &self.cluster_id {
                    return Err(format!("the cluster was formed already, as {existing}"));
                }
                self.cluster_id = Some(cluster_id.clone());
                self.metadata = definitions.as_ref().clone();
            }
            ControllerCommand::Metadata(command) => {
                let (next, _effects) = self.metadata.apply(command).map_err(|e| e.to_string())?;
                self.metadata = next;
            }
            ControllerCommand::AddNode(node) => {
                if self.nodes.contains_key(&node.id) || self.retired.contains(&node.id) {
                    return Err(format!(
                        "node id {} is already in use in this cluster; a node whose data \
                         directory was wiped must start with a new id",
                        node.id
                    ));
                }
                self.check_address_free(node)?;
                self.nodes.insert(node.id, node.clone());
            }
            ControllerCommand::UpdateNode(node) => {
                if !self.nodes.contains_key(&node.id) {
                    return Err(format!("node {} is not in the cluster", node.id));
                }
                self.check_address_free(node)?;
                self.nodes.insert(node.id, node.clone());
            }
            ControllerCommand::RemoveNode { id } => {
                if self.nodes.remove(id).is_none() {
                    return Err(format!("node {id} is not in the cluster"));
                }
                self.retired.insert(*id);
            }
        }
        Ok(())
    }

    /// Two nodes may not advertise the same cluster address.
    fn check_address_free(&self, node: &NodeRecord) -> Result<(), String> {
        match self
            .nodes
            .values()
            .find(|other| other.id != node.id && other.cluster_addr == node.cluster_addr)
        {
            Some(other) => Err(format!(
                "node {} already advertises the cluster address {}",
                other.id, node.cluster_addr
            )),
            None => Ok(()),
        }
    }
}

impl Machine for ControllerState {
    type Command = ControllerCommand;
    type Reply = ControllerReply;

    fn apply(&mut self, index: u64, command: &ControllerCommand) -> ControllerReply {
        ControllerState::apply(self, index, command)
    }

    fn encode(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn decode(bytes: &[u8]) -> io::Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

openraft::declare_raft_types!(
    /// The controller group's Raft types. One leader per term (`leader_id_std`), as in every
    /// Sluice group, so a term can serve as a leader epoch.
    pub ControllerTypes:
        D = ControllerCommand,
        R = ControllerReply,
        NodeId = NodeId,
        Node = openraft::impls::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
);

/// The controller's messages travel as JSON.
impl crate::network::WireTypes for ControllerTypes {}
