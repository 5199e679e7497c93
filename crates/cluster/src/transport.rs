//! The cluster transport: one TCP connection per pair of nodes, carrying requests and
//! responses for every Raft group and every forwarded request, each tagged with its group and
//! a correlation id.
//!
//! # Frames
//! `[length u32 BE: bytes after this field][version u8 = 1][kind u8][correlation u64 BE]
//! [group u32 BE][method u8][body]`. Kinds: `1` hello, `2` request, `3` response, `4` error
//! response (body: UTF-8 reason), `5` refusal (body: reason; the sender closes), `6` welcome.
//! A connection opens with a hello each way, then each side's verdict on the other's hello
//! (welcome or refusal), so both ends learn why a connection was refused. The body is
//! opaque here: callers choose its encoding, and record batches can travel as raw bytes.
//! A frame longer than [`TransportConfig::frame_bytes_max`] closes the connection before
//! anything is allocated for it. Until a connection is welcomed its frames (hello, welcome,
//! refusal) may be at most [`HANDSHAKE_FRAME_BYTES_MAX`]: a stranger cannot make this node
//! allocate a full frame before it has said who it is.
//!
//! # One connection per pair
//! Either node may dial. The first frame each way is a hello (node id, cluster id, advertised
//! address). When two connections between the same pair exist (both dialed at once), both
//! ends keep the one dialed by the lower node id and close the other, so they agree without
//! another round trip. Calls on a closed connection fail with [`CallError::Closed`]; Raft
//! retries.
//!
//! # Bounds and backoff
//! Each connection has a bounded queue of frames to write and a bounded number of requests it
//! serves at once (a further request is answered "busy" at once: the reader never stops, since
//! answers to this node's own calls share the socket). Every
//! call has a timeout and removes its waiter when it ends, so a slow or dead peer never grows
//! memory. A failed dial makes calls to that peer fail at once as [`CallError::Unreachable`]
//! for a backoff that doubles from [`TransportConfig::backoff_min`] to
//! [`TransportConfig::backoff_max`]; the next call after it dials again.
//!
//! At most [`TransportConfig::handshakes_max`] accepted connections may be in their handshake
//! at once (a further one is closed at once), and a handshake that takes longer than
//! [`TransportConfig::handshake_timeout`] closes its connection, so a flood of idle sockets
//! holds a bounded amount of memory for a bounded time.
//!
//! # Dead peers
//! A failed read or write closes the connection at once: its waiting calls fail with
//! [`CallError::Closed`] and the next call dials again. Every connection has `TCP_NODELAY`,
//! TCP keepalive and (on Linux) `TCP_USER_TIMEOUT`, so a peer that vanished without closing
//! its sockets (power loss, a cut network) makes reads and writes fail within seconds instead
//! of hours.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::placement::NodeId;

const VERSION: u8 = 1;
const KIND_HELLO: u8 = 1;
const KIND_REQUEST: u8 = 2;
const KIND_RESPONSE: u8 = 3;
const KIND_ERROR: u8 = 4;
const KIND_REFUSED: u8 = 5;
const KIND_WELCOME: u8 = 6;
/// Bytes after the length field before the body.
const HEADER_BYTES: usize = 1 + 1 + 8 + 4 + 1;
/// The largest frame read or written before a connection is welcomed (length field excluded).
/// A hello holds a node id, a cluster id and an address, well under 1 KiB; a refusal holds a
/// sentence naming two addresses.
pub const HANDSHAKE_FRAME_BYTES_MAX: u32 = 4096;
/// A connection idle this long gets keepalive probes...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// ...this far apart...
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ...and closes after this many go unanswered: a silent peer is noticed after about
/// 5 + 3 × 2 = 11 s, where Linux's defaults take over two hours. (Interval and count are set
/// on Linux only, the platform Sluice is deployed on.)
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
const KEEPALIVE_RETRIES: u32 = 3;
/// Sent data unacknowledged this long fails the connection (`TCP_USER_TIMEOUT`, Linux only).
/// Keepalive probes only an idle connection; without this, a write to a vanished peer is
/// retransmitted for about 15 minutes before it fails.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
const UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(20);

