//! The cluster transport over real sockets on loopback: calls both ways over one connection
//! per pair, the same connection kept by both ends when both dial at once, refusals with
//! reasons, timeouts that leave nothing behind, backoff after a failed dial, and reconnection
//! when a peer comes back. Raw sockets play misbehaving peers: an oversize hello, idle
//! connections that never finish their handshake, a connection reset in the middle of a call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_cluster::transport::{
    CallError, HANDSHAKE_FRAME_BYTES_MAX, Service, Transport, TransportConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers a request with the node's id and the request's body; method 9 sleeps first, and
/// method 7 fails.
struct Echo {
    node: u64,
}

impl Service for Echo {
    fn handle(
        &self,
        from: u64,
        group: u32,
        method: u8,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'static>> {
        let node = self.node;
        Box::pin(async move {
            if method == 9 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            if method == 7 {
                return Err(format!("method 7 fails on node {node}"));
            }
            Ok(Bytes::from(format!(
                "{node} from {from} group {group}: {}",
                String::from_utf8_lossy(&body)
            )))
        })
    }
}

async fn node(id: u64, cluster: Option<&str>) -> (Transport, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let mut config = TransportConfig::new(id, address.clone());
    config.cluster_id = cluster.map(str::to_owned);
    config.backoff_min = Duration::from_millis(200);
    (
        Transport::start(config, listener, Arc::new(Echo { node: id })),
        address,
    )
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_both_ways_over_one_connection() -> anyhow::Result<()> {
    let (a, a_addr) = node(1, Some("c")).await;
    let (b, b_addr) = node(2, Some("c")).await;
    a.set_address(2, b_addr);
    b.set_address(1, a_addr);
    let answer = a.call(2, 5, 1, Bytes::from("hi"), SECOND).await?;
    assert_eq!(answer, Bytes::from("2 from 1 group 5: hi"));
    // B answers A over the connection A dialed: B never needs to dial.
    let answer = b.call(1, 6, 1, Bytes::from("back"), SECOND).await?;
    assert_eq!(answer, Bytes::from("1 from 2 group 6: back"));
    assert_eq!(a.connected(), vec![2]);
    assert_eq!(b.connected(), vec![1]);
    let err = a
        .call(2, 0, 7, Bytes::new(), SECOND)
        .await
        .expect_err("fails");
    assert_eq!(
        err,
        CallError::Remote {
            peer: 2,
            reason: "method 7 fails on node 2".into()
        }
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_keep_the_same_connection_when_both_dial() -> anyhow::Result<()> {
    for round in 0..20 {
        let (a, a_addr) = node(1, None).await;
        let (b, b_addr) = node(2, None).await;
        a.set_address(2, b_addr);
        b.set_address(1, a_addr);
        let (x, y) = tokio::join!(
            a.call(2, 0, 1, Bytes::from("x"), SECOND),
            b.call(1, 0, 1, Bytes::from("y"), SECOND),
        );
        // A call on the connection that lost may fail as closed; Raft retries such calls.
        for result in [&x, &y] {
            if let Err(e) = result {
                assert!(matches!(e, CallError::Closed { .. }), "round {round}: {e}");
            }
        }
        // Afterwards both agree on one connection and it carries calls both ways.
        for _ in 0..3 {
            a.call(2, 0, 1, Bytes::from("x"), SECOND).await?;
            b.call(1, 0, 1, Bytes::from("y"), SECOND).await?;
        }
        assert_eq!(a.connected(), vec![2], "round {round}");
        assert_eq!(b.connected(), vec![1], "round {round}");
        a.shutdown();
        b.shutdown();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_another_cluster_or_with_the_same_id_are_refused() -> anyhow::Result<()> {
    let (a, _) = node(1, Some("left")).await;
    let (_b, b_addr) = node(2, Some("right")).await;
    a.set_address(2, b_addr);
    let err = a
        .call(2, 0, 1, Bytes::new(), SECOND)
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("cluster right") && text.contains("cluster left"),
        "{text}"
    );

    let (_twin, twin_addr) = node(1, None).await;
    a.set_address(3, twin_addr);
    let err = a
        .call(3, 0, 1, Bytes::new(), SECOND)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("this node's own id"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_times_out_and_leaves_nothing_waiting() -> anyhow::Result<()> {
    let (a, _) = node(1, None).await;
    let (_b, b_addr) = node(2, None).await;
    a.set_address(2, b_addr);
    let timeout = Duration::from_millis(200);
    let err = a
        .call(2, 0, 9, Bytes::new(), timeout)
        .await
        .expect_err("slow");
    assert_eq!(err, CallError::Timeout { peer: 2, timeout });
    assert_eq!(a.calls_waiting(), 0);
    let err = a
        .call(2, 0, 1, Bytes::from(vec![0u8; 65 << 20]), SECOND)
        .await
        .expect_err("too large");
    assert!(matches!(err, CallError::TooLarge { .. }), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_is_backed_off_and_found_again_when_it_returns() -> anyhow::Result<()> {
    let (a, _) = node(1, None).await;
    let (b, b_addr) = node(2, None).await;
    a.set_address(2, b_addr.clone());
    a.call(2, 0, 1, Bytes::new(), SECOND).await?;
    b.shutdown();
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The connection closes, dials fail, and calls within the backoff fail at once.
    let mut saw_unreachable = false;
    for _ in 0..10 {
        match a.call(2, 0, 1, Bytes::new(), SECOND).await {
            Err(CallError::Unreachable { reason, .. }) => {
                saw_unreachable = true;
                if reason.contains("backing off") {
                    break;
                }
            }
            Err(CallError::Closed { .. }) => {}
            other => panic!("a dead peer answered: {other:?}"),
        }
    }
    assert!(saw_unreachable);
    // It comes back on the same address: calls reach it once the backoff ends.
    let listener = loop {
        match TcpListener::bind(&b_addr).await {
            Ok(listener) => break listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let _b = Transport::start(
        TransportConfig::new(2, b_addr),
        listener,
        Arc::new(Echo { node: 2 }),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match a.call(2, 0, 1, Bytes::from("again"), SECOND).await {
            Ok(answer) => {
                assert_eq!(answer, Bytes::from("2 from 1 group 0: again"));
                break;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "not yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("never reconnected: {e}"),
        }
    }
    Ok(())
}

const KIND_HELLO: u8 = 1;
const KIND_REQUEST: u8 = 2;
const KIND_WELCOME: u8 = 6;
/// Bytes after a frame's length field before its body.
const HEADER_BYTES: usize = 15;

/// A frame as the transport lays it out: `[length u32][version 1][kind][correlation u64]
/// [group u32][method u8][body]`.
fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + HEADER_BYTES + body.len());
    frame.extend_from_slice(&((HEADER_BYTES + body.len()) as u32).to_be_bytes());
    frame.push(1);
    frame.push(kind);
    frame.extend_from_slice(&0u64.to_be_bytes());
    frame.extend_from_slice(&0u32.to_be_bytes());
    frame.push(0);
    frame.extend_from_slice(body);
    frame
}

fn raw_hello(node_id: u64, advertise: &str) -> Vec<u8> {
    let hello = format!(r#"{{"node_id":{node_id},"cluster_id":null,"advertise":"{advertise}"}}"#);
    raw_frame(KIND_HELLO, hello.as_bytes())
}

/// Reads one frame; returns its kind and body.
async fn read_raw_frame(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let length = stream.read_u32().await? as usize;
    assert!(
        (HEADER_BYTES..=1 << 20).contains(&length),
        "a frame of {length} bytes"
    );
    let mut rest = vec![0u8; length];
    stream.read_exact(&mut rest).await?;
    Ok((rest[1], rest[HEADER_BYTES..].to_vec()))
}

/// Reads until the other end closes the connection (an end of stream or a reset) and returns
/// what came before.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return received;
            }
            Err(e) => panic!("reading failed: {e}"),
        }
    }
}

/// A node whose only timeouts are a minute long, so that whatever closes a connection within
/// a test is not a timeout.
async fn patient_node(
    id: u64,
    configure: impl FnOnce(&mut TransportConfig),
) -> (Transport, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let mut config = TransportConfig::new(id, address.clone());
    config.connect_timeout = Duration::from_secs(60);
    config.handshake_timeout = Duration::from_secs(60);
    configure(&mut config);
    (
        Transport::start(config, listener, Arc::new(Echo { node: id })),
        address,
    )
}

/// Well past anything the transport should take, well short of the minute-long timeouts.
const PROMPTLY: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_hello_closes_the_connection_at_once() -> anyhow::Result<()> {
    let (_a, a_addr) = patient_node(1, |_| {}).await;
    let mut stranger = TcpStream::connect(&a_addr).await?;
    // A hello claiming 60 MiB: under frame_bytes_max (64 MiB), far over a handshake frame.
    // Had the node accepted the length, it would have allocated 60 MiB and waited a minute
    // for the bytes.
    let claimed_bytes: u32 = 60 << 20;
    assert!(claimed_bytes > HANDSHAKE_FRAME_BYTES_MAX);
    let mut header = raw_frame(KIND_HELLO, &[]);
    header[..4].copy_from_slice(&claimed_bytes.to_be_bytes());
    stranger.write_all(&header).await?;
    tokio::time::timeout(PROMPTLY, read_until_closed(&mut stranger))
        .await
        .expect("the connection stays open after an oversize hello");

    // The node still serves well-behaved peers.
    let (b, _) = node(2, None).await;
    b.set_address(1, a_addr);
    let answer = b.call(1, 0, 1, Bytes::from("hi"), PROMPTLY).await?;
    assert_eq!(answer, Bytes::from("1 from 2 group 0: hi"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_stalls_is_closed_after_the_handshake_timeout() -> anyhow::Result<()> {
    let (_a, a_addr) = patient_node(1, |config| {
        config.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut idle = TcpStream::connect(&a_addr).await?;
    let (kind, _) = read_raw_frame(&mut idle).await?;
    assert_eq!(kind, KIND_HELLO);
    // Never answered: the node gives up on the handshake.
    let rest = tokio::time::timeout(PROMPTLY, read_until_closed(&mut idle))
        .await
        .expect("an idle connection outlives the handshake timeout");
    assert!(rest.is_empty(), "sent more than a hello: {rest:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_handshake_limit_are_closed_at_once() -> anyhow::Result<()> {
    let (_a, a_addr) = patient_node(1, |config| config.handshakes_max = 2).await;
    // Two idle connections take both handshake slots; each has been sent the node's hello,
    // so both are accepted and in their handshake.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&a_addr).await?;
        let (kind, _) = read_raw_frame(&mut stream).await?;
        assert_eq!(kind, KIND_HELLO);
        idle.push(stream);
    }
    // A third is closed without a hello, long before any timeout.
    let mut third = TcpStream::connect(&a_addr).await?;
    let received = tokio::time::timeout(PROMPTLY, read_until_closed(&mut third))
        .await
        .expect("a connection over the handshake limit stays open");
    assert!(received.is_empty(), "the node said hello: {received:?}");

    // Once the idle connections go, their slots are free again.
    drop(idle);
    let (b, _) = node(2, None).await;
    b.set_address(1, a_addr);
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        match b.call(1, 0, 1, Bytes::from("in"), SECOND).await {
            Ok(answer) => {
                assert_eq!(answer, Bytes::from("1 from 2 group 0: in"));
                break;
            }
            // The node may not have seen the idle connections close yet.
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "not yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the handshake slots were never freed: {e}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_mid_call_fails_the_call_and_the_next_call_dials_again()
-> anyhow::Result<()> {
    let (a, _) = node(1, None).await;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let b_addr = listener.local_addr()?.to_string();
    a.set_address(2, b_addr.clone());
    // A minute-long call: only the connection closing can end it within the test.
    let pending = tokio::spawn({
        let a = a.clone();
        async move {
            a.call(2, 0, 1, Bytes::from("lost"), Duration::from_secs(60))
                .await
        }
    });

    // Node 2 is played by hand: it completes the handshake, takes the request, and then its
    // socket is reset, as when its host goes down.
    let (mut b, _) = listener.accept().await?;
    b.write_all(&raw_hello(2, &b_addr)).await?;
    assert_eq!(read_raw_frame(&mut b).await?.0, KIND_HELLO);
    b.write_all(&raw_frame(KIND_WELCOME, &[])).await?;
    assert_eq!(read_raw_frame(&mut b).await?.0, KIND_WELCOME);
    let (kind, body) = read_raw_frame(&mut b).await?;
    assert_eq!((kind, body.as_slice()), (KIND_REQUEST, b"lost".as_slice()));
    assert_eq!(a.connected(), vec![2]);
    b.set_zero_linger()?;
    drop(b);

    let answer = tokio::time::timeout(PROMPTLY, pending)
        .await
        .expect("the call still waits on a reset connection")?;
    assert_eq!(answer, Err(CallError::Closed { peer: 2 }));
    assert!(
        a.connected().is_empty(),
        "the reset connection is still registered"
    );
    assert_eq!(a.calls_waiting(), 0);

    // Node 2 comes back on the same address; the next call dials it, with no backoff since
    // no dial failed.
    let _b = Transport::start(
        TransportConfig::new(2, b_addr),
        listener,
        Arc::new(Echo { node: 2 }),
    );
    let answer = a.call(2, 0, 1, Bytes::from("again"), PROMPTLY).await?;
    assert_eq!(answer, Bytes::from("2 from 1 group 0: again"));
    assert_eq!(a.connected(), vec![2]);
    Ok(())
}
