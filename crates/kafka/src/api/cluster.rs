//! The cluster's shape: DescribeCluster, DescribeQuorum (the controller group, as KRaft's
//! `__cluster_metadata` quorum), and FindCoordinator (a group's coordinator is the node its id
//! hashes to among the cluster's nodes).

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::describe_quorum_response::{
    Listener, Node, PartitionData as QuorumPartition, ReplicaState, TopicData as QuorumTopic,
};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{
    DescribeClusterRequest, DescribeClusterResponse, DescribeQuorumRequest, DescribeQuorumResponse,
    FindCoordinatorRequest, FindCoordinatorResponse,
};

use kafka_protocol::messages::BrokerId;
use sluice_broker::Coordinator as Located;

use super::metadata::{CLUSTER_OPERATIONS, OPERATIONS_NOT_REQUESTED, Reachable, live_brokers};
use super::{controller, text};
use crate::Context;

/// FindCoordinator key types.
const KEY_GROUP: i8 = 0;

/// How long FindCoordinator waits for a group's coordinator to exist before it answers
/// COORDINATOR_NOT_AVAILABLE (well within clients' request timeouts).
const LOCATE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub(crate) fn describe(ctx: &Context, request: DescribeClusterRequest) -> DescribeClusterResponse {
    let brokers = live_brokers(ctx)
        .into_iter()
        .map(|b| {
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(b.id))
                .with_host(text(b.host))
                .with_port(b.port)
        })
        .collect();
    DescribeClusterResponse::default()
        .with_endpoint_type(request.endpoint_type)
        .with_cluster_id(text(ctx.broker.cluster_id()))
        .with_controller_id(controller(ctx))
        .with_brokers(brokers)
        .with_cluster_authorized_operations(if request.include_cluster_authorized_operations {
            CLUSTER_OPERATIONS
        } else {
            OPERATIONS_NOT_REQUESTED
        })
}

/// Where the coordinator of group `key` is: alone, this node; in a cluster, the leader of
/// the group's partition of `__consumer_offsets` while it is live (also while it loads the
/// partition: the group's requests then answer COORDINATOR_LOAD_IN_PROGRESS). Waits a moment
/// for one (a new cluster's first group has the topic created); otherwise
/// COORDINATOR_NOT_AVAILABLE (clients ask again).
async fn locate(ctx: &Context, key: &str, live: &[Reachable]) -> Result<(i32, String, i32), i16> {
    let node = match ctx.broker.locate_coordinator(key, LOCATE_WAIT).await {
        Located::Here | Located::Loading => ctx.broker.node_id(),
        Located::At(node) => node,
        Located::Unavailable => return Err(ResponseError::CoordinatorNotAvailable.code()),
    };
    live.iter()
        .find(|b| b.id == node as i32)
        .map(|b| (b.id, b.host.clone(), b.port))
        .ok_or(ResponseError::CoordinatorNotAvailable.code())
}

/// NOT_COORDINATOR unless this node coordinates `group` (the client then asks
/// FindCoordinator again); COORDINATOR_LOAD_IN_PROGRESS while it is about to.
pub(crate) fn check_coordinator(ctx: &Context, group: &str) -> Result<(), i16> {
    match ctx.broker.coordinator(group) {
        Located::Here => Ok(()),
        Located::Loading => Err(ResponseError::CoordinatorLoadInProgress.code()),
        Located::At(_) | Located::Unavailable => Err(ResponseError::NotCoordinator.code()),
    }
}

