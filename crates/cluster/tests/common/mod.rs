//! A small replicated machine for the storage tests: a map from keys to values, set by
//! commands. Its apply is deterministic and its snapshot is JSON.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};
use sluice_cluster::state_machine::Machine;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    pub key: String,
    pub value: String,
}

impl fmt::Display for Set {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "set {}", self.key)
    }
}

/// The value a key had before the command, as the reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous(pub Option<String>);

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Map {
    pub values: BTreeMap<String, String>,
    pub last_index: u64,
}

impl Machine for Map {
    type Command = Set;
    type Reply = Previous;

    fn apply(&mut self, index: u64, command: &Set) -> Previous {
        self.last_index = index;
        Previous(
            self.values
                .insert(command.key.clone(), command.value.clone()),
        )
    }

    fn encode(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(io::Error::other)
    }

    fn decode(bytes: &[u8]) -> io::Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

openraft::declare_raft_types!(
    /// The map's Raft types: one leader per term, as every Sluice group uses.
    pub MapTypes:
        D = Set,
        R = Previous,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);
