//! A queue's delivery state, as a pure state machine.
//!
//! It knows which offsets of the queue's log are ready (waiting for a consumer), which are
//! delivered and unacknowledged, and who consumes; it decides who gets what, when messages
//! expire, overflow, are requeued or dead-lettered. Inputs are calls with the current time;
//! outputs are [`Effect`]s that the queue's owner task carries out (reading message bodies,
//! sending deliveries, writing the acknowledgement journal, publishing dead letters). Message
//! metadata and consumer credit come through [`QueueEnv`], so tests drive it with a table and
//! counters, without logs, sockets or clocks.
//!
//! Rules (those of RabbitMQ's classic queues unless noted):
//! - Ready messages are delivered in offset order within a priority level, highest level first.
//!   A requeued message goes back to its original position and is marked redelivered.
//! - Consumers are served round-robin among the highest-priority consumers that have credit;
//!   with single-active-consumer only the earliest registered consumer receives.
//! - Messages expire only at the head of their level (RabbitMQ's rule); an expired message is
//!   dead-lettered (reason `expired`) or dropped.
//! - `x-max-length` / `x-max-length-bytes` count ready messages only. With `drop-head` the
//!   oldest ready messages are dead-lettered (`maxlen`) until the queue fits; with
//!   `reject-publish(-dlx)` a publish to a full queue is refused.
//! - `x-delivery-limit` (a quorum-queue feature): a message returned more often than the
//!   limit is dead-lettered (`delivery_limit`) instead of requeued.
//! - A message that cannot be read (an I/O error, a checksum mismatch) is never settled: the
//!   queue stops delivering, expiring and trimming where it stands, keeps the message, and
//!   goes on once it can be read or an operator removes it (purge, delete). The environment
//!   keeps the reason; the owner raises the alarm.
//!
//! Memory: one range per run of consecutive ready offsets, one entry per unacknowledged
//! message (bounded by consumers' prefetch) and per requeued message.

use std::collections::BTreeMap;
use std::ops::Range;

use foldhash::{HashMap, HashMapExt};

use super::args::{Overflow, QueueArgs};
use super::ranges::RangeSet;

/// Identifies a consumer across the broker.
pub type ConsumerId = u64;

/// What the state machine needs to know about a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub bytes: u32,
    pub expires_at_ms: Option<i64>,
    pub priority: u8,
}

/// A stored message could not be read; the environment knows why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// The state machine's view of the world outside.
pub trait QueueEnv {
    /// Metadata of a stored message, or [`Unreadable`]: the message is then kept where it is
    /// and nothing behind it in delivery order moves.
    fn meta(&mut self, offset: u64) -> Result<Meta, Unreadable>;
    /// Takes credit to deliver a message of `bytes` to `consumer`; false if it has none left
    /// (the environment then remembers that the consumer is waiting for credit).
    fn take_credit(&mut self, consumer: ConsumerId, bytes: u32) -> bool;
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    Rejected,
    Expired,
    MaxLen,
    DeliveryLimit,
}

impl DeathReason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::MaxLen => "maxlen",
            Self::DeliveryLimit => "delivery_limit",
        }
    }
}

/// What the owner task must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send the message at `offset` to `consumer`. With `settled` the consumer does not
    /// acknowledge, and the message is settled as sent.
    Deliver {
        consumer: ConsumerId,
        offset: u64,
        meta: Meta,
        redelivered: bool,
        delivery_count: u32,
        settled: bool,
    },
    /// Dead-letter the message at `offset`; it is settled in this queue.
    DeadLetter {
        offset: u64,
        meta: Meta,
        reason: DeathReason,
    },
    /// These offsets are settled: acknowledged, dropped or purged.
    Settle(Range<u64>),
    /// An auto-delete queue lost its last consumer.
    AutoDelete,
    /// The queue has been unused for longer than `x-expires`.
    Expire,
}

/// How a client settles delivered messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SettleOp {
    Ack,
    /// Back to the queue, marked redelivered (nack/reject with requeue, recover, channel gone).
    Requeue,
    /// Dead-lettered (or dropped without a dead-letter exchange).
    Reject,
    /// Never handed to the client: back to the queue unchanged.
    Return,
}

/// The answer to a publish that may be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accept,
    Reject,
    /// Refused, and to be dead-lettered.
    RejectDeadLetter,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Consumer {
    id: ConsumerId,
    no_ack: bool,
    exclusive: bool,
    priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unacked {
    consumer: Option<ConsumerId>,
    meta: Meta,
    delivery_count: u32,
}

/// A consumer the queue refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeError {
    /// Another consumer holds exclusive access, or exclusive access was asked while others
    /// consume.
    ExclusiveInUse,
}

