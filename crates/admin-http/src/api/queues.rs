//! Virtual hosts and queues: list, declare, purge, delete, and peek at messages.
//!
//! Paths name a virtual host URL-encoded, as RabbitMQ's management API does: the default
//! virtual host `/` is `%2F`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sluice_broker::declare::QueueDeclare;
use sluice_broker::queue::{Delivery, Queue};
use utoipa::{IntoParams, ToSchema};

use super::fields::{table_from_json, table_to_json};
use crate::AdminState;
use crate::error::{ApiError, ApiResult};
use crate::rates::QueueRates;

#[derive(Debug, Serialize, ToSchema)]
pub struct VhostView {
    pub name: String,
    pub queues: usize,
    pub exchanges: usize,
    pub messages_ready: u64,
    pub messages_unacknowledged: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub vhost: String,
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    /// The node that holds the queue. Counts and rates are kept there: another node's
    /// answer has zeros for them.
    pub node: u32,
    /// Queue arguments as declared (`x-max-length`, `x-message-ttl`, ...).
    #[schema(value_type = Object)]
    pub arguments: Map<String, Value>,
    /// Ready plus unacknowledged.
    pub messages: u64,
    pub messages_ready: u64,
    pub messages_unacknowledged: u64,
    pub consumers: u64,
    /// Messages accepted since the broker started.
    pub published: u64,
    /// Deliveries to consumers and `basic.get`, since the broker started.
    pub delivered: u64,
    /// Acknowledgements since the broker started.
    pub acked: u64,
    pub rates: QueueRates,
    pub created_ms: i64,
    /// A message the queue cannot read, if any: the queue keeps it and delivers nothing past
    /// it until it reads again or the queue is purged or deleted.
    pub unreadable: Option<UnreadableView>,
}

/// A message a queue cannot read.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnreadableView {
    pub offset: u64,
    /// The file the read failed on (the queue's directory when no one file is to blame).
    pub file: String,
    /// Byte position in that file, when known.
    pub position: Option<u64>,
    pub reason: String,
    /// When the queue found it (ms since the epoch).
    pub since_ms: i64,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclareQueue {
    /// Defaults to true.
    pub durable: Option<bool>,
    #[serde(default)]
    pub auto_delete: bool,
    /// Queue arguments, for example `{"x-max-length": 1000, "x-queue-type": "classic"}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeleteQueueQuery {
    /// Only delete the queue if it has no consumers.
    #[serde(default)]
    pub if_unused: bool,
    /// Only delete the queue if it holds no messages.
    #[serde(default)]
    pub if_empty: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Purged {
    /// Ready messages dropped.
    pub messages: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GetMessages {
    /// How many messages, 1 to 100.
    pub count: usize,
    /// True (the default): the messages stay in the queue, marked redelivered. False: they
    /// are taken out of it, as a consumer with automatic acknowledgement would.
    #[serde(default = "yes")]
    pub requeue: bool,
}

fn yes() -> bool {
    true
}

/// A message taken from a queue.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueMessage {
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    /// The body as text, if it is valid UTF-8.
    pub payload: Option<String>,
    /// The body in base64, if it is not valid UTF-8.
    pub payload_base64: Option<String>,
    pub payload_bytes: usize,
    #[schema(value_type = Object)]
    pub properties: Map<String, Value>,
}

pub(crate) fn live_vhost(
    state: &AdminState,
    vhost: &str,
) -> ApiResult<Arc<sluice_broker::vhost::Vhost>> {
    state
        .broker
        .vhost(vhost)
        .ok_or_else(|| ApiError::not_found(format!("virtual host {vhost:?} does not exist")))
}

fn find_queue(state: &AdminState, vhost: &str, name: &str) -> ApiResult<Arc<Queue>> {
    live_vhost(state, vhost)?.queue(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "queue {name:?} does not exist in virtual host {vhost:?}"
        ))
    })
}

