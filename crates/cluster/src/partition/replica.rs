//! One replica of a replicated partition on this node: its Raft group, its log and machine,
//! the high watermark readers may see, and the write path of the leader.
//!
//! # Writes (on the leader)
//! A produce is served only by a *ready* leader: one that has applied an entry of its own term
//! (its blank entry), and so every entry committed before it. Batches of an idempotent producer
//! are sequenced here before they enter the log: against the committed producer state
//! ([`PartitionMachine::check`]) *and* the batches this leader has proposed and not yet seen
//! applied (Redpanda's split of replicated and in-flight state). A retry of a batch still in
//! flight waits for the first one's answer instead of entering the log twice; one that
//! continues the in-flight sequence is proposed behind it.
//!
//! Writes then wait in a queue, in the order they were sequenced. While fewer than
//! [`PROPOSALS_MAX`] entries are proposed and unanswered the queue is proposed at once;
//! otherwise what queues up meanwhile becomes *one* entry (up to [`ENTRY_BYTES_MAX`]), whose
//! answer each write gets its own offsets from. So a busy partition pays Raft's per-entry cost
//! (an index record, an apply, a responder) once per round trip, not once per request.
//! A write queued in a term this replica no longer leads in is refused unwritten. The queue
//! holds at most [`QUEUE_BYTES_MAX`]; a write finding it full waits for room until its
//! deadline and is then refused as "maybe written" (it was not, but REQUEST_TIMED_OUT is what
//! Kafka clients retry safely), so a leader cut off from its quorum buffers a bounded amount.
//!
//! acks=all is answered at commit, and refused before it is queued while fewer than
//! `min.insync.replicas` replicas (this one included) answered the leader within Kafka's
//! `replica.lag.time.max.ms`; acks=1 is answered once this leader has appended the entry
//! (its log reports the append of the very buffer proposed).
//!
//! Errors say whether the batch may have been written: [`ReplicaError::NotLeader`],
//! [`ReplicaError::NotReady`] and [`ReplicaError::NotEnoughReplicas`] only before the entry
//! entered the log; once it has,
//! a lost leadership or a timeout is [`ReplicaError::Indeterminate`] (Kafka's
//! REQUEST_TIMED_OUT, which clients retry).
//!
//! # The high watermark
//! The end offset of the last applied entry, published on a watch channel and never moved
//! backwards. Readers must stop there.
//!
//! # Trimming (retention, DeleteRecords)
//! Records leave a replicated log only through a committed trim entry, so every replica
//! deletes the same ones. The leader proposes one every housekeeping interval when the
//! topic's `retention.ms` / `retention.bytes` make whole segments of its log due (its clock
//! decides what to propose; apply reads nothing but the entry), and for Kafka's DeleteRecords.
//! A trim never reaches past the high watermark, nor past what each replica in sync holds (the
//! leader's view of each follower's log; a follower silent for `replica.lag.time.max.ms` does
//! not hold retention back, as in Kafka): a replica in sync never needs a deleted entry from the
//! log, and one that does (it was out of sync, or lost its copy) copies the retained log before
//! it installs the leader's snapshot ([`super::seed`]).
//! Each replica then, once it applied the trim, has openraft snapshot its machine (so a
//! restart re-applies nothing that was deleted) and only then trims its log
//! ([`PartitionLog::trim_to`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use openraft::alias::WatchReceiverOf;
use openraft::errors::ClientWriteError;
use openraft::impls::ProgressResponder;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, Instant, Raft, RaftMetrics, SnapshotPolicy};
use sluice_broker::BrokerError;
use sluice_broker::producer::SequenceCheck;
use sluice_storage::batch::BatchHeader;
use sluice_storage::{LogConfig, LogReader, StorageError};
use tokio::sync::{Mutex, Notify, oneshot, watch};

use super::log_store::PartitionLog;
use super::machine::PartitionMachine;
use super::quiet::{Notice, Quiet, QuietGroups, QuietServer};
use super::repair::{Copies, RangeServer, rebuild_closed};
use super::{Appended, Batches, PartitionTypes};
use crate::network::{GroupNetwork, RaftServer, Router};
use crate::placement::NodeId;
use crate::state_machine::StateMachineStore;
use crate::transport::Transport;

pub type PartitionMachineStore = StateMachineStore<PartitionTypes, PartitionMachine>;
pub type PartitionRaft = Raft<PartitionTypes, PartitionMachineStore>;

/// How a partition group runs.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// How often a leader that is not the preferred replica checks whether it can hand
    /// leadership to it (Kafka's auto leader rebalance).
    pub balance_every: Duration,
    /// Whether leaders do so by themselves (Kafka's `auto.leader.rebalance.enable`); without,
    /// only a preferred leader election (ElectLeaders) moves leadership back.
    pub auto_balance: bool,
    /// Which nodes may be handed leadership (a node shutting down may not).
    pub may_lead: MayLead,
    /// How often the leader checks retention (the storage's housekeeping interval); a group
    /// with no write for a whole period may go quiet.
    pub housekeeping_every: Duration,
    /// Kafka's `replica.lag.time.max.ms`: a follower that has not answered the leader for this
    /// long is out of sync and no longer holds trims back (see [`PartitionReplica::trim_bound`]).
    pub replica_lag: Duration,
    /// The node's quiet groups, if idle groups are to go quiet (see [`super::quiet`]);
    /// without, a group's heartbeats and timers never stop.
    pub quiesce: Option<Arc<QuietGroups>>,
}

/// Whether a node may be handed leadership now; every node may unless told otherwise.
#[derive(Clone, Default)]
pub struct MayLead(Option<Arc<dyn Fn(NodeId) -> bool + Send + Sync>>);

impl MayLead {
    pub fn new(may_lead: impl Fn(NodeId) -> bool + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(may_lead)))
    }

    pub fn check(&self, node: NodeId) -> bool {
        self.0.as_ref().is_none_or(|may_lead| may_lead(node))
    }
}

impl std::fmt::Debug for MayLead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "MayLead(..)"
        } else {
            "MayLead(any)"
        })
    }
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            balance_every: Duration::from_secs(10),
            auto_balance: true,
            may_lead: MayLead::default(),
            housekeeping_every: Duration::from_secs(5),
            replica_lag: Duration::from_secs(30),
            quiesce: None,
        }
    }
}

/// Which replica to open, and where.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// This node.
    pub node: NodeId,
    /// The group's id on the transport.
    pub group: u32,
    /// The partition's directory.
    pub dir: PathBuf,
    pub log_config: LogConfig,
    /// Every replica's node and cluster address (the committed placement).
    pub members: BTreeMap<NodeId, BasicNode>,
    /// The replica that should lead when it can (the placement's first), if any.
    pub preferred: Option<NodeId>,
    /// Whether an empty replica initializes the group with `members` (a partition never
    /// reassigned: every replica is given the same members). Otherwise an empty replica is a
    /// learner-to-be that waits for the leader to send it the log.
    pub initialize: bool,
}

/// Why a write was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    /// This replica does not lead; nothing was written. The leader, if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// This replica was just elected and has not applied its term's first entry; nothing was
    /// written.
    #[error("the leader is not ready yet")]
    NotReady,
    /// The batch may or may not be committed (leadership lost after it entered the log, or
    /// the wait timed out).
    #[error("the write may or may not have been committed: {0}")]
    Indeterminate(String),
    /// Refused (by the producer state: sequence or epoch; or a batch that does not parse);
    /// nothing was written.
    #[error("{0}")]
    Refused(Arc<BrokerError>),
    /// Fewer replicas than `min.insync.replicas` answer the leader; nothing was written.
    #[error("{in_sync} in-sync replicas, fewer than the {required} required")]
    NotEnoughReplicas { in_sync: usize, required: usize },
    /// The replica stopped.
    #[error("the replica stopped: {0}")]
    Stopped(String),
}

/// A follower as its leader sees it ([`PartitionReplica::followers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follower {
    pub node: NodeId,
    /// The offset after the last entry the leader knows it holds.
    pub matched_offset: Option<u64>,
    /// Milliseconds since it last answered the leader.
    pub last_contact_ms: Option<u64>,
    /// Whether it votes (a learner a reassignment added does not yet).
    pub voter: bool,
}

