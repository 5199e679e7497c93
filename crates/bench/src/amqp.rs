//! AMQP 0-9-1 workloads: publishers and consumers through lapin, or through this tool's lean
//! client (`--client raw`, [`crate::amqp_raw`]), against any AMQP 0-9-1 broker.
//!
//! Each publisher and each consumer has its own connection and channel, as separate
//! applications would. A publisher stamps each body (see [`crate::payload`]) just before
//! `basic.publish`; with publisher confirms it keeps at most `--confirm-window` messages
//! unconfirmed and counts a message as sent when the broker acks it, otherwise when lapin has
//! taken it for the socket. Consumers read with the given prefetch and either auto-ack or ack
//! each delivery.
//!
//! Topology: `--queue-count` queues named `<prefix>-<n>`. With the default exchange or a
//! direct or topic exchange each message goes to one queue (publishers rotate through them);
//! with a fanout exchange every queue gets a copy. Queues and the exchange are deleted after
//! the run unless `--keep-queues` is given.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPClass, basic};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::amqp_raw::{self, RawConnection};
use crate::error::BenchError;
use crate::load::{LoadOptions, Pacer, Quota, fresh_name};
use crate::meter::{Latency, Meter, ProgressLength, ProgressPlan, Sampler, wait_for_drain_async};
use crate::net;
use crate::payload;
use crate::report::{LatencySummary, RunReport, Throughput, unix_ms_now};

const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// AMQP's delivery mode for messages the broker must write to disk.
const DELIVERY_MODE_PERSISTENT: u8 = 2;
/// The largest publisher confirm window: what one channel may have unconfirmed.
pub const CONFIRM_WINDOW_MAX: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ExchangeChoice {
    /// The nameless default exchange: the routing key is the queue name.
    #[default]
    Default,
    Direct,
    Fanout,
    Topic,
}

/// Which client publishes and consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientChoice {
    /// lapin, a full AMQP client library.
    #[default]
    Lapin,
    /// This tool's own lean client ([`crate::amqp_raw`]): frames written and read directly,
    /// many per system call.
    Raw,
}

#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct AmqpOptions {
    /// Broker URI, with credentials and the URL-encoded virtual host.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,

    /// The exchange messages are published to.
    #[arg(long, value_enum, default_value_t = ExchangeChoice::Default)]
    pub exchange: ExchangeChoice,

    /// Queues to declare; with a fanout exchange each gets a copy of every message.
    #[arg(long, default_value_t = 1)]
    pub queue_count: usize,

    /// Name prefix of the queues and exchange. Without it fresh names are made for the run.
    #[arg(long)]
    pub queue_prefix: Option<String>,

    /// Bytes in each message body (at least 16: send time and sequence number).
    #[arg(long, default_value_t = 16)]
    pub body_bytes: usize,

    /// Publish with delivery mode 2 (persistent).
    #[arg(long)]
    pub persistent: bool,

    /// Declare durable queues and exchange.
    #[arg(long)]
    pub durable: bool,

    /// Use publisher confirms; a message counts as sent once the broker acks it.
    #[arg(long)]
    pub confirm: bool,

    /// Most messages one publisher may have unconfirmed.
    #[arg(long, default_value_t = 256)]
    pub confirm_window: usize,

    /// Consumers ack each delivery instead of using auto-ack.
    #[arg(long)]
    pub manual_ack: bool,

    /// Unacknowledged deliveries a consumer may hold (basic.qos prefetch count); 0 means no
    /// limit.
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,

    #[arg(long, default_value_t = 1)]
    pub producers: usize,

    /// Consumers on each queue (0: publish only).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,

    /// Leave the queues and exchange in place after the run.
    #[arg(long)]
    pub keep_queues: bool,

    /// The client of the publishers and consumers (queues are declared through lapin either
    /// way).
    #[arg(long, value_enum, default_value_t = ClientChoice::Lapin)]
    #[serde(default)]
    pub client: ClientChoice,

    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadOptions,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            uri: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: ExchangeChoice::Default,
            queue_count: 1,
            queue_prefix: None,
            body_bytes: 16,
            persistent: false,
            durable: false,
            confirm: false,
            confirm_window: 256,
            manual_ack: false,
            prefetch: 1000,
            producers: 1,
            consumers: 1,
            keep_queues: false,
            client: ClientChoice::Lapin,
            load: LoadOptions::default(),
        }
    }
}

