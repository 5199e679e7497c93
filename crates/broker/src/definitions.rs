//! Messaging definitions: virtual hosts, exchanges, queues, bindings and users, as the
//! metadata store keeps them.
//!
//! Every change is a [`DefinitionCommand`] carried by `MetadataCommand::Messaging` and applied by
//! `MetadataStore::apply` (the one place definitions change). [`Definitions::apply`] checks a
//! command and computes the state after it, cascading as RabbitMQ does: deleting a queue or
//! exchange removes its bindings, and an auto-delete exchange that loses its last binding goes
//! too; [`effects`] says what that means for the live queues and routing tables.
//!
//! Only what must survive a restart is written to disk: durable exchanges, durable
//! non-exclusive queues, bindings between two such, virtual hosts and users. Transient
//! definitions live in the in-memory state only, so declaring a temporary queue costs no fsync.
//!
//! Tables in `meta.redb` (JSON values): `amqp_vhosts` (name), `amqp_users` (name),
//! `amqp_exchanges` and `amqp_queues` (`vhost NUL name`), `amqp_bindings`
//! (`vhost NUL binding key`).

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

pub use crate::command::DefinitionCommand;
use crate::command::Effect;
use crate::error::{BrokerError, MessagingError, ResourceKind};
use crate::exchange::{BindingRecord, Destination, ExchangeRecord, default_exchanges};
use crate::limits::{Limit, VhostLimits};
use crate::queue::QueueRecord;
use crate::users::UserRecord;

const VHOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("amqp_vhosts");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("amqp_users");
const EXCHANGES: TableDefinition<&str, &[u8]> = TableDefinition::new("amqp_exchanges");
const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("amqp_queues");
const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("amqp_bindings");

/// A virtual host's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "VhostLimits::is_empty")]
    pub limits: VhostLimits,
}

/// Everything defined in one virtual host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VhostDefinitions {
    pub exchanges: BTreeMap<String, ExchangeRecord>,
    pub queues: BTreeMap<String, QueueRecord>,
    /// By [`BindingRecord::key`].
    pub bindings: BTreeMap<String, BindingRecord>,
    /// `max-connections` and `max-queues`.
    pub limits: VhostLimits,
}

impl VhostDefinitions {
    fn is_persistent(&self, binding: &BindingRecord) -> bool {
        let source = self
            .exchanges
            .get(&binding.source)
            .is_some_and(|x| x.durable);
        let destination = match &binding.destination {
            Destination::Queue(name) => self.queues.get(name).is_some_and(|q| q.is_persistent()),
            Destination::Exchange(name) => self.exchanges.get(name).is_some_and(|x| x.durable),
        };
        source && destination
    }

    /// Bindings whose source is `exchange`.
    pub fn bindings_from<'a>(
        &'a self,
        exchange: &'a str,
    ) -> impl Iterator<Item = &'a BindingRecord> + 'a {
        self.bindings.values().filter(move |b| b.source == exchange)
    }

    /// Removes the bindings `doomed` selects, then any auto-delete exchange left without
    /// bindings as a source, and so on.
    fn remove_bindings(&mut self, doomed: impl Fn(&BindingRecord) -> bool) {
        let mut sources: Vec<String> = Vec::new();
        self.bindings.retain(|_, binding| {
            if doomed(binding) {
                sources.push(binding.source.clone());
                false
            } else {
                true
            }
        });
        while let Some(source) = sources.pop() {
            let Some(exchange) = self.exchanges.get(&source) else {
                continue;
            };
            if !exchange.auto_delete || self.bindings_from(&source).next().is_some() {
                continue;
            }
            self.exchanges.remove(&source);
            self.bindings.retain(|_, binding| {
                let touches = binding.source == source
                    || binding.destination == Destination::Exchange(source.clone());
                if touches && binding.source != source {
                    sources.push(binding.source.clone());
                }
                !touches
            });
        }
    }
}

/// All messaging definitions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Definitions {
    pub vhosts: BTreeMap<String, Arc<VhostDefinitions>>,
    pub users: BTreeMap<String, UserRecord>,
}

fn not_found(kind: ResourceKind, vhost: &str, name: &str) -> BrokerError {
    MessagingError::NotFound {
        kind,
        vhost: vhost.to_owned(),
        name: name.to_owned(),
    }
    .into()
}

