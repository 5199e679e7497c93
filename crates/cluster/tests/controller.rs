//! The controller's state machine: one command log replayed into two machines (one of them
//! restarted from a snapshot part way) gives identical states, compared by a hash of their
//! encodings; the node registry refuses ids it has had and addresses in use; and openraft's
//! storage conformance suite passes with the controller's own Raft types.

use std::collections::BTreeMap;

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use proptest::prelude::*;
use sluice_broker::command::DefinitionCommand;
use sluice_broker::exchange::{BindingRecord, Destination, ExchangeKind, ExchangeRecord};
use sluice_broker::queue::QueueRecord;
use sluice_broker::{MetadataCommand, PartitionRecord, TopicRecord};
use sluice_cluster::controller::{
    ControllerCommand, ControllerReply, ControllerState, ControllerTypes, NodeRecord,
};
use sluice_cluster::log_store::LogStore;
use sluice_cluster::state_machine::{Machine, StateMachineStore};
use tempfile::TempDir;
use uuid::Uuid;

fn topic(name: &str, id: u128, partitions: u32, created_ms: i64) -> TopicRecord {
    TopicRecord {
        name: name.into(),
        id: Uuid::from_u128(id),
        partitions: (0..partitions)
            .map(|index| PartitionRecord {
                index,
                leader: 1,
                replicas: vec![1],
                leader_epoch: 0,
                group: 0,
                target: None,
                reassignments: 0,
            })
            .collect(),
        config: BTreeMap::from([("retention.ms".to_owned(), "60000".to_owned())]),
        created_ms,
    }
}

fn node(id: u64, port: u16) -> NodeRecord {
    NodeRecord {
        id,
        cluster_addr: format!("127.0.0.{id}:{port}"),
        kafka_addr: Some(format!("127.0.0.{id}:9092")),
        amqp_addr: None,
        http_addr: None,
        joined_ms: 1_700_000_000_000 + id as i64,
    }
}

/// A command drawn from a small alphabet, so that sequences collide on names (and so are
/// sometimes refused) as real use does.
fn command(choice: u8, n: u8) -> ControllerCommand {
    let name = format!("t{}", n % 4);
    let vhost = format!("v{}", n % 2);
    let queue = format!("q{}", n % 3);
    match choice % 12 {
        0 => ControllerCommand::Metadata(MetadataCommand::CreateTopic(topic(
            &name,
            u128::from(n) + 1,
            u32::from(n % 5) + 1,
            i64::from(n),
        ))),
        1 => ControllerCommand::Metadata(MetadataCommand::DeleteTopic { name }),
        2 => ControllerCommand::Metadata(MetadataCommand::SetTopicConfig {
            name,
            config: BTreeMap::from([("cleanup.policy".to_owned(), "compact".to_owned())]),
        }),
        3 => ControllerCommand::Metadata(MetadataCommand::AllocateProducerIds {
            start: u64::from(n) * 1000,
            count: 1000,
        }),
        4 => ControllerCommand::Metadata(MetadataCommand::Messaging(DefinitionCommand::PutVhost {
            name: vhost,
        })),
        5 => ControllerCommand::Metadata(MetadataCommand::Messaging(
            DefinitionCommand::DeclareQueue(QueueRecord {
                vhost,
                name: queue,
                id: Uuid::from_u128(u128::from(n) + 100),
                durable: true,
                auto_delete: false,
                exclusive_owner: None,
                arguments: Vec::new(),
                created_ms: i64::from(n),
                node: Some(u32::from(n % 3)),
            }),
        )),
        6 => ControllerCommand::Metadata(MetadataCommand::Messaging(
            DefinitionCommand::DeclareExchange(ExchangeRecord {
                vhost,
                name: "x".into(),
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: Vec::new(),
            }),
        )),
        7 => ControllerCommand::Metadata(MetadataCommand::Messaging(DefinitionCommand::Bind(
            BindingRecord {
                vhost,
                source: "x".into(),
                destination: Destination::Queue(queue),
                routing_key: format!("k.{}", n % 2),
                arguments: Vec::new(),
            },
        ))),
        8 => ControllerCommand::Metadata(MetadataCommand::Messaging(
            DefinitionCommand::DeleteQueue { vhost, name: queue },
        )),
        9 => ControllerCommand::AddNode(node(u64::from(n % 5) + 1, 7000 + u16::from(n % 3))),
        10 => ControllerCommand::RemoveNode {
            id: u64::from(n % 5) + 1,
        },
        _ => ControllerCommand::Metadata(MetadataCommand::AddPartitions {
            name,
            partitions: vec![PartitionRecord {
                index: u32::from(n % 5) + 1,
                leader: 1,
                replicas: vec![1],
                leader_epoch: 0,
                group: 0,
                target: None,
                reassignments: 0,
            }],
        }),
    }
}

