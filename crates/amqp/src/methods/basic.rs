//! `basic.*`: qos, consume, cancel, publish (with mandatory returns and confirms), get,
//! ack / nack / reject, recover.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use bytes::Bytes;
use sluice_broker::ResourceKind;
use sluice_broker::declare::generated_name;
use sluice_broker::limits::Limit;
use sluice_broker::message::value::{self, lookup};
use sluice_broker::message::{Message, MessageProperties, validate_expiration};
use sluice_broker::queue::{ConsumerId, Credit, NewConsumer, SettleOp};
use sluice_broker::users::Access;

use super::raise;
use crate::channel::{Consumer, TxPublish, Unacked};
use crate::connection::{CONSUMER_WINDOW, Completion, Connection, QosReading};
use crate::convert::{properties_from_wire, short, table_from_wire};
use crate::errors::{self, Exception};
use crate::reply_to;

/// Message credit of a consumer with no prefetch limit (or no acknowledgements).
const UNLIMITED: i64 = 1 << 40;

impl Connection {
    pub(crate) async fn basic_method(
        &mut self,
        channel: u16,
        method: basic::AMQPMethod,
    ) -> Result<(), Exception> {
        match method {
            basic::AMQPMethod::Consume(consume) => self.consume(channel, consume).await,
            basic::AMQPMethod::Cancel(cancel) => self.cancel(channel, cancel).await,
            basic::AMQPMethod::Get(get) => self.get(channel, get).await,
            other => self.basic_method_now(channel, other),
        }
    }