/// When a write is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Once this leader has appended it (Kafka's acks=1): it may still be lost with the
    /// leader.
    Leader,
    /// Once committed (acks=all), and only if at least `min_insync` replicas, this one
    /// included, answered the leader within `lag` (checked before it enters the log).
    All { min_insync: usize, lag: Duration },
}

/// What a produce got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub appended: Appended,
    /// A retry of a batch already written, answered with its original offsets.
    pub duplicate: bool,
    /// The leader epoch (Raft term) it was written in.
    pub epoch: u64,
}

type Outcome = Result<Produced, ReplicaError>;

/// A write that has its place in the log's order, and the answer it will get.
pub type PendingWrite = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Set once the entry holding a write is in the leader's log. A write continuing it (the
/// same producer's next sequence) may then be proposed as an entry of its own: any log
/// holding the later entry holds the earlier one. Before, openraft may still refuse the
/// earlier entry (an expired lease, a hand-over under way) and accept the later one in the
/// same term, which would write the producer's sequence with a gap.
type Placed = Arc<AtomicBool>;

/// A batch of an idempotent producer that is proposed and not yet answered.
struct InFlight {
    epoch: i16,
    first_sequence: i32,
    last_sequence: i32,
    outcome: watch::Receiver<Option<Outcome>>,
    placed: Placed,
}

/// The in-flight write a queued write continues.
struct Predecessor {
    placed: Placed,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// What [`Writer::sequence`] decided.
enum Sequenced {
    /// A retry, answered with the first one's outcome.
    Answered(watch::Receiver<Option<Outcome>>),
    /// To be written, after the write it continues if that is still in flight.
    Write(Option<Predecessor>),
}

/// A write waiting to be proposed.
struct Queued {
    batches: Bytes,
    /// Records in `batches`: where the next write's records start in a combined entry.
    records: u64,
    /// The term it was accepted (and, if idempotent, sequenced) in.
    epoch: u64,
    committed: watch::Sender<Option<Outcome>>,
    /// Told the base offset once the leader has appended it (acks=1).
    appended: Option<oneshot::Sender<u64>>,
    placed: Placed,
    /// The in-flight write of the same producer it continues.
    after: Option<Predecessor>,
}

/// What the writer does with the write at the front of its queue.
#[derive(Debug)]
enum Step {
    /// Into the entry being formed.
    Take,
    /// Answered with this error, unwritten.
    Refuse(ReplicaError),
    /// Stays queued until the write it continues is placed or answered.
    Wait,
}

/// Decides [`Step`] for `write` given the writes already `taken` into the entry being formed
/// and the term this replica leads and serves in (`ready`).
fn step(write: &Queued, ready: Option<u64>, taken: &[Queued]) -> Step {
    // A write accepted in another term (this replica lost and regained leadership meanwhile)
    // was sequenced against state that no longer holds: it is refused, unwritten, and its
    // producer retries.
    if Some(write.epoch) != ready {
        return Step::Refuse(ReplicaError::NotLeader { leader: None });
    }
    let Some(after) = &write.after else {
        return Step::Take;
    };
    if after.placed.load(Ordering::SeqCst)
        || taken.iter().any(|w| Arc::ptr_eq(&w.placed, &after.placed))
    {
        return Step::Take;
    }
    match &*after.outcome.borrow() {
        None => Step::Wait,
        Some(Ok(_)) => Step::Take,
        // Refused before it reached the log: what continues it must not be written either.
        Some(Err(e)) => Step::Refuse(e.clone()),
    }
}

/// The leader's write path: sequencing, and the queue writes wait in while
/// [`PROPOSALS_MAX`] entries are proposed and unanswered; whatever waits is then proposed as
/// one entry.
#[derive(Default)]
struct WriterState {
    in_flight: HashMap<i64, VecDeque<InFlight>>,
    queue: VecDeque<Queued>,
    /// The bytes of the writes in `queue`.
    queued_bytes: usize,
    /// Entries proposed and not yet answered.
    proposed: usize,
}

/// Most bytes of writes waiting to be proposed; further writes wait for room.
const QUEUE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Entries one leader has proposed and not seen answered before further writes wait to be
/// combined into one entry.
const PROPOSALS_MAX: usize = 2;
/// Writes are combined into one entry up to this many bytes (a larger write is an entry of
/// its own).
const ENTRY_BYTES_MAX: usize = 1024 * 1024;

struct Writer {
    id: NodeId,
    raft: PartitionRaft,
    log: PartitionLog,
    machine: PartitionMachineStore,
    high_watermark: watch::Sender<u64>,
    state: Mutex<WriterState>,
    /// Woken when writes leave the queue.
    room: Notify,
    /// The queue's front waits for the write it continues to be placed.
    waiting: AtomicBool,
}

/// One replica of a partition on this node.
pub struct PartitionReplica {
    id: NodeId,
    group: u32,
    raft: PartitionRaft,
    log: PartitionLog,
    router: Arc<Router>,
    high_watermark: watch::Sender<u64>,
    writer: Arc<Writer>,
    machine: PartitionMachineStore,
    /// Woken when an applied trim entry moved the machine's log start past the log's.
    trims: Arc<Notify>,
    watcher: tokio::task::JoinHandle<()>,
    /// Set when this replica's Raft core ended without saying why in its metrics (a panic):
    /// its last metrics are stale, and it leads nothing.
    stopped: Arc<AtomicBool>,
    balancer: Option<tokio::task::JoinHandle<()>>,
    housekeeper: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
    /// The replica that should lead when it can (changed by a reassignment).
    preferred: Arc<parking_lot::Mutex<Option<NodeId>>>,
    may_lead: MayLead,
    /// Its quiescence, if idle groups go quiet.
    quiet: Option<Arc<Quiet>>,
    transport: Transport,
    /// How long a woken leader waits for its followers' answers.
    wake_wait: Duration,
    /// Held by a local trim: one at a time.
    trimming: tokio::sync::Mutex<()>,
    /// The writes counted at the last housekeeping (a group quiets after a whole period
    /// without one).
    writes_seen: parking_lot::Mutex<u64>,
    /// Kafka's `replica.lag.time.max.ms` ([`ReplicaSettings::replica_lag`]).
    replica_lag: Duration,
    /// The term this replica last found itself leading in, and since when (as far as a trim
    /// bound looked).
    leading_since: parking_lot::Mutex<Option<(u64, std::time::Instant)>>,
}

/// A group's membership ([`PartitionReplica::membership`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub voters: std::collections::BTreeSet<NodeId>,
    pub learners: std::collections::BTreeSet<NodeId>,
    pub joint: bool,
}

/// What [`PartitionReplica::elect_preferred`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreferredElection {
    /// Leadership is being handed to the preferred replica.
    Started,
    /// The preferred replica leads already (or there is none).
    NotNeeded,
    /// The preferred replica cannot take over now; why.
    Unavailable(String),
    /// This replica does not lead; the leader it knows of.
    NotLeader(Option<NodeId>),
}

impl std::fmt::Debug for PartitionReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReplica")
            .field("id", &self.id)
            .field("group", &self.group)
            .field("dir", &self.log.dir())
            .finish_non_exhaustive()
    }
}

fn stopped(e: &impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("partition group: {e}"))
}

/// How many times opening a replica's files rebuilds damage from the other replicas before
/// it gives up.
const OPEN_REBUILDS_MAX: usize = 3;

