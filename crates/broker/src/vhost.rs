//! Virtual hosts as the broker serves them, and the operations front-ends call to declare,
//! delete and bind exchanges and queues.
//!
//! Reads (routing, lookups, passive declares, equivalence checks of existing entities) are
//! answered from the virtual host's current [`RoutingTable`] without the controller.
//! Creations, deletions and bindings go through the controller, which validates again,
//! prepares queue logs, commits to the metadata store and publishes a new routing table.
//!
//! The checks and their messages follow RabbitMQ (`rabbit_channel`, `rabbit_amqqueue`,
//! `rabbit_exchange`): reserved `amq.` names, the default exchange, inequivalent
//! re-declarations, exclusive queues of other connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use parking_lot::{Mutex, RwLock};

use crate::Broker;
use crate::control::MessagingCommand;
use crate::controller::Command;
use crate::definitions::VhostDefinitions;
use crate::error::{BrokerError, MessagingError, ResourceKind};
use crate::exchange::routing::RoutingTable;
use crate::exchange::{BindingRecord, Destination, ExchangeKind, ExchangeRecord, headers};
use crate::message::value::{FieldTable, FieldValue, lookup};
use crate::queue::{Queue, QueueStat, args};
use crate::users::{AuthenticatedUser, Permission, UserRecord, hash_password, verify_password};

/// A live virtual host.
#[derive(Debug)]
pub struct Vhost {
    name: Arc<str>,
    routing: RwLock<Arc<RoutingTable>>,
    version: AtomicU64,
    /// Live queues by name. Changed by the controller only.
    pub(crate) queues: Mutex<HashMap<String, Arc<Queue>>>,
}

