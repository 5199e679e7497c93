//! The controller's side of messaging definitions: creating and deleting queues (their logs and
//! owner tasks), exchanges and bindings, and publishing each virtual host's new routing table.
//!
//! Like topic changes, every step runs on the controller task in order: validate against the
//! current definitions, prepare files on the blocking pool, commit the command to the metadata
//! store, then make the result visible. A crash at any point leaves the old definitions or the
//! new ones; queue directories no definition owns are removed at the next start.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::{Mutex, RwLock};
use sluice_storage::{FsyncPolicy, LogConfig, StorageError};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::Shared;
use crate::definitions::{DefinitionCommand, VhostDefinitions};
use crate::error::{BrokerError, MessagingError, ResourceKind};
use crate::exchange::{BindingRecord, ExchangeRecord};
use crate::metadata::MetadataCommand;
use crate::queue::deadletter::{self, DeadLetter, FORWARDER_CAPACITY};
use crate::queue::handler::{QueueNotice, QueueServices};
use crate::queue::{Queue, QueueArgs, QueueRecord, QueueSpec, open_queue, start_queue};
use crate::users::UserRecord;
use crate::vhost::Vhost;

type Reply<T> = oneshot::Sender<Result<T, BrokerError>>;

/// Messaging state shared by the broker handle and the controller.
#[derive(Debug)]
pub(crate) struct MessagingShared {
    pub vhosts: RwLock<HashMap<String, Arc<Vhost>>>,
    pub next_id: AtomicU64,
    pub services: QueueServices,
    /// Taken once, by the tasks that serve them.
    pub receivers: Mutex<
        Option<(
            mpsc::Receiver<DeadLetter>,
            mpsc::UnboundedReceiver<QueueNotice>,
        )>,
    >,
}

impl MessagingShared {
    pub fn new() -> Self {
        let (dead_letters, dead_letter_receiver) = mpsc::channel(FORWARDER_CAPACITY);
        let (notices, notice_receiver) = mpsc::unbounded_channel();
        Self {
            vhosts: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            services: QueueServices {
                dead_letters,
                notices,
            },
            receivers: Mutex::new(Some((dead_letter_receiver, notice_receiver))),
        }
    }
}

/// Controller commands about messaging definitions.
#[derive(Debug)]
pub(crate) enum MessagingCommand {
    PutVhost {
        name: String,
        reply: Reply<()>,
    },
    DeleteVhost {
        name: String,
        reply: Reply<()>,
    },
    PutUser {
        record: UserRecord,
        reply: Reply<()>,
    },
    DeleteUser {
        name: String,
        reply: Reply<()>,
    },
    DeclareExchange {
        record: ExchangeRecord,
        reply: Reply<()>,
    },
    DeleteExchange {
        vhost: String,
        name: String,
        if_unused: bool,
        reply: Reply<()>,
    },
    DeclareQueue {
        record: QueueRecord,
        args: QueueArgs,
        reply: Reply<Arc<Queue>>,
    },
    DeleteQueue {
        vhost: String,
        name: String,
        /// Delete only this incarnation (a queue deleting itself).
        id: Option<Uuid>,
        if_unused: bool,
        if_empty: bool,
        reply: Reply<u64>,
    },
    Bind {
        binding: BindingRecord,
        unbind: bool,
        reply: Reply<()>,
    },
}

fn queues_dir(shared: &Shared) -> PathBuf {
    shared.config.data_dir.join("queues")
}

fn queue_spec(shared: &Shared, record: &QueueRecord, args: QueueArgs) -> QueueSpec {
    let defaults = &shared.config.log_defaults;
    let log_config = LogConfig {
        segment_bytes: shared.config.queue_segment_bytes,
        segment_ms: defaults.segment_ms,
        index_interval_bytes: defaults.index_interval_bytes,
        retention_bytes: None,
        retention_ms: None,
        // A batch holds at least one whole message.
        max_batch_bytes: shared.config.max_message_bytes + 2 * 1024 * 1024,
        // Transient queues never need their data on disk; confirms of persistent messages in
        // durable queues wait for an fsync whatever the policy.
        fsync: if record.is_persistent() {
            defaults.fsync
        } else {
            FsyncPolicy::Never
        },
    };
    QueueSpec {
        record: record.clone(),
        args,
        dir: queues_dir(shared).join(record.id.to_string()),
        log_config,
        flow_ready_high: shared.config.queue_flow_ready_high,
    }
}

async fn apply(shared: &Arc<Shared>, command: DefinitionCommand) -> Result<(), BrokerError> {
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || {
        shared
            .metadata
            .apply(&MetadataCommand::Messaging(command))
            .map(|_| ())
    })
    .await
    .map_err(|e| BrokerError::metadata("apply", e))?
}

