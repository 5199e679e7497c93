//! Definition changes through a replicated log.
//!
//! Alone, the broker's controller applies each [`MetadataCommand`] it decides to its own
//! metadata store and carries out the effects. In a cluster the command goes instead to a
//! [`ClusterLink`] (the cluster's controller group), and every node applies what the log
//! commits, in log order, through [`Applied`]: [`crate::Broker::apply_replicated`] writes the
//! command to `meta.redb` with its log index and carries out its effects on this node. The
//! node that proposed a command waits until its own node has applied it and answers with what
//! applying it gave there — the same on every node, since apply is deterministic.
//!
//! Changes of transient definitions (exclusive and auto-delete queues, bindings to them) stay
//! on their node: they are never proposed.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::BrokerError;
use crate::metadata::{MetadataCommand, NodeId};

/// A future a [`ClusterLink`] returns.
pub type LogFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// A produce that has its place in the partition's order, and the answer it will get.
pub type PendingProduce =
    Pin<Box<dyn Future<Output = Result<crate::ProduceOutcome, BrokerError>> + Send>>;

/// A future [`ClusterLink::forward`] returns.
pub type ForwardFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'a>>;

/// A node of the cluster as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: NodeId,
    /// Where Kafka clients reach it (`host:port`), if it serves Kafka.
    pub kafka_addr: Option<String>,
    /// Whether it answered lately (this node always does).
    pub live: bool,
}

impl ClusterNode {
    /// Its Kafka address as host and port, if it registered a well-formed one.
    pub fn kafka_endpoint(&self) -> Option<(&str, u16)> {
        let (host, port) = self.kafka_addr.as_deref()?.rsplit_once(':')?;
        Some((host, port.parse().ok()?))
    }
}

/// The controller group as its leader sees it (Kafka's DescribeQuorum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumView {
    pub leader: Option<NodeId>,
    /// The leader's term: Kafka's leader epoch of the metadata log.
    pub term: u64,
    /// The highest index known committed.
    pub commit_index: u64,
    pub voters: Vec<ReplicaView>,
    pub observers: Vec<ReplicaView>,
}

/// One member of the controller group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    pub id: NodeId,
    /// The last log index the leader knows it has (`None` outside the leader's view).
    pub matched_index: Option<u64>,
    /// Milliseconds since it last answered the leader.
    pub last_contact_ms: Option<u64>,
    /// Entries it is behind the leader's log.
    pub lag: Option<u64>,
}

/// A partition whose log a Raft group in the cluster layer replicates, as this node's replica
/// of it. Writes are served by the group's leader once it is ready (it applied an entry of its
/// own term); readers stop at the high watermark, which is the end of the committed entries
/// and never moves back.
pub trait ReplicatedLog: Send + Sync + std::fmt::Debug + 'static {
    /// The partition's data (whole batches, Raft's own control batches included).
    fn reader(&self) -> sluice_storage::LogReader;

    fn watch_high_watermark(&self) -> watch::Receiver<u64>;

    /// Writes batches (checked: structure and CRC) and answers as `options` ask: where they
    /// landed, or why not — [`BrokerError::NotLeader`], [`BrokerError::LeaderNotReady`] and
    /// [`BrokerError::NotEnoughReplicas`] only when nothing was written,
    /// [`BrokerError::WriteIndeterminate`] when it may have been. Resolves once the write has
    /// its place in the log's order (a later submit goes behind it); the answer is the
    /// pending future's.
    fn submit(&self, batches: Bytes, options: ProduceOptions) -> LogFuture<'_, PendingProduce>;

    /// The leader epoch (Raft term) when this replica leads and is ready to serve.
    fn ready_epoch(&self) -> Option<i32>;

    /// The leader this replica knows of, and the current epoch.
    fn leader(&self) -> (Option<NodeId>, i32);

    /// The node this replica is on.
    fn node(&self) -> NodeId;

    /// The other replicas as this one sees them while it leads (empty otherwise).
    fn followers(&self) -> Vec<FollowerView>;

    /// Whether this replica's group is quiet (idle: no heartbeats, no timers).
    fn is_quiet(&self) -> bool {
        false
    }

    /// Kafka's OffsetForLeaderEpoch from the replicated epochs.
    fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)>;

    /// Kafka's preferred leader election, asked of this replica: on the leader, hands
    /// leadership to the preferred replica when it is caught up.
    fn elect_preferred(&self) -> Pin<Box<dyn Future<Output = Election> + Send + '_>>;

    /// Kafka's DeleteRecords, on the leader: deletes the records below `offset` (at most the
    /// high watermark) on every replica, within `timeout`; returns the log start offset.
    fn delete_records(&self, offset: u64, timeout: std::time::Duration) -> LogFuture<'_, u64>;

    /// Takes a topic's changed log settings at once (all but the fsync policy, which applies
    /// from the replica's next open).
    fn reconfigure(&self, log: sluice_storage::LogConfig) -> Result<(), BrokerError>;

    /// Kafka's controlled shutdown, asked of this replica: on the leader, hands leadership to
    /// a caught-up follower and waits briefly for it to take over; nothing on a follower.
    fn hand_over(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;

    /// The partition's replicas changed or a reassignment is in progress (`target` set) or
    /// was cancelled: the replica takes the preferred leader from it, and while it leads it
    /// moves the group's membership to the target and then commits the reassignment's end.
    fn reassign(&self, reassignment: Reassignment);

    /// A read of this replica's data at `offset` met damage (a CRC failure, a batch missing):
    /// the replica rebuilds it from the other replicas, in the background. The damaged
    /// offsets are not served meanwhile (every read checks every batch).
    fn found_damage(&self, offset: u64) {
        let _ = offset;
    }

    /// Stops the replica (its data stays).
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A replicated partition's placement as a replica is told it ([`ReplicatedLog::reassign`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassignment {
    pub topic: String,
    pub topic_id: Uuid,
    pub partition: u32,
    /// The current replicas, the preferred leader first.
    pub replicas: Vec<NodeId>,
    /// Where a reassignment in progress moves them, the preferred leader first.
    pub target: Option<Vec<NodeId>>,
}

