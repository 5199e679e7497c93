//! One client connection: protocol header, the `connection.*` handshake (authentication,
//! tuning, virtual host), then frames in and out until either side closes.
//!
//! One task runs each connection. Its loop waits on the socket (read and write halves
//! independently, so a client that does not read cannot stall what we read), on deliveries
//! from queues, on the completion of confirms waiting for the disk, on the heartbeat timer, on
//! resource alarms and on shutdown. Everything read in one go is handled before the output it
//! produced is written, so frames to the client go out in few writes.
//!
//! Bounds: the read buffer holds one frame (≤ `frame_max`) plus what one read brings; output
//! past [`OUTPUT_HIGH_BYTES`] stops reading and taking deliveries until it drains; deliveries in
//! flight are bounded by consumers' credit.
//!
//! Closing: a channel exception closes the channel (`channel.close`, then its consumers are
//! cancelled and unacknowledged deliveries requeued); a connection exception sends
//! `connection.close` and waits briefly for `close-ok`. Either way exclusive queues of the
//! connection are deleted when it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable as WireTable, LongString};
use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashMapExt};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use sluice_broker::alarms::Alarms;
use sluice_broker::exchange::routing::RoutingTable;
use sluice_broker::limits::{Limit, UserLimits};
use sluice_broker::message::Message;
use sluice_broker::queue::{ConsumerId, Credit, DeliverySink, Queue, QueueEvent, SettleOp};
use sluice_broker::users::AuthenticatedUser;
use sluice_broker::vhost::Vhost;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::Context;
use crate::channel::{Channel, Consumer, Content};
use crate::codec::{self, Frame, FrameError};
use crate::convert::short;
use crate::errors::{self, Exception};
use crate::limits::{ConnectionLimits, ConnectionSlot};
use crate::observe::{ChannelInfo, ConnectionEntry, Identity};
use crate::reply_to::REPLY_OFFSET;

/// Output queued beyond this stops reading from the client until it drains.
pub const OUTPUT_HIGH_BYTES: usize = 4 * 1024 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 128 * 1024;
/// Deliveries taken from queues per turn of the loop.
const EVENTS_PER_TURN: usize = 512;
/// Window credit each consumer starts with (see `Credit`).
pub const CONSUMER_WINDOW: i64 = 1024;
/// Publishes held before they are handed to their queues mid-read.
const PUBLISH_BATCH_MESSAGES: usize = 2048;
const PUBLISH_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// How long to wait for `close-ok` after closing the connection on an error.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What handling a frame without awaiting came to.
enum Step {
    Done,
    /// An exception to raise on a channel (0: on the connection).
    Raise(Exception, u16),
    /// The frame needs [`Connection::on_frame`].
    Wait(Frame),
}

/// Whether a method on a channel goes ahead.
enum Gate {
    Go,
    /// The channel is closing: only its close handshake counts.
    Skip,
}

/// The methods `on_gated` handles (`basic.publish`, `ack`, `reject`, `nack`) are timed one
/// call in this many; each timed call counts for the untimed ones before it. Two clock reads
/// and a histogram update per message had been a tenth of a busy broker's work.
const HOT_TIMING_EVERY: u32 = 32;

/// The `basic` methods `on_gated` handles, by their slot in `Connection::hot_timing`.
const HOT_METHOD_IDS: [u16; HOT_METHODS] = [40, 80, 90, 120];
const HOT_METHODS: usize = 4;

/// Sampled timing of one hot method on one connection.
#[derive(Debug, Default, Clone, Copy)]
struct HotTiming {
    /// Calls since the last timed one.
    untimed: u32,
    /// How long the last timed call took; `None` until one was, so the first is always timed.
    last: Option<Duration>,
}

/// The acknowledgements, handled without awaiting like publishes (which the decoder gives
/// as [`Frame::Publish`]).
fn is_settlement(method: &basic::AMQPMethod) -> bool {
    matches!(
        method,
        basic::AMQPMethod::Ack(_) | basic::AMQPMethod::Nack(_) | basic::AMQPMethod::Reject(_)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    AwaitHeader,
    AwaitStartOk,
    AwaitTuneOk,
    AwaitOpen,
    Running,
    /// We sent `connection.close`; waiting for `close-ok`.
    Closing,
    Closed,
}

/// What a client told us it supports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
    pub authentication_failure_close: bool,
    /// How the client reads `basic.qos`.
    pub qos: QosReading,
}

/// How a client means `basic.qos`.
///
/// RabbitMQ reads `global = false` as a prefetch for each consumer the channel creates from
/// then on, and `global = true` as a limit shared by the channel's consumers, existing ones
/// included; pika, lapin, the Java client, Spring and most others are written for that. The
/// AMQP 0-9-1 specification reads `global = false` as the shared channel limit, applying at
/// once. kombu (so Celery) uses RabbitMQ's reading only with a server that calls itself
/// RabbitMQ 3.x, and the specification's with any other: a client built on py-amqp gets the
/// specification's reading here, so that the prefetch Celery raises while it holds ETA tasks
/// reaches its running consumer. (`global = true` in that reading would limit the whole
/// connection; Sluice limits the channel.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QosReading {
    #[default]
    RabbitMq,
    Specification,
}

impl QosReading {
    /// Client products (the `product` client property) written for the specification's
    /// reading when the server is not RabbitMQ 3.x.
    const SPECIFICATION_CLIENTS: &[&str] = &["py-amqp"];

    pub fn for_client(product: Option<&str>) -> Self {
        match product {
            Some(product) if Self::SPECIFICATION_CLIENTS.contains(&product) => Self::Specification,
            _ => Self::RabbitMq,
        }
    }
}

/// Work that finished outside the connection task.
#[derive(Debug)]
pub enum Completion {
    /// Persistent messages reached the disk (or the queue failed, `ok` false).
    Durable {
        channel: u16,
        seqs: Vec<u64>,
        ok: bool,
    },
    Nothing,
}

/// Publishes waiting to be handed to one queue.
#[derive(Debug)]
pub struct QueueBatch {
    pub queue: Arc<Queue>,
    pub messages: Vec<Arc<Message>>,
    /// Per message: (channel, confirm sequence number) if the publisher wants a confirm.
    pub confirms: Vec<Option<(u16, u64)>>,
}

/// Settlements waiting to be handed to one queue.
#[derive(Debug)]
pub struct SettleBatch {
    pub queue: Arc<Queue>,
    pub op: SettleOp,
    pub offsets: Vec<u64>,
}

