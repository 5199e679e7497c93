//! `/metrics`: everything an operator graphs, in the Prometheus text format.
//!
//! Values are read at scrape time from where they live (partition counters, the group
//! coordinator, the front-ends' histograms); nothing here keeps a second copy.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
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
            for partition in &topic.partitions {
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

    text.family(
        "sluice_fsync_duration_seconds",
        "Duration of fsync rounds (one round may cover many appends).",
        Kind::Histogram,
    )
    .histogram("sluice_fsync_duration_seconds", &[], broker.fsync_latency());

    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text.finish(),
    )
}
