//! The controller group on one node: its Raft, its storage, and the ways in — proposing a
//! command from any node (forwarded to the leader) and reading linearizably from any node.
//!
//! # Proposing
//! [`ControllerNode::propose`] writes through the local Raft when this node leads, and forwards
//! the command to the leader otherwise. Until a deadline it retries what certainly did not
//! reach a log (no leader yet, leader unreachable, "forward to leader" answers); a call that
//! timed out or lost its connection may have been committed, so it is reported as
//! [`ProposeError::Indeterminate`] rather than retried: commands are not idempotent in general
//! and the caller decides (openraft's `client_write` documents the same rule).
//!
//! # Reading
//! [`ControllerNode::read_linearizable`] asks the leader for a read index (openraft's ReadIndex:
//! leadership confirmed by a quorum), waits until the local machine has applied it, then reads
//! the local state. Lease reads are never used: they depend on clocks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::alias::LogIdOf;
use openraft::errors::LinearizableReadError;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::raft::ReadPolicy;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, Raft, RaftMetrics, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::controller::{ControllerCommand, ControllerReply, ControllerState, ControllerTypes};
use crate::network::{
    Answer, GroupHandler, GroupNetwork, RaftServer, Router, from_json, method, to_json,
};
use crate::placement::NodeId;
use crate::state_machine::{Observer, StateMachineStore};
use crate::transport::{CallError, Transport};

/// The controller group's id on the transport.
pub const CONTROLLER_GROUP: u32 = 0;

/// Asks the leader for a linearizable read index.
const READ_INDEX: u8 = method::READ_INDEX;

/// How the controller group runs.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    pub heartbeat_ms: u64,
    /// Election timeouts are drawn from `election_min_ms..election_max_ms`. The failover time
    /// is about the maximum (the old leader's lease) plus one election and one commit.
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// A snapshot every this many entries, after which the log before it is purged but for
    /// the last `logs_kept` entries.
    pub snapshot_every: u64,
    pub logs_kept: u64,
    /// How long a proposal or a read may look for a leader.
    pub request_timeout: Duration,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_every: 5000,
            logs_kept: 1000,
            request_timeout: Duration::from_secs(10),
        }
    }
}

pub type ControllerMachine = StateMachineStore<ControllerTypes, ControllerState>;
pub type ControllerRaft = Raft<ControllerTypes, ControllerMachine>;

/// Why a proposal or a read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader could be reached in time; nothing was written.
    #[error("the controller has no reachable leader: {0}")]
    NoLeader(String),
    /// The command may or may not have been committed.
    #[error("the controller did not confirm the command (it may still be applied): {0}")]
    Indeterminate(String),
    /// The local Raft stopped.
    #[error("the controller stopped: {0}")]
    Stopped(String),
    /// The command cannot be sent at all (it is over the transport's frame limit); nothing was
    /// written.
    #[error("the command cannot be sent: {0}")]
    Unsendable(String),
}

/// A forwarded write's answer.
#[derive(Debug, Serialize, Deserialize)]
enum WriteAnswer {
    /// Committed and applied at this log index.
    Applied(u64, ControllerReply),
    /// This node does not lead (any more); try the one named, if any.
    NotLeader(Option<NodeId>),
    Failed(String),
}

/// A read-index request's answer.
#[derive(Debug, Serialize, Deserialize)]
enum ReadAnswer {
    Index(Option<u64>),
    NotLeader(Option<NodeId>),
    Failed(String),
}

