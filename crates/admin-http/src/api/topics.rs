//! Topics: list, create, describe, alter, grow, delete; a checksum of a partition's copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_broker::{BrokerError, NewTopic, Topic};
use sluice_storage::StorageError;
use utoipa::{IntoParams, ToSchema};

use crate::AdminState;
use crate::error::{ApiError, ApiResult};

#[derive(Debug, Serialize, ToSchema)]
pub struct TopicSummary {
    pub name: String,
    pub id: String,
    pub partitions: usize,
    /// Records currently retained.
    pub records: u64,
    pub size_bytes: u64,
    /// Records appended since the broker started.
    pub records_in: u64,
    /// Records read by consumers since the broker started.
    pub records_out: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionDetail {
    pub partition: u32,
    /// The node that serves the partition (a replicated partition's leader as this node
    /// knows it; null while it has none).
    pub leader: Option<u32>,
    /// The leader epoch (a replicated partition's Raft term; 0 for a single copy).
    pub epoch: i32,
    /// Every node holding a copy, the preferred leader first (during a reassignment: the
    /// target's, then those it removes).
    pub replicas: Vec<u32>,
    /// The nodes a reassignment in progress adds (null when none is in progress).
    pub adding: Option<Vec<u32>>,
    /// The nodes a reassignment in progress removes (null when none is in progress).
    pub removing: Option<Vec<u32>>,
    /// The other replicas with their lag, when this node leads a replicated partition (ask
    /// the leader's node otherwise); null for a single copy or a follower here.
    pub followers: Option<Vec<FollowerDetail>>,
    /// Whether this node's replica is quiet (an idle replicated partition: no heartbeats, no
    /// timers until a write or a campaign wakes it); null for a single copy or a partition
    /// with no replica here.
    pub quiet: Option<bool>,
    /// The figures below are this node's, so only for partitions it serves (null for the
    /// others: ask their node).
    pub log_start_offset: Option<u64>,
    pub high_watermark: Option<u64>,
    pub log_end_offset: Option<u64>,
    pub size_bytes: Option<u64>,
    pub segments: Option<usize>,
    pub records_in: Option<u64>,
    pub records_out: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FollowerDetail {
    pub node: u32,
    /// Whether it votes and answered the leader within `kafka.replica_lag_time_max_ms`.
    pub in_sync: bool,
    /// False for a learner: a node a reassignment adds, catching up from the log.
    pub voter: bool,
    /// Records it is behind the leader's log (null until the leader knows what it holds).
    pub lag: Option<u64>,
    /// The offset after the last record the leader knows it holds.
    pub matched_offset: Option<u64>,
    /// Milliseconds since it last answered the leader.
    pub last_contact_ms: Option<u64>,
}

/// A checksum of one copy of a partition's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionChecksum {
    pub partition: u32,
    /// The node whose copy this is.
    pub node: u32,
    pub log_start_offset: u64,
    /// The offset after the last batch covered (the batch holding `to - 1` included).
    pub end_offset: u64,
    pub bytes: u64,
    /// CRC-32C of the log's bytes from its start to `end_offset`, as stored.
    pub crc32c: u32,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ChecksumQuery {
    /// Cover the log up to this offset (default: this copy's high watermark).
    pub to: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigValue {
    pub name: String,
    pub value: String,
    /// False when the topic overrides the broker default.
    pub is_default: bool,
    pub documentation: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopicDetail {
    pub name: String,
    pub id: String,
    pub created_ms: i64,
    pub partitions: Vec<PartitionDetail>,
    pub config: Vec<ConfigValue>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateTopic {
    pub name: String,
    /// Defaults to the broker's `kafka.num_partitions`.
    pub partitions: Option<u32>,
    /// Copies of each partition, on that many nodes, replicated by a Raft group per
    /// partition; defaults to `kafka.default_replication_factor` (unset: the smaller of 3
    /// and the cluster's nodes).
    pub replication_factor: Option<i16>,
    /// Topic config overrides, for example `{"retention.ms": "3600000"}`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Reassign {
    /// The nodes to move the partition to, the preferred leader first; null cancels the
    /// reassignment in progress.
    pub replicas: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AddPartitions {
    /// The new total number of partitions.
    pub count: u32,
}

pub(crate) fn find(state: &AdminState, name: &str) -> ApiResult<Arc<Topic>> {
    state
        .broker
        .topic(name)
        .ok_or_else(|| ApiError::not_found(format!("topic {name:?} does not exist")))
}

fn summary(topic: &Topic) -> TopicSummary {
    let mut summary = TopicSummary {
        name: topic.name.to_string(),
        id: topic.id.to_string(),
        partitions: topic.partition_count(),
        records: 0,
        size_bytes: 0,
        records_in: 0,
        records_out: 0,
    };
    for partition in topic.served() {
        summary.records += partition
            .high_watermark()
            .saturating_sub(partition.log_start_offset());
        summary.size_bytes += partition.reader().size_bytes();
        summary.records_in += partition.stats().records_in.get();
        summary.records_out += partition.stats().records_out.get();
    }
    summary
}

fn detail(state: &AdminState, topic: &Topic) -> ApiResult<TopicDetail> {
    let config = state
        .broker
        .describe_topic_config(&topic.name)?
        .into_iter()
        .map(|entry| ConfigValue {
            name: entry.name.to_owned(),
            value: entry.value,
            is_default: entry.is_default,
            documentation: entry.documentation.to_owned(),
        })
        .collect();
    let lag_max = state.broker.config().replica_lag_time_max;
    let moving = |index: usize| topic.reassigning.get(index).cloned().flatten();
    Ok(TopicDetail {
        name: topic.name.to_string(),
        id: topic.id.to_string(),
        created_ms: topic.created_ms,
        partitions: topic
            .partitions
            .iter()
            .enumerate()
            .map(|(index, served)| {
                let served = served.as_ref();
                let view = topic.partition_view(index);
                PartitionDetail {
                    partition: index as u32,
                    leader: view
                        .as_ref()
                        .map_or(Some(state.broker.node_id()), |v| v.leader),
                    epoch: view.as_ref().map_or(0, |v| v.epoch),
                    replicas: view.map(|v| v.replicas).unwrap_or_default(),
                    adding: moving(index).map(|(adding, _)| adding),
                    removing: moving(index).map(|(_, removing)| removing),
                    followers: served
                        .and_then(|p| p.followers())
                        .filter(|followers| !followers.is_empty())
                        .map(|followers| {
                            let end = served.map_or(0, |p| p.reader().log_end_offset());
                            followers
                                .into_iter()
                                .map(|f| FollowerDetail {
                                    node: f.node,
                                    in_sync: f.in_sync(lag_max),
                                    voter: f.voter,
                                    lag: f.matched_offset.map(|m| end.saturating_sub(m)),
                                    matched_offset: f.matched_offset,
                                    last_contact_ms: f.last_contact_ms,
                                })
                                .collect()
                        }),
                    quiet: served.and_then(|p| p.is_quiet()),
                    log_start_offset: served.map(|p| p.log_start_offset()),
                    high_watermark: served.map(|p| p.high_watermark()),
                    log_end_offset: served.map(|p| p.reader().log_end_offset()),
                    size_bytes: served.map(|p| p.reader().size_bytes()),
                    segments: served.map(|p| p.reader().segments().len()),
                    records_in: served.map(|p| p.stats().records_in.get()),
                    records_out: served.map(|p| p.stats().records_out.get()),
                }
            })
            .collect(),
        config,
    })
}

#[utoipa::path(get, path = "/api/topics", tag = "topics",
    responses((status = 200, description = "Every topic", body = [TopicSummary])))]
pub async fn list(State(state): State<Arc<AdminState>>) -> Json<Vec<TopicSummary>> {
    Json(state.broker.topics().iter().map(|t| summary(t)).collect())
}

#[utoipa::path(post, path = "/api/topics", tag = "topics", request_body = CreateTopic,
    responses(
        (status = 201, description = "Created", body = TopicDetail),
        (status = 400, description = "Invalid name, partition count or config", body = crate::error::Problem),
        (status = 409, description = "The topic exists", body = crate::error::Problem)))]
pub async fn create(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<CreateTopic>,
) -> ApiResult<(StatusCode, Json<TopicDetail>)> {
    let created = state
        .broker
        .create_topic(
            NewTopic {
                name: request.name.clone(),
                partition_count: request.partitions,
                replication_factor: request.replication_factor,
                config: request.config,
                assignments: None,
            },
            false,
        )
        .await?
        .ok_or_else(|| ApiError::internal("topic creation returned nothing"))?;
    Ok((StatusCode::CREATED, Json(detail(&state, &created)?)))
}

#[utoipa::path(get, path = "/api/topics/{topic}", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses(
        (status = 200, description = "Partitions with offsets and sizes, and the effective config", body = TopicDetail),
        (status = 404, description = "No such topic", body = crate::error::Problem)))]
