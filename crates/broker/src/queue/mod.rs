//! Queues: messages kept in a log of their own until consumers settle them.
//!
//! Each queue is a directory `<data>/queues/<queue id>/` holding a [`sluice_storage::Log`] of
//! its messages (one record each, see [`crate::message::codec`]) and an acknowledgement
//! journal ([`journal`]). One owner task per queue ([`handler`], a `LogHandler`) appends
//! publishes, delivers to consumers and applies acknowledgements, in one order; the delivery
//! decisions themselves are a pure state machine ([`state`]).
//!
//! What lives in memory: ranges of ready offsets, one entry per delivered-unacknowledged or
//! requeued message, and a bounded read-ahead cache of message bodies. Bodies of a backlog stay
//! on disk. Settled prefixes let the log start advance so whole segments are deleted.
//!
//! Flow to consumers is bounded by [`Credit`]: a queue delivers to a consumer only while the
//! consumer's channel has granted credit (its prefetch window, and a window of bytes in
//! flight to the socket). Deliveries go to the consumer's connection through an unbounded
//! channel whose length is bounded by that credit.

pub mod args;
pub mod deadletter;
pub mod flow;
pub(crate) mod handler;
pub mod journal;
pub mod ranges;
pub mod remote;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sluice_storage::{OwnerHandle, StorageError};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::{BrokerError, MessagingError};
use crate::message::value::FieldTable;
use crate::message::{Message, Properties};

pub use args::QueueArgs;
pub(crate) use handler::{QueueSpec, open as open_queue, start as start_queue};
pub use state::{ConsumerId, DeathReason, SettleOp};

/// A queue's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueRecord {
    pub vhost: String,
    pub name: String,
    /// Names the queue's directory; a queue deleted and declared again gets a new one.
    pub id: Uuid,
    pub durable: bool,
    /// Deleted when its last consumer goes away.
    pub auto_delete: bool,
    /// The connection that declared an exclusive queue. Exclusive queues never outlive it.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
    pub created_ms: i64,
    /// The node that holds the queue, placed by the controller when it was declared in a
    /// cluster. `None` for a queue of this node alone (transient, or defined before it was
    /// clustered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<crate::NodeId>,
}

impl QueueRecord {
    /// Whether the definition survives a restart.
    pub fn is_persistent(&self) -> bool {
        self.durable && self.exclusive_owner.is_none()
    }
}

/// Credit a consumer's channel grants its queue: deliveries may continue while both counters
/// are positive. `messages` follows the prefetch count; `window` bounds bytes in flight between
/// the queue and the socket (a delivery costs one unit per started 64 KiB of body).
///
/// A channel-wide prefetch (RabbitMQ's `global` qos) is kept by the consumer's connection,
/// which pauses the credit of every consumer of a full channel ([`Self::pause`]) and resumes
/// it when an acknowledgement frees room, so that the queue stops offering them messages
/// instead of having them handed back.
///
/// The credit of a consumer whose queue is on another node is *relayed*: what the channel
/// grants, pauses and resumes is passed on to the queue's node (see [`remote`]), where the
/// queue takes from a credit of its own.
#[derive(Debug)]
pub struct Credit {
    messages: AtomicI64,
    window: AtomicI64,
    starved: AtomicBool,
    paused: AtomicBool,
    relay: std::sync::OnceLock<Arc<remote::CreditRelay>>,
}

/// Bytes of body per unit of window credit.
pub const WINDOW_UNIT_BYTES: u32 = 64 * 1024;

impl Credit {
    pub fn new(messages: i64, window: i64) -> Self {
        Self {
            messages: AtomicI64::new(messages),
            window: AtomicI64::new(window),
            starved: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            relay: std::sync::OnceLock::new(),
        }
    }

