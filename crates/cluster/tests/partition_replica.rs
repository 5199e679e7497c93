//! Replicas of one partition, each on its own transport: the leader's write path (ready only
//! after its term's first entry, idempotent producers sequenced against committed and
//! in-flight state), followers refusing writes, the high watermark, and a failover in which the
//! producer's retry is answered with its original offsets and its next batch continues.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::BasicNode;
use sluice_cluster::network::Router;
use sluice_cluster::partition::replica::{
    PartitionReplica, ReplicaError, ReplicaSettings, ReplicaSpec,
};
use sluice_cluster::transport::{Transport, TransportConfig};
use sluice_storage::record::BatchBuilder;
use sluice_storage::{FsyncPolicy, LogConfig};
use tokio::net::TcpListener;

const GROUP: u32 = 7;
const WAIT: Duration = Duration::from_secs(5);

struct Node {
    replica: Arc<PartitionReplica>,
    transport: Transport,
}

async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    (listener, address)
}

async fn start(
    id: u64,
    dir: &Path,
    listener: TcpListener,
    address: &str,
    members: &BTreeMap<u64, BasicNode>,
) -> Node {
    let router = Arc::new(Router::default());
    let transport = Transport::start(
        TransportConfig::new(id, address.to_owned()),
        listener,
        router.clone(),
    );
    let replica = PartitionReplica::open(
        ReplicaSpec {
            node: id,
            group: GROUP,
            dir: dir.to_owned(),
            log_config: LogConfig {
                fsync: FsyncPolicy::Always,
                ..LogConfig::default()
            },
            members: members.clone(),
        },
        transport.clone(),
        router,
        &ReplicaSettings::default(),
    )
    .await
    .expect("replica opens");
    Node { replica, transport }
}

async fn stop(node: Node) {
    node.replica.shutdown().await;
    node.transport.shutdown();
}

fn batch(producer: Option<(i64, i32)>, records: usize) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000);
    if let Some((id, sequence)) = producer {
        builder = builder.producer(id, 0, sequence);
    }
    for i in 0..records {
        builder.push(1_700_000_000_000 + i as i64, None, Some(b"value"), &[]);
    }
    builder.finish()
}

/// The ready leader among `nodes`.
async fn ready_leader(nodes: &BTreeMap<u64, Node>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((id, _)) = nodes
            .iter()
            .find(|(_, n)| n.replica.ready_epoch().is_some())
        {
            return *id;
        }
        assert!(Instant::now() < deadline, "no ready leader within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_through_a_ready_leader_and_an_idempotent_producer_survives_failover() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut listeners = BTreeMap::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let (listener, address) = listen().await;
        members.insert(id, BasicNode::new(address.clone()));
        listeners.insert(id, (listener, address));
    }
    let mut nodes = BTreeMap::new();
    for (id, (listener, address)) in listeners {
        let dir = root.path().join(format!("n{id}"));
        nodes.insert(id, start(id, &dir, listener, &address, &members).await);
    }

    let leader = ready_leader(&nodes).await;
    let epoch = nodes[&leader].replica.ready_epoch().expect("ready");
    // Followers refuse, naming the leader; nothing is written.
    for (id, node) in &nodes {
        if *id != leader {
            match node.replica.produce(batch(None, 1), WAIT).await {
                Err(ReplicaError::NotLeader { leader: named }) => {
                    assert!(named.is_none() || named == Some(leader));
                }
                other => panic!("a follower answered {other:?}"),
            }
        }
    }

    let plain = nodes[&leader]
        .replica
        .produce(batch(None, 3), WAIT)
        .await
        .expect("committed");
    assert!(!plain.duplicate);
    assert_eq!(plain.epoch, epoch);
    assert_eq!(plain.appended.last_offset - plain.appended.base_offset, 2);
    let hw = nodes[&leader].replica.high_watermark();
    assert!(
        hw > plain.appended.last_offset,
        "the high watermark covers what was acknowledged"
    );

    // Producer 9 sends five batches at once (five in flight), then retries the third.
    let sends: Vec<_> = (0..5)
        .map(|i| {
            let replica = nodes[&leader].replica.clone();
            let bytes = batch(Some((9, i * 2)), 2);
            async move { replica.produce(bytes, WAIT).await }
        })
        .collect();
    // Polled in order, so they are sequenced in order, as one connection's requests are.
    let mut acked: Vec<_> = futures_util::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("committed"))
        .collect();
    for pair in acked.windows(2) {
        assert!(pair[1].appended.base_offset > pair[0].appended.last_offset);
    }
    let retry = nodes[&leader]
        .replica
        .produce(batch(Some((9, 4)), 2), WAIT)
        .await
        .expect("a retry is acknowledged");
    assert!(retry.duplicate);
    assert_eq!(retry.appended, acked[2].appended);
    // A gap in the sequence is refused.
    assert!(matches!(
        nodes[&leader]
            .replica
            .produce(batch(Some((9, 20)), 1), WAIT)
            .await,
        Err(ReplicaError::Refused(_))
    ));

    // A batch and its retry sent before the first is answered: the retry waits for the
    // first one's answer and the batch is written once.
    let replica = nodes[&leader].replica.clone();
    let before = replica.high_watermark();
    let (first, again) = tokio::join!(
        replica.produce(batch(Some((9, 10)), 2), WAIT),
        replica.produce(batch(Some((9, 10)), 2), WAIT)
    );
    let (first, again) = (first.expect("committed"), again.expect("committed"));
    assert_eq!(first.appended, again.appended);
    assert_eq!(replica.high_watermark(), before + 2, "written once");
    acked.push(first);

    // The leader dies. The new one answers the retry of the last batch with its offsets and
    // takes the next sequence; its epoch is newer; the high watermark did not go back.
    let hw_before = nodes
        .values()
        .map(|n| n.replica.high_watermark())
        .max()
        .expect("nodes");
    stop(nodes.remove(&leader).expect("leader")).await;
    let new_leader = ready_leader(&nodes).await;
    let retry = nodes[&new_leader]
        .replica
        .produce(batch(Some((9, 10)), 2), WAIT)
        .await
        .expect("the retry is acknowledged by the new leader");
    assert!(retry.duplicate);
    assert_eq!(retry.appended, acked[5].appended);
    let next = nodes[&new_leader]
        .replica
        .produce(batch(Some((9, 12)), 2), WAIT)
        .await
        .expect("the next batch");
    assert!(!next.duplicate);
    assert!(next.epoch > epoch);
    assert!(next.appended.base_offset > acked[5].appended.last_offset);
    assert!(nodes[&new_leader].replica.high_watermark() >= hw_before);

    for (_, node) in std::mem::take(&mut nodes) {
        stop(node).await;
    }
}
