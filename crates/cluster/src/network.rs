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

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Cursor};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use openraft::{BasicNode, Raft, RaftNetworkV2, RaftTypeConfig};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;

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
}

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

impl<C: WireTypes> RaftNetworkV2<C> for PeerClient<C> {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let body =
            C::encode_append(&rpc).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        self.call(method::APPEND, body, option.hard_ttl()).await
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
                method::APPEND => {
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
                        tracing::warn!(from, error = %e, "refused a snapshot whose data does not decode");
                        format!("snapshot data does not decode: {e}")
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
        assert!(refused.contains("does not decode"), "{refused}");
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
}
