//! The controller: the one task that changes metadata.
//!
//! Each command is validated, its logs are prepared on the blocking pool, the change is
//! committed to the metadata store, and only then is it made visible in the topic registry.
//! Commands run one at a time, so two clients creating the same topic cannot both succeed, and
//! a crash at any point leaves either the old definitions or the new ones (log directories with
//! no definition are removed at the next start).

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use sluice_storage::{Clock, Log, StorageError};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::BrokerError;
use crate::metadata::{MetadataCommand, MetadataStore, PartitionRecord, TopicRecord};
use crate::offsets::OffsetStore;
use crate::partition::{Partition, PartitionSpec, partition_dir};
use crate::producer::ProducerStates;
use crate::supervisor::Supervisor;
use crate::{BrokerConfig, MAX_PARTITIONS_PER_TOPIC, NewTopic, Shared, Topic, names, topic_config};

type Reply<T> = oneshot::Sender<Result<T, BrokerError>>;

#[derive(Debug)]
pub(crate) enum Command {
    CreateTopic {
        topic: NewTopic,
        validate_only: bool,
        reply: Reply<Option<Arc<Topic>>>,
    },
    DeleteTopic {
        name: String,
        reply: Reply<()>,
    },
    CreatePartitions {
        name: String,
        total: u32,
        validate_only: bool,
        reply: Reply<()>,
    },
    SetTopicConfig {
        name: String,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
        reply: Reply<()>,
    },
    /// Queues, exchanges, bindings, virtual hosts and users (see [`crate::control`]).
    Messaging(crate::control::MessagingCommand),
}

/// Opens the data directory and metadata, and removes log directories no topic owns. Blocking.
pub(crate) fn load(
    config: BrokerConfig,
    clock: Arc<dyn Clock>,
    supervisor: Supervisor,
) -> Result<Shared, BrokerError> {
    let io = |op, path: &std::path::Path, source| {
        BrokerError::Storage(StorageError::Io {
            op,
            path: path.to_owned(),
            source,
        })
    };
    std::fs::create_dir_all(&config.data_dir).map_err(|e| io("create", &config.data_dir, e))?;
    let lock_path = config.data_dir.join(".lock");
    let lock = File::create(&lock_path).map_err(|e| io("create", &lock_path, e))?;
    lock.try_lock().map_err(|_| BrokerError::Metadata {
        op: "lock the data directory",
        reason: format!("{} is in use by another broker", config.data_dir.display()),
    })?;
    let metadata = MetadataStore::open(&config.data_dir.join("meta.redb"))?;
    let offsets = OffsetStore::open(metadata.database())?;
    let logs = config.data_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| io("create", &logs, e))?;

    let state = metadata.state();
    let mut wanted = std::collections::HashSet::new();
    for topic in state.topics.values() {
        for partition in &topic.partitions {
            wanted.insert(format!("{}-{}", topic.name, partition.index));
        }
    }
    for entry in std::fs::read_dir(&logs).map_err(|e| io("list", &logs, e))? {
        let entry = entry.map_err(|e| io("list", &logs, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&name) {
            tracing::warn!(dir = %entry.path().display(), "removing a log directory no topic owns");
            std::fs::remove_dir_all(entry.path()).map_err(|e| io("remove", &entry.path(), e))?;
        }
    }
    Ok(Shared {
        config,
        clock,
        metadata,
        offsets,
        topics: Default::default(),
        messaging: crate::control::MessagingShared::new(),
        supervisor,
        started: Instant::now(),
        fsync_latency: Arc::new(sluice_metrics::Histogram::default()),
        _lock: lock,
    })
}