    /// Stops deliveries whatever the counters say, until [`Self::resume`].
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        if let Some(relay) = self.relay.get() {
            relay.pause_changed();
        }
    }

    /// Lets deliveries go on after [`Self::pause`]. True if the queue had run dry and must be
    /// woken (see [`Queue::wake`]).
    pub fn resume(&self) -> bool {
        self.paused.store(false, Ordering::SeqCst);
        if let Some(relay) = self.relay.get() {
            relay.pause_changed();
            return false;
        }
        self.starved.swap(false, Ordering::SeqCst)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// What one delivery of `bytes` costs in window units.
    pub fn window_cost(bytes: u32) -> i64 {
        1 + i64::from(bytes / WINDOW_UNIT_BYTES)
    }

    /// Adds credit. True if the queue had run dry and must be woken (see [`Queue::wake`]).
    pub fn grant(&self, messages: i64, window: i64) -> bool {
        if let Some(relay) = self.relay.get() {
            relay.grant(messages, window);
            return false;
        }
        if messages != 0 {
            self.messages.fetch_add(messages, Ordering::SeqCst);
        }
        if window != 0 {
            self.window.fetch_add(window, Ordering::SeqCst);
        }
        self.starved.swap(false, Ordering::SeqCst)
    }

    pub fn messages(&self) -> i64 {
        self.messages.load(Ordering::SeqCst)
    }

    pub fn window(&self) -> i64 {
        self.window.load(Ordering::SeqCst)
    }

    pub fn is_starved(&self) -> bool {
        self.starved.load(Ordering::SeqCst)
    }

    /// Takes credit for one delivery; on failure marks the consumer starved. The re-check after
    /// marking closes the race with a concurrent [`Self::grant`] or [`Self::resume`]: one side
    /// always sees the other's write.
    fn take(&self, bytes: u32) -> bool {
        for _ in 0..2 {
            if !self.paused.load(Ordering::SeqCst)
                && self.messages.load(Ordering::SeqCst) > 0
                && self.window.load(Ordering::SeqCst) > 0
            {
                self.messages.fetch_sub(1, Ordering::SeqCst);
                self.window
                    .fetch_sub(Self::window_cost(bytes), Ordering::SeqCst);
                return true;
            }
            if self.starved.swap(true, Ordering::SeqCst) {
                return false;
            }
        }
        false
    }
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub consumer: ConsumerId,
    /// Identifies the message in its queue, for acknowledgements.
    pub offset: u64,
    pub redelivered: bool,
    /// Earlier deliveries of this message that were returned.
    pub delivery_count: u32,
    pub message: Arc<Message>,
}

/// What a queue tells a consumer's connection.
#[derive(Debug)]
pub enum QueueEvent {
    Deliver(Delivery),
    /// The queue cancelled the consumer (it was deleted).
    Cancelled {
        consumer: ConsumerId,
    },
}

/// Where a queue sends a consumer's deliveries. One per connection.
pub type DeliverySink = mpsc::UnboundedSender<QueueEvent>;

/// A consumer to register.
#[derive(Debug)]
pub struct NewConsumer {
    pub id: ConsumerId,
    pub no_ack: bool,
    pub exclusive: bool,
    pub priority: i32,
    pub credit: Arc<Credit>,
    pub sink: DeliverySink,
}

/// Where a publish landed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Offset after the last appended message: wait for it to be durable before confirming
    /// persistent messages (see [`Queue::wait_durable`]).
    pub end_offset: u64,
    /// Indexes (in the published batch) of messages the queue refused because it is full.
    pub rejected: Vec<usize>,
}

/// A message taken with `basic.get`.
#[derive(Debug, Clone)]
pub struct Got {
    pub delivery: Delivery,
    /// Ready messages left in the queue.
    pub message_count: u64,
}

/// Counts reported by a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStat {
    pub message_count: u64,
    pub consumer_count: u32,
}

/// Counters a queue keeps up to date for readers that must not wait for it.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub ready: AtomicU64,
    pub unacked: AtomicU64,
    pub consumers: AtomicU64,
    /// Messages the queue accepted since start.
    pub published: AtomicU64,
    /// Messages handed to consumers or taken with `get`, redeliveries included.
    pub delivered: AtomicU64,
    /// Deliveries acknowledged (automatic acknowledgements excluded).
    pub acked: AtomicU64,
}

#[derive(Debug)]
pub(crate) enum QueueRequest {
    Publish(Vec<Arc<Message>>),
    AwaitDurable(u64),
    Consume(NewConsumer),
    Cancel(ConsumerId),
    Settle(Vec<u64>, SettleOp),
    ConsumersGone(Vec<ConsumerId>),
    Wake,
    Get {
        no_ack: bool,
    },
    Purge,
    Stat {
        touch: bool,
    },
    CheckDelete {
        if_unused: bool,
        if_empty: bool,
    },
    /// The queue is being deleted: cancel every consumer; reply with the ready count.
    Deleting,
    Timer,
}

