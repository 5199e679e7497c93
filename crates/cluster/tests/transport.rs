//! The cluster transport over real sockets on loopback: calls both ways over one connection
//! per pair, the same connection kept by both ends when both dial at once, refusals with
//! reasons, timeouts that leave nothing behind, backoff after a failed dial, and reconnection
//! when a peer comes back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_cluster::transport::{CallError, Service, Transport, TransportConfig};
use tokio::net::TcpListener;

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
