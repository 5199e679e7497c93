//! Metadata: brokers, topics and partitions, with leaders. Creates missing topics when the
//! client allows it and the broker is configured to.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{MetadataRequest, MetadataResponse};
use sluice_broker::{BrokerError, Topic, names};
use uuid::Uuid;

use super::{node, text, topic_name};
use crate::Context;
use crate::errors::kafka_error;

/// Operations a client may perform, as Kafka's authorized-operations bit field. Sluice has no
/// ACLs yet: everything is allowed. Bits: READ 3, WRITE 4, CREATE 5, DELETE 6, ALTER 7,
/// DESCRIBE 8, DESCRIBE_CONFIGS 10, ALTER_CONFIGS 11.
pub(crate) const TOPIC_OPERATIONS: i32 =
    (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 11);
/// Cluster operations: CREATE 5, ALTER 7, DESCRIBE 8, CLUSTER_ACTION 9, DESCRIBE_CONFIGS 10,
/// ALTER_CONFIGS 11, IDEMPOTENT_WRITE 12.
pub(crate) const CLUSTER_OPERATIONS: i32 =
    (1 << 5) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12);
/// "Not requested" in Kafka's authorized-operations fields.
pub(crate) const OPERATIONS_NOT_REQUESTED: i32 = i32::MIN;

pub(crate) fn broker_entry(ctx: &Context) -> MetadataResponseBroker {
    MetadataResponseBroker::default()
        .with_node_id(node(ctx))
        .with_host(text(ctx.settings.advertised_host.clone()))
        .with_port(i32::from(ctx.settings.advertised_port))
}

fn topic_entry(ctx: &Context, topic: &Topic, include_operations: bool) -> MetadataResponseTopic {
    let leader = node(ctx);
    let partitions = topic
        .partitions
        .iter()
        .map(|partition| {
            MetadataResponsePartition::default()
                .with_partition_index(partition.index() as i32)
                .with_leader_id(leader)
                .with_leader_epoch(0)
                .with_replica_nodes(vec![leader])
                .with_isr_nodes(vec![leader])
        })
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&topic.name)))
        .with_topic_id(topic.id)
        .with_partitions(partitions)
        .with_topic_authorized_operations(if include_operations {
            TOPIC_OPERATIONS
        } else {
            OPERATIONS_NOT_REQUESTED
        })
}

fn error_entry(name: Option<&str>, id: Uuid, code: i16) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(code)
        .with_name(name.map(topic_name))
        .with_topic_id(id)
        .with_topic_authorized_operations(OPERATIONS_NOT_REQUESTED)
}

async fn resolve(ctx: &Context, name: &str, auto_create: bool) -> Result<Arc<Topic>, BrokerError> {
    names::validate_topic_name(name)?;
    match ctx.broker.topic(name) {
        Some(topic) => Ok(topic),
        None if auto_create => ctx.broker.topic_or_create(name).await,
        None => Err(BrokerError::UnknownTopic(name.to_owned())),
    }
}

pub(crate) async fn handle(
    ctx: &Context,
    request: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let include_operations = request.include_topic_authorized_operations;
    // v0: an empty list means every topic; v1+: null means every topic.
    let requested = match request.topics {
        Some(topics) if version == 0 && topics.is_empty() => None,
        other => other,
    };
    let auto_create = version < 4 || request.allow_auto_topic_creation;
    let topics = match requested {
        None => ctx
            .broker
            .topics()
            .iter()
            .map(|topic| topic_entry(ctx, topic, include_operations))
            .collect(),
        Some(wanted) => {
            let mut entries = Vec::with_capacity(wanted.len());
            for want in wanted {
                let entry = match &want.name {
                    Some(name) => match resolve(ctx, name, auto_create).await {
                        Ok(topic) => topic_entry(ctx, &topic, include_operations),
                        Err(error) => {
                            error_entry(Some(name), Uuid::nil(), kafka_error(&error).code)
                        }
                    },
                    None => match ctx.broker.topic_by_id(want.topic_id) {
                        Some(topic) => topic_entry(ctx, &topic, include_operations),
                        None => {
                            error_entry(None, want.topic_id, ResponseError::UnknownTopicId.code())
                        }
                    },
                };
                entries.push(entry);
            }
            entries
        }
    };
    MetadataResponse::default()
        .with_brokers(vec![broker_entry(ctx)])
        .with_cluster_id(Some(text(ctx.broker.cluster_id())))
        .with_controller_id(node(ctx))
        .with_topics(topics)
        .with_cluster_authorized_operations(if request.include_cluster_authorized_operations {
            CLUSTER_OPERATIONS
        } else {
            OPERATIONS_NOT_REQUESTED
        })
}
