//! Changes to what the broker keeps, as pure data: commands, the records they carry, and the
//! effects applying them has outside the definitions.
//!
//! A command carries everything its change needs: ids, timestamps and defaults are decided
//! before it is made (by the controller, from a client's request), so applying it is
//! deterministic. The same command applied to the same state gives the same state and the same
//! effects wherever it is applied, which is what a replicated log needs: the next step moves
//! these commands into one. Applying lives with each state
//! ([`crate::metadata::MetadataState::apply`], [`crate::offsets::OffsetStore::apply`]);
//! effects are carried out by the controller after the state has changed.
//!
//! This module is a leaf: it depends on record types only, never on the controller, the live
//! registries or any task.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::exchange::{BindingRecord, ExchangeRecord};
use crate::limits::VhostLimits;
use crate::queue::QueueRecord;
use crate::users::UserRecord;

/// A node of the (future) cluster. A single-node broker is node 0.
pub type NodeId = u32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub index: u32,
    /// The node that accepts writes for this partition.
    pub leader: NodeId,
    /// Every node holding a copy, the leader first.
    pub replicas: Vec<NodeId>,
    /// Bumped on every leader change; stamped on each batch the leader appends.
    pub leader_epoch: i32,
    /// The partition's Raft group on the cluster transport when it is replicated (more than
    /// one replica), given by the controller when the partition is defined; 0 when it is not.
    #[serde(default)]
    pub group: u32,
    /// The replicas a reassignment in progress moves the partition to, the preferred leader
    /// first (Kafka's target replicas); `None` when none is in progress. The partition's Raft
    /// group takes the nodes it adds as learners, lets them catch up, and changes its voters to
    /// these (joint consensus); its leader then commits [`MetadataCommand::CompleteReassignment`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<NodeId>>,
    /// Reassignments started so far. Only a partition never reassigned initializes its Raft
    /// group with its replicas when a replica opens empty: afterwards the group's members are
    /// whatever its log says, and a replica that opens empty waits to be sent the log.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reassignments: u32,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

impl PartitionRecord {
    /// Every node that holds (or is to hold) a copy: the target replicas first when a
    /// reassignment is in progress, then the current ones it removes (Kafka's replica list
    /// during a reassignment).
    pub fn all_replicas(&self) -> Vec<NodeId> {
        let mut all = self.target.clone().unwrap_or_default();
        for node in &self.replicas {
            if !all.contains(node) {
                all.push(*node);
            }
        }
        all
    }

    /// Whether `node` holds a copy, or is to hold one once a reassignment in progress is done.
    pub fn placed_on(&self, node: NodeId) -> bool {
        self.replicas.contains(&node) || self.target.as_ref().is_some_and(|t| t.contains(&node))
    }

    /// The nodes a reassignment in progress adds and removes, when it changes the set of
    /// replicas (a cancelled one goes back to the current set and is no longer listed).
    pub fn reassigning(&self) -> Option<(Vec<NodeId>, Vec<NodeId>)> {
        let target = self.target.as_ref()?;
        let adding: Vec<NodeId> = target
            .iter()
            .copied()
            .filter(|node| !self.replicas.contains(node))
            .collect();
        let removing: Vec<NodeId> = self
            .replicas
            .iter()
            .copied()
            .filter(|node| !target.contains(node))
            .collect();
        (!adding.is_empty() || !removing.is_empty()).then_some((adding, removing))
    }
}

/// Replicated partitions' Raft groups are numbered from here (below are the controller's and
/// other fixed groups).
pub const FIRST_PARTITION_GROUP: u32 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub name: String,
    pub id: Uuid,
    pub partitions: Vec<PartitionRecord>,
    /// Config overrides, validated (see [`crate::topic_config`]).
    pub config: BTreeMap<String, String>,
    pub created_ms: i64,
}

