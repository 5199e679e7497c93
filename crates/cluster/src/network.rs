//! openraft's network over the cluster [`Transport`]: a client per peer and group that sends
//! Raft's RPCs, and the server side that hands them to the local group's `Raft`.
//!
//! Messages of the controller group are JSON inside transport frames; snapshots send their
//! metadata as JSON and their data as raw bytes after it. Every RPC's answer is
//! `Result<response, reason>`: a group that fails to serve (shutting down, say) answers with its
//! reason, which the caller reports to openraft as a network error to retry.
//!
//! A snapshot whose data the local state machine cannot decode is answered with an error and
//! never reaches openraft: openraft takes a failed install for a storage failure and stops the
//! group.
//!
//! Errors are mapped so openraft backs off from dead peers: a peer that cannot be reached is
//! `Unreachable`; a call that timed out or whose connection closed is a `Network` error, retried
//! at once (on a new connection).
//!
//! # Coalesced heartbeats
//! A leader sends each follower a heartbeat every `heartbeat_interval` for every group it leads,
//! so a node leading a few hundred partitions would send thousands of messages a second to each
//! peer doing nothing. A group whose network coalesces ([`GroupNetwork::coalescing`]) hands its
//! heartbeats to the node's [`Heartbeats`]: those to one peer gather for [`HEARTBEAT_WINDOW`]
//! and go out as one message to [`HEARTBEATS_GROUP`], whose answer holds every group's answer
//! (as Redpanda's heartbeat manager does). The receiving [`Router`] hands each heartbeat to its
//! group as if it had come alone. Only heartbeats gather: entries go out at once.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::io::{self, Cursor};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::join_all;
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, Raft, RaftNetworkV2, RaftTypeConfig};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::placement::NodeId;
use crate::state_machine::{Machine, StateMachineStore};
use crate::transport::{CallError, Service, Transport};

/// The RPCs a group serves, as transport method numbers.
pub mod method {
    pub const APPEND: u8 = 1;
    pub const VOTE: u8 = 2;
    pub const SNAPSHOT: u8 = 3;
    pub const PRE_VOTE: u8 = 4;
    /// A leader hands its leadership to another member (sent to every member, so that the
    /// others stop honouring the old leader's lease and vote for the target at once).
    pub const TRANSFER_LEADER: u8 = 5;
    /// A command forwarded to the group's leader (see [`crate::node`]).
    pub const WRITE: u8 = 10;
    /// A read index asked of the leader.
    pub const READ_INDEX: u8 = 11;
    /// What a node knows of the cluster (see [`crate::cluster`]).
    pub const STATUS: u8 = 12;
    /// A new node asks to be admitted (served by the leader).
    pub const JOIN: u8 = 13;
    /// A node is to be removed (served by the leader).
    pub const LEAVE: u8 = 14;
    /// A node's view of the cluster, for status reports (see [`crate::status`]).
    pub const REPORT: u8 = 15;
    /// Are you there? Answered at once, empty (see [`crate::liveness`]).
    pub const PING: u8 = 16;
    /// A partition group's leader goes quiet (see [`crate::partition::quiet`]).
    pub const QUIESCE: u8 = 17;
    /// An AppendEntries that came in a coalesced heartbeat message: served as [`APPEND`], but
    /// its group's handler can tell it is a heartbeat (it does not wake a quiet replica).
    /// Never sent on the wire as a method of its own.
    pub const HEARTBEAT: u8 = 18;
    /// A partition replica's entries and batches for a range of offsets, asked by another
    /// replica rebuilding damaged data (see [`crate::partition::repair`]).
    pub const READ_RANGE: u8 = 19;
    /// A partition replica's entries and batches for a range of Raft indexes, asked by a
    /// replica copying its retained log (see [`crate::partition::seed`]).
    pub const READ_ENTRIES: u8 = 20;
}

/// The most an AppendEntries request carries, well under the transport's frame limit.
pub const APPEND_BYTES_MAX: usize = 8 << 20;

