//! Topic requests: checked against the definitions, turned into commands that carry every
//! decided value (the topic's id, its creation time, its partitions' records), committed.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use super::effects::commit;
use crate::command::{MetadataCommand, NodeId, PartitionRecord, TopicRecord};
use crate::error::BrokerError;
use crate::limits::Limit;
use crate::{NewTopic, Shared, Topic, names, topic_config};

/// Records for partitions `from..to` of the topic incarnation `topic_id`, each on the node
/// `chosen` names (the client's assignments, one per new partition), or else on the node the
/// cluster places it on (this node when the broker has no cluster).
fn partition_records(
    shared: &Shared,
    topic_id: Uuid,
    from: u32,
    to: u32,
    chosen: Option<&[NodeId]>,
) -> Vec<PartitionRecord> {
    let placed = match chosen {
        Some(chosen) => Some(chosen.to_vec()),
        None => shared
            .cluster
            .get()
            .map(|link| link.place_partitions(topic_id, from, to)),
    }
    .filter(|placed| placed.len() == (to - from) as usize);
    (from..to)
        .map(|index| {
            let node = placed.as_ref().map_or(shared.config.node_id, |placed| {
                placed[(index - from) as usize]
            });
            PartitionRecord {
                index,
                leader: node,
                replicas: vec![node],
                leader_epoch: 0,
            }
        })
        .collect()
}

/// Refuses a topic growing from `current` to `total` partitions past `kafka.max_partitions_per_topic`
/// (INVALID_PARTITIONS, as Kafka answers a count it cannot take) or the node past
/// `kafka.max_partitions` (POLICY_VIOLATION), counting the refusal.
fn check_partition_limits(shared: &Shared, total: u32, current: u32) -> Result<(), BrokerError> {
    let per_topic = shared.config.max_partitions_per_topic;
    if total > per_topic {
        shared.refusals.count(Limit::PartitionsPerTopic);
        return Err(BrokerError::InvalidPartitions(format!(
            "a topic may have at most {per_topic} partitions (kafka.max_partitions_per_topic), not {total}"
        )));
    }
    let existing: u64 = shared
        .metadata
        .state()
        .topics
        .values()
        .map(|t| t.partitions.len() as u64)
        .sum();
    let after = existing + u64::from(total - current);
    let max = shared.config.max_partitions;
    if after > u64::from(max) {
        shared.refusals.count(Limit::Partitions);
        return Err(BrokerError::PolicyViolation(format!(
            "the broker has {existing} partitions and may have at most {max} (kafka.max_partitions); {} more would make {after}",
            total - current
        )));
    }
    Ok(())
}

pub(super) async fn create_topic(
    shared: &Arc<Shared>,
    request: NewTopic,
    validate_only: bool,
) -> Result<Option<Arc<Topic>>, BrokerError> {
    names::validate_topic_name(&request.name)?;
    let count = request
        .partition_count
        .unwrap_or(shared.config.default_partition_count);
    let max = shared.config.max_partitions_per_topic;
    if count == 0 {
        return Err(BrokerError::InvalidPartitions(format!(
            "a topic needs between 1 and {max} partitions, not {count}"
        )));
    }
    check_partition_limits(shared, count, 0)?;
    match request.replication_factor {
        None | Some(-1) | Some(1) => {}
        Some(other) => {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "replication factor {other} is not available: every partition has one copy (on the node it is placed on)"
            )));
        }
    }
    let config = topic_config::validate(&request.config)?;
    topic_config::effective(&shared.config.log_defaults, &config)
        .log
        .validate()?;
    if shared.metadata.topic(&request.name).is_some() {
        return Err(BrokerError::TopicExists(request.name));
    }
    if validate_only {
        return Ok(None);
    }
    let id = Uuid::new_v4();
    let record = TopicRecord {
        name: request.name.clone(),
        id,
        partitions: partition_records(shared, id, 0, count, request.assignments.as_deref()),
        config,
        created_ms: shared.clock.now_ms(),
    };
    let name = record.name.clone();
    if let Err(error) = commit(shared, MetadataCommand::CreateTopic(record)).await {
        // Its logs could not be opened: a topic nothing serves must not stay defined.
        if shared.metadata.topic(&name).is_some_and(|t| t.id == id) {
            let undo = MetadataCommand::DeleteTopic { name: name.clone() };
            if let Err(undo_error) = commit(shared, undo).await {
                tracing::error!(topic = %name, %undo_error, "cannot undo the creation of a topic whose logs failed to open");
            }
        }
        return Err(error);
    }
    tracing::info!(topic = %name, partitions = count, %id, "created topic");
    Ok(shared.topics.read().get(&name).cloned())
}

pub(super) async fn delete_topic(shared: &Arc<Shared>, name: &str) -> Result<(), BrokerError> {
    if shared.metadata.topic(name).is_none() {
        return Err(BrokerError::UnknownTopic(name.to_owned()));
    }
    commit(
        shared,
        MetadataCommand::DeleteTopic {
            name: name.to_owned(),
        },
    )
    .await
}

pub(super) async fn create_partitions(
    shared: &Arc<Shared>,
    name: &str,
    total: u32,
    assignments: Option<Vec<NodeId>>,
    validate_only: bool,
) -> Result<(), BrokerError> {
    let record = shared
        .metadata
        .topic(name)
        .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
    let current = record.partitions.len() as u32;
    if total <= current {
        return Err(BrokerError::InvalidPartitions(format!(
            "topic {name:?} already has {current} partitions; the new count must be larger, not {total}"
        )));
    }
    check_partition_limits(shared, total, current)?;
    if let Some(chosen) = &assignments
        && chosen.len() != (total - current) as usize
    {
        return Err(BrokerError::InvalidPartitions(format!(
            "{} assignments for {} new partitions",
            chosen.len(),
            total - current
        )));
    }
    if validate_only {
        return Ok(());
    }
    let command = MetadataCommand::AddPartitions {
        name: name.to_owned(),
        partitions: partition_records(shared, record.id, current, total, assignments.as_deref()),
    };
    if let Err(error) = commit(shared, command).await {
        // Partitions cannot be taken back out of a topic: those that failed to open stay
        // defined, unserved, and are opened at the next start.
        tracing::error!(topic = name, %error, "new partitions are defined but could not be opened");
        return Err(error);
    }
    Ok(())
}

pub(super) async fn set_topic_config(
    shared: &Arc<Shared>,
    name: &str,
    overrides: BTreeMap<String, String>,
    validate_only: bool,
) -> Result<(), BrokerError> {
    if shared.metadata.topic(name).is_none() {
        return Err(BrokerError::UnknownTopic(name.to_owned()));
    }
    let overrides = topic_config::validate(&overrides)?;
    topic_config::effective(&shared.config.log_defaults, &overrides)
        .log
        .validate()?;
    if validate_only {
        return Ok(());
    }
    commit(
        shared,
        MetadataCommand::SetTopicConfig {
            name: name.to_owned(),
            config: overrides,
        },
    )
    .await
}