impl AmqpOptions {
    pub fn validate(&self) -> Result<(), BenchError> {
        self.load.validate(self.producers, self.consumers)?;
        payload::template(self.body_bytes)?;
        if self.queue_count == 0 {
            return Err(BenchError::Config(
                "--queue-count must be at least 1".into(),
            ));
        }
        if !(1..=CONFIRM_WINDOW_MAX).contains(&self.confirm_window) {
            return Err(BenchError::Config(format!(
                "--confirm-window must be between 1 and {CONFIRM_WINDOW_MAX}"
            )));
        }
        Ok(())
    }

    fn copies_per_message(&self) -> u64 {
        match (self.consumers, self.exchange) {
            (0, _) => 0,
            (_, ExchangeChoice::Fanout) => self.queue_count as u64,
            _ => 1,
        }
    }
}

/// Names of what a run declares, and how messages reach the queues.
#[derive(Debug, Clone)]
struct Topology {
    exchange: String,
    queues: Vec<String>,
    /// The routing keys publishers rotate through.
    routing_keys: Vec<String>,
}

impl Topology {
    fn new(options: &AmqpOptions) -> Self {
        let prefix = options
            .queue_prefix
            .clone()
            .unwrap_or_else(|| fresh_name("sluice-bench"));
        let queues: Vec<String> = (0..options.queue_count)
            .map(|index| format!("{prefix}-{index}"))
            .collect();
        let (exchange, routing_keys) = match options.exchange {
            ExchangeChoice::Default => (String::new(), queues.clone()),
            ExchangeChoice::Direct => (format!("{prefix}-direct"), queues.clone()),
            ExchangeChoice::Fanout => (format!("{prefix}-fanout"), vec![String::new()]),
            ExchangeChoice::Topic => (
                format!("{prefix}-topic"),
                queues.iter().map(|q| format!("{q}.bench")).collect(),
            ),
        };
        Self {
            exchange,
            queues,
            routing_keys,
        }
    }

    fn binding_key(&self, choice: ExchangeChoice, queue: &str) -> String {
        match choice {
            ExchangeChoice::Default | ExchangeChoice::Direct => queue.to_owned(),
            ExchangeChoice::Fanout => String::new(),
            ExchangeChoice::Topic => format!("{queue}.#"),
        }
    }
}

async fn connect(uri: &str, name: &str) -> Result<Connection, BenchError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(uri, properties)
        .await
        .map_err(|error| BenchError::amqp(format!("connecting to {uri}"), error))
}

