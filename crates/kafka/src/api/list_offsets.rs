//! Offsets by position and time: ListOffsets, OffsetForLeaderEpoch, and DeleteRecords (which
//! moves a partition's start offset).

use std::time::Duration;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{
    DeleteRecordsRequest, DeleteRecordsResponse, ListOffsetsRequest, ListOffsetsResponse,
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse,
};
use sluice_broker::Partition;

use crate::Context;
use crate::errors::{KafkaError, kafka_error};

/// Special timestamps of ListOffsets.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;
const EARLIEST_LOCAL: i64 = -4;
const EARLIEST_PENDING_UPLOAD: i64 = -5;
const LATEST_TIERED: i64 = -6;

/// (offset, timestamp) answering a ListOffsets query; (-1, -1) when nothing matches.
fn lookup(partition: &Partition, timestamp: i64) -> Result<(i64, i64), KafkaError> {
    let high_watermark = partition.high_watermark() as i64;
    let log_start = partition.log_start_offset() as i64;
    match timestamp {
        // Without transactions the last stable offset is the high watermark.
        LATEST => Ok((high_watermark, -1)),
        EARLIEST | EARLIEST_LOCAL | EARLIEST_PENDING_UPLOAD => Ok((log_start, -1)),
        // Nothing is tiered: the latest tiered offset is "none".
        LATEST_TIERED => Ok((-1, -1)),
        MAX_TIMESTAMP => Ok(partition
            .offset_of_max_timestamp()
            .map_err(|error| kafka_error(&error))?
            .map_or((-1, -1), |(offset, ts)| (offset as i64, ts))),
        timestamp if timestamp >= 0 => Ok(partition
            .offset_for_timestamp(timestamp)
            .map_err(|error| kafka_error(&error))?
            .map_or((-1, -1), |(offset, ts)| (offset as i64, ts))),
        other => Err(KafkaError::new(
            ResponseError::InvalidRequest,
            format!("unknown special timestamp {other}"),
        )),
    }
}

pub(crate) fn handle(
    ctx: &Context,
    request: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let topics = request
        .topics
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    // The leader epoch field exists from v4 on.
                    let response = ListOffsetsPartitionResponse::default()
                        .with_partition_index(p.partition_index)
                        .with_leader_epoch(if version >= 4 { 0 } else { -1 });
                    let result = ctx
                        .broker
                        .partition(topic.name.as_str(), p.partition_index)
                        .map_err(|error| kafka_error(&error))
                        .and_then(|partition| {
                            super::check_leader_epoch(&partition, p.current_leader_epoch)?;
                            lookup(&partition, p.timestamp)
                                .map(|found| (found, partition.leader_epoch()))
                        });
                    match result {
                        Ok(((offset, timestamp), epoch)) => response
                            .with_offset(offset)
                            .with_timestamp(timestamp)
                            .with_leader_epoch(if version >= 4 { epoch } else { -1 }),
                        Err(error) => response
                            .with_error_code(error.code)
                            .with_offset(-1)
                            .with_timestamp(-1),
                    }
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}

pub(crate) async fn offset_for_leader_epoch(
    ctx: &Context,
    request: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for p in &topic.partitions {
            let entry = EpochEndOffset::default().with_partition(p.partition);
            let result = match ctx.broker.partition(topic.topic.as_str(), p.partition) {
                Ok(partition) => {
                    match super::check_leader_epoch(&partition, p.current_leader_epoch) {
                        Ok(()) => partition
                            .end_offset_for_epoch(p.leader_epoch)
                            .await
                            .map_err(|e| kafka_error(&e)),
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(kafka_error(&error)),
            };
            partitions.push(match result {
                Ok(Some((epoch, end))) => {
                    entry.with_leader_epoch(epoch).with_end_offset(end as i64)
                }
                Ok(None) => entry.with_leader_epoch(-1).with_end_offset(-1),
                Err(error) => entry
                    .with_error_code(error.code)
                    .with_leader_epoch(-1)
                    .with_end_offset(-1),
            });
        }
        topics.push(
            OffsetForLeaderTopicResult::default()
                .with_topic(topic.topic)
                .with_partitions(partitions),
        );
    }
    OffsetForLeaderEpochResponse::default().with_topics(topics)
}

pub(crate) async fn delete_records(
    ctx: &Context,
    request: DeleteRecordsRequest,
) -> DeleteRecordsResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for p in &topic.partitions {
            let entry =
                DeleteRecordsPartitionResult::default().with_partition_index(p.partition_index);
            let result = match ctx.broker.partition(topic.name.as_str(), p.partition_index) {
                Ok(partition) => {
                    // -1 means "up to the high watermark".
                    let offset = if p.offset == -1 {
                        partition.high_watermark() as i64
                    } else {
                        p.offset
                    };
                    if offset < 0 || offset > partition.high_watermark() as i64 {
                        Err(KafkaError::new(
                            ResponseError::OffsetOutOfRange,
                            format!("offset {offset} is beyond the high watermark"),
                        ))
                    } else {
                        partition
                            .delete_records(
                                offset as u64,
                                Duration::from_millis(request.timeout_ms.max(0) as u64),
                            )
                            .await
                            .map_err(|e| kafka_error(&e))
                    }
                }
                Err(error) => Err(kafka_error(&error)),
            };
            partitions.push(match result {
                Ok(low_watermark) => entry.with_low_watermark(low_watermark as i64),
                Err(error) => entry.with_error_code(error.code).with_low_watermark(-1),
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    DeleteRecordsResponse::default().with_topics(topics)
}
