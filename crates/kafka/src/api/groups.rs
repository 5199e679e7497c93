//! Consumer groups, classic protocol: JoinGroup, SyncGroup, Heartbeat, LeaveGroup, ListGroups,
//! DescribeGroups, DeleteGroups. Membership lives in the broker's group coordinator; this module
//! only translates.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, SyncGroupRequest,
    SyncGroupResponse,
};
use sluice_broker::group::{GroupError, GroupState, JoinRequest, SyncRequest};
use sluice_broker::limits::Limit;

use super::cluster::check_coordinator;
use super::metadata::OPERATIONS_NOT_REQUESTED;
use super::{Client, text};
use crate::Context;
use crate::errors::group_code;

/// Group operations for DescribeGroups: READ 3, DELETE 6, DESCRIBE 8.
const GROUP_OPERATIONS: i32 = (1 << 3) | (1 << 6) | (1 << 8);

fn client_host(client: &Client) -> String {
    format!("/{}", client.peer.ip())
}

pub(crate) async fn join(
    ctx: &Context,
    client: &Client,
    request: JoinGroupRequest,
    version: i16,
) -> JoinGroupResponse {
    if let Err(code) = check_coordinator(ctx, request.group_id.as_str()) {
        return JoinGroupResponse::default()
            .with_error_code(code)
            .with_generation_id(-1)
            .with_protocol_name((version < 7).then(|| text("")))
            .with_member_id(request.member_id);
    }
    let rebalance_timeout_ms = if request.rebalance_timeout_ms > 0 {
        request.rebalance_timeout_ms
    } else {
        request.session_timeout_ms
    };
    let outcome = ctx
        .broker
        .groups()
        .join(
            request.group_id.as_str(),
            JoinRequest {
                member_id: request.member_id.to_string(),
                instance_id: request.group_instance_id.as_ref().map(|i| i.to_string()),
                client_id: client.client_id.clone(),
                client_host: client_host(client),
                session_timeout_ms: request.session_timeout_ms,
                rebalance_timeout_ms,
                protocol_type: request.protocol_type.to_string(),
                protocols: request
                    .protocols
                    .iter()
                    .map(|p| (p.name.to_string(), p.metadata.clone()))
                    .collect(),
                require_known_member_id: version >= 4,
                new_member_uuid: uuid::Uuid::new_v4(),
            },
        )
        .await;
    if outcome.error == Some(GroupError::GroupMaxSizeReached) {
        ctx.broker.refused(Limit::GroupSize);
    }
    let members = outcome
        .members
        .into_iter()
        .map(|m| {
            JoinGroupResponseMember::default()
                .with_member_id(text(m.member_id))
                .with_group_instance_id(m.instance_id.map(text))
                .with_metadata(m.metadata)
        })
        .collect();
    // The protocol name is nullable only from v7 on.
    let protocol_name = match outcome.protocol_name {
        Some(name) => Some(text(name)),
        None if version < 7 => Some(text("")),
        None => None,
    };
    JoinGroupResponse::default()
        .with_error_code(outcome.error.map_or(0, group_code))
        .with_generation_id(outcome.generation)
        .with_protocol_type(outcome.protocol_type.map(text))
        .with_protocol_name(protocol_name)
        .with_leader(text(outcome.leader))
        .with_member_id(text(outcome.member_id))
        .with_members(members)
}

pub(crate) async fn sync(ctx: &Context, request: SyncGroupRequest) -> SyncGroupResponse {
    if let Err(code) = check_coordinator(ctx, request.group_id.as_str()) {
        return SyncGroupResponse::default().with_error_code(code);
    }
    let outcome = ctx
        .broker
        .groups()
        .sync(
            request.group_id.as_str(),
            SyncRequest {
                member_id: request.member_id.to_string(),
                instance_id: request.group_instance_id.as_ref().map(|i| i.to_string()),
                generation: request.generation_id,
                protocol_type: request.protocol_type.as_ref().map(|t| t.to_string()),
                protocol_name: request.protocol_name.as_ref().map(|n| n.to_string()),
                assignments: request
                    .assignments
                    .iter()
                    .map(|a| (a.member_id.to_string(), a.assignment.clone()))
                    .collect(),
            },
        )
        .await;
    SyncGroupResponse::default()
        .with_error_code(outcome.error.map_or(0, group_code))
        .with_protocol_type(outcome.protocol_type.map(text))
        .with_protocol_name(outcome.protocol_name.map(text))
        .with_assignment(outcome.assignment)
}

pub(crate) async fn heartbeat(ctx: &Context, request: HeartbeatRequest) -> HeartbeatResponse {
    if let Err(code) = check_coordinator(ctx, request.group_id.as_str()) {
        return HeartbeatResponse::default().with_error_code(code);
    }
    let result = ctx
        .broker
        .groups()
        .heartbeat(
            request.group_id.as_str(),
            request.member_id.as_str(),
            request.group_instance_id.as_ref().map(|i| i.as_str()),
            request.generation_id,
        )
        .await;
    HeartbeatResponse::default().with_error_code(result.err().map_or(0, group_code))
}

