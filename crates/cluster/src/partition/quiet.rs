//! Quiescence: a partition group nobody writes to goes quiet, so an idle partition costs no
//! heartbeats and no timer wake-ups.
//!
//! Each group's openraft ticks several times per heartbeat interval, and its leader sends
//! every follower a heartbeat each interval; for a thousand idle partitions that is most of a
//! CPU on each node doing nothing. openraft can stop a group's ticker (its runtime
//! configuration): a stopped ticker sends no heartbeats and starts no election. So:
//!
//! - **Going quiet.** A leader that saw no write for a whole housekeeping period, whose every
//!   follower holds its whole log and whose last entry is committed and applied, sends each
//!   follower a notice (its term and last index). A follower that agrees (same term, same
//!   leader, the same last entry) stops its ticker and says so; once every follower has, the
//!   leader stops its own — unless a write came meanwhile, in which case it stays awake, and
//!   its next heartbeat wakes the followers again.
//! - **Waking.** A leader wakes for a write (or a trim, a hand-over, a preferred election),
//!   then waits for its followers' answers to the heartbeats it sends at once, so its lease
//!   and the in-sync count are current before the write is proposed. A follower wakes when
//!   a Raft message of the group other than a heartbeat reaches it (entries: its leader woke
//!   to write; a vote: someone campaigns) — a heartbeat still renews its lease, but one sent
//!   just before its leader went quiet and delivered just after must not leave it awake with
//!   its election timer running and no leader heartbeating — and when the node's liveness says its leader's node stopped answering, or answers without
//!   leading the group in that term any more ([`QuietGroups`]): then its election timer runs
//!   again and elects a leader as it always would.
//!
//! Only liveness depends on this: Raft's safety never does, whatever wakes or not. While a
//! group is quiet its leader counts a follower in sync while the follower's node answers the
//! node's pings (everything it was sent, it acknowledged before the group went quiet).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use openraft::type_config::async_runtime::WatchReceiver;
use parking_lot::Mutex;

use super::replica::PartitionRaft;
use crate::network::{Answer, GroupHandler, method};
use crate::placement::NodeId;

/// What the node knows of its peers, for quiet groups: whether a node answered recently, and
/// the term in which its last answer says it leads a group.
pub trait PeerView: Send + Sync + 'static {
    fn answered_within(&self, node: NodeId, within: Duration) -> bool;
    fn leads(&self, node: NodeId, group: u32) -> Option<u64>;
}

/// A quiet follower wakes once its leader's node has not answered a ping for this long (pings
/// go every 500 ms; two missed ones).
const LEADER_SILENT_FOR: Duration = Duration::from_millis(1200);
/// How often the node looks at its quiet followers.
const SCAN_EVERY: Duration = Duration::from_millis(250);

/// The node's quiet replicas: followers, woken when their leader's node goes silent or stops
/// leading them; leaders, woken when a follower's node goes silent (so that a follower
/// restarted meanwhile hears heartbeats at once rather than campaigning).
pub struct QuietGroups {
    peers: Arc<dyn PeerView>,
    /// Quiet replicas by group.
    quiet: Mutex<HashMap<u32, Weak<Quiet>>>,
}

impl std::fmt::Debug for QuietGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuietGroups")
            .field("quiet", &self.quiet.lock().len())
            .finish()
    }
}

