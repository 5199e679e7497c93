//! Committed offsets: OffsetCommit and OffsetFetch.
//!
//! A commit is checked against group membership first (generation, member id, rebalance
//! state); then every valid partition of the request is stored in one transaction.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, TopicName,
};
use sluice_broker::{BrokerError, CommittedOffset, OffsetEntry};

use super::cluster::check_coordinator;
use super::{text, topic_name};
use crate::Context;
use crate::errors::{group_code, kafka_error};

/// Kafka's default for offset.metadata.max.bytes.
const METADATA_MAX_BYTES: usize = 4096;

pub(crate) async fn commit(
    ctx: &Context,
    request: OffsetCommitRequest,
    version: i16,
) -> OffsetCommitResponse {
    let group = request.group_id.to_string();
    let membership = if group.is_empty() {
        Err(ResponseError::InvalidGroupId.code())
    } else if let Err(code) = check_coordinator(ctx, &group) {
        Err(code)
    } else {
        ctx.broker
            .groups()
            .check_commit(
                &group,
                request.member_id.as_str(),
                request.group_instance_id.as_ref().map(|i| i.as_str()),
                request.generation_id_or_member_epoch,
            )
            .await
            .map_err(group_code)
    };
    let now_ms = ctx.broker.clock().now_ms();
    // (topic position, partition index, code), and the entries to store.
    let mut codes: Vec<(usize, i32, i16)> = Vec::new();
    let mut entries: Vec<OffsetEntry> = Vec::new();
    let mut names: Vec<TopicName> = Vec::with_capacity(request.topics.len());
    for (position, topic) in request.topics.iter().enumerate() {
        let resolved = if version >= 10 {
            ctx.broker.topic_by_id(topic.topic_id)
        } else {
            ctx.broker.topic(topic.name.as_str())
        };
        names.push(
            resolved
                .as_ref()
                .map_or_else(|| topic.name.clone(), |t| topic_name(&t.name)),
        );
        for partition in &topic.partitions {
            let code = match (&membership, &resolved) {
                (Err(code), _) => *code,
                (Ok(()), None) if version >= 10 => ResponseError::UnknownTopicId.code(),
                (Ok(()), None) => ResponseError::UnknownTopicOrPartition.code(),
                (Ok(()), Some(found))
                    if partition.partition_index < 0
                        || partition.partition_index as usize >= found.partitions.len() =>
                {
                    ResponseError::UnknownTopicOrPartition.code()
                }
                (Ok(()), Some(_))
                    if partition
                        .committed_metadata
                        .as_ref()
                        .is_some_and(|m| m.len() > METADATA_MAX_BYTES) =>
                {
                    ResponseError::OffsetMetadataTooLarge.code()
                }
                (Ok(()), Some(found)) => {
                    entries.push(OffsetEntry {
                        topic: found.name.to_string(),
                        partition: partition.partition_index as u32,
                        committed: CommittedOffset {
                            offset: partition.committed_offset,
                            leader_epoch: partition.committed_leader_epoch,
                            metadata: partition
                                .committed_metadata
                                .as_ref()
                                .map(|m| m.to_string())
                                .unwrap_or_default(),
                            commit_timestamp_ms: now_ms,
                        },
                    });
                    0
                }
            };
            codes.push((position, partition.partition_index, code));
        }
    }
    let stored = if entries.is_empty() {
        Ok(())
    } else {
        ctx.broker.commit_offsets(&group, entries).await
    };
    let mut topics: Vec<OffsetCommitResponseTopic> = request
        .topics
        .iter()
        .zip(names)
        .map(|(topic, name)| {
            OffsetCommitResponseTopic::default()
                .with_name(name)
                .with_topic_id(topic.topic_id)
        })
        .collect();
    for (position, index, code) in codes {
        let code = match (&stored, code) {
            (Err(error), 0) => kafka_error(error).code,
            _ => code,
        };
        topics[position].partitions.push(
            OffsetCommitResponsePartition::default()
                .with_partition_index(index)
                .with_error_code(code),
        );
    }
    OffsetCommitResponse::default().with_topics(topics)
}