/// Opens a replica's log and machine. A log that refuses to open over damage (a segment
/// missing, a damaged batch where opening looks) is mended from the other replicas first (see
/// [`super::repair`]); when they cannot mend it, the error names the file and byte.
async fn open_files(
    dir: &std::path::Path,
    log_config: LogConfig,
    copies: &Copies,
    members: &BTreeMap<NodeId, BasicNode>,
    id: NodeId,
) -> io::Result<(PartitionLog, PartitionMachineStore)> {
    let peers: Vec<NodeId> = members.keys().copied().filter(|n| *n != id).collect();
    let mut rebuilds = 0;
    loop {
        let opened = {
            let dir = dir.to_owned();
            let log_config = log_config.clone();
            tokio::task::spawn_blocking(move || PartitionLog::open(&dir, log_config))
                .await
                .map_err(io::Error::other)?
        };
        match opened {
            Ok(log) => {
                let path = dir.join("raft-machine");
                let machine =
                    tokio::task::spawn_blocking(move || PartitionMachineStore::open(&path))
                        .await
                        .map_err(io::Error::other)??;
                return Ok((log, machine));
            }
            Err(error)
                if error.kind() == io::ErrorKind::InvalidData && rebuilds < OPEN_REBUILDS_MAX =>
            {
                tracing::error!(dir = %dir.display(), %error, "a partition replica's log is damaged");
                rebuilds += 1;
                match rebuild_closed(dir, copies, &peers).await {
                    Ok(0) => return Err(error),
                    Ok(_) => {}
                    Err(rebuild) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{error}; {rebuild}"),
                        ));
                    }
                }
            }
            Err(error) => return Err(error),
        }
    }
}

