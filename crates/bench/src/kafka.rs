//! Kafka workloads: producers through librdkafka, consumers through librdkafka or this tool's
//! lean consumer (`--client raw`, [`crate::kafka_raw`]), against any Kafka-protocol broker.
//!
//! Each producer and each consumer is its own client on its own OS thread, as an application
//! would run them; nothing is shared between them but the [`Meter`]. A producer stamps each
//! record's value (see [`crate::payload`]) just before handing it to librdkafka and counts it
//! as sent when the delivery report says the broker took it. Consumers either assign partitions
//! to themselves (the default: no group coordinator involved) or join consumer groups
//! (`--group-id`, librdkafka only); either way every group reads every record.
//!
//! Bounds: librdkafka's own producer queue (`queue.buffering.max.messages`, default 100 000)
//! limits what is in flight; a producer that finds it full waits a millisecond and retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::kafka_raw::{self, StartOffset};
use crate::load::{LoadOptions, Pacer, Quota, fresh_name};
use crate::meter::{Latency, Meter, ProgressLength, ProgressPlan, Sampler};
use crate::net;
use crate::payload;
use crate::report::{LatencySummary, RunReport, Throughput, unix_ms_now};

/// How long topic creation and metadata may take before the run gives up.
const METADATA_TIMEOUT: Duration = Duration::from_secs(15);
/// How long consumers may take to get their partitions before producers start anyway.
const CONSUMER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a producer waits for its last deliveries at the end.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Which client consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConsumerClient {
    /// librdkafka, as applications use it.
    #[default]
    Librdkafka,
    /// This tool's own lean consumer ([`crate::kafka_raw`]): fetches written and read
    /// directly, the next one in flight while the last is read.
    Raw,
}

#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct KafkaOptions {
    /// Bootstrap servers, comma separated.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub bootstrap: String,

    /// Topic to use. Without it a fresh topic is named and created for the run.
    #[arg(long)]
    pub topic: Option<String>,

    /// Partitions of the topic the run creates.
    #[arg(long, default_value_t = 1)]
    pub partitions: i32,

    /// Use the topic as it is instead of creating it.
    #[arg(long)]
    pub no_create_topic: bool,

    /// Bytes in each record's value (at least 16: send time and sequence number).
    #[arg(long, default_value_t = 100)]
    pub record_bytes: usize,

    /// Give each record an 8-byte key; records then spread over partitions by key hash.
    #[arg(long)]
    pub keys: bool,

    /// Producer acks: 0, 1, or -1 (also spelled `all`).
    #[arg(long, default_value = "1", allow_hyphen_values = true)]
    pub acks: String,

    /// Producer compression: none, gzip, snappy or lz4.
    #[arg(long, default_value = "none")]
    pub compression: String,

    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,

    /// Largest producer batch per partition, in bytes (librdkafka `batch.size`).
    #[arg(long, default_value_t = 1_000_000)]
    pub batch_bytes: usize,

    #[arg(long, default_value_t = 1)]
    pub producers: usize,

    /// Consumers in each consumer group (0: produce only).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,

    /// Consumer groups; each one reads every record.
    #[arg(long, default_value_t = 1)]
    pub consumer_groups: usize,

    /// Join consumer groups named `<id>-<n>` (subscribe, partitions assigned by the group
    /// coordinator). Without it consumers assign partitions to themselves.
    #[arg(long)]
    pub group_id: Option<String>,

    /// Extra librdkafka settings for producers and consumers, as `key=value`.
    #[arg(long = "librdkafka", value_name = "KEY=VALUE")]
    pub extra: Vec<String>,

    /// The client of the consumers (producers always use librdkafka).
    #[arg(long, value_enum, default_value_t = ConsumerClient::Librdkafka)]
    #[serde(default)]
    pub client: ConsumerClient,

    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadOptions,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            bootstrap: "127.0.0.1:9092".into(),
            topic: None,
            partitions: 1,
            no_create_topic: false,
            record_bytes: 100,
            keys: false,
            acks: "1".into(),
            compression: "none".into(),
            linger_ms: 5,
            batch_bytes: 1_000_000,
            producers: 1,
            consumers: 1,
            consumer_groups: 1,
            group_id: None,
            extra: Vec::new(),
            client: ConsumerClient::Librdkafka,
            load: LoadOptions::default(),
        }
    }
}