/// Snapshots may take longer than one RPC's budget.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a group's types must be to travel over the transport: its node ids are cluster node
/// ids and its nodes are addresses; and how its AppendEntries are framed (JSON unless the
/// group says otherwise: a partition group sends its batches as raw bytes).
///
/// No serde bound is written here or at any use: openraft's `serde` feature (enabled in
/// Cargo.toml) derives every message with no bounds of its own and requires serde of every
/// type a message carries, so every type config's messages are serde-capable. A bound in a
/// trait's `where` clause would not help anyway: Rust does not carry it to the trait's users,
/// so each of them would have to repeat it.
pub trait WireTypes: RaftTypeConfig<NodeId = NodeId, Node = BasicNode> {
    fn encode_append(request: &AppendEntriesRequest<Self>) -> Result<Bytes, String> {
        to_json(request)
    }

    /// Decodes what [`Self::encode_append`] made. Damaged input is an error, never a panic.
    fn decode_append(body: Bytes) -> Result<AppendEntriesRequest<Self>, String> {
        from_json(&body)
    }
}

pub(crate) fn to_json(value: &impl Serialize) -> Result<Bytes, String> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| format!("encoding: {e}"))
}

pub(crate) fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("decoding: {e}"))
}

/// Makes openraft's clients for one group.
pub struct GroupNetwork<C> {
    transport: Transport,
    group: u32,
    /// Where the group's heartbeats gather, if they are coalesced.
    heartbeats: Option<Arc<Heartbeats>>,
    _types: PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for GroupNetwork<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupNetwork")
            .field("group", &self.group)
            .finish()
    }
}

impl<C> std::fmt::Debug for PeerClient<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("group", &self.group)
            .field("target", &self.target)
            .finish()
    }
}

impl<C, SM> std::fmt::Debug for RaftServer<C, SM>
where
    C: RaftTypeConfig,
    SM: RaftStateMachine<C>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftServer").finish_non_exhaustive()
    }
}

impl<C> GroupNetwork<C> {
    pub fn new(transport: Transport, group: u32) -> Self {
        Self {
            transport,
            group,
            heartbeats: None,
            _types: PhantomData,
        }
    }

    /// The group's heartbeats go out with those of the node's other groups (see the module
    /// documentation).
    pub fn coalescing(mut self, heartbeats: Arc<Heartbeats>) -> Self {
        self.heartbeats = Some(heartbeats);
        self
    }
}

impl<C: WireTypes> RaftNetworkFactory<C> for GroupNetwork<C> {
    type Network = PeerClient<C>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient<C> {
        // openraft never asks for a client to the local node; one would panic its leader.
        debug_assert_ne!(target, self.transport.node_id());
        self.transport.suggest_address(target, node.addr.clone());
        PeerClient {
            transport: self.transport.clone(),
            group: self.group,
            target,
            heartbeats: None,
            _types: PhantomData,
        }
    }

    /// openraft's heartbeat worker sends the leader's heartbeats (and the lease probes of
    /// linearizable reads) through this client only.
    async fn new_heartbeat_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient<C> {
        let mut client = self.new_client(target, node).await;
        client.heartbeats = self.heartbeats.clone();
        client
    }
}

/// openraft's client to one peer for one group.
pub struct PeerClient<C> {
    transport: Transport,
    group: u32,
    target: NodeId,
    /// Set on the heartbeat client of a coalescing group.
    heartbeats: Option<Arc<Heartbeats>>,
    _types: PhantomData<fn() -> C>,
}

impl<C: WireTypes> PeerClient<C> {
    async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: u8,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<C>> {
        let body = to_json(request).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        self.call(method, body, timeout).await
    }

