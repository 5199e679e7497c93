//! Durable definitions: what topics exist, their partitions (with owner and leader), and
//! their configuration overrides; also the producer id counter.
//!
//! Every change is a [`MetadataCommand`] applied by [`MetadataStore::apply`]: it is checked
//! against the current state by [`MetadataState::apply`], a pure function that returns the next
//! state and the [`Effect`]s the change has outside the definitions, written in one redb
//! transaction, and only then made visible; the controller then carries out the effects. This
//! is the one place metadata changes, so a replicated state machine (Raft) can later carry the
//! same commands to every node and apply them in the same order.
//!
//! Readers take an `Arc` snapshot of the whole state; it is never mutated in place.
//!
//! The store is a redb database (`meta.redb` in the data directory). Values are JSON, so the
//! format can grow fields without a migration.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use uuid::Uuid;

use crate::command::Effect;
use crate::definitions::{self, Definitions};
use crate::error::BrokerError;

pub use crate::command::{MetadataCommand, NodeId, PartitionRecord, TopicRecord};

/// The definitions at one point in time. Serializable whole, for a replicated controller's
/// snapshots; maps are ordered, so equal states encode to equal bytes.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetadataState {
    pub topics: BTreeMap<String, TopicRecord>,
    pub messaging: Definitions,
    /// The first producer id not reserved yet.
    pub next_producer_id: u64,
    /// Replicated partition groups numbered so far (see [`PartitionRecord::group`]).
    #[serde(default)]
    pub partition_groups: u32,
}

/// Gives each replicated partition (more than one replica) the next Raft group number.
fn number_groups(counter: &mut u32, partitions: &mut [PartitionRecord]) {
    for partition in partitions {
        partition.group = if partition.replicas.len() > 1 {
            *counter += 1;
            crate::command::FIRST_PARTITION_GROUP + *counter
        } else {
            0
        };
    }
}

/// A reassignment's target: at least one node, none twice.
fn check_replicas(replicas: &[NodeId]) -> Result<(), BrokerError> {
    if replicas.is_empty() {
        return Err(BrokerError::InvalidReplicaAssignment(
            "a partition needs at least one replica".into(),
        ));
    }
    let mut seen = replicas.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != replicas.len() {
        return Err(BrokerError::InvalidReplicaAssignment(format!(
            "a node appears twice in {replicas:?}"
        )));
    }
    Ok(())
}

