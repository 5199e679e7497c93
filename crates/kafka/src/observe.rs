//! What the Kafka front-end exposes to operators: request metrics, and the registry of open
//! connections (which the admin API lists and can close).
//!
//! Bounds: one histogram per served API (a fixed set); one registry entry per open
//! connection, removed when it closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kafka_protocol::messages::ApiKey;
use parking_lot::Mutex;
use sluice_metrics::{Counter, Gauge, Histogram, Registered, Registry};
use tokio_util::sync::CancellationToken;

/// Counters and latencies of the Kafka listener.
#[derive(Debug)]
pub struct KafkaMetrics {
    pub connections_open: Gauge,
    pub connections_total: Counter,
    /// Connections closed because they sent something that is not a valid request.
    pub protocol_errors: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    requests: Vec<(ApiKey, Histogram)>,
}

impl Default for KafkaMetrics {
    fn default() -> Self {
        Self {
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            protocol_errors: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            requests: crate::api::supported_apis()
                .map(|(api, _, _)| (api, Histogram::default()))
                .collect(),
        }
    }
}

impl KafkaMetrics {
    /// The latency histogram of `api`, if it is served.
    pub fn request_latency(&self, api: ApiKey) -> Option<&Histogram> {
        self.requests
            .iter()
            .find(|(key, _)| *key == api)
            .map(|(_, h)| h)
    }

    /// Every served API's name and latency histogram.
    pub fn request_latencies(&self) -> impl Iterator<Item = (String, &Histogram)> {
        self.requests
            .iter()
            .map(|(api, histogram)| (format!("{api:?}"), histogram))
    }
}

/// One open connection.
#[derive(Debug)]
pub struct ConnectionEntry {
    pub id: u64,
    pub peer: SocketAddr,
    pub connected_at_ms: i64,
    pub client_id: Mutex<String>,
    pub requests: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    close: CancellationToken,
}

impl Registered for ConnectionEntry {
    fn id(&self) -> u64 {
        self.id
    }

    /// Asks the connection to close after the request it is handling.
    fn close(&self) {
        self.close.cancel();
    }
}

impl ConnectionEntry {
    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.close
    }
}

/// A snapshot of one connection, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub id: u64,
    pub peer: String,
    pub client_id: String,
    pub connected_at_ms: i64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Every open Kafka connection.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    next_id: AtomicU64,
    entries: Registry<ConnectionEntry>,
}

impl ConnectionRegistry {
    pub(crate) fn open(
        &self,
        peer: SocketAddr,
        now_ms: i64,
        shutdown: &CancellationToken,
    ) -> Arc<ConnectionEntry> {
        self.entries.insert(ConnectionEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            peer,
            connected_at_ms: now_ms,
            client_id: Mutex::new(String::new()),
            requests: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            close: shutdown.child_token(),
        })
    }

    pub(crate) fn remove(&self, id: u64) {
        self.entries.remove(id);
    }

    pub fn list(&self) -> Vec<ConnectionInfo> {
        self.entries.snapshot(|entry| ConnectionInfo {
            id: entry.id,
            peer: entry.peer.to_string(),
            client_id: entry.client_id.lock().clone(),
            connected_at_ms: entry.connected_at_ms,
            requests: entry.requests.get(),
            bytes_in: entry.bytes_in.get(),
            bytes_out: entry.bytes_out.get(),
        })
    }

    /// Closes the connection with this id. False if there is none.
    pub fn close(&self, id: u64) -> bool {
        self.entries.close(id)
    }
}

/// The Kafka front-end's shared state: metrics and open connections.
#[derive(Debug, Default)]
pub struct KafkaFrontend {
    pub metrics: KafkaMetrics,
    pub connections: ConnectionRegistry,
}
