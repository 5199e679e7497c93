//! The controller: the one task that changes the broker's definitions.
//!
//! A [`Request`] is a client's intent (create this topic, declare that queue). The controller
//! checks it against the current definitions and the live state, and turns it into a
//! [`MetadataCommand`](crate::command::MetadataCommand) that carries every value decided for it
//! (ids, timestamps, defaults). The command is applied to the definitions — a pure function
//! that returns the next state and the [`Effect`](crate::command::Effect)s the change has
//! outside them — and persisted; only then are the effects carried out ([`effects`]): logs
//! opened or removed, owner tasks started or stopped, routing tables published.
//!
//! Requests run one at a time, so two clients creating the same topic cannot both succeed. A
//! crash at any point leaves the old definitions or the new ones; a start carries out the
//! effects of every definition (so a log or queue the crash left unopened is opened then), and
//! log and queue directories that no definition owns are removed.
//!
//! When an effect fails after its command was committed (a topic's logs or a queue's files
//! cannot be created), the controller commits the command that undoes it and reports the
//! error: a definition is never left in place without what serves it.

pub(crate) mod effects;
mod messaging;
mod topics;

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use sluice_storage::{Clock, StorageError};
use tokio::sync::{mpsc, oneshot};

pub(crate) use self::messaging::{MessagingRequest, MessagingShared};
use crate::error::BrokerError;
use crate::metadata::MetadataStore;
use crate::offsets::OffsetStore;
use crate::supervisor::Supervisor;
use crate::{BrokerConfig, NewTopic, Shared, Topic};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, BrokerError>>;

/// What a client asks of the controller, with where to send the answer.
#[derive(Debug)]
pub(crate) enum Request {
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
        /// The node of each new partition, if the client chose them.
        assignments: Option<Vec<crate::NodeId>>,
        validate_only: bool,
        reply: Reply<()>,
    },
    SetTopicConfig {
        name: String,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
        reply: Reply<()>,
    },
    ReassignPartition {
        name: String,
        partition: u32,
        target: Option<Vec<crate::NodeId>>,
        reply: Reply<()>,
    },
    /// Queues, exchanges, bindings, virtual hosts and users.
    Messaging(MessagingRequest),
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
    let applied = crate::replication::Applied::new(metadata.applied_index());
    let offsets = OffsetStore::open(metadata.database())?;
    let logs = config.data_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| io("create", &logs, e))?;

    let state = metadata.state();
    let mut wanted = std::collections::HashSet::new();
    for topic in state.topics.values() {
        for partition in &topic.partitions {
            // A replicated partition a reassignment moved off this node is not kept.
            if partition.group == 0 || partition.placed_on(config.node_id) {
                wanted.insert(format!("{}-{}", topic.name, partition.index));
            }
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
        messaging: MessagingShared::new(),
        supervisor,
        started: Instant::now(),
        fsync_latency: Arc::new(sluice_metrics::Histogram::default()),
        refusals: crate::limits::Refusals::default(),
        cluster: Arc::new(std::sync::OnceLock::new()),
        applied,
        applying: tokio::sync::Mutex::new(()),
        forwarding: Arc::default(),
        tails: Default::default(),
        creating_offsets_topic: Default::default(),
        _lock: lock,
    })
}

/// Serves everything the stored definitions define: the effects of each topic, virtual host
/// and queue, as if each had just been created.
pub(crate) async fn start(shared: &Arc<Shared>) -> Result<(), BrokerError> {
    messaging::remove_unowned_queue_dirs(shared).await?;
    let effects = effects::of_state(&shared.metadata.state());
    effects::carry_out(shared, effects).await
}

pub(crate) use self::effects::{apply, install};
pub(crate) use self::messaging::{shutdown, start_services};
pub(crate) use self::topics::default_replication_factor;

pub(crate) async fn run(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Request>,
) -> Result<(), BrokerError> {
    while let Some(request) = requests.recv().await {
        match request {
            Request::CreateTopic {
                topic,
                validate_only,
                reply,
            } => {
                let _ = reply.send(topics::create_topic(&shared, topic, validate_only).await);
            }
            Request::DeleteTopic { name, reply } => {
                let _ = reply.send(topics::delete_topic(&shared, &name).await);
            }
            Request::CreatePartitions {
                name,
                total,
                assignments,
                validate_only,
                reply,
            } => {
                let _ = reply.send(
                    topics::create_partitions(&shared, &name, total, assignments, validate_only)
                        .await,
                );
            }
            Request::SetTopicConfig {
                name,
                overrides,
                validate_only,
                reply,
            } => {
                let _ = reply
                    .send(topics::set_topic_config(&shared, &name, overrides, validate_only).await);
            }
            Request::ReassignPartition {
                name,
                partition,
                target,
                reply,
            } => {
                let _ =
                    reply.send(topics::reassign_partition(&shared, &name, partition, target).await);
            }
            Request::Messaging(request) => messaging::handle(&shared, request).await,
        }
    }
    Ok(())
}