pub async fn describe(
    State(state): State<Arc<AdminState>>,
    Path(topic): Path<String>,
) -> ApiResult<Json<TopicDetail>> {
    let found = find(&state, &topic)?;
    Ok(Json(detail(&state, &found)?))
}

#[utoipa::path(get, path = "/api/topics/{topic}/partitions/{partition}/checksum", tag = "topics",
    params(("topic" = String, Path, description = "Topic name"),
           ("partition" = u32, Path, description = "Partition index"), ChecksumQuery),
    responses(
        (status = 200, description = "A CRC-32C of this node's copy of the partition's log, to compare replicas", body = PartitionChecksum),
        (status = 404, description = "No such topic or partition, or no copy on this node", body = crate::error::Problem),
        (status = 416, description = "This copy does not reach `to` yet", body = crate::error::Problem)))]
pub async fn checksum(
    State(state): State<Arc<AdminState>>,
    Path((topic, partition)): Path<(String, u32)>,
    Query(query): Query<ChecksumQuery>,
) -> ApiResult<Json<PartitionChecksum>> {
    let found = find(&state, &topic)?;
    let copy = found
        .partitions
        .get(partition as usize)
        .ok_or_else(|| {
            ApiError::not_found(format!("topic {topic:?} has no partition {partition}"))
        })?
        .clone()
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "this node holds no copy of partition {partition} of topic {topic:?}"
            ))
        })?;
    let to = query.to.unwrap_or_else(|| copy.high_watermark());
    let node = state.broker.node_id();
    let summed = tokio::task::spawn_blocking(move || copy.checksum(to))
        .await
        .map_err(|e| ApiError::internal(format!("checksum task failed: {e}")))?;
    let summed = summed.map_err(|error| match error {
        BrokerError::Storage(StorageError::OffsetOutOfRange { .. }) => ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("this copy does not reach offset {to} yet: {error}"),
        ),
        other => other.into(),
    })?;
    Ok(Json(PartitionChecksum {
        partition,
        node,
        log_start_offset: summed.log_start_offset,
        end_offset: summed.end_offset,
        bytes: summed.bytes,
        crc32c: summed.crc32c,
    }))
}