impl KafkaOptions {
    pub fn validate(&self) -> Result<(), BenchError> {
        self.load.validate(self.producers, self.consumers)?;
        payload::template(self.record_bytes)?;
        if self.partitions < 1 {
            return Err(BenchError::Config("--partitions must be at least 1".into()));
        }
        if self.consumers > 0 && self.consumer_groups == 0 {
            return Err(BenchError::Config(
                "--consumer-groups must be at least 1".into(),
            ));
        }
        if self.client == ConsumerClient::Raw && self.group_id.is_some() {
            return Err(BenchError::Config(
                "--client raw cannot join consumer groups: its consumers assign partitions \
                 themselves; leave out --group-id"
                    .into(),
            ));
        }
        self.acks_setting()?;
        if !["none", "gzip", "snappy", "lz4"].contains(&self.compression.as_str()) {
            return Err(BenchError::Config(format!(
                "--compression must be none, gzip, snappy or lz4, got {:?}",
                self.compression
            )));
        }
        self.extra_settings()?;
        Ok(())
    }

    fn acks_setting(&self) -> Result<&'static str, BenchError> {
        match self.acks.as_str() {
            "0" => Ok("0"),
            "1" => Ok("1"),
            "-1" | "all" => Ok("-1"),
            other => Err(BenchError::Config(format!(
                "--acks must be 0, 1, -1 or all, got {other:?}"
            ))),
        }
    }

    fn extra_settings(&self) -> Result<Vec<(&str, &str)>, BenchError> {
        self.extra
            .iter()
            .map(|pair| {
                pair.split_once('=').ok_or_else(|| {
                    BenchError::Config(format!("--librdkafka wants key=value, got {pair:?}"))
                })
            })
            .collect()
    }

    fn copies_per_record(&self) -> u64 {
        if self.consumers == 0 {
            0
        } else {
            self.consumer_groups as u64
        }
    }

    fn base_config(&self, client_id: &str) -> Result<ClientConfig, BenchError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", client_id);
        for (key, value) in self.extra_settings()? {
            config.set(key, value);
        }
        Ok(config)
    }

    fn producer_config(&self, index: usize) -> Result<ClientConfig, BenchError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", format!("sluice-bench-producer-{index}"))
            .set("acks", self.acks_setting()?)
            .set("compression.type", &self.compression)
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_bytes.to_string());
        for (key, value) in self.extra_settings()? {
            config.set(key, value);
        }
        Ok(config)
    }

    fn consumer_config(&self, group: usize, index: usize) -> Result<ClientConfig, BenchError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set(
                "client.id",
                format!("sluice-bench-consumer-{group}-{index}"),
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Whenever its local queue holds `queued.min.messages` (100,000 by default),
            // librdkafka stops fetching for `fetch.queue.backoff.ms`: 1,000 ms by default,
            // while this consumer drains 100,000 records in under 100 ms. With the default,
            // a backlog drained at 345k-443k records/s on the development machine; with 10 ms,
            // at 1.1-1.6M/s.
            .set("fetch.queue.backoff.ms", "10");
        match &self.group_id {
            Some(group_id) => config.set("group.id", format!("{group_id}-{group}")),
            // librdkafka refuses to assign partitions to a consumer without a group id, even
            // one that never joins the group; a fresh id keeps runs apart.
            None => config.set("group.id", fresh_name("sluice-bench-assign")),
        };
        for (key, value) in self.extra_settings()? {
            config.set(key, value);
        }
        Ok(config)
    }
}