impl Vhost {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            routing: RwLock::new(Arc::new(RoutingTable::default())),
            version: AtomicU64::new(0),
            queues: Mutex::new(HashMap::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current routing table. Hold on to it and compare [`Self::version`] to refresh.
    pub fn routing(&self) -> Arc<RoutingTable> {
        Arc::clone(&self.routing.read())
    }

    /// Bumped whenever the routing table changes.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.routing().queue(name).cloned()
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<ExchangeRecord>> {
        self.routing().exchange(name).cloned()
    }

    /// Rebuilds the routing table from the definitions and the live queues.
    pub(crate) fn rebuild(&self, definitions: &VhostDefinitions) {
        let queues = self.queues.lock().clone();
        let table = RoutingTable::build(
            definitions.exchanges.values(),
            definitions.bindings.values(),
            queues,
        );
        *self.routing.write() = Arc::new(table);
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}

/// A request to declare an exchange.
#[derive(Debug, Clone, Default)]
pub struct ExchangeDeclare {
    pub name: String,
    pub kind: String,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// A request to declare a queue.
#[derive(Debug, Clone, Default)]
pub struct QueueDeclare {
    /// Empty: the broker names the queue (`amq.gen-...`).
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// The declaring connection (owner of an exclusive queue).
    pub connection: u64,
}

fn refused(text: String) -> BrokerError {
    MessagingError::AccessRefused(text).into()
}

fn not_found(kind: ResourceKind, vhost: &str, name: &str) -> BrokerError {
    MessagingError::NotFound {
        kind,
        vhost: vhost.to_owned(),
        name: name.to_owned(),
    }
    .into()
}

fn quoted(value: bool) -> String {
    format!("'{value}'")
}

/// A fresh server-generated name: `prefix` and 22 characters of URL-safe base64.
pub fn generated_name(prefix: &str) -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    format!(
        "{prefix}-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Refuses access to an exclusive queue from any connection but its owner.
pub fn check_exclusive(queue: &Queue, connection: u64) -> Result<(), BrokerError> {
    match queue.exclusive_owner() {
        Some(owner) if owner != connection => Err(MessagingError::Locked {
            vhost: queue.vhost().to_owned(),
            name: queue.name().to_owned(),
        }
        .into()),
        _ => Ok(()),
    }
}

impl Broker {
    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.shared.messaging.vhosts.read().get(name).cloned()
    }

    fn live_vhost(&self, name: &str) -> Result<Arc<Vhost>, BrokerError> {
        self.vhost(name)
            .ok_or_else(|| MessagingError::VhostNotFound(name.to_owned()).into())
    }

    /// A new identifier for a connection or a consumer, unique for the process's life.
    pub fn next_id(&self) -> u64 {
        self.shared.messaging.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a password; returns the user with compiled permissions.
    pub fn authenticate(&self, username: &str, password: &str) -> Option<AuthenticatedUser> {
        let state = self.shared.metadata.state();
        let record = state.messaging.users.get(username)?;
        verify_password(&record.password_hash, password).then(|| AuthenticatedUser::new(record))
    }

    /// Creates a virtual host if it does not exist.
    pub async fn ensure_vhost(&self, name: &str) -> Result<(), BrokerError> {
        let name = name.to_owned();
        self.command(|reply| Command::Messaging(MessagingCommand::PutVhost { name, reply }))
            .await
    }

    /// Creates or updates a user, keeping the stored hash if the password still matches.
    pub async fn ensure_user(
        &self,
        name: &str,
        password: &str,
        tags: Vec<String>,
        permissions: std::collections::BTreeMap<String, Permission>,
    ) -> Result<(), BrokerError> {
        let state = self.shared.metadata.state();
        let existing = state.messaging.users.get(name);
        let password_hash = match existing {
            Some(user) if verify_password(&user.password_hash, password) => {
                user.password_hash.clone()
            }
            _ => hash_password(password),
        };
        let record = UserRecord {
            name: name.to_owned(),
            password_hash,
            tags,
            permissions,
        };
        if existing == Some(&record) {
            return Ok(());
        }
        self.command(|reply| Command::Messaging(MessagingCommand::PutUser { record, reply }))
            .await
    }

    pub async fn declare_exchange(
        &self,
        vhost: &str,
        declare: ExchangeDeclare,
    ) -> Result<(), BrokerError> {
        let live = self.live_vhost(vhost)?;
        if declare.name.is_empty() {
            return Err(refused(
                "operation not permitted on the default exchange".into(),
            ));
        }
        let existing = live.exchange(&declare.name);
        if declare.passive {
            return match existing {
                Some(_) => Ok(()),
                None => Err(not_found(ResourceKind::Exchange, vhost, &declare.name)),
            };
        }
        let kind = ExchangeKind::parse(&declare.kind)
            .ok_or_else(|| MessagingError::UnknownExchangeType(declare.kind.clone()))?;
        if let Some(existing) = existing {
            return check_exchange_equivalence(&existing, kind, &declare);
        }
        if declare.name.starts_with("amq.") {
            return Err(refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                declare.name
            )));
        }
        if let Some(value) = lookup(&declare.arguments, "alternate-exchange")
            && value.as_str().is_none()
        {
            return Err(MessagingError::PreconditionFailed(format!(
                "invalid type '{}' for arg 'alternate-exchange' in exchange '{}' in vhost '{vhost}'",
                value.type_name(),
                declare.name
            ))
            .into());
        }
        let record = ExchangeRecord {
            vhost: vhost.to_owned(),
            name: declare.name.clone(),
            kind,
            durable: declare.durable,
            auto_delete: declare.auto_delete,
            internal: declare.internal,
            arguments: declare.arguments.clone(),
        };
        self.command(|reply| {
            Command::Messaging(MessagingCommand::DeclareExchange { record, reply })
        })
        .await?;
        // Another connection may have declared it first, differently.
        match self.live_vhost(vhost)?.exchange(&declare.name) {
            Some(existing) => check_exchange_equivalence(&existing, kind, &declare),
            None => Ok(()),
        }
    }

    pub async fn delete_exchange(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
    ) -> Result<(), BrokerError> {
        let live = self.live_vhost(vhost)?;
        if name.is_empty() {
            return Err(refused(
                "operation not permitted on the default exchange".into(),
            ));
        }
        if name.starts_with("amq.") {
            return Err(refused(format!(
                "deletion of system exchange '{name}' in vhost '{vhost}' not allowed"
            )));
        }
        if live.exchange(name).is_none() {
            return Ok(());
        }
        let (vhost, name) = (vhost.to_owned(), name.to_owned());
        self.command(|reply| Command::Messaging(MessagingCommand::DeleteExchange {
            vhost,
            name,
            if_unused,
            reply,
        }))
        .await
    }

    /// Declares a queue (or checks an existing one) and returns it with its counts.
    pub async fn declare_queue(
        &self,
        vhost: &str,
        declare: QueueDeclare,
    ) -> Result<(Arc<Queue>, QueueStat), BrokerError> {
        let live = self.live_vhost(vhost)?;
        if declare.passive {
            let queue = live
                .queue(&declare.name)
                .ok_or_else(|| not_found(ResourceKind::Queue, vhost, &declare.name))?;
            check_exclusive(&queue, declare.connection)?;
            let stat = queue.stat(true).await?;
            return Ok((queue, stat));
        }
        let mut declare = declare;
        if declare.name.is_empty() {
            declare.name = generated_name("amq.gen");
        }
        if let Some(queue) = live.queue(&declare.name) {
            check_queue_equivalence(&queue, &declare)?;
            let stat = queue.stat(true).await?;
            return Ok((queue, stat));
        }
        if declare.name.starts_with("amq.") {
            return Err(refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                declare.name
            )));
        }
        let parsed = args::parse(&declare.arguments).map_err(|error| {
            MessagingError::InvalidArgument {
                kind: ResourceKind::Queue,
                vhost: vhost.to_owned(),
                name: declare.name.clone(),
                arg: error.arg,
                reason: error.reason,
            }
        })?;
        let record = crate::queue::QueueRecord {
            vhost: vhost.to_owned(),
            name: declare.name.clone(),
            id: uuid::Uuid::new_v4(),
            // RabbitMQ never stores an exclusive queue as durable.
            durable: declare.durable && !declare.exclusive,
            auto_delete: declare.auto_delete,
            exclusive_owner: declare.exclusive.then_some(declare.connection),
            arguments: declare.arguments.clone(),
            created_ms: self.shared.clock.now_ms(),
        };
        let queue = self
            .command(|reply| Command::Messaging(MessagingCommand::DeclareQueue {
                record,
                args: parsed,
                reply,
            }))
            .await?;
        // Declared concurrently by someone else: it must be equivalent.
        check_queue_equivalence(&queue, &declare)?;
        let stat = queue.stat(true).await?;
        Ok((queue, stat))
    }

