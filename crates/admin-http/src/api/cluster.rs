//! The cluster: its nodes with their addresses and roles, the controller group's term and
//! indexes, and each node's replication lag and last contact as the leader sees them.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use sluice_cluster::cluster::Cluster;
use sluice_cluster::status::{ClusterStatus, NodeStatus};
use utoipa::ToSchema;

use crate::AdminState;
use crate::error::{ApiError, ApiResult};

/// How long a node waits for the controller's leader to report before answering from its own
/// view.
const LEADER_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterView {
    pub cluster_id: Option<String>,
    /// The node that answered this request.
    pub node_id: u64,
    /// The node whose view this is: the leader when it could be reached.
    pub reported_by: u64,
    /// Whether the view is the leader's (only the leader knows lag and last contact).
    pub from_leader: bool,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub id: u64,
    /// `leader`, `voter`, `learner`, or `none` (registered, not in the controller group).
    pub role: String,
    pub cluster_addr: Option<String>,
    pub kafka_addr: Option<String>,
    pub amqp_addr: Option<String>,
    pub http_addr: Option<String>,
    pub matched_index: Option<u64>,
    /// Controller log entries behind the leader.
    pub lag: Option<u64>,
    /// Milliseconds since the node last answered the leader.
    pub last_contact_ms: Option<u64>,
    pub joined_ms: Option<i64>,
}

impl From<NodeStatus> for NodeView {
    fn from(node: NodeStatus) -> Self {
        Self {
            id: node.id,
            role: node.role,
            cluster_addr: node.cluster_addr,
            kafka_addr: node.kafka_addr,
            amqp_addr: node.amqp_addr,
            http_addr: node.http_addr,
            matched_index: node.matched_index,
            lag: node.lag,
            last_contact_ms: node.last_contact_ms,
            joined_ms: node.joined_ms,
        }
    }
}

fn view(node_id: u64, status: ClusterStatus) -> ClusterView {
    ClusterView {
        cluster_id: status.cluster_id,
        node_id,
        reported_by: status.reported_by,
        from_leader: status.from_leader,
        leader: status.leader,
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        last_log_index: status.last_log_index,
        nodes: status.nodes.into_iter().map(NodeView::from).collect(),
    }
}

fn cluster(state: &AdminState) -> ApiResult<&Arc<Cluster>> {
    state.cluster.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node has not started its part in the cluster yet",
        )
    })
}

#[utoipa::path(get, path = "/api/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The cluster's nodes, roles and controller indexes", body = ClusterView),
        (status = 503, description = "The node is still starting", body = crate::error::Problem)))]
pub async fn status(State(state): State<Arc<AdminState>>) -> ApiResult<Json<ClusterView>> {
    let cluster = cluster(&state)?;
    let status = sluice_cluster::status::current(cluster.controller(), LEADER_WAIT).await;
    Ok(Json(view(cluster.node_id(), status)))
}

#[utoipa::path(delete, path = "/api/cluster/nodes/{id}", tag = "cluster",
    params(("id" = u64, Path, description = "The node's id")),
    responses(
        (status = 204, description = "The node is out of the cluster; its id is retired"),
        (status = 409, description = "The cluster refused (no such node, or no leader)", body = crate::error::Problem),
        (status = 503, description = "The node is still starting", body = crate::error::Problem)))]
pub async fn remove_node(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<u64>,
) -> ApiResult<StatusCode> {
    let cluster = cluster(&state)?;
    let known = cluster
        .controller()
        .read_linearizable(|s| s.nodes.contains_key(&id))
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if !known {
        return Err(ApiError::not_found(format!(
            "node {id} is not in the cluster"
        )));
    }
    cluster
        .remove_node(id)
        .await
        .map_err(|e| ApiError::conflict(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}
