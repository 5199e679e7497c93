//! The state a partition group derives from its log, the same on every replica: what apply
//! computes from committed entries alone.
//!
//! Today that is where the last committed batches are (the high watermark). The producer
//! state of idempotent producers joins it, so that a new leader knows every producer's
//! sequences before it accepts a write.

use std::io;

use serde::{Deserialize, Serialize};
use sluice_storage::batch::BatchHeader;

use super::{Appended, Batches};
use crate::state_machine::Machine;

/// A partition's derived state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMachine {
    /// The offset after the last record of the last applied data entry: the high watermark
    /// as far as data entries go (Raft's own entries after it are control batches).
    pub data_end_offset: u64,
    /// Data entries applied.
    pub applied_entries: u64,
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
