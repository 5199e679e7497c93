//! The one place broker errors become Kafka error codes.
//!
//! Clients act on these codes: retriable ones (NOT_LEADER_OR_FOLLOWER, a storage error) make
//! them retry, others surface to the application. The mapping follows what a Kafka broker
//! answers in the same situation.

use kafka_protocol::error::ResponseError;
use sluice_broker::BrokerError;
use sluice_broker::group::GroupError;
use sluice_storage::{BatchError, StorageError};

/// A Kafka error code with the message to send where the response has a field for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaError {
    pub code: i16,
    pub message: String,
}

impl KafkaError {
    pub fn new(error: ResponseError, message: impl Into<String>) -> Self {
        Self {
            code: error.code(),
            message: message.into(),
        }
    }
}

/// The Kafka error for a broker error.
pub fn kafka_error(error: &BrokerError) -> KafkaError {
    let code = match error {
        BrokerError::UnknownTopic(_) | BrokerError::UnknownPartition { .. } => {
            ResponseError::UnknownTopicOrPartition
        }
        BrokerError::TopicExists(_) => ResponseError::TopicAlreadyExists,
        BrokerError::InvalidTopic { .. } => ResponseError::InvalidTopicException,
        BrokerError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        BrokerError::InvalidReplicationFactor(_) => ResponseError::InvalidReplicationFactor,
        BrokerError::InvalidConfig { .. } | BrokerError::UnknownConfig(_) => {
            ResponseError::InvalidConfig
        }
        BrokerError::OutOfOrderSequence { .. } => ResponseError::OutOfOrderSequenceNumber,
        BrokerError::InvalidProducerEpoch { .. } => ResponseError::InvalidProducerEpoch,
        BrokerError::InvalidProducerBatch { .. } => ResponseError::InvalidRecord,
        BrokerError::UnsupportedCompression(_) => ResponseError::UnsupportedCompressionType,
        BrokerError::TransactionsUnsupported => ResponseError::UnsupportedForMessageFormat,
        BrokerError::Group { .. } => ResponseError::InvalidGroupId,
        BrokerError::Metadata { .. } | BrokerError::Messaging(_) => {
            ResponseError::UnknownServerError
        }
        // Clients retry this and find the broker again once it is back.
        BrokerError::ShuttingDown => ResponseError::NotLeaderOrFollower,
        BrokerError::Storage(storage) => storage_code(storage),
    };
    KafkaError {
        code: code.code(),
        message: error.to_string(),
    }
}

/// The Kafka error code for a group membership error.
pub fn group_code(error: GroupError) -> i16 {
    let code = match error {
        GroupError::UnknownMemberId => ResponseError::UnknownMemberId,
        GroupError::IllegalGeneration => ResponseError::IllegalGeneration,
        GroupError::RebalanceInProgress => ResponseError::RebalanceInProgress,
        GroupError::MemberIdRequired => ResponseError::MemberIdRequired,
        GroupError::InconsistentGroupProtocol => ResponseError::InconsistentGroupProtocol,
        GroupError::InvalidSessionTimeout => ResponseError::InvalidSessionTimeout,
        GroupError::FencedInstanceId => ResponseError::FencedInstanceId,
        GroupError::GroupMaxSizeReached => ResponseError::GroupMaxSizeReached,
        GroupError::NonEmptyGroup => ResponseError::NonEmptyGroup,
        GroupError::GroupIdNotFound => ResponseError::GroupIdNotFound,
        GroupError::InvalidGroupId => ResponseError::InvalidGroupId,
        GroupError::CoordinatorNotAvailable => ResponseError::CoordinatorNotAvailable,
    };
    code.code()
}

fn storage_code(error: &StorageError) -> ResponseError {
    match error {
        StorageError::InvalidBatch { source, .. } => match source {
            BatchError::TooLarge { .. } => ResponseError::MessageTooLarge,
            BatchError::CrcMismatch { .. }
            | BatchError::Truncated { .. }
            | BatchError::LengthTooSmall(_) => ResponseError::CorruptMessage,
            BatchError::UnsupportedMagic(_) => ResponseError::UnsupportedForMessageFormat,
            BatchError::RecordCountMismatch { .. } | BatchError::Empty => {
                ResponseError::InvalidRecord
            }
        },
        StorageError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        StorageError::OwnerGone => ResponseError::NotLeaderOrFollower,
        StorageError::Config(_) => ResponseError::InvalidConfig,
        StorageError::Io { .. } | StorageError::Corrupt { .. } | StorageError::Failed { .. } => {
            ResponseError::KafkaStorageError
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_kafka() {
        assert_eq!(kafka_error(&BrokerError::UnknownTopic("t".into())).code, 3);
        assert_eq!(
            kafka_error(&BrokerError::Storage(StorageError::InvalidBatch {
                position: 0,
                source: BatchError::CrcMismatch {
                    stored: 1,
                    computed: 2
                }
            }))
            .code,
            2
        );
        assert_eq!(
            kafka_error(&BrokerError::Storage(StorageError::InvalidBatch {
                position: 0,
                source: BatchError::TooLarge {
                    batch_bytes: 2,
                    limit_bytes: 1
                }
            }))
            .code,
            10
        );
        assert_eq!(
            kafka_error(&BrokerError::OutOfOrderSequence {
                producer_id: 1,
                expected: 0,
                received: 3
            })
            .code,
            45
        );
        assert_eq!(
            kafka_error(&BrokerError::Storage(StorageError::OffsetOutOfRange {
                offset: 9,
                log_start_offset: 0,
                log_end_offset: 1
            }))
            .code,
            1
        );
    }
}
