//! Sluice's HTTP admin API, Prometheus metrics endpoint and web console.
//!
//! It owns the HTTP listener and translates between JSON and broker calls; it keeps no broker
//! state of its own beyond a short history of traffic rates. Every API route is declared once,
//! with its OpenAPI description (utoipa), so `/api/openapi.json` always matches the routes.
//!
//! Routes: `/healthz` and `/readyz` (no authentication), `/metrics` (Prometheus text format),
//! `/api/...` (HTTP basic authentication against the broker's users; errors are RFC 9457
//! problem documents), and the console at `/` (static assets compiled into the binary).

mod api;
mod auth;
mod console;
pub mod error;
mod metrics;
pub mod rates;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sluice_amqp::observe::AmqpFrontend;
use sluice_broker::Broker;
use sluice_kafka::KafkaFrontend;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use crate::rates::Rates;

/// What the admin API reads and steers.
#[derive(Debug)]
pub struct AdminState {
    pub broker: Broker,
    pub kafka: Arc<KafkaFrontend>,
    pub amqp: Arc<AmqpFrontend>,
    pub rates: Arc<Rates>,
    /// Protocol → bound address, as in the ready file.
    pub listeners: BTreeMap<String, String>,
    /// False until every listener is up, and again once shutdown begins.
    pub ready: AtomicBool,
    /// This node's part in the cluster, once it runs.
    pub cluster: std::sync::OnceLock<Arc<sluice_cluster::cluster::Cluster>>,
}

impl AdminState {
    pub fn new(
        broker: Broker,
        kafka: Arc<KafkaFrontend>,
        amqp: Arc<AmqpFrontend>,
        listeners: BTreeMap<String, String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            broker,
            kafka,
            amqp,
            rates: Arc::new(Rates::default()),
            listeners,
            ready: AtomicBool::new(false),
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Serves `/api/cluster` from `cluster` from now on (once).
    pub fn set_cluster(&self, cluster: Arc<sluice_cluster::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Sluice admin API", description = "Inspect and steer a Sluice broker: topics, consumer groups, queues, exchanges, bindings, users, connections, traffic."),
    components(schemas(error::Problem)),
    tags(
        (name = "overview", description = "The broker at a glance"),
        (name = "cluster", description = "The cluster's nodes, roles and controller state"),
        (name = "topics", description = "Topics, partitions, configuration and messages"),
        (name = "groups", description = "Consumer groups, lag and committed offsets"),
        (name = "connections", description = "Client connections and AMQP channels"),
        (name = "queues", description = "Virtual hosts and queues: counts, rates, purge, peek"),
        (name = "exchanges", description = "Exchanges, bindings, and publishing a message"),
        (name = "users", description = "Users and permissions"),
        (name = "limits", description = "Limits on virtual hosts and users"),
    )
)]
struct ApiDoc;

/// The API routes with their OpenAPI document.
fn api(state: &Arc<AdminState>) -> (Router<Arc<AdminState>>, utoipa::openapi::OpenApi) {
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api::routes())
        .split_for_parts();
    let router = router
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(state),
            auth::require_user,
        ))
        .layer(axum::middleware::map_response(error::problem_for_rejection));
    (router, openapi)
}

/// The whole application: API, health, metrics, console.
pub fn app(state: Arc<AdminState>) -> Router {
    let (api_router, openapi) = api(&state);
    let openapi_json =
        Arc::new(serde_json::to_string_pretty(&openapi).unwrap_or_else(|_| "{}".to_owned()));
    Router::new()
        .merge(api_router)
        .route(
            "/api/openapi.json",
            get(move || {
                let body = Arc::clone(&openapi_json);
                async move {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        (*body).clone(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::render))
        .merge(console::routes())
        .fallback(|| async { error::ApiError::not_found("no such route") })
        .with_state(state)
}

/// The OpenAPI document, as served at `/api/openapi.json`.
pub fn openapi_document(state: &Arc<AdminState>) -> utoipa::openapi::OpenApi {
    api(state).1
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<Arc<AdminState>>,
) -> impl IntoResponse {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves the admin API on `listener` until `shutdown`; samples rates meanwhile.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    tokio::spawn(Arc::clone(&state.rates).run(state.broker.clone(), shutdown.clone()));
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    let stop = shutdown.clone();
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(%error, "the admin API stopped");
    }
}
