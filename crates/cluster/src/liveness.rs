//! Which nodes answer: every node pings every other registered node twice a second over the
//! transport, and counts one live while its last answer is recent.
//!
//! A connection being open says little (a frozen process keeps its sockets, and two followers
//! may have no reason to talk), so liveness is an answer to a request, end to end; a ping that
//! finds no connection at all (a killed process) ends it at once. Kafka clients
//! are told only live brokers and get LEADER_NOT_AVAILABLE for a partition whose node is not
//! live; nothing safety-related depends on it (Raft decides what is committed).
//!
//! A ping's answer also says whether the node is shutting down — the others then hand it no
//! leadership (the preferred-leader balancing skips it), so what it handed over stays handed
//! over — and which partition groups it leads, in which terms ([`Pong`]): a node with no
//! replica of a partition names the leader the others report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::network::method;
use crate::node::{CONTROLLER_GROUP, ControllerNode};
use crate::placement::NodeId;
use crate::transport::CallError;

/// How often each node is pinged.
const PING_EVERY: Duration = Duration::from_millis(500);
/// How long a ping may take.
const PING_TIMEOUT: Duration = Duration::from_millis(1000);
/// A node is live while its last answer is this recent.
const LIVE_FOR: Duration = Duration::from_millis(3000);
/// How long after a node begins to stop every other node knows it (a ping period and the
/// ping's own time on loopback or a LAN).
pub const STOPPING_KNOWN_AFTER: Duration = Duration::from_millis(700);

/// A node's answer to a ping: `[flags u8: 1 = stopping]` then `[group u32][term u64]` for each
/// partition group it leads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pong {
    pub stopping: bool,
    pub leading: Vec<(u32, u64)>,
}

impl Pong {
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::with_capacity(1 + 12 * self.leading.len());
        body.put_u8(u8::from(self.stopping));
        for (group, term) in &self.leading {
            body.put_u32(*group);
            body.put_u64(*term);
        }
        body.freeze()
    }

    /// What `body` says; an empty answer says nothing, and a damaged one is refused.
    pub fn decode(mut body: &[u8]) -> Option<Self> {
        if body.is_empty() {
            return Some(Self::default());
        }
        let stopping = body.get_u8() & 1 == 1;
        if !body.len().is_multiple_of(12) {
            return None;
        }
        let mut leading = Vec::with_capacity(body.len() / 12);
        while body.has_remaining() {
            leading.push((body.get_u32(), body.get_u64()));
        }
        Some(Self { stopping, leading })
    }
}

/// What a node said in its last answer, and when.
#[derive(Debug)]
struct Answer {
    at: Instant,
    stopping: bool,
    leading: HashMap<u32, u64>,
}

/// When each node last answered, whether it said it is stopping, and what it leads.
#[derive(Debug, Default)]
pub struct Liveness {
    answered: Mutex<HashMap<NodeId, Answer>>,
}