pub struct Connection {
    pub ctx: Arc<Context>,
    pub id: u64,
    pub peer: SocketAddr,
    pub state: State,
    pub out: Vec<u8>,
    decoder: codec::Decoder,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat_s: u16,
    pub capabilities: Capabilities,
    pub mechanism: String,
    pub user: Option<AuthenticatedUser>,
    pub vhost: Option<Arc<Vhost>>,
    pub routing: Arc<RoutingTable>,
    routing_version: u64,
    pub channels: HashMap<u16, Channel>,
    pub consumers: HashMap<ConsumerId, Consumer>,
    pub sink: DeliverySink,
    pub mailbox: mpsc::UnboundedReceiver<QueueEvent>,
    pub pending: FuturesUnordered<BoxFuture<'static, Completion>>,
    pub publish_batches: Vec<QueueBatch>,
    publish_index: HashMap<usize, usize>,
    publish_count: usize,
    publish_bytes: usize,
    pub settle_batches: Vec<SettleBatch>,
    /// Scratch space for routing results.
    pub route_scratch: Vec<Arc<Queue>>,
    /// The properties of the last publish as decoded and as converted to the broker's model.
    pub last_properties: Option<(
        Arc<amq_protocol::protocol::BasicProperties>,
        Arc<sluice_broker::message::Properties>,
    )>,
    /// The connection has published; it is blocked while an alarm lasts.
    pub published: bool,
    /// `connection.blocked` was sent.
    pub blocked_sent: bool,
    pub alarms: Alarms,
    /// A queue this connection published to holds its publishers back until its consumers
    /// catch up (RabbitMQ's `flow` state): nothing is read meanwhile.
    pub flow_wait: Option<watch::Receiver<bool>>,
    /// When input last arrived and output last left, as of the last tick: the read and write
    /// paths only set `read_since_tick` and `wrote_since_tick`, which reads no clock.
    pub last_read: Instant,
    pub last_write: Instant,
    read_since_tick: bool,
    wrote_since_tick: bool,
    /// Sampled timing of the methods handled in `on_gated`, in the order of [`HOT_METHOD_IDS`].
    hot_timing: [HotTiming; HOT_METHODS],
    close_deadline: Option<Instant>,
    /// This connection in the operators' registry.
    pub entry: Arc<ConnectionEntry>,
    /// The client's `connection_name` or product, from `start-ok`.
    client_name: String,
    /// Channels in the registry's last snapshot.
    reported_channels: usize,
    /// This connection's place under the connection limits, from `connection.open` on.
    slot: Option<ConnectionSlot>,
    /// The user's limits as of `connection.open`.
    user_limits: UserLimits,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Runs one connection to its end.
pub async fn run(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
    }
    let (mut reader, mut writer) = stream.into_split();
    let (sink, mailbox) = mpsc::unbounded_channel();
    let mut alarm_watch = ctx.broker.alarms();
    let alarms = *alarm_watch.borrow_and_update();
    let now = Instant::now();
    let id = ctx.broker.next_id();
    let entry = ctx
        .frontend
        .connections
        .open(id, peer, ctx.broker.clock().now_ms());
    let frontend = Arc::clone(&ctx.frontend);
    frontend.metrics.connections_open.increment();
    frontend.metrics.connections_total.increment();
    let mut conn = Connection {
        id,
        frame_max: ctx.settings.frame_max,
        channel_max: ctx.settings.channel_max,
        heartbeat_s: 0,
        ctx,
        peer,
        state: State::AwaitHeader,
        out: Vec::with_capacity(64 * 1024),
        decoder: codec::Decoder::default(),
        capabilities: Capabilities::default(),
        mechanism: String::new(),
        user: None,
        vhost: None,
        routing: Arc::new(RoutingTable::default()),
        routing_version: u64::MAX,
        channels: HashMap::new(),
        consumers: HashMap::new(),
        sink,
        mailbox,
        pending: FuturesUnordered::new(),
        publish_batches: Vec::new(),
        publish_index: HashMap::new(),
        publish_count: 0,
        publish_bytes: 0,
        settle_batches: Vec::new(),
        route_scratch: Vec::new(),
        last_properties: None,
        published: false,
        blocked_sent: false,
        alarms,
        flow_wait: None,
        last_read: now,
        last_write: now,
        read_since_tick: false,
        wrote_since_tick: false,
        hot_timing: Default::default(),
        close_deadline: None,
        entry: Arc::clone(&entry),
        client_name: String::new(),
        reported_channels: 0,
        slot: None,
        user_limits: UserLimits::default(),
    };
    let mut input = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut inflight: Option<Bytes> = None;
    let mut events = Vec::with_capacity(EVENTS_PER_TURN);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = conn.ctx.shutdown.clone();

    loop {
        if inflight.is_none() && !conn.out.is_empty() {
            inflight = Some(Bytes::from(std::mem::take(&mut conn.out)));
        }
        if conn.state == State::Closed && inflight.is_none() {
            break;
        }
        let reading = conn.wants_input() && conn.out.len() < OUTPUT_HIGH_BYTES;
        let taking_events = conn.state == State::Running && conn.out.len() < OUTPUT_HIGH_BYTES;
        tokio::select! {
            biased;
            written = async {
                match inflight.as_ref() {
                    Some(bytes) => writer.write(bytes).await,
                    None => std::future::pending().await,
                }
            }, if inflight.is_some() => {
                match written {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        conn.wrote_since_tick = true;
                        entry.bytes_out.add(n as u64);
                        frontend.metrics.bytes_out.add(n as u64);
                        if let Some(bytes) = inflight.as_mut() {
                            let _ = bytes.split_to(n);
                            if bytes.is_empty() {
                                inflight = None;
                            }
                        }
                    }
                }
            }
            read = reader.read_buf(&mut input), if reading => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        conn.read_since_tick = true;
                        entry.bytes_in.add(n as u64);
                        frontend.metrics.bytes_in.add(n as u64);
                        conn.process_input(&mut input).await;
                        if input.capacity() - input.len() < 1024 {
                            input.reserve(READ_CHUNK_BYTES);
                        }
                    }
                }
            }
            count = conn.mailbox.recv_many(&mut events, EVENTS_PER_TURN), if taking_events => {
                if count == 0 {
                    break;
                }
                conn.on_events(&mut events);
                conn.flush_settles().await;
            }
            Some(done) = conn.pending.next(), if !conn.pending.is_empty() => {
                conn.on_completion(done);
            }
            () = async {
                match conn.flow_wait.as_mut() {
                    // A queue that is gone no longer holds anyone back.
                    Some(flow) => drop(flow.wait_for(|throttled| !*throttled).await),
                    None => std::future::pending().await,
                }
            }, if conn.flow_wait.is_some() => {
                conn.flow_wait = None;
            }
            _ = ticker.tick() => {
                conn.on_tick().await;
            }
            changed = alarm_watch.changed() => {
                if changed.is_ok() {
                    conn.alarms = *alarm_watch.borrow_and_update();
                    conn.on_alarms();
                }
            }
            () = entry.closed().cancelled(), if conn.state != State::Closing && conn.state != State::Closed => {
                tracing::info!(peer = %conn.peer, "closing a connection at an operator's request");
                conn.close_connection(Exception::new(
                    errors::CONNECTION_FORCED,
                    "Closed via management plugin",
                ));
            }
            () = async {
                match conn.vhost.as_ref() {
                    Some(vhost) => vhost.deleted().cancelled().await,
                    None => std::future::pending().await,
                }
            }, if conn.state != State::Closing && conn.state != State::Closed => {
                let text = format!("vhost '{}' is deleted", conn.vhost_name());
                conn.close_connection(Exception::new(errors::CONNECTION_FORCED, text));
            }
            () = shutdown.cancelled(), if conn.state != State::Closing && conn.state != State::Closed => {
                conn.close_connection(Exception::new(
                    errors::CONNECTION_FORCED,
                    "broker forced connection closure with reason 'shutdown'",
                ));
            }
        }
    }
    if let Some(bytes) = inflight {
        let _ = writer.write_all(&bytes).await;
    }
    if !conn.out.is_empty() {
        let _ = writer.write_all(&conn.out).await;
    }
    let _ = writer.shutdown().await;
    conn.cleanup().await;
    conn.flush_hot_timing();
    frontend
        .metrics
        .channels_open
        .add(-(conn.reported_channels as i64));
    frontend.connections.remove(id);
    frontend.metrics.connections_open.decrement();
}