#[derive(Debug)]
pub(crate) enum QueueReply {
    Published(PublishOutcome),
    Got(Option<Got>),
    Count(u64),
    Stat(QueueStat),
    Done,
}

type Reply = Result<QueueReply, BrokerError>;

/// A message a queue cannot read (an I/O error, a checksum mismatch). The queue keeps it and
/// delivers nothing past it until it reads again or an operator purges or deletes the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnreadableMessage {
    /// Its offset in the queue's log.
    pub offset: u64,
    /// The file the read failed on (the queue's directory when no one file is to blame).
    pub file: String,
    /// The byte position in that file, when known.
    pub position: Option<u64>,
    pub reason: String,
    /// When the queue found it (ms since the epoch).
    pub since_ms: i64,
}

/// A live queue.
#[derive(Debug)]
pub struct Queue {
    record: QueueRecord,
    args: QueueArgs,
    backend: Backend,
    counters: Arc<QueueCounters>,
    /// True while publishers must wait for the consumers (see [`flow`]).
    flow: tokio::sync::watch::Receiver<bool>,
    /// Set by the owner while the queue holds a message it cannot read.
    unreadable: Arc<parking_lot::Mutex<Option<UnreadableMessage>>>,
}

/// Where a queue's requests go.
#[derive(Debug)]
pub(crate) enum Backend {
    /// Its owner task on this node.
    Local(OwnerHandle<QueueRequest, Reply>),
    /// The node that holds it, through the cluster.
    Remote {
        node: crate::NodeId,
        forwarding: Arc<remote::Forwarding>,
    },
}

impl Queue {
    /// A handle for a queue that lives on `node`: requests are forwarded there.
    pub(crate) fn remote(
        record: QueueRecord,
        args: QueueArgs,
        node: crate::NodeId,
        forwarding: Arc<remote::Forwarding>,
    ) -> Self {
        let (_, flow) = tokio::sync::watch::channel(false);
        Self {
            record,
            args,
            backend: Backend::Remote { node, forwarding },
            counters: Arc::default(),
            flow,
            unreadable: Arc::default(),
        }
    }

