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
/// `chosen` names (the client's assignments, one per new partition), or else on the
/// `replication_factor` nodes the cluster places it on (this node alone when the broker has
/// no cluster).
fn partition_records(
    shared: &Shared,
    topic_id: Uuid,
    from: u32,
    to: u32,
    chosen: Option<&[NodeId]>,
    replication_factor: usize,
) -> Result<Vec<PartitionRecord>, BrokerError> {
    let placed: Option<Vec<Vec<NodeId>>> = match chosen {
        Some(chosen) => Some(chosen.iter().map(|node| vec![*node]).collect()),
        None => match shared.cluster.get() {
            Some(link) => Some(link.place_partitions(topic_id, from, to, replication_factor)?),
            None => None,
        },
    }
    .filter(|placed| placed.len() == (to - from) as usize);
    Ok((from..to)
        .map(|index| {
            let replicas = placed
                .as_ref()
                .and_then(|placed| placed.get((index - from) as usize))
                .filter(|replicas| !replicas.is_empty())
                .cloned()
                .unwrap_or_else(|| vec![shared.config.node_id]);
            PartitionRecord {
                index,
                leader: replicas[0],
                replicas,
                leader_epoch: 0,
                group: 0,
                target: None,
                reassignments: 0,
            }
        })
        .collect())
}

/// The factor of a topic created without one.
pub(crate) fn default_replication_factor(shared: &Shared) -> usize {
    match shared.config.default_replication_factor {
        Some(factor) => usize::from(factor),
        None => shared
            .cluster
            .get()
            .map_or(1, |link| link.nodes().len().clamp(1, 3)),
    }
}

/// The replication factor a topic is created with: the client's, or the broker's
/// `default.replication.factor` (unset: the smaller of 3 and the cluster's nodes; 1 alone). A
/// factor above one needs a cluster with that many live nodes and the cluster's own placement.
fn replication_factor(
    shared: &Shared,
    requested: Option<i16>,
    manual: bool,
) -> Result<usize, BrokerError> {
    let link = shared.cluster.get();
    let factor = match requested {
        // Manual assignments name their replicas themselves.
        None | Some(-1) if manual => return Ok(1),
        None | Some(-1) => default_replication_factor(shared),
        Some(factor) if factor >= 1 => factor as usize,
        Some(other) => {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "replication factor must be at least 1 (or -1 for the default), not {other}"
            )));
        }
    };
    if factor == 1 {
        return Ok(1);
    }
    let available = link.map_or(1, |link| link.live_node_count());
    if factor > available {
        return Err(BrokerError::InvalidReplicationFactor(format!(
            "replication factor: {factor} larger than available brokers: {available}"
        )));
    }
    if manual {
        return Err(BrokerError::InvalidReplicationFactor(
            "manual replica assignments are not available for replicated partitions yet".into(),
        ));
    }
    Ok(factor)
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
    // As Kafka: a topic that exists is refused before its settings are looked at.
    if shared.metadata.topic(&request.name).is_some() {
        return Err(BrokerError::TopicExists(request.name));
    }
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
    let factor = replication_factor(
        shared,
        request.replication_factor,
        request.assignments.is_some(),
    )?;
    let config = topic_config::validate(&request.config)?;
    topic_config::effective(&shared.config, &config)
        .log
        .validate()?;
    if validate_only {
        return Ok(None);
    }
    let id = Uuid::new_v4();
    let record = TopicRecord {
        name: request.name.clone(),
        id,
        partitions: partition_records(
            shared,
            id,
            0,
            count,
            request.assignments.as_deref(),
            factor,
        )?,
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
    if shared.cluster.get().is_some() && name == crate::group_offsets::OFFSETS_TOPIC {
        return Err(BrokerError::InvalidTopic {
            name: name.to_owned(),
            reason: "the internal topic of committed offsets cannot be deleted".into(),
        });
    }
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
    // New partitions get as many replicas as the topic's first has.
    let factor = record
        .partitions
        .first()
        .map_or(1, |p| p.replicas.len().max(1));
    if factor > 1 && assignments.is_some() {
        return Err(BrokerError::InvalidReplicationFactor(
            "manual replica assignments are not available for replicated partitions yet".into(),
        ));
    }
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
        partitions: partition_records(
            shared,
            record.id,
            current,
            total,
            assignments.as_deref(),
            factor,
        )?,
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
    topic_config::effective(&shared.config, &overrides)
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

/// Checks a reassignment of partition `index` of topic `name` against the definitions and the
/// cluster's nodes, and commits it. Naming a partition's current replicas in their order while
/// no reassignment is in progress changes nothing. A partition with one copy has no Raft group
/// to change: only its current node is accepted.
pub(super) async fn reassign_partition(
    shared: &Arc<Shared>,
    name: &str,
    index: u32,
    target: Option<Vec<NodeId>>,
) -> Result<(), BrokerError> {
    let record = shared
        .metadata
        .topic(name)
        .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
    let placed =
        record
            .partitions
            .get(index as usize)
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: name.to_owned(),
                partition: index as i32,
            })?;
    if let Some(target) = &target {
        if placed.target.is_none() && *target == placed.replicas {
            return Ok(());
        }
        if placed.group == 0 {
            return Err(BrokerError::InvalidReplicaAssignment(format!(
                "partition {index} of {name} has one copy (on node {}), which stays where it is; \
                 only replicated partitions are moved",
                placed.leader
            )));
        }
        let known: Vec<NodeId> = match shared.cluster.get() {
            Some(link) => link.nodes().into_iter().map(|node| node.id).collect(),
            None => vec![shared.config.node_id],
        };
        if let Some(unknown) = target.iter().find(|node| !known.contains(node)) {
            return Err(BrokerError::InvalidReplicaAssignment(format!(
                "node {unknown} is not a node of this cluster"
            )));
        }
    }
    commit(
        shared,
        MetadataCommand::ReassignPartition {
            name: name.to_owned(),
            id: record.id,
            partition: index,
            target,
        },
    )
    .await
}
