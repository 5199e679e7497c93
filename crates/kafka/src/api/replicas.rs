//! Replica administration: ElectLeaders (preferred leader elections), DescribeLogDirs and
//! AlterReplicaLogDirs (each node keeps its partitions in one log directory), and
//! ListPartitionReassignments / AlterPartitionReassignments (a reassignment is a Raft
//! membership change of the partition's group, which its leader carries out).

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::alter_partition_reassignments_request::ReassignablePartition;
use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::alter_replica_log_dirs_response::{
    AlterReplicaLogDirPartitionResult, AlterReplicaLogDirTopicResult,
};
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse,
    AlterReplicaLogDirsRequest, AlterReplicaLogDirsResponse, BrokerId, DescribeLogDirsRequest,
    DescribeLogDirsResponse, ElectLeadersRequest, ElectLeadersResponse,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse,
};
use sluice_broker::replication::Election;

use super::{text, topic_name};
use crate::Context;
use crate::errors::kafka_error;

/// ElectLeaders' election types.
const PREFERRED: i8 = 0;
const UNCLEAN: i8 = 1;

/// ElectLeaders. A preferred election hands each partition's leadership to its preferred
/// replica (the first of its replicas) when that one has the leader's whole log; a partition
/// already led by it answers ELECTION_NOT_NEEDED. Sluice never elects a leader that might lack
/// committed records: an unclean election answers ELECTION_NOT_NEEDED while the partition has
/// a leader and ELIGIBLE_LEADERS_NOT_AVAILABLE while it has none (Raft elects one as soon as a
/// majority of its replicas answer).
pub(crate) async fn elect_leaders(
    ctx: &Context,
    request: ElectLeadersRequest,
    version: i16,
) -> ElectLeadersResponse {
    // A null list means every partition.
    let wanted: Vec<(String, Vec<i32>)> = match request.topic_partitions {
        Some(topics) => topics
            .into_iter()
            .map(|t| (t.topic.to_string(), t.partitions))
            .collect(),
        None => ctx
            .broker
            .topics()
            .iter()
            .map(|t| {
                (
                    t.name.to_string(),
                    (0..t.partition_count() as i32).collect(),
                )
            })
            .collect(),
    };
    let mut results = Vec::with_capacity(wanted.len());
    for (topic, partitions) in wanted {
        let mut answers = Vec::with_capacity(partitions.len());
        for index in partitions {
            let (code, message) = elect_one(ctx, &topic, index, request.election_type).await;
            answers.push(
                PartitionResult::default()
                    .with_partition_id(index)
                    .with_error_code(code)
                    .with_error_message(message.map(text)),
            );
        }
        results.push(
            ReplicaElectionResult::default()
                .with_topic(topic_name(&topic))
                .with_partition_result(answers),
        );
    }
    let response = ElectLeadersResponse::default().with_replica_election_results(results);
    if version >= 1 {
        response.with_error_code(0)
    } else {
        response
    }
}

async fn elect_one(
    ctx: &Context,
    topic: &str,
    index: i32,
    election_type: i8,
) -> (i16, Option<String>) {
    let Some(found) = ctx.broker.topic(topic) else {
        return (ResponseError::UnknownTopicOrPartition.code(), None);
    };
    let Some(view) = usize::try_from(index)
        .ok()
        .and_then(|i| found.partition_view(i))
    else {
        return (ResponseError::UnknownTopicOrPartition.code(), None);
    };
    match election_type {
        PREFERRED => {}
        UNCLEAN => {
            return if view.leader.is_some() {
                (ResponseError::ElectionNotNeeded.code(), None)
            } else {
                (
                    ResponseError::EligibleLeadersNotAvailable.code(),
                    Some("Sluice never elects a replica that may lack committed records".into()),
                )
            };
        }
        other => {
            return (
                ResponseError::InvalidRequest.code(),
                Some(format!("unknown election type {other}")),
            );
        }
    }
    match ctx.broker.elect_preferred(topic, index as u32).await {
        Ok(Election::Started) => (0, None),
        Ok(Election::NotNeeded) => (ResponseError::ElectionNotNeeded.code(), None),
        Ok(Election::PreferredNotAvailable(why)) => {
            (ResponseError::PreferredLeaderNotAvailable.code(), Some(why))
        }
        Ok(Election::NotLeader(_)) => (ResponseError::PreferredLeaderNotAvailable.code(), None),
        Err(error) => {
            let error = kafka_error(&error);
            (error.code, Some(error.message))
        }
    }
}

