//! One client connection: protocol header, the `connection.*` handshake (authentication,
//! tuning, virtual host), then frames in and out until either side closes.
//!
//! One task runs each connection. Its loop ([`run`]) waits on the socket (read and write halves
//! independently, so a client that does not read cannot stall what we read), on deliveries
//! from queues, on the completion of confirms waiting for the disk, on the heartbeat timer, on
//! resource alarms and on shutdown. Everything read in one go is handled before the output it
//! produced is written, so frames to the client go out in few writes.
//!
//! The parts:
//! - [`handshake`]: the handshake as a state machine without I/O, up to `open-ok`;
//! - `channels`: `channel.*` and the gate every method on a channel passes, dispatch to the
//!   method classes (in [`crate::methods`]), releasing a channel's consumers and deliveries;
//! - `publish`: content frames into messages, publishes and acknowledgements batched per
//!   queue and read, publisher confirms;
//! - `deliver`: deliveries from queues into frames, consumer credit;
//! - `tick`: heartbeats, the consumer acknowledgement timeout and resource alarms.
//!
//! Bounds: the read buffer holds one frame (≤ `frame_max`) plus what one read brings; output
//! past [`OUTPUT_HIGH_BYTES`] stops reading and taking deliveries until it drains; deliveries in
//! flight are bounded by consumers' credit.
//!
//! Closing: a channel exception closes the channel (`channel.close`, then its consumers are
//! cancelled and unacknowledged deliveries requeued); a connection exception sends
//! `connection.close` and waits briefly for `close-ok`. Either way exclusive queues of the
//! connection are deleted when it ends.

mod channels;
mod deliver;
pub mod handshake;
mod publish;
mod tick;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashMapExt};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use sluice_broker::alarms::Alarms;
use sluice_broker::exchange::routing::RoutingTable;
use sluice_broker::limits::UserLimits;
use sluice_broker::message::Message;
use sluice_broker::queue::{ConsumerId, DeliverySink, Queue, QueueEvent, SettleOp};
use sluice_broker::users::AuthenticatedUser;
use sluice_broker::vhost::Vhost;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use self::channels::{HOT_METHODS, HotTiming, is_settlement};
pub use self::deliver::CONSUMER_WINDOW;
pub use self::handshake::{Capabilities, QosReading};
use self::handshake::{Gatekeeper, Handshake, Phase, Reply, Tuning};
use self::publish::{PUBLISH_BATCH_BYTES, PUBLISH_BATCH_MESSAGES};
use crate::Context;
use crate::channel::{Channel, Consumer, Content};
use crate::codec::{self, Frame, FrameError};
use crate::convert::short;
use crate::errors::{self, Exception};
use crate::limits::{ConnectionLimits, ConnectionSlot, Refusal};
use crate::observe::{ConnectionEntry, Identity};

