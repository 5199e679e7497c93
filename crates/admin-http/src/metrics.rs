//! `/metrics`: everything an operator graphs, in the Prometheus text format.
//!
//! Values are read at scrape time from where they live (partition counters, the group
//! coordinator, the front-ends' histograms); nothing here keeps a second copy.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::sync::atomic::Ordering;

use sluice_metrics::{Kind, TextEncoder};

use crate::AdminState;

pub async fn render(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut text = TextEncoder::new();
    let broker = &state.broker;
    text.family("sluice_build_info", "The running version.", Kind::Gauge)
        .sample(
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
    text.family(
        "sluice_uptime_seconds",
        "Seconds since the broker started.",
        Kind::Gauge,
    )
    .sample("sluice_uptime_seconds", &[], broker.uptime().as_secs_f64());

    let topics = broker.topics();
    let partition_families: [(&str, &str, Kind); 9] = [
        (
            "sluice_partition_records_in_total",
            "Records appended to the partition since start.",
            Kind::Counter,
        ),
        (
            "sluice_partition_bytes_in_total",
            "Bytes of record batches appended since start.",
            Kind::Counter,
        ),
        (
            "sluice_partition_records_out_total",
            "Records read from the partition since start.",
            Kind::Counter,
        ),
        (
            "sluice_partition_bytes_out_total",
            "Bytes of record batches read since start.",
            Kind::Counter,
        ),
        (
            "sluice_partition_produce_errors_total",
            "Produce requests the partition refused.",
            Kind::Counter,
        ),
        (
            "sluice_partition_log_start_offset",
            "First offset consumers can read.",
            Kind::Gauge,
        ),
        (
            "sluice_partition_high_watermark",
            "Offset up to which records are visible to consumers.",
            Kind::Gauge,
        ),
        (
            "sluice_partition_log_end_offset",
            "Offset the next record will get.",
            Kind::Gauge,
        ),
        (
            "sluice_partition_log_size_bytes",
            "Bytes of log on disk.",
            Kind::Gauge,
        ),
    ];
    for (family, help, kind) in partition_families {
        text.family(family, help, kind);
        for topic in &topics {
            for partition in topic.served() {
                let index = partition.index().to_string();
                let labels = [("topic", &*topic.name), ("partition", index.as_str())];
                let stats = partition.stats();
                let value = match family {
                    "sluice_partition_records_in_total" => stats.records_in.get() as f64,
                    "sluice_partition_bytes_in_total" => stats.bytes_in.get() as f64,
                    "sluice_partition_records_out_total" => stats.records_out.get() as f64,
                    "sluice_partition_bytes_out_total" => stats.bytes_out.get() as f64,
                    "sluice_partition_produce_errors_total" => stats.produce_errors.get() as f64,
                    "sluice_partition_log_start_offset" => partition.log_start_offset() as f64,
                    "sluice_partition_high_watermark" => partition.high_watermark() as f64,
                    "sluice_partition_log_end_offset" => partition.reader().log_end_offset() as f64,
                    _ => partition.reader().size_bytes() as f64,
                };
                text.sample(family, &labels, value);
            }
        }
    }

    text.family(
        "sluice_consumer_group_lag",
        "Records between a group's committed offset and the high watermark.",
        Kind::Gauge,
    );
    let mut groups = broker.groups_with_offsets().unwrap_or_default();
    let live = broker.groups().list().await.unwrap_or_default();
    groups.extend(live.iter().map(|g| g.group_id.clone()));
    groups.sort();
    groups.dedup();
    for group in &groups {
        for entry in broker.committed_offsets(group).unwrap_or_default() {
            let Ok(partition) = broker.partition(&entry.topic, entry.partition as i32) else {
                continue;
            };
            if entry.committed.offset < 0 {
                continue;
            }
            let lag = partition
                .high_watermark()
                .saturating_sub(entry.committed.offset as u64);
            let index = entry.partition.to_string();
            text.sample(
                "sluice_consumer_group_lag",
                &[
                    ("group", group),
                    ("topic", &entry.topic),
                    ("partition", &index),
                ],
                lag as f64,
            );
        }
    }
    text.family(
        "sluice_consumer_group_members",
        "Members of each live consumer group.",
        Kind::Gauge,
    );
    for listing in &live {
        if let Ok(Some(described)) = broker.groups().describe(&listing.group_id).await {
            text.sample(
                "sluice_consumer_group_members",
                &[("group", &listing.group_id)],
                described.members.len() as f64,
            );
        }
    }

    let kafka = &state.kafka.metrics;
    text.family(
        "sluice_kafka_connections",
        "Open Kafka connections.",
        Kind::Gauge,
    )
    .sample(
        "sluice_kafka_connections",
        &[],
        kafka.connections_open.get() as f64,
    );
    text.family(
        "sluice_kafka_connections_total",
        "Kafka connections accepted since start.",
        Kind::Counter,
    )
    .sample(
        "sluice_kafka_connections_total",
        &[],
        kafka.connections_total.get() as f64,
    );
    text.family(
        "sluice_kafka_protocol_errors_total",
        "Kafka connections closed for sending something that is not a valid request.",
        Kind::Counter,
    )
    .sample(
        "sluice_kafka_protocol_errors_total",
        &[],
        kafka.protocol_errors.get() as f64,
    );
    text.family(
        "sluice_kafka_received_bytes_total",
        "Bytes of Kafka requests received.",
        Kind::Counter,
    )
    .sample(
        "sluice_kafka_received_bytes_total",
        &[],
        kafka.bytes_in.get() as f64,
    );
    text.family(
        "sluice_kafka_sent_bytes_total",
        "Bytes of Kafka responses sent.",
        Kind::Counter,
    )
    .sample(
        "sluice_kafka_sent_bytes_total",
        &[],
        kafka.bytes_out.get() as f64,
    );
    text.family(
        "sluice_kafka_request_duration_seconds",
        "Time to handle a Kafka request, by API.",
        Kind::Histogram,
    );
    for (api, histogram) in kafka.request_latencies() {
        if histogram.count() > 0 {
            text.histogram(
                "sluice_kafka_request_duration_seconds",
                &[("api", &api)],
                histogram,
            );
        }
    }

    render_queues(&mut text, broker);
    render_amqp(&mut text, &state.amqp.metrics);
    render_resources(&mut text, broker);

    text.family(
        "sluice_fsync_duration_seconds",
        "Duration of fsync rounds (one round may cover many appends).",
        Kind::Histogram,
    )
    .histogram("sluice_fsync_duration_seconds", &[], broker.fsync_latency());

    text.family(
        "sluice_limit_refusals_total",
        "Requests refused because a configured limit was reached, by limit (connections, \
         channels, consumers per channel, queues per virtual host, partitions, group size).",
        Kind::Counter,
    );
    for (limit, count) in broker.refusals().snapshot() {
        text.sample(
            "sluice_limit_refusals_total",
            &[("limit", limit.name())],
            count as f64,
        );
    }

    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text.finish(),
    )
}