impl QuietGroups {
    /// Starts the scan; it ends when the returned value is dropped.
    pub fn start(peers: Arc<dyn PeerView>) -> Arc<Self> {
        let groups = Arc::new(Self {
            peers,
            quiet: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&groups);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SCAN_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(groups) = weak.upgrade() else {
                    return;
                };
                groups.scan();
            }
        });
        groups
    }

    /// Whether `node` answers the node's pings (a quiet leader's view of its followers).
    pub fn is_live(&self, node: NodeId) -> bool {
        self.peers.answered_within(node, LEADER_SILENT_FOR)
    }

    /// Wakes every quiet follower whose leader went silent or no longer leads it, and every
    /// quiet leader one of whose followers went silent.
    fn scan(&self) {
        let quiet: Vec<Arc<Quiet>> = {
            let mut quiet = self.quiet.lock();
            quiet.retain(|_, replica| replica.strong_count() > 0);
            quiet.values().filter_map(Weak::upgrade).collect()
        };
        for quiet in quiet {
            let followers = quiet.followers();
            if !followers.is_empty() {
                if let Some(silent) = followers
                    .iter()
                    .find(|node| !self.peers.answered_within(**node, LEADER_SILENT_FOR))
                {
                    tracing::debug!(
                        group = quiet.group,
                        follower = silent,
                        "a quiet leader wakes: a follower went silent"
                    );
                    quiet.wake();
                }
                continue;
            }
            let Some((leader, term)) = quiet.follows() else {
                continue;
            };
            let silent = !self.peers.answered_within(leader, LEADER_SILENT_FOR);
            let deposed = !silent && self.peers.leads(leader, quiet.group) != Some(term);
            if silent || deposed {
                tracing::debug!(
                    group = quiet.group,
                    leader,
                    silent,
                    "a quiet follower wakes: its leader went silent or leads no more"
                );
                quiet.wake();
            }
        }
    }
}

#[derive(Default)]
struct QuietState {
    /// Writes (and other leader actions) so far: a leader goes quiet only if none came while
    /// it asked its followers.
    writes: u64,
    /// The leader and term a quiet follower follows.
    follows: Option<(NodeId, u64)>,
    /// A quiet leader's followers.
    followers: Vec<NodeId>,
    /// When the group last woke.
    woke: Option<std::time::Instant>,
}

/// One replica's quiescence (see the module documentation).
pub struct Quiet {
    group: u32,
    raft: PartitionRaft,
    groups: Arc<QuietGroups>,
    quiet: AtomicBool,
    state: Mutex<QuietState>,
}

impl std::fmt::Debug for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quiet")
            .field("group", &self.group)
            .field("quiet", &self.is_quiet())
            .finish()
    }
}

impl Quiet {
    pub fn new(group: u32, raft: PartitionRaft, groups: Arc<QuietGroups>) -> Arc<Self> {
        Arc::new(Self {
            group,
            raft,
            groups,
            quiet: AtomicBool::new(false),
            state: Mutex::new(QuietState::default()),
        })
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::SeqCst)
    }

    pub fn groups(&self) -> &Arc<QuietGroups> {
        &self.groups
    }

    /// Counts a write (or another action of the leader) and wakes the group if it is quiet;
    /// answers when the group last woke, so that writes arriving together after a wake all
    /// wait for the same heartbeat round (not only the one that woke it).
    pub fn stir(&self) -> Option<std::time::Instant> {
        let mut state = self.state.lock();
        state.writes += 1;
        self.wake_locked(&mut state);
        state.woke
    }

    /// Wakes the group if it is quiet; true if it was.
    pub fn wake(&self) -> bool {
        if !self.is_quiet() {
            return false;
        }
        let mut state = self.state.lock();
        self.wake_locked(&mut state)
    }

    fn wake_locked(&self, state: &mut QuietState) -> bool {
        if !self.quiet.swap(false, Ordering::SeqCst) {
            return false;
        }
        self.raft.runtime_config().tick(true);
        state.woke = Some(std::time::Instant::now());
        state.follows = None;
        state.followers.clear();
        self.groups.quiet.lock().remove(&self.group);
        true
    }

    /// Writes counted so far.
    pub fn writes(&self) -> u64 {
        self.state.lock().writes
    }

    /// The leader goes quiet, unless a write came since `writes`; true if it did.
    pub fn hush_leader(self: &Arc<Self>, writes: u64, followers: Vec<NodeId>) -> bool {
        let mut state = self.state.lock();
        if state.writes != writes || self.is_quiet() {
            return false;
        }
        self.raft.runtime_config().tick(false);
        self.quiet.store(true, Ordering::SeqCst);
        state.followers = followers;
        self.groups
            .quiet
            .lock()
            .insert(self.group, Arc::downgrade(self));
        true
    }

    fn hush_follower(self: &Arc<Self>, leader: NodeId, term: u64) {
        let mut state = self.state.lock();
        if self.is_quiet() {
            return;
        }
        self.raft.runtime_config().tick(false);
        self.quiet.store(true, Ordering::SeqCst);
        state.follows = Some((leader, term));
        self.groups
            .quiet
            .lock()
            .insert(self.group, Arc::downgrade(self));
    }

    fn follows(&self) -> Option<(NodeId, u64)> {
        self.state.lock().follows
    }

    fn followers(&self) -> Vec<NodeId> {
        self.state.lock().followers.clone()
    }

    /// A follower's answer to its leader's notice: goes quiet if it follows `from` in the
    /// notice's term and holds exactly the leader's log.
    fn on_notice(self: &Arc<Self>, from: NodeId, body: &[u8]) -> Result<Bytes, String> {
        let notice = Notice::decode(body)?;
        let agrees = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow_watched();
            metrics.current_term == notice.term
                && metrics.current_leader == Some(from)
                && metrics.last_log_index == Some(notice.last_index)
                && metrics
                    .last_applied
                    .as_ref()
                    .is_some_and(|applied| applied.index == notice.last_index)
        };
        if !agrees {
            return Err("this follower does not hold the leader's whole log in its term".into());
        }
        self.hush_follower(from, notice.term);
        Ok(Bytes::new())
    }
}