/// DescribeLogDirs: this node's one log directory, with the partitions it holds there (their
/// size; offset lag 0: no replica here is a "future" copy being moved).
pub(crate) fn describe_log_dirs(
    ctx: &Context,
    request: DescribeLogDirsRequest,
) -> DescribeLogDirsResponse {
    let wanted = request.topics.map(|topics| {
        topics
            .into_iter()
            .map(|t| (t.topic.to_string(), t.partitions))
            .collect::<Vec<_>>()
    });
    let mut topics = Vec::new();
    for topic in ctx.broker.topics() {
        let asked: Option<&Vec<i32>> = match &wanted {
            None => None,
            Some(wanted) => match wanted.iter().find(|(name, _)| *name == *topic.name) {
                Some((_, partitions)) => Some(partitions),
                None => continue,
            },
        };
        let partitions: Vec<DescribeLogDirsPartition> = topic
            .served()
            .filter(|p| asked.is_none_or(|asked| asked.contains(&(p.index() as i32))))
            .map(|p| {
                DescribeLogDirsPartition::default()
                    .with_partition_index(p.index() as i32)
                    .with_partition_size(p.reader().size_bytes() as i64)
                    .with_offset_lag(0)
                    .with_is_future_key(false)
            })
            .collect();
        if !partitions.is_empty() {
            topics.push(
                DescribeLogDirsTopic::default()
                    .with_name(topic_name(&topic.name))
                    .with_partitions(partitions),
            );
        }
    }
    let dir = ctx.broker.logs_dir();
    let (total, usable) = sluice_broker::alarms::disk_bytes(&dir).unwrap_or((-1, -1));
    let result = DescribeLogDirsResult::default()
        .with_error_code(0)
        .with_log_dir(text(dir.display().to_string()))
        .with_topics(topics)
        .with_total_bytes(total)
        .with_usable_bytes(usable);
    DescribeLogDirsResponse::default()
        .with_error_code(0)
        .with_results(vec![result])
}

/// AlterReplicaLogDirs: a replica can only be where it is (one log directory per node), so a
/// move to this node's directory succeeds at once and any other path is LOG_DIR_NOT_FOUND.
pub(crate) fn alter_replica_log_dirs(
    ctx: &Context,
    request: AlterReplicaLogDirsRequest,
) -> AlterReplicaLogDirsResponse {
    let here = ctx.broker.logs_dir().display().to_string();
    let mut results = Vec::new();
    for dir in request.dirs {
        let found_dir = dir.path.as_str() == here;
        for topic in dir.topics {
            let found = ctx.broker.topic(topic.name.as_str());
            let partitions = topic
                .partitions
                .iter()
                .map(|&index| {
                    let held = found.as_ref().is_some_and(|t| {
                        usize::try_from(index)
                            .ok()
                            .and_then(|i| t.partitions.get(i))
                            .is_some_and(Option::is_some)
                    });
                    let code = if !held {
                        ResponseError::ReplicaNotAvailable.code()
                    } else if !found_dir {
                        ResponseError::LogDirNotFound.code()
                    } else {
                        0
                    };
                    AlterReplicaLogDirPartitionResult::default()
                        .with_partition_index(index)
                        .with_error_code(code)
                })
                .collect();
            results.push(
                AlterReplicaLogDirTopicResult::default()
                    .with_topic_name(topic.name.clone())
                    .with_partitions(partitions),
            );
        }
    }
    AlterReplicaLogDirsResponse::default().with_results(results)
}