impl MetadataState {
    /// Partition `index` of the topic incarnation `id`, to change.
    fn partition_mut(
        &mut self,
        name: &str,
        id: Uuid,
        index: u32,
    ) -> Result<&mut PartitionRecord, BrokerError> {
        let topic = self
            .topics
            .get_mut(name)
            .filter(|topic| topic.id == id)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
        topic
            .partitions
            .get_mut(index as usize)
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: name.to_owned(),
                partition: index as i32,
            })
    }

    fn number_groups(&mut self, partitions: &mut [PartitionRecord]) {
        number_groups(&mut self.partition_groups, partitions);
    }

    /// Checks `command` against this state; returns the state after it and what has to happen
    /// outside the definitions for it. Deterministic: no clock, no randomness, nothing but the
    /// state and the command.
    pub fn apply(&self, command: &MetadataCommand) -> Result<(Self, Vec<Effect>), BrokerError> {
        let mut next = self.clone();
        let mut effects = Vec::new();
        match command {
            MetadataCommand::CreateTopic(topic) => {
                if next.topics.contains_key(&topic.name) {
                    return Err(BrokerError::TopicExists(topic.name.clone()));
                }
                let mut topic = topic.clone();
                next.number_groups(&mut topic.partitions);
                next.topics.insert(topic.name.clone(), topic.clone());
                effects.push(Effect::StartPartitions {
                    topic: topic.name.clone(),
                    from: 0,
                    to: topic.partitions.len() as u32,
                });
            }
            MetadataCommand::DeleteTopic { name } => {
                let Some(topic) = next.topics.remove(name) else {
                    return Err(BrokerError::UnknownTopic(name.clone()));
                };
                effects.push(Effect::StopTopic {
                    name: name.clone(),
                    id: topic.id,
                });
            }
            MetadataCommand::AddPartitions { name, partitions } => {
                let topic = next
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| BrokerError::UnknownTopic(name.clone()))?;
                let from = topic.partitions.len();
                for (offset, partition) in partitions.iter().enumerate() {
                    if partition.index as usize != from + offset {
                        return Err(BrokerError::InvalidPartitions(format!(
                            "partition {} does not follow the existing {from}",
                            partition.index,
                        )));
                    }
                }
                let mut partitions = partitions.clone();
                number_groups(&mut next.partition_groups, &mut partitions);
                topic.partitions.extend(partitions);
                effects.push(Effect::StartPartitions {
                    topic: name.clone(),
                    from: from as u32,
                    to: topic.partitions.len() as u32,
                });
            }
            MetadataCommand::SetTopicConfig { name, config } => {
                let topic = next
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| BrokerError::UnknownTopic(name.clone()))?;
                topic.config = config.clone();
                effects.push(Effect::ReconfigureTopic { name: name.clone() });
            }
            MetadataCommand::ReassignPartition {
                name,
                id,
                partition,
                target,
            } => {
                let placed = next.partition_mut(name, *id, *partition)?;
                match target {
                    Some(target) => {
                        if placed.group == 0 {
                            return Err(BrokerError::InvalidReplicaAssignment(format!(
                                "partition {partition} of {name} has one copy and no Raft \
                                 group; only replicated partitions are reassigned"
                            )));
                        }
                        check_replicas(target)?;
                        placed.target = Some(target.clone());
                        placed.reassignments = placed.reassignments.saturating_add(1);
                    }
                    None => {
                        if placed.reassigning().is_none() {
                            return Err(BrokerError::NoReassignmentInProgress(format!(
                                "partition {partition} of {name}"
                            )));
                        }
                        // Back to the current replicas: the group drops what it added.
                        placed.target = Some(placed.replicas.clone());
                    }
                }
                effects.push(Effect::Reassign {
                    topic: name.clone(),
                    partition: *partition,
                });
            }
            MetadataCommand::CompleteReassignment {
                name,
                id,
                partition,
                replicas,
            } => {
                let placed = next.partition_mut(name, *id, *partition)?;
                if placed.target.as_ref() != Some(replicas) {
                    return Err(BrokerError::NoReassignmentInProgress(format!(
                        "partition {partition} of {name} is not being moved to {replicas:?}"
                    )));
                }
                placed.replicas = replicas.clone();
                placed.leader = replicas[0];
                placed.target = None;
                effects.push(Effect::Reassign {
                    topic: name.clone(),
                    partition: *partition,
                });
            }
            MetadataCommand::AllocateProducerIds { start, count } => {
                if *start != next.next_producer_id {
                    return Err(BrokerError::metadata(
                        "reserve producer ids",
                        format!(
                            "the block starting at {start} is not the next one ({})",
                            next.next_producer_id
                        ),
                    ));
                }
                next.next_producer_id = start.saturating_add(*count);
            }
            MetadataCommand::Messaging(command) => {
                next.messaging.apply(command)?;
                effects = definitions::effects(&self.messaging, &next.messaging, command);
            }
        }
        Ok((next, effects))
    }
}

const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const PRODUCER_ID_COUNTER: &str = "next_producer_id_block";
/// The index of the last replicated controller command applied here (0: none).
const APPLIED_INDEX_COUNTER: &str = "controller_applied_index";
/// [`MetadataState::partition_groups`]: kept, so that a node numbers the groups of topics
/// created after it restarted as every other node does.
const PARTITION_GROUPS_COUNTER: &str = "partition_groups";
const IDENTITY: TableDefinition<&str, &str> = TableDefinition::new("identity");
const CLUSTER_ID_KEY: &str = "cluster_id";
const PRODUCER_ID_BLOCK: u64 = 1_000;

/// The durable store of definitions.
#[derive(Debug)]
pub struct MetadataStore {
    db: Arc<Database>,
    state: RwLock<Arc<MetadataState>>,
    /// Producer ids handed out from the current block: (next, end).
    producer_ids: Mutex<(u64, u64)>,
    cluster_id: String,
    /// The last replicated controller command applied (see [`Self::apply_at`]).
    applied_index: AtomicU64,
    /// Held from reading the state a change applies to until the next state is published, so
    /// two changes applied at once (a producer-id block and a topic) never lose one another.
    writer: Mutex<()>,
}