fn view(state: &AdminState, queue: &Queue) -> QueueView {
    let counters = queue.counters();
    let ready = counters.ready.load(Ordering::Relaxed);
    let unacked = counters.unacked.load(Ordering::Relaxed);
    let record = queue.record();
    QueueView {
        vhost: queue.vhost().to_owned(),
        name: queue.name().to_owned(),
        durable: record.durable,
        auto_delete: record.auto_delete,
        exclusive: record.exclusive_owner.is_some(),
        node: queue.remote_node().unwrap_or(state.broker.node_id()),
        arguments: table_to_json(&record.arguments),
        messages: ready + unacked,
        messages_ready: ready,
        messages_unacknowledged: unacked,
        consumers: counters.consumers.load(Ordering::Relaxed),
        published: counters.published.load(Ordering::Relaxed),
        delivered: counters.delivered.load(Ordering::Relaxed),
        acked: counters.acked.load(Ordering::Relaxed),
        rates: state.rates.queue(queue.vhost(), queue.name()),
        created_ms: record.created_ms,
        unreadable: queue.unreadable().map(|u| UnreadableView {
            offset: u.offset,
            file: u.file,
            position: u.position,
            reason: u.reason,
            since_ms: u.since_ms,
        }),
    }
}

fn queues_of(state: &AdminState, vhost: &str) -> Vec<QueueView> {
    let Some(live) = state.broker.vhost(vhost) else {
        return Vec::new();
    };
    let table = live.routing();
    let mut queues: Vec<QueueView> = table.queues().map(|q| view(state, q)).collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    queues
}

#[utoipa::path(get, path = "/api/vhosts", tag = "queues",
    responses((status = 200, description = "Every virtual host", body = [VhostView])))]
pub async fn list_vhosts(State(state): State<Arc<AdminState>>) -> Json<Vec<VhostView>> {
    let views = state
        .broker
        .vhost_names()
        .into_iter()
        .map(|name| {
            let queues = queues_of(&state, &name);
            let exchanges = state
                .broker
                .vhost_definitions(&name)
                .map_or(0, |d| d.exchanges.len());
            VhostView {
                queues: queues.len(),
                exchanges,
                messages_ready: queues.iter().map(|q| q.messages_ready).sum(),
                messages_unacknowledged: queues.iter().map(|q| q.messages_unacknowledged).sum(),
                name,
            }
        })
        .collect();
    Json(views)
}

#[utoipa::path(put, path = "/api/vhosts/{vhost}", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host name, URL-encoded")),
    responses(
        (status = 201, description = "Created"),
        (status = 204, description = "It already existed"),
        (status = 400, description = "Invalid name", body = crate::error::Problem)))]
pub async fn put_vhost(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
) -> ApiResult<StatusCode> {
    let existed = state.broker.vhost(&vhost).is_some();
    state.broker.create_vhost(&vhost).await?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

#[utoipa::path(delete, path = "/api/vhosts/{vhost}", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host name, URL-encoded")),
    responses(
        (status = 204, description = "Deleted, with its exchanges, queues, messages, bindings and the users' permissions there; its AMQP connections are closed (CONNECTION_FORCED). A virtual host named in the configuration is created again, empty, at the next start"),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn delete_vhost(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
) -> ApiResult<StatusCode> {
    state.broker.delete_vhost(&vhost).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/queues", tag = "queues",
    responses((status = 200, description = "Every queue of every virtual host", body = [QueueView])))]
pub async fn list_all(State(state): State<Arc<AdminState>>) -> Json<Vec<QueueView>> {
    Json(
        state
            .broker
            .vhost_names()
            .iter()
            .flat_map(|vhost| queues_of(&state, vhost))
            .collect(),
    )
}

#[utoipa::path(get, path = "/api/queues/{vhost}", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded (`%2F` for `/`)")),
    responses(
        (status = 200, description = "The virtual host's queues", body = [QueueView]),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn list_in_vhost(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Vec<QueueView>>> {
    live_vhost(&state, &vhost)?;
    Ok(Json(queues_of(&state, &vhost)))
}

#[utoipa::path(get, path = "/api/queues/{vhost}/{name}", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Queue name")),
    responses(
        (status = 200, description = "The queue", body = QueueView),
        (status = 404, description = "No such queue", body = crate::error::Problem)))]
pub async fn describe(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<QueueView>> {
    let queue = find_queue(&state, &vhost, &name)?;
    Ok(Json(view(&state, &queue)))
}

#[utoipa::path(put, path = "/api/queues/{vhost}/{name}", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Queue name")),
    request_body = DeclareQueue,
    responses(
        (status = 201, description = "Declared", body = QueueView),
        (status = 200, description = "An equivalent queue already existed", body = QueueView),
        (status = 400, description = "Invalid name or arguments, or an inequivalent queue exists", body = crate::error::Problem),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn declare(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
    body: Option<Json<DeclareQueue>>,
) -> ApiResult<(StatusCode, Json<QueueView>)> {
    let Json(body) = body.unwrap_or_default();
    if name.is_empty() {
        return Err(ApiError::bad_request("the queue name is empty"));
    }
    sluice_broker::names::validate_amqp_name("queue", &name).map_err(ApiError::bad_request)?;
    let live = live_vhost(&state, &vhost)?;
    let existed = live.queue(&name).is_some();
    let declare = QueueDeclare {
        name: name.clone(),
        durable: body.durable.unwrap_or(true),
        auto_delete: body.auto_delete,
        arguments: table_from_json(&body.arguments, "queue arguments")?,
        ..QueueDeclare::default()
    };
    let (queue, _) = state.broker.declare_queue(&vhost, declare).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(view(&state, &queue))))
}

#[utoipa::path(delete, path = "/api/queues/{vhost}/{name}", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Queue name"), DeleteQueueQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such queue", body = crate::error::Problem),
        (status = 409, description = "`if_unused` or `if_empty` does not hold", body = crate::error::Problem)))]
