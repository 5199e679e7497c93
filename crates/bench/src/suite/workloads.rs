//! The suite's workloads: the modes, how big everything is in each, and the AMQP and Kafka
//! workloads in the order they run.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::amqp::{AmqpOptions, ClientChoice, ExchangeChoice};
use crate::kafka::{ConsumerClient, KafkaOptions};
use crate::limits::LimitsOptions;
use crate::load::LoadOptions;
use crate::storage::StorageOptions;

/// Id of the Kafka workload whose send rate sets the load of the latency workload when the
/// end-to-end peak was not measured.
pub(super) const KAFKA_PEAK_ID: &str = "kafka-produce-100b-acks1";
/// Id of the Kafka workload whose drain rate caps that load then.
pub(super) const KAFKA_CONSUME_PEAK_ID: &str = "kafka-consume-backlog";
/// Id of the Kafka workload that produces and consumes together as fast as it can: its rate
/// is the peak the latency workload offers half of.
pub(super) const KAFKA_TOGETHER_PEAK_ID: &str = "kafka-end-to-end-peak";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

/// How big everything is in a mode.
#[derive(Debug, Clone)]
pub(super) struct Scale {
    duration_s: f64,
    /// Rounds of the paired fio / fsync=never measurement per configuration (the median
    /// round is reported).
    pub(super) pair_rounds: usize,
    amqp_backlog_count: u64,
    kafka_backlog_count: u64,
    /// Seconds a backlog may take to fill, and the whole backlog workload.
    backlog_send_cap_s: f64,
    backlog_run_cap_s: f64,
    drain_timeout_s: f64,
    pub(super) storage: StorageOptions,
    pub(super) limits: LimitsOptions,
}

impl Scale {
    pub(super) fn new(mode: Mode, scratch: &Path, duration_s: Option<f64>) -> Self {
        let storage = |append_duration_s: f64, bytes: u64, reopen: u64| StorageOptions {
            dir: Some(scratch.to_owned()),
            append_duration_s,
            append_bytes_max: bytes,
            reopen_log_bytes: reopen,
            ..StorageOptions::default()
        };
        let limits = |bytes: u64, seconds: u64| LimitsOptions {
            dir: Some(scratch.to_owned()),
            write_bytes: bytes,
            seconds,
            ..LimitsOptions::default()
        };
        let mut scale = match mode {
            Mode::Full => Self {
                duration_s: 10.0,
                pair_rounds: 3,
                amqp_backlog_count: 5_000_000,
                kafka_backlog_count: 10_000_000,
                backlog_send_cap_s: 200.0,
                backlog_run_cap_s: 380.0,
                drain_timeout_s: 30.0,
                // 1 GiB per append run (and fio run beside it) keeps the paired rounds
                // within the full run's budget; the reopen log stays at the target's 2 GiB.
                storage: storage(3.0, 1 << 30, 2 << 30),
                limits: limits(1 << 30, 10),
            },
            Mode::Quick => Self {
                duration_s: 4.0,
                pair_rounds: 1,
                amqp_backlog_count: 200_000,
                kafka_backlog_count: 500_000,
                backlog_send_cap_s: 40.0,
                backlog_run_cap_s: 70.0,
                drain_timeout_s: 15.0,
                storage: storage(1.0, 256 << 20, 256 << 20),
                limits: limits(256 << 20, 3),
            },
            Mode::Smoke => Self {
                duration_s: 1.0,
                pair_rounds: 1,
                amqp_backlog_count: 5_000,
                kafka_backlog_count: 10_000,
                backlog_send_cap_s: 30.0,
                backlog_run_cap_s: 60.0,
                drain_timeout_s: 10.0,
                storage: StorageOptions {
                    appenders: vec![1, 8],
                    ..storage(0.2, 8 << 20, 16 << 20)
                },
                limits: limits(16 << 20, 1),
            },
        };
        if let Some(duration_s) = duration_s {
            scale.duration_s = duration_s;
        }
        scale
    }

    fn timed(&self) -> LoadOptions {
        LoadOptions {
            duration_s: self.duration_s,
            drain_timeout_s: self.drain_timeout_s,
            ..LoadOptions::default()
        }
    }

