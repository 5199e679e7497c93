//! Limits on virtual hosts (`max-connections`, `max-queues`) and users (`max-connections`,
//! `max-channels`), in the shape of RabbitMQ's `/api/vhost-limits` and `/api/user-limits`.
//!
//! A limit is set with `{"value": N}`; a negative value clears it, as in RabbitMQ. Limits
//! refuse what would go past them and close nothing that is already open.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::error::{ApiError, ApiResult};

#[derive(Debug, Serialize, ToSchema)]
pub struct VhostLimitsView {
    pub vhost: String,
    /// Limit name → value, set limits only.
    pub value: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserLimitsView {
    pub user: String,
    /// Limit name → value, set limits only.
    pub value: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutLimit {
    /// The limit; negative for none.
    pub value: i64,
}

fn named(limits: Vec<(&'static str, u64)>) -> BTreeMap<String, u64> {
    limits
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
}

#[utoipa::path(get, path = "/api/vhost-limits", tag = "limits",
    responses((status = 200, description = "Virtual hosts with limits set", body = [VhostLimitsView])))]
pub async fn list_vhost_limits(State(state): State<Arc<AdminState>>) -> Json<Vec<VhostLimitsView>> {
    let broker = &state.broker;
    Json(
        broker
            .vhost_names()
            .into_iter()
            .filter_map(|vhost| {
                let limits = broker.vhost_limits(&vhost)?;
                (!limits.is_empty()).then(|| VhostLimitsView {
                    value: named(limits.named()),
                    vhost,
                })
            })
            .collect(),
    )
}

#[utoipa::path(get, path = "/api/vhost-limits/{vhost}", tag = "limits",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded")),
    responses(
        (status = 200, description = "The virtual host's limits (an empty list when none is set)", body = [VhostLimitsView]),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn vhost_limits(
    State(state): State<Arc<AdminState>>,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Vec<VhostLimitsView>>> {
    let limits = state
        .broker
        .vhost_limits(&vhost)
        .ok_or_else(|| ApiError::not_found(format!("virtual host {vhost:?} does not exist")))?;
    Ok(Json(if limits.is_empty() {
        Vec::new()
    } else {
        vec![VhostLimitsView {
            value: named(limits.named()),
            vhost,
        }]
    }))
}

#[utoipa::path(put, path = "/api/vhost-limits/{vhost}/{name}", tag = "limits",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "max-connections or max-queues")),
    request_body = PutLimit,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "Unknown limit", body = crate::error::Problem),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn put_vhost_limit(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<PutLimit>,
) -> ApiResult<StatusCode> {
    let value = u64::try_from(body.value).ok();
    state.broker.set_vhost_limit(&vhost, &name, value).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/vhost-limits/{vhost}/{name}", tag = "limits",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("name" = String, Path, description = "max-connections or max-queues")),
    responses(
        (status = 204, description = "Cleared"),
        (status = 400, description = "Unknown limit", body = crate::error::Problem),
        (status = 404, description = "No such virtual host", body = crate::error::Problem)))]
pub async fn delete_vhost_limit(
    State(state): State<Arc<AdminState>>,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state.broker.set_vhost_limit(&vhost, &name, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/user-limits", tag = "limits",
    responses((status = 200, description = "Users with limits set", body = [UserLimitsView])))]
pub async fn list_user_limits(State(state): State<Arc<AdminState>>) -> Json<Vec<UserLimitsView>> {
    Json(
        state
            .broker
            .users()
            .into_iter()
            .filter(|u| !u.limits.is_empty())
            .map(|u| UserLimitsView {
                value: named(u.limits.named()),
                user: u.name,
            })
            .collect(),
    )
}

#[utoipa::path(get, path = "/api/user-limits/{user}", tag = "limits",
    params(("user" = String, Path, description = "User name")),
    responses(
        (status = 200, description = "The user's limits (an empty list when none is set)", body = [UserLimitsView]),
        (status = 404, description = "No such user", body = crate::error::Problem)))]
pub async fn user_limits(
    State(state): State<Arc<AdminState>>,
    Path(user): Path<String>,
) -> ApiResult<Json<Vec<UserLimitsView>>> {
    let record = state
        .broker
        .user(&user)
        .ok_or_else(|| ApiError::not_found(format!("user {user:?} does not exist")))?;
    Ok(Json(if record.limits.is_empty() {
        Vec::new()
    } else {
        vec![UserLimitsView {
            value: named(record.limits.named()),
            user,
        }]
    }))
}

#[utoipa::path(put, path = "/api/user-limits/{user}/{name}", tag = "limits",
    params(("user" = String, Path, description = "User name"),
           ("name" = String, Path, description = "max-connections or max-channels")),
    request_body = PutLimit,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "Unknown limit", body = crate::error::Problem),
        (status = 404, description = "No such user", body = crate::error::Problem)))]
pub async fn put_user_limit(
    State(state): State<Arc<AdminState>>,
    Path((user, name)): Path<(String, String)>,
    Json(body): Json<PutLimit>,
) -> ApiResult<StatusCode> {
    let value = u64::try_from(body.value).ok();
    state.broker.set_user_limit(&user, &name, value).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/user-limits/{user}/{name}", tag = "limits",
    params(("user" = String, Path, description = "User name"),
           ("name" = String, Path, description = "max-connections or max-channels")),
    responses(
        (status = 204, description = "Cleared"),
        (status = 400, description = "Unknown limit", body = crate::error::Problem),
        (status = 404, description = "No such user", body = crate::error::Problem)))]
pub async fn delete_user_limit(
    State(state): State<Arc<AdminState>>,
    Path((user, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state.broker.set_user_limit(&user, &name, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