impl Definitions {
    fn vhost_mut(&mut self, name: &str) -> Result<&mut VhostDefinitions, BrokerError> {
        self.vhosts
            .get_mut(name)
            .map(Arc::make_mut)
            .ok_or_else(|| MessagingError::VhostNotFound(name.to_owned()).into())
    }

    /// Checks `command` against these definitions and applies it.
    pub fn apply(&mut self, command: &DefinitionCommand) -> Result<(), BrokerError> {
        match command {
            DefinitionCommand::PutVhost { name } => {
                self.vhosts.entry(name.clone()).or_insert_with(|| {
                    Arc::new(VhostDefinitions {
                        exchanges: default_exchanges(name)
                            .into_iter()
                            .map(|x| (x.name.clone(), x))
                            .collect(),
                        ..VhostDefinitions::default()
                    })
                });
            }
            DefinitionCommand::DeleteVhost { name } => {
                if self.vhosts.remove(name).is_none() {
                    return Err(MessagingError::VhostNotFound(name.clone()).into());
                }
                // As in RabbitMQ, permissions in a deleted virtual host go with it: one created
                // later under the same name starts with none.
                for user in self.users.values_mut() {
                    user.permissions.remove(name);
                }
            }
            DefinitionCommand::PutUser(user) => {
                self.users.insert(user.name.clone(), user.clone());
            }
            DefinitionCommand::DeleteUser { name } => {
                self.users.remove(name);
            }
            DefinitionCommand::DeclareExchange(record) => {
                let vhost = self.vhost_mut(&record.vhost)?;
                vhost.exchanges.insert(record.name.clone(), record.clone());
            }
            DefinitionCommand::DeleteExchange { vhost, name } => {
                let defs = self.vhost_mut(vhost)?;
                if defs.exchanges.remove(name).is_none() {
                    return Err(not_found(ResourceKind::Exchange, vhost, name));
                }
                let gone = Destination::Exchange(name.clone());
                defs.remove_bindings(|b| b.source == *name || b.destination == gone);
            }
            DefinitionCommand::SetVhostLimits { vhost, limits } => {
                self.vhost_mut(vhost)?.limits = *limits;
            }
            DefinitionCommand::DeclareQueue(record) => {
                let vhost = self.vhost_mut(&record.vhost)?;
                if let Some(max) = vhost.limits.max_queues
                    && !vhost.queues.contains_key(&record.name)
                    && vhost.queues.len() as u64 >= max
                {
                    return Err(MessagingError::LimitReached {
                        limit: Limit::VhostQueues,
                        reason: format!(
                            "cannot declare queue '{}': queue limit in vhost '{}' ({max}) is reached",
                            record.name, record.vhost
                        ),
                    }
                    .into());
                }
                vhost.queues.insert(record.name.clone(), record.clone());
            }
            DefinitionCommand::DeleteQueue { vhost, name } => {
                let defs = self.vhost_mut(vhost)?;
                if defs.queues.remove(name).is_none() {
                    return Err(not_found(ResourceKind::Queue, vhost, name));
                }
                let gone = Destination::Queue(name.clone());
                defs.remove_bindings(|b| b.destination == gone);
            }
            DefinitionCommand::Bind(binding) => {
                let defs = self.vhost_mut(&binding.vhost)?;
                if !defs.exchanges.contains_key(&binding.source) {
                    return Err(not_found(
                        ResourceKind::Exchange,
                        &binding.vhost,
                        &binding.source,
                    ));
                }
                let exists = match &binding.destination {
                    Destination::Queue(name) => defs.queues.contains_key(name),
                    Destination::Exchange(name) => defs.exchanges.contains_key(name),
                };
                if !exists {
                    let kind = match binding.destination {
                        Destination::Queue(_) => ResourceKind::Queue,
                        Destination::Exchange(_) => ResourceKind::Exchange,
                    };
                    return Err(not_found(kind, &binding.vhost, binding.destination.name()));
                }
                defs.bindings.insert(binding.key(), binding.clone());
            }
            DefinitionCommand::Unbind(binding) => {
                let key = binding.key();
                let defs = self.vhost_mut(&binding.vhost)?;
                defs.remove_bindings(|b| b.key() == key);
            }
        }
        Ok(())
    }
}

/// What a messaging command changes outside the definitions: queues to start, the routing
/// table to publish (or the virtual host to drop, with its queues), then queues to stop, once
/// the table no longer routes to them. A queue counts as another one when its id changed (deleted and
/// declared again).
pub(crate) fn effects(
    old: &Definitions,
    new: &Definitions,
    command: &DefinitionCommand,
) -> Vec<Effect> {
    match command.vhost() {
        Some(vhost) => vhost_effects(old, new, vhost),
        None => Vec::new(),
    }
}

