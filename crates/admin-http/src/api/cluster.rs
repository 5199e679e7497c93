//! The cluster: its nodes with their addresses and roles, the controller group's term and
//! indexes, and each node's replication lag and last contact as the leader sees them.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
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

/// How long adding a node waits for it to join (it catches up with the controller's log first).
const JOIN_WAIT: Duration = Duration::from_secs(45);

/// A node to add: the cluster address of a node started with `cluster.wait_for_invite`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AddNode {
    /// Its cluster address, `host:port`.
    pub address: String,
}

/// A node added to the cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct AddedNode {
    pub id: u64,
    pub address: String,
}

#[utoipa::path(post, path = "/api/cluster/nodes", tag = "cluster",
    request_body = AddNode,
    responses(
        (status = 201, description = "The node joined the cluster", body = AddedNode),
        (status = 400, description = "The address is not host:port", body = crate::error::Problem),
        (status = 409, description = "No node waits for an invitation at that address, or it did not join", body = crate::error::Problem),
        (status = 503, description = "The node is still starting", body = crate::error::Problem)))]
pub async fn add_node(
    State(state): State<Arc<AdminState>>,
    Json(body): Json<AddNode>,
) -> ApiResult<(StatusCode, Json<AddedNode>)> {
    let cluster = cluster(&state)?;
    let address = body.address.trim().to_owned();
    let valid = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        return Err(ApiError::bad_request(format!(
            "address {address:?} is not host:port (a node's cluster address)"
        )));
    }
    let id = cluster
        .add_node(&address, JOIN_WAIT)
        .await
        .map_err(|e| ApiError::conflict(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(AddedNode { id, address })))
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