fn specs(
    shared: &Shared,
    record: &TopicRecord,
    partitions: &[PartitionRecord],
) -> Vec<PartitionSpec> {
    let name: Arc<str> = Arc::from(record.name.as_str());
    let config = topic_config::effective(&shared.config.log_defaults, &record.config);
    partitions
        .iter()
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

fn start(
    shared: &Arc<Shared>,
    opened: Vec<(PartitionSpec, Log, ProducerStates)>,
) -> Vec<Arc<Partition>> {
    opened
        .into_iter()
        .map(|(spec, log, producers)| {
            let (partition, task) = Partition::start(&spec, log, producers, shared.owner_options());
            shared
                .supervisor
                .watch(format!("partition {}-{}", spec.topic, spec.index), task);
            partition
        })
        .collect()
}

fn topic_from(
    shared: &Shared,
    record: &TopicRecord,
    partitions: Vec<Arc<Partition>>,
) -> Arc<Topic> {
    Arc::new(Topic {
        name: Arc::from(record.name.as_str()),
        id: record.id,
        partitions,
        overrides: record.config.clone(),
        config: topic_config::effective(&shared.config.log_defaults, &record.config),
        created_ms: record.created_ms,
    })
}

/// Opens every partition the metadata defines and starts its owner.
pub(crate) async fn start_partitions(shared: &Arc<Shared>) -> Result<(), BrokerError> {
    let state = shared.metadata.state();
    for record in state.topics.values() {
        let opened = open_logs(shared, specs(shared, record, &record.partitions)).await?;
        let partitions = start(shared, opened);
        let topic = topic_from(shared, record, partitions);
        shared.topics.write().insert(record.name.clone(), topic);
    }
    Ok(())
}

/// Applies a metadata command on the blocking pool (it fsyncs).
async fn apply(shared: &Arc<Shared>, command: MetadataCommand) -> Result<(), BrokerError> {
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || shared.metadata.apply(&command).map(|_| ()))
        .await
        .map_err(|e| BrokerError::metadata("apply", e))?
}

async fn remove_dirs(dirs: Vec<std::path::PathBuf>) {
    let result = tokio::task::spawn_blocking(move || {
        for dir in dirs {
            if let Err(error) = std::fs::remove_dir_all(&dir)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove a log directory; it will be removed at the next start");
            }
        }
    })
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "removing log directories failed");
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<Command>,
) -> Result<(), BrokerError> {
    while let Some(command) = commands.recv().await {
        match command {
            Command::CreateTopic {
                topic,
                validate_only,
                reply,
            } => {
                let _ = reply.send(create_topic(&shared, topic, validate_only).await);
            }
            Command::DeleteTopic { name, reply } => {
                let _ = reply.send(delete_topic(&shared, &name).await);
            }
            Command::CreatePartitions {
                name,
                total,
                validate_only,
                reply,
            } => {
                let _ = reply.send(create_partitions(&shared, &name, total, validate_only).await);
            }
            Command::SetTopicConfig {
                name,
                overrides,
                validate_only,
                reply,
            } => {
                let _ =
                    reply.send(set_topic_config(&shared, &name, overrides, validate_only).await);
            }
            Command::Messaging(command) => crate::control::handle(&shared, command).await,
        }
    }
    Ok(())
}

fn partition_records(shared: &Shared, from: u32, to: u32) -> Vec<PartitionRecord> {
    (from..to)
        .map(|index| PartitionRecord {
            index,
            leader: shared.config.node_id,
            replicas: vec![shared.config.node_id],
            leader_epoch: 0,
        })
        .collect()
}

