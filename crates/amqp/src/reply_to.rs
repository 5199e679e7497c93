//! Direct reply-to (`amq.rabbitmq.reply-to`): RPC replies delivered straight to the
//! requester's consumer, without a queue.
//!
//! A channel that consumes from the pseudo-queue `amq.rabbitmq.reply-to` (with no-ack) is
//! registered under a random key; requests it publishes with `reply-to:
//! amq.rabbitmq.reply-to` are rewritten to `amq.rabbitmq.reply-to.<key>`, and a reply published
//! to the default exchange with that routing key goes to the registered consumer's connection.
//! As in RabbitMQ, replies to a consumer that is gone, or that has too many replies waiting to
//! be written, are dropped: the requester is expected to time out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use base64::Engine;
use parking_lot::Mutex;
use sluice_broker::message::Message;
use sluice_broker::queue::{ConsumerId, Delivery, DeliverySink, QueueEvent};

/// The pseudo-queue consumers subscribe to.
pub const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";
/// Prefix of rewritten reply-to addresses.
pub const ADDRESS_PREFIX: &str = "amq.rabbitmq.reply-to.";
/// Replies waiting to be written to one consumer before more are dropped.
pub const MAX_PENDING: i64 = 10_000;
/// Marks a delivery that came through direct reply-to (nothing to acknowledge).
pub const REPLY_OFFSET: u64 = u64::MAX;

#[derive(Debug)]
struct Target {
    consumer: ConsumerId,
    sink: DeliverySink,
    pending: Arc<AtomicI64>,
}

#[derive(Debug, Default)]
pub struct Registry {
    targets: Mutex<HashMap<String, Target>>,
}

impl Registry {
    /// Registers a consumer; returns its key and the counter of its unwritten replies (the
    /// connection decrements it as it writes them).
    pub fn register(&self, consumer: ConsumerId, sink: DeliverySink) -> (String, Arc<AtomicI64>) {
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(uuid::Uuid::new_v4().into_bytes());
        let pending = Arc::new(AtomicI64::new(0));
        self.targets.lock().insert(
            key.clone(),
            Target {
                consumer,
                sink,
                pending: Arc::clone(&pending),
            },
        );
        (key, pending)
    }

    pub fn unregister(&self, key: &str) {
        self.targets.lock().remove(key);
    }

    /// Whether a reply address names a live consumer.
    pub fn exists(&self, address: &str) -> bool {
        address
            .strip_prefix(ADDRESS_PREFIX)
            .is_some_and(|key| self.targets.lock().contains_key(key))
    }

    /// Delivers a reply; false if no consumer has that address.
    pub fn deliver(&self, address: &str, message: Arc<Message>) -> bool {
        let Some(key) = address.strip_prefix(ADDRESS_PREFIX) else {
            return false;
        };
        let targets = self.targets.lock();
        let Some(target) = targets.get(key) else {
            return false;
        };
        if target.pending.load(Ordering::Relaxed) >= MAX_PENDING {
            tracing::debug!("direct reply-to consumer is not keeping up; reply dropped");
            return true;
        }
        target.pending.fetch_add(1, Ordering::Relaxed);
        let delivery = Delivery {
            consumer: target.consumer,
            offset: REPLY_OFFSET,
            redelivered: false,
            delivery_count: 0,
            message,
        };
        if target.sink.send(QueueEvent::Deliver(delivery)).is_err() {
            target.pending.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }
}