async fn declare(
    channel: &Channel,
    options: &AmqpOptions,
    topology: &Topology,
) -> Result<(), BenchError> {
    let kind = match options.exchange {
        ExchangeChoice::Default => None,
        ExchangeChoice::Direct => Some(ExchangeKind::Direct),
        ExchangeChoice::Fanout => Some(ExchangeKind::Fanout),
        ExchangeChoice::Topic => Some(ExchangeKind::Topic),
    };
    let bound = kind.is_some();
    if let Some(kind) = kind {
        let declare_options = ExchangeDeclareOptions {
            durable: options.durable,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                topology.exchange.as_str().into(),
                kind,
                declare_options,
                FieldTable::default(),
            )
            .await
            .map_err(|error| {
                BenchError::amqp(format!("declaring exchange {}", topology.exchange), error)
            })?;
    }
    for queue in &topology.queues {
        let declare_options = QueueDeclareOptions {
            durable: options.durable,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(
                queue.as_str().into(),
                declare_options,
                FieldTable::default(),
            )
            .await
            .map_err(|error| BenchError::amqp(format!("declaring queue {queue}"), error))?;
        if bound {
            let key = topology.binding_key(options.exchange, queue);
            channel
                .queue_bind(
                    queue.as_str().into(),
                    topology.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| BenchError::amqp(format!("binding queue {queue}"), error))?;
        }
    }
    Ok(())
}

/// Deletes what the run declared. Failures are returned for the report but do not fail the
/// run: the figures were already taken.
async fn clean_up(channel: &Channel, options: &AmqpOptions, topology: &Topology) -> Vec<String> {
    let mut problems = Vec::new();
    for queue in &topology.queues {
        if let Err(error) = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            problems.push(format!("deleting queue {queue}: {error}"));
        }
    }
    if options.exchange != ExchangeChoice::Default
        && let Err(error) = channel
            .exchange_delete(
                topology.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
    {
        problems.push(format!("deleting exchange {}: {error}", topology.exchange));
    }
    problems
}

/// Runs one AMQP workload and reports what it measured.
pub async fn run(options: &AmqpOptions, name: &str, quiet: bool) -> Result<RunReport, BenchError> {
    options.validate()?;
    net::probe(&net::amqp_host_port(&options.uri)).await?;
    let topology = Topology::new(options);
    let control_connection = connect(&options.uri, "sluice-bench-control").await?;
    let control = control_connection
        .create_channel()
        .await
        .map_err(|error| BenchError::amqp("opening the control channel", error))?;
    declare(&control, options, &topology).await?;

    let meter = Meter::new();
    let started_unix_ms = unix_ms_now();
    let run_deadline = Instant::now() + options.load.run_timeout();
    let plan = ProgressPlan {
        title: name.to_owned(),
        length: match options.load.count {
            Some(count) => ProgressLength::Messages(count),
            None => ProgressLength::Seconds(options.load.duration_s),
        },
        quiet,
    };
    let sampler = Sampler::start(Arc::clone(&meter), options.load.broker_pid, plan)?;
    let outcome = drive(options, &topology, &meter, run_deadline).await;
    let sampled = sampler.finish()?;
    let (send_elapsed, expected_receive_count, latency, connections) = outcome?;

    for connection in connections {
        let _ = connection.close(200, "benchmark done".into()).await;
    }
    if !options.keep_queues {
        for problem in clean_up(&control, options, &topology).await {
            meter.error(format!("cleanup: {problem}"));
        }
    }
    let _ = control_connection.close(200, "benchmark done".into()).await;

    let totals = meter.totals();
    let receive = meter.receive_window_ns().map(|(first, last)| {
        Throughput::new(
            totals.received_count,
            totals.received_bytes,
            (last - first) as f64 / 1e9,
        )
    });
    let mut settings = serde_json::to_value(options).unwrap_or(serde_json::Value::Null);
    if let Some(map) = settings.as_object_mut() {
        map.insert("queues".into(), topology.queues.clone().into());
        map.insert("exchange_name".into(), topology.exchange.clone().into());
    }
    let mut report = RunReport {
        name: name.to_owned(),
        protocol: "amqp".into(),
        target: options.uri.clone(),
        settings,
        started_unix_ms,
        send: (options.producers > 0).then(|| {
            Throughput::new(
                totals.sent_count,
                totals.sent_bytes,
                send_elapsed.as_secs_f64(),
            )
        }),
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

/// The clients' part of a run: returns the send time, the expected receive count, the merged
/// latency, and the connections to close.
async fn drive(
    options: &AmqpOptions,
    topology: &Topology,
    meter: &Arc<Meter>,
    run_deadline: Instant,
) -> Result<(Duration, u64, Latency, Vec<Connection>), BenchError> {
    let mut connections = Vec::new();
    let mut consumers = Vec::new();
    if !options.load.backlog {
        consumers = start_consumers(options, topology, meter, &mut connections).await?;
    }
    let properties = if options.persistent {
        BasicProperties::default().with_delivery_mode(DELIVERY_MODE_PERSISTENT)
    } else {
        BasicProperties::default()
    };
    let mut links = Vec::new();
    for index in 0..options.producers {
        let link = match options.client {
            ClientChoice::Raw => {
                let mut raw = RawConnection::open(&options.uri).await?;
                if options.confirm {
                    raw.confirm_select().await?;
                }
                PublisherLink::Raw(raw)
            }
            ClientChoice::Lapin => {
                let connection =
                    connect(&options.uri, &format!("sluice-bench-publisher-{index}")).await?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|error| BenchError::amqp("opening a publisher channel", error))?;
                if options.confirm {
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .map_err(|error| BenchError::amqp("enabling publisher confirms", error))?;
                }
                connections.push(connection);
                PublisherLink::Lapin(channel)
            }
        };
        links.push(link);
    }
    let send_started = Instant::now();
    let mut producers = Vec::new();
    for (index, link) in links.into_iter().enumerate() {
        let plan = PublishPlan {
            properties: properties.clone(),
            confirm_window: options.confirm.then_some(options.confirm_window),
            body: payload::template(options.body_bytes)?,
            quota: Quota::for_producer(&options.load, send_started, options.producers, index),
            rate: options.load.rate_per_producer(options.producers),
            meter: Arc::clone(meter),
        };
        producers.push(match link {
            PublisherLink::Lapin(channel) => tokio::spawn(
                Publisher {
                    channel,
                    exchange: topology.exchange.clone(),
                    routing_keys: topology.routing_keys.clone(),
                    plan,
                }
                .run(),
            ),
            PublisherLink::Raw(raw) => {
                let exchange = ShortString::from(topology.exchange.as_str());
                let templates = topology
                    .routing_keys
                    .iter()
                    .map(|key| {
                        amqp_raw::PublishTemplate::new(
                            &exchange,
                            &ShortString::from(key.as_str()),
                            &plan.properties,
                            plan.body.len(),
                        )
                    })
                    .collect::<Result<_, _>>()?;
                tokio::spawn(RawPublisher { templates, plan }.run(raw))
            }
        });
    }
    for result in join_all(producers, meter, run_deadline, Meter::stop_producers).await {
        if let Err(error) = result {
            meter.error(error.chain());
        }
    }
    let send_elapsed = send_started.elapsed();

    let expected = match options.load.count {
        Some(count) if options.producers == 0 => count * options.copies_per_message(),
        _ => meter.totals().sent_count * options.copies_per_message(),
    };
    if options.load.backlog {
        meter.set_draining();
        consumers = start_consumers(options, topology, meter, &mut connections).await?;
    }
    if !consumers.is_empty() {
        wait_for_drain_async(meter, expected, options.load.drain_timeout(), run_deadline).await;
    }
    meter.stop_consumers();
    let mut latency = Latency::new()?;
    for result in join_all(consumers, meter, run_deadline, Meter::stop_consumers).await {
        match result {
            Ok(one) => latency.merge(&one)?,
            Err(error) => meter.error(error.chain()),
        }
    }
    Ok((send_elapsed, expected, latency, connections))
}

async fn start_consumers(
    options: &AmqpOptions,
    topology: &Topology,
    meter: &Arc<Meter>,
    connections: &mut Vec<Connection>,
) -> Result<Vec<JoinHandle<Result<Latency, BenchError>>>, BenchError> {
    let mut handles = Vec::new();
    for queue in &topology.queues {
        for index in 0..options.consumers {
            if options.client == ClientChoice::Raw {
                let mut raw = RawConnection::open(&options.uri).await?;
                raw.consume(
                    queue,
                    &format!("sluice-bench-{index}"),
                    options.prefetch,
                    !options.manual_ack,
                )
                .await?;
                handles.push(tokio::spawn(consume_raw(
                    raw,
                    options.manual_ack,
                    Arc::clone(meter),
                )));
                continue;
            }
            let connection = connect(
                &options.uri,
                &format!("sluice-bench-consumer-{queue}-{index}"),
            )
            .await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|error| BenchError::amqp("opening a consumer channel", error))?;
            channel
                .basic_qos(options.prefetch, BasicQosOptions::default())
                .await
                .map_err(|error| BenchError::amqp("setting the prefetch count", error))?;
            let consume_options = BasicConsumeOptions {
                no_ack: !options.manual_ack,
                ..BasicConsumeOptions::default()
            };
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("sluice-bench-{index}").as_str().into(),
                    consume_options,
                    FieldTable::default(),
                )
                .await
                .map_err(|error| BenchError::amqp(format!("consuming from {queue}"), error))?;
            connections.push(connection);
            handles.push(tokio::spawn(consume(
                consumer,
                options.manual_ack,
                Arc::clone(meter),
            )));
        }
    }
    Ok(handles)
}

