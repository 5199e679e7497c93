//! Client connections of both protocols, and AMQP channels: list them, close a connection.

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
    /// `kafka` or `amqp`.
    pub protocol: &'static str,
    pub peer: String,
    /// Kafka: the client id of the latest request. AMQP: the client's connection name or product.
    pub client_id: String,
    /// AMQP only: the authenticated user and the virtual host.
    pub user: Option<String>,
    pub vhost: Option<String>,
    /// AMQP only: open channels.
    pub channels: Option<usize>,
    pub connected_at_ms: i64,
    /// Kafka only: requests handled.
    pub requests: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelView {
    /// The connection's id, as in the connection list.
    pub connection: String,
    pub number: u16,
    pub user: String,
    pub vhost: String,
    pub consumers: usize,
    /// Deliveries waiting for an acknowledgement.
    pub unacknowledged: usize,
    pub prefetch: u16,
    /// Publisher confirms are on.
    pub confirm: bool,
    pub transactional: bool,
}

#[utoipa::path(get, path = "/api/connections", tag = "connections",
    responses((status = 200, description = "Every open client connection", body = [ConnectionView])))]
pub async fn list(State(state): State<Arc<AdminState>>) -> Json<Vec<ConnectionView>> {
    let kafka = state
        .kafka
        .connections
        .list()
        .into_iter()
        .map(|c| ConnectionView {
            id: format!("kafka-{}", c.id),
            protocol: "kafka",
            peer: c.peer,
            client_id: c.client_id,
            user: None,
            vhost: None,
            channels: None,
            connected_at_ms: c.connected_at_ms,
            requests: Some(c.requests),
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
        });
    let amqp = state
        .amqp
        .connections
        .list()
        .into_iter()
        .map(|c| ConnectionView {
            id: format!("amqp-{}", c.id),
            protocol: "amqp",
            peer: c.peer,
            client_id: c.identity.client,
            user: Some(c.identity.user),
            vhost: Some(c.identity.vhost),
            channels: Some(c.channels.len()),
            connected_at_ms: c.connected_at_ms,
            requests: None,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
        });
    Json(kafka.chain(amqp).collect())
}

#[utoipa::path(get, path = "/api/channels", tag = "connections",
    responses((status = 200, description = "Every open AMQP channel, refreshed once a second", body = [ChannelView])))]
pub async fn channels(State(state): State<Arc<AdminState>>) -> Json<Vec<ChannelView>> {
    Json(
        state
            .amqp
            .connections
            .list()
            .into_iter()
            .flat_map(|c| {
                let connection = format!("amqp-{}", c.id);
                let identity = c.identity;
                c.channels.into_iter().map(move |ch| ChannelView {
                    connection: connection.clone(),
                    number: ch.number,
                    user: identity.user.clone(),
                    vhost: identity.vhost.clone(),
                    consumers: ch.consumers,
                    unacknowledged: ch.unacked,
                    prefetch: ch.prefetch,
                    confirm: ch.confirm,
                    transactional: ch.transactional,
                })
            })
            .collect(),
    )
}

#[utoipa::path(delete, path = "/api/connections/{id}", tag = "connections",
    params(("id" = String, Path, description = "Connection id from the list, e.g. kafka-3 or amqp-7")),
    responses(
        (status = 204, description = "The connection closes (Kafka: after the request it is handling; AMQP: with connection.close, CONNECTION_FORCED)"),
        (status = 404, description = "No such connection", body = crate::error::Problem)))]
pub async fn close(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let closed = match id.split_once('-') {
        Some(("kafka", number)) => number
            .parse()
            .is_ok_and(|n| state.kafka.connections.close(n)),
        Some(("amqp", number)) => number
            .parse()
            .is_ok_and(|n| state.amqp.connections.close(n)),
        _ => false,
    };
    if closed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no connection {id:?}")))
    }
}