/// (offset, leader epoch, metadata) committed for one partition; -1 if none.
fn committed(
    ctx: &Context,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<(i64, i32, String), BrokerError> {
    if partition < 0 {
        return Ok((-1, -1, String::new()));
    }
    Ok(
        match ctx
            .broker
            .committed_offset(group, topic, partition as u32)?
        {
            Some(found) => (found.offset, found.leader_epoch, found.metadata),
            None => (-1, -1, String::new()),
        },
    )
}

/// Every (topic, partitions) a group fetch covers: the request's, or all with commits.
fn requested(
    ctx: &Context,
    group: &str,
    wanted: Option<Vec<(String, Vec<i32>)>>,
) -> Result<Vec<(String, Vec<i32>)>, BrokerError> {
    if let Some(wanted) = wanted {
        return Ok(wanted);
    }
    let mut all: Vec<(String, Vec<i32>)> = Vec::new();
    for entry in ctx.broker.committed_offsets(group)? {
        match all.iter_mut().find(|(topic, _)| *topic == entry.topic) {
            Some((_, partitions)) => partitions.push(entry.partition as i32),
            None => all.push((entry.topic, vec![entry.partition as i32])),
        }
    }
    Ok(all)
}

pub(crate) fn fetch(
    ctx: &Context,
    request: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    if version >= 8 {
        let groups = request
            .groups
            .into_iter()
            .map(|group| {
                let wanted = group.topics.map(|topics| {
                    topics
                        .into_iter()
                        .map(|t| (t.name.to_string(), t.partition_indexes))
                        .collect()
                });
                let entry =
                    OffsetFetchResponseGroup::default().with_group_id(group.group_id.clone());
                match fetch_group(ctx, group.group_id.as_str(), wanted) {
                    Ok(topics) => entry.with_topics(
                        topics
                            .into_iter()
                            .map(|(topic, partitions)| {
                                let id = ctx.broker.topic(&topic).map(|t| t.id).unwrap_or_default();
                                OffsetFetchResponseTopics::default()
                                    .with_name(topic_name(&topic))
                                    .with_topic_id(id)
                                    .with_partitions(
                                        partitions
                                            .into_iter()
                                            .map(|(index, (offset, epoch, metadata), code)| {
                                                OffsetFetchResponsePartitions::default()
                                                    .with_partition_index(index)
                                                    .with_committed_offset(offset)
                                                    .with_committed_leader_epoch(epoch)
                                                    .with_metadata(Some(text(metadata)))
                                                    .with_error_code(code)
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    ),
                    Err(code) => entry.with_error_code(code),
                }
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let wanted = request.topics.map(|topics| {
        topics
            .into_iter()
            .map(|t| (t.name.to_string(), t.partition_indexes))
            .collect()
    });
    match fetch_group(ctx, request.group_id.as_str(), wanted) {
        Ok(topics) => OffsetFetchResponse::default().with_topics(
            topics
                .into_iter()
                .map(|(topic, partitions)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(topic_name(&topic))
                        .with_partitions(
                            partitions
                                .into_iter()
                                .map(|(index, (offset, epoch, metadata), code)| {
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(index)
                                        .with_committed_offset(offset)
                                        .with_committed_leader_epoch(epoch)
                                        .with_metadata(Some(text(metadata)))
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect(),
        ),
        Err(code) if version >= 2 => OffsetFetchResponse::default().with_error_code(code),
        Err(_) => OffsetFetchResponse::default(),
    }
}

type FetchedTopic = (String, Vec<(i32, (i64, i32, String), i16)>);

fn fetch_group(
    ctx: &Context,
    group: &str,
    wanted: Option<Vec<(String, Vec<i32>)>>,
) -> Result<Vec<FetchedTopic>, i16> {
    if group.is_empty() {
        return Err(ResponseError::InvalidGroupId.code());
    }
    check_coordinator(ctx, group)?;
    let topics = requested(ctx, group, wanted).map_err(|e| kafka_error(&e).code)?;
    Ok(topics
        .into_iter()
        .map(|(topic, partitions)| {
            let partitions = partitions
                .into_iter()
                .map(|index| match committed(ctx, group, &topic, index) {
                    Ok(found) => (index, found, 0),
                    Err(error) => (index, (-1, -1, String::new()), kafka_error(&error).code),
                })
                .collect();
            (topic, partitions)
        })
        .collect())
}