pub(crate) async fn leave(
    ctx: &Context,
    request: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    if let Err(code) = check_coordinator(ctx, request.group_id.as_str()) {
        return LeaveGroupResponse::default().with_error_code(code);
    }
    // v0-2 name one member; v3+ a batch, possibly by instance id.
    let members: Vec<(String, Option<String>)> = if version >= 3 {
        request
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|i| i.to_string()),
                )
            })
            .collect()
    } else {
        vec![(request.member_id.to_string(), None)]
    };
    match ctx
        .broker
        .groups()
        .leave(request.group_id.as_str(), members.clone())
        .await
    {
        Ok(results) if version >= 3 => LeaveGroupResponse::default().with_members(
            members
                .into_iter()
                .zip(results)
                .map(|((member_id, instance_id), result)| {
                    MemberResponse::default()
                        .with_member_id(text(member_id))
                        .with_group_instance_id(instance_id.map(text))
                        .with_error_code(result.err().map_or(0, group_code))
                })
                .collect(),
        ),
        Ok(results) => LeaveGroupResponse::default().with_error_code(
            results
                .into_iter()
                .next()
                .and_then(Result::err)
                .map_or(0, group_code),
        ),
        Err(error) => LeaveGroupResponse::default().with_error_code(group_code(error)),
    }
}

pub(crate) async fn list(ctx: &Context, request: ListGroupsRequest) -> ListGroupsResponse {
    let mut listed: Vec<(String, String, String)> = match ctx.broker.groups().list().await {
        Ok(groups) => groups
            .into_iter()
            .map(|g| (g.group_id, g.state.name().to_owned(), g.protocol_type))
            .collect(),
        Err(error) => return ListGroupsResponse::default().with_error_code(group_code(error)),
    };
    // Groups known only by their committed offsets are empty consumer groups.
    match ctx.broker.groups_with_offsets() {
        Ok(groups) => {
            for group in groups {
                if !listed.iter().any(|(id, _, _)| *id == group) {
                    listed.push((
                        group,
                        GroupState::Empty.name().to_owned(),
                        "consumer".to_owned(),
                    ));
                }
            }
        }
        Err(error) => tracing::warn!(%error, "cannot list groups with committed offsets"),
    }
    listed.sort();
    let states: Vec<String> = request
        .states_filter
        .iter()
        .map(|s| s.to_lowercase())
        .collect();
    let types: Vec<String> = request
        .types_filter
        .iter()
        .map(|s| s.to_lowercase())
        .collect();
    let groups = listed
        .into_iter()
        .filter(|(_, state, _)| states.is_empty() || states.contains(&state.to_lowercase()))
        .filter(|_| types.is_empty() || types.iter().any(|t| t == "classic"))
        .map(|(id, state, protocol_type)| {
            ListedGroup::default()
                .with_group_id(GroupId(text(id)))
                .with_protocol_type(text(protocol_type))
                .with_group_state(text(state))
                .with_group_type(text("classic"))
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}

pub(crate) async fn describe(
    ctx: &Context,
    request: DescribeGroupsRequest,
    version: i16,
) -> DescribeGroupsResponse {
    let operations = if request.include_authorized_operations {
        GROUP_OPERATIONS
    } else {
        OPERATIONS_NOT_REQUESTED
    };
    let mut groups = Vec::with_capacity(request.groups.len());
    for group_id in request.groups {
        let entry = DescribedGroup::default()
            .with_group_id(group_id.clone())
            .with_authorized_operations(operations);
        if let Err(code) = check_coordinator(ctx, group_id.as_str()) {
            groups.push(entry.with_error_code(code));
            continue;
        }
        let described = ctx.broker.groups().describe(group_id.as_str()).await;
        let has_offsets = ctx
            .broker
            .committed_offsets(group_id.as_str())
            .map(|offsets| !offsets.is_empty())
            .unwrap_or(false);
        groups.push(match described {
            Err(error) => entry.with_error_code(group_code(error)),
            Ok(Some(description)) => entry
                .with_group_state(text(description.state.name()))
                .with_protocol_type(text(description.protocol_type))
                .with_protocol_data(text(description.protocol))
                .with_members(
                    description
                        .members
                        .into_iter()
                        .map(|m| {
                            DescribedGroupMember::default()
                                .with_member_id(text(m.member_id))
                                .with_group_instance_id(m.instance_id.map(text))
                                .with_client_id(text(m.client_id))
                                .with_client_host(text(m.client_host))
                                .with_member_metadata(m.metadata)
                                .with_member_assignment(m.assignment)
                        })
                        .collect(),
                ),
            Ok(None) if has_offsets => entry
                .with_group_state(text(GroupState::Empty.name()))
                .with_protocol_type(text("consumer")),
            Ok(None) if version >= 6 => entry
                .with_error_code(ResponseError::GroupIdNotFound.code())
                .with_error_message(Some(text(format!(
                    "group {:?} does not exist",
                    group_id.as_str()
                )))),
            Ok(None) => entry.with_group_state(text("Dead")),
        });
    }
    DescribeGroupsResponse::default().with_groups(groups)
}

pub(crate) async fn delete(ctx: &Context, request: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let mut results = Vec::with_capacity(request.groups_names.len());
    for group_id in request.groups_names {
        let owned = check_coordinator(ctx, group_id.as_str());
        let code = match owned {
            Err(code) => code,
            Ok(()) => match ctx.broker.groups().forget(group_id.as_str()).await {
                Err(error) => group_code(error),
                Ok(had_state) => match ctx.broker.delete_group_offsets(group_id.as_str()).await {
                    Ok(0) if !had_state => group_code(GroupError::GroupIdNotFound),
                    Ok(_) => 0,
                    Err(error) => crate::errors::kafka_error(&error).code,
                },
            },
        };
        results.push(
            DeletableGroupResult::default()
                .with_group_id(group_id)
                .with_error_code(code),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}