async fn consume(
    mut consumer: lapin::Consumer,
    manual_ack: bool,
    meter: Arc<Meter>,
) -> Result<Latency, BenchError> {
    let mut latency = Latency::new()?;
    let mut acks: VecDeque<Acking> = VecDeque::with_capacity(WRITE_WINDOW);
    while !meter.consumers_stopped() {
        // The timeout only lets the loop see the stop flag; dropping a pending `next()` loses
        // nothing.
        let delivery = match tokio::time::timeout(POLL_INTERVAL, consumer.next()).await {
            Err(_) => continue,
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                meter.error(format!("consume: {error}"));
                continue;
            }
            Ok(Some(Ok(delivery))) => delivery,
        };
        let now_ns = payload::now_ns();
        latency.record(&delivery.data, now_ns);
        meter.received(delivery.data.len(), now_ns);
        if manual_ack {
            // Each delivery is acknowledged on its own; like publishes, acks are written
            // without waiting for the one before (see `WRITE_WINDOW`).
            let mut acking: Acking =
                Box::pin(async move { delivery.ack(BasicAckOptions::default()).await });
            let first = std::future::poll_fn(|cx| Poll::Ready(acking.as_mut().poll(cx))).await;
            match first {
                Poll::Ready(Err(error)) => meter.error(format!("ack: {error}")),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => acks.push_back(acking),
            }
            while acks.len() >= WRITE_WINDOW {
                if let Some(oldest) = acks.pop_front()
                    && let Err(error) = oldest.await
                {
                    meter.error(format!("ack: {error}"));
                }
            }
        }
    }
    for acking in acks {
        if let Err(error) = acking.await {
            meter.error(format!("ack: {error}"));
        }
    }
    Ok(latency)
}

