//! The broker's one error type. Front-ends turn each variant into their protocol's own error
//! (a Kafka error code, an AMQP exception) in one place each; this type never names them.

use sluice_storage::{BatchError, StorageError};

use crate::metadata::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("partition {partition} of topic {topic:?} does not exist")]
    UnknownPartition { topic: String, partition: i32 },
    #[error("partition {partition} of topic {topic:?} is served by another node ({leader:?})")]
    NotLeader {
        topic: String,
        partition: i32,
        /// The node the partition is placed on.
        leader: Option<NodeId>,
    },
    /// This node leads the partition's group but has not applied an entry of its term yet;
    /// nothing was written.
    #[error("partition {partition} of topic {topic:?}: the new leader is not ready yet")]
    LeaderNotReady { topic: String, partition: i32 },
    /// A replicated write whose outcome is unknown: it may still be committed.
    #[error("the write may or may not have been committed: {0}")]
    WriteIndeterminate(String),
    /// An acks=all write refused before it was written: fewer in-sync replicas than the
    /// topic's `min.insync.replicas`.
    #[error(
        "partition {partition} of topic {topic:?} has {in_sync} in-sync replicas, fewer than min.insync.replicas ({required})"
    )]
    NotEnoughReplicas {
        topic: String,
        partition: i32,
        in_sync: usize,
        required: usize,
    },
    /// This node does not coordinate the consumer group now: in a cluster, the group's
    /// partition of the committed-offsets topic is led elsewhere. Nothing was written.
    #[error("this node does not coordinate group {group:?}")]
    NotCoordinator { group: String },
    /// This node leads the group's partition of the committed-offsets topic but has not read
    /// it up to its term's start yet. Nothing was written.
    #[error("the coordinator of group {group:?} is still loading its offsets")]
    CoordinatorLoading { group: String },
    /// The group's coordinator cannot take the request now (its partition has too few
    /// replicas in sync, say). Nothing was written.
    #[error("the coordinator of group {group:?} is not available: {reason}")]
    CoordinatorNotAvailable { group: String, reason: String },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopic { name: String, reason: String },
    #[error("invalid partition count: {0}")]
    InvalidPartitions(String),
    /// A request the broker's policy refuses, such as one past `kafka.max_partitions`.
    #[error("{0}")]
    PolicyViolation(String),
    #[error("invalid replication factor: {0}")]
    InvalidReplicationFactor(String),
    /// A reassignment's replicas are not acceptable (empty, a node twice, an unknown node, a
    /// partition with one copy).
    #[error("invalid replica assignment: {0}")]
    InvalidReplicaAssignment(String),
    /// A reassignment cancelled or completed where none is in progress.
    #[error("no reassignment in progress: {0}")]
    NoReassignmentInProgress(String),
    #[error("invalid value for config {key:?}: {reason}")]
    InvalidConfig { key: String, reason: String },
    #[error("unknown config {0:?}")]
    UnknownConfig(String),
    #[error(
        "out of order sequence for producer {producer_id}: expected {expected}, got {received}"
    )]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        received: i32,
    },
    #[error("producer {producer_id} epoch {received} is older than the current epoch {current}")]
    InvalidProducerEpoch {
        producer_id: i64,
        current: i16,
        received: i16,
    },
    #[error("batch with producer id {producer_id} mixes in another producer's batches")]
    InvalidProducerBatch { producer_id: i64 },
    #[error("compression codec {0} is not supported")]
    UnsupportedCompression(u8),
    #[error("transactional produce is not supported yet")]
    TransactionsUnsupported,
    #[error("consumer group {group:?}: {reason}")]
    Group { group: String, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Queues, exchanges, bindings, virtual hosts and users. Boxed: its texts are long and
    /// the other variants small.
    #[error(transparent)]
    Messaging(Box<MessagingError>),
    #[error("metadata store: cannot {op}: {reason}")]
    Metadata { op: &'static str, reason: String },
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl BrokerError {
    /// A failure to read, write or act on the definitions: `op` says what was being done.
    pub fn metadata(op: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Metadata {
            op,
            reason: error.to_string(),
        }
    }

    /// What kind of storage failure this is, if it is one: all a front-end needs to pick its
    /// protocol's code, so that none of them matches on the storage crate's errors.
    pub fn storage_class(&self) -> Option<StorageClass> {
        let Self::Storage(error) = self else {
            return None;
        };
        Some(match error {
            StorageError::InvalidBatch { source, .. } => match source {
                BatchError::TooLarge { .. } => StorageClass::TooLarge,
                BatchError::CrcMismatch { .. }
                | BatchError::Truncated { .. }
                | BatchError::LengthTooSmall(_) => StorageClass::Corrupt,
                BatchError::UnsupportedMagic(_) => StorageClass::UnsupportedFormat,
                BatchError::RecordCountMismatch { .. } | BatchError::Empty => StorageClass::Invalid,
            },
            StorageError::OffsetOutOfRange { .. } => StorageClass::OutOfRange,
            StorageError::OwnerGone => StorageClass::Retriable,
            StorageError::Config(_) => StorageClass::InvalidConfig,
            StorageError::Io { .. }
            | StorageError::Corrupt { .. }
            | StorageError::Failed { .. } => StorageClass::Failed,
        })
    }

    /// Whether the error is the broker's own failure (its disk, its metadata store, a failed
    /// queue) rather than something about the request: its details are for the operator.
    pub fn is_internal(&self) -> bool {
        match self {
            Self::Metadata { .. } => true,
            Self::Messaging(error) => matches!(**error, MessagingError::QueueFailed { .. }),
            _ => self.storage_class() == Some(StorageClass::Failed),
        }
    }

    /// The text a client may see: this error's own text, except that the broker's own
    /// failures are named without their cause (file paths and operating-system errors go to
    /// the broker's log, not to clients).
    pub fn client_message(&self) -> String {
        match self {
            Self::Metadata { op, .. } => {
                format!(
                    "the broker's metadata store could not {op}; the broker's log has the details"
                )
            }
            Self::Messaging(error) => match error.as_ref() {
                MessagingError::QueueFailed { vhost, name, .. } => format!(
                    "queue '{name}' in vhost '{vhost}' failed; the broker's log has the details"
                ),
                other => other.to_string(),
            },
            _ if self.is_internal() => {
                "the broker's storage failed; the broker's log has the details".to_owned()
            }
            _ => self.to_string(),
        }
    }
}

/// Kinds of storage failure, as front-ends answer them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageClass {
    /// The partition or queue is closing or moving: the client may retry.
    Retriable,
    /// Data the client sent is damaged (checksum, length).
    Corrupt,
    /// Data the client sent is well-formed but wrong (record counts, an empty batch).
    Invalid,
    /// Data the client sent is in a format the broker does not store (an old batch magic).
    UnsupportedFormat,
    /// Larger than a limit allows.
    TooLarge,
    /// An offset outside the log.
    OutOfRange,
    /// A configuration value the log refuses.
    InvalidConfig,
    /// The broker's own storage failed (an I/O error, damaged files, a log that stopped): not
    /// the client's doing, and it lasts until an operator acts.
    Failed,
}

impl From<MessagingError> for BrokerError {
    fn from(error: MessagingError) -> Self {
        Self::Messaging(Box::new(error))
    }
}

/// What a queue, exchange or binding is, in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResourceKind {
    Queue,
    Exchange,
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Queue => "queue",
            Self::Exchange => "exchange",
        })
    }
}

