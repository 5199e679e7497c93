//! Sluice's Kafka wire-protocol front-end.
//!
//! It owns the Kafka listener, connections, request framing, and the translation between
//! Kafka's messages and the broker's calls: listener → connection → frame → one module per API
//! group under [`api`]. Encoding and decoding are done by the `kafka-protocol` crate; this crate
//! never reaches into storage files or broker state except through `sluice_broker`.
//!
//! Rules it keeps:
//! - A frame larger than `max_request_bytes` (or with a negative size) closes the connection
//!   before anything is allocated for it; so does a frame that does not decode.
//! - Requests on one connection are handled one at a time, in order, as Kafka does; responses
//!   go back in the same order. Connections run concurrently.
//! - Broker errors become Kafka error codes in one place ([`errors`]), per partition where the
//!   protocol has a per-partition code.
//! - No input makes the broker panic.

pub mod api;
mod connection;
pub mod errors;
pub mod observe;

use std::net::SocketAddr;
use std::sync::Arc;

use sluice_broker::Broker;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::connection::decode_request;
pub use crate::observe::{ConnectionInfo, KafkaFrontend, KafkaMetrics};

/// Settings of the Kafka front-end.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Host given to clients in metadata responses.
    pub advertised_host: String,
    /// Port given to clients in metadata responses.
    pub advertised_port: u16,
    /// The address the listener is bound to (`host:port`), as the broker reports it.
    pub listen_address: String,
    /// Largest request frame accepted.
    pub max_request_bytes: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// Most record bytes one Fetch response carries, whatever the client asks (Kafka's
    /// `fetch.max.bytes`); the first batch is returned whole even when larger, so a consumer
    /// can always progress.
    pub fetch_max_bytes: usize,
    /// The same bound for fetches between replicas (Kafka's `replica.fetch.max.bytes`), used
    /// once partitions are replicated; reported in the broker's configuration until then.
    pub replica_fetch_max_bytes: usize,
}

impl Default for KafkaSettings {
    /// Kafka's defaults, advertising localhost:9092.
    fn default() -> Self {
        Self {
            advertised_host: "localhost".into(),
            advertised_port: 9092,
            listen_address: "0.0.0.0:9092".into(),
            max_request_bytes: 100 * 1024 * 1024,
            max_connections: 10_000,
            fetch_max_bytes: 55 * 1024 * 1024,
            replica_fetch_max_bytes: 1024 * 1024,
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    pub broker: Broker,
    pub settings: KafkaSettings,
    pub shutdown: CancellationToken,
    pub frontend: Arc<KafkaFrontend>,
}

/// Accepts Kafka clients on `listener` until `shutdown` is cancelled, recording metrics and
/// connections in `frontend` (which the admin API reads). Each connection runs as a task on
/// `tracker`, so the caller can wait for them to finish.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    settings: KafkaSettings,
    frontend: Arc<KafkaFrontend>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let context = Arc::new(Context {
        broker,
        settings,
        shutdown: shutdown.clone(),
        frontend,
    });
    loop {
        // Wait for a connection slot first: past the limit, clients wait in the backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer): (_, SocketAddr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Running out of file descriptors must not end the listener; back off briefly.
                tracing::warn!(%error, "cannot accept a Kafka connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let context = Arc::clone(&context);
        tracker.spawn(async move {
            connection::run(stream, peer, context).await;
            drop(permit);
        });
    }
}
