//! Carrying out what a committed command means outside the definitions: opening and closing
//! partition logs, starting and stopping queue owners, publishing routing tables.
//!
//! Every effect reads the definitions as they are after the command (the metadata store's
//! current state) and the live registries (`Shared::topics`, each virtual host's queues), and
//! only this module changes those registries, always on the controller task. Each effect
//! tolerates finding its work already done (a queue already stopped, a partition already
//! served), so carrying out the effects of a state that is partly served is safe.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sluice_storage::Log;

use super::messaging;
use crate::command::{Effect, MetadataCommand, OffsetCommand};
use crate::definitions;
use crate::error::BrokerError;
use crate::metadata::{MetadataState, PartitionRecord, TopicRecord};
use crate::partition::{Partition, PartitionSpec, ReplicationSettings, partition_dir};
use crate::producer::ProducerStates;
use crate::replication::{Reassignment, ReplicaRequest};
use crate::{Shared, Topic, topic_config};

/// Applies `command` to the definitions (persisting it, on the blocking pool: it fsyncs), then
/// carries out its effects. Stops at the first effect that fails and returns its error; the
/// caller decides what undoes the command.
///
/// On a clustered node the command is committed through the cluster's definition log instead
/// (unless it changes only transient definitions), and this returns once this node has applied
/// it, with what applying it gave here (see [`crate::replication`]).
pub(super) async fn commit(
    shared: &Arc<Shared>,
    command: MetadataCommand,
) -> Result<(), BrokerError> {
    if let Some(log) = shared.cluster.get()
        && !shared.metadata.is_transient(&command)?
    {
        let index = log.commit(command).await?;
        return shared.applied.wait(index).await;
    }
    apply(shared, None, command).await
}

/// Applies `command` (the replicated one at log `index`, if it has one) to the definitions,
/// then carries out its effects. Changes are applied one at a time, so effects never
/// interleave: a routing table published is always the latest.
pub(crate) async fn apply(
    shared: &Arc<Shared>,
    index: Option<u64>,
    command: MetadataCommand,
) -> Result<(), BrokerError> {
    let _applying = shared.applying.lock().await;
    let effects = {
        let shared = Arc::clone(shared);
        tokio::task::spawn_blocking(move || shared.metadata.apply_at(index, &command))
            .await
            .map_err(|e| BrokerError::metadata("apply", e))?
    };
    let effects = match effects {
        Ok(effects) => effects,
        Err(error) => {
            if let Some(index) = index {
                // The command changed nothing here, as on every node: it is done with.
                shared.metadata.skip_to(index);
            }
            return Err(error);
        }
    };
    carry_out(shared, effects).await
}

/// Replaces the definitions with the replicated controller's `state` at log `index`, then
/// carries out what changed: topics and queues gone are stopped, new ones started.
pub(crate) async fn install(
    shared: &Arc<Shared>,
    index: u64,
    state: MetadataState,
) -> Result<(), BrokerError> {
    let _applying = shared.applying.lock().await;
    let old = shared.metadata.state();
    let effects = between(&old, &state);
    {
        let shared = Arc::clone(shared);
        tokio::task::spawn_blocking(move || shared.metadata.install(index, state))
            .await
            .map_err(|e| BrokerError::metadata("install", e))??;
    }
    carry_out(shared, effects).await
}

/// The effects that take a node serving `old` to serving `new`.
pub(super) fn between(old: &MetadataState, new: &MetadataState) -> Vec<Effect> {
    let mut effects = Vec::new();
    for (name, topic) in &old.topics {
        if new.topics.get(name).map(|t| t.id) != Some(topic.id) {
            effects.push(Effect::StopTopic {
                name: name.clone(),
                id: topic.id,
            });
        }
    }
    for (name, topic) in &new.topics {
        let to = topic.partitions.len() as u32;
        match old.topics.get(name).filter(|t| t.id == topic.id) {
            None => effects.push(Effect::StartPartitions {
                topic: name.clone(),
                from: 0,
                to,
            }),
            Some(before) => {
                let from = before.partitions.len() as u32;
                if from < to {
                    effects.push(Effect::StartPartitions {
                        topic: name.clone(),
                        from,
                        to,
                    });
                }
                if before.config != topic.config {
                    effects.push(Effect::ReconfigureTopic { name: name.clone() });
                }
                for (was, is) in before.partitions.iter().zip(&topic.partitions) {
                    if (&was.replicas, &was.target) != (&is.replicas, &is.target) {
                        effects.push(Effect::Reassign {
                            topic: name.clone(),
                            partition: is.index,
                        });
                    }
                }
            }
        }
    }
    let vhosts: std::collections::BTreeSet<&String> = old
        .messaging
        .vhosts
        .keys()
        .chain(new.messaging.vhosts.keys())
        .collect();
    for vhost in vhosts {
        effects.extend(definitions::vhost_effects(
            &old.messaging,
            &new.messaging,
            vhost,
        ));
    }
    effects
}