/// What changed in virtual host `vhost` between `old` and `new`, as [`effects`] orders it.
pub(crate) fn vhost_effects(old: &Definitions, new: &Definitions, vhost: &str) -> Vec<Effect> {
    let empty = VhostDefinitions::default();
    let before = old.vhosts.get(vhost);
    let after = new.vhosts.get(vhost);
    let was = before.map_or(&empty, |v| v.as_ref());
    let is = after.map_or(&empty, |v| v.as_ref());
    let mut effects = Vec::new();
    for (name, record) in &is.queues {
        if was.queues.get(name).map(|q| q.id) != Some(record.id) {
            effects.push(Effect::StartQueue {
                vhost: vhost.to_owned(),
                name: name.clone(),
            });
        }
    }
    match (before, after) {
        // Applying a command copies the definitions it changes, so an untouched virtual host
        // is the very same value.
        (Some(before), Some(after)) if Arc::ptr_eq(before, after) => {}
        (_, Some(_)) => effects.push(Effect::Republish {
            vhost: vhost.to_owned(),
        }),
        (Some(_), None) => effects.push(Effect::DropVhost {
            name: vhost.to_owned(),
        }),
        (None, None) => {}
    }
    if after.is_none() {
        // Dropping the virtual host stops every queue it had.
        return effects;
    }
    for (name, record) in &was.queues {
        if is.queues.get(name).map(|q| q.id) != Some(record.id) {
            effects.push(Effect::StopQueue {
                vhost: vhost.to_owned(),
                name: name.clone(),
                id: record.id,
            });
        }
    }
    effects
}

fn meta_error(op: &'static str, error: impl std::fmt::Display) -> BrokerError {
    BrokerError::Metadata {
        op,
        reason: error.to_string(),
    }
}

fn scoped(vhost: &str, name: &str) -> String {
    format!("{vhost}\u{0}{name}")
}

/// Creates the tables, so read transactions find them.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), BrokerError> {
    for table in [VHOSTS, USERS, EXCHANGES, QUEUES, BINDINGS] {
        txn.open_table(table)
            .map_err(|e| meta_error("open table", e))?;
    }
    Ok(())
}

/// One row to write or delete.
pub(crate) struct Change {
    table: TableDefinition<'static, &'static str, &'static [u8]>,
    key: String,
    /// `None` deletes the row.
    value: Option<Vec<u8>>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change")
            .field("key", &self.key)
            .field("delete", &self.value.is_none())
            .finish()
    }
}

fn put<T: Serialize>(
    changes: &mut Vec<Change>,
    table: TableDefinition<'static, &'static str, &'static [u8]>,
    key: String,
    value: &T,
) -> Result<(), BrokerError> {
    let bytes = serde_json::to_vec(value).map_err(|e| meta_error("encode", e))?;
    changes.push(Change {
        table,
        key,
        value: Some(bytes),
    });
    Ok(())
}

fn delete(
    changes: &mut Vec<Change>,
    table: TableDefinition<'static, &'static str, &'static [u8]>,
    key: String,
) {
    changes.push(Change {
        table,
        key,
        value: None,
    });
}