    /// The node that holds the queue, if not this one.
    pub fn remote_node(&self) -> Option<crate::NodeId> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Remote { node, .. } => Some(*node),
        }
    }

    pub fn record(&self) -> &QueueRecord {
        &self.record
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn vhost(&self) -> &str {
        &self.record.vhost
    }

    /// Whether publishers must wait for this queue's consumers now.
    pub fn is_throttled(&self) -> bool {
        *self.flow.borrow()
    }

    /// Follows the queue's flow state: a publisher waits until it turns false (or the queue
    /// is gone).
    pub fn flow(&self) -> tokio::sync::watch::Receiver<bool> {
        self.flow.clone()
    }

    pub fn is_durable(&self) -> bool {
        self.record.durable
    }

    pub fn exclusive_owner(&self) -> Option<u64> {
        self.record.exclusive_owner
    }

    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    pub fn counters(&self) -> &QueueCounters {
        &self.counters
    }

    /// The message this queue cannot read, if any: an alarm for the operator.
    pub fn unreadable(&self) -> Option<UnreadableMessage> {
        self.unreadable.lock().clone()
    }

    async fn call(&self, request: QueueRequest) -> Reply {
        let owner = match &self.backend {
            Backend::Local(owner) => owner,
            Backend::Remote { node, forwarding } => {
                return forwarding.call(*node, &self.record, request).await;
            }
        };
        match owner.call(request).await {
            Ok(reply) => reply,
            Err(StorageError::OwnerGone) => Err(MessagingError::NotFound {
                kind: crate::error::ResourceKind::Queue,
                vhost: self.record.vhost.clone(),
                name: self.record.name.clone(),
            }
            .into()),
            Err(other) => Err(other.into()),
        }
    }

    /// Appends messages routed to this queue, in order.
    pub async fn publish(
        &self,
        messages: Vec<Arc<Message>>,
    ) -> Result<PublishOutcome, BrokerError> {
        match self.call(QueueRequest::Publish(messages)).await? {
            QueueReply::Published(outcome) => Ok(outcome),
            other => unexpected(other),
        }
    }

    /// Waits until everything below `end_offset` is on disk.
    pub async fn wait_durable(&self, end_offset: u64) -> Result<(), BrokerError> {
        self.call(QueueRequest::AwaitDurable(end_offset))
            .await
            .map(|_| ())
    }

    pub async fn consume(&self, consumer: NewConsumer) -> Result<(), BrokerError> {
        self.call(QueueRequest::Consume(consumer)).await.map(|_| ())
    }

    /// Removes a consumer. Its unacknowledged deliveries stay with its channel.
    pub async fn cancel(&self, consumer: ConsumerId) -> Result<(), BrokerError> {
        self.call(QueueRequest::Cancel(consumer)).await.map(|_| ())
    }

    pub async fn settle(&self, offsets: Vec<u64>, op: SettleOp) -> Result<(), BrokerError> {
        self.call(QueueRequest::Settle(offsets, op))
            .await
            .map(|_| ())
    }

    /// Consumers whose channel went away: removes them and requeues what they held.
    pub async fn consumers_gone(&self, consumers: Vec<ConsumerId>) -> Result<(), BrokerError> {
        self.call(QueueRequest::ConsumersGone(consumers))
            .await
            .map(|_| ())
    }

    /// Asks the queue to deliver again after credit was granted to a starved consumer.
    pub async fn wake(&self) -> Result<(), BrokerError> {
        self.call(QueueRequest::Wake).await.map(|_| ())
    }

    pub async fn get(&self, no_ack: bool) -> Result<Option<Got>, BrokerError> {
        match self.call(QueueRequest::Get { no_ack }).await? {
            QueueReply::Got(got) => Ok(got),
            other => unexpected(other),
        }
    }

    /// Drops every ready message; returns how many.
    pub async fn purge(&self) -> Result<u64, BrokerError> {
        match self.call(QueueRequest::Purge).await? {
            QueueReply::Count(count) => Ok(count),
            other => unexpected(other),
        }
    }

    /// Message and consumer counts; `touch` counts as a use for `x-expires`.
    pub async fn stat(&self, touch: bool) -> Result<QueueStat, BrokerError> {
        match self.call(QueueRequest::Stat { touch }).await? {
            QueueReply::Stat(stat) => Ok(stat),
            other => unexpected(other),
        }
    }

    pub(crate) async fn check_delete(
        &self,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, BrokerError> {
        match self
            .call(QueueRequest::CheckDelete {
                if_unused,
                if_empty,
            })
            .await?
        {
            QueueReply::Count(count) => Ok(count),
            other => unexpected(other),
        }
    }

    /// Cancels every consumer and returns the ready count; the caller then closes the queue.
    pub(crate) async fn deleting(&self) -> Result<u64, BrokerError> {
        match self.call(QueueRequest::Deleting).await? {
            QueueReply::Count(count) => Ok(count),
            other => unexpected(other),
        }
    }

    /// Finishes pending work, fsyncs and stops the owner task.
    pub(crate) async fn close(&self) -> Result<(), BrokerError> {
        let Backend::Local(owner) = &self.backend else {
            return Ok(());
        };
        match owner.close().await {
            Ok(()) | Err(StorageError::OwnerGone) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

fn unexpected<T>(reply: QueueReply) -> Result<T, BrokerError> {
    unreachable!("each queue request is answered with its own reply, not {reply:?}")
}

/// Priority of a message in a queue with `x-max-priority`.
pub fn message_priority(properties: &Properties) -> u8 {
    properties.priority.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_credit_refuses_and_resuming_reports_a_starved_queue() {
        let credit = Credit::new(10, 10);
        assert!(credit.take(1));
        credit.pause();
        assert!(
            !credit.take(1),
            "paused credit gives nothing, whatever the counters"
        );
        assert!(credit.is_starved());
        assert!(
            credit.resume(),
            "the queue ran dry meanwhile: it must be woken"
        );
        assert!(credit.take(1));
        credit.pause();
        assert!(
            !credit.resume(),
            "nothing asked meanwhile: no wake-up needed"
        );
        assert_eq!(credit.messages(), 8);
    }
}