#[utoipa::path(delete, path = "/api/topics/{topic}", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses(
        (status = 204, description = "Deleted, with its data and committed offsets"),
        (status = 404, description = "No such topic", body = crate::error::Problem)))]
pub async fn delete(
    State(state): State<Arc<AdminState>>,
    Path(topic): Path<String>,
) -> ApiResult<StatusCode> {
    state.broker.delete_topic(&topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = "/api/topics/{topic}/config", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    request_body(content = BTreeMap<String, Option<String>>, description = "Keys to set; null removes an override"),
    responses(
        (status = 200, description = "The topic after the change", body = TopicDetail),
        (status = 400, description = "Unknown key or invalid value", body = crate::error::Problem),
        (status = 404, description = "No such topic", body = crate::error::Problem)))]
pub async fn alter_config(
    State(state): State<Arc<AdminState>>,
    Path(topic): Path<String>,
    Json(changes): Json<BTreeMap<String, Option<String>>>,
) -> ApiResult<Json<TopicDetail>> {
    let found = find(&state, &topic)?;
    let mut overrides = found.overrides.clone();
    for (key, value) in changes {
        match value {
            Some(value) => overrides.insert(key, value),
            None => overrides.remove(&key),
        };
    }
    state
        .broker
        .set_topic_config(&topic, overrides, false)
        .await?;
    let found = find(&state, &topic)?;
    Ok(Json(detail(&state, &found)?))
}

#[utoipa::path(post, path = "/api/topics/{topic}/partitions", tag = "topics", request_body = AddPartitions,
    params(("topic" = String, Path, description = "Topic name")),
    responses(
        (status = 200, description = "The topic with its new partitions", body = TopicDetail),
        (status = 400, description = "The count is not larger than the current one", body = crate::error::Problem),
        (status = 404, description = "No such topic", body = crate::error::Problem)))]
pub async fn add_partitions(
    State(state): State<Arc<AdminState>>,
    Path(topic): Path<String>,
    Json(request): Json<AddPartitions>,
) -> ApiResult<Json<TopicDetail>> {
    state
        .broker
        .create_partitions(&topic, request.count, None, false)
        .await?;
    let found = find(&state, &topic)?;
    Ok(Json(detail(&state, &found)?))
}

#[utoipa::path(put, path = "/api/topics/{topic}/partitions/{partition}/reassignment", tag = "topics",
    request_body = Reassign,
    params(("topic" = String, Path, description = "Topic name"),
           ("partition" = u32, Path, description = "Partition index")),
    responses(
        (status = 202, description = "The reassignment is committed; the topic shows its progress", body = TopicDetail),
        (status = 400, description = "Invalid replicas, a partition with one copy, or no reassignment to cancel", body = crate::error::Problem),
        (status = 404, description = "No such topic or partition", body = crate::error::Problem)))]
/// Moves a replicated partition to other nodes (Kafka's AlterPartitionReassignments): a Raft
/// membership change its leader carries out; or cancels the move in progress.
pub async fn reassign(
    State(state): State<Arc<AdminState>>,
    Path((topic, partition)): Path<(String, u32)>,
    Json(request): Json<Reassign>,
) -> ApiResult<(StatusCode, Json<TopicDetail>)> {
    state
        .broker
        .reassign_partition(&topic, partition, request.replicas)
        .await?;
    let found = find(&state, &topic)?;
    Ok((StatusCode::ACCEPTED, Json(detail(&state, &found)?)))
}
