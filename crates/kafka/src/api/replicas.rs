//! Replica administration: ElectLeaders (preferred leader elections), DescribeLogDirs and
//! AlterReplicaLogDirs (each node keeps its partitions in one log directory), and
//! ListPartitionReassignments / AlterPartitionReassignments (no reassignment moves replicas
//! yet: a partition's replicas are those placed at creation).

use kafka_protocol::error::ResponseError;
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
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse,
    AlterReplicaLogDirsRequest, AlterReplicaLogDirsResponse, DescribeLogDirsRequest,
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

/// ListPartitionReassignments: none is ever in progress (replicas stay where they were
/// placed).
pub(crate) fn list_partition_reassignments(
    _ctx: &Context,
    _request: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    ListPartitionReassignmentsResponse::default().with_error_code(0)
}

/// AlterPartitionReassignments: naming a partition's current replicas (in any order)
/// succeeds and changes nothing; moving replicas is not done yet, so any other set is
/// INVALID_REPLICA_ASSIGNMENT, and cancelling (null replicas) NO_REASSIGNMENT_IN_PROGRESS.
pub(crate) fn alter_partition_reassignments(
    ctx: &Context,
    request: AlterPartitionReassignmentsRequest,
) -> AlterPartitionReassignmentsResponse {
    let mut responses = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let found = ctx.broker.topic(topic.name.as_str());
        let partitions = topic
            .partitions
            .iter()
            .map(|p| {
                let view = found.as_ref().and_then(|t| {
                    usize::try_from(p.partition_index)
                        .ok()
                        .and_then(|i| t.partition_view(i))
                });
                let (code, message): (i16, Option<String>) = match (view, &p.replicas) {
                    (None, _) => (ResponseError::UnknownTopicOrPartition.code(), None),
                    (Some(_), None) => (ResponseError::NoReassignmentInProgress.code(), None),
                    (Some(view), Some(asked)) => {
                        let mut current: Vec<i32> =
                            view.replicas.iter().map(|&id| id as i32).collect();
                        let mut asked: Vec<i32> = asked.iter().map(|b| b.0).collect();
                        current.sort_unstable();
                        asked.sort_unstable();
                        if current == asked {
                            (0, None)
                        } else {
                            (
                                ResponseError::InvalidReplicaAssignment.code(),
                                Some(format!(
                                    "replicas stay where they were placed ({current:?}): moving them is not supported yet"
                                )),
                            )
                        }
                    }
                };
                ReassignablePartitionResponse::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(code)
                    .with_error_message(message.map(text))
            })
            .collect();
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
