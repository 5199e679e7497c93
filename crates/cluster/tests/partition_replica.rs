//! Replicas of one partition, each on its own transport: the leader's write path (ready only
//! after its term's first entry, idempotent producers sequenced against committed and
//! in-flight state), followers refusing writes, the high watermark, and a failover in which the
//! producer's retry is answered with its original offsets and its next batch continues;
//! writes that queue up combined into one entry, acks=1 answered at the leader's append, and
//! acks=all refused unwritten while fewer than min.insync.replicas are in sync.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::BasicNode;
use openraft::type_config::async_runtime::WatchReceiver;
use sluice_cluster::network::Router;
use sluice_cluster::partition::quiet::{PeerView, QuietGroups};
use sluice_cluster::partition::replica::{
    Acks, PartitionReplica, ReplicaError, ReplicaSettings, ReplicaSpec,
};
use sluice_cluster::transport::{Transport, TransportConfig};
use sluice_storage::record::BatchBuilder;
use sluice_storage::{FsyncPolicy, LogConfig};
use tokio::net::TcpListener;

const GROUP: u32 = 7;
const WAIT: Duration = Duration::from_secs(5);
/// acks=all with no in-sync requirement beyond the quorum.
const ALL: Acks = Acks::All {
    min_insync: 1,
    lag: Duration::from_secs(30),
};

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
    start_with(
        id,
        dir,
        listener,
        address,
        members,
        None,
        ReplicaSettings::default(),
        log_config(),
    )
    .await
}

/// Synced appends, and no time retention: the test batches' timestamps are years old.
fn log_config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Always,
        retention_ms: None,
        ..LogConfig::default()
    }
}

#[allow(clippy::too_many_arguments)]
async fn start_with(
    id: u64,
    dir: &Path,
    listener: TcpListener,
    address: &str,
    members: &BTreeMap<u64, BasicNode>,
    preferred: Option<u64>,
    settings: ReplicaSettings,
    log_config: LogConfig,
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
            log_config,
            members: members.clone(),
            preferred,
            initialize: true,
        },
        transport.clone(),
        router,
        &settings,
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
/// Three replicas of the group, each on its own transport, with their directories in `root`.
async fn three(
    root: &Path,
    preferred: Option<u64>,
    settings: ReplicaSettings,
) -> (BTreeMap<u64, BasicNode>, BTreeMap<u64, Node>) {
    three_with(root, preferred, settings, log_config()).await
}

/// [`three`] with the replicas' log settings.
async fn three_with(
    root: &Path,
    preferred: Option<u64>,
    settings: ReplicaSettings,
    log_config: LogConfig,
) -> (BTreeMap<u64, BasicNode>, BTreeMap<u64, Node>) {
    three_each(root, preferred, |_| settings.clone(), log_config).await
}