/// The rows `command` changed between `old` and `new`, durable records only. Empty when the
/// command touched transient definitions alone, so no disk write is needed.
pub(crate) fn changes(
    old: &Definitions,
    new: &Definitions,
    command: &DefinitionCommand,
) -> Result<Vec<Change>, BrokerError> {
    let mut changes = Vec::new();
    match command {
        DefinitionCommand::PutUser(user) => put(&mut changes, USERS, user.name.clone(), user)?,
        DefinitionCommand::DeleteUser { name } => delete(&mut changes, USERS, name.clone()),
        DefinitionCommand::DeleteVhost { .. } => {
            for (name, user) in &new.users {
                if old.users.get(name) != Some(user) {
                    put(&mut changes, USERS, name.clone(), user)?;
                }
            }
        }
        _ => {}
    }
    let Some(vhost) = command.vhost() else {
        return Ok(changes);
    };
    match (
        old.vhosts.contains_key(vhost),
        new.vhosts.contains_key(vhost),
    ) {
        (true, false) => delete(&mut changes, VHOSTS, vhost.to_owned()),
        (_, true) => {
            let limits = new.vhosts.get(vhost).map(|v| v.limits).unwrap_or_default();
            let had = old.vhosts.get(vhost).map(|v| v.limits);
            if had != Some(limits) {
                let record = VhostRecord {
                    name: vhost.to_owned(),
                    limits,
                };
                put(&mut changes, VHOSTS, vhost.to_owned(), &record)?;
            }
        }
        (false, false) => {}
    }
    let empty = VhostDefinitions::default();
    let before = old.vhosts.get(vhost).map_or(&empty, |v| v.as_ref());
    let after = new.vhosts.get(vhost).map_or(&empty, |v| v.as_ref());
    for (name, record) in &before.exchanges {
        if record.durable && after.exchanges.get(name).is_none_or(|x| !x.durable) {
            delete(&mut changes, EXCHANGES, scoped(vhost, name));
        }
    }
    for (name, record) in &after.exchanges {
        if record.durable && before.exchanges.get(name) != Some(record) {
            put(&mut changes, EXCHANGES, scoped(vhost, name), record)?;
        }
    }
    for (name, record) in &before.queues {
        if record.is_persistent() && after.queues.get(name).is_none_or(|q| !q.is_persistent()) {
            delete(&mut changes, QUEUES, scoped(vhost, name));
        }
    }
    for (name, record) in &after.queues {
        if record.is_persistent() && before.queues.get(name) != Some(record) {
            put(&mut changes, QUEUES, scoped(vhost, name), record)?;
        }
    }
    for (key, binding) in &before.bindings {
        if before.is_persistent(binding) && !after.bindings.contains_key(key) {
            delete(&mut changes, BINDINGS, scoped(vhost, key));
        }
    }
    for (key, binding) in &after.bindings {
        if !before.bindings.contains_key(key) && after.is_persistent(binding) {
            put(&mut changes, BINDINGS, scoped(vhost, key), binding)?;
        }
    }
    Ok(changes)
}

/// Replaces every persisted definition with the durable ones of `definitions` (a replicated
/// controller's snapshot installed on this node).
pub(crate) fn replace_all(
    txn: &WriteTransaction,
    definitions: &Definitions,
) -> Result<(), BrokerError> {
    for table in [VHOSTS, USERS, EXCHANGES, QUEUES, BINDINGS] {
        txn.delete_table(table)
            .map_err(|e| meta_error("clear table", e))?;
    }
    create_tables(txn)?;
    let mut changes = Vec::new();
    for (name, user) in &definitions.users {
        put(&mut changes, USERS, name.clone(), user)?;
    }
    for (vhost, defined) in &definitions.vhosts {
        let record = VhostRecord {
            name: vhost.clone(),
            limits: defined.limits,
        };
        put(&mut changes, VHOSTS, vhost.clone(), &record)?;
        for (name, record) in &defined.exchanges {
            if record.durable {
                put(&mut changes, EXCHANGES, scoped(vhost, name), record)?;
            }
        }
        for (name, record) in &defined.queues {
            if record.is_persistent() {
                put(&mut changes, QUEUES, scoped(vhost, name), record)?;
            }
        }
        for (key, binding) in &defined.bindings {
            if defined.is_persistent(binding) {
                put(&mut changes, BINDINGS, scoped(vhost, key), binding)?;
            }
        }
    }
    persist(txn, &changes)
}

/// Writes `changes` in `txn`.
pub(crate) fn persist(txn: &WriteTransaction, changes: &[Change]) -> Result<(), BrokerError> {
    for change in changes {
        let mut table = txn
            .open_table(change.table)
            .map_err(|e| meta_error("open table", e))?;
        match &change.value {
            Some(bytes) => {
                table
                    .insert(change.key.as_str(), bytes.as_slice())
                    .map_err(|e| meta_error("write definition", e))?;
            }
            None => {
                table
                    .remove(change.key.as_str())
                    .map_err(|e| meta_error("delete definition", e))?;
            }
        }
    }
    Ok(())
}