type Acking = Pin<Box<dyn Future<Output = lapin::Result<bool>> + Send>>;

/// A publisher's connection, through either client.
enum PublisherLink {
    Lapin(Channel),
    Raw(RawConnection),
}

/// What every publisher is given, whichever its client.
struct PublishPlan {
    properties: BasicProperties,
    /// Most unconfirmed messages, when publisher confirms are on.
    confirm_window: Option<usize>,
    body: Vec<u8>,
    quota: Quota,
    rate: Option<f64>,
    meter: Arc<Meter>,
}

struct Publisher {
    channel: Channel,
    exchange: String,
    routing_keys: Vec<String>,
    plan: PublishPlan,
}

/// Publishes one publisher keeps being written at once. lapin resolves a publish once its
/// frames are written; waiting for each before sending the next would measure the client's
/// round trip to its own I/O thread, not the broker.
const WRITE_WINDOW: usize = 64;

type Publishing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

impl Publisher {
    async fn run(mut self) -> Result<(), BenchError> {
        let mut pacer = Pacer::new(self.plan.rate);
        let mut pending: VecDeque<PublisherConfirm> =
            VecDeque::with_capacity(self.plan.confirm_window.unwrap_or(0));
        let mut writing: VecDeque<Publishing> = VecDeque::with_capacity(WRITE_WINDOW);
        let body_bytes = self.plan.body.len();
        let mut sequence = 0u64;
        let result = loop {
            if self.plan.quota.done(sequence) || self.plan.meter.producers_stopped() {
                break Ok(());
            }
            let delay = pacer.next_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            payload::stamp(&mut self.plan.body, sequence);
            let routing_key = &self.routing_keys[sequence as usize % self.routing_keys.len()];
            let channel = self.channel.clone();
            let (exchange, routing_key) = (self.exchange.clone(), routing_key.clone());
            let (body, properties) = (self.plan.body.clone(), self.plan.properties.clone());
            let mut publishing: Publishing = Box::pin(async move {
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await
            });
            // The first poll queues the frames, so they go out in the order published.
            let first = std::future::poll_fn(|cx| Poll::Ready(publishing.as_mut().poll(cx))).await;
            let mut done = Vec::new();
            match first {
                Poll::Ready(published) => done.push(published),
                Poll::Pending => writing.push_back(publishing),
            }
            while writing.len() >= WRITE_WINDOW {
                if let Some(oldest) = writing.pop_front() {
                    done.push(oldest.await);
                }
            }
            if let Err(error) = self.written(done, &mut pending, body_bytes).await {
                break Err(error);
            }
            sequence += 1;
        };
        // Messages already published still count once written and confirmed, even if
        // publishing stopped on an error.
        let mut done = Vec::new();
        while let Some(publishing) = writing.pop_front() {
            done.push(publishing.await);
        }
        let flushed = self.written(done, &mut pending, body_bytes).await;
        while let Some(confirm) = pending.pop_front() {
            settle(confirm, body_bytes, &self.plan.meter).await;
        }
        result.and(flushed)
    }

