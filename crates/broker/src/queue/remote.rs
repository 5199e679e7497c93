//! Queues that live on another node of the cluster.
//!
//! A durable queue is placed on one node, its *home*, when it is declared (the controller
//! decides and commits the placement with the definition). Every other node holds a
//! [`Backend::Remote`](super::Backend) handle whose requests travel over the cluster transport
//! to the home node, where [`Forwarding::serve`] carries them out on the local queue.
//! Exchanges and bindings are on every node, so a message is routed where it arrives and sent
//! on to each remote queue it is routed to; a publisher's confirm waits for the home node's
//! answer (and, for persistent messages, for its fsync).
//!
//! Consumers: a consumer on its *origin* node of a queue elsewhere gets a *proxy* consumer on
//! the home node, with a credit of its own. The home node streams the proxy's deliveries to
//! the origin one call at a time per consumer, so order is kept and what is in flight is
//! bounded by the credit; the origin relays what its channel grants, pauses and resumes
//! ([`CreditRelay`]); acknowledgements travel as settlements. A node that stops answering or
//! restarts loses its side, so every two seconds each node audits the other side of its
//! proxies and relayed consumers: the home node requeues what a vanished origin held (through
//! the queue's own "consumers gone"), and the origin cancels the consumers of a queue whose
//! home is gone (basic.cancel, as RabbitMQ does when a classic queue's node goes down).
//!
//! On the wire a request or answer is a small JSON head followed by its messages, if any, as
//! one record batch in the log's own format (raw bytes, never through serde).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_storage::record::BatchBuilder;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use super::{
    ConsumerId, Credit, Delivery, DeliverySink, Got, NewConsumer, PublishOutcome, Queue,
    QueueEvent, QueueRecord, QueueReply, QueueRequest, QueueStat, SettleOp,
};
use crate::error::{BrokerError, MessagingError, ResourceKind};
use crate::message::Message;
use crate::message::codec::{RecordEncoder, decode_batch};
use crate::replication::ClusterLink;
use crate::{NodeId, Shared};

/// How long a forwarded request may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How often each side checks the other side of its consumers.
const AUDIT_EVERY: Duration = Duration::from_secs(2);
/// How long an audit call may take.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deliveries sent to an origin in one call, at most.
const DELIVER_BATCH: usize = 256;
/// Bytes of bodies sent to an origin in one call, roughly at most.
const DELIVER_BATCH_BYTES: usize = 8 << 20;
/// Proxy consumer ids have the top bit set: they never meet this node's own consumers' ids.
const PROXY_ID_BASE: u64 = 1 << 63;

/// How long a node asked about a queue waits to apply the definitions its asker had.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// What a relayed credit owes the queue's node: grants added up, and whether the channel
/// paused or resumed since the last call. Bounded whatever the channel does.
#[derive(Debug, Default)]
pub struct CreditRelay {
    messages: AtomicI64,
    window: AtomicI64,
    pause_changed: AtomicBool,
    closed: AtomicBool,
    notify: Notify,
}

impl CreditRelay {
    pub(super) fn grant(&self, messages: i64, window: i64) {
        self.messages.fetch_add(messages, Ordering::SeqCst);
        self.window.fetch_add(window, Ordering::SeqCst);
        self.notify.notify_one();
    }