fn definitions_of(shared: &Shared, vhost: &str) -> Option<Arc<VhostDefinitions>> {
    shared.metadata.state().messaging.vhosts.get(vhost).cloned()
}

/// Publishes a virtual host's routing table after its definitions changed.
fn republish(shared: &Shared, vhost: &str) {
    let Some(definitions) = definitions_of(shared, vhost) else {
        return;
    };
    let live = {
        let mut vhosts = shared.messaging.vhosts.write();
        Arc::clone(
            vhosts
                .entry(vhost.to_owned())
                .or_insert_with(|| Arc::new(Vhost::new(vhost))),
        )
    };
    live.rebuild(&definitions);
}

async fn open_and_start(
    shared: &Arc<Shared>,
    record: &QueueRecord,
    args: QueueArgs,
) -> Result<Arc<Queue>, BrokerError> {
    let spec = queue_spec(shared, record, args);
    let opened = {
        let spec = spec.clone();
        let clock = Arc::clone(&shared.clock);
        tokio::task::spawn_blocking(move || open_queue(&spec, clock.as_ref()))
            .await
            .map_err(|e| BrokerError::metadata("open queue", e))??
    };
    let (queue, task) = start_queue(
        &spec,
        opened,
        shared.owner_options(),
        shared.messaging.services.clone(),
    );
    shared.supervisor.watch(
        format!("queue '{}' in vhost '{}'", record.name, record.vhost),
        task,
    );
    Ok(queue)
}

async fn remove_dir(dir: PathBuf) {
    let result = tokio::task::spawn_blocking(move || {
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), %error, "cannot remove a queue directory; it will be removed at the next start");
        }
    })
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "removing a queue directory failed");
    }
}