/// How the transport behaves; the defaults suit a cluster on one network.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub node_id: NodeId,
    /// The cluster this node belongs to, once it is known; peers of another cluster are
    /// refused.
    pub cluster_id: Option<String>,
    /// The address other nodes reach this one at.
    pub advertise: String,
    /// Frames waiting to be written on one connection.
    pub queue_frames_max: usize,
    /// Requests one connection serves at once.
    pub serving_max: usize,
    /// Calls waiting for answers on one connection.
    pub calls_max: usize,
    /// The largest frame sent or accepted.
    pub frame_bytes_max: u32,
    pub connect_timeout: Duration,
    /// How long the exchange of hellos and verdicts may take on a new connection.
    pub handshake_timeout: Duration,
    /// Accepted connections in their handshake at once; a further one is closed at once.
    pub handshakes_max: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl TransportConfig {
    pub fn new(node_id: NodeId, advertise: String) -> Self {
        Self {
            node_id,
            cluster_id: None,
            advertise,
            queue_frames_max: 1024,
            serving_max: 256,
            calls_max: 1024,
            frame_bytes_max: 64 << 20,
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            handshakes_max: 64,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection to the peer could be made (or one failed recently: backing off).
    #[error("node {peer} is unreachable: {reason}")]
    Unreachable { peer: NodeId, reason: String },
    /// The peer did not answer in time; the request may or may not have been served.
    #[error("node {peer} did not answer within {timeout:?}")]
    Timeout { peer: NodeId, timeout: Duration },
    /// The connection closed before the answer came; the request may have been served.
    #[error("the connection to node {peer} closed before it answered")]
    Closed { peer: NodeId },
    /// The peer served the request and answered with an error.
    #[error("node {peer} answered with an error: {reason}")]
    Remote { peer: NodeId, reason: String },
    /// The peer is not one this node may talk to (another cluster, this node's own id, not the
    /// node expected at that address); the reason says which.
    #[error("refused: {reason}")]
    Refused { peer: NodeId, reason: String },
    /// The request is larger than a frame may be.
    #[error("a request of {bytes} bytes is over the frame limit of {limit}")]
    TooLarge { bytes: usize, limit: u32 },
}

/// Serves the requests peers send: one call per request, answered with the body of the
/// response or an error text.
pub trait Service: Send + Sync + 'static {
    fn handle(
        &self,
        from: NodeId,
        group: u32,
        method: u8,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'static>>;
}

/// The first frame each way on a connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    node_id: NodeId,
    cluster_id: Option<String>,
    advertise: String,
}

/// The cluster transport of one node. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.inner.config.node_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: TransportConfig,
    /// The cluster id, once known (it changes from none to the cluster's when a node joins).
    cluster_id: Mutex<Option<String>>,
    service: Arc<dyn Service>,
    state: Mutex<PeerTable>,
    /// One dial at a time per peer.
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    next_correlation: AtomicU64,
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct PeerTable {
    addresses: HashMap<NodeId, String>,
    connections: HashMap<NodeId, Arc<Connection>>,
    /// When dialing a peer may be tried again, and the backoff to use after the next failure.
    backoff: HashMap<NodeId, (Instant, Duration, String)>,
}

struct Connection {
    peer: NodeId,
    dialed_by: NodeId,
    frames: mpsc::Sender<Bytes>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, CallError>>>>,
    calls: Semaphore,
    closed: watch::Sender<bool>,
}

impl Connection {
    fn close(&self) {
        self.closed.send_replace(true);
        let waiting: Vec<_> = self.waiting.lock().drain().collect();
        for (_, waiter) in waiting {
            let _ = waiter.send(Err(CallError::Closed { peer: self.peer }));
        }
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

impl Transport {
    /// Starts serving `listener` with `service`.
    pub fn start(
        config: TransportConfig,
        listener: TcpListener,
        service: Arc<dyn Service>,
    ) -> Self {
        let (shutdown, _) = watch::channel(false);
        let transport = Self {
            inner: Arc::new(Inner {
                cluster_id: Mutex::new(config.cluster_id.clone()),
                config,
                service,
                state: Mutex::new(PeerTable::default()),
                dial_locks: Mutex::new(HashMap::new()),
                next_correlation: AtomicU64::new(1),
                shutdown,
            }),
        };
        let accepting = transport.clone();
        tokio::spawn(async move { accepting.accept_loop(listener).await });
        transport
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// Sets `peer`'s address unless one is known already (the registry's, set by
    /// [`Self::set_address`], wins over what Raft's membership remembers).
    pub fn suggest_address(&self, peer: NodeId, address: String) {
        let known = self.inner.state.lock().addresses.contains_key(&peer);
        if !known {
            self.set_address(peer, address);
        }
    }

    /// Where `peer` is reached. A changed address closes the connection to the old one.
    pub fn set_address(&self, peer: NodeId, address: String) {
        let old = {
            let mut state = self.inner.state.lock();
            let previous = state.addresses.insert(peer, address.clone());
            let changed = previous.as_ref().is_some_and(|old| *old != address);
            if previous.is_none() || changed {
                state.backoff.remove(&peer);
            }
            if changed {
                state.connections.remove(&peer)
            } else {
                None
            }
        };
        if let Some(old) = old {
            old.close();
        }
    }

    /// Sets the cluster id checked against peers' from now on.
    pub fn set_cluster_id(&self, cluster_id: Option<String>) {
        *self.inner.cluster_id.lock() = cluster_id;
    }

    /// The peers this node has a live connection to.
    pub fn connected(&self) -> Vec<NodeId> {
        let state = self.inner.state.lock();
        let mut peers: Vec<NodeId> = state
            .connections
            .values()
            .filter(|c| !c.is_closed())
            .map(|c| c.peer)
            .collect();
        peers.sort_unstable();
        peers
    }

    /// Calls waiting for an answer, over every connection.
    pub fn calls_waiting(&self) -> usize {
        let state = self.inner.state.lock();
        state
            .connections
            .values()
            .map(|c| c.waiting.lock().len())
            .sum()
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let connections: Vec<_> = self.inner.state.lock().connections.drain().collect();
        for (_, connection) in connections {
            connection.close();
        }
    }

    /// Dials `address` to learn the id of the node there (a seed), keeping the connection.
    pub async fn introduce(&self, address: &str) -> Result<NodeId, CallError> {
        let stream = tokio::time::timeout(
            self.inner.config.connect_timeout,
            TcpStream::connect(address),
        )
        .await
        .map_err(|_| unreachable(0, format!("connecting to {address} timed out")))?
        .map_err(|e| unreachable(0, format!("connecting to {address}: {e}")))?;
        let connection = self.handshake(stream, true, None).await?;
        Ok(connection.peer)
    }

    /// Sends a request to `peer` for `group` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        peer: NodeId,
        group: u32,
        method: u8,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let limit = self.inner.config.frame_bytes_max;
        if body.len() + HEADER_BYTES > limit as usize {
            return Err(CallError::TooLarge {
                bytes: body.len(),
                limit,
            });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = async {
            let connection = self.connection(peer).await?;
            let _permit = connection
                .calls
                .acquire()
                .await
                .map_err(|_| CallError::Closed { peer })?;
            let correlation = self.inner.next_correlation.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            connection.waiting.lock().insert(correlation, tx);
            let _forget = Forget {
                connection: &connection,
                correlation,
            };
            if connection.is_closed() {
                return Err(CallError::Closed { peer });
            }
            let frame = encode(KIND_REQUEST, correlation, group, method, &body);
            connection
                .frames
                .send(frame)
                .await
                .map_err(|_| CallError::Closed { peer })?;
            rx.await.unwrap_or(Err(CallError::Closed { peer }))
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout { peer, timeout }),
        }
    }

    /// The live connection to `peer`, dialing it if there is none.
    async fn connection(&self, peer: NodeId) -> Result<Arc<Connection>, CallError> {
        if let Some(connection) = self.live(peer) {
            return Ok(connection);
        }
        let lock = Arc::clone(self.inner.dial_locks.lock().entry(peer).or_default());
        let _dialing = lock.lock().await;
        if let Some(connection) = self.live(peer) {
            return Ok(connection);
        }
        let address = {
            let state = self.inner.state.lock();
            if let Some((until, _, reason)) = state.backoff.get(&peer)
                && Instant::now() < *until
            {
                return Err(unreachable(peer, format!("backing off after: {reason}")));
            }
            state
                .addresses
                .get(&peer)
                .cloned()
                .ok_or_else(|| unreachable(peer, "no address known".to_owned()))?
        };
        let dialed = async {
            let stream = tokio::time::timeout(
                self.inner.config.connect_timeout,
                TcpStream::connect(&address),
            )
            .await
            .map_err(|_| unreachable(peer, format!("connecting to {address} timed out")))?
            .map_err(|e| unreachable(peer, format!("connecting to {address}: {e}")))?;
            self.handshake(stream, true, Some(peer)).await
        }
        .await;
        let mut state = self.inner.state.lock();
        match dialed {
            Ok(connection) => {
                state.backoff.remove(&peer);
                Ok(connection)
            }
            Err(e) => {
                let (min, max) = (self.inner.config.backoff_min, self.inner.config.backoff_max);
                let next = state
                    .backoff
                    .get(&peer)
                    .map_or(min, |(_, last, _)| (*last * 2).min(max));
                state
                    .backoff
                    .insert(peer, (Instant::now() + next, next, e.to_string()));
                Err(e)
            }
        }
    }

    fn live(&self, peer: NodeId) -> Option<Arc<Connection>> {
        let state = self.inner.state.lock();
        state
            .connections
            .get(&peer)
            .filter(|c| !c.is_closed())
            .cloned()
    }

    async fn accept_loop(self, listener: TcpListener) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let handshakes_max = self.inner.config.handshakes_max;
        let handshakes = Arc::new(Semaphore::new(handshakes_max));
        // Connections closed for want of a handshake slot since the last warning, which is
        // given at most once a second: a flood must not become a flood of log lines.
        let mut turned_away_count = 0u64;
        let mut warned_at: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match accepted {
                Ok((stream, from)) => {
                    let Ok(handshake_slot) = Arc::clone(&handshakes).try_acquire_owned() else {
                        drop(stream);
                        turned_away_count += 1;
                        if warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(
                                %from,
                                handshakes_max,
                                turned_away_count,
                                "too many cluster handshakes in progress; closing new connections"
                            );
                            warned_at = Some(Instant::now());
                            turned_away_count = 0;
                        }
                        continue;
                    };
                    let transport = self.clone();
                    tokio::spawn(async move {
                        let handshake = transport.handshake(stream, false, None).await;
                        drop(handshake_slot);
                        match handshake {
                            Ok(_) => {}
                            // The peer's id is not known yet: the reason alone says more.
                            Err(CallError::Unreachable { reason, .. }) => {
                                tracing::info!(%from, %reason, "closed a cluster connection in its handshake");
                            }
                            Err(e) => {
                                tracing::info!(%from, error = %e, "refused a cluster connection");
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a cluster connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Exchanges hellos on a new connection (`dialed` by this node or accepted), checks the
    /// peer, registers the connection and starts its reader and writer, all within
    /// [`TransportConfig::handshake_timeout`].
    async fn handshake(
        &self,
        stream: TcpStream,
        dialed: bool,
        expected: Option<NodeId>,
    ) -> Result<Arc<Connection>, CallError> {
        if let Err(e) = tune(&stream) {
            // The connection still works; a dead peer is only noticed later.
            tracing::warn!(error = %e, "setting TCP options on a cluster connection failed");
        }
        let timeout = self.inner.config.handshake_timeout;
        // Nothing is registered before the last await of the exchange, so a handshake cut
        // short by the timeout leaves nothing behind.
        tokio::time::timeout(timeout, self.exchange_hellos(stream, dialed, expected))
            .await
            .unwrap_or_else(|_| {
                Err(unreachable(
                    expected.unwrap_or(0),
                    format!("the handshake took longer than {timeout:?}"),
                ))
            })
    }

    async fn exchange_hellos(
        &self,
        stream: TcpStream,
        dialed: bool,
        expected: Option<NodeId>,
    ) -> Result<Arc<Connection>, CallError> {
        let peer_for_errors = expected.unwrap_or(0);
        let (mut reader, writer) = stream.into_split();
        let mut writer = BufWriter::new(writer);
        let config = &self.inner.config;
        let cluster_id = self.inner.cluster_id.lock().clone();
        let hello = Hello {
            node_id: config.node_id,
            cluster_id: cluster_id.clone(),
            advertise: config.advertise.clone(),
        };
        let hello_bytes =
            serde_json::to_vec(&hello).map_err(|e| unreachable(peer_for_errors, e.to_string()))?;
        if hello_bytes.len() + HEADER_BYTES > HANDSHAKE_FRAME_BYTES_MAX as usize {
            return Err(unreachable(
                peer_for_errors,
                format!(
                    "this node's hello is {} bytes, over the handshake frame limit of \
                     {HANDSHAKE_FRAME_BYTES_MAX}: shorten the advertised address or cluster id",
                    hello_bytes.len() + HEADER_BYTES
                ),
            ));
        }
        let io = |e: std::io::Error| unreachable(peer_for_errors, format!("handshake: {e}"));
        let read_io = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                unreachable(
                    peer_for_errors,
                    format!(
                        "handshake: {e} (frames before a welcome are at most \
                         {HANDSHAKE_FRAME_BYTES_MAX} bytes); closing the connection"
                    ),
                )
            } else {
                io(e)
            }
        };
        writer
            .write_all(&encode(KIND_HELLO, 0, 0, 0, &hello_bytes))
            .await
            .map_err(io)?;
        writer.flush().await.map_err(io)?;
        let frame = read_frame(&mut reader, HANDSHAKE_FRAME_BYTES_MAX)
            .await
            .map_err(read_io)?;
        if frame.kind == KIND_REFUSED {
            return Err(CallError::Refused {
                peer: peer_for_errors,
                reason: String::from_utf8_lossy(&frame.body).into_owned(),
            });
        }
        if frame.kind != KIND_HELLO {
            return Err(unreachable(
                peer_for_errors,
                "the peer did not say hello".to_owned(),
            ));
        }
        let theirs: Hello = serde_json::from_slice(&frame.body)
            .map_err(|e| unreachable(peer_for_errors, format!("undecodable hello: {e}")))?;
        let refusal = if theirs.node_id == config.node_id {
            Some(format!(
                "node {} at {} has this node's own id",
                theirs.node_id, theirs.advertise
            ))
        } else if let (Some(ours), Some(other)) = (&cluster_id, &theirs.cluster_id)
            && ours != other
        {
            Some(format!(
                "node {} at {} belongs to cluster {other}, this node to cluster {ours}",
                theirs.node_id, theirs.advertise
            ))
        } else if let Some(known) = self.claimed_elsewhere(theirs.node_id, &theirs.advertise) {
            Some(format!(
                "node id {} is already connected from {known}; the node at {} claims the same id",
                theirs.node_id, theirs.advertise
            ))
        } else {
            expected.filter(|&id| id != theirs.node_id).map(|id| {
                format!(
                    "expected node {id} at {}, found node {}",
                    theirs.advertise, theirs.node_id
                )
            })
        };
        // Each side gives its verdict on the other's hello, so a refusal reaches both.
        if let Some(mut reason) = refusal {
            // The reason names addresses the peer chose; it must still fit a handshake frame.
            let room = HANDSHAKE_FRAME_BYTES_MAX as usize - HEADER_BYTES;
            if reason.len() > room {
                let mut end = room;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            let _ = writer
                .write_all(&encode(KIND_REFUSED, 0, 0, 0, reason.as_bytes()))
                .await;
            let _ = writer.flush().await;
            return Err(CallError::Refused {
                peer: theirs.node_id,
                reason,
            });
        }
        writer
            .write_all(&encode(KIND_WELCOME, 0, 0, 0, &[]))
            .await
            .map_err(io)?;
        writer.flush().await.map_err(io)?;
        let verdict = read_frame(&mut reader, HANDSHAKE_FRAME_BYTES_MAX)
            .await
            .map_err(read_io)?;
        match verdict.kind {
            KIND_WELCOME => {}
            KIND_REFUSED => {
                return Err(CallError::Refused {
                    peer: theirs.node_id,
                    reason: String::from_utf8_lossy(&verdict.body).into_owned(),
                });
            }
            other => {
                return Err(unreachable(
                    theirs.node_id,
                    format!("unexpected frame kind {other} in the handshake"),
                ));
            }
        }

        let peer = theirs.node_id;
        let dialed_by = if dialed { config.node_id } else { peer };
        let (frames, queue) = mpsc::channel(config.queue_frames_max);
        let (closed, _) = watch::channel(false);
        let connection = Arc::new(Connection {
            peer,
            dialed_by,
            frames,
            waiting: Mutex::new(HashMap::new()),
            calls: Semaphore::new(config.calls_max),
            closed,
        });
        // Keep one connection per pair: the one the lower id dialed.
        let loser = {
            let mut state = self.inner.state.lock();
            state
                .addresses
                .entry(peer)
                .or_insert_with(|| theirs.advertise.clone());
            let keeper = config.node_id.min(peer);
            match state.connections.get(&peer) {
                Some(existing)
                    if !existing.is_closed()
                        && existing.dialed_by == keeper
                        && dialed_by != keeper =>
                {
                    Some(Arc::clone(&connection))
                }
                _ => state
                    .connections
                    .insert(peer, Arc::clone(&connection))
                    .filter(|old| !Arc::ptr_eq(old, &connection)),
            }
        };
        let kept = !matches!(&loser, Some(l) if Arc::ptr_eq(l, &connection));
        if let Some(loser) = loser {
            loser.close();
        }
        tokio::spawn(write_loop(
            self.clone(),
            writer,
            queue,
            Arc::clone(&connection),
        ));
        tokio::spawn(read_loop(self.clone(), reader, Arc::clone(&connection)));
        if !kept {
            // The peer keeps the other connection too; this one just closes.
            return self.live(peer).ok_or(CallError::Closed { peer });
        }
        tracing::debug!(peer, dialed_by, "cluster connection up");
        Ok(connection)
    }

    /// The address of a live connection to `peer` if it is not `advertise`: another node
    /// already holds that id.
    fn claimed_elsewhere(&self, peer: NodeId, advertise: &str) -> Option<String> {
        let state = self.inner.state.lock();
        let live = state.connections.get(&peer).is_some_and(|c| !c.is_closed());
        match state.addresses.get(&peer) {
            Some(known) if live && known != advertise => Some(known.clone()),
            _ => None,
        }
    }

    fn forget(&self, connection: &Arc<Connection>) {
        let mut state = self.inner.state.lock();
        if state
            .connections
            .get(&connection.peer)
            .is_some_and(|c| Arc::ptr_eq(c, connection))
        {
            state.connections.remove(&connection.peer);
        }
    }
}

/// Removes a call's waiter however the call ends (answered, timed out, dropped).
struct Forget<'a> {
    connection: &'a Connection,
    correlation: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.connection.waiting.lock().remove(&self.correlation);
    }
}

fn unreachable(peer: NodeId, reason: String) -> CallError {
    CallError::Unreachable { peer, reason }
}

struct Frame {
    kind: u8,
    correlation: u64,
    group: u32,
    method: u8,
    body: Bytes,
}

fn encode(kind: u8, correlation: u64, group: u32, method: u8, body: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(4 + HEADER_BYTES + body.len());
    frame.put_u32((HEADER_BYTES + body.len()) as u32);
    frame.put_u8(VERSION);
    frame.put_u8(kind);
    frame.put_u64(correlation);
    frame.put_u32(group);
    frame.put_u8(method);
    frame.put_slice(body);
    frame.freeze()
}

async fn read_frame(
    reader: &mut (impl AsyncReadExt + Unpin),
    frame_bytes_max: u32,
) -> std::io::Result<Frame> {
    let length = reader.read_u32().await?;
    if length > frame_bytes_max || (length as usize) < HEADER_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {length} bytes is outside {HEADER_BYTES}..={frame_bytes_max}"),
        ));
    }
    let mut bytes = BytesMut::zeroed(length as usize);
    reader.read_exact(&mut bytes).await?;
    let mut bytes = bytes.freeze();
    let version = bytes.get_u8();
    if version != VERSION {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame version {version}; this node speaks {VERSION}"),
        ));
    }
    Ok(Frame {
        kind: bytes.get_u8(),
        correlation: bytes.get_u64(),
        group: bytes.get_u32(),
        method: bytes.get_u8(),
        body: bytes,
    })
}