/// [`three_with`] with each node's settings made by `settings`.
async fn three_each(
    root: &Path,
    preferred: Option<u64>,
    settings: impl Fn(u64) -> ReplicaSettings,
    log_config: LogConfig,
) -> (BTreeMap<u64, BasicNode>, BTreeMap<u64, Node>) {
    let mut listeners = BTreeMap::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let (listener, address) = listen().await;
        members.insert(id, BasicNode::new(address.clone()));
        listeners.insert(id, (listener, address));
    }
    let mut nodes = BTreeMap::new();
    for (id, (listener, address)) in listeners {
        let dir = root.join(format!("n{id}"));
        let node = start_with(
            id,
            &dir,
            listener,
            &address,
            &members,
            preferred,
            settings(id),
            log_config.clone(),
        );
        nodes.insert(id, node.await);
    }
    (members, nodes)
}

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
    let (_, mut nodes) = three(root.path(), None, ReplicaSettings::default()).await;

    let leader = ready_leader(&nodes).await;
    let epoch = nodes[&leader].replica.ready_epoch().expect("ready");
    // Followers refuse, naming the leader; nothing is written.
    for (id, node) in &nodes {
        if *id != leader {
            match node.replica.produce(batch(None, 1), ALL, WAIT).await {
                Err(ReplicaError::NotLeader { leader: named }) => {
                    assert!(named.is_none() || named == Some(leader));
                }
                other => panic!("a follower answered {other:?}"),
            }
        }
    }

    let plain = nodes[&leader]
        .replica
        .produce(batch(None, 3), ALL, WAIT)
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
            async move { replica.produce(bytes, ALL, WAIT).await }
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
        .produce(batch(Some((9, 4)), 2), ALL, WAIT)
        .await
        .expect("a retry is acknowledged");
    assert!(retry.duplicate);
    assert_eq!(retry.appended, acked[2].appended);
    // A gap in the sequence is refused.
    assert!(matches!(
        nodes[&leader]
            .replica
            .produce(batch(Some((9, 20)), 1), ALL, WAIT)
            .await,
        Err(ReplicaError::Refused(_))
    ));

    // A batch and its retry sent before the first is answered: the retry waits for the
    // first one's answer and the batch is written once.
    let replica = nodes[&leader].replica.clone();
    let before = replica.high_watermark();
    let (first, again) = tokio::join!(
        replica.produce(batch(Some((9, 10)), 2), ALL, WAIT),
        replica.produce(batch(Some((9, 10)), 2), ALL, WAIT)
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
        .produce(batch(Some((9, 10)), 2), ALL, WAIT)
        .await
        .expect("the retry is acknowledged by the new leader");
    assert!(retry.duplicate);
    assert_eq!(retry.appended, acked[5].appended);
    let next = nodes[&new_leader]
        .replica
        .produce(batch(Some((9, 12)), 2), ALL, WAIT)
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

/// The record value at `offset` in `replica`'s log.
fn value_at(replica: &PartitionReplica, offset: u64) -> Vec<u8> {
    let read = replica.reader().read(offset, 1 << 20, true).expect("read");
    let mut at = 0;
    while at < read.bytes.len() {
        let header = sluice_storage::BatchHeader::parse(&read.bytes[at..]).expect("a header");
        let end = at + header.total_bytes();
        if (header.base_offset as u64..=header.last_offset() as u64).contains(&offset) {
            let records = sluice_storage::record::decode(&read.bytes[at..end]).expect("records");
            let record = &records[(offset - header.base_offset as u64) as usize];
            return record.value.expect("a value").to_vec();
        }
        at = end;
    }
    panic!("offset {offset} not found");
}

fn epoch_batch(producer: i64, epoch: i16, sequence: i32) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000).producer(producer, epoch, sequence);
    builder.push(1_700_000_000_000, None, Some(b"value"), &[]);
    builder.finish()
}

