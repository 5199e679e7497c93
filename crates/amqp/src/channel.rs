//! The state of one AMQP channel: content being assembled, consumers, deliveries awaiting
//! acknowledgement, publisher confirms, and transactions.
//!
//! Delivery tags count up from 1 per channel. Unacknowledged deliveries are kept by tag (so the
//! oldest is first, for the consumer timeout); each remembers its queue and offset so an
//! acknowledgement reaches the right queue. Publisher confirms are numbered per channel from 1
//! and released strictly in order: a message is confirmed once every queue it went to has it
//! (on disk, for persistent messages in durable queues), and runs of confirmations go out as one
//! `basic.ack` with `multiple`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use amq_protocol::protocol::basic;
use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use sluice_broker::message::Message;
use sluice_broker::queue::{ConsumerId, Credit, Queue, SettleOp};

use crate::codec::ContentHeader;

/// Content of a `basic.publish` being received.
#[derive(Debug, Default)]
pub enum Content {
    #[default]
    Idle,
    /// The method arrived; the content header is next.
    Header(Arc<basic::Publish>),
    /// The header arrived; body frames follow until the header's body size is in.
    Body {
        publish: Arc<basic::Publish>,
        /// Its class, body size and properties, as decoded.
        header: ContentHeader,
        /// The content header's payload as received, kept with the message.
        encoded: Bytes,
        body: Body,
    },
}

/// A body arriving in one frame (kept as a slice of the read buffer) or several.
#[derive(Debug)]
pub enum Body {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Body {
    pub fn len(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::One(bytes) => bytes.len(),
            Self::Many(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a body frame; `size` is the whole body's size, to reserve once.
    pub fn push(&mut self, part: Bytes, size: usize) {
        *self = match std::mem::replace(self, Self::Empty) {
            Self::Empty if part.len() == size => Self::One(part),
            Self::Empty => {
                let mut all = BytesMut::with_capacity(size);
                all.extend_from_slice(&part);
                Self::Many(all)
            }
            Self::One(first) => {
                let mut all = BytesMut::with_capacity(size);
                all.extend_from_slice(&first);
                all.extend_from_slice(&part);
                Self::Many(all)
            }
            Self::Many(mut all) => {
                all.extend_from_slice(&part);
                Self::Many(all)
            }
        }
    }

    pub fn freeze(self) -> Bytes {
        match self {
            Self::Empty => Bytes::new(),
            Self::One(bytes) => bytes,
            Self::Many(bytes) => bytes.freeze(),
        }
    }
}

/// A delivery the client has not settled yet.
#[derive(Debug, Clone)]
pub struct Unacked {
    pub queue: Arc<Queue>,
    pub offset: u64,
    /// `None` for `basic.get`.
    pub consumer: Option<ConsumerId>,
    pub delivered_ms: i64,
}

/// A consumer, as its connection knows it.
#[derive(Debug)]
pub struct Consumer {
    pub channel: u16,
    pub tag: String,
    /// `None` for the direct reply-to pseudo-consumer.
    pub queue: Option<Arc<Queue>>,
    pub no_ack: bool,
    pub credit: Arc<Credit>,
    /// Window credit to give back once the deliveries are written.
    pub window_owed: i64,
    /// Unwritten replies counter, for the direct reply-to consumer.
    pub replies: Option<Arc<AtomicI64>>,
    /// Encodes its basic.deliver frames; made at the first delivery.
    pub deliver_frames: Option<Box<crate::codec::DeliverEncoder>>,
}

/// Bit marking a confirm that must be negative.
const NACK: u32 = 1 << 31;

/// Publisher confirms of one channel.
#[derive(Debug)]
pub struct Confirms {
    next_seq: u64,
    /// Sequence number of `pending.front()`.
    base: u64,
    /// Per message: destinations still to confirm, plus [`NACK`].
    pending: VecDeque<u32>,
}

impl Default for Confirms {
    fn default() -> Self {
        Self {
            next_seq: 1,
            base: 1,
            pending: VecDeque::new(),
        }
    }
}

impl Confirms {
    /// Numbers a new message that must be confirmed by `destinations` queues.
    pub fn register(&mut self, destinations: u32) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(destinations);
        seq
    }

    /// One destination has the message (or refused it, with `nack`).
    pub fn settle(&mut self, seq: u64, nack: bool) {
        let Some(index) = seq.checked_sub(self.base) else {
            return;
        };
        if let Some(entry) = self.pending.get_mut(index as usize) {
            let remaining = *entry & !NACK;
            let flag = if nack { NACK } else { *entry & NACK };
            *entry = remaining.saturating_sub(1) | flag;
        }
    }

    /// Releases settled confirmations from the front, in order, as (tag, multiple, nack).
    pub fn drain(&mut self, emit: &mut dyn FnMut(u64, bool, bool)) {
        let mut run: Option<(u64, u64, bool)> = None; // (first, last, nack)
        while let Some(&entry) = self.pending.front() {
            if entry & !NACK != 0 {
                break;
            }
            let seq = self.base;
            let nack = entry & NACK != 0;
            self.pending.pop_front();
            self.base += 1;
            run = match run {
                Some((first, _, kind)) if kind == nack => Some((first, seq, kind)),
                Some((first, last, kind)) => {
                    emit(last, last > first, kind);
                    Some((seq, seq, nack))
                }
                None => Some((seq, seq, nack)),
            };
        }
        if let Some((first, last, nack)) = run {
            emit(last, last > first, nack);
        }
    }

    pub fn unconfirmed(&self) -> usize {
        self.pending.len()
    }
}

/// A publish held by a transaction until commit.
#[derive(Debug)]
pub struct TxPublish {
    pub message: Arc<Message>,
    pub queues: Vec<Arc<Queue>>,
    pub mandatory: bool,
    pub reply_address: Option<String>,
}

/// Work a transaction holds until commit.
#[derive(Debug, Default)]
pub struct Tx {
    pub publishes: Vec<TxPublish>,
    /// Settlements in the order given, with the deliveries they settle.
    pub settles: Vec<(SettleOp, Vec<(u64, Unacked)>)>,
}

/// Everything to bound a transaction by.
pub const TX_MAX_MESSAGES: usize = 1_000_000;

/// One channel.
#[derive(Debug, Default)]
pub struct Channel {
    pub id: u16,
    /// `channel.close` was sent; everything but `close`/`close-ok` is ignored.
    pub closing: bool,
    pub content: Content,
    pub confirms: Option<Confirms>,
    pub tx: Option<Tx>,
    pub next_tag: u64,
    pub unacked: BTreeMap<u64, Unacked>,
    /// Consumer tag → consumer id.
    pub consumers: HashMap<String, ConsumerId>,
    /// Per-consumer prefetch for consumers created from now on (0: unlimited).
    pub prefetch: u16,
    /// Prefetch shared by every consumer of the channel (0: unlimited).
    pub global_prefetch: u16,
    /// Unacknowledged deliveries to consumers (not `basic.get`), for the global prefetch.
    pub consumer_unacked: u32,
    /// The credit of the channel's acknowledging consumers is paused: its shared prefetch is
    /// full (see [`Self::is_full`]).
    pub paused: bool,
    /// Name of the queue most recently declared on the channel, for empty-name shortcuts.
    pub last_queue: String,
    /// Direct reply-to consumer: (tag, registry key, consumer id).
    pub reply: Option<(String, String, ConsumerId)>,
    /// An exchange the user was last found allowed to publish to.
    pub write_allowed: Option<Arc<str>>,
    /// The exchange name and routing key of the last publish, shared by the messages that
    /// follow with the same ones.
    pub last_exchange: Option<Arc<str>>,
    pub last_routing_key: Option<Arc<str>>,
    /// This channel's place under its user's `max-channels`.
    pub slot: Option<crate::limits::ChannelSlot>,
}

impl Channel {
    pub fn new(id: u16) -> Self {
        Self {
            id,
            next_tag: 1,
            ..Self::default()
        }
    }