/// The effects that serve everything `state` defines, as if each definition had just been
/// made: every topic's partitions, every virtual host's queues and routing table.
pub(super) fn of_state(state: &MetadataState) -> Vec<Effect> {
    let mut effects = Vec::new();
    for topic in state.topics.values() {
        effects.push(Effect::StartPartitions {
            topic: topic.name.clone(),
            from: 0,
            to: topic.partitions.len() as u32,
        });
    }
    for (vhost, definitions) in &state.messaging.vhosts {
        for name in definitions.queues.keys() {
            effects.push(Effect::StartQueue {
                vhost: vhost.clone(),
                name: name.clone(),
            });
        }
        effects.push(Effect::Republish {
            vhost: vhost.clone(),
        });
    }
    effects
}

/// Carries out `effects` in order, stopping at the first that fails.
pub(super) async fn carry_out(
    shared: &Arc<Shared>,
    effects: Vec<Effect>,
) -> Result<(), BrokerError> {
    for effect in effects {
        match effect {
            Effect::StartPartitions { topic, from, to } => {
                start_partitions(shared, &topic, from, to).await?;
            }
            Effect::StopTopic { name, id } => stop_topic(shared, &name, id).await,
            Effect::ReconfigureTopic { name } => reconfigure_topic(shared, &name).await?,
            Effect::Reassign { topic, partition } => {
                reassign_partition(shared, &topic, partition).await;
            }
            Effect::StartQueue { vhost, name } => {
                messaging::start_queue(shared, &vhost, &name).await?;
            }
            Effect::Republish { vhost } => messaging::republish(shared, &vhost),
            Effect::DropVhost { name } => messaging::drop_vhost(shared, &name).await,
            Effect::StopQueue { vhost, name, id } => {
                messaging::stop_queue(shared, &vhost, &name, id).await;
            }
        }
    }
    Ok(())
}

fn specs(shared: &Shared, record: &TopicRecord, from: u32, to: u32) -> Vec<PartitionSpec> {
    let name: Arc<str> = Arc::from(record.name.as_str());
    let config = topic_config::effective(&shared.config, &record.config);
    record
        .partitions
        .iter()
        .filter(|p| (from..to).contains(&p.index))
        .map(|p| PartitionSpec {
            topic: Arc::clone(&name),
            topic_id: record.id,
            index: p.index,
            leader_epoch: p.leader_epoch,
            dir: partition_dir(&shared.logs_dir(), &record.name, p.index),
            config: config.clone(),
            producer_limits: shared.config.producer_limits,
        })
        .collect()
}

/// Opens the logs of `specs` on the blocking pool.
async fn open_logs(
    shared: &Arc<Shared>,
    specs: Vec<PartitionSpec>,
) -> Result<Vec<(PartitionSpec, Log, ProducerStates)>, BrokerError> {
    let clock = Arc::clone(&shared.clock);
    tokio::task::spawn_blocking(move || {
        specs
            .into_iter()
            .map(|spec| {
                let (log, producers) = Partition::open_log(&spec, clock.as_ref())?;
                Ok((spec, log, producers))
            })
            .collect::<Result<Vec<_>, BrokerError>>()
    })
    .await
    .map_err(|e| BrokerError::metadata("open logs", e))?
}

/// Replicas opened at once: opening one is mostly waiting for its files and their first fsyncs
/// and for its Raft group to start, so a topic of a thousand partitions opens several times
/// faster than one replica after another (which took longer than the controller waits for a
/// change to apply).
const REPLICAS_OPENED_AT_ONCE: usize = 16;

