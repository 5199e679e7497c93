//! The cluster's shape: DescribeCluster, and FindCoordinator (this broker coordinates every
//! group).

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{
    DescribeClusterRequest, DescribeClusterResponse, FindCoordinatorRequest,
    FindCoordinatorResponse,
};

use super::metadata::{CLUSTER_OPERATIONS, OPERATIONS_NOT_REQUESTED};
use super::{node, text};
use crate::Context;

/// FindCoordinator key types.
const KEY_GROUP: i8 = 0;

pub(crate) fn describe(ctx: &Context, request: DescribeClusterRequest) -> DescribeClusterResponse {
    let broker = DescribeClusterBroker::default()
        .with_broker_id(node(ctx))
        .with_host(text(ctx.settings.advertised_host.clone()))
        .with_port(i32::from(ctx.settings.advertised_port));
    DescribeClusterResponse::default()
        .with_endpoint_type(request.endpoint_type)
        .with_cluster_id(text(ctx.broker.cluster_id()))
        .with_controller_id(node(ctx))
        .with_brokers(vec![broker])
        .with_cluster_authorized_operations(if request.include_cluster_authorized_operations {
            CLUSTER_OPERATIONS
        } else {
            OPERATIONS_NOT_REQUESTED
        })
}

pub(crate) fn find_coordinator(
    ctx: &Context,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let (code, message) = if request.key_type == KEY_GROUP {
        (0, None)
    } else {
        (
            ResponseError::CoordinatorNotAvailable.code(),
            Some(text("transactions are not supported by this broker")),
        )
    };
    let host = text(ctx.settings.advertised_host.clone());
    let port = i32::from(ctx.settings.advertised_port);
    if version < 4 {
        return FindCoordinatorResponse::default()
            .with_error_code(code)
            .with_error_message(message)
            .with_node_id(if code == 0 {
                node(ctx)
            } else {
                kafka_protocol::messages::BrokerId(-1)
            })
            .with_host(if code == 0 { host } else { text("") })
            .with_port(if code == 0 { port } else { -1 });
    }
    let coordinators = request
        .coordinator_keys
        .into_iter()
        .map(|key| {
            let entry = Coordinator::default()
                .with_key(key)
                .with_error_code(code)
                .with_error_message(message.clone());
            if code == 0 {
                entry
                    .with_node_id(node(ctx))
                    .with_host(host.clone())
                    .with_port(port)
            } else {
                entry
                    .with_node_id(kafka_protocol::messages::BrokerId(-1))
                    .with_port(-1)
            }
        })
        .collect();
    FindCoordinatorResponse::default().with_coordinators(coordinators)
}