/// ListPartitionReassignments: the partitions a reassignment is moving (of the topics and
/// partitions asked, or all), each with its replicas (the target's, then those it removes), the
/// ones it adds and the ones it removes. Partitions not being moved, and unknown ones, are
/// left out, as Kafka does.
pub(crate) fn list_partition_reassignments(
    ctx: &Context,
    request: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    let asked: Vec<(std::sync::Arc<sluice_broker::Topic>, Option<Vec<i32>>)> = match request.topics
    {
        Some(topics) => topics
            .into_iter()
            .filter_map(|t| {
                ctx.broker
                    .topic(t.name.as_str())
                    .map(|topic| (topic, Some(t.partition_indexes)))
            })
            .collect(),
        None => ctx
            .broker
            .topics()
            .into_iter()
            .map(|topic| (topic, None))
            .collect(),
    };
    let ids = |nodes: &[sluice_broker::NodeId]| -> Vec<BrokerId> {
        nodes.iter().map(|&node| BrokerId(node as i32)).collect()
    };
    let mut topics = Vec::new();
    for (topic, indexes) in asked {
        let partitions: Vec<OngoingPartitionReassignment> = topic
            .reassigning
            .iter()
            .enumerate()
            .filter(|(index, _)| {
                indexes
                    .as_ref()
                    .is_none_or(|wanted| wanted.contains(&(*index as i32)))
            })
            .filter_map(|(index, moving)| {
                let (adding, removing) = moving.as_ref()?;
                Some(
                    OngoingPartitionReassignment::default()
                        .with_partition_index(index as i32)
                        .with_replicas(ids(topic.replicas.get(index)?))
                        .with_adding_replicas(ids(adding))
                        .with_removing_replicas(ids(removing)),
                )
            })
            .collect();
        if !partitions.is_empty() {
            topics.push(
                OngoingTopicReassignment::default()
                    .with_name(topic_name(&topic.name))
                    .with_partitions(partitions),
            );
        }
    }
    ListPartitionReassignmentsResponse::default()
        .with_error_code(0)
        .with_topics(topics)
}

/// AlterPartitionReassignments: each partition named with replicas is moved to them (a Raft
/// membership change of its group: the new replicas join as learners, catch up from the log,
/// and become voters through joint consensus; the removed ones leave); null replicas cancel a
/// reassignment in progress. Answered once each reassignment is committed; progress shows in
/// ListPartitionReassignments. A partition with one copy (no Raft group) stays where it is:
/// naming its node succeeds and changes nothing, any other is INVALID_REPLICA_ASSIGNMENT.
pub(crate) async fn alter_partition_reassignments(
    ctx: &Context,
    request: AlterPartitionReassignmentsRequest,
) -> AlterPartitionReassignmentsResponse {
    let mut responses = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for p in &topic.partitions {
            let (code, message) = reassign_one(ctx, topic.name.as_str(), p).await;
            partitions.push(
                ReassignablePartitionResponse::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(code)
                    .with_error_message(message.map(text)),
            );
        }
        responses.push(
            ReassignableTopicResponse::default()
                .with_name(topic.name.clone())
                .with_partitions(partitions),
        );
    }
    AlterPartitionReassignmentsResponse::default()
        .with_error_code(0)
        .with_responses(responses)
}

async fn reassign_one(
    ctx: &Context,
    topic: &str,
    partition: &ReassignablePartition,
) -> (i16, Option<String>) {
    let Ok(index) = u32::try_from(partition.partition_index) else {
        return (ResponseError::UnknownTopicOrPartition.code(), None);
    };
    let target = match &partition.replicas {
        None => None,
        Some(replicas) => {
            let mut nodes = Vec::with_capacity(replicas.len());
            for replica in replicas {
                match u32::try_from(replica.0) {
                    Ok(node) => nodes.push(node),
                    Err(_) => {
                        return (
                            ResponseError::InvalidReplicaAssignment.code(),
                            Some(format!("{} is not a broker id", replica.0)),
                        );
                    }
                }
            }
            Some(nodes)
        }
    };
    match ctx.broker.reassign_partition(topic, index, target).await {
        Ok(()) => (0, None),
        Err(error) => {
            let error = kafka_error(&error);
            (error.code, Some(error.message))
        }
    }
}
