//! Exchanges and bindings: list, declare, delete, bind, unbind, and publish a message.
//!
//! As in RabbitMQ's management API, the default exchange (named `""`) is `amq.default` in
//! paths, and virtual hosts are URL-encoded (`%2F` for `/`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sluice_broker::declare::ExchangeDeclare;
use sluice_broker::definitions::VhostDefinitions;
use sluice_broker::exchange::{BindingRecord, Destination, ExchangeRecord};
use sluice_broker::message::Properties;
use utoipa::{IntoParams, ToSchema};

use super::fields::{table_from_json, table_to_json};
use super::messages::Encoding;
use super::queues::live_vhost;
use crate::AdminState;
use crate::error::{ApiError, ApiResult};

/// The default exchange's name in paths.
const DEFAULT_EXCHANGE: &str = "amq.default";

fn exchange_name(path_name: &str) -> &str {
    if path_name == DEFAULT_EXCHANGE {
        ""
    } else {
        path_name
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExchangeView {
    pub vhost: String,
    /// `""` is the default exchange (`amq.default` in paths).
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    #[schema(value_type = Object)]
    pub arguments: Map<String, Value>,
    /// Bindings with this exchange as their source.
    pub bindings: usize,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclareExchange {
    /// direct, fanout, topic or headers.
    #[serde(rename = "type")]
    pub kind: String,
    /// Defaults to true.
    pub durable: Option<bool>,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub internal: bool,
    /// For example `{"alternate-exchange": "unrouted"}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeleteExchangeQuery {
    /// Only delete the exchange if no binding has it as source.
    #[serde(default)]
    pub if_unused: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DestinationType {
    #[default]
    Queue,
    Exchange,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingView {
    /// Only in replies; requests take it from the path.
    #[serde(default, skip_deserializing)]
    pub vhost: String,
    /// The source exchange.
    pub source: String,
    pub destination: String,
    #[serde(default)]
    pub destination_type: DestinationType,
    #[serde(default)]
    pub routing_key: String,
    /// Binding arguments (headers exchanges match on them).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishToExchange {
    #[serde(default)]
    pub routing_key: String,
    pub payload: String,
    /// How `payload` is written.
    #[serde(default)]
    pub payload_encoding: Encoding,
    /// AMQP properties: content_type, content_encoding, headers (an object), delivery_mode
    /// (2 = persistent), priority, correlation_id, reply_to, expiration, message_id,
    /// timestamp, type, user_id, app_id.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub properties: Map<String, Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PublishOutcome {
    /// True if at least one queue got the message.
    pub routed: bool,
    /// How many queues got it.
    pub queues: usize,
}

fn view(record: &ExchangeRecord, definitions: &VhostDefinitions) -> ExchangeView {
    ExchangeView {
        vhost: record.vhost.clone(),
        name: record.name.clone(),
        kind: record.kind.name().to_owned(),
        durable: record.durable,
        auto_delete: record.auto_delete,
        internal: record.internal,
        arguments: table_to_json(&record.arguments),
        bindings: definitions.bindings_from(&record.name).count(),
    }
}

fn exchanges_of(state: &AdminState, vhost: &str) -> Vec<ExchangeView> {
    state
        .broker
        .vhost_definitions(vhost)
        .map(|d| d.exchanges.values().map(|x| view(x, &d)).collect())
        .unwrap_or_default()
}

fn binding_view(binding: &BindingRecord) -> BindingView {
    let (destination, destination_type) = match &binding.destination {
        Destination::Queue(name) => (name.clone(), DestinationType::Queue),
        Destination::Exchange(name) => (name.clone(), DestinationType::Exchange),
    };
    BindingView {
        vhost: binding.vhost.clone(),
        source: binding.source.clone(),
        destination,
        destination_type,
        routing_key: binding.routing_key.clone(),
        arguments: table_to_json(&binding.arguments),
    }
}

fn bindings_of(state: &AdminState, vhost: &str) -> Vec<BindingView> {
    state
        .broker
        .vhost_definitions(vhost)
        .map(|d| d.bindings.values().map(binding_view).collect())
        .unwrap_or_default()
}

#[utoipa::path(get, path = "/api/exchanges", tag = "exchanges",
    responses((status = 200, description = "Every exchange of every virtual host", body = [ExchangeView])))]
pub async fn list_all(State(state): State<Arc<AdminState>>) -> Json<Vec<ExchangeView>> {
    Json(
        state
            .broker
            .vhost_names()
            .iter()
            .flat_map(|vhost| exchanges_of(&state, vhost))
            .collect(),
    )
}

#[utoipa::path(get, path = "/api/exchanges/{vhost}", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded (`%2F` for `/`)")),
    responses(
        (status = 200, description = "The virtual host's exchanges", body = [ExchangeView]),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn list_in_vhost(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Vec<ExchangeView>>> {
    live_vhost(&state, &vhost)?;
    Ok(Json(exchanges_of(&state, &vhost)))
}

#[utoipa::path(get, path = "/api/exchanges/{vhost}/{name}", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Exchange name (`amq.default` for the default exchange)")),
    responses(
        (status = 200, description = "The exchange", body = ExchangeView),
        (status = 404, description = "No such exchange", body = crate::error::Problem)))]
pub async fn describe(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<ExchangeView>> {
    live_vhost(&state, &vhost)?;
    let name = exchange_name(&name);
    let definitions = state
        .broker
        .vhost_definitions(&vhost)
        .ok_or_else(|| ApiError::not_found(format!("virtual host {vhost:?} does not exist")))?;
    let record = definitions.exchanges.get(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "exchange {name:?} does not exist in virtual host {vhost:?}"
        ))
    })?;
    Ok(Json(view(record, &definitions)))
}

#[utoipa::path(put, path = "/api/exchanges/{vhost}/{name}", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Exchange name")),
    request_body = DeclareExchange,
    responses(
        (status = 201, description = "Declared"),
        (status = 204, description = "An equivalent exchange already existed"),
        (status = 400, description = "Invalid name, type or arguments, or an inequivalent exchange exists", body = crate::error::Problem),
        (status = 403, description = "Reserved name (`amq.`)", body = crate::error::Problem),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn declare(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<DeclareExchange>,
) -> ApiResult<StatusCode> {
    sluice_broker::names::validate_amqp_name("exchange", &name).map_err(ApiError::bad_request)?;
    let live = live_vhost(&state, &vhost)?;
    let existed = live.exchange(&name).is_some();
    let declare = ExchangeDeclare {
        name: exchange_name(&name).to_owned(),
        kind: body.kind,
        passive: false,
        durable: body.durable.unwrap_or(true),
        auto_delete: body.auto_delete,
        internal: body.internal,
        arguments: table_from_json(&body.arguments, "exchange arguments")?,
    };
    state.broker.declare_exchange(&vhost, declare).await?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

#[utoipa::path(delete, path = "/api/exchanges/{vhost}/{name}", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Exchange name"), DeleteExchangeQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "A built-in exchange", body = crate::error::Problem),
        (status = 404, description = "No such exchange", body = crate::error::Problem),
        (status = 409, description = "`if_unused` does not hold", body = crate::error::Problem)))]
