//! Produce: append record batches to partitions, as sent (compressed or not).
//!
//! Partitions of one request are appended concurrently (each has its own owner task); the
//! response lists them in request order. A request is handled in two steps ([`submit`]):
//! every write takes its place in its partition's order, then the answers are awaited, so a
//! connection reads and submits its next produce request while this one waits for its
//! commit. With acks=0 nothing is sent back. A single copy is
//! its partition's only in-sync replica, so acks=1 and acks=-1 behave alike: the reply waits
//! for the append (and, under fsync=always, for the fsync). A replicated partition answers
//! acks=1 once its leader has appended and acks=-1 once the write is committed, waiting at
//! most the request's `timeout_ms` (then REQUEST_TIMED_OUT: it may still commit).

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sluice_broker::partition::PRODUCE_COMMIT_WAIT;
use sluice_broker::{BrokerError, ProduceOutcome};

use super::text;
use crate::Context;
use crate::errors::{KafkaError, kafka_error};

fn partition_response(
    index: i32,
    result: Result<ProduceOutcome, KafkaError>,
    version: i16,
) -> PartitionProduceResponse {
    let response = PartitionProduceResponse::default().with_index(index);
    match result {
        Ok(outcome) => response
            .with_base_offset(outcome.base_offset as i64)
            .with_log_append_time_ms(outcome.log_append_time_ms.unwrap_or(-1))
            .with_log_start_offset(outcome.log_start_offset as i64),
        Err(error) => response
            .with_error_code(error.code)
            .with_base_offset(-1)
            .with_log_append_time_ms(-1)
            .with_log_start_offset(-1)
            .with_error_message((version >= 8).then(|| text(error.message))),
    }
}

pub(crate) async fn handle(
    ctx: &Context,
    request: ProduceRequest,
    version: i16,
) -> Option<ProduceResponse> {
    submit(ctx, request, version).await.await
}

/// The answer to a produce request whose writes have their places: awaiting it gives the
/// response (`None` for acks=0).
pub(crate) type PendingResponse = Pin<Box<dyn Future<Output = Option<ProduceResponse>> + Send>>;

/// Submits every partition's write of `request` (concurrently: they are different
/// partitions) and returns once each has its place in its partition's order, so that the
/// connection's next request goes behind them; the response is the pending future's.
pub(crate) async fn submit(
    ctx: &Context,
    request: ProduceRequest,
    version: i16,
) -> PendingResponse {
    let acks = request.acks;
    let acks_valid = matches!(acks, -1..=1);
    // How long a replicated write may wait for its acknowledgement (Kafka's timeout_ms).
    let timeout = match u64::try_from(request.timeout_ms) {
        Ok(ms) if ms > 0 => Duration::from_millis(ms),
        _ => PRODUCE_COMMIT_WAIT,
    };
    let mut submits = Vec::new();
    for (topic_position, topic) in request.topic_data.iter().enumerate() {
        let resolved = if version >= 13 {
            ctx.broker.topic_by_id(topic.topic_id).ok_or_else(|| {
                KafkaError::new(
                    ResponseError::UnknownTopicId,
                    format!("no topic with id {}", topic.topic_id),
                )
            })
        } else {
            ctx.broker
                .topic(topic.name.as_str())
                .ok_or_else(|| kafka_error(&BrokerError::UnknownTopic(topic.name.to_string())))
        };
        for partition_data in &topic.partition_data {
            let index = partition_data.index;
            let resolved = resolved.clone();
            let records = partition_data.records.clone();
            submits.push(async move {
                let submitted = async {
                    if !acks_valid {
                        return Err(KafkaError::new(
                            ResponseError::InvalidRequiredAcks,
                            format!("acks must be -1, 0 or 1, not {acks}"),
                        ));
                    }
                    let topic = resolved?;
                    if ctx.broker.is_internal_topic(&topic.name) {
                        return Err(KafkaError::new(
                            ResponseError::InvalidTopicException,
                            format!("{} is an internal topic", topic.name),
                        ));
                    }
                    let partition = topic.get(index).map_err(|e| kafka_error(&e))?;
                    let Some(records) = records else {
                        return Err(KafkaError::new(
                            ResponseError::CorruptMessage,
                            "the partition's records are null",
                        ));
                    };
                    partition
                        .submit_produce(records, acks, timeout)
                        .await
                        .map_err(|error| kafka_error(&error))
                }
                .await;
                (topic_position, index, submitted)
            });
        }
    }
    let submitted = futures::future::join_all(submits).await;
    Box::pin(async move {
        let results = futures::future::join_all(submitted.into_iter().map(
            |(topic_position, index, submitted)| async move {
                let result = match submitted {
                    Ok(pending) => pending.await.map_err(|error| kafka_error(&error)),
                    Err(error) => Err(error),
                };
                (topic_position, index, result)
            },
        ))
        .await;
        if acks == 0 {
            return None;
        }
        let mut responses: Vec<TopicProduceResponse> = request
            .topic_data
            .iter()
            .map(|topic| {
                TopicProduceResponse::default()
                    .with_name(topic.name.clone())
                    .with_topic_id(topic.topic_id)
            })
            .collect();
        for (topic_position, index, result) in results {
            if let Err(error) = &result
                && error.code != ResponseError::NotLeaderOrFollower.code()
            {
                tracing::debug!(topic = %responses[topic_position].name.as_str(), partition = index, code = error.code, message = %error.message, "produce refused");
            }
            responses[topic_position]
                .partition_responses
                .push(partition_response(index, result, version));
        }
        Some(ProduceResponse::default().with_responses(responses))
    })
}