    /// Accounts for publishes whose frames were written: counted now without confirms, else
    /// queued for their confirms (settling the oldest beyond the window).
    async fn written(
        &self,
        done: Vec<lapin::Result<PublisherConfirm>>,
        pending: &mut VecDeque<PublisherConfirm>,
        body_bytes: usize,
    ) -> Result<(), BenchError> {
        for published in done {
            let confirm = published.map_err(|error| BenchError::amqp("publishing", error))?;
            match self.plan.confirm_window {
                Some(window) => {
                    pending.push_back(confirm);
                    while pending.len() >= window {
                        if let Some(oldest) = pending.pop_front() {
                            settle(oldest, body_bytes, &self.plan.meter).await;
                        }
                    }
                }
                None => self.plan.meter.sent(body_bytes),
            }
        }
        Ok(())
    }
}

/// The lean client's consumer: takes every whole delivery the last read brought, then writes
/// the acks they call for in one go.
async fn consume_raw(
    mut conn: RawConnection,
    manual_ack: bool,
    meter: Arc<Meter>,
) -> Result<Latency, BenchError> {
    let mut latency = Latency::new()?;
    let mut delivery_tag = 0u64;
    // Body bytes still due for the message being received, once its header came.
    let mut remaining: Option<u64> = None;
    let mut body: Vec<u8> = Vec::new();
    while !meter.consumers_stopped() {
        while let Some(frame) = conn.buffered_frame()? {
            let finished = match frame {
                amqp_raw::Frame::Deliver(tag) => {
                    delivery_tag = tag;
                    body.clear();
                    false
                }
                amqp_raw::Frame::Method(method) => {
                    if let AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) =
                        amqp_raw::closed_by_broker(method)?
                    {
                        return Err(BenchError::Invalid(
                            "the broker cancelled the consumer".into(),
                        ));
                    }
                    false
                }
                amqp_raw::Frame::Header(size) => {
                    remaining = Some(size);
                    size == 0
                }
                amqp_raw::Frame::Body(bytes) => {
                    let due = remaining
                        .and_then(|due| due.checked_sub(bytes.len() as u64))
                        .ok_or_else(|| {
                            BenchError::Invalid(
                                "the broker sent body bytes no content header announced".into(),
                            )
                        })?;
                    body.extend_from_slice(&bytes);
                    remaining = Some(due);
                    due == 0
                }
                amqp_raw::Frame::Heartbeat | amqp_raw::Frame::Confirm { .. } => false,
            };
            if finished {
                remaining = None;
                let now_ns = payload::now_ns();
                latency.record(&body, now_ns);
                meter.received(body.len(), now_ns);
                if manual_ack {
                    conn.ack(delivery_tag, false);
                }
            }
        }
        conn.flush().await?;
        conn.fill_within(POLL_INTERVAL).await?;
    }
    conn.close().await;
    Ok(latency)
}

/// The lean client's publisher: frames of many publishes go out in one write; with confirms it
/// keeps at most `confirm_window` messages unconfirmed and counts each when acked.
struct RawPublisher {
    /// One per routing key, used in turn.
    templates: Vec<amqp_raw::PublishTemplate>,
    plan: PublishPlan,
}

/// How long a publisher waits for its last confirms once it has stopped publishing.
const LAST_CONFIRMS_TIMEOUT: Duration = Duration::from_secs(30);

/// Delivery tags a raw publisher has had confirmed.
#[derive(Debug, Default)]
struct Confirmed {
    /// Every tag up to this one is settled.
    through: u64,
    /// Settled tags above `through`, when the broker acks one at a time out of order.
    above: std::collections::BTreeSet<u64>,
}