pub async fn delete(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<DeleteExchangeQuery>,
) -> ApiResult<StatusCode> {
    let live = live_vhost(&state, &vhost)?;
    let name = exchange_name(&name);
    if !name.is_empty() && live.exchange(name).is_none() {
        return Err(ApiError::not_found(format!(
            "exchange {name:?} does not exist in virtual host {vhost:?}"
        )));
    }
    state
        .broker
        .delete_exchange(&vhost, name, query.if_unused)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn properties_from_json(object: &Map<String, Value>) -> ApiResult<Properties> {
    let mut properties = Properties::default();
    for (key, value) in object {
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| ApiError::bad_request(format!("property {key:?} must be a string")))
        };
        let small = |max: u64| {
            value.as_u64().filter(|v| *v <= max).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "property {key:?} must be an integer from 0 to {max}"
                ))
            })
        };
        match key.as_str() {
            "content_type" => properties.content_type = Some(text()?),
            "content_encoding" => properties.content_encoding = Some(text()?),
            "headers" => {
                let object = value.as_object().ok_or_else(|| {
                    ApiError::bad_request("property \"headers\" must be an object")
                })?;
                properties.headers = Some(table_from_json(object, "headers")?);
            }
            "delivery_mode" => properties.delivery_mode = Some(small(2)? as u8),
            "priority" => properties.priority = Some(small(255)? as u8),
            "correlation_id" => properties.correlation_id = Some(text()?),
            "reply_to" => properties.reply_to = Some(text()?),
            "expiration" => {
                let expiration = text()?;
                sluice_broker::message::validate_expiration(&expiration)
                    .map_err(ApiError::bad_request)?;
                properties.expiration = Some(expiration);
            }
            "message_id" => properties.message_id = Some(text()?),
            "timestamp" => properties.timestamp = Some(small(u64::MAX)?),
            "type" => properties.kind = Some(text()?),
            "user_id" => properties.user_id = Some(text()?),
            "app_id" => properties.app_id = Some(text()?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown message property {other:?}"
                )));
            }
        }
    }
    Ok(properties)
}