/// Runs one Kafka workload and reports what it measured.
pub async fn run(options: &KafkaOptions, name: &str, quiet: bool) -> Result<RunReport, BenchError> {
    options.validate()?;
    net::probe(&options.bootstrap).await?;
    let topic = options
        .topic
        .clone()
        .unwrap_or_else(|| fresh_name("sluice-bench"));
    if options.producers > 0 && !options.no_create_topic {
        create_topic(options, &topic).await?;
    }
    let options = options.clone();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || run_clients(&options, &topic, &name, quiet))
        .await
        .map_err(|error| BenchError::Task(format!("kafka run: {error}")))?
}

async fn create_topic(options: &KafkaOptions, topic: &str) -> Result<(), BenchError> {
    let admin: AdminClient<DefaultClientContext> = options
        .base_config("sluice-bench-admin")?
        .create()
        .map_err(|error| BenchError::kafka("creating the admin client", error))?;
    let new_topic = NewTopic::new(topic, options.partitions, TopicReplication::Fixed(1));
    let admin_options = AdminOptions::new()
        .operation_timeout(Some(METADATA_TIMEOUT))
        .request_timeout(Some(METADATA_TIMEOUT));
    let results = admin
        .create_topics([&new_topic], &admin_options)
        .await
        .map_err(|error| BenchError::kafka(format!("creating topic {topic}"), error))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(BenchError::kafka(
                    format!("creating topic {name} (pass --no-create-topic to use it as is)"),
                    KafkaError::AdminOp(code),
                ));
            }
        }
    }
    Ok(())
}

/// A client context that counts librdkafka's errors and delivery reports into the meter.
struct MeterContext {
    meter: Arc<Meter>,
}

impl ClientContext for MeterContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.meter.error(format!("librdkafka: {error}: {reason}"));
    }
}

impl ProducerContext for MeterContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(message) => self.meter.sent(message.payload_len()),
            Err((error, _)) => self.meter.error(format!("delivery failed: {error}")),
        }
    }
}

impl ConsumerContext for MeterContext {}