/// A change to the durable definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetadataCommand {
    CreateTopic(TopicRecord),
    DeleteTopic {
        name: String,
    },
    /// Adds partitions at the end of a topic's list.
    AddPartitions {
        name: String,
        partitions: Vec<PartitionRecord>,
    },
    /// Replaces a topic's config overrides.
    SetTopicConfig {
        name: String,
        config: BTreeMap<String, String>,
    },
    /// Starts moving a replicated partition of the topic incarnation `id` to the replicas
    /// `target` (the preferred leader first), replacing a reassignment in progress; `None`
    /// cancels the one in progress (the partition goes back to its current replicas).
    ReassignPartition {
        name: String,
        id: Uuid,
        partition: u32,
        target: Option<Vec<NodeId>>,
    },
    /// The partition's Raft group has exactly the voters `replicas` (and no other member): the
    /// reassignment to them is done. Refused unless `replicas` is the target in progress.
    CompleteReassignment {
        name: String,
        id: Uuid,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// Reserves the producer ids `start..start + count`; `start` must be the first id not
    /// reserved yet, so a block is never handed out twice.
    AllocateProducerIds {
        start: u64,
        count: u64,
    },
    /// Queues, exchanges, bindings, virtual hosts and users.
    Messaging(DefinitionCommand),
}

/// A change to the messaging definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DefinitionCommand {
    /// Creates a virtual host with its default exchanges (no-op if it exists).
    PutVhost {
        name: String,
    },
    DeleteVhost {
        name: String,
    },
    /// Replaces a virtual host's limits.
    SetVhostLimits {
        vhost: String,
        limits: VhostLimits,
    },
    /// Creates or replaces a user.
    PutUser(UserRecord),
    DeleteUser {
        name: String,
    },
    /// Creates or replaces an exchange.
    DeclareExchange(ExchangeRecord),
    DeleteExchange {
        vhost: String,
        name: String,
    },
    /// Creates or replaces a queue.
    DeclareQueue(QueueRecord),
    DeleteQueue {
        vhost: String,
        name: String,
    },
    Bind(BindingRecord),
    /// Removes a binding; not an error if it does not exist.
    Unbind(BindingRecord),
}

impl DefinitionCommand {
    /// The virtual host the command changes, if it changes one.
    pub fn vhost(&self) -> Option<&str> {
        match self {
            Self::PutVhost { name } | Self::DeleteVhost { name } => Some(name),
            Self::SetVhostLimits { vhost, .. } => Some(vhost),
            Self::PutUser(_) | Self::DeleteUser { .. } => None,
            Self::DeclareExchange(record) => Some(&record.vhost),
            Self::DeclareQueue(record) => Some(&record.vhost),
            Self::Bind(binding) | Self::Unbind(binding) => Some(&binding.vhost),
            Self::DeleteExchange { vhost, .. } | Self::DeleteQueue { vhost, .. } => Some(vhost),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

/// One partition's committed offset, with where it belongs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetEntry {
    pub topic: String,
    pub partition: u32,
    pub committed: CommittedOffset,
}

/// A change to committed consumer offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffsetCommand {
    /// Stores a group's offsets, all or none.
    Commit {
        group: String,
        entries: Vec<OffsetEntry>,
    },
    /// Removes every committed offset of a group, or of a topic in every group (or both
    /// bounds at once).
    Delete {
        group: Option<String>,
        topic: Option<String>,
    },
}

/// What has to happen outside the definitions once a command has changed them: logs to open
/// or close, owner tasks to start or stop, routing tables to publish. Computed from the states
/// before and after the command, so it is as deterministic as the command; the controller
/// carries effects out in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Open and serve the topic's partitions `from..to`.
    StartPartitions { topic: String, from: u32, to: u32 },
    /// Stop serving the topic (this incarnation of it), remove its logs and its committed
    /// offsets.
    StopTopic { name: String, id: Uuid },
    /// Serve the topic with its new configuration.
    ReconfigureTopic { name: String },
    /// The partition's replicas or reassignment changed: open this node's replica if it is
    /// to hold one, tell the replica the reassignment, close and remove it once the
    /// partition is no longer placed here.
    Reassign { topic: String, partition: u32 },
    /// Open the queue's log and start its owner.
    StartQueue { vhost: String, name: String },
    /// Publish the virtual host's routing table again (creating the live virtual host if it
    /// is new).
    Republish { vhost: String },
    /// The virtual host is gone: whoever holds its routing table finds nothing, its
    /// connections are told to close, and its queues are stopped.
    DropVhost { name: String },
    /// Stop the queue (this incarnation of it): cancel its consumers, close it, remove its
    /// files. Comes after the routing table that no longer has it.
    StopQueue {
        vhost: String,
        name: String,
        id: Uuid,
    },
}