impl Connection {
    fn wants_input(&self) -> bool {
        match self.state {
            State::Closed => false,
            State::Running => !(self.published && self.alarms.any()) && self.flow_wait.is_none(),
            _ => true,
        }
    }

    /// Refreshes the routing table if the virtual host's changed.
    pub fn routing(&mut self) -> Arc<RoutingTable> {
        if let Some(vhost) = &self.vhost {
            let version = vhost.version();
            if version != self.routing_version {
                self.routing = vhost.routing();
                self.routing_version = version;
            }
        }
        Arc::clone(&self.routing)
    }

    pub fn vhost_name(&self) -> &str {
        self.vhost.as_ref().map_or("/", |v| v.name())
    }

    // ----- output -----------------------------------------------------------------------------

    pub fn send(&mut self, channel: u16, method: AMQPClass) {
        if let Err(error) = codec::write_method(&mut self.out, channel, method) {
            tracing::error!(peer = %self.peer, %error, "closing a connection: cannot encode a frame");
            self.state = State::Closed;
        }
    }

    /// Appends a message's content header and body; properties that arrived encoded and were
    /// not changed since go out as they came.
    pub fn send_content(&mut self, channel: u16, message: &Message) {
        let properties = &message.properties;
        let result = match properties.encoded() {
            Some(header) => codec::write_received_content(
                &mut self.out,
                channel,
                header,
                || crate::convert::properties_to_wire(properties),
                &message.body,
                self.frame_max,
            ),
            None => codec::write_content(
                &mut self.out,
                channel,
                crate::convert::properties_to_wire(properties),
                &message.body,
                self.frame_max,
            ),
        };
        if let Err(error) = result {
            tracing::error!(peer = %self.peer, %error, "closing a connection: cannot encode content");
            self.state = State::Closed;
        }
    }

    // ----- input ------------------------------------------------------------------------------

