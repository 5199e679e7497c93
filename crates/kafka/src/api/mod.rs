//! One module per Kafka API (or group of closely related APIs), and the dispatch between them.
//!
//! Each handler takes the decoded request and returns the response body; it talks to the
//! broker through `sluice_broker` only and reports errors through [`crate::errors`].

pub mod api_versions;
mod cluster;
mod configs;
mod fetch;
mod groups;
mod list_offsets;
mod metadata;
mod offsets;
pub(crate) mod produce;
mod producer_ids;
mod replicas;
mod topics;

use std::net::SocketAddr;

use kafka_protocol::messages::{
    ApiKey, BrokerId, RequestHeader, RequestKind, ResponseKind, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::Context;

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct Client {
    pub peer: SocketAddr,
    pub client_id: String,
}

/// The versions served of each API: (min, max). Minimums follow Kafka 4 (Produce 3, Fetch
/// 4); maximums are the newest that the codec's request and response types both know (its
/// `ApiKey::valid_versions` table runs ahead of them for some APIs, so it is not used; a test
/// holds this table to the types). APIs not listed are refused.
const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 13),
    (ApiKey::Fetch, 4, 18),
    (ApiKey::ListOffsets, 1, 10),
    (ApiKey::Metadata, 0, 13),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::FindCoordinator, 0, 6),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 6),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::InitProducerId, 0, 5),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::DescribeCluster, 0, 2),
    (ApiKey::DescribeQuorum, 0, 2),
    (ApiKey::ListConfigResources, 0, 1),
    (ApiKey::DescribeTopicPartitions, 0, 0),
    (ApiKey::ElectLeaders, 0, 2),
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::AlterReplicaLogDirs, 1, 2),
    (ApiKey::ListPartitionReassignments, 0, 0),
    (ApiKey::AlterPartitionReassignments, 0, 1),
];

/// The (min, max) versions served of `api`, or `None` if it is not served.
pub fn supported_versions(api: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(key, _, _)| *key == api)
        .map(|(_, min, max)| (*min, *max))
}

/// Every served API with its version range.
pub fn supported_apis() -> impl Iterator<Item = (ApiKey, i16, i16)> {
    SUPPORTED.iter().copied()
}

pub(crate) fn text(value: impl Into<String>) -> StrBytes {
    StrBytes::from_string(value.into())
}

pub(crate) fn topic_name(value: &str) -> TopicName {
    TopicName(text(value))
}

/// Kafka's leader-epoch fencing of a request naming the client's `current` epoch of a
/// partition (-1: not given): FENCED_LEADER_EPOCH if it is older than the partition's,
/// UNKNOWN_LEADER_EPOCH if it is newer.
pub(crate) fn check_leader_epoch(
    partition: &sluice_broker::Partition,
    current: i32,
) -> Result<(), crate::errors::KafkaError> {
    use kafka_protocol::error::ResponseError;
    if current < 0 {
        return Ok(());
    }
    let epoch = partition.leader_epoch();
    if current < epoch {
        Err(crate::errors::KafkaError::new(
            ResponseError::FencedLeaderEpoch,
            format!("leader epoch {current} is older than the partition's {epoch}"),
        ))
    } else if current > epoch {
        Err(crate::errors::KafkaError::new(
            ResponseError::UnknownLeaderEpoch,
            format!("leader epoch {current} is newer than the partition's {epoch}"),
        ))
    } else {
        Ok(())
    }
}

pub(crate) fn node(ctx: &Context) -> BrokerId {
    BrokerId(ctx.broker.node_id() as i32)
}

/// The controller's leader as clients are told (-1 while there is none).
pub(crate) fn controller(ctx: &Context) -> BrokerId {
    BrokerId(ctx.broker.controller_node().map_or(-1, |id| id as i32))
}

