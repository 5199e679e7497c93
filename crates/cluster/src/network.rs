//! openraft's network over the cluster [`Transport`]: a client per peer and group that sends
//! Raft's RPCs, and the server side that hands them to the local group's `Raft`.
//!
//! Messages of the controller group are JSON inside transport frames; snapshots send their
//! metadata as JSON and their data as raw bytes after it. Every RPC's answer is
//! `Result<response, reason>`: a group that fails to serve (shutting down, say) answers with its
//! reason, which the caller reports to openraft as a network error to retry.
//!
//! Errors are mapped so openraft backs off from dead peers: a peer that cannot be reached is
//! `Unreachable`; a call that timed out or whose connection closed is a `Network` error, retried
//! at once (on a new connection).

use std::collections::HashMap;
use std::future::Future;
use std::io::Cursor;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, Raft, RaftNetworkV2, RaftTypeConfig};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::placement::NodeId;
use crate::transport::{CallError, Service, Transport};

/// The RPCs a group serves, as transport method numbers.
pub mod method {
    pub const APPEND: u8 = 1;
    pub const VOTE: u8 = 2;
    pub const SNAPSHOT: u8 = 3;
    pub const PRE_VOTE: u8 = 4;
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
}

/// Snapshots may take longer than one RPC's budget.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// What openraft needs of a group's types to travel over the transport.
pub trait WireTypes:
    RaftTypeConfig<
        NodeId = NodeId,
        Node = BasicNode,
        D: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    >
where
    AppendEntriesRequest<Self>: Serialize + DeserializeOwned,
    AppendEntriesResponse<Self>: Serialize + DeserializeOwned,
    VoteRequest<Self>: Serialize + DeserializeOwned,
    VoteResponse<Self>: Serialize + DeserializeOwned,
    SnapshotResponse<Self>: Serialize + DeserializeOwned,
    VoteOf<Self>: Serialize + DeserializeOwned,
    SnapshotMetaOf<Self>: Serialize + DeserializeOwned,
{
}

impl<C> WireTypes for C
where
    C: RaftTypeConfig<
            NodeId = NodeId,
            Node = BasicNode,
            D: Serialize + DeserializeOwned,
            R: Serialize + DeserializeOwned,
        >,
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    AppendEntriesResponse<C>: Serialize + DeserializeOwned,
    VoteRequest<C>: Serialize + DeserializeOwned,
    VoteResponse<C>: Serialize + DeserializeOwned,
    SnapshotResponse<C>: Serialize + DeserializeOwned,
    VoteOf<C>: Serialize + DeserializeOwned,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
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
            _types: PhantomData,
        }
    }
}

impl<C: WireTypes> RaftNetworkFactory<C> for GroupNetwork<C>
where
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    AppendEntriesResponse<C>: Serialize + DeserializeOwned,
    VoteRequest<C>: Serialize + DeserializeOwned,
    VoteResponse<C>: Serialize + DeserializeOwned,
    SnapshotResponse<C>: Serialize + DeserializeOwned,
    VoteOf<C>: Serialize + DeserializeOwned,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    type Network = PeerClient<C>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient<C> {
        // openraft never asks for a client to the local node; one would panic its leader.
        debug_assert_ne!(target, self.transport.node_id());
        self.transport.set_address(target, node.addr.clone());
        PeerClient {
            transport: self.transport.clone(),
            group: self.group,
            target,
            _types: PhantomData,
        }
    }
}

/// openraft's client to one peer for one group.
pub struct PeerClient<C> {
    transport: Transport,
    group: u32,
    target: NodeId,
    _types: PhantomData<fn() -> C>,
}

impl<C: WireTypes> PeerClient<C>
where
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    AppendEntriesResponse<C>: Serialize + DeserializeOwned,
    VoteRequest<C>: Serialize + DeserializeOwned,
    VoteResponse<C>: Serialize + DeserializeOwned,
    SnapshotResponse<C>: Serialize + DeserializeOwned,
    VoteOf<C>: Serialize + DeserializeOwned,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: u8,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<C>> {
        let body = to_json(request).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        let answer = self
            .transport
            .call(self.target, self.group, method, body, timeout)
            .await
            .map_err(rpc_error::<C>)?;
        let answer: Result<Resp, String> =
            from_json(&answer).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        answer.map_err(|reason| RPCError::Network(NetworkError::from_string(reason)))
    }
}

fn rpc_error<C: RaftTypeConfig>(e: CallError) -> RPCError<C> {
    match e {
        CallError::Unreachable { .. } | CallError::Refused { .. } => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl<C: WireTypes> RaftNetworkV2<C> for PeerClient<C>
where
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    AppendEntriesResponse<C>: Serialize + DeserializeOwned,
    VoteRequest<C>: Serialize + DeserializeOwned,
    VoteResponse<C>: Serialize + DeserializeOwned,
    SnapshotResponse<C>: Serialize + DeserializeOwned,
    VoteOf<C>: Serialize + DeserializeOwned,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.rpc(method::APPEND, &rpc, option.hard_ttl()).await
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

/// The node's [`Service`]: hands each request to the handler of its group.
#[derive(Default)]
pub struct Router {
    groups: RwLock<HashMap<u32, Arc<dyn GroupHandler>>>,
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
}

impl Service for Router {
    fn handle(&self, from: NodeId, group: u32, method: u8, body: Bytes) -> Answer {
        let handler = self.groups.read().get(&group).cloned();
        match handler {
            Some(handler) => handler.handle(from, method, body),
            None => Box::pin(async move { Err(format!("no group {group} on this node")) }),
        }
    }
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

impl<C, SM> GroupHandler for RaftServer<C, SM>
where
    C: WireTypes,
    SM: RaftStateMachine<C, SnapshotData = Cursor<Vec<u8>>>,
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    AppendEntriesResponse<C>: Serialize + DeserializeOwned,
    VoteRequest<C>: Serialize + DeserializeOwned,
    VoteResponse<C>: Serialize + DeserializeOwned,
    SnapshotResponse<C>: Serialize + DeserializeOwned,
    VoteOf<C>: Serialize + DeserializeOwned,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
{
    fn handle(&self, _from: NodeId, method: u8, body: Bytes) -> Answer {
        let raft = self.raft.clone();
        Box::pin(async move {
            match method {
                method::APPEND => {
                    let request: AppendEntriesRequest<C> = from_json(&body)?;
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