/// Sets the options every cluster connection has: no Nagle delay (Raft's messages are small
/// and latency-bound) and the dead-peer detection described in the module doc.
fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    // Elsewhere the system's probe interval and count apply.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let keepalive = keepalive
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_TIMEOUT))?;
    Ok(())
}

/// Writes the connection's queued frames until it closes. A failed write closes the
/// connection (its waiting calls fail at once, the next call dials again): a connection that
/// cannot carry requests must not stay registered while its reader still looks healthy.
async fn write_loop<W: AsyncWrite + Unpin>(
    transport: Transport,
    mut writer: W,
    mut queue: mpsc::Receiver<Bytes>,
    connection: Arc<Connection>,
) {
    let mut closed = connection.closed.subscribe();
    let written: std::io::Result<()> = async {
        loop {
            let frame = tokio::select! {
                frame = queue.recv() => frame,
                _ = closed.wait_for(|c| *c) => None,
            };
            let Some(frame) = frame else { return Ok(()) };
            writer.write_all(&frame).await?;
            // Everything queued meanwhile goes in the same write.
            while let Ok(frame) = queue.try_recv() {
                writer.write_all(&frame).await?;
            }
            writer.flush().await?;
        }
    }
    .await;
    if let Err(e) = written {
        tracing::info!(peer = connection.peer, error = %e, "writing to a cluster connection failed; closing it");
    }
    connection.close();
    transport.forget(&connection);
    let _ = writer.shutdown().await;
}

