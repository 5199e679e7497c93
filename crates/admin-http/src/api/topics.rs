//! Topics: list, create, describe, alter, grow, delete.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_broker::{NewTopic, Topic};
use utoipa::ToSchema;

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
    /// The node that serves the partition.
    pub leader: u32,
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
                PartitionDetail {
                    partition: index as u32,
                    leader: topic
                        .leaders
                        .get(index)
                        .copied()
                        .unwrap_or(state.broker.node_id()),
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
