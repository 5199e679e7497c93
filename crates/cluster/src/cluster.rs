//! A node's place in the cluster: its identity, how it forms or joins the controller group,
//! and the membership changes (add a node, remove a node) the leader carries out.
//!
//! # Identity
//! `node.json` in the cluster directory holds the node's id (random, 31 bits, made at first
//! start; ids are never reused because a wiped node makes a new one) and, once known, the
//! cluster's id. It is replaced atomically. A node whose identity names a cluster but whose
//! Raft state is gone was wiped under its old id, and refuses to start.
//!
//! # Forming and joining
//! A node with Raft state just serves. A node without asks each seed who it is (the transport's
//! hello) and what it knows (`STATUS`):
//! - a seed that belongs to a formed cluster which already lists this node among its voters or
//!   learners, without a registry entry for it, means this node is one of the nodes the
//!   cluster was formed with: it starts serving and registers itself;
//! - one listing it *with* a registry entry means a node with this id has lived and lost its
//!   data: refused, with a message saying so;
//! - a formed cluster that does not list it: it asks to join (`JOIN`, served by the leader),
//!   which registers it (refused if the id was ever used or its address is taken), adds it as
//!   a learner, and makes it a voter while there are fewer than [`VOTERS_MAX`];
//! - no formed cluster yet, and every seed has answered: the node with the lowest id among
//!   them forms the group with all of them as voters (up to [`VOTERS_MAX`], the rest joining
//!   as learners); the others wait to be listed. So nodes started with each other's
//!   addresses form one group whatever order they start in. The seed lists must name the same
//!   nodes.
//! - A node without seeds forms a cluster of one, unless it was started to wait for an
//!   invitation (`cluster.wait_for_invite`): then it waits until a member's
//!   [`Cluster::add_node`] sends it the members' addresses, and joins through them as above.
//!
//! Membership changes go one at a time through the leader (openraft's joint consensus does
//! the rest); node ids and addresses are checked by the controller's deterministic apply.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::{BasicNode, ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use sluice_broker::Broker;
use tokio::sync::watch;

use crate::controller::{ControllerCommand, ControllerReply, ControllerState, NodeRecord};
use crate::definitions::{BrokerLink, BrokerObserver};
use crate::liveness::Liveness;
use crate::network::{Router, from_json, method, to_json};
use crate::node::{CONTROLLER_GROUP, ControllerNode, ControllerSettings, ProposeError};
use crate::placement::NodeId;
use crate::state_machine::Observer;
use crate::transport::{CallError, Transport, TransportConfig};

/// The most controller voters; further nodes are learners.
pub const VOTERS_MAX: usize = 5;

/// A node's lasting identity, kept in `node.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_id: NodeId,
    pub cluster_id: Option<String>,
}

impl NodeIdentity {
    /// Reads the identity in `dir`, or makes and keeps a new one.
    pub fn load_or_create(dir: &Path) -> Result<Self, ClusterError> {
        let path = dir.join("node.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ClusterError::Identity {
                path,
                reason: format!("undecodable: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // 31 bits, never 0: a node's id is also its Kafka broker id, an int32 that
                // clients expect to be positive. Two nodes drawing the same id is unlikely
                // (about one in 2^31 per pair) and refused by the registry if it happens.
                let node_id = (uuid::Uuid::new_v4().as_u64_pair().0 >> 33).max(1);
                let identity = Self {
                    node_id,
                    cluster_id: None,
                };
                identity.store(dir)?;
                Ok(identity)
            }
            Err(e) => Err(ClusterError::Identity {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Writes the identity atomically.
    pub fn store(&self, dir: &Path) -> Result<(), ClusterError> {
        let path = dir.join("node.json");
        let fail = |reason: String| ClusterError::Identity {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| fail(e.to_string()))?;
        crate::files::replace_atomically(dir, "node.json", &bytes).map_err(|e| fail(e.to_string()))
    }
}

/// Why the node cannot take its place in the cluster.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("node identity {path}: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Controller(#[from] ProposeError),
    #[error("the cluster listener: {0}")]
    Listen(String),
}

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The address other nodes reach this node's cluster listener at.
    pub advertise: String,
    /// Other nodes' cluster addresses.
    pub seeds: Vec<String>,
    /// Without seeds, wait for a member's invitation ([`Cluster::add_node`]) instead of
    /// forming a cluster of one.
    pub wait_for_invite: bool,
    /// The addresses clients reach this node at, as the cluster shows them.
    pub kafka_addr: Option<String>,
    pub amqp_addr: Option<String>,
    pub http_addr: Option<String>,
    pub controller: ControllerSettings,
    /// The Raft timing of the node's partition groups.
    pub partition_timing: PartitionTiming,
}

/// How often a partition group's leader sends heartbeats, and the range its followers draw
/// election timeouts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Whether idle partition groups go quiet (see [`crate::partition::quiet`]).
    pub quiesce: bool,
}

impl Default for PartitionTiming {
    fn default() -> Self {
        let defaults = crate::partition::replica::ReplicaSettings::default();
        Self {
            heartbeat_ms: defaults.heartbeat_ms,
            election_min_ms: defaults.election_min_ms,
            election_max_ms: defaults.election_max_ms,
            quiesce: true,
        }
    }
}

/// What a node tells others about the cluster, from its own (possibly stale) view.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Status {
    cluster_id: Option<String>,
    leader: Option<NodeId>,
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
    /// Whether the asking node's id is in the registry.
    asker_registered: bool,
}