async fn read_loop(
    transport: Transport,
    mut reader: tokio::net::tcp::OwnedReadHalf,
    connection: Arc<Connection>,
) {
    let serving = Arc::new(Semaphore::new(transport.inner.config.serving_max));
    let limit = transport.inner.config.frame_bytes_max;
    let mut closed = connection.closed.subscribe();
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader, limit) => frame,
            _ = closed.wait_for(|c| *c) => break,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::info!(peer = connection.peer, error = %e, "closing a cluster connection");
                }
                break;
            }
        };
        match frame.kind {
            KIND_REQUEST => {
                // Never stop reading to wait for room: answers to this node's own calls come
                // on the same socket, and a handler may be waiting for one of them. A request
                // over the limit is answered "busy" at once; the caller retries.
                let Ok(permit) = Arc::clone(&serving).try_acquire_owned() else {
                    let busy = encode(
                        KIND_ERROR,
                        frame.correlation,
                        frame.group,
                        frame.method,
                        b"busy: too many requests in progress on this connection",
                    );
                    if connection.frames.send(busy).await.is_err() {
                        break;
                    }
                    continue;
                };
                let service = Arc::clone(&transport.inner.service);
                let connection = Arc::clone(&connection);
                tokio::spawn(async move {
                    let answer = service
                        .handle(connection.peer, frame.group, frame.method, frame.body)
                        .await;
                    let reply = match answer {
                        Ok(body) => encode(
                            KIND_RESPONSE,
                            frame.correlation,
                            frame.group,
                            frame.method,
                            &body,
                        ),
                        Err(reason) => encode(
                            KIND_ERROR,
                            frame.correlation,
                            frame.group,
                            frame.method,
                            reason.as_bytes(),
                        ),
                    };
                    let _ = connection.frames.send(reply).await;
                    drop(permit);
                });
            }
            KIND_RESPONSE | KIND_ERROR => {
                let waiter = connection.waiting.lock().remove(&frame.correlation);
                if let Some(waiter) = waiter {
                    let result = if frame.kind == KIND_RESPONSE {
                        Ok(frame.body)
                    } else {
                        Err(CallError::Remote {
                            peer: connection.peer,
                            reason: String::from_utf8_lossy(&frame.body).into_owned(),
                        })
                    };
                    let _ = waiter.send(result);
                }
            }
            other => {
                tracing::info!(
                    peer = connection.peer,
                    kind = other,
                    "unexpected frame kind; closing"
                );
                break;
            }
        }
    }
    connection.close();
    transport.forget(&connection);
}