/// The controller group on this node.
pub struct ControllerNode {
    id: NodeId,
    raft: ControllerRaft,
    machine: ControllerMachine,
    transport: Transport,
    router: Arc<Router>,
    settings: ControllerSettings,
    /// Membership changes this node makes as leader go one at a time.
    membership: tokio::sync::Mutex<()>,
    /// Whether it answers Raft and membership requests yet (see [`Self::serve`]).
    serving: std::sync::atomic::AtomicBool,
    /// Whether the node is shutting down (its pings say so: see [`crate::liveness`]).
    stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ControllerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ControllerNode {
    /// Opens the controller's log and state machine under `dir` and starts its Raft, serving
    /// peers through `router`.
    pub async fn open(
        id: NodeId,
        dir: &Path,
        transport: Transport,
        router: Arc<Router>,
        settings: ControllerSettings,
        observer: Option<Arc<dyn Observer<ControllerState>>>,
    ) -> Result<Arc<Self>, ProposeError> {
        let stopped = |e: &dyn std::fmt::Display| ProposeError::Stopped(e.to_string());
        // Opening reads and may sync files: on the blocking pool, never a runtime worker.
        let dir_owned = dir.to_owned();
        let (log, machine) = tokio::task::spawn_blocking(move || {
            let log = crate::log_store::LogStore::<ControllerTypes>::open(&dir_owned.join("log"))?;
            let machine = ControllerMachine::open(&dir_owned.join("machine"))?;
            Ok::<_, std::io::Error>((log, machine))
        })
        .await
        .map_err(|e| stopped(&e))?
        .map_err(|e| stopped(&e))?;
        if let Some(observer) = observer {
            machine
                .set_observer(observer)
                .await
                .map_err(|e| stopped(&e))?;
        }
        let config = Config {
            cluster_name: "sluice-controller".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_min_ms,
            election_timeout_max: settings.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.logs_kept,
            // Purge in batches of a fifth of the snapshot interval (openraft's default, 256,
            // would keep a short interval's log forever).
            purge_batch_size: (settings.snapshot_every / 5).clamp(1, 256),
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| stopped(&e))?;
        let network = GroupNetwork::new(transport.clone(), CONTROLLER_GROUP);
        let raft = Raft::new(id, Arc::new(config), network, log, machine.clone())
            .await
            .map_err(|e| stopped(&e))?;
        let node = Arc::new(Self {
            id,
            raft,
            machine,
            transport,
            router,
            settings,
            membership: tokio::sync::Mutex::new(()),
            serving: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        node.register();
        Ok(node)
    }

    /// Marks the node as shutting down: its answers to pings say so from now on, so that
    /// other nodes stop handing it leadership.
    pub fn begin_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn membership_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.membership
    }

    /// Answers peers for the controller group from now on. Until this is called the node
    /// takes no part in the group: a node must not answer Raft before it is known to belong
    /// (see [`crate::cluster`]); it answers only what it knows of the cluster (`STATUS`,
    /// `PING`), so nodes forming a cluster can tell a peer that has not formed one from a peer
    /// they cannot reach.
    pub fn serve(self: &Arc<Self>) {
        self.serving
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn register(self: &Arc<Self>) {
        self.router.register(
            CONTROLLER_GROUP,
            Arc::new(ControllerServer {
                raft: RaftServer::new(self.raft.clone()),
                node: Arc::downgrade(self),
            }),
        );
    }

    fn is_serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this node's Raft holds any state (a vote, log or snapshot): it has been part of
    /// a group before.
    pub async fn has_state(&self) -> Result<bool, ProposeError> {
        self.raft
            .is_initialized()
            .await
            .map_err(|e| ProposeError::Stopped(e.to_string()))
    }

    /// The transport this node's group uses.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The router the node's groups are served through.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The settings the group runs with.
    pub fn settings(&self) -> &ControllerSettings {
        &self.settings
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Forms a new controller group of `members` (every node must be given the same set).
    /// Does nothing if this node's group was formed already.
    pub async fn initialize(
        &self,
        members: BTreeMap<NodeId, BasicNode>,
    ) -> Result<(), ProposeError> {
        if self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ProposeError::Stopped(e.to_string()))?
        {
            return Ok(());
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Another node's initialization reached this one first: formed all the same.
            Err(RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ProposeError::Stopped(e.to_string())),
        }
    }

    /// Raft's view of the group from this node (cloned at once: holding it blocks Raft).
    pub fn metrics(&self) -> RaftMetrics<ControllerTypes> {
        self.raft.metrics().borrow_watched().clone()
    }

    /// Reads this node's state as applied so far (possibly behind the leader).
    pub fn read_local<T>(&self, read: impl FnOnce(&ControllerState) -> T) -> T {
        self.machine.read(read)
    }

    /// The Raft handle, for membership changes and waits.
    pub fn raft(&self) -> &ControllerRaft {
        &self.raft
    }

    /// Makes sure the transport can reach `peer`, from the group's membership.
    /// Makes sure the transport can reach `peer`: at the address it registered (kept current
    /// when it restarts with a new one), or failing that the one Raft's membership remembers.
    pub(crate) fn learn_address(&self, peer: NodeId) {
        let registered = self.read_local(|s| s.nodes.get(&peer).map(|n| n.cluster_addr.clone()));
        match registered {
            Some(address) => self.transport.set_address(peer, address),
            None => {
                let metrics = self.metrics();
                if let Some(node) = metrics.membership_config.membership().get_node(&peer) {
                    self.transport.suggest_address(peer, node.addr.clone());
                }
            }
        }
    }

    /// The cluster address of a member, from the group's membership.
    pub(crate) fn address_of(&self, peer: NodeId) -> Option<String> {
        let metrics = self.metrics();
        metrics
            .membership_config
            .membership()
            .get_node(&peer)
            .map(|node| node.addr.clone())
    }

    /// Commits `command` through the leader and returns its reply.
    pub async fn propose(
        &self,
        command: ControllerCommand,
    ) -> Result<ControllerReply, ProposeError> {
        self.propose_at(command).await.map(|(_, reply)| reply)
    }

    /// Commits `command` through the leader and returns its log index and reply.
    pub async fn propose_at(
        &self,
        command: ControllerCommand,
    ) -> Result<(u64, ControllerReply), ProposeError> {
        let deadline = tokio::time::Instant::now() + self.settings.request_timeout;
        let mut last = String::from("no leader elected yet");
        let mut hint: Option<NodeId> = None;
        while tokio::time::Instant::now() < deadline {
            let leader = match hint.take() {
                Some(leader) => Some(leader),
                None => self.raft.current_leader().await,
            };
            match leader {
                Some(leader) if leader == self.id => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let Ok(written) =
                        tokio::time::timeout(left, self.raft.client_write(command.clone())).await
                    else {
                        return Err(ProposeError::Indeterminate("not committed in time".into()));
                    };
                    match written {
                        Ok(response) => return Ok((index_of(&response.log_id), response.data)),
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                            last = "leadership moved".into();
                            hint = forward.leader_id.filter(|&l| l != self.id);
                        }
                        Err(RaftError::APIError(e)) => {
                            return Err(ProposeError::Indeterminate(e.to_string()));
                        }
                        Err(RaftError::Fatal(e)) => {
                            return Err(ProposeError::Stopped(e.to_string()));
                        }
                    }
                }
                Some(leader) => {
                    self.learn_address(leader);
                    let body = to_json(&command).map_err(ProposeError::Stopped)?;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self
                        .transport
                        .call(leader, CONTROLLER_GROUP, method::WRITE, body, left)
                        .await
                    {
                        Ok(answer) => match from_json::<WriteAnswer>(&answer)
                            .map_err(ProposeError::Indeterminate)?
                        {
                            WriteAnswer::Applied(index, reply) => return Ok((index, reply)),
                            WriteAnswer::NotLeader(next) => {
                                last = format!("node {leader} no longer leads");
                                hint = next.filter(|&l| l != leader);
                            }
                            WriteAnswer::Failed(reason) => {
                                return Err(ProposeError::Indeterminate(reason));
                            }
                        },
                        // Not sent, or answered before the command reached Raft (the peer
                        // does not take part yet, is stopping, or is too busy): nothing was
                        // written, so trying again is safe.
                        Err(
                            e @ (CallError::Unreachable { .. }
                            | CallError::Refused { .. }
                            | CallError::Remote { .. }),
                        ) => {
                            last = e.to_string();
                        }
                        Err(e @ CallError::TooLarge { .. }) => {
                            return Err(ProposeError::Unsendable(e.to_string()));
                        }
                        Err(e) => return Err(ProposeError::Indeterminate(e.to_string())),
                    }
                }
                None => {}
            }
            if hint.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Err(ProposeError::NoLeader(last))
    }

    /// Reads the state once it holds everything committed before this call began.
    pub async fn read_linearizable<T>(
        &self,
        read: impl FnOnce(&ControllerState) -> T,
    ) -> Result<T, ProposeError> {
        let deadline = tokio::time::Instant::now() + self.settings.request_timeout;
        let mut last = String::from("no leader elected yet");
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(ProposeError::NoLeader(last));
            }
            let index = match self.raft.current_leader().await {
                Some(leader) if leader == self.id => match self.read_index().await {
                    ReadAnswer::Index(index) => Some(index),
                    ReadAnswer::NotLeader(_) => None,
                    ReadAnswer::Failed(reason) => {
                        last = reason;
                        None
                    }
                },
                Some(leader) => {
                    self.learn_address(leader);
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self
                        .transport
                        .call(leader, CONTROLLER_GROUP, READ_INDEX, Bytes::new(), left)
                        .await
                    {
                        Ok(answer) => match from_json::<ReadAnswer>(&answer) {
                            Ok(ReadAnswer::Index(index)) => Some(index),
                            Ok(ReadAnswer::NotLeader(_)) => None,
                            Ok(ReadAnswer::Failed(reason)) | Err(reason) => {
                                last = reason;
                                None
                            }
                        },
                        Err(e) => {
                            last = e.to_string();
                            None
                        }
                    }
                }
                None => None,
            };
            if let Some(index) = index {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.raft
                    .wait(Some(left))
                    .applied_index_at_least(index, "linearizable read")
                    .await
                    .map_err(|e| ProposeError::NoLeader(e.to_string()))?;
                return Ok(self.machine.read(read));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The read index, asked of the local Raft as leader.
    async fn read_index(&self) -> ReadAnswer {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(read) => ReadAnswer::Index(Some(index_of(read.log_id()))),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward))) => {
                ReadAnswer::NotLeader(forward.leader_id)
            }
            Err(RaftError::APIError(e)) => ReadAnswer::Failed(e.to_string()),
            Err(RaftError::Fatal(e)) => ReadAnswer::Failed(e.to_string()),
        }
    }

    /// Stops this node's controller: its Raft and its place in the router.
    pub async fn shutdown(&self) {
        self.router.unregister(CONTROLLER_GROUP);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "the controller's Raft did not stop cleanly");
        }
    }
}