    /// A backlog of `count` messages, with time caps on filling it and on the whole run so
    /// that a slow broker cannot stretch the suite past its budget.
    fn backlog(&self, count: u64) -> LoadOptions {
        LoadOptions {
            count: Some(count),
            backlog: true,
            drain_timeout_s: self.drain_timeout_s,
            send_timeout_s: Some(self.backlog_send_cap_s),
            run_timeout_s: self.backlog_run_cap_s,
            ..LoadOptions::default()
        }
    }
}

/// One AMQP workload: the same options go to every broker, with its URI filled in.
#[derive(Debug, Clone)]
pub struct AmqpWorkload {
    pub id: &'static str,
    pub title: &'static str,
    pub options: AmqpOptions,
}

/// One Kafka workload. With `half_of_peak` the target rate is set at run time to half the
/// end-to-end peak measured before it (`kafka-end-to-end-peak`).
#[derive(Debug, Clone)]
pub struct KafkaWorkload {
    pub id: &'static str,
    pub title: &'static str,
    pub options: KafkaOptions,
    pub half_of_peak: bool,
}

pub(super) fn amqp_workloads(scale: &Scale) -> Vec<AmqpWorkload> {
    let transient = |body_bytes| AmqpOptions {
        body_bytes,
        load: scale.timed(),
        ..AmqpOptions::default()
    };
    let persistent = |body_bytes| AmqpOptions {
        body_bytes,
        persistent: true,
        durable: true,
        confirm: true,
        confirm_window: 256,
        manual_ack: true,
        load: scale.timed(),
        ..AmqpOptions::default()
    };
    vec![
        AmqpWorkload {
            id: "amqp-16b-transient",
            title: "AMQP 1→1, 16 B, transient, auto-ack",
            options: transient(16),
        },
        AmqpWorkload {
            id: "amqp-1k-transient",
            title: "AMQP 1→1, 1 KiB, transient, auto-ack",
            options: transient(1024),
        },
        AmqpWorkload {
            id: "amqp-16b-persistent",
            title: "AMQP 1→1, 16 B, persistent, confirms, manual ack",
            options: persistent(16),
        },
        AmqpWorkload {
            id: "amqp-1k-persistent",
            title: "AMQP 1→1, 1 KiB, persistent, confirms, manual ack",
            options: persistent(1024),
        },
        // The same two 16 B workloads through the tool's lean client: lapin takes most of the
        // two CPUs in the ones above, so these show more of what the brokers themselves do.
        AmqpWorkload {
            id: "amqp-16b-transient-raw",
            title: "AMQP 1→1, 16 B, transient, auto-ack, lean client",
            options: AmqpOptions {
                client: ClientChoice::Raw,
                ..transient(16)
            },
        },
        AmqpWorkload {
            id: "amqp-16b-persistent-raw",
            title: "AMQP 1→1, 16 B, persistent, confirms, manual ack, lean client",
            options: AmqpOptions {
                client: ClientChoice::Raw,
                ..persistent(16)
            },
        },
        AmqpWorkload {
            id: "amqp-fanout4",
            title: "AMQP fan-out 1→4 queues, 1 KiB, transient",
            options: AmqpOptions {
                exchange: ExchangeChoice::Fanout,
                queue_count: 4,
                ..transient(1024)
            },
        },
        AmqpWorkload {
            id: "amqp-backlog",
            title: "AMQP backlog: publish, then drain, 100 B",
            options: AmqpOptions {
                body_bytes: 100,
                // Four publishers fill the backlog in a time the full run can afford; one
                // consumer drains it, so the drain rate is one queue's.
                producers: 4,
                confirm: true,
                confirm_window: 512,
                load: scale.backlog(scale.amqp_backlog_count),
                ..AmqpOptions::default()
            },
        },
    ]
}

