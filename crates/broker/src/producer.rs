//! Idempotent producer state of one partition: for each producer id, its epoch and the
//! sequence numbers and offsets of its last few batches.
//!
//! This is what turns "at least once" into "exactly once" for a producer that retries: a batch
//! whose sequence numbers match one of the last [`BATCHES_KEPT`] is acknowledged again with its
//! original offset and not appended; a batch that skips sequence numbers is refused.
//!
//! The rules follow Kafka's: a producer the partition has no state for may start at any
//! sequence; a new epoch must start at sequence 0; an older epoch is fenced.
//!
//! Persistence: the owner task writes a snapshot (`producer-state.json`, atomically) now and
//! then and on close, recording the log end offset it covers. On open the snapshot is loaded and
//! the batches appended after it are replayed from the log, so the state after a crash is the
//! state before it.
//!
//! Bounds: at most `max_producer_count` producers are tracked; past that, and after
//! `expiration_ms` of silence, the least recently seen are forgotten (as Kafka expires them).
//!
//! Determinism: given the same batches recorded with the same times, two states are equal and
//! encode to the same bytes (producers are kept in id order, and ties in eviction go to the
//! lowest id), so a replicated partition's replicas derive the same state from one log.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sluice_storage::{BatchHeader, LogReader, StorageError};

use crate::error::BrokerError;

/// How many recent batches per producer are remembered for duplicate detection. Kafka's
/// clients keep at most five requests in flight per connection with idempotence on.
pub const BATCHES_KEPT: usize = 5;

pub(crate) const SNAPSHOT_FILE: &str = "producer-state.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct BatchMeta {
    first_sequence: i32,
    last_sequence: i32,
    base_offset: u64,
    last_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchMeta>,
    last_seen_ms: i64,
}

