//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions.

use std::collections::{BTreeMap, HashSet};

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{
    BrokerId, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest,
    CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
};
use sluice_broker::{NewTopic, NodeId, topic_config};

use super::{text, topic_name};
use crate::Context;
use crate::errors::{KafkaError, kafka_error};

/// Kafka's config sources.
pub(crate) const SOURCE_TOPIC: i8 = 1;
pub(crate) const SOURCE_DEFAULT: i8 = 5;

/// Manual replica assignments can only name this broker.
/// A manual assignment's node: one replica (partitions have one copy), on a live node.
fn check_assignment(ctx: &Context, brokers: &[BrokerId]) -> Result<NodeId, KafkaError> {
    let live: Vec<NodeId> = ctx
        .broker
        .cluster_nodes()
        .into_iter()
        .filter(|n| n.live)
        .map(|n| n.id)
        .collect();
    match brokers {
        [one] if live.iter().any(|&id| id as i32 == one.0) => Ok(one.0 as NodeId),
        [_] => Err(KafkaError::new(
            ResponseError::InvalidReplicaAssignment,
            format!(
                "broker {} is not a live broker of this cluster ({live:?})",
                brokers[0].0
            ),
        )),
        _ => Err(KafkaError::new(
            ResponseError::InvalidReplicaAssignment,
            format!(
                "replicas {:?}: every partition has one copy, so an assignment names one broker",
                brokers.iter().map(|b| b.0).collect::<Vec<_>>()
            ),
        )),
    }
}

pub(crate) async fn create(
    ctx: &Context,
    request: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut seen = HashSet::new();
    let duplicates: HashSet<String> = request
        .topics
        .iter()
        .filter(|t| !seen.insert(t.name.to_string()))
        .map(|t| t.name.to_string())
        .collect();
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.to_string();
        let result = CreatableTopicResult::default().with_name(topic.name.clone());
        let outcome: Result<_, KafkaError> = async {
            if duplicates.contains(&name) {
                return Err(KafkaError::new(ResponseError::InvalidRequest, format!("topic {name:?} appears more than once in the request")));
            }
            let mut assignments = None;
            let partition_count = if topic.assignments.is_empty() {
                match topic.num_partitions {
                    -1 => None,
                    n if n > 0 => Some(n as u32),
                    n => return Err(KafkaError::new(ResponseError::InvalidPartitions, format!("number of partitions must be positive, not {n}"))),
                }
            } else {
                if topic.num_partitions != -1 || topic.replication_factor != -1 {
                    return Err(KafkaError::new(
                        ResponseError::InvalidRequest,
                        "give either manual assignments or a partition count and replication factor, not both",
                    ));
                }
                let mut chosen = Vec::with_capacity(topic.assignments.len());
                for (position, assignment) in topic.assignments.iter().enumerate() {
                    if assignment.partition_index != position as i32 {
                        return Err(KafkaError::new(ResponseError::InvalidReplicaAssignment, "assignments must cover partitions 0..n in order"));
                    }
                    chosen.push(check_assignment(ctx, &assignment.broker_ids)?);
                }
                assignments = Some(chosen);
                Some(topic.assignments.len() as u32)
            };
            let config: BTreeMap<String, String> = topic
                .configs
                .iter()
                .filter_map(|c| c.value.as_ref().map(|v| (c.name.to_string(), v.to_string())))
                .collect();
            let created = ctx
                .broker
                .create_topic(
                    NewTopic {
                        name: name.clone(),
                        partition_count,
                        replication_factor: (topic.replication_factor != -1).then_some(topic.replication_factor),
                        config: config.clone(),
                        assignments,
                    },
                    request.validate_only,
                )
                .await
                .map_err(|error| kafka_error(&error))?;
            Ok((created, partition_count, config))
        }
        .await;
        let result = match outcome {
            Ok((created, partition_count, config)) => {
                let defaults = ctx.broker.config();
                let configs = topic_config::describe(defaults, &config)
                    .into_iter()
                    .map(|entry| {
                        CreatableTopicConfigs::default()
                            .with_name(text(entry.name))
                            .with_value(Some(text(entry.value)))
                            .with_config_source(if entry.is_default {
                                SOURCE_DEFAULT
                            } else {
                                SOURCE_TOPIC
                            })
                    })
                    .collect();
                let count = created
                    .as_ref()
                    .map(|t| t.partitions.len() as u32)
                    .or(partition_count)
                    .unwrap_or(ctx.broker.config().default_partition_count);
                result
                    .with_topic_id(created.map(|t| t.id).unwrap_or_default())
                    .with_num_partitions(count as i32)
                    .with_replication_factor(1)
                    // Configs are reported from v5 on.
                    .with_configs((version >= 5).then_some(configs))
            }
            Err(error) => result
                .with_error_code(error.code)
                .with_error_message((version >= 1).then(|| text(error.message)))
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        };
        results.push(result);
    }
    CreateTopicsResponse::default().with_topics(results)
}