/// Per-queue depth and counters, labelled by virtual host and queue.
fn render_queues(text: &mut TextEncoder, broker: &sluice_broker::Broker) {
    let mut queues = Vec::new();
    for vhost in broker.vhost_names() {
        if let Some(live) = broker.vhost(&vhost) {
            let mut in_vhost: Vec<_> = live.routing().queues().cloned().collect();
            in_vhost.sort_by(|a, b| a.name().cmp(b.name()));
            queues.extend(in_vhost);
        }
    }
    let families: [(&str, &str, Kind); 7] = [
        (
            "sluice_queue_messages_ready",
            "Messages ready for delivery.",
            Kind::Gauge,
        ),
        (
            "sluice_queue_messages_unacked",
            "Messages delivered and not yet acknowledged.",
            Kind::Gauge,
        ),
        (
            "sluice_queue_messages",
            "Ready plus unacknowledged messages (the queue's depth).",
            Kind::Gauge,
        ),
        (
            "sluice_queue_consumers",
            "Consumers of the queue.",
            Kind::Gauge,
        ),
        (
            "sluice_queue_published_total",
            "Messages the queue accepted since start.",
            Kind::Counter,
        ),
        (
            "sluice_queue_delivered_total",
            "Deliveries to consumers and basic.get since start, redeliveries included.",
            Kind::Counter,
        ),
        (
            "sluice_queue_acked_total",
            "Deliveries acknowledged since start.",
            Kind::Counter,
        ),
    ];
    for (family, help, kind) in families {
        text.family(family, help, kind);
        for queue in &queues {
            let c = queue.counters();
            let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed) as f64;
            let value = match family {
                "sluice_queue_messages_ready" => load(&c.ready),
                "sluice_queue_messages_unacked" => load(&c.unacked),
                "sluice_queue_messages" => load(&c.ready) + load(&c.unacked),
                "sluice_queue_consumers" => load(&c.consumers),
                "sluice_queue_published_total" => load(&c.published),
                "sluice_queue_delivered_total" => load(&c.delivered),
                _ => load(&c.acked),
            };
            text.sample(
                family,
                &[("vhost", queue.vhost()), ("queue", queue.name())],
                value,
            );
        }
    }
    text.family(
        "sluice_queue_unreadable_message",
        "1 while the queue holds a message it cannot read (an I/O error, a checksum mismatch), \
         labelled with the file and the message's offset; the queue delivers nothing past it.",
        Kind::Gauge,
    );
    for queue in &queues {
        if let Some(unreadable) = queue.unreadable() {
            let offset = unreadable.offset.to_string();
            text.sample(
                "sluice_queue_unreadable_message",
                &[
                    ("vhost", queue.vhost()),
                    ("queue", queue.name()),
                    ("file", &unreadable.file),
                    ("offset", &offset),
                ],
                1.0,
            );
        }
    }
}