    /// Deletes a queue; returns the number of ready messages it held. Not an error if the
    /// queue does not exist.
    pub async fn delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: u64,
    ) -> Result<u64, BrokerError> {
        let live = self.live_vhost(vhost)?;
        let Some(queue) = live.queue(name) else {
            return Ok(0);
        };
        check_exclusive(&queue, connection)?;
        let (vhost, name) = (vhost.to_owned(), name.to_owned());
        self.command(|reply| Command::Messaging(MessagingCommand::DeleteQueue {
            vhost,
            name,
            id: None,
            if_unused,
            if_empty,
            reply,
        }))
        .await
    }

    fn check_binding(
        &self,
        binding: &BindingRecord,
        connection: u64,
    ) -> Result<Arc<Vhost>, BrokerError> {
        let live = self.live_vhost(&binding.vhost)?;
        let default_refused =
            || refused("operation not permitted on the default exchange".into());
        if binding.source.is_empty() {
            return Err(default_refused());
        }
        let table = live.routing();
        let Some(source) = table.exchange(&binding.source) else {
            return Err(not_found(
                ResourceKind::Exchange,
                &binding.vhost,
                &binding.source,
            ));
        };
        match &binding.destination {
            Destination::Queue(name) => {
                let queue = table
                    .queue(name)
                    .ok_or_else(|| not_found(ResourceKind::Queue, &binding.vhost, name))?;
                check_exclusive(queue, connection)?;
            }
            Destination::Exchange(name) => {
                if name.is_empty() {
                    return Err(default_refused());
                }
                if table.exchange(name).is_none() {
                    return Err(not_found(ResourceKind::Exchange, &binding.vhost, name));
                }
            }
        }
        if source.kind == ExchangeKind::Headers {
            headers::validate(&binding.arguments)
                .map_err(MessagingError::PreconditionFailed)?;
        }
        Ok(live)
    }

    pub async fn bind(&self, binding: BindingRecord, connection: u64) -> Result<(), BrokerError> {
        self.check_binding(&binding, connection)?;
        self.command(|reply| Command::Messaging(MessagingCommand::Bind {
            binding,
            unbind: false,
            reply,
        }))
        .await
    }

    /// Removes a binding; not an error if it does not exist.
    pub async fn unbind(
        &self,
        binding: BindingRecord,
        connection: u64,
    ) -> Result<(), BrokerError> {
        self.check_binding(&binding, connection)?;
        self.command(|reply| Command::Messaging(MessagingCommand::Bind {
            binding,
            unbind: true,
            reply,
        }))
        .await
    }

    /// Deletes the exclusive queues of a closed connection.
    pub async fn delete_exclusive_queues(&self, connection: u64) -> Result<(), BrokerError> {
        let owned: Vec<(String, String)> = self
            .shared
            .messaging
            .vhosts
            .read()
            .values()
            .flat_map(|vhost| {
                vhost
                    .queues
                    .lock()
                    .values()
                    .filter(|q| q.exclusive_owner() == Some(connection))
                    .map(|q| (q.vhost().to_owned(), q.name().to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (vhost, name) in owned {
            let result = self
                .command(|reply| Command::Messaging(MessagingCommand::DeleteQueue {
                    vhost,
                    name,
                    id: None,
                    if_unused: false,
                    if_empty: false,
                    reply,
                }))
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "cannot delete an exclusive queue of a closed connection");
            }
        }
        Ok(())
    }
}

fn check_exchange_equivalence(
    existing: &ExchangeRecord,
    kind: ExchangeKind,
    declare: &ExchangeDeclare,
) -> Result<(), BrokerError> {
    let differ = |arg: &str, received: String, current: String| -> BrokerError {
        MessagingError::Inequivalent {
            kind: ResourceKind::Exchange,
            vhost: existing.vhost.clone(),
            name: existing.name.clone(),
            arg: arg.to_owned(),
            received,
            current,
        }
        .into()
    };
    if existing.kind != kind {
        return Err(differ(
            "type",
            format!("'{}'", kind.name()),
            format!("'{}'", existing.kind.name()),
        ));
    }
    if existing.durable != declare.durable {
        return Err(differ(
            "durable",
            quoted(declare.durable),
            quoted(existing.durable),
        ));
    }
    if existing.auto_delete != declare.auto_delete {
        return Err(differ(
            "auto_delete",
            quoted(declare.auto_delete),
            quoted(existing.auto_delete),
        ));
    }
    if existing.internal != declare.internal {
        return Err(differ(
            "internal",
            quoted(declare.internal),
            quoted(existing.internal),
        ));
    }
    let current = lookup(&existing.arguments, "alternate-exchange");
    let received = lookup(&declare.arguments, "alternate-exchange");
    let same = match (current, received) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same_value(b),
        _ => false,
    };
    if !same {
        let describe = |v: Option<&FieldValue>| match v {
            None => "none".to_owned(),
            Some(v) => format!("the value '{}' of type '{}'", v.display(), v.type_name()),
        };
        return Err(differ(
            "alternate-exchange",
            describe(received),
            describe(current),
        ));
    }
    Ok(())
}