    /// Whether the shared prefetch leaves no room for another delivery.
    pub fn is_full(&self) -> bool {
        self.global_prefetch > 0 && self.consumer_unacked >= u32::from(self.global_prefetch)
    }

    pub fn next_delivery_tag(&mut self) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        tag
    }

    /// Removes the deliveries an acknowledgement names: `tag`, or everything up to it with
    /// `multiple` (everything with tag 0 and `multiple`). `None` if the tag is unknown.
    pub fn take_unacked(&mut self, tag: u64, multiple: bool) -> Option<Vec<(u64, Unacked)>> {
        if multiple && tag == 0 {
            return Some(std::mem::take(&mut self.unacked).into_iter().collect());
        }
        if !self.unacked.contains_key(&tag) {
            return None;
        }
        if multiple {
            let keep = self.unacked.split_off(&(tag + 1));
            let taken = std::mem::replace(&mut self.unacked, keep);
            Some(taken.into_iter().collect())
        } else {
            self.unacked.remove(&tag).map(|u| vec![(tag, u)])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(confirms: &mut Confirms) -> Vec<(u64, bool, bool)> {
        let mut out = Vec::new();
        confirms.drain(&mut |tag, multiple, nack| out.push((tag, multiple, nack)));
        out
    }

    #[test]
    fn confirms_go_out_in_order_and_coalesce() {
        let mut confirms = Confirms::default();
        let a = confirms.register(1);
        let b = confirms.register(2);
        let c = confirms.register(0);
        let d = confirms.register(1);
        assert_eq!((a, b, c, d), (1, 2, 3, 4));
        confirms.settle(d, false);
        assert_eq!(drained(&mut confirms), vec![]);
        confirms.settle(a, false);
        confirms.settle(b, false);
        assert_eq!(drained(&mut confirms), vec![(1, false, false)]);
        confirms.settle(b, true);
        assert_eq!(
            drained(&mut confirms),
            vec![(2, false, true), (4, true, false)]
        );
        assert_eq!(confirms.unconfirmed(), 0);
    }

    #[test]
    fn body_frames_assemble() {
        let mut body = Body::Empty;
        body.push(Bytes::from_static(b"abc"), 3);
        assert!(matches!(body, Body::One(_)));
        let mut body = Body::Empty;
        body.push(Bytes::from_static(b"ab"), 4);
        body.push(Bytes::from_static(b"cd"), 4);
        assert_eq!(body.freeze(), Bytes::from_static(b"abcd"));
    }
}