impl PartitionReplica {
    /// Opens the replica `spec` describes (log in its directory, machine in
    /// `raft-machine` there), starts its Raft and serves it on the transport as its group. A
    /// replica that was never initialized is initialized with the spec's members: every
    /// replica is given the same members (the committed placement), so initializing on each is
    /// safe.
    pub async fn open(
        spec: ReplicaSpec,
        transport: Transport,
        router: Arc<Router>,
        settings: &ReplicaSettings,
    ) -> io::Result<Arc<Self>> {
        let ReplicaSpec {
            node: id,
            group,
            dir,
            log_config,
            members,
            preferred,
            initialize,
        } = spec;
        let copies = Copies {
            transport: transport.clone(),
            group,
        };
        let (log, machine) = open_files(&dir, log_config, &copies, &members, id).await?;
        let config = raft_config(group, settings).map_err(|e| stopped(&e))?;
        let raft = Raft::new(
            id,
            Arc::new(config),
            GroupNetwork::new(transport.clone(), group).coalescing(Arc::clone(router.heartbeats())),
            log.clone(),
            machine.clone(),
        )
        .await
        .map_err(|e| stopped(&e))?;
        let quiet = settings
            .quiesce
            .as_ref()
            .map(|groups| Quiet::new(group, raft.clone(), Arc::clone(groups)));
        let server: Arc<dyn crate::network::GroupHandler> = Arc::new(RaftServer::new(raft.clone()));
        let server: Arc<dyn crate::network::GroupHandler> = match &quiet {
            Some(quiet) => Arc::new(QuietServer::new(server, Arc::clone(quiet))),
            None => server,
        };
        router.register(group, Arc::new(RangeServer::new(server, log.clone())));
        {
            let metrics = raft.metrics();
            log.set_repair(
                copies,
                Box::new(move || {
                    metrics
                        .borrow_watched()
                        .membership_config
                        .membership()
                        .nodes()
                        .map(|(node, _)| *node)
                        .filter(|node| *node != id)
                        .collect()
                }),
            );
        }
        if initialize && !raft.is_initialized().await.map_err(|e| stopped(&e))? {
            match raft.initialize(members).await {
                Ok(()) => {}
                // Another replica's vote or entries reached this one first: it is a member.
                Err(e) if e.api_error().is_some() => {}
                Err(e) => return Err(stopped(&e)),
            }
        }
        let (high_watermark, _) = watch::channel(0);
        let preferred = Arc::new(parking_lot::Mutex::new(preferred));
        let balancer = settings.auto_balance.then(|| {
            tokio::spawn(hand_to_preferred(
                raft.clone(),
                id,
                Arc::clone(&preferred),
                settings.balance_every,
                settings.may_lead.clone(),
                quiet.clone(),
            ))
        });
        let trims = Arc::new(Notify::new());
        let stopped = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_applied(
            raft.metrics(),
            (log.clone(), machine.clone()),
            high_watermark.clone(),
            Arc::clone(&router),
            (Arc::clone(&trims), Arc::clone(&stopped)),
            (id, group),
        ));
        let writer = Arc::new(Writer {
            id,
            raft: raft.clone(),
            log: log.clone(),
            machine: machine.clone(),
            high_watermark: high_watermark.clone(),
            state: Mutex::new(WriterState::default()),
            room: Notify::new(),
            waiting: AtomicBool::new(false),
        });
        let replica = Arc::new(Self {
            id,
            group,
            raft,
            log,
            router,
            high_watermark,
            writer,
            machine,
            trims,
            watcher,
            stopped,
            balancer,
            housekeeper: std::sync::OnceLock::new(),
            preferred,
            may_lead: settings.may_lead.clone(),
            quiet,
            transport,
            wake_wait: Duration::from_millis(settings.election_max_ms),
            trimming: tokio::sync::Mutex::new(()),
            writes_seen: parking_lot::Mutex::new(0),
            replica_lag: settings.replica_lag,
            leading_since: parking_lot::Mutex::new(None),
        });
        let housekeeper = tokio::spawn(keep_log(
            Arc::downgrade(&replica),
            Arc::clone(&replica.trims),
            settings.housekeeping_every,
        ));
        let _ = replica.housekeeper.set(housekeeper);
        Ok(replica)
    }

    pub fn group(&self) -> u32 {
        self.group
    }

    /// The node this replica is on.
    pub fn node(&self) -> NodeId {
        self.id
    }

    /// Kafka's OffsetForLeaderEpoch: the largest epoch at or below `epoch` in this replica's
    /// log and where it ended.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        self.log.end_offset_for_epoch(epoch)
    }

    pub fn raft(&self) -> &PartitionRaft {
        &self.raft
    }

    /// The partition's data as readers see it; stop at [`Self::high_watermark`].
    /// Takes changed log settings (see [`PartitionLog::set_config`]).
    pub fn set_log_config(&self, config: LogConfig) -> io::Result<()> {
        self.log.set_config(config)
    }

    /// A reader met damage at `offset`: rebuilt from the other replicas in the background
    /// (see [`super::repair`]).
    pub fn found_damage(&self, offset: u64) {
        self.log.repair_in_background(offset);
    }

    pub fn reader(&self) -> LogReader {
        self.log.reader()
    }

    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    /// `read` of the group's current metrics, without copying them.
    fn metrics<T>(&self, read: impl FnOnce(&RaftMetrics<PartitionTypes>) -> T) -> T {
        let receiver = self.raft.metrics();
        let metrics = receiver.borrow_watched();
        if self.stopped.load(Ordering::Acquire) && metrics.running_state.is_ok() {
            let mut stopped = metrics.clone();
            stopped.running_state = Err(openraft::errors::Fatal::Panicked);
            return read(&stopped);
        }
        read(&metrics)
    }

    /// The leader this replica knows of, and the current term (the Kafka leader epoch).
    pub fn leader(&self) -> (Option<NodeId>, u64) {
        self.metrics(|metrics| (leader_of(metrics), metrics.current_term))
    }

    /// Kafka's preferred leader election, on the leader: hands leadership to the preferred
    /// replica if it holds the leader's whole log and answered within the last second (as
    /// the periodic balancing does, at once).
    pub async fn elect_preferred(&self) -> PreferredElection {
        let Some(preferred) = *self.preferred.lock() else {
            return PreferredElection::NotNeeded;
        };
        if preferred != self.id {
            self.stir().await;
        }
        let (leader, ready) = self.metrics(|metrics| {
            let caught_up = holds_whole_log(metrics, preferred) && is_voter(metrics, preferred);
            let answering = metrics
                .heartbeat
                .as_ref()
                .and_then(|h| h.get(&preferred).cloned().flatten())
                .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
            (leader_of(metrics), caught_up && answering)
        });
        if leader == Some(preferred) {
            return PreferredElection::NotNeeded;
        }
        if leader != Some(self.id) {
            return PreferredElection::NotLeader(leader);
        }
        if !ready {
            return PreferredElection::Unavailable(format!(
                "the preferred replica {preferred} is not caught up with the leader or not answering it"
            ));
        }
        if !self.may_lead.check(preferred) {
            return PreferredElection::Unavailable(format!(
                "the preferred replica's node {preferred} is shutting down"
            ));
        }
        match self.raft.trigger().transfer_leader(preferred).await {
            Ok(()) => PreferredElection::Started,
            Err(error) => PreferredElection::Unavailable(error.to_string()),
        }
    }

    /// Counts a write (or another action) of this leader and, if the group was quiet, wakes
    /// it; within an election timeout of a wake, waits (at most that long) until every
    /// follower whose node answers has answered a heartbeat sent since: the leader's lease and
    /// its in-sync count are then current. Does nothing on a follower or a group that does not
    /// go quiet.
    async fn stir(&self) {
        let Some(quiet) = &self.quiet else {
            return;
        };
        if self.metrics(leader_of) != Some(self.id) {
            return;
        }
        let Some(woke) = quiet.stir().filter(|at| at.elapsed() < self.wake_wait) else {
            return;
        };
        let groups = Arc::clone(quiet.groups());
        let id = self.id;
        let answered = self
            .raft
            .wait(Some(self.wake_wait))
            .metrics(
                move |metrics| {
                    let since = woke.elapsed();
                    metrics.heartbeat.as_ref().is_some_and(|heartbeats| {
                        heartbeats.iter().all(|(node, at)| {
                            *node == id
                                || at.as_ref().is_some_and(|at| at.elapsed() <= since)
                                || !groups.is_live(*node)
                        })
                    })
                },
                "followers answered the woken leader",
            )
            .await;
        if answered.is_err() {
            tracing::debug!(
                group = self.group,
                "a woken leader's followers did not all answer within an election timeout"
            );
        }
    }

    /// Sets the replica that should lead when it can (a reassignment changed the placement).
    pub fn set_preferred(&self, preferred: Option<NodeId>) {
        *self.preferred.lock() = preferred;
    }

    /// The group's membership as this replica knows it: voters (of every config of a joint
    /// one), learners, and whether it is joint.
    pub fn membership(&self) -> Membership {
        self.metrics(|metrics| {
            let membership = metrics.membership_config.membership();
            Membership {
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                joint: membership.get_joint_config().len() > 1,
            }
        })
    }

    /// On the leader: the last log index `node` is known to hold, and the leader's commit
    /// index; `None` elsewhere.
    pub fn progress(&self, node: NodeId) -> Option<(Option<u64>, u64)> {
        self.metrics(|metrics| {
            if leader_of(metrics) != Some(self.id) {
                return None;
            }
            let matched = metrics
                .replication
                .as_ref()?
                .get(&node)
                .cloned()
                .flatten()
                .map(|log_id| log_id.index);
            let committed = metrics.local_committed.as_ref().map_or(0, |c| c.index);
            Some((matched, committed))
        })
    }

    /// Wakes a quiet group before a membership change (see [`Self::stir`]).
    pub async fn wake(&self) {
        self.stir().await;
    }

    /// Whether the group is quiet here.
    pub fn is_quiet(&self) -> bool {
        self.quiet.as_ref().is_some_and(|quiet| quiet.is_quiet())
    }

    /// On the leader, after a whole housekeeping period without a write: the group goes
    /// quiet if every follower holds the leader's whole log, committed and applied, and agrees
    /// (see [`super::quiet`]).
    async fn try_quiesce(&self) {
        let Some(quiet) = &self.quiet else {
            return;
        };
        let writes = quiet.writes();
        let idle = std::mem::replace(&mut *self.writes_seen.lock(), writes) == writes;
        if !idle || quiet.is_quiet() {
            return;
        }
        let notice = self.metrics(|metrics| {
            let last = metrics.last_log_index?;
            let settled = leader_of(metrics) == Some(self.id)
                && metrics.last_applied.as_ref().map(|l| l.leader_id.term)
                    == Some(metrics.current_term)
                && metrics.last_applied.as_ref().map(|l| l.index) == Some(last)
                && metrics
                    .membership_config
                    .membership()
                    .get_joint_config()
                    .len()
                    == 1
                && metrics
                    .membership_config
                    .membership()
                    .learner_ids()
                    .next()
                    .is_none();
            let followers: Vec<NodeId> = metrics
                .replication
                .as_ref()?
                .iter()
                .filter(|(node, _)| **node != self.id)
                .map(|(node, matched)| {
                    matched
                        .as_ref()
                        .is_some_and(|m| m.index == last)
                        .then_some(*node)
                })
                .collect::<Option<_>>()?;
            settled.then_some((
                Notice {
                    term: metrics.current_term,
                    last_index: last,
                },
                followers,
            ))
        });
        let Some((notice, followers)) = notice else {
            return;
        };
        let body = notice.encode();
        let asked = followers.iter().map(|&node| {
            self.transport.call(
                node,
                self.group,
                crate::network::method::QUIESCE,
                body.clone(),
                self.wake_wait,
            )
        });
        let answers = futures_util::future::join_all(asked).await;
        if answers.iter().all(Result::is_ok) && quiet.hush_leader(writes, followers) {
            tracing::debug!(
                group = self.group,
                term = notice.term,
                "the group went quiet"
            );
        }
    }

    /// The term, if this replica leads and is ready to serve (it applied an entry of its own
    /// term, so everything committed before it).
    pub fn ready_epoch(&self) -> Option<u64> {
        self.writer.ready_epoch()
    }

    fn not_serving(&self) -> ReplicaError {
        let leader = self.metrics(leader_of);
        if leader == Some(self.id) {
            ReplicaError::NotReady
        } else {
            ReplicaError::NotLeader { leader }
        }
    }

    /// Replicas, this one included, that answered this leader within `lag` (Kafka's in-sync
    /// replicas); 0 when this replica does not lead. Only voters count: a learner a
    /// reassignment added does not make a write more durable until it votes.
    pub fn in_sync(&self, lag: Duration) -> usize {
        self.metrics(|metrics| {
            if leader_of(metrics) != Some(self.id) {
                return 0;
            }
            // Quiet: every follower acknowledged the whole log; it counts while its node
            // answers.
            if let Some(quiet) = self.quiet.as_ref().filter(|q| q.is_quiet()) {
                let live = metrics.heartbeat.as_ref().map_or(0, |heartbeats| {
                    heartbeats
                        .keys()
                        .filter(|id| {
                            **id != self.id
                                && is_voter(metrics, **id)
                                && quiet.groups().is_live(**id)
                        })
                        .count()
                });
                return 1 + live;
            }
            let followers = metrics.heartbeat.as_ref().map_or(0, |heartbeats| {
                heartbeats
                    .iter()
                    .filter(|(id, at)| {
                        **id != self.id
                            && is_voter(metrics, **id)
                            && at.as_ref().is_some_and(|at| at.elapsed() <= lag)
                    })
                    .count()
            });
            1 + followers
        })
    }

    /// The other replicas while this one leads (empty otherwise): each one's node, the offset
    /// after the last entry the leader knows it holds, and how long ago it last answered.
    pub fn followers(&self) -> Vec<Follower> {
        let (matched, contacts) = self.metrics(|metrics| {
            if leader_of(metrics) != Some(self.id) {
                return (Vec::new(), BTreeMap::new());
            }
            let matched: Vec<(NodeId, Option<u64>, bool)> = metrics
                .replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, log_id)| {
                    (
                        *id,
                        log_id.as_ref().map(|l| l.index),
                        is_voter(metrics, *id),
                    )
                })
                .collect();
            let quiet = self.quiet.as_ref().filter(|q| q.is_quiet());
            let contacts: BTreeMap<NodeId, Option<u64>> = metrics
                .heartbeat
                .iter()
                .flatten()
                .map(|(id, at)| match quiet {
                    // Quiet: a follower whose node answers holds everything; its last contact
                    // is its node's.
                    Some(quiet) if quiet.groups().is_live(*id) => (*id, Some(0)),
                    _ => (*id, at.as_ref().map(|at| at.elapsed().as_millis() as u64)),
                })
                .collect();
            (matched, contacts)
        });
        matched
            .into_iter()
            .map(|(node, index, voter)| Follower {
                node,
                matched_offset: index.and_then(|index| {
                    self.log
                        .entry_loc(index)
                        .ok()
                        .flatten()
                        .map(|loc| loc.end_offset())
                }),
                last_contact_ms: contacts.get(&node).copied().flatten(),
                voter,
            })
            .collect()
    }

    /// Writes `batches` (checked: structure and CRC) and answers as `acks` asks, or after
    /// `timeout` with [`ReplicaError::Indeterminate`].
    pub async fn produce(&self, batches: Bytes, acks: Acks, timeout: Duration) -> Outcome {
        self.submit(batches, acks, timeout).await?.await
    }

    /// [`Self::produce`] in two steps: returns once the write has its place in the leader's
    /// queue (sequenced, behind every write submitted before), with the answer still to come.
    /// So a connection may submit its next produce while this one waits for its commit, and
    /// the two keep their order.
    pub async fn submit(
        &self,
        batches: Bytes,
        acks: Acks,
        timeout: Duration,
    ) -> Result<PendingWrite, ReplicaError> {
        self.stir().await;
        let Some(epoch) = self.ready_epoch() else {
            return Err(self.not_serving());
        };
        if let Acks::All { min_insync, lag } = acks
            && min_insync > 1
        {
            let in_sync = self.in_sync(lag);
            if in_sync < min_insync {
                return Err(ReplicaError::NotEnoughReplicas {
                    in_sync,
                    required: min_insync,
                });
            }
        }
        let invalid = |position, source| {
            ReplicaError::Refused(Arc::new(BrokerError::Storage(StorageError::InvalidBatch {
                position,
                source,
            })))
        };
        let first = BatchHeader::parse(&batches).map_err(|source| invalid(0, source))?;
        let mut records = 0u64;
        let mut at = 0;
        while at < batches.len() {
            let header =
                BatchHeader::parse(&batches[at..]).map_err(|source| invalid(at, source))?;
            records += u64::from(header.last_offset_delta as u32) + 1;
            at += header.total_bytes();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut committed, appended) = Writer::enqueue(
            &self.writer,
            first,
            batches,
            records,
            epoch,
            matches!(acks, Acks::Leader),
            deadline,
        )
        .await?;
        Ok(Box::pin(async move {
            let waited = tokio::time::timeout_at(deadline, async {
                if let Some(appended) = appended {
                    tokio::select! {
                        biased;
                        Ok(base_offset) = appended => {
                            return Ok(Produced {
                                appended: Appended {
                                    base_offset,
                                    last_offset: base_offset + records - 1,
                                },
                                duplicate: false,
                                epoch,
                            });
                        }
                        outcome = settled(&mut committed) => return outcome,
                    }
                }
                settled(&mut committed).await
            })
            .await;
            waited.unwrap_or_else(|_| {
                Err(ReplicaError::Indeterminate(format!(
                    "not {} within {} ms",
                    if matches!(acks, Acks::Leader) {
                        "appended"
                    } else {
                        "committed"
                    },
                    timeout.as_millis()
                )))
            })
        }))
    }

    /// How far a trim may reach now, on the leader (0 elsewhere): the high watermark, and no
    /// further than the end of what the leader knows each other replica holds — each one that
    /// answered within `replica.lag.time.max.ms`, or has not answered yet while this replica
    /// has led for less than that. As in Kafka, a replica out of sync does not hold retention
    /// back: back and lacking entries a trim deleted, it copies the retained log
    /// (see [`super::seed`]).
    fn trim_bound(&self) -> u64 {
        let Some(term) = self.metrics(|metrics| {
            (leader_of(metrics) == Some(self.id)).then_some(metrics.current_term)
        }) else {
            return 0;
        };
        let led_for = {
            let mut since = self.leading_since.lock();
            match *since {
                Some((led, at)) if led == term => at.elapsed(),
                _ => {
                    *since = Some((term, std::time::Instant::now()));
                    Duration::ZERO
                }
            }
        };
        let lag_ms = self.replica_lag.as_millis() as u64;
        let mut bound = self.high_watermark();
        for follower in self.followers() {
            let waited_for = match follower.last_contact_ms {
                Some(ms) => ms <= lag_ms,
                None => led_for < self.replica_lag,
            };
            if waited_for {
                bound = bound.min(follower.matched_offset.unwrap_or(0));
            }
        }
        bound
    }

    /// The log start offset committed trims asked for.
    pub fn committed_log_start(&self) -> u64 {
        self.machine.read(|machine| machine.log_start_offset)
    }

    /// Proposes a trim entry moving the log start to `offset` and waits until it is applied
    /// here, or `deadline`.
    async fn propose_trim(
        &self,
        offset: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), ReplicaError> {
        self.stir().await;
        let write = self.raft.client_write(Batches(super::trim_batch(offset)));
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(openraft::errors::RaftError::APIError(ClientWriteError::ForwardToLeader(
                forward,
            )))) => Err(ReplicaError::NotLeader {
                leader: forward.leader_id,
            }),
            Ok(Err(e)) => Err(ReplicaError::Indeterminate(e.to_string())),
            Err(_) => Err(ReplicaError::Indeterminate(
                "the trim was not committed in time".into(),
            )),
        }
    }

    /// Kafka's DeleteRecords on the leader: records below `offset` (at most the high
    /// watermark; the caller checks) are deleted on every replica. Waits, until `timeout`,
    /// for every replica in sync to hold the records below `offset` (see [`Self::trim_bound`])
    /// and for the trim to commit and reach this replica's log. Returns the log start
    /// offset (Kafka's low watermark).
    pub async fn delete_records(
        &self,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, ReplicaError> {
        if self.ready_epoch().is_none() {
            return Err(self.not_serving());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        if offset > self.committed_log_start() {
            while self.trim_bound() < offset {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ReplicaError::Indeterminate(format!(
                        "not every replica in sync holds the records below offset {offset} yet; nothing was deleted"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.propose_trim(offset, deadline).await?;
        }
        let wanted = self.committed_log_start();
        self.trims.notify_one();
        while self.log.reader().log_start_offset() < wanted
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(wanted)
    }

    /// Applies committed trims to this replica's log: once the machine's log start is past the
    /// log's, has openraft snapshot the machine (a restart must not re-apply deleted entries)
    /// and then trims the log.
    async fn trim_locally(&self) {
        let wanted = self.committed_log_start();
        if wanted <= self.log.reader().log_start_offset() {
            return;
        }
        // Nothing is deleted while the group has a learner (a replica a reassignment adds,
        // which catches up from the log, or copies the retained log when the log was trimmed
        // before: a trim meanwhile would make it start its copy again); the next housekeeping
        // tries again.
        let _trimming = self.trimming.lock().await;
        let learning = self.metrics(|metrics| {
            let membership = metrics.membership_config.membership();
            membership.learner_ids().next().is_some() || membership.get_joint_config().len() > 1
        });
        if learning {
            return;
        }
        let Some(applied) = self.machine.last_applied().map(|id| id.index) else {
            return;
        };
        if self.machine.snapshot_index() < Some(applied) {
            if self.raft.trigger().snapshot().await.is_err() {
                return;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while self.machine.snapshot_index() < Some(applied) {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        group = self.group,
                        "no snapshot within 10 s: the log is trimmed later"
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let log = self.log.clone();
        match tokio::task::spawn_blocking(move || log.trim_to(wanted)).await {
            Ok(Ok((_, purge_to))) => {
                // openraft purges the entries below the log start once no replication stream
                // reads them, and only then are their segments deleted (see the log's purge): a
                // replica that lacks them afterwards is offered a snapshot, and copies the
                // retained log before installing it (see `super::seed`).
                if let Some(purge_to) = purge_to
                    && self.raft.trigger().purge_log(purge_to).await.is_err()
                {
                    tracing::debug!(group = self.group, "the group stopped before it purged");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(group = self.group, error = %e, "cannot trim a partition's log")
            }
            Err(e) => {
                tracing::error!(group = self.group, error = %e, "cannot trim a partition's log")
            }
        }
    }

    /// On a ready leader: proposes a trim when the topic's retention makes part of the log due,
    /// as far as every replica holds it, and only when it removes data (not just Raft's own
    /// control batches, which would make every check propose again).
    async fn propose_retention(&self) {
        if self.ready_epoch().is_none() {
            return;
        }
        let Some(point) = self.log.retention_point(now_ms()) else {
            return;
        };
        let target = point.min(self.trim_bound());
        let start = self
            .committed_log_start()
            .max(self.log.reader().log_start_offset());
        if target <= start {
            return;
        }
        let log = self.log.clone();
        match tokio::task::spawn_blocking(move || log.holds_data(start, target)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return,
            Ok(Err(e)) => {
                tracing::warn!(group = self.group, error = %e, "cannot check retention");
                return;
            }
            Err(_) => return,
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        match self.propose_trim(target, deadline).await {
            Ok(()) => tracing::debug!(
                group = self.group,
                to = target,
                "retention trimmed the partition"
            ),
            Err(e) => {
                tracing::debug!(group = self.group, error = %e, "retention trim not committed")
            }
        }
    }

    /// A leader about to stop hands its leadership to a follower that holds everything it has
    /// (Kafka's controlled shutdown), and waits up to a second for it to take over, so a
    /// restart costs its clients a transfer rather than an election timeout. Does nothing on
    /// a follower.
    pub async fn hand_over(&self) {
        if self.metrics(leader_of) == Some(self.id) {
            self.stir().await;
        }
        let target = self.metrics(|metrics| {
            if leader_of(metrics) != Some(self.id) {
                return None;
            }
            metrics
                .replication
                .iter()
                .flatten()
                .map(|(id, _)| *id)
                .find(|id| {
                    *id != self.id
                        && is_voter(metrics, *id)
                        && holds_whole_log(metrics, *id)
                        && self.may_lead.check(*id)
                })
        });
        let Some(target) = target else {
            return;
        };
        if self.raft.trigger().transfer_leader(target).await.is_err() {
            return;
        }
        let mut metrics = self.raft.metrics();
        let handed = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if metrics.borrow_watched().current_leader != Some(self.id) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if handed.is_err() {
            tracing::info!(
                group = self.group,
                to = target,
                "leadership was not handed over within a second; stopping anyway"
            );
        }
    }

    /// Stops the replica: Raft, the high-watermark watcher, and its route.
    pub async fn shutdown(&self) {
        self.hand_over().await;
        self.router.unregister(self.group);
        // The watcher first, so that it does not record leadership again.
        self.watcher.abort();
        self.router.set_leading(self.group, None);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = self.group, error = %e, "partition group did not stop cleanly");
        }
        if let Some(balancer) = &self.balancer {
            balancer.abort();
        }
        if let Some(housekeeper) = self.housekeeper.get() {
            housekeeper.abort();
        }
        if let Err(e) = self.log.close() {
            tracing::warn!(group = self.group, error = %e, "partition log did not close cleanly");
        }
    }
}

/// The outcome once a watch has one.
async fn settled(outcome: &mut watch::Receiver<Option<Outcome>>) -> Outcome {
    loop {
        if let Some(outcome) = outcome.borrow_and_update().clone() {
            return outcome;
        }
        if outcome.changed().await.is_err() {
            return Err(ReplicaError::Indeterminate("the answer was lost".into()));
        }
    }
}

type Enqueued = (
    watch::Receiver<Option<Outcome>>,
    Option<oneshot::Receiver<u64>>,
);

impl Writer {
    /// Sequences a write (an idempotent producer's) and queues it; answers the watch its
    /// commit will arrive on, and for acks=1 where it was appended.
    async fn enqueue(
        writer: &Arc<Self>,
        first: BatchHeader,
        batches: Bytes,
        records: u64,
        epoch: u64,
        acks_leader: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Enqueued, ReplicaError> {
        // Bounded: while the queue is full (commits are not keeping up, or this leader cannot
        // reach a quorum), a write waits for room until its deadline, unwritten.
        let mut state = loop {
            let room = writer.room.notified();
            let state = writer.state.lock().await;
            if state.queue.is_empty() || state.queued_bytes + batches.len() <= QUEUE_BYTES_MAX {
                break state;
            }
            drop(state);
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(ReplicaError::Indeterminate(format!(
                    "the partition's write queue stayed full ({QUEUE_BYTES_MAX} bytes): its replicas are not keeping up"
                )));
            }
        };
        let (committed, receiver) = watch::channel(None);
        let placed = Placed::default();
        let after = if first.producer_id >= 0 {
            match writer.sequence(&mut state, &first, epoch, &receiver, &placed)? {
                Sequenced::Answered(answered) => return Ok((answered, None)),
                Sequenced::Write(after) => after,
            }
        } else {
            None
        };
        let (appended, appended_receiver) = if acks_leader {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        state.queued_bytes += batches.len();
        state.queue.push_back(Queued {
            batches,
            records,
            epoch,
            committed,
            appended,
            placed,
            after,
        });
        Self::pump(writer, &mut state).await;
        Ok((receiver, appended_receiver))
    }

    /// Checks an idempotent producer's batch against the committed producer state and what
    /// is in flight: the answer for a retry (of a batch in flight, or already written), or
    /// to write it (it is now in flight with `outcome` and `placed`) after the write it
    /// continues.
    fn sequence(
        &self,
        state: &mut WriterState,
        first: &BatchHeader,
        epoch: u64,
        outcome: &watch::Receiver<Option<Outcome>>,
        placed: &Placed,
    ) -> Result<Sequenced, ReplicaError> {
        let producer = first.producer_id;
        let last_sequence = first.last_sequence();
        // Answered proposals are done (the machine knows what they wrote), and a producer with
        // none in flight is forgotten: the map holds only what is in flight.
        state.in_flight.retain(|_, in_flight| {
            in_flight.retain(|f| f.outcome.borrow().is_none());
            !in_flight.is_empty()
        });
        let in_flight = state.in_flight.entry(producer).or_default();
        // A retry of a batch in flight waits for the first one's answer.
        if let Some(same) = in_flight.iter().find(|f| {
            f.epoch == first.producer_epoch
                && f.first_sequence == first.base_sequence
                && f.last_sequence == last_sequence
        }) {
            return Ok(Sequenced::Answered(same.outcome.clone()));
        }
        // In flight in another epoch: an older one is fenced; a newer one starts at sequence
        // 0 whatever is still in flight in the old one (librdkafka bumps the epoch itself
        // after a gap), as a Kafka leader takes it against its log's uncommitted tail.
        let bumped = match in_flight.back() {
            Some(last) if first.producer_epoch < last.epoch => {
                return Err(ReplicaError::Refused(Arc::new(
                    BrokerError::InvalidProducerEpoch {
                        producer_id: producer,
                        current: last.epoch,
                        received: first.producer_epoch,
                    },
                )));
            }
            Some(last) if first.producer_epoch > last.epoch => {
                if first.base_sequence != 0 {
                    return Err(ReplicaError::Refused(Arc::new(
                        BrokerError::OutOfOrderSequence {
                            producer_id: producer,
                            expected: 0,
                            received: first.base_sequence,
                        },
                    )));
                }
                true
            }
            _ => false,
        };
        let continues = in_flight.back().is_some_and(|last| {
            last.epoch == first.producer_epoch
                && first.base_sequence == next_sequence(last.last_sequence)
        });
        if !continues {
            match self.machine.read(|m| m.check(first)) {
                Ok(SequenceCheck::Duplicate {
                    base_offset,
                    last_offset,
                }) => {
                    let (_, answered) = watch::channel(Some(Ok(Produced {
                        appended: Appended {
                            base_offset,
                            last_offset,
                        },
                        duplicate: true,
                        epoch,
                    })));
                    return Ok(Sequenced::Answered(answered));
                }
                Ok(SequenceCheck::Append) if in_flight.is_empty() || bumped => {}
                Ok(SequenceCheck::Append) => {
                    let expected = in_flight
                        .back()
                        .map_or(0, |last| next_sequence(last.last_sequence));
                    return Err(ReplicaError::Refused(Arc::new(
                        BrokerError::OutOfOrderSequence {
                            producer_id: producer,
                            expected,
                            received: first.base_sequence,
                        },
                    )));
                }
                Err(e) => return Err(ReplicaError::Refused(Arc::new(e))),
            }
        }
        let after = in_flight
            .back()
            .filter(|_| continues)
            .map(|last| Predecessor {
                placed: Arc::clone(&last.placed),
                outcome: last.outcome.clone(),
            });
        in_flight.push_back(InFlight {
            epoch: first.producer_epoch,
            first_sequence: first.base_sequence,
            last_sequence,
            outcome: outcome.clone(),
            placed: Arc::clone(placed),
        });
        Ok(Sequenced::Write(after))
    }

    fn ready_epoch(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        (leader_of(&metrics) == Some(self.id)
            && metrics
                .last_applied
                .is_some_and(|id| id.leader_id.term == metrics.current_term))
        .then_some(metrics.current_term)
    }

    /// Proposes what is queued, as few entries as fit, while fewer than [`PROPOSALS_MAX`]
    /// are unanswered. Entries are proposed in queue order (the order writes were sequenced);
    /// a write continuing one not yet placed in the log waits at the front (see [`Placed`]).
    fn pump<'a>(
        writer: &'a Arc<Self>,
        state: &'a mut WriterState,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            while state.proposed < PROPOSALS_MAX && !state.queue.is_empty() {
                let ready = writer.ready_epoch();
                let mut writes = Vec::new();
                let mut bytes = 0;
                let mut waiting = false;
                while let Some(next) = state.queue.front() {
                    if !writes.is_empty() && bytes + next.batches.len() > ENTRY_BYTES_MAX {
                        break;
                    }
                    let mut decided = step(next, ready, &writes);
                    if matches!(decided, Step::Wait) {
                        // Said before looking again, so a placement in between pumps anew.
                        writer.waiting.store(true, Ordering::SeqCst);
                        decided = step(next, ready, &writes);
                    }
                    match decided {
                        Step::Take => {
                            bytes += next.batches.len();
                            writes.extend(state.queue.pop_front());
                        }
                        Step::Refuse(error) => {
                            if let Some(refused) = state.queue.pop_front() {
                                state.queued_bytes -= refused.batches.len();
                                refused.committed.send_replace(Some(Err(error)));
                            }
                        }
                        Step::Wait => {
                            waiting = true;
                            break;
                        }
                    }
                }
                state.queued_bytes -= bytes;
                writer.room.notify_waiters();
                if writes.is_empty() {
                    if waiting {
                        break;
                    }
                    continue;
                }
                writer.propose(writes).await;
                state.proposed += 1;
            }
        })
    }

    /// Proposes `writes` as one entry and answers each from its commit.
    async fn propose(self: &Arc<Self>, writes: Vec<Queued>) {
        let payload = if writes.len() == 1 {
            writes[0].batches.clone()
        } else {
            let mut combined =
                BytesMut::with_capacity(writes.iter().map(|w| w.batches.len()).sum());
            for write in &writes {
                combined.extend_from_slice(&write.batches);
            }
            combined.freeze()
        };
        // Where each write's records start in the entry.
        let mut starts = Vec::with_capacity(writes.len());
        let mut records = 0;
        for write in &writes {
            starts.push(records);
            records += write.records;
        }
        let mut answers = Vec::with_capacity(writes.len());
        let mut on_append = Vec::new();
        let mut placed = Vec::with_capacity(writes.len());
        for (write, &start) in writes.into_iter().zip(&starts) {
            if let Some(appended) = write.appended {
                on_append.push((appended, start));
            }
            placed.push(write.placed);
            answers.push((write.committed, start, write.records, write.epoch));
        }
        let writer = Arc::downgrade(self);
        self.log.watch_append(
            &payload,
            Box::new(move |base_offset| {
                for placed in placed {
                    placed.store(true, Ordering::SeqCst);
                }
                for (appended, start) in on_append {
                    let _ = appended.send(base_offset + start);
                }
                // A write waiting for this one's place may go now, not at its commit.
                if let Some(writer) = writer.upgrade()
                    && writer.waiting.swap(false, Ordering::SeqCst)
                    && let Ok(runtime) = tokio::runtime::Handle::try_current()
                {
                    runtime.spawn(async move {
                        let mut state = writer.state.lock().await;
                        Writer::pump(&writer, &mut state).await;
                    });
                }
            }),
        );
        let (responder, receiver) = ProgressResponder::complete_only();
        let submitted = self
            .raft
            .client_write_ff(Batches(payload.clone()), Some(responder))
            .await;
        let writer = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = match submitted {
                Err(e) => Err(ReplicaError::Stopped(e.to_string())),
                Ok(()) => match receiver.await {
                    Ok(Ok(response)) => {
                        // Applied, so every entry before it is: its end is a high watermark.
                        let end = response.data.last_offset + 1;
                        writer.high_watermark.send_if_modified(|hw| {
                            let moved = end > *hw;
                            *hw = (*hw).max(end);
                            moved
                        });
                        Ok(response.data)
                    }
                    Ok(Err(ClientWriteError::ForwardToLeader(forward))) => {
                        Err(ReplicaError::NotLeader {
                            leader: forward.leader_id,
                        })
                    }
                    Ok(Err(e)) => Err(ReplicaError::Indeterminate(e.to_string())),
                    Err(_) => Err(ReplicaError::Indeterminate(
                        "the group stopped before answering".into(),
                    )),
                },
            };
            writer.log.unwatch_append(&payload);
            for (committed, start, records, epoch) in answers {
                committed.send_replace(Some(outcome.clone().map(|entry| Produced {
                    appended: Appended {
                        base_offset: entry.base_offset + start,
                        last_offset: entry.base_offset + start + records - 1,
                    },
                    duplicate: false,
                    epoch,
                })));
            }
            let mut state = writer.state.lock().await;
            state.proposed -= 1;
            Writer::pump(&writer, &mut state).await;
        });
    }
}

fn next_sequence(sequence: i32) -> i32 {
    if sequence == i32::MAX {
        0
    } else {
        sequence + 1
    }
}

/// The leader a replica's metrics name — none once its Raft core has stopped (a storage
/// failure, or openraft's own refusal to go on): a stopped group leads nothing, though its
/// last metrics still name whoever led.
fn leader_of(metrics: &RaftMetrics<PartitionTypes>) -> Option<NodeId> {
    if metrics.running_state.is_err() {
        return None;
    }
    metrics.current_leader
}

/// The openraft configuration of partition group `group`.
pub fn raft_config(
    group: u32,
    settings: &ReplicaSettings,
) -> Result<Config, openraft::ConfigError> {
    Config {
        cluster_name: format!("sluice-partition-{group}"),
        heartbeat_interval: settings.heartbeat_ms,
        election_timeout_min: settings.election_min_ms,
        election_timeout_max: settings.election_max_ms,
        // The log is the partition's data: never snapshotted away, and a follower that fell
        // behind catches up from the log, however far behind. Snapshots are taken only when a
        // trim deleted part of the log, and openraft purges nothing after them (trims move
        // the purge mark themselves).
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX,
        replication_lag_threshold: u64::MAX,
        enable_pre_vote: Some(true),
        // A restarted leader must not resume its term: readiness ("applied an entry of its own
        // term, so everything committed before it") holds only for a term whose first entry
        // this leader appended after everything committed. Resumed, it would serve while
        // re-applying the log, with a producer state missing the newest batches (found by
        // scripts/chaos: librdkafka raised OUT_OF_ORDER_SEQUENCE_NUMBER).
        enable_leader_restore: Some(false),
        // A follower whose log went backwards (its copy was lost: a replaced disk, a deleted
        // directory) is sent the log again from where it now ends, as Kafka refills an empty
        // replica, instead of openraft stopping the leader's group (which only hands the
        // partition to a leader that does not know the follower lost anything, after an
        // election that follower may vote in).
        allow_log_reversion: Some(true),
        ..Default::default()
    }
    .validate()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A replica's housekeeping: applies committed trims to its log when told (or found at a
/// tick), and, while it leads, proposes retention's trims every `every`.
async fn keep_log(replica: std::sync::Weak<PartitionReplica>, trims: Arc<Notify>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            () = trims.notified() => false,
        };
        let Some(replica) = replica.upgrade() else {
            return;
        };
        replica.trim_locally().await;
        if ticked {
            replica.propose_retention().await;
            replica.try_quiesce().await;
        }
    }
}

/// When a replica first checks whether to hand leadership to the preferred one.
const FIRST_BALANCE: Duration = Duration::from_secs(1);

/// While this replica leads and the preferred one does not, hands leadership to the preferred
/// replica once it holds everything this leader has and answered within the last heartbeats:
/// leaders go back to where the placement put them after a failover, so they stay spread over
/// the nodes. openraft carries out the transfer (the target campaigns at once); a transfer
/// that does not happen is tried again at the next check.
async fn hand_to_preferred(
    raft: PartitionRaft,
    id: NodeId,
    preferred: Arc<parking_lot::Mutex<Option<NodeId>>>,
    every: Duration,
    may_lead: MayLead,
    quiet: Option<Arc<Quiet>>,
) {
    // The first check comes soon, so that a new partition's leadership (its first election
    // went to whichever replica campaigned first) settles before clients rely on it.
    let first = tokio::time::Instant::now() + FIRST_BALANCE.min(every);
    let mut tick = tokio::time::interval_at(first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(preferred) = *preferred.lock() else {
            continue;
        };
        if preferred == id {
            continue;
        }
        // A quiet leader that is not the preferred replica wakes and waits for the preferred
        // one's answer, so the check below sees it current.
        if let Some(quiet) = quiet.as_ref().filter(|q| q.is_quiet())
            && raft.metrics().borrow_watched().current_leader == Some(id)
            && may_lead.check(preferred)
            && quiet.stir().is_some()
        {
            let woke = std::time::Instant::now();
            let _ = raft
                .wait(Some(Duration::from_secs(1)))
                .metrics(
                    move |metrics| {
                        metrics
                            .heartbeat
                            .as_ref()
                            .and_then(|h| h.get(&preferred).cloned().flatten())
                            .is_some_and(|at| at.elapsed() <= woke.elapsed())
                    },
                    "the preferred replica answered the woken leader",
                )
                .await;
        }
        let ready = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow_watched();
            let caught_up = holds_whole_log(&metrics, preferred) && is_voter(&metrics, preferred);
            let answering = metrics
                .heartbeat
                .as_ref()
                .and_then(|h| h.get(&preferred).cloned().flatten())
                .is_some_and(|at| at.elapsed() < every.min(Duration::from_secs(1)));
            leader_of(&metrics) == Some(id) && caught_up && answering
        } && may_lead.check(preferred);
        if ready {
            tracing::info!(group = %raft.config().cluster_name, to = preferred, "handing leadership to the preferred replica");
            if let Err(error) = raft.trigger().transfer_leader(preferred).await {
                tracing::debug!(group = %raft.config().cluster_name, %error, "handing leadership to the preferred replica failed");
            }
        }
    }
}

