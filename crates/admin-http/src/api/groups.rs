//! Consumer groups: members, assignments, lag; deleting a group; resetting its offsets.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_broker::group::GroupError;
use sluice_broker::{CommittedOffset, OffsetEntry};
use utoipa::ToSchema;

use crate::AdminState;
use crate::error::{ApiError, ApiResult};

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupSummary {
    pub group_id: String,
    /// Stable, PreparingRebalance, CompletingRebalance or Empty.
    pub state: String,
    pub protocol_type: String,
    pub members: usize,
    /// Records not yet consumed, summed over the group's partitions.
    pub lag: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopicPartitions {
    pub topic: String,
    pub partitions: Vec<i32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// What the member consumes (from the consumer protocol's assignment).
    pub assignment: Vec<TopicPartitions>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: u32,
    /// None if the group never committed for this partition.
    pub committed: Option<i64>,
    pub high_watermark: u64,
    pub lag: Option<u64>,
    /// The member consuming this partition, if any.
    pub member_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupDetail {
    pub group_id: String,
    pub state: String,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub leader: Option<String>,
    pub members: Vec<MemberView>,
    pub offsets: Vec<PartitionOffset>,
    pub lag: u64,
}

/// Where to move a group's offsets.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "to", rename_all = "lowercase")]
pub enum ResetTo {
    Earliest,
    Latest,
    /// The first offset at or after this time (ms since the Unix epoch).
    Timestamp {
        timestamp_ms: i64,
    },
    Offset {
        offset: u64,
    },
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetOffsets {
    /// Only this topic; otherwise every topic the group has committed offsets for.
    pub topic: Option<String>,
    #[serde(flatten)]
    pub target: ResetTo,
    /// Compute and show the new offsets without committing them.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OffsetReset {
    pub topic: String,
    pub partition: u32,
    pub previous: Option<i64>,
    pub new: u64,
}

fn group_problem(error: GroupError) -> ApiError {
    match error {
        GroupError::NonEmptyGroup => {
            ApiError::conflict("the group has active members; stop its consumers first")
        }
        GroupError::GroupIdNotFound => ApiError::not_found("no such group"),
        other => ApiError::internal(format!("group coordinator: {other:?}")),
    }
}

/// Decodes Kafka's ConsumerProtocolAssignment (any version): which partitions a member has.
/// Anything that does not parse shows as no assignment.
pub fn decode_assignment(bytes: &[u8]) -> Vec<TopicPartitions> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Some(head)
    }
    fn i16_at(bytes: &mut &[u8]) -> Option<i16> {
        take(bytes, 2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32_at(bytes: &mut &[u8]) -> Option<i32> {
        take(bytes, 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    let parse = |mut bytes: &[u8]| -> Option<Vec<TopicPartitions>> {
        let _version = i16_at(&mut bytes)?;
        let topics = i32_at(&mut bytes)?;
        let mut out = Vec::new();
        for _ in 0..topics.max(0).min(bytes.len() as i32) {
            let length = i16_at(&mut bytes)?;
            let name = std::str::from_utf8(take(&mut bytes, length.max(0) as usize)?)
                .ok()?
                .to_owned();
            let count = i32_at(&mut bytes)?;
            let mut partitions = Vec::new();
            for _ in 0..count.max(0).min(bytes.len() as i32 / 4) {
                partitions.push(i32_at(&mut bytes)?);
            }
            out.push(TopicPartitions {
                topic: name,
                partitions,
            });
        }
        Some(out)
    };
    parse(bytes).unwrap_or_default()
}

async fn detail(state: &AdminState, group: &str) -> ApiResult<Option<GroupDetail>> {
    let described = state
        .broker
        .groups()
        .describe(group)
        .await
        .map_err(group_problem)?;
    let committed = state.broker.committed_offsets(group)?;
    if described.is_none() && committed.is_empty() {
        return Ok(None);
    }
    let mut owners: BTreeMap<(String, u32), String> = BTreeMap::new();
    let mut members = Vec::new();
    if let Some(described) = &described {
        for member in &described.members {
            let assignment = if described.protocol_type == "consumer" {
                decode_assignment(&member.assignment)
            } else {
                Vec::new()
            };
            for topic in &assignment {
                for p in &topic.partitions {
                    owners.insert((topic.topic.clone(), *p as u32), member.member_id.clone());
                }
            }
            members.push(MemberView {
                member_id: member.member_id.clone(),
                instance_id: member.instance_id.clone(),
                client_id: member.client_id.clone(),
                client_host: member.client_host.clone(),
                assignment,
            });
        }
    }
    let mut positions: BTreeMap<(String, u32), Option<i64>> =
        owners.keys().map(|k| (k.clone(), None)).collect();
    for entry in &committed {
        positions.insert(
            (entry.topic.clone(), entry.partition),
            Some(entry.committed.offset),
        );
    }
    let mut total_lag = 0;
    let offsets = positions
        .into_iter()
        .map(|((topic, partition), committed)| {
            let high_watermark = state
                .broker
                .partition(&topic, partition as i32)
                .map(|p| p.high_watermark())
                .unwrap_or(0);
            let lag = committed
                .filter(|c| *c >= 0)
                .map(|c| high_watermark.saturating_sub(c as u64));
            total_lag += lag.unwrap_or(0);
            PartitionOffset {
                member_id: owners.get(&(topic.clone(), partition)).cloned(),
                topic,
                partition,
                committed,
                high_watermark,
                lag,
            }
        })
        .collect();
    Ok(Some(match described {
        Some(d) => GroupDetail {
            group_id: d.group_id,
            state: d.state.name().to_owned(),
            protocol_type: d.protocol_type,
            protocol: d.protocol,
            generation: d.generation,
            leader: d.leader,
            members,
            offsets,
            lag: total_lag,
        },
        None => GroupDetail {
            group_id: group.to_owned(),
            state: "Empty".to_owned(),
            protocol_type: "consumer".to_owned(),
            protocol: String::new(),
            generation: 0,
            leader: None,
            members,
            offsets,
            lag: total_lag,
        },
    }))
}

#[utoipa::path(get, path = "/api/groups", tag = "groups",
    responses((status = 200, description = "Every consumer group, live or with committed offsets", body = [GroupSummary])))]
pub async fn list(State(state): State<Arc<AdminState>>) -> ApiResult<Json<Vec<GroupSummary>>> {
    let mut ids: Vec<String> = state.broker.groups_with_offsets()?;
    ids.extend(
        state
            .broker
            .groups()
            .list()
            .await
            .map_err(group_problem)?
            .into_iter()
            .map(|g| g.group_id),
    );
    ids.sort();
    ids.dedup();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(d) = detail(&state, &id).await? {
            out.push(GroupSummary {
                group_id: d.group_id,
                state: d.state,
                protocol_type: d.protocol_type,
                members: d.members.len(),
                lag: d.lag,
            });
        }
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/groups/{group}", tag = "groups",
    params(("group" = String, Path, description = "Group id")),
    responses(
        (status = 200, description = "Members, assignments, committed offsets and lag per partition", body = GroupDetail),
        (status = 404, description = "No such group", body = crate::error::Problem)))]
pub async fn describe(
    State(state): State<Arc<AdminState>>,
    Path(group): Path<String>,
) -> ApiResult<Json<GroupDetail>> {
    detail(&state, &group)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("group {group:?} does not exist")))
}

