//! The broker at a glance.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AdminState;
use crate::rates::RateSample;

#[derive(Debug, Serialize, ToSchema)]
pub struct Totals {
    pub topics: usize,
    pub partitions: usize,
    /// Records currently retained across all partitions.
    pub records: u64,
    /// Bytes of log on disk across all partitions.
    pub log_bytes: u64,
    pub consumer_groups: usize,
    /// Open client connections, both protocols.
    pub connections: usize,
    pub vhosts: usize,
    pub queues: usize,
    pub exchanges: usize,
    /// Ready messages across all queues.
    pub messages_ready: u64,
    /// Delivered, unacknowledged messages across all queues.
    pub messages_unacknowledged: u64,
    /// Open AMQP channels.
    pub channels: usize,
    /// Alarms raised now: "memory" and "disk" (publishers are blocked), "unreadable_queue"
    /// (a queue holds a message it cannot read; see that queue's `unreadable`).
    pub alarms: Vec<&'static str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    pub version: &'static str,
    pub node_id: u32,
    pub cluster_id: String,
    pub uptime_ms: u64,
    /// Protocol → listening address.
    pub listeners: BTreeMap<String, String>,
    pub totals: Totals,
    /// Traffic over the last second.
    pub rates: RateSample,
    /// Fsync rounds and their mean duration since start.
    pub fsync_count: u64,
    pub fsync_mean_ms: f64,
}

#[utoipa::path(get, path = "/api/overview", tag = "overview",
    responses((status = 200, description = "Version, uptime, totals and current rates", body = Overview)))]
pub async fn overview(State(state): State<Arc<AdminState>>) -> Json<Overview> {
    let broker = &state.broker;
    let topics = broker.topics();
    let mut partitions = 0;
    let mut records = 0;
    let mut log_bytes = 0;
    for topic in &topics {
        for partition in topic.served() {
            partitions += 1;
            records += partition
                .high_watermark()
                .saturating_sub(partition.log_start_offset());
            log_bytes += partition.reader().size_bytes();
        }
    }
    let mut groups = broker.groups_with_offsets().unwrap_or_default();
    if let Ok(live) = broker.groups().list().await {
        groups.extend(live.into_iter().map(|g| g.group_id));
    }
    groups.sort();
    groups.dedup();
    let vhosts = broker.vhost_names();
    let (mut queues, mut exchanges, mut ready, mut unacked) = (0, 0, 0, 0);
    let mut unreadable_queue = false;
    for vhost in &vhosts {
        if let Some(live) = broker.vhost(vhost) {
            for queue in live.routing().queues() {
                queues += 1;
                unreadable_queue |= queue.unreadable().is_some();
                ready += queue.counters().ready.load(Ordering::Relaxed);
                unacked += queue.counters().unacked.load(Ordering::Relaxed);
            }
        }
        exchanges += broker
            .vhost_definitions(vhost)
            .map_or(0, |d| d.exchanges.len());
    }
    let amqp_connections = state.amqp.connections.list();
    let alarm_state = *broker.alarms().borrow();
    let mut alarms = Vec::new();
    if alarm_state.memory {
        alarms.push("memory");
    }
    if alarm_state.disk {
        alarms.push("disk");
    }
    if unreadable_queue {
        alarms.push("unreadable_queue");
    }
    let fsync = broker.fsync_latency();
    let fsync_count = fsync.count();
    Json(Overview {
        version: env!("CARGO_PKG_VERSION"),
        node_id: broker.node_id(),
        cluster_id: broker.cluster_id(),
        uptime_ms: broker.uptime().as_millis() as u64,
        listeners: state.listeners.clone(),
        totals: Totals {
            topics: topics.len(),
            partitions,
            records,
            log_bytes,
            consumer_groups: groups.len(),
            connections: state.kafka.connections.list().len() + amqp_connections.len(),
            vhosts: vhosts.len(),
            queues,
            exchanges,
            messages_ready: ready,
            messages_unacknowledged: unacked,
            channels: amqp_connections.iter().map(|c| c.channels.len()).sum(),
            alarms,
        },
        rates: state.rates.latest(),
        fsync_count,
        fsync_mean_ms: if fsync_count == 0 {
            0.0
        } else {
            fsync.sum_seconds() * 1000.0 / fsync_count as f64
        },
    })
}

#[utoipa::path(get, path = "/api/overview/history", tag = "overview",
    responses((status = 200, description = "Per-second traffic over the last five minutes, oldest first", body = [RateSample])))]
pub async fn history(State(state): State<Arc<AdminState>>) -> Json<Vec<RateSample>> {
    Json(state.rates.history())
}