/// Output queued beyond this stops reading from the client until it drains.
pub const OUTPUT_HIGH_BYTES: usize = 4 * 1024 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 128 * 1024;
/// Deliveries taken from queues per turn of the loop.
const EVENTS_PER_TURN: usize = 512;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// In the handshake, up to `open-ok` (see [`Connection::handshake`] for where).
    Handshake,
    Running,
    /// We sent `connection.close`; waiting for `close-ok`.
    Closing,
    Closed,
}

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
    /// The handshake, also after it completed (it then only tells its phase).
    handshake: Handshake,
    pub out: Vec<u8>,
    decoder: codec::Decoder,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat_s: u16,
    pub capabilities: Capabilities,
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
    let handshake = Handshake::new(
        Tuning {
            channel_max: ctx.settings.channel_max,
            frame_max: ctx.settings.frame_max,
            heartbeat_s: ctx.settings.heartbeat_s,
        },
        peer.ip().is_loopback(),
    );
    let mut conn = Connection {
        id,
        frame_max: ctx.settings.frame_max,
        channel_max: ctx.settings.channel_max,
        heartbeat_s: 0,
        ctx,
        peer,
        state: State::Handshake,
        handshake,
        out: Vec::with_capacity(64 * 1024),
        decoder: codec::Decoder::default(),
        capabilities: Capabilities::default(),
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

    async fn process_input(&mut self, input: &mut BytesMut) {
        if self.handshake.phase() == Phase::AwaitHeader {
            if input.len() < 8 {
                return;
            }
            let header = input.split_to(8);
            let reply = self.handshake.on_header(&header);
            if let Reply::WrongProtocol = reply {
                tracing::debug!(peer = %self.peer, header = ?&header[..], "refusing a connection: wrong protocol header");
            }
            self.on_handshake(reply);
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

    fn frame_error(&mut self, error: FrameError) {
        tracing::debug!(peer = %self.peer, %error, "closing a connection: bad frame");
        self.ctx.frontend.metrics.protocol_errors.increment();
        if self.state == State::Handshake && self.handshake.before_login() {
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
            State::Closed => return Ok(()),
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
            State::Handshake => self.handshake.phase().name(),
            State::Running => "running",
            State::Closing => "closing",
            State::Closed => "closed",
        }
    }

    /// A method on channel 0: the handshake's until it completes, then `close` and the
    /// flow-control notices.
    async fn on_connection_method(&mut self, method: AMQPClass) -> Result<(), Exception> {
        let (class_id, method_id) = (method.get_amqp_class_id(), method.get_amqp_method_id());
        let AMQPClass::Connection(method) = method else {
            return Err(Exception::new(
                errors::COMMAND_INVALID,
                "only connection methods may use channel 0",
            )
            .on(class_id, method_id));
        };
        match method {
            connection::AMQPMethod::Close(close) => {
                tracing::debug!(peer = %self.peer, code = close.reply_code, text = %close.reply_text, "client closed the connection");
                self.close_all_channels().await;
                self.send(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                self.state = State::Closed;
                Ok(())
            }
            connection::AMQPMethod::CloseOk(_) => {
                self.state = State::Closed;
                Ok(())
            }
            connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_) => Ok(()),
            method if self.state == State::Handshake => {
                let gate = BrokerGate {
                    ctx: &self.ctx,
                    peer: self.peer,
                };
                let reply = self.handshake.on_method(&gate, method)?;
                self.on_handshake(reply);
                Ok(())
            }
            connection::AMQPMethod::UpdateSecret(_) => Err(Exception::new(
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

    /// Carries out what a step of the handshake came to.
    fn on_handshake(&mut self, reply: Reply<Arc<Vhost>, (ConnectionSlot, UserLimits)>) {
        match reply {
            Reply::Send(method) => self.send(0, AMQPClass::Connection(method)),
            Reply::Tuned(tuning) => {
                self.frame_max = tuning.frame_max;
                self.channel_max = tuning.channel_max;
                self.heartbeat_s = tuning.heartbeat_s;
            }
            Reply::WrongProtocol => {
                self.out.extend_from_slice(codec::PROTOCOL_HEADER);
                self.state = State::Closed;
            }
            Reply::Refused { reason, close } => {
                tracing::info!(peer = %self.peer, reason, "login refused");
                if let Some(close) = close {
                    self.send(0, AMQPClass::Connection(close));
                }
                self.state = State::Closed;
            }
            Reply::Open(established) => {
                let established = *established;
                let (slot, user_limits) = established.slot;
                tracing::debug!(peer = %self.peer, user = %established.user.name, vhost = %established.vhost_name, "connection opened");
                *self.entry.identity.lock() = Identity {
                    user: established.user.name.clone(),
                    vhost: established.vhost_name,
                    client: established.client_name,
                };
                self.capabilities = established.capabilities;
                self.user = Some(established.user);
                self.slot = Some(slot);
                self.user_limits = user_limits;
                self.vhost = Some(established.vhost);
                self.routing();
                self.send(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
                );
                self.state = State::Running;
            }
        }
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
        if exception.is_hard() || channel == 0 || self.state == State::Handshake {
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

    /// Final cleanup once the socket is done with.
    async fn cleanup(&mut self) {
        self.close_all_channels().await;
        if let Err(error) = self.ctx.broker.delete_exclusive_queues(self.id).await {
            tracing::warn!(peer = %self.peer, %error, "cannot delete exclusive queues");
        }
        tracing::debug!(peer = %self.peer, "connection closed");
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
}

/// The broker's side of the handshake.
struct BrokerGate<'a> {
    ctx: &'a Context,
    peer: SocketAddr,
}

impl Gatekeeper for BrokerGate<'_> {
    type Vhost = Arc<Vhost>;
    type Slot = (ConnectionSlot, UserLimits);

    fn authenticate(&self, username: &str, password: &str) -> Option<AuthenticatedUser> {
        self.ctx.broker.authenticate(username, password)
    }

    fn loopback_only(&self, username: &str) -> bool {
        self.ctx
            .settings
            .loopback_users
            .iter()
            .any(|user| user == username)
    }

    fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.ctx.broker.vhost(name)
    }

    fn admit(&self, user: &str, vhost: &str) -> Result<Self::Slot, Refusal> {
        let broker = &self.ctx.broker;
        let user_limits = broker.user(user).map(|u| u.limits).unwrap_or_default();
        let limits = ConnectionLimits {
            node: self.ctx.settings.max_connections,
            vhost: broker.vhost_limits(vhost).and_then(|l| l.max_connections),
            user: user_limits.max_connections,
        };
        match self.ctx.frontend.counts.admit(user, vhost, limits) {
            Ok(slot) => Ok((slot, user_limits)),
            Err(refusal) => {
                broker.refused(refusal.limit);
                tracing::info!(peer = %self.peer, user, vhost, reason = %refusal.text, "connection refused by a limit");
                Err(refusal)
            }
        }
    }
}
