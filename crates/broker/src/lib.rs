//! Sluice's protocol-agnostic core.
//!
//! It owns topics and their partitions, the durable metadata that defines them, committed
//! consumer offsets, idempotent-producer state, and (as they arrive) consumer groups, queues,
//! exchanges and bindings. It knows nothing of any wire protocol: front-ends translate their
//! requests into calls on [`Broker`] and its errors into their own.
//!
//! Structure:
//! - Changes to definitions (create, delete, alter) are requests to one controller task, which
//!   turns each into a [`command`] carrying every decided value, applies it to the metadata
//!   (a pure function returning the next state and the effects), persists it, and only then
//!   carries out the effects (logs, owner tasks, routing tables). This is the one place a
//!   replicated state machine will wrap.
//! - Each partition has one owner task for writes; reads go straight to its log files.
//! - Each queue has one owner task too ([`queue`]); exchanges route through an immutable
//!   routing table per virtual host ([`vhost`], [`exchange`]); front-ends declare and bind
//!   through [`declare`].
//! - Every core task is watched by a [`Supervisor`]; if one dies, the process must stop.
//!
//! Data directory layout: `meta.redb` (definitions and committed offsets), `logs/<topic>-<n>/`
//! (one log per partition), `queues/<queue id>/` (one log and acknowledgement journal per
//! queue), and `.lock` (held while a broker uses the directory).

pub mod alarms;
pub mod command;
pub mod declare;
pub mod definitions;
pub mod error;
pub mod exchange;
pub mod group;
pub mod group_offsets;
pub mod limits;
pub mod message;
pub mod metadata;
pub mod names;
pub mod offsets;
pub mod operate;
pub mod partition;
pub mod producer;
pub mod queue;
pub mod replication;
pub mod supervisor;
pub mod topic_config;
pub mod users;
pub mod vhost;

mod controller;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use sluice_storage::{Clock, LogConfig, OwnerOptions};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

pub use crate::error::{BrokerError, MessagingError, ResourceKind, StorageClass};
pub use crate::group::{GroupCoordinator, GroupLimits};
pub use crate::metadata::{MetadataCommand, MetadataState, NodeId, PartitionRecord, TopicRecord};
pub use crate::offsets::{CommittedOffset, OffsetEntry};
pub use crate::partition::{Partition, PartitionStats, ProduceOutcome, ProducerLimits};
pub use crate::supervisor::{Fatal, Supervisor};
pub use crate::topic_config::{ConfigEntry, ConfigKind, EffectiveTopicConfig, TimestampType};
/// The fsync policy of a log, as broker settings carry it.
pub use sluice_storage::FsyncPolicy;

use crate::command::OffsetCommand;
use crate::controller::Request;
use crate::metadata::MetadataStore;
use crate::offsets::OffsetStore;

/// Default bound on partitions per topic, so one request cannot make the broker open an
/// unbounded number of files (`kafka.max_partitions_per_topic`).
pub const MAX_PARTITIONS_PER_TOPIC: u32 = 10_000;
/// Default bound on partitions on the node, all topics together (`kafka.max_partitions`).
pub const MAX_PARTITIONS: u32 = 20_000;

/// Settings of the broker core.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub node_id: NodeId,
    /// Log settings of a topic with no overrides.
    pub log_defaults: LogConfig,
    /// Create a topic when a client first refers to it.
    pub auto_create_topics: bool,
    /// Partitions of a topic created without a count.
    pub default_partition_count: u32,
    pub producer_limits: ProducerLimits,
    /// Requests queued per partition before producers wait.
    pub partition_queue_capacity: usize,
    /// How often partitions run retention and save producer state.
    pub housekeeping_interval: Duration,
    pub group_limits: GroupLimits,
    /// Segment size of queue logs: smaller than topics', so space comes back soon after
    /// consumers acknowledge.
    pub queue_segment_bytes: u64,
    /// Ready messages in a queue above which its publishers wait while its consumers stream
    /// through it (see `queue::flow`); 0 turns publisher flow control off.
    pub queue_flow_ready_high: u64,
    /// The largest message body a queue accepts.
    pub max_message_bytes: usize,
    /// Resident memory above which publishers are blocked; `None` for no limit.
    pub memory_high_watermark_bytes: Option<u64>,
    /// Free disk space (on the data directory's file system) below which publishers are
    /// blocked.
    pub disk_free_limit_bytes: u64,
    /// Most partitions one topic may have.
    pub max_partitions_per_topic: u32,
    /// Most partitions of all topics together.
    pub max_partitions: u32,
    /// Replicas of a topic created without a factor; `None`: the smaller of 3 and the
    /// cluster's nodes (1 alone).
    pub default_replication_factor: Option<u16>,
    /// In-sync replicas an acks=all produce needs, for topics that do not set
    /// `min.insync.replicas`.
    pub min_insync_replicas: u32,
    /// A follower that has not answered its leader for this long is out of sync (Kafka's
    /// `replica.lag.time.max.ms`).
    pub replica_lag_time_max: Duration,
    /// Partitions of the committed-offsets topic a cluster creates (Kafka's
    /// `offsets.topic.num.partitions`); fixed once the topic exists.
    pub offsets_topic_partitions: u32,
    /// Whether a replicated partition's leader hands leadership back to the preferred replica
    /// by itself (Kafka's `auto.leader.rebalance.enable`).
    pub auto_leader_rebalance: bool,
}