/// Opens every persisted queue, removes directories no queue owns, and publishes the routing
/// tables. Called once, at start-up, before the controller runs.
pub(crate) async fn start(shared: &Arc<Shared>) -> Result<(), BrokerError> {
    let dir = queues_dir(shared);
    let state = shared.metadata.state();
    let mut wanted = std::collections::HashSet::new();
    for vhost in state.messaging.vhosts.values() {
        for queue in vhost.queues.values() {
            wanted.insert(queue.id.to_string());
        }
    }
    {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
            let io = |op, path: &std::path::Path, source| {
                BrokerError::Storage(StorageError::Io {
                    op,
                    path: path.to_owned(),
                    source,
                })
            };
            std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
            for entry in std::fs::read_dir(&dir).map_err(|e| io("list", &dir, e))? {
                let entry = entry.map_err(|e| io("list", &dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !wanted.contains(&name) {
                    tracing::debug!(dir = %entry.path().display(), "removing a queue directory no durable queue owns");
                    std::fs::remove_dir_all(entry.path())
                        .map_err(|e| io("remove", &entry.path(), e))?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| BrokerError::metadata("list queue directories", e))??;
    }
    for (name, definitions) in &state.messaging.vhosts {
        let live = Arc::new(Vhost::new(name));
        for record in definitions.queues.values() {
            let args = crate::queue::args::parse(&record.arguments).unwrap_or_else(|error| {
                tracing::warn!(queue = %record.name, vhost = %record.vhost, arg = %error.arg, reason = %error.reason, "stored queue argument is invalid; ignoring the queue's arguments");
                QueueArgs::default()
            });
            let queue = open_and_start(shared, record, args).await?;
            live.queues.lock().insert(record.name.clone(), queue);
        }
        live.rebuild(definitions);
        shared.messaging.vhosts.write().insert(name.clone(), live);
    }
    Ok(())
}

/// Starts the dead-letter forwarder and the task that acts on queues' requests to be deleted.
pub(crate) fn start_services(
    shared: &Arc<Shared>,
    commands: mpsc::Sender<crate::controller::Command>,
) {
    let Some((dead_letters, mut notices)) = shared.messaging.receivers.lock().take() else {
        return;
    };
    let lookup_shared = Arc::clone(shared);
    let routing: deadletter::RoutingLookup = Arc::new(move |vhost: &str| {
        lookup_shared
            .messaging
            .vhosts
            .read()
            .get(vhost)
            .map(|v| v.routing())
    });
    let task = tokio::spawn(deadletter::forward(dead_letters, routing));
    shared
        .supervisor
        .watch("dead-letter forwarder".into(), task);
    let task = tokio::spawn(async move {
        while let Some(notice) = notices.recv().await {
            let (vhost, name, id, if_unused) = match notice {
                QueueNotice::AutoDelete { vhost, name, id } => (vhost, name, id, true),
                QueueNotice::Expired { vhost, name, id } => (vhost, name, id, false),
            };
            let (reply, receive) = oneshot::channel();
            let command = crate::controller::Command::Messaging(MessagingCommand::DeleteQueue {
                vhost,
                name,
                id: Some(id),
                if_unused,
                if_empty: false,
                reply,
            });
            if commands.send(command).await.is_err() {
                break;
            }
            if let Ok(Err(error)) = receive.await {
                tracing::debug!(%error, "queue not deleted");
            }
        }
        Ok::<(), String>(())
    });
    shared.supervisor.watch("queue janitor".into(), task);
}

pub(crate) async fn handle(shared: &Arc<Shared>, command: MessagingCommand) {
    match command {
        MessagingCommand::PutVhost { name, reply } => {
            let result = put_vhost(shared, &name).await;
            let _ = reply.send(result);
        }
        MessagingCommand::DeleteVhost { name, reply } => {
            let _ = reply.send(delete_vhost(shared, &name).await);
        }
        MessagingCommand::PutUser { record, reply } => {
            let _ = reply.send(apply(shared, DefinitionCommand::PutUser(record)).await);
        }
        MessagingCommand::DeleteUser { name, reply } => {
            let _ = reply.send(apply(shared, DefinitionCommand::DeleteUser { name }).await);
        }
        MessagingCommand::DeclareExchange { record, reply } => {
            let _ = reply.send(declare_exchange(shared, record).await);
        }
        MessagingCommand::DeleteExchange {
            vhost,
            name,
            if_unused,
            reply,
        } => {
            let _ = reply.send(delete_exchange(shared, &vhost, &name, if_unused).await);
        }
        MessagingCommand::DeclareQueue {
            record,
            args,
            reply,
        } => {
            let _ = reply.send(declare_queue(shared, record, args).await);
        }
        MessagingCommand::DeleteQueue {
            vhost,
            name,
            id,
            if_unused,
            if_empty,
            reply,
        } => {
            let _ = reply.send(delete_queue(shared, &vhost, &name, id, if_unused, if_empty).await);
        }
        MessagingCommand::Bind {
            binding,
            unbind,
            reply,
        } => {
            let _ = reply.send(bind(shared, binding, unbind).await);
        }
    }
}

async fn put_vhost(shared: &Arc<Shared>, name: &str) -> Result<(), BrokerError> {
    if definitions_of(shared, name).is_none() {
        apply(
            shared,
            DefinitionCommand::PutVhost {
                name: name.to_owned(),
            },
        )
        .await?;
        tracing::info!(vhost = name, "created virtual host");
    }
    republish(shared, name);
    Ok(())
}

/// Deletes a virtual host with everything in it: one metadata command drops its exchanges,
/// queues, bindings and the users' permissions there; then its queues are deleted (consumers
/// get basic.cancel), their directories removed, and its connections told to close.
async fn delete_vhost(shared: &Arc<Shared>, name: &str) -> Result<(), BrokerError> {
    if definitions_of(shared, name).is_none() {
        return Err(MessagingError::VhostNotFound(name.to_owned()).into());
    }
    apply(
        shared,
        DefinitionCommand::DeleteVhost {
            name: name.to_owned(),
        },
    )
    .await?;
    let Some(live) = shared.messaging.vhosts.write().remove(name) else {
        return Ok(());
    };
    let queues: Vec<Arc<Queue>> = live.queues.lock().drain().map(|(_, q)| q).collect();
    // Whoever still holds the old routing table finds no exchange to publish to.
    live.rebuild(&VhostDefinitions::default());
    live.deleted().cancel();
    for queue in queues {
        let _ = queue.deleting().await;
        if let Err(error) = queue.close().await {
            tracing::warn!(queue = %queue.record().name, vhost = name, %error, "closing a queue of a deleted virtual host failed");
        }
        remove_dir(queue_spec(shared, queue.record(), QueueArgs::default()).dir).await;
    }
    tracing::info!(vhost = name, "deleted virtual host");
    Ok(())
}

async fn declare_exchange(shared: &Arc<Shared>, record: ExchangeRecord) -> Result<(), BrokerError> {
    let definitions = definitions_of(shared, &record.vhost)
        .ok_or_else(|| MessagingError::VhostNotFound(record.vhost.clone()))?;
    if definitions.exchanges.contains_key(&record.name) {
        // Declared meanwhile; the caller checks equivalence.
        return Ok(());
    }
    let vhost = record.vhost.clone();
    apply(shared, DefinitionCommand::DeclareExchange(record)).await?;
    republish(shared, &vhost);
    Ok(())
}

async fn delete_exchange(
    shared: &Arc<Shared>,
    vhost: &str,
    name: &str,
    if_unused: bool,
) -> Result<(), BrokerError> {
    let definitions = definitions_of(shared, vhost)
        .ok_or_else(|| MessagingError::VhostNotFound(vhost.to_owned()))?;
    if !definitions.exchanges.contains_key(name) {
        return Ok(());
    }
    if if_unused && definitions.bindings_from(name).next().is_some() {
        return Err(MessagingError::InUse {
            kind: ResourceKind::Exchange,
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        }
        .into());
    }
    apply(
        shared,
        DefinitionCommand::DeleteExchange {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        },
    )
    .await?;
    republish(shared, vhost);
    Ok(())
}

async fn declare_queue(
    shared: &Arc<Shared>,
    record: QueueRecord,
    args: QueueArgs,
) -> Result<Arc<Queue>, BrokerError> {
    let live = shared
        .messaging
        .vhosts
        .read()
        .get(&record.vhost)
        .cloned()
        .ok_or_else(|| MessagingError::VhostNotFound(record.vhost.clone()))?;
    if let Some(existing) = live.queues.lock().get(&record.name) {
        return Ok(Arc::clone(existing));
    }
    let queue = open_and_start(shared, &record, args).await?;
    if let Err(error) = apply(shared, DefinitionCommand::DeclareQueue(record.clone())).await {
        let _ = queue.deleting().await;
        let _ = queue.close().await;
        remove_dir(queue_spec(shared, &record, QueueArgs::default()).dir).await;
        return Err(error);
    }
    live.queues
        .lock()
        .insert(record.name.clone(), Arc::clone(&queue));
    republish(shared, &record.vhost);
    tracing::debug!(queue = %record.name, vhost = %record.vhost, durable = record.durable, "declared queue");
    Ok(queue)
}

async fn delete_queue(
    shared: &Arc<Shared>,
    vhost: &str,
    name: &str,
    id: Option<Uuid>,
    if_unused: bool,
    if_empty: bool,
) -> Result<u64, BrokerError> {
    let Some(live) = shared.messaging.vhosts.read().get(vhost).cloned() else {
        return Ok(0);
    };
    let Some(queue) = live.queues.lock().get(name).cloned() else {
        return Ok(0);
    };
    if id.is_some_and(|id| id != queue.record().id) {
        return Ok(0);
    }
    queue.check_delete(if_unused, if_empty).await?;
    apply(
        shared,
        DefinitionCommand::DeleteQueue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        },
    )
    .await?;
    live.queues.lock().remove(name);
    republish(shared, vhost);
    let count = queue.deleting().await.unwrap_or(0);
    if let Err(error) = queue.close().await {
        tracing::warn!(queue = name, vhost, %error, "closing a deleted queue failed");
    }
    remove_dir(queue_spec(shared, queue.record(), QueueArgs::default()).dir).await;
    tracing::debug!(queue = name, vhost, "deleted queue");
    // Auto-delete exchanges may have gone with the queue's bindings.
    Ok(count)
}

async fn bind(
    shared: &Arc<Shared>,
    binding: BindingRecord,
    unbind: bool,
) -> Result<(), BrokerError> {
    let definitions = definitions_of(shared, &binding.vhost)
        .ok_or_else(|| MessagingError::VhostNotFound(binding.vhost.clone()))?;
    let key = binding.key();
    let exists = definitions.bindings.contains_key(&key);
    if exists != unbind {
        // Already bound, or nothing to unbind.
        return Ok(());
    }
    let vhost = binding.vhost.clone();
    let command = if unbind {
        DefinitionCommand::Unbind(binding)
    } else {
        DefinitionCommand::Bind(binding)
    };
    apply(shared, command).await?;
    republish(shared, &vhost);
    Ok(())
}

/// Closes every queue (journal and log fsynced).
pub(crate) async fn shutdown(shared: &Arc<Shared>) -> Vec<BrokerError> {
    let queues: Vec<Arc<Queue>> = shared
        .messaging
        .vhosts
        .read()
        .values()
        .flat_map(|v| v.queues.lock().values().cloned().collect::<Vec<_>>())
        .collect();
    let mut closing = tokio::task::JoinSet::new();
    for queue in queues {
        closing.spawn(async move { queue.close().await });
    }
    let mut errors = Vec::new();
    while let Some(joined) = closing.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => errors.push(error),
            Err(join_error) => errors.push(BrokerError::metadata("close queue", join_error)),
        }
    }
    errors
}