impl Confirmed {
    /// Settles `tag` (and every tag below it with `multiple`); returns how many are newly
    /// settled. A tag above `published` names a message never sent: an error, so that no
    /// broker can make the count pass what was published or grow the set of tags held.
    fn settle(&mut self, tag: u64, multiple: bool, published: u64) -> Result<u64, BenchError> {
        if tag > published {
            return Err(BenchError::Invalid(format!(
                "the broker confirmed delivery tag {tag}, but only {published} messages were \
                 published"
            )));
        }
        let before = self.through + self.above.len() as u64;
        if multiple {
            self.through = self.through.max(tag);
            self.above = self.above.split_off(&(self.through + 1));
        } else if tag > self.through {
            self.above.insert(tag);
        }
        while self.above.remove(&(self.through + 1)) {
            self.through += 1;
        }
        Ok((self.through + self.above.len() as u64).saturating_sub(before))
    }

    fn count(&self) -> u64 {
        self.through + self.above.len() as u64
    }
}

impl RawPublisher {
    async fn run(mut self, mut conn: RawConnection) -> Result<(), BenchError> {
        let mut pacer = Pacer::new(self.plan.rate);
        let mut sequence = 0u64;
        let mut unwritten = 0u64;
        let mut confirmed = Confirmed::default();
        let body_bytes = self.plan.body.len();
        let result: Result<(), BenchError> = async {
            loop {
                if self.plan.quota.done(sequence) || self.plan.meter.producers_stopped() {
                    break;
                }
                let delay = pacer.next_delay();
                if !delay.is_zero() {
                    self.write(&mut conn, &mut unwritten, body_bytes).await?;
                    tokio::time::sleep(delay).await;
                }
                if let Some(window) = self.plan.confirm_window {
                    while sequence - confirmed.count() >= window as u64
                        && !self.plan.meter.producers_stopped()
                    {
                        self.write(&mut conn, &mut unwritten, body_bytes).await?;
                        self.take_confirms(&mut conn, &mut confirmed, sequence, true)
                            .await?;
                    }
                }
                payload::stamp(&mut self.plan.body, sequence);
                let template = &self.templates[sequence as usize % self.templates.len()];
                conn.publish(template, &self.plan.body)?;
                sequence += 1;
                unwritten += 1;
                if conn.out.len() >= amqp_raw::WRITE_BATCH_BYTES {
                    self.write(&mut conn, &mut unwritten, body_bytes).await?;
                    conn.fill_within(Duration::ZERO).await?;
                    self.take_confirms(&mut conn, &mut confirmed, sequence, false)
                        .await?;
                }
            }
            self.write(&mut conn, &mut unwritten, body_bytes).await?;
            if self.plan.confirm_window.is_some() {
                let deadline = tokio::time::Instant::now() + LAST_CONFIRMS_TIMEOUT;
                while confirmed.count() < sequence
                    && tokio::time::Instant::now() < deadline
                    && !self.plan.meter.producers_stopped()
                {
                    let waiting = self.take_confirms(&mut conn, &mut confirmed, sequence, true);
                    if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                        break;
                    }
                }
            }
            Ok(())
        }
        .await;
        conn.close().await;
        result
    }

    /// Writes the frames gathered so far; without confirms, what is written counts as sent.
    async fn write(
        &self,
        conn: &mut RawConnection,
        unwritten: &mut u64,
        body_bytes: usize,
    ) -> Result<(), BenchError> {
        conn.flush().await?;
        if self.plan.confirm_window.is_none() {
            for _ in 0..*unwritten {
                self.plan.meter.sent(body_bytes);
            }
        }
        *unwritten = 0;
        Ok(())
    }

    /// Handles what the broker sent: confirms, and a close as an error. With `wait`, reads
    /// until at least one frame came or the publishers are told to stop.
    async fn take_confirms(
        &self,
        conn: &mut RawConnection,
        confirmed: &mut Confirmed,
        published: u64,
        wait: bool,
    ) -> Result<(), BenchError> {
        let body_bytes = self.plan.body.len();
        let mut seen = false;
        loop {
            while let Some(frame) = conn.buffered_frame()? {
                seen = true;
                match frame {
                    amqp_raw::Frame::Confirm {
                        ack,
                        delivery_tag,
                        multiple,
                    } => {
                        for _ in 0..confirmed.settle(delivery_tag, multiple, published)? {
                            if ack {
                                self.plan.meter.sent(body_bytes);
                            } else {
                                self.plan.meter.error("the broker nacked a message");
                            }
                        }
                    }
                    amqp_raw::Frame::Method(method) => {
                        amqp_raw::closed_by_broker(method)?;
                    }
                    _ => {}
                }
            }
            if seen || !wait || self.plan.meter.producers_stopped() {
                return Ok(());
            }
            conn.fill_within(POLL_INTERVAL).await?;
        }
    }
}