#[utoipa::path(post, path = "/api/exchanges/{vhost}/{name}/publish", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "Exchange name (`amq.default` for the default exchange)")),
    request_body = PublishToExchange,
    responses(
        (status = 200, description = "Published; persistent messages are on disk", body = PublishOutcome),
        (status = 400, description = "Bad payload or properties", body = crate::error::Problem),
        (status = 404, description = "No such exchange", body = crate::error::Problem)))]
pub async fn publish(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<PublishToExchange>,
) -> ApiResult<Json<PublishOutcome>> {
    live_vhost(&state, &vhost)?;
    let payload = match body.payload_encoding {
        Encoding::Utf8 => body.payload.into_bytes(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(&body.payload)
            .map_err(|e| ApiError::bad_request(format!("payload is not valid base64: {e}")))?,
    };
    let properties = properties_from_json(&body.properties)?;
    let queues = state
        .broker
        .publish_message(
            &vhost,
            exchange_name(&name),
            &body.routing_key,
            properties,
            Bytes::from(payload),
        )
        .await?;
    Ok(Json(PublishOutcome {
        routed: queues > 0,
        queues,
    }))
}

#[utoipa::path(get, path = "/api/bindings", tag = "exchanges",
    responses((status = 200, description = "Every binding of every virtual host", body = [BindingView])))]
pub async fn list_bindings(State(state): State<Arc<AdminState>>) -> Json<Vec<BindingView>> {
    Json(
        state
            .broker
            .vhost_names()
            .iter()
            .flat_map(|vhost| bindings_of(&state, vhost))
            .collect(),
    )
}

/// The connection owning an exclusive destination queue (0 for anything else): an operator
/// may bind any queue, as its owner could.
fn exclusive_owner(state: &AdminState, vhost: &str, destination: &Destination) -> u64 {
    match destination {
        Destination::Queue(name) => state
            .broker
            .vhost(vhost)
            .and_then(|v| v.queue(name))
            .and_then(|q| q.exclusive_owner())
            .unwrap_or(0),
        Destination::Exchange(_) => 0,
    }
}

fn binding_record(vhost: &str, body: &BindingView) -> ApiResult<BindingRecord> {
    let destination = match body.destination_type {
        DestinationType::Queue => Destination::Queue(body.destination.clone()),
        DestinationType::Exchange => Destination::Exchange(body.destination.clone()),
    };
    Ok(BindingRecord {
        vhost: vhost.to_owned(),
        source: body.source.clone(),
        destination,
        routing_key: body.routing_key.clone(),
        arguments: table_from_json(&body.arguments, "binding arguments")?,
    })
}

#[utoipa::path(get, path = "/api/bindings/{vhost}", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded")),
    responses(
        (status = 200, description = "The virtual host's bindings", body = [BindingView]),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn list_bindings_in_vhost(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Vec<BindingView>>> {
    live_vhost(&state, &vhost)?;
    Ok(Json(bindings_of(&state, &vhost)))
}

#[utoipa::path(post, path = "/api/bindings/{vhost}", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded")),
    request_body = BindingView,
    responses(
        (status = 201, description = "Bound (or already bound)", body = BindingView),
        (status = 403, description = "The default exchange cannot be bound", body = crate::error::Problem),
        (status = 404, description = "No such exchange or queue", body = crate::error::Problem)))]
pub async fn bind(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
    Json(body): Json<BindingView>,
) -> ApiResult<(StatusCode, Json<BindingView>)> {
    live_vhost(&state, &vhost)?;
    let record = binding_record(&vhost, &body)?;
    let owner = exclusive_owner(&state, &vhost, &record.destination);
    state.broker.bind(record.clone(), owner).await?;
    Ok((StatusCode::CREATED, Json(binding_view(&record))))
}

#[utoipa::path(delete, path = "/api/bindings/{vhost}", tag = "exchanges",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded")),
    request_body = BindingView,
    responses(
        (status = 204, description = "Unbound"),
        (status = 404, description = "No such binding", body = crate::error::Problem)))]
pub async fn unbind(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
    Json(body): Json<BindingView>,
) -> ApiResult<StatusCode> {
    live_vhost(&state, &vhost)?;
    let record = binding_record(&vhost, &body)?;
    let exists = state
        .broker
        .vhost_definitions(&vhost)
        .is_some_and(|d| d.bindings.contains_key(&record.key()));
    if !exists {
        return Err(ApiError::not_found(format!(
            "no binding from {:?} to {} {:?} with routing key {:?} in virtual host {vhost:?}",
            record.source,
            match body.destination_type {
                DestinationType::Queue => "queue",
                DestinationType::Exchange => "exchange",
            },
            body.destination,
            record.routing_key
        )));
    }
    let owner = exclusive_owner(&state, &vhost, &record.destination);
    state.broker.unbind(record, owner).await?;
    Ok(StatusCode::NO_CONTENT)
}