    /// Sends an encoded request; the answer is JSON.
    async fn call<Resp: DeserializeOwned>(
        &self,
        method: u8,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Resp, RPCError<C>> {
        let answer = self
            .transport
            .call(self.target, self.group, method, body, timeout)
            .await
            .map_err(rpc_error::<C>)?;
        decode_answer(&answer)
    }
}

/// A group's answer: `Result<response, reason>` as JSON.
fn decode_answer<C: RaftTypeConfig, Resp: DeserializeOwned>(
    answer: &[u8],
) -> Result<Resp, RPCError<C>> {
    let answer: Result<Resp, String> =
        from_json(answer).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
    answer.map_err(|reason| RPCError::Network(NetworkError::from_string(reason)))
}

fn rpc_error<C: RaftTypeConfig>(e: CallError) -> RPCError<C> {
    match e {
        CallError::Unreachable { .. } | CallError::Refused { .. } => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl<C: WireTypes> RaftNetworkV2<C> for PeerClient<C> {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let encode = |rpc: &AppendEntriesRequest<C>| {
            C::encode_append(rpc).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
        };
        let mut body = encode(&rpc)?;
        // A follower far behind is sent at most APPEND_BYTES_MAX at a time (openraft takes up
        // to 300 entries, and a partition's entry may be a MiB: more than a frame may carry);
        // the answer then says how far it got, and openraft sends the rest next.
        let mut cut = None;
        while body.len() > APPEND_BYTES_MAX && rpc.entries.len() > 1 {
            let keep = rpc.entries.len() / 2;
            rpc.entries.truncate(keep);
            cut = rpc.entries.last().map(openraft::entry::RaftEntry::log_id);
            body = encode(&rpc)?;
        }
        if let Some(heartbeats) = &self.heartbeats
            && rpc.entries.is_empty()
        {
            let answer = heartbeats
                .send(
                    &self.transport,
                    self.target,
                    self.group,
                    body,
                    option.hard_ttl(),
                )
                .await
                .map_err(rpc_error::<C>)?;
            return decode_answer(&answer);
        }
        let answer = self.call(method::APPEND, body, option.hard_ttl()).await?;
        Ok(match (answer, cut) {
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (answer, _) => answer,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.rpc(method::VOTE, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.rpc(method::PRE_VOTE, &rpc, option.hard_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        self.rpc(method::TRANSFER_LEADER, &req, option.hard_ttl())
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let head = to_json(&(&vote, &snapshot.meta))
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?;
        let data = snapshot.snapshot.into_inner();
        let mut body = BytesMut::with_capacity(4 + head.len() + data.len());
        body.put_u32(head.len() as u32);
        body.put_slice(&head);
        body.put_slice(&data);
        let call = self.transport.call(
            self.target,
            self.group,
            method::SNAPSHOT,
            body.freeze(),
            option.hard_ttl().max(SNAPSHOT_TIMEOUT),
        );
        let answer = tokio::select! {
            answer = call => answer.map_err(|e| StreamingError::from(rpc_error::<C>(e)))?,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let answer: Result<SnapshotResponse<C>, String> = from_json(&answer)
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?;
        answer.map_err(|reason| StreamingError::Network(NetworkError::from_string(reason)))
    }
}

/// The future a group's handler returns.
pub type Answer = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'static>>;

/// Serves one group's requests.
pub trait GroupHandler: Send + Sync + 'static {
    fn handle(&self, from: NodeId, method: u8, body: Bytes) -> Answer;
}

/// The node's [`Service`]: hands each request to the handler of its group, and each heartbeat
/// of a coalesced message ([`HEARTBEATS_GROUP`]) to its group. It also keeps the node's
/// [`Heartbeats`], where its own groups' heartbeats gather.
#[derive(Default)]
pub struct Router {
    groups: RwLock<HashMap<u32, Arc<dyn GroupHandler>>>,
    heartbeats: Arc<Heartbeats>,
    /// The groups this node leads, with their terms (reported to other nodes in answers to
    /// their pings: see [`crate::liveness`]).
    leading: Mutex<HashMap<u32, u64>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<u32> = self.groups.read().keys().copied().collect();
        f.debug_struct("Router").field("groups", &groups).finish()
    }
}

impl Router {
    pub fn register(&self, group: u32, handler: Arc<dyn GroupHandler>) {
        self.groups.write().insert(group, handler);
    }

    pub fn unregister(&self, group: u32) {
        self.groups.write().remove(&group);
    }

    /// Where this node's coalescing groups gather their heartbeats.
    pub fn heartbeats(&self) -> &Arc<Heartbeats> {
        &self.heartbeats
    }

    /// Records whether this node leads `group` (and in which term).
    pub fn set_leading(&self, group: u32, term: Option<u64>) {
        let mut leading = self.leading.lock();
        match term {
            Some(term) => {
                leading.insert(group, term);
            }
            None => {
                leading.remove(&group);
            }
        }
    }

    /// The groups this node leads, with their terms.
    pub fn leading(&self) -> Vec<(u32, u64)> {
        self.leading.lock().iter().map(|(g, t)| (*g, *t)).collect()
    }

    /// Serves a coalesced message: every heartbeat in it goes to its group at once, and the
    /// answer lists each group's answer in the same order.
    fn serve_heartbeats(&self, from: NodeId, body: Bytes) -> Answer {
        let beats = match decode_beats(body) {
            Ok(beats) => beats,
            Err(reason) => return Box::pin(async move { Err(reason) }),
        };
        let served: Vec<_> = {
            let groups = self.groups.read();
            beats
                .into_iter()
                .map(|(group, body)| {
                    let handler = groups.get(&group).cloned();
                    async move {
                        let answer = match handler {
                            Some(handler) => handler.handle(from, method::HEARTBEAT, body).await,
                            None => Err(format!("no group {group} on this node")),
                        };
                        (group, answer)
                    }
                })
                .collect()
        };
        Box::pin(async move { Ok(encode_answers(&join_all(served).await)) })
    }
}

impl Service for Router {
    fn handle(&self, from: NodeId, group: u32, method: u8, body: Bytes) -> Answer {
        if group == HEARTBEATS_GROUP && method == method::APPEND {
            return self.serve_heartbeats(from, body);
        }
        let handler = self.groups.read().get(&group).cloned();
        match handler {
            Some(handler) => handler.handle(from, method, body),
            None => Box::pin(async move { Err(format!("no group {group} on this node")) }),
        }
    }
}

/// The transport group coalesced heartbeats are sent to (method [`method::APPEND`]); no Raft
/// group has this id.
pub const HEARTBEATS_GROUP: u32 = u32::MAX - 3;
/// How long heartbeats to one peer gather before they go out together: a fifth of the default
/// heartbeat interval, so a heartbeat is late by at most that and a node sends each peer at
/// most 50 heartbeat messages a second however many groups it leads.
pub const HEARTBEAT_WINDOW: Duration = Duration::from_millis(20);
/// Heartbeats waiting for one peer, at most (one per group the node leads, so the bound is
/// never reached in practice); a heartbeat finding no room goes out alone.
const HEARTBEATS_WAITING_MAX: usize = 16_384;
/// A peer's gatherer that had nothing to send for this long stops; the next heartbeat for the
/// peer starts another.
const HEARTBEATS_IDLE: Duration = Duration::from_secs(30);

/// One group's heartbeat waiting to go out.
struct Beat {
    group: u32,
    body: Bytes,
    deadline: tokio::time::Instant,
    answer: oneshot::Sender<Result<Bytes, CallError>>,
}

/// Gathers the heartbeats of a node's groups per peer (see the module documentation).
#[derive(Default)]
pub struct Heartbeats {
    peers: Mutex<HashMap<NodeId, mpsc::Sender<Beat>>>,
}

impl std::fmt::Debug for Heartbeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers: Vec<NodeId> = self.peers.lock().keys().copied().collect();
        f.debug_struct("Heartbeats").field("peers", &peers).finish()
    }
}

impl Heartbeats {
    /// Sends `group`'s encoded heartbeat to `peer` with the next coalesced message and waits
    /// up to `timeout` for the group's answer.
    pub async fn send(
        &self,
        transport: &Transport,
        peer: NodeId,
        group: u32,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (answer, answered) = oneshot::channel();
        let beat = Beat {
            group,
            body,
            deadline,
            answer,
        };
        let beat = match self.gatherer(transport, peer).try_send(beat) {
            Ok(()) => None,
            // No room, or the gatherer just stopped: this one goes alone.
            Err(
                mpsc::error::TrySendError::Full(beat) | mpsc::error::TrySendError::Closed(beat),
            ) => Some(beat),
        };
        if let Some(beat) = beat {
            return transport
                .call(peer, beat.group, method::APPEND, beat.body, timeout)
                .await;
        }
        match tokio::time::timeout_at(deadline, answered).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(CallError::Closed { peer }),
            Err(_) => Err(CallError::Timeout { peer, timeout }),
        }
    }

    /// The queue of `peer`'s gatherer, started if there is none.
    fn gatherer(&self, transport: &Transport, peer: NodeId) -> mpsc::Sender<Beat> {
        let mut peers = self.peers.lock();
        match peers.entry(peer) {
            Entry::Occupied(queue) if !queue.get().is_closed() => queue.get().clone(),
            entry => {
                let (queue, waiting) = mpsc::channel(HEARTBEATS_WAITING_MAX);
                let gatherer = Gatherer {
                    transport: transport.clone(),
                    peer,
                };
                tokio::spawn(gatherer.run(waiting));
                match entry {
                    Entry::Occupied(mut old) => {
                        old.insert(queue.clone());
                    }
                    Entry::Vacant(vacant) => {
                        vacant.insert(queue.clone());
                    }
                }
                queue
            }
        }
    }
}

/// Sends one peer's heartbeats, a window's worth per message.
struct Gatherer {
    transport: Transport,
    peer: NodeId,
}

impl Gatherer {
    async fn run(self, mut waiting: mpsc::Receiver<Beat>) {
        loop {
            let first = match tokio::time::timeout(HEARTBEATS_IDLE, waiting.recv()).await {
                Ok(Some(beat)) => beat,
                Ok(None) => return,
                Err(_) => {
                    // Idle: stop, so that a gatherer never outlives its node for long (the
                    // node's list then holds a closed queue, replaced at the next heartbeat).
                    // Beats that raced in are answered "closed" when `waiting` drops; openraft
                    // sends the next heartbeat at its next tick.
                    waiting.close();
                    return;
                }
            };
            tokio::time::sleep(HEARTBEAT_WINDOW).await;
            let mut beats = vec![first];
            while let Ok(beat) = waiting.try_recv() {
                beats.push(beat);
            }
            // A heartbeat whose sender gave up is not sent.
            beats.retain(|beat| !beat.answer.is_closed());
            let Some(deadline) = beats.iter().map(|beat| beat.deadline).max() else {
                continue;
            };
            let transport = self.transport.clone();
            let peer = self.peer;
            // The next window gathers while this message is under way.
            tokio::spawn(async move {
                let body = encode_beats(&beats);
                let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
                let answered = transport
                    .call(peer, HEARTBEATS_GROUP, method::APPEND, body, timeout)
                    .await
                    .and_then(|answer| {
                        decode_answers(answer, beats.len()).map_err(|reason| CallError::Remote {
                            peer,
                            reason: format!("coalesced heartbeats: {reason}"),
                        })
                    });
                match answered {
                    Ok(answers) => {
                        for (beat, (group, answer)) in beats.into_iter().zip(answers) {
                            let answer = if group == beat.group {
                                answer.map_err(|reason| CallError::Remote { peer, reason })
                            } else {
                                Err(CallError::Remote {
                                    peer,
                                    reason: format!(
                                        "coalesced heartbeats: answer for group {group} where \
                                         group {} was expected",
                                        beat.group
                                    ),
                                })
                            };
                            let _ = beat.answer.send(answer);
                        }
                    }
                    Err(e) => {
                        for beat in beats {
                            let _ = beat.answer.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
    }
}

/// `[group u32 BE][length u32 BE][heartbeat]` per heartbeat.
fn encode_beats(beats: &[Beat]) -> Bytes {
    let size = beats.iter().map(|beat| 8 + beat.body.len()).sum();
    let mut body = BytesMut::with_capacity(size);
    for beat in beats {
        body.put_u32(beat.group);
        body.put_u32(beat.body.len() as u32);
        body.put_slice(&beat.body);
    }
    body.freeze()
}

fn decode_beats(mut body: Bytes) -> Result<Vec<(u32, Bytes)>, String> {
    let mut beats = Vec::new();
    while body.has_remaining() {
        if body.remaining() < 8 {
            return Err("coalesced heartbeats cut short".to_owned());
        }
        let group = body.get_u32();
        let length = body.get_u32() as usize;
        if body.remaining() < length {
            return Err(format!("coalesced heartbeat of group {group} cut short"));
        }
        beats.push((group, body.split_to(length)));
    }
    Ok(beats)
}

/// One group's answer to its heartbeat in a coalesced message: its handler's answer or why
/// it gave none.
type GroupAnswer = (u32, Result<Bytes, String>);

/// `[group u32 BE][0 answer | 1 reason: u8][length u32 BE][bytes]` per heartbeat, in the
/// order of the request.
fn encode_answers(answers: &[GroupAnswer]) -> Bytes {
    let mut body = BytesMut::new();
    for (group, answer) in answers {
        body.put_u32(*group);
        let (status, bytes) = match answer {
            Ok(bytes) => (0u8, &bytes[..]),
            Err(reason) => (1u8, reason.as_bytes()),
        };
        body.put_u8(status);
        body.put_u32(bytes.len() as u32);
        body.put_slice(bytes);
    }
    body.freeze()
}

fn decode_answers(mut body: Bytes, expected: usize) -> Result<Vec<GroupAnswer>, String> {
    let mut answers = Vec::with_capacity(expected);
    while body.has_remaining() {
        if body.remaining() < 9 {
            return Err("answers cut short".to_owned());
        }
        let group = body.get_u32();
        let status = body.get_u8();
        let length = body.get_u32() as usize;
        if body.remaining() < length {
            return Err(format!("the answer for group {group} is cut short"));
        }
        let bytes = body.split_to(length);
        answers.push((
            group,
            match status {
                0 => Ok(bytes),
                _ => Err(String::from_utf8_lossy(&bytes).into_owned()),
            },
        ));
    }
    if answers.len() != expected {
        return Err(format!(
            "{} answers to {expected} heartbeats",
            answers.len()
        ));
    }
    Ok(answers)
}

/// Serves Raft's RPCs for one group from its local `Raft`.
pub struct RaftServer<C, SM>
where
    C: RaftTypeConfig,
    SM: RaftStateMachine<C>,
{
    raft: Raft<C, SM>,
}

impl<C, SM> RaftServer<C, SM>
where
    C: RaftTypeConfig,
    SM: RaftStateMachine<C>,
{
    pub fn new(raft: Raft<C, SM>) -> Self {
        Self { raft }
    }
}

/// A state machine that can tell whether snapshot data from a peer is one it could install,
/// before openraft is given it: openraft takes a failed install for a storage failure and
/// stops the group, so data that does not decode is refused at the door instead.
pub trait SnapshotCheck {
    fn check_snapshot(data: &[u8]) -> io::Result<()>;
}

impl<C: RaftTypeConfig, M: Machine> SnapshotCheck for StateMachineStore<C, M> {
    fn check_snapshot(data: &[u8]) -> io::Result<()> {
        M::decode(data).map(drop)
    }
}

impl<C, SM> GroupHandler for RaftServer<C, SM>
where
    C: WireTypes,
    SM: RaftStateMachine<C, SnapshotData = Cursor<Vec<u8>>> + SnapshotCheck,
{
    fn handle(&self, from: NodeId, method: u8, body: Bytes) -> Answer {
        let raft = self.raft.clone();
        Box::pin(async move {
            match method {
                method::APPEND | method::HEARTBEAT => {
                    let request = C::decode_append(body)?;
                    let answer = raft
                        .append_entries(request)
                        .await
                        .map_err(|e| e.to_string());
                    to_json(&answer)
                }
                method::VOTE => {
                    let request: VoteRequest<C> = from_json(&body)?;
                    to_json(&raft.vote(request).await.map_err(|e| e.to_string()))
                }
                method::PRE_VOTE => {
                    let request: VoteRequest<C> = from_json(&body)?;
                    to_json(&raft.pre_vote(request).await.map_err(|e| e.to_string()))
                }
                method::TRANSFER_LEADER => {
                    let request: TransferLeaderRequest<C> = from_json(&body)?;
                    to_json(
                        &raft
                            .handle_transfer_leader(request)
                            .await
                            .map_err(|e| e.to_string()),
                    )
                }
                method::SNAPSHOT => {
                    let head_len = body
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .ok_or("snapshot request cut short")?;
                    let head = body
                        .get(4..4 + head_len)
                        .ok_or("snapshot request cut short")?;
                    let (vote, meta): (VoteOf<C>, SnapshotMetaOf<C>) = from_json(head)?;
                    let data = body.slice(4 + head_len..).to_vec();
                    // Decoding a large snapshot takes a while: not on an async worker.
                    let checked = tokio::task::spawn_blocking(move || {
                        SM::check_snapshot(&data).map(|()| data)
                    })
                    .await
                    .map_err(|e| format!("checking a snapshot: {e}"))?;
                    let data = checked.map_err(|e| {
                        tracing::warn!(from, error = %e, "refused a snapshot");
                        format!("snapshot refused: {e}")
                    })?;
                    let snapshot = SnapshotOf::<C, Cursor<Vec<u8>>> {
                        meta,
                        snapshot: Cursor::new(data),
                    };
                    let answer = raft
                        .install_full_snapshot(vote, snapshot)
                        .await
                        .map_err(|e| e.to_string());
                    to_json(&answer)
                }
                other => Err(format!("unknown Raft method {other}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::alias::{LeaderIdOf, LogIdOf};
    use openraft::vote::RaftLeaderIdExt;
    use openraft::{Config, Raft};
    use tokio::net::TcpListener;

    use super::*;
    use crate::controller::{ControllerState, ControllerTypes};
    use crate::log_store::LogStore;
    use crate::transport::TransportConfig;

    type Store = StateMachineStore<ControllerTypes, ControllerState>;

    fn log_id(index: u64) -> LogIdOf<ControllerTypes> {
        LogIdOf::<ControllerTypes>::new(LeaderIdOf::<ControllerTypes>::new_committed(2, 2), index)
    }

    /// A snapshot request as [`PeerClient::full_snapshot`] sends it, from node 2 leading term 2.
    fn snapshot_request(data: &[u8]) -> Bytes {
        let vote = VoteOf::<ControllerTypes>::new_committed(2, 2);
        let meta = SnapshotMetaOf::<ControllerTypes> {
            last_log_id: Some(log_id(10)),
            last_membership: Default::default(),
        };
        let head = to_json(&(&vote, &meta)).expect("encodes");
        let mut body = BytesMut::new();
        body.put_u32(head.len() as u32);
        body.put_slice(&head);
        body.put_slice(data);
        body.freeze()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_that_does_not_decode_is_refused_and_raft_keeps_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let transport = Transport::start(
            TransportConfig::new(1, address),
            listener,
            Arc::new(Router::default()),
        );
        let log = LogStore::<ControllerTypes>::open(&dir.path().join("log")).expect("log opens");
        let machine = Store::open(&dir.path().join("machine")).expect("machine opens");
        let config = Config::default().validate().expect("valid config");
        let raft = Raft::new(
            1,
            Arc::new(config),
            GroupNetwork::new(transport.clone(), 0),
            log,
            machine.clone(),
        )
        .await
        .expect("raft starts");
        let server = RaftServer::new(raft.clone());

        let refused = server
            .handle(2, method::SNAPSHOT, snapshot_request(b"not a snapshot"))
            .await
            .expect_err("an undecodable snapshot is refused");
        assert!(refused.contains("snapshot refused"), "{refused}");
        assert_eq!(machine.last_applied(), None);
        // openraft never saw it: the group still runs and installs a good snapshot.
        assert!(raft.is_initialized().await.is_ok(), "raft stopped");
        let data = ControllerState::default().encode().expect("encodes");
        let answer = server
            .handle(2, method::SNAPSHOT, snapshot_request(&data))
            .await
            .expect("a good snapshot is served");
        let answer: Result<SnapshotResponse<ControllerTypes>, String> =
            from_json(&answer).expect("an answer");
        answer.expect("a good snapshot installs");
        assert_eq!(machine.last_applied(), Some(log_id(10)));

        raft.shutdown().await.expect("raft stops");
        transport.shutdown();
    }
    /// Answers a heartbeat with the group's id and the heartbeat's bytes.
    struct Echo(u32);

    impl GroupHandler for Echo {
        fn handle(&self, _from: NodeId, method: u8, body: Bytes) -> Answer {
            let group = self.0;
            Box::pin(async move {
                assert!(method == method::APPEND || method == method::HEARTBEAT);
                let mut answer = group.to_be_bytes().to_vec();
                answer.extend_from_slice(&body);
                Ok(Bytes::from(answer))
            })
        }
    }

    /// Counts the requests a node receives, by group, before the router serves them.
    struct Counting {
        router: Router,
        seen: Mutex<HashMap<u32, usize>>,
    }

    impl Service for Counting {
        fn handle(&self, from: NodeId, group: u32, method: u8, body: Bytes) -> Answer {
            *self.seen.lock().entry(group).or_default() += 1;
            self.router.handle(from, group, method, body)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heartbeats_of_many_groups_to_one_peer_travel_as_one_message() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let receiver_address = listener.local_addr().expect("address").to_string();
        let counting = Arc::new(Counting {
            router: Router::default(),
            seen: Mutex::new(HashMap::new()),
        });
        const GROUPS: u32 = 200;
        for group in 1..=GROUPS {
            counting.router.register(group, Arc::new(Echo(group)));
        }
        let receiver = Transport::start(
            TransportConfig::new(2, receiver_address.clone()),
            listener,
            counting.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let router = Arc::new(Router::default());
        let sender = Transport::start(TransportConfig::new(1, address), listener, router.clone());
        sender.set_address(2, receiver_address);

        // Every group's heartbeat at about the same moment, and one to a group the peer lacks.
        let sends = (1..=GROUPS + 1).map(|group| {
            let heartbeats = Arc::clone(router.heartbeats());
            let sender = sender.clone();
            async move {
                let body = Bytes::from(format!("beat {group}"));
                let answer = heartbeats
                    .send(&sender, 2, group, body, Duration::from_secs(5))
                    .await;
                (group, answer)
            }
        });
        let answers = join_all(sends).await;
        for (group, answer) in answers {
            if group > GROUPS {
                let error = answer.expect_err("the peer has no such group");
                assert!(error.to_string().contains("no group"), "{error}");
                continue;
            }
            let answer = answer.expect("answered");
            assert_eq!(
                answer[..4],
                group.to_be_bytes(),
                "group {group}'s own answer"
            );
            assert_eq!(&answer[4..], format!("beat {group}").as_bytes());
        }
        let seen = counting.seen.lock().clone();
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            vec![HEARTBEATS_GROUP],
            "only coalesced messages: {seen:?}"
        );
        // One message, or two if the window closed while the sends were starting.
        assert!(seen[&HEARTBEATS_GROUP] <= 2, "{seen:?}");

        sender.shutdown();
        receiver.shutdown();
    }

    #[test]
    fn damaged_coalesced_messages_are_errors() {
        let beat = |group: u32, body: &'static [u8]| {
            let (answer, _) = oneshot::channel();
            Beat {
                group,
                body: Bytes::from_static(body),
                deadline: tokio::time::Instant::now(),
                answer,
            }
        };
        let whole = encode_beats(&[beat(7, b"abc"), beat(9, b"")]);
        assert_eq!(
            decode_beats(whole.clone()).expect("decodes"),
            vec![(7, Bytes::from_static(b"abc")), (9, Bytes::new())]
        );
        for cut in 1..whole.len() {
            if cut == 11 {
                continue; // the first heartbeat whole: a message of one
            }
            assert!(decode_beats(whole.slice(..cut)).is_err(), "cut at {cut}");
        }
        let answers = encode_answers(&[(7, Ok(Bytes::from_static(b"ok"))), (9, Err("no".into()))]);
        let decoded = decode_answers(answers.clone(), 2).expect("decodes");
        assert_eq!(decoded[0], (7, Ok(Bytes::from_static(b"ok"))));
        assert_eq!(decoded[1], (9, Err("no".to_owned())));
        assert!(
            decode_answers(answers.clone(), 3).is_err(),
            "a missing answer"
        );
        for cut in 1..answers.len() {
            assert!(
                decode_answers(answers.slice(..cut), 2).is_err(),
                "cut at {cut}"
            );
        }
    }
}