async fn create_topic(
    shared: &Arc<Shared>,
    request: NewTopic,
    validate_only: bool,
) -> Result<Option<Arc<Topic>>, BrokerError> {
    names::validate_topic_name(&request.name)?;
    let count = request
        .partition_count
        .unwrap_or(shared.config.default_partition_count);
    if count == 0 || count > MAX_PARTITIONS_PER_TOPIC {
        return Err(BrokerError::InvalidPartitions(format!(
            "a topic needs between 1 and {MAX_PARTITIONS_PER_TOPIC} partitions, not {count}"
        )));
    }
    match request.replication_factor {
        None | Some(-1) | Some(1) => {}
        Some(other) => {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "replication factor {other} needs more brokers than this single-node cluster has (1)"
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
    let record = TopicRecord {
        name: request.name.clone(),
        id: Uuid::new_v4(),
        partitions: partition_records(shared, 0, count),
        config,
        created_ms: shared.clock.now_ms(),
    };
    let specs = specs(shared, &record, &record.partitions);
    let dirs: Vec<_> = specs.iter().map(|s| s.dir.clone()).collect();
    let opened = match open_logs(shared, specs).await {
        Ok(opened) => opened,
        Err(error) => {
            remove_dirs(dirs).await;
            return Err(error);
        }
    };
    if let Err(error) = apply(shared, MetadataCommand::CreateTopic(record.clone())).await {
        drop(opened);
        remove_dirs(dirs).await;
        return Err(error);
    }
    let partitions = start(shared, opened);
    let topic = topic_from(shared, &record, partitions);
    shared
        .topics
        .write()
        .insert(record.name.clone(), Arc::clone(&topic));
    tracing::info!(topic = %record.name, partitions = count, id = %record.id, "created topic");
    Ok(Some(topic))
}

async fn delete_topic(shared: &Arc<Shared>, name: &str) -> Result<(), BrokerError> {
    if shared.metadata.topic(name).is_none() {
        return Err(BrokerError::UnknownTopic(name.to_owned()));
    }
    apply(
        shared,
        MetadataCommand::DeleteTopic {
            name: name.to_owned(),
        },
    )
    .await?;
    let removed = shared.topics.write().remove(name);
    let mut dirs = Vec::new();
    if let Some(topic) = removed {
        for partition in &topic.partitions {
            if let Err(error) = partition.close().await {
                tracing::warn!(topic = name, partition = partition.index(), %error, "closing a deleted partition failed");
            }
            dirs.push(partition.reader().dir().to_owned());
        }
    }
    remove_dirs(dirs).await;
    let offsets = shared.offsets.clone();
    let topic = name.to_owned();
    let cleared = tokio::task::spawn_blocking(move || offsets.delete(None, Some(&topic)))
        .await
        .map_err(|e| BrokerError::metadata("delete offsets", e))?;
    if let Err(error) = cleared {
        tracing::warn!(topic = name, %error, "cannot delete the committed offsets of a deleted topic");
    }
    tracing::info!(topic = name, "deleted topic");
    Ok(())
}

async fn create_partitions(
    shared: &Arc<Shared>,
    name: &str,
    total: u32,
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
    if total > MAX_PARTITIONS_PER_TOPIC {
        return Err(BrokerError::InvalidPartitions(format!(
            "a topic may have at most {MAX_PARTITIONS_PER_TOPIC} partitions, not {total}"
        )));
    }
    if validate_only {
        return Ok(());
    }
    let added = partition_records(shared, current, total);
    let specs = specs(shared, &record, &added);
    let dirs: Vec<_> = specs.iter().map(|s| s.dir.clone()).collect();
    let opened = open_logs(shared, specs).await?;
    if let Err(error) = apply(
        shared,
        MetadataCommand::AddPartitions {
            name: name.to_owned(),
            partitions: added,
        },
    )
    .await
    {
        drop(opened);
        remove_dirs(dirs).await;
        return Err(error);
    }
    let new_partitions = start(shared, opened);
    let record = shared
        .metadata
        .topic(name)
        .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
    let mut topics = shared.topics.write();
    let mut partitions = topics
        .get(name)
        .map(|t| t.partitions.clone())
        .unwrap_or_default();
    partitions.extend(new_partitions);
    topics.insert(name.to_owned(), topic_from(shared, &record, partitions));
    Ok(())
}

async fn set_topic_config(
    shared: &Arc<Shared>,
    name: &str,
    overrides: BTreeMap<String, String>,
    validate_only: bool,
) -> Result<(), BrokerError> {
    if shared.metadata.topic(name).is_none() {
        return Err(BrokerError::UnknownTopic(name.to_owned()));
    }
    let overrides = topic_config::validate(&overrides)?;
    let effective = topic_config::effective(&shared.config.log_defaults, &overrides);
    effective.log.validate()?;
    if validate_only {
        return Ok(());
    }
    apply(
        shared,
        MetadataCommand::SetTopicConfig {
            name: name.to_owned(),
            config: overrides,
        },
    )
    .await?;
    let record = shared
        .metadata
        .topic(name)
        .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
    let partitions = shared
        .topics
        .read()
        .get(name)
        .map(|t| t.partitions.clone())
        .unwrap_or_default();
    for partition in &partitions {
        partition.reconfigure(effective.clone()).await?;
    }
    shared
        .topics
        .write()
        .insert(name.to_owned(), topic_from(shared, &record, partitions));
    Ok(())
}