fn valued(value: &[u8]) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000);
    builder.push(1_700_000_000_000, None, Some(value), &[]);
    builder.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_share_entries_and_acks_follow_kafka() {
    let root = tempfile::tempdir().expect("tempdir");
    let (_, mut nodes) = three(root.path(), None, ReplicaSettings::default()).await;
    let leader = ready_leader(&nodes).await;
    let replica = nodes[&leader].replica.clone();

    // 300 writes at once: each answered with its own offset, holding its own record, in
    // fewer entries than writes.
    let entries_before = replica
        .raft()
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap_or(0);
    let writes: Vec<_> = (0..300)
        .map(|i| {
            let replica = replica.clone();
            async move {
                let produced = replica
                    .produce(valued(format!("w{i}").as_bytes()), ALL, WAIT)
                    .await
                    .expect("committed");
                (i, produced)
            }
        })
        .collect();
    let answered = futures_util::future::join_all(writes).await;
    let entries = replica
        .raft()
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap_or(0)
        - entries_before;
    assert!(entries < 300, "300 queued writes took {entries} entries");
    let mut offsets: Vec<u64> = answered
        .iter()
        .map(|(_, p)| p.appended.base_offset)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), 300, "every write has its own offset");
    for (i, produced) in &answered {
        assert_eq!(produced.appended.base_offset, produced.appended.last_offset);
        assert!(replica.high_watermark() > produced.appended.last_offset);
        assert_eq!(
            value_at(&replica, produced.appended.base_offset),
            format!("w{i}").into_bytes(),
            "write {i} answered with another write's offset"
        );
    }

    // A producer that bumps its epoch (librdkafka does after a sequence gap) starts again at
    // sequence 0 while a batch of its old epoch is still in flight; the old epoch is then
    // fenced.
    replica
        .produce(epoch_batch(21, 0, 0), ALL, WAIT)
        .await
        .expect("epoch 0");
    let (old, bumped) = tokio::join!(
        replica.produce(epoch_batch(21, 0, 1), ALL, WAIT),
        replica.produce(epoch_batch(21, 1, 0), ALL, WAIT)
    );
    old.expect("the old epoch's batch in flight");
    bumped.expect("the new epoch from sequence 0");
    match replica.produce(epoch_batch(21, 0, 2), ALL, WAIT).await {
        Err(ReplicaError::Refused(_)) => {}
        other => panic!("a fenced epoch answered {other:?}"),
    }

    // acks=1: answered at the leader's append, then committed as any write.
    let leader_acked = replica
        .produce(valued(b"acks=1"), Acks::Leader, WAIT)
        .await
        .expect("appended");
    assert_eq!(
        value_at(&replica, leader_acked.appended.base_offset),
        b"acks=1"
    );
    let mut hw = replica.watch_high_watermark();
    tokio::time::timeout(
        WAIT,
        hw.wait_for(|hw| *hw > leader_acked.appended.last_offset),
    )
    .await
    .expect("committed soon after")
    .expect("the replica runs");

    // min.insync.replicas 3 of 3 holds while every follower answers; with one stopped it is
    // refused before anything is written, while 2 and acks=1 still work.
    let lag = Duration::from_millis(600);
    let three = Acks::All { min_insync: 3, lag };
    replica
        .produce(valued(b"three"), three, WAIT)
        .await
        .expect("three in sync");
    let follower = *nodes.keys().find(|id| **id != leader).expect("a follower");
    stop(nodes.remove(&follower).expect("follower")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while replica.in_sync(lag) > 2 {
        assert!(
            Instant::now() < deadline,
            "the stopped follower stays in sync"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end_before = replica.reader().log_end_offset();
    match replica.produce(valued(b"refused"), three, WAIT).await {
        Err(ReplicaError::NotEnoughReplicas {
            in_sync: 2,
            required: 3,
        }) => {}
        other => panic!("min.insync.replicas 3 with 2 in sync answered {other:?}"),
    }
    assert_eq!(
        replica.reader().log_end_offset(),
        end_before,
        "nothing written"
    );
    replica
        .produce(valued(b"two"), Acks::All { min_insync: 2, lag }, WAIT)
        .await
        .expect("two in sync");
    replica
        .produce(valued(b"leader"), Acks::Leader, WAIT)
        .await
        .expect("acks=1");

    for (_, node) in std::mem::take(&mut nodes) {
        stop(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_goes_back_to_the_preferred_replica() {
    let root = tempfile::tempdir().expect("tempdir");
    let settings = ReplicaSettings {
        balance_every: Duration::from_millis(300),
        ..ReplicaSettings::default()
    };
    let (_, mut nodes) = three(root.path(), Some(3), settings).await;
    let first = ready_leader(&nodes).await;
    let first_epoch = nodes[&first].replica.ready_epoch().expect("ready");
    eprintln!("first leader {first} in term {first_epoch}");
    nodes[&first]
        .replica
        .produce(valued(b"before"), ALL, WAIT)
        .await
        .expect("committed");
    if first == 3 {
        // Already where it belongs: move it away to see it come back.
        nodes[&3]
            .replica
            .raft()
            .trigger()
            .transfer_leader(1)
            .await
            .expect("transfer");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Led by 3 in a later term than the first leader's: it came back (or came) to 3.
        if nodes[&3]
            .replica
            .ready_epoch()
            .is_some_and(|epoch| epoch > first_epoch)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leadership did not go to the preferred replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes[&3]
        .replica
        .produce(valued(b"after"), ALL, WAIT)
        .await
        .expect("the preferred replica serves");
    for (_, node) in std::mem::take(&mut nodes) {
        stop(node).await;
    }
}

/// Binds `address` again once the socket of the replica that had it is gone.
async fn rebind(address: &str) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => return listener,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot bind {address} again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_serves_only_in_a_new_term_with_every_producer_batch_applied() {
    let root = tempfile::tempdir().expect("tempdir");
    let (members, mut nodes) = three(root.path(), None, ReplicaSettings::default()).await;
    let leader = ready_leader(&nodes).await;
    let epoch = nodes[&leader].replica.ready_epoch().expect("ready");
    for sequence in 0..200 {
        nodes[&leader]
            .replica
            .produce(batch(Some((31, sequence)), 1), ALL, WAIT)
            .await
            .expect("committed");
    }
    // The leader stops as a crash would: no hand-over, its Raft just ends.
    let node = nodes.remove(&leader).expect("leader");
    node.replica.raft().shutdown().await.expect("raft stops");
    node.transport.shutdown();
    drop(node);
    let address = members[&leader].addr.clone();
    let listener = rebind(&address).await;
    let dir = root.path().join(format!("n{leader}"));
    let restarted = start(leader, &dir, listener, &address, &members).await;
    nodes.insert(leader, restarted);
    // Whoever serves next does so in a newer term, and continues producer 31's sequence.
    let deadline = Instant::now() + Duration::from_secs(15);
    let next = loop {
        if let Some((id, ready)) = nodes
            .iter()
            .find_map(|(id, n)| n.replica.ready_epoch().map(|e| (*id, e)))
        {
            assert!(
                ready > epoch,
                "node {id} serves in the term it had before the restart"
            );
            break id;
        }
        assert!(Instant::now() < deadline, "no leader after the restart");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let continued = nodes[&next]
        .replica
        .produce(batch(Some((31, 200)), 1), ALL, WAIT)
        .await
        .expect("the sequence continues");
    assert!(!continued.duplicate);
    for (_, node) in std::mem::take(&mut nodes) {
        stop(node).await;
    }
}

/// Small segments, no retention until the test sets some, housekeeping five times a second.
fn trim_config() -> (LogConfig, ReplicaSettings) {
    (
        LogConfig {
            fsync: FsyncPolicy::Always,
            segment_bytes: 4096,
            retention_ms: None,
            ..LogConfig::default()
        },
        ReplicaSettings {
            housekeeping_every: Duration::from_millis(200),
            ..ReplicaSettings::default()
        },
    )
}

/// Waits until every node's log starts at `offset`.
async fn wait_log_start(nodes: &BTreeMap<u64, Node>, offset: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let starts: Vec<u64> = nodes
            .values()
            .map(|n| n.replica.reader().log_start_offset())
            .collect();
        if starts.iter().all(|s| *s == offset) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "log starts {starts:?}, expected {offset} everywhere"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn segment_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("partition dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trims_delete_the_same_records_on_every_replica_and_survive_restarts() {
    let root = tempfile::tempdir().expect("tempdir");
    let (log_config, settings) = trim_config();
    let (members, mut nodes) =
        three_with(root.path(), None, settings.clone(), log_config.clone()).await;
    let dir = |id: u64| root.path().join(format!("n{id}"));
    let leader = ready_leader(&nodes).await;
    let mut offsets = Vec::new();
    for i in 0..300u32 {
        let produced = nodes[&leader]
            .replica
            .produce(valued(format!("v{i}").as_bytes()), ALL, WAIT)
            .await
            .expect("committed");
        offsets.push(produced.appended.base_offset);
    }
    let segments_before = segment_count(&dir(leader));
    assert!(segments_before > 5, "{segments_before} segments");

    // A follower asked answers NOT_LEADER and deletes nothing.
    let follower = *nodes.keys().find(|id| **id != leader).expect("a follower");
    assert!(matches!(
        nodes[&follower].replica.delete_records(100, WAIT).await,
        Err(ReplicaError::NotLeader { .. })
    ));

    // DeleteRecords: every replica's log starts there, and its whole segments below are gone.
    let offset_of_v150 = offsets[150];
    let start = nodes[&leader]
        .replica
        .delete_records(offset_of_v150, WAIT)
        .await
        .expect("deleted");
    assert_eq!(start, offset_of_v150);
    wait_log_start(&nodes, offset_of_v150).await;
    for (id, node) in &nodes {
        assert_eq!(
            value_at(&node.replica, offset_of_v150),
            b"v150",
            "node {id}"
        );
        assert!(
            node.replica
                .reader()
                .read(offset_of_v150 - 1, 1, true)
                .is_err()
        );
        assert!(
            segment_count(&dir(*id)) < segments_before,
            "node {id} kept its segments"
        );
    }
    // Again below the start: nothing moves, the answer is the start.
    assert_eq!(
        nodes[&leader]
            .replica
            .delete_records(10, WAIT)
            .await
            .expect("answered"),
        offset_of_v150
    );

    // With a follower stopped, nothing is deleted past what it holds: the request times out.
    let stopped = follower;
    let node = nodes.remove(&stopped).expect("follower");
    node.replica.raft().shutdown().await.expect("raft stops");
    node.transport.shutdown();
    drop(node);
    let leader = ready_leader(&nodes).await;
    for i in 300..320u32 {
        nodes[&leader]
            .replica
            .produce(valued(format!("v{i}").as_bytes()), ALL, WAIT)
            .await
            .expect("committed by two");
    }
    let hw = nodes[&leader].replica.high_watermark();
    assert!(matches!(
        nodes[&leader]
            .replica
            .delete_records(hw, Duration::from_millis(500))
            .await,
        Err(ReplicaError::Indeterminate(_))
    ));
    assert_eq!(
        nodes[&leader].replica.reader().log_start_offset(),
        offset_of_v150
    );

    // Every replica restarts from its trimmed files (the stopped one too) and serves on.
    for (_, node) in std::mem::take(&mut nodes) {
        node.replica.raft().shutdown().await.expect("raft stops");
        node.transport.shutdown();
    }
    for id in 1..=3u64 {
        let address = members[&id].addr.clone();
        let listener = rebind(&address).await;
        let node_dir = dir(id);
        let node = start_with(
            id,
            &node_dir,
            listener,
            &address,
            &members,
            None,
            settings.clone(),
            log_config.clone(),
        );
        nodes.insert(id, node.await);
    }
    let leader = ready_leader(&nodes).await;
    for (id, node) in &nodes {
        assert_eq!(
            node.replica.reader().log_start_offset(),
            offset_of_v150,
            "node {id}"
        );
    }
    nodes[&leader]
        .replica
        .produce(valued(b"after"), ALL, WAIT)
        .await
        .expect("committed after the restart");

    // Retention: the leader proposes trims of whole segments past retention.bytes.
    let mut retained = log_config.clone();
    retained.retention_bytes = Some(8192);
    for node in nodes.values() {
        node.replica
            .set_log_config(retained.clone())
            .expect("reconfigured");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let start = loop {
        let starts: Vec<u64> = nodes
            .values()
            .map(|n| n.replica.reader().log_start_offset())
            .collect();
        if starts[0] > offset_of_v150 && starts.iter().all(|s| *s == starts[0]) {
            break starts[0];
        }
        assert!(
            Instant::now() < deadline,
            "retention did not trim: {starts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let hw = nodes[&leader].replica.high_watermark();
    assert!(
        start < hw,
        "retention kept nothing: start {start}, high watermark {hw}"
    );
    for (id, node) in &nodes {
        assert!(
            segment_count(&dir(*id)) <= 4,
            "node {id}: {} segments",
            segment_count(&dir(*id))
        );
        assert_eq!(node.replica.committed_log_start(), start, "node {id}");
    }
    // Nothing more is due: no further trim entries (the log end stays put).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(nodes[&leader].replica.high_watermark(), hw);
    for (_, node) in std::mem::take(&mut nodes) {
        stop(node).await;
    }
}

/// The nodes' liveness as the test decides it: every node answers unless made silent, and a
/// node leads what the test says it leads.
#[derive(Default)]
struct Peers {
    silent: parking_lot::Mutex<std::collections::HashSet<u64>>,
    leading: parking_lot::Mutex<std::collections::HashMap<u64, u64>>,
}

impl PeerView for Peers {
    fn answered_within(&self, node: u64, _within: Duration) -> bool {
        !self.silent.lock().contains(&node)
    }

    fn leads(&self, node: u64, _group: u32) -> Option<u64> {
        self.leading.lock().get(&node).copied()
    }
}

impl Peers {
    fn set_silent(&self, node: u64, silent: bool) {
        if silent {
            self.silent.lock().insert(node);
        } else {
            self.silent.lock().remove(&node);
        }
    }

    /// `node` leads in `term`, and no other node leads.
    fn set_leader(&self, node: u64, term: u64) {
        let mut leading = self.leading.lock();
        leading.clear();
        leading.insert(node, term);
    }
}

/// Waits until `check` holds, or fails naming `what`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ready leader and its term, once the group has one in a term above `above`.
async fn leader_above(nodes: &BTreeMap<u64, Node>, above: u64) -> (u64, u64) {
    let mut found = None;
    eventually(&format!("a ready leader in a term above {above}"), || {
        found = nodes.iter().find_map(|(id, n)| {
            n.replica
                .ready_epoch()
                .filter(|term| *term > above)
                .map(|term| (*id, term))
        });
        found.is_some()
    })
    .await;
    found.expect("found")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_go_quiet_and_wake_for_writes_and_when_their_leader_goes_silent_or_is_deposed()
{
    let root = tempfile::tempdir().expect("tempdir");
    let peers = Arc::new(Peers::default());
    // Each node its own quiet groups, all seeing the test's liveness.
    let settings = |_| ReplicaSettings {
        housekeeping_every: Duration::from_millis(200),
        quiesce: Some(QuietGroups::start(Arc::clone(&peers) as Arc<dyn PeerView>)),
        ..ReplicaSettings::default()
    };
    let (_, mut nodes) = three_each(root.path(), None, settings, log_config()).await;
    let all_quiet = |nodes: &BTreeMap<u64, Node>| nodes.values().all(|n| n.replica.is_quiet());

    let (leader, term) = leader_above(&nodes, 0).await;
    peers.set_leader(leader, term);
    nodes[&leader]
        .replica
        .produce(batch(None, 3), ALL, WAIT)
        .await
        .expect("committed");
    eventually("every replica quiet", || all_quiet(&nodes)).await;

    // Writes arriving together wake the leader and all wait for its followers' answers: each
    // is committed at once, counts every replica in sync (none answered within the lag while
    // quiet) and costs no election.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let strict = Acks::All {
        min_insync: 3,
        lag: Duration::from_millis(300),
    };
    let leader_replica = &nodes[&leader].replica;
    let (one, two) = tokio::join!(
        leader_replica.produce(batch(None, 3), strict, WAIT),
        leader_replica.produce(batch(None, 3), strict, WAIT),
    );
    for written in [one, two] {
        assert_eq!(written.expect("committed after quiet").epoch, term);
    }
    eventually("every replica quiet again", || all_quiet(&nodes)).await;

    // A follower's node going silent wakes the leader (so a restarted follower would hear
    // heartbeats rather than campaign); once it answers again the group goes quiet again,
    // with no election.
    let follower = *nodes.keys().find(|id| **id != leader).expect("a follower");
    peers.set_silent(follower, true);
    eventually("the leader awake", || !nodes[&leader].replica.is_quiet()).await;
    peers.set_silent(follower, false);
    eventually(
        "every replica quiet after the follower answers again",
        || all_quiet(&nodes),
    )
    .await;
    assert_eq!(nodes[&leader].replica.ready_epoch(), Some(term));

    // The leader's node goes silent: its followers wake and hold an election, in a newer term.
    peers.set_silent(leader, true);
    let (second, second_term) = leader_above(&nodes, term).await;
    peers.set_silent(leader, false);
    peers.set_leader(second, second_term);
    eventually("every replica quiet under the second leader", || {
        all_quiet(&nodes)
    })
    .await;

    // The leader's node answers without leading the group in that term: its followers wake.
    peers.set_leader(second, second_term + 1);
    eventually("the followers awake", || {
        nodes
            .iter()
            .filter(|(id, _)| **id != second)
            .all(|(_, n)| !n.replica.is_quiet())
    })
    .await;
    let (_, third_term) = leader_above(&nodes, second_term).await;
    assert!(third_term > second_term);
    for (_, node) in std::mem::take(&mut nodes) {
        stop(node).await;
    }
}