/// A message taken by `basic.get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Got {
    pub offset: u64,
    pub meta: Meta,
    pub redelivered: bool,
    pub delivery_count: u32,
}

#[derive(Debug)]
pub struct QueueCore {
    args: QueueArgs,
    has_dead_letter_exchange: bool,
    /// Ready offsets, by priority level (index = level).
    levels: Vec<RangeSet>,
    ready_bytes: u64,
    /// Whether `ready_bytes` is kept (only needed for `x-max-length-bytes`).
    track_bytes: bool,
    unacked: BTreeMap<u64, Unacked>,
    /// Ready messages that were delivered before: their delivery count.
    returned: HashMap<u64, u32>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    auto_delete: bool,
    had_consumer: bool,
    last_used_ms: i64,
    /// Some message, or the queue itself, can expire: deadlines are worth computing.
    may_expire: bool,
}

impl QueueCore {
    /// A queue with `ready` messages at start (after recovery), or none.
    pub fn new(args: QueueArgs, auto_delete: bool, now_ms: i64) -> Self {
        let level_count = usize::from(args.max_priority.unwrap_or(0)) + 1;
        Self {
            has_dead_letter_exchange: args.dead_letter_exchange.is_some(),
            track_bytes: args.max_length_bytes.is_some(),
            args,
            levels: vec![RangeSet::new(); level_count],
            ready_bytes: 0,
            unacked: BTreeMap::new(),
            returned: HashMap::new(),
            consumers: Vec::new(),
            next_consumer: 0,
            auto_delete,
            had_consumer: false,
            last_used_ms: now_ms,
            may_expire: false,
        }
        .with_expiry_from_args()
    }

    fn with_expiry_from_args(mut self) -> Self {
        self.may_expire = self.args.message_ttl_ms.is_some() || self.args.expires_ms.is_some();
        self
    }

    /// Whether anything in this queue can ever expire (else [`Self::next_deadline`] is `None`).
    pub fn may_expire(&self) -> bool {
        self.may_expire
    }

    /// Notes that a restored message carries an expiry.
    pub fn note_expiry(&mut self) {
        self.may_expire = true;
    }

    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    /// Adds recovered ready messages at `level` (after a restart).
    pub fn restore_ready(&mut self, level: u8, offsets: Range<u64>, bytes: u64) {
        let level = self.level_of(level);
        self.levels[level].insert_range(offsets);
        self.ready_bytes += bytes;
    }

    /// Whether recovery must supply per-message priorities and sizes (a scan of the log).
    pub fn needs_message_scan(&self) -> bool {
        self.levels.len() > 1 || self.track_bytes
    }

    fn level_of(&self, priority: u8) -> usize {
        usize::from(priority).min(self.levels.len() - 1)
    }