impl Reassignment {
    /// The replica that should lead: the target's first while a reassignment is in progress.
    pub fn preferred(&self) -> Option<NodeId> {
        self.target
            .as_ref()
            .unwrap_or(&self.replicas)
            .first()
            .copied()
    }
}

/// What a preferred leader election (Kafka's ElectLeaders) did for one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Election {
    /// Leadership is being handed to the preferred replica.
    Started,
    /// The preferred replica leads already, or the partition has one copy.
    NotNeeded,
    /// The preferred replica cannot lead now; why.
    PreferredNotAvailable(String),
    /// The replica asked does not lead; the leader it knows of.
    NotLeader(Option<NodeId>),
}

/// A follower of a replicated partition as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerView {
    pub node: NodeId,
    /// The offset after the last record the leader knows it holds (`None`: not known yet).
    pub matched_offset: Option<u64>,
    /// Milliseconds since it last answered the leader (`None`: never).
    pub last_contact_ms: Option<u64>,
    /// Whether it votes; a learner (a node a reassignment adds, catching up) does not, and
    /// is never in sync.
    pub voter: bool,
}

impl FollowerView {
    /// Whether it is in sync: it answered the leader within `lag` (Kafka's
    /// `replica.lag.time.max.ms`).
    pub fn in_sync(&self, lag: Duration) -> bool {
        self.voter
            && self
                .last_contact_ms
                .is_some_and(|ms| u128::from(ms) <= lag.as_millis())
    }
}

/// How a replicated write is acknowledged (Kafka's acks and the topic's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceOptions {
    /// acks=1 (and 0): answered once the leader has appended. Otherwise once committed.
    pub leader_only: bool,
    /// acks=all is refused, unwritten, when fewer replicas than this are in sync.
    pub min_insync_replicas: usize,
    /// A follower that has not answered the leader for this long is out of sync (Kafka's
    /// `replica.lag.time.max.ms`).
    pub replica_lag: Duration,
    /// How long the answer is waited for before it is "maybe written" (the request's
    /// timeout).
    pub timeout: Duration,
}

impl ProduceOptions {
    /// acks=all with no in-sync requirement beyond the quorum's, waiting `timeout`.
    pub fn all(timeout: Duration) -> Self {
        Self {
            leader_only: false,
            min_insync_replicas: 1,
            replica_lag: Duration::from_secs(30),
            timeout,
        }
    }
}

/// What the broker asks of the cluster to open its replica of a partition.
#[derive(Debug, Clone)]
pub struct ReplicaRequest {
    pub group: u32,
    pub dir: std::path::PathBuf,
    pub log: sluice_storage::LogConfig,
    /// Every replica's node, the preferred leader first.
    pub replicas: Vec<NodeId>,
    /// Whether to initialize the Raft group with `replicas` if the replica opens empty: only
    /// for a partition never reassigned (see `PartitionRecord::reassignments`); otherwise an
    /// empty replica waits for its leader to send it the log.
    pub initialize: bool,
    /// Whether its leader hands leadership back to the preferred replica by itself.
    pub auto_leader_rebalance: bool,
    /// How often its leader checks the topic's retention.
    pub housekeeping_interval: std::time::Duration,
    /// Kafka's `replica.lag.time.max.ms`: a follower silent this long no longer holds trims
    /// (retention, DeleteRecords) back.
    pub replica_lag: std::time::Duration,
}