impl BrokerConfig {
    /// Defaults for a broker keeping its data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_id: 0,
            log_defaults: LogConfig::default(),
            auto_create_topics: true,
            default_partition_count: 1,
            producer_limits: ProducerLimits {
                expiration_ms: 24 * 3600 * 1000,
                max_producer_count: 100_000,
            },
            partition_queue_capacity: 1024,
            housekeeping_interval: Duration::from_secs(5),
            group_limits: GroupLimits::default(),
            queue_segment_bytes: 64 * 1024 * 1024,
            queue_flow_ready_high: 100,
            max_message_bytes: 16 * 1024 * 1024,
            memory_high_watermark_bytes: None,
            disk_free_limit_bytes: 50_000_000,
            max_partitions_per_topic: MAX_PARTITIONS_PER_TOPIC,
            max_partitions: MAX_PARTITIONS,
            default_replication_factor: None,
            min_insync_replicas: 1,
            replica_lag_time_max: Duration::from_secs(30),
            offsets_topic_partitions: 10,
            auto_leader_rebalance: true,
        }
    }
}

/// A topic as it is being served: its definition and the partitions this node serves.
#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub id: Uuid,
    /// Every partition by index: `Some` where this node serves it (it is placed here).
    pub partitions: Vec<Option<Arc<Partition>>>,
    /// Each partition's node, by index, as the definitions place it (a replicated partition's
    /// preferred leader).
    pub leaders: Vec<NodeId>,
    /// Each partition's replicas, by index, the preferred leader first (during a
    /// reassignment: the target's, then the ones it removes).
    pub replicas: Vec<Vec<NodeId>>,
    /// Each partition's reassignment in progress, by index: the replicas it adds and those it
    /// removes.
    pub reassigning: Vec<Option<(Vec<NodeId>, Vec<NodeId>)>>,
    /// Each partition's Raft group, by index (0: a single copy).
    pub groups: Vec<u32>,
    /// The node's cluster link once it has one: where the leader of a replicated partition
    /// with no replica on this node is learned.
    pub cluster: Arc<std::sync::OnceLock<Arc<dyn replication::ClusterLink>>>,
    /// Config overrides as stored.
    pub overrides: BTreeMap<String, String>,
    pub config: EffectiveTopicConfig,
    pub created_ms: i64,
}

impl Topic {
    /// How many partitions the topic has, wherever they are served.
    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// The partitions this node serves.
    pub fn served(&self) -> impl Iterator<Item = &Arc<Partition>> {
        self.partitions.iter().flatten()
    }

    /// Partition `index`'s leader, leader epoch and replicas as this node knows them: a
    /// single copy's node; for a replicated partition, what this node's replica knows of its
    /// group, or when this node holds no replica, the leader the other nodes report (their
    /// answers to this node's pings), else the preferred leader.
    pub fn partition_view(&self, index: usize) -> Option<PartitionView> {
        let placed = *self.leaders.get(index)?;
        let replicas = self
            .replicas
            .get(index)
            .cloned()
            .unwrap_or_else(|| vec![placed]);
        let here = self.partitions.get(index).and_then(|p| p.as_ref());
        let group = self.groups.get(index).copied().unwrap_or(0);
        let reported = || {
            (group != 0)
                .then(|| self.cluster.get())
                .flatten()
                .and_then(|cluster| cluster.leader_elsewhere(group))
        };
        let (leader, epoch) = match here.and_then(|p| p.replica_leader()) {
            Some((leader, epoch)) => (leader, epoch),
            None => match reported() {
                Some((leader, epoch)) => (Some(leader), epoch),
                None => (Some(placed), 0),
            },
        };
        Some(PartitionView {
            leader,
            epoch,
            replicas,
            in_sync: here.and_then(|p| p.in_sync_replicas()),
        })
    }

    /// Partition `index` if this node serves it; otherwise whether it does not exist or is
    /// served by another node (which one). A replicated partition is served by its group's
    /// ready leader only.
    pub fn get(&self, index: i32) -> Result<&Arc<Partition>, BrokerError> {
        let position = usize::try_from(index).ok();
        match position.and_then(|i| self.partitions.get(i)) {
            Some(Some(partition)) => partition.serving().map(|()| partition),
            Some(None) => Err(BrokerError::NotLeader {
                topic: self.name.to_string(),
                partition: index,
                leader: position.and_then(|i| self.leaders.get(i).copied()),
            }),
            None => Err(BrokerError::UnknownPartition {
                topic: self.name.to_string(),
                partition: index,
            }),
        }
    }
}

/// Where a consumer group's coordinator is ([`Broker::coordinator`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coordinator {
    Here,
    /// This node will coordinate it once it has read its offsets.
    Loading,
    At(NodeId),
    /// Nowhere now: the committed-offsets topic is being created, or its partition has no
    /// leader.
    Unavailable,
}