/// A new cluster id in Kafka's form: a random UUID in unpadded URL-safe base64 (22 characters).
fn new_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = Uuid::new_v4().into_bytes();
    let mut bits = 0u32;
    let mut bit_count = 0;
    let mut out = String::with_capacity(22);
    for byte in bytes {
        bits = (bits << 8) | u32::from(byte);
        bit_count += 8;
        while bit_count >= 6 {
            bit_count -= 6;
            out.push(ALPHABET[((bits >> bit_count) & 0x3f) as usize] as char);
        }
    }
    if bit_count > 0 {
        out.push(ALPHABET[((bits << (6 - bit_count)) & 0x3f) as usize] as char);
    }
    out
}

impl MetadataStore {
    /// Opens (or creates) the store at `path` and loads every definition.
    pub fn open(path: &Path) -> Result<Self, BrokerError> {
        let db = Database::create(path)
            .map_err(|e| BrokerError::metadata("open", format!("{}: {e}", path.display())))?;
        let txn = db
            .begin_write()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        {
            // Create the tables so read transactions find them.
            txn.open_table(TOPICS)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            txn.open_table(COUNTERS)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            definitions::create_tables(&txn)?;
            let mut identity = txn
                .open_table(IDENTITY)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            let existing = identity
                .get(CLUSTER_ID_KEY)
                .map_err(|e| BrokerError::metadata("read cluster id", e))?
                .is_some();
            if !existing {
                let fresh = new_cluster_id();
                identity
                    .insert(CLUSTER_ID_KEY, fresh.as_str())
                    .map_err(|e| BrokerError::metadata("write cluster id", e))?;
            }
        }
        txn.commit()
            .map_err(|e| BrokerError::metadata("commit", e))?;

        let mut state = MetadataState::default();
        let read = db
            .begin_read()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        let cluster_id = read
            .open_table(IDENTITY)
            .map_err(|e| BrokerError::metadata("open table", e))?
            .get(CLUSTER_ID_KEY)
            .map_err(|e| BrokerError::metadata("read cluster id", e))?
            .map(|v| v.value().to_owned())
            .ok_or_else(|| BrokerError::metadata("read cluster id", "missing"))?;
        let topics = read
            .open_table(TOPICS)
            .map_err(|e| BrokerError::metadata("open table", e))?;
        for entry in topics
            .iter()
            .map_err(|e| BrokerError::metadata("read", e))?
        {
            let (name, value) = entry.map_err(|e| BrokerError::metadata("read", e))?;
            let topic: TopicRecord = serde_json::from_slice(value.value()).map_err(|e| {
                BrokerError::metadata(
                    "decode",
                    format!("topic {:?} in {}: {e}", name.value(), path.display()),
                )
            })?;
            state.topics.insert(topic.name.clone(), topic);
        }
        drop(topics);
        let counters = read
            .open_table(COUNTERS)
            .map_err(|e| BrokerError::metadata("open table", e))?;
        let counter = |key| {
            counters
                .get(key)
                .map_err(|e| BrokerError::metadata("read counter", e))
                .map(|v| v.map_or(0, |v| v.value()))
        };
        state.next_producer_id = counter(PRODUCER_ID_COUNTER)?;
        let applied_index = counter(APPLIED_INDEX_COUNTER)?;
        // Written since the counter was kept; before, the highest group a topic has is the
        // best left to go by.
        let numbered = state
            .topics
            .values()
            .flat_map(|topic| &topic.partitions)
            .map(|p| {
                p.group
                    .saturating_sub(crate::command::FIRST_PARTITION_GROUP)
            })
            .max()
            .unwrap_or(0);
        state.partition_groups = u32::try_from(counter(PARTITION_GROUPS_COUNTER)?)
            .unwrap_or(u32::MAX)
            .max(numbered);
        drop(counters);
        state.messaging = definitions::load(&read)?;
        drop(read);
        Ok(Self {
            db: Arc::new(db),
            state: RwLock::new(Arc::new(state)),
            producer_ids: Mutex::new((0, 0)),
            cluster_id,
            applied_index: AtomicU64::new(applied_index),
            writer: Mutex::new(()),
        })
    }

    /// The id of the cluster this data directory belongs to, fixed at its creation.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The database, for other stores that keep their tables in the same file.
    pub fn database(&self) -> Arc<Database> {
        Arc::clone(&self.db)
    }

