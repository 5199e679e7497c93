//! Committed consumer offsets, durably, per (group, topic, partition).
//!
//! Kept in the broker's redb database. Every change is an [`OffsetCommand`] applied by
//! [`OffsetStore::apply`]; a commit of many partitions is one transaction, so it lands whole or
//! not at all. Calls block on an fsync; the async wrappers in [`crate::Broker`] run them on the
//! blocking pool.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::BrokerError;

/// Key: (group, topic, partition).
const OFFSETS: TableDefinition<(&str, &str, u32), &[u8]> =
    TableDefinition::new("committed_offsets");

pub use crate::command::{CommittedOffset, OffsetCommand, OffsetEntry};

#[derive(Debug, Clone)]
pub struct OffsetStore {
    db: Arc<Database>,
}

impl OffsetStore {
    pub fn open(db: Arc<Database>) -> Result<Self, BrokerError> {
        let txn = db
            .begin_write()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        txn.open_table(OFFSETS)
            .map_err(|e| BrokerError::metadata("open table", e))?;
        txn.commit()
            .map_err(|e| BrokerError::metadata("commit", e))?;
        Ok(Self { db })
    }

    /// Applies one change; returns how many offsets it removed (0 for a commit).
    pub fn apply(&self, command: &OffsetCommand) -> Result<usize, BrokerError> {
        match command {
            OffsetCommand::Commit { group, entries } => self.commit(group, entries).map(|()| 0),
            OffsetCommand::Delete { group, topic } => {
                self.delete(group.as_deref(), topic.as_deref())
            }
        }
    }

    /// Stores every entry in one transaction.
    fn commit(&self, group: &str, entries: &[OffsetEntry]) -> Result<(), BrokerError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        {
            let mut table = txn
                .open_table(OFFSETS)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            for entry in entries {
                let value = serde_json::to_vec(&entry.committed)
                    .map_err(|e| BrokerError::metadata("encode", e))?;
                table
                    .insert(
                        (group, entry.topic.as_str(), entry.partition),
                        value.as_slice(),
                    )
                    .map_err(|e| BrokerError::metadata("write offset", e))?;
            }
        }
        txn.commit().map_err(|e| BrokerError::metadata("commit", e))
    }

    pub fn fetch(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<CommittedOffset>, BrokerError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        let table = txn
            .open_table(OFFSETS)
            .map_err(|e| BrokerError::metadata("open table", e))?;
        let value = table
            .get((group, topic, partition))
            .map_err(|e| BrokerError::metadata("read offset", e))?;
        value
            .map(|v| {
                serde_json::from_slice(v.value())
                    .map_err(|e| BrokerError::metadata("decode offset", e))
            })
            .transpose()
    }

    /// Every committed offset of a group.
    pub fn fetch_group(&self, group: &str) -> Result<Vec<OffsetEntry>, BrokerError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        let table = txn
            .open_table(OFFSETS)
            .map_err(|e| BrokerError::metadata("open table", e))?;
        let range = table
            .range((group, "", 0u32)..)
            .map_err(|e| BrokerError::metadata("read offsets", e))?;
        let mut out = Vec::new();
        for item in range {
            let (key, value) = item.map_err(|e| BrokerError::metadata("read offsets", e))?;
            let (found_group, topic, partition) = key.value();
            if found_group != group {
                break;
            }
            out.push(OffsetEntry {
                topic: topic.to_owned(),
                partition,
                committed: serde_json::from_slice(value.value())
                    .map_err(|e| BrokerError::metadata("decode offset", e))?,
            });
        }
        Ok(out)
    }

    /// Every group with at least one committed offset.
    pub fn groups(&self) -> Result<Vec<String>, BrokerError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        let table = txn
            .open_table(OFFSETS)
            .map_err(|e| BrokerError::metadata("open table", e))?;
        let mut groups: Vec<String> = Vec::new();
        for item in table
            .iter()
            .map_err(|e| BrokerError::metadata("read offsets", e))?
        {
            let (key, _) = item.map_err(|e| BrokerError::metadata("read offsets", e))?;
            let group = key.value().0;
            if groups.last().is_none_or(|last| last != group) {
                groups.push(group.to_owned());
            }
        }
        Ok(groups)
    }

    /// Removes every committed offset of a group, or of a topic in every group.
    fn delete(&self, group: Option<&str>, topic: Option<&str>) -> Result<usize, BrokerError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| BrokerError::metadata("begin", e))?;
        let removed;
        {
            let mut table = txn
                .open_table(OFFSETS)
                .map_err(|e| BrokerError::metadata("open table", e))?;
            let mut doomed: Vec<(String, String, u32)> = Vec::new();
            for item in table
                .iter()
                .map_err(|e| BrokerError::metadata("read offsets", e))?
            {
                let (key, _) = item.map_err(|e| BrokerError::metadata("read offsets", e))?;
                let (g, t, p) = key.value();
                if group.is_none_or(|wanted| wanted == g) && topic.is_none_or(|wanted| wanted == t)
                {
                    doomed.push((g.to_owned(), t.to_owned(), p));
                }
            }
            for (g, t, p) in &doomed {
                table
                    .remove((g.as_str(), t.as_str(), *p))
                    .map_err(|e| BrokerError::metadata("delete offset", e))?;
            }
            removed = doomed.len();
        }
        txn.commit()
            .map_err(|e| BrokerError::metadata("commit", e))?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: &str, partition: u32, offset: i64) -> OffsetEntry {
        OffsetEntry {
            topic: topic.to_owned(),
            partition,
            committed: CommittedOffset {
                offset,
                leader_epoch: 0,
                metadata: String::new(),
                commit_timestamp_ms: 1,
            },
        }
    }

    #[test]
    fn commits_fetches_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        let store = OffsetStore::open(db).unwrap();
        store
            .commit(
                "g1",
                &[entry("a", 0, 5), entry("a", 1, 7), entry("b", 0, 1)],
            )
            .unwrap();
        store.commit("g2", &[entry("a", 0, 9)]).unwrap();
        store.commit("g1", &[entry("a", 0, 6)]).unwrap();
        assert_eq!(store.fetch("g1", "a", 0).unwrap().unwrap().offset, 6);
        assert_eq!(store.fetch("g1", "c", 0).unwrap(), None);
        assert_eq!(store.fetch_group("g1").unwrap().len(), 3);
        assert_eq!(store.groups().unwrap(), vec!["g1", "g2"]);
        assert_eq!(store.delete(None, Some("a")).unwrap(), 3);
        assert_eq!(store.groups().unwrap(), vec!["g1"]);
        assert_eq!(store.delete(Some("g1"), None).unwrap(), 1);
        assert!(store.groups().unwrap().is_empty());
    }
}
