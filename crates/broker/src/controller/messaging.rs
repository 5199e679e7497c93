//! Messaging requests (virtual hosts, users, exchanges, queues, bindings): checked against the
//! definitions and the live queues, turned into commands, committed; and the effects that
//! serve them: queue owners started and stopped, routing tables published.
//!
//! Each virtual host's live state ([`Vhost`]) is changed here only, on the controller task.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::{Mutex, RwLock};
use sluice_storage::{FsyncPolicy, LogConfig, StorageError};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::effects::{commit, remove_dirs};
use crate::Shared;
use crate::command::{DefinitionCommand, MetadataCommand};
use crate::definitions::VhostDefinitions;
use crate::error::{BrokerError, MessagingError, ResourceKind};
use crate::exchange::{BindingRecord, ExchangeRecord};
use crate::limits::VhostLimits;
use crate::queue::deadletter::{self, DeadLetter, FORWARDER_CAPACITY};
use crate::queue::handler::{QueueNotice, QueueServices};
use crate::queue::{
    Queue, QueueArgs, QueueRecord, QueueSpec, open_queue, start_queue as start_owner,
};
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

/// Messaging requests to the controller.
#[derive(Debug)]
pub(crate) enum MessagingRequest {
    PutVhost {
        name: String,
        reply: Reply<()>,
    },
    DeleteVhost {
        name: String,
        reply: Reply<()>,
    },
    SetVhostLimits {
        vhost: String,
        limits: VhostLimits,
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
    /// Declares a queue (its arguments already checked); answers with the live queue.
    DeclareQueue {
        record: QueueRecord,
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

fn definitions_of(shared: &Shared, vhost: &str) -> Option<Arc<VhostDefinitions>> {
    shared.metadata.state().messaging.vhosts.get(vhost).cloned()
}

fn live_or_new(shared: &Shared, vhost: &str) -> Arc<Vhost> {
    let mut vhosts = shared.messaging.vhosts.write();
    Arc::clone(
        vhosts
            .entry(vhost.to_owned())
            .or_insert_with(|| Arc::new(Vhost::new(vhost))),
    )
}

/// Effect: publishes a virtual host's routing table from its current definitions.
pub(super) fn republish(shared: &Shared, vhost: &str) {
    let Some(definitions) = definitions_of(shared, vhost) else {
        return;
    };
    live_or_new(shared, vhost).rebuild(&definitions);
}

/// Effect: opens a defined queue's log and starts its owner (unless it already runs).
pub(super) async fn start_queue(
    shared: &Arc<Shared>,
    vhost: &str,
    name: &str,
) -> Result<(), BrokerError> {
    let Some(record) = definitions_of(shared, vhost).and_then(|d| d.queues.get(name).cloned())
    else {
        return Ok(());
    };
    let live = live_or_new(shared, vhost);
    if live
        .queues
        .lock()
        .get(name)
        .is_some_and(|q| q.record().id == record.id)
    {
        return Ok(());
    }
    let args = crate::queue::args::parse(&record.arguments).unwrap_or_else(|error| {
        tracing::warn!(queue = %record.name, vhost = %record.vhost, arg = %error.arg, reason = %error.reason, "stored queue argument is invalid; ignoring the queue's arguments");
        QueueArgs::default()
    });
    if let Some(node) = record.node.filter(|&node| node != shared.config.node_id) {
        // Its home is another node: requests for it are forwarded there.
        let queue = Queue::remote(record.clone(), args, node, Arc::clone(&shared.forwarding));
        live.queues
            .lock()
            .insert(record.name.clone(), Arc::new(queue));
        tracing::debug!(queue = %record.name, vhost = %record.vhost, node, "queue lives on another node");
        return Ok(());
    }
    let spec = queue_spec(shared, &record, args);
    let opened = {
        let spec = spec.clone();
        let clock = Arc::clone(&shared.clock);
        tokio::task::spawn_blocking(move || open_queue(&spec, clock.as_ref()))
            .await
            .map_err(|e| BrokerError::metadata("open queue", e))??
    };
    let (queue, task) = start_owner(
        &spec,
        opened,
        shared.owner_options(),
        shared.messaging.services.clone(),
    );
    shared.supervisor.watch(
        format!("queue '{}' in vhost '{}'", record.name, record.vhost),
        task,
    );
    live.queues.lock().insert(record.name.clone(), queue);
    tracing::debug!(queue = %record.name, vhost = %record.vhost, durable = record.durable, "started queue");
    Ok(())
}

/// Closes a queue that is no longer defined (its consumers get basic.cancel) and removes its
/// files.
async fn close_and_remove(shared: &Shared, queue: Arc<Queue>) {
    let _ = queue.deleting().await;
    if let Err(error) = queue.close().await {
        tracing::warn!(queue = queue.name(), vhost = queue.vhost(), %error, "closing a deleted queue failed");
    }
    remove_dirs(vec![
        queue_spec(shared, queue.record(), QueueArgs::default()).dir,
    ])
    .await;
}

/// Effect: stops a deleted queue, after the routing table that no longer has it.
pub(super) async fn stop_queue(shared: &Arc<Shared>, vhost: &str, name: &str, id: Uuid) {
    let Some(live) = shared.messaging.vhosts.read().get(vhost).cloned() else {
        return;
    };
    let removed = {
        let mut queues = live.queues.lock();
        match queues.get(name) {
            Some(queue) if queue.record().id == id => queues.remove(name),
            _ => None,
        }
    };
    if let Some(queue) = removed {
        close_and_remove(shared, queue).await;
        tracing::debug!(queue = name, vhost, "deleted queue");
    }
}

/// Effect: a deleted virtual host. Whoever still holds its routing table finds no exchange to
/// publish to, its connections are told to close, and its queues are stopped.
pub(super) async fn drop_vhost(shared: &Arc<Shared>, name: &str) {
    let Some(live) = shared.messaging.vhosts.write().remove(name) else {
        return;
    };
    let queues: Vec<Arc<Queue>> = live.queues.lock().drain().map(|(_, q)| q).collect();
    live.rebuild(&VhostDefinitions::default());
    live.deleted().cancel();
    for queue in queues {
        close_and_remove(shared, queue).await;
    }
    tracing::info!(vhost = name, "deleted virtual host");
}

/// Removes queue directories no defined queue owns (a queue deleted while the broker was
/// down, a transient queue of the last run). Called once, at start-up.
pub(super) async fn remove_unowned_queue_dirs(shared: &Arc<Shared>) -> Result<(), BrokerError> {
    let dir = queues_dir(shared);
    let state = shared.metadata.state();
    let mut wanted = std::collections::HashSet::new();
    for vhost in state.messaging.vhosts.values() {
        for queue in vhost.queues.values() {
            wanted.insert(queue.id.to_string());
        }
    }
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
    .map_err(|e| BrokerError::metadata("list queue directories", e))?
}

async fn apply(shared: &Arc<Shared>, command: DefinitionCommand) -> Result<(), BrokerError> {
    let result = commit(shared, MetadataCommand::Messaging(command)).await;
    if let Err(BrokerError::Messaging(error)) = &result
        && let MessagingError::LimitReached { limit, .. } = error.as_ref()
    {
        shared.refusals.count(*limit);
    }
    result
}

/// Starts the dead-letter forwarder and the task that acts on queues' requests to be deleted.
pub(crate) fn start_services(shared: &Arc<Shared>, requests: mpsc::Sender<super::Request>) {
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
            let request = super::Request::Messaging(MessagingRequest::DeleteQueue {
                vhost,
                name,
                id: Some(id),
                if_unused,
                if_empty: false,
                reply,
            });
            if requests.send(request).await.is_err() {
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

pub(super) async fn handle(shared: &Arc<Shared>, request: MessagingRequest) {
    match request {
        MessagingRequest::PutVhost { name, reply } => {
            let _ = reply.send(put_vhost(shared, &name).await);
        }
        MessagingRequest::DeleteVhost { name, reply } => {
            let _ = reply.send(delete_vhost(shared, &name).await);
        }
        MessagingRequest::SetVhostLimits {
            vhost,
            limits,
            reply,
        } => {
            let command = DefinitionCommand::SetVhostLimits { vhost, limits };
            let _ = reply.send(apply(shared, command).await);
        }
        MessagingRequest::PutUser { record, reply } => {
            let _ = reply.send(apply(shared, DefinitionCommand::PutUser(record)).await);
        }
        MessagingRequest::DeleteUser { name, reply } => {
            let _ = reply.send(apply(shared, DefinitionCommand::DeleteUser { name }).await);
        }
        MessagingRequest::DeclareExchange { record, reply } => {
            let _ = reply.send(declare_exchange(shared, record).await);
        }
        MessagingRequest::DeleteExchange {
            vhost,
            name,
            if_unused,
            reply,
        } => {
            let _ = reply.send(delete_exchange(shared, &vhost, &name, if_unused).await);
        }
        MessagingRequest::DeclareQueue { record, reply } => {
            let _ = reply.send(declare_queue(shared, record).await);
        }
        MessagingRequest::DeleteQueue {
            vhost,
            name,
            id,
            if_unused,
            if_empty,
            reply,
        } => {
            let _ = reply.send(delete_queue(shared, &vhost, &name, id, if_unused, if_empty).await);
        }
        MessagingRequest::Bind {
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
    Ok(())
}

/// Deletes a virtual host with everything in it: one command drops its exchanges, queues,
/// bindings and the users' permissions there; its effect stops its queues (consumers get
/// basic.cancel), removes their directories, and tells its connections to close.
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
    .await
}

async fn declare_exchange(shared: &Arc<Shared>, record: ExchangeRecord) -> Result<(), BrokerError> {
    let definitions = definitions_of(shared, &record.vhost)
        .ok_or_else(|| MessagingError::VhostNotFound(record.vhost.clone()))?;
    if definitions.exchanges.contains_key(&record.name) {
        // Declared meanwhile; the caller checks equivalence.
        return Ok(());
    }
    apply(shared, DefinitionCommand::DeclareExchange(record)).await
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
    .await
}

fn live_queue(shared: &Shared, vhost: &str, name: &str) -> Option<Arc<Queue>> {
    let live = shared.messaging.vhosts.read().get(vhost).cloned()?;
    live.queues.lock().get(name).cloned()
}

async fn declare_queue(
    shared: &Arc<Shared>,
    record: QueueRecord,
) -> Result<Arc<Queue>, BrokerError> {
    if definitions_of(shared, &record.vhost).is_none() {
        return Err(MessagingError::VhostNotFound(record.vhost.clone()).into());
    }
    if let Some(existing) = live_queue(shared, &record.vhost, &record.name) {
        // Declared meanwhile; the caller checks equivalence.
        return Ok(existing);
    }
    let mut record = record;
    if record.is_persistent()
        && let Some(link) = shared.cluster.get()
    {
        // The controller places a durable queue once; every node learns where from the log.
        record.node = Some(link.place_queue(record.id));
    }
    let (vhost, name, id) = (record.vhost.clone(), record.name.clone(), record.id);
    if let Err(error) = apply(shared, DefinitionCommand::DeclareQueue(record)).await {
        // Its files could not be made: a queue nothing serves must not stay defined.
        let defined = definitions_of(shared, &vhost)
            .and_then(|d| d.queues.get(&name).map(|q| q.id))
            == Some(id);
        if defined {
            let undo = DefinitionCommand::DeleteQueue {
                vhost: vhost.clone(),
                name: name.clone(),
            };
            if let Err(undo_error) = apply(shared, undo).await {
                tracing::error!(queue = %name, %vhost, %undo_error, "cannot undo the declaration of a queue that failed to start");
            }
        }
        return Err(error);
    }
    live_queue(shared, &vhost, &name).ok_or_else(|| {
        MessagingError::NotFound {
            kind: ResourceKind::Queue,
            vhost,
            name,
        }
        .into()
    })
}

async fn delete_queue(
    shared: &Arc<Shared>,
    vhost: &str,
    name: &str,
    id: Option<Uuid>,
    if_unused: bool,
    if_empty: bool,
) -> Result<u64, BrokerError> {
    let Some(queue) = live_queue(shared, vhost, name) else {
        return Ok(0);
    };
    if id.is_some_and(|id| id != queue.record().id) {
        return Ok(0);
    }
    let ready_count = queue.check_delete(if_unused, if_empty).await?;
    apply(
        shared,
        DefinitionCommand::DeleteQueue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        },
    )
    .await?;
    Ok(ready_count)
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
    let command = if unbind {
        DefinitionCommand::Unbind(binding)
    } else {
        DefinitionCommand::Bind(binding)
    };
    apply(shared, command).await
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