    /// The `basic.*` methods that wait on nothing: what they hand to queues is batched.
    pub(crate) fn basic_method_now(
        &mut self,
        channel: u16,
        method: basic::AMQPMethod,
    ) -> Result<(), Exception> {
        match method {
            basic::AMQPMethod::Qos(qos) => {
                let reading = self.capabilities.qos;
                if let Some(state) = self.channels.get_mut(&channel) {
                    match (reading, qos.global) {
                        // The specification's reading: one limit for the whole channel, now.
                        (QosReading::Specification, _) => {
                            state.global_prefetch = qos.prefetch_count;
                            state.prefetch = 0;
                        }
                        (QosReading::RabbitMq, true) => {
                            state.global_prefetch = qos.prefetch_count;
                        }
                        // As RabbitMQ: a per-consumer prefetch also lifts a channel-wide one.
                        (QosReading::RabbitMq, false) => {
                            state.prefetch = qos.prefetch_count;
                            state.global_prefetch = 0;
                        }
                    }
                }
                self.apply_channel_limit(channel);
                self.send(
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Publish(publish) => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.content = crate::channel::Content::Header(Arc::new(publish));
                }
                Ok(())
            }
            basic::AMQPMethod::Ack(ack) => {
                self.settle(channel, ack.delivery_tag, ack.multiple, SettleOp::Ack)
            }
            basic::AMQPMethod::Nack(nack) => {
                let op = if nack.requeue {
                    SettleOp::Requeue
                } else {
                    SettleOp::Reject
                };
                self.settle(channel, nack.delivery_tag, nack.multiple, op)
            }
            basic::AMQPMethod::Reject(reject) => {
                let op = if reject.requeue {
                    SettleOp::Requeue
                } else {
                    SettleOp::Reject
                };
                self.settle(channel, reject.delivery_tag, false, op)
            }
            basic::AMQPMethod::Recover(recover) => {
                self.recover(channel, recover.requeue)?;
                self.send(
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(recover) => self.recover(channel, recover.requeue),
            other => Err(Exception::new(
                errors::COMMAND_INVALID,
                format!("unexpected method {other:?}"),
            )),
        }
    }

    async fn consume(&mut self, channel: u16, consume: basic::Consume) -> Result<(), Exception> {
        let tag = match consume.consumer_tag.as_str() {
            "" => generated_name("amq.ctag"),
            tag => tag.to_owned(),
        };
        let reuse = || {
            Exception::new(
                errors::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            )
        };
        let state = self
            .channels
            .get(&channel)
            .ok_or_else(|| Exception::new(errors::CHANNEL_ERROR, "channel is not open"))?;
        if state.consumers.contains_key(&tag)
            || state.reply.as_ref().is_some_and(|(t, _, _)| *t == tag)
        {
            return Err(reuse());
        }
        let max = self.ctx.settings.consumer_max_per_channel;
        if state.consumers.len() + usize::from(state.reply.is_some()) >= max {
            self.ctx.broker.refused(Limit::ConsumersPerChannel);
            return Err(Exception::new(
                errors::NOT_ALLOWED,
                format!("reached maximum ({max}) of consumers per channel"),
            ));
        }
        let id = self.ctx.broker.next_id();
        if consume.queue.as_str() == reply_to::PSEUDO_QUEUE {
            if !consume.no_ack {
                return Err(Exception::new(
                    errors::PRECONDITION_FAILED,
                    "reply consumer cannot acknowledge",
                ));
            }
            if state.reply.is_some() {
                return Err(Exception::new(
                    errors::PRECONDITION_FAILED,
                    "reply consumer already set",
                ));
            }
            let (key, pending) = self.ctx.reply_to.register(id, self.sink.clone());
            self.consumers.insert(
                id,
                Consumer {
                    channel,
                    tag: tag.clone(),
                    queue: None,
                    no_ack: true,
                    credit: Arc::new(Credit::new(UNLIMITED, UNLIMITED)),
                    window_owed: 0,
                    replies: Some(pending),
                    deliver_frames: None,
                },
            );
            if let Some(state) = self.channels.get_mut(&channel) {
                state.reply = Some((tag.clone(), key, id));
            }
            if !consume.nowait {
                self.send(
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: short(&tag),
                    })),
                );
            }
            return Ok(());
        }
        let prefetch = state.prefetch;
        let channel_paused = state.paused;
        let name = self.queue_name(channel, consume.queue.as_str())?;
        self.check_access(Access::Read, ResourceKind::Queue, &name)?;
        let queue = self.usable_queue(&name)?;
        let arguments = table_from_wire(&consume.arguments);
        let priority = match lookup(&arguments, "x-priority") {
            None => 0,
            Some(value) => match value.as_i64() {
                Some(p) => p.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
                None => {
                    return Err(Exception::new(
                        errors::PRECONDITION_FAILED,
                        format!(
                            "invalid arg 'x-priority' for queue '{name}' in vhost '{}': \"expected integer, got {}\"",
                            self.vhost_name(),
                            value.type_name()
                        ),
                    ));
                }
            },
        };
        let messages = if consume.no_ack || prefetch == 0 {
            UNLIMITED
        } else {
            i64::from(prefetch)
        };
        let credit = Arc::new(Credit::new(messages, CONSUMER_WINDOW));
        if channel_paused && !consume.no_ack {
            // The channel's shared prefetch is full: the newcomer waits with the others.
            credit.pause();
        }
        self.consumers.insert(
            id,
            Consumer {
                channel,
                tag: tag.clone(),
                queue: Some(Arc::clone(&queue)),
                no_ack: consume.no_ack,
                credit: Arc::clone(&credit),
                window_owed: 0,
                replies: None,
                deliver_frames: None,
            },
        );
        let registered = queue
            .consume(NewConsumer {
                id,
                no_ack: consume.no_ack,
                exclusive: consume.exclusive,
                priority,
                credit,
                sink: self.sink.clone(),
            })
            .await;
        if let Err(error) = registered {
            self.consumers.remove(&id);
            return Err(raise(error));
        }
        if let Some(state) = self.channels.get_mut(&channel) {
            state.consumers.insert(tag.clone(), id);
        }
        if !consume.nowait {
            self.send(
                channel,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        Ok(())
    }

    async fn cancel(&mut self, channel: u16, cancel: basic::Cancel) -> Result<(), Exception> {
        let tag = cancel.consumer_tag.as_str().to_owned();
        let reply = || {
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                consumer_tag: short(&tag),
            }))
        };
        let Some(state) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        if let Some((reply_tag, key, id)) = state.reply.clone()
            && reply_tag == tag
        {
            state.reply = None;
            self.ctx.reply_to.unregister(&key);
            self.consumers.remove(&id);
        } else if let Some(&id) = state.consumers.get(&tag) {
            if let Some(queue) = self.consumers.get(&id).and_then(|c| c.queue.clone()) {
                let _ = queue.cancel(id).await;
            }
            // Deliveries the queue sent before it forgot the consumer still reach the client:
            // cancel-ok must come after them.
            let mut pending = Vec::new();
            while let Ok(event) = self.mailbox.try_recv() {
                pending.push(event);
            }
            self.on_events(&mut pending);
            if let Some(state) = self.channels.get_mut(&channel) {
                state.consumers.remove(&tag);
            }
            self.consumers.remove(&id);
        }
        if !cancel.nowait {
            self.send(channel, reply());
        }
        Ok(())
    }

    /// A complete `basic.publish`: route it and hand it to its queues (or the transaction).
    pub(crate) fn publish(
        &mut self,
        channel: u16,
        publish: &basic::Publish,
        properties: &Arc<BasicProperties>,
        encoded: Bytes,
        body: Bytes,
    ) -> Result<(), Exception> {
        if publish.immediate {
            return Err(Exception::new(errors::NOT_IMPLEMENTED, "immediate=true"));
        }
        self.note_publish();
        self.ctx.frontend.metrics.published.increment();
        let exchange_name = publish.exchange.as_str();
        let routing_key = publish.routing_key.as_str();
        let table = self.routing();
        if !exchange_name.is_empty() {
            match table.exchange(exchange_name) {
                None => {
                    return Err(Exception::new(
                        errors::NOT_FOUND,
                        format!(
                            "no exchange '{exchange_name}' in vhost '{}'",
                            self.vhost_name()
                        ),
                    ));
                }
                Some(exchange) if exchange.internal => {
                    return Err(Exception::new(
                        errors::ACCESS_REFUSED,
                        format!(
                            "cannot publish to internal exchange '{exchange_name}' in vhost '{}'",
                            self.vhost_name()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let allowed = self
            .channels
            .get(&channel)
            .and_then(|c| c.write_allowed.as_deref())
            == Some(exchange_name);
        if !allowed {
            // RabbitMQ checks the default exchange under the name amq.default.
            let resource = if exchange_name.is_empty() {
                "amq.default"
            } else {
                exchange_name
            };
            self.check_access(Access::Write, ResourceKind::Exchange, resource)?;
            if let Some(state) = self.channels.get_mut(&channel) {
                state.write_allowed = Some(Arc::from(exchange_name));
            }
        }
        // The decoder shares the properties of headers that carry the same ones, and so do
        // the messages made from them.
        let mut props = match &self.last_properties {
            Some((wire, converted)) if Arc::ptr_eq(wire, properties) => Arc::clone(converted),
            _ => {
                let converted = Arc::new(properties_from_wire(properties));
                self.last_properties = Some((Arc::clone(properties), Arc::clone(&converted)));
                converted
            }
        };
        // The received header is delivered as it came unless the broker changes a property.
        let mut encoded = Some(encoded);
        if let Some(expiration) = &props.expiration
            && let Err(reason) = validate_expiration(expiration)
        {
            return Err(Exception::new(
                errors::PRECONDITION_FAILED,
                format!("invalid expiration '{expiration}': {reason}"),
            ));
        }
        if props.reply_to.as_deref() == Some(reply_to::PSEUDO_QUEUE) {
            let Some((_, key, _)) = self.channels.get(&channel).and_then(|c| c.reply.as_ref())
            else {
                return Err(Exception::new(
                    errors::PRECONDITION_FAILED,
                    "fast reply consumer does not exist",
                ));
            };
            Arc::make_mut(&mut props).reply_to = Some(format!("{}{key}", reply_to::ADDRESS_PREFIX));
            encoded = None;
        }
        let extra_keys = props
            .headers
            .as_ref()
            .is_some_and(|h| lookup(h, "CC").is_some() || lookup(h, "BCC").is_some());
        let (exchange, routing_key_shared) = match self.channels.get_mut(&channel) {
            Some(state) => (
                shared(&mut state.last_exchange, exchange_name),
                shared(&mut state.last_routing_key, routing_key),
            ),
            None => (Arc::from(exchange_name), Arc::from(routing_key)),
        };
        let mut message = Message {
            exchange,
            routing_key: routing_key_shared,
            properties: match encoded {
                Some(encoded) => MessageProperties::with_encoding(props, encoded),
                None => props.into(),
            },
            body,
        };
        // Reuse one vector for routing results: most publishes go to one queue.
        let mut queues = std::mem::take(&mut self.route_scratch);
        queues.clear();
        let mut reply_address = None;
        if exchange_name.is_empty() && routing_key.starts_with(reply_to::ADDRESS_PREFIX) {
            reply_address = Some(routing_key.to_owned());
        } else if extra_keys {
            let keys = message.routing_keys();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let _ = table.route(
                exchange_name,
                &keys,
                message.properties.headers.as_ref(),
                &mut queues,
            );
            if let Some(headers) = message.properties.headers.as_mut() {
                value::remove(headers, "BCC");
            }
        } else {
            let _ = table.route(
                exchange_name,
                &[routing_key],
                message.properties.headers.as_ref(),
                &mut queues,
            );
        }
        let message = Arc::new(message);
        let in_tx = self.channels.get(&channel).is_some_and(|c| c.tx.is_some());
        if in_tx {
            let Some(tx) = self.channels.get_mut(&channel).and_then(|c| c.tx.as_mut()) else {
                return Ok(());
            };
            if tx.publishes.len() >= crate::channel::TX_MAX_MESSAGES {
                return Err(Exception::new(
                    errors::PRECONDITION_FAILED,
                    "transaction too large",
                ));
            }
            tx.publishes.push(TxPublish {
                message,
                queues,
                mandatory: publish.mandatory,
                reply_address,
            });
            return Ok(());
        }
        let routed = match &reply_address {
            Some(address) => self.ctx.reply_to.deliver(address, Arc::clone(&message)),
            None => !queues.is_empty(),
        };
        if !routed && publish.mandatory {
            self.send_return(channel, &message);
        }
        let confirm = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.confirms.as_mut())
            .map(|c| c.register(queues.len() as u32));
        for queue in &queues {
            self.enqueue_publish(queue, &message, confirm.map(|seq| (channel, seq)));
        }
        if confirm.is_some() && queues.is_empty() {
            self.emit_confirms(channel);
        }
        queues.clear();
        self.route_scratch = queues;
        Ok(())
    }

    pub(crate) fn send_return(&mut self, channel: u16, message: &Message) {
        self.send(
            channel,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: errors::NO_ROUTE,
                reply_text: short("NO_ROUTE"),
                exchange: short(&message.exchange),
                routing_key: short(&message.routing_key),
            })),
        );
        self.send_content(channel, message);
    }

    async fn get(&mut self, channel: u16, get: basic::Get) -> Result<(), Exception> {
        let name = self.queue_name(channel, get.queue.as_str())?;
        self.check_access(Access::Read, ResourceKind::Queue, &name)?;
        let queue = self.usable_queue(&name)?;
        let got = queue.get(get.no_ack).await.map_err(raise)?;
        if got.is_some() {
            self.ctx.frontend.metrics.delivered.increment();
        }
        let Some(got) = got else {
            self.send(
                channel,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let now_ms = self.ctx.broker.clock().now_ms();
        let Some(state) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        let delivery_tag = state.next_delivery_tag();
        if !get.no_ack {
            state.unacked.insert(
                delivery_tag,
                Unacked {
                    queue,
                    offset: got.delivery.offset,
                    consumer: None,
                    delivered_ms: now_ms,
                },
            );
        }
        let message = got.delivery.message;
        self.send(
            channel,
            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag,
                redelivered: got.delivery.redelivered,
                exchange: short(&message.exchange),
                routing_key: short(&message.routing_key),
                message_count: got.message_count.min(u64::from(u32::MAX)) as u32,
            })),
        );
        self.send_content(channel, &message);
        Ok(())
    }

    /// `basic.ack`, `nack` and `reject`.
    fn settle(
        &mut self,
        channel: u16,
        tag: u64,
        multiple: bool,
        op: SettleOp,
    ) -> Result<(), Exception> {
        let Some(state) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        let Some(deliveries) = state.take_unacked(tag, multiple) else {
            return Err(Exception::new(
                errors::PRECONDITION_FAILED,
                format!("unknown delivery tag {tag}"),
            ));
        };
        if let Some(tx) = state.tx.as_mut() {
            tx.settles.push((op, deliveries));
            return Ok(());
        }
        self.apply_settles(channel, op, deliveries);
        Ok(())
    }

    /// Hands settlements to their queues and gives consumers their credit back.
    pub(crate) fn apply_settles(
        &mut self,
        channel: u16,
        op: SettleOp,
        deliveries: Vec<(u64, Unacked)>,
    ) {
        let mut freed = 0u32;
        for (_, delivery) in deliveries {
            self.enqueue_settle(&delivery.queue, op, delivery.offset);
            if let Some(consumer) = delivery.consumer {
                freed += 1;
                if let Some(entry) = self.consumers.get(&consumer)
                    && !entry.no_ack
                {
                    // The Settle request wakes the queue; the credit just has to be there.
                    let _ = entry.credit.grant(1, 0);
                }
            }
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        state.consumer_unacked = state.consumer_unacked.saturating_sub(freed);
        if freed > 0 {
            self.apply_channel_limit(channel);
        }
    }

    /// Keeps a channel's shared prefetch: pauses the credit of its acknowledging consumers
    /// when it is full, so that their queues stop offering them messages, and resumes it
    /// (waking the queues that ran dry meanwhile) once there is room again. Does nothing when
    /// the channel's state already matches.
    pub(crate) fn apply_channel_limit(&mut self, channel: u16) {
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let full = state.is_full();
        if full == state.paused {
            return;
        }
        state.paused = full;
        let ids: Vec<ConsumerId> = state.consumers.values().copied().collect();
        for id in ids {
            let Some(consumer) = self.consumers.get(&id) else {
                continue;
            };
            if consumer.no_ack {
                continue;
            }
            let Some(queue) = consumer.queue.clone() else {
                continue;
            };
            if full {
                consumer.credit.pause();
            } else if consumer.credit.resume() {
                self.pending.push(Box::pin(async move {
                    let _ = queue.wake().await;
                    Completion::Nothing
                }));
            }
        }
    }

    fn recover(&mut self, channel: u16, requeue: bool) -> Result<(), Exception> {
        if !requeue {
            return Err(Exception::new(errors::NOT_IMPLEMENTED, "requeue=false"));
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        let deliveries: Vec<(u64, Unacked)> =
            std::mem::take(&mut state.unacked).into_iter().collect();
        self.apply_settles(channel, SettleOp::Requeue, deliveries);
        Ok(())
    }
}

/// `text` as a shared string: the one `last` holds if it is the same, else a new one that
/// `last` then keeps. Publishers mostly repeat their exchange and routing key.
fn shared(last: &mut Option<Arc<str>>, text: &str) -> Arc<str> {
    match last {
        Some(held) if **held == *text => Arc::clone(held),
        _ => {
            let fresh: Arc<str> = Arc::from(text);
            *last = Some(Arc::clone(&fresh));
            fresh
        }
    }
}
