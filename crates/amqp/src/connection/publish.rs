//! Publishing: content frames assembled into messages, publishes and acknowledgements batched
//! per queue and handed over once per read (or sooner past [`PUBLISH_BATCH_MESSAGES`] or
//! [`PUBLISH_BATCH_BYTES`]), and publisher confirms, sent in order once what they confirm is
//! in its queues (and on disk, for persistent messages in durable queues).

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, basic};
use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use sluice_broker::message::Message;
use sluice_broker::queue::{Queue, SettleOp};

use super::{Completion, Connection, QueueBatch, SettleBatch, Step};
use crate::channel::Content;
use crate::codec;
use crate::errors::{self, Exception};

/// Publishes held before they are handed to their queues mid-read.
pub(super) const PUBLISH_BATCH_MESSAGES: usize = 2048;
pub(super) const PUBLISH_BATCH_BYTES: usize = 8 * 1024 * 1024;

impl Connection {
    pub(super) fn on_content_header(
        &mut self,
        id: u16,
        header: codec::ContentHeader,
        encoded: Bytes,
    ) -> Step {
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

    pub(super) fn on_content_body(&mut self, id: u16, part: Bytes) -> Step {
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
    pub(super) fn publish_step(
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
    pub(super) fn hold_for(&mut self, queue: &Arc<Queue>) {
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