fn coordinated_partitions(shared: &Shared) -> (u32, BTreeMap<u32, i32>) {
    let Some(topic) = shared
        .topics
        .read()
        .get(group_offsets::OFFSETS_TOPIC)
        .cloned()
    else {
        return (0, BTreeMap::new());
    };
    let led = shared
        .tails
        .all(topic.id)
        .iter()
        .filter(|tail| tail.coordinating() == group_offsets::Coordinating::Yes)
        .map(|tail| (tail.partition().index(), tail.partition().leader_epoch()))
        .collect();
    (topic.partition_count() as u32, led)
}

/// How often a clustered node looks for partitions of the committed-offsets topic it stopped
/// coordinating.
const COORDINATION_CHECK: Duration = Duration::from_millis(500);

/// Drops the membership of groups whose partition of the committed-offsets topic this node
/// stopped coordinating (or lost and led again in a newer epoch): their members moved to
/// the new coordinator, and state kept here would be stale should the partition come back.
/// Ends when the broker is dropped.
async fn unload_moved_groups(shared: std::sync::Weak<Shared>, groups: GroupCoordinator) {
    let mut before: BTreeMap<u32, i32> = BTreeMap::new();
    loop {
        tokio::time::sleep(COORDINATION_CHECK).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let (count, now) = coordinated_partitions(&shared);
        drop(shared);
        let moved: std::collections::BTreeSet<u32> = before
            .iter()
            .filter(|(index, epoch)| now.get(index) != Some(epoch))
            .map(|(index, _)| *index)
            .collect();
        before = now;
        if moved.is_empty() || count == 0 {
            continue;
        }
        let belongs =
            move |group: &str| moved.contains(&group_offsets::partition_for(group, count));
        match groups.unload(belongs).await {
            Ok(0) => {}
            Ok(dropped) => tracing::info!(dropped, "groups moved to another coordinator"),
            Err(error) => tracing::warn!(?error, "cannot drop groups that moved"),
        }
    }
}

/// How often [`Broker::locate_coordinator`] looks again.
const COORDINATOR_POLL: Duration = Duration::from_millis(50);

/// How long a replicated offset commit waits for its answer.
const OFFSET_COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Where a partition is served, for clients' metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    /// The node that leads it, if known.
    pub leader: Option<NodeId>,
    /// The leader epoch (a replicated partition's Raft term; 0 for a single copy).
    pub epoch: i32,
    /// Every node holding a copy, the preferred leader first.
    pub replicas: Vec<NodeId>,
    /// The in-sync replicas as the leader sees them, when this node leads a replicated
    /// partition (itself and the followers that answered it within `replica_lag_time_max`).
    pub in_sync: Option<Vec<NodeId>>,
}

/// A request to create a topic.
#[derive(Debug, Clone, Default)]
pub struct NewTopic {
    pub name: String,
    /// `None` for the broker default.
    pub partition_count: Option<u32>,
    /// `None` for the broker default (`default_replication_factor`); more than 1 needs a
    /// cluster with that many live nodes.
    pub replication_factor: Option<i16>,
    pub config: BTreeMap<String, String>,
    /// The node of each partition, by index, as the client chose them (Kafka's manual
    /// assignments); `None` lets the cluster place them.
    pub assignments: Option<Vec<NodeId>>,
}

/// State shared by the broker handle and the controller task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: BrokerConfig,
    pub clock: Arc<dyn Clock>,
    pub metadata: MetadataStore,
    pub offsets: OffsetStore,
    pub topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    pub messaging: crate::controller::MessagingShared,
    pub supervisor: Supervisor,
    pub started: Instant,
    /// Durations of fsync rounds, across every log.
    pub fsync_latency: Arc<sluice_metrics::Histogram>,
    /// Refusals by limit, for `sluice_limit_refusals_total`.
    pub refusals: crate::limits::Refusals,
    /// Set once on a clustered node: where definition changes are committed, and the nodes.
    /// Shared with every served topic (for the leaders of partitions with no replica here).
    pub cluster: Arc<std::sync::OnceLock<Arc<dyn replication::ClusterLink>>>,
    /// The replicated definition changes applied on this node.
    pub applied: replication::Applied,
    /// Held while a definition change is applied and its effects carried out.
    pub applying: tokio::sync::Mutex<()>,
    /// Requests for queues on other nodes, both ways.
    pub forwarding: Arc<queue::remote::Forwarding>,
    /// In a cluster: this node's replicas of the committed-offsets topic, each folded into
    /// its table of offsets (see [`group_offsets`]).
    pub tails: group_offsets::Tails,
    /// Set while this node asks the controller for the committed-offsets topic.
    pub creating_offsets_topic: std::sync::atomic::AtomicBool,
    /// Held for as long as the broker uses the data directory.
    _lock: File,
}

impl Shared {
    pub fn logs_dir(&self) -> PathBuf {
        self.config.data_dir.join("logs")
    }