#[utoipa::path(delete, path = "/api/groups/{group}", tag = "groups",
    params(("group" = String, Path, description = "Group id")),
    responses(
        (status = 204, description = "Deleted with its committed offsets"),
        (status = 404, description = "No such group", body = crate::error::Problem),
        (status = 409, description = "The group has active members", body = crate::error::Problem)))]
pub async fn delete(
    State(state): State<Arc<AdminState>>,
    Path(group): Path<String>,
) -> ApiResult<StatusCode> {
    let had_state = state
        .broker
        .groups()
        .forget(&group)
        .await
        .map_err(group_problem)?;
    let removed = state.broker.delete_group_offsets(&group).await?;
    if !had_state && removed == 0 {
        return Err(ApiError::not_found(format!(
            "group {group:?} does not exist"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/groups/{group}/reset-offsets", tag = "groups", request_body = ResetOffsets,
    params(("group" = String, Path, description = "Group id")),
    responses(
        (status = 200, description = "Each partition's previous and new offset (committed unless dry_run)", body = [OffsetReset]),
        (status = 400, description = "Nothing to reset, or a bad target", body = crate::error::Problem),
        (status = 404, description = "No such topic", body = crate::error::Problem),
        (status = 409, description = "The group has active members", body = crate::error::Problem)))]
pub async fn reset_offsets(
    State(state): State<Arc<AdminState>>,
    Path(group): Path<String>,
    Json(request): Json<ResetOffsets>,
) -> ApiResult<Json<Vec<OffsetReset>>> {
    if let Some(live) = state
        .broker
        .groups()
        .describe(&group)
        .await
        .map_err(group_problem)?
        && !live.members.is_empty()
    {
        return Err(group_problem(GroupError::NonEmptyGroup));
    }
    let committed = state.broker.committed_offsets(&group)?;
    let topics: Vec<String> = match &request.topic {
        Some(topic) => vec![topic.clone()],
        None => {
            let mut topics: Vec<String> = committed.iter().map(|e| e.topic.clone()).collect();
            topics.dedup();
            topics
        }
    };
    if topics.is_empty() {
        return Err(ApiError::bad_request(
            "the group has no committed offsets; name a topic to reset",
        ));
    }
    let mut resets = Vec::new();
    for topic in topics {
        let found = super::topics::find(&state, &topic)?;
        for partition in found.served() {
            let start = partition.log_start_offset();
            let end = partition.high_watermark();
            let new = match &request.target {
                ResetTo::Earliest => start,
                ResetTo::Latest => end,
                ResetTo::Offset { offset } => (*offset).clamp(start, end),
                ResetTo::Timestamp { timestamp_ms } => partition
                    .offset_for_timestamp(*timestamp_ms)?
                    .map_or(end, |(offset, _)| offset),
            };
            let previous = committed
                .iter()
                .find(|e| e.topic == topic && e.partition == partition.index())
                .map(|e| e.committed.offset);
            resets.push(OffsetReset {
                topic: topic.clone(),
                partition: partition.index(),
                previous,
                new,
            });
        }
    }
    if !request.dry_run {
        let now_ms = state.broker.clock().now_ms();
        let entries = resets
            .iter()
            .map(|r| OffsetEntry {
                topic: r.topic.clone(),
                partition: r.partition,
                committed: CommittedOffset {
                    offset: r.new as i64,
                    leader_epoch: -1,
                    metadata: String::new(),
                    commit_timestamp_ms: now_ms,
                },
            })
            .collect();
        state.broker.commit_offsets(&group, entries).await?;
    }
    Ok(Json(resets))
}

#[cfg(test)]
mod tests {
    use super::decode_assignment;

    #[test]
    fn decodes_a_consumer_assignment_and_survives_garbage() {
        let mut bytes = vec![
            0, 1, 0, 0, 0, 1, 0, 2, b'a', b'b', 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 5,
        ];
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let decoded = decode_assignment(&bytes);
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].topic, "ab");
        assert_eq!(decoded[0].partitions, vec![3, 5]);
        assert!(decode_assignment(&[0, 1, 0x7f, 0xff, 0xff, 0xff]).is_empty());
        assert!(decode_assignment(&[]).is_empty());
    }
}
