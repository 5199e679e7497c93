//! Sluice's AMQP 0-9-1 front-end.
//!
//! It owns the AMQP listener, connections, framing and the translation between AMQP methods
//! and broker calls: listener ([`serve`]) → connection ([`connection`]) → channel
//! ([`channel`]) → one module per method class under [`methods`]. Frames are split and checked
//! by [`codec`]; methods and content headers are decoded and encoded by the `amq-protocol`
//! crate. Broker errors become AMQP exceptions in one place, [`errors`].
//!
//! Rules it keeps:
//! - A frame's size is checked against the negotiated `frame_max` from its header, before its
//!   payload is buffered; a frame that does not decode closes the connection (501–505).
//! - Methods on a channel are handled in order; publishes are routed as they arrive and handed
//!   to each destination queue in one batch per read from the socket.
//! - No input makes the broker panic.
//! - Every buffer is bounded: the read buffer by `frame_max`, content by the largest message,
//!   queued output by a high watermark past which the connection stops reading, deliveries in
//!   flight by consumers' credit.
//!
//! State beyond a connection: the registry of direct reply-to consumers ([`reply_to`]), and what
//! operators see ([`observe`]: counters, method latencies, open connections and channels).

pub mod auth;
pub mod channel;
pub mod codec;
pub mod connection;
pub mod convert;
pub mod errors;
pub mod limits;
pub mod methods;
pub mod observe;
pub mod reply_to;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_broker::Broker;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings of the AMQP front-end.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// Largest frame, proposed in `connection.tune`.
    pub frame_max: u32,
    /// Most channels per connection, proposed in `connection.tune`.
    pub channel_max: u16,
    /// Heartbeat interval proposed to clients (seconds, 0 for none).
    pub heartbeat_s: u16,
    /// The largest message body accepted.
    pub max_message_bytes: usize,
    /// Open connections on the node; one more is refused at `connection.open`.
    pub max_connections: usize,
    /// Consumers on one channel; one more is refused (530).
    pub consumer_max_per_channel: usize,
    /// Users that may only connect from the loopback interface.
    pub loopback_users: Vec<String>,
    /// How long a consumer may hold a delivery without acknowledging it before its channel is
    /// closed (RabbitMQ's `consumer_timeout`); `None` for no limit.
    pub consumer_timeout: Option<Duration>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_s: 60,
            max_message_bytes: 16 * 1024 * 1024,
            max_connections: 10_000,
            consumer_max_per_channel: 1_000,
            loopback_users: vec!["guest".into()],
            consumer_timeout: Some(Duration::from_secs(30 * 60)),
        }
    }
}

/// Connections accepted past `max_connections` to be refused with a reason.
const REFUSAL_HEADROOM: usize = 64;

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    pub broker: Broker,
    pub frontend: Arc<observe::AmqpFrontend>,
    pub settings: AmqpSettings,
    pub shutdown: CancellationToken,
    pub reply_to: reply_to::Registry,
}

/// Accepts AMQP clients on `listener` until `shutdown` is cancelled. Each connection runs as a
/// task on `tracker`, so the caller can wait for them to finish.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    settings: AmqpSettings,
    frontend: Arc<observe::AmqpFrontend>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    // Past the limit a few more clients are served far enough to be told why they are refused
    // (530 at connection.open); beyond those, clients wait in the listen backlog.
    let permits = Arc::new(Semaphore::new(settings.max_connections + REFUSAL_HEADROOM));
    let context = Arc::new(Context {
        broker,
        frontend,
        settings,
        shutdown: shutdown.clone(),
        reply_to: reply_to::Registry::default(),
    });
    loop {
        // Wait for a connection slot first: past the limit, clients wait in the backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer): (_, SocketAddr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "cannot accept an AMQP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let context = Arc::clone(&context);
        tracker.spawn(async move {
            connection::run(stream, peer, context).await;
            drop(permit);
        });
    }
}
