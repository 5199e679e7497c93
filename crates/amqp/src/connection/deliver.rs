//! Deliveries: what queues send this connection's consumers becomes `basic.deliver` frames,
//! counted against the channel's prefetch and the consumer's credit, which acknowledgements
//! and written output give back.

use std::sync::atomic::Ordering;

use amq_protocol::protocol::{AMQPClass, basic};
use sluice_broker::queue::{ConsumerId, Credit, QueueEvent, SettleOp};

use super::{Completion, Connection, State};
use crate::codec;
use crate::convert::short;
use crate::reply_to::REPLY_OFFSET;

/// Window credit each consumer starts with (see `Credit`).
pub const CONSUMER_WINDOW: i64 = 1024;

impl Connection {
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

    pub(super) fn deliver(&mut self, delivery: sluice_broker::queue::Delivery, now_ms: i64) {
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
    pub(super) fn cancelled_by_queue(&mut self, consumer: ConsumerId) {
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
}
