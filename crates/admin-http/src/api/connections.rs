//! Client connections: list them, close one.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AdminState;
use crate::error::{ApiError, ApiResult};

#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionView {
    /// `<protocol>-<number>`, as used to close it.
    pub id: String,
    pub protocol: &'static str,
    pub peer: String,
    pub client_id: String,
    pub connected_at_ms: i64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[utoipa::path(get, path = "/api/connections", tag = "connections",
    responses((status = 200, description = "Every open client connection", body = [ConnectionView])))]
pub async fn list(State(state): State<Arc<AdminState>>) -> Json<Vec<ConnectionView>> {
    Json(
        state
            .kafka
            .connections
            .list()
            .into_iter()
            .map(|c| ConnectionView {
                id: format!("kafka-{}", c.id),
                protocol: "kafka",
                peer: c.peer,
                client_id: c.client_id,
                connected_at_ms: c.connected_at_ms,
                requests: c.requests,
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
            })
            .collect(),
    )
}

#[utoipa::path(delete, path = "/api/connections/{id}", tag = "connections",
    params(("id" = String, Path, description = "Connection id from the list, e.g. kafka-3")),
    responses(
        (status = 204, description = "The connection closes after the request it is handling"),
        (status = 404, description = "No such connection", body = crate::error::Problem)))]
pub async fn close(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let closed = match id.split_once('-') {
        Some(("kafka", number)) => number
            .parse()
            .is_ok_and(|n| state.kafka.connections.close(n)),
        _ => false,
    };
    if closed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no connection {id:?}")))
    }
}