    pub fn owner_options(&self) -> OwnerOptions {
        OwnerOptions {
            channel_capacity: self.config.partition_queue_capacity,
            tick_interval: self.config.housekeeping_interval,
            clock: Arc::clone(&self.clock),
            fsync_latency: Some(Arc::clone(&self.fsync_latency)),
            ..OwnerOptions::default()
        }
    }
}

/// The broker core. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Broker {
    shared: Arc<Shared>,
    controller: mpsc::Sender<Request>,
    groups: GroupCoordinator,
    alarms: tokio::sync::watch::Receiver<alarms::Alarms>,
}

impl Broker {
    /// Opens the data directory (creating it if needed), recovers every partition, and starts
    /// the controller and the partitions' owner tasks.
    pub async fn open(
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
        supervisor: Supervisor,
    ) -> Result<Self, BrokerError> {
        config.log_defaults.validate()?;
        let shared =
            tokio::task::spawn_blocking(move || controller::load(config, clock, supervisor))
                .await
                .map_err(|e| BrokerError::metadata("open", e))??;
        let shared = Arc::new(shared);
        controller::start(&shared).await?;
        let (controller, requests) = mpsc::channel(64);
        let task = tokio::spawn(controller::run(Arc::clone(&shared), requests));
        shared.supervisor.watch("controller".into(), task);
        controller::start_services(&shared, controller.clone());
        let (alarms, task) = alarms::start(
            shared.config.data_dir.clone(),
            shared.config.memory_high_watermark_bytes,
            shared.config.disk_free_limit_bytes,
        );
        shared.supervisor.watch("resource monitor".into(), task);
        let (groups, task) =
            GroupCoordinator::start(shared.config.group_limits, Arc::clone(&shared.clock));
        shared.supervisor.watch("group coordinator".into(), task);
        tokio::spawn(unload_moved_groups(Arc::downgrade(&shared), groups.clone()));
        Ok(Self {
            shared,
            controller,
            groups,
            alarms,
        })
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    /// The directory every partition's log is in (Kafka's one log directory).
    pub fn logs_dir(&self) -> PathBuf {
        self.shared.logs_dir()
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.config.node_id
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// Memory and disk alarms: while one is raised, publishers are blocked.
    pub fn alarms(&self) -> tokio::sync::watch::Receiver<alarms::Alarms> {
        self.alarms.clone()
    }

    /// The consumer group coordinator.
    pub fn groups(&self) -> &GroupCoordinator {
        &self.groups
    }

    /// Durations of fsync rounds, across every log.
    pub fn fsync_latency(&self) -> &sluice_metrics::Histogram {
        &self.shared.fsync_latency
    }

    /// Refusals by limit since the broker started.
    pub fn refusals(&self) -> &crate::limits::Refusals {
        &self.shared.refusals
    }

    /// Counts one refusal by `limit`.
    pub fn refused(&self, limit: crate::limits::Limit) {
        self.shared.refusals.count(limit);
    }

    /// The cluster's id as clients are told it: the cluster's, once this node is in one, so
    /// every node reports the same; before that, this data directory's own.
    pub fn cluster_id(&self) -> String {
        self.shared
            .cluster
            .get()
            .and_then(|link| link.cluster_id())
            .unwrap_or_else(|| self.shared.metadata.cluster_id().to_owned())
    }

    /// Every definition, as this node has applied them.
    pub fn definitions(&self) -> Arc<MetadataState> {
        self.shared.metadata.state()
    }

    /// Makes this node commit its definition changes through `link` (a cluster's controller
    /// group) from now on, and place partitions on the cluster's nodes; see [`replication`].
    /// Once only: a second call is ignored.
    pub fn set_cluster_link(&self, link: Arc<dyn replication::ClusterLink>) {
        if self.shared.cluster.set(Arc::clone(&link)).is_err() {
            tracing::warn!("the broker has its cluster link already");
            return;
        }
        self.shared
            .forwarding
            .set_link(link, Arc::downgrade(&self.shared));
        // Replicated partitions need the cluster: those defined before it was here open now.
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move { controller::effects::open_deferred_replicas(&shared).await });
    }

    /// Serves a queue request another node forwarded (see [`queue::remote`]).
    pub fn serve_forwarded(
        &self,
        from: NodeId,
        body: bytes::Bytes,
    ) -> impl std::future::Future<Output = Result<bytes::Bytes, String>> + Send + 'static {
        let forwarding = Arc::clone(&self.shared.forwarding);
        async move { forwarding.serve(from, body).await }
    }

    /// The cluster's nodes: this one alone when the broker has no cluster.
    pub fn cluster_nodes(&self) -> Vec<replication::ClusterNode> {
        match self.shared.cluster.get() {
            Some(link) => link.nodes(),
            None => vec![replication::ClusterNode {
                id: self.node_id(),
                kafka_addr: None,
                live: true,
            }],
        }
    }

    /// The replication factor of a topic created without one: `default_replication_factor`,
    /// or the smaller of 3 and the cluster's nodes (1 alone).
    pub fn default_replication_factor(&self) -> usize {
        controller::default_replication_factor(&self.shared)
    }