impl Liveness {
    /// Whether `node` answered within the last few seconds.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.answered
            .lock()
            .get(&node)
            .is_some_and(|answer| answer.at.elapsed() < LIVE_FOR)
    }

    /// Whether `node`'s last answer said it is shutting down.
    pub fn is_stopping(&self, node: NodeId) -> bool {
        self.answered
            .lock()
            .get(&node)
            .is_some_and(|answer| answer.stopping)
    }

    /// The live node that reports leading `group` in the highest term, and that term.
    pub fn leader_of(&self, group: u32) -> Option<(NodeId, u64)> {
        self.answered
            .lock()
            .iter()
            .filter(|(_, answer)| answer.at.elapsed() < LIVE_FOR)
            .filter_map(|(node, answer)| answer.leading.get(&group).map(|term| (*node, *term)))
            .max_by_key(|(_, term)| *term)
    }

    /// Whether `node` answered within `within`.
    pub fn answered_within(&self, node: NodeId, within: Duration) -> bool {
        self.answered
            .lock()
            .get(&node)
            .is_some_and(|answer| answer.at.elapsed() < within)
    }

    /// The term in which `node`'s last answer says it leads `group`.
    pub fn leads(&self, node: NodeId, group: u32) -> Option<u64> {
        self.answered
            .lock()
            .get(&node)
            .and_then(|answer| answer.leading.get(&group).copied())
    }

    fn answered(&self, node: NodeId, pong: Pong) {
        let answer = Answer {
            at: Instant::now(),
            stopping: pong.stopping,
            leading: pong.leading.into_iter().collect(),
        };
        self.answered.lock().insert(node, answer);
    }

    fn gone(&self, node: NodeId) {
        self.answered.lock().remove(&node);
    }

    /// Pings every registered node other than this one until the controller stops; the
    /// task ends when `controller` is dropped.
    pub fn start(self: &Arc<Self>, controller: &Arc<ControllerNode>) {
        let liveness = Arc::clone(self);
        let controller = Arc::downgrade(controller);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = controller.upgrade() else {
                    return;
                };
                let me = node.id();
                let peers: Vec<(NodeId, String)> = node.read_local(|s| {
                    s.nodes
                        .values()
                        .filter(|n| n.id != me)
                        .map(|n| (n.id, n.cluster_addr.clone()))
                        .collect()
                });
                {
                    // Forget nodes that left.
                    let mut answered = liveness.answered.lock();
                    answered.retain(|id, _| peers.iter().any(|(peer, _)| peer == id));
                }
                let pings = peers.into_iter().map(|(peer, address)| {
                    let node = Arc::clone(&node);
                    let liveness = Arc::clone(&liveness);
                    async move {
                        node.transport().set_address(peer, address);
                        let answer = node
                            .transport()
                            .call(
                                peer,
                                CONTROLLER_GROUP,
                                method::PING,
                                Bytes::new(),
                                PING_TIMEOUT,
                            )
                            .await;
                        match answer {
                            Ok(answer) => match Pong::decode(&answer) {
                                Some(pong) => liveness.answered(peer, pong),
                                None => {
                                    tracing::warn!(
                                        peer,
                                        bytes = answer.len(),
                                        "a ping's answer does not decode"
                                    );
                                }
                            },
                            // No connection, or it broke: no process answers there (a killed
                            // node), so it is not live from now on, not only once its last
                            // answer ages out. A frozen node times out and ages out instead.
                            Err(CallError::Unreachable { .. } | CallError::Closed { .. }) => {
                                liveness.gone(peer);
                            }
                            Err(_) => {}
                        }
                    }
                });
                futures_util::future::join_all(pings).await;
            }
        });
    }
}

impl crate::partition::quiet::PeerView for Liveness {
    fn answered_within(&self, node: NodeId, within: Duration) -> bool {
        Liveness::answered_within(self, node, within)
    }

    fn leads(&self, node: NodeId, group: u32) -> Option<u64> {
        Liveness::leads(self, node, group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pongs_round_trip_and_damage_is_refused() {
        let pong = Pong {
            stopping: true,
            leading: vec![(65_536, 3), (70_000, u64::MAX)],
        };
        let bytes = pong.encode();
        assert_eq!(Pong::decode(&bytes), Some(pong));
        assert_eq!(Pong::decode(&[]), Some(Pong::default()));
        assert_eq!(Pong::decode(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn the_leader_of_a_group_is_the_live_node_reporting_the_highest_term() {
        let liveness = Liveness::default();
        liveness.answered(
            2,
            Pong {
                stopping: false,
                leading: vec![(7, 3), (8, 1)],
            },
        );
        liveness.answered(
            3,
            Pong {
                stopping: false,
                leading: vec![(7, 4)],
            },
        );
        assert_eq!(liveness.leader_of(7), Some((3, 4)));
        assert_eq!(liveness.leader_of(8), Some((2, 1)));
        assert_eq!(liveness.leader_of(9), None);
        // A node that stopped answering is not reported.
        liveness.gone(3);
        assert_eq!(liveness.leader_of(7), Some((2, 3)));
    }
}