pub async fn delete(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<DeleteQueueQuery>,
) -> ApiResult<StatusCode> {
    let queue = find_queue(&state, &vhost, &name)?;
    // An operator may delete any queue, exclusive ones included.
    let owner = queue.exclusive_owner().unwrap_or(0);
    state
        .broker
        .delete_queue(&vhost, &name, query.if_unused, query.if_empty, owner)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/queues/{vhost}/{name}/contents", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Queue name")),
    responses(
        (status = 200, description = "Purged: ready messages dropped", body = Purged),
        (status = 404, description = "No such queue", body = crate::error::Problem)))]
pub async fn purge(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Purged>> {
    let queue = find_queue(&state, &vhost, &name)?;
    let messages = queue.purge().await?;
    Ok(Json(Purged { messages }))
}

fn message_view(delivery: &Delivery) -> QueueMessage {
    let message = &delivery.message;
    let (payload, payload_base64) = match std::str::from_utf8(&message.body) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&message.body)),
        ),
    };
    let p = &message.properties;
    let mut properties = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            properties.insert(key.to_owned(), value);
        }
    };
    let text = |v: &Option<String>| v.as_ref().map(|s| Value::String(s.clone()));
    put("content_type", text(&p.content_type));
    put("content_encoding", text(&p.content_encoding));
    put(
        "headers",
        p.headers.as_ref().map(|h| Value::Object(table_to_json(h))),
    );
    put("delivery_mode", p.delivery_mode.map(Value::from));
    put("priority", p.priority.map(Value::from));
    put("correlation_id", text(&p.correlation_id));
    put("reply_to", text(&p.reply_to));
    put("expiration", text(&p.expiration));
    put("message_id", text(&p.message_id));
    put("timestamp", p.timestamp.map(Value::from));
    put("type", text(&p.kind));
    put("user_id", text(&p.user_id));
    put("app_id", text(&p.app_id));
    QueueMessage {
        exchange: message.exchange.to_string(),
        routing_key: message.routing_key.to_string(),
        redelivered: delivery.redelivered,
        payload,
        payload_base64,
        payload_bytes: message.body.len(),
        properties,
    }
}

#[utoipa::path(post, path = "/api/queues/{vhost}/{name}/get", tag = "queues",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Queue name")),
    request_body = GetMessages,
    responses(
        (status = 200, description = "Messages from the head of the queue", body = [QueueMessage]),
        (status = 400, description = "Bad count", body = crate::error::Problem),
        (status = 404, description = "No such queue", body = crate::error::Problem)))]
pub async fn get_messages(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<GetMessages>,
) -> ApiResult<Json<Vec<QueueMessage>>> {
    let limit = sluice_broker::operate::PEEK_LIMIT;
    if body.count == 0 || body.count > limit {
        return Err(ApiError::bad_request(format!(
            "count must be between 1 and {limit}"
        )));
    }
    find_queue(&state, &vhost, &name)?;
    let deliveries = state
        .broker
        .get_from_queue(&vhost, &name, body.count, body.requeue)
        .await?;
    Ok(Json(deliveries.iter().map(message_view).collect()))
}