    /// The controller group's leader while it is live (clients send it their admin requests;
    /// `None` while there is none to send them to).
    pub fn controller_node(&self) -> Option<NodeId> {
        match self.shared.cluster.get() {
            Some(link) => {
                let leader = link.controller()?;
                link.nodes()
                    .iter()
                    .any(|node| node.id == leader && node.live)
                    .then_some(leader)
            }
            None => Some(self.node_id()),
        }
    }

    /// The controller group as its leader sees it; `None` when the broker has no cluster.
    pub async fn quorum(&self) -> Option<Result<replication::QuorumView, BrokerError>> {
        match self.shared.cluster.get() {
            Some(link) => Some(link.quorum().await),
            None => None,
        }
    }

    /// The index of the last replicated definition change applied on this node (0: none).
    pub fn replicated_index(&self) -> u64 {
        self.shared.metadata.applied_index()
    }

    /// Applies the replicated definition change committed at log `index` on this node:
    /// writes it to the metadata store and carries out its effects. `None` for a log entry
    /// that is not a change of definitions. An entry already applied (before a restart) is
    /// skipped. Entries come in log order.
    pub async fn apply_replicated(&self, index: u64, command: Option<MetadataCommand>) {
        let outcome = match command {
            Some(command) if index > self.shared.metadata.applied_index() => {
                controller::apply(&self.shared, Some(index), command).await
            }
            _ => {
                self.shared.metadata.skip_to(index);
                Ok(())
            }
        };
        if let Err(error) = &outcome {
            tracing::debug!(index, %error, "a replicated definition change failed here");
        }
        self.shared.applied.record(index, outcome);
    }

