//! The one place broker errors become Kafka error codes.
//!
//! Clients act on these codes: retriable ones (NOT_LEADER_OR_FOLLOWER, a storage error) make
//! them retry, others surface to the application. The mapping follows what a Kafka broker
//! answers in the same situation. Storage failures are mapped by the broker's classification
//! ([`StorageClass`]), never by the storage crate's errors. Messages carry a short reason:
//! the broker's own failures reach the client without their cause (no file path, no
//! operating-system error), which goes to the broker's log instead.

use kafka_protocol::error::ResponseError;
use sluice_broker::group::GroupError;
use sluice_broker::{BrokerError, StorageClass};

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
        // The client asks for metadata again and finds the partition's node (or, while that
        // node is down, LEADER_NOT_AVAILABLE).
        BrokerError::NotLeader { .. } => ResponseError::NotLeaderOrFollower,
        // Nothing was written; the client retries (a new leader is ready within moments).
        BrokerError::LeaderNotReady { .. } => ResponseError::NotLeaderOrFollower,
        // The write may still commit: a "maybe persisted" code, so an idempotent producer
        // retries with the same sequence and the retry is deduplicated.
        BrokerError::WriteIndeterminate(_) => ResponseError::RequestTimedOut,
        BrokerError::NotEnoughReplicas { .. } => ResponseError::NotEnoughReplicas,
        BrokerError::NotCoordinator { .. } => ResponseError::NotCoordinator,
        BrokerError::CoordinatorLoading { .. } => ResponseError::CoordinatorLoadInProgress,
        BrokerError::CoordinatorNotAvailable { .. } => ResponseError::CoordinatorNotAvailable,
        BrokerError::TopicExists(_) => ResponseError::TopicAlreadyExists,
        BrokerError::InvalidTopic { .. } => ResponseError::InvalidTopicException,
        BrokerError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        BrokerError::PolicyViolation(_) => ResponseError::PolicyViolation,
        BrokerError::InvalidReplicationFactor(_) => ResponseError::InvalidReplicationFactor,
        BrokerError::InvalidReplicaAssignment(_) => ResponseError::InvalidReplicaAssignment,
        BrokerError::NoReassignmentInProgress(_) => ResponseError::NoReassignmentInProgress,
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
        BrokerError::Storage(_) => match error.storage_class() {
            Some(class) => storage_code(class),
            None => ResponseError::KafkaStorageError,
        },
    };
    if error.is_internal() {
        tracing::warn!(%error, code = code.code(), "a Kafka request failed on the broker's side");
    }
    KafkaError {
        code: code.code(),
        message: error.client_message(),
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
        GroupError::NotCoordinator => ResponseError::NotCoordinator,
    };
    code.code()
}

fn storage_code(class: StorageClass) -> ResponseError {
    match class {
        StorageClass::TooLarge => ResponseError::MessageTooLarge,
        StorageClass::Corrupt => ResponseError::CorruptMessage,
        StorageClass::UnsupportedFormat => ResponseError::UnsupportedForMessageFormat,
        StorageClass::Invalid => ResponseError::InvalidRecord,
        StorageClass::OutOfRange => ResponseError::OffsetOutOfRange,
        StorageClass::Retriable => ResponseError::NotLeaderOrFollower,
        StorageClass::InvalidConfig => ResponseError::InvalidConfig,
        StorageClass::Failed => ResponseError::KafkaStorageError,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use sluice_broker::MessagingError;
    use sluice_storage::{BatchError, StorageError};

    use super::*;

    #[test]
    fn the_brokers_own_failures_reach_clients_without_paths_or_os_errors() {
        let secret = "/srv/sluice-data/logs/orders-0";
        let failures = [
            BrokerError::Storage(StorageError::Io {
                op: "read",
                path: PathBuf::from(secret).join("00000000000000000000.log"),
                source: std::io::Error::other("Input/output error (os error 5)"),
            }),
            BrokerError::Storage(StorageError::Corrupt {
                path: PathBuf::from(secret).join("00000000000000000000.log"),
                position: 4096,
                reason: "CRC mismatch".into(),
            }),
            BrokerError::Storage(StorageError::Failed {
                dir: PathBuf::from(secret),
                reason: "cannot sync: No space left on device (os error 28)".into(),
            }),
            BrokerError::Metadata {
                op: "commit",
                reason: format!("{secret}/meta.redb: Input/output error (os error 5)"),
            },
            MessagingError::QueueFailed {
                vhost: "/".into(),
                name: "q".into(),
                reason: format!("cannot write {secret}/q.log: os error 5"),
            }
            .into(),
        ];
        for failure in &failures {
            let answered = kafka_error(failure);
            assert!(!answered.message.contains(secret), "{}", answered.message);
            assert!(
                !answered.message.contains("os error"),
                "{}",
                answered.message
            );
            assert!(!answered.message.is_empty());
        }
        assert_eq!(kafka_error(&failures[0]).code, 56); // KAFKA_STORAGE_ERROR
    }

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
