//! Which nodes answer: every node pings every other registered node twice a second over the
//! transport, and counts one live while its last answer is recent.
//!
//! A connection being open says little (a frozen process keeps its sockets, and two followers
//! may have no reason to talk), so liveness is an answer to a request, end to end; a ping that
//! finds no connection at all (a killed process) ends it at once. Kafka clients
//! are told only live brokers and get LEADER_NOT_AVAILABLE for a partition whose node is not
//! live; nothing safety-related depends on it (Raft decides what is committed).
//!
//! A node shutting down answers pings with [`STOPPING`]; the others then hand it no leadership
//! (the preferred-leader balancing skips it), so what it handed over stays handed over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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
/// The answer to a ping from a node that is shutting down.
pub const STOPPING: &[u8] = b"stopping";

/// When each node last answered, and whether it said it is stopping.
#[derive(Debug, Default)]
pub struct Liveness {
    answered: Mutex<HashMap<NodeId, (Instant, bool)>>,
}

impl Liveness {
    /// Whether `node` answered within the last few seconds.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.answered
            .lock()
            .get(&node)
            .is_some_and(|(at, _)| at.elapsed() < LIVE_FOR)
    }

    /// Whether `node`'s last answer said it is shutting down.
    pub fn is_stopping(&self, node: NodeId) -> bool {
        self.answered
            .lock()
            .get(&node)
            .is_some_and(|(_, stopping)| *stopping)
    }

    fn answered(&self, node: NodeId, stopping: bool) {
        self.answered
            .lock()
            .insert(node, (Instant::now(), stopping));
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
                            Ok(answer) => liveness.answered(peer, answer == STOPPING),
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