/// The cluster as a clustered node's broker uses it: where definition changes are committed,
/// which nodes there are, and where things are placed.
pub trait ClusterLink: Send + Sync + std::fmt::Debug + 'static {
    /// Commits `command` and returns its log index. An error means it may or may not have
    /// been committed; the message says which.
    fn commit(&self, command: MetadataCommand) -> LogFuture<'_, u64>;

    /// Every node of the cluster, this one included.
    fn nodes(&self) -> Vec<ClusterNode>;

    /// The cluster's id, once this node knows it.
    fn cluster_id(&self) -> Option<String>;

    /// The controller group's leader, if one is known.
    fn controller(&self) -> Option<NodeId>;

    /// The replicas of each of partitions `from..to` of the topic incarnation `topic_id`, in
    /// order, `replication_factor` nodes each (the preferred leader first).
    fn place_partitions(
        &self,
        topic_id: Uuid,
        from: u32,
        to: u32,
        replication_factor: usize,
    ) -> Result<Vec<Vec<NodeId>>, BrokerError>;

    /// How many nodes new partitions may be placed on now (the live ones).
    fn live_node_count(&self) -> usize;

    /// Opens this node's replica of a replicated partition.
    fn open_replica(
        &self,
        request: ReplicaRequest,
    ) -> LogFuture<'_, std::sync::Arc<dyn ReplicatedLog>>;

    /// The node the durable queue with id `queue_id` is placed on.
    fn place_queue(&self, queue_id: Uuid) -> NodeId;

    /// The leader of Raft group `group` and its term as the nodes that lead report it (for a
    /// partition with no replica on this node); `None` when no live node reports one.
    fn leader_elsewhere(&self, group: u32) -> Option<(NodeId, i32)> {
        let _ = group;
        None
    }

    /// Sends a queue request to `node` and returns its answer, or why there is none (see
    /// [`crate::queue::remote`]).
    fn forward(&self, node: NodeId, body: Bytes, timeout: Duration) -> ForwardFuture<'_>;

    /// The controller group as its leader sees it (this node's own view when the leader
    /// cannot be asked).
    fn quorum(&self) -> LogFuture<'_, QuorumView>;
}

/// How long a node that proposed a change waits for its own node to apply it once committed.
pub(crate) const APPLY_WAIT: Duration = Duration::from_secs(30);
/// Outcomes kept for proposers that have not collected theirs yet.
const OUTCOMES_MAX: usize = 1024;

/// Which replicated commands this node has applied, and what applying gave for the ones whose
/// proposer may be waiting here.
#[derive(Debug)]
pub(crate) struct Applied {
    index: watch::Sender<u64>,
    /// Failures by log index (a success is the absence of one); bounded, oldest dropped.
    failures: Mutex<BTreeMap<u64, BrokerError>>,
}

impl Applied {
    pub fn new(index: u64) -> Self {
        Self {
            index: watch::Sender::new(index),
            failures: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records that the command at `index` was applied here, with what that gave.
    pub fn record(&self, index: u64, outcome: Result<(), BrokerError>) {
        if let Err(error) = outcome {
            let mut failures = self.failures.lock();
            failures.insert(index, error);
            while failures.len() > OUTCOMES_MAX {
                failures.pop_first();
            }
        }
        self.index.send_if_modified(|current| {
            let moved = index > *current;
            *current = (*current).max(index);
            moved
        });
    }

    /// The highest index applied here.
    pub fn current(&self) -> u64 {
        *self.index.borrow()
    }

    /// Waits up to `timeout` until the command at `index` is applied here; whether it is.
    pub async fn reached(&self, index: u64, timeout: Duration) -> bool {
        let mut applied = self.index.subscribe();
        matches!(
            tokio::time::timeout(timeout, applied.wait_for(|&i| i >= index)).await,
            Ok(Ok(_))
        )
    }

    /// Waits until the command at `index` is applied here and returns what applying it gave.
    pub async fn wait(&self, index: u64) -> Result<(), BrokerError> {
        let mut applied = self.index.subscribe();
        match tokio::time::timeout(APPLY_WAIT, applied.wait_for(|&i| i >= index)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(BrokerError::ShuttingDown),
            Err(_) => {
                return Err(BrokerError::metadata(
                    "apply a change",
                    format!(
                        "it was committed at index {index} but this node has not applied it \
                         within {APPLY_WAIT:?}"
                    ),
                ));
            }
        }
        match self.failures.lock().remove(&index) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}
