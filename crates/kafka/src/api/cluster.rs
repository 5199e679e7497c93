//! The cluster's shape: DescribeCluster, and FindCoordinator (a group's coordinator is the
//! node its id hashes to among the cluster's nodes).

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{
    DescribeClusterRequest, DescribeClusterResponse, FindCoordinatorRequest,
    FindCoordinatorResponse,
};

use kafka_protocol::messages::BrokerId;

use super::metadata::{CLUSTER_OPERATIONS, OPERATIONS_NOT_REQUESTED, Reachable, live_brokers};
use super::{controller, text};
use crate::Context;

/// FindCoordinator key types.
const KEY_GROUP: i8 = 0;

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

/// Where the coordinator of group `key` is: the node the group's id hashes to, while it is
/// live; otherwise COORDINATOR_NOT_AVAILABLE (clients ask again).
fn locate(ctx: &Context, key: &str, live: &[Reachable]) -> Result<(i32, String, i32), i16> {
    let owner = ctx
        .broker
        .group_owner(key)
        .ok_or(ResponseError::CoordinatorNotAvailable.code())?;
    live.iter()
        .find(|b| b.id == owner as i32)
        .map(|b| (b.id, b.host.clone(), b.port))
        .ok_or(ResponseError::CoordinatorNotAvailable.code())
}

/// NOT_COORDINATOR unless this node coordinates `group` (the client then asks
/// FindCoordinator again).
pub(crate) fn check_coordinator(ctx: &Context, group: &str) -> Result<(), i16> {
    match ctx.broker.group_owner(group) {
        Some(owner) if owner == ctx.broker.node_id() => Ok(()),
        _ => Err(ResponseError::NotCoordinator.code()),
    }
}

pub(crate) fn find_coordinator(
    ctx: &Context,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let live = live_brokers(ctx);
    let answer = |key: &str| -> Result<(i32, String, i32), (i16, &'static str)> {
        if request.key_type != KEY_GROUP {
            return Err((
                ResponseError::CoordinatorNotAvailable.code(),
                "transactions are not supported by this broker",
            ));
        }
        locate(ctx, key, &live).map_err(|code| (code, "the group's coordinator is not available"))
    };
    if version < 4 {
        return match answer(request.key.as_str()) {
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
    let coordinators = request
        .coordinator_keys
        .iter()
        .map(|key| {
            let entry = Coordinator::default().with_key(key.clone());
            match answer(key.as_str()) {
                Ok((id, host, port)) => entry
                    .with_node_id(BrokerId(id))
                    .with_host(text(host))
                    .with_port(port),
                Err((code, message)) => entry
                    .with_error_code(code)
                    .with_error_message(Some(text(message)))
                    .with_node_id(BrokerId(-1))
                    .with_port(-1),
            }
        })
        .collect();
    FindCoordinatorResponse::default().with_coordinators(coordinators)
}