/// A membership request's answer.
#[derive(Debug, Serialize, Deserialize)]
enum MembershipAnswer {
    Done,
    Refused(String),
    /// Ask the leader, if one is known: its id and cluster address.
    NotLeader(Option<(NodeId, String)>),
    Failed(String),
}

/// This node's part in the cluster.
pub struct Cluster {
    identity: parking_lot::Mutex<NodeIdentity>,
    dir: PathBuf,
    settings: ClusterSettings,
    controller: Arc<ControllerNode>,
    transport: Transport,
    /// Whether the node belongs to the controller group yet.
    member: watch::Sender<Membership>,
    /// The broker whose definitions the controller group carries, if this node has one.
    broker: Option<Broker>,
    /// Whether this node waits for, or has taken, an invitation into a cluster.
    invite: Arc<watch::Sender<Invite>>,
}

/// Where a node stands in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// Still forming or looking for the cluster.
    Pending,
    /// Part of the controller group.
    Member,
    /// The cluster refused it, or it cannot take part; the reason says why.
    Refused(String),
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.controller.id())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts this node's cluster transport on `listener` and its controller under `dir`, then
    /// forms, joins or rejoins the cluster in the background ([`Self::wait_member`] waits for
    /// it). Fails at once on a wiped node that kept its old identity.
    ///
    /// With a `broker`, the controller group carries its definitions from now on: changes go
    /// through the group, and every committed change is applied to it in log order (see
    /// [`crate::definitions`]).
    pub async fn start(
        dir: &Path,
        listener: tokio::net::TcpListener,
        settings: ClusterSettings,
        broker: Option<Broker>,
    ) -> Result<Arc<Self>, ClusterError> {
        let identity = {
            let dir = dir.to_owned();
            tokio::task::spawn_blocking(move || NodeIdentity::load_or_create(&dir))
                .await
                .map_err(|e| ClusterError::Refused(e.to_string()))??
        };
        let mut settings = settings;
        if let Ok(local) = listener.local_addr() {
            settings.seeds = without_self(settings.seeds, local).await;
        }
        let router = Arc::new(Router::default());
        let mut config = TransportConfig::new(identity.node_id, settings.advertise.clone());
        config.cluster_id = identity.cluster_id.clone();
        let transport = Transport::start(config, listener, router.clone());
        // Waiting from the first moment the listener answers; a node found to have Raft state
        // stops waiting below.
        let invite = Arc::new(watch::Sender::new(
            if settings.wait_for_invite && settings.seeds.is_empty() {
                Invite::Waiting
            } else {
                Invite::NotWaiting
            },
        ));
        router.register(
            INVITE_GROUP,
            Arc::new(InviteServer {
                invite: Arc::clone(&invite),
            }),
        );
        if let Some(broker) = &broker {
            router.register(
                crate::definitions::FORWARD_GROUP,
                Arc::new(crate::definitions::ForwardServer {
                    broker: broker.clone(),
                }),
            );
        }
        let controller = ControllerNode::open(
            identity.node_id,
            &dir.join("controller"),
            transport.clone(),
            router,
            settings.controller.clone(),
            broker
                .clone()
                .map(|b| Arc::new(BrokerObserver::new(b)) as Arc<dyn Observer<ControllerState>>),
        )
        .await?;
        let liveness = Arc::new(Liveness::default());
        liveness.start(&controller);
        if let Some(broker) = &broker {
            broker.set_cluster_link(Arc::new(BrokerLink::new(
                Arc::clone(&controller),
                Arc::clone(&liveness),
                settings.partition_timing,
            )));
        }
        let has_state = controller.has_state().await?;
        if !has_state && let Some(cluster_id) = &identity.cluster_id {
            transport.shutdown();
            controller.shutdown().await;
            return Err(ClusterError::Refused(format!(
                "this node's identity ({}, node {}) says it belongs to cluster {cluster_id}, \
                 but its controller data is gone: a node whose data directory was wiped must \
                 not come back under its old id. Remove node.json to join as a new node",
                dir.join("node.json").display(),
                identity.node_id,
            )));
        }
        let (member, _) = watch::channel(Membership::Pending);
        let cluster = Arc::new(Self {
            identity: parking_lot::Mutex::new(identity),
            dir: dir.to_owned(),
            settings,
            controller,
            transport,
            member,
            broker,
            invite,
        });
        if has_state {
            cluster.invite.send_replace(Invite::NotWaiting);
            cluster.controller.serve();
            cluster.member.send_replace(Membership::Member);
            let registering = Arc::clone(&cluster);
            tokio::spawn(async move { registering.register_self().await });
        } else {
            let forming = Arc::clone(&cluster);
            tokio::spawn(async move {
                let seeds = match forming.settings.wait_for_invite {
                    true if forming.settings.seeds.is_empty() => forming.invitation().await,
                    _ => forming.settings.seeds.clone(),
                };
                if let Err(e) = forming.form_or_join(seeds).await {
                    tracing::error!(error = %e, "this node cannot take its place in the cluster");
                    forming
                        .member
                        .send_replace(Membership::Refused(e.to_string()));
                }
            });
        }
        Ok(cluster)
    }

    pub fn node_id(&self) -> NodeId {
        self.controller.id()
    }

    pub fn controller(&self) -> &Arc<ControllerNode> {
        &self.controller
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Waits up to `timeout` until this node belongs to the controller group or is refused;
    /// returns where it stands then.
    pub async fn wait_member(&self, timeout: Duration) -> Membership {
        let mut member = self.member.subscribe();
        let _ = tokio::time::timeout(timeout, member.wait_for(|m| *m != Membership::Pending)).await;
        member.borrow().clone()
    }

    /// Waits until this node belongs to the cluster and its broker holds the cluster's
    /// definitions (the cluster's first command applied, and everything this node has
    /// applied since): only then may it serve clients, or a definition made in the meantime
    /// would be replaced by the cluster's. Returns the reason if the cluster refused the node.
    /// Says every `complain_every` what it is waiting for.
    pub async fn wait_ready(&self, complain_every: Duration) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let mut complained = started;
        loop {
            match self.wait_member(Duration::from_millis(20)).await {
                Membership::Refused(reason) => return Err(reason),
                Membership::Member => {
                    let (named, applied) = self
                        .controller
                        .read_local(|s| (s.cluster_id.is_some(), s.applied_index));
                    let broker_caught_up = self
                        .broker
                        .as_ref()
                        .is_none_or(|b| b.replicated_index() >= applied);
                    if named && broker_caught_up {
                        return Ok(());
                    }
                }
                Membership::Pending => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            if complained.elapsed() >= complain_every {
                complained = tokio::time::Instant::now();
                tracing::warn!(
                    waited_s = started.elapsed().as_secs(),
                    seeds = ?self.settings.seeds,
                    "waiting to take part in the cluster before serving clients"
                );
            }
        }
    }

    /// Tells the other nodes that this one is shutting down (its answers to their pings say
    /// so) and waits until they know, so that none hands it leadership from now on.
    pub async fn begin_stopping(&self) {
        self.controller.begin_stopping();
        let me = self.node_id();
        let peers = self
            .controller
            .read_local(|s| s.nodes.keys().any(|id| *id != me));
        if peers {
            tokio::time::sleep(crate::liveness::STOPPING_KNOWN_AFTER).await;
        }
    }

    /// Stops the controller and the transport.
    pub async fn shutdown(&self) {
        self.controller.shutdown().await;
        self.transport.shutdown();
    }

    fn record(&self) -> NodeRecord {
        NodeRecord {
            id: self.node_id(),
            cluster_addr: self.settings.advertise.clone(),
            kafka_addr: self.settings.kafka_addr.clone(),
            amqp_addr: self.settings.amqp_addr.clone(),
            http_addr: self.settings.http_addr.clone(),
            joined_ms: now_ms(),
        }
    }

    /// Learns and keeps the cluster id once the controller state has it.
    async fn remember_cluster_id(&self, cluster_id: &str) -> Result<(), ClusterError> {
        let updated = {
            let identity = self.identity.lock();
            if identity.cluster_id.as_deref() == Some(cluster_id) {
                return Ok(());
            }
            NodeIdentity {
                node_id: identity.node_id,
                cluster_id: Some(cluster_id.to_owned()),
            }
        };
        // The file is synced: on the blocking pool.
        let dir = self.dir.clone();
        let stored = updated.clone();
        tokio::task::spawn_blocking(move || stored.store(&dir))
            .await
            .map_err(|e| ClusterError::Refused(e.to_string()))??;
        *self.identity.lock() = updated;
        self.transport.set_cluster_id(Some(cluster_id.to_owned()));
        Ok(())
    }

    /// Makes sure the registry has this node's current record (it may have restarted with new
    /// addresses), and that this node keeps the cluster's id.
    async fn register_self(&self) {
        let mut delay = Duration::from_millis(100);
        loop {
            let known = self
                .controller
                .read_linearizable(|s| {
                    (s.nodes.get(&self.node_id()).cloned(), s.cluster_id.clone())
                })
                .await;
            let result = match known {
                Ok((_, None)) => {
                    // Not named yet: the forming node's first command is on its way, or the
                    // forming node stopped before it was committed; then the leader names
                    // the cluster (a second Form, should the first still come, is refused).
                    if self.controller.metrics().current_leader == Some(self.node_id()) {
                        let _ = self.propose_form().await;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
                Ok((record, Some(cluster_id))) => {
                    if let Err(e) = self.remember_cluster_id(&cluster_id).await {
                        tracing::error!(error = %e, "cannot keep the cluster id");
                    }
                    let mut wanted = self.record();
                    match record {
                        Some(existing) => {
                            wanted.joined_ms = existing.joined_ms;
                            if existing == wanted {
                                return;
                            }
                            self.controller
                                .propose(ControllerCommand::UpdateNode(wanted))
                                .await
                        }
                        None => {
                            self.controller
                                .propose(ControllerCommand::AddNode(wanted))
                                .await
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(ControllerReply::Applied) => return,
                Ok(ControllerReply::Refused(reason)) => {
                    tracing::error!(%reason, "the cluster refused this node's record");
                    return;
                }
                Err(e) => {
                    tracing::info!(error = %e, "registering this node; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Waits for a member's invitation (see [`Self::add_node`]) and returns the seeds it
    /// names.
    async fn invitation(&self) -> Vec<String> {
        tracing::info!(
            node = self.node_id(),
            address = %self.settings.advertise,
            "waiting for an invitation into a cluster: run `sluice cluster add-node {}` against \
             one of its nodes",
            self.settings.advertise,
        );
        let mut invite = self.invite.subscribe();
        let invited = invite
            .wait_for(|i| matches!(i, Invite::Invited { .. }))
            .await
            .map(|i| i.clone());
        match invited {
            Ok(Invite::Invited { cluster_id, seeds }) => {
                tracing::info!(cluster = ?cluster_id, seeds = ?seeds, "invited into a cluster");
                seeds
            }
            // The sender lives as long as the cluster: not reached.
            _ => Vec::new(),
        }
    }

    /// Forms the cluster, or finds it through `seeds` and joins, as the module documentation
    /// says.
    async fn form_or_join(self: &Arc<Self>, seeds: Vec<String>) -> Result<(), ClusterError> {
        let me = self.node_id();
        if seeds.is_empty() {
            return self.form(BTreeMap::new()).await;
        }
        let mut delay = Duration::from_millis(100);
        let mut last_complaint = tokio::time::Instant::now() - Duration::from_secs(60);
        // Seeds already identified keep their ids: each is introduced once.
        let mut peers: BTreeMap<NodeId, String> = BTreeMap::new();
        // Set once this node has asked to join: finding itself registered is then its own doing.
        let mut asked_to_join = false;
        loop {
            let mut missing = Vec::new();
            for seed in &seeds {
                if peers.values().any(|known| known == seed) {
                    continue;
                }
                match self.transport.introduce(seed).await {
                    Ok(id) => {
                        self.transport.set_address(id, seed.clone());
                        peers.insert(id, seed.clone());
                    }
                    Err(CallError::Refused { reason, .. }) => {
                        return Err(ClusterError::Refused(format!("seed {seed}: {reason}")));
                    }
                    // The peer's id is not known before its hello: say what failed only.
                    Err(CallError::Unreachable { reason, .. }) => {
                        missing.push(format!("{seed} ({reason})"));
                    }
                    Err(e) => missing.push(format!("{seed} ({e})")),
                }
            }
            // A peer serving a controller group with members belongs to a formed cluster
            // (its id may not be committed yet).
            // A peer that does not answer counts as missing: it may have formed a cluster
            // already, and forming another beside it would split the nodes in two.
            let mut formed = None;
            for (&peer, seed) in &peers {
                match self.status_of(peer).await {
                    Ok(status) if !status.voters.is_empty() => {
                        formed = Some((peer, status));
                        break;
                    }
                    Ok(_) => {}
                    Err(reason) => missing.push(format!("{seed} (status: {reason})")),
                }
            }
            if let Some((peer, status)) = formed {
                let cluster_id = status
                    .cluster_id
                    .clone()
                    .unwrap_or_else(|| "(not yet named)".to_owned());
                if status.voters.contains(&me) || status.learners.contains(&me) {
                    if status.asker_registered && !asked_to_join {
                        return Err(ClusterError::Refused(format!(
                            "cluster {cluster_id} already has a node {me} with data; this node \
                             has none (its data directory was wiped?). Remove node.json to \
                             join as a new node"
                        )));
                    }
                    // The cluster id is kept once this node holds the log (register_self
                    // reads it back linearizably): kept earlier, a crash before the log came
                    // would leave a node that looks wiped.
                    self.controller.serve();
                    self.member.send_replace(Membership::Member);
                    self.register_self().await;
                    return Ok(());
                }
                if let Some(broker) = &self.broker
                    && let Some(what) = own_definitions(broker)
                {
                    return Err(ClusterError::Refused(format!(
                        "this node has definitions of its own ({what}) and would lose them by \
                         joining cluster {cluster_id}: a node joins a cluster with an empty data \
                         directory"
                    )));
                }
                self.controller.serve();
                asked_to_join = true;
                match self.ask_leader(peer, method::JOIN, &self.record()).await? {
                    MembershipAnswer::Done => {
                        // Admitted once caught up: the log is here, so the id may be kept.
                        if let Some(cluster_id) = &status.cluster_id {
                            self.remember_cluster_id(cluster_id).await?;
                        }
                        self.member.send_replace(Membership::Member);
                        return Ok(());
                    }
                    MembershipAnswer::Refused(reason) => {
                        return Err(ClusterError::Refused(format!(
                            "cluster {cluster_id} refused this node: {reason}"
                        )));
                    }
                    other => tracing::info!(answer = ?other, "joining; retrying"),
                }
            } else if missing.is_empty() && peers.keys().all(|&p| me < p) {
                return self.form(peers).await;
            } else if !missing.is_empty() && last_complaint.elapsed() > Duration::from_secs(5) {
                tracing::warn!(
                    seeds = %missing.join(", "),
                    "waiting for seeds to form or find the cluster"
                );
                last_complaint = tokio::time::Instant::now();
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Forms a new cluster of this node and `peers` (the first [`VOTERS_MAX`] by id vote; the
    /// others are added as learners once it runs).
    async fn form(self: &Arc<Self>, peers: BTreeMap<NodeId, String>) -> Result<(), ClusterError> {
        let cluster_id = {
            let identity = self.identity.lock();
            identity
                .cluster_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
        };
        let mut all: BTreeMap<NodeId, BasicNode> = peers
            .into_iter()
            .map(|(id, address)| (id, BasicNode::new(address)))
            .collect();
        all.insert(
            self.node_id(),
            BasicNode::new(self.settings.advertise.clone()),
        );
        let voters: BTreeMap<NodeId, BasicNode> = all
            .iter()
            .take(VOTERS_MAX)
            .map(|(&id, n)| (id, n.clone()))
            .collect();
        self.controller.serve();
        self.controller.initialize(voters.clone()).await?;
        // Kept only once the group's first entry is on disk: a crash before it leaves a node
        // that forms again, not one that looks wiped.
        self.remember_cluster_id(&cluster_id).await?;
        self.member.send_replace(Membership::Member);
        tracing::info!(%cluster_id, voters = ?voters.keys().collect::<Vec<_>>(), "formed the cluster");
        // Until it is committed: the other voters may still be starting.
        let mut delay = Duration::from_millis(100);
        while let Err(e) = self.propose_form().await {
            tracing::info!(error = %e, "naming the cluster; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        for (id, node) in all.iter().skip(VOTERS_MAX) {
            if let Err(e) = self
                .controller
                .raft()
                .add_learner(*id, node.clone(), false)
                .await
            {
                tracing::warn!(node = id, error = %e, "adding a learner");
            }
        }
        self.register_self().await;
        Ok(())
    }

    /// Proposes the cluster's first command: its id and the definitions it starts from.
    async fn propose_form(&self) -> Result<(), ProposeError> {
        let cluster_id = self
            .identity
            .lock()
            .cluster_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let reply = self
            .controller
            .propose(ControllerCommand::Form {
                cluster_id,
                definitions: Box::new(self.starting_definitions()),
            })
            .await?;
        if let ControllerReply::Refused(reason) = reply {
            tracing::debug!(%reason, "the cluster is named already");
        }
        Ok(())
    }

    /// The definitions the cluster starts from: this node's, with every partition and durable
    /// queue placed on this node (a node that ran alone served them all, under whatever id it
    /// had then).
    fn starting_definitions(&self) -> sluice_broker::MetadataState {
        let Some(broker) = &self.broker else {
            return sluice_broker::MetadataState::default();
        };
        let mut definitions = broker.definitions().as_ref().clone();
        let me = self.node_id() as sluice_broker::NodeId;
        for topic in definitions.topics.values_mut() {
            for partition in &mut topic.partitions {
                partition.leader = me;
                partition.replicas = vec![me];
            }
        }
        // And so did its durable queues.
        for vhost in definitions.messaging.vhosts.values_mut() {
            let vhost = std::sync::Arc::make_mut(vhost);
            for queue in vhost.queues.values_mut() {
                if queue.is_persistent() {
                    queue.node = Some(me);
                }
            }
        }
        definitions
    }

    async fn status_of(&self, peer: NodeId) -> Result<Status, String> {
        let answer = self
            .transport
            .call(
                peer,
                CONTROLLER_GROUP,
                method::STATUS,
                Bytes::new(),
                Duration::from_secs(2),
            )
            .await
            .map_err(|e| e.to_string())?;
        from_json(&answer)
    }

    /// Sends a membership request to `via`, following "not leader" answers to the leader.
    async fn ask_leader(
        &self,
        via: NodeId,
        method: u8,
        record: &NodeRecord,
    ) -> Result<MembershipAnswer, ClusterError> {
        let body = to_json(record).map_err(ClusterError::Refused)?;
        let deadline = tokio::time::Instant::now() + self.settings.controller.request_timeout;
        let mut target = via;
        while tokio::time::Instant::now() < deadline {
            let answer = if target == self.node_id() {
                serve_membership(&self.controller, target, method, body.clone()).await
            } else {
                self.controller.learn_address(target);
                self.transport
                    .call(
                        target,
                        CONTROLLER_GROUP,
                        method,
                        body.clone(),
                        self.settings.controller.request_timeout,
                    )
                    .await
                    .map_err(|e| e.to_string())
            };
            match answer.and_then(|a| from_json(&a)) {
                Ok(MembershipAnswer::NotLeader(Some((leader, address)))) => {
                    self.transport.set_address(leader, address);
                    target = leader;
                }
                Ok(MembershipAnswer::NotLeader(None)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(answer) => return Ok(answer),
                Err(reason) => {
                    tracing::info!(%reason, "membership request; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Ok(MembershipAnswer::Failed(
            "no leader answered in time".into(),
        ))
    }

    /// Removes node `id` from the cluster: from the registry (its id is retired) and from the
    /// controller group.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ClusterError> {
        let record = NodeRecord {
            id,
            cluster_addr: String::new(),
            kafka_addr: None,
            amqp_addr: None,
            http_addr: None,
            joined_ms: 0,
        };
        let leader = self
            .controller
            .raft()
            .current_leader()
            .await
            .unwrap_or(self.node_id());
        match self.ask_leader(leader, method::LEAVE, &record).await? {
            MembershipAnswer::Done => Ok(()),
            MembershipAnswer::Refused(reason) | MembershipAnswer::Failed(reason) => {
                Err(ClusterError::Refused(reason))
            }
            MembershipAnswer::NotLeader(_) => Err(ClusterError::Refused("no leader".into())),
        }
    }
}

impl Cluster {
    /// Invites the node waiting at cluster address `address` (started with
    /// `cluster.wait_for_invite`) into this cluster, and waits up to `timeout` until it is
    /// registered and in the controller group. Returns its id.
    pub async fn add_node(&self, address: &str, timeout: Duration) -> Result<NodeId, ClusterError> {
        let id = self
            .transport
            .introduce(address)
            .await
            .map_err(|e| ClusterError::Refused(format!("no node answers at {address}: {e}")))?;
        let (known, cluster_id, seeds) = self.controller.read_local(|s| {
            (
                s.nodes.contains_key(&id),
                s.cluster_id.clone(),
                s.nodes
                    .values()
                    .map(|n| n.cluster_addr.clone())
                    .collect::<Vec<_>>(),
            )
        });
        if known || self.in_group(id) {
            return Err(ClusterError::Refused(format!(
                "node {id} at {address} is already in the cluster"
            )));
        }
        self.transport.set_address(id, address.to_owned());
        let body =
            to_json(&Invite::Invited { cluster_id, seeds }).map_err(ClusterError::Refused)?;
        // Taking the invitation, the invited node dials this one to join, and the pair keeps one
        // connection (the one the lower id dialed): the answer may be lost with the connection
        // it came on. Asking again is harmless (the same cluster is told yes again).
        let deadline = tokio::time::Instant::now() + INVITE_TIMEOUT;
        let answer = loop {
            match self
                .transport
                .call(id, INVITE_GROUP, INVITE, body.clone(), INVITE_TIMEOUT)
                .await
            {
                Ok(answer) => break answer,
                Err(CallError::Closed { .. } | CallError::Unreachable { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(ClusterError::Refused(format!(
                        "inviting node {id} at {address}: {e}"
                    )));
                }
            }
        };
        if let InviteAnswer::Refused(reason) =
            from_json::<InviteAnswer>(&answer).map_err(ClusterError::Refused)?
        {
            return Err(ClusterError::Refused(format!(
                "node {id} at {address} refused the invitation: {reason}"
            )));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.controller.read_local(|s| s.nodes.contains_key(&id)) && self.in_group(id) {
                return Ok(id);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Refused(format!(
                    "node {id} at {address} took the invitation but has not joined within \
                     {} s; its log says why",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether node `id` is a voter or learner of the controller group as this node knows it.
    fn in_group(&self, id: NodeId) -> bool {
        let metrics = self.controller.metrics();
        let membership = metrics.membership_config.membership();
        membership.voter_ids().any(|v| v == id) || membership.learner_ids().any(|l| l == id)
    }
}

/// The group on which a node answers invitations into a cluster.
pub const INVITE_GROUP: u32 = u32::MAX - 2;
/// Its one method: the body is an [`Invite::Invited`].
const INVITE: u8 = 1;
/// How long an inviting node waits for the invited one to answer.
const INVITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a node waits for an invitation into a cluster, and the one it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Invite {
    /// It has seeds, or belongs to a cluster already.
    NotWaiting,
    Waiting,
    /// The inviting cluster's id and its members' cluster addresses.
    Invited {
        cluster_id: Option<String>,
        seeds: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum InviteAnswer {
    Accepted,
    Refused(String),
}

/// Takes the first invitation while the node waits for one; the same cluster inviting again
/// is told yes (the inviter may have retried), another is refused.
struct InviteServer {
    invite: Arc<watch::Sender<Invite>>,
}

impl crate::network::GroupHandler for InviteServer {
    fn handle(&self, _from: NodeId, method: u8, body: Bytes) -> crate::network::Answer {
        let answer = (|| {
            if method != INVITE {
                return Err(format!("unknown invitation method {method}"));
            }
            let Invite::Invited { cluster_id, seeds } = from_json::<Invite>(&body)? else {
                return Err("an invitation names a cluster's nodes".into());
            };
            let mut answer = InviteAnswer::Accepted;
            self.invite.send_if_modified(|current| match current {
                Invite::NotWaiting => {
                    answer = InviteAnswer::Refused(
                        "it does not wait for an invitation (it was started with seeds, or \
                         belongs to a cluster already)"
                            .into(),
                    );
                    false
                }
                Invite::Waiting => {
                    *current = Invite::Invited { cluster_id, seeds };
                    true
                }
                Invite::Invited {
                    cluster_id: taken, ..
                } => {
                    if *taken != cluster_id {
                        answer = InviteAnswer::Refused(format!(
                            "it has been invited into cluster {} already",
                            taken.as_deref().unwrap_or("(not yet named)")
                        ));
                    }
                    false
                }
            });
            to_json(&answer)
        })();
        Box::pin(async move { answer })
    }
}

/// `seeds` without the ones that name this node's own listener at `local` (a seed list shared
/// by every node names each node too, however it is spelled).
async fn without_self(seeds: Vec<String>, local: std::net::SocketAddr) -> Vec<String> {
    let mut kept = Vec::with_capacity(seeds.len());
    for seed in seeds {
        let is_self = match tokio::net::lookup_host(seed.as_str()).await {
            Ok(mut addresses) => addresses.any(|address| {
                address == local
                    || (local.ip().is_unspecified()
                        && address.port() == local.port()
                        && address.ip().is_loopback())
            }),
            // Resolved again, and complained about, when it is dialed.
            Err(_) => false,
        };
        if is_self {
            tracing::info!(%seed, "a seed names this node; skipping it");
        } else {
            kept.push(seed);
        }
    }
    kept
}

/// What a broker that never belonged to a cluster defines beyond a fresh node's defaults (its
/// topics and durable queues), if anything.
fn own_definitions(broker: &Broker) -> Option<String> {
    if broker.replicated_index() > 0 {
        return None;
    }
    let state = broker.definitions();
    let queues: usize = state
        .messaging
        .vhosts
        .values()
        .map(|v| v.queues.values().filter(|q| q.is_persistent()).count())
        .sum();
    (!state.topics.is_empty() || queues > 0)
        .then(|| format!("{} topics, {queues} durable queues", state.topics.len()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Serves `STATUS`, `JOIN` and `LEAVE` for the controller group (see [`crate::node`]).
pub(crate) async fn serve_membership(
    node: &Arc<ControllerNode>,
    from: NodeId,
    method: u8,
    body: Bytes,
) -> Result<Bytes, String> {
    match method {
        method::STATUS => {
            let metrics = node.metrics();
            let membership = metrics.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
            let (cluster_id, asker_registered) =
                node.read_local(|s| (s.cluster_id.clone(), s.nodes.contains_key(&from)));
            to_json(&Status {
                cluster_id,
                leader: metrics.current_leader,
                voters,
                learners,
                asker_registered,
            })
        }
        method::JOIN | method::LEAVE => {
            let record: NodeRecord = from_json(&body)?;
            let metrics = node.metrics();
            if metrics.state != ServerState::Leader {
                let leader = metrics
                    .current_leader
                    .and_then(|id| node.address_of(id).map(|address| (id, address)));
                return to_json(&MembershipAnswer::NotLeader(leader));
            }
            let _one_at_a_time = node.membership_lock().lock().await;
            let answer = if method == method::JOIN {
                admit(node, record).await
            } else {
                dismiss(node, record.id).await
            };
            to_json(&answer)
        }
        other => Err(format!("unknown membership method {other}")),
    }
}

/// Registers a joining node, adds it as a learner, and makes it a voter while there are
/// fewer than [`VOTERS_MAX`].
async fn admit(node: &Arc<ControllerNode>, record: NodeRecord) -> MembershipAnswer {
    let id = record.id;
    let address = record.cluster_addr.clone();
    match node.propose(ControllerCommand::AddNode(record)).await {
        Ok(ControllerReply::Applied) => {}
        Ok(ControllerReply::Refused(reason)) => return MembershipAnswer::Refused(reason),
        Err(e) => return MembershipAnswer::Failed(format!("registering node {id}: {e}")),
    }
    let raft = node.raft();
    // Blocking: answered once the learner has caught up with the log.
    if let Err(e) = raft.add_learner(id, BasicNode::new(address), true).await {
        return MembershipAnswer::Failed(format!("adding node {id} as a learner: {e}"));
    }
    let voters = node
        .metrics()
        .membership_config
        .membership()
        .voter_ids()
        .count();
    if voters < VOTERS_MAX
        && let Err(e) = raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
    {
        return MembershipAnswer::Failed(format!("making node {id} a voter: {e}"));
    }
    MembershipAnswer::Done
}

/// Retires a node's id and takes it out of the controller group, promoting a learner when a
/// voter leaves.
async fn dismiss(node: &Arc<ControllerNode>, id: NodeId) -> MembershipAnswer {
    match node.propose(ControllerCommand::RemoveNode { id }).await {
        Ok(ControllerReply::Applied) => {}
        Ok(ControllerReply::Refused(reason)) => return MembershipAnswer::Refused(reason),
        Err(e) => return MembershipAnswer::Failed(e.to_string()),
    }
    let raft = node.raft();
    let membership = node.metrics().membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if voters.contains(&id) {
        let promoted: Option<NodeId> = membership.learner_ids().find(|l| *l != id);
        let mut next: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
        next.extend(promoted);
        if let Err(e) = raft
            .change_membership(ChangeMembers::ReplaceAllVoters(next), false)
            .await
        {
            return MembershipAnswer::Failed(e.to_string());
        }
    } else if let Err(e) = raft
        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
        .await
    {
        return MembershipAnswer::Failed(e.to_string());
    }
    MembershipAnswer::Done
}