/// The address a listener is bound to, as a string peers can dial.
pub fn local_address(listener: &TcpListener) -> std::io::Result<String> {
    let address: SocketAddr = listener.local_addr()?;
    Ok(address.to_string())
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::task::{Context, Poll};

    use super::*;

    /// A socket every write to fails, as one to a vanished peer does in the end.
    struct Broken;

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone")))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Refuse;

    impl Service for Refuse {
        fn handle(
            &self,
            _: NodeId,
            _: u32,
            _: u8,
            _: Bytes,
        ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'static>> {
            Box::pin(async { Err("not served here".to_owned()) })
        }
    }

    /// The reader of such a connection may see nothing wrong (a half-open connection), so the
    /// writer alone must close it.
    #[tokio::test]
    async fn a_failed_write_closes_the_connection_and_fails_its_calls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = local_address(&listener).expect("address");
        let transport =
            Transport::start(TransportConfig::new(1, address), listener, Arc::new(Refuse));
        let (frames, queue) = mpsc::channel(4);
        let connection = Arc::new(Connection {
            peer: 2,
            dialed_by: 1,
            frames,
            waiting: Mutex::new(HashMap::new()),
            calls: Semaphore::new(4),
            closed: watch::channel(false).0,
        });
        transport
            .inner
            .state
            .lock()
            .connections
            .insert(2, Arc::clone(&connection));
        assert_eq!(transport.connected(), vec![2]);
        let (waiter, answer) = oneshot::channel();
        connection.waiting.lock().insert(7, waiter);

        let writing = tokio::spawn(write_loop(
            transport.clone(),
            Broken,
            queue,
            Arc::clone(&connection),
        ));
        connection
            .frames
            .send(encode(KIND_REQUEST, 7, 0, 1, b"lost"))
            .await
            .expect("the writer is running");
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the call still waits after its write failed")
            .expect("the waiter is answered, not dropped");
        assert_eq!(answer, Err(CallError::Closed { peer: 2 }));
        writing.await.expect("the writer ends");
        assert!(connection.is_closed());
        assert!(transport.connected().is_empty());
        assert!(transport.live(2).is_none());
        transport.shutdown();
    }
}