pub(super) fn kafka_workloads(scale: &Scale) -> Vec<KafkaWorkload> {
    let produce = |record_bytes, acks: &str| KafkaOptions {
        record_bytes,
        acks: acks.into(),
        consumers: 0,
        load: scale.timed(),
        ..KafkaOptions::default()
    };
    let consume_backlog = KafkaOptions {
        record_bytes: 100,
        load: scale.backlog(scale.kafka_backlog_count),
        ..KafkaOptions::default()
    };
    vec![
        KafkaWorkload {
            id: KAFKA_PEAK_ID,
            title: "Kafka produce, 100 B, acks=1",
            options: produce(100, "1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-100b-acks-all",
            title: "Kafka produce, 100 B, acks=-1",
            options: produce(100, "-1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-1k-acks1",
            title: "Kafka produce, 1 KiB, acks=1",
            options: produce(1024, "1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-1k-acks-all",
            title: "Kafka produce, 1 KiB, acks=-1",
            options: produce(1024, "-1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-produce-16k-acks1",
            title: "Kafka produce, 16 KiB, acks=1",
            options: produce(16 * 1024, "1"),
            half_of_peak: false,
        },
        KafkaWorkload {
            id: KAFKA_CONSUME_PEAK_ID,
            title: "Kafka consume from a backlog, 100 B",
            options: consume_backlog.clone(),
            half_of_peak: false,
        },
        // The same drain through the tool's lean consumer: librdkafka's takes most of the two
        // CPUs in the one above, so this shows more of what the broker itself serves.
        KafkaWorkload {
            id: "kafka-consume-backlog-raw",
            title: "Kafka consume from a backlog, 100 B, lean client",
            options: KafkaOptions {
                client: ConsumerClient::Raw,
                ..consume_backlog
            },
            half_of_peak: false,
        },
        // One producer and one consumer at once, unthrottled: what the two together sustain,
        // which is less than either alone when they share two CPUs with the broker.
        KafkaWorkload {
            id: KAFKA_TOGETHER_PEAK_ID,
            title: "Kafka produce and consume at once, 100 B, acks=1",
            options: KafkaOptions {
                record_bytes: 100,
                load: scale.timed(),
                ..KafkaOptions::default()
            },
            half_of_peak: false,
        },
        KafkaWorkload {
            id: "kafka-latency-half-peak",
            title: "Kafka end-to-end latency at half of peak, 100 B, acks=1",
            // Runs after the workloads above: its rate is half of what the one before it
            // sustained.
            options: KafkaOptions {
                record_bytes: 100,
                load: scale.timed(),
                ..KafkaOptions::default()
            },
            half_of_peak: true,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_the_issues_workloads() {
        let scale = Scale::new(Mode::Full, Path::new("/tmp"), None);
        let amqp: Vec<_> = amqp_workloads(&scale).into_iter().map(|w| w.id).collect();
        let kafka: Vec<_> = kafka_workloads(&scale).into_iter().map(|w| w.id).collect();
        for id in [
            "amqp-16b-transient",
            "amqp-1k-persistent",
            "amqp-fanout4",
            "amqp-backlog",
        ] {
            assert!(amqp.contains(&id), "{id}");
        }
        for id in [
            "kafka-produce-1k-acks-all",
            "kafka-produce-16k-acks1",
            "kafka-consume-backlog",
            "kafka-consume-backlog-raw",
            "kafka-end-to-end-peak",
            "kafka-latency-half-peak",
        ] {
            assert!(kafka.contains(&id), "{id}");
        }
        let position = |id: &str| kafka.iter().position(|k| *k == id).unwrap();
        assert!(
            position(KAFKA_TOGETHER_PEAK_ID) < position("kafka-latency-half-peak"),
            "the latency run takes its rate from the peak measured before it"
        );
        let backlog = amqp_workloads(&scale)
            .into_iter()
            .find(|w| w.id == "amqp-backlog")
            .unwrap();
        assert_eq!(backlog.options.load.count, Some(5_000_000));
        for id in ["kafka-consume-backlog", "kafka-consume-backlog-raw"] {
            let consume = kafka_workloads(&scale)
                .into_iter()
                .find(|w| w.id == id)
                .unwrap();
            assert_eq!(consume.options.load.count, Some(10_000_000), "{id}");
            assert!(consume.options.load.backlog, "{id}");
        }
        for workload in amqp_workloads(&scale) {
            workload.options.validate().unwrap();
        }
        for workload in kafka_workloads(&scale) {
            workload.options.validate().unwrap();
        }
    }
}