pub(crate) async fn delete(
    ctx: &Context,
    request: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    // v0-5 name topics; v6 may name them or give their ids.
    let wanted: Vec<(Option<String>, uuid::Uuid)> = if version >= 6 {
        request
            .topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.to_string()), t.topic_id))
            .collect()
    } else {
        request
            .topic_names
            .iter()
            .map(|n| (Some(n.to_string()), uuid::Uuid::nil()))
            .collect()
    };
    let mut responses = Vec::with_capacity(wanted.len());
    for (name, id) in wanted {
        let resolved = match &name {
            Some(name) => Ok((
                name.clone(),
                ctx.broker.topic(name).map(|t| t.id).unwrap_or_default(),
            )),
            None => ctx
                .broker
                .topic_by_id(id)
                .map(|t| (t.name.to_string(), t.id))
                .ok_or_else(|| {
                    KafkaError::new(
                        ResponseError::UnknownTopicId,
                        format!("no topic with id {id}"),
                    )
                }),
        };
        let result = match resolved {
            Ok((name, topic_id)) => {
                let entry = DeletableTopicResult::default()
                    .with_name(Some(topic_name(&name)))
                    .with_topic_id(topic_id);
                match ctx.broker.delete_topic(&name).await {
                    Ok(()) => entry,
                    Err(error) => {
                        let error = kafka_error(&error);
                        entry
                            .with_error_code(error.code)
                            .with_error_message((version >= 5).then(|| text(error.message)))
                    }
                }
            }
            Err(error) => DeletableTopicResult::default()
                .with_topic_id(id)
                .with_error_code(error.code)
                .with_error_message((version >= 5).then(|| text(error.message))),
        };
        responses.push(result);
    }
    DeleteTopicsResponse::default().with_responses(responses)
}

pub(crate) async fn create_partitions(
    ctx: &Context,
    request: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let outcome: Result<(), KafkaError> = async {
            if topic.count <= 0 {
                return Err(KafkaError::new(
                    ResponseError::InvalidPartitions,
                    format!("partition count must be positive, not {}", topic.count),
                ));
            }
            let chosen = match &topic.assignments {
                Some(assignments) => Some(
                    assignments
                        .iter()
                        .map(|a| check_assignment(ctx, &a.broker_ids))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            ctx.broker
                .create_partitions(
                    topic.name.as_str(),
                    topic.count as u32,
                    chosen,
                    request.validate_only,
                )
                .await
                .map_err(|error| kafka_error(&error))
        }
        .await;
        let result = CreatePartitionsTopicResult::default().with_name(topic.name);
        results.push(match outcome {
            Ok(()) => result,
            Err(error) => result
                .with_error_code(error.code)
                .with_error_message(Some(text(error.message))),
        });
    }
    CreatePartitionsResponse::default().with_results(results)
}