/// A leader's notice to its followers that it goes quiet: `[term u64][last index u64]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    pub term: u64,
    pub last_index: u64,
}

impl Notice {
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::with_capacity(16);
        body.put_u64(self.term);
        body.put_u64(self.last_index);
        body.freeze()
    }

    /// Damaged input is an error.
    pub fn decode(mut body: &[u8]) -> Result<Self, String> {
        if body.len() != 16 {
            return Err(format!(
                "a quiescence notice is 16 bytes, this one {}",
                body.len()
            ));
        }
        Ok(Self {
            term: body.get_u64(),
            last_index: body.get_u64(),
        })
    }
}

/// Serves a quiescing partition group: the notice itself, and every Raft message handed on
/// to the group's server, after which a quiet replica wakes (unless it was a heartbeat).
pub struct QuietServer {
    inner: Arc<dyn GroupHandler>,
    quiet: Arc<Quiet>,
}

impl std::fmt::Debug for QuietServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuietServer")
            .field("quiet", &self.quiet)
            .finish_non_exhaustive()
    }
}

impl QuietServer {
    pub fn new(inner: Arc<dyn GroupHandler>, quiet: Arc<Quiet>) -> Self {
        Self { inner, quiet }
    }
}

impl GroupHandler for QuietServer {
    fn handle(&self, from: NodeId, method: u8, body: Bytes) -> Answer {
        if method == method::QUIESCE {
            let answer = self.quiet.on_notice(from, &body);
            return Box::pin(async move { answer });
        }
        let served = self.inner.handle(from, method, body);
        if method == method::HEARTBEAT {
            return served;
        }
        let quiet = Arc::clone(&self.quiet);
        Box::pin(async move {
            let answer = served.await;
            // After the message reached the group: entries from the leader have renewed the
            // follower's lease before its election timer runs again.
            quiet.wake();
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_damage_is_refused() {
        let notice = Notice {
            term: 7,
            last_index: 123_456,
        };
        assert_eq!(Notice::decode(&notice.encode()), Ok(notice));
        assert!(Notice::decode(&notice.encode()[..15]).is_err());
        assert!(Notice::decode(b"").is_err());
        let mut long = notice.encode().to_vec();
        long.push(0);
        assert!(Notice::decode(&long).is_err());
    }
}