async fn settle(confirm: PublisherConfirm, body_bytes: usize, meter: &Meter) {
    match confirm.await {
        Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => meter.sent(body_bytes),
        Ok(Confirmation::Nack(_)) => meter.error("the broker nacked a message"),
        Err(error) => meter.error(format!("publisher confirm: {error}")),
    }
}

/// Waits for client tasks, telling them to stop if the run's deadline passes first.
async fn join_all<T>(
    handles: Vec<JoinHandle<Result<T, BenchError>>>,
    meter: &Meter,
    run_deadline: Instant,
    stop: fn(&Meter),
) -> Vec<Result<T, BenchError>> {
    while handles.iter().any(|handle| !handle.is_finished()) {
        if Instant::now() >= run_deadline {
            stop(meter);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(match handle.await {
            Ok(result) => result,
            Err(error) => Err(BenchError::Task(format!("an amqp client task: {error}"))),
        });
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_delivers_a_copy_to_every_queue() {
        let options = AmqpOptions {
            exchange: ExchangeChoice::Fanout,
            queue_count: 4,
            ..AmqpOptions::default()
        };
        assert_eq!(options.copies_per_message(), 4);
        let topology = Topology::new(&options);
        assert_eq!(topology.routing_keys, vec![String::new()]);
        assert_eq!(topology.queues.len(), 4);
    }

    #[test]
    fn the_default_exchange_routes_by_queue_name() {
        let options = AmqpOptions {
            queue_count: 2,
            queue_prefix: Some("q".into()),
            ..AmqpOptions::default()
        };
        let topology = Topology::new(&options);
        assert_eq!(topology.exchange, "");
        assert_eq!(topology.routing_keys, vec!["q-0", "q-1"]);
        assert_eq!(options.copies_per_message(), 1);
    }

    #[test]
    fn topic_bindings_match_their_routing_keys() {
        let options = AmqpOptions {
            exchange: ExchangeChoice::Topic,
            queue_prefix: Some("q".into()),
            ..AmqpOptions::default()
        };
        let topology = Topology::new(&options);
        assert_eq!(topology.routing_keys, vec!["q-0.bench"]);
        assert_eq!(topology.binding_key(ExchangeChoice::Topic, "q-0"), "q-0.#");
    }

    #[test]
    fn raw_publisher_confirms_settle_in_any_order_and_with_multiple() {
        let mut confirmed = Confirmed::default();
        let settle = |c: &mut Confirmed, tag, multiple| c.settle(tag, multiple, 6).unwrap();
        assert_eq!(settle(&mut confirmed, 2, false), 1);
        assert_eq!(confirmed.count(), 1);
        assert_eq!(confirmed.through, 0);
        assert_eq!(settle(&mut confirmed, 1, false), 1);
        assert_eq!((confirmed.through, confirmed.count()), (2, 2));
        assert_eq!(settle(&mut confirmed, 5, false), 1);
        assert_eq!(settle(&mut confirmed, 4, true), 2);
        assert_eq!((confirmed.through, confirmed.count()), (5, 5));
        // Settling again changes nothing.
        assert_eq!(settle(&mut confirmed, 3, false), 0);
        assert_eq!(settle(&mut confirmed, 5, true), 0);
        assert_eq!(confirmed.count(), 5);
        // A tag never published is refused and changes nothing.
        assert!(confirmed.settle(7, false, 6).is_err());
        assert!(confirmed.settle(100, true, 6).is_err());
        assert_eq!(confirmed.count(), 5);
    }

    #[test]
    fn a_zero_confirm_window_is_refused() {
        let options = AmqpOptions {
            confirm: true,
            confirm_window: 0,
            ..AmqpOptions::default()
        };
        assert!(options.validate().is_err());
    }
}