/// What to do with an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    Append,
    /// Already appended: acknowledge these offsets again.
    Duplicate {
        base_offset: u64,
        last_offset: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Snapshot {
    end_offset: u64,
    producers: BTreeMap<i64, ProducerEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerStates {
    producers: BTreeMap<i64, ProducerEntry>,
    expiration_ms: i64,
    max_producer_count: usize,
    /// Set when the state changed since the last snapshot.
    #[serde(skip)]
    dirty: bool,
}

fn next_sequence(sequence: i32) -> i32 {
    if sequence == i32::MAX {
        0
    } else {
        sequence + 1
    }
}

impl ProducerStates {
    pub fn new(expiration_ms: i64, max_producer_count: usize) -> Self {
        Self {
            producers: BTreeMap::new(),
            expiration_ms,
            max_producer_count,
            dirty: false,
        }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Decides whether a batch (header as sent) may be appended.
    pub fn check(&self, header: &BatchHeader) -> Result<SequenceCheck, BrokerError> {
        if header.producer_id < 0 {
            return Ok(SequenceCheck::Append);
        }
        let Some(entry) = self.producers.get(&header.producer_id) else {
            return Ok(SequenceCheck::Append);
        };
        if header.producer_epoch < entry.epoch {
            return Err(BrokerError::InvalidProducerEpoch {
                producer_id: header.producer_id,
                current: entry.epoch,
                received: header.producer_epoch,
            });
        }
        if header.producer_epoch > entry.epoch {
            if header.base_sequence != 0 {
                return Err(BrokerError::OutOfOrderSequence {
                    producer_id: header.producer_id,
                    expected: 0,
                    received: header.base_sequence,
                });
            }
            return Ok(SequenceCheck::Append);
        }
        let last_sequence = header.last_sequence();
        if let Some(duplicate) = entry
            .batches
            .iter()
            .find(|b| b.first_sequence == header.base_sequence && b.last_sequence == last_sequence)
        {
            return Ok(SequenceCheck::Duplicate {
                base_offset: duplicate.base_offset,
                last_offset: duplicate.last_offset,
            });
        }
        match entry.batches.back() {
            Some(last) if header.base_sequence != next_sequence(last.last_sequence) => {
                Err(BrokerError::OutOfOrderSequence {
                    producer_id: header.producer_id,
                    expected: next_sequence(last.last_sequence),
                    received: header.base_sequence,
                })
            }
            _ => Ok(SequenceCheck::Append),
        }
    }

    /// Records an appended batch (its header with the assigned offsets).
    pub fn record(&mut self, header: &BatchHeader, now_ms: i64) {
        if header.producer_id < 0 {
            return;
        }
        if !self.producers.contains_key(&header.producer_id)
            && self.producers.len() >= self.max_producer_count
        {
            self.evict_oldest();
        }
        let entry = self
            .producers
            .entry(header.producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch: header.producer_epoch,
                batches: VecDeque::with_capacity(BATCHES_KEPT),
                last_seen_ms: now_ms,
            });
        if header.producer_epoch != entry.epoch {
            entry.epoch = header.producer_epoch;
            entry.batches.clear();
        }
        if entry.batches.len() == BATCHES_KEPT {
            entry.batches.pop_front();
        }
        entry.batches.push_back(BatchMeta {
            first_sequence: header.base_sequence,
            last_sequence: header.last_sequence(),
            base_offset: header.base_offset as u64,
            last_offset: header.last_offset() as u64,
        });
        entry.last_seen_ms = now_ms;
        self.dirty = true;
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self
            .producers
            .iter()
            .min_by_key(|(id, entry)| (entry.last_seen_ms, **id))
            .map(|(id, _)| *id)
        {
            self.producers.remove(&oldest);
        }
    }

    /// Forgets producers silent for longer than the expiration.
    pub fn expire(&mut self, now_ms: i64) {
        let before = self.producers.len();
        let horizon = now_ms.saturating_sub(self.expiration_ms);
        self.producers
            .retain(|_, entry| entry.last_seen_ms >= horizon);
        self.dirty |= self.producers.len() != before;
    }

    /// Writes a snapshot covering the log up to `end_offset`, if anything changed.
    pub fn save(&mut self, dir: &Path, end_offset: u64) -> Result<(), StorageError> {
        if !self.dirty {
            return Ok(());
        }
        let snapshot = Snapshot {
            end_offset,
            producers: self.producers.clone(),
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(|error| StorageError::Corrupt {
            path: dir.join(SNAPSHOT_FILE),
            position: 0,
            reason: format!("cannot encode producer state: {error}"),
        })?;
        sluice_storage::checkpoint::write_atomically(&dir.join(SNAPSHOT_FILE), &bytes)?;
        self.dirty = false;
        Ok(())
    }

    /// Loads the snapshot in `dir` and replays every batch after it, up to the log end.
    pub fn load(
        dir: &Path,
        reader: &LogReader,
        expiration_ms: i64,
        max_producer_count: usize,
        now_ms: i64,
    ) -> Result<Self, StorageError> {
        let mut states = Self::new(expiration_ms, max_producer_count);
        let path = dir.join(SNAPSHOT_FILE);
        let mut replay_from = reader.log_start_offset();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Snapshot>(&bytes) {
                Ok(snapshot) if snapshot.end_offset <= reader.log_end_offset() => {
                    states.producers = snapshot.producers;
                    replay_from = replay_from.max(snapshot.end_offset);
                }
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "producer state snapshot is ahead of the log; rebuilding it from the log");
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "producer state snapshot is unreadable; rebuilding it from the log");
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StorageError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        }
        let mut offset = replay_from;
        let end = reader.log_end_offset();
        while offset < end {
            let read = reader.read(offset, 1 << 20, true)?;
            if read.bytes.is_empty() {
                break;
            }
            for item in sluice_storage::batch::Batches::new(&read.bytes) {
                let (header, _) = item.map_err(|(position, error)| StorageError::Corrupt {
                    path: reader.dir().to_owned(),
                    position: position as u64,
                    reason: error.to_string(),
                })?;
                if header.last_offset() >= offset as i64 {
                    states.record(&header, now_ms);
                }
                offset = header.next_offset() as u64;
            }
        }
        states.dirty = offset > replay_from;
        Ok(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_storage::record::BatchBuilder;

    fn header(
        producer_id: i64,
        epoch: i16,
        sequence: i32,
        count: usize,
        base_offset: i64,
    ) -> BatchHeader {
        let mut builder = BatchBuilder::new(0).producer(producer_id, epoch, sequence);
        for _ in 0..count {
            builder.push(0, None, Some(b"v"), &[]);
        }
        let mut header = BatchHeader::parse(&builder.finish()).unwrap();
        header.base_offset = base_offset;
        header
    }

    #[test]
    fn sequences_duplicates_and_epochs() {
        let mut states = ProducerStates::new(60_000, 100);
        let first = header(7, 0, 0, 3, 0);
        assert_eq!(states.check(&first).unwrap(), SequenceCheck::Append);
        states.record(&first, 0);
        // A retry of the same batch is a duplicate with its original offsets.
        assert_eq!(
            states.check(&header(7, 0, 0, 3, 99)).unwrap(),
            SequenceCheck::Duplicate {
                base_offset: 0,
                last_offset: 2
            }
        );
        // The next batch must start at 3.
        assert!(matches!(
            states.check(&header(7, 0, 4, 1, 3)),
            Err(BrokerError::OutOfOrderSequence {
                expected: 3,
                received: 4,
                ..
            })
        ));
        let second = header(7, 0, 3, 1, 3);
        assert_eq!(states.check(&second).unwrap(), SequenceCheck::Append);
        states.record(&second, 0);
        // A bumped epoch restarts at 0; the old epoch is fenced afterwards.
        assert!(states.check(&header(7, 1, 5, 1, 4)).is_err());
        let bumped = header(7, 1, 0, 1, 4);
        assert_eq!(states.check(&bumped).unwrap(), SequenceCheck::Append);
        states.record(&bumped, 0);
        assert!(matches!(
            states.check(&header(7, 0, 4, 1, 5)),
            Err(BrokerError::InvalidProducerEpoch { .. })
        ));
        // A producer never seen may start anywhere; non-idempotent batches always append.
        assert_eq!(
            states.check(&header(8, 3, 40, 1, 5)).unwrap(),
            SequenceCheck::Append
        );
        assert_eq!(
            states.check(&header(-1, -1, -1, 1, 5)).unwrap(),
            SequenceCheck::Append
        );
    }

    #[test]
    fn only_the_last_five_batches_are_remembered_and_state_is_bounded() {
        let mut states = ProducerStates::new(60_000, 2);
        for i in 0..7 {
            states.record(&header(1, 0, i, 1, i64::from(i)), 0);
        }
        assert!(matches!(
            states.check(&header(1, 0, 0, 1, 0)),
            Err(BrokerError::OutOfOrderSequence { .. })
        ));
        assert!(matches!(
            states.check(&header(1, 0, 2, 1, 0)).unwrap(),
            SequenceCheck::Duplicate { .. }
        ));
        states.record(&header(2, 0, 0, 1, 7), 5);
        states.record(&header(3, 0, 0, 1, 8), 6);
        assert_eq!(states.len(), 2);
        states.expire(60_006);
        assert_eq!(states.len(), 1);
    }
}
