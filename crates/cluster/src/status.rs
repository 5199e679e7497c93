//! What the cluster looks like, for `/api/cluster` and `sluice cluster status`.
//!
//! Only the controller group's leader knows how far each node's log is replicated and when
//! each last answered, so a node asked for the status asks the leader ([`method::REPORT`]) and answers
//! from its own view, saying so, when the leader cannot be reached.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use openraft::Instant;
use serde::{Deserialize, Serialize};

use crate::network::{from_json, method, to_json};
use crate::node::{CONTROLLER_GROUP, ControllerNode};
use crate::placement::NodeId;

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    pub cluster_id: Option<String>,
    /// The node whose view this is: the leader when it could be reached.
    pub reported_by: NodeId,
    /// Whether `reported_by` leads the controller group (only the leader knows replication).
    pub from_leader: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// The highest controller log index known committed.
    pub commit_index: Option<u64>,
    /// The highest index applied by the reporting node.
    pub applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    pub nodes: Vec<NodeStatus>,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStatus {
    pub id: NodeId,
    /// `leader`, `voter`, `learner`, or `none` (registered, not in the controller group).
    pub role: String,
    pub cluster_addr: Option<String>,
    pub kafka_addr: Option<String>,
    pub amqp_addr: Option<String>,
    pub http_addr: Option<String>,
    /// The last controller log index the leader knows this node has (leader's view only).
    pub matched_index: Option<u64>,
    /// Entries this node is behind the leader's log (leader's view only).
    pub lag: Option<u64>,
    /// Milliseconds since this node last answered the leader (leader's view only).
    pub last_contact_ms: Option<u64>,
    /// When it joined, milliseconds since the Unix epoch.
    pub joined_ms: Option<i64>,
}

/// The status as this node sees it.
pub fn local(node: &ControllerNode) -> ClusterStatus {
    let metrics = node.metrics();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let (cluster_id, registry) = node.read_local(|s| (s.cluster_id.clone(), s.nodes.clone()));
    let is_leader = metrics.current_leader == Some(node.id());
    let last_log_index = metrics.last_log_index;
    let mut ids: BTreeSet<NodeId> = registry.keys().copied().collect();
    ids.extend(&voters);
    ids.extend(&learners);
    let nodes = ids
        .into_iter()
        .map(|id| {
            let record = registry.get(&id);
            let role = if metrics.current_leader == Some(id) {
                "leader"
            } else if voters.contains(&id) {
                "voter"
            } else if learners.contains(&id) {
                "learner"
            } else {
                "none"
            };
            let matched_index = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|log_id| log_id.index);
            let last_contact_ms = if id == node.id() && is_leader {
                Some(0)
            } else {
                metrics
                    .heartbeat
                    .as_ref()
                    .and_then(|h| h.get(&id).cloned().flatten())
                    .map(|at| at.elapsed().as_millis() as u64)
            };
            NodeStatus {
                id,
                role: role.to_owned(),
                cluster_addr: record
                    .map(|r| r.cluster_addr.clone())
                    .or_else(|| membership.get_node(&id).map(|n| n.addr.clone())),
                kafka_addr: record.and_then(|r| r.kafka_addr.clone()),
                amqp_addr: record.and_then(|r| r.amqp_addr.clone()),
                http_addr: record.and_then(|r| r.http_addr.clone()),
                matched_index,
                lag: match (last_log_index, matched_index) {
                    (Some(last), Some(matched)) => Some(last.saturating_sub(matched)),
                    _ => None,
                },
                last_contact_ms,
                joined_ms: record.map(|r| r.joined_ms),
            }
        })
        .collect();
    ClusterStatus {
        cluster_id,
        reported_by: node.id(),
        from_leader: is_leader,
        leader: metrics.current_leader,
        term: metrics.current_term,
        commit_index: metrics.cluster_committed.as_ref().map(|l| l.index),
        applied_index: metrics.last_applied.as_ref().map(|l| l.index),
        last_log_index,
        nodes,
    }
}

/// The status from the leader's view when it answers within `timeout`, else this node's.
pub async fn current(node: &ControllerNode, timeout: Duration) -> ClusterStatus {
    let own = local(node);
    let Some(leader) = own.leader.filter(|&l| l != node.id()) else {
        return own;
    };
    node.learn_address(leader);
    let answer = node
        .transport()
        .call(
            leader,
            CONTROLLER_GROUP,
            method::REPORT,
            Bytes::new(),
            timeout,
        )
        .await;
    match answer
        .map_err(|e| e.to_string())
        .and_then(|a| from_json(&a))
    {
        Ok(status) => status,
        Err(reason) => {
            tracing::debug!(leader, %reason, "the leader did not report; answering from this node");
            own
        }
    }
}

/// Serves [`method::REPORT`]: this node's view.
pub(crate) fn serve(node: &ControllerNode) -> Result<Bytes, String> {
    to_json(&local(node))
}