/// Opens this node's replicas of the replicated partitions `specs` through the cluster,
/// [`REPLICAS_OPENED_AT_ONCE`] at a time; answered in the order of `specs`. When one fails,
/// those that opened are stopped again (nothing would serve or close them) and the first
/// failure is returned.
async fn open_replicas(
    shared: &Arc<Shared>,
    record: &TopicRecord,
    specs: Vec<PartitionSpec>,
) -> Result<Vec<Arc<Partition>>, BrokerError> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let Some(link) = shared.cluster.get() else {
        // Before this node has joined its cluster (at start-up): opened once it has
        // (`open_deferred_replicas`).
        tracing::debug!(
            topic = %record.name,
            count = specs.len(),
            "replicated partitions wait until this node is in its cluster"
        );
        return Ok(Vec::new());
    };
    let open = |spec: PartitionSpec| async move {
        let placed = &record.partitions[spec.index as usize];
        let prepared = spec.clone();
        tokio::task::spawn_blocking(move || Partition::prepare_dir(&prepared))
            .await
            .map_err(|e| BrokerError::metadata("prepare a partition directory", e))??;
        let log = link
            .open_replica(ReplicaRequest {
                group: placed.group,
                dir: spec.dir.clone(),
                log: spec.config.log.clone(),
                replicas: placed.replicas.clone(),
                initialize: placed.reassignments == 0,
                auto_leader_rebalance: shared.config.auto_leader_rebalance,
                housekeeping_interval: shared.config.housekeeping_interval,
                replica_lag: shared.config.replica_lag_time_max,
            })
            .await?;
        let partition = Partition::replicated(
            Arc::clone(&spec.topic),
            spec.topic_id,
            spec.index,
            log,
            ReplicationSettings::new(
                spec.config.min_insync_replicas,
                shared.config.replica_lag_time_max,
            ),
        );
        if &*spec.topic == crate::group_offsets::OFFSETS_TOPIC {
            shared.tails.attach(spec.topic_id, Arc::clone(&partition));
        }
        if placed.reassignments > 0 {
            partition.reassign(reassignment(record, placed));
        }
        Ok::<_, BrokerError>(partition)
    };
    let results: Vec<Result<Arc<Partition>, BrokerError>> = futures_util::stream::iter(specs)
        .map(open)
        .buffered(REPLICAS_OPENED_AT_ONCE)
        .collect()
        .await;
    let mut opened = Vec::with_capacity(results.len());
    let mut failure = None;
    for result in results {
        match result {
            Ok(partition) => opened.push(partition),
            Err(error) => {
                failure.get_or_insert(error);
            }
        }
    }
    let Some(failure) = failure else {
        return Ok(opened);
    };
    let closing = opened.iter().map(|partition| async move {
        if let Err(error) = partition.close().await {
            tracing::warn!(topic = %record.name, partition = partition.index(), %error, "closing a replica opened with others that failed");
        }
    });
    futures_util::future::join_all(closing).await;
    Err(failure)
}

/// How long applying a change waits for this node's replicas of new partitions to open. A
/// topic of a few hundred partitions opens within it and is served once the change is
/// applied; the replicas of a larger one go on opening in the background (a thousand take
/// longer than the controller waits for a change to apply), and its partitions are served
/// once they have opened (LEADER_NOT_AVAILABLE until then, as Kafka answers while a new
/// partition's replicas are being created).
const REPLICAS_OPEN_WAIT: Duration = Duration::from_secs(5);

/// [`open_replicas`], waiting up to [`REPLICAS_OPEN_WAIT`]: the replicas if they opened in
/// time, or `None` when they go on opening in the background and are served once they have
/// ([`serve_opened_replicas`]).
async fn open_replicas_awhile(
    shared: &Arc<Shared>,
    record: &TopicRecord,
    specs: Vec<PartitionSpec>,
) -> Result<Option<Vec<Arc<Partition>>>, BrokerError> {
    if specs.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let count = specs.len();
    let mut opening = {
        let shared = Arc::clone(shared);
        let record = record.clone();
        tokio::spawn(async move { open_replicas(&shared, &record, specs).await })
    };
    match tokio::time::timeout(REPLICAS_OPEN_WAIT, &mut opening).await {
        Ok(joined) => joined
            .map_err(|e| BrokerError::metadata("open partition replicas", e))?
            .map(Some),
        Err(_) => {
            tracing::info!(topic = %record.name, count, "this node's replicas of the topic's new partitions go on opening in the background");
            let shared = Arc::clone(shared);
            let record = record.clone();
            tokio::spawn(async move {
                match opening.await {
                    Ok(Ok(opened)) => serve_opened_replicas(&shared, &record, opened).await,
                    Ok(Err(error)) => {
                        tracing::error!(topic = %record.name, %error, "cannot open this node's replicas of the topic's new partitions");
                    }
                    Err(error) => {
                        tracing::error!(topic = %record.name, %error, "opening this node's replicas of the topic's new partitions failed");
                    }
                }
            });
            Ok(None)
        }
    }
}