    pub fn ready_count(&self) -> u64 {
        self.levels.iter().map(RangeSet::len).sum()
    }

    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// The smallest offset not yet settled, if any: the log may drop everything below it.
    pub fn min_unsettled(&self) -> Option<u64> {
        let ready = self.levels.iter().filter_map(RangeSet::first).min();
        let unacked = self.unacked.keys().next().copied();
        match (ready, unacked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Every unsettled offset (ready or unacknowledged): the complement of what the
    /// acknowledgement journal records.
    pub fn unsettled(&self) -> RangeSet {
        let mut all = RangeSet::new();
        for level in &self.levels {
            for range in level.ranges() {
                all.insert_range(range);
            }
        }
        for offset in self.unacked.keys() {
            all.insert(*offset);
        }
        all
    }

    /// Notes a use of the queue (declare, get, consume) for `x-expires`.
    pub fn touch(&mut self, now_ms: i64) {
        self.last_used_ms = now_ms;
    }

    /// Whether a new message of `bytes` may enter, under `reject-publish(-dlx)`.
    pub fn admit(&self) -> Admission {
        if self.args.overflow == Overflow::DropHead {
            return Admission::Accept;
        }
        let full = self
            .args
            .max_length
            .is_some_and(|max| self.ready_count() >= max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes >= max);
        match (full, self.args.overflow) {
            (false, _) => Admission::Accept,
            (true, Overflow::RejectPublishDlx) if self.has_dead_letter_exchange => {
                Admission::RejectDeadLetter
            }
            (true, _) => Admission::Reject,
        }
    }

    /// A message was appended at `offset`: deliver it at once if a consumer can take it and
    /// nothing is ahead of it, otherwise make it ready (and trim the queue to its limits).
    pub fn enqueue(
        &mut self,
        offset: u64,
        meta: Meta,
        now_ms: i64,
        env: &mut dyn QueueEnv,
        fx: &mut Vec<Effect>,
    ) {
        if meta.expires_at_ms.is_some() {
            self.may_expire = true;
        }
        let level = self.level_of(meta.priority);
        let nothing_ahead = self.levels.iter().all(RangeSet::is_empty);
        if nothing_ahead
            && meta.expires_at_ms.is_none_or(|at| at >= now_ms)
            && let Some(index) = self.pick_consumer(meta.bytes, env)
        {
            self.deliver_to(index, offset, meta, false, 0, fx);
            return;
        }
        self.levels[level].insert(offset);
        if self.track_bytes {
            self.ready_bytes += u64::from(meta.bytes);
        }
        self.enforce_limits(now_ms, env, fx);
    }

    fn over_limits(&self) -> bool {
        self.args
            .max_length
            .is_some_and(|max| self.ready_count() > max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes > max)
    }

    fn enforce_limits(&mut self, _now_ms: i64, env: &mut dyn QueueEnv, fx: &mut Vec<Effect>) {
        if self.args.overflow != Overflow::DropHead {
            return;
        }
        while self.over_limits() {
            let Some((level, offset)) = self.head() else {
                break;
            };
            let Ok(meta) = env.meta(offset) else {
                // Kept, over the limit, until it can be read.
                break;
            };
            self.take_ready(level, offset, meta);
            self.dead_letter_or_drop(offset, meta, DeathReason::MaxLen, fx);
        }
    }

    /// The next ready message in delivery order.
    fn head(&self) -> Option<(usize, u64)> {
        self.levels
            .iter()
            .enumerate()
            .rev()
            .find_map(|(level, set)| set.first().map(|offset| (level, offset)))
    }

    fn take_ready(&mut self, level: usize, offset: u64, meta: Meta) -> u32 {
        self.levels[level].remove(offset);
        if self.track_bytes {
            self.ready_bytes = self.ready_bytes.saturating_sub(u64::from(meta.bytes));
        }
        self.returned.remove(&offset).unwrap_or(0)
    }

    fn dead_letter_or_drop(
        &mut self,
        offset: u64,
        meta: Meta,
        reason: DeathReason,
        fx: &mut Vec<Effect>,
    ) {
        if self.has_dead_letter_exchange {
            fx.push(Effect::DeadLetter {
                offset,
                meta,
                reason,
            });
        } else {
            fx.push(Effect::Settle(offset..offset + 1));
        }
    }

    /// The consumer (index) that gets the next message, taking its credit.
    fn pick_consumer(&mut self, bytes: u32, env: &mut dyn QueueEnv) -> Option<usize> {
        let count = self.consumers.len();
        if count == 0 {
            return None;
        }
        if self.args.single_active_consumer {
            let id = self.consumers[0].id;
            return env.take_credit(id, bytes).then_some(0);
        }
        // Highest consumer priority first; round-robin among equals. Walk the priority levels
        // downwards without allocating: the common case is a single level.
        let mut level = self.consumers.iter().map(|c| c.priority).max()?;
        loop {
            for step in 0..count {
                let index = (self.next_consumer + step) % count;
                let consumer = &self.consumers[index];
                if consumer.priority == level && env.take_credit(consumer.id, bytes) {
                    self.next_consumer = (index + 1) % count;
                    return Some(index);
                }
            }
            level = self
                .consumers
                .iter()
                .map(|c| c.priority)
                .filter(|p| *p < level)
                .max()?;
        }
    }

    fn deliver_to(
        &mut self,
        index: usize,
        offset: u64,
        meta: Meta,
        redelivered: bool,
        delivery_count: u32,
        fx: &mut Vec<Effect>,
    ) {
        let consumer = &self.consumers[index];
        let settled = consumer.no_ack;
        if !settled {
            self.unacked.insert(
                offset,
                Unacked {
                    consumer: Some(consumer.id),
                    meta,
                    delivery_count,
                },
            );
        }
        fx.push(Effect::Deliver {
            consumer: consumer.id,
            offset,
            meta,
            redelivered,
            delivery_count,
            settled,
        });
    }

    /// Delivers ready messages to consumers for as long as both last.
    pub fn dispatch(&mut self, now_ms: i64, env: &mut dyn QueueEnv, fx: &mut Vec<Effect>) {
        if self.consumers.is_empty() {
            return;
        }
        while let Some((level, offset)) = self.head() {
            let Ok(meta) = env.meta(offset) else {
                break;
            };
            if meta.expires_at_ms.is_some_and(|at| at <= now_ms) {
                self.take_ready(level, offset, meta);
                self.dead_letter_or_drop(offset, meta, DeathReason::Expired, fx);
                continue;
            }
            let Some(index) = self.pick_consumer(meta.bytes, env) else {
                break;
            };
            let delivery_count = self.take_ready(level, offset, meta);
            self.deliver_to(index, offset, meta, delivery_count > 0, delivery_count, fx);
        }
    }

    /// Expires messages at the heads of the levels, and reports an unused `x-expires` queue.
    pub fn tick(&mut self, now_ms: i64, env: &mut dyn QueueEnv, fx: &mut Vec<Effect>) {
        for level in 0..self.levels.len() {
            while let Some(offset) = self.levels[level].first() {
                match env.meta(offset) {
                    Ok(meta) if meta.expires_at_ms.is_some_and(|at| at <= now_ms) => {
                        self.take_ready(level, offset, meta);
                        self.dead_letter_or_drop(offset, meta, DeathReason::Expired, fx);
                    }
                    Ok(_) | Err(Unreadable) => break,
                }
            }
        }
        if let Some(expires_ms) = self.args.expires_ms
            && self.consumers.is_empty()
            && now_ms >= self.last_used_ms.saturating_add(expires_ms as i64)
        {
            fx.push(Effect::Expire);
        }
        self.dispatch(now_ms, env, fx);
    }

    /// When the next message expires or the queue itself does, if ever.
    pub fn next_deadline(&mut self, env: &mut dyn QueueEnv) -> Option<i64> {
        let mut deadline: Option<i64> = None;
        let mut consider = |at: i64| deadline = Some(deadline.map_or(at, |d| d.min(at)));
        for level in &self.levels {
            if let Some(offset) = level.first()
                && let Some(at) = env.meta(offset).ok().and_then(|m| m.expires_at_ms)
            {
                consider(at);
            }
        }
        if let Some(expires_ms) = self.args.expires_ms
            && self.consumers.is_empty()
        {
            consider(self.last_used_ms.saturating_add(expires_ms as i64));
        }
        deadline
    }

    pub fn add_consumer(
        &mut self,
        id: ConsumerId,
        no_ack: bool,
        exclusive: bool,
        priority: i32,
        now_ms: i64,
    ) -> Result<(), ConsumeError> {
        if self.consumers.iter().any(|c| c.exclusive) || (exclusive && !self.consumers.is_empty()) {
            return Err(ConsumeError::ExclusiveInUse);
        }
        self.consumers.push(Consumer {
            id,
            no_ack,
            exclusive,
            priority,
        });
        self.had_consumer = true;
        self.last_used_ms = now_ms;
        Ok(())
    }

    /// Removes a consumer (basic.cancel). Its unacknowledged messages stay with the channel,
    /// which may still settle them.
    pub fn remove_consumer(&mut self, id: ConsumerId, now_ms: i64, fx: &mut Vec<Effect>) -> bool {
        let before = self.consumers.len();
        self.consumers.retain(|c| c.id != id);
        let removed = self.consumers.len() != before;
        if self.next_consumer >= self.consumers.len() {
            self.next_consumer = 0;
        }
        if removed {
            self.last_used_ms = now_ms;
            if self.auto_delete && self.had_consumer && self.consumers.is_empty() {
                fx.push(Effect::AutoDelete);
            }
        }
        removed
    }

    /// A consumer's channel is gone without settling: removes it and requeues what it held.
    pub fn consumer_gone(
        &mut self,
        id: ConsumerId,
        now_ms: i64,
        env: &mut dyn QueueEnv,
        fx: &mut Vec<Effect>,
    ) {
        self.remove_consumer(id, now_ms, fx);
        let held: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.consumer == Some(id))
            .map(|(offset, _)| *offset)
            .collect();
        self.settle(&held, SettleOp::Requeue, now_ms, env, fx);
    }

    /// Settles delivered messages. Offsets that are not unacknowledged here are ignored.
    pub fn settle(
        &mut self,
        offsets: &[u64],
        op: SettleOp,
        now_ms: i64,
        env: &mut dyn QueueEnv,
        fx: &mut Vec<Effect>,
    ) {
        for &offset in offsets {
            let Some(unacked) = self.unacked.remove(&offset) else {
                continue;
            };
            match op {
                SettleOp::Ack => fx.push(Effect::Settle(offset..offset + 1)),
                SettleOp::Reject => {
                    self.dead_letter_or_drop(offset, unacked.meta, DeathReason::Rejected, fx);
                }
                SettleOp::Requeue => {
                    let count = unacked.delivery_count + 1;
                    if self
                        .args
                        .delivery_limit
                        .is_some_and(|limit| u64::from(count) > limit)
                    {
                        self.dead_letter_or_drop(
                            offset,
                            unacked.meta,
                            DeathReason::DeliveryLimit,
                            fx,
                        );
                    } else {
                        self.make_ready(offset, unacked.meta, count);
                    }
                }
                SettleOp::Return => {
                    self.make_ready(offset, unacked.meta, unacked.delivery_count);
                }
            }
        }
        if op == SettleOp::Requeue || op == SettleOp::Return {
            self.enforce_limits(now_ms, env, fx);
        }
        self.dispatch(now_ms, env, fx);
    }

    fn make_ready(&mut self, offset: u64, meta: Meta, delivery_count: u32) {
        let level = self.level_of(meta.priority);
        self.levels[level].insert(offset);
        if self.track_bytes {
            self.ready_bytes += u64::from(meta.bytes);
        }
        if delivery_count > 0 {
            self.returned.insert(offset, delivery_count);
        }
    }

    /// `basic.get`: the next ready message, if any; [`Unreadable`] if the next one cannot
    /// be read (it stays where it is).
    pub fn get(
        &mut self,
        no_ack: bool,
        now_ms: i64,
        env: &mut dyn QueueEnv,
        fx: &mut Vec<Effect>,
    ) -> Result<Option<Got>, Unreadable> {
        self.last_used_ms = now_ms;
        while let Some((level, offset)) = self.head() {
            let meta = env.meta(offset)?;
            let delivery_count = self.take_ready(level, offset, meta);
            if meta.expires_at_ms.is_some_and(|at| at <= now_ms) {
                self.dead_letter_or_drop(offset, meta, DeathReason::Expired, fx);
                continue;
            }
            if no_ack {
                fx.push(Effect::Settle(offset..offset + 1));
            } else {
                self.unacked.insert(
                    offset,
                    Unacked {
                        consumer: None,
                        meta,
                        delivery_count,
                    },
                );
            }
            return Ok(Some(Got {
                offset,
                meta,
                redelivered: delivery_count > 0,
                delivery_count,
            }));
        }
        Ok(None)
    }

    /// A message the owner could not read when it came to deliver or dead-letter it (after its
    /// metadata had been read): it goes back to ready at its place, never settled, and any
    /// unacknowledged entry for it is dropped (the consumer never got it).
    pub fn keep_unreadable(&mut self, offset: u64, meta: Meta, delivery_count: u32) {
        self.unacked.remove(&offset);
        self.make_ready(offset, meta, delivery_count);
    }

    /// Whether `offset` is unsettled here: ready, or delivered and unacknowledged.
    pub fn holds(&self, offset: u64) -> bool {
        self.unacked.contains_key(&offset) || self.levels.iter().any(|level| level.contains(offset))
    }

    /// Drops every ready message; returns how many there were.
    pub fn purge(&mut self, fx: &mut Vec<Effect>) -> u64 {
        let mut count = 0;
        for level in &mut self.levels {
            for range in level.ranges() {
                count += range.end - range.start;
                fx.push(Effect::Settle(range));
            }
            level.clear();
        }
        let unacked = &self.unacked;
        self.returned
            .retain(|offset, _| unacked.contains_key(offset));
        self.ready_bytes = 0;
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Message metadata from a table, credit from counters.
    #[derive(Default)]
    struct Env {
        metas: HashMap<u64, Meta>,
        credit: HashMap<ConsumerId, u32>,
        starved: Vec<ConsumerId>,
    }

    impl QueueEnv for Env {
        fn meta(&mut self, offset: u64) -> Result<Meta, Unreadable> {
            self.metas.get(&offset).copied().ok_or(Unreadable)
        }
        fn take_credit(&mut self, consumer: ConsumerId, _bytes: u32) -> bool {
            match self.credit.get_mut(&consumer) {
                Some(c) if *c > 0 => {
                    *c -= 1;
                    true
                }
                _ => {
                    self.starved.push(consumer);
                    false
                }
            }
        }
    }

    fn meta(bytes: u32) -> Meta {
        Meta {
            bytes,
            expires_at_ms: None,
            priority: 0,
        }
    }

    fn publish(core: &mut QueueCore, env: &mut Env, offset: u64, meta: Meta) -> Vec<Effect> {
        env.metas.insert(offset, meta);
        let mut fx = Vec::new();
        core.enqueue(offset, meta, 0, env, &mut fx);
        fx
    }

    fn delivered(fx: &[Effect]) -> Vec<(ConsumerId, u64, bool)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Deliver {
                    consumer,
                    offset,
                    redelivered,
                    ..
                } => Some((*consumer, *offset, *redelivered)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn round_robin_within_prefetch_then_waits_for_credit() {
        let mut core = QueueCore::new(QueueArgs::default(), false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 1);
        env.credit.insert(2, 1);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        core.add_consumer(2, false, false, 0, 0).unwrap();
        let mut fx = Vec::new();
        for offset in 0..4 {
            fx.extend(publish(&mut core, &mut env, offset, meta(10)));
        }
        assert_eq!(delivered(&fx), vec![(1, 0, false), (2, 1, false)]);
        assert_eq!(core.ready_count(), 2);
        assert_eq!(core.unacked_count(), 2);
        // Consumer 1 acks and gets credit back: it receives the next ready message.
        env.credit.insert(1, 1);
        let mut fx = Vec::new();
        core.settle(&[0], SettleOp::Ack, 0, &mut env, &mut fx);
        assert_eq!(fx[0], Effect::Settle(0..1));
        assert_eq!(delivered(&fx), vec![(1, 2, false)]);
        assert!(core.holds(1));
    }

    #[test]
    fn requeued_messages_return_to_their_place_marked_redelivered() {
        let mut core = QueueCore::new(QueueArgs::default(), false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 2);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        for offset in 0..3 {
            publish(&mut core, &mut env, offset, meta(1));
        }
        // 0 and 1 delivered, 2 ready. Nack 1 with requeue, then give credit.
        let mut fx = Vec::new();
        core.settle(&[1], SettleOp::Requeue, 0, &mut env, &mut fx);
        assert!(delivered(&fx).is_empty());
        env.credit.insert(1, 2);
        let mut fx = Vec::new();
        core.dispatch(0, &mut env, &mut fx);
        assert_eq!(delivered(&fx), vec![(1, 1, true), (1, 2, false)]);
    }

    #[test]
    fn consumer_gone_requeues_only_its_messages() {
        let mut core = QueueCore::new(QueueArgs::default(), false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 1);
        env.credit.insert(2, 1);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        core.add_consumer(2, false, false, 0, 0).unwrap();
        publish(&mut core, &mut env, 0, meta(1));
        publish(&mut core, &mut env, 1, meta(1));
        let mut fx = Vec::new();
        core.consumer_gone(1, 0, &mut env, &mut fx);
        assert_eq!(core.ready_count(), 1);
        assert_eq!(core.unacked_count(), 1);
        env.credit.insert(2, 1);
        let mut fx = Vec::new();
        core.settle(&[1], SettleOp::Ack, 0, &mut env, &mut fx);
        assert_eq!(delivered(&fx), vec![(2, 0, true)]);
    }

    #[test]
    fn no_ack_deliveries_settle_at_once() {
        let mut core = QueueCore::new(QueueArgs::default(), false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 10);
        core.add_consumer(1, true, false, 0, 0).unwrap();
        let fx = publish(&mut core, &mut env, 0, meta(1));
        assert!(matches!(fx[0], Effect::Deliver { settled: true, .. }));
        assert_eq!(core.unacked_count(), 0);
        assert_eq!(core.min_unsettled(), None);
    }

    #[test]
    fn priorities_deliver_highest_first() {
        let args = QueueArgs {
            max_priority: Some(5),
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        for (offset, priority) in [(0, 1), (1, 9), (2, 3), (3, 5)] {
            publish(
                &mut core,
                &mut env,
                offset,
                Meta {
                    bytes: 1,
                    expires_at_ms: None,
                    priority,
                },
            );
        }
        env.credit.insert(1, 10);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        let mut fx = Vec::new();
        core.dispatch(0, &mut env, &mut fx);
        let order: Vec<u64> = delivered(&fx).iter().map(|d| d.1).collect();
        // Priority 9 is capped at level 5, alongside the message of priority 5.
        assert_eq!(order, vec![1, 3, 2, 0]);
    }

    #[test]
    fn expired_heads_are_dead_lettered_on_tick_and_before_delivery() {
        let args = QueueArgs {
            dead_letter_exchange: Some("dlx".into()),
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        let expiring = |at| Meta {
            bytes: 1,
            expires_at_ms: Some(at),
            priority: 0,
        };
        publish(&mut core, &mut env, 0, expiring(100));
        publish(&mut core, &mut env, 1, expiring(200));
        publish(&mut core, &mut env, 2, meta(1));
        assert_eq!(core.next_deadline(&mut env), Some(100));
        let mut fx = Vec::new();
        core.tick(150, &mut env, &mut fx);
        assert_eq!(
            fx,
            vec![Effect::DeadLetter {
                offset: 0,
                meta: expiring(100),
                reason: DeathReason::Expired
            }]
        );
        env.credit.insert(1, 5);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        let mut fx = Vec::new();
        core.dispatch(250, &mut env, &mut fx);
        assert_eq!(
            fx[0],
            Effect::DeadLetter {
                offset: 1,
                meta: expiring(200),
                reason: DeathReason::Expired
            }
        );
        assert_eq!(delivered(&fx), vec![(1, 2, false)]);
    }

    #[test]
    fn drop_head_dead_letters_the_oldest() {
        let args = QueueArgs {
            max_length: Some(2),
            dead_letter_exchange: Some("dlx".into()),
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        publish(&mut core, &mut env, 0, meta(1));
        publish(&mut core, &mut env, 1, meta(1));
        let fx = publish(&mut core, &mut env, 2, meta(1));
        assert_eq!(
            fx,
            vec![Effect::DeadLetter {
                offset: 0,
                meta: meta(1),
                reason: DeathReason::MaxLen
            }]
        );
        assert_eq!(core.ready_count(), 2);
    }

    #[test]
    fn max_length_bytes_counts_ready_bytes() {
        let args = QueueArgs {
            max_length_bytes: Some(10),
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        publish(&mut core, &mut env, 0, meta(6));
        let fx = publish(&mut core, &mut env, 1, meta(6));
        assert_eq!(fx, vec![Effect::Settle(0..1)]);
    }

    #[test]
    fn reject_publish_refuses_when_full() {
        let args = QueueArgs {
            max_length: Some(1),
            overflow: Overflow::RejectPublish,
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args.clone(), false, 0);
        let mut env = Env::default();
        assert_eq!(core.admit(), Admission::Accept);
        publish(&mut core, &mut env, 0, meta(1));
        assert_eq!(core.admit(), Admission::Reject);
        let args = QueueArgs {
            overflow: Overflow::RejectPublishDlx,
            dead_letter_exchange: Some("dlx".into()),
            ..args
        };
        let mut core = QueueCore::new(args, false, 0);
        publish(&mut core, &mut env, 0, meta(1));
        assert_eq!(core.admit(), Admission::RejectDeadLetter);
    }

    #[test]
    fn delivery_limit_dead_letters_after_too_many_returns() {
        let args = QueueArgs {
            delivery_limit: Some(1),
            dead_letter_exchange: Some("dlx".into()),
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 10);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        publish(&mut core, &mut env, 0, meta(1));
        let mut fx = Vec::new();
        core.settle(&[0], SettleOp::Requeue, 0, &mut env, &mut fx);
        assert_eq!(delivered(&fx), vec![(1, 0, true)]);
        let mut fx = Vec::new();
        core.settle(&[0], SettleOp::Requeue, 0, &mut env, &mut fx);
        assert_eq!(
            fx,
            vec![Effect::DeadLetter {
                offset: 0,
                meta: meta(1),
                reason: DeathReason::DeliveryLimit
            }]
        );
    }

    #[test]
    fn an_unreadable_message_is_kept_and_nothing_passes_it() {
        let args = QueueArgs {
            max_length: Some(3),
            dead_letter_exchange: Some("dlx".into()),
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        for offset in 0..3 {
            publish(&mut core, &mut env, offset, meta(1));
        }
        // Offset 1 can no longer be read (a checksum mismatch, an I/O error).
        env.metas.remove(&1);
        env.credit.insert(1, 10);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        let mut fx = Vec::new();
        core.dispatch(0, &mut env, &mut fx);
        assert_eq!(delivered(&fx), vec![(1, 0, false)]);
        assert!(!fx.iter().any(|e| matches!(e, Effect::Settle(_))), "{fx:?}");
        assert!(core.holds(1));
        assert_eq!(core.ready_count(), 2);
        // Ticks, gets and overflow do not settle it either.
        let mut fx = Vec::new();
        core.tick(1_000, &mut env, &mut fx);
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(core.get(true, 0, &mut env, &mut fx), Err(Unreadable));
        assert!(fx.is_empty(), "{fx:?}");
        publish(&mut core, &mut env, 3, meta(1));
        let fx = publish(&mut core, &mut env, 4, meta(1));
        assert!(
            fx.is_empty(),
            "drop-head stops at the unreadable head: {fx:?}"
        );
        assert!(core.holds(1));
        // Once it reads again, delivery goes on in order.
        env.metas.insert(1, meta(1));
        let mut fx = Vec::new();
        core.dispatch(0, &mut env, &mut fx);
        let offsets: Vec<u64> = delivered(&fx).iter().map(|d| d.1).collect();
        assert_eq!(offsets, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_delivery_that_cannot_be_loaded_goes_back_unsettled() {
        let mut core = QueueCore::new(QueueArgs::default(), false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 10);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        let fx = publish(&mut core, &mut env, 0, meta(7));
        assert_eq!(delivered(&fx), vec![(1, 0, false)]);
        assert_eq!(core.unacked_count(), 1);
        // The owner could not load the body it was to send: the message stays in the queue.
        core.keep_unreadable(0, meta(7), 0);
        assert_eq!(core.unacked_count(), 0);
        assert_eq!(core.ready_count(), 1);
        assert!(core.holds(0));
        // An acknowledgement for the delivery the consumer never got changes nothing.
        let mut fx = Vec::new();
        core.settle(&[0], SettleOp::Ack, 0, &mut env, &mut fx);
        assert_eq!(delivered(&fx), vec![(1, 0, false)]);
        assert!(!fx.iter().any(|e| matches!(e, Effect::Settle(_))));
    }

    #[test]
    fn single_active_consumer_feeds_only_the_first() {
        let args = QueueArgs {
            single_active_consumer: true,
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 10);
        env.credit.insert(2, 10);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        core.add_consumer(2, false, false, 0, 0).unwrap();
        let mut fx = Vec::new();
        for offset in 0..3 {
            fx.extend(publish(&mut core, &mut env, offset, meta(1)));
        }
        assert!(delivered(&fx).iter().all(|d| d.0 == 1));
        let mut fx = Vec::new();
        core.remove_consumer(1, 0, &mut fx);
        let fx = publish(&mut core, &mut env, 3, meta(1));
        assert_eq!(delivered(&fx), vec![(2, 3, false)]);
    }

    #[test]
    fn exclusive_consumers_and_auto_delete() {
        let mut core = QueueCore::new(QueueArgs::default(), true, 0);
        core.add_consumer(1, false, true, 0, 0).unwrap();
        assert_eq!(
            core.add_consumer(2, false, false, 0, 0),
            Err(ConsumeError::ExclusiveInUse)
        );
        let mut fx = Vec::new();
        core.remove_consumer(1, 0, &mut fx);
        assert_eq!(fx, vec![Effect::AutoDelete]);
    }

    #[test]
    fn unused_queue_expires() {
        let args = QueueArgs {
            expires_ms: Some(1000),
            ..QueueArgs::default()
        };
        let mut core = QueueCore::new(args, false, 0);
        let mut env = Env::default();
        assert_eq!(core.next_deadline(&mut env), Some(1000));
        let mut fx = Vec::new();
        core.tick(999, &mut env, &mut fx);
        assert!(fx.is_empty());
        core.tick(1000, &mut env, &mut fx);
        assert_eq!(fx, vec![Effect::Expire]);
    }

    #[test]
    fn purge_settles_ready_ranges_and_keeps_unacked() {
        let mut core = QueueCore::new(QueueArgs::default(), false, 0);
        let mut env = Env::default();
        env.credit.insert(1, 1);
        core.add_consumer(1, false, false, 0, 0).unwrap();
        for offset in 0..5 {
            publish(&mut core, &mut env, offset, meta(1));
        }
        let mut fx = Vec::new();
        assert_eq!(core.purge(&mut fx), 4);
        assert_eq!(fx, vec![Effect::Settle(1..5)]);
        assert_eq!(core.min_unsettled(), Some(0));
        let mut get_fx = Vec::new();
        assert_eq!(core.get(false, 0, &mut env, &mut get_fx), Ok(None));
    }
}
