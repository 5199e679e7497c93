//! Sluice's cluster layer: everything that knows openraft.
//!
//! The rest of the broker never imports openraft; it sees this crate's types. Keeping the
//! library behind one crate means an upgrade of openraft (pinned to an exact pre-1.0 version)
//! touches one place, and that the conformance suite and fault tests here vouch for it.
//!
//! - [`cluster`]: node identity, forming and joining the cluster, membership changes.
//! - [`controller`]: the controller group's commands, state and Raft types.
//! - [`placement`]: rendezvous hashing of partitions, queues and consumer groups to nodes.
//! - [`log_store`]: a durable Raft log in one append-only file with a CRC per record.
//! - [`partition`]: replicated partitions: a Raft group whose log is the partition's segments.
//! - `reassign`: moving a replicated partition as a membership change of its group.
//! - [`node`]: the controller group on one node: proposals and linearizable reads from any node.
//! - [`network`]: openraft's RPCs over the transport, and the per-group request router.
//! - [`transport`]: one multiplexed TCP connection per pair of nodes.
//! - [`state_machine`]: openraft's state-machine storage around a deterministic [`Machine`].
//!
//! [`Machine`]: state_machine::Machine

pub mod cluster;
pub mod controller;
pub mod definitions;
mod files;
pub mod liveness;
pub mod log_store;
pub mod network;
pub mod node;
pub mod partition;
pub mod placement;
mod reassign;
pub mod state_machine;
pub mod status;
pub mod transport;