/// Serves replicas that opened in the background, in the slots their topic keeps for them;
/// replicas of a topic deleted (or re-created) meanwhile stop, and their directories go.
async fn serve_opened_replicas(
    shared: &Arc<Shared>,
    record: &TopicRecord,
    opened: Vec<Arc<Partition>>,
) {
    let _applying = shared.applying.lock().await;
    let live = shared
        .topics
        .read()
        .get(&record.name)
        .cloned()
        .filter(|live| live.id == record.id);
    let current = shared
        .metadata
        .topic(&record.name)
        .filter(|current| current.id == record.id);
    let mut unwanted = Vec::new();
    if let (Some(live), Some(current)) = (live, current) {
        let mut partitions = live.partitions.clone();
        for partition in opened {
            match partitions.get_mut(partition.index() as usize) {
                Some(slot @ None) => *slot = Some(partition),
                _ => unwanted.push(partition),
            }
        }
        let served = topic_from(shared, &current, partitions);
        shared.topics.write().insert(record.name.clone(), served);
        tracing::info!(topic = %record.name, "this node's replicas of the topic's new partitions opened");
    } else {
        unwanted = opened;
    }
    if unwanted.is_empty() {
        return;
    }
    let closing = unwanted.iter().map(|partition| async move {
        if let Err(error) = partition.close().await {
            tracing::warn!(topic = %record.name, partition = partition.index(), %error, "closing an unwanted replica failed");
        }
        partition.reader().dir().to_owned()
    });
    let dirs = futures_util::future::join_all(closing).await;
    remove_dirs(dirs).await;
}

/// Opens this node's replicas of replicated partitions that could not be opened before the
/// node had its cluster link (definitions applied at start-up, or replayed while joining).
pub(crate) async fn open_deferred_replicas(shared: &Arc<Shared>) {
    let _applying = shared.applying.lock().await;
    let here = shared.config.node_id;
    let records: Vec<TopicRecord> = shared.metadata.state().topics.values().cloned().collect();
    for record in records {
        let live = shared.topics.read().get(&record.name).cloned();
        let Some(live) = live.filter(|live| live.id == record.id) else {
            continue;
        };
        let missing: Vec<PartitionSpec> = specs(shared, &record, 0, record.partitions.len() as u32)
            .into_iter()
            .filter(|spec| {
                let placed = &record.partitions[spec.index as usize];
                placed.group != 0
                    && placed.placed_on(here)
                    && matches!(live.partitions.get(spec.index as usize), Some(None))
            })
            .collect();
        if missing.is_empty() {
            continue;
        }
        match open_replicas(shared, &record, missing).await {
            Ok(opened) => {
                let mut partitions = live.partitions.clone();
                for partition in opened {
                    let index = partition.index() as usize;
                    partitions[index] = Some(partition);
                }
                let served = topic_from(shared, &record, partitions);
                shared.topics.write().insert(record.name.clone(), served);
            }
            Err(error) => {
                tracing::error!(topic = %record.name, %error, "cannot open this node's replicas of the topic's partitions");
            }
        }
    }
}

fn topic_from(
    shared: &Shared,
    record: &TopicRecord,
    partitions: Vec<Option<Arc<Partition>>>,
) -> Arc<Topic> {
    Arc::new(Topic {
        name: Arc::from(record.name.as_str()),
        id: record.id,
        partitions,
        leaders: record.partitions.iter().map(|p| p.leader).collect(),
        replicas: record
            .partitions
            .iter()
            .map(PartitionRecord::all_replicas)
            .collect(),
        reassigning: record
            .partitions
            .iter()
            .map(PartitionRecord::reassigning)
            .collect(),
        groups: record.partitions.iter().map(|p| p.group).collect(),
        cluster: Arc::clone(&shared.cluster),
        overrides: record.config.clone(),
        config: topic_config::effective(&shared.config, &record.config),
        created_ms: record.created_ms,
    })
}

