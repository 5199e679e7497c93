//! The state a partition group derives from its log, the same on every replica: what apply
//! computes from committed entries alone.
//!
//! - The end of the committed data (the high watermark as far as data entries go).
//! - The log start offset: the highest a committed trim entry (retention, DeleteRecords)
//!   asked for, never past the trim entry itself. Each replica deletes what lies below it.
//! - The idempotent producers' state (the broker's [`ProducerStates`]): each producer's epoch
//!   and the sequences and offsets of its last five batches, recorded with the batch's own max
//!   timestamp, never a clock. A new leader has applied every committed entry before it serves
//!   (its term's blank entry commits after them), so it knows every producer's sequences: a
//!   retried batch gets its original offsets, and the next one continues the sequence.

use std::io;

use serde::{Deserialize, Serialize};
use sluice_broker::BrokerError;
use sluice_broker::producer::{ProducerStates, SequenceCheck};
use sluice_storage::batch::BatchHeader;

use super::{Appended, Batches};
use crate::state_machine::Machine;

/// Producers silent this long are forgotten (Kafka's `producer.id.expiration.ms` default is a
/// day); eviction by count is the bound that applies deterministically during apply.
const PRODUCER_EXPIRATION_MS: i64 = 24 * 3600 * 1000;
/// At most this many producers are remembered per partition.
const PRODUCERS_MAX: usize = 100_000;

/// A partition's derived state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMachine {
    /// The offset after the last record of the last applied data entry.
    pub data_end_offset: u64,
    /// Data entries applied.
    pub applied_entries: u64,
    /// Records below this offset are deleted (committed trim entries).
    #[serde(default)]
    pub log_start_offset: u64,
    producers: ProducerStates,
}

impl Default for PartitionMachine {
    fn default() -> Self {
        Self {
            data_end_offset: 0,
            applied_entries: 0,
            log_start_offset: 0,
            producers: ProducerStates::new(PRODUCER_EXPIRATION_MS, PRODUCERS_MAX),
        }
    }
}

impl PartitionMachine {
    /// What the committed state says of a batch a producer sends (its header as sent): append
    /// it, acknowledge the offsets it already has, or refuse it. The leader checks against
    /// this plus what it has proposed and not yet seen applied.
    pub fn check(&self, header: &BatchHeader) -> Result<SequenceCheck, BrokerError> {
        self.producers.check(header)
    }

    /// Producers remembered.
    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }
}

impl Machine for PartitionMachine {
    type Command = Batches;
    type Reply = Appended;

    /// `batches` is the entry as the log holds it, offsets assigned: apply reads where it
    /// landed from the batch headers.
    fn apply(&mut self, _index: u64, batches: &Batches) -> Appended {
        let bytes = &batches.0;
        let mut at = 0;
        let mut first: Option<u64> = None;
        let mut last = None;
        while at < bytes.len() {
            let Ok(header) = BatchHeader::parse(&bytes[at..]) else {
                break;
            };
            first.get_or_insert(header.base_offset as u64);
            last = Some(header.last_offset() as u64);
            if let Some(start) = super::trim_offset(&header, &bytes[at..]) {
                // Never past the trim entry itself: only what was committed before it.
                let start = start.min(header.base_offset as u64);
                self.log_start_offset = self.log_start_offset.max(start);
            }
            // The batch's own time, so every replica records the same.
            self.producers.record(&header, header.max_timestamp);
            at += header.total_bytes();
        }
        let (Some(base_offset), Some(last_offset)) = (first, last) else {
            return Appended::default();
        };
        self.data_end_offset = self.data_end_offset.max(last_offset + 1);
        self.applied_entries += 1;
        Appended {
            base_offset,
            last_offset,
        }
    }

    fn encode(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(io::Error::other)
    }

    fn decode(bytes: &[u8]) -> io::Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionMachine;
    use crate::network::SnapshotCheck;
    use crate::partition::replica::PartitionMachineStore;
    use crate::state_machine::Machine;

    #[test]
    fn a_peer_s_snapshot_is_checked_at_the_door() {
        // A snapshot reaches the machine only once the replica holds the log up to it (see
        // `partition::seed`); what does not decode is still refused before openraft sees it.
        let data = PartitionMachine::default().encode().unwrap();
        <PartitionMachineStore as SnapshotCheck>::check_snapshot(&data).unwrap();
        assert!(<PartitionMachineStore as SnapshotCheck>::check_snapshot(b"{").is_err());
    }
}
