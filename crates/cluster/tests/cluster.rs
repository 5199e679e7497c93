//! Forming and changing the cluster, each node with its own transport on loopback and its own
//! directory: three nodes given each other's addresses form one three-voter group whatever
//! order they start in; a fourth joins through one seed and is removed again; a node under an
//! id the cluster already has, a wiped node that kept its identity, a node of another cluster
//! and a node advertising a taken address are all refused with reasons.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_cluster::cluster::{Cluster, ClusterSettings, Membership, NodeIdentity};
use sluice_cluster::node::ControllerSettings;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(20);

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    (listener, address)
}

fn settings(advertise: &str, seeds: &[&String]) -> ClusterSettings {
    ClusterSettings {
        advertise: advertise.to_owned(),
        seeds: seeds.iter().map(|s| (*s).clone()).collect(),
        kafka_addr: Some(format!("kafka-of-{advertise}")),
        amqp_addr: None,
        http_addr: None,
        wait_for_invite: false,
        controller: ControllerSettings::default(),
        partition_timing: Default::default(),
    }
}

async fn start(dir: &Path, listener: TcpListener, settings: ClusterSettings) -> Arc<Cluster> {
    Cluster::start(dir, listener, settings, None)
        .await
        .expect("starts")
}

fn voters(cluster: &Cluster) -> BTreeSet<u64> {
    cluster
        .controller()
        .metrics()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

async fn registry(cluster: &Cluster) -> BTreeSet<u64> {
    cluster
        .controller()
        .read_linearizable(|s| s.nodes.keys().copied().collect())
        .await
        .expect("reads")
}

/// Waits until `cluster`'s registry holds exactly `ids`.
async fn registry_becomes(cluster: &Cluster, ids: &BTreeSet<u64>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if &registry(cluster).await == ids {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "registry never became {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_seeded_nodes_form_one_group_in_any_start_order() -> anyhow::Result<()> {
    for order in [[0usize, 1, 2], [2, 0, 1], [1, 2, 0]] {
        let root = tempfile::tempdir()?;
        let mut bound = Vec::new();
        for _ in 0..3 {
            bound.push(listener().await);
        }
        let addresses: Vec<String> = bound.iter().map(|(_, a)| a.clone()).collect();
        let mut listeners: Vec<Option<TcpListener>> =
            bound.into_iter().map(|(l, _)| Some(l)).collect();
        let mut nodes: Vec<Option<Arc<Cluster>>> = vec![None, None, None];
        for &i in &order {
            let seeds: Vec<&String> = addresses.iter().filter(|a| **a != addresses[i]).collect();
            let node = start(
                &root.path().join(format!("n{i}")),
                listeners[i].take().expect("listener"),
                settings(&addresses[i], &seeds),
            )
            .await;
            nodes[i] = Some(node);
            // Later nodes start while the first ones are already looking for them.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let nodes: Vec<Arc<Cluster>> = nodes.into_iter().map(|n| n.expect("started")).collect();
        for node in &nodes {
            assert_eq!(
                node.wait_member(WAIT).await,
                Membership::Member,
                "order {order:?}"
            );
        }
        let ids: BTreeSet<u64> = nodes.iter().map(|n| n.node_id()).collect();
        registry_becomes(&nodes[0], &ids).await;
        for node in &nodes {
            assert_eq!(voters(node), ids, "order {order:?}");
            assert_eq!(registry(node).await, ids);
        }
        // One cluster id, kept by every node.
        let cluster_ids: BTreeSet<Option<String>> = (0..3)
            .map(|i| {
                NodeIdentity::load_or_create(&root.path().join(format!("n{i}")))
                    .expect("identity")
                    .cluster_id
            })
            .collect();
        assert_eq!(cluster_ids.len(), 1, "{cluster_ids:?}");
        assert!(cluster_ids.iter().all(Option::is_some));
        let records = nodes[1]
            .controller()
            .read_linearizable(|s| s.nodes.clone())
            .await?;
        for (i, node) in nodes.iter().enumerate() {
            let record = &records[&node.node_id()];
            assert_eq!(record.cluster_addr, addresses[i]);
            assert_eq!(
                record.kafka_addr.as_deref(),
                Some(format!("kafka-of-{}", addresses[i]).as_str())
            );
        }
        for node in &nodes {
            node.shutdown().await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_and_leaves_and_impostors_are_refused() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let root = tempfile::tempdir()?;
    let (l1, a1) = listener().await;
    let (l2, a2) = listener().await;
    let (l3, a3) = listener().await;
    let n1 = start(&root.path().join("n1"), l1, settings(&a1, &[&a2, &a3])).await;
    let n2 = start(&root.path().join("n2"), l2, settings(&a2, &[&a1, &a3])).await;
    let n3 = start(&root.path().join("n3"), l3, settings(&a3, &[&a1, &a2])).await;
    for node in [&n1, &n2, &n3] {
        assert_eq!(node.wait_member(WAIT).await, Membership::Member);
    }
    let mut ids: BTreeSet<u64> = [&n1, &n2, &n3].iter().map(|n| n.node_id()).collect();
    registry_becomes(&n1, &ids).await;

    // A fourth node, seeded with one member only, joins as a voter (fewer than five).
    let (l4, a4) = listener().await;
    let n4 = start(&root.path().join("n4"), l4, settings(&a4, &[&a2])).await;
    assert_eq!(n4.wait_member(WAIT).await, Membership::Member);
    ids.insert(n4.node_id());
    registry_becomes(&n1, &ids).await;
    assert_eq!(voters(&n1), ids);

    // An impostor: a fresh directory whose identity names node 2's id.
    let impostor_dir = root.path().join("impostor");
    NodeIdentity {
        node_id: n2.node_id(),
        cluster_id: None,
    }
    .store(&impostor_dir)?;
    let (l5, a5) = listener().await;
    let impostor = start(&impostor_dir, l5, settings(&a5, &[&a1])).await;
    let Membership::Refused(reason) = impostor.wait_member(WAIT).await else {
        panic!("an impostor is refused");
    };
    assert!(
        reason.contains("wiped") || reason.contains("already"),
        "{reason}"
    );
    impostor.shutdown().await;

    // A wiped node that kept its identity file refuses to start at all.
    n4.shutdown().await;
    drop(n4);
    std::fs::remove_dir_all(root.path().join("n4").join("controller"))?;
    let (l4b, _) = listener().await;
    let err = Cluster::start(&root.path().join("n4"), l4b, settings(&a4, &[&a2]), None)
        .await
        .expect_err("a wiped node under its old id is refused");
    assert!(err.to_string().contains("wiped"), "{err}");

    // A node advertising an address another node has is refused by the registry.
    let (l6, _) = listener().await;
    let twin = start(&root.path().join("twin"), l6, settings(&a3, &[&a1])).await;
    let Membership::Refused(reason) = twin.wait_member(WAIT).await else {
        panic!("a node advertising a taken address is refused");
    };
    assert!(reason.contains("already advertises"), "{reason}");
    twin.shutdown().await;

    // Node 4 is removed: its id is retired, and the group is the three again.
    let four = *ids
        .iter()
        .find(|id| ![n1.node_id(), n2.node_id(), n3.node_id()].contains(id))
        .expect("four");
    n3.remove_node(four).await?;
    ids.remove(&four);
    registry_becomes(&n2, &ids).await;
    let retired = n2
        .controller()
        .read_linearizable(|s| s.retired.clone())
        .await?;
    assert!(retired.contains(&four));
    let deadline = tokio::time::Instant::now() + WAIT;
    while voters(&n1) != ids {
        assert!(
            tokio::time::Instant::now() < deadline,
            "voters {:?}",
            voters(&n1)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in [&n1, &n2, &n3] {
        node.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused_naming_both() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    // Two clusters of one node each.
    let (l1, a1) = listener().await;
    let one = start(&root.path().join("one"), l1, settings(&a1, &[])).await;
    let (l2, a2) = listener().await;
    let two = start(&root.path().join("two"), l2, settings(&a2, &[])).await;
    assert_eq!(one.wait_member(WAIT).await, Membership::Member);
    assert_eq!(two.wait_member(WAIT).await, Membership::Member);
    // Wait for both to have learned their cluster ids (registration reads them).
    let mut ids = Vec::new();
    for (name, node) in [("one", &one), ("two", &two)] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let identity = NodeIdentity::load_or_create(&root.path().join(name))?;
            if let Some(id) = identity.cluster_id {
                ids.push(id);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never kept its cluster id"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = node;
    }
    two.shutdown().await;
    drop(two);
    // Node two restarts pointed at cluster one: its data belongs to another cluster.
    let (l2b, a2b) = listener().await;
    let again = start(&root.path().join("two"), l2b, settings(&a2b, &[&a1])).await;
    // It has its own Raft state, so it serves its own cluster; peers of cluster one refuse to
    // talk to it, with a reason naming both clusters.
    let refused = one.transport().introduce(&a2b).await.expect_err("refused");
    let text = refused.to_string();
    assert!(text.contains(&ids[0]) && text.contains(&ids[1]), "{text}");
    again.shutdown().await;
    one.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waiting_for_an_invitation_joins_when_a_member_adds_it() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (first_listener, first_address) = listener().await;
    let first = start(
        &root.path().join("first"),
        first_listener,
        settings(&first_address, &[]),
    )
    .await;
    assert_eq!(first.wait_member(WAIT).await, Membership::Member);

    // Without seeds and waiting, the second node forms nothing of its own.
    let (second_listener, second_address) = listener().await;
    let mut waiting = settings(&second_address, &[]);
    waiting.wait_for_invite = true;
    let second = start(&root.path().join("second"), second_listener, waiting).await;
    assert_eq!(
        second.wait_member(Duration::from_millis(500)).await,
        Membership::Pending
    );

    let id = first.add_node(&second_address, WAIT).await?;
    assert_eq!(id, second.node_id());
    assert_eq!(second.wait_member(WAIT).await, Membership::Member);
    let ids = BTreeSet::from([first.node_id(), second.node_id()]);
    registry_becomes(&first, &ids).await;
    registry_becomes(&second, &ids).await;

    // A member, or an address where nobody listens, cannot be added; nothing changes.
    let again = first.add_node(&second_address, WAIT).await;
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("already in the cluster")),
        "{again:?}"
    );
    let (gone, gone_address) = listener().await;
    drop(gone);
    let nobody = first.add_node(&gone_address, WAIT).await;
    assert!(
        nobody
            .as_ref()
            .is_err_and(|e| e.to_string().contains("no node answers")),
        "{nobody:?}"
    );
    assert_eq!(registry(&first).await, ids);

    // A node started with seeds does not take invitations.
    let (third_listener, third_address) = listener().await;
    let (_, nowhere) = listener().await;
    let third = start(
        &root.path().join("third"),
        third_listener,
        settings(&third_address, &[&nowhere]),
    )
    .await;
    let refused = first.add_node(&third_address, WAIT).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("does not wait for an invitation")),
        "{refused:?}"
    );
    for node in [first, second, third] {
        node.shutdown().await;
    }
    Ok(())
}
