//! The cluster: its nodes with their addresses and roles, the controller group's term and
//! indexes, and each node's replication lag and last contact as the leader sees them.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use sluice_cluster::cluster::Cluster;
use sluice_cluster::status::ClusterStatus;
use utoipa::ToSchema;

use crate::AdminState;
use crate::error::{ApiError, ApiResult};

/// How long a node waits for the controller's leader to report before answering from its own
/// view.
const LEADER_WAIT: Duration = Duration::from_secs(2);

/// The cluster as the leader sees it (or this node, when the leader cannot be asked), and
/// which node answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterView {
    /// The node that answered this request.
    pub node_id: u64,
    #[serde(flatten)]
    pub status: ClusterStatus,
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
    Ok(Json(ClusterView {
        node_id: cluster.node_id(),
        status,
    }))
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