    /// A snapshot of every definition.
    pub fn state(&self) -> Arc<MetadataState> {
        Arc::clone(&self.state.read())
    }

    pub fn topic(&self, name: &str) -> Option<TopicRecord> {
        self.state.read().topics.get(name).cloned()
    }

    /// Checks, persists, then publishes one change; returns what has to happen outside the
    /// definitions for it (see [`MetadataState::apply`]). Blocks on disk I/O (an fsync).
    pub fn apply(&self, command: &MetadataCommand) -> Result<Vec<Effect>, BrokerError> {
        self.apply_at(None, command)
    }

    /// The index of the last replicated controller command applied to this store (0: none).
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::Acquire)
    }

    /// Whether `command` changes only transient definitions (an exclusive or auto-delete
    /// queue, a binding to one): nothing this store writes, and nothing a cluster replicates.
    pub fn is_transient(&self, command: &MetadataCommand) -> Result<bool, BrokerError> {
        let MetadataCommand::Messaging(messaging) = command else {
            return Ok(false);
        };
        let current = self.state();
        let (next, _) = current.apply(command)?;
        Ok(definitions::changes(&current.messaging, &next.messaging, messaging)?.is_empty())
    }

    /// [`Self::apply`] for the replicated controller command at log `index` (`None` for a
    /// change of this node alone): the index is written in the same transaction, so a
    /// command is applied here once, also across restarts. Blocks on disk I/O.
    pub fn apply_at(
        &self,
        index: Option<u64>,
        command: &MetadataCommand,
    ) -> Result<Vec<Effect>, BrokerError> {
        let _writer = self.writer.lock();
        let current = self.state();
        let (next, effects) = current.apply(command)?;
        let next = Arc::new(next);
        let messaging_changes = match command {
            MetadataCommand::Messaging(command) => {
                let changes = definitions::changes(&current.messaging, &next.messaging, command)?;
                if changes.is_empty() && index.is_none() {
                    // Transient definitions only: nothing to write.
                    *self.state.write() = next;
                    return Ok(effects);
                }
                changes
            }
            _ => Vec::new(),
        };
        let txn = self
            .db
            .begin_write()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        {
            let mut topics = txn
                .open_table(TOPICS)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            match command {
                MetadataCommand::DeleteTopic { name } => {
                    topics
                        .remove(name.as_str())
                        .map_err(|e| BrokerError::metadata("delete topic", e))?;
                }
                MetadataCommand::Messaging(_) => definitions::persist(&txn, &messaging_changes)?,
                MetadataCommand::AllocateProducerIds { .. } => {
                    txn.open_table(COUNTERS)
                        .map_err(|e| BrokerError::metadata("open table", e))?
                        .insert(PRODUCER_ID_COUNTER, next.next_producer_id)
                        .map_err(|e| BrokerError::metadata("write counter", e))?;
                }
                MetadataCommand::CreateTopic(TopicRecord { name, .. })
                | MetadataCommand::ReassignPartition { name, .. }
                | MetadataCommand::CompleteReassignment { name, .. }
                | MetadataCommand::AddPartitions { name, .. }
                | MetadataCommand::SetTopicConfig { name, .. } => {
                    let topic = next
                        .topics
                        .get(name)
                        .expect("the command left this topic in place");
                    let value = serde_json::to_vec(topic)
                        .map_err(|e| BrokerError::metadata("encode", e))?;
                    topics
                        .insert(name.as_str(), value.as_slice())
                        .map_err(|e| BrokerError::metadata("write topic", e))?;
                }
            }
        }
        if next.partition_groups != current.partition_groups {
            txn.open_table(COUNTERS)
                .map_err(|e| BrokerError::metadata("open table", e))?
                .insert(PARTITION_GROUPS_COUNTER, u64::from(next.partition_groups))
                .map_err(|e| BrokerError::metadata("write counter", e))?;
        }
        if let Some(index) = index {
            txn.open_table(COUNTERS)
                .map_err(|e| BrokerError::metadata("open table", e))?
                .insert(APPLIED_INDEX_COUNTER, index)
                .map_err(|e| BrokerError::metadata("write counter", e))?;
        }
        txn.commit()
            .map_err(|e| BrokerError::metadata("commit", e))?;
        *self.state.write() = next;
        if let Some(index) = index {
            self.applied_index.store(index, Ordering::Release);
        }
        Ok(effects)
    }

    /// Records that the replicated command at `index` changed nothing here (the controller
    /// refused it, or it was not a change of definitions). Not written: applying such a
    /// command again after a restart changes nothing either.
    pub fn skip_to(&self, index: u64) {
        self.applied_index.fetch_max(index, Ordering::AcqRel);
    }

    /// Replaces every definition with `state`, the replicated controller's state at log
    /// `index` (a snapshot installed on this node, or the cluster's first state). Blocks on
    /// disk I/O.
    pub fn install(&self, index: u64, state: MetadataState) -> Result<(), BrokerError> {
        let _writer = self.writer.lock();
        let txn = self
            .db
            .begin_write()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        txn.delete_table(TOPICS)
            .map_err(|e| BrokerError::metadata("clear table", e))?;
        {
            let mut topics = txn
                .open_table(TOPICS)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            for (name, topic) in &state.topics {
                let value =
                    serde_json::to_vec(topic).map_err(|e| BrokerError::metadata("encode", e))?;
                topics
                    .insert(name.as_str(), value.as_slice())
                    .map_err(|e| BrokerError::metadata("write topic", e))?;
            }
            let mut counters = txn
                .open_table(COUNTERS)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            counters
                .insert(PRODUCER_ID_COUNTER, state.next_producer_id)
                .map_err(|e| BrokerError::metadata("write counter", e))?;
            counters
                .insert(APPLIED_INDEX_COUNTER, index)
                .map_err(|e| BrokerError::metadata("write counter", e))?;
            counters
                .insert(PARTITION_GROUPS_COUNTER, u64::from(state.partition_groups))
                .map_err(|e| BrokerError::metadata("write counter", e))?;
        }
        definitions::replace_all(&txn, &state.messaging)?;
        txn.commit()
            .map_err(|e| BrokerError::metadata("commit", e))?;
        *self.state.write() = Arc::new(state);
        self.applied_index.store(index, Ordering::Release);
        Ok(())
    }

    /// A producer id never handed out before, across restarts. Ids are reserved in blocks
    /// (an [`MetadataCommand::AllocateProducerIds`]) so most calls do not touch the disk.
    pub fn next_producer_id(&self) -> Result<i64, BrokerError> {
        let mut ids = self.producer_ids.lock();
        if ids.0 >= ids.1 {
            let start = self.state().next_producer_id;
            self.apply(&MetadataCommand::AllocateProducerIds {
                start,
                count: PRODUCER_ID_BLOCK,
            })?;
            *ids = (start, start + PRODUCER_ID_BLOCK);
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id as i64)
    }

    /// The next id of the block this node reserved, if any is left.
    pub fn take_producer_id(&self) -> Option<i64> {
        let mut ids = self.producer_ids.lock();
        (ids.0 < ids.1).then(|| {
            ids.0 += 1;
            (ids.0 - 1) as i64
        })
    }

    /// The block of producer ids to reserve next: its start and length.
    pub fn producer_id_block(&self) -> (u64, u64) {
        (self.state().next_producer_id, PRODUCER_ID_BLOCK)
    }

    /// Hands out ids from `start..end` from now on: a block the replicated log reserved for
    /// this node.
    pub fn grant_producer_ids(&self, start: u64, end: u64) {
        *self.producer_ids.lock() = (start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, partitions: u32) -> TopicRecord {
        TopicRecord {
            name: name.to_owned(),
            id: Uuid::new_v4(),
            partitions: (0..partitions)
                .map(|index| PartitionRecord {
                    index,
                    leader: 0,
                    replicas: vec![0],
                    leader_epoch: 0,
                    group: 0,
                    target: None,
                    reassignments: 0,
                })
                .collect(),
            config: BTreeMap::new(),
            created_ms: 0,
        }
    }

    #[test]
    fn group_numbers_go_on_after_a_reopen_even_past_a_deleted_topic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let replicated = |name: &str| {
            let mut record = topic(name, 2);
            for partition in &mut record.partitions {
                partition.replicas = vec![1, 2, 3];
            }
            record
        };
        let store = MetadataStore::open(&path).unwrap();
        store
            .apply_at(Some(1), &MetadataCommand::CreateTopic(replicated("r")))
            .unwrap();
        store
            .apply_at(Some(2), &MetadataCommand::CreateTopic(replicated("q")))
            .unwrap();
        store
            .apply_at(Some(3), &MetadataCommand::DeleteTopic { name: "q".into() })
            .unwrap();
        assert_eq!(store.state().partition_groups, 4);
        drop(store);

        // Another node that never restarted numbers the next topic's groups 5 and 6: so must
        // this one.
        let store = MetadataStore::open(&path).unwrap();
        assert_eq!(store.state().partition_groups, 4);
        store
            .apply_at(Some(4), &MetadataCommand::CreateTopic(replicated("s")))
            .unwrap();
        let groups: Vec<u32> = store.state().topics["s"]
            .partitions
            .iter()
            .map(|p| p.group)
            .collect();
        let first = crate::command::FIRST_PARTITION_GROUP;
        assert_eq!(groups, vec![first + 5, first + 6]);
    }

    #[test]
    fn commands_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let store = MetadataStore::open(&path).unwrap();
        let a = topic("a", 2);
        store
            .apply(&MetadataCommand::CreateTopic(a.clone()))
            .unwrap();
        store
            .apply(&MetadataCommand::CreateTopic(topic("b", 1)))
            .unwrap();
        store
            .apply(&MetadataCommand::AddPartitions {
                name: "a".into(),
                partitions: vec![PartitionRecord {
                    index: 2,
                    leader: 0,
                    replicas: vec![0],
                    leader_epoch: 0,
                    group: 0,
                    target: None,
                    reassignments: 0,
                }],
            })
            .unwrap();
        store
            .apply(&MetadataCommand::SetTopicConfig {
                name: "a".into(),
                config: [("retention.ms".to_owned(), "5".to_owned())].into(),
            })
            .unwrap();
        store
            .apply(&MetadataCommand::DeleteTopic { name: "b".into() })
            .unwrap();
        let first_id = store.next_producer_id().unwrap();
        let cluster_id = store.cluster_id().to_owned();
        assert_eq!(cluster_id.len(), 22);
        drop(store);

        let store = MetadataStore::open(&path).unwrap();
        let state = store.state();
        assert_eq!(state.topics.len(), 1);
        let reloaded = &state.topics["a"];
        assert_eq!(reloaded.id, a.id);
        assert_eq!(reloaded.partitions.len(), 3);
        assert_eq!(reloaded.config["retention.ms"], "5");
        assert_eq!(state.partition_groups, 0);
        assert!(store.next_producer_id().unwrap() > first_id);
        assert_eq!(store.cluster_id(), cluster_id);
    }

    /// Every kind of command, in an order where each applies.
    fn command_log() -> Vec<MetadataCommand> {
        use crate::command::DefinitionCommand as D;
        let queue = |name: &str, durable| crate::queue::QueueRecord {
            vhost: "/".into(),
            name: name.into(),
            id: Uuid::from_u128(if name == "jobs" { 1 } else { 2 }),
            durable,
            auto_delete: false,
            exclusive_owner: None,
            arguments: Vec::new(),
            created_ms: 5,
            node: None,
        };
        let mut a = topic("a", 2);
        a.id = Uuid::from_u128(99);
        vec![
            MetadataCommand::CreateTopic(a),
            MetadataCommand::Messaging(D::PutVhost { name: "/".into() }),
            MetadataCommand::Messaging(D::DeclareQueue(queue("jobs", true))),
            MetadataCommand::Messaging(D::DeclareQueue(queue("temp", false))),
            MetadataCommand::Messaging(D::Bind(crate::exchange::BindingRecord {
                vhost: "/".into(),
                source: "amq.direct".into(),
                destination: crate::exchange::Destination::Queue("jobs".into()),
                routing_key: "k".into(),
                arguments: Vec::new(),
            })),
            MetadataCommand::AddPartitions {
                name: "a".into(),
                partitions: vec![PartitionRecord {
                    index: 2,
                    leader: 0,
                    replicas: vec![0],
                    leader_epoch: 0,
                    group: 0,
                    target: None,
                    reassignments: 0,
                }],
            },
            MetadataCommand::AllocateProducerIds {
                start: 0,
                count: 1_000,
            },
            MetadataCommand::SetTopicConfig {
                name: "a".into(),
                config: [("retention.ms".to_owned(), "5".to_owned())].into(),
            },
            MetadataCommand::Messaging(D::DeleteQueue {
                vhost: "/".into(),
                name: "temp".into(),
            }),
            MetadataCommand::DeleteTopic { name: "a".into() },
            MetadataCommand::Messaging(D::DeleteVhost { name: "/".into() }),
        ]
    }

    #[test]
    fn a_reassignment_is_checked_moves_the_replicas_when_complete_and_can_be_cancelled() {
        let mut record = topic("r", 1);
        record.partitions[0].replicas = vec![1, 2, 3];
        record.partitions[0].leader = 1;
        let id = record.id;
        let reassign = |target: Option<Vec<NodeId>>| MetadataCommand::ReassignPartition {
            name: "r".into(),
            id,
            partition: 0,
            target,
        };
        let complete = |replicas: Vec<NodeId>| MetadataCommand::CompleteReassignment {
            name: "r".into(),
            id,
            partition: 0,
            replicas,
        };
        let moved = Effect::Reassign {
            topic: "r".into(),
            partition: 0,
        };
        let (state, _) = MetadataState::default()
            .apply(&MetadataCommand::CreateTopic(record))
            .unwrap();
        assert_ne!(state.topics["r"].partitions[0].group, 0);

        // Refused: nothing to cancel, bad targets, another incarnation, an unknown partition,
        // an end that is not the target's.
        for (command, refused) in [
            (reassign(None), "no reassignment in progress"),
            (reassign(Some(vec![])), "at least one replica"),
            (reassign(Some(vec![4, 2, 4])), "appears twice"),
            (complete(vec![1, 2, 3]), "not being moved"),
        ] {
            let error = state.apply(&command).unwrap_err().to_string();
            assert!(error.contains(refused), "{command:?}: {error}");
        }
        let other = MetadataCommand::ReassignPartition {
            name: "r".into(),
            id: Uuid::from_u128(7),
            partition: 0,
            target: Some(vec![4]),
        };
        assert!(matches!(
            state.apply(&other),
            Err(BrokerError::UnknownTopic(_))
        ));
        let unknown = MetadataCommand::ReassignPartition {
            name: "r".into(),
            id,
            partition: 1,
            target: Some(vec![4]),
        };
        assert!(matches!(
            state.apply(&unknown),
            Err(BrokerError::UnknownPartition { .. })
        ));

        // In progress: every node of both sets holds a copy, the target's first.
        let (moving, effects) = state.apply(&reassign(Some(vec![4, 2, 3]))).unwrap();
        assert_eq!(effects, vec![moved.clone()]);
        let placed = &moving.topics["r"].partitions[0];
        assert_eq!(placed.all_replicas(), vec![4, 2, 3, 1]);
        assert_eq!(placed.reassigning(), Some((vec![4], vec![1])));
        assert!(placed.placed_on(1) && placed.placed_on(4) && !placed.placed_on(5));
        assert_eq!(placed.reassignments, 1);
        assert!(
            moving.apply(&complete(vec![2, 3, 4])).is_err(),
            "order matters"
        );

        // Done: the target is the replicas, the preferred leader its first.
        let (done, effects) = moving.apply(&complete(vec![4, 2, 3])).unwrap();
        assert_eq!(effects, vec![moved.clone()]);
        let placed = &done.topics["r"].partitions[0];
        assert_eq!((placed.replicas.clone(), placed.leader), (vec![4, 2, 3], 4));
        assert_eq!((placed.target.clone(), placed.reassigning()), (None, None));
        assert!(!placed.placed_on(1));
        assert!(
            done.apply(&complete(vec![4, 2, 3])).is_err(),
            "completed once"
        );

        // Cancelled: back to the current replicas, no longer listed, done the same way.
        let (cancelled, _) = moving.apply(&reassign(None)).unwrap();
        let placed = &cancelled.topics["r"].partitions[0];
        assert_eq!(placed.target, Some(vec![1, 2, 3]));
        assert_eq!(placed.reassigning(), None);
        assert!(
            cancelled.apply(&reassign(None)).is_err(),
            "nothing left to cancel"
        );
        let (back, _) = cancelled.apply(&complete(vec![1, 2, 3])).unwrap();
        assert_eq!(back.topics["r"].partitions[0].replicas, vec![1, 2, 3]);
        assert_eq!(back.topics["r"].partitions[0].reassignments, 1);

        // A partition with one copy has no group to change.
        let (single, _) = MetadataState::default()
            .apply(&MetadataCommand::CreateTopic(topic("s", 1)))
            .unwrap();
        let command = MetadataCommand::ReassignPartition {
            name: "s".into(),
            id: single.topics["s"].id,
            partition: 0,
            target: Some(vec![1]),
        };
        assert!(matches!(
            single.apply(&command),
            Err(BrokerError::InvalidReplicaAssignment(_))
        ));

        // Deterministic: the same commands give the same state on another machine.
        let again = state
            .apply(&reassign(Some(vec![4, 2, 3])))
            .and_then(|(s, _)| s.apply(&complete(vec![4, 2, 3])))
            .unwrap()
            .0;
        assert_eq!(again, done);
    }

    #[test]
    fn one_log_replayed_into_two_states_gives_the_same_states_and_effects() {
        let mut first = MetadataState::default();
        let mut second = MetadataState::default();
        for command in command_log() {
            let (a, a_effects) = first.apply(&command).unwrap();
            let (b, b_effects) = second.apply(&command).unwrap();
            assert_eq!(a, b, "{command:?}");
            assert_eq!(a_effects, b_effects, "{command:?}");
            first = a;
            second = b;
        }
        assert_eq!(first.next_producer_id, 1_000);
        assert!(first.topics.is_empty());
        assert!(first.messaging.vhosts.is_empty());
    }

    #[test]
    fn commands_say_what_has_to_happen_outside_the_definitions() {
        let mut state = MetadataState::default();
        let mut effects = Vec::new();
        for command in command_log() {
            let (next, produced) = state.apply(&command).unwrap();
            effects.push(produced);
            state = next;
        }
        let topic_id = Uuid::from_u128(99);
        let republish = || Effect::Republish { vhost: "/".into() };
        assert_eq!(
            effects[0],
            vec![Effect::StartPartitions {
                topic: "a".into(),
                from: 0,
                to: 2
            }]
        );
        assert_eq!(effects[1], vec![republish()]);
        assert_eq!(
            effects[2],
            vec![
                Effect::StartQueue {
                    vhost: "/".into(),
                    name: "jobs".into()
                },
                republish()
            ]
        );
        assert_eq!(effects[4], vec![republish()]);
        assert_eq!(
            effects[5],
            vec![Effect::StartPartitions {
                topic: "a".into(),
                from: 2,
                to: 3
            }]
        );
        assert!(effects[6].is_empty());
        assert_eq!(
            effects[7],
            vec![Effect::ReconfigureTopic { name: "a".into() }]
        );
        // The routing table without the queue is published before the queue stops.
        assert_eq!(
            effects[8],
            vec![
                republish(),
                Effect::StopQueue {
                    vhost: "/".into(),
                    name: "temp".into(),
                    id: Uuid::from_u128(2)
                }
            ]
        );
        assert_eq!(
            effects[9],
            vec![Effect::StopTopic {
                name: "a".into(),
                id: topic_id
            }]
        );
        assert_eq!(effects[10], vec![Effect::DropVhost { name: "/".into() }]);
    }

    #[test]
    fn invalid_commands_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(&dir.path().join("meta.redb")).unwrap();
        store
            .apply(&MetadataCommand::CreateTopic(topic("a", 1)))
            .unwrap();
        assert!(matches!(
            store.apply(&MetadataCommand::CreateTopic(topic("a", 1))),
            Err(BrokerError::TopicExists(_))
        ));
        assert!(matches!(
            store.apply(&MetadataCommand::DeleteTopic { name: "zz".into() }),
            Err(BrokerError::UnknownTopic(_))
        ));
        assert!(
            store
                .apply(&MetadataCommand::AddPartitions {
                    name: "a".into(),
                    partitions: vec![PartitionRecord {
                        index: 5,
                        leader: 0,
                        replicas: vec![0],
                        leader_epoch: 0,
                        group: 0,
                        target: None,
                        reassignments: 0,
                    }],
                })
                .is_err()
        );
        assert_eq!(store.state().topics["a"].partitions.len(), 1);
    }
}