    /// Replaces every definition with `state`, the replicated definitions at log `index` (a
    /// controller snapshot, or the cluster's first state), and serves what it defines.
    pub async fn install_replicated(
        &self,
        index: u64,
        state: MetadataState,
    ) -> Result<(), BrokerError> {
        let outcome = controller::install(&self.shared, index, state).await;
        self.shared.applied.record(index, Ok(()));
        outcome
    }

    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.shared.topics.read().get(name).cloned()
    }

    /// Whether `name` is a topic the broker keeps for itself (in a cluster, the
    /// committed-offsets topic): clients may read it, never write it.
    pub fn is_internal_topic(&self, name: &str) -> bool {
        self.shared.cluster.get().is_some() && name == group_offsets::OFFSETS_TOPIC
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.shared.topics.read().values().cloned().collect()
    }

    pub fn topic_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.shared
            .topics
            .read()
            .values()
            .find(|t| t.id == id)
            .cloned()
    }

    pub fn partition(&self, topic: &str, index: i32) -> Result<Arc<Partition>, BrokerError> {
        let found = self
            .topic(topic)
            .ok_or_else(|| BrokerError::UnknownTopic(topic.to_owned()))?;
        found.get(index).cloned()
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, BrokerError>>) -> Request,
    ) -> Result<T, BrokerError> {
        let (reply, receive) = oneshot::channel();
        self.controller
            .send(make(reply))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        receive.await.map_err(|_| BrokerError::ShuttingDown)?
    }

    /// Creates a topic. With `validate_only`, checks the request and changes nothing.
    pub async fn create_topic(
        &self,
        topic: NewTopic,
        validate_only: bool,
    ) -> Result<Option<Arc<Topic>>, BrokerError> {
        self.request(|reply| Request::CreateTopic {
            topic,
            validate_only,
            reply,
        })
        .await
    }

    /// The topic, created with default settings if auto-creation is on and it is missing.
    pub async fn topic_or_create(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        if let Some(topic) = self.topic(name) {
            return Ok(topic);
        }
        if !self.shared.config.auto_create_topics {
            return Err(BrokerError::UnknownTopic(name.to_owned()));
        }
        let request = NewTopic {
            name: name.to_owned(),
            ..NewTopic::default()
        };
        match self.create_topic(request, false).await {
            Ok(Some(topic)) => Ok(topic),
            Ok(None) | Err(BrokerError::TopicExists(_)) => self
                .topic(name)
                .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned())),
            Err(error) => Err(error),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let name = name.to_owned();
        self.request(|reply| Request::DeleteTopic { name, reply })
            .await
    }

    /// Grows a topic to `total` partitions.
    /// `assignments` names the node of each new partition (Kafka's manual assignments);
    /// `None` lets the cluster place them.
    pub async fn create_partitions(
        &self,
        name: &str,
        total: u32,
        assignments: Option<Vec<NodeId>>,
        validate_only: bool,
    ) -> Result<(), BrokerError> {
        let name = name.to_owned();
        self.request(|reply| Request::CreatePartitions {
            name,
            total,
            assignments,
            validate_only,
            reply,
        })
        .await
    }

    /// Kafka's AlterPartitionReassignments for one partition: moves a replicated partition to
    /// the replicas `target` (the preferred leader first; a Raft membership change its leader
    /// carries out), replacing a reassignment in progress, or cancels the one in progress
    /// (`None`). Answered once the reassignment is committed, not when it is done
    /// ([`Topic::reassigning`] shows it until then).
    pub async fn reassign_partition(
        &self,
        name: &str,
        partition: u32,
        target: Option<Vec<NodeId>>,
    ) -> Result<(), BrokerError> {
        let name = name.to_owned();
        self.request(|reply| Request::ReassignPartition {
            name,
            partition,
            target,
            reply,
        })
        .await
    }

    /// Replaces a topic's config overrides.
    pub async fn set_topic_config(
        &self,
        name: &str,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), BrokerError> {
        let name = name.to_owned();
        self.request(|reply| Request::SetTopicConfig {
            name,
            overrides,
            validate_only,
            reply,
        })
        .await
    }

    /// Every config key of a topic with its effective value.
    pub fn describe_topic_config(&self, name: &str) -> Result<Vec<ConfigEntry>, BrokerError> {
        let topic = self
            .topic(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))?;
        Ok(topic_config::describe(
            &self.shared.config,
            &topic.overrides,
        ))
    }

    /// A producer id never handed out before.
    pub async fn next_producer_id(&self) -> Result<i64, BrokerError> {
        if let Some(log) = self.shared.cluster.get() {
            // Nodes reserve blocks through the log; a block another node took first is
            // refused, and the next one is tried.
            let mut last = None;
            for _ in 0..8 {
                if let Some(id) = self.shared.metadata.take_producer_id() {
                    return Ok(id);
                }
                let (start, count) = self.shared.metadata.producer_id_block();
                let index = log
                    .commit(MetadataCommand::AllocateProducerIds { start, count })
                    .await?;
                match self.shared.applied.wait(index).await {
                    Ok(()) => self
                        .shared
                        .metadata
                        .grant_producer_ids(start, start.saturating_add(count)),
                    Err(error) => last = Some(error),
                }
            }
            return Err(last.unwrap_or_else(|| {
                BrokerError::metadata("allocate producer id", "no block could be reserved")
            }));
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.metadata.next_producer_id())
            .await
            .map_err(|e| BrokerError::metadata("allocate producer id", e))?
    }

    /// Where consumer group `group`'s coordinator is: this node when it has no cluster; in a
    /// cluster the leader of the group's partition of the committed-offsets topic (see
    /// [`group_offsets`]), which is created here when it does not exist yet.
    pub fn coordinator(&self, group: &str) -> Coordinator {
        if self.shared.cluster.get().is_none() {
            return Coordinator::Here;
        }
        let Some((topic, index, tail)) = self.group_partition(group) else {
            self.create_offsets_topic();
            return Coordinator::Unavailable;
        };
        if let Some(tail) = tail {
            match tail.coordinating() {
                group_offsets::Coordinating::Yes => return Coordinator::Here,
                group_offsets::Coordinating::Loading => return Coordinator::Loading,
                group_offsets::Coordinating::No => {}
            }
        }
        match topic.partition_view(index as usize).and_then(|v| v.leader) {
            Some(leader) if leader != self.node_id() => Coordinator::At(leader),
            _ => Coordinator::Unavailable,
        }
    }

    /// [`Self::coordinator`], waiting up to `wait` while there is none yet (the
    /// committed-offsets topic being created, its partition electing a leader or loading): so
    /// that the members of a new group, asking at once, find it at once.
    pub async fn locate_coordinator(&self, group: &str, wait: Duration) -> Coordinator {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let found = self.coordinator(group);
            if !matches!(found, Coordinator::Unavailable | Coordinator::Loading)
                || tokio::time::Instant::now() >= deadline
            {
                return found;
            }
            tokio::time::sleep(COORDINATOR_POLL).await;
        }
    }

    /// Kafka's preferred leader election for partition `index` of `topic`: its leader hands
    /// leadership to the preferred replica (the placement's first) when that one is caught
    /// up. Asked of this node's replica, or of another node's (the preferred replica's, when
    /// this node holds none; then of the leader it names).
    pub async fn elect_preferred(
        &self,
        topic: &str,
        index: u32,
    ) -> Result<replication::Election, BrokerError> {
        use replication::Election;
        let found = self
            .topic(topic)
            .ok_or_else(|| BrokerError::UnknownTopic(topic.to_owned()))?;
        let view =
            found
                .partition_view(index as usize)
                .ok_or_else(|| BrokerError::UnknownPartition {
                    topic: topic.to_owned(),
                    partition: index as i32,
                })?;
        let Some(&preferred) = view.replicas.first().filter(|_| view.replicas.len() > 1) else {
            return Ok(Election::NotNeeded);
        };
        let here = self.node_id();
        let local = found.partitions.get(index as usize).cloned().flatten();
        let mut election = match local {
            Some(replica) => replica.elect_preferred().await,
            None => Election::NotLeader(Some(preferred)),
        };
        // Another node's replica answers for itself: ask the preferred replica's node (when
        // this node holds no replica), then the leader a replica names — twice at most.
        for _ in 0..2 {
            match election {
                Election::NotLeader(Some(leader)) if leader != here => {
                    election = self
                        .shared
                        .forwarding
                        .elect_preferred(leader, topic, index)
                        .await;
                }
                _ => break,
            }
        }
        Ok(match election {
            Election::NotLeader(_) => Election::PreferredNotAvailable(
                "the partition's leader is not known here".to_owned(),
            ),
            other => other,
        })
    }

    /// Asks the controller for the committed-offsets topic, once at a time, in the background
    /// (the requests that found it missing are answered "not available" meanwhile).
    fn create_offsets_topic(&self) {
        use std::sync::atomic::Ordering;
        if self
            .shared
            .creating_offsets_topic
            .swap(true, Ordering::AcqRel)
        {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            let topic = NewTopic {
                name: group_offsets::OFFSETS_TOPIC.to_owned(),
                partition_count: Some(broker.shared.config.offsets_topic_partitions),
                replication_factor: None,
                config: BTreeMap::from([
                    ("retention.ms".to_owned(), "-1".to_owned()),
                    ("retention.bytes".to_owned(), "-1".to_owned()),
                ]),
                assignments: None,
            };
            match broker.create_topic(topic, false).await {
                Ok(_) | Err(BrokerError::TopicExists(_)) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot create the committed-offsets topic yet");
                }
            }
            broker
                .shared
                .creating_offsets_topic
                .store(false, Ordering::Release);
        });
    }

    /// The committed-offsets topic, `group`'s partition of it, and this node's replica of
    /// that partition if it holds one; `None` before the topic exists.
    fn group_partition(
        &self,
        group: &str,
    ) -> Option<(Arc<Topic>, u32, Option<Arc<group_offsets::Tail>>)> {
        let topic = self.topic(group_offsets::OFFSETS_TOPIC)?;
        let index = group_offsets::partition_for(group, topic.partition_count() as u32);
        let tail = self.shared.tails.get(topic.id, index);
        Some((topic, index, tail))
    }

    /// This node's replica of `group`'s partition of the committed-offsets topic, if it
    /// coordinates the group now.
    fn coordinating(&self, group: &str) -> Result<Arc<group_offsets::Tail>, BrokerError> {
        let not_coordinator = || BrokerError::NotCoordinator {
            group: group.to_owned(),
        };
        let tail = self
            .group_partition(group)
            .and_then(|(_, _, tail)| tail)
            .ok_or_else(not_coordinator)?;
        match tail.coordinating() {
            group_offsets::Coordinating::Yes => Ok(tail),
            group_offsets::Coordinating::Loading => Err(BrokerError::CoordinatorLoading {
                group: group.to_owned(),
            }),
            group_offsets::Coordinating::No => Err(not_coordinator()),
        }
    }

    /// This node's replica of `group`'s partition of the committed-offsets topic, whatever
    /// its role (for reads that may lag the leader a little, such as the admin API's).
    /// `None` before the topic exists (no group has committed anything); NOT_COORDINATOR
    /// where this node holds no replica of the group's partition.
    fn local_table(&self, group: &str) -> Result<Option<Arc<group_offsets::Tail>>, BrokerError> {
        match self.group_partition(group) {
            None => Ok(None),
            Some((_, _, Some(tail))) => Ok(Some(tail)),
            Some((_, _, None)) => Err(BrokerError::NotCoordinator {
                group: group.to_owned(),
            }),
        }
    }

    /// Writes a batch of offset records through the coordinating replica `tail` (acks=all)
    /// and waits until its table holds it.
    async fn write_offsets(
        &self,
        group: &str,
        tail: &group_offsets::Tail,
        batch: bytes::Bytes,
    ) -> Result<(), BrokerError> {
        let outcome = tail
            .partition()
            .produce_acks(batch, -1, OFFSET_COMMIT_WAIT)
            .await
            .map_err(|error| match error {
                BrokerError::NotLeader { .. } | BrokerError::LeaderNotReady { .. } => {
                    BrokerError::NotCoordinator {
                        group: group.to_owned(),
                    }
                }
                BrokerError::NotEnoughReplicas { .. } => BrokerError::CoordinatorNotAvailable {
                    group: group.to_owned(),
                    reason: error.to_string(),
                },
                other => other,
            })?;
        if tail
            .folded(outcome.last_offset + 1, OFFSET_COMMIT_WAIT)
            .await
        {
            Ok(())
        } else {
            Err(BrokerError::WriteIndeterminate(format!(
                "the offsets of group {group:?} were committed at offset {} but not read back in time",
                outcome.base_offset
            )))
        }
    }

    /// Stores a group's committed offsets, all or none. In a cluster only the group's
    /// coordinator stores them (acks=all to the committed-offsets topic).
    pub async fn commit_offsets(
        &self,
        group: &str,
        entries: Vec<OffsetEntry>,
    ) -> Result<(), BrokerError> {
        if self.shared.cluster.get().is_some() {
            let tail = self.coordinating(group)?;
            let batch = group_offsets::commit_batch(group, &entries, self.shared.clock.now_ms());
            return self.write_offsets(group, &tail, batch).await;
        }
        let offsets = self.shared.offsets.clone();
        let command = OffsetCommand::Commit {
            group: group.to_owned(),
            entries,
        };
        tokio::task::spawn_blocking(move || offsets.apply(&command).map(|_| ()))
            .await
            .map_err(|e| BrokerError::metadata("commit offsets", e))?
    }

    /// A group's committed offset of one partition. In a cluster, as this node's replica of
    /// the group's partition of the committed-offsets topic has it (the coordinator's is
    /// current; callers that answer clients check [`Self::coordinator`] first).
    pub fn committed_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<CommittedOffset>, BrokerError> {
        if self.shared.cluster.get().is_some() {
            let found = self
                .local_table(group)?
                .and_then(|tail| tail.table().get(group, topic, partition));
            if found.is_some() {
                return Ok(found);
            }
        }
        // Alone; or in a cluster, what this node stored before offsets were replicated.
        self.shared.offsets.fetch(group, topic, partition)
    }

    /// Every committed offset of a group (in a cluster, as [`Self::committed_offset`]).
    pub fn committed_offsets(&self, group: &str) -> Result<Vec<OffsetEntry>, BrokerError> {
        let legacy = self.shared.offsets.fetch_group(group)?;
        if self.shared.cluster.get().is_none() {
            return Ok(legacy);
        }
        let mut entries = self
            .local_table(group)?
            .map(|tail| tail.table().group(group))
            .unwrap_or_default();
        // What this node stored before offsets were replicated, where nothing newer is.
        for old in legacy {
            if !entries
                .iter()
                .any(|e| e.topic == old.topic && e.partition == old.partition)
            {
                entries.push(old);
            }
        }
        entries.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(entries)
    }

    /// Groups that have committed offsets; in a cluster, those this node coordinates.
    pub fn groups_with_offsets(&self) -> Result<Vec<String>, BrokerError> {
        if self.shared.cluster.get().is_some() {
            let Some(topic) = self.topic(group_offsets::OFFSETS_TOPIC) else {
                return Ok(Vec::new());
            };
            let mut groups: Vec<String> = self
                .shared
                .tails
                .all(topic.id)
                .iter()
                .filter(|tail| tail.coordinating() == group_offsets::Coordinating::Yes)
                .flat_map(|tail| tail.table().groups().map(str::to_owned).collect::<Vec<_>>())
                .collect();
            // And those stored here before offsets were replicated.
            for group in self.shared.offsets.groups()? {
                if self.coordinator(&group) == Coordinator::Here {
                    groups.push(group);
                }
            }
            groups.sort();
            groups.dedup();
            return Ok(groups);
        }
        self.shared.offsets.groups()
    }

    pub async fn delete_group_offsets(&self, group: &str) -> Result<usize, BrokerError> {
        if self.shared.cluster.get().is_some() {
            let tail = self.coordinating(group)?;
            let keys: Vec<(String, u32)> = tail
                .table()
                .group(group)
                .into_iter()
                .map(|entry| (entry.topic, entry.partition))
                .collect();
            let mut deleted = 0;
            if !keys.is_empty() {
                let batch = group_offsets::delete_batch(group, &keys, self.shared.clock.now_ms());
                self.write_offsets(group, &tail, batch).await?;
                deleted = keys.len();
            }
            return Ok(deleted + self.delete_stored_offsets(group).await?);
        }
        self.delete_stored_offsets(group).await
    }

    /// Deletes the offsets of `group` in this node's own store.
    async fn delete_stored_offsets(&self, group: &str) -> Result<usize, BrokerError> {
        let offsets = self.shared.offsets.clone();
        let command = OffsetCommand::Delete {
            group: Some(group.to_owned()),
            topic: None,
        };
        tokio::task::spawn_blocking(move || offsets.apply(&command))
            .await
            .map_err(|e| BrokerError::metadata("delete offsets", e))?
    }

    /// Stops the controller, then closes every partition (flushing and fsyncing its log).
    /// Kafka's controlled shutdown: every replicated partition led on this node hands its
    /// leadership to a caught-up follower (all at once), while clients are still connected, so
    /// they move to the new leaders before this node stops. Answers how many it led.
    pub async fn hand_over_leadership(&self) -> usize {
        let mut handing = tokio::task::JoinSet::new();
        for topic in self.topics() {
            for partition in topic.served() {
                let partition = Arc::clone(partition);
                handing.spawn(async move { partition.hand_over().await });
            }
        }
        let mut led = 0;
        while let Some(joined) = handing.join_next().await {
            led += usize::from(joined.unwrap_or(false));
        }
        led
    }

    pub async fn shutdown(&self) -> Result<(), BrokerError> {
        self.shared.supervisor.begin_shutdown();
        self.shared.tails.stop_all();
        let topics: Vec<Arc<Topic>> = self.topics();
        let mut closing = tokio::task::JoinSet::new();
        for topic in topics {
            for partition in topic.served().cloned() {
                closing.spawn(async move {
                    let result = partition.close().await;
                    (partition, result)
                });
            }
        }
        let mut first_error = controller::shutdown(&self.shared).await.into_iter().next();
        while let Some(joined) = closing.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {}
                Ok((partition, Err(error))) => {
                    tracing::error!(topic = partition.topic(), partition = partition.index(), %error, "partition did not close cleanly");
                    first_error.get_or_insert(error);
                }
                Err(join_error) => {
                    first_error.get_or_insert(BrokerError::metadata("close partition", join_error));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