/// Whether `node` votes in the group's membership as `metrics` know it (in either config of
/// a joint one).
fn is_voter(metrics: &RaftMetrics<PartitionTypes>, node: NodeId) -> bool {
    metrics
        .membership_config
        .membership()
        .voter_ids()
        .any(|voter| voter == node)
}

/// Whether the leader knows `node` holds its whole log (the leader's view; false elsewhere).
fn holds_whole_log(metrics: &RaftMetrics<PartitionTypes>, node: NodeId) -> bool {
    metrics
        .replication
        .as_ref()
        .and_then(|r| r.get(&node).cloned().flatten())
        .is_some_and(|matched| Some(matched.index) == metrics.last_log_index)
}

/// Publishes the end offset of the last applied entry as the high watermark, never backwards.
async fn watch_applied(
    mut metrics: WatchReceiverOf<PartitionTypes, RaftMetrics<PartitionTypes>>,
    (log, machine): (PartitionLog, PartitionMachineStore),
    high_watermark: watch::Sender<u64>,
    router: Arc<Router>,
    (trims, stopped): (Arc<Notify>, Arc<AtomicBool>),
    (id, group): (NodeId, u32),
) {
    let mut known_leader = None;
    // Metrics change at every heartbeat; the entry index is read only when the applied entry
    // moved.
    let mut known_applied = None;
    loop {
        let (applied, leader, term) = {
            let metrics = metrics.borrow_watched();
            (
                metrics.last_applied,
                leader_of(&metrics),
                metrics.current_term,
            )
        };
        if known_leader != Some((leader, term)) {
            if let Err(fatal) = &metrics.borrow_watched().running_state {
                tracing::error!(dir = %log.dir().display(), error = %fatal, "this replica's Raft group stopped: it serves nothing until the node restarts");
            } else if leader.is_some() {
                tracing::info!(dir = %log.dir().display(), leader, term, "partition leader");
            }
            router.set_leading(group, (leader == Some(id)).then_some(term));
            known_leader = Some((leader, term));
        }
        if let Some(applied) = applied
            && known_applied != Some(applied.index)
        {
            match log.entry_loc(applied.index) {
                Ok(Some(loc)) => {
                    known_applied = Some(applied.index);
                    high_watermark.send_if_modified(|hw| {
                        let moved = loc.end_offset() > *hw;
                        *hw = (*hw).max(loc.end_offset());
                        moved
                    });
                }
                Ok(None) => known_applied = Some(applied.index),
                Err(e) => tracing::error!(error = %e, "cannot read the applied entry's place"),
            }
            if machine.read(|m| m.log_start_offset) > log.reader().log_start_offset() {
                trims.notify_one();
            }
        }
        if metrics.changed().await.is_err() {
            // The core is gone without a word in its metrics (it panicked: openraft refuses,
            // for one, to go on with a follower whose log went backwards).
            if metrics.borrow_watched().running_state.is_ok() {
                stopped.store(true, Ordering::Release);
                router.set_leading(group, None);
                tracing::error!(dir = %log.dir().display(), "this replica's Raft group stopped (its core panicked): it serves nothing until the node restarts");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued write of `epoch`, continuing `after` if given.
    fn queued(epoch: u64, after: Option<&Queued>) -> Queued {
        let (committed, _) = watch::channel(None);
        Queued {
            batches: Bytes::from_static(b"batch"),
            records: 1,
            epoch,
            committed,
            appended: None,
            placed: Placed::default(),
            after: after.map(|before| Predecessor {
                placed: Arc::clone(&before.placed),
                outcome: before.committed.subscribe(),
            }),
        }
    }

    #[test]
    fn a_write_of_another_term_is_refused_and_one_continuing_nothing_is_taken() {
        let write = queued(3, None);
        assert!(matches!(step(&write, Some(3), &[]), Step::Take));
        assert!(matches!(
            step(&write, Some(4), &[]),
            Step::Refuse(ReplicaError::NotLeader { .. })
        ));
        assert!(matches!(
            step(&write, None, &[]),
            Step::Refuse(ReplicaError::NotLeader { .. })
        ));
    }

    #[test]
    fn a_continuing_write_waits_until_the_one_before_is_placed_or_in_the_same_entry() {
        let first = queued(3, None);
        let second = queued(3, Some(&first));
        // Proposed as an entry of its own, unplaced and unanswered: the next one waits.
        assert!(matches!(step(&second, Some(3), &[]), Step::Wait));
        // In the same entry: both are written or neither.
        let taken = [first];
        assert!(matches!(step(&second, Some(3), &taken), Step::Take));
        let [first] = taken;
        // In the leader's log: a log holding the second entry holds the first.
        first.placed.store(true, Ordering::SeqCst);
        assert!(matches!(step(&second, Some(3), &[]), Step::Take));
    }

    #[test]
    fn a_write_continuing_one_refused_before_its_place_is_refused_too() {
        let first = queued(3, None);
        let second = queued(3, Some(&first));
        let third = queued(3, Some(&second));
        // openraft refused the first entry (an expired lease) and stays leader in term 3: the
        // second must not be written after a gap.
        first
            .committed
            .send_replace(Some(Err(ReplicaError::NotLeader { leader: Some(2) })));
        let Step::Refuse(refused) = step(&second, Some(3), &[]) else {
            panic!("the second write was not refused");
        };
        assert!(matches!(
            refused,
            ReplicaError::NotLeader { leader: Some(2) }
        ));
        second.committed.send_replace(Some(Err(refused)));
        assert!(matches!(step(&third, Some(3), &[]), Step::Refuse(_)));
    }

    #[test]
    fn a_write_continuing_one_answered_is_taken() {
        let first = queued(3, None);
        let second = queued(3, Some(&first));
        first.committed.send_replace(Some(Ok(Produced {
            appended: Appended {
                base_offset: 0,
                last_offset: 0,
            },
            duplicate: false,
            epoch: 3,
        })));
        assert!(matches!(step(&second, Some(3), &[]), Step::Take));
    }
}