    pub(super) fn pause_changed(&self) {
        self.pause_changed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// Names a queue incarnation on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QueueRef {
    vhost: String,
    name: String,
    id: Uuid,
    /// The controller log index the asking node had applied: a queue just declared there may
    /// not be known here until this node applied as much.
    applied: u64,
}

/// A forwarded request. `origin` is the incarnation of the consumer's node.
#[derive(Debug, Serialize, Deserialize)]
enum Call {
    /// The messages follow the head.
    Publish {
        queue: QueueRef,
    },
    AwaitDurable {
        queue: QueueRef,
        end_offset: u64,
    },
    Consume {
        queue: QueueRef,
        origin: u64,
        consumer: ConsumerId,
        no_ack: bool,
        exclusive: bool,
        priority: i32,
        messages: i64,
        window: i64,
        paused: bool,
    },
    Cancel {
        queue: QueueRef,
        origin: u64,
        consumer: ConsumerId,
    },
    ConsumersGone {
        queue: QueueRef,
        origin: u64,
        consumers: Vec<ConsumerId>,
    },
    Credit {
        origin: u64,
        consumer: ConsumerId,
        messages: i64,
        window: i64,
        paused: Option<bool>,
    },
    Settle {
        queue: QueueRef,
        origin: u64,
        offsets: Vec<u64>,
        op: SettleOp,
    },
    Get {
        queue: QueueRef,
        origin: u64,
        no_ack: bool,
    },
    Purge {
        queue: QueueRef,
    },
    Stat {
        queue: QueueRef,
        touch: bool,
    },
    CheckDelete {
        queue: QueueRef,
        if_unused: bool,
        if_empty: bool,
    },
    /// From a home node to an origin; the delivered messages follow, in order.
    Deliver {
        origin: u64,
        events: Vec<EventHead>,
    },
    /// From an origin: which of these consumers has the home node no proxy for?
    AuditProxies {
        origin: u64,
        consumers: Vec<ConsumerId>,
    },
    /// From a home node: which of these consumers does the origin not know?
    AuditConsumers {
        origin: u64,
        consumers: Vec<ConsumerId>,
    },
    /// From a home node holding messages an origin took with `basic.get`: which run is it?
    Incarnation,
    /// Kafka's preferred leader election for a partition this node holds a replica of.
    ElectPreferred {
        topic: String,
        partition: u32,
    },
}

impl Call {
    fn queue(&self) -> Option<&QueueRef> {
        match self {
            Self::Publish { queue }
            | Self::AwaitDurable { queue, .. }
            | Self::Consume { queue, .. }
            | Self::Cancel { queue, .. }
            | Self::ConsumersGone { queue, .. }
            | Self::Settle { queue, .. }
            | Self::Get { queue, .. }
            | Self::Purge { queue }
            | Self::Stat { queue, .. }
            | Self::CheckDelete { queue, .. } => Some(queue),
            Self::Credit { .. }
            | Self::Deliver { .. }
            | Self::AuditProxies { .. }
            | Self::AuditConsumers { .. }
            | Self::Incarnation
            | Self::ElectPreferred { .. } => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum EventHead {
    Deliver {
        consumer: ConsumerId,
        offset: u64,
        redelivered: bool,
        delivery_count: u32,
    },
    Cancelled {
        consumer: ConsumerId,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Done,
    Published {
        end_offset: u64,
        rejected: Vec<usize>,
    },
    /// The message follows the head.
    Got {
        offset: u64,
        redelivered: bool,
        delivery_count: u32,
        message_count: u64,
    },
    Empty,
    Count(u64),
    Stat {
        message_count: u64,
        consumer_count: u32,
    },
    /// The consumers the answering node does not know.
    Unknown(Vec<ConsumerId>),
    Incarnation(u64),
    Elected(crate::replication::Election),
    Failed(MessagingError),
}

fn encode(head: &impl Serialize, messages: &[Arc<Message>]) -> Result<Bytes, String> {
    let json = serde_json::to_vec(head).map_err(|e| format!("encoding a request: {e}"))?;
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    if !messages.is_empty() {
        let mut builder = BatchBuilder::new(0);
        let mut encoder = RecordEncoder::default();
        for message in messages {
            encoder.push(&mut builder, 0, None, message);
        }
        out.put_slice(&builder.finish());
    }
    Ok(out.freeze())
}

fn decode<T: DeserializeOwned>(body: &Bytes) -> Result<(T, Vec<Arc<Message>>), String> {
    let malformed = |reason: String| format!("malformed forwarded queue request: {reason}");
    if body.len() < 4 {
        return Err(malformed(format!("{} bytes", body.len())));
    }
    let len = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
    if body.len() - 4 < len {
        return Err(malformed(format!(
            "a head of {len} bytes in {} bytes",
            body.len()
        )));
    }
    let head = serde_json::from_slice(&body[4..4 + len]).map_err(|e| malformed(e.to_string()))?;
    let tail = body.slice(4 + len..);
    let messages = if tail.is_empty() {
        Vec::new()
    } else {
        decode_batch(&tail)
            .map_err(|e| malformed(e.to_string()))?
            .into_iter()
            .map(|stored| stored.message)
            .collect()
    };
    Ok((head, messages))
}

/// A consumer on this node of a queue elsewhere.
#[derive(Debug)]
struct Relayed {
    node: NodeId,
    queue: Uuid,
    sink: DeliverySink,
    relay: Arc<CreditRelay>,
    /// The home node has its proxy (until then an audit would find none).
    registered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ProxyKey {
    node: NodeId,
    origin: u64,
    consumer: ConsumerId,
}

/// A consumer elsewhere of a queue on this node.
#[derive(Debug)]
struct Proxy {
    queue: Arc<Queue>,
    id: ConsumerId,
    credit: Arc<Credit>,
}

/// This node's side of every queue request that crosses nodes.
#[derive(Debug)]
pub struct Forwarding {
    link: OnceLock<Arc<dyn ClusterLink>>,
    shared: OnceLock<Weak<Shared>>,
    /// Tells this run of the node from earlier ones: consumers do not outlive a restart.
    incarnation: u64,
    next_proxy: AtomicU64,
    relayed: Mutex<HashMap<ConsumerId, Relayed>>,
    proxies: Mutex<HashMap<ProxyKey, Proxy>>,
    /// The latest incarnation heard from each origin node.
    origins: Mutex<HashMap<NodeId, u64>>,
    /// What origins took with `basic.get` and have not settled, by origin and queue: requeued
    /// when the origin's run ends, as its consumers' deliveries are.
    gets: Mutex<HashMap<(NodeId, u64), HashMap<Uuid, HeldGets>>>,
}

/// Offsets of one queue that an origin took with `basic.get`, unsettled.
#[derive(Debug)]
struct HeldGets {
    queue: Arc<Queue>,
    offsets: BTreeSet<u64>,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            link: OnceLock::new(),
            shared: OnceLock::new(),
            incarnation: Uuid::new_v4().as_u64_pair().0,
            next_proxy: AtomicU64::new(PROXY_ID_BASE),
            relayed: Mutex::default(),
            proxies: Mutex::default(),
            origins: Mutex::default(),
            gets: Mutex::default(),
        }
    }
}

impl Forwarding {
    /// Forwards through `link` from now on, and starts the audits.
    pub(crate) fn set_link(self: &Arc<Self>, link: Arc<dyn ClusterLink>, shared: Weak<Shared>) {
        let _ = self.shared.set(shared);
        if self.link.set(link).is_err() {
            return;
        }
        let this = Arc::downgrade(self);
        tokio::spawn(audits(this));
    }

    async fn forward(
        &self,
        node: NodeId,
        call: &Call,
        messages: &[Arc<Message>],
        timeout: Duration,
    ) -> Result<(Answer, Vec<Arc<Message>>), String> {
        let link = self
            .link
            .get()
            .ok_or_else(|| "this node has not joined the cluster yet".to_owned())?;
        let body = encode(call, messages)?;
        let answer = link.forward(node, body, timeout).await?;
        decode(&answer)
    }

    /// Sends a request for `record` to its home `node`; an unreachable node is RabbitMQ's
    /// "home node is down" error.
    async fn send(
        &self,
        node: NodeId,
        record: &QueueRecord,
        call: &Call,
        messages: &[Arc<Message>],
    ) -> Result<(Answer, Vec<Arc<Message>>), BrokerError> {
        match self.forward(node, call, messages, CALL_TIMEOUT).await {
            Ok((Answer::Failed(error), _)) => Err(error.into()),
            Ok(answer) => Ok(answer),
            Err(reason) => {
                tracing::debug!(queue = %record.name, vhost = %record.vhost, node, %reason, "forwarding a queue request failed");
                Err(MessagingError::NodeDown {
                    vhost: record.vhost.clone(),
                    name: record.name.clone(),
                    node,
                }
                .into())
            }
        }
    }

    /// Kafka's preferred leader election for partition `partition` of `topic`, asked of
    /// `node`'s replica (which answers for itself only: it does not ask further).
    pub(crate) async fn elect_preferred(
        self: &Arc<Self>,
        node: NodeId,
        topic: &str,
        partition: u32,
    ) -> crate::replication::Election {
        use crate::replication::Election;
        let call = Call::ElectPreferred {
            topic: topic.to_owned(),
            partition,
        };
        match self.forward(node, &call, &[], CALL_TIMEOUT).await {
            Ok((Answer::Elected(election), _)) => election,
            Ok((other, _)) => Election::PreferredNotAvailable(format!(
                "node {node} answered the election with {other:?}"
            )),
            Err(reason) => {
                Election::PreferredNotAvailable(format!("node {node} cannot be asked: {reason}"))
            }
        }
    }

    /// A request for the queue `record`, which lives on `node`.
    pub(crate) async fn call(
        self: &Arc<Self>,
        node: NodeId,
        record: &QueueRecord,
        request: QueueRequest,
    ) -> Result<QueueReply, BrokerError> {
        let queue = self.queue_ref(record);
        let origin = self.incarnation;
        let reply = match request {
            QueueRequest::Publish(messages) => {
                match self
                    .send(node, record, &Call::Publish { queue }, &messages)
                    .await?
                    .0
                {
                    Answer::Published {
                        end_offset,
                        rejected,
                    } => QueueReply::Published(PublishOutcome {
                        end_offset,
                        rejected,
                    }),
                    other => return Err(unexpected(record, other)),
                }
            }
            QueueRequest::AwaitDurable(end_offset) => {
                let call = Call::AwaitDurable { queue, end_offset };
                self.send(node, record, &call, &[]).await?;
                QueueReply::Done
            }
            QueueRequest::Consume(consumer) => return self.consume(node, record, consumer).await,
            QueueRequest::Cancel(consumer) => {
                let call = Call::Cancel {
                    queue,
                    origin,
                    consumer,
                };
                self.send(node, record, &call, &[]).await?;
                QueueReply::Done
            }
            QueueRequest::ConsumersGone(consumers) => {
                self.forget(&consumers);
                let call = Call::ConsumersGone {
                    queue,
                    origin,
                    consumers,
                };
                self.send(node, record, &call, &[]).await?;
                QueueReply::Done
            }
            QueueRequest::Settle(offsets, op) => {
                let call = Call::Settle {
                    queue,
                    origin,
                    offsets,
                    op,
                };
                self.send(node, record, &call, &[]).await?;
                QueueReply::Done
            }
            // Relayed credit wakes the queue on its own node.
            QueueRequest::Wake | QueueRequest::Timer => QueueReply::Done,
            QueueRequest::Get { no_ack } => {
                let call = Call::Get {
                    queue,
                    origin,
                    no_ack,
                };
                match self.send(node, record, &call, &[]).await? {
                    (
                        Answer::Got {
                            offset,
                            redelivered,
                            delivery_count,
                            message_count,
                        },
                        mut messages,
                    ) if messages.len() == 1 => QueueReply::Got(Some(Got {
                        delivery: Delivery {
                            consumer: 0,
                            offset,
                            redelivered,
                            delivery_count,
                            message: messages.remove(0),
                        },
                        message_count,
                    })),
                    (Answer::Empty, _) => QueueReply::Got(None),
                    (other, _) => return Err(unexpected(record, other)),
                }
            }
            QueueRequest::Purge => {
                match self
                    .send(node, record, &Call::Purge { queue }, &[])
                    .await?
                    .0
                {
                    Answer::Count(count) => QueueReply::Count(count),
                    other => return Err(unexpected(record, other)),
                }
            }
            QueueRequest::Stat { touch } => {
                let call = Call::Stat { queue, touch };
                match self.send(node, record, &call, &[]).await?.0 {
                    Answer::Stat {
                        message_count,
                        consumer_count,
                    } => QueueReply::Stat(QueueStat {
                        message_count,
                        consumer_count,
                    }),
                    other => return Err(unexpected(record, other)),
                }
            }
            QueueRequest::CheckDelete {
                if_unused,
                if_empty,
            } => {
                let call = Call::CheckDelete {
                    queue,
                    if_unused,
                    if_empty,
                };
                match self.send(node, record, &call, &[]).await?.0 {
                    Answer::Count(count) => QueueReply::Count(count),
                    other => return Err(unexpected(record, other)),
                }
            }
            QueueRequest::Deleting => {
                // The home node deletes the queue itself; consumers here are told now.
                let ours: Vec<ConsumerId> = self
                    .relayed
                    .lock()
                    .iter()
                    .filter(|(_, r)| r.queue == record.id)
                    .map(|(id, _)| *id)
                    .collect();
                self.cancel_relayed(&ours);
                QueueReply::Count(0)
            }
        };
        Ok(reply)
    }

    async fn consume(
        self: &Arc<Self>,
        node: NodeId,
        record: &QueueRecord,
        consumer: NewConsumer,
    ) -> Result<QueueReply, BrokerError> {
        let relay = Arc::new(CreditRelay::default());
        let credit = Arc::clone(&consumer.credit);
        let call = Call::Consume {
            queue: self.queue_ref(record),
            origin: self.incarnation,
            consumer: consumer.id,
            no_ack: consumer.no_ack,
            exclusive: consumer.exclusive,
            priority: consumer.priority,
            messages: credit.messages(),
            window: credit.window(),
            paused: credit.is_paused(),
        };
        if credit.relay.set(Arc::clone(&relay)).is_err() {
            return Err(BrokerError::metadata(
                "register a consumer",
                "its credit is relayed already",
            ));
        }
        self.relayed.lock().insert(
            consumer.id,
            Relayed {
                node,
                queue: record.id,
                sink: consumer.sink,
                relay: Arc::clone(&relay),
                registered: false,
            },
        );
        if let Err(error) = self.send(node, record, &call, &[]).await {
            self.relayed.lock().remove(&consumer.id);
            return Err(error);
        }
        if let Some(entry) = self.relayed.lock().get_mut(&consumer.id) {
            entry.registered = true;
        }
        tokio::spawn(relay_credit(
            Arc::clone(self),
            node,
            consumer.id,
            credit,
            relay,
        ));
        Ok(QueueReply::Done)
    }

    /// Forgets consumers of this node whose channel went away.
    fn forget(&self, consumers: &[ConsumerId]) {
        let mut relayed = self.relayed.lock();
        for id in consumers {
            if let Some(entry) = relayed.remove(id) {
                entry.relay.close();
            }
        }
    }

    /// Cancels consumers of this node whose queue is gone (their client gets basic.cancel).
    fn cancel_relayed(&self, consumers: &[ConsumerId]) {
        let mut relayed = self.relayed.lock();
        for id in consumers {
            if let Some(entry) = relayed.remove(id) {
                entry.relay.close();
                let _ = entry.sink.send(QueueEvent::Cancelled { consumer: *id });
            }
        }
    }

    /// Serves a request forwarded by node `from`.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        from: NodeId,
        body: Bytes,
    ) -> Result<Bytes, String> {
        let (call, messages) = decode::<Call>(&body)?;
        let named = call.queue().cloned();
        let here = match &named {
            Some(queue) => Some(self.local(queue).await),
            None => None,
        };
        let (answer, messages) = match self.serve_call(from, call, messages, here).await {
            Ok(answer) => answer,
            Err(error) => {
                let failed = match error {
                    BrokerError::Messaging(error) => *error,
                    other => MessagingError::QueueFailed {
                        vhost: named.as_ref().map(|q| q.vhost.clone()).unwrap_or_default(),
                        name: named.as_ref().map(|q| q.name.clone()).unwrap_or_default(),
                        reason: other.to_string(),
                    },
                };
                (Answer::Failed(failed), Vec::new())
            }
        };
        encode(&answer, &messages)
    }

    fn queue_ref(&self, record: &QueueRecord) -> QueueRef {
        QueueRef {
            vhost: record.vhost.clone(),
            name: record.name.clone(),
            id: record.id,
            applied: self
                .shared
                .get()
                .and_then(Weak::upgrade)
                .map_or(0, |shared| shared.applied.current()),
        }
    }

    /// The queue `queue` names, if it lives here; waits a little for definitions the asking
    /// node had applied and this one has not yet.
    async fn local(&self, queue: &QueueRef) -> Result<Arc<Queue>, BrokerError> {
        let Some(shared) = self.shared.get().and_then(Weak::upgrade) else {
            return Err(BrokerError::ShuttingDown);
        };
        if shared.applied.current() < queue.applied {
            shared.applied.reached(queue.applied, APPLY_WAIT).await;
        }
        let found = shared
            .messaging
            .vhosts
            .read()
            .get(&queue.vhost)
            .and_then(|v| v.queue(&queue.name));
        found
            .filter(|q| q.record().id == queue.id && q.remote_node().is_none())
            .ok_or_else(|| {
                MessagingError::NotFound {
                    kind: ResourceKind::Queue,
                    vhost: queue.vhost.clone(),
                    name: queue.name.clone(),
                }
                .into()
            })
    }

    async fn serve_call(
        self: &Arc<Self>,
        from: NodeId,
        call: Call,
        messages: Vec<Arc<Message>>,
        here: Option<Result<Arc<Queue>, BrokerError>>,
    ) -> Result<(Answer, Vec<Arc<Message>>), BrokerError> {
        // The queue the call names, looked up by the caller (calls that name none never ask).
        let mut here = here;
        let mut local = || {
            here.take().unwrap_or_else(|| {
                Err(BrokerError::metadata(
                    "serve a forwarded request",
                    "it names no queue",
                ))
            })
        };
        let done = Ok((Answer::Done, Vec::new()));
        match call {
            Call::Publish { .. } => {
                let outcome = local()?.publish(messages).await?;
                Ok((
                    Answer::Published {
                        end_offset: outcome.end_offset,
                        rejected: outcome.rejected,
                    },
                    Vec::new(),
                ))
            }
            Call::AwaitDurable { end_offset, .. } => {
                local()?.wait_durable(end_offset).await?;
                done
            }
            Call::Consume {
                origin,
                consumer,
                no_ack,
                exclusive,
                priority,
                messages,
                window,
                paused,
                ..
            } => {
                let queue = local()?;
                self.heard_from(from, origin).await;
                let key = ProxyKey {
                    node: from,
                    origin,
                    consumer,
                };
                let id = self.next_proxy.fetch_add(1, Ordering::Relaxed);
                let credit = Arc::new(Credit::new(messages, window));
                if paused {
                    credit.pause();
                }
                let (sink, events) = mpsc::unbounded_channel();
                queue
                    .consume(NewConsumer {
                        id,
                        no_ack,
                        exclusive,
                        priority,
                        credit: Arc::clone(&credit),
                        sink,
                    })
                    .await?;
                self.proxies.lock().insert(
                    key,
                    Proxy {
                        queue: Arc::clone(&queue),
                        id,
                        credit,
                    },
                );
                tokio::spawn(pump(Arc::clone(self), key, events));
                done
            }
            Call::Cancel {
                origin, consumer, ..
            } => {
                let queue = local()?;
                let key = ProxyKey {
                    node: from,
                    origin,
                    consumer,
                };
                // The proxy stays until its channel is gone: what it holds is requeued then.
                let id = self.proxies.lock().get(&key).map(|p| p.id);
                if let Some(id) = id {
                    queue.cancel(id).await?;
                }
                done
            }
            Call::ConsumersGone {
                origin, consumers, ..
            } => {
                let queue = local()?;
                let ids: Vec<ConsumerId> = {
                    let mut proxies = self.proxies.lock();
                    consumers
                        .iter()
                        .filter_map(|&consumer| {
                            proxies.remove(&ProxyKey {
                                node: from,
                                origin,
                                consumer,
                            })
                        })
                        .map(|p| p.id)
                        .collect()
                };
                if !ids.is_empty() {
                    queue.consumers_gone(ids).await?;
                }
                done
            }
            Call::Credit {
                origin,
                consumer,
                messages,
                window,
                paused,
            } => {
                let key = ProxyKey {
                    node: from,
                    origin,
                    consumer,
                };
                let proxy = self
                    .proxies
                    .lock()
                    .get(&key)
                    .map(|p| (Arc::clone(&p.queue), Arc::clone(&p.credit)));
                if let Some((queue, credit)) = proxy {
                    let mut wake = false;
                    match paused {
                        Some(true) => credit.pause(),
                        Some(false) => wake |= credit.resume(),
                        None => {}
                    }
                    wake |= credit.grant(messages, window);
                    if wake {
                        queue.wake().await?;
                    }
                }
                done
            }
            Call::Settle {
                queue: named,
                origin,
                offsets,
                op,
            } => {
                self.heard_from(from, origin).await;
                {
                    let mut gets = self.gets.lock();
                    if let Some(held) = gets.get_mut(&(from, origin)) {
                        if let Some(queue) = held.get_mut(&named.id) {
                            for offset in &offsets {
                                queue.offsets.remove(offset);
                            }
                            if queue.offsets.is_empty() {
                                held.remove(&named.id);
                            }
                        }
                        if held.is_empty() {
                            gets.remove(&(from, origin));
                        }
                    }
                }
                local()?.settle(offsets, op).await?;
                done
            }
            Call::Get {
                queue: named,
                origin,
                no_ack,
            } => {
                self.heard_from(from, origin).await;
                let queue = local()?;
                let Some(got) = queue.get(no_ack).await? else {
                    return Ok((Answer::Empty, Vec::new()));
                };
                if !no_ack {
                    self.gets
                        .lock()
                        .entry((from, origin))
                        .or_default()
                        .entry(named.id)
                        .or_insert_with(|| HeldGets {
                            queue: Arc::clone(&queue),
                            offsets: BTreeSet::new(),
                        })
                        .offsets
                        .insert(got.delivery.offset);
                }
                Ok((
                    Answer::Got {
                        offset: got.delivery.offset,
                        redelivered: got.delivery.redelivered,
                        delivery_count: got.delivery.delivery_count,
                        message_count: got.message_count,
                    },
                    vec![got.delivery.message],
                ))
            }
            Call::Purge { .. } => Ok((Answer::Count(local()?.purge().await?), Vec::new())),
            Call::ElectPreferred { topic, partition } => {
                use crate::replication::Election;
                let shared = self.shared.get().and_then(std::sync::Weak::upgrade);
                let found = shared.and_then(|shared| {
                    let topics = shared.topics.read();
                    let served = topics.get(&topic)?.partitions.get(partition as usize)?;
                    served.clone()
                });
                let election = match found {
                    Some(replica) => replica.elect_preferred().await,
                    None => Election::PreferredNotAvailable(format!(
                        "this node holds no replica of partition {partition} of {topic:?}"
                    )),
                };
                Ok((Answer::Elected(election), Vec::new()))
            }
            Call::Stat { touch, .. } => {
                let stat = local()?.stat(touch).await?;
                Ok((
                    Answer::Stat {
                        message_count: stat.message_count,
                        consumer_count: stat.consumer_count,
                    },
                    Vec::new(),
                ))
            }
            Call::CheckDelete {
                if_unused,
                if_empty,
                ..
            } => {
                let count = local()?.check_delete(if_unused, if_empty).await?;
                Ok((Answer::Count(count), Vec::new()))
            }
            Call::Deliver { origin, events } => Ok((
                Answer::Unknown(self.deliver(origin, events, messages)),
                Vec::new(),
            )),
            Call::AuditProxies { origin, consumers } => {
                self.heard_from(from, origin).await;
                let proxies = self.proxies.lock();
                let unknown = consumers
                    .into_iter()
                    .filter(|&consumer| {
                        !proxies.contains_key(&ProxyKey {
                            node: from,
                            origin,
                            consumer,
                        })
                    })
                    .collect();
                Ok((Answer::Unknown(unknown), Vec::new()))
            }
            Call::Incarnation => Ok((Answer::Incarnation(self.incarnation), Vec::new())),
            Call::AuditConsumers { origin, consumers } => {
                let unknown = if origin == self.incarnation {
                    let relayed = self.relayed.lock();
                    consumers
                        .into_iter()
                        .filter(|c| !relayed.contains_key(c))
                        .collect()
                } else {
                    consumers
                };
                Ok((Answer::Unknown(unknown), Vec::new()))
            }
        }
    }

    /// Deliveries from a home node for consumers here; returns the consumers not known here.
    fn deliver(
        &self,
        origin: u64,
        events: Vec<EventHead>,
        messages: Vec<Arc<Message>>,
    ) -> Vec<ConsumerId> {
        let mut unknown = Vec::new();
        let mut messages = messages.into_iter();
        let mut cancelled = Vec::new();
        {
            let relayed = self.relayed.lock();
            for event in events {
                match event {
                    EventHead::Deliver {
                        consumer,
                        offset,
                        redelivered,
                        delivery_count,
                    } => {
                        let Some(message) = messages.next() else {
                            break;
                        };
                        let entry = relayed
                            .get(&consumer)
                            .filter(|_| origin == self.incarnation);
                        let Some(entry) = entry else {
                            if !unknown.contains(&consumer) {
                                unknown.push(consumer);
                            }
                            continue;
                        };
                        let _ = entry.sink.send(QueueEvent::Deliver(Delivery {
                            consumer,
                            offset,
                            redelivered,
                            delivery_count,
                            message,
                        }));
                    }
                    EventHead::Cancelled { consumer } => cancelled.push(consumer),
                }
            }
        }
        self.cancel_relayed(&cancelled);
        unknown
    }

    /// Notes the incarnation of `node` a request came with; proxies of its earlier runs are
    /// dropped (their consumers died with that run).
    async fn heard_from(&self, node: NodeId, origin: u64) {
        let changed = self.origins.lock().insert(node, origin) != Some(origin);
        if !changed {
            return;
        }
        let stale: Vec<ProxyKey> = self
            .proxies
            .lock()
            .keys()
            .filter(|k| k.node == node && k.origin != origin)
            .copied()
            .collect();
        self.drop_proxies(stale).await;
        let stale: Vec<(NodeId, u64)> = self
            .gets
            .lock()
            .keys()
            .filter(|(n, o)| *n == node && *o != origin)
            .copied()
            .collect();
        self.requeue_gets(stale).await;
    }

    /// Returns to their queues, redelivered, the messages that ended runs of origins took with
    /// `basic.get` and never settled.
    async fn requeue_gets(&self, origins: Vec<(NodeId, u64)>) {
        let held: Vec<HeldGets> = {
            let mut gets = self.gets.lock();
            origins
                .iter()
                .filter_map(|key| gets.remove(key))
                .flat_map(HashMap::into_values)
                .collect()
        };
        for HeldGets { queue, offsets } in held {
            tracing::debug!(
                queue = queue.name(),
                vhost = queue.vhost(),
                messages = offsets.len(),
                "messages got through another node, whose run ended; requeueing them"
            );
            let _ = queue
                .settle(offsets.into_iter().collect(), SettleOp::Requeue)
                .await;
        }
    }

    /// Removes proxies whose consumer is gone; their queues requeue what they held.
    async fn drop_proxies(&self, keys: Vec<ProxyKey>) {
        let mut by_queue: HashMap<Uuid, (Arc<Queue>, Vec<ConsumerId>)> = HashMap::new();
        {
            let mut proxies = self.proxies.lock();
            for key in keys {
                if let Some(proxy) = proxies.remove(&key) {
                    by_queue
                        .entry(proxy.queue.record().id)
                        .or_insert_with(|| (Arc::clone(&proxy.queue), Vec::new()))
                        .1
                        .push(proxy.id);
                }
            }
        }
        for (queue, ids) in by_queue.into_values() {
            tracing::debug!(
                queue = queue.name(),
                vhost = queue.vhost(),
                consumers = ids.len(),
                "consumers on another node are gone; requeueing what they held"
            );
            let _ = queue.consumers_gone(ids).await;
        }
    }

    /// One round of audits, both ways.
    async fn audit(&self) {
        let Some(link) = self.link.get() else {
            return;
        };
        let live: HashSet<NodeId> = link
            .nodes()
            .into_iter()
            .filter(|n| n.live)
            .map(|n| n.id)
            .collect();
        let mut homes: HashMap<NodeId, Vec<ConsumerId>> = HashMap::new();
        for (id, entry) in self.relayed.lock().iter() {
            if entry.registered {
                homes.entry(entry.node).or_default().push(*id);
            }
        }
        for (node, consumers) in homes {
            let call = Call::AuditProxies {
                origin: self.incarnation,
                consumers: consumers.clone(),
            };
            let gone = match self.forward(node, &call, &[], AUDIT_TIMEOUT).await {
                Ok((Answer::Unknown(ids), _)) => ids,
                Err(_) if !live.contains(&node) => consumers,
                _ => continue,
            };
            if !gone.is_empty() {
                tracing::info!(
                    node,
                    consumers = gone.len(),
                    "cancelling consumers whose queue's node lost them or is down"
                );
                self.cancel_relayed(&gone);
            }
        }
        let mut origins: HashMap<(NodeId, u64), Vec<ConsumerId>> = HashMap::new();
        for key in self.proxies.lock().keys() {
            origins
                .entry((key.node, key.origin))
                .or_default()
                .push(key.consumer);
        }
        for ((node, origin), consumers) in origins {
            let call = Call::AuditConsumers {
                origin,
                consumers: consumers.clone(),
            };
            let gone = match self.forward(node, &call, &[], AUDIT_TIMEOUT).await {
                Ok((Answer::Unknown(ids), _)) => ids,
                Err(_) if !live.contains(&node) => consumers,
                _ => continue,
            };
            let keys = gone
                .into_iter()
                .map(|consumer| ProxyKey {
                    node,
                    origin,
                    consumer,
                })
                .collect();
            self.drop_proxies(keys).await;
        }
        let holders: Vec<(NodeId, u64)> = self.gets.lock().keys().copied().collect();
        let mut ended = Vec::new();
        for (node, origin) in holders {
            match self
                .forward(node, &Call::Incarnation, &[], AUDIT_TIMEOUT)
                .await
            {
                Ok((Answer::Incarnation(now), _)) if now != origin => ended.push((node, origin)),
                Err(_) if !live.contains(&node) => ended.push((node, origin)),
                _ => {}
            }
        }
        self.requeue_gets(ended).await;
    }
}

fn unexpected(record: &QueueRecord, answer: Answer) -> BrokerError {
    MessagingError::QueueFailed {
        vhost: record.vhost.clone(),
        name: record.name.clone(),
        reason: format!("its node answered with {answer:?}"),
    }
    .into()
}

async fn audits(forwarding: Weak<Forwarding>) {
    let mut tick = tokio::time::interval(AUDIT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(forwarding) = forwarding.upgrade() else {
            return;
        };
        forwarding.audit().await;
    }
}

/// Passes what a consumer's channel grants to the queue's node, one call at a time.
async fn relay_credit(
    forwarding: Arc<Forwarding>,
    node: NodeId,
    consumer: ConsumerId,
    credit: Arc<Credit>,
    relay: Arc<CreditRelay>,
) {
    loop {
        relay.notify.notified().await;
        if relay.closed.load(Ordering::SeqCst) {
            return;
        }
        let messages = relay.messages.swap(0, Ordering::SeqCst);
        let window = relay.window.swap(0, Ordering::SeqCst);
        let paused = relay
            .pause_changed
            .swap(false, Ordering::SeqCst)
            .then(|| credit.is_paused());
        if messages == 0 && window == 0 && paused.is_none() {
            continue;
        }
        let call = Call::Credit {
            origin: forwarding.incarnation,
            consumer,
            messages,
            window,
            paused,
        };
        if let Err(reason) = forwarding.forward(node, &call, &[], CALL_TIMEOUT).await {
            tracing::debug!(node, consumer, %reason, "relaying a consumer's credit failed");
        }
    }
}

/// Streams a proxy consumer's deliveries to its origin, one call at a time. A call that
/// fails, or an origin that no longer knows the consumer, ends the proxy: the queue requeues
/// what it held.
async fn pump(
    forwarding: Arc<Forwarding>,
    key: ProxyKey,
    mut events: mpsc::UnboundedReceiver<QueueEvent>,
) {
    while let Some(first) = events.recv().await {
        let mut batch = vec![first];
        let mut bytes = 0;
        while batch.len() < DELIVER_BATCH && bytes < DELIVER_BATCH_BYTES {
            match events.try_recv() {
                Ok(event) => {
                    if let QueueEvent::Deliver(delivery) = &event {
                        bytes += delivery.message.body.len();
                    }
                    batch.push(event);
                }
                Err(_) => break,
            }
        }
        let mut heads = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        for event in batch {
            match event {
                QueueEvent::Deliver(delivery) => {
                    heads.push(EventHead::Deliver {
                        consumer: key.consumer,
                        offset: delivery.offset,
                        redelivered: delivery.redelivered,
                        delivery_count: delivery.delivery_count,
                    });
                    messages.push(delivery.message);
                }
                QueueEvent::Cancelled { .. } => heads.push(EventHead::Cancelled {
                    consumer: key.consumer,
                }),
            }
        }
        let call = Call::Deliver {
            origin: key.origin,
            events: heads,
        };
        let lost = match forwarding
            .forward(key.node, &call, &messages, CALL_TIMEOUT)
            .await
        {
            Ok((Answer::Unknown(ids), _)) => !ids.is_empty(),
            Ok(_) => false,
            Err(reason) => {
                tracing::debug!(node = key.node, %reason, "streaming deliveries to a consumer's node failed");
                true
            }
        };
        if lost {
            forwarding.drop_proxies(vec![key]).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageProperties;

    #[test]
    fn a_request_keeps_its_head_and_messages() {
        let message = Arc::new(Message {
            exchange: "x".into(),
            routing_key: "k".into(),
            properties: MessageProperties::default(),
            body: Bytes::from_static(b"body"),
        });
        let call = Call::Publish {
            queue: QueueRef {
                vhost: "/".into(),
                name: "q".into(),
                id: Uuid::from_u128(7),
                applied: 3,
            },
        };
        let body = encode(&call, &[Arc::clone(&message), Arc::clone(&message)]).unwrap();
        let (decoded, messages) = decode::<Call>(&body).unwrap();
        assert!(matches!(decoded, Call::Publish { queue } if queue.name == "q"));
        assert_eq!(messages.len(), 2);
        assert_eq!(*messages[1], *message);
    }

    #[test]
    fn a_truncated_request_is_an_error_not_a_panic() {
        let body = encode(&Answer::Count(3), &[]).unwrap();
        for len in 0..body.len() {
            assert!(decode::<Answer>(&body.slice(..len)).is_err());
        }
        let mut bad = BytesMut::from(&body[..]);
        bad[0] = 0xff;
        assert!(decode::<Answer>(&bad.freeze()).is_err());
    }
}
