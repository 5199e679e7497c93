//! The broker's one error type. Front-ends turn each variant into their protocol's own error
//! (a Kafka error code, an AMQP exception) in one place each; this type never names them.

use sluice_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("partition {partition} of topic {topic:?} does not exist")]
    UnknownPartition { topic: String, partition: i32 },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopic { name: String, reason: String },
    #[error("invalid partition count: {0}")]
    InvalidPartitions(String),
    #[error("invalid replication factor: {0}")]
    InvalidReplicationFactor(String),
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
    pub(crate) fn metadata(op: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Metadata {
            op,
            reason: error.to_string(),
        }
    }
}

impl From<MessagingError> for BrokerError {
    fn from(error: MessagingError) -> Self {
        Self::Messaging(Box::new(error))
    }
}

/// What a queue, exchange or binding is, in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    #[error("unknown exchange type '{0}'")]
    UnknownExchangeType(String),
    #[error("vhost {0} not found")]
    VhostNotFound(String),
    #[error("user '{0}' not found")]
    UserNotFound(String),
    /// A queue failed (its log stopped accepting writes) and refuses work.
    #[error("queue '{name}' in vhost '{vhost}' failed: {reason}")]
    QueueFailed {
        vhost: String,
        name: String,
        reason: String,
    },
}
