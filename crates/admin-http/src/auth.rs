//! HTTP basic authentication against the broker's users, as RabbitMQ's management API does.
//!
//! Reading needs one of the tags `administrator`, `monitoring`, `management` or `policymaker`;
//! changing anything needs `administrator`. The default `guest` user may only come from a
//! loopback address. The web console sends `X-Sluice-Console: 1`, so a failed login gets a
//! plain 401 rather than the browser's own password dialog.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;

use crate::AdminState;
use crate::error::ApiError;

const READ_TAGS: &[&str] = &["administrator", "monitoring", "management", "policymaker"];

fn credentials(request: &Request) -> Option<(String, String)> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

pub async fn require_user(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let challenge = request.headers().get("x-sluice-console").is_none();
    let Some((name, password)) = credentials(&request) else {
        return Err(ApiError::unauthorized(
            "this endpoint needs a user name and password (HTTP basic authentication)",
            challenge,
        ));
    };
    let Some(user) = state.broker.authenticate(&name, &password) else {
        return Err(ApiError::unauthorized(
            "the user name or password is wrong",
            challenge,
        ));
    };
    if name == "guest" && !peer.ip().is_loopback() {
        return Err(ApiError::unauthorized(
            "user 'guest' may only log in from localhost; create another user for remote access",
            challenge,
        ));
    }
    let writes = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let allowed = if writes {
        user.tags.iter().any(|tag| tag == "administrator")
    } else {
        user.tags
            .iter()
            .any(|tag| READ_TAGS.contains(&tag.as_str()))
    };
    if !allowed {
        return Err(ApiError::forbidden(if writes {
            format!("user '{name}' needs the 'administrator' tag to change anything")
        } else {
            format!("user '{name}' needs one of the tags {READ_TAGS:?} to use the admin API")
        }));
    }
    Ok(next.run(request).await)
}
