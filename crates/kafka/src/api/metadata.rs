//! Metadata: brokers, topics and partitions, with leaders. Creates missing topics when the
//! client allows it and the broker is configured to. Also DescribeTopicPartitions (KIP-966):
//! the same partitions, paged by a cursor, never creating anything.

use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, MetadataRequest,
    MetadataResponse,
};
use sluice_broker::{BrokerError, Topic, names};
use uuid::Uuid;

use super::{controller, node, text, topic_name};
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

/// A live broker of the cluster as clients reach it: this one as its listener advertises
/// itself, the others as they registered.
pub(crate) struct Reachable {
    pub id: i32,
    pub host: String,
    pub port: i32,
}

/// The cluster's live brokers, this one first.
pub(crate) fn live_brokers(ctx: &Context) -> Vec<Reachable> {
    let me = node(ctx).0;
    let mut brokers = vec![Reachable {
        id: me,
        host: ctx.settings.advertised_host.clone(),
        port: i32::from(ctx.settings.advertised_port),
    }];
    for other in ctx.broker.cluster_nodes() {
        if other.id as i32 == me || !other.live {
            continue;
        }
        let Some((host, port)) = other.kafka_endpoint() else {
            continue;
        };
        brokers.push(Reachable {
            id: other.id as i32,
            host: host.to_owned(),
            port: i32::from(port),
        });
    }
    brokers
}

fn broker_entries(brokers: &[Reachable]) -> Vec<MetadataResponseBroker> {
    brokers
        .iter()
        .map(|b| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(b.id))
                .with_host(text(b.host.clone()))
                .with_port(b.port)
        })
        .collect()
}

/// Partition `index` as clients are told: its leader while that node is live, else an error
/// (LEADER_NOT_AVAILABLE until it returns); its leader epoch; its replicas, and those in
/// sync (the live ones).
struct Described {
    leader: Result<i32, i16>,
    epoch: i32,
    replicas: Vec<BrokerId>,
    isr: Vec<BrokerId>,
}

fn describe(topic: &Topic, index: usize, live: &[Reachable]) -> Described {
    let is_live = |id: sluice_broker::NodeId| live.iter().any(|b| b.id == id as i32);
    let Some(view) = topic.partition_view(index) else {
        return Described {
            leader: Err(ResponseError::LeaderNotAvailable.code()),
            epoch: 0,
            replicas: Vec::new(),
            isr: Vec::new(),
        };
    };
    let leader = match view.leader {
        Some(leader) if is_live(leader) => Ok(leader as i32),
        _ => Err(ResponseError::LeaderNotAvailable.code()),
    };
    // The leader's own view where this node leads; elsewhere the replicas that answer.
    let in_sync = |id: &sluice_broker::NodeId| match &view.in_sync {
        Some(in_sync) => in_sync.contains(id),
        None => is_live(*id),
    };
    Described {
        leader,
        epoch: view.epoch,
        isr: view
            .replicas
            .iter()
            .filter(|id| in_sync(id))
            .map(|&id| BrokerId(id as i32))
            .collect(),
        replicas: view
            .replicas
            .iter()
            .map(|&id| BrokerId(id as i32))
            .collect(),
    }
}

fn topic_entry(
    ctx: &Context,
    topic: &Topic,
    include_operations: bool,
    live: &[Reachable],
) -> MetadataResponseTopic {
    let internal = ctx.broker.is_internal_topic(&topic.name);
    let partitions = (0..topic.partition_count())
        .map(|index| {
            let entry = MetadataResponsePartition::default().with_partition_index(index as i32);
            let described = describe(topic, index, live);
            let entry = entry
                .with_leader_epoch(described.epoch)
                .with_replica_nodes(described.replicas);
            match described.leader {
                Ok(leader) => entry
                    .with_leader_id(BrokerId(leader))
                    .with_isr_nodes(described.isr),
                Err(code) => entry
                    .with_error_code(code)
                    .with_leader_id(BrokerId(-1))
                    .with_isr_nodes(Vec::new()),
            }
        })
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&topic.name)))
        .with_topic_id(topic.id)
        .with_is_internal(internal)
        .with_partitions(partitions)
        .with_topic_authorized_operations(if include_operations {
            TOPIC_OPERATIONS
        } else {
            OPERATIONS_NOT_REQUESTED
        })
}