/// A replicated partition's placement as its replicas are told it.
fn reassignment(record: &TopicRecord, placed: &PartitionRecord) -> Reassignment {
    Reassignment {
        topic: record.name.clone(),
        topic_id: record.id,
        partition: placed.index,
        replicas: placed.replicas.clone(),
        target: placed.target.clone(),
    }
}

/// Carries out a change of a replicated partition's placement on this node: opens its
/// replica here when the partition is to have one here (a node a reassignment adds: the
/// replica opens empty and its group's leader sends it the log), tells the replica the
/// placement, and once the partition is no longer placed here (a completed reassignment
/// removed this node) closes the replica and removes its directory. Failures are logged: the
/// change is committed, and the next start opens what is missing.
async fn reassign_partition(shared: &Arc<Shared>, topic: &str, index: u32) {
    let Some(record) = shared.metadata.topic(topic) else {
        return;
    };
    let Some(placed) = record.partitions.get(index as usize).cloned() else {
        return;
    };
    let Some(live) = shared
        .topics
        .read()
        .get(topic)
        .cloned()
        .filter(|live| live.id == record.id)
    else {
        return;
    };
    let here = shared.config.node_id;
    let held = live.partitions.get(index as usize).cloned().flatten();
    let mut partitions = live.partitions.clone();
    match (placed.placed_on(here), held) {
        (true, Some(partition)) => partition.reassign(reassignment(&record, &placed)),
        (true, None) => {
            let spec = specs(shared, &record, index, index + 1);
            match open_replicas(shared, &record, spec).await {
                Ok(opened) => {
                    for partition in opened {
                        tracing::info!(
                            topic,
                            partition = index,
                            "opened a replica the partition's reassignment placed on this node"
                        );
                        partition.reassign(reassignment(&record, &placed));
                        if let Some(slot) = partitions.get_mut(index as usize) {
                            *slot = Some(partition);
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(topic, partition = index, %error, "cannot open the replica a reassignment placed on this node");
                }
            }
        }
        (false, Some(partition)) => {
            if let Some(slot) = partitions.get_mut(index as usize) {
                *slot = None;
            }
            if partition.topic() == crate::group_offsets::OFFSETS_TOPIC {
                shared.tails.detach(record.id, index);
            }
            if let Err(error) = partition.close().await {
                tracing::warn!(topic, partition = index, %error, "closing a replica moved off this node failed");
            }
            remove_dirs(vec![partition.reader().dir().to_owned()]).await;
            tracing::info!(
                topic,
                partition = index,
                "the partition's reassignment moved it off this node; its replica here is removed"
            );
        }
        (false, None) => {}
    }
    let served = topic_from(shared, &record, partitions);
    shared.topics.write().insert(record.name.clone(), served);
}

/// Serves partitions `from..to` of a topic, after the ones it has: opens those placed on this
/// node, and knows the others' nodes.
async fn start_partitions(
    shared: &Arc<Shared>,
    topic: &str,
    from: u32,
    to: u32,
) -> Result<(), BrokerError> {
    let record = shared
        .metadata
        .topic(topic)
        .ok_or_else(|| BrokerError::UnknownTopic(topic.to_owned()))?;
    let mut partitions = shared
        .topics
        .read()
        .get(topic)
        .filter(|live| live.id == record.id)
        .map(|live| live.partitions.clone())
        .unwrap_or_default();
    // Partitions already known stay as they are.
    let from = from.max(partitions.len() as u32);
    let to = to.min(record.partitions.len() as u32);
    if from < to {
        let here = shared.config.node_id;
        let (replicated, single): (Vec<PartitionSpec>, Vec<PartitionSpec>) =
            specs(shared, &record, from, to)
                .into_iter()
                .filter(|spec| {
                    let placed = &record.partitions[spec.index as usize];
                    if placed.group == 0 {
                        placed.leader == here
                    } else {
                        placed.placed_on(here)
                    }
                })
                .partition(|spec| record.partitions[spec.index as usize].group != 0);
        let mut opened = open_logs(shared, single).await?.into_iter().peekable();
        let mut replicas = open_replicas_awhile(shared, &record, replicated)
            .await?
            .unwrap_or_default()
            .into_iter()
            .peekable();
        for index in from..to {
            let partition = if let Some((spec, log, producers)) =
                opened.next_if(|(spec, _, _)| spec.index == index)
            {
                let (partition, task) =
                    Partition::start(&spec, log, producers, shared.owner_options());
                if &*spec.topic == crate::group_offsets::OFFSETS_TOPIC {
                    shared.tails.attach(spec.topic_id, Arc::clone(&partition));
                }
                shared
                    .supervisor
                    .watch(format!("partition {}-{}", spec.topic, spec.index), task);
                Some(partition)
            } else {
                replicas.next_if(|partition| partition.index() == index)
            };
            partitions.push(partition);
        }
    }
    let served = topic_from(shared, &record, partitions);
    shared.topics.write().insert(record.name.clone(), served);
    Ok(())
}

/// In a cluster, where this node coordinates groups: deletes their offsets of the deleted
/// topic `name` (tombstones in the committed-offsets topic, in the background; a failure is
/// logged, and the offsets stay until the group deletes them).
fn forget_replicated_offsets(shared: &Arc<Shared>, name: &str) {
    use crate::group_offsets::{Coordinating, OFFSETS_TOPIC, delete_batch};
    let Some(offsets) = shared.topics.read().get(OFFSETS_TOPIC).cloned() else {
        return;
    };
    for tail in shared.tails.all(offsets.id) {
        if tail.coordinating() != Coordinating::Yes {
            continue;
        }
        let mut by_group: std::collections::BTreeMap<String, Vec<(String, u32)>> =
            std::collections::BTreeMap::new();
        for (group, key) in tail.table().of_topic(name) {
            by_group.entry(group).or_default().push(key);
        }
        if by_group.is_empty() {
            continue;
        }
        let now_ms = shared.clock.now_ms();
        let topic = name.to_owned();
        tokio::spawn(async move {
            for (group, keys) in by_group {
                let batch = delete_batch(&group, &keys, now_ms);
                if let Err(error) = tail.partition().produce(batch).await {
                    tracing::warn!(%topic, %group, %error, "cannot delete the committed offsets of a deleted topic");
                }
            }
        });
    }
}

/// Stops serving a deleted topic: closes its partitions, removes their logs and the offsets
/// committed for it.
async fn stop_topic(shared: &Arc<Shared>, name: &str, id: uuid::Uuid) {
    shared.tails.detach_topic(id);
    forget_replicated_offsets(shared, name);
    let removed = {
        let mut topics = shared.topics.write();
        match topics.get(name) {
            Some(live) if live.id == id => topics.remove(name),
            _ => None,
        }
    };
    let mut dirs = Vec::new();
    if let Some(topic) = removed {
        // All at once: a replica's close may wait for a hand-over (up to a second).
        let closing = topic.served().map(|partition| async move {
            if let Err(error) = partition.close().await {
                tracing::warn!(topic = name, partition = partition.index(), %error, "closing a deleted partition failed");
            }
            partition.reader().dir().to_owned()
        });
        dirs = futures_util::future::join_all(closing).await;
    }
    remove_dirs(dirs).await;
    let offsets = shared.offsets.clone();
    let command = OffsetCommand::Delete {
        group: None,
        topic: Some(name.to_owned()),
    };
    let cleared = tokio::task::spawn_blocking(move || offsets.apply(&command)).await;
    match cleared {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(topic = name, %error, "cannot delete the committed offsets of a deleted topic");
        }
        Err(error) => {
            tracing::warn!(topic = name, %error, "deleting the committed offsets of a deleted topic failed");
        }
    }
    tracing::info!(topic = name, "deleted topic");
}

/// Serves a topic with its new configuration.
async fn reconfigure_topic(shared: &Arc<Shared>, name: &str) -> Result<(), BrokerError> {
    let record = shared
        .metadata
        .topic(name)
        .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
    let effective = topic_config::effective(&shared.config, &record.config);
    let partitions = shared
        .topics
        .read()
        .get(name)
        .map(|t| t.partitions.clone())
        .unwrap_or_default();
    for partition in partitions.iter().flatten() {
        partition.reconfigure(effective.clone()).await?;
    }
    shared
        .topics
        .write()
        .insert(name.to_owned(), topic_from(shared, &record, partitions));
    Ok(())
}

/// Removes directories on the blocking pool; what cannot be removed now is removed at the next
/// start (no definition owns it).
pub(super) async fn remove_dirs(dirs: Vec<PathBuf>) {
    let result = tokio::task::spawn_blocking(move || {
        for dir in dirs {
            if let Err(error) = std::fs::remove_dir_all(&dir)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove a directory; it will be removed at the next start");
            }
        }
    })
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "removing directories failed");
    }
}
