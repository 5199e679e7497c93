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