pub(crate) async fn find_coordinator(
    ctx: &Context,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let live = live_brokers(ctx);
    let key_type = request.key_type;
    let answer = async |key: &str| -> Result<(i32, String, i32), (i16, &'static str)> {
        if key_type != KEY_GROUP {
            return Err((
                ResponseError::CoordinatorNotAvailable.code(),
                "transactions are not supported by this broker",
            ));
        }
        locate(ctx, key, &live)
            .await
            .map_err(|code| (code, "the group's coordinator is not available"))
    };
    if version < 4 {
        return match answer(request.key.as_str()).await {
            Ok((id, host, port)) => FindCoordinatorResponse::default()
                .with_node_id(BrokerId(id))
                .with_host(text(host))
                .with_port(port),
            Err((code, message)) => FindCoordinatorResponse::default()
                .with_error_code(code)
                .with_error_message(Some(text(message)))
                .with_node_id(BrokerId(-1))
                .with_host(text(""))
                .with_port(-1),
        };
    }
    let mut coordinators = Vec::with_capacity(request.coordinator_keys.len());
    for key in &request.coordinator_keys {
        let entry = Coordinator::default().with_key(key.clone());
        coordinators.push(match answer(key.as_str()).await {
            Ok((id, host, port)) => entry
                .with_node_id(BrokerId(id))
                .with_host(text(host))
                .with_port(port),
            Err((code, message)) => entry
                .with_error_code(code)
                .with_error_message(Some(text(message)))
                .with_node_id(BrokerId(-1))
                .with_port(-1),
        });
    }
    FindCoordinatorResponse::default().with_coordinators(coordinators)
}

/// The topic and partition KRaft names its metadata log by; the controller group plays it.
const METADATA_TOPIC: &str = "__cluster_metadata";

/// DescribeQuorum: the controller group as its leader sees it, as KRaft describes its
/// metadata quorum (any node answers, asking the leader as KRaft brokers forward it). The
/// leader epoch is the Raft term, offsets are log indexes, timestamps are this node's clock
/// less the time since each member last answered the leader.
pub(crate) async fn describe_quorum(
    ctx: &Context,
    request: DescribeQuorumRequest,
    version: i16,
) -> DescribeQuorumResponse {
    let view = match ctx.broker.quorum().await {
        Some(Ok(view)) => view,
        Some(Err(error)) => {
            let error = crate::errors::kafka_error(&error);
            return DescribeQuorumResponse::default()
                .with_error_code(error.code)
                .with_error_message(Some(text(error.message)));
        }
        None => {
            return DescribeQuorumResponse::default()
                .with_error_code(ResponseError::UnsupportedVersion.code())
                .with_error_message(Some(text("this broker has no controller quorum")));
        }
    };
    let now_ms = ctx.broker.clock().now_ms();
    let replica = |r: &sluice_broker::replication::ReplicaView| {
        let last_fetch = r.last_contact_ms.map_or(-1, |ago| now_ms - ago as i64);
        ReplicaState::default()
            .with_replica_id(BrokerId(r.id as i32))
            .with_log_end_offset(r.matched_index.map_or(-1, |i| i as i64))
            .with_last_fetch_timestamp(last_fetch)
            .with_last_caught_up_timestamp(if r.lag == Some(0) { last_fetch } else { -1 })
    };
    let topics = request
        .topics
        .iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    let entry = QuorumPartition::default().with_partition_index(p.partition_index);
                    if topic.topic_name.as_str() != METADATA_TOPIC || p.partition_index != 0 {
                        return entry
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code())
                            .with_leader_id(BrokerId(-1));
                    }
                    entry
                        .with_leader_id(BrokerId(view.leader.map_or(-1, |l| l as i32)))
                        .with_leader_epoch(view.term as i32)
                        .with_high_watermark(view.commit_index as i64)
                        .with_current_voters(view.voters.iter().map(replica).collect())
                        .with_observers(view.observers.iter().map(replica).collect())
                })
                .collect();
            QuorumTopic::default()
                .with_topic_name(topic.topic_name.clone())
                .with_partitions(partitions)
        })
        .collect();
    // v2 (KIP-853) also names each member's endpoints: here, its Kafka listener.
    let nodes = if version >= 2 {
        let members: Vec<_> = view
            .voters
            .iter()
            .chain(&view.observers)
            .map(|r| r.id)
            .collect();
        ctx.broker
            .cluster_nodes()
            .into_iter()
            .filter(|n| members.contains(&n.id))
            .map(|n| {
                let listeners = n
                    .kafka_endpoint()
                    .map(|(host, port)| {
                        Listener::default()
                            .with_name(text("PLAINTEXT"))
                            .with_host(text(host))
                            .with_port(port)
                    })
                    .into_iter()
                    .collect();
                Node::default()
                    .with_node_id(BrokerId(n.id as i32))
                    .with_listeners(listeners)
            })
            .collect()
    } else {
        Vec::new()
    };
    DescribeQuorumResponse::default()
        .with_topics(topics)
        .with_nodes(nodes)
}
