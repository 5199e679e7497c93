//! Users and their permissions per virtual host.
//!
//! Passwords are write-only: the API never returns them or their hashes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_broker::users::{Permission, UserRecord};
use utoipa::ToSchema;

use crate::AdminState;
use crate::error::{ApiError, ApiResult};

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub name: String,
    /// `administrator` may change anything; `monitoring` and `management` may look.
    pub tags: Vec<String>,
    /// Virtual hosts the user has permissions in.
    pub vhosts: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutUser {
    /// Required for a new user; an existing user keeps the old password without it.
    pub password: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PermissionView {
    /// Only in replies; requests take it from the path.
    #[serde(default, skip_deserializing)]
    pub user: String,
    #[serde(default, skip_deserializing)]
    pub vhost: String,
    /// Regular expressions over resource names: declare and delete, publish, consume.
    pub configure: String,
    pub write: String,
    pub read: String,
}

fn view(user: &UserRecord) -> UserView {
    UserView {
        name: user.name.clone(),
        tags: user.tags.clone(),
        vhosts: user.permissions.keys().cloned().collect(),
    }
}

#[utoipa::path(get, path = "/api/users", tag = "users",
    responses((status = 200, description = "Every user", body = [UserView])))]
pub async fn list(State(state): State<Arc<AdminState>>) -> Json<Vec<UserView>> {
    Json(state.broker.users().iter().map(view).collect())
}

#[utoipa::path(get, path = "/api/users/{name}", tag = "users",
    params(("name" = String, Path, description = "User name")),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 404, description = "No such user", body = crate::error::Problem)))]
pub async fn describe(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<UserView>> {
    let user = state
        .broker
        .user(&name)
        .ok_or_else(|| ApiError::not_found(format!("user {name:?} does not exist")))?;
    Ok(Json(view(&user)))
}

#[utoipa::path(put, path = "/api/users/{name}", tag = "users",
    params(("name" = String, Path, description = "User name")),
    request_body = PutUser,
    responses(
        (status = 201, description = "Created"),
        (status = 204, description = "Updated"),
        (status = 400, description = "Invalid name, or a new user without a password", body = crate::error::Problem)))]
pub async fn put(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Json(body): Json<PutUser>,
) -> ApiResult<StatusCode> {
    let existed = state.broker.user(&name).is_some();
    state
        .broker
        .put_user(&name, body.password.as_deref(), body.tags)
        .await?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

#[utoipa::path(delete, path = "/api/users/{name}", tag = "users",
    params(("name" = String, Path, description = "User name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such user", body = crate::error::Problem)))]
pub async fn delete(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.broker.delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/permissions", tag = "users",
    responses((status = 200, description = "Every user's permissions in every virtual host", body = [PermissionView])))]
pub async fn list_permissions(State(state): State<Arc<AdminState>>) -> Json<Vec<PermissionView>> {
    Json(
        state
            .broker
            .permissions()
            .into_iter()
            .map(|(user, vhost, p)| PermissionView {
                user,
                vhost,
                configure: p.configure,
                write: p.write,
                read: p.read,
            })
            .collect(),
    )
}

#[utoipa::path(put, path = "/api/permissions/{vhost}/{user}", tag = "users",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("user" = String, Path, description = "User name")),
    request_body = PermissionView,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "A pattern is not a valid regular expression", body = crate::error::Problem),
        (status = 404, description = "No such user or virtual host", body = crate::error::Problem)))]
pub async fn put_permission(
    State(state): State<Arc<AdminState>>,
    Path((vhost, user)): Path<(String, String)>,
    Json(body): Json<PermissionView>,
) -> ApiResult<StatusCode> {
    let permission = Permission {
        configure: body.configure,
        write: body.write,
        read: body.read,
    };
    state
        .broker
        .set_permission(&user, &vhost, Some(permission))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/permissions/{vhost}/{user}", tag = "users",
    params(("vhost" = String, Path, description = "Virtual host, URL-encoded"),
           ("user" = String, Path, description = "User name")),
    responses(
        (status = 204, description = "Cleared"),
        (status = 404, description = "No such user or virtual host", body = crate::error::Problem)))]
pub async fn delete_permission(
    State(state): State<Arc<AdminState>>,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state.broker.set_permission(&user, &vhost, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