/// A topic that could not be described. Kafka fills in the authorized operations of every
/// topic entry a client asked them for, errors included (clients parse the field).
fn error_entry(
    name: Option<&str>,
    id: Uuid,
    code: i16,
    include_operations: bool,
) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(code)
        .with_name(name.map(topic_name))
        .with_topic_id(id)
        .with_topic_authorized_operations(if include_operations {
            TOPIC_OPERATIONS
        } else {
            OPERATIONS_NOT_REQUESTED
        })
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
    let live = live_brokers(ctx);
    let topics = match requested {
        None => ctx
            .broker
            .topics()
            .iter()
            .map(|topic| topic_entry(ctx, topic, include_operations, &live))
            .collect(),
        Some(wanted) => {
            let mut entries = Vec::with_capacity(wanted.len());
            for want in wanted {
                let entry = match &want.name {
                    Some(name) => match resolve(ctx, name, auto_create).await {
                        Ok(topic) => topic_entry(ctx, &topic, include_operations, &live),
                        Err(error) => error_entry(
                            Some(name),
                            Uuid::nil(),
                            kafka_error(&error).code,
                            include_operations,
                        ),
                    },
                    None => match ctx.broker.topic_by_id(want.topic_id) {
                        Some(topic) => topic_entry(ctx, &topic, include_operations, &live),
                        None => error_entry(
                            None,
                            want.topic_id,
                            ResponseError::UnknownTopicId.code(),
                            include_operations,
                        ),
                    },
                };
                entries.push(entry);
            }
            entries
        }
    };
    MetadataResponse::default()
        .with_brokers(broker_entries(&live))
        .with_cluster_id(Some(text(ctx.broker.cluster_id())))
        .with_controller_id(controller(ctx))
        .with_topics(topics)
        .with_cluster_authorized_operations(if request.include_cluster_authorized_operations {
            CLUSTER_OPERATIONS
        } else {
            OPERATIONS_NOT_REQUESTED
        })
}

/// Most partitions one DescribeTopicPartitions response holds, whatever the client asks
/// (Kafka's `max.request.partition.size.limit`).
const PARTITIONS_PER_PAGE_MAX: usize = 2_000;

/// DescribeTopicPartitions: the requested topics (every topic if none is named), in name
/// order, with their partitions from the cursor on, at most `response_partition_limit` of them;
/// `next_cursor` says where the next page starts.
pub(crate) fn describe_topic_partitions(
    ctx: &Context,
    request: DescribeTopicPartitionsRequest,
) -> DescribeTopicPartitionsResponse {
    let all = request.topics.is_empty();
    let cursor_topic = request
        .cursor
        .as_ref()
        .map_or("", |cursor| cursor.topic_name.as_str());
    let mut names: Vec<String> = if all {
        ctx.broker
            .topics()
            .iter()
            .map(|topic| topic.name.to_string())
            .collect()
    } else {
        request.topics.iter().map(|t| t.name.to_string()).collect()
    };
    names.retain(|name| name.as_str() >= cursor_topic);
    names.sort();
    names.dedup();
    let invalid_cursor = request.cursor.as_ref().is_some_and(|cursor| {
        cursor.partition_index < 0 || (!all && !names.iter().any(|n| n == cursor_topic))
    });
    if invalid_cursor {
        // Kafka refuses the request: the cursor must name a requested topic and a partition.
        let topics = request
            .topics
            .iter()
            .map(|topic| {
                DescribeTopicPartitionsResponseTopic::default()
                    .with_error_code(ResponseError::InvalidRequest.code())
                    .with_name(Some(topic.name.clone()))
            })
            .collect();
        return DescribeTopicPartitionsResponse::default().with_topics(topics);
    }
    let mut room = usize::try_from(request.response_partition_limit)
        .unwrap_or(0)
        .clamp(1, PARTITIONS_PER_PAGE_MAX);
    let live = live_brokers(ctx);
    let mut topics = Vec::new();
    let mut next_cursor = None;
    for (position, name) in names.iter().enumerate() {
        if room == 0 {
            next_cursor = Some(
                Cursor::default()
                    .with_topic_name(topic_name(name))
                    .with_partition_index(0),
            );
            break;
        }
        let Some(topic) = ctx.broker.topic(name) else {
            if !all {
                topics.push(
                    DescribeTopicPartitionsResponseTopic::default()
                        .with_error_code(ResponseError::UnknownTopicOrPartition.code())
                        .with_name(Some(topic_name(name)))
                        .with_topic_authorized_operations(TOPIC_OPERATIONS),
                );
            }
            continue;
        };
        let first = match &request.cursor {
            Some(cursor) if position == 0 && cursor.topic_name.as_str() == name => {
                cursor.partition_index as usize
            }
            _ => 0,
        };
        let count = topic.partition_count().saturating_sub(first);
        let taken = count.min(room);
        room -= taken;
        let partitions = (first..first + taken)
            .map(|index| {
                let described = describe(&topic, index, &live);
                let entry = DescribeTopicPartitionsResponsePartition::default()
                    .with_partition_index(index as i32)
                    .with_leader_epoch(described.epoch)
                    .with_eligible_leader_replicas(Some(Vec::new()))
                    .with_last_known_elr(Some(Vec::new()))
                    .with_replica_nodes(described.replicas);
                match described.leader {
                    Ok(leader) => entry
                        .with_leader_id(BrokerId(leader))
                        .with_isr_nodes(described.isr),
                    Err(code) => entry.with_error_code(code).with_leader_id(BrokerId(-1)),
                }
            })
            .collect();
        topics.push(
            DescribeTopicPartitionsResponseTopic::default()
                .with_name(Some(topic_name(name)))
                .with_topic_id(topic.id)
                .with_partitions(partitions)
                .with_topic_authorized_operations(TOPIC_OPERATIONS),
        );
        if taken < count {
            next_cursor = Some(
                Cursor::default()
                    .with_topic_name(topic_name(name))
                    .with_partition_index((first + taken) as i32),
            );
            break;
        }
    }
    DescribeTopicPartitionsResponse::default()
        .with_topics(topics)
        .with_next_cursor(next_cursor)
}
