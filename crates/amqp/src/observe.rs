//! What the AMQP front-end exposes to operators: counters, per-method latencies, and the
//! registry of open connections with their channels (which the admin API lists and can close).
//!
//! Bounds: one histogram per client method of AMQP 0-9-1 (a fixed set); one registry entry per
//! open connection, removed when it ends; its channel snapshot is refreshed by the connection
//! itself once a second and holds one line per open channel (≤ `channel_max`).

use std::net::SocketAddr;
use std::sync::Arc;

use foldhash::HashMap;
use parking_lot::Mutex;
use sluice_metrics::{Counter, Gauge, Histogram, Registered, Registry};
use tokio_util::sync::CancellationToken;

/// The methods a client sends on a channel, by (class id, method id).
const METHODS: [(u16, u16, &str); 26] = [
    (20, 10, "channel.open"),
    (20, 20, "channel.flow"),
    (20, 40, "channel.close"),
    (40, 10, "exchange.declare"),
    (40, 20, "exchange.delete"),
    (40, 30, "exchange.bind"),
    (40, 40, "exchange.unbind"),
    (50, 10, "queue.declare"),
    (50, 20, "queue.bind"),
    (50, 30, "queue.purge"),
    (50, 40, "queue.delete"),
    (50, 50, "queue.unbind"),
    (60, 10, "basic.qos"),
    (60, 20, "basic.consume"),
    (60, 30, "basic.cancel"),
    (60, 40, "basic.publish"),
    (60, 70, "basic.get"),
    (60, 80, "basic.ack"),
    (60, 90, "basic.reject"),
    (60, 100, "basic.recover-async"),
    (60, 110, "basic.recover"),
    (60, 120, "basic.nack"),
    (85, 10, "confirm.select"),
    (90, 10, "tx.select"),
    (90, 20, "tx.commit"),
    (90, 30, "tx.rollback"),
];

/// Counters and latencies of the AMQP listener.
#[derive(Debug)]
pub struct AmqpMetrics {
    pub connections_open: Gauge,
    pub connections_total: Counter,
    pub channels_open: Gauge,
    /// Connections closed for a framing or protocol error.
    pub protocol_errors: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// Messages received from publishers.
    pub published: Counter,
    /// Messages sent to consumers and `basic.get`.
    pub delivered: Counter,
    /// Times a publishing connection stopped reading until a queue's consumers caught up.
    pub flow_holds: Counter,
    methods: Vec<Histogram>,
    index: HashMap<(u16, u16), usize>,
}

impl Default for AmqpMetrics {
    fn default() -> Self {
        Self {
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            channels_open: Gauge::default(),
            protocol_errors: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            published: Counter::default(),
            delivered: Counter::default(),
            flow_holds: Counter::default(),
            methods: METHODS.iter().map(|_| Histogram::default()).collect(),
            index: METHODS
                .iter()
                .enumerate()
                .map(|(i, (class, method, _))| ((*class, *method), i))
                .collect(),
        }
    }
}

impl AmqpMetrics {
    /// The latency histogram of a client method, if it is one.
    pub fn method_latency(&self, class_id: u16, method_id: u16) -> Option<&Histogram> {
        self.index
            .get(&(class_id, method_id))
            .map(|&i| &self.methods[i])
    }

    /// Every client method's name (`basic.publish`) and latency histogram.
    pub fn method_latencies(&self) -> impl Iterator<Item = (&'static str, &Histogram)> {
        METHODS
            .iter()
            .zip(&self.methods)
            .map(|((_, _, name), histogram)| (*name, histogram))
    }
}

/// One open channel, as last reported by its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub number: u16,
    pub consumers: usize,
    pub unacked: usize,
    pub prefetch: u16,
    pub confirm: bool,
    pub transactional: bool,
}

/// What a connection tells the registry after its handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub vhost: String,
    /// The client's `connection_name`, or its product name.
    pub client: String,
}

/// One open connection.
#[derive(Debug)]
pub struct ConnectionEntry {
    pub id: u64,
    pub peer: SocketAddr,
    pub connected_at_ms: i64,
    pub identity: Mutex<Identity>,
    pub channels: Mutex<Vec<ChannelInfo>>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    close: CancellationToken,
}

impl Registered for ConnectionEntry {
    fn id(&self) -> u64 {
        self.id
    }

    /// Asks the connection to close (`connection.close` with CONNECTION_FORCED).
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
    pub connected_at_ms: i64,
    pub identity: Identity,
    pub channels: Vec<ChannelInfo>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Every open AMQP connection.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    entries: Registry<ConnectionEntry>,
}

impl ConnectionRegistry {
    pub(crate) fn open(&self, id: u64, peer: SocketAddr, now_ms: i64) -> Arc<ConnectionEntry> {
        self.entries.insert(ConnectionEntry {
            id,
            peer,
            connected_at_ms: now_ms,
            identity: Mutex::new(Identity::default()),
            channels: Mutex::new(Vec::new()),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            close: CancellationToken::new(),
        })
    }

    pub(crate) fn remove(&self, id: u64) {
        self.entries.remove(id);
    }

    pub fn list(&self) -> Vec<ConnectionInfo> {
        self.entries.snapshot(|entry| ConnectionInfo {
            id: entry.id,
            peer: entry.peer.to_string(),
            connected_at_ms: entry.connected_at_ms,
            identity: entry.identity.lock().clone(),
            channels: entry.channels.lock().clone(),
            bytes_in: entry.bytes_in.get(),
            bytes_out: entry.bytes_out.get(),
        })
    }

    /// Closes the connection with this id. False if there is none.
    pub fn close(&self, id: u64) -> bool {
        self.entries.close(id)
    }
}

/// The AMQP front-end's shared state: metrics and open connections.
#[derive(Debug, Default)]
pub struct AmqpFrontend {
    pub metrics: AmqpMetrics,
    pub connections: ConnectionRegistry,
    /// Open connections and channels counted against the limits.
    pub counts: Arc<crate::limits::Counts>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_one_histogram() {
        let metrics = AmqpMetrics::default();
        assert_eq!(metrics.method_latencies().count(), METHODS.len());
        assert!(metrics.method_latency(60, 40).is_some());
        assert!(metrics.method_latency(10, 11).is_none());
        let names: std::collections::HashSet<_> = METHODS.iter().map(|m| m.2).collect();
        assert_eq!(names.len(), METHODS.len());
    }

    #[test]
    fn registry_lists_and_closes() {
        let registry = ConnectionRegistry::default();
        let entry = registry.open(7, "127.0.0.1:5000".parse().unwrap(), 1);
        assert_eq!(registry.list().len(), 1);
        assert!(registry.close(7));
        assert!(entry.closed().is_cancelled());
        assert!(!registry.close(8));
        registry.remove(7);
        assert!(registry.list().is_empty());
    }
}