/// The AMQP listener: connections, channels, traffic and per-method latency.
fn render_amqp(text: &mut TextEncoder, amqp: &sluice_amqp::observe::AmqpMetrics) {
    let simple: [(&str, &str, Kind, f64); 9] = [
        (
            "sluice_amqp_connections",
            "Open AMQP connections.",
            Kind::Gauge,
            amqp.connections_open.get() as f64,
        ),
        (
            "sluice_amqp_connections_total",
            "AMQP connections accepted since start.",
            Kind::Counter,
            amqp.connections_total.get() as f64,
        ),
        (
            "sluice_amqp_channels",
            "Open AMQP channels (refreshed once a second per connection).",
            Kind::Gauge,
            amqp.channels_open.get() as f64,
        ),
        (
            "sluice_amqp_protocol_errors_total",
            "AMQP connections closed for a framing or protocol error.",
            Kind::Counter,
            amqp.protocol_errors.get() as f64,
        ),
        (
            "sluice_amqp_flow_holds_total",
            "Times a publishing AMQP connection stopped being read until a queue's consumers caught up.",
            Kind::Counter,
            amqp.flow_holds.get() as f64,
        ),
        (
            "sluice_amqp_received_bytes_total",
            "Bytes received from AMQP clients.",
            Kind::Counter,
            amqp.bytes_in.get() as f64,
        ),
        (
            "sluice_amqp_sent_bytes_total",
            "Bytes sent to AMQP clients.",
            Kind::Counter,
            amqp.bytes_out.get() as f64,
        ),
        (
            "sluice_amqp_published_total",
            "Messages published by AMQP clients (routed or not).",
            Kind::Counter,
            amqp.published.get() as f64,
        ),
        (
            "sluice_amqp_delivered_total",
            "Messages delivered to AMQP consumers and basic.get.",
            Kind::Counter,
            amqp.delivered.get() as f64,
        ),
    ];
    for (name, help, kind, value) in simple {
        text.family(name, help, kind).sample(name, &[], value);
    }
    text.family(
        "sluice_amqp_method_duration_seconds",
        "Time to handle an AMQP method from a client, by method.",
        Kind::Histogram,
    );
    for (method, histogram) in amqp.method_latencies() {
        if histogram.count() > 0 {
            text.histogram(
                "sluice_amqp_method_duration_seconds",
                &[("method", method)],
                histogram,
            );
        }
    }
}

/// Memory and disk against their watermarks.
fn render_resources(text: &mut TextEncoder, broker: &sluice_broker::Broker) {
    let alarms = *broker.alarms().borrow();
    let config = broker.config();
    text.family(
        "sluice_alarm",
        "1 while a resource alarm is raised and publishers are blocked.",
        Kind::Gauge,
    )
    .sample(
        "sluice_alarm",
        &[("resource", "memory")],
        f64::from(u8::from(alarms.memory)),
    )
    .sample(
        "sluice_alarm",
        &[("resource", "disk")],
        f64::from(u8::from(alarms.disk)),
    );
    if let Some(resident) = sluice_broker::alarms::resident_bytes() {
        text.family(
            "sluice_resident_memory_bytes",
            "Resident memory of the broker process.",
            Kind::Gauge,
        )
        .sample("sluice_resident_memory_bytes", &[], resident as f64);
    }
    if let Some(limit) = config.memory_high_watermark_bytes {
        text.family(
            "sluice_memory_high_watermark_bytes",
            "Resident memory at which publishers are blocked.",
            Kind::Gauge,
        )
        .sample("sluice_memory_high_watermark_bytes", &[], limit as f64);
    }
    if let Some(free) = sluice_broker::alarms::free_disk_bytes(&config.data_dir) {
        text.family(
            "sluice_disk_free_bytes",
            "Free space on the data directory's file system.",
            Kind::Gauge,
        )
        .sample("sluice_disk_free_bytes", &[], free as f64);
    }
    text.family(
        "sluice_disk_free_limit_bytes",
        "Free disk space below which publishers are blocked.",
        Kind::Gauge,
    )
    .sample(
        "sluice_disk_free_limit_bytes",
        &[],
        config.disk_free_limit_bytes as f64,
    );
}