fn run_clients(
    options: &KafkaOptions,
    topic: &str,
    name: &str,
    quiet: bool,
) -> Result<RunReport, BenchError> {
    let partition_count = partition_count(options, topic)?;
    let meter = Meter::new();
    let started_unix_ms = unix_ms_now();
    let run_deadline = Instant::now() + options.load.run_timeout();
    let plan = ProgressPlan {
        title: name.to_owned(),
        length: match (options.load.count, options.producers) {
            (Some(count), _) => ProgressLength::Messages(count),
            (None, _) => ProgressLength::Seconds(options.load.duration_s),
        },
        quiet,
    };
    let sampler = Sampler::start(Arc::clone(&meter), options.load.broker_pid, plan)?;

    let mut consumers = Vec::new();
    if !options.load.backlog {
        consumers = start_consumers(options, topic, partition_count, &meter)?;
    }
    let send_started = Instant::now();
    let producers = (0..options.producers)
        .map(|index| {
            let quota = Quota::for_producer(&options.load, send_started, options.producers, index);
            spawn_producer(options, topic, index, quota, &meter)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let producer_results = join_all(producers, &meter, run_deadline, Meter::stop_producers);
    let send_elapsed = send_started.elapsed();
    let sent = meter.totals();

    let expected_receive_count = match options.load.count {
        Some(count) if options.producers == 0 => count * options.copies_per_record(),
        _ => sent.sent_count * options.copies_per_record(),
    };
    if options.load.backlog {
        meter.set_draining();
        consumers = start_consumers(options, topic, partition_count, &meter)?;
    }
    if !consumers.is_empty() {
        crate::meter::wait_for_drain(
            &meter,
            expected_receive_count,
            options.load.drain_timeout(),
            run_deadline,
        );
    }
    meter.stop_consumers();
    let mut latency = Latency::new()?;
    for result in join_all(consumers, &meter, run_deadline, Meter::stop_consumers) {
        match result {
            Ok(one) => latency.merge(&one)?,
            Err(error) => meter.error(error.chain()),
        }
    }
    for result in producer_results {
        if let Err(error) = result {
            meter.error(error.chain());
        }
    }
    let sampled = sampler.finish()?;
    let totals = meter.totals();
    let receive = meter.receive_window_ns().map(|(first, last)| {
        Throughput::new(
            totals.received_count,
            totals.received_bytes,
            (last - first) as f64 / 1e9,
        )
    });
    let mut report = RunReport {
        name: name.to_owned(),
        protocol: "kafka".into(),
        target: options.bootstrap.clone(),
        settings: settings_json(options, topic),
        started_unix_ms,
        send: (options.producers > 0)
            .then(|| Throughput::new(sent.sent_count, sent.sent_bytes, send_elapsed.as_secs_f64())),
        receive: if options.consumers > 0 {
            receive.or(Some(Throughput::new(0, 0, 0.0)))
        } else {
            None
        },
        expected_receive_count,
        latency: LatencySummary::from_latency(&latency),
        error_count: totals.error_count,
        errors: meter.error_samples(),
        broker_rss: sampled.rss,
        timeline: sampled.timeline,
        notes: Vec::new(),
    };
    report.notes = crate::report::cap_notes(&options.load, options.producers, &report);
    Ok(report)
}

fn settings_json(options: &KafkaOptions, topic: &str) -> serde_json::Value {
    let mut value = serde_json::to_value(options).unwrap_or(serde_json::Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("topic".into(), topic.into());
    }
    value
}

/// The number of partitions of `topic`, waiting for a freshly created topic to show up in
/// the metadata.
fn partition_count(options: &KafkaOptions, topic: &str) -> Result<i32, BenchError> {
    let consumer: BaseConsumer = options
        .base_config("sluice-bench-metadata")?
        .create()
        .map_err(|error| BenchError::kafka("creating the metadata client", error))?;
    let deadline = Instant::now() + METADATA_TIMEOUT;
    loop {
        let outcome = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        let last = match outcome {
            Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == topic) {
                Some(found) if found.error().is_none() && !found.partitions().is_empty() => {
                    return Ok(found.partitions().len() as i32);
                }
                Some(found) => format!(
                    "topic {topic} is not ready: {:?}",
                    found.error().map(RDKafkaErrorCode::from)
                ),
                None => format!("topic {topic} is missing from the metadata"),
            },
            Err(error) => {
                if Instant::now() >= deadline {
                    return Err(BenchError::kafka(
                        format!("fetching metadata from {}", options.bootstrap),
                        error,
                    ));
                }
                error.to_string()
            }
        };
        if Instant::now() >= deadline {
            return Err(BenchError::Invalid(last));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn spawn_producer(
    options: &KafkaOptions,
    topic: &str,
    index: usize,
    quota: Quota,
    meter: &Arc<Meter>,
) -> Result<JoinHandle<Result<(), BenchError>>, BenchError> {
    let producer: ThreadedProducer<MeterContext> = options
        .producer_config(index)?
        .create_with_context(MeterContext {
            meter: Arc::clone(meter),
        })
        .map_err(|error| BenchError::kafka("creating a producer", error))?;
    let template = payload::template(options.record_bytes)?;
    let topic = topic.to_owned();
    let keys = options.keys;
    let rate = options.load.rate_per_producer(options.producers);
    let meter = Arc::clone(meter);
    std::thread::Builder::new()
        .name(format!("kafka-producer-{index}"))
        .spawn(move || {
            produce(
                &producer, &topic, keys, index, template, quota, rate, &meter,
            )
        })
        .map_err(|error| BenchError::Task(format!("cannot start a producer thread: {error}")))
}

#[allow(clippy::too_many_arguments)]
fn produce(
    producer: &ThreadedProducer<MeterContext>,
    topic: &str,
    keys: bool,
    index: usize,
    mut payload_bytes: Vec<u8>,
    quota: Quota,
    rate: Option<f64>,
    meter: &Meter,
) -> Result<(), BenchError> {
    let mut pacer = Pacer::new(rate);
    let key_base = (index as u64) << 48;
    let mut sequence = 0u64;
    'sending: while !quota.done(sequence) && !meter.producers_stopped() {
        let delay = pacer.next_delay();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        payload::stamp(&mut payload_bytes, sequence);
        let key = (key_base | sequence).to_be_bytes();
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(topic).payload(&payload_bytes[..]);
            if keys {
                record = record.key(&key[..]);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The client's queue is full: the broker is the bottleneck. Wait for
                    // deliveries to free room rather than count an error.
                    if meter.producers_stopped() {
                        break 'sending;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => {
                    meter.error(format!("produce: {error}"));
                    break;
                }
            }
        }
        sequence += 1;
    }
    producer
        .flush(FLUSH_TIMEOUT)
        .map_err(|error| BenchError::kafka("flushing the producer", error))
}

/// Where consumers that assign partitions themselves start reading.
fn start_offset(options: &KafkaOptions) -> StartOffset {
    // A topic named for this run starts empty: consumers that assign themselves its
    // partitions fetch from offset 0 at once, where `Offset::Beginning` would first ask the
    // group coordinator for a committed offset and then the leader for the earliest one,
    // a few hundred milliseconds in which the producers already send and the first records'
    // latency grows.
    if options.topic.is_none() {
        StartOffset::At(0)
    } else {
        StartOffset::Earliest
    }
}

fn start_consumers(
    options: &KafkaOptions,
    topic: &str,
    partition_count: i32,
    meter: &Arc<Meter>,
) -> Result<Vec<JoinHandle<Result<Latency, BenchError>>>, BenchError> {
    let ready = Arc::new(AtomicUsize::new(0));
    let start = start_offset(options);
    let mut handles = Vec::new();
    for group in 0..options.consumer_groups {
        for index in 0..options.consumers {
            let handle = match options.client {
                ConsumerClient::Raw => kafka_raw::spawn(
                    kafka_raw::ConsumerPlan {
                        bootstrap: options.bootstrap.clone(),
                        topic: topic.to_owned(),
                        consumer_index: index,
                        consumer_count: options.consumers,
                        start,
                        client_id: format!("sluice-bench-raw-consumer-{group}-{index}"),
                    },
                    Arc::clone(&ready),
                    Arc::clone(meter),
                )?,
                ConsumerClient::Librdkafka => spawn_consumer(
                    options,
                    topic,
                    partition_count,
                    (group, index),
                    start,
                    &ready,
                    meter,
                )?,
            };
            handles.push(handle);
        }
    }
    // Producers start only once every consumer has its partitions, so the first records are
    // not timed while a group is still forming.
    let deadline = Instant::now() + CONSUMER_READY_TIMEOUT;
    while ready.load(Ordering::Acquire) < handles.len()
        && Instant::now() < deadline
        && !handles.iter().any(JoinHandle::is_finished)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(handles)
}

/// Starts librdkafka consumer `index` of group `group` on its own thread.
fn spawn_consumer(
    options: &KafkaOptions,
    topic: &str,
    partition_count: i32,
    (group, index): (usize, usize),
    start: StartOffset,
    ready: &Arc<AtomicUsize>,
    meter: &Arc<Meter>,
) -> Result<JoinHandle<Result<Latency, BenchError>>, BenchError> {
    let consumer: BaseConsumer<MeterContext> = options
        .consumer_config(group, index)?
        .create_with_context(MeterContext {
            meter: Arc::clone(meter),
        })
        .map_err(|error| BenchError::kafka("creating a consumer", error))?;
    if options.group_id.is_some() {
        consumer
            .subscribe(&[topic])
            .map_err(|error| BenchError::kafka(format!("subscribing to {topic}"), error))?;
    } else {
        let offset = match start {
            StartOffset::At(offset) => Offset::Offset(offset),
            StartOffset::Earliest => Offset::Beginning,
        };
        let mut assignment = TopicPartitionList::new();
        for partition in (0..partition_count).filter(|p| *p as usize % options.consumers == index) {
            assignment
                .add_partition_offset(topic, partition, offset)
                .map_err(|error| BenchError::kafka("building an assignment", error))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|error| BenchError::kafka(format!("assigning {topic}"), error))?;
    }
    let meter = Arc::clone(meter);
    let ready = Arc::clone(ready);
    let subscribed = options.group_id.is_some();
    std::thread::Builder::new()
        .name(format!("kafka-consumer-{group}-{index}"))
        .spawn(move || consume(&consumer, subscribed, &ready, &meter))
        .map_err(|error| BenchError::Task(format!("cannot start a consumer thread: {error}")))
}

fn consume(
    consumer: &BaseConsumer<MeterContext>,
    subscribed: bool,
    ready: &AtomicUsize,
    meter: &Meter,
) -> Result<Latency, BenchError> {
    let mut latency = Latency::new()?;
    let mut is_ready = !subscribed;
    if is_ready {
        ready.fetch_add(1, Ordering::Release);
    }
    let ready_deadline = Instant::now() + CONSUMER_READY_TIMEOUT;
    while !meter.consumers_stopped() {
        match consumer.poll(POLL_INTERVAL) {
            Some(Ok(message)) => {
                let now_ns = payload::now_ns();
                let body = message.payload().unwrap_or_default();
                latency.record(body, now_ns);
                meter.received(body.len(), now_ns);
            }
            Some(Err(error)) => meter.error(format!("consume: {error}")),
            None => {}
        }
        if !is_ready {
            let assigned = consumer
                .assignment()
                .is_ok_and(|assignment| assignment.count() > 0);
            if assigned || Instant::now() >= ready_deadline {
                is_ready = true;
                ready.fetch_add(1, Ordering::Release);
            }
        }
    }
    if !is_ready {
        ready.fetch_add(1, Ordering::Release);
    }
    Ok(latency)
}

/// Joins client threads, telling them to stop if the run's deadline passes first.
fn join_all<T>(
    handles: Vec<JoinHandle<Result<T, BenchError>>>,
    meter: &Meter,
    run_deadline: Instant,
    stop: fn(&Meter),
) -> Vec<Result<T, BenchError>> {
    while handles.iter().any(|handle| !handle.is_finished()) {
        if Instant::now() >= run_deadline {
            stop(meter);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    handles
        .into_iter()
        .map(|handle| {
            handle
                .join()
                .map_err(|_| BenchError::Task("a kafka client thread panicked".into()))
                .and_then(|result| result)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_accept_every_spelling() {
        for (given, setting) in [("0", "0"), ("1", "1"), ("-1", "-1"), ("all", "-1")] {
            let options = KafkaOptions {
                acks: given.into(),
                ..KafkaOptions::default()
            };
            assert_eq!(options.acks_setting().unwrap(), setting);
        }
        let options = KafkaOptions {
            acks: "2".into(),
            ..KafkaOptions::default()
        };
        assert!(options.validate().is_err());
    }

    #[test]
    fn extra_settings_must_be_pairs() {
        let options = KafkaOptions {
            extra: vec!["fetch.wait.max.ms=10".into(), "nonsense".into()],
            ..KafkaOptions::default()
        };
        assert!(options.validate().is_err());
    }

    #[test]
    fn the_lean_consumer_joins_no_group() {
        let options = KafkaOptions {
            client: ConsumerClient::Raw,
            consumers: 2,
            ..KafkaOptions::default()
        };
        options.validate().unwrap();
        let options = KafkaOptions {
            group_id: Some("g".into()),
            ..options
        };
        let error = options.validate().unwrap_err();
        assert!(error.to_string().contains("--group-id"), "{error}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let options = KafkaOptions {
            bootstrap: address.clone(),
            load: LoadOptions {
                duration_s: 0.1,
                ..LoadOptions::default()
            },
            ..KafkaOptions::default()
        };
        let error = run(&options, "test", true).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("nothing listens on {address}")),
            "{error}"
        );
    }
}
