//! Fetch: read record batches from partitions, waiting up to `max_wait_ms` for at least
//! `min_bytes` to arrive.
//!
//! Stored batches go into the response as stored: no decompression, no re-encoding. Sizes
//! follow KIP-74: partitions are filled in request order within `max_bytes` (never more than
//! the broker's `fetch_max_bytes`) and each partition's own limit, except that the first
//! batch of the first non-empty partition is always returned whole so a consumer can make
//! progress. A read never allocates more than what it may return.
//!
//! Waiting: the handler subscribes to the high watermark of every partition it reads, then
//! waits for any of them to move, for the deadline, or for shutdown, and reads again.
//!
//! Fetch sessions (KIP-227) are not kept: every response carries session id 0, which tells
//! clients to send full fetch requests. An incremental request (a non-zero session id) gets
//! FETCH_SESSION_ID_NOT_FOUND, after which clients start over with a full one.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse};
use sluice_broker::{BrokerError, Partition};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Context;
use crate::errors::{KafkaError, kafka_error};

/// Kafka's isolation level byte for READ_COMMITTED.
const READ_COMMITTED: i8 = 1;

struct Wanted {
    topic_position: usize,
    index: i32,
    target: Result<Arc<Partition>, KafkaError>,
    fetch_offset: i64,
    max_bytes: usize,
}

fn resolve(ctx: &Context, request: &FetchRequest, version: i16) -> Vec<Wanted> {
    let mut wanted = Vec::new();
    for (topic_position, topic) in request.topics.iter().enumerate() {
        let found = if version >= 13 {
            ctx.broker.topic_by_id(topic.topic_id).ok_or_else(|| {
                KafkaError::new(
                    ResponseError::UnknownTopicId,
                    format!("no topic with id {}", topic.topic_id),
                )
            })
        } else {
            ctx.broker
                .topic(topic.topic.as_str())
                .ok_or_else(|| kafka_error(&BrokerError::UnknownTopic(topic.topic.to_string())))
        };
        for partition in &topic.partitions {
            let target = found.clone().and_then(|topic| {
                let found = topic
                    .get(partition.partition)
                    .cloned()
                    .map_err(|e| kafka_error(&e))?;
                super::check_leader_epoch(&found, partition.current_leader_epoch)?;
                Ok(found)
            });
            wanted.push(Wanted {
                topic_position,
                index: partition.partition,
                target,
                fetch_offset: partition.fetch_offset,
                max_bytes: partition.partition_max_bytes.max(0) as usize,
            });
        }
    }
    wanted
}

/// One pass over the wanted partitions. Returns the partition entries (by position) and the
/// number of record bytes gathered, and whether any partition reported an error.
fn read_once(
    wanted: &[Wanted],
    max_bytes: usize,
    read_committed: bool,
) -> (Vec<PartitionData>, usize, bool) {
    let mut entries = Vec::with_capacity(wanted.len());
    let mut budget = max_bytes;
    let mut gathered = 0usize;
    let mut any_error = false;
    for want in wanted {
        let entry = PartitionData::default()
            .with_partition_index(want.index)
            .with_preferred_read_replica(BrokerId(-1))
            .with_aborted_transactions(read_committed.then(Vec::new));
        let partition = match &want.target {
            Ok(partition) => partition,
            Err(error) => {
                any_error = true;
                entries.push(
                    entry
                        .with_error_code(error.code)
                        .with_high_watermark(-1)
                        .with_last_stable_offset(-1)
                        .with_log_start_offset(-1),
                );
                continue;
            }
        };
        let high_watermark = partition.high_watermark() as i64;
        let log_start = partition.log_start_offset() as i64;
        let entry = entry
            .with_high_watermark(high_watermark)
            .with_last_stable_offset(high_watermark)
            .with_log_start_offset(log_start);
        if want.fetch_offset < log_start || want.fetch_offset > high_watermark {
            any_error = true;
            entries.push(entry.with_error_code(ResponseError::OffsetOutOfRange.code()));
            continue;
        }
        let limit = want.max_bytes.min(budget);
        let first_with_data = gathered == 0;
        if want.fetch_offset == high_watermark || (limit == 0 && !first_with_data) {
            entries.push(entry.with_records(Some(Default::default())));
            continue;
        }
        match partition.read(want.fetch_offset as u64, limit, first_with_data) {
            Ok(read) => {
                let length = read.bytes.len();
                gathered += length;
                budget = budget.saturating_sub(length);
                entries.push(entry.with_records(Some(read.bytes)));
            }
            Err(error) => {
                any_error = true;
                entries.push(entry.with_error_code(kafka_error(&error).code));
            }
        }
    }
    (entries, gathered, any_error)
}

/// Waits until one of the watched high watermarks moves, the deadline passes, or shutdown.
async fn wait_for_data(ctx: &Context, watches: &mut [watch::Receiver<u64>], deadline: Instant) {
    if watches.is_empty() {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = ctx.shutdown.cancelled() => {}
        }
        return;
    }
    let changes =
        futures::future::select_all(watches.iter_mut().map(|watch| Box::pin(watch.changed())));
    tokio::select! {
        _ = changes => {}
        () = tokio::time::sleep_until(deadline) => {}
        () = ctx.shutdown.cancelled() => {}
    }
}

pub(crate) async fn handle(ctx: &Context, request: FetchRequest, version: i16) -> FetchResponse {
    if version >= 7 && request.session_id != 0 {
        return FetchResponse::default()
            .with_error_code(ResponseError::FetchSessionIdNotFound.code());
    }
    let wanted = resolve(ctx, &request, version);
    // The client's limit, within the broker's (Kafka takes the smaller one too). What a read
    // allocates follows from it: no partition reads more than what is left of it, but for
    // the first batch, returned whole.
    let max_bytes = (request.max_bytes.max(0) as usize).min(ctx.settings.fetch_max_bytes);
    let min_bytes = request.min_bytes.max(0) as usize;
    let read_committed = request.isolation_level == READ_COMMITTED;
    let deadline = Instant::now() + Duration::from_millis(request.max_wait_ms.max(0) as u64);
    // Subscribe before the first read, so a batch appended in between wakes the wait.
    let mut watches: Vec<watch::Receiver<u64>> = wanted
        .iter()
        .filter_map(|w| w.target.as_ref().ok())
        .map(|partition| {
            let mut watch = partition.watch_high_watermark();
            watch.borrow_and_update();
            watch
        })
        .collect();
    let entries = loop {
        let (entries, gathered, any_error) = read_once(&wanted, max_bytes, read_committed);
        if gathered >= min_bytes
            || any_error
            || Instant::now() >= deadline
            || ctx.shutdown.is_cancelled()
        {
            break entries;
        }
        wait_for_data(ctx, &mut watches, deadline).await;
    };
    let mut responses: Vec<FetchableTopicResponse> = request
        .topics
        .iter()
        .map(|topic| {
            FetchableTopicResponse::default()
                .with_topic(topic.topic.clone())
                .with_topic_id(topic.topic_id)
        })
        .collect();
    for (want, entry) in wanted.iter().zip(entries) {
        responses[want.topic_position].partitions.push(entry);
    }
    FetchResponse::default().with_responses(responses)
}
