//! The admin API's one error type, answered as an RFC 9457 problem document.
//!
//! Clients see a status, a short title and a detail that says what to fix. Internal failures
//! are logged with their cause and answered with a generic detail, so no internals leak.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sluice_broker::{BrokerError, StorageClass};
use utoipa::ToSchema;

/// An error response body (`application/problem+json`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// Always "about:blank": the status and title say it all.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: String,
    pub status: u16,
    /// What went wrong, for a person to read.
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    /// Ask the client for credentials (`WWW-Authenticate`).
    pub challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            challenge: false,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, detail)
    }

    pub fn unauthorized(detail: impl Into<String>, challenge: bool) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            detail: detail.into(),
            challenge,
        }
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, detail)
    }

    /// An internal failure: logged in full, answered without details.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "admin API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the broker could not complete the request; its log has the details",
        )
    }
}

impl From<BrokerError> for ApiError {
    fn from(error: BrokerError) -> Self {
        use BrokerError as E;
        match &error {
            E::UnknownTopic(_) | E::UnknownPartition { .. } => Self::not_found(error.to_string()),
            E::TopicExists(_) => Self::conflict(error.to_string()),
            // Asked of the wrong node: the partition's node answers it.
            E::NotLeader { .. } | E::NotCoordinator { .. } => {
                Self::new(StatusCode::MISDIRECTED_REQUEST, error.to_string())
            }
            E::CoordinatorLoading { .. } | E::CoordinatorNotAvailable { .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
            }
            E::InvalidTopic { .. }
            | E::InvalidPartitions(_)
            | E::PolicyViolation(_)
            | E::InvalidReplicationFactor(_)
            | E::InvalidReplicaAssignment(_)
            | E::NoReassignmentInProgress(_)
            | E::InvalidConfig { .. }
            | E::UnknownConfig(_)
            | E::UnsupportedCompression(_) => Self::bad_request(error.to_string()),
            // Damaged stored data: the operator asking is told where it is (a replicated
            // partition's replica rebuilds it from the others meanwhile).
            E::Storage(sluice_storage::StorageError::Corrupt { .. }) => {
                tracing::error!(%error, "admin API request met damaged data");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
            }
            E::Storage(_) => match error.storage_class() {
                Some(
                    StorageClass::Corrupt
                    | StorageClass::Invalid
                    | StorageClass::UnsupportedFormat
                    | StorageClass::TooLarge
                    | StorageClass::InvalidConfig,
                ) => Self::bad_request(error.to_string()),
                Some(StorageClass::OutOfRange) => {
                    Self::new(StatusCode::RANGE_NOT_SATISFIABLE, error.to_string())
                }
                Some(StorageClass::Retriable) => {
                    Self::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
                }
                Some(StorageClass::Failed) | None => Self::internal(&error),
            },
            E::ShuttingDown => Self::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
            E::Messaging(messaging) => {
                use sluice_broker::error::MessagingError as M;
                let status = match **messaging {
                    M::NotFound { .. } | M::VhostNotFound(_) | M::UserNotFound(_) => {
                        StatusCode::NOT_FOUND
                    }
                    M::Inequivalent { .. }
                    | M::InvalidArgument { .. }
                    | M::PreconditionFailed(_)
                    | M::LimitReached { .. }
                    | M::UnknownExchangeType(_) => StatusCode::BAD_REQUEST,
                    M::InUse { .. }
                    | M::NotEmpty { .. }
                    | M::Locked { .. }
                    | M::ExclusiveConsume { .. } => StatusCode::CONFLICT,
                    M::AccessRefused(_) => StatusCode::FORBIDDEN,
                    M::Unreadable { .. } | M::NodeDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
                    M::QueueFailed { .. } => return Self::internal(&error),
                };
                Self::new(status, error.to_string())
            }
            _ => Self::internal(&error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
        };
        let mut response = (self.status, Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sluice\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Turns axum's plain-text rejections (a body that is not the JSON asked for, a bad path or
/// query parameter) into problem documents, so every error of the API has the same shape.
pub async fn problem_for_rejection(response: Response) -> Response {
    let status = response.status();
    let is_plain_error = (status.is_client_error() || status.is_server_error())
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !is_plain_error {
        return response;
    }
    let detail = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    ApiError::new(status, detail).into_response()
}