fn check_queue_equivalence(queue: &Queue, declare: &QueueDeclare) -> Result<(), BrokerError> {
    let record = queue.record();
    // An exclusive queue of another connection, or a mismatch of the exclusive flag.
    let exclusive_matches = match record.exclusive_owner {
        Some(owner) => declare.exclusive && owner == declare.connection,
        None => !declare.exclusive,
    };
    if !exclusive_matches {
        return Err(MessagingError::Locked {
            vhost: record.vhost.clone(),
            name: record.name.clone(),
        }
        .into());
    }
    let differ = |arg: &str, received: bool, current: bool| -> BrokerError {
        MessagingError::Inequivalent {
            kind: ResourceKind::Queue,
            vhost: record.vhost.clone(),
            name: record.name.clone(),
            arg: arg.to_owned(),
            received: quoted(received),
            current: quoted(current),
        }
        .into()
    };
    // RabbitMQ never makes an exclusive queue durable; compare what it would have stored.
    let durable = declare.durable && !declare.exclusive;
    let current_durable = record.durable && record.exclusive_owner.is_none();
    if durable != current_durable {
        return Err(differ("durable", durable, current_durable));
    }
    if declare.auto_delete != record.auto_delete {
        return Err(differ(
            "auto_delete",
            declare.auto_delete,
            record.auto_delete,
        ));
    }
    if let Some((arg, received, current)) =
        args::first_difference(&record.arguments, &declare.arguments)
    {
        return Err(MessagingError::Inequivalent {
            kind: ResourceKind::Queue,
            vhost: record.vhost.clone(),
            name: record.name.clone(),
            arg,
            received,
            current,
        }
        .into());
    }
    Ok(())
}
