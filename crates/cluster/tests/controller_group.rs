//! Three controller nodes in one process, each with its own transport on loopback and its own
//! files: they form one group, commands proposed on any node are applied on all, reads from any
//! node are linearizable, the group survives its leader stopping, and the old leader catches up
//! when it returns — from a snapshot once the others have purged their logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::BasicNode;
use sluice_cluster::controller::{ControllerCommand, ControllerReply, ControllerState, NodeRecord};
use sluice_cluster::network::Router;
use sluice_cluster::node::{ControllerNode, ControllerSettings};
use sluice_cluster::state_machine::Machine;
use sluice_cluster::transport::{Transport, TransportConfig};
use tokio::net::TcpListener;

struct Member {
    node: Arc<ControllerNode>,
    transport: Transport,
    address: String,
    dir: PathBuf,
}

async fn start(id: u64, dir: &Path, address: &str, settings: ControllerSettings) -> Member {
    let listener = loop {
        match TcpListener::bind(address).await {
            Ok(listener) => break listener,
            // A restarted node takes its old port back once the old socket is gone.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let address = listener.local_addr().expect("address").to_string();
    let router = Arc::new(Router::default());
    let transport = Transport::start(
        TransportConfig::new(id, address.clone()),
        listener,
        router.clone(),
    );
    let node = ControllerNode::open(id, dir, transport.clone(), router, settings, None)
        .await
        .expect("controller opens");
    node.serve();
    Member {
        node,
        transport,
        address,
        dir: dir.to_owned(),
    }
}

async fn stop(member: &Member) {
    member.node.shutdown().await;
    member.transport.shutdown();
}

fn record(id: u64) -> NodeRecord {
    NodeRecord {
        id,
        cluster_addr: format!("10.0.0.{id}:7000"),
        kafka_addr: None,
        amqp_addr: None,
        http_addr: None,
        joined_ms: 0,
    }
}

async fn leader_of(members: &[&Member], not: Option<u64>, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let views: Vec<Option<u64>> = members
            .iter()
            .map(|m| m.node.metrics().current_leader)
            .collect();
        if let Some(Some(leader)) = views.first()
            && views.iter().all(|v| *v == Some(*leader))
            && Some(*leader) != not
        {
            return *leader;
        }
        assert!(Instant::now() < deadline, "no agreed leader: {views:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn encoded(state: &ControllerState) -> Vec<u8> {
    let mut state = state.clone();
    // The applied index counts Raft's own entries too, which differ per node's history
    // only in when they were applied; compare the definitions and the registry.
    state.applied_index = 0;
    state.encode().expect("encodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_survive_their_leader_and_catch_up() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let settings = ControllerSettings {
        snapshot_every: 20,
        logs_kept: 5,
        ..ControllerSettings::default()
    };
    let mut members = Vec::new();
    for id in 1..=3u64 {
        let dir = root.path().join(format!("node-{id}"));
        members.push(start(id, &dir, "127.0.0.1:0", settings.clone()).await);
    }
    let voters: BTreeMap<u64, BasicNode> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (i as u64 + 1, BasicNode::new(m.address.clone())))
        .collect();
    // Every node is given the same voters; only one initialization takes effect.
    for member in &members {
        member.node.initialize(voters.clone()).await?;
    }
    let all: Vec<&Member> = members.iter().collect();
    let leader = leader_of(&all, None, Duration::from_secs(10)).await;

    // Proposals through every node, followers forwarding to the leader.
    for (i, member) in members.iter().enumerate() {
        let reply = member
            .node
            .propose(ControllerCommand::AddNode(record(10 + i as u64)))
            .await?;
        assert_eq!(reply, ControllerReply::Applied);
    }
    // The same command again is refused, on whichever node it is proposed.
    let reply = members[2]
        .node
        .propose(ControllerCommand::AddNode(record(10)))
        .await?;
    assert!(matches!(reply, ControllerReply::Refused(_)), "{reply:?}");
    // Linearizable reads from every node see all three.
    for member in &members {
        let nodes = member.node.read_linearizable(|s| s.nodes.len()).await?;
        assert_eq!(nodes, 3);
    }

    // The leader stops; the other two elect a new one and go on.
    let old = members
        .iter()
        .position(|m| m.node.id() == leader)
        .expect("leader is a member");
    stop(&members[old]).await;
    let stopped_at = Instant::now();
    let rest: Vec<&Member> = members.iter().filter(|m| m.node.id() != leader).collect();
    let new_leader = leader_of(&rest, Some(leader), Duration::from_secs(10)).await;
    eprintln!(
        "leader {leader} stopped; node {new_leader} leads after {:?}",
        stopped_at.elapsed()
    );
    // Enough commands for several snapshots and purges while the old leader is away.
    for id in 100..160u64 {
        let reply = rest[(id % 2) as usize]
            .node
            .propose(ControllerCommand::AddNode(record(id)))
            .await?;
        assert_eq!(reply, ControllerReply::Applied);
    }
    // Snapshots are built and the log purged in the background: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_kept = loop {
        let purged = rest[0]
            .node
            .metrics()
            .purged
            .map(|p| p.index)
            .unwrap_or_default();
        if purged > 0 {
            break purged;
        }
        assert!(
            Instant::now() < deadline,
            "the log was never purged behind a snapshot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The old leader returns with its files and address: it catches up by snapshot.
    let expected = rest[0].node.read_linearizable(encoded).await?;
    let (address, dir) = (members[old].address.clone(), members[old].dir.clone());
    members[old] = start(leader, &dir, &address, settings.clone()).await;
    let returned = &members[old];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if returned.node.read_local(encoded) == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the returned node never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(returned.node.read_local(|s| s.nodes.len()), 63);
    // What it missed was purged everywhere else: it came back by installing a snapshot.
    let installed = returned.node.metrics().snapshot.map(|s| s.index);
    assert!(
        installed >= Some(first_kept),
        "snapshot {installed:?}, purged to {first_kept}"
    );
    // And a linearizable read through it agrees.
    assert_eq!(returned.node.read_linearizable(encoded).await?, expected);

    for member in &members {
        stop(member).await;
    }
    Ok(())
}