fn state_hash(state: &ControllerState) -> u32 {
    crc32c::crc32c(&state.encode().expect("encodes"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The same log gives the same state, whether applied in one go or restarted from a
    /// snapshot taken anywhere in it; replies are the same too.
    #[test]
    fn one_log_gives_one_state(
        log in prop::collection::vec((any::<u8>(), any::<u8>()), 1..120),
        cut in any::<prop::sample::Index>(),
    ) {
        let commands: Vec<ControllerCommand> =
            log.iter().map(|&(choice, n)| command(choice, n)).collect();
        let cut = cut.index(commands.len());

        let mut one = ControllerState::default();
        let replies_one: Vec<ControllerReply> = commands
            .iter()
            .enumerate()
            .map(|(i, c)| one.apply(i as u64 + 1, c))
            .collect();

        let mut two = ControllerState::default();
        let mut replies_two = Vec::new();
        for (i, c) in commands[..cut].iter().enumerate() {
            replies_two.push(two.apply(i as u64 + 1, c));
        }
        let mut two = ControllerState::decode(&two.encode().expect("encodes")).expect("decodes");
        for (i, c) in commands.iter().enumerate().skip(cut) {
            replies_two.push(two.apply(i as u64 + 1, c));
        }

        prop_assert_eq!(state_hash(&one), state_hash(&two));
        prop_assert_eq!(&one, &two);
        prop_assert_eq!(replies_one, replies_two);
    }
}

#[test]
fn a_refused_command_changes_nothing_but_the_index() {
    let mut state = ControllerState::default();
    assert_eq!(
        state.apply(1, &command(0, 0)),
        ControllerReply::Applied,
        "create t0"
    );
    let before = state.clone();
    let ControllerReply::Refused(reason) = state.apply(2, &command(0, 4)) else {
        panic!("t0 exists: refused");
    };
    assert!(reason.contains("t0"), "{reason}");
    assert_eq!(state.metadata, before.metadata);
    assert_eq!(state.applied_index, 2);
}

#[test]
fn node_ids_are_never_reused_and_addresses_never_shared() {
    let mut state = ControllerState::default();
    assert_eq!(
        state.apply(1, &ControllerCommand::AddNode(node(1, 7000))),
        ControllerReply::Applied
    );
    let ControllerReply::Refused(reason) =
        state.apply(2, &ControllerCommand::AddNode(node(1, 7001)))
    else {
        panic!("an id in use is refused");
    };
    assert!(reason.contains("already in use"), "{reason}");
    let mut same_address = node(2, 7000);
    same_address.cluster_addr = node(1, 7000).cluster_addr;
    let ControllerReply::Refused(reason) =
        state.apply(3, &ControllerCommand::AddNode(same_address))
    else {
        panic!("an address in use is refused");
    };
    assert!(reason.contains("already advertises"), "{reason}");
    assert_eq!(
        state.apply(4, &ControllerCommand::RemoveNode { id: 1 }),
        ControllerReply::Applied
    );
    assert!(matches!(
        state.apply(5, &ControllerCommand::AddNode(node(1, 7000))),
        ControllerReply::Refused(_)
    ));
    assert!(state.nodes.is_empty());
    assert!(state.retired.contains(&1));
}

struct OnDisk;

impl
    StoreBuilder<
        ControllerTypes,
        LogStore<ControllerTypes>,
        StateMachineStore<ControllerTypes, ControllerState>,
        TempDir,
    > for OnDisk
{
    async fn build(
        &self,
    ) -> Result<
        (
            TempDir,
            LogStore<ControllerTypes>,
            StateMachineStore<ControllerTypes, ControllerState>,
        ),
        StorageError<ControllerTypes>,
    > {
        let err = |e: std::io::Error| StorageError::read(ControllerTypes::err_from_error(&e));
        let dir = tempfile::tempdir().map_err(err)?;
        let log = LogStore::open(&dir.path().join("log")).map_err(err)?;
        let machine = StateMachineStore::open(&dir.path().join("machine")).map_err(err)?;
        Ok((dir, log, machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_storage_passes_openraft_conformance_suite()
-> Result<(), StorageError<ControllerTypes>> {
    Suite::test_all(OnDisk).await
}
