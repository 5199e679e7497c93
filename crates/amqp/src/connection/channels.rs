//! Channels: `channel.open` and `close`, the gate every method on a channel passes, dispatch to
//! the method classes, and releasing what a closing channel holds (its consumers, and its
//! unacknowledged deliveries, which go back to their queues). The hot `basic` methods, handled
//! without awaiting, are timed one call in [`HOT_TIMING_EVERY`].

use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel};
use foldhash::{HashMap, HashMapExt};
use sluice_broker::limits::Limit;
use sluice_broker::queue::{ConsumerId, Queue, QueueEvent, SettleOp};

use super::{Connection, Step};
use crate::channel::{Channel, Content};
use crate::errors::{self, Exception};
use crate::observe::ChannelInfo;

/// Whether a method on a channel goes ahead.
pub(super) enum Gate {
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
pub(super) const HOT_METHODS: usize = 4;

/// Sampled timing of one hot method on one connection.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct HotTiming {
    /// Calls since the last timed one.
    untimed: u32,
    /// How long the last timed call took; `None` until one was, so the first is always timed.
    last: Option<Duration>,
}

/// The acknowledgements, handled without awaiting like publishes (which the decoder gives
/// as [`crate::codec::Frame::Publish`]).
pub(super) fn is_settlement(method: &basic::AMQPMethod) -> bool {
    matches!(
        method,
        basic::AMQPMethod::Ack(_) | basic::AMQPMethod::Nack(_) | basic::AMQPMethod::Reject(_)
    )
}

impl Connection {
    /// Refreshes this connection's channels in the operators' registry.
    pub(super) fn report_channels(&mut self) {
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

    /// A `basic.*` method handled without awaiting: checked against the channel's state,
    /// handled and timed.
    pub(super) fn on_gated(
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

    pub(super) async fn on_channel_method(
        &mut self,
        id: u16,
        method: AMQPClass,
    ) -> Result<(), Exception> {
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
    pub(super) fn gate(&self, id: u16, class_id: u16, method_id: u16) -> Result<Gate, Exception> {
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

    pub(super) async fn dispatch(&mut self, id: u16, method: AMQPClass) -> Result<(), Exception> {
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
    pub(super) fn drain_mailbox_for(&mut self, gone: &[ConsumerId]) {
        let mut kept = Vec::new();
        while let Ok(event) = self.mailbox.try_recv() {
            match &event {
                QueueEvent::Deliver(d) if gone.contains(&d.consumer) => {}
                _ => kept.push(event),
            }
        }
        self.on_events(&mut kept);
    }

    pub(super) async fn close_all_channels(&mut self) {
        self.flush_publishes().await;
        self.flush_settles().await;
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel(id).await;
        }
        self.channels.clear();
    }

    /// Counts the hot methods handled since their last timed call, each as long as that call
    /// took, so that the histograms' counts are exact as of every tick.
    pub(super) fn flush_hot_timing(&mut self) {
        for (slot, method_id) in HOT_METHOD_IDS.into_iter().enumerate() {
            let untimed = std::mem::take(&mut self.hot_timing[slot].untimed);
            if let Some(last) = self.hot_timing[slot].last
                && untimed > 0
            {
                self.count_method(60, method_id, last, u64::from(untimed));
            }
        }
    }

    pub(super) fn observe_method(
        &self,
        class_id: u16,
        method_id: u16,
        started: std::time::Instant,
    ) {
        self.count_method(class_id, method_id, started.elapsed(), 1);
    }

    /// Counts `times` calls of a method that took `elapsed` each.
    pub(super) fn count_method(
        &self,
        class_id: u16,
        method_id: u16,
        elapsed: Duration,
        times: u64,
    ) {
        if let Some(histogram) = self
            .ctx
            .frontend
            .metrics
            .method_latency(class_id, method_id)
        {
            histogram.observe_many(elapsed, times);
        }
    }
}