fn index_of(log_id: &LogIdOf<ControllerTypes>) -> u64 {
    log_id.index
}

/// Serves the controller group: Raft's RPCs, forwarded writes and read-index requests.
struct ControllerServer {
    raft: RaftServer<ControllerTypes, ControllerMachine>,
    node: std::sync::Weak<ControllerNode>,
}

impl GroupHandler for ControllerServer {
    fn handle(&self, from: NodeId, method: u8, body: Bytes) -> Answer {
        let serving = self.node.upgrade().is_some_and(|node| node.is_serving());
        if !serving && !matches!(method, method::STATUS | method::PING) {
            return Box::pin(async {
                Err("this node does not take part in the controller group yet".into())
            });
        }
        match method {
            method::WRITE => {
                let node = self.node.upgrade();
                Box::pin(async move {
                    let Some(node) = node else {
                        return to_json(&WriteAnswer::Failed("the controller is stopping".into()));
                    };
                    let command: ControllerCommand = from_json(&body)?;
                    let written = tokio::time::timeout(
                        node.settings.request_timeout,
                        node.raft.client_write(command),
                    )
                    .await;
                    let answer = match written {
                        Err(_) => WriteAnswer::Failed("not committed in time".into()),
                        Ok(Ok(response)) => {
                            WriteAnswer::Applied(index_of(&response.log_id), response.data)
                        }
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(
                            forward,
                        )))) => WriteAnswer::NotLeader(forward.leader_id),
                        Ok(Err(e)) => WriteAnswer::Failed(e.to_string()),
                    };
                    to_json(&answer)
                })
            }
            READ_INDEX => {
                let node = self.node.upgrade();
                Box::pin(async move {
                    let Some(node) = node else {
                        return to_json(&ReadAnswer::Failed("the controller is stopping".into()));
                    };
                    to_json(&node.read_index().await)
                })
            }
            method::PING => {
                let pong = self.node.upgrade().map_or_else(Default::default, |node| {
                    crate::liveness::Pong {
                        stopping: node.is_stopping(),
                        leading: node.router().leading(),
                    }
                });
                Box::pin(async move { Ok(pong.encode()) })
            }
            method::REPORT => {
                let node = self.node.upgrade();
                Box::pin(async move {
                    let Some(node) = node else {
                        return Err("the controller is stopping".into());
                    };
                    crate::status::serve(&node)
                })
            }
            method::STATUS | method::JOIN | method::LEAVE => {
                let node = self.node.upgrade();
                Box::pin(async move {
                    let Some(node) = node else {
                        return Err("the controller is stopping".into());
                    };
                    crate::cluster::serve_membership(&node, from, method, body).await
                })
            }
            _ => self.raft.handle(from, method, body),
        }
    }
}