fn read_all<T: for<'de> Deserialize<'de>>(
    txn: &ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<T>, BrokerError> {
    let table = txn
        .open_table(table)
        .map_err(|e| meta_error("open table", e))?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(|e| meta_error("read", e))? {
        let (key, value) = entry.map_err(|e| meta_error("read", e))?;
        let record = serde_json::from_slice(value.value()).map_err(|e| {
            meta_error(
                "decode",
                format!("definition {:?}: {e}", key.value().replace('\u{0}', "/")),
            )
        })?;
        out.push(record);
    }
    Ok(out)
}

/// Loads every persisted definition.
pub(crate) fn load(txn: &ReadTransaction) -> Result<Definitions, BrokerError> {
    let mut definitions = Definitions::default();
    for vhost in read_all::<VhostRecord>(txn, VHOSTS)? {
        definitions.apply(&DefinitionCommand::PutVhost {
            name: vhost.name.clone(),
        })?;
        definitions.apply(&DefinitionCommand::SetVhostLimits {
            vhost: vhost.name,
            limits: vhost.limits,
        })?;
    }
    for user in read_all::<UserRecord>(txn, USERS)? {
        definitions.users.insert(user.name.clone(), user);
    }
    for exchange in read_all::<ExchangeRecord>(txn, EXCHANGES)? {
        if let Some(vhost) = definitions.vhosts.get_mut(&exchange.vhost) {
            Arc::make_mut(vhost)
                .exchanges
                .insert(exchange.name.clone(), exchange);
        }
    }
    for queue in read_all::<QueueRecord>(txn, QUEUES)? {
        if let Some(vhost) = definitions.vhosts.get_mut(&queue.vhost) {
            Arc::make_mut(vhost)
                .queues
                .insert(queue.name.clone(), queue);
        }
    }
    for binding in read_all::<BindingRecord>(txn, BINDINGS)? {
        if let Some(vhost) = definitions.vhosts.get_mut(&binding.vhost) {
            let vhost = Arc::make_mut(vhost);
            let valid = vhost.exchanges.contains_key(&binding.source)
                && match &binding.destination {
                    Destination::Queue(name) => vhost.queues.contains_key(name),
                    Destination::Exchange(name) => vhost.exchanges.contains_key(name),
                };
            if valid {
                vhost.bindings.insert(binding.key(), binding);
            }
        }
    }
    Ok(definitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::ExchangeKind;

    fn exchange(name: &str, auto_delete: bool) -> ExchangeRecord {
        ExchangeRecord {
            vhost: "/".into(),
            name: name.into(),
            kind: ExchangeKind::Fanout,
            durable: true,
            auto_delete,
            internal: false,
            arguments: Vec::new(),
        }
    }

    fn queue(name: &str) -> QueueRecord {
        QueueRecord {
            vhost: "/".into(),
            name: name.into(),
            id: uuid::Uuid::new_v4(),
            durable: true,
            auto_delete: false,
            exclusive_owner: None,
            arguments: Vec::new(),
            created_ms: 0,
            node: None,
        }
    }

    fn bind(source: &str, destination: Destination) -> BindingRecord {
        BindingRecord {
            vhost: "/".into(),
            source: source.into(),
            destination,
            routing_key: String::new(),
            arguments: Vec::new(),
        }
    }

    #[test]
    fn deleting_a_queue_cascades_to_auto_delete_exchanges() {
        let mut defs = Definitions::default();
        defs.apply(&DefinitionCommand::PutVhost { name: "/".into() })
            .unwrap();
        defs.apply(&DefinitionCommand::DeclareExchange(exchange("a", true)))
            .unwrap();
        defs.apply(&DefinitionCommand::DeclareExchange(exchange("b", true)))
            .unwrap();
        defs.apply(&DefinitionCommand::DeclareQueue(queue("q")))
            .unwrap();
        defs.apply(&DefinitionCommand::Bind(bind(
            "a",
            Destination::Exchange("b".into()),
        )))
        .unwrap();
        defs.apply(&DefinitionCommand::Bind(bind(
            "b",
            Destination::Queue("q".into()),
        )))
        .unwrap();
        assert!(
            defs.apply(&DefinitionCommand::Bind(bind(
                "missing",
                Destination::Queue("q".into())
            )))
            .is_err()
        );
        defs.apply(&DefinitionCommand::DeleteQueue {
            vhost: "/".into(),
            name: "q".into(),
        })
        .unwrap();
        let vhost = &defs.vhosts["/"];
        assert!(
            !vhost.exchanges.contains_key("b"),
            "b lost its last binding"
        );
        assert!(!vhost.exchanges.contains_key("a"), "then a lost its own");
        assert!(vhost.bindings.is_empty());
        assert!(vhost.exchanges.contains_key("amq.direct"));
    }
}