/// Errors of queues, exchanges, bindings, virtual hosts and users. The texts are the ones
/// RabbitMQ gives for the same misuse, since applications and their operators read them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum MessagingError {
    #[error("no {kind} '{name}' in vhost '{vhost}'")]
    NotFound {
        kind: ResourceKind,
        vhost: String,
        name: String,
    },
    #[error(
        "inequivalent arg '{arg}' for {kind} '{name}' in vhost '{vhost}': received {received} but current is {current}"
    )]
    Inequivalent {
        kind: ResourceKind,
        vhost: String,
        name: String,
        arg: String,
        received: String,
        current: String,
    },
    #[error("invalid arg '{arg}' for {kind} '{name}' in vhost '{vhost}': {reason}")]
    InvalidArgument {
        kind: ResourceKind,
        vhost: String,
        name: String,
        arg: String,
        reason: String,
    },
    #[error(
        "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
    )]
    Locked { vhost: String, name: String },
    #[error("{kind} '{name}' in vhost '{vhost}' in use")]
    InUse {
        kind: ResourceKind,
        vhost: String,
        name: String,
    },
    #[error("queue '{name}' in vhost '{vhost}' not empty")]
    NotEmpty { vhost: String, name: String },
    #[error("queue '{name}' in vhost '{vhost}' in exclusive use")]
    ExclusiveConsume { vhost: String, name: String },
    /// The user may not do this (permissions, reserved names, the default exchange).
    #[error("{0}")]
    AccessRefused(String),
    /// A precondition of the operation does not hold.
    #[error("{0}")]
    PreconditionFailed(String),
    /// A limit set on the virtual host or user is reached (RabbitMQ's texts).
    #[error("{reason}")]
    LimitReached {
        limit: crate::limits::Limit,
        reason: String,
    },
    #[error("unknown exchange type '{0}'")]
    UnknownExchangeType(String),
    #[error("vhost {0} not found")]
    VhostNotFound(String),
    #[error("user '{0}' not found")]
    UserNotFound(String),
    /// A queue cannot read its next message; it keeps it (see `queue::state`).
    #[error(
        "queue '{name}' in vhost '{vhost}' cannot read its message at offset {offset}; the broker's log and alarms have the details"
    )]
    Unreadable {
        vhost: String,
        name: String,
        offset: u64,
    },
    /// The queue lives on another node, which cannot be reached now.
    #[error(
        "home node {node} of durable queue '{name}' in vhost '{vhost}' is down or inaccessible"
    )]
    NodeDown {
        vhost: String,
        name: String,
        node: crate::NodeId,
    },
    /// A queue failed (its log stopped accepting writes) and refuses work.
    #[error("queue '{name}' in vhost '{vhost}' failed: {reason}")]
    QueueFailed {
        vhost: String,
        name: String,
        reason: String,
    },
}