/// Handles one request. `None` means no response is sent (a produce with acks=0).
pub(crate) async fn handle(
    ctx: &Context,
    client: &Client,
    header: RequestHeader,
    request: RequestKind,
) -> Option<ResponseKind> {
    let version = header.request_api_version;
    let response = match request {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions::response(0)),
        RequestKind::Metadata(request) => {
            ResponseKind::Metadata(metadata::handle(ctx, request, version).await)
        }
        RequestKind::Produce(request) => {
            return produce::handle(ctx, request, version)
                .await
                .map(ResponseKind::Produce);
        }
        RequestKind::Fetch(request) => {
            ResponseKind::Fetch(fetch::handle(ctx, request, version).await)
        }
        RequestKind::ListOffsets(request) => {
            ResponseKind::ListOffsets(list_offsets::handle(ctx, request, version))
        }
        RequestKind::OffsetForLeaderEpoch(request) => ResponseKind::OffsetForLeaderEpoch(
            list_offsets::offset_for_leader_epoch(ctx, request).await,
        ),
        RequestKind::DeleteRecords(request) => {
            ResponseKind::DeleteRecords(list_offsets::delete_records(ctx, request).await)
        }
        RequestKind::CreateTopics(request) => {
            ResponseKind::CreateTopics(topics::create(ctx, request, version).await)
        }
        RequestKind::DeleteTopics(request) => {
            ResponseKind::DeleteTopics(topics::delete(ctx, request, version).await)
        }
        RequestKind::CreatePartitions(request) => {
            ResponseKind::CreatePartitions(topics::create_partitions(ctx, request).await)
        }
        RequestKind::DescribeConfigs(request) => {
            ResponseKind::DescribeConfigs(configs::describe(ctx, request, version))
        }
        RequestKind::AlterConfigs(request) => {
            ResponseKind::AlterConfigs(configs::alter(ctx, request).await)
        }
        RequestKind::IncrementalAlterConfigs(request) => {
            ResponseKind::IncrementalAlterConfigs(configs::incremental_alter(ctx, request).await)
        }
        RequestKind::DescribeCluster(request) => {
            ResponseKind::DescribeCluster(cluster::describe(ctx, request))
        }
        RequestKind::DescribeQuorum(request) => {
            ResponseKind::DescribeQuorum(cluster::describe_quorum(ctx, request, version).await)
        }
        RequestKind::DescribeTopicPartitions(request) => {
            ResponseKind::DescribeTopicPartitions(metadata::describe_topic_partitions(ctx, request))
        }
        RequestKind::ListConfigResources(request) => {
            ResponseKind::ListConfigResources(configs::list_resources(ctx, request, version))
        }
        RequestKind::FindCoordinator(request) => {
            ResponseKind::FindCoordinator(cluster::find_coordinator(ctx, request, version).await)
        }
        RequestKind::ElectLeaders(request) => {
            ResponseKind::ElectLeaders(replicas::elect_leaders(ctx, request, version).await)
        }
        RequestKind::DescribeLogDirs(request) => {
            ResponseKind::DescribeLogDirs(replicas::describe_log_dirs(ctx, request))
        }
        RequestKind::AlterReplicaLogDirs(request) => {
            ResponseKind::AlterReplicaLogDirs(replicas::alter_replica_log_dirs(ctx, request))
        }
        RequestKind::ListPartitionReassignments(request) => {
            ResponseKind::ListPartitionReassignments(replicas::list_partition_reassignments(
                ctx, request,
            ))
        }
        RequestKind::AlterPartitionReassignments(request) => {
            ResponseKind::AlterPartitionReassignments(
                replicas::alter_partition_reassignments(ctx, request).await,
            )
        }
        RequestKind::JoinGroup(request) => {
            ResponseKind::JoinGroup(groups::join(ctx, client, request, version).await)
        }
        RequestKind::SyncGroup(request) => {
            ResponseKind::SyncGroup(groups::sync(ctx, request).await)
        }
        RequestKind::Heartbeat(request) => {
            ResponseKind::Heartbeat(groups::heartbeat(ctx, request).await)
        }
        RequestKind::LeaveGroup(request) => {
            ResponseKind::LeaveGroup(groups::leave(ctx, request, version).await)
        }
        RequestKind::ListGroups(request) => {
            ResponseKind::ListGroups(groups::list(ctx, request).await)
        }
        RequestKind::DescribeGroups(request) => {
            ResponseKind::DescribeGroups(groups::describe(ctx, request, version).await)
        }
        RequestKind::DeleteGroups(request) => {
            ResponseKind::DeleteGroups(groups::delete(ctx, request).await)
        }
        RequestKind::OffsetCommit(request) => {
            ResponseKind::OffsetCommit(offsets::commit(ctx, request, version).await)
        }
        RequestKind::OffsetFetch(request) => {
            ResponseKind::OffsetFetch(offsets::fetch(ctx, request, version))
        }
        RequestKind::InitProducerId(request) => {
            ResponseKind::InitProducerId(producer_ids::init(ctx, request).await)
        }
        other => {
            // Only APIs in SUPPORTED decode, and each has an arm above.
            tracing::error!(request = ?std::mem::discriminant(&other), "no handler for a supported API");
            return None;
        }
    };
    Some(response)
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::Message;

    use super::*;

    /// The versions both the request and the response type of `api` can encode and decode.
    fn codec_versions(api: ApiKey) -> Option<(i16, i16)> {
        macro_rules! both {
            ($request:ty, $response:ty) => {
                Some((
                    <$request>::VERSIONS.min.max(<$response>::VERSIONS.min),
                    <$request>::VERSIONS.max.min(<$response>::VERSIONS.max),
                ))
            };
        }
        match api {
            ApiKey::Produce => both!(ProduceRequest, ProduceResponse),
            ApiKey::Fetch => both!(FetchRequest, FetchResponse),
            ApiKey::ListOffsets => both!(ListOffsetsRequest, ListOffsetsResponse),
            ApiKey::Metadata => both!(MetadataRequest, MetadataResponse),
            ApiKey::OffsetCommit => both!(OffsetCommitRequest, OffsetCommitResponse),
            ApiKey::OffsetFetch => both!(OffsetFetchRequest, OffsetFetchResponse),
            ApiKey::FindCoordinator => both!(FindCoordinatorRequest, FindCoordinatorResponse),
            ApiKey::JoinGroup => both!(JoinGroupRequest, JoinGroupResponse),
            ApiKey::Heartbeat => both!(HeartbeatRequest, HeartbeatResponse),
            ApiKey::LeaveGroup => both!(LeaveGroupRequest, LeaveGroupResponse),
            ApiKey::SyncGroup => both!(SyncGroupRequest, SyncGroupResponse),
            ApiKey::DescribeGroups => both!(DescribeGroupsRequest, DescribeGroupsResponse),
            ApiKey::ListGroups => both!(ListGroupsRequest, ListGroupsResponse),
            ApiKey::ApiVersions => both!(ApiVersionsRequest, ApiVersionsResponse),
            ApiKey::CreateTopics => both!(CreateTopicsRequest, CreateTopicsResponse),
            ApiKey::DeleteTopics => both!(DeleteTopicsRequest, DeleteTopicsResponse),
            ApiKey::DeleteRecords => both!(DeleteRecordsRequest, DeleteRecordsResponse),
            ApiKey::InitProducerId => both!(InitProducerIdRequest, InitProducerIdResponse),
            ApiKey::OffsetForLeaderEpoch => {
                both!(OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse)
            }
            ApiKey::DescribeConfigs => both!(DescribeConfigsRequest, DescribeConfigsResponse),
            ApiKey::AlterConfigs => both!(AlterConfigsRequest, AlterConfigsResponse),
            ApiKey::CreatePartitions => both!(CreatePartitionsRequest, CreatePartitionsResponse),
            ApiKey::IncrementalAlterConfigs => {
                both!(
                    IncrementalAlterConfigsRequest,
                    IncrementalAlterConfigsResponse
                )
            }
            ApiKey::DeleteGroups => both!(DeleteGroupsRequest, DeleteGroupsResponse),
            ApiKey::DescribeCluster => both!(DescribeClusterRequest, DescribeClusterResponse),
            ApiKey::DescribeQuorum => both!(DescribeQuorumRequest, DescribeQuorumResponse),
            ApiKey::ListConfigResources => {
                both!(ListConfigResourcesRequest, ListConfigResourcesResponse)
            }
            ApiKey::DescribeTopicPartitions => {
                both!(
                    DescribeTopicPartitionsRequest,
                    DescribeTopicPartitionsResponse
                )
            }
            ApiKey::ElectLeaders => both!(ElectLeadersRequest, ElectLeadersResponse),
            ApiKey::DescribeLogDirs => both!(DescribeLogDirsRequest, DescribeLogDirsResponse),
            ApiKey::AlterReplicaLogDirs => {
                both!(AlterReplicaLogDirsRequest, AlterReplicaLogDirsResponse)
            }
            ApiKey::ListPartitionReassignments => both!(
                ListPartitionReassignmentsRequest,
                ListPartitionReassignmentsResponse
            ),
            ApiKey::AlterPartitionReassignments => both!(
                AlterPartitionReassignmentsRequest,
                AlterPartitionReassignmentsResponse
            ),
            _ => None,
        }
    }

    #[test]
    fn every_advertised_version_is_one_the_codec_knows() {
        for (api, min, max) in supported_apis() {
            let (codec_min, codec_max) =
                codec_versions(api).unwrap_or_else(|| panic!("{api:?} has no codec entry here"));
            assert!(
                codec_min <= min && max <= codec_max,
                "{api:?} advertised {min}..={max}, the codec knows {codec_min}..={codec_max}"
            );
        }
    }
}