    async fn process_input(&mut self, input: &mut BytesMut) {
        if self.state == State::AwaitHeader {
            if input.len() < 8 {
                return;
            }
            let header = input.split_to(8);
            if &header[..] != codec::PROTOCOL_HEADER {
                tracing::debug!(peer = %self.peer, header = ?&header[..], "refusing a connection: wrong protocol header");
                self.out.extend_from_slice(codec::PROTOCOL_HEADER);
                self.state = State::Closed;
                return;
            }
            self.send_start();
            self.state = State::AwaitStartOk;
        }
        loop {
            if self.state == State::Closed {
                return;
            }
            let frame = match codec::next_frame(input, self.frame_max, &mut self.decoder) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    self.frame_error(error);
                    return;
                }
            };
            match self.on_frame_now(frame) {
                Step::Done => {}
                Step::Raise(exception, channel) => self.raise(exception, channel).await,
                Step::Wait(frame) => {
                    if let Err(exception) = self.on_frame(frame).await {
                        self.raise(exception, 0).await;
                    }
                }
            }
            if self.publish_count >= PUBLISH_BATCH_MESSAGES
                || self.publish_bytes >= PUBLISH_BATCH_BYTES
            {
                self.flush_publishes().await;
            }
        }
        self.flush_publishes().await;
        self.flush_settles().await;
        if self.channels.len() != self.reported_channels {
            self.report_channels();
        }
    }

    /// Refreshes this connection's channels in the operators' registry.
    fn report_channels(&mut self) {
        let mut channels: Vec<ChannelInfo> = self
            .channels
            .values()
            .map(|c| ChannelInfo {
                number: c.id,
                consumers: c.consumers.len(),
                unacked: c.unacked.len(),
                prefetch: c.prefetch,
                confirm: c.confirms.is_some(),
                transactional: c.tx.is_some(),
            })
            .collect();
        channels.sort_by_key(|c| c.number);
        let metrics = &self.ctx.frontend.metrics;
        metrics
            .channels_open
            .add(channels.len() as i64 - self.reported_channels as i64);
        self.reported_channels = channels.len();
        *self.entry.channels.lock() = channels;
    }

    fn frame_error(&mut self, error: FrameError) {
        tracing::debug!(peer = %self.peer, %error, "closing a connection: bad frame");
        self.ctx.frontend.metrics.protocol_errors.increment();
        if matches!(self.state, State::AwaitStartOk | State::AwaitHeader) {
            self.state = State::Closed;
            return;
        }
        self.close_connection(Exception::new(error.code, error.text));
        // After a framing error the stream cannot be trusted: stop reading at once.
        self.state = State::Closed;
    }

    /// Handles the frames of publishing and acknowledging, the bulk of a busy connection's
    /// input, without awaiting anything: what they hand to queues is batched until the end
    /// of the read. Any other frame is given back for [`Self::on_frame`].
    fn on_frame_now(&mut self, frame: Frame) -> Step {
        if self.state != State::Running {
            return Step::Wait(frame);
        }
        match frame {
            Frame::Header(channel, header, encoded) => {
                self.on_content_header(channel, header, encoded)
            }
            Frame::Body(channel, body) => self.on_content_body(channel, body),
            Frame::Publish(channel, publish) if channel != 0 => {
                // basic.publish: its content follows.
                self.on_gated(channel, 40, |this| {
                    if let Some(state) = this.channels.get_mut(&channel) {
                        state.content = Content::Header(publish);
                    }
                    Ok(())
                })
            }
            Frame::Method(channel, method) if channel != 0 => {
                let method_id = method.get_amqp_method_id();
                match *method {
                    AMQPClass::Basic(method) if is_settlement(&method) => {
                        self.on_gated(channel, method_id, |this| {
                            this.basic_method_now(channel, method)
                        })
                    }
                    other => Step::Wait(Frame::Method(channel, Box::new(other))),
                }
            }
            frame => Step::Wait(frame),
        }
    }

    /// A `basic.*` method handled without awaiting: checked against the channel's state,
    /// handled and timed.
    fn on_gated(
        &mut self,
        channel: u16,
        method_id: u16,
        handle: impl FnOnce(&mut Self) -> Result<(), Exception>,
    ) -> Step {
        let class_id = 60;
        match self.gate(channel, class_id, method_id) {
            Err(exception) => return Step::Raise(exception, 0),
            Ok(Gate::Skip) => return Step::Done,
            Ok(Gate::Go) => {}
        }
        let slot = HOT_METHOD_IDS.iter().position(|id| *id == method_id);
        let result = match slot.map(|slot| &mut self.hot_timing[slot]) {
            Some(timing) if timing.last.is_some() && timing.untimed + 1 < HOT_TIMING_EVERY => {
                timing.untimed += 1;
                handle(self)
            }
            _ => {
                let started = std::time::Instant::now();
                let result = handle(self);
                let elapsed = started.elapsed();
                let mut times = 1;
                if let Some(timing) = slot.map(|slot| &mut self.hot_timing[slot]) {
                    times += u64::from(std::mem::take(&mut timing.untimed));
                    timing.last = Some(elapsed);
                }
                self.count_method(class_id, method_id, elapsed, times);
                result
            }
        };
        match result {
            Ok(()) => Step::Done,
            Err(exception) => Step::Raise(exception.located(class_id, method_id), channel),
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), Exception> {
        // Off the hot path a publish is a method like any other.
        let frame = match frame {
            Frame::Publish(channel, publish) => Frame::Method(
                channel,
                Box::new(AMQPClass::Basic(basic::AMQPMethod::Publish(
                    Arc::unwrap_or_clone(publish),
                ))),
            ),
            frame => frame,
        };
        match self.state {
            State::Closing => {
                // Only the close handshake matters now.
                if let Frame::Method(0, method) = frame {
                    match *method {
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                            self.state = State::Closed;
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                            self.send(
                                0,
                                AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                    connection::CloseOk {},
                                )),
                            );
                            self.state = State::Closed;
                        }
                        _ => {}
                    }
                }
                return Ok(());
            }
            State::Closed | State::AwaitHeader => return Ok(()),
            _ => {}
        }
        match frame {
            Frame::Heartbeat(0) => Ok(()),
            Frame::Heartbeat(channel) => Err(Exception::new(
                errors::UNEXPECTED_FRAME,
                format!("type 8, first 16 octets = <<>>: heartbeat on channel {channel}"),
            )),
            Frame::Method(0, method) => self.on_connection_method(*method).await,
            _ if self.state != State::Running => Err(Exception::new(
                errors::CHANNEL_ERROR,
                format!(
                    "unexpected method in connection state {}",
                    self.state_name()
                ),
            )),
            Frame::Method(channel, method) => self.on_channel_method(channel, *method).await,
            // While running, `on_frame_now` takes content frames; the guard above refuses
            // them before. A publish was made a method above.
            Frame::Header(..) | Frame::Body(..) | Frame::Publish(..) => Ok(()),
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::AwaitHeader | State::AwaitStartOk => "starting",
            State::AwaitTuneOk => "tuning",
            State::AwaitOpen => "opening",
            State::Running => "running",
            State::Closing => "closing",
            State::Closed => "closed",
        }
    }

    // ----- the connection class -----------------------------------------------------------------

    fn send_start(&mut self) {
        let mut capabilities = WireTable::default();
        for name in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            capabilities.insert(name.into(), AMQPValue::Boolean(true));
        }
        let mut properties = WireTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        properties.insert("product".into(), text("Sluice"));
        properties.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
        properties.insert("platform".into(), text("Rust"));
        properties.insert("cluster_name".into(), text("sluice"));
        properties.insert(
            "information".into(),
            text("A message broker with embedded durable storage"),
        );
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: properties,
                mechanisms: LongString::from(crate::auth::MECHANISMS.as_bytes().to_vec()),
                locales: LongString::from(b"en_US".to_vec()),
            })),
        );
    }

    async fn on_connection_method(&mut self, method: AMQPClass) -> Result<(), Exception> {
        let (class_id, method_id) = (method.get_amqp_class_id(), method.get_amqp_method_id());
        let AMQPClass::Connection(method) = method else {
            return Err(Exception::new(
                errors::COMMAND_INVALID,
                "only connection methods may use channel 0",
            )
            .on(class_id, method_id));
        };
        match (self.state, method) {
            (State::AwaitStartOk, connection::AMQPMethod::StartOk(start_ok)) => {
                self.on_start_ok(start_ok)
            }
            (State::AwaitTuneOk, connection::AMQPMethod::TuneOk(tune_ok)) => {
                self.on_tune_ok(tune_ok)
            }
            (State::AwaitOpen, connection::AMQPMethod::Open(open)) => self.on_open(open),
            (_, connection::AMQPMethod::Close(close)) => {
                tracing::debug!(peer = %self.peer, code = close.reply_code, text = %close.reply_text, "client closed the connection");
                self.close_all_channels().await;
                self.send(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                self.state = State::Closed;
                Ok(())
            }
            (_, connection::AMQPMethod::CloseOk(_)) => {
                self.state = State::Closed;
                Ok(())
            }
            (_, connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_)) => {
                Ok(())
            }
            (State::Running, connection::AMQPMethod::UpdateSecret(_)) => Err(Exception::new(
                errors::NOT_ALLOWED,
                "New secret was refused by one of the backends",
            )
            .on(class_id, method_id)),
            _ => Err(Exception::new(
                errors::CHANNEL_ERROR,
                format!(
                    "unexpected method in connection state {}",
                    self.state_name()
                ),
            )
            .on(class_id, method_id)),
        }
    }

    fn on_start_ok(&mut self, start_ok: connection::StartOk) -> Result<(), Exception> {
        if let Some(AMQPValue::FieldTable(capabilities)) =
            start_ok.client_properties.inner().get("capabilities")
        {
            let flag = |name: &str| {
                matches!(
                    capabilities.inner().get(name),
                    Some(AMQPValue::Boolean(true))
                )
            };
            self.capabilities = Capabilities {
                consumer_cancel_notify: flag("consumer_cancel_notify"),
                connection_blocked: flag("connection.blocked"),
                authentication_failure_close: flag("authentication_failure_close"),
                qos: QosReading::RabbitMq,
            };
        }
        let client = start_ok.client_properties.inner();
        let text = |key: &str| match client.get(key) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        self.capabilities.qos = QosReading::for_client(text("product").as_deref());
        self.client_name = text("connection_name")
            .or_else(|| text("product"))
            .unwrap_or_default();
        let mechanism = start_ok.mechanism.as_str().to_owned();
        self.mechanism = mechanism.clone();
        let (username, password) =
            match crate::auth::credentials(&mechanism, start_ok.response.as_bytes()) {
                Ok(credentials) => credentials,
                Err(reason) if reason.starts_with("unknown") => {
                    return Err(Exception::new(errors::COMMAND_INVALID, reason).on(10, 11));
                }
                Err(reason) => {
                    return Err(Exception::new(errors::SYNTAX_ERROR, reason).on(10, 11));
                }
            };
        let Some(user) = self.ctx.broker.authenticate(&username, &password) else {
            return self.refuse_login(&format!("user '{username}' - invalid credentials"));
        };
        if self.ctx.settings.loopback_users.contains(&username) && !self.peer.ip().is_loopback() {
            return self.refuse_login(&format!("user '{username}' can only connect via localhost"));
        }
        self.user = Some(user);
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: self.ctx.settings.channel_max,
                frame_max: self.ctx.settings.frame_max,
                heartbeat: self.ctx.settings.heartbeat_s,
            })),
        );
        self.state = State::AwaitTuneOk;
        Ok(())
    }

    /// Authentication failed: say so if the client asked (capability
    /// `authentication_failure_close`), then close the socket.
    fn refuse_login(&mut self, reason: &str) -> Result<(), Exception> {
        tracing::info!(peer = %self.peer, mechanism = %self.mechanism, reason, "login refused");
        if self.capabilities.authentication_failure_close {
            let explanation = format!(
                "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                self.mechanism
            );
            let exception = Exception::new(errors::ACCESS_REFUSED, explanation);
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: exception.code,
                    reply_text: short(&exception.reply_text()),
                    class_id: 0,
                    method_id: 0,
                })),
            );
        }
        self.state = State::Closed;
        Ok(())
    }

    fn on_tune_ok(&mut self, tune_ok: connection::TuneOk) -> Result<(), Exception> {
        let settings = &self.ctx.settings;
        let fail = |field: &str, value: u64, lower: bool, limit: u64| {
            Err(Exception::new(
                errors::NOT_ALLOWED,
                format!(
                    "negotiated {field} = {value} is {} than the {} allowed value ({limit})",
                    if lower { "lower" } else { "higher" },
                    if lower { "minimum" } else { "maximum" },
                ),
            )
            .on(10, 31))
        };
        let frame_max = tune_ok.frame_max;
        if frame_max != 0 && frame_max < codec::FRAME_MIN_SIZE {
            return fail(
                "frame_max",
                frame_max.into(),
                true,
                codec::FRAME_MIN_SIZE.into(),
            );
        }
        if frame_max == 0 || frame_max > settings.frame_max {
            return fail(
                "frame_max",
                frame_max.into(),
                false,
                settings.frame_max.into(),
            );
        }
        let channel_max = tune_ok.channel_max;
        if channel_max == 0 || channel_max > settings.channel_max {
            return fail(
                "channel_max",
                channel_max.into(),
                false,
                settings.channel_max.into(),
            );
        }
        self.frame_max = frame_max;
        self.channel_max = channel_max;
        self.heartbeat_s = tune_ok.heartbeat;
        self.state = State::AwaitOpen;
        Ok(())
    }

    fn on_open(&mut self, open: connection::Open) -> Result<(), Exception> {
        let name = open.virtual_host.as_str().to_owned();
        let Some(user) = &self.user else {
            return Err(Exception::new(errors::CHANNEL_ERROR, "not authenticated"));
        };
        let Some(vhost) = self.ctx.broker.vhost(&name) else {
            return Err(
                Exception::new(errors::NOT_ALLOWED, format!("vhost {name} not found")).on(10, 40),
            );
        };
        if !user.can_access_vhost(&name) {
            return Err(Exception::new(
                errors::NOT_ALLOWED,
                format!("access to vhost '{name}' refused for user '{}'", user.name),
            )
            .on(10, 40));
        }
        let user_limits = self
            .ctx
            .broker
            .user(&user.name)
            .map(|u| u.limits)
            .unwrap_or_default();
        let limits = ConnectionLimits {
            node: self.ctx.settings.max_connections,
            vhost: self
                .ctx
                .broker
                .vhost_limits(&name)
                .and_then(|l| l.max_connections),
            user: user_limits.max_connections,
        };
        match self.ctx.frontend.counts.admit(&user.name, &name, limits) {
            Ok(slot) => self.slot = Some(slot),
            Err(refusal) => {
                self.ctx.broker.refused(refusal.limit);
                tracing::info!(peer = %self.peer, user = %user.name, vhost = %name, reason = %refusal.text, "connection refused by a limit");
                return Err(Exception::new(errors::NOT_ALLOWED, refusal.text).on(10, 40));
            }
        }
        self.user_limits = user_limits;
        tracing::debug!(peer = %self.peer, user = %user.name, vhost = %name, "connection opened");
        *self.entry.identity.lock() = Identity {
            user: user.name.clone(),
            vhost: name.clone(),
            client: std::mem::take(&mut self.client_name),
        };
        self.vhost = Some(vhost);
        self.routing();
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        self.state = State::Running;
        Ok(())
    }

    /// Closes the connection with an exception and waits (briefly) for `close-ok`.
    pub fn close_connection(&mut self, exception: Exception) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        tracing::debug!(peer = %self.peer, %exception, "closing a connection");
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: exception.code,
                reply_text: short(&exception.reply_text()),
                class_id: exception.class_id,
                method_id: exception.method_id,
            })),
        );
        self.state = State::Closing;
        self.close_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
    }

    /// Raises an exception from work on `channel`: soft ones close the channel, hard ones the
    /// connection.
    pub async fn raise(&mut self, exception: Exception, channel: u16) {
        if exception.is_hard()
            || channel == 0
            || matches!(
                self.state,
                State::AwaitOpen | State::AwaitTuneOk | State::AwaitStartOk
            )
        {
            self.close_all_channels().await;
            self.close_connection(exception);
            return;
        }
        tracing::debug!(peer = %self.peer, channel, %exception, "closing a channel");
        self.send(
            channel,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: exception.code,
                reply_text: short(&exception.reply_text()),
                class_id: exception.class_id,
                method_id: exception.method_id,
            })),
        );
        self.release_channel(channel).await;
        if let Some(state) = self.channels.get_mut(&channel) {
            state.closing = true;
        }
    }

    // ----- channels ---------------------------------------------------------------------------

    async fn on_channel_method(&mut self, id: u16, method: AMQPClass) -> Result<(), Exception> {
        let (class_id, method_id) = (method.get_amqp_class_id(), method.get_amqp_method_id());
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = method {
            if self.channels.contains_key(&id) {
                return Err(
                    Exception::new(errors::CHANNEL_ERROR, "second 'channel.open' seen")
                        .on(class_id, method_id),
                );
            }
            if id > self.channel_max {
                self.ctx.broker.refused(Limit::ChannelsPerConnection);
                return Err(Exception::new(
                    errors::NOT_ALLOWED,
                    format!(
                        "channel number {id} exceeds the negotiated channel_max ({})",
                        self.channel_max
                    ),
                )
                .on(class_id, method_id));
            }
            let user = self.user.as_ref().map_or("", |u| u.name.as_str());
            let slot = match self
                .ctx
                .frontend
                .counts
                .open_channel(user, self.user_limits.max_channels)
            {
                Ok(slot) => slot,
                Err(refusal) => {
                    self.ctx.broker.refused(refusal.limit);
                    return Err(
                        Exception::new(errors::NOT_ALLOWED, refusal.text).on(class_id, method_id)
                    );
                }
            };
            let mut channel = Channel::new(id);
            channel.slot = Some(slot);
            self.channels.insert(id, channel);
            self.send(
                id,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(());
        }
        if let Gate::Skip = self.gate(id, class_id, method_id)? {
            match method {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.channels.remove(&id);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.send(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                }
                _ => {}
            }
            return Ok(());
        }
        // Methods other than those `on_frame_now` batches see every earlier publish
        // delivered and every earlier acknowledgement applied.
        self.flush_publishes().await;
        self.flush_settles().await;
        let started = std::time::Instant::now();
        let result = self.dispatch(id, method).await;
        self.observe_method(class_id, method_id, started);
        if let Err(exception) = result {
            self.raise(exception.located(class_id, method_id), id).await;
        }
        Ok(())
    }

    /// The checks a method on a channel other than `channel.open` passes first. A closing
    /// channel skips everything but the close handshake.
    fn gate(&self, id: u16, class_id: u16, method_id: u16) -> Result<Gate, Exception> {
        let Some(state) = self.channels.get(&id) else {
            return Err(Exception::new(
                errors::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {id}"),
            )
            .on(class_id, method_id));
        };
        if state.closing {
            return Ok(Gate::Skip);
        }
        if !matches!(state.content, Content::Idle) {
            return Err(Exception::new(
                errors::UNEXPECTED_FRAME,
                "expected content header for class 60, got non content header frame instead",
            )
            .on(class_id, method_id));
        }
        Ok(Gate::Go)
    }

    /// Counts the hot methods handled since their last timed call, each as long as that call
    /// took, so that the histograms' counts are exact as of every tick.
    fn flush_hot_timing(&mut self) {
        for (slot, method_id) in HOT_METHOD_IDS.into_iter().enumerate() {
            let untimed = std::mem::take(&mut self.hot_timing[slot].untimed);
            if let Some(last) = self.hot_timing[slot].last
                && untimed > 0
            {
                self.count_method(60, method_id, last, u64::from(untimed));
            }
        }
    }

    fn observe_method(&self, class_id: u16, method_id: u16, started: std::time::Instant) {
        self.count_method(class_id, method_id, started.elapsed(), 1);
    }

    /// Counts `times` calls of a method that took `elapsed` each.
    fn count_method(&self, class_id: u16, method_id: u16, elapsed: Duration, times: u64) {
        if let Some(histogram) = self
            .ctx
            .frontend
            .metrics
            .method_latency(class_id, method_id)
        {
            histogram.observe_many(elapsed, times);
        }
    }

    async fn dispatch(&mut self, id: u16, method: AMQPClass) -> Result<(), Exception> {
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Close(close)) => {
                tracing::debug!(peer = %self.peer, channel = id, code = close.reply_code, "client closed a channel");
                self.release_channel(id).await;
                self.channels.remove(&id);
                self.send(
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => Ok(()),
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                if flow.active {
                    self.send(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                            active: true,
                        })),
                    );
                    Ok(())
                } else {
                    Err(Exception::new(errors::NOT_IMPLEMENTED, "active=false"))
                }
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(_) => {
                self.send(
                    id,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Exchange(method) => self.exchange_method(id, method).await,
            AMQPClass::Queue(method) => self.queue_method(id, method).await,
            AMQPClass::Basic(method) => self.basic_method(id, method).await,
            AMQPClass::Confirm(method) => self.confirm_method(id, method),
            AMQPClass::Tx(method) => self.tx_method(id, method).await,
            AMQPClass::Connection(_) | AMQPClass::Channel(_) => Err(Exception::new(
                errors::COMMAND_INVALID,
                "unimplemented method",
            )),
        }
    }

    /// Cancels the channel's consumers and requeues what it holds (its own unacknowledged
    /// deliveries, and any still on their way from queues).
    pub async fn release_channel(&mut self, id: u16) {
        let Some(state) = self.channels.get_mut(&id) else {
            return;
        };
        state.content = Content::Idle;
        state.tx = None;
        let consumer_ids: Vec<ConsumerId> = state.consumers.drain().map(|(_, c)| c).collect();
        let reply = state.reply.take();
        let unacked = std::mem::take(&mut state.unacked);
        state.consumer_unacked = 0;
        if let Some((_, key, consumer)) = reply {
            self.ctx.reply_to.unregister(&key);
            self.consumers.remove(&consumer);
        }
        let mut by_queue: HashMap<usize, (Arc<Queue>, Vec<ConsumerId>)> = HashMap::new();
        for consumer in &consumer_ids {
            if let Some(entry) = self.consumers.get(consumer)
                && let Some(queue) = &entry.queue
            {
                by_queue
                    .entry(Arc::as_ptr(queue) as usize)
                    .or_insert_with(|| (Arc::clone(queue), Vec::new()))
                    .1
                    .push(*consumer);
            }
        }
        for (_, (queue, consumers)) in by_queue {
            let _ = queue.consumers_gone(consumers).await;
        }
        // Whatever the queues sent before they forgot the consumers is requeued already.
        self.drain_mailbox_for(&consumer_ids);
        for consumer in &consumer_ids {
            self.consumers.remove(consumer);
        }
        let mut requeue: HashMap<usize, (Arc<Queue>, Vec<u64>)> = HashMap::new();
        for (_, delivery) in unacked {
            requeue
                .entry(Arc::as_ptr(&delivery.queue) as usize)
                .or_insert_with(|| (Arc::clone(&delivery.queue), Vec::new()))
                .1
                .push(delivery.offset);
        }
        for (_, (queue, offsets)) in requeue {
            let _ = queue.settle(offsets, SettleOp::Requeue).await;
        }
    }

    /// Handles pending deliveries now, dropping those for `gone` consumers.
    fn drain_mailbox_for(&mut self, gone: &[ConsumerId]) {
        let mut kept = Vec::new();
        while let Ok(event) = self.mailbox.try_recv() {
            match &event {
                QueueEvent::Deliver(d) if gone.contains(&d.consumer) => {}
                _ => kept.push(event),
            }
        }
        self.on_events(&mut kept);
    }

    async fn close_all_channels(&mut self) {
        self.flush_publishes().await;
        self.flush_settles().await;
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel(id).await;
        }
        self.channels.clear();
    }

    /// Final cleanup once the socket is done with.
    async fn cleanup(&mut self) {
        self.close_all_channels().await;
        if let Err(error) = self.ctx.broker.delete_exclusive_queues(self.id).await {
            tracing::warn!(peer = %self.peer, %error, "cannot delete exclusive queues");
        }
        tracing::debug!(peer = %self.peer, "connection closed");
    }

    // ----- content ----------------------------------------------------------------------------

    fn on_content_header(&mut self, id: u16, header: codec::ContentHeader, encoded: Bytes) -> Step {
        let max = self.ctx.settings.max_message_bytes as u64;
        let Some(state) = self.channels.get_mut(&id) else {
            return Step::Raise(
                Exception::new(
                    errors::CHANNEL_ERROR,
                    format!("expected 'channel.open' on channel {id}"),
                ),
                0,
            );
        };
        if state.closing {
            return Step::Done;
        }
        let Content::Header(publish) = std::mem::take(&mut state.content) else {
            return Step::Raise(
                Exception::new(
                    errors::UNEXPECTED_FRAME,
                    "type 2, first 16 octets = <<>>: content header without a method",
                ),
                0,
            );
        };
        if header.class_id != 60 {
            return Step::Raise(
                Exception::new(
                    errors::FRAME_ERROR,
                    format!(
                        "content header for class {} on a basic.publish",
                        header.class_id
                    ),
                ),
                0,
            );
        }
        if header.body_size > max {
            return Step::Raise(
                Exception::new(
                    errors::PRECONDITION_FAILED,
                    format!(
                        "message size {} is larger than configured max size {max}",
                        header.body_size
                    ),
                )
                .on(60, 40),
                id,
            );
        }
        if header.body_size == 0 {
            return self.publish_step(id, &publish, &header.properties, encoded, Bytes::new());
        }
        state.content = Content::Body {
            publish,
            header,
            encoded,
            body: crate::channel::Body::Empty,
        };
        Step::Done
    }

    fn on_content_body(&mut self, id: u16, part: Bytes) -> Step {
        let Some(state) = self.channels.get_mut(&id) else {
            return Step::Raise(
                Exception::new(
                    errors::CHANNEL_ERROR,
                    format!("expected 'channel.open' on channel {id}"),
                ),
                0,
            );
        };
        if state.closing {
            return Step::Done;
        }
        let Content::Body { body, header, .. } = &mut state.content else {
            return Step::Raise(
                Exception::new(
                    errors::UNEXPECTED_FRAME,
                    "type 3, first 16 octets = <<>>: content body without a header",
                ),
                0,
            );
        };
        let size = header.body_size;
        let total = body.len() as u64 + part.len() as u64;
        if total > size {
            return Step::Raise(
                Exception::new(
                    errors::FRAME_ERROR,
                    format!("content body of {total} bytes exceeds the {size} announced"),
                ),
                0,
            );
        }
        body.push(part, size as usize);
        if total < size {
            return Step::Done;
        }
        let Content::Body {
            publish,
            header,
            encoded,
            body,
            ..
        } = std::mem::take(&mut state.content)
        else {
            return Step::Done;
        };
        self.publish_step(id, &publish, &header.properties, encoded, body.freeze())
    }

    /// A whole message arrived: publishes it; an exception closes its channel.
    fn publish_step(
        &mut self,
        id: u16,
        publish: &basic::Publish,
        properties: &Arc<amq_protocol::protocol::BasicProperties>,
        encoded: Bytes,
        body: Bytes,
    ) -> Step {
        match self.publish(id, publish, properties, encoded, body) {
            Ok(()) => Step::Done,
            Err(exception) => Step::Raise(exception.on(60, 40), id),
        }
    }

    // ----- batching publishes and settlements --------------------------------------------------

    /// Queues a message for `queue`, to be handed over with the rest of this read.
    pub fn enqueue_publish(
        &mut self,
        queue: &Arc<Queue>,
        message: &Arc<Message>,
        confirm: Option<(u16, u64)>,
    ) {
        let key = Arc::as_ptr(queue) as usize;
        let index = *self.publish_index.entry(key).or_insert_with(|| {
            self.publish_batches.push(QueueBatch {
                queue: Arc::clone(queue),
                messages: Vec::new(),
                confirms: Vec::new(),
            });
            self.publish_batches.len() - 1
        });
        let batch = &mut self.publish_batches[index];
        batch.messages.push(Arc::clone(message));
        batch.confirms.push(confirm);
        self.publish_count += 1;
        self.publish_bytes += message.body.len();
    }

    /// Hands every queued publish to its queue, then settles confirms.
    pub async fn flush_publishes(&mut self) {
        if self.publish_batches.is_empty() {
            return;
        }
        let batches = std::mem::take(&mut self.publish_batches);
        self.publish_index.clear();
        self.publish_count = 0;
        self.publish_bytes = 0;
        let mut touched_channels: Vec<u16> = Vec::new();
        for batch in batches {
            let wants_confirm = batch.confirms.iter().any(Option::is_some);
            let persistent: Vec<bool> = if wants_confirm && batch.queue.is_durable() {
                batch
                    .messages
                    .iter()
                    .map(|m| m.properties.is_persistent())
                    .collect()
            } else {
                Vec::new()
            };
            let result = batch.queue.publish(batch.messages).await;
            if result.is_ok() {
                self.hold_for(&batch.queue);
            }
            if !wants_confirm {
                if let Err(error) = result {
                    tracing::debug!(queue = batch.queue.name(), %error, "publish not accepted");
                }
                continue;
            }
            match result {
                Ok(outcome) => {
                    let mut durable: HashMap<u16, Vec<u64>> = HashMap::new();
                    for (index, confirm) in batch.confirms.iter().enumerate() {
                        let Some((channel, seq)) = *confirm else {
                            continue;
                        };
                        if outcome.rejected.contains(&index) {
                            self.settle_confirm(channel, seq, true);
                        } else if persistent.get(index).copied().unwrap_or(false) {
                            durable.entry(channel).or_default().push(seq);
                        } else {
                            self.settle_confirm(channel, seq, false);
                        }
                        if !touched_channels.contains(&channel) {
                            touched_channels.push(channel);
                        }
                    }
                    for (channel, seqs) in durable {
                        let queue = Arc::clone(&batch.queue);
                        let end_offset = outcome.end_offset;
                        self.pending.push(Box::pin(async move {
                            let ok = queue.wait_durable(end_offset).await.is_ok();
                            Completion::Durable { channel, seqs, ok }
                        }));
                    }
                }
                Err(error) => {
                    // A queue deleted meanwhile routes the message nowhere (confirmed); a
                    // failed one cannot take it (nacked).
                    let gone = matches!(&error, sluice_broker::BrokerError::Messaging(e) if matches!(**e, sluice_broker::MessagingError::NotFound { .. }));
                    for (channel, seq) in batch.confirms.iter().flatten() {
                        self.settle_confirm(*channel, *seq, !gone);
                        if !touched_channels.contains(channel) {
                            touched_channels.push(*channel);
                        }
                    }
                }
            }
        }
        for channel in touched_channels {
            self.emit_confirms(channel);
        }
    }

    /// Stops reading while `queue` throttles its publishers. A connection that also consumes
    /// is never held: its own acknowledgements may be what the queue is waiting for.
    fn hold_for(&mut self, queue: &Arc<Queue>) {
        if self.flow_wait.is_none() && self.consumers.is_empty() && queue.is_throttled() {
            self.ctx.frontend.metrics.flow_holds.increment();
            self.flow_wait = Some(queue.flow());
        }
    }

    pub fn settle_confirm(&mut self, channel: u16, seq: u64, nack: bool) {
        if let Some(confirms) = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.confirms.as_mut())
        {
            confirms.settle(seq, nack);
        }
    }

    /// Sends the confirms that are due on `channel`, in order.
    pub fn emit_confirms(&mut self, channel: u16) {
        let Some(confirms) = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.confirms.as_mut())
        else {
            return;
        };
        let mut due = Vec::new();
        confirms.drain(&mut |tag, multiple, nack| due.push((tag, multiple, nack)));
        for (tag, multiple, nack) in due {
            let method = if nack {
                basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: tag,
                    multiple,
                    requeue: false,
                })
            } else {
                basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: tag,
                    multiple,
                })
            };
            self.send(channel, AMQPClass::Basic(method));
        }
    }

    /// Queues a settlement for `queue`.
    pub fn enqueue_settle(&mut self, queue: &Arc<Queue>, op: SettleOp, offset: u64) {
        if let Some(batch) = self
            .settle_batches
            .iter_mut()
            .rev()
            .find(|b| b.op == op && Arc::ptr_eq(&b.queue, queue))
        {
            batch.offsets.push(offset);
            return;
        }
        self.settle_batches.push(SettleBatch {
            queue: Arc::clone(queue),
            op,
            offsets: vec![offset],
        });
    }

    pub async fn flush_settles(&mut self) {
        for batch in std::mem::take(&mut self.settle_batches) {
            if let Err(error) = batch.queue.settle(batch.offsets, batch.op).await {
                tracing::debug!(queue = batch.queue.name(), %error, "settlement not applied");
            }
        }
    }

    /// Gives a consumer message credit back (an acknowledgement), waking its queue if needed.
    pub fn grant(&mut self, consumer: ConsumerId, messages: i64, window: i64) {
        let Some(entry) = self.consumers.get(&consumer) else {
            return;
        };
        if entry.credit.grant(messages, window)
            && let Some(queue) = entry.queue.clone()
        {
            self.pending.push(Box::pin(async move {
                let _ = queue.wake().await;
                Completion::Nothing
            }));
        }
    }

    // ----- deliveries -------------------------------------------------------------------------

    pub(crate) fn on_events(&mut self, events: &mut Vec<QueueEvent>) {
        let now_ms = self.ctx.broker.clock().now_ms();
        for event in events.drain(..) {
            match event {
                QueueEvent::Deliver(delivery) => self.deliver(delivery, now_ms),
                QueueEvent::Cancelled { consumer } => self.cancelled_by_queue(consumer),
            }
        }
        // Give back window credit for what is now in the output buffer.
        let owed: Vec<(ConsumerId, i64)> = self
            .consumers
            .iter_mut()
            .filter(|(_, c)| c.window_owed > 0)
            .map(|(id, c)| (*id, std::mem::take(&mut c.window_owed)))
            .collect();
        for (consumer, window) in owed {
            self.grant(consumer, 0, window);
        }
    }

    fn deliver(&mut self, delivery: sluice_broker::queue::Delivery, now_ms: i64) {
        self.ctx.frontend.metrics.delivered.increment();
        let Some(consumer) = self.consumers.get_mut(&delivery.consumer) else {
            return;
        };
        if let Some(replies) = &consumer.replies {
            replies.fetch_sub(1, Ordering::Relaxed);
        }
        let channel_id = consumer.channel;
        let no_ack = consumer.no_ack;
        let queue = consumer.queue.clone();
        consumer.window_owed += Credit::window_cost(delivery.message.body.len() as u32);
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if channel.closing {
            return;
        }
        if !no_ack && channel.is_full() && delivery.offset != REPLY_OFFSET {
            // Sent before the channel's shared prefetch filled up and its consumers were
            // paused: give the message back untouched.
            if let Some(queue) = &queue {
                self.enqueue_settle(queue, SettleOp::Return, delivery.offset);
            }
            self.apply_channel_limit(channel_id);
            return;
        }
        let delivery_tag = channel.next_delivery_tag();
        if !no_ack && let Some(queue) = queue {
            channel.unacked.insert(
                delivery_tag,
                crate::channel::Unacked {
                    queue,
                    offset: delivery.offset,
                    consumer: Some(delivery.consumer),
                    delivered_ms: now_ms,
                },
            );
            channel.consumer_unacked += 1;
            if channel.is_full() {
                self.apply_channel_limit(channel_id);
            }
        }
        let message = &delivery.message;
        let Some(consumer) = self.consumers.get_mut(&delivery.consumer) else {
            return;
        };
        let frames = consumer
            .deliver_frames
            .get_or_insert_with(|| Box::new(codec::DeliverEncoder::new(channel_id, &consumer.tag)));
        if let Err(error) = frames.write(
            &mut self.out,
            delivery_tag,
            delivery.redelivered,
            &message.exchange,
            &message.routing_key,
        ) {
            tracing::error!(peer = %self.peer, %error, "closing a connection: cannot encode a frame");
            self.state = State::Closed;
        }
        self.send_content(channel_id, message);
    }

    /// A queue cancelled a consumer (it was deleted): tell the client if it listens.
    fn cancelled_by_queue(&mut self, consumer: ConsumerId) {
        let Some(entry) = self.consumers.remove(&consumer) else {
            return;
        };
        if let Some(channel) = self.channels.get_mut(&entry.channel) {
            channel.consumers.remove(&entry.tag);
            if channel.closing {
                return;
            }
        }
        if self.capabilities.consumer_cancel_notify {
            self.send(
                entry.channel,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: short(&entry.tag),
                    nowait: true,
                })),
            );
        }
    }

    fn on_completion(&mut self, done: Completion) {
        match done {
            Completion::Durable { channel, seqs, ok } => {
                for seq in seqs {
                    self.settle_confirm(channel, seq, !ok);
                }
                self.emit_confirms(channel);
            }
            Completion::Nothing => {}
        }
    }

    // ----- timers and alarms --------------------------------------------------------------------

    async fn on_tick(&mut self) {
        self.report_channels();
        self.flush_hot_timing();
        let now = Instant::now();
        if std::mem::take(&mut self.read_since_tick) {
            self.last_read = now;
        }
        if std::mem::take(&mut self.wrote_since_tick) {
            self.last_write = now;
        }
        if let Some(deadline) = self.close_deadline
            && now >= deadline
        {
            self.state = State::Closed;
            return;
        }
        if self.heartbeat_s > 0 && self.state == State::Running {
            let interval = Duration::from_secs(u64::from(self.heartbeat_s));
            if now.duration_since(self.last_write) >= interval / 2 && self.out.is_empty() {
                codec::write_heartbeat(&mut self.out);
            }
            if now.duration_since(self.last_read) > interval * 2 {
                tracing::info!(peer = %self.peer, timeout_s = self.heartbeat_s, "missed heartbeats from client; closing the connection");
                self.state = State::Closed;
                return;
            }
        }
        if self.state == State::Running
            && let Some(timeout) = self.ctx.settings.consumer_timeout
        {
            let now_ms = self.ctx.broker.clock().now_ms();
            let limit = timeout.as_millis() as i64;
            let expired: Vec<u16> = self
                .channels
                .iter()
                .filter(|(_, c)| !c.closing)
                .filter(|(_, c)| {
                    c.unacked
                        .values()
                        .next()
                        .is_some_and(|u| now_ms - u.delivered_ms > limit)
                })
                .map(|(id, _)| *id)
                .collect();
            for channel in expired {
                tracing::warn!(peer = %self.peer, channel, timeout_ms = limit, "consumer delivery acknowledgement timed out");
                self.raise(
                    Exception::new(
                        errors::PRECONDITION_FAILED,
                        format!(
                            "delivery acknowledgement on channel {channel} timed out. Timeout value used: {limit} ms. This timeout value can be configured, see consumers doc guide to learn more"
                        ),
                    ),
                    channel,
                )
                .await;
            }
        }
    }

    fn on_alarms(&mut self) {
        if self.state != State::Running || !self.capabilities.connection_blocked {
            return;
        }
        if self.alarms.any() && self.published && !self.blocked_sent {
            self.blocked_sent = true;
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: short(self.alarms.reason()),
                })),
            );
        } else if !self.alarms.any() && self.blocked_sent {
            self.blocked_sent = false;
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
            );
        }
    }

    /// Called for every publish: while an alarm lasts, this connection is blocked after it.
    pub fn note_publish(&mut self) {
        if !self.published {
            self.published = true;
            if self.alarms.any() {
                self.on_alarms();
            }
        }
    }
}
