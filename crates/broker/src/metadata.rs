//! Durable definitions: what topics exist, their partitions (with owner and leader), and
//! their configuration overrides; also the producer id counter.
//!
//! Every change is a [`MetadataCommand`] applied by [`MetadataStore::apply`]: it is checked
//! against the current state, written in one redb transaction, and only then made visible. This
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

use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::definitions::{self, DefinitionCommand, Definitions};
use crate::error::BrokerError;

/// A node of the (future) cluster. A single-node broker is node 0.
pub type NodeId = u32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub index: u32,
    /// The node that accepts writes for this partition.
    pub leader: NodeId,
    /// Every node holding a copy, the leader first.
    pub replicas: Vec<NodeId>,
    /// Bumped on every leader change; stamped on each batch the leader appends.
    pub leader_epoch: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub name: String,
    pub id: Uuid,
    pub partitions: Vec<PartitionRecord>,
    /// Config overrides, validated (see [`crate::topic_config`]).
    pub config: BTreeMap<String, String>,
    pub created_ms: i64,
}

/// A change to the durable definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetadataCommand {
    CreateTopic(TopicRecord),
    DeleteTopic {
        name: String,
    },
    /// Adds partitions at the end of a topic's list.
    AddPartitions {
        name: String,
        partitions: Vec<PartitionRecord>,
    },
    /// Replaces a topic's config overrides.
    SetTopicConfig {
        name: String,
        config: BTreeMap<String, String>,
    },
    /// Queues, exchanges, bindings, virtual hosts and users (see [`crate::definitions`]).
    Messaging(DefinitionCommand),
}

/// The definitions at one point in time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetadataState {
    pub topics: BTreeMap<String, TopicRecord>,
    pub messaging: Definitions,
}

impl MetadataState {
    /// Checks `command` against this state and returns the state after it.
    fn after(&self, command: &MetadataCommand) -> Result<Self, BrokerError> {
        let mut next = self.clone();
        match command {
            MetadataCommand::CreateTopic(topic) => {
                if next.topics.contains_key(&topic.name) {
                    return Err(BrokerError::TopicExists(topic.name.clone()));
                }
                next.topics.insert(topic.name.clone(), topic.clone());
            }
            MetadataCommand::DeleteTopic { name } => {
                if next.topics.remove(name).is_none() {
                    return Err(BrokerError::UnknownTopic(name.clone()));
                }
            }
            MetadataCommand::AddPartitions { name, partitions } => {
                let topic = next
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| BrokerError::UnknownTopic(name.clone()))?;
                for (offset, partition) in partitions.iter().enumerate() {
                    if partition.index as usize != topic.partitions.len() + offset {
                        return Err(BrokerError::InvalidPartitions(format!(
                            "partition {} does not follow the existing {}",
                            partition.index,
                            topic.partitions.len()
                        )));
                    }
                }
                topic.partitions.extend(partitions.iter().cloned());
            }
            MetadataCommand::SetTopicConfig { name, config } => {
                let topic = next
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| BrokerError::UnknownTopic(name.clone()))?;
                topic.config = config.clone();
            }
            MetadataCommand::Messaging(command) => next.messaging.apply(command)?,
        }
        Ok(next)
    }
}

const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const PRODUCER_ID_COUNTER: &str = "next_producer_id_block";
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
        state.messaging = definitions::load(&read)?;
        drop(read);
        Ok(Self {
            db: Arc::new(db),
            state: RwLock::new(Arc::new(state)),
            producer_ids: Mutex::new((0, 0)),
            cluster_id,
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

    /// Checks, persists, then publishes one change. Blocks on disk I/O (an fsync).
    pub fn apply(&self, command: &MetadataCommand) -> Result<Arc<MetadataState>, BrokerError> {
        let current = self.state();
        let next = Arc::new(current.after(command)?);
        let messaging_changes = match command {
            MetadataCommand::Messaging(command) => {
                let changes = definitions::changes(&current.messaging, &next.messaging, command)?;
                if changes.is_empty() {
                    // Transient definitions only: nothing to write.
                    *self.state.write() = Arc::clone(&next);
                    return Ok(next);
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
                MetadataCommand::CreateTopic(TopicRecord { name, .. })
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
        txn.commit()
            .map_err(|e| BrokerError::metadata("commit", e))?;
        *self.state.write() = Arc::clone(&next);
        Ok(next)
    }

    /// A producer id never handed out before, across restarts. Ids are reserved in blocks so
    /// most calls do not touch the disk.
    pub fn next_producer_id(&self) -> Result<i64, BrokerError> {
        let mut ids = self.producer_ids.lock();
        if ids.0 >= ids.1 {
            let txn = self
                .db
                .begin_write()
                .map_err(|e| BrokerError::metadata("begin", e))?;
            let start = {
                let mut counters = txn
                    .open_table(COUNTERS)
                    .map_err(|e| BrokerError::metadata("open table", e))?;
                let start = counters
                    .get(PRODUCER_ID_COUNTER)
                    .map_err(|e| BrokerError::metadata("read counter", e))?
                    .map_or(0, |v| v.value());
                counters
                    .insert(PRODUCER_ID_COUNTER, start + PRODUCER_ID_BLOCK)
                    .map_err(|e| BrokerError::metadata("write counter", e))?;
                start
            };
            txn.commit()
                .map_err(|e| BrokerError::metadata("commit", e))?;
            *ids = (start, start + PRODUCER_ID_BLOCK);
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id as i64)
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
                })
                .collect(),
            config: BTreeMap::new(),
            created_ms: 0,
        }
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
        assert!(store.next_producer_id().unwrap() > first_id);
        assert_eq!(store.cluster_id(), cluster_id);
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
                        leader_epoch: 0
                    }],
                })
                .is_err()
        );
        assert_eq!(store.state().topics["a"].partitions.len(), 1);
    }
}
